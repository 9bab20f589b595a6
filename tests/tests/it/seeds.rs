//! `NATS_URL` as a list of seed servers, as on a cluster: every binary accepts it and
//! starts while one listed server is down.

use std::collections::BTreeSet;
use std::time::Duration;

use callcap_tests::payloads;
use callcap_tests::pipeline::{create_key, Process};
use reqwest::StatusCode;
use uuid::Uuid;

use callcap_tests::db::assert_stored_exactly;
use callcap_tests::stack::{Backend, Stack};

#[tokio::test]
async fn every_binary_takes_a_seed_list_with_a_dead_server_first() {
    // The key is made below, through the seed list.
    let Backend {
        nats, db, company, ..
    } = Stack::new().companies(0).backend().await;
    // Nothing listens on the first seed.
    let dead = callcap_tests::free_port();
    let seeds = format!("nats://127.0.0.1:{dead}, {}", nats.url());

    // The admin command (`keys create`'s code path) connects through the list.
    let key = create_key(&seeds, company).await;

    let port = callcap_tests::free_port();
    let _gateway = Process::gateway(crate::GATEWAY_BIN, &seeds, port, &[]);
    let _worker = Process::worker(
        crate::WORKER_BIN,
        &seeds,
        &db.url,
        callcap_tests::free_port(),
        &[],
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    callcap_tests::eventually(Duration::from_secs(30), "the gateway to be ready", || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http.get(format!("{base}/readyz")).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        }
    })
    .await;
    let mut ids = BTreeSet::new();
    for i in 0..20 {
        let resp = http
            .post(format!("{base}/v1/calls"))
            .header("x-api-key", &key)
            .json(&payloads::complete(company, &format!("SEEDS-{i}")))
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: serde_json::Value = resp.json().await.expect("json");
        ids.insert(Uuid::parse_str(body["data"]["call_history_id"].as_str().unwrap()).unwrap());
    }
    assert_stored_exactly(&db, &ids, Duration::from_secs(30)).await;
}
