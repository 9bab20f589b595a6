//! The archive tier against a real S3-compatible server (SeaweedFS on loopback): records
//! posted are archived once in objects that tile the stream, across a kill -9 of the
//! archiver mid-object and a lost consumer; a full replay from the archive into a fresh
//! database gives exactly the original rows, continuing into the stream for what was
//! never archived; the object store down leaves everything in the stream, shows in the
//! metrics the alert reads, and is caught up; an erasure reaches archived objects.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use callcap_tests::db::TestDb;
use callcap_tests::eventually;
use callcap_tests::pipeline::{admin_command_env, post_many, Process};
use callcap_tests::s3::S3Server;
use callcap_tests::stack::{Pipeline, Stack, Stored};
use persist_worker::archive::{Archive, ObjectRef};
use serde_json::{json, Value};
use uuid::Uuid;

const STREAM: &str = callcap::subjects::STREAM_NAME;

fn call(company: Uuid, ext: String, number: &str) -> Value {
    json!({
        "company_id": company,
        "external_call_id": ext,
        "external_system": "Dialer",
        "caller_number": "+918000000000",
        "recipient_number": number,
        "call_status": "completed",
        "duration_sec": 61,
    })
}

/// `persist-worker archive` as its own process, logging to `dir/archiver-<n>.log`.
fn archiver(
    s3: &S3Server,
    (nats_url, db_url): (&str, &str),
    port: u16,
    extra: &[(&str, String)],
    dir: &std::path::Path,
) -> Process {
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("ARCHIVE_URL", s3.archive_url("calls")));
    env.push(("ARCHIVE_CHECK_SECS", "1".into()));
    env.extend(extra.iter().cloned());
    let n = std::fs::read_dir(dir).map_or(0, Iterator::count);
    Process::worker_command(
        crate::WORKER_BIN,
        &["archive"],
        (nats_url, db_url, port),
        &env,
        Some(&dir.join(format!("archiver-{n}.log"))),
    )
}

/// The stream's last sequence.
async fn last_seq(nats_url: &str) -> u64 {
    let js = jetstream::new(callcap_tests::identities::connect(nats_url).await);
    let mut s = js.get_stream(STREAM).await.unwrap();
    s.info().await.unwrap().state.last_sequence
}

/// Every object of the stream, checked to tile `1..=upto` exactly: no gap, no overlap.
async fn tiled(archive: &Archive, upto: u64) -> Vec<ObjectRef> {
    let objects = archive.objects(STREAM, None, None).await.unwrap();
    let mut next = 1;
    for o in &objects {
        assert_eq!(o.first, next, "objects must tile the stream: {objects:#?}");
        assert!(o.last >= o.first);
        next = o.last + 1;
    }
    assert_eq!(
        next,
        upto + 1,
        "the archive must reach {upto}: {objects:#?}"
    );
    objects
}

/// Waits until the archive covers the stream up to `upto`.
async fn archived_through(archive: &Archive, upto: u64, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        let objects = archive.objects(STREAM, None, None).await.ok()?;
        (objects.iter().map(|o| o.last).max() >= Some(upto)).then_some(())
    })
    .await;
}

/// The call ids the archive holds, each as many times as it is archived.
async fn archived_ids(archive: &Archive) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for o in archive.objects(STREAM, None, None).await.unwrap() {
        for e in archive.read(&o).await.unwrap() {
            let env = callcap::Envelope::decode(&e.payload()).unwrap();
            ids.push(env.call_history_id);
        }
    }
    ids
}

/// A gauge or counter from `/metrics` (summed over its series matching `label`).
async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, page) = callcap_tests::try_get(&format!("http://127.0.0.1:{port}/metrics")).await?;
    callcap_tests::metric_sum(&page, name)
}

async fn replay_from_archive(s3: &S3Server, nats_url: &str, db: &TestDb, extra: &[&str]) -> String {
    let url = s3.archive_url("calls");
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("DATABASE_URL", db.url.clone()));
    env.push(("ARCHIVE_URL", url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        &[
            "replay",
            "--from-archive",
            "--since",
            "2000-01-01T00:00:00Z",
            "--quiet",
        ][..],
        extra,
    ]
    .concat();
    let out = admin_command_env(crate::WORKER_BIN, nats_url, &args, &env).await;
    let text = callcap_tests::pipeline::output_text(&out);
    assert!(out.status.success(), "replay --from-archive failed: {text}");
    text
}

#[tokio::test]
async fn every_record_is_archived_once_across_crashes_and_the_archive_rebuilds_the_database() {
    let s3 = S3Server::start().await;
    // Two companies: the archive and the replay treat both.
    let Pipeline {
        nats,
        db,
        gw,
        worker,
        company: a,
        key: key_a,
        others,
        ..
    } = Stack::new().companies(2).pipeline().await;
    let (b, key_b) = others[0].pair();
    let dir = tempfile::tempdir().unwrap();
    let archive = s3.archive("calls");
    let urls = (nats.url(), db.url.clone());
    let urls = (urls.0.as_str(), urls.1.as_str());
    let mut posted = BTreeSet::new();
    let post = |from: usize, n: usize| {
        let (gw, key_a, key_b) = (&gw, &key_a, &key_b);
        async move {
            let mut ids = post_many(gw, key_a, n, 8, |i| {
                call(a, format!("A-{}", from + i), "+919800000001")
            })
            .await;
            ids.extend(
                post_many(gw, key_b, n, 8, |i| {
                    call(b, format!("B-{}", from + i), "+919800000002")
                })
                .await,
            );
            ids
        }
    };

    // Objects of 40 records, held open long: after 100 records two objects are written
    // and 20 records are in hand when the archiver is killed.
    let port = callcap_tests::free_port();
    let slow = [
        ("ARCHIVE_OBJECT_RECORDS", "40".to_owned()),
        ("ARCHIVE_LINGER_SECS", "600".to_owned()),
    ];
    let mut arch = archiver(&s3, urls, port, &slow, dir.path());
    posted.extend(post(0, 50).await);
    archived_through(&archive, 80, "two full objects").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    arch.kill9();
    assert_eq!(tiled(&archive, 80).await.len(), 2);

    // More records while it is down; then it comes back (short linger) and catches up.
    posted.extend(post(50, 15).await);
    let fast = [
        ("ARCHIVE_OBJECT_RECORDS", "40".to_owned()),
        ("ARCHIVE_LINGER_SECS", "1".to_owned()),
    ];
    let mut arch = archiver(&s3, urls, port, &fast, dir.path());
    archived_through(&archive, 130, "the archive to catch up after the kill").await;
    arch.terminate();
    tiled(&archive, 130).await;

    // The consumer lost (its acks with it): the archive's own position prevents a second
    // copy of what it holds.
    let admin = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    admin
        .get_stream(STREAM)
        .await
        .unwrap()
        .delete_consumer(persist_worker::archive::component::CONSUMER)
        .await
        .unwrap();
    let mut arch = archiver(&s3, urls, port, &fast, dir.path());
    posted.extend(post(65, 5).await);
    archived_through(
        &archive,
        140,
        "the archive to continue after a lost consumer",
    )
    .await;
    arch.terminate();
    let objects = tiled(&archive, 140).await;
    assert!(objects.len() >= 4, "{objects:#?}");

    // Every 201 archived exactly once.
    let ids = archived_ids(&archive).await;
    assert_eq!(ids.len(), 140, "no record archived twice");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), posted);

    // Records the archive never got (archiver stopped), then the stream's oldest part
    // removed: 1..=100 are only in the archive, 141..=156 only in the stream.
    posted.extend(post(70, 8).await);
    let last = last_seq(&nats.url()).await;
    assert_eq!(last, 156);
    callcap_tests::db::assert_stored_exactly(&db, &posted, Duration::from_secs(30)).await;
    crate::erasure::drained(&nats.url()).await;
    admin
        .get_stream(STREAM)
        .await
        .unwrap()
        .purge()
        .sequence(101)
        .await
        .unwrap();

    // A fresh database rebuilt from the archive and then the stream: the same rows.
    let fresh = TestDb::create().await;
    let out = replay_from_archive(&s3, &nats.url(), &fresh, &[]).await;
    assert!(out.contains("replay complete: 156 messages"), "{out}");
    assert!(out.contains("140 of them from the archive"), "{out}");
    assert!(!out.contains("GAP"), "{out}");
    assert_eq!(fresh.dump_calls().await, db.dump_calls().await);

    // One company, one day: only its rows.
    let one = TestDb::create().await;
    let out = replay_from_archive(&s3, &nats.url(), &one, &["--company", &b.to_string()]).await;
    assert!(out.contains("replay complete: 78 messages"), "{out}");
    let companies: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT company_id FROM call_history")
        .fetch_all(&one.pool)
        .await
        .unwrap();
    assert_eq!(companies, [b]);

    // With the stream's part gone too (what expired unarchived), the replay says so.
    admin
        .get_stream(STREAM)
        .await
        .unwrap()
        .purge()
        .sequence(150)
        .await
        .unwrap();
    let gap = TestDb::create().await;
    let out = replay_from_archive(&s3, &nats.url(), &gap, &[]).await;
    assert!(
        out.contains("GAP: CALLS sequences 141..=149 are in neither the archive nor the stream"),
        "{out}"
    );
    worker.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn with_the_object_store_down_the_stream_keeps_everything_and_the_archiver_catches_up() {
    let mut s3 = S3Server::start().await;
    // A one-minute stream: the archiver falling half a window behind is what the alert
    // (CallcapArchiveBehind) looks for.
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: key_a,
        others,
        workers,
        ..
    } = Stack::new()
        .companies(2)
        .gateway_cli(|cli| {
            cli.stream.stream_max_age_secs = 60;
            cli.stream.stream_duplicate_window_secs = 30;
        })
        .stored()
        .await;
    let (b, key_b) = others[0].pair();
    // The worker as its own process: its status page shows the archive's position.
    let worker_port = callcap_tests::free_port();
    let mut worker = workers.process(crate::WORKER_BIN, worker_port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let archive = s3.archive("calls");
    let port = callcap_tests::free_port();
    let fast = [("ARCHIVE_LINGER_SECS", "1".to_owned())];
    let mut arch = archiver(&s3, (&nats.url(), &db.url), port, &fast, dir.path());
    let mut posted = post_many(&gw, &key_a, 20, 4, |i| {
        call(a, format!("A-{i}"), "+919800000001")
    })
    .await;
    archived_through(&archive, 20, "the first records archived").await;

    s3.stop();
    posted.extend(
        post_many(&gw, &key_a, 30, 4, |i| {
            call(a, format!("A-late-{i}"), "+919800000001")
        })
        .await,
    );
    posted.extend(
        post_many(&gw, &key_b, 30, 4, |i| {
            call(b, format!("B-{i}"), "+919800000002")
        })
        .await,
    );
    // The database is unaffected, the stream keeps everything, the archiver says it
    // cannot write and how old its oldest unarchived record is getting.
    callcap_tests::db::assert_stored_exactly(&db, &posted, Duration::from_secs(30)).await;
    assert_eq!(last_seq(&nats.url()).await, 80);
    eventually(
        Duration::from_secs(30),
        "the archiver to report failures",
        || async { (metric(port, "archive_errors_total").await? > 0.0).then_some(()) },
    )
    .await;
    let (status, ready) = callcap_tests::get_port(port, "/readyz").await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.contains("failing"), "{ready}");
    // The alert's expression: oldest unarchived age over half the stream's age limit.
    eventually(
        Duration::from_secs(45),
        "the archive lag to cross half the stream's age limit",
        || async {
            let age = metric(port, "archive_oldest_unarchived_age_seconds").await?;
            let max = metric(port, "archive_stream_max_age_seconds").await?;
            (max == 60.0 && age / max > 0.5).then_some(())
        },
    )
    .await;

    // Back: caught up before anything expires, each record once.
    s3.start_again().await;
    archived_through(&archive, 80, "the archiver to catch up").await;
    eventually(Duration::from_secs(20), "the lag back to 0", || async {
        (metric(port, "archive_oldest_unarchived_age_seconds").await? == 0.0).then_some(())
    })
    .await;
    let ids = archived_ids(&archive).await;
    assert_eq!(ids.len(), 80);
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), posted);
    tiled(&archive, 80).await;
    let (status, _) = callcap_tests::get_port(port, "/readyz").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let (_, page) = callcap_tests::get_port(worker_port, "/").await;
    assert!(page.contains(r#"id="archived-CALLS">80<"#), "{page}");
    arch.terminate();
    worker.terminate();
    gw.stop().await;
}

/// Archived entries of `company` whose payload holds `digits`.
async fn archived_with(archive: &Archive, company: Uuid, digits: &str) -> usize {
    let mut n = 0;
    for o in archive.objects(STREAM, None, None).await.unwrap() {
        // An unreadable object (a test's forgery) holds nothing readable.
        let Ok(entries) = archive.read(&o).await else {
            continue;
        };
        for e in entries {
            if e.subject.ends_with(&company.to_string())
                && String::from_utf8_lossy(&e.payload()).contains(digits)
            {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test]
async fn an_erasure_rewrites_archived_objects_and_the_archiver_leaves_erased_records_out() {
    const ERASED: &str = "+919876500001";
    const KEPT: &str = "+919876500002";
    let s3 = S3Server::start().await;
    let Pipeline {
        nats,
        db,
        gw,
        worker,
        company: a,
        key: key_a,
        others,
        dir,
        erasure_key,
        ..
    } = Stack::new().erasure_key().companies(2).pipeline().await;
    let (b, key_b) = others[0].pair();
    let key = erasure_key.expect("the stack's erasure key");
    let key_env = ("ERASURE_KEY_FILE", key.display().to_string());
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let port = callcap_tests::free_port();
    let extra = [
        ("ARCHIVE_LINGER_SECS", "1".to_owned()),
        ("ARCHIVE_OBJECT_RECORDS", "25".to_owned()),
        key_env.clone(),
    ];
    let mut arch = archiver(&s3, (&nats.url(), &db.url), port, &extra, &logs);
    let archive = s3.archive("calls");
    post_many(&gw, &key_a, 30, 4, |i| call(a, format!("E-{i}"), ERASED)).await;
    post_many(&gw, &key_a, 30, 4, |i| call(a, format!("K-{i}"), KEPT)).await;
    // The same number at another company is another person's: kept.
    post_many(&gw, &key_b, 20, 4, |i| call(b, format!("B-{i}"), ERASED)).await;
    archived_through(&archive, 80, "everything archived").await;
    assert_eq!(archived_with(&archive, a, "9876500001").await, 30);

    let mut env: Vec<(&str, String)> = s3.env();
    env.extend([
        ("DATABASE_URL", db.url.clone()),
        ("ARCHIVE_URL", s3.archive_url("calls")),
        key_env.clone(),
    ]);
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = admin_command_env(
        crate::WORKER_BIN,
        &nats.url(),
        &[
            "erase",
            "--quiet",
            "--company",
            &a.to_string(),
            "--phone",
            ERASED,
        ],
        &env_ref,
    )
    .await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("30 record(s) removed"), "{text}");
    assert_eq!(archived_with(&archive, a, "9876500001").await, 0);
    assert_eq!(archived_with(&archive, a, "9876500002").await, 30);
    assert_eq!(archived_with(&archive, b, "9876500001").await, 20);
    // The rewritten objects still tile the stream.
    tiled(&archive, 80).await;

    // Sent again after the erasure: accepted, never archived.
    post_many(&gw, &key_a, 10, 4, |i| {
        call(a, format!("E-again-{i}"), ERASED)
    })
    .await;
    post_many(&gw, &key_a, 5, 4, |i| call(a, format!("K-again-{i}"), KEPT)).await;
    archived_through(&archive, 95, "the resends archived").await;
    assert_eq!(archived_with(&archive, a, "9876500001").await, 0);
    assert_eq!(archived_with(&archive, a, "9876500002").await, 35);
    arch.terminate();

    // And a rebuild from the archive holds none of it.
    let fresh = TestDb::create().await;
    let mut renv = env.clone();
    renv.retain(|(k, _)| *k != "DATABASE_URL");
    renv.push(("DATABASE_URL", fresh.url.clone()));
    let renv: Vec<(&str, &str)> = renv.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = admin_command_env(
        crate::WORKER_BIN,
        &nats.url(),
        &[
            "replay",
            "--from-archive",
            "--since",
            "2000-01-01T00:00:00Z",
            "--quiet",
        ],
        &renv,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |company: Uuid, number: &'static str| {
        let pool = fresh.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM call_history WHERE company_id = $1 AND recipient_number = $2",
            )
            .bind(company)
            .bind(number)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count(a, ERASED).await, 0);
    assert_eq!(count(a, KEPT).await, 35);
    assert_eq!(count(b, ERASED).await, 20);
    worker.stop().await;
    gw.stop().await;
}

/// Every call id archived, over every stream, each as often as it is archived.
async fn archived_ids_everywhere(archive: &Archive) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for stream in archive.streams().await.unwrap() {
        for o in archive.objects(&stream, None, None).await.unwrap() {
            for e in archive.read(&o).await.unwrap() {
                ids.push(
                    callcap::Envelope::decode(&e.payload())
                        .unwrap()
                        .call_history_id,
                );
            }
        }
    }
    ids
}

#[tokio::test]
async fn a_partition_layout_change_is_archived_whole_and_replayed_from_every_stream() {
    let s3 = S3Server::start().await;
    let Pipeline {
        nats,
        db,
        gw,
        worker,
        ..
    } = Pipeline::start().await;
    // Two companies in each of the two partitions the layout change makes.
    let mut companies = Vec::new();
    for index in [0, 0, 1, 1] {
        let c = std::iter::repeat_with(Uuid::new_v4)
            .find(|c| callcap::partitions::partition_index(*c, 2) == index)
            .unwrap();
        companies.push((c, gw.create_key(c).await));
    }
    let dir = tempfile::tempdir().unwrap();
    let port = callcap_tests::free_port();
    let fast = [("ARCHIVE_LINGER_SECS", "1".to_owned())];
    let mut arch = archiver(&s3, (&nats.url(), &db.url), port, &fast, dir.path());
    let archive = s3.archive("calls");
    let mut posted = BTreeSet::new();
    for (c, key) in &companies {
        posted.extend(
            post_many(&gw, key, 10, 4, |i| {
                call(*c, format!("old-{i}"), "+919800000001")
            })
            .await,
        );
    }
    // Two partition streams from now on; CALLS is drained and sealed.
    crate::partitions::partitions_command(&nats.url(), &["set", "2"]).await;
    for (c, key) in &companies {
        posted.extend(
            post_many(&gw, key, 10, 4, |i| {
                call(*c, format!("new-{i}"), "+919800000001")
            })
            .await,
        );
    }
    eventually(Duration::from_secs(60), "every stream archived", || async {
        (archived_ids_everywhere(&archive).await.len() >= posted.len()).then_some(())
    })
    .await;
    let ids = archived_ids_everywhere(&archive).await;
    assert_eq!(ids.len(), posted.len(), "no record archived twice");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), posted);
    let streams = archive.streams().await.unwrap();
    assert_eq!(streams, ["CALLS", "CALLS_E1_P0", "CALLS_E1_P1"]);
    // The sealed stream's objects tile it to its end.
    tiled(&archive, 40).await;
    arch.terminate();

    callcap_tests::db::assert_stored_exactly(&db, &posted, Duration::from_secs(30)).await;
    let fresh = TestDb::create().await;
    let out = replay_from_archive(&s3, &nats.url(), &fresh, &[]).await;
    assert!(out.contains("80 of them from the archive"), "{out}");
    assert_eq!(fresh.dump_calls().await, db.dump_calls().await);
    worker.stop().await;
    gw.stop().await;
}

/// `replay --from-archive` whatever its outcome: (succeeded, output).
async fn replay_from_archive_outcome(
    s3: &S3Server,
    nats_url: &str,
    db_url: &str,
) -> (bool, String) {
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("DATABASE_URL", db_url.to_owned()));
    env.push(("ARCHIVE_URL", s3.archive_url("calls")));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        "replay",
        "--from-archive",
        "--since",
        "2000-01-01T00:00:00Z",
        "--quiet",
    ];
    let out = admin_command_env(crate::WORKER_BIN, nats_url, &args, &env).await;
    (
        out.status.success(),
        callcap_tests::pipeline::output_text(&out),
    )
}

/// The third probe, items 14 to 16, with write access to the bucket: a forged entry with
/// `seq` 2^64-1 froze a row (a genuine later update never changed it); one unreadable
/// object blocked every replay and every erasure; a 64 KB object decompressed to
/// gigabytes. Now an entry is taken only within its object's named range and the
/// stream; a bad object is reported and the others read (the command fails, saying
/// which, and an erasure stays incomplete with the reason); decompression is bounded.
#[tokio::test]
async fn a_forged_or_broken_archive_object_is_reported_and_the_others_read() {
    let s3 = S3Server::start().await;
    let Pipeline {
        nats,
        db,
        gw,
        worker,
        company: a,
        key: key_a,
        dir,
        erasure_key,
        ..
    } = Stack::new().erasure_key().pipeline().await;
    let key = erasure_key.expect("the stack's erasure key");
    let archive = s3.archive("calls");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut archiving = archiver(
        &s3,
        (&nats.url(), &db.url),
        callcap_tests::free_port(),
        &[
            ("ARCHIVE_LINGER_SECS", "1".to_owned()),
            ("ARCHIVE_OBJECT_RECORDS", "10".to_owned()),
            ("ERASURE_KEY_FILE", key.display().to_string()),
        ],
        &logs,
    );
    // The call to freeze, then 29 others (one of them with the number erased later).
    let mut victim = call(a, "VICTIM".into(), "+919800000001");
    victim["call_status"] = json!("ringing");
    assert_eq!(
        gw.post_call(&key_a, &victim).await.0,
        reqwest::StatusCode::CREATED
    );
    post_many(&gw, &key_a, 29, 4, |i| {
        call(
            a,
            format!("A-{i}"),
            if i == 7 {
                "+919876500001"
            } else {
                "+919800000001"
            },
        )
    })
    .await;
    archived_through(&archive, 30, "the first 30 records archived").await;
    archiving.terminate();

    // With the bucket's write access: the victim's entry moved to sequence 2^64-1 in its
    // object, and two more objects past the archive's end: garbage, and a small object
    // that decompresses to 1 GiB.
    let objects = archive.objects(STREAM, None, None).await.unwrap();
    let first = objects[0].clone();
    let mut entries = archive.read(&first).await.unwrap();
    let pos = entries
        .iter()
        .position(|e| String::from_utf8_lossy(&e.payload()).contains("VICTIM"))
        .unwrap();
    entries[pos].seq = u64::MAX;
    let lines: Vec<Vec<u8>> = entries
        .iter()
        .map(persist_worker::archive::Entry::line)
        .collect();
    archive
        .replace(
            &first.path,
            persist_worker::archive::compress(lines.iter().map(Vec::as_slice)).unwrap(),
        )
        .await
        .unwrap();
    let day = objects.last().unwrap().day;
    let garbage = archive.object_path(STREAM, day, 31, 31);
    archive
        .put_new(&garbage, b"not zstd at all".to_vec())
        .await
        .unwrap();
    let bomb = zstd::encode_all(std::io::Read::take(std::io::repeat(b' '), 1 << 30), 3).unwrap();
    assert!(bomb.len() < 128 * 1024, "{}", bomb.len());
    let bomb_path = archive.object_path(STREAM, day, 32, 32);
    archive.put_new(&bomb_path, bomb).await.unwrap();

    // A replay of the archive into the live database: the forged entry is refused, the
    // bad objects are named, every other record is applied, and the command fails.
    let (ok, printed) = replay_from_archive_outcome(&s3, &nats.url(), &db.url).await;
    assert!(
        !ok,
        "a replay that skipped records reported success: {printed}"
    );
    assert!(
        printed.contains("REFUSED") && printed.contains("outside the object's range"),
        "{printed}"
    );
    assert_eq!(printed.matches("UNREADABLE").count(), 2, "{printed}");
    assert!(printed.contains("ARCHIVE_READ_MAX_BYTES"), "{printed}");
    assert!(printed.contains("29 of them from the archive"), "{printed}");
    // The genuine later update of the victim still wins.
    victim["call_status"] = json!("completed");
    assert_eq!(
        gw.post_call(&key_a, &victim).await.0,
        reqwest::StatusCode::CREATED
    );
    eventually(
        Duration::from_secs(20),
        "the victim's update stored",
        || async {
            let s: Option<String> = sqlx::query_scalar(
                "SELECT call_status FROM call_history WHERE external_call_id = 'VICTIM'",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .flatten();
            (s.as_deref() == Some("completed")).then_some(())
        },
    )
    .await;

    // An erasure: cleans every readable object, names the others, stays incomplete.
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("DATABASE_URL", db.url.clone()));
    env.push(("ARCHIVE_URL", s3.archive_url("calls")));
    env.push(("ERASURE_KEY_FILE", key.display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = admin_command_env(
        crate::WORKER_BIN,
        &nats.url(),
        &[
            "erase",
            "--quiet",
            "--company",
            &a.to_string(),
            "--phone",
            "+919876500001",
        ],
        &env,
    )
    .await;
    let printed = callcap_tests::pipeline::output_text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("1 record(s) removed"), "{printed}");
    assert_eq!(
        printed.matches("NOT DONE: archived object").count(),
        2,
        "{printed}"
    );
    assert_eq!(archived_with(&archive, a, "9876500001").await, 0);
    let reason: Option<String> =
        sqlx::query_scalar("SELECT incomplete_reason FROM erasures WHERE completed_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reason.unwrap().contains("archived object"));
    worker.stop().await;
}
