//! The third hostile probe's findings about provider callbacks, each held against the
//! real gateway, NATS, worker and Postgres with the providers' own SDKs signing: a
//! signature that covers the URL alone, unsigned URL parameters in a Vonage record, a
//! Vonage token taken by another company's connector, forged slow bodies starving the
//! genuine callback, a log line per forgery, repeated form keys. The erasure, archive and
//! retention findings are in `erasure.rs`, `archive.rs` and `retention.rs`.

use std::time::Duration;

use callcap_tests::connectors::{call_id, Connectors, PUBLIC};
use callcap_tests::nats::stream_messages;
use callcap_tests::pipeline::Process;
use callcap_tests::providers::{send, sign, Signed};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

const TWILIO_TOKEN: &str = "0c6d1b2a9f8e7d6c5b4a39281706f5e4";
const PLIVO_TOKEN: &str = "MjQ3ZTNhYjYtNzQyMi00ODhhLWI0YjQt";
const VONAGE_SECRET: &str = "vonage-signature-secret-probe-3-0123";
/// The application the signer's tokens name by default.
const VONAGE_APP: &str = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab";

/// A Twilio status callback whose every value is URL-safe, as a captured one may be.
fn twilio_minimal(url: &str, sid: &str) -> Value {
    json!({"provider": "twilio", "secret": TWILIO_TOKEN, "url": url, "form": {
        "CallSid": sid,
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "CallStatus": "completed",
        "CallDuration": "42",
        "From": "+14155550100",
        "To": "+919876543210",
    }})
}

/// What Twilio's signature covers after the URL: each form parameter, sorted by name, as
/// name then value.
fn twilio_signed_params(request: &Value) -> String {
    let form = request["form"].as_object().unwrap();
    let mut names: Vec<&String> = form.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| format!("{n}{}", form[n].as_str().unwrap()))
        .collect()
}

/// A forged record: another caller, an hour, the attacker's recording.
fn forged_json(sid: &str) -> String {
    json!({
        "CallSid": sid,
        "CallStatus": "completed",
        "CallDuration": "3600",
        "From": "+15005550006",
        "To": "+919876543210",
        "RecordingUrl": "https://attacker.example/recording.mp3",
    })
    .to_string()
}

/// Finding 1 (high): a Twilio or Plivo signature over the URL alone authenticated any
/// JSON body. A captured genuine Twilio callback, sent to a URL with a query, signs
/// `URL?q` + `k1v1k2v2…`, which is itself the longer URL `URL?qk1v1…`: with a JSON body
/// its signature "covered" a forged record. Before the fix: 204 and stored.
#[tokio::test]
async fn a_signature_over_the_url_alone_authenticates_no_body() {
    let mut fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (_, twilio_url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let (_, plivo_url) = fx.create("plivo", Some(PLIVO_TOKEN), &[]).await;
    fx.other_posts(3).await;

    // The genuine callback, to a URL with a query: stored.
    let genuine_sid = call_id("CA");
    let request = twilio_minimal(&format!("{twilio_url}?campaign=7"), &genuine_sid);
    let genuine = sign(&request).await;
    assert_eq!(fx.post(&genuine).await.0, StatusCode::NO_CONTENT);

    // The forgery: the genuine signature, the URL extended by what it signed, a JSON body.
    let forged_sid = call_id("CA");
    let forged = Signed {
        url: format!("{}{}", genuine.url, twilio_signed_params(&request)),
        headers: genuine.headers.clone(),
        body: forged_json(&forged_sid),
        content_type: "application/json".into(),
    };
    let (status, body) = fx.post(&forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("bodySHA256"), "{body}");
    // The same URL with an empty form: its signature would cover the URL alone.
    let empty = Signed {
        body: String::new(),
        content_type: "application/x-www-form-urlencoded".into(),
        ..forged.clone()
    };
    assert_eq!(fx.post(&empty).await.0, StatusCode::FORBIDDEN);

    // Plivo signs form parameters: its SDK's signature over the URL and no parameters,
    // with a JSON body.
    let plivo_forged_sid = call_id("");
    let mut plivo =
        sign(&json!({"provider": "plivo", "secret": PLIVO_TOKEN, "url": plivo_url, "form": {}}))
            .await;
    plivo.body =
        json!({"CallUUID": plivo_forged_sid, "CallStatus": "completed", "Duration": "3600",
        "From": "15005550006", "To": "919876543210"})
        .to_string();
    plivo.content_type = "application/json".into();
    let (status, body) = fx.post(&plivo).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // And a genuine JSON Twilio callback (bodySHA256 in its URL) is still taken.
    let json_sid = call_id("CA");
    let json_signed = sign(&json!({"provider": "twilio", "secret": TWILIO_TOKEN, "url": twilio_url,
        "json": {"CallSid": json_sid, "CallStatus": "busy", "From": "+14155550100", "To": "+919876543210"}}))
    .await;
    assert_eq!(fx.post(&json_signed).await.0, StatusCode::NO_CONTENT);

    assert_eq!(fx.stored(&genuine_sid).await.duration_seconds, Some(42));
    assert_eq!(
        fx.stored(&json_sid).await.call_status.as_deref(),
        Some("busy")
    );
    assert!(fx.row(&forged_sid).await.is_none());
    assert!(fx.row(&plivo_forged_sid).await.is_none());
    fx.finish(&[
        "attacker.example",
        "\"duration_seconds\":3600",
        &forged_sid,
        &plivo_forged_sid,
    ])
    .await;
}

fn vonage_status(url: &str, uuid: &str) -> Value {
    json!({"provider": "vonage", "secret": VONAGE_SECRET, "url": url, "json": {
        "uuid": uuid, "conversation_uuid": format!("CON-{uuid}"), "status": "completed",
        "direction": "outbound", "from": "14155550100", "to": "919876543210",
        "duration": "42", "timestamp": "2026-12-01T10:00:47.000Z",
    }})
}

/// Finding 2: Vonage's token covers the body, not the URL, yet `?recording_url=…` and
/// `?uuid=` reached the row: a recording moved onto another call, unsigned.
#[tokio::test]
async fn nothing_of_a_vonage_callbacks_url_reaches_the_record() {
    let mut fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (_, url) = fx
        .create(
            "vonage",
            Some(VONAGE_SECRET),
            &["--application", VONAGE_APP],
        )
        .await;
    fx.other_posts(3).await;
    let victim = Uuid::new_v4().to_string();
    assert_eq!(
        fx.post(&sign(&vonage_status(&url, &victim)).await).await.0,
        StatusCode::NO_CONTENT
    );
    // A genuine status event of another call, its URL extended with unsigned fields.
    let call = Uuid::new_v4().to_string();
    let extended = format!(
        "{url}?recording_url=https://attacker.example/a.mp3&duration=3600&call_status=failed"
    );
    assert_eq!(
        fx.post(&sign(&vonage_status(&extended, &call)).await)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    // A genuine recording event of that call's conversation, retargeted at the victim.
    let recording = json!({"provider": "vonage", "secret": VONAGE_SECRET,
        "url": format!("{url}?uuid={victim}"), "json": {
        "recording_url": "https://api.nexmo.com/v1/files/bbbbbbbb-bbbb-cccc-dddd-0123456789ab",
        "recording_uuid": "bbbbbbbb-bbbb-cccc-dddd-0123456789ab",
        "conversation_uuid": format!("CON-{call}"),
        "start_time": "2026-12-01T10:00:05.000Z", "end_time": "2026-12-01T10:00:47.000Z",
        "timestamp": "2026-12-01T10:00:48.000Z", "size": 1,
    }});
    assert_eq!(
        fx.post(&sign(&recording).await).await.0,
        StatusCode::NO_CONTENT
    );
    let row = fx.stored(&call).await;
    assert_eq!(row.recording_url, None);
    assert_eq!(row.duration_seconds, Some(42));
    assert_eq!(row.call_status.as_deref(), Some("completed"));
    let victim_row = fx.stored(&victim).await;
    assert_eq!(
        victim_row.recording_url, None,
        "a recording moved onto another call"
    );
    let conversation = fx.stored(&format!("CON-{call}")).await;
    assert!(conversation.recording_url.unwrap().contains("bbbbbbbb"));
    fx.finish(&["attacker.example", "\"duration_seconds\":3600"])
        .await;
}

/// Finding 3: two connectors holding one Vonage signature secret (one account serving two
/// companies) took each other's callbacks: one signed event stored for both companies.
/// Now a connector takes only its own application's tokens, and a second company cannot
/// register the same secret for the same application.
#[tokio::test]
async fn a_vonage_token_is_taken_only_by_its_applications_connector() {
    let fx = Connectors::start(crate::GATEWAY_BIN).await;
    let reseller = Uuid::new_v4();
    let (_, url_a) = fx
        .create(
            "vonage",
            Some(VONAGE_SECRET),
            &["--application", VONAGE_APP],
        )
        .await;
    // The same secret and application for another company: refused, saying why.
    let secret_file = fx.p.dir.path().join("shared.secret");
    std::fs::write(&secret_file, VONAGE_SECRET).unwrap();
    let reseller_text = reseller.to_string();
    let secret_arg = secret_file.display().to_string();
    let base = [
        "create",
        "--company",
        reseller_text.as_str(),
        "--provider",
        "vonage",
        "--public-url",
        PUBLIC,
        "--secret-file",
        secret_arg.as_str(),
    ];
    let refused = fx
        .command(&[&base[..], &["--application", VONAGE_APP]].concat())
        .await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("own Vonage application"), "{said}");
    // Without an application at all: refused.
    let unbound = fx.command(&base).await;
    assert!(!unbound.status.success());
    assert!(String::from_utf8_lossy(&unbound.stderr).contains("--application is required"));
    // Its own application: taken, and then it takes only that application's tokens.
    let (_, url_b) = fx
        .create_for(
            reseller,
            "vonage",
            Some(VONAGE_SECRET),
            &["--application", "bbbbbbbb-0000-4000-8000-000000000002"],
        )
        .await;
    let uuid = Uuid::new_v4().to_string();
    let for_a = sign(&vonage_status(&url_a, &uuid)).await;
    assert_eq!(fx.post(&for_a).await.0, StatusCode::NO_CONTENT);
    // The very same signed event, delivered to the other company's connector.
    let replayed = Signed {
        url: url_b.clone(),
        ..for_a.clone()
    };
    let (status, body) = fx.post(&replayed).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("application_id"), "{body}");
    let mut for_b = vonage_status(&url_b, &Uuid::new_v4().to_string());
    for_b["claims"] = json!({"application_id": "bbbbbbbb-0000-4000-8000-000000000002"});
    assert_eq!(fx.post(&sign(&for_b).await).await.0, StatusCode::NO_CONTENT);
    fx.drained().await;
    assert!(fx.row(&uuid).await.is_some());
    assert!(
        fx.row_of(reseller, &uuid).await.is_none(),
        "one signed event stored for both companies"
    );
    fx.finish(&[]).await;
}

/// Sends a callback head and `sent` bytes of a `declared`-byte form body from `from`
/// (a loopback address), then holds the connection open.
async fn slow_body(
    gateway: std::net::SocketAddr,
    from: std::net::IpAddr,
    path: &str,
    declared: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut conn = socket.connect(gateway).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: calls.example.test\r\ncontent-type: application/x-www-form-urlencoded\r\n\
         x-twilio-signature: c2lnbmVkLWJ5LW5vYm9keQ==\r\ncontent-length: {declared}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b'a'; sent]).await.unwrap();
    conn
}

/// Finding 4: bodies were read against the connector's share of the body budget before
/// the signature was checked, so slow bodies from anyone who knows the URL made the
/// provider's genuine callback get 503 (which Twilio does not retry). Now unverified
/// callback bodies are held against their sending address's share of a pool apart from
/// the API's: the forger's address runs out, the provider's and the dialers' do not.
#[tokio::test]
async fn forged_slow_bodies_do_not_starve_a_genuine_callback() {
    let mut fx = Connectors::start_with(
        crate::GATEWAY_BIN,
        ServeArgs {
            body_memory_mb: 32,
            body_memory_per_key_percent: 10,
            body_timeout_ms: 15_000,
            ..ServeArgs::default()
        },
    )
    .await;
    let (_, url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let path = url.strip_prefix(PUBLIC).unwrap().to_owned();
    // 96 slow forgeries from 127.0.0.2, each 60 KB into a 64 KB body: 6 MiB if they were
    // all held, more than the connector's whole share (10% of 32 MiB) used to be.
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..96 {
        held.push(slow_body(fx.p.gw.addr, attacker, &path, 65_536, 60_000).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The provider's genuine callback, from its own address, while they hang.
    let sid = call_id("CA");
    let genuine = sign(&twilio_minimal(&url, &sid)).await;
    let (status, body) = fx.post(&genuine).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // Dialers' records are not touched either.
    fx.other_posts(5).await;
    assert_eq!(fx.stored(&sid).await.duration_seconds, Some(42));
    drop(held);
    fx.finish(&[]).await;
}

/// Finding 5: every refused callback logged a WARN line (20,000 forgeries, 20,001 lines);
/// SECURITY.md promises one line per reason per 10 s, with the number suppressed.
#[tokio::test]
async fn a_flood_of_forged_callbacks_leaves_a_few_log_lines() {
    let fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (connector, url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let port = callcap_tests::free_port();
    let log = fx.p.dir.path().join("gateway.log");
    let mut gw = Process::gateway_logged(
        crate::GATEWAY_BIN,
        &fx.p.nats.url(),
        port,
        &[(
            "CONNECTOR_SECRETS_KEY_FILE",
            fx.key_file.display().to_string(),
        )],
        &log,
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let valid = sign(&twilio_minimal(&url, &call_id("CA"))).await;
    callcap_tests::eventually(
        Duration::from_secs(20),
        "the gateway binary to take callbacks",
        || async {
            (send(&http, &base, PUBLIC, &valid, &[]).await.0 == StatusCode::NO_CONTENT)
                .then_some(())
        },
    )
    .await;
    let mut forged = valid.clone();
    forged.body = forged.body.replace("CallDuration=42", "CallDuration=4242");
    let sends = futures::future::join_all((0..2_000).map(|_| {
        let (http, base, forged) = (&http, &base, &forged);
        async move { send(http, base, PUBLIC, forged, &[]).await.0 }
    }))
    .await;
    assert!(sends.iter().all(|s| *s == StatusCode::FORBIDDEN));
    gw.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines = logged
        .lines()
        .filter(|l| l.contains("provider callback refused"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} refusal lines for 2,000 forgeries"
    );
    assert!(logged.contains(&connector));
    fx.finish(&["\"duration_seconds\":4242"]).await;
}

/// Finding 6 (low): Twilio's signature covers each distinct value of a form key once, so
/// repeating a pair left the signature valid while the record changed (one captured
/// callback replayed into many distinct records). Repeated keys are refused.
#[tokio::test]
async fn a_repeated_form_key_is_refused() {
    let fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (_, url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let sid = call_id("CA");
    let genuine = sign(&twilio_minimal(&url, &sid)).await;
    let repeats = [
        "CallStatus=completed".to_owned(),
        "From=%2B14155550100".to_owned(),
        format!("CallSid={sid}"),
    ];
    for repeat in repeats {
        let replayed = Signed {
            body: format!("{}&{repeat}", genuine.body),
            ..genuine.clone()
        };
        let (status, body) = fx.post(&replayed).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{repeat}: {body}");
        assert!(body.contains("repeats the parameter"), "{body}");
    }
    fx.drained().await;
    assert!(fx.row(&sid).await.is_none());
    assert!(stream_messages(&fx.p.nats.url()).await.is_empty());
    fx.finish(&[]).await;
}
