//! A provider's callback to the API's call record.
//!
//! The call's id becomes `external_call_id` (Twilio and Exotel `CallSid`, Plivo
//! `CallUUID`, Vonage `uuid`), the provider `external_system`, so every callback about one
//! call lands on one row and the merge rules decide what it keeps: a terminal status is
//! never replaced by a lifecycle one, whatever order the callbacks arrive in. Numbers go
//! to E.164 ([`callcap::phone`]), statuses to the API's set ([`status`], the README's
//! table), durations and times to the record's fields; a recording callback adds
//! `recording_url`. Every other parameter goes into `call_details`, bounded
//! ([`DETAILS_MAX_KEYS`], [`DETAILS_MAX_VALUE_BYTES`], [`DETAILS_MAX_BYTES`]).

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone as _, Utc};
use serde_json::{Map, Value};

use super::{ConnectorRecord, Provider};
use callcap::phone::{self, Country, Digits};

/// Most parameters kept in `call_details`.
pub const DETAILS_MAX_KEYS: usize = 64;
/// Longest value kept in `call_details` (bytes of its JSON); longer ones are left out.
pub const DETAILS_MAX_VALUE_BYTES: usize = 1024;
/// Most bytes of JSON in `call_details`.
pub const DETAILS_MAX_BYTES: usize = 8 * 1024;

/// Exotel's times (`YYYY-MM-DD HH:mm:ss`) are India Standard Time.
const EXOTEL_OFFSET_SECS: i32 = 5 * 3600 + 30 * 60;

/// A callback that cannot be a record (no call id): 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unmappable(pub String);

/// The API's `call_status` for a provider's status value; `None` for an event that is
/// not a call status (e.g. Vonage `machine`), kept in `call_details` as sent.
pub fn status(provider: Provider, raw: &str) -> Option<&'static str> {
    let raw = raw.trim().to_ascii_lowercase();
    Some(match (provider, raw.as_str()) {
        (_, "queued") => "queued",
        (_, "initiated") | (Provider::Vonage, "started") => "initiated",
        (_, "ringing") => "ringing",
        (_, "in-progress") | (Provider::Vonage, "answered") => "in-progress",
        (_, "completed") => "completed",
        (_, "busy") => "busy",
        (_, "no-answer") => "no-answer",
        (Provider::Plivo, "timeout") | (Provider::Vonage, "timeout" | "unanswered") => "no-answer",
        (_, "canceled") | (Provider::Plivo, "cancel") | (Provider::Vonage, "cancelled") => {
            "canceled"
        }
        (_, "failed") | (Provider::Vonage, "rejected") => "failed",
        _ => return None,
    })
}

/// The names of the parameters a provider's callback is read from (the rest go to
/// `call_details`).
struct Fields {
    id: &'static [&'static str],
    from: &'static str,
    to: &'static str,
    status: &'static str,
    duration: &'static str,
    recording: &'static [&'static str],
    digits: Digits,
}

fn fields(provider: Provider) -> Fields {
    match provider {
        Provider::Twilio => Fields {
            id: &["CallSid"],
            from: "From",
            to: "To",
            status: "CallStatus",
            duration: "CallDuration",
            recording: &["RecordingUrl"],
            digits: Digits::Domestic,
        },
        Provider::Plivo => Fields {
            id: &["CallUUID"],
            from: "From",
            to: "To",
            status: "CallStatus",
            duration: "Duration",
            recording: &["RecordUrl", "RecordingUrl"],
            digits: Digits::International,
        },
        Provider::Vonage => Fields {
            id: &["uuid", "conversation_uuid"],
            from: "from",
            to: "to",
            status: "status",
            duration: "duration",
            recording: &["recording_url"],
            digits: Digits::International,
        },
        Provider::Exotel => Fields {
            id: &["CallSid"],
            from: "From",
            to: "To",
            status: "Status",
            duration: "ConversationDuration",
            recording: &["RecordingUrl"],
            digits: Digits::Domestic,
        },
    }
}

/// A parameter as text: a string, a number, or the first of repeated values.
fn text(params: &BTreeMap<String, Value>, name: &str) -> Option<String> {
    let v = params.get(name)?;
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => match a.first()? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    let s = s.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn seconds(raw: &str) -> Option<i64> {
    let n: f64 = raw.trim().parse().ok()?;
    (n.is_finite() && n >= 0.0 && n <= f64::from(i32::MAX)).then(|| n.round() as i64)
}

/// A provider's time: RFC 3339 (Vonage), RFC 2822 (Twilio's `Timestamp`), or
/// `YYYY-MM-DD HH:MM:SS` at `offset` (Plivo: UTC; Exotel: IST).
fn time(raw: &str, offset: FixedOffset) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_rfc2822(raw) {
        return Some(t.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S").ok()?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// The record (as the API's JSON object, for the API's validation) a callback means.
///
/// # Errors
/// [`Unmappable`] when the callback names no call.
pub fn record(
    connector: &ConnectorRecord,
    params: &BTreeMap<String, Value>,
) -> Result<Map<String, Value>, Unmappable> {
    let provider = connector.provider;
    let f = fields(provider);
    let country: Option<Country> = connector.country.as_deref().and_then(phone::country);
    let offset = match provider {
        Provider::Exotel => FixedOffset::east_opt(EXOTEL_OFFSET_SECS).expect("a valid offset"),
        _ => FixedOffset::east_opt(0).expect("UTC"),
    };
    let mut used: Vec<&str> = Vec::new();
    let (id_field, call_id) =
        f.id.iter()
            .find_map(|name| text(params, name).map(|v| (*name, v)))
            .ok_or_else(|| {
                Unmappable(format!(
                    "the callback has no {} naming the call",
                    f.id.join(" or ")
                ))
            })?;
    used.push(id_field);

    let mut out = Map::new();
    out.insert(
        "company_id".into(),
        Value::String(connector.company_id.to_string()),
    );
    out.insert("external_call_id".into(), Value::String(call_id));
    out.insert(
        "external_system".into(),
        Value::String(provider.as_str().into()),
    );
    for (field, name) in [("caller_number", f.from), ("recipient_number", f.to)] {
        if let Some(n) =
            text(params, name).and_then(|raw| phone::normalize(&raw, f.digits, country))
        {
            out.insert(field.into(), Value::String(n));
            used.push(name);
        }
    }
    let status = text(params, f.status).and_then(|raw| status(provider, &raw));
    if let Some(s) = status {
        out.insert("call_status".into(), Value::String(s.into()));
        used.push(f.status);
    }
    let duration = text(params, f.duration).and_then(|d| seconds(&d));
    if let Some(d) = duration {
        out.insert("duration_seconds".into(), Value::from(d));
        used.push(f.duration);
    }
    // Twilio's recording callback says whether the recording is ready; only a finished
    // recording's URL is stored.
    let recording_ready = text(params, "RecordingStatus").is_none_or(|s| s == "completed");
    if recording_ready {
        if let Some((name, url)) = f
            .recording
            .iter()
            .find_map(|name| text(params, name).map(|v| (*name, v)))
        {
            out.insert("recording_url".into(), Value::String(url));
            used.push(name);
        }
    }
    let (start, end) = times(provider, params, status, duration, offset, &mut used);
    if let Some(t) = start {
        out.insert("start_time".into(), rfc3339(t));
    }
    if let Some(t) = end {
        out.insert("end_time".into(), rfc3339(t));
    }
    let details = details(params, &used);
    if !details.is_empty() {
        out.insert("call_details".into(), Value::Object(details));
    }
    Ok(out)
}

/// The call's start and end: the provider's own fields where it sends them; from
/// Twilio's event `Timestamp` otherwise (answered: start; ended: end, and start = end -
/// duration).
fn times<'p>(
    provider: Provider,
    params: &'p BTreeMap<String, Value>,
    status: Option<&str>,
    duration: Option<i64>,
    offset: FixedOffset,
    used: &mut Vec<&'p str>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let mut at = |names: &[&'p str]| -> Option<DateTime<Utc>> {
        names.iter().find_map(|name| {
            let t = time(&text(params, name)?, offset)?;
            used.push(name);
            Some(t)
        })
    };
    match provider {
        Provider::Twilio => {
            let Some(ts) = at(&["Timestamp"]) else {
                return (None, None);
            };
            match status {
                Some("in-progress") => (Some(ts), None),
                Some("completed") => (
                    duration
                        .filter(|d| *d > 0)
                        .map(|d| ts - chrono::Duration::seconds(d)),
                    Some(ts),
                ),
                Some("busy" | "no-answer" | "failed" | "canceled") => (None, Some(ts)),
                _ => (None, None),
            }
        }
        Provider::Plivo => (at(&["AnswerTime", "StartTime"]), at(&["EndTime"])),
        Provider::Vonage => (at(&["start_time"]), at(&["end_time"])),
        Provider::Exotel => (at(&["StartTime"]), at(&["EndTime"])),
    }
}

/// The parameters not read into the record, bounded; `_omitted` counts what was left out.
fn details(params: &BTreeMap<String, Value>, used: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    let mut bytes = 2usize;
    let mut omitted = 0usize;
    for (name, value) in params {
        if used.contains(&name.as_str()) {
            continue;
        }
        let size = name.len() + serde_json::to_string(value).map_or(usize::MAX, |s| s.len()) + 4;
        if out.len() >= DETAILS_MAX_KEYS
            || size > DETAILS_MAX_VALUE_BYTES
            || bytes + size > DETAILS_MAX_BYTES
            || name.len() > 128
        {
            omitted += 1;
            continue;
        }
        bytes += size;
        out.insert(name.clone(), value.clone());
    }
    if omitted > 0 {
        out.insert("_omitted".into(), Value::from(omitted));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn connector(provider: Provider, country: Option<&str>) -> ConnectorRecord {
        ConnectorRecord {
            connector_id: "ctest".into(),
            company_id: Uuid::from_u128(7),
            provider,
            public_url: "https://calls.example.com".into(),
            country: country.map(str::to_owned),
            allow_networks: vec![],
            account: None,
            secrets: vec![],
            created_at: Utc::now(),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect()
    }

    #[test]
    fn twilio_completed_becomes_a_record_with_times_from_the_duration() {
        let r = record(
            &connector(Provider::Twilio, None),
            &params(&[
                ("CallSid", "CA123"),
                ("From", "+14155550100"),
                ("To", "+14155550101"),
                ("CallStatus", "completed"),
                ("CallDuration", "42"),
                ("Timestamp", "Tue, 01 Dec 2026 10:00:42 +0000"),
                ("AccountSid", "AC1"),
            ]),
        )
        .unwrap();
        assert_eq!(r["external_call_id"], "CA123");
        assert_eq!(r["external_system"], "twilio");
        assert_eq!(r["call_status"], "completed");
        assert_eq!(r["duration_seconds"], 42);
        assert_eq!(r["start_time"], "2026-12-01T10:00:00.000Z");
        assert_eq!(r["end_time"], "2026-12-01T10:00:42.000Z");
        assert_eq!(r["call_details"]["AccountSid"], "AC1");
        assert!(r["call_details"].get("CallSid").is_none());
        callcap::validate(&Value::Object(r)).unwrap();
    }

    #[test]
    fn statuses_map_to_the_api_set() {
        assert_eq!(status(Provider::Plivo, "cancel"), Some("canceled"));
        assert_eq!(status(Provider::Plivo, "timeout"), Some("no-answer"));
        assert_eq!(status(Provider::Vonage, "unanswered"), Some("no-answer"));
        assert_eq!(status(Provider::Vonage, "rejected"), Some("failed"));
        assert_eq!(status(Provider::Vonage, "answered"), Some("in-progress"));
        assert_eq!(status(Provider::Vonage, "cancelled"), Some("canceled"));
        assert_eq!(status(Provider::Vonage, "machine"), None);
        assert_eq!(status(Provider::Twilio, "no-answer"), Some("no-answer"));
        assert_eq!(status(Provider::Exotel, "busy"), Some("busy"));
        for s in [
            "queued",
            "initiated",
            "ringing",
            "in-progress",
            "completed",
            "busy",
            "no-answer",
            "canceled",
            "failed",
        ] {
            assert_eq!(status(Provider::Twilio, s), Some(s));
            assert!(callcap::CallStatus::parse(s).is_some());
        }
    }

    #[test]
    fn exotel_domestic_numbers_and_ist_times() {
        let r = record(
            &connector(Provider::Exotel, Some("IN")),
            &params(&[
                ("CallSid", "b6cfaf0ca3c8b4e6ec5a6b2d3c1e0f9a"),
                ("From", "09876543210"),
                ("To", "08012345678"),
                ("Status", "completed"),
                ("ConversationDuration", "30"),
                ("StartTime", "2026-12-01 15:30:00"),
                ("EndTime", "2026-12-01 15:30:30"),
            ]),
        )
        .unwrap();
        assert_eq!(r["caller_number"], "+919876543210");
        assert_eq!(r["recipient_number"], "+918012345678");
        assert_eq!(r["start_time"], "2026-12-01T10:00:00.000Z");
    }

    #[test]
    fn a_callback_without_a_call_id_is_unmappable_and_details_are_bounded() {
        assert!(record(&connector(Provider::Plivo, None), &params(&[("From", "1")])).is_err());
        let mut many = params(&[("CallUUID", "u1")]);
        for i in 0..200 {
            many.insert(format!("Extra{i:03}"), Value::String("x".repeat(100)));
        }
        many.insert("Huge".into(), Value::String("y".repeat(5000)));
        let r = record(&connector(Provider::Plivo, None), &many).unwrap();
        let details = r["call_details"].as_object().unwrap();
        assert!(details.len() <= DETAILS_MAX_KEYS + 1);
        assert!(serde_json::to_string(details).unwrap().len() <= DETAILS_MAX_BYTES + 32);
        assert!(details["_omitted"].as_u64().unwrap() >= 137);
        assert!(details.get("Huge").is_none());
        callcap::validate(&Value::Object(r)).unwrap();
    }

    #[test]
    fn vonage_recording_and_an_unfinished_twilio_recording() {
        let mut p = params(&[
            ("conversation_uuid", "CON-1"),
            ("recording_url", "https://api.nexmo.com/v1/files/aaaa"),
            ("end_time", "2026-12-01T10:00:30.000Z"),
            ("start_time", "2026-12-01T10:00:00.000Z"),
        ]);
        p.insert("size".into(), Value::from(1234));
        let r = record(&connector(Provider::Vonage, None), &p).unwrap();
        assert_eq!(r["external_call_id"], "CON-1");
        assert_eq!(r["recording_url"], "https://api.nexmo.com/v1/files/aaaa");
        assert_eq!(r["call_details"]["size"], 1234);
        let r = record(
            &connector(Provider::Twilio, None),
            &params(&[
                ("CallSid", "CA1"),
                ("RecordingStatus", "in-progress"),
                ("RecordingUrl", "https://api.twilio.com/x"),
            ]),
        )
        .unwrap();
        assert!(r.get("recording_url").is_none());
    }
}
