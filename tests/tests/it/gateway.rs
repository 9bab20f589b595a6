//! The gateway against the API document: examples, validation, auth, errors, NATS outage.

use std::time::{Duration, Instant};

use callcap_tests::payloads;
use callcap_tests::pipeline::TestGateway;
use callcap_tests::stack::{Backend, Edge, Stack};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

fn assert_created(status: StatusCode, body: &Value) -> Uuid {
    assert_eq!(status, StatusCode::CREATED, "body: {body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["message"], "Call record created successfully");
    let created_at = body["data"]["created_at"]
        .as_str()
        .expect("created_at is a string");
    assert!(
        created_at.ends_with('Z') && created_at.len() == 24,
        "created_at {created_at}"
    );
    body["data"]["call_history_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .expect("call_history_id is a UUID")
}

#[tokio::test]
async fn every_example_of_the_api_document_is_accepted_on_both_paths() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let examples = [
        payloads::quick_start(company),
        payloads::minimal(company),
        payloads::complete(company, "CALL-12345"),
        payloads::python(company),
        payloads::php(company),
        payloads::testing(company),
    ];
    for path in ["/v1/calls", "/functions/v1/webhook-call-capture"] {
        for body in &examples {
            let (status, _, resp) = gw.post(path, &key, body).await;
            assert_created(status, &resp);
        }
    }
}

#[tokio::test]
async fn a_retry_gets_the_same_id_and_anonymous_records_do_not() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;

    let body = payloads::complete(company, "CALL-RETRY");
    let (s1, b1) = gw.post_call(&key, &body).await;
    let (s2, b2) = gw.post_call(&key, &body).await;
    assert_eq!(assert_created(s1, &b1), assert_created(s2, &b2));

    let (s1, b1) = gw.post_call(&key, &payloads::minimal(company)).await;
    let (s2, b2) = gw.post_call(&key, &payloads::minimal(company)).await;
    assert_ne!(assert_created(s1, &b1), assert_created(s2, &b2));

    // Idempotency-Key makes anonymous records retry-safe too.
    let send = |k: &'static str| {
        gw.http
            .post(format!("{}/v1/calls", gw.base()))
            .header("x-api-key", &key)
            .header("Idempotency-Key", k)
            .json(&payloads::minimal(company))
            .send()
    };
    let a: Value = send("idem-1").await.unwrap().json().await.unwrap();
    let b: Value = send("idem-1").await.unwrap().json().await.unwrap();
    assert_eq!(a["data"]["call_history_id"], b["data"]["call_history_id"]);
}

#[tokio::test]
async fn each_validation_rule_answers_400_naming_the_field() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;

    let (status, body) = gw.post_call(&key, &json!({"caller_number": "+1"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "Bad Request");
    assert_eq!(body["message"], "company_id is required");

    let c = company.to_string();
    let cases: Vec<(&str, Value)> = vec![
        ("company_id", json!({"company_id": "your-company-uuid"})),
        (
            "lead_id",
            json!({"company_id": c, "lead_id": "lead-uuid-if-available"}),
        ),
        ("employee_id", json!({"company_id": c, "employee_id": 12})),
        ("outcome", json!({"company_id": c, "outcome": "voicemail"})),
        (
            "call_status",
            json!({"company_id": c, "call_status": "done"}),
        ),
        (
            "duration_seconds",
            json!({"company_id": c, "duration_seconds": -1}),
        ),
        (
            "duration_seconds",
            json!({"company_id": c, "duration_seconds": 12.5}),
        ),
        (
            "call_date",
            json!({"company_id": c, "call_date": "25/11/2025"}),
        ),
        (
            "start_time",
            json!({"company_id": c, "start_time": "2025-11-25T10:30:00"}),
        ),
        (
            "end_time",
            json!({"company_id": c, "start_time": "2025-11-25T10:35:00Z", "end_time": "2025-11-25T10:30:00Z"}),
        ),
        (
            "next_follow_up",
            json!({"company_id": c, "next_follow_up": "2025-11-27T00:00:00Z"}),
        ),
        (
            "next_follow_up_time",
            json!({"company_id": c, "next_follow_up_time": "2pm"}),
        ),
        (
            "recording_url",
            json!({"company_id": c, "recording_url": "recordings/1.mp3"}),
        ),
        (
            "call_details",
            json!({"company_id": c, "call_details": "campaign=1"}),
        ),
        (
            "auto_call_followup",
            json!({"company_id": c, "auto_call_followup": "true"}),
        ),
        (
            "notes",
            json!({"company_id": c, "notes": "x".repeat(20_000)}),
        ),
    ];
    for (field, body) in cases {
        let (status, resp) = gw.post_call(&key, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {resp}");
        assert_eq!(resp["error"], "Bad Request");
        let message = resp["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field}: message {message:?}");
        assert_eq!(resp["details"][0]["field"], field, "{resp}");
    }
}

#[tokio::test]
async fn keys_are_checked_scoped_to_their_company_and_revocable() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let unauthorized = json!({"error": "Unauthorized", "message": "Invalid or missing API key"});

    let resp = gw
        .http
        .post(format!("{}/v1/calls", gw.base()))
        .json(&payloads::minimal(company))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap(), unauthorized);

    let (status, body) = gw
        .post_call("cc_live_not-a-real-key", &payloads::minimal(company))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, unauthorized);

    // A valid key, but another company's record.
    let (status, body) = gw.post_call(&key, &payloads::minimal(Uuid::new_v4())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "Forbidden");

    // Revoke through the admin path; the running gateway refuses the key within seconds.
    let cli = callcap_tests::pipeline::admin_cli(&nats.url());
    let store = ingest_gateway::cli::key_store(&cli).await.unwrap();
    let records = ingest_gateway::cli::keys::records(&store, Some(company))
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert!(!records[0].sha256.is_empty());
    let mut out = Vec::new();
    ingest_gateway::cli::keys::revoke(&store, &records[0].key_id, &mut out)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    callcap_tests::eventually(
        Duration::from_secs(3),
        "the revoke to reach the gateway",
        || async {
            let (s, _) = gw.post_call(&key, &payloads::minimal(company)).await;
            (s == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    assert!(revoked_at.elapsed() < Duration::from_secs(3));
    assert!(
        ingest_gateway::cli::keys::revoke(&store, &records[0].key_id, &mut out)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn protocol_errors_keep_the_json_error_shape() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    let url = format!("{}/v1/calls", gw.base());

    let send = |body: &'static str, ctype: &'static str| {
        gw.http
            .post(&url)
            .header("x-api-key", &key)
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let cases = [
        (
            send("{not json", "application/json").await.unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send("[1,2]", "application/json").await.unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send("\"hi\"", "application/json; charset=utf-8")
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            send("{}", "text/plain").await.unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (resp, expected) in cases {
        assert_eq!(resp.status(), expected);
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{body}"
        );
    }

    let big = format!(
        "{{\"company_id\":\"{company}\",\"notes\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let resp = gw
        .http
        .post(&url)
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "Payload Too Large"
    );

    let resp = gw
        .http
        .get(format!("{}/nope", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "Not Found");

    let resp = gw.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "Method Not Allowed"
    );

    // Every answer carries a request id for the logs.
    let resp = gw
        .http
        .get(format!("{}/healthz", gw.base()))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn nats_down_means_503_with_retry_after_then_recovery() {
    let serve = ServeArgs {
        publish_timeout_ms: 2_000,
        ..ServeArgs::default()
    };
    let Edge {
        mut nats,
        gw,
        company,
        key,
        ..
    } = Stack::new().serve(serve).edge().await;
    let (s, b) = gw.post_call(&key, &payloads::minimal(company)).await;
    assert_created(s, &b);

    nats.stop();
    let started = Instant::now();
    let (status, headers, body) = gw
        .post("/v1/calls", &key, &payloads::complete(company, "OUTAGE-1"))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "503 by the 2 s publish deadline, took {:?}",
        started.elapsed()
    );
    assert!(headers.contains_key("retry-after"));
    assert_eq!(body["error"], "Service Unavailable");
    let (ready, _) = gw.get("/readyz").await;
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE);

    nats.start_again().await;
    callcap_tests::eventually(
        Duration::from_secs(15),
        "the gateway to accept again",
        || async {
            let (s, _) = gw
                .post_call(&key, &payloads::complete(company, "OUTAGE-1"))
                .await;
            (s == StatusCode::CREATED).then_some(())
        },
    )
    .await;
    let (ready, _) = gw.get("/readyz").await;
    assert_eq!(ready, StatusCode::OK);
}

#[tokio::test]
async fn openapi_document_covers_every_route() {
    let Edge {
        nats: _nats, gw, ..
    } = Edge::start().await;
    let doc: Value = gw.get_json("/openapi.json").await.1;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/calls",
        "/functions/v1/webhook-call-capture",
        "/v1/calls/batch",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    let record = &doc["components"]["schemas"]["CallRecord"]["properties"];
    for field in [
        "company_id",
        "call_details",
        "next_follow_up_time",
        "auto_call_followup",
    ] {
        assert!(record[field].is_object(), "CallRecord lacks {field}");
    }
}

#[tokio::test]
async fn the_binary_serves_metrics_and_drains_on_sigterm() {
    let stack = Stack::new().backend().await;
    let (mut gw, base) = stack.gateway_process(crate::GATEWAY_BIN, &[]).await;
    let http = reqwest::Client::new();
    let (company, key) = (stack.company, stack.key.clone());
    callcap_tests::eventually(Duration::from_secs(5), "a 201 from the binary", || async {
        let r = http
            .post(format!("{base}/v1/calls"))
            .header("x-api-key", &key)
            .json(&payloads::minimal(company))
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::CREATED).then_some(())
    })
    .await;
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("gateway_requests_total"), "{text}");
    assert!(text.contains("route=\"/v1/calls\""), "{text}");
    assert!(text.contains("gateway_publish_duration_seconds"), "{text}");
    assert!(text.contains("gateway_request_duration_seconds"), "{text}");
    let status = gw.terminate().expect("gateway exit status");
    assert!(status.success(), "gateway exited with {status}");
}

#[tokio::test]
async fn keys_cli_prints_the_key_alone_on_the_last_line_of_stdout() {
    // The key is the CLI's to make: the stack makes none.
    let Backend { nats, company, .. } = Stack::new().companies(0).backend().await;
    let out = tokio::process::Command::new(crate::GATEWAY_BIN)
        .args([
            "keys",
            "create",
            "--company",
            &company.to_string(),
            "--name",
            "cli",
        ])
        .env("NATS_URL", nats.url())
        .env(
            "NATS_NKEY_FILE",
            callcap_tests::pipeline::seed_path(callcap::config::Role::Admin),
        )
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap();
    assert!(
        key.starts_with("cc_live_") && !key.contains(' '),
        "last line: {key:?}"
    );
    let gw = TestGateway::start(&nats.url()).await;
    callcap_tests::eventually(Duration::from_secs(5), "the CLI key to work", || async {
        let (s, _) = gw.post_call(key, &payloads::minimal(company)).await;
        (s == StatusCode::CREATED).then_some(())
    })
    .await;
    let list = tokio::process::Command::new(crate::GATEWAY_BIN)
        .args(["keys", "list", "--company", &company.to_string()])
        .env("NATS_URL", nats.url())
        .env(
            "NATS_NKEY_FILE",
            callcap_tests::pipeline::seed_path(callcap::config::Role::Admin),
        )
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(
        listing.contains("1 key(s)") && !listing.contains(key),
        "{listing}"
    );
}
