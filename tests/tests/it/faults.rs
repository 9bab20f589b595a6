//! Fault tests: the real worker binary killed with -9 mid-batch, Postgres cut off. Every
//! 201 must end up stored exactly once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use callcap_tests::db::{self};
use callcap_tests::payloads;
use callcap_tests::pipeline::Process;
use callcap_tests::proxy::Proxy;
use reqwest::StatusCode;
use uuid::Uuid;

use callcap_tests::db::assert_stored_exactly;
use callcap_tests::pipeline::post_many;
use callcap_tests::stack::{Stack, Stored};

#[tokio::test]
async fn kill_9_mid_batch_then_restart_loses_and_doubles_nothing() {
    let Stored {
        nats: _nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    // A backlog big enough that the worker is mid-way when it dies.
    let ids: BTreeSet<Uuid> = post_many(&gw, &key, 20_000, 128, |i| {
        payloads::complete(company, &format!("KILL-{i}"))
    })
    .await;

    let mut worker = workers.process(
        crate::WORKER_BIN,
        callcap_tests::free_port(),
        &[("BATCH_SIZE", "500".to_owned())],
    );
    let seen = callcap_tests::eventually(
        Duration::from_secs(60),
        "the worker to be part-way",
        || async {
            let n = db.count_calls().await;
            (n > 0).then_some(n)
        },
    )
    .await;
    worker.kill9();
    let after_kill = db.count_calls().await;
    assert!(
        after_kill < ids.len() as i64,
        "the worker finished before the kill ({seen} then {after_kill}); the test needs a bigger backlog"
    );

    let _restarted = workers.process(crate::WORKER_BIN, callcap_tests::free_port(), &[]);
    assert_stored_exactly(&db, &ids, Duration::from_secs(120)).await;
}

#[tokio::test]
async fn postgres_refusing_connections_does_not_stop_ingest_and_the_worker_catches_up() {
    let Stored {
        nats,
        db,
        gw,
        company,
        key,
        ..
    } = Stack::new().stored().await;
    let target: SocketAddr = {
        let u = url::Url::parse(&db::base_url()).unwrap();
        let host = u.host_str().unwrap_or("127.0.0.1");
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        format!("{host}:{}", u.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = Proxy::start(target).await;
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();

    // The worker reaches Postgres through the proxy the test cuts.
    let metrics_port = callcap_tests::free_port();
    let _worker = Process::worker(
        crate::WORKER_BIN,
        &nats.url(),
        via_proxy.as_str(),
        metrics_port,
        &[],
    );
    let mut ids = post_many(&gw, &key, 300, 16, |_| payloads::minimal(company)).await;
    assert_stored_exactly(&db, &ids, Duration::from_secs(30)).await;

    proxy.down();
    // Ingest goes on: the gateway never talks to Postgres.
    ids.extend(
        post_many(&gw, &key, 1000, 32, |i| {
            payloads::complete(company, &format!("PGDOWN-{i}"))
        })
        .await,
    );
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    callcap_tests::eventually(
        Duration::from_secs(10),
        "the worker to report Postgres unavailable",
        || async {
            let r = http.get(&ready).send().await.ok()?;
            (r.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        db.count_calls().await < ids.len() as i64,
        "nothing can be written while Postgres is cut off"
    );

    proxy.up();
    assert_stored_exactly(&db, &ids, Duration::from_secs(60)).await;
    let (_, metrics) = callcap_tests::get_port(metrics_port, "/metrics").await;
    assert!(metrics.contains("worker_db_errors_total"), "{metrics}");
    assert!(metrics.contains("worker_rows_written_total"), "{metrics}");
}

#[tokio::test]
async fn sigterm_finishes_the_batch_in_hand_and_exits_cleanly() {
    let Stored {
        nats: _nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    let ids = post_many(&gw, &key, 5000, 64, |_| payloads::minimal(company)).await;
    let mut worker = workers.process(
        crate::WORKER_BIN,
        callcap_tests::free_port(),
        &[("BATCH_SIZE", "200".to_owned())],
    );
    callcap_tests::eventually(
        Duration::from_secs(60),
        "the worker to start storing",
        || async { (db.count_calls().await > 0).then_some(()) },
    )
    .await;
    let status = worker.terminate().expect("exit status");
    assert!(status.success(), "worker exited with {status}");
    // Whatever it had not stored is handed back and stored by the next worker, once.
    let _next = workers.process(crate::WORKER_BIN, callcap_tests::free_port(), &[]);
    assert_stored_exactly(&db, &ids, Duration::from_secs(60)).await;
}
