//! Group commit: concurrent records go to JetStream as atomic batches, each record keeps
//! its own id and sequence, retries inside a batch are still answered 201, and the
//! gateway refuses servers that cannot fsync a batch once.

use std::time::Duration;

use callcap_tests::nats::{stream_envelopes, NatsConfig, NatsServer};
use callcap_tests::payloads;
use callcap_tests::stack::{Edge, Stack};
use futures::StreamExt;
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

/// (stream sequence, call id, external_call_id) of every message, in stream order.
async fn stream_messages(nats_url: &str) -> Vec<(u64, Uuid, Option<String>)> {
    stream_envelopes(nats_url)
        .await
        .into_iter()
        .map(|(seq, env)| (seq, env.call_history_id, env.record.external_call_id))
        .collect()
}

fn id_of(item: &Value) -> String {
    item["call_history_id"]
        .as_str()
        .expect("an accepted item has an id")
        .to_owned()
}

#[tokio::test]
async fn concurrent_posts_are_coalesced_and_each_stored_once() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let before = gw.state.publisher.stats();
    let n = 400;
    let ids: Vec<String> = futures::stream::iter(0..n)
        .map(|i| {
            let (gw, key) = (&gw, &key);
            async move {
                let (status, body) = gw
                    .post_call(key, &payloads::complete(company, &format!("GC-{i}")))
                    .await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
                body["data"]["call_history_id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let after = gw.state.publisher.stats();
    let (batches, records) = (
        after.batches - before.batches,
        after.records - before.records,
    );
    assert_eq!(records, n as u64, "every record published once");
    assert!(
        batches < records / 2,
        "{records} concurrent records went out in {batches} publishes: no group commit"
    );
    let in_stream = stream_messages(&nats.url()).await;
    assert_eq!(in_stream.len(), n);
    let mut stream_ids: Vec<String> = in_stream.iter().map(|m| m.1.to_string()).collect();
    let mut ids = ids;
    stream_ids.sort();
    ids.sort();
    assert_eq!(
        stream_ids, ids,
        "the stream holds exactly the acknowledged records"
    );
}

#[tokio::test]
async fn a_batch_request_is_stored_at_consecutive_sequences_in_order() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let calls: Vec<Value> = (0..250)
        .map(|i| payloads::complete(company, &format!("ORDER-{i:03}")))
        .collect();
    let before = gw.state.publisher.stats();
    let (status, _, body) = gw
        .post("/v1/calls/batch", &key, &json!({ "calls": calls }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let after = gw.state.publisher.stats();
    assert_eq!(
        after.batches - before.batches,
        1,
        "250 records are one atomic batch"
    );
    let msgs = stream_messages(&nats.url()).await;
    assert_eq!(msgs.len(), 250);
    for (i, (seq, id, ext)) in msgs.iter().enumerate() {
        assert_eq!(ext.as_deref(), Some(format!("ORDER-{i:03}").as_str()));
        assert_eq!(*seq, msgs[0].0 + i as u64, "consecutive sequences");
        assert_eq!(id.to_string(), id_of(&body["results"][i]));
    }
}

#[tokio::test]
async fn a_retried_record_inside_a_batch_gets_201_and_the_others_are_stored() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let a = payloads::complete(company, "RETRY-A");
    let (status, first) = gw.post_call(&key, &a).await;
    assert_eq!(status, StatusCode::CREATED);
    let a_id = first["data"]["call_history_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The retry of A travels in one atomic batch with two new records: JetStream refuses
    // such a batch whole (10201); the gateway must still store B and C and answer 201.
    let before = gw.state.publisher.stats();
    let batch = json!({ "calls": [
        payloads::complete(company, "RETRY-B"),
        a,
        payloads::complete(company, "RETRY-C"),
    ]});
    let (status, _, body) = gw.post("/v1/calls/batch", &key, &batch).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(id_of(&body["results"][1]), a_id, "the retry keeps its id");
    let after = gw.state.publisher.stats();
    assert_eq!(
        after.fallbacks - before.fallbacks,
        1,
        "the refused batch was republished record by record"
    );
    let msgs = stream_messages(&nats.url()).await;
    let exts: Vec<_> = msgs.iter().filter_map(|m| m.2.clone()).collect();
    assert_eq!(exts.len(), 3, "A once, then B and C: {exts:?}");
    for want in ["RETRY-A", "RETRY-B", "RETRY-C"] {
        assert_eq!(exts.iter().filter(|e| *e == want).count(), 1, "{want}");
    }
}

#[tokio::test]
async fn the_same_record_twice_in_one_batch_is_one_message() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let d = payloads::complete(company, "TWICE-D");
    let before = gw.state.publisher.stats();
    let (status, _, body) = gw
        .post("/v1/calls/batch", &key, &json!({ "calls": [d, d] }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(id_of(&body["results"][0]), id_of(&body["results"][1]));
    let after = gw.state.publisher.stats();
    assert_eq!(after.fallbacks, before.fallbacks, "no refused batch");
    assert_eq!(stream_messages(&nats.url()).await.len(), 1);
}

#[tokio::test]
async fn readyz_reports_the_fsync_mode_the_server_runs() {
    for (config, want) in [
        (NatsConfig::Strict, "always"),
        (NatsConfig::IntervalFsync, "every 120 s"),
    ] {
        // The monitor address is known once the server is prepared: the stack takes it so.
        let nats = NatsServer::prepare(config, Vec::new());
        let serve = ServeArgs {
            nats_monitor_url: Some(nats.monitor_url()),
            ..ServeArgs::default()
        };
        let Edge {
            nats: _nats, gw, ..
        } = Stack::new().nats_server(nats).serve(serve).edge().await;
        let ready: Value = gw.get_json("/readyz").await.1;
        let fsync = ready["fsync"].as_str().unwrap_or_default();
        assert!(fsync.starts_with(want), "{config:?}: fsync = {fsync:?}");
        gw.stop().await;
    }
}

/// A NATS peer that speaks just enough of the protocol to announce `version`.
async fn fake_server(version: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let info = format!(
                    "INFO {{\"server_id\":\"FAKE\",\"server_name\":\"fake\",\"version\":\"{version}\",\"proto\":1,\"headers\":true,\"max_payload\":1048576,\"host\":\"127.0.0.1\",\"port\":{port}}}\r\n"
                );
                let _ = w.write_all(info.as_bytes()).await;
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("PING") {
                        let _ = w.write_all(b"PONG\r\n").await;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn the_gateway_refuses_a_server_older_than_the_minimum() {
    let port = fake_server("2.14.6").await;
    let cli = callcap_tests::pipeline::gateway_cli(
        &format!("nats://127.0.0.1:{port}"),
        ServeArgs::default(),
    );
    let err =
        match tokio::time::timeout(Duration::from_secs(20), ingest_gateway::connect(&cli, None))
            .await
        {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(_)) => panic!("the gateway started against nats-server 2.14.6"),
            Err(_) => panic!("the gateway neither started nor refused within 20 s"),
        };
    assert!(
        err.contains("2.14.6") && err.contains("2.15.0"),
        "the error names both versions: {err}"
    );
}
