//! Erasure and retention. `persist-worker erase` while records about the same number are
//! being posted; then the whole stream replayed, every dead letter redriven and the
//! original POSTs resent: the erased data is in no row, no dead letter, no stream message
//! (read back), no worker log line; another number of the same company and the same
//! number at another company are untouched. The erasure survives a broker restart and,
//! with `sync_interval: always`, a power cut right after `erase` returned. Retention
//! deletes old calls and a replay does not bring them back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use callcap::subjects::{ingest_subject, Lane};
use callcap::{CallRecord, Envelope};
use callcap_tests::db::TestDb;
use callcap_tests::eventually;
use callcap_tests::nats::{stream_messages, stream_payloads_of, NatsConfig};
use callcap_tests::pipeline::{admin_command_env, Process, TestGateway};
use callcap_tests::powerfs::PowerFs;
use callcap_tests::stack::{Backend, Pipeline, Stack, Stored};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// The erased number, as the dialer sends it.
const ERASED: &str = "+919876500001";
/// Its digits, to look for anywhere.
const ERASED_DIGITS: &str = "9876500001";
/// Another number of the same company, kept.
const KEPT: &str = "+919876500002";

fn call(company: Uuid, ext: &str, number: &str) -> Value {
    json!({
        "company_id": company,
        "external_call_id": ext,
        "external_system": "Dialer",
        "caller_number": "+918000000000",
        "recipient_number": number,
        "call_status": "completed",
        "notes": "spoke about the plan",
    })
}

/// Posts calls `E-i` (the erased number) and `K-i` (the kept one) for each `i`.
async fn post_both(gw: &TestGateway, key: &str, company: Uuid, range: std::ops::Range<u32>) {
    for i in range {
        for (ext, number) in [(format!("E-{i}"), ERASED), (format!("K-{i}"), KEPT)] {
            let (status, body) = gw.post_call(key, &call(company, &ext, number)).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
}

/// Rows of `company` with `number` as caller or recipient.
async fn rows_with(db: &TestDb, company: Uuid, number: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM call_history WHERE company_id = $1 AND (caller_number = $2 OR recipient_number = $2)",
    )
    .bind(company)
    .bind(number)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Dead letters whose payload holds the erased digits.
async fn dead_letters_with_erased(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE position($1::bytea in payload) > 0")
        .bind(ERASED_DIGITS.as_bytes())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Stream messages on `company`'s subjects holding the erased number (envelopes or not).
async fn stream_hits(nats_url: &str, company: Uuid) -> usize {
    stream_payloads_of(nats_url, callcap::subjects::STREAM_NAME)
        .await
        .into_iter()
        .filter(|(_, subject, payload)| {
            subject.ends_with(&company.to_string())
                && String::from_utf8_lossy(payload).contains(ERASED_DIGITS)
        })
        .count()
}

/// Waits until both lanes' consumers have nothing pending.
pub(crate) async fn drained(nats_url: &str) {
    eventually(
        Duration::from_secs(30),
        "the workers to drain the stream",
        || async {
            let js = jetstream::new(callcap_tests::identities::connect(nats_url).await);
            let stream = js.get_stream(callcap::subjects::STREAM_NAME).await.ok()?;
            for lane in Lane::ALL {
                let mut c: jetstream::consumer::PullConsumer =
                    stream.get_consumer(lane.consumer_name()).await.ok()?;
                let info = c.info().await.ok()?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// The policy `replay` and `dlq redrive` apply with the erasure key in `key`.
fn policy_with(key: &std::path::Path) -> persist_worker::privacy::Policy {
    persist_worker::privacy::Policy {
        key: Some(Arc::new(
            persist_worker::privacy::ErasureKey::from_file(key).unwrap(),
        )),
        retention_days: None,
    }
}

/// `replay --from-seq 1` of every stream, through `policy`.
async fn replay_all(
    admin: &jetstream::Context,
    db: &TestDb,
    policy: &persist_worker::privacy::Policy,
) -> persist_worker::cli::replay::ReplaySummary {
    persist_worker::cli::replay::run(
        admin,
        None,
        &db.pool,
        policy,
        &persist_worker::config::ReplayArgs {
            from_seq: Some(1),
            from_archive: false,
            since: None,
            until: None,
            company: None,
            batch_size: 100,
            quiet: true,
        },
        Duration::from_millis(500),
        &callcap::shutdown::Shutdown::new(),
    )
    .await
    .unwrap()
}

async fn erase(nats_url: &str, db: &TestDb, key: &std::path::Path, args: &[&str]) -> String {
    let full = [&["erase", "--quiet"][..], args].concat();
    let out = admin_command_env(
        crate::WORKER_BIN,
        nats_url,
        &full,
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("ERASURE_KEY_FILE", &key.display().to_string()),
        ],
    )
    .await;
    let text = callcap_tests::pipeline::output_text(&out);
    assert!(out.status.success(), "erase {args:?} failed: {text}");
    text
}

#[tokio::test]
async fn erased_data_is_nowhere_and_no_path_brings_it_back() {
    let Stored {
        mut nats,
        db,
        gw,
        company: a,
        key: key_a,
        others,
        dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().companies(2).stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    let (b, key_b) = others[0].pair();
    let gw = Arc::new(gw);
    let ops_port = callcap_tests::free_port();
    let log = dir.path().join("worker.log");
    let mut worker = workers.process_logged(crate::WORKER_BIN, ops_port, &[], &log);

    // Company A: 20 calls with the number to erase, 20 with another; company B: 10 with
    // the same number (another company's data, not erased).
    let mut originals = Vec::new();
    for i in 0..20 {
        let body = call(a, &format!("E-{i}"), ERASED);
        assert_eq!(gw.post_call(&key_a, &body).await.0, StatusCode::CREATED);
        originals.push(body);
        assert_eq!(
            gw.post_call(&key_a, &call(a, &format!("K-{i}"), KEPT))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    for i in 0..10 {
        assert_eq!(
            gw.post_call(&key_b, &call(b, &format!("B-{i}"), ERASED))
                .await
                .0,
            StatusCode::CREATED
        );
    }
    // Two dead letters holding the number: a record on another company's subject, and
    // bytes that are no envelope at all.
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let mut forged = CallRecord::new(a);
    forged.recipient_number = Some(ERASED.into());
    let env = Envelope::new(
        Uuid::now_v7(),
        chrono::Utc::now(),
        "kx".into(),
        None,
        forged,
    );
    admin
        .publish(ingest_subject(b), env.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    admin
        .publish(ingest_subject(a), format!("not json {a} {ERASED}").into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "everything stored", || async {
        (db.count_calls().await == 50 && db.count_dead_letters().await == 2).then_some(())
    })
    .await;

    // Erase while the dialer keeps posting about both numbers.
    let poster = {
        let (gw, key_a) = (gw.clone(), key_a.clone());
        tokio::spawn(async move {
            let mut kept = 0;
            for i in 0.. {
                let (s1, _) = gw
                    .post_call(&key_a, &call(a, &format!("E-late-{i}"), ERASED))
                    .await;
                let (s2, _) = gw
                    .post_call(&key_a, &call(a, &format!("K-late-{i}"), KEPT))
                    .await;
                assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
                kept += 1;
                if i >= 40 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            kept
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let printed = erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", "+91 98765 00001"],
    )
    .await;
    let kept_late = poster.await.unwrap();
    drained(&nats.url()).await;
    assert!(
        printed.contains("postgres:") && printed.contains("stream:"),
        "{printed}"
    );
    assert!(
        !printed.contains(ERASED_DIGITS),
        "erase printed the number: {printed}"
    );

    let check = |what: &'static str| {
        let (db, url) = (&db, nats.url());
        async move {
            assert_eq!(
                rows_with(db, a, ERASED).await,
                0,
                "{what}: erased rows in Postgres"
            );
            assert_eq!(
                dead_letters_with_erased(db).await,
                0,
                "{what}: in the dead letters"
            );
            assert_eq!(stream_hits(&url, a).await, 0, "{what}: in the stream");
            assert_eq!(
                rows_with(db, a, KEPT).await,
                20 + kept_late,
                "{what}: the other number"
            );
            assert_eq!(
                rows_with(db, b, ERASED).await,
                10,
                "{what}: the other company"
            );
        }
    };
    check("after erase").await;

    // Replay the whole stream, redrive every dead letter: nothing comes back.
    let policy = policy_with(&key);
    let replayed = replay_all(&admin, &db, &policy).await;
    assert!(replayed.completed && replayed.messages > 0);
    persist_worker::cli::dlq::redrive(&db.pool, &policy, None, &mut Vec::new())
        .await
        .unwrap();
    check("after replay and redrive").await;

    // The dialer resends every original POST, and new calls about the number: 201 (the
    // API promises nothing else), then dropped and deleted from the stream.
    for (i, body) in originals.iter().enumerate() {
        assert_eq!(gw.post_call(&key_a, body).await.0, StatusCode::CREATED);
        let new = call(a, &format!("E-new-{i}"), ERASED);
        assert_eq!(gw.post_call(&key_a, &new).await.0, StatusCode::CREATED);
    }
    drained(&nats.url()).await;
    eventually(
        Duration::from_secs(10),
        "the resent records deleted from the stream",
        || async { (stream_hits(&nats.url(), a).await == 0).then_some(()) },
    )
    .await;
    check("after the resends").await;

    // The deletions are the broker's: they survive its restart.
    nats.stop();
    nats.start_again().await;
    assert_eq!(
        stream_hits(&nats.url(), a).await,
        0,
        "after a broker restart"
    );
    assert_eq!(
        stream_messages(&nats.url())
            .await
            .iter()
            .filter(|(_, _, e)| e.record.company_id == b)
            .count(),
        10
    );

    // Counts on the status page, never the number; nor in the worker's log.
    let (_, page) = callcap_tests::get_port(ops_port, "/").await;
    let erased_rows = page
        .split("id=\"privacy-rows_erased\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no erased count on the status page: {page}"));
    assert!(erased_rows >= 20, "{erased_rows}");
    assert!(!page.contains(ERASED_DIGITS));
    worker.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("consuming"),
        "the log was captured: {logged}"
    );
    assert!(
        !logged.contains(ERASED_DIGITS),
        "the worker logged the number"
    );
}

/// Records are dropped, not stored, by a worker whose key is missing while erasures
/// exist: it holds them until given the key, rather than storing erased data.
#[tokio::test]
async fn a_worker_without_the_key_holds_records_of_a_company_with_erasures() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    // Nothing stored yet: erase says so, and that another written form is another erasure.
    let printed = erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    assert!(printed.contains("nothing stored matched"), "{printed}");
    assert!(printed.contains("not matched: domestic forms"), "{printed}");
    let keyless = workers
        .start_edited(|cli| cli.privacy.erasure_key_file = None)
        .await;
    assert_eq!(
        gw.post_call(&key_a, &call(a, "E-1", ERASED)).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        gw.post_call(&key_a, &call(a, "K-1", KEPT)).await.0,
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(db.count_calls().await, 0, "held, not stored");
    keyless.stop().await;
    let worker = workers.start().await;
    drained(&nats.url()).await;
    assert_eq!(rows_with(&db, a, ERASED).await, 0);
    assert_eq!(rows_with(&db, a, KEPT).await, 1);
    worker.stop().await;
}

/// With `sync_interval: always`, what `erase` deleted from the stream stays deleted
/// through a power cut right after it returned.
#[tokio::test]
async fn an_erasure_survives_a_power_cut_under_the_broker() {
    let mount = tempfile::tempdir().unwrap();
    let fs = PowerFs::mount(mount.path());
    let Stored {
        mut nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new()
        .nats(NatsConfig::Strict)
        .store_dir(&mount.path().join("jetstream"))
        .erasure_key()
        .stored()
        .await;
    let key = erasure_key.expect("the stack's erasure key");
    let worker = workers.start().await;
    post_both(&gw, &key_a, a, 0..30).await;
    drained(&nats.url()).await;
    let before: BTreeSet<u64> = stream_messages(&nats.url())
        .await
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(before.len(), 60);
    erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    // Power lost right after `erase` returned: what was not fsynced is gone.
    worker.stop().await;
    nats.kill();
    fs.power_cut();
    nats.start_again().await;
    let after = stream_messages(&nats.url()).await;
    assert_eq!(
        stream_hits(&nats.url(), a).await,
        0,
        "an erased message came back after the power cut"
    );
    assert_eq!(after.len(), 30, "the other number's messages survive");
    // Nor is any of it left in the broker's files.
    let mut leftovers = Vec::new();
    for entry in walk(&mount.path().join("jetstream")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        if bytes
            .windows(ERASED_DIGITS.len())
            .any(|w| w == ERASED_DIGITS.as_bytes())
        {
            leftovers.push(entry);
        }
    }
    assert!(
        leftovers.is_empty(),
        "the erased number is still in {leftovers:?}"
    );
    drop(gw);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// RETENTION_DAYS: calls older than the period are deleted, newer ones kept, and a replay
/// of the stream does not bring the old ones back.
#[tokio::test]
async fn retention_deletes_old_calls_and_replay_does_not_restore_them() {
    let Pipeline {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        others,
        worker,
        workers,
        ..
    } = Stack::new().companies(2).pipeline().await;
    let (b, key_b) = others[0].pair();
    let old = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    for i in 0..15 {
        for (c, k) in [(a, &key_a), (b, &key_b)] {
            let mut body = call(c, &format!("OLD-{i}"), KEPT);
            body["call_date"] = json!(old);
            assert_eq!(gw.post_call(k, &body).await.0, StatusCode::CREATED);
            assert_eq!(
                gw.post_call(k, &call(c, &format!("NEW-{i}"), KEPT)).await.0,
                StatusCode::CREATED
            );
        }
    }
    drained(&nats.url()).await;
    assert_eq!(db.count_calls().await, 60);
    worker.stop().await;

    // A dead letter from 40 days ago (it holds a payload) and one from today.
    for (seq, age_days) in [(9_000_001u64, 40i64), (9_000_002, 0)] {
        persist_worker::store::record_dead_letters(
            &db.pool,
            &[persist_worker::store::DeadLetter {
                seq,
                subject: ingest_subject(a),
                reason: "test".into(),
                payload: format!("{{\"recipient_number\": \"{KEPT}\"}}").into_bytes(),
            }],
        )
        .await
        .unwrap();
        sqlx::query("UPDATE dead_letters SET failed_at = now() - make_interval(days => $1) WHERE stream_seq = $2")
            .bind(age_days as i32)
            .bind(seq as i64)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let worker = workers
        .start_edited(|cli| cli.privacy.retention_days = Some(30))
        .await;
    eventually(
        Duration::from_secs(20),
        "retention to delete the old calls",
        || async { (db.count_calls().await == 30).then_some(()) },
    )
    .await;
    let old_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM call_history WHERE external_call_id LIKE 'OLD-%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(old_left, 0);
    eventually(
        Duration::from_secs(5),
        "retention to delete the old dead letter",
        || async { (db.count_dead_letters().await == 1).then_some(()) },
    )
    .await;

    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let summary = replay_all(
        &admin,
        &db,
        &persist_worker::privacy::Policy {
            key: None,
            retention_days: Some(30),
        },
    )
    .await;
    assert_eq!(summary.messages, 60);
    assert_eq!(
        db.count_calls().await,
        30,
        "the replay restored expired calls"
    );
    let counters = persist_worker::store::privacy::counters(&db.pool)
        .await
        .unwrap();
    let get = |n: &str| counters.iter().find(|(k, _)| k == n).map_or(0, |(_, v)| *v);
    assert_eq!(get("rows_expired"), 30);
    assert_eq!(get("records_dropped_expired"), 30);
    assert_eq!(get("dead_letters_expired"), 1);
    worker.stop().await;
}

/// After a partition layout change the old stream is sealed, and JetStream refuses
/// deletes there: `erase` says how many matching messages it left and where, and a
/// replay of the sealed stream stores none of them.
#[tokio::test]
async fn matching_messages_in_a_sealed_stream_are_reported_and_never_stored_again() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    let worker = workers.start().await;
    post_both(&gw, &key_a, a, 0..5).await;
    drained(&nats.url()).await;
    crate::partitions::partitions_command(&nats.url(), &["set", "2", "--no-wait"]).await;
    let printed = erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    assert!(
        printed.contains("sealed stream CALLS: 5 matching message(s) left"),
        "{printed}"
    );
    assert_eq!(rows_with(&db, a, ERASED).await, 0);
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let policy = policy_with(&key);
    let summary = replay_all(&admin, &db, &policy).await;
    assert_eq!(summary.messages, 10);
    assert_eq!(
        rows_with(&db, a, ERASED).await,
        0,
        "a replay of the sealed stream stored erased data"
    );
    assert_eq!(rows_with(&db, a, KEPT).await, 5);
    worker.stop().await;
}

/// An erasure interrupted after its entry was added (the command killed) is completed by
/// `erase --resume`, which has only the entry's hash: rows, dead letters and messages are
/// found by hashing theirs.
#[tokio::test]
async fn an_interrupted_erasure_is_completed_by_resume_from_its_hash_alone() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    // Before any erasure: a worker without the key stores everything.
    let worker = workers
        .start_edited(|cli| cli.privacy.erasure_key_file = None)
        .await;
    let lead = Uuid::new_v4();
    for i in 0..6 {
        let mut body = call(a, &format!("L-{i}"), KEPT);
        if i % 2 == 0 {
            body["lead_id"] = json!(lead);
        }
        assert_eq!(gw.post_call(&key_a, &body).await.0, StatusCode::CREATED);
    }
    drained(&nats.url()).await;
    worker.stop().await;
    // What `erase --lead` does first, then "killed".
    let erasure_key = persist_worker::privacy::ErasureKey::from_file(&key).unwrap();
    let entry = persist_worker::store::privacy::add_erasure(
        &db.pool,
        &erasure_key,
        a,
        &persist_worker::privacy::Subject::Lead(lead),
        &[],
    )
    .await
    .unwrap();
    assert!(entry.completed_at.is_none());
    let printed = erase(&nats.url(), &db, &key, &["--resume"]).await;
    assert!(
        printed.contains(&format!(
            "erasure {} (lead of company {a}) complete",
            entry.id
        )),
        "{printed}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM call_history WHERE lead_id = $1")
        .bind(lead)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(db.count_calls().await, 3, "the calls of no lead stay");
    let leads: i64 = sqlx::query_scalar("SELECT count(*) FROM leads WHERE id = $1")
        .bind(lead)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(leads, 0, "the lead row goes too");
    let in_stream = stream_messages(&nats.url())
        .await
        .iter()
        .filter(|(_, _, e)| e.record.lead_id == Some(lead))
        .count();
    assert_eq!(in_stream, 0);
    // Nothing left to resume.
    assert!(erase(&nats.url(), &db, &key, &["--resume"])
        .await
        .contains("no interrupted erasure"));
}

/// `erase` as the operator runs it, whatever its outcome: (succeeded, stdout and stderr).
async fn erase_outcome(
    nats_url: &str,
    db_url: &str,
    key: &std::path::Path,
    args: &[&str],
) -> (bool, String) {
    let full = [&["erase", "--quiet"][..], args].concat();
    let out = admin_command_env(
        crate::WORKER_BIN,
        nats_url,
        &full,
        &[
            ("DATABASE_URL", db_url),
            ("ERASURE_KEY_FILE", &key.display().to_string()),
        ],
    )
    .await;
    (
        out.status.success(),
        callcap_tests::pipeline::output_text(&out),
    )
}

/// The third probe, items 7 and 8: a worker with another erasure key stored erased data
/// silently, and a keyless one stalled every company's records while `/readyz` said ok.
/// Now both hold the records of the company with erasures — only them: three batches of
/// them used to fill `BATCHES_IN_FLIGHT` and stop the lane for everyone — store every
/// other company's, and say why on `/readyz` (503) and in the log.
#[tokio::test]
async fn a_worker_that_cannot_check_erasures_holds_only_that_companys_records_and_says_so() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        others,
        dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().companies(2).stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    let (b, key_b) = others[0].pair();
    let other_key = callcap_tests::stack::write_erasure_key(&dir.path().join("other"));
    erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    let mut b_sent = 0;
    for (label, env, cause) in [
        (
            "other-key",
            vec![("ERASURE_KEY_FILE", other_key.display().to_string())],
            "erasures were hashed with key",
        ),
        ("keyless", vec![], "ERASURE_KEY_FILE is not set"),
    ] {
        let port = callcap_tests::free_port();
        let log = dir.path().join(format!("{label}.log"));
        let mut worker =
            Process::worker_logged(crate::WORKER_BIN, &nats.url(), &db.url, port, &env, &log);
        for i in 0..3 {
            for (ext, number) in [
                (format!("E-{label}-{i}"), ERASED),
                (format!("K-{label}-{i}"), KEPT),
            ] {
                assert_eq!(
                    gw.post_call(&key_a, &call(a, &ext, number)).await.0,
                    StatusCode::CREATED
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        for i in 0..10 {
            let body = call(b, &format!("B-{label}-{i}"), ERASED);
            assert_eq!(gw.post_call(&key_b, &body).await.0, StatusCode::CREATED);
            b_sent += 1;
        }
        eventually(
            Duration::from_secs(20),
            "the other company's records stored",
            || async {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM call_history WHERE company_id = $1")
                        .bind(b)
                        .fetch_one(&db.pool)
                        .await
                        .unwrap();
                (n == b_sent).then_some(())
            },
        )
        .await;
        assert_eq!(
            rows_with(&db, a, ERASED).await,
            0,
            "{label}: erased data stored"
        );
        assert_eq!(
            rows_with(&db, a, KEPT).await,
            0,
            "{label}: held, not stored"
        );
        let (status, said) = callcap_tests::get_port(port, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{label}");
        assert!(
            said.contains(cause) && said.contains("held"),
            "{label}: {said}"
        );
        worker.terminate();
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains(cause),
            "{label}: the log says why: {logged}"
        );
    }
    // The worker with the erasures' key stores what was held, less the erased.
    let worker = workers.start().await;
    drained(&nats.url()).await;
    assert_eq!(rows_with(&db, a, ERASED).await, 0);
    assert_eq!(rows_with(&db, a, KEPT).await, 6);
    worker.stop().await;
}

/// Publishes `n` envelopes of company `a` on its subject, as fast as the broker takes
/// them, the last one with the erased number.
async fn fill(nats_url: &str, a: Uuid, n: usize) {
    let admin = jetstream::new(callcap_tests::identities::connect(nats_url).await);
    // As the gateways and workers create it: this test may run neither.
    callcap::subjects::open_stream(&admin, &callcap::config::StreamArgs::default())
        .await
        .unwrap();
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        let mut r = CallRecord::new(a);
        r.external_call_id = Some(format!("F-{i}"));
        r.recipient_number = Some(if i + 1 == n { ERASED } else { KEPT }.into());
        r.notes = Some("x".repeat(400));
        let id = callcap::identity::call_history_id(&r, None).id;
        let env = Envelope::new(id, chrono::Utc::now(), "kx".into(), None, r);
        acks.push(
            admin
                .publish(ingest_subject(a), env.encode().into())
                .await
                .unwrap(),
        );
        // The client bounds the acks it awaits at once: collect them as they come.
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// The consumers of `CALLS` now (the tests' own reads leave ephemeral ones behind).
async fn consumers_now(nats_url: &str) -> std::collections::HashSet<String> {
    let admin = jetstream::new(callcap_tests::identities::connect(nats_url).await);
    let stream = admin
        .get_stream(callcap::subjects::STREAM_NAME)
        .await
        .unwrap();
    let mut names = stream.consumer_names();
    let mut out = std::collections::HashSet::new();
    while let Some(Ok(n)) = futures::StreamExt::next(&mut names).await {
        out.insert(n);
    }
    out
}

/// Waits until a consumer not in `before` reads `CALLS`: erase's scan has started.
async fn until_read(nats_url: &str, before: &std::collections::HashSet<String>) {
    eventually(
        Duration::from_secs(30),
        "erase to start reading the stream",
        || async {
            consumers_now(nats_url)
                .await
                .iter()
                .any(|n| !before.contains(n))
                .then_some(())
        },
    )
    .await;
}

/// The third probe, item 9: a broker paused during the scan made `erase` take the stall
/// for the end of the stream: rc 0, "0 deleted", the erasure marked complete, the number
/// still in the broker's files. Now a pause is waited out and the number deleted; a stall
/// past `--stall-secs` fails the command and leaves the erasure for `--resume`.
#[tokio::test]
async fn an_erasure_never_takes_a_stalled_stream_for_its_end() {
    let Backend {
        nats,
        db,
        company: a,
        dir: _dir,
        erasure_key,
        ..
    } = Stack::new()
        .nats(NatsConfig::IntervalFsync)
        .erasure_key()
        .backend()
        .await;
    let key = erasure_key.expect("the stack's erasure key");
    fill(&nats.url(), a, 60_000).await;
    let hits = || async { stream_hits(&nats.url(), a).await };
    assert_eq!(hits().await, 1);

    // Paused 7 s mid-scan, with the default stall bound: waited out, deleted.
    let before = consumers_now(&nats.url()).await;
    let run = {
        let (url, db_url, key) = (nats.url(), db.url.clone(), key.clone());
        tokio::spawn(async move {
            erase_outcome(
                &url,
                &db_url,
                &key,
                &["--company", &a.to_string(), "--phone", ERASED],
            )
            .await
        })
    };
    until_read(&nats.url(), &before).await;
    nats.pause();
    tokio::time::sleep(Duration::from_secs(7)).await;
    nats.resume();
    let (ok, printed) = run.await.unwrap();
    assert!(ok, "{printed}");
    assert!(
        printed.contains("stream: 1 message(s) deleted"),
        "{printed}"
    );
    assert_eq!(hits().await, 0);

    // Paused past --stall-secs: the command fails, the erasure stays incomplete, with why.
    // (The number again, resent after the erasure and not stored: no worker runs here.)
    fill(&nats.url(), a, 60_000).await;
    assert_eq!(hits().await, 1);
    let before = consumers_now(&nats.url()).await;
    let run = {
        let (url, db_url, key) = (nats.url(), db.url.clone(), key.clone());
        tokio::spawn(async move {
            erase_outcome(
                &url,
                &db_url,
                &key,
                &[
                    "--company",
                    &a.to_string(),
                    "--phone",
                    ERASED,
                    "--stall-secs",
                    "2",
                ],
            )
            .await
        })
    };
    until_read(&nats.url(), &before).await;
    nats.pause();
    tokio::time::sleep(Duration::from_secs(6)).await;
    nats.resume();
    let (ok, printed) = run.await.unwrap();
    assert!(!ok, "a stalled erasure reported success: {printed}");
    assert!(
        printed.contains("stalled") && printed.contains("--resume"),
        "{printed}"
    );
    let (pending, reason): (i64, Option<String>) = sqlx::query_as(
        "SELECT count(*), max(incomplete_reason) FROM erasures WHERE completed_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 1);
    assert!(reason.unwrap().contains("stalled"));
    // `--resume` completes it from its hash alone.
    let (ok, printed) = erase_outcome(&nats.url(), &db.url, &key, &["--resume"]).await;
    assert!(ok, "{printed}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM erasures WHERE completed_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(hits().await, 0, "the resumed run deleted the number");
}

/// The third probe, item 10: numbers matched in one written form only, silently. Now an
/// erasure of a number (with its country) removes it in every written form — and from
/// the number fields of `call_details` — and says which forms it does not cover.
#[tokio::test]
async fn a_number_is_erased_in_every_written_form() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    let worker = workers.start().await;
    let forms = [
        "+919876500001",
        "919876500001",
        "09876500001",
        "9876500001",
        "+91/98765/00001",
        "+91\u{00A0}98765\u{00A0}00001",
        "\u{FF0B}\u{FF19}\u{FF11}\u{FF19}\u{FF18}\u{FF17}\u{FF16}\u{FF15}\u{FF10}\u{FF10}\u{FF10}\u{FF10}\u{FF11}",
        "tel:+91-98765-00001",
    ];
    for (i, form) in forms.iter().enumerate() {
        let body = call(a, &format!("W-{i}"), form);
        assert_eq!(
            gw.post_call(&key_a, &body).await.0,
            StatusCode::CREATED,
            "{form}"
        );
    }
    // In call_details only, as Twilio's connector keeps ForwardedFrom.
    let mut forwarded = call(a, "FWD", KEPT);
    forwarded["call_details"] = json!({"ForwardedFrom": "+91 98765 00001", "campaign": "c7"});
    assert_eq!(
        gw.post_call(&key_a, &forwarded).await.0,
        StatusCode::CREATED
    );
    drained(&nats.url()).await;
    assert_eq!(db.count_calls().await, forms.len() as i64 + 1);

    let printed = erase(
        &nats.url(),
        &db,
        &key,
        &[
            "--company",
            &a.to_string(),
            "--phone",
            "+91 98765 00001",
            "--country",
            "IN",
        ],
    )
    .await;
    assert_eq!(db.count_calls().await, 0, "every form erased: {printed}");
    assert!(printed.contains("not matched:"), "{printed}");
    assert!(printed.contains("not searched: notes"), "{printed}");
    assert!(
        !printed.contains(ERASED_DIGITS),
        "erase printed the number: {printed}"
    );
    // Resent in any form, never stored again; another number of the company is.
    for (i, form) in forms.iter().enumerate() {
        let body = call(a, &format!("W-{i}"), form);
        assert_eq!(gw.post_call(&key_a, &body).await.0, StatusCode::CREATED);
    }
    assert_eq!(
        gw.post_call(&key_a, &call(a, "K", KEPT)).await.0,
        StatusCode::CREATED
    );
    drained(&nats.url()).await;
    assert_eq!(db.count_calls().await, 1);
    assert_eq!(stream_hits(&nats.url(), a).await, 0);
    worker.stop().await;
}

/// The third probe, item 12: a message already gone counts as deleted by JetStream's
/// error code (nats-server 2.15 says "sequence N not found", older ones "no message
/// found"), not by matching its text.
#[tokio::test]
async fn deleting_a_message_already_gone_is_not_a_failure() {
    let Backend {
        nats, company: a, ..
    } = Stack::new().backend().await;
    fill(&nats.url(), a, 3).await;
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let first =
        persist_worker::write::delete_messages(&admin, callcap::subjects::STREAM_NAME, &[2]).await;
    assert_eq!((first.deleted, first.failed), (1, 0));
    // Deleted already (by a worker dropping a resent record, or an earlier run): gone.
    let again =
        persist_worker::write::delete_messages(&admin, callcap::subjects::STREAM_NAME, &[2, 3, 2])
            .await;
    assert_eq!((again.deleted, again.failed), (3, 0));
}

/// The third probe, item 13: a dead letter that is no envelope, arriving after an
/// erasure on the subject of the erased company, kept the identifier. Its payload is
/// now withheld (it cannot be checked against hashes).
#[tokio::test]
async fn an_undecodable_dead_letter_after_an_erasure_keeps_no_payload() {
    let Backend {
        nats,
        db,
        company: a,
        others,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().companies(2).backend().await;
    let key = erasure_key.expect("the stack's erasure key");
    let b = others[0].company;
    let worker = workers.start().await;
    erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    callcap::subjects::open_stream(&admin, &callcap::config::StreamArgs::default())
        .await
        .unwrap();
    for company in [a, b] {
        admin
            .publish(
                ingest_subject(company),
                format!("not json {company} {ERASED}").into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(20), "two dead letters", || async {
        (db.count_dead_letters().await == 2).then_some(())
    })
    .await;
    let rows: Vec<(String, Vec<u8>, String)> =
        sqlx::query_as("SELECT subject, payload, reason FROM dead_letters ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (subject, payload, reason) in rows {
        if subject.ends_with(&a.to_string()) {
            assert!(payload.is_empty(), "the erased company's payload was kept");
            assert!(reason.contains("withheld"), "{reason}");
        } else {
            // A company without erasures keeps its dead letter whole, for redrive.
            assert!(String::from_utf8_lossy(&payload).contains(ERASED_DIGITS));
        }
    }
    worker.stop().await;
}

/// The third probe, item 17: retention keyed on the client's `call_date`, so a call
/// dated far in the future escaped it. A call is now retained from the earlier of its
/// date and its receipt: written, replayed or stored, it expires with its receipt.
#[tokio::test]
async fn a_call_dated_in_the_future_expires_by_its_receipt() {
    let Backend {
        nats,
        db,
        company: a,
        workers,
        ..
    } = Stack::new()
        .worker_cli(|cli| cli.privacy.retention_days = Some(30))
        .backend()
        .await;
    let worker = workers.start().await;
    // Received 60 days ago (the envelope's `received_at`), dated 2099: published as a
    // gateway would have then; and one received now, for contrast.
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    callcap::subjects::open_stream(&admin, &callcap::config::StreamArgs::default())
        .await
        .unwrap();
    for (ext, received) in [
        (
            "FUTURE-OLD",
            chrono::Utc::now() - chrono::Duration::days(60),
        ),
        ("FUTURE-NEW", chrono::Utc::now()),
    ] {
        let mut r = CallRecord::new(a);
        r.external_call_id = Some(ext.into());
        r.call_date = Some("2099-01-01T00:00:00Z".parse().unwrap());
        let id = callcap::identity::call_history_id(&r, None).id;
        let env = Envelope::new(id, received, "kx".into(), None, r);
        admin
            .publish(ingest_subject(a), env.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    drained(&nats.url()).await;
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT external_call_id FROM call_history ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, ["FUTURE-NEW"], "the old receipt's call was stored");
    worker.stop().await;
    // One already stored (before retention was set): deleted by retention, which a worker
    // runs at its start and every minute.
    sqlx::query(
        "INSERT INTO call_history (id, company_id, call_date, call_date_given, received_at, stored_at, stream_seq, external_call_id) \
         VALUES ($1, $2, '2099-01-01', true, now() - interval '60 days', now(), 1, 'STORED-OLD')",
    )
    .bind(Uuid::new_v4())
    .bind(a)
    .execute(&db.pool)
    .await
    .unwrap();
    let worker = workers.start().await;
    eventually(
        Duration::from_secs(20),
        "retention to delete it",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM call_history WHERE external_call_id = 'STORED-OLD'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (n == 0).then_some(())
        },
    )
    .await;
    assert_eq!(db.count_calls().await, 1);
    worker.stop().await;
}

/// Whether the file of `relation` (in the test database) holds `needle`, after a
/// checkpoint has written every page; the relation's file path too.
async fn relation_file_holds(db: &TestDb, relation: &str, needle: &str) -> (bool, String) {
    sqlx::query("CHECKPOINT").execute(&db.pool).await.unwrap();
    let (dir, path): (String, String) = sqlx::query_as(
        "SELECT current_setting('data_directory'), pg_relation_filepath($1::regclass)",
    )
    .bind(relation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let file = std::path::Path::new(&dir).join(&path);
    let bytes = std::fs::read(&file).unwrap_or_else(|e| {
        panic!(
            "reading {} (this test reads the local Postgres server's files, as root): {e}",
            file.display()
        )
    });
    let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    (found, path)
}

/// The third probe, item 11: the README said Postgres was clean at once; erased rows
/// stay in the table's file (and the WAL) until their pages are rewritten. What the
/// README now says, held against the server's own files: gone from what SQL can see when
/// `erase` returns, still in the data file, and gone from it after `VACUUM FULL`.
#[tokio::test]
async fn what_erase_leaves_in_postgres_files_is_what_the_readme_says() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        dir: _dir,
        erasure_key,
        workers,
        ..
    } = Stack::new().erasure_key().stored().await;
    let key = erasure_key.expect("the stack's erasure key");
    let worker = workers.start().await;
    post_both(&gw, &key_a, a, 0..5).await;
    drained(&nats.url()).await;
    assert!(
        relation_file_holds(&db, "call_history", ERASED_DIGITS)
            .await
            .0
    );
    erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    assert_eq!(rows_with(&db, a, ERASED).await, 0, "gone from SQL at once");
    let (still, before) = relation_file_holds(&db, "call_history", ERASED_DIGITS).await;
    assert!(
        still,
        "the README says the data file keeps it until rewritten"
    );
    sqlx::query("VACUUM FULL call_history")
        .execute(&db.pool)
        .await
        .unwrap();
    let (kept, after) = relation_file_holds(&db, "call_history", ERASED_DIGITS).await;
    assert_ne!(before, after, "VACUUM FULL writes a new file");
    assert!(!kept, "the rewritten table holds the number");
    assert_eq!(rows_with(&db, a, KEPT).await, 5);
    worker.stop().await;
}
