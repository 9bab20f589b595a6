//! Every status the record routes answer, through the real router, extractors and
//! handlers, with a scripted publisher instead of NATS: milliseconds per case. That the
//! pipeline really stores what gets 201 is the end-to-end tests' job (`tests/it`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::auth::{mint, KeyCache};
use crate::config::ServeArgs;
use crate::publish::scripted::ScriptedPublisher;
use crate::publish::{PublishError, Receipt};
use crate::state::AppState;

struct Harness {
    state: AppState,
    publisher: Arc<ScriptedPublisher>,
    key: String,
    company: Uuid,
}

fn harness_with(publisher: ScriptedPublisher, serve: ServeArgs) -> Harness {
    let publisher = Arc::new(publisher);
    let keys = Arc::new(KeyCache::default());
    let company = Uuid::new_v4();
    let minted = mint(company, "unit", None);
    keys.upsert(minted.record);
    keys.mark_loaded();
    let state = AppState::new(publisher.clone(), keys, serve, None, "always".into());
    Harness {
        state,
        publisher,
        key: minted.key,
        company,
    }
}

fn harness() -> Harness {
    harness_with(ScriptedPublisher::default(), ServeArgs::default())
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Answer {
        let resp = crate::app::app(self.state.clone())
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A POST with this harness's key and, unless `content_type` is `None`, that type.
    fn post(&self, path: &str, content_type: Option<&str>) -> axum::http::request::Builder {
        let req = Request::post(path).header("x-api-key", &self.key);
        match content_type {
            Some(t) => req.header(header::CONTENT_TYPE, t),
            None => req,
        }
    }

    async fn post_json(&self, path: &str, body: &Value) -> Answer {
        let req = self
            .post(path, Some("application/json"))
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(req).await
    }
}

#[tokio::test]
async fn a_valid_record_is_published_once_and_answered_201_with_the_documented_body() {
    let h = harness();
    let record = callcap::examples::complete(h.company, "CALL-1");
    for path in ["/v1/calls", "/functions/v1/webhook-call-capture"] {
        let a = h.post_json(path, &record).await;
        assert_eq!(a.status, StatusCode::CREATED, "{path}: {}", a.body);
        assert_eq!(a.body["success"], true);
        assert_eq!(a.body["message"], "Call record created successfully");
        assert!(a.body["data"]["created_at"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert!(a.headers.contains_key("x-request-id"));
    }
    let sent = h.publisher.records();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (sent[0].company, sent[0].lane),
        (h.company, callcap::subjects::Lane::Main)
    );
    // The same call twice: the same id, the same dedup id.
    assert_eq!(sent[0].msg_id, sent[1].msg_id);
}

#[tokio::test]
async fn refusals_carry_the_documented_status_and_message() {
    let h = harness();
    let a = h.post_json("/v1/calls", &json!({})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["message"], "company_id is required");
    assert_eq!(a.body["error"], "Bad Request");

    let a = h
        .send(
            Request::post("/v1/calls")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["message"], "Invalid or missing API key");

    let a = h
        .post_json("/v1/calls", &json!({"company_id": Uuid::new_v4()}))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    let a = h
        .send(
            h.post("/v1/calls", Some("text/plain"))
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let a = h
        .send(
            h.post("/v1/calls", Some("application/json"))
                .header(header::CONTENT_ENCODING, "br")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big = json!({"company_id": h.company, "notes": "x".repeat(70_000)});
    let a = h.post_json("/v1/calls", &big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);

    let a = h
        .send(
            h.post("/v1/calls", Some("application/json"))
                .body(Body::from("{\"company_id\":"))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body["message"]
        .as_str()
        .unwrap()
        .starts_with("Malformed JSON"));

    let a = h
        .send(Request::get("/nowhere").body(Body::empty()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = h
        .send(Request::get("/v1/calls").body(Body::empty()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        h.publisher.records().is_empty(),
        "nothing refused was published"
    );
}

#[tokio::test]
async fn a_publish_that_is_not_acknowledged_is_503_with_retry_after_never_201() {
    let h = harness_with(
        ScriptedPublisher::answering(|_| Err(PublishError::Timeout("no ack".into()))),
        ServeArgs::default(),
    );
    let a = h
        .post_json("/v1/calls", &callcap::examples::minimal(h.company))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers[header::RETRY_AFTER], "1");

    // Too large for the server: 413, not retryable.
    let h = harness_with(
        ScriptedPublisher::answering(|_| Err(PublishError::TooLarge)),
        ServeArgs::default(),
    );
    let a = h
        .post_json("/v1/calls", &callcap::examples::minimal(h.company))
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn before_the_keys_are_loaded_the_answer_is_503_not_401() {
    let publisher: Arc<ScriptedPublisher> = Arc::new(ScriptedPublisher::default());
    let state = AppState::new(
        publisher,
        Arc::new(KeyCache::default()),
        ServeArgs::default(),
        None,
        "always".into(),
    );
    let resp = crate::app::app(state)
        .oneshot(
            Request::post("/v1/calls")
                .header("x-api-key", "cc_live_x")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn over_the_rate_limit_is_429_and_within_it_the_rate_headers_are_set() {
    let h = harness_with(
        ScriptedPublisher::default(),
        ServeArgs {
            rate_limit_per_sec: 0.001,
            rate_limit_burst: 1,
            ..ServeArgs::default()
        },
    );
    let record = callcap::examples::minimal(h.company);
    let a = h.post_json("/v1/calls", &record).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.headers["ratelimit-limit"], "1");
    let a = h.post_json("/v1/calls", &record).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408() {
    let h = harness_with(
        ScriptedPublisher::default(),
        ServeArgs {
            body_timeout_ms: 100,
            ..ServeArgs::default()
        },
    );
    let never = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
    let started = std::time::Instant::now();
    let a = h
        .send(
            h.post("/v1/calls", Some("application/json"))
                .body(Body::from_stream(never))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_batch_answers_per_record_and_asks_for_a_retry_only_when_one_was_not_stored() {
    let h = harness();
    let other = Uuid::new_v4();
    let body = json!({"calls": [
        callcap::examples::minimal(h.company),
        {"company_id": other},
        {"lead_id": "not-a-uuid"},
        callcap::examples::complete(h.company, "B-1"),
    ]});
    let a = h.post_json("/v1/calls/batch", &body).await;
    assert_eq!(a.status, StatusCode::MULTI_STATUS, "{}", a.body);
    let statuses: Vec<u64> = a.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 403, 400, 201]);
    assert!(!a.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(
        h.publisher.calls().len(),
        1,
        "one publish call for the batch"
    );
    assert_eq!(h.publisher.records().len(), 2);

    // The publisher refuses the second record: only that item is 503, and Retry-After is set.
    let h = harness_with(
        ScriptedPublisher::answering(|r| {
            if r.payload.windows(3).any(|w| w == b"B-2") {
                Err(PublishError::Timeout("no ack".into()))
            } else {
                Ok(Receipt {
                    seq: 0,
                    duplicate: false,
                })
            }
        }),
        ServeArgs::default(),
    );
    let body = json!({"calls": [
        callcap::examples::complete(h.company, "B-1"),
        callcap::examples::complete(h.company, "B-2"),
    ]});
    let a = h.post_json("/v1/calls/batch", &body).await;
    assert_eq!(a.status, StatusCode::MULTI_STATUS);
    assert_eq!(a.body["results"][1]["status"], 503);
    assert_eq!(a.headers[header::RETRY_AFTER], "1");

    // Whole-batch refusals.
    let a = h
        .post_json("/v1/calls/batch", &json!({"records": []}))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let many = json!({"calls": vec![json!({"company_id": h.company}); 1001]});
    let a = h.post_json("/v1/calls/batch", &many).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    let a = h
        .send(
            h.post("/v1/calls/batch", Some("application/json"))
                .header("idempotency-key", "k")
                .body(Body::from(json!({"calls": []}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["details"][0]["field"], "Idempotency-Key");
}

#[tokio::test]
async fn a_panicking_stage_costs_one_request_an_opaque_500() {
    let h = harness_with(
        ScriptedPublisher::answering(|_| panic!("a bug in a stage")),
        ServeArgs::default(),
    );
    let a = h
        .post_json("/v1/calls", &callcap::examples::minimal(h.company))
        .await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    // What the caller reads: the documented shape, nothing of the panic.
    assert_eq!(a.body["error"], "Internal Server Error", "{}", a.body);
    let answered = serde_json::to_string(&a.body).unwrap();
    assert!(!answered.contains("a bug in a stage"), "{answered}");
    // The gateway goes on.
    let h2 = harness();
    let a = h2
        .post_json("/v1/calls", &callcap::examples::minimal(h2.company))
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
}

#[tokio::test]
async fn readiness_follows_the_publisher_and_the_keys() {
    let h = harness();
    let a = h
        .send(Request::get("/readyz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::OK);
    h.publisher
        .set_ready(Err(crate::publish::NotReady::Other("no connection".into())));
    let a = h
        .send(Request::get("/readyz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["nats"], "no connection");
}

#[tokio::test]
async fn oversized_heads_are_414_and_431_in_the_json_shape() {
    let h = harness();
    let long = format!("/v1/calls?{}", "q".repeat(9 * 1024));
    let a = h
        .send(Request::get(long.as_str()).body(Body::empty()).unwrap())
        .await;
    assert_eq!(a.status, StatusCode::URI_TOO_LONG);
    assert_eq!(a.body["error"], "URI Too Long");
    let a = h
        .send(
            Request::get("/healthz")
                .header("x-filler", "h".repeat(40 * 1024))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut many = Request::get("/healthz");
    for i in 0..101 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let a = h.send(many.body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        a.body["message"],
        "request has 101 header fields; at most 100 are allowed"
    );
}
