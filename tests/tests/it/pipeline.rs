//! Gateway and worker together: every 201 ends up in Postgres exactly once.

use std::collections::BTreeSet;
use std::time::Duration;

use callcap_tests::db::assert_stored_exactly;
use callcap_tests::payloads;
use callcap_tests::pipeline::post_many;
use callcap_tests::stack::{Pipeline, Stack, Stored};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

#[tokio::test]
async fn a_burst_is_stored_exactly_once_by_two_workers() {
    let Stored {
        nats: _nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    let w1 = workers.start().await;
    let w2 = workers.start().await;
    // Half with an external id (deterministic ids), half anonymous; some posted twice.
    let ids = post_many(&gw, &key, 4000, 64, |i| {
        if i % 2 == 0 {
            payloads::complete(company, &format!("BURST-{}", i / 4))
        } else {
            payloads::minimal(company)
        }
    })
    .await;
    assert_eq!(
        ids.len(),
        3000,
        "1000 external ids posted twice each, 2000 anonymous"
    );
    assert_stored_exactly(&db, &ids, Duration::from_secs(60)).await;
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test]
async fn the_quick_start_record_is_visible_a_moment_later() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let (status, body) = gw
        .post_call(&key, &payloads::complete(company, "CALL-12345"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = Uuid::parse_str(body["data"]["call_history_id"].as_str().unwrap()).unwrap();
    let row = callcap_tests::eventually(Duration::from_secs(10), "the row", || async {
        sqlx::query_as::<_, (String, i32, String, Value, String)>(
            "SELECT outcome, duration_seconds, external_call_id, call_details, next_follow_up_time::text \
             FROM call_history WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(row.0, "follow_up");
    assert_eq!(row.1, 320);
    assert_eq!(row.2, "CALL-12345");
    assert_eq!(row.3["tags"][0], "premium");
    assert_eq!(row.4, "14:00:00");
    worker.stop().await;
}

#[tokio::test]
async fn nats_restart_the_worker_reconnects_and_resumes() {
    let Stored {
        mut nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    let worker = workers.start().await;
    let mut ids = post_many(&gw, &key, 200, 16, |_| payloads::minimal(company)).await;
    assert_stored_exactly(&db, &ids, Duration::from_secs(30)).await;

    nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.start_again().await;
    let more = callcap_tests::eventually(
        Duration::from_secs(20),
        "the gateway to accept after the restart",
        || async {
            let (s, b) = gw.post_call(&key, &payloads::minimal(company)).await;
            (s == StatusCode::CREATED)
                .then(|| Uuid::parse_str(b["data"]["call_history_id"].as_str().unwrap()).unwrap())
        },
    )
    .await;
    ids.insert(more);
    ids.extend(post_many(&gw, &key, 200, 16, |_| payloads::minimal(company)).await);
    assert_stored_exactly(&db, &ids, Duration::from_secs(60)).await;
    worker.stop().await;
}

#[tokio::test]
async fn truncate_and_replay_from_sequence_one_rebuilds_the_table_identically() {
    let Pipeline {
        nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    // Updates of the same calls, in order, so the merge rules shape the final rows.
    let mut ids = BTreeSet::new();
    for round in 0..3 {
        for i in 0..50 {
            let mut body = payloads::complete(company, &format!("R-{i}"));
            body["notes"] = format!("round {round}").into();
            if round == 2 {
                body.as_object_mut().unwrap().remove("recording_url");
                body["call_status"] = "ringing".into();
            }
            let (s, b) = gw.post_call(&key, &body).await;
            assert_eq!(s, StatusCode::CREATED);
            ids.insert(Uuid::parse_str(b["data"]["call_history_id"].as_str().unwrap()).unwrap());
        }
    }
    ids.extend(post_many(&gw, &key, 100, 8, |_| payloads::quick_start(company)).await);
    let expected_seq: i64 = 250;
    callcap_tests::eventually(
        Duration::from_secs(30),
        "all 250 messages applied",
        || async {
            let max: Option<i64> = sqlx::query_scalar("SELECT max(stream_seq) FROM call_history")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            (max == Some(expected_seq) && db.count_calls().await == ids.len() as i64).then_some(())
        },
    )
    .await;
    worker.stop().await;
    let before = db.dump_calls().await;
    assert!(before[0].contains("\"notes\""));

    sqlx::query("TRUNCATE call_history CASCADE")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(db.count_calls().await, 0);
    let client = callcap_tests::identities::connect(&nats.url()).await;
    let js = async_nats::jetstream::new(client);
    let args = persist_worker::config::ReplayArgs {
        from_seq: Some(1),
        from_archive: false,
        since: None,
        until: None,
        company: None,
        batch_size: 64,
        quiet: true,
    };
    let summary = persist_worker::cli::replay::run(
        &js,
        None,
        &db.pool,
        &Default::default(),
        &args,
        Duration::from_millis(500),
        &callcap::shutdown::Shutdown::new(),
    )
    .await
    .unwrap();
    assert!(summary.completed);
    assert_eq!(summary.messages, 250);
    assert_eq!((summary.first_seq, summary.last_seq), (Some(1), Some(250)));
    let after = db.dump_calls().await;
    assert_eq!(before, after, "replay must rebuild the same rows");

    // Replaying again over the rebuilt table changes nothing.
    let again = persist_worker::cli::replay::run(
        &js,
        None,
        &db.pool,
        &Default::default(),
        &args,
        Duration::from_millis(500),
        &callcap::shutdown::Shutdown::new(),
    )
    .await
    .unwrap();
    assert_eq!(again.rows_changed, 0);
    assert_eq!(db.dump_calls().await, before);
}

#[tokio::test]
async fn replay_of_one_company_touches_only_its_records() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key: ka,
        others,
        ..
    } = Stack::new().companies(2).stored().await;
    let (b, kb) = others[0].pair();
    post_many(&gw, &ka, 30, 8, |_| payloads::minimal(a)).await;
    post_many(&gw, &kb, 20, 8, |_| payloads::minimal(b)).await;
    let client = callcap_tests::identities::connect(&nats.url()).await;
    let js = async_nats::jetstream::new(client);
    let args = persist_worker::config::ReplayArgs {
        from_seq: Some(1),
        from_archive: false,
        since: None,
        until: None,
        company: Some(b),
        batch_size: 7,
        quiet: true,
    };
    let cancel = callcap::shutdown::Shutdown::new();
    let summary = persist_worker::cli::replay::run(
        &js,
        None,
        &db.pool,
        &Default::default(),
        &args,
        Duration::from_millis(500),
        &cancel,
    )
    .await
    .unwrap();
    assert_eq!(summary.messages, 20);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM call_history WHERE company_id = $1")
        .bind(b)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((n, db.count_calls().await), (20, 20));
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_its_neighbours_stored() {
    let Stored {
        nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    let mut ids = post_many(&gw, &key, 20, 4, |_| payloads::minimal(company)).await;

    // Published straight to the stream, bypassing the gateway: undecodable bytes, and an
    // envelope the gateway would have refused (a NUL character, which Postgres refuses
    // too): the worker checks every record as the gateway does.
    let client = callcap_tests::identities::connect(&nats.url()).await;
    let js = async_nats::jetstream::new(client);
    let subject = callcap::subjects::ingest_subject(company);
    js.publish(subject.clone(), "not an envelope".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut bad = callcap::CallRecord::new(company);
    bad.notes = Some("nul \u{0} inside".into());
    let env = callcap::Envelope::new(Uuid::now_v7(), chrono::Utc::now(), "k".into(), None, bad);
    js.publish(subject, env.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    ids.extend(post_many(&gw, &key, 20, 4, |_| payloads::minimal(company)).await);

    let worker = workers.start().await;
    assert_stored_exactly(&db, &ids, Duration::from_secs(30)).await;
    let dead = callcap_tests::eventually(Duration::from_secs(10), "two dead letters", || async {
        let rows = persist_worker::store::dead_letters(&db.pool, true, 100)
            .await
            .unwrap();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    assert!(
        dead[0].reason.contains("not a valid envelope"),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[1].reason.contains("notes must not contain NUL"),
        "{}",
        dead[1].reason
    );
    assert_eq!(dead[0].payload, b"not an envelope");
    worker.stop().await;

    let mut out = Vec::new();
    persist_worker::cli::dlq::list(&db.pool, false, 100, &mut out)
        .await
        .unwrap();
    let listing = String::from_utf8(out).unwrap();
    assert!(listing.contains("2 dead letter(s)"), "{listing}");
    let mut out = Vec::new();
    let summary = persist_worker::cli::dlq::redrive(&db.pool, &Default::default(), None, &mut out)
        .await
        .unwrap();
    assert_eq!((summary.stored, summary.still_failing), (0, 2));
    // A dead letter whose cause has passed re-drives: here a good payload recorded as dead
    // (as an operator might after a bad deploy) is stored, the two poison ones stay.
    let good = callcap::Envelope::new(
        Uuid::now_v7(),
        chrono::Utc::now(),
        "k".into(),
        None,
        callcap::CallRecord::new(company),
    );
    persist_worker::store::record_dead_letters(
        &db.pool,
        &[persist_worker::store::DeadLetter {
            seq: 10_000,
            subject: callcap::subjects::ingest_subject(company),
            reason: "database was down".into(),
            payload: good.encode(),
        }],
    )
    .await
    .unwrap();
    let summary =
        persist_worker::cli::dlq::redrive(&db.pool, &Default::default(), None, &mut Vec::new())
            .await
            .unwrap();
    assert_eq!((summary.stored, summary.still_failing), (1, 2));
    assert_eq!(db.count_calls().await, ids.len() as i64 + 1);
}
