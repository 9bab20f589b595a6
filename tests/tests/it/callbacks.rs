//! Provider callbacks end to end: a connector made with `ingest-gateway connectors`, a
//! provider's callbacks signed by the provider's own SDK, a real gateway, NATS, worker
//! and Postgres. Per provider: a valid callback is stored with the mapped fields; an
//! altered or unsigned one is refused and never reaches the stream; the same callback
//! twice is one row; the lifecycle in shuffled order keeps the final status; a recording
//! callback adds its URL to the call; a revoked connector is refused. Another company
//! posts records through its API key all along, and every one of them is stored.

use std::time::Duration;

use callcap_tests::connectors::{call_id, Connectors, PUBLIC};
use callcap_tests::eventually;
use callcap_tests::pipeline::TestGateway;
use callcap_tests::providers::{send, sign, Signed};
use chrono::Utc;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

// ------------------------------------------------------------ what every provider shares

/// One provider's row of the table the four providers' tests share: how its callbacks
/// look, what a stored completed call holds, how a forger alters one and how that is
/// refused, and its words for the lifecycle.
struct ProviderCase {
    provider: &'static str,
    secret: Option<&'static str>,
    create: &'static [&'static str],
    /// The provider's event for (callback URL, call id, status), for the signer.
    event: fn(&str, &str, &str) -> Value,
    /// A fresh call id as the provider writes them.
    call_id: fn() -> String,
    /// What a stored callback is answered (the provider's documented success).
    ok: StatusCode,
    /// The completed call's numbers in E.164 and its start in UTC.
    caller: &'static str,
    recipient: &'static str,
    start: &'static str,
    /// A genuine completed callback altered by a forger (body or URL) …
    forge: fn(&mut Signed),
    /// … and what is answered to it.
    forged: StatusCode,
    /// Orders in which the lifecycle arrives, each ending with the call completed.
    shuffled: [&'static [&'static str]; 2],
    /// The provider's statuses that are not the API's, and what they become.
    words: &'static [(&'static str, &'static str)],
}

/// What every provider's callbacks must do, driven by `case`: a completed call stored
/// with its mapped fields; the same callback twice one row; a forged one refused; the
/// lifecycle in shuffled orders keeps `completed`; the provider's words mapped. The
/// other company posts all along. Returns the fixture, the connector and its callback
/// URL, and the forged call's id (never to be stored).
async fn every_provider(case: &ProviderCase) -> (Connectors, String, String, String) {
    let mut fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (id, url) = fx.create(case.provider, case.secret, case.create).await;
    fx.other_posts(5).await;

    let call = (case.call_id)();
    let signed = sign(&(case.event)(&url, &call, "completed")).await;
    let (status, body) = fx.post(&signed).await;
    assert_eq!(status, case.ok, "{}: {body}", case.provider);
    let row = fx.stored(&call).await;
    assert_eq!(row.call_status.as_deref(), Some("completed"));
    assert_eq!(row.external_system.as_deref(), Some(case.provider));
    assert_eq!(row.caller_number.as_deref(), Some(case.caller));
    assert_eq!(row.recipient_number.as_deref(), Some(case.recipient));
    assert_eq!(row.duration_seconds, Some(42));
    assert_eq!(row.start_time.unwrap().to_rfc3339(), case.start);
    assert_eq!(
        row.key_id.as_deref(),
        Some(id.as_str()),
        "the connector is the caller"
    );
    // The provider retries: one row.
    assert_eq!(fx.post(&signed).await.0, case.ok);
    fx.drained().await;
    assert_eq!(fx.rows_of(&call).await, 1, "{}", case.provider);

    let forged = (case.call_id)();
    let mut altered = sign(&(case.event)(&url, &forged, "completed")).await;
    (case.forge)(&mut altered);
    let (status, body) = fx.post(&altered).await;
    assert_eq!(status, case.forged, "{}: {body}", case.provider);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert!(
        err["error"].is_string() && err["message"].is_string(),
        "{err}"
    );

    for order in case.shuffled {
        let call = (case.call_id)();
        for s in order {
            let (status, body) = fx.post(&sign(&(case.event)(&url, &call, s)).await).await;
            assert_eq!(status, case.ok, "{}: {body}", case.provider);
        }
        assert_eq!(
            fx.stored(&call).await.call_status.as_deref(),
            Some("completed"),
            "{}: {order:?}",
            case.provider
        );
    }
    for (theirs, ours) in case.words {
        let call = (case.call_id)();
        let event = sign(&(case.event)(&url, &call, theirs)).await;
        assert_eq!(fx.post(&event).await.0, case.ok);
        assert_eq!(fx.stored(&call).await.call_status.as_deref(), Some(*ours));
    }
    (fx, id, url, forged)
}

// ---------------------------------------------------------------------------- Twilio

const TWILIO_TOKEN: &str = "9f86d081884c7d659a2feaa0c55ad015";

fn twilio_event(url: &str, sid: &str, status: &str) -> Value {
    let mut form = json!({
        "CallSid": sid,
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "From": "+14155550100",
        "To": "+919876543210",
        "CallStatus": status,
        "ApiVersion": "2010-04-01",
        "Direction": "outbound-api",
        "CallbackSource": "call-progress-events",
        "SequenceNumber": match status { "ringing" => "1", "in-progress" => "2", _ => "3" },
        "Timestamp": match status {
            "ringing" => "Tue, 01 Dec 2026 10:00:00 +0000",
            "in-progress" => "Tue, 01 Dec 2026 10:00:05 +0000",
            _ => "Tue, 01 Dec 2026 10:00:47 +0000",
        },
    });
    if status == "completed" {
        form["CallDuration"] = json!("42");
        form["Duration"] = json!("1");
    }
    json!({"provider": "twilio", "secret": TWILIO_TOKEN, "url": url, "form": form})
}

const TWILIO: ProviderCase = ProviderCase {
    provider: "twilio",
    secret: Some(TWILIO_TOKEN),
    create: &[],
    event: twilio_event,
    call_id: || call_id("CA"),
    ok: StatusCode::NO_CONTENT,
    caller: "+14155550100",
    recipient: "+919876543210",
    start: "2026-12-01T10:00:05+00:00",
    // One parameter changed after signing.
    forge: |s| s.body = s.body.replace("CallDuration=42", "CallDuration=4242"),
    forged: StatusCode::FORBIDDEN,
    shuffled: [
        &["completed", "ringing", "in-progress"],
        &["ringing", "completed", "in-progress"],
    ],
    words: &[],
};

#[tokio::test]
async fn twilio_callbacks_are_checked_and_stored() {
    let (mut fx, id, url, forged_sid) = every_provider(&TWILIO).await;
    let sid = call_id("CA");
    let signed = sign(&twilio_event(&url, &sid, "completed")).await;
    assert_eq!(fx.post(&signed).await.0, StatusCode::NO_CONTENT);
    let row = fx.stored(&sid).await;
    assert_eq!(
        row.end_time.unwrap().to_rfc3339(),
        "2026-12-01T10:00:47+00:00"
    );
    let details = row.call_details.unwrap();
    assert_eq!(details["AccountSid"], "AC0123456789abcdef0123456789abcdef");
    assert!(details.get("CallSid").is_none(), "{details}");
    // The forgery's refusal names the header that did not match.
    let mut altered = sign(&twilio_event(&url, &forged_sid, "completed")).await;
    (TWILIO.forge)(&mut altered);
    let (_, body) = fx.post(&altered).await;
    assert!(body.contains("X-Twilio-Signature"), "{body}");
    // No signature at all: 401.
    let mut unsigned = sign(&twilio_event(&url, &forged_sid, "completed")).await;
    unsigned.headers.clear();
    assert_eq!(fx.post(&unsigned).await.0, StatusCode::UNAUTHORIZED);
    // Signed for the gateway's own address (what Host says), not the public URL: refused;
    // the public URL's signature verifies whatever Host and X-Forwarded-* claim.
    let local = format!("{}/v1/callbacks/{id}", fx.p.gw.base());
    let mut for_host = sign(&twilio_event(&local, &forged_sid, "completed")).await;
    for_host.url = for_host.url.replace(&fx.p.gw.base(), PUBLIC);
    assert_eq!(fx.post(&for_host).await.0, StatusCode::FORBIDDEN);
    let spoofed = sign(&twilio_event(&url, &call_id("CA"), "ringing")).await;
    let (status, _) = fx
        .post_with(
            &spoofed,
            &[
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "http"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // The JSON variant (bodySHA256 in the URL), signed with the default port in the URL,
    // and the SharedKey algorithm HMAC-SHA256.
    let json_sid = call_id("CA");
    let mut req = twilio_event(&url, &json_sid, "in-progress");
    req["json"] = req["form"].take();
    req.as_object_mut().unwrap().remove("form");
    req["port_in_signed_url"] = json!(true);
    let signed = sign(&req).await;
    assert!(signed.url.contains("bodySHA256="));
    assert_eq!(fx.post(&signed).await.0, StatusCode::NO_CONTENT);
    let mut tampered = signed.clone();
    tampered.body = tampered.body.replace("+14155550100", "+14155550199");
    assert_eq!(fx.post(&tampered).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        fx.stored(&json_sid).await.call_status.as_deref(),
        Some("in-progress")
    );
    let sha_sid = call_id("CA");
    let mut sha256 = twilio_event(&url, &sha_sid, "ringing");
    sha256["algorithm"] = json!("HMAC_SHA256");
    assert_eq!(
        fx.post(&sign(&sha256).await).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        fx.stored(&sha_sid).await.call_status.as_deref(),
        Some("ringing")
    );

    // The recording callback adds its URL to the same call.
    let recording = json!({"provider": "twilio", "secret": TWILIO_TOKEN, "url": url, "form": {
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "CallSid": sid,
        "RecordingSid": "RE0123456789abcdef0123456789abcdef",
        "RecordingUrl": "https://api.twilio.com/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Recordings/RE0123456789abcdef0123456789abcdef",
        "RecordingStatus": "completed",
        "RecordingDuration": "41",
        "RecordingChannels": "1",
        "RecordingSource": "StartCallRecordingAPI",
        "RecordingStartTime": "Tue, 01 Dec 2026 10:00:06 +0000",
    }});
    assert_eq!(
        fx.post(&sign(&recording).await).await.0,
        StatusCode::NO_CONTENT
    );
    let row = fx.stored(&sid).await;
    assert!(row
        .recording_url
        .unwrap()
        .ends_with("/Recordings/RE0123456789abcdef0123456789abcdef"));
    assert_eq!(row.call_status.as_deref(), Some("completed"));
    assert_eq!(row.duration_seconds, Some(42));

    // Rotation: the new token signs from now on, the old one during the overlap.
    const NEW_TOKEN: &str = "0b14d501a594442a01c6859541bcb3e8";
    let new_file = fx.p.dir.path().join("twilio-new.secret");
    std::fs::write(&new_file, NEW_TOKEN).unwrap();
    fx.connectors(&[
        "rotate-secret",
        &id,
        "--secret-file",
        &new_file.display().to_string(),
    ])
    .await;
    let cache = fx.p.gw.state.connectors.clone();
    eventually(
        Duration::from_secs(5),
        "the rotation to reach the gateway",
        || {
            let cache = cache.clone();
            let id = id.clone();
            async move { (cache.get(&id)?.valid_secrets(Utc::now()).count() == 2).then_some(()) }
        },
    )
    .await;
    let mut with_new = twilio_event(&url, &call_id("CA"), "ringing");
    with_new["secret"] = json!(NEW_TOKEN);
    assert_eq!(
        fx.post(&sign(&with_new).await).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        fx.post(&sign(&twilio_event(&url, &call_id("CA"), "ringing")).await)
            .await
            .0,
        StatusCode::NO_CONTENT,
        "the old token is accepted during the overlap"
    );

    fx.other_posts(5).await;
    // Revoked: refused within a second.
    let listed = fx.connectors(&["list"]).await;
    assert!(
        listed.contains(&id) && !listed.contains(TWILIO_TOKEN) && !listed.contains(NEW_TOKEN),
        "{listed}"
    );
    fx.connectors(&["revoke", &id]).await;
    let late = sign(&with_new).await;
    fx.until_answered(
        &late,
        StatusCode::UNAUTHORIZED,
        "the revocation to reach the gateway",
    )
    .await;
    assert!(fx.row(&forged_sid).await.is_none());
    fx.finish(&["\"duration_seconds\":4242", "+14155550199", &forged_sid])
        .await;
}

// ---------------------------------------------------------------------------- Plivo

const PLIVO_TOKEN: &str = "ZWRhYzE4NzY4ZjY0YTZlNzVmYmI5ZDY3";

fn plivo_event(url: &str, uuid: &str, status: &str) -> Value {
    let mut form = json!({
        "CallUUID": uuid,
        "RequestUUID": "7a1f2e9c-0000-4000-8000-000000000001",
        "From": "14155550100",
        "To": "919876543210",
        "CallStatus": status,
        "Direction": "outbound",
        "Event": match status { "ringing" => "Ring", "in-progress" => "StartApp", _ => "Hangup" },
        "StartTime": "2026-12-01 10:00:00",
    });
    if status != "ringing" {
        form["AnswerTime"] = json!("2026-12-01 10:00:05");
    }
    if status == "completed" {
        form["EndTime"] = json!("2026-12-01 10:00:47");
        form["Duration"] = json!("42");
        form["BillDuration"] = json!("60");
        form["HangupCause"] = json!("NORMAL_CLEARING");
        form["HangupCauseCode"] = json!("4000");
        form["HangupSource"] = json!("Callee");
    }
    json!({"provider": "plivo", "secret": PLIVO_TOKEN, "url": url, "form": form})
}

const PLIVO: ProviderCase = ProviderCase {
    provider: "plivo",
    secret: Some(PLIVO_TOKEN),
    create: &[],
    event: plivo_event,
    call_id: || Uuid::new_v4().to_string(),
    // Plivo's documentation asks for 200 OK.
    ok: StatusCode::OK,
    caller: "+14155550100",
    recipient: "+919876543210",
    start: "2026-12-01T10:00:05+00:00",
    forge: |s| s.body = s.body.replace("Duration=42", "Duration=4242"),
    forged: StatusCode::FORBIDDEN,
    shuffled: [
        &["completed", "in-progress", "ringing"],
        &["in-progress", "completed", "ringing"],
    ],
    words: &[("cancel", "canceled"), ("timeout", "no-answer")],
};

#[tokio::test]
async fn plivo_callbacks_are_checked_and_stored() {
    let (mut fx, id, url, forged) = every_provider(&PLIVO).await;
    let uuid = Uuid::new_v4().to_string();
    let (status, body) = fx
        .post(&sign(&plivo_event(&url, &uuid, "completed")).await)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.is_empty());
    let row = fx.stored(&uuid).await;
    assert_eq!(
        row.end_time.unwrap().to_rfc3339(),
        "2026-12-01T10:00:47+00:00"
    );
    assert_eq!(row.call_details.unwrap()["HangupCause"], "NORMAL_CLEARING");

    // Without the nonce: refused.
    let mut no_nonce = sign(&plivo_event(&url, &forged, "completed")).await;
    no_nonce.headers.remove("X-Plivo-Signature-V3-Nonce");
    assert_eq!(fx.post(&no_nonce).await.0, StatusCode::UNAUTHORIZED);
    // Several signatures in the header (an old token's first): any may match.
    let mut several = plivo_event(&url, &Uuid::new_v4().to_string(), "ringing");
    several["also_sign_with"] = json!(["an-old-auth-token-no-longer-ours"]);
    let several = sign(&several).await;
    assert!(several.headers["X-Plivo-Signature-V3"].contains(','));
    assert_eq!(fx.post(&several).await.0, StatusCode::OK);
    // Signed only with a token that is not the connector's: refused.
    let mut other = plivo_event(&url, &forged, "ringing");
    other["secret"] = json!("an-old-auth-token-no-longer-ours");
    assert_eq!(fx.post(&sign(&other).await).await.0, StatusCode::FORBIDDEN);

    // The Record XML's callback adds the recording to the call.
    let recording = json!({"provider": "plivo", "secret": PLIVO_TOKEN, "url": url, "form": {
        "CallUUID": uuid,
        "RecordUrl": "https://media.plivo.com/v1/Account/MAXXXXXXXXXXXXXXXXXX/Recording/2a1c5d6e-0000-4000-8000-000000000002.mp3",
        "RecordingID": "2a1c5d6e-0000-4000-8000-000000000002",
        "RecordingDuration": "41",
        "RecordingDurationMs": "41000",
        "RecordingStartMs": "1796119205000",
        "RecordingEndMs": "1796119246000",
    }});
    assert_eq!(fx.post(&sign(&recording).await).await.0, StatusCode::OK);
    let row = fx.stored(&uuid).await;
    assert!(row.recording_url.unwrap().ends_with(".mp3"));
    assert_eq!(row.call_status.as_deref(), Some("completed"));

    // Rotation with no overlap: the old token is refused at once.
    let new_file = fx.p.dir.path().join("plivo-new.secret");
    std::fs::write(&new_file, "bmV3LXBsaXZvLWF1dGgtdG9rZW4tMTIz").unwrap();
    fx.connectors(&[
        "rotate-secret",
        &id,
        "--secret-file",
        &new_file.display().to_string(),
        "--overlap-hours",
        "0",
    ])
    .await;
    let old = sign(&plivo_event(&url, &Uuid::new_v4().to_string(), "ringing")).await;
    fx.until_answered(
        &old,
        StatusCode::FORBIDDEN,
        "the rotation to reach the gateway",
    )
    .await;
    let mut new = plivo_event(&url, &Uuid::new_v4().to_string(), "ringing");
    new["secret"] = json!("bmV3LXBsaXZvLWF1dGgtdG9rZW4tMTIz");
    assert_eq!(fx.post(&sign(&new).await).await.0, StatusCode::OK);

    fx.connectors(&["revoke", &id]).await;
    let late = sign(&new).await;
    fx.until_answered(
        &late,
        StatusCode::UNAUTHORIZED,
        "the revocation to reach the gateway",
    )
    .await;
    fx.other_posts(5).await;
    assert!(fx.row(&forged).await.is_none());
    fx.finish(&["\"duration_seconds\":4242", &forged]).await;
}

// ---------------------------------------------------------------------------- Vonage

const VONAGE_SECRET: &str = "vonage-signature-secret-0123456789abcdef";
/// The application the signer's tokens name (`application_id`), which the connector is
/// bound to.
pub(crate) const VONAGE_APP: &str = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab";

fn vonage_event(url: &str, uuid: &str, status: &str) -> Value {
    let mut body = json!({
        "uuid": uuid,
        "conversation_uuid": format!("CON-{uuid}"),
        "from": "14155550100",
        "to": "919876543210",
        "status": status,
        "direction": "outbound",
        "timestamp": "2026-12-01T10:00:47.000Z",
    });
    if status == "completed" {
        body["duration"] = json!("42");
        body["start_time"] = json!("2026-12-01T10:00:05.000Z");
        body["end_time"] = json!("2026-12-01T10:00:47.000Z");
        body["rate"] = json!("0.00450000");
        body["price"] = json!("0.00315000");
        body["network"] = json!("40410");
    }
    json!({"provider": "vonage", "secret": VONAGE_SECRET, "url": url, "json": body})
}

const VONAGE: ProviderCase = ProviderCase {
    provider: "vonage",
    secret: Some(VONAGE_SECRET),
    create: &["--application", VONAGE_APP],
    event: vonage_event,
    call_id: || Uuid::new_v4().to_string(),
    ok: StatusCode::NO_CONTENT,
    caller: "+14155550100",
    recipient: "+919876543210",
    start: "2026-12-01T10:00:05+00:00",
    // The body altered after signing: its hash no longer matches the token's.
    forge: |s| s.body = s.body.replace("\"42\"", "\"4242\""),
    forged: StatusCode::FORBIDDEN,
    // Vonage's words for the lifecycle: started, ringing, answered, completed.
    shuffled: [
        &["completed", "answered", "ringing", "started"],
        &["ringing", "completed", "started", "answered"],
    ],
    words: &[
        ("unanswered", "no-answer"),
        ("rejected", "failed"),
        ("timeout", "no-answer"),
    ],
};

#[tokio::test]
async fn vonage_callbacks_are_checked_and_stored() {
    let (mut fx, id, url, forged) = every_provider(&VONAGE).await;
    let uuid = Uuid::new_v4().to_string();
    let signed = sign(&vonage_event(&url, &uuid, "completed")).await;
    assert_eq!(fx.post(&signed).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        fx.stored(&uuid).await.call_details.unwrap()["network"],
        "40410"
    );
    // No token; a token signed with another secret; an expired one; an old one without exp.
    let mut none = sign(&vonage_event(&url, &forged, "completed")).await;
    none.headers.clear();
    assert_eq!(fx.post(&none).await.0, StatusCode::UNAUTHORIZED);
    let mut other = vonage_event(&url, &forged, "completed");
    other["secret"] = json!("not-the-signature-secret-of-this-account");
    assert_eq!(fx.post(&sign(&other).await).await.0, StatusCode::FORBIDDEN);
    let now = Utc::now().timestamp();
    let mut expired = vonage_event(&url, &forged, "completed");
    expired["claims"] = json!({"iat": now - 600, "exp": now - 300});
    let (status, body) = fx.post(&sign(&expired).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("expired"), "{body}");
    let mut stale = vonage_event(&url, &forged, "completed");
    stale["claims"] = json!({"iat": now - 3600});
    assert_eq!(fx.post(&sign(&stale).await).await.0, StatusCode::FORBIDDEN);

    // A record action's event names the conversation, not the leg, and Vonage signs the
    // body only: a `?uuid=` on the eventUrl is not signed, so it is not taken (it would
    // move a recording onto any call). The recording lands on the conversation's row.
    let recording = json!({"provider": "vonage", "secret": VONAGE_SECRET, "url": format!("{url}?uuid={uuid}&duration=3600"), "json": {
        "start_time": "2026-12-01T10:00:05.000Z",
        "recording_url": "https://api.nexmo.com/v1/files/aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "size": 12222,
        "recording_uuid": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "end_time": "2026-12-01T10:00:47.000Z",
        "conversation_uuid": format!("CON-{uuid}"),
        "timestamp": "2026-12-01T10:00:48.000Z",
    }});
    assert_eq!(
        fx.post(&sign(&recording).await).await.0,
        StatusCode::NO_CONTENT
    );
    let conversation = fx.stored(&format!("CON-{uuid}")).await;
    assert_eq!(
        conversation.recording_url.as_deref(),
        Some("https://api.nexmo.com/v1/files/aaaaaaaa-bbbb-cccc-dddd-0123456789ab")
    );
    assert_eq!(
        conversation.duration_seconds, None,
        "the URL's duration is unsigned"
    );
    let call = fx.stored(&uuid).await;
    assert_eq!(call.recording_url, None, "the URL's uuid is unsigned");
    assert_eq!(call.call_status.as_deref(), Some("completed"));

    fx.connectors(&["revoke", &id]).await;
    let late = sign(&vonage_event(&url, &Uuid::new_v4().to_string(), "ringing")).await;
    fx.until_answered(
        &late,
        StatusCode::UNAUTHORIZED,
        "the revocation to reach the gateway",
    )
    .await;
    fx.other_posts(5).await;
    assert!(fx.row(&forged).await.is_none());
    fx.finish(&["\"duration_seconds\":4242", &forged]).await;
}

// ---------------------------------------------------------------------------- Exotel

fn exotel_event(url: &str, sid: &str, status: &str) -> Value {
    let mut form = json!({
        "CallSid": sid,
        "Status": status,
        "DateUpdated": "2026-12-01 15:30:47",
        "EventType": if status == "in-progress" { "answered" } else { "terminal" },
        "DateCreated": "2026-12-01 15:29:58",
        "From": "08012345678",
        "To": "09876543210",
        "PhoneNumberSid": "08047112233",
        "StartTime": "2026-12-01 15:30:00",
        "Direction": "outbound-api",
        "CustomField": "campaign-7",
        "Legs[0][Status]": status,
        "Legs[0][AnsweredBy]": "HUMAN",
    });
    if status == "completed" {
        form["EndTime"] = json!("2026-12-01 15:30:47");
        form["ConversationDuration"] = json!("42");
        form["Legs[0][OnCallDuration]"] = json!("45");
        form["RecordingUrl"] =
            json!("https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme/b6cfaf0ca3c8.mp3");
    }
    json!({"provider": "exotel", "secret": "", "url": url, "form": form})
}

const EXOTEL: ProviderCase = ProviderCase {
    provider: "exotel",
    secret: None,
    create: &["--country", "IN"],
    event: exotel_event,
    call_id: || call_id(""),
    ok: StatusCode::OK,
    // Domestic numbers, made E.164 by the connector's country.
    caller: "+918012345678",
    recipient: "+919876543210",
    // Exotel's times are IST.
    start: "2026-12-01T10:00:00+00:00",
    // Exotel signs nothing: the URL's token is the credential. Another token: refused.
    forge: |s| {
        let token = s.url.rsplit('/').next().unwrap().to_owned();
        s.url = s.url.replace(&token, &"x".repeat(token.len()));
    },
    forged: StatusCode::FORBIDDEN,
    // Answered and terminal, either way round.
    shuffled: [&["completed", "in-progress"], &["in-progress", "completed"]],
    words: &[],
};

#[tokio::test]
async fn exotel_callbacks_are_checked_by_token_and_network() {
    let (mut fx, id, url, forged) = every_provider(&EXOTEL).await;
    let token = url.rsplit('/').next().unwrap().to_owned();
    assert!(token.len() >= 32, "{url}");
    let sid = call_id("");
    assert_eq!(
        fx.post(&sign(&exotel_event(&url, &sid, "completed")).await)
            .await
            .0,
        StatusCode::OK
    );
    let row = fx.stored(&sid).await;
    assert!(row.recording_url.unwrap().ends_with("b6cfaf0ca3c8.mp3"));
    let details = row.call_details.unwrap();
    assert_eq!(details["CustomField"], "campaign-7");
    assert_eq!(details["Legs[0][AnsweredBy]"], "HUMAN");

    // No token at all: refused.
    let bare = sign(&exotel_event(
        &format!("{PUBLIC}/v1/callbacks/{id}"),
        &forged,
        "completed",
    ))
    .await;
    assert_eq!(fx.post(&bare).await.0, StatusCode::UNAUTHORIZED);

    // A connector limited to a network the test's loopback is not in: refused; one
    // limited to loopback: taken.
    let (_, far) = fx
        .create("exotel", None, &["--allow-network", "203.0.113.0/24"])
        .await;
    assert_eq!(
        fx.post(&sign(&exotel_event(&far, &forged, "busy")).await)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (_, near) = fx
        .create("exotel", None, &["--allow-network", "127.0.0.0/8"])
        .await;
    let sid3 = call_id("");
    assert_eq!(
        fx.post(&sign(&exotel_event(&near, &sid3, "busy")).await)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(fx.stored(&sid3).await.call_status.as_deref(), Some("busy"));

    // Rotating the token: the new URL works at once, the old during the overlap.
    let out = fx.connectors(&["rotate-secret", &id]).await;
    let new_url = out.lines().last().unwrap().to_owned();
    assert_ne!(new_url, url);
    let sid4 = call_id("");
    let via_new = sign(&exotel_event(&new_url, &sid4, "no-answer")).await;
    fx.until_answered(
        &via_new,
        StatusCode::OK,
        "the rotation to reach the gateway",
    )
    .await;
    assert_eq!(
        fx.post(&sign(&exotel_event(&url, &call_id(""), "busy")).await)
            .await
            .0,
        StatusCode::OK
    );

    fx.connectors(&["revoke", &id]).await;
    fx.until_answered(
        &via_new,
        StatusCode::UNAUTHORIZED,
        "the revocation to reach the gateway",
    )
    .await;
    fx.other_posts(5).await;
    assert!(fx.row(&forged).await.is_none());
    fx.finish(&[&forged]).await;
}

/// A gateway without the secrets key cannot check a connector's callbacks: 503 (the
/// provider retries), not a 2xx for a callback it could not verify; and the key file's
/// fingerprint mismatch is what the log says.
#[tokio::test]
async fn a_gateway_without_the_secrets_key_answers_503() {
    let fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (id, url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let keyless = TestGateway::start(&fx.p.nats.url()).await;
    let cache = keyless.state.connectors.clone();
    eventually(
        Duration::from_secs(5),
        "the connector to reach the keyless gateway",
        || {
            let cache = cache.clone();
            let id = id.clone();
            async move { cache.get(&id).map(|_| ()) }
        },
    )
    .await;
    let signed = sign(&twilio_event(&url, &call_id("CA"), "completed")).await;
    let (status, body) = send(&keyless.http, &keyless.base(), PUBLIC, &signed, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // The operator sees why: the status page counts the connector as unusable.
    let page = keyless.get("/status").await.1;
    assert!(
        page.contains(r#"<span id="connectors-unusable">1</span>"#),
        "{page}"
    );
    let ready: Value = keyless.get_json("/readyz").await.1;
    assert_eq!(ready["connectors_loaded"], true);
    assert_eq!(ready["connectors"], 1);
    keyless.stop().await;
    fx.finish(&[]).await;
}

/// A refused callback is logged with the connector and the reason, never the secret, the
/// signature or an Exotel URL's token (the real binary, its log read back).
#[tokio::test]
async fn refusals_are_logged_without_secrets_signatures_or_tokens() {
    let fx = Connectors::start(crate::GATEWAY_BIN).await;
    let (twilio, twilio_url) = fx.create("twilio", Some(TWILIO_TOKEN), &[]).await;
    let (exotel, exotel_url) = fx.create("exotel", None, &[]).await;
    let token = exotel_url.rsplit('/').next().unwrap().to_owned();
    let port = callcap_tests::free_port();
    let log = fx.p.dir.path().join("gateway.log");
    let mut gw = callcap_tests::pipeline::Process::gateway_logged(
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
    let valid = sign(&twilio_event(&twilio_url, &call_id("CA"), "ringing")).await;
    eventually(
        Duration::from_secs(20),
        "the gateway binary to take callbacks",
        || async {
            (send(&http, &base, PUBLIC, &valid, &[]).await.0 == StatusCode::NO_CONTENT)
                .then_some(())
        },
    )
    .await;
    let mut forged = sign(&twilio_event(&twilio_url, &call_id("CA"), "completed")).await;
    forged.body = forged.body.replace("CallDuration=42", "CallDuration=4242");
    assert_eq!(
        send(&http, &base, PUBLIC, &forged, &[]).await.0,
        StatusCode::FORBIDDEN
    );
    let wrong = "w".repeat(token.len());
    let wrong_token = sign(&exotel_event(
        &exotel_url.replace(&token, &wrong),
        &call_id(""),
        "busy",
    ))
    .await;
    assert_eq!(
        send(&http, &base, PUBLIC, &wrong_token, &[]).await.0,
        StatusCode::FORBIDDEN
    );
    let good = sign(&exotel_event(&exotel_url, &call_id(""), "busy")).await;
    assert_eq!(
        send(&http, &base, PUBLIC, &good, &[]).await.0,
        StatusCode::OK
    );
    gw.terminate();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("provider callback refused"), "{logged}");
    assert!(
        logged.contains(&twilio) && logged.contains(&exotel),
        "{logged}"
    );
    let signature = &forged.headers["X-Twilio-Signature"];
    for secret in [
        TWILIO_TOKEN,
        signature.as_str(),
        token.as_str(),
        wrong.as_str(),
    ] {
        assert!(
            !logged.contains(secret),
            "the log holds {secret:?}:\n{logged}"
        );
    }
    fx.finish(&[]).await;
}
