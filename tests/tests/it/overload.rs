//! Bursts and overload: the batch endpoint, the per-key rate limit, the in-flight bound,
//! and slow clients.

use std::time::{Duration, Instant};

use callcap_tests::payloads;
use callcap_tests::stack::{Edge, Pipeline, Stack};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

#[tokio::test]
async fn a_mixed_batch_reports_each_item_and_stores_the_valid_ones() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let calls = json!({"calls": [
        payloads::complete(company, "B-1"),
        {"company_id": company, "outcome": "maybe"},
        payloads::minimal(company),
        payloads::minimal(Uuid::new_v4()),
        {"caller_number": "+1"},
        "not an object",
        payloads::complete(company, "B-2"),
    ]});
    let (status, headers, body) = gw.post("/v1/calls/batch", &key, &calls).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert!(!headers.contains_key("retry-after"));
    assert_eq!(body["success"], false);
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(3), Some(4))
    );
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 400, 201, 403, 400, 400, 201]);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
    }
    assert_eq!(results[1]["details"][0]["field"], "outcome");
    assert_eq!(results[4]["message"], "company_id is required");
    assert_eq!(results[5]["details"][0]["field"], "body");
    let ids: std::collections::BTreeSet<Uuid> = [0, 2, 6]
        .iter()
        .map(|&i| Uuid::parse_str(results[i]["call_history_id"].as_str().unwrap()).unwrap())
        .collect();
    callcap_tests::db::assert_stored_exactly(&db, &ids, Duration::from_secs(20)).await;

    // An all-valid batch is a plain 201, and a batch's retry gets the same ids.
    let ok =
        json!({"calls": [payloads::complete(company, "B-1"), payloads::complete(company, "B-2")]});
    let (status, _, body) = gw.post("/v1/calls/batch", &key, &ok).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        body["results"][0]["call_history_id"],
        results[0]["call_history_id"]
    );
    worker.stop().await;
}

#[tokio::test]
async fn batch_limits_answer_413_and_malformed_batches_400() {
    let serve = ServeArgs {
        max_batch_records: 5,
        ..ServeArgs::default()
    };
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Stack::new().serve(serve).edge().await;
    let six: Vec<Value> = (0..6).map(|_| payloads::minimal(company)).collect();
    let (status, _, body) = gw
        .post("/v1/calls/batch", &key, &json!({"calls": six}))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("at most 5"));
    let (status, _, body) = gw
        .post("/v1/calls/batch", &key, &json!({"records": []}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "Bad Request");
}

#[tokio::test]
async fn over_the_rate_limit_a_key_gets_429_with_retry_after() {
    let serve = ServeArgs {
        rate_limit_per_sec: 1.0,
        rate_limit_burst: 3,
        ..ServeArgs::default()
    };
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Stack::new().serve(serve).edge().await;
    let other = gw.create_key(company).await;
    for remaining in ["2", "1", "0"] {
        let (status, headers, _) = gw
            .post("/v1/calls", &key, &payloads::minimal(company))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["ratelimit-limit"], "3");
        assert_eq!(headers["ratelimit-remaining"], remaining);
    }
    let (status, headers, body) = gw
        .post("/v1/calls", &key, &payloads::minimal(company))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"], "Too Many Requests");
    assert_eq!(headers["retry-after"], "1");
    // Another key of the same company has its own bucket.
    let (status, _, _) = gw
        .post("/v1/calls", &other, &payloads::minimal(company))
        .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn past_the_in_flight_bound_the_answer_is_503_not_a_queue() {
    let serve = ServeArgs {
        max_in_flight_publishes: 2,
        publish_timeout_ms: 4_000,
        ..ServeArgs::default()
    };
    let Edge {
        mut nats,
        gw,
        company,
        key,
        ..
    } = Stack::new().serve(serve).edge().await;
    // With NATS gone, two publishes wait for acks and hold the whole budget.
    nats.stop();
    let slow = async {
        futures::future::join(
            gw.post_call(&key, &payloads::minimal(company)),
            gw.post_call(&key, &payloads::minimal(company)),
        )
        .await
    };
    let third = async {
        // Well after the two took their permits, well before their 4 s ack timeout.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let started = Instant::now();
        let r = gw
            .post("/v1/calls", &key, &payloads::minimal(company))
            .await;
        (r, started.elapsed())
    };
    let (((s1, _), (s2, _)), ((s3, headers, body), took)) =
        futures::future::join(slow, third).await;
    assert_eq!(
        (s1, s2),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        )
    );
    assert_eq!(s3, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("in flight"),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        took < Duration::from_millis(500),
        "the refusal must be immediate, took {took:?}"
    );
}

#[tokio::test]
async fn a_slow_body_gets_408_and_slow_headers_lose_the_connection() {
    let serve = ServeArgs {
        body_timeout_ms: 300,
        header_timeout_ms: 300,
        ..ServeArgs::default()
    };
    let Edge {
        nats: _nats,
        gw,
        key,
        ..
    } = Stack::new().serve(serve).edge().await;

    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/calls HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"company_id\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("Request Timeout"), "{text}");

    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"POST /v1/calls HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
