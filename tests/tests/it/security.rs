//! The data plane locked: NATS identities and what each is refused, a worker that trusts
//! nothing it reads, the input holes a hostile probe found, HTTPS and TLS to NATS and
//! Postgres. Each test here failed before the change it covers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use callcap::config::Role;
use callcap::subjects::{ingest_subject, CONNECTORS_BUCKET, KEYS_BUCKET, STREAM_NAME};
use callcap::{CallRecord, Envelope};
use callcap_tests::identities::identities;
use callcap_tests::nats::NatsServer;
use callcap_tests::payloads;
use callcap_tests::pipeline::Process;
use callcap_tests::stack::{Backend, Edge, Pipeline, Stack, Stored};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// A connection as `role` that records the server's permission refusals.
async fn connect_watching(url: &str, role: Role) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let seen = refusals.clone();
    let seed = callcap::config::read_seed(&identities().of(role).seed_file).unwrap();
    let client = async_nats::ConnectOptions::with_nkey(seed)
        .custom_inbox_prefix(role.inbox_prefix())
        .request_timeout(Some(Duration::from_millis(700)))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting as {role:?}: {e}"));
    (client, refusals)
}

/// Waits until the server has refused something on `subject` for this connection.
async fn assert_refused(refusals: &Arc<Mutex<Vec<String>>>, subject: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let hit = refusals
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(subject));
        if hit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no permission violation for {subject}; server said {:?}",
            refusals.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_nats_identity_can_do_its_job_and_is_refused_the_rest() {
    // The pipeline's own objects, as a gateway and a worker create them.
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Stack::new().edge().await;
    let url = nats.url();
    let (status, _) = gw.post_call(&key, &payloads::minimal(company)).await;
    assert_eq!(status, StatusCode::CREATED);

    // No credentials, or a key the server does not know: not even a connection.
    assert!(
        async_nats::connect(&url).await.is_err(),
        "an anonymous client connected"
    );
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    assert!(
        async_nats::ConnectOptions::with_nkey(stranger)
            .connect(&url)
            .await
            .is_err(),
        "an unknown nkey connected"
    );

    // The gateway: publishes records and reads the key bucket...
    let (gateway, refused) = connect_watching(&url, Role::Gateway).await;
    let js = jetstream::new(gateway.clone());
    let forged = Envelope::new(
        Uuid::now_v7(),
        chrono::Utc::now(),
        "kgw".into(),
        None,
        CallRecord::new(company),
    );
    js.publish(ingest_subject(company), forged.encode().into())
        .await
        .unwrap()
        .await
        .expect("the gateway identity publishes records");
    js.get_key_value(KEYS_BUCKET)
        .await
        .expect("the gateway identity reads the key bucket");
    // ... and nothing else: no key writes, no reading records, no stream changes, no
    // snooping on another identity's replies.
    gateway
        .publish(format!("$KV.{KEYS_BUCKET}.kforged"), "{}".into())
        .await
        .unwrap();
    assert_refused(
        &refused,
        &format!("$KV.{KEYS_BUCKET}.kforged"),
        "gateway writing a key",
    )
    .await;
    gateway
        .publish(format!("$KV.{CONNECTORS_BUCKET}.cforged"), "{}".into())
        .await
        .unwrap();
    assert_refused(
        &refused,
        &format!("$KV.{CONNECTORS_BUCKET}.cforged"),
        "gateway writing a connector",
    )
    .await;
    let _ = gateway.subscribe("calls.>").await;
    assert_refused(&refused, "calls.>", "gateway reading records").await;
    let _ = gateway.subscribe("_INBOX.admin.>").await;
    assert_refused(
        &refused,
        "_INBOX.admin.>",
        "gateway reading the admin's replies",
    )
    .await;
    for api in [
        "STREAM.PURGE.CALLS",
        "STREAM.DELETE.CALLS",
        "STREAM.UPDATE.CALLS",
        "CONSUMER.CREATE.CALLS.thief",
    ] {
        let subject = format!("$JS.API.{api}");
        let _ = gateway.request(subject.clone(), "{}".into()).await;
        assert_refused(&refused, &subject, "gateway using the stream API").await;
    }
    gateway
        .publish("calls.ingest.a.b", "x".into())
        .await
        .unwrap();
    assert_refused(
        &refused,
        "calls.ingest.a.b",
        "gateway publishing outside calls.ingest.*",
    )
    .await;

    // The worker: consumes (every worker test shows it) and nothing else.
    let (worker, refused) = connect_watching(&url, Role::Worker).await;
    worker
        .publish(ingest_subject(company), forged.encode().into())
        .await
        .unwrap();
    assert_refused(
        &refused,
        &ingest_subject(company),
        "worker publishing a record",
    )
    .await;
    for api in [
        format!("STREAM.INFO.KV_{KEYS_BUCKET}"),
        format!("DIRECT.GET.KV_{KEYS_BUCKET}"),
        "STREAM.PURGE.CALLS".to_owned(),
        "STREAM.DELETE.CALLS".to_owned(),
        "CONSUMER.CREATE.CALLS.thief".to_owned(),
        "CONSUMER.DELETE.CALLS.thief".to_owned(),
        // Its own consumers' names are allowed on any stream (partition streams are named
        // at run time), but never on the key bucket.
        format!("CONSUMER.CREATE.KV_{KEYS_BUCKET}.persist-worker"),
        format!("CONSUMER.DURABLE.CREATE.KV_{KEYS_BUCKET}.persist-worker-overflow"),
        format!("CONSUMER.MSG.NEXT.KV_{KEYS_BUCKET}.persist-worker"),
        format!("CONSUMER.INFO.KV_{KEYS_BUCKET}.persist-worker"),
        // Nor on the connector bucket (sealed provider secrets).
        format!("STREAM.INFO.KV_{CONNECTORS_BUCKET}"),
        format!("DIRECT.GET.KV_{CONNECTORS_BUCKET}"),
        format!("CONSUMER.CREATE.KV_{CONNECTORS_BUCKET}.persist-worker"),
        format!("CONSUMER.MSG.NEXT.KV_{CONNECTORS_BUCKET}.persist-worker"),
        // It deletes erased records' messages from the record streams, never a bucket's.
        format!("STREAM.MSG.DELETE.KV_{KEYS_BUCKET}"),
        format!("STREAM.MSG.DELETE.KV_{CONNECTORS_BUCKET}"),
    ] {
        let subject = format!("$JS.API.{api}");
        let _ = worker.request(subject.clone(), "{}".into()).await;
        assert_refused(&refused, &subject, "worker using the API").await;
    }

    // None of it had an effect: the admin sees the stream whole and no forged key.
    let admin = callcap_tests::identities::connect(&url).await;
    let admin_js = jetstream::new(admin);
    let mut stream = admin_js.get_stream(STREAM_NAME).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let kv = admin_js.get_key_value(KEYS_BUCKET).await.unwrap();
    assert!(kv.get("kforged").await.unwrap().is_none());
}

/// Publishes `envelope` on `subject` as someone who got write access to the stream.
async fn inject(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_owned(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_worker_dead_letters_what_the_gateway_would_not_have_published() {
    let Stored {
        nats,
        db,
        gw,
        company: a,
        key,
        workers,
        ..
    } = Stack::new().stored().await;
    // Another company, without a key: the records forged for it must not be stored.
    let b = Uuid::new_v4();
    // Two genuine calls of company A: one with an external id, one without.
    let (s, body) = gw.post_call(&key, &payloads::complete(a, "A-1")).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let with_ext: Uuid = body["data"]["call_history_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (s, body) = gw.post_call(&key, &payloads::minimal(a)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let anonymous: Uuid = body["data"]["call_history_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let worker = workers.start().await;
    callcap_tests::eventually(Duration::from_secs(20), "A's two rows", || async {
        (db.count_calls().await == 2).then_some(())
    })
    .await;
    let before = db.dump_calls().await;

    let js = jetstream::new(callcap_tests::identities::connect(&nats.url()).await);
    let genuine = |record: CallRecord, id: Uuid| {
        Envelope::new(id, chrono::Utc::now(), "kforged".into(), None, record)
    };
    // 1. A's record on B's subject.
    let mut r = CallRecord::new(a);
    r.notes = Some("wrong subject".into());
    inject(
        &js,
        &ingest_subject(b),
        genuine(r.clone(), Uuid::now_v7()).encode(),
    )
    .await;
    // 2. A subject that is no company at all.
    inject(
        &js,
        "calls.ingest.not-a-uuid",
        genuine(r, Uuid::now_v7()).encode(),
    )
    .await;
    // 3. B's record claiming A's external-id row.
    let mut r = CallRecord::new(b);
    r.external_call_id = Some("B-1".into());
    r.notes = Some("takeover by id".into());
    inject(&js, &ingest_subject(b), genuine(r, with_ext).encode()).await;
    // 4. B's record reusing the id of A's anonymous row (a v7 id is not derived, so only
    //    the database can tell it belongs to A).
    let mut r = CallRecord::new(b);
    r.notes = Some("takeover of an anonymous row".into());
    inject(&js, &ingest_subject(b), genuine(r, anonymous).encode()).await;
    // 5. A record the gateway would refuse (negative duration).
    let mut r = CallRecord::new(b);
    r.duration_seconds = Some(-1);
    inject(&js, &ingest_subject(b), genuine(r, Uuid::now_v7()).encode()).await;

    let mut dead =
        callcap_tests::eventually(Duration::from_secs(20), "five dead letters", || async {
            let rows = persist_worker::store::dead_letters(&db.pool, true, 100)
                .await
                .unwrap();
            (rows.len() == 5).then_some(rows)
        })
        .await;
    dead.sort_by_key(|d| d.stream_seq);
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(reasons[0].contains("subject"), "{reasons:?}");
    assert!(reasons[1].contains("subject"), "{reasons:?}");
    assert!(
        reasons[2].contains("not the id the gateway derives"),
        "{reasons:?}"
    );
    assert!(
        reasons[3].contains("belongs to another company"),
        "{reasons:?}"
    );
    assert!(reasons[4].contains("duration_seconds"), "{reasons:?}");
    // A's rows are as they were, and B got nothing.
    assert_eq!(db.dump_calls().await, before);
    worker.stop().await;
}

/// The stack with the gateway binary as a process (its Prometheus recorder is global, so
/// `/metrics` needs a process of its own), ready, with `env` added.
async fn gateway_process(env: &[(&str, String)]) -> (Backend, Process, String) {
    let stack = Stack::new().backend().await;
    let (gw, base) = stack.gateway_process(crate::GATEWAY_BIN, env).await;
    (stack, gw, base)
}

/// `{"a":{"a":…{}}}`, `levels` deep.
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
}

#[tokio::test]
async fn what_the_gateway_accepts_the_worker_stores_and_the_probes_holes_are_closed() {
    let Pipeline {
        nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let post = |body: Value| {
        let gw = &gw;
        let key = key.clone();
        async move { gw.post_call(&key, &body).await }
    };

    // call_details just under the JSON parser's limit got 201 and could never be decoded
    // by the worker; the one nesting limit now refuses it, and the deepest accepted
    // record is stored.
    let mut deep = payloads::minimal(company);
    deep["call_details"] = nested(120);
    let (s, body) = post(deep).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["details"][0]["field"], "call_details", "{body}");
    let mut deepest = payloads::complete(company, "DEEPEST");
    deepest["call_details"] = nested(callcap::validate::MAX_CALL_DETAILS_DEPTH);
    let (s, body) = post(deepest).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // Two calls sharing one id: the separator cannot be in an identity part any more.
    let (s, _) =
        post(json!({"company_id": company, "external_system": "sysA", "external_call_id": "X"}))
            .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, body) = post(
        json!({"company_id": company, "external_system": "sysA\u{1f}X", "external_call_id": "Y"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, body) = post(
        json!({"company_id": company, "external_system": "sysA", "external_call_id": "X\u{1f}Y"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");

    // recording_url with CR LF inside is refused; a valid one is stored as validated.
    let mut crlf = payloads::minimal(company);
    crlf["recording_url"] = json!("https://rec.example.com/a\r\nX-Injected: 1");
    let (s, body) = post(crlf).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let mut url = payloads::complete(company, "URL-1");
    url["recording_url"] = json!("HTTPS://Rec.Example.com/a b.mp3");
    let (s, body) = post(url).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // Everything accepted is stored, and nothing was dead-lettered.
    callcap_tests::eventually(
        Duration::from_secs(20),
        "the accepted records stored",
        || async { (db.count_calls().await == 3).then_some(()) },
    )
    .await;
    let stored: String = sqlx::query_scalar(
        "SELECT recording_url FROM call_history WHERE external_call_id = 'URL-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, "https://rec.example.com/a%20b.mp3");
    let dead = persist_worker::store::dead_letters(&db.pool, true, 10)
        .await
        .unwrap();
    assert!(
        dead.is_empty(),
        "{:?}",
        dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
    worker.stop().await;

    // An unbounded x-request-id is not copied anywhere: the answer and the stream carry
    // a generated one.
    let long_id = "r".repeat(4096);
    let resp = gw
        .http
        .post(format!("{}/v1/calls", gw.base()))
        .header("x-api-key", &key)
        .header("x-request-id", &long_id)
        .json(&payloads::complete(company, "RID-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let answered = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(Uuid::parse_str(&answered).is_ok(), "{answered}");
    let envelopes = callcap_tests::nats::stream_envelopes(&nats.url()).await;
    let (_, last) = envelopes.last().unwrap();
    assert_eq!(last.request_id.as_deref(), Some(answered.as_str()));
}

#[tokio::test]
async fn http_layer_refusals_have_the_json_shape() {
    let (_stack, _gw, base) = gateway_process(&[]).await;
    let http = reqwest::Client::new();

    // 414 and 431 answered by the router: the API's JSON body and a request id.
    for (what, req, status) in [
        (
            "a long URI",
            http.get(format!("{base}/v1/calls?{}", "q".repeat(9 * 1024))),
            StatusCode::URI_TOO_LONG,
        ),
        (
            "large headers",
            http.get(format!("{base}/healthz"))
                .header("x-filler", "h".repeat(40 * 1024)),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status, "{what}");
        assert!(
            resp.headers().contains_key("x-request-id"),
            "{what}: no x-request-id"
        );
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            body["error"],
            status.canonical_reason().unwrap(),
            "{what}: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
}

#[tokio::test]
async fn made_up_methods_do_not_grow_the_metrics_and_refusals_are_counted_by_reason() {
    let (_stack, _gw, base) = gateway_process(&[]).await;
    let http = reqwest::Client::new();
    // Made-up methods (no key needed) do not grow /metrics.
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("PROBE{i}").as_bytes()).unwrap();
        let _ = http
            .request(method, format!("{base}/v1/calls"))
            .send()
            .await
            .unwrap();
    }
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("PROBE"), "a made-up method became a label");
    assert!(
        text.contains("method=\"OTHER\""),
        "made-up methods are counted as OTHER"
    );
    // Every metric has its help text, and refusals are counted by reason.
    assert!(text.contains("# HELP gateway_refused_total"), "{text}");
    assert!(
        text.contains("gateway_refused_total{reason=\"method_not_allowed\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn an_out_of_range_cli_argument_is_a_usage_error_not_a_panic() {
    let Backend { nats, .. } = Stack::new().companies(0).backend().await;
    let out = tokio::process::Command::new(crate::GATEWAY_BIN)
        .args([
            "keys",
            "create",
            "--company",
            &Uuid::new_v4().to_string(),
            "--name",
            "x",
            "--expires-in-days",
            "100000000",
        ])
        .env("NATS_URL", nats.url())
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("expires-in-days"));
}

#[tokio::test]
async fn a_gateway_that_has_not_loaded_its_keys_answers_503_not_401() {
    use ingest_gateway::app::AppState;
    let Edge {
        gw: loaded,
        company,
        key,
        ..
    } = Stack::new().edge().await;
    let cli = callcap_tests::pipeline::gateway_cli(&loaded.nats_url, Default::default());
    let loaded = loaded.state;
    // The same gateway at the moment before its key watch has read the bucket.
    let starting = AppState::new(
        loaded.publisher.clone(),
        Arc::new(ingest_gateway::auth::KeyCache::default()),
        cli.serve.clone(),
        None,
        "always".into(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(ingest_gateway::server::run(
        listener,
        starting,
        None,
        callcap::shutdown::Shutdown::new(),
    ));
    for path in [
        "/v1/calls",
        "/functions/v1/webhook-call-capture",
        "/v1/calls/batch",
    ] {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .header("x-api-key", &key)
            .json(&payloads::minimal(company))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(resp.headers().contains_key("retry-after"), "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "Service Unavailable");
    }
    server.abort();
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_and_a_flood_is_capped() {
    let (_stack, _gw, base) = gateway_process(&[
        ("HEADER_TIMEOUT_MS", "1000".into()),
        ("IDLE_TIMEOUT_SECS", "2".into()),
        ("MAX_CONNECTIONS", "24".into()),
    ])
    .await;
    let addr = base.trim_start_matches("http://").to_owned();

    // Sockets that never send a byte are closed after the header timeout.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    for conn in &mut silent {
        let t = callcap_tests::closed_within(conn, Duration::from_secs(5)).await;
        assert!(t.is_some(), "a silent connection stayed open");
    }

    // HTTP/1 keep-alive: closed once idle for IDLE_TIMEOUT_SECS after its last answer.
    let mut h1 = TcpStream::connect(&addr).await.unwrap();
    h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t = callcap_tests::closed_within(&mut h1, Duration::from_secs(6))
        .await
        .expect("idle HTTP/1 closed");
    assert!(
        t >= Duration::from_millis(1900),
        "closed after {t:?}, before the idle timeout"
    );

    // HTTP/2 (prior knowledge): idle after the handshake, closed likewise (GOAWAY, close).
    let mut h2 = TcpStream::connect(&addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let t = callcap_tests::closed_within(&mut h2, Duration::from_secs(8))
        .await
        .expect("idle HTTP/2 closed");
    assert!(t < Duration::from_secs(7), "{t:?}");

    // A flood: beyond MAX_CONNECTIONS, a new connection is closed at once, and the
    // gateway is whole again once the flood's sockets time out.
    let mut flood = Vec::new();
    for _ in 0..24 {
        flood.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let t = callcap_tests::closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("the extra connection is closed");
    assert!(
        t < Duration::from_millis(800),
        "closed after {t:?}: not refused, timed out"
    );
    drop(flood);
    let http = reqwest::Client::new();
    let text = callcap_tests::eventually(
        Duration::from_secs(10),
        "the gateway to answer again",
        || async {
            http.get(format!("{base}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()
        },
    )
    .await;
    let counter = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        counter("gateway_connections_refused_total") >= 1.0,
        "{text}"
    );
    assert!(
        counter("gateway_connections_timed_out_total") >= 12.0,
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_status_the_routes_answer() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Stack::new()
        .serve(ingest_gateway::config::ServeArgs {
            max_body_bytes: 4096,
            max_batch_bytes: 8192,
            ..Default::default()
        })
        .edge()
        .await;
    let doc: Value = gw.get_json("/openapi.json").await.1;
    let big = json!({"company_id": company, "notes": "n".repeat(9000)});
    for path in [
        "/v1/calls",
        "/functions/v1/webhook-call-capture",
        "/v1/calls/batch",
    ] {
        let batch = path.ends_with("batch");
        let wrap = |v: Value| if batch { json!({ "calls": [v] }) } else { v };
        let url = format!("{}{path}", gw.base());
        let mut answered = Vec::new();
        let cases = [
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .json(&wrap(payloads::minimal(company))),
            gw.http.post(&url).json(&wrap(payloads::minimal(company))),
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .header("content-type", "text/plain")
                .body("{}"),
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .header("content-type", "application/json")
                .body("{not json"),
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .json(&wrap(payloads::minimal(Uuid::new_v4()))),
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .json(&wrap(big.clone())),
            gw.http
                .post(&url)
                .header("x-api-key", &key)
                .json(&wrap(json!({"company_id": "nope"}))),
        ];
        for req in cases {
            answered.push(req.send().await.unwrap().status().as_u16());
        }
        let documented = doc["paths"][path]["post"]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} is not documented"));
        for status in answered {
            assert!(
                documented.contains_key(&status.to_string()),
                "{path} answered {status}, which /openapi.json does not list"
            );
        }
    }
    // Unknown fields are accepted (the API document's clients send more than it lists),
    // so the schema must not forbid them.
    let record = &doc["components"]["schemas"]["CallRecord"];
    assert_ne!(record["additionalProperties"], json!(false), "{record}");
}

/// One HTTPS request over a fresh connection trusting `ca`: the status line and the
/// server's certificate.
async fn https_get(ca: &callcap_tests::tls::TestCa, addr: &str, path: &str) -> (String, Vec<u8>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config(&[b"http/1.1"])));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    (text.lines().next().unwrap_or_default().to_owned(), cert)
}

#[tokio::test]
async fn the_gateway_serves_https_and_picks_up_a_renewed_certificate_without_restarting() {
    let Backend { nats, dir, .. } = Stack::new().backend().await;
    let ca = callcap_tests::tls::TestCa::new(dir.path());
    let first = ca.issue(dir.path(), "gateway");
    let port = callcap_tests::free_port();
    let _gw = Process::gateway(
        crate::GATEWAY_BIN,
        &nats.url(),
        port,
        &[
            ("TLS_CERT_FILE", first.cert_file.display().to_string()),
            ("TLS_KEY_FILE", first.key_file.display().to_string()),
            ("TLS_RELOAD_SECS", "1".into()),
        ],
    );
    let addr = format!("127.0.0.1:{port}");
    let (status, served) =
        callcap_tests::eventually(Duration::from_secs(20), "HTTPS answers", || async {
            let tcp_ok = TcpStream::connect(&addr).await.is_ok();
            if !tcp_ok {
                return None;
            }
            let (status, cert) = https_get(&ca, &addr, "/readyz").await;
            status.contains("200").then_some((status, cert))
        })
        .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(served, first.der);

    // Plain HTTP on the HTTPS port gets no answer in the clear.
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "served plain HTTP"
    );

    // The certificate is renewed on disk: new connections get it, no restart.
    let renewed = ca.issue(dir.path(), "gateway");
    let served = callcap_tests::eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async {
            let (_, cert) = https_get(&ca, &addr, "/healthz").await;
            (cert == renewed.der).then_some(cert)
        },
    )
    .await;
    assert_ne!(served, first.der);

    // A renewal that cannot be read keeps the previous certificate in service.
    std::fs::write(&renewed.key_file, "not a key").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, cert) = https_get(&ca, &addr, "/healthz").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(cert, renewed.der);
}

#[tokio::test]
async fn records_flow_over_tls_to_nats_and_to_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let ca = callcap_tests::tls::TestCa::new(dir.path());
    let leaf = ca.issue(dir.path(), "nats");
    // A broker that requires TLS of every client.
    let mut nats = NatsServer::prepare(callcap_tests::nats::NatsConfig::Strict, Vec::new())
        .with_args(&[
            "--tls",
            "--tlscert",
            leaf.cert_file.to_str().unwrap(),
            "--tlskey",
            leaf.key_file.to_str().unwrap(),
        ]);
    nats.spawn();
    let health = format!("{}/healthz?js-enabled-only=true", nats.monitor_url());
    callcap_tests::eventually(Duration::from_secs(20), "the TLS nats-server", || async {
        let r = reqwest::get(&health).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let ca_env = ("NATS_TLS_CA_FILE", ca.pem_file.display().to_string());
    // The stack's keys are made without the CA: none here (the test makes its own).
    let Backend {
        nats, db, company, ..
    } = Stack::new().nats_server(nats).companies(0).backend().await;

    // Without the CA the admin CLI cannot connect (the server's certificate is not
    // trusted); with it, it can.
    let keys_create = |with_ca: bool| {
        let mut cmd = tokio::process::Command::new(crate::GATEWAY_BIN);
        cmd.args([
            "keys",
            "create",
            "--company",
            &company.to_string(),
            "--name",
            "tls",
        ])
        .env("NATS_URL", nats.url())
        .env(
            "NATS_NKEY_FILE",
            callcap_tests::pipeline::seed_path(Role::Admin),
        );
        if with_ca {
            cmd.env(ca_env.0, &ca_env.1);
        }
        cmd.output()
    };
    let refused = keys_create(false).await.unwrap();
    assert!(
        !refused.status.success(),
        "connected without trusting the server"
    );
    let created = keys_create(true).await.unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8(created.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();

    // Gateway and worker over TLS to NATS, the worker over TLS to Postgres.
    let tls_on: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        tls_on, "on",
        "this test needs a Postgres with ssl = on (Debian's default)"
    );
    let db_tls = format!("{}?sslmode=require", db.url);
    let (_gw, base) = Process::gateway_ready(
        crate::GATEWAY_BIN,
        &nats.url(),
        std::slice::from_ref(&ca_env),
    )
    .await;
    let _worker = Process::worker(
        crate::WORKER_BIN,
        &nats.url(),
        &db_tls,
        callcap_tests::free_port(),
        std::slice::from_ref(&ca_env),
    );
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/calls"))
        .header("x-api-key", &key)
        .json(&payloads::complete(company, "TLS-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    callcap_tests::eventually(Duration::from_secs(20), "the record stored", || async {
        (db.count_calls().await == 1).then_some(())
    })
    .await;
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND s.ssl AND a.pid <> pg_backend_pid()",
    )
    .bind(&db.name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        encrypted >= 1,
        "the worker's Postgres connections are not encrypted"
    );
}
