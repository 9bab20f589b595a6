//! Every status the callback routes answer, through the real router, extractors and
//! handler, with a scripted publisher instead of NATS and a connector signed as Twilio
//! signs: milliseconds per case, as `ingest_tests.rs` does for the record routes. That
//! the providers' own SDKs' callbacks are stored is the end-to-end tests' job
//! (`tests/it/callbacks.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use base64::Engine as _;
use chrono::Utc;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::auth::KeyCache;
use crate::config::ServeArgs;
use crate::connectors::seal::SecretsKey;
use crate::connectors::{ConnectorCache, ConnectorRecord, Provider, StoredSecret};
use crate::kv::Mirror as _;
use crate::publish::scripted::ScriptedPublisher;
use crate::publish::{PublishError, Receipt};
use crate::state::AppState;

const PUBLIC: &str = "https://calls.example.com";
const TOKEN: &[u8] = b"twilio-auth-token-of-the-test";
const CONNECTOR: &str = "ctwilio1";

struct Harness {
    state: AppState,
    publisher: Arc<ScriptedPublisher>,
    connectors: Arc<ConnectorCache>,
    company: Uuid,
}

fn harness_with(publisher: ScriptedPublisher, loaded: bool) -> Harness {
    let key = SecretsKey::from_base64(&SecretsKey::generate().unwrap()).unwrap();
    let company = Uuid::new_v4();
    let mut record = ConnectorRecord {
        connector_id: CONNECTOR.into(),
        company_id: company,
        provider: Provider::Twilio,
        public_url: PUBLIC.into(),
        country: None,
        allow_networks: vec![],
        account: None,
        secrets: vec![],
        created_at: Utc::now(),
    };
    record.secrets.push(StoredSecret {
        sealed: key.seal(TOKEN, &record.seal_context()).unwrap(),
        added_at: Utc::now(),
        retire_at: None,
    });
    let connectors = Arc::new(ConnectorCache::new(Some(key)));
    connectors.put(CONNECTOR, &serde_json::to_vec(&record).unwrap());
    if loaded {
        connectors.mark_loaded();
    }
    let publisher = Arc::new(publisher);
    let keys = Arc::new(KeyCache::default());
    keys.mark_loaded();
    let state = AppState::with_connectors(
        publisher.clone(),
        keys,
        connectors.clone(),
        ServeArgs::default(),
        None,
        "always".into(),
    );
    Harness {
        state,
        publisher,
        connectors,
        company,
    }
}

fn harness() -> Harness {
    harness_with(ScriptedPublisher::default(), true)
}

/// Twilio's `X-Twilio-Signature`: HMAC-SHA1 of the URL followed by the form's
/// parameters sorted by name, each name then value, base64.
fn twilio_signature(secret: &[u8], url: &str, form: &[(&str, &str)]) -> String {
    let mut sorted = form.to_vec();
    sorted.sort();
    let mut message = url.to_owned();
    for (k, v) in sorted {
        message.push_str(k);
        message.push_str(v);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, message.as_bytes()))
}

fn encode(form: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish()
}

/// A completed call's status callback.
fn completed() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CallSid", "CA0001"),
        ("From", "+14155550100"),
        ("To", "+14155550101"),
        ("CallStatus", "completed"),
        ("CallDuration", "42"),
        ("AccountSid", "AC1"),
    ]
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Harness {
    /// POSTs `body` to `path` from a provider's address with `signature` (if any).
    async fn send(
        &self,
        path: &str,
        content_type: &str,
        body: String,
        signature: Option<String>,
    ) -> Answer {
        let mut req = Request::post(path).header(header::CONTENT_TYPE, content_type);
        if let Some(sig) = signature {
            req = req.header("x-twilio-signature", sig);
        }
        let mut req = req.body(Body::from(body)).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 7], 40000))));
        let resp = crate::app::app(self.state.clone())
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// A form callback to the connector, signed over `signed` (the form as sent unless a
    /// test tampers with it).
    async fn form(&self, sent: &[(&str, &str)], signed: &[(&str, &str)]) -> Answer {
        let path = format!("/v1/callbacks/{CONNECTOR}");
        let sig = twilio_signature(TOKEN, &format!("{PUBLIC}{path}"), signed);
        self.send(
            &path,
            "application/x-www-form-urlencoded",
            encode(sent),
            Some(sig),
        )
        .await
    }
}

#[tokio::test]
async fn a_signed_form_is_published_once_for_the_connectors_company_and_answered_204() {
    let h = harness();
    let a = h.form(&completed(), &completed()).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    let published = h.publisher.records();
    assert_eq!(published.len(), 1);
    assert_eq!(
        published[0].company, h.company,
        "the connector's company, nobody else's"
    );
    let envelope: Value = serde_json::from_slice(&published[0].payload).unwrap();
    let record = &envelope["record"];
    assert_eq!(record["external_call_id"], "CA0001", "{envelope}");
    assert_eq!(record["external_system"], "twilio");
    assert_eq!(record["call_status"], "completed");
    assert_eq!(record["duration_seconds"], 42);
    assert_eq!(envelope["key_id"], CONNECTOR, "the connector is the caller");
}

#[tokio::test]
async fn refusals_carry_their_status_and_publish_nothing() {
    let h = harness();
    let path = format!("/v1/callbacks/{CONNECTOR}");
    let url = format!("{PUBLIC}{path}");
    let form = encode(&completed());
    let good = twilio_signature(TOKEN, &url, &completed());
    let mut tampered = completed();
    tampered[4] = ("CallDuration", "3600");
    let json = r#"{"CallSid":"CA0001","CallStatus":"completed"}"#.to_owned();
    let cases: Vec<(&str, Answer, StatusCode)> = vec![
        (
            "no signature",
            h.send(
                &path,
                "application/x-www-form-urlencoded",
                form.clone(),
                None,
            )
            .await,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another secret's signature",
            h.send(
                &path,
                "application/x-www-form-urlencoded",
                form.clone(),
                Some(twilio_signature(b"not the token", &url, &completed())),
            )
            .await,
            StatusCode::FORBIDDEN,
        ),
        (
            "a parameter changed after signing",
            h.form(&tampered, &completed()).await,
            StatusCode::FORBIDDEN,
        ),
        (
            "an unknown connector",
            h.send(
                "/v1/callbacks/cnobody",
                "application/x-www-form-urlencoded",
                form.clone(),
                Some(good.clone()),
            )
            .await,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a JSON body the signature does not cover (no bodySHA256)",
            h.send(
                &path,
                "application/json",
                json,
                Some(twilio_signature(TOKEN, &url, &[])),
            )
            .await,
            StatusCode::FORBIDDEN,
        ),
        (
            "a repeated parameter",
            {
                let mut twice = completed();
                twice.push(("CallStatus", "failed"));
                h.form(&twice, &twice).await
            },
            StatusCode::BAD_REQUEST,
        ),
        (
            "a signed form naming no call",
            {
                let nameless: Vec<_> = completed().into_iter().skip(1).collect();
                h.form(&nameless, &nameless).await
            },
            StatusCode::BAD_REQUEST,
        ),
        (
            "a signed form whose number is longer than the API takes",
            {
                let long = format!("+1{}", "5".repeat(70));
                let mut odd = completed();
                odd[1] = ("From", long.as_str());
                h.form(&odd, &odd).await
            },
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (what, answer, want) in cases {
        assert_eq!(answer.status, want, "{what}: {}", answer.body);
        assert!(
            answer.body["error"].is_string() && answer.body["message"].is_string(),
            "{what}: the API's JSON shape: {}",
            answer.body
        );
    }
    assert!(
        h.publisher.records().is_empty(),
        "nothing is published before the signature and the mapping hold"
    );
}

#[tokio::test]
async fn an_unacknowledged_publish_is_503_with_retry_after_so_the_provider_retries() {
    let h = harness_with(
        ScriptedPublisher::answering(|_| Err(PublishError::Timeout("no ack".into()))),
        true,
    );
    let a = h.form(&completed(), &completed()).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(a.body["error"], "Service Unavailable");
    // The same callback once JetStream answers: stored.
    let h = harness_with(
        ScriptedPublisher::answering(|_| {
            Ok(Receipt {
                seq: 9,
                duplicate: false,
            })
        }),
        true,
    );
    assert_eq!(
        h.form(&completed(), &completed()).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn before_the_connectors_are_read_a_callback_is_503_not_refused() {
    let h = harness_with(ScriptedPublisher::default(), false);
    let a = h.form(&completed(), &completed()).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
    h.connectors.mark_loaded();
    assert_eq!(
        h.form(&completed(), &completed()).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.publisher.records().len(), 1);
}

#[tokio::test]
async fn a_connector_whose_secret_does_not_open_here_is_503_until_it_does() {
    // The connector as a gateway without the secrets key reads it.
    let h = harness();
    let record: ConnectorRecord = h.connectors.get(CONNECTOR).unwrap().record.clone();
    let keyless = Arc::new(ConnectorCache::new(None));
    keyless.put(CONNECTOR, &serde_json::to_vec(&record).unwrap());
    keyless.mark_loaded();
    let state = AppState::with_connectors(
        h.publisher.clone(),
        h.state.keys.clone(),
        keyless,
        ServeArgs::default(),
        None,
        "always".into(),
    );
    let h = Harness { state, ..h };
    let a = h.form(&completed(), &completed()).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(h.publisher.records().is_empty());
}
