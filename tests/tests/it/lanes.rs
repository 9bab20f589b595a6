//! Lanes: a company over its share (`OVERFLOW_RATE`) has its records published on the
//! overflow lane, which workers serve on their own consumer. What users rely on: the
//! company still gets its 201s, nobody else's records wait behind its backlog, and a
//! call's later submission wins however its submissions were split between the lanes and
//! in whichever order the lanes were stored.

use std::time::Duration;

use callcap::subjects::Lane;
use callcap_tests::db::TestDb;
use callcap_tests::eventually;
use callcap_tests::nats::{stream_messages, NatsServer};
use callcap_tests::pipeline::TestGateway;
use callcap_tests::stack::{Backend, Stack, Stored};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn call(company: Uuid, ext: &str, status: &str, notes: &str) -> Value {
    json!({
        "company_id": company,
        "external_call_id": ext,
        "external_system": "Dialer",
        "call_status": status,
        "notes": notes,
    })
}

/// (call_status, notes) of the call with external id `ext`, if stored.
async fn stored(db: &TestDb, company: Uuid, ext: &str) -> Option<(String, String)> {
    sqlx::query_as(
        "SELECT call_status, notes FROM call_history WHERE company_id = $1 AND external_call_id = $2",
    )
    .bind(company)
    .bind(ext)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// The gateway's `/status` page.
async fn status_page(gw: &TestGateway) -> String {
    gw.get("/status").await.1
}

/// A gateway that puts `company` in the overflow lane for good (OVERFLOW_COMPANIES),
/// holding `key` (made by the stack).
async fn forcing(nats: &NatsServer, company: Uuid, key: &str) -> TestGateway {
    let gw = TestGateway::start_with(
        &nats.url(),
        ServeArgs {
            overflow_companies: vec![company],
            ..ServeArgs::default()
        },
    )
    .await;
    gw.wait_for_key(key).await;
    gw
}

#[tokio::test]
async fn a_calls_later_submission_wins_across_lanes_and_a_hot_companys_backlog_holds_up_nobody_else(
) {
    // A share of one record a second, one at once, and one second in the lane after the
    // last excess: small enough to move the company by hand.
    let Stored {
        nats,
        db,
        gw,
        company: hot,
        key: hot_key,
        others,
        workers,
        ..
    } = Stack::new()
        .serve(ServeArgs {
            overflow_rate: 1.0,
            overflow_burst: 1,
            overflow_sticky_secs: 1,
            ..ServeArgs::default()
        })
        .companies(2)
        .stored()
        .await;
    let (quiet, quiet_key) = others[0].pair();
    // Only the main lane is served at first: the overflow lane's records wait.
    let main_worker = workers
        .start_edited(|cli| cli.run.lanes = vec![Lane::Main])
        .await;

    // C2 rings (main lane: the burst covers it)…
    let (s, _) = gw
        .post_call(&hot_key, &call(hot, "C2", "ringing", "ringing"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // …then C2 completes and C1 rings: over the share, the overflow lane; still 201s.
    let (s, _, body) = gw
        .post(
            "/v1/calls/batch",
            &hot_key,
            &json!({ "calls": [
                call(hot, "C2", "completed", "done"),
                call(hot, "C1", "ringing", "ringing"),
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // The gateway's status page lists the company (by the start of its id).
    let page = status_page(&gw).await;
    assert!(
        page.contains(&hot.simple().to_string()[..8]) && page.contains("id=\"overflow-count\">1<"),
        "{page}"
    );
    // Another company is not in the lane.
    let (s, _) = gw
        .post_call(&quiet_key, &call(quiet, "Q1", "completed", "quiet"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // Within its share for longer than the sticky second: back in the main lane, where
    // C1 completes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, _) = gw
        .post_call(&hot_key, &call(hot, "C1", "completed", "done"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = gw
        .post_call(&quiet_key, &call(quiet, "Q2", "completed", "quiet"))
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // The lanes as published: one stream, one sequence.
    let subjects: Vec<String> = stream_messages(&nats.url())
        .await
        .into_iter()
        .map(|(_, subject, _)| subject)
        .collect();
    assert_eq!(
        subjects,
        vec![
            Lane::Main.subject(hot),
            Lane::Overflow.subject(hot),
            Lane::Overflow.subject(hot),
            Lane::Main.subject(quiet),
            Lane::Main.subject(hot),
            Lane::Main.subject(quiet),
        ]
    );

    // With the overflow lane unserved, the quiet company's records are stored anyway,
    // and so is everything of the main lane: C2's ringing, C1's completion.
    eventually(Duration::from_secs(20), "the main lane stored", || async {
        let q1 = stored(&db, quiet, "Q1").await;
        let q2 = stored(&db, quiet, "Q2").await;
        let c1 = stored(&db, hot, "C1").await;
        (q1.is_some() && q2.is_some() && c1.is_some()).then_some(())
    })
    .await;
    assert_eq!(
        stored(&db, hot, "C1").await,
        Some(("completed".into(), "done".into()))
    );
    assert_eq!(
        stored(&db, hot, "C2").await,
        Some(("ringing".into(), "ringing".into())),
        "C2's completion waits in the unserved overflow lane"
    );

    // The overflow lane's worker comes: C2's later completion wins over its earlier
    // ringing; C1's earlier ringing, stored after its completion, changes nothing.
    let overflow_worker = workers
        .start_edited(|cli| cli.run.lanes = vec![Lane::Overflow])
        .await;
    eventually(
        Duration::from_secs(20),
        "the overflow lane stored",
        || async {
            (stored(&db, hot, "C2").await == Some(("completed".into(), "done".into())))
                .then_some(())
        },
    )
    .await;
    // Give the overflow worker time to have applied C1's ringing too (its consumer has
    // nothing pending once it has).
    let info_pending = || async {
        let client = callcap_tests::identities::connect(&nats.url()).await;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(callcap::subjects::STREAM_NAME).await.unwrap();
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(Lane::Overflow.consumer_name())
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        let _ = &mut stream;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    };
    eventually(
        Duration::from_secs(20),
        "the overflow lane drained",
        info_pending,
    )
    .await;
    assert_eq!(
        stored(&db, hot, "C1").await,
        Some(("completed".into(), "done".into())),
        "an earlier submission stored later must not undo the later one"
    );
    assert_eq!(db.count_calls().await, 4);
    overflow_worker.stop().await;
    main_worker.stop().await;
}

#[tokio::test]
async fn a_worker_serving_both_lanes_reports_each_and_an_operator_can_force_a_company_into_the_overflow_lane(
) {
    // The gateway is the test's: it forces the stack's company into the overflow lane.
    let Backend {
        nats,
        db,
        company: forced,
        key: forced_key,
        others,
        workers,
        ..
    } = Stack::new().companies(2).backend().await;
    let (other, other_key) = others[0].pair();
    let gw = forcing(&nats, forced, &forced_key).await;
    gw.wait_for_key(&other_key).await;
    let worker = workers.start().await;
    for i in 0..5 {
        let (s, _) = gw
            .post_call(
                &forced_key,
                &call(forced, &format!("F{i}"), "completed", "f"),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _) = gw
            .post_call(&other_key, &call(other, &format!("O{i}"), "completed", "o"))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let lanes: Vec<Lane> = stream_messages(&nats.url())
        .await
        .into_iter()
        .map(|(_, subject, _)| Lane::of_subject(&subject).unwrap().0)
        .collect();
    assert_eq!(
        lanes,
        [Lane::Overflow, Lane::Main].repeat(5),
        "the forced company always in the overflow lane, the other never"
    );
    eventually(Duration::from_secs(20), "both lanes stored", || async {
        (db.count_calls().await == 10).then_some(())
    })
    .await;
    let readyz = eventually(Duration::from_secs(20), "both lanes read", || async {
        let (_, text) = worker.get("/readyz").await;
        (text.contains("lane main: ok (pending 0") && text.contains("lane overflow: ok (pending 0"))
            .then_some(text)
    })
    .await;
    assert!(readyz.contains("consumer: ok"), "{readyz}");
    let page = status_page(&gw).await;
    assert!(
        page.contains(&forced.simple().to_string()[..8]) && page.contains("OVERFLOW_COMPANIES"),
        "{page}"
    );
    assert!(!page.contains(&other.simple().to_string()[..8]), "{page}");
    worker.stop().await;
}

#[tokio::test]
async fn a_stream_from_before_lanes_keeps_taking_every_record_in_the_main_lane_until_setup() {
    let Backend {
        nats,
        db,
        company: forced,
        key,
        workers,
        ..
    } = Stack::new().backend().await;
    // The stream as an earlier release created it: the main lane's subjects only.
    let admin = async_nats::jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let mut old = callcap::subjects::stream_config(&Default::default(), 1);
    old.subjects = vec![callcap::subjects::SUBJECT_WILDCARD.to_owned()];
    admin.create_stream(old).await.unwrap();
    let gw = forcing(&nats, forced, &key).await;
    let worker = workers.start().await;
    for i in 0..3 {
        let (s, body) = gw
            .post_call(&key, &call(forced, &format!("F{i}"), "completed", "f"))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let subjects: Vec<String> = stream_messages(&nats.url())
        .await
        .into_iter()
        .map(|(_, subject, _)| subject)
        .collect();
    assert_eq!(subjects, vec![Lane::Main.subject(forced); 3]);
    eventually(Duration::from_secs(20), "stored", || async {
        (db.count_calls().await == 3).then_some(())
    })
    .await;
    // The worker is ready and says why it does not serve the overflow lane.
    let readyz = eventually(Duration::from_secs(20), "ready", || async {
        let (status, text) = worker.get("/readyz").await;
        (status == StatusCode::OK).then_some(text)
    })
    .await;
    assert!(
        readyz.contains("lane overflow: not in the stream (run `ingest-gateway setup`)"),
        "{readyz}"
    );
    worker.stop().await;
    gw.stop().await;

    // `setup` adds the lane; restarted, the gateway routes the forced company there and
    // the worker serves it.
    let out =
        callcap_tests::pipeline::admin_command(crate::GATEWAY_BIN, &nats.url(), &["setup"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw = forcing(&nats, forced, &key).await;
    let worker = workers.start().await;
    let (s, _) = gw
        .post_call(&key, &call(forced, "F3", "completed", "f"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let last = stream_messages(&nats.url()).await.pop().unwrap();
    assert_eq!(last.1, Lane::Overflow.subject(forced));
    eventually(Duration::from_secs(20), "stored", || async {
        (db.count_calls().await == 4).then_some(())
    })
    .await;
    worker.stop().await;
}
