//! The second hostile probe's findings, each held against the real services: edge
//! timestamps (whatever gets 201 is stored), compressed bodies that cost more memory than
//! their bytes, compressed bodies cut short, `Idempotency-Key` on the batch route, header
//! counts and a head sent a byte at a time.

use std::time::{Duration, Instant};

use callcap_tests::db::TestDb;
use callcap_tests::payloads;
use callcap_tests::pipeline::TestGateway;
use callcap_tests::stack::{Edge, Pipeline, Stack, Stored};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// Timestamps and dates at the edges of what RFC 3339 can write, with the offsets that
/// carry them past year 9999 or before year 0000 in UTC. Before the fix each of the
/// accepted ones got 201 and was dead-lettered by the worker.
const EDGE_TIMESTAMPS: [&str; 7] = [
    "9999-12-31T23:59:59-23:59",
    "9999-12-31T23:59:59-05:00",
    "9999-12-31T23:59:60Z",
    "0000-01-01T00:00:00+00:01",
    "0000-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59.999999-23:59",
    "2025-11-25T10:30:00+05:30",
];

#[tokio::test]
async fn whatever_the_gateway_accepts_at_the_edges_of_time_the_worker_stores() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;

    let mut accepted: Vec<(Uuid, &str, String)> = Vec::new();
    let mut batch = Vec::new();
    for (i, t) in EDGE_TIMESTAMPS.iter().enumerate() {
        for field in ["call_date", "start_time", "end_time"] {
            let mut record =
                json!({"company_id": company, "external_call_id": format!("single-{i}-{field}")});
            record[field] = json!(t);
            let (s, body) = gw.post_call(&key, &record).await;
            assert_eq!(s, StatusCode::CREATED, "{field} {t}: {body}");
            let id = Uuid::parse_str(body["data"]["call_history_id"].as_str().unwrap()).unwrap();
            accepted.push((id, field, (*t).to_owned()));
            let mut item = record.clone();
            item["external_call_id"] = json!(format!("batch-{i}-{field}"));
            batch.push(item);
        }
    }
    let (s, _, body) = gw
        .post("/v1/calls/batch", &key, &json!({"calls": batch}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    for item in body["results"].as_array().unwrap() {
        let i = item["index"].as_u64().unwrap() as usize;
        let (t, field) = (
            EDGE_TIMESTAMPS[i / 3],
            ["call_date", "start_time", "end_time"][i % 3],
        );
        let id = Uuid::parse_str(item["call_history_id"].as_str().unwrap()).unwrap();
        accepted.push((id, field, t.to_owned()));
    }

    // Refused with 400 naming the field, never 201: a leap second past the last writable
    // instant, and dates that are not four-digit years.
    for (field, value) in [
        ("end_time", "9999-12-31T23:59:60-23:59"),
        ("next_follow_up", "-999-12-31"),
        ("next_follow_up", "-001-01-01"),
        ("next_follow_up", "+10000-1-1"),
    ] {
        let mut record = json!({"company_id": company});
        record[field] = json!(value);
        let (s, body) = gw.post_call(&key, &record).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field} {value}: {body}");
        assert_eq!(body["details"][0]["field"], field, "{body}");
    }

    let expected = accepted.len() as i64;
    callcap_tests::eventually(
        Duration::from_secs(30),
        "every 201 to be stored",
        || async { (db.count_calls().await == expected).then_some(()) },
    )
    .await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing the gateway accepted was dead-lettered");
    // Each stored instant is the one sent.
    for (id, field, text) in &accepted {
        let stored: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar(&format!("SELECT {field} FROM call_history WHERE id = $1"))
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let sent = chrono::DateTime::parse_from_rfc3339(text).unwrap();
        assert_eq!(
            stored.timestamp_micros(),
            sent.timestamp_micros(),
            "{field} {text}"
        );
    }
    worker.stop().await;
}

/// The probe's body: 255 records whose `call_details` is `{"a":[0,0,…]}` just under the
/// 32 KiB limit, all naming `company`: 8.4 MB of JSON that zstd packs into ~2 KB.
fn zeros_batch(company: Uuid, records: usize) -> Vec<u8> {
    let zeros = format!("[{}0]", "0,".repeat(16_000));
    let record = format!(r#"{{"company_id":"{company}","call_details":{{"a":{zeros}}}}}"#);
    let body = format!(r#"{{"calls":[{}]}}"#, vec![record; records].join(","));
    payloads::compress("zstd", body.as_bytes())
}

async fn post_raw(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = http
        .post(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    let resp = req.send().await.expect("POST to the gateway");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn compressed_bodies_that_cost_more_than_their_bytes_are_bounded_per_key_and_another_company_is_served(
) {
    let serve = ServeArgs {
        body_memory_mb: 96,
        body_memory_per_key_percent: 50,
        ..ServeArgs::default()
    };
    let Edge {
        nats: _nats,
        gw,
        company: hot,
        key: hot_key,
        others,
        ..
    } = Stack::new().serve(serve).companies(2).edge().await;
    let (quiet, quiet_key) = others[0].pair();
    let url = format!("{}/v1/calls/batch", gw.base());

    // The probe's body costs ~270 MB to parse: more than one key may hold (48 MiB), 413.
    let (s, body) = post_raw(
        &gw.http,
        &url,
        &hot_key,
        Some("zstd"),
        zeros_batch(Uuid::new_v4(), 255),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("memory"),
        "{body}"
    );

    // Bodies that fit one at a time (~25 MB each) sent 12 at once by the hot key: each
    // is read, or waits its turn with 503; never more than the key's share is held, and
    // the quiet company's records are taken all along.
    let small = zeros_batch(hot, 24);
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let (http, url, key, body) =
                (gw.http.clone(), url.clone(), hot_key.clone(), small.clone());
            tokio::spawn(async move { post_raw(&http, &url, &key, Some("zstd"), body).await })
        })
        .collect();
    let mut quiet_created = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) || !flood.iter().all(|f| f.is_finished()) {
        let (s, body) = gw.post_call(&quiet_key, &payloads::minimal(quiet)).await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "the quiet company was refused: {body}"
        );
        quiet_created += 1;
        let held = gw.state.bodies.used();
        assert!(held <= gw.state.bodies.limit(), "{held} held");
        if started.elapsed() > Duration::from_secs(60) {
            panic!("the flood did not finish");
        }
    }
    let mut statuses = Vec::new();
    for f in flood {
        let (s, body) = f.await.unwrap();
        if s == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                body["message"].as_str().unwrap().contains("memory budget"),
                "{body}"
            );
        }
        statuses.push(s.as_u16());
    }
    assert!(
        statuses.iter().all(|s| [201, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&201), "{statuses:?}");
    assert!(quiet_created > 0);
    assert_eq!(gw.state.bodies.used(), 0, "every reservation is released");
    gw.stop().await;
}

#[tokio::test]
async fn compressed_bodies_are_read_whole_or_refused() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let url = format!("{}/v1/calls", gw.base());
    let one = serde_json::to_vec(&payloads::complete(company, "GZ-1")).unwrap();
    let two = serde_json::to_vec(&payloads::complete(company, "GZ-2")).unwrap();

    // gzip(record1) + gzip(record2): both members are read, which is not one JSON value.
    let mut members = payloads::compress("gzip", &one);
    members.extend(payloads::compress("gzip", &two));
    let (s, body) = post_raw(&gw.http, &url, &key, Some("gzip"), members).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Malformed JSON"),
        "{body}"
    );
    // Garbage after a complete frame or stream.
    for encoding in ["gzip", "deflate", "zstd"] {
        let mut data = payloads::compress(encoding, &one);
        data.extend(b"trailing garbage");
        let (s, body) = post_raw(&gw.http, &url, &key, Some(encoding), data).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{encoding}: {body}");
    }
    // A zstd skippable frame before the record is read past.
    let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, b'm', b'e', b't', b'a'];
    skippable.extend(payloads::compress("zstd", &two));
    let (s, body) = post_raw(&gw.http, &url, &key, Some("zstd"), skippable).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // Nothing refused reached the stream: the one record stored is the skippable-frame
    // one, seen after a later sentinel (one worker, stream order).
    assert_only_these_are_stored(&gw, &db, &key, company, &["GZ-2"]).await;
    worker.stop().await;
}

#[tokio::test]
async fn the_batch_route_refuses_an_idempotency_key_and_publishes_nothing() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    // Idempotency-Key on the batch route: 400, and nothing of the batch is published.
    let resp = gw
        .http
        .post(format!("{}/v1/calls/batch", gw.base()))
        .header("x-api-key", &key)
        .header("idempotency-key", "batch-1")
        .json(&json!({"calls": [payloads::minimal(company)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["details"][0]["field"], "Idempotency-Key", "{body}");

    assert_only_these_are_stored(&gw, &db, &key, company, &[]).await;
    worker.stop().await;
}

/// Posts a sentinel record, waits until it is stored, then checks that the rows are
/// exactly `external_ids` and the sentinel: what was refused before it never got in.
async fn assert_only_these_are_stored(
    gw: &TestGateway,
    db: &TestDb,
    key: &str,
    company: Uuid,
    external_ids: &[&str],
) {
    let (s, body) = gw
        .post_call(key, &payloads::complete(company, "SENTINEL"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let mut want: Vec<String> = external_ids.iter().map(|s| (*s).to_owned()).collect();
    want.push("SENTINEL".into());
    want.sort();
    callcap_tests::eventually(Duration::from_secs(20), "the sentinel record", || async {
        let mut got: Vec<String> = sqlx::query_scalar("SELECT external_call_id FROM call_history")
            .fetch_all(&db.pool)
            .await
            .ok()?;
        got.sort();
        got.contains(&"SENTINEL".to_owned()).then_some(got)
    })
    .await
    .into_iter()
    .zip(want.iter())
    .for_each(|(got, want)| assert_eq!(&got, want));
    assert_eq!(db.count_calls().await as usize, want.len());
}

/// Sends `GET /healthz` with `count` header fields in all (Host included); the status line.
async fn get_with_headers(addr: &str, count: usize) -> String {
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 2..count {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout() {
    let stack = Stack::new().backend().await;
    let (_gw, base) = stack
        .gateway_process(crate::GATEWAY_BIN, &[("HEADER_TIMEOUT_MS", "1000".into())])
        .await;
    let addr = base.trim_start_matches("http://").to_owned();

    // One byte every 100 ms: before the fix, closed after 11-16 s with 5 s configured.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let head = b"POST /v1/calls HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut closed = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            closed = Some(started.elapsed());
            break;
        }
    }
    let closed = match closed {
        Some(t) => t,
        None => {
            callcap_tests::closed_within(&mut slow, Duration::from_secs(3))
                .await
                .expect("closed")
                + started.elapsed()
        }
    };
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_millis(1800),
        "a dripping head was closed after {closed:?} with HEADER_TIMEOUT_MS=1000"
    );
}

/// The worker's `/readyz` text, once it answers.
async fn worker_readyz(port: u16) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}/readyz");
    callcap_tests::eventually(Duration::from_secs(20), "the worker's /readyz", || {
        let url = url.clone();
        async move {
            let resp = reqwest::get(&url).await.ok()?;
            Some((resp.status().as_u16(), resp.text().await.ok()?))
        }
    })
    .await
}

#[tokio::test]
async fn a_worker_repairs_its_consumer_when_its_own_identity_changes_or_deletes_it() {
    use async_nats::jetstream::{self, consumer::pull};
    use callcap::config::Role;
    let Stored {
        nats,
        db,
        gw,
        company,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    let port = callcap_tests::free_port();
    let _worker = workers.process(
        crate::WORKER_BIN,
        port,
        &[("CONSUMER_CHECK_SECS", "1".into())],
    );
    let mut posted = 0i64;
    let mut post = |n: usize, tag: &'static str| {
        posted += n as i64;
        let (gw, key) = (&gw, key.clone());
        async move {
            for i in 0..n {
                let (s, body) = gw
                    .post_call(&key, &payloads::complete(company, &format!("{tag}-{i}")))
                    .await;
                assert_eq!(s, StatusCode::CREATED, "{body}");
            }
        }
    };
    post(5, "before").await;
    let stored = |n: i64| {
        let db = &db;
        async move {
            callcap_tests::eventually(Duration::from_secs(30), "every 201 stored", || async {
                (db.count_calls().await == n).then_some(())
            })
            .await
        }
    };
    stored(5).await;
    assert_eq!(worker_readyz(port).await.0, 200);

    // What the probe did, as the worker's own identity: point the consumer's filter at a
    // company that does not exist. Every later record was silently skipped.
    let as_worker = callcap_tests::identities::connect_as(&nats.url(), Role::Worker).await;
    let stream = jetstream::new(as_worker)
        .get_stream(callcap::subjects::STREAM_NAME)
        .await
        .unwrap();
    let on_server = stream
        .consumer_info(callcap::subjects::CONSUMER_NAME)
        .await
        .unwrap()
        .config;
    let tampered = pull::Config {
        durable_name: on_server.durable_name.clone(),
        description: on_server.description.clone(),
        ack_policy: on_server.ack_policy,
        ack_wait: on_server.ack_wait,
        max_deliver: on_server.max_deliver,
        backoff: on_server.backoff.clone(),
        max_ack_pending: on_server.max_ack_pending,
        max_waiting: on_server.max_waiting,
        filter_subject: callcap::subjects::ingest_subject(Uuid::new_v4()),
        ..Default::default()
    };
    stream
        .create_consumer(tampered)
        .await
        .expect("the worker identity may update its consumer");
    post(20, "tampered").await;
    stored(25).await;
    let repaired = stream
        .consumer_info(callcap::subjects::CONSUMER_NAME)
        .await
        .unwrap()
        .config;
    assert_eq!(
        repaired.filter_subject,
        callcap::subjects::Lane::Main.filter(),
        "the filter is the defined one again"
    );

    // Deleted: recreated, and what was posted meanwhile is stored.
    stream
        .delete_consumer(callcap::subjects::CONSUMER_NAME)
        .await
        .unwrap();
    post(10, "deleted").await;
    stored(35).await;
    let (status, text) = worker_readyz(port).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("consumer: ok"), "{text}");
    let repairs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("consumer repairs: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(repairs >= 2, "{text}");

    // Exactly once: every record stored, none twice, no dead letter.
    assert_eq!(db.count_calls().await, posted);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
}

#[tokio::test]
async fn a_hundred_header_fields_are_taken_and_the_101st_is_431_saying_so() {
    let stack = Stack::new().backend().await;
    let (_gw, base) = stack.gateway_process(crate::GATEWAY_BIN, &[]).await;
    let addr = base.trim_start_matches("http://").to_owned();
    // SECURITY.md: 100 header fields are taken, the 101st is 431 saying so.
    let answer = get_with_headers(&addr, 100).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = get_with_headers(&addr, 101).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.contains("request has 101 header fields; at most 100 are allowed"),
        "{answer}"
    );
}
