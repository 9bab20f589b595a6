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
use callcap_tests::nats::{stream_messages, stream_payloads_of, NatsConfig, NatsServer};
use callcap_tests::pipeline::{
    admin_command_env, test_run_args, worker_cli, Process, TestGateway, TestWorker,
};
use callcap_tests::powerfs::PowerFs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// The erased number, as the dialer sends it.
const ERASED: &str = "+919876500001";
/// Its digits, to look for anywhere.
const ERASED_DIGITS: &str = "9876500001";
/// Another number of the same company, kept.
const KEPT: &str = "+919876500002";

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    use base64::Engine as _;
    let path = dir.join("erasure.key");
    let bytes: [u8; 32] = rand::random();
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    )
    .unwrap();
    path
}

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

/// A worker in this process hashing with the erasure key in `key`.
async fn keyed_worker(nats: &NatsServer, db: &TestDb, key: &std::path::Path) -> TestWorker {
    let mut cli = worker_cli(&nats.url(), &db.url, test_run_args());
    cli.privacy.erasure_key_file = Some(key.to_owned());
    TestWorker::start_cli(cli).await
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
) -> persist_worker::replay::ReplaySummary {
    persist_worker::replay::run(
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
        &tokio_util::sync::CancellationToken::new(),
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
    let mut nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let gw = Arc::new(TestGateway::start(&nats.url()).await);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (key_a, key_b) = (gw.create_key(a).await, gw.create_key(b).await);
    let ops_port = callcap_tests::free_port();
    let log = dir.path().join("worker.log");
    let mut worker = Process::worker_logged(
        crate::WORKER_BIN,
        &nats.url(),
        &db.url,
        ops_port,
        &[("ERASURE_KEY_FILE", key.display().to_string())],
        &log,
    );

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
    persist_worker::dlq::redrive(&db.pool, &policy, None, &mut Vec::new())
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
    let page = reqwest::get(format!("http://127.0.0.1:{ops_port}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let gw = TestGateway::start(&nats.url()).await;
    let a = Uuid::new_v4();
    let key_a = gw.create_key(a).await;
    // Nothing stored yet: erase says so, and that another written form is another erasure.
    let printed = erase(
        &nats.url(),
        &db,
        &key,
        &["--company", &a.to_string(), "--phone", ERASED],
    )
    .await;
    assert!(printed.contains("another form"), "{printed}");
    let keyless = TestWorker::start(&nats.url(), &db.url).await;
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
    let worker = keyed_worker(&nats, &db, &key).await;
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
    let mut nats =
        NatsServer::start_with(NatsConfig::Strict, Some(&mount.path().join("jetstream"))).await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let gw = TestGateway::start(&nats.url()).await;
    let a = Uuid::new_v4();
    let key_a = gw.create_key(a).await;
    let worker = keyed_worker(&nats, &db, &key).await;
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
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let gw = TestGateway::start(&nats.url()).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (key_a, key_b) = (gw.create_key(a).await, gw.create_key(b).await);
    let worker = TestWorker::start(&nats.url(), &db.url).await;
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
    let mut cli = worker_cli(&nats.url(), &db.url, test_run_args());
    cli.privacy.retention_days = Some(30);
    let worker = TestWorker::start_cli(cli).await;
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
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let gw = TestGateway::start(&nats.url()).await;
    let a = Uuid::new_v4();
    let key_a = gw.create_key(a).await;
    let worker = keyed_worker(&nats, &db, &key).await;
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
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let gw = TestGateway::start(&nats.url()).await;
    let a = Uuid::new_v4();
    let key_a = gw.create_key(a).await;
    let worker = TestWorker::start(&nats.url(), &db.url).await;
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
