//! Validation: untrusted JSON in, a [`CallRecord`] or a list of field errors out.
//!
//! One place for every rule of the API document's field tables and for the size bounds,
//! used by the gateway (single and batch posts) and by the worker on every stream message.
//! The record's known fields are read straight from the JSON into [`Incoming`] (unknown
//! fields skipped without being kept, the way the API document's clients may send more
//! than it lists) and each is checked on its own, so that each failing field is named;
//! choosing status codes is the gateway's job. `null` counts as absent.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::record::{CallRecord, CallStatus, Outcome};

/// Longest accepted `notes`, in bytes.
pub const MAX_NOTES_BYTES: usize = 16 * 1024;
/// Longest accepted `call_details`, in bytes of compact JSON.
pub const MAX_CALL_DETAILS_BYTES: usize = 32 * 1024;
/// Longest accepted phone number.
pub const MAX_PHONE_BYTES: usize = 64;
/// Longest accepted `external_call_id`.
pub const MAX_EXTERNAL_ID_BYTES: usize = 255;
/// Longest accepted `external_system`.
pub const MAX_EXTERNAL_SYSTEM_BYTES: usize = 100;
/// Longest accepted `recording_url`.
pub const MAX_URL_BYTES: usize = 2048;
/// Deepest accepted nesting of `call_details` (the object itself is level 1).
///
/// The one nesting limit of the pipeline. The gateway's JSON parser stops at 128 levels
/// and the worker reads the record two levels down inside the stream envelope, so without
/// this limit a record nested just under the parser's limit got 201 and could then never be
/// decoded by the worker. 32 leaves room for any envelope and for a batch body's wrapping.
pub const MAX_CALL_DETAILS_DEPTH: usize = 32;

/// One rejected field and a sentence that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The payload field at fault.
    pub field: String,
    /// A human sentence that starts with the field name.
    pub message: String,
}

/// Why a payload was refused: every field at fault, in payload-table order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct ValidationError {
    pub errors: Vec<FieldError>,
}

impl ValidationError {
    /// A single-field error.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ValidationError {
            errors: vec![FieldError {
                field: field.to_owned(),
                message: message.into(),
            }],
        }
    }

    /// The sentence for the API's `message`: the field errors joined by `; `, so a lone
    /// missing `company_id` reads exactly `company_id is required`.
    pub fn message(&self) -> String {
        self.errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Never retryable: the same payload fails the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Validates a parsed JSON body.
///
/// # Errors
/// A [`ValidationError`] naming every field that breaks a rule; a body that is not a JSON
/// object is reported against the field `body`.
pub fn validate(body: &Value) -> Result<CallRecord, ValidationError> {
    match body {
        Value::Object(obj) => validate_object(obj),
        _ => Err(ValidationError::field(
            "body",
            "request body must be a JSON object",
        )),
    }
}

/// Validates one JSON object against the API document's field tables.
///
/// # Errors
/// See [`validate`].
pub fn validate_object(obj: &Map<String, Value>) -> Result<CallRecord, ValidationError> {
    Incoming::from_object(obj).validate()
}

/// The names of the record's fields, in the API document's table order.
const FIELD_NAMES: [&str; 19] = [
    "company_id",
    "lead_id",
    "employee_id",
    "outcome",
    "notes",
    "call_date",
    "caller_number",
    "recipient_number",
    "duration_seconds",
    "recording_url",
    "call_status",
    "start_time",
    "end_time",
    "external_call_id",
    "external_system",
    "next_follow_up",
    "next_follow_up_time",
    "auto_call_followup",
    "call_details",
];

/// The known fields of one record as sent, not yet checked: what deserializing a record
/// object yields without building a map of every key (unknown fields are skipped, a
/// repeated key keeps its last value, as in a parsed object). Only a JSON object
/// deserializes into it.
#[derive(Debug, Default, Clone)]
pub struct Incoming {
    slots: [Option<Value>; FIELD_NAMES.len()],
}

impl Incoming {
    /// The known fields of an already-parsed object.
    pub fn from_object(obj: &Map<String, Value>) -> Self {
        let mut incoming = Incoming::default();
        for (slot, name) in incoming.slots.iter_mut().zip(FIELD_NAMES) {
            *slot = obj.get(name).cloned();
        }
        incoming
    }

    /// Checks every field against the API document's field tables.
    ///
    /// # Errors
    /// See [`validate`].
    pub fn validate(self) -> Result<CallRecord, ValidationError> {
        validate_fields(Fields {
            slots: self.slots,
            errors: Vec::new(),
        })
    }
}

impl<'de> serde::Deserialize<'de> for Incoming {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = Incoming;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Incoming, A::Error> {
                let mut incoming = Incoming::default();
                while let Some(FieldName(slot)) = map.next_key()? {
                    match slot {
                        Some(i) => incoming.slots[i] = Some(map.next_value()?),
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(incoming)
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

/// A key of a record object: the index of a known field, `None` for any other key.
struct FieldName(Option<usize>);

impl<'de> serde::Deserialize<'de> for FieldName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = FieldName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<FieldName, E> {
                Ok(FieldName(FIELD_NAMES.iter().position(|n| *n == key)))
            }
        }
        deserializer.deserialize_str(Key)
    }
}

fn validate_fields(mut f: Fields) -> Result<CallRecord, ValidationError> {
    let company_id = f.uuid("company_id");
    if company_id.is_none() && f.errors.is_empty() {
        f.fail("company_id", "company_id is required");
    }
    let record = CallRecord {
        company_id: company_id.unwrap_or_default(),
        lead_id: f.uuid("lead_id"),
        employee_id: f.uuid("employee_id"),
        outcome: f.one_of(
            "outcome",
            Outcome::parse,
            &Outcome::ALL.map(Outcome::as_str),
        ),
        notes: f.string("notes", MAX_NOTES_BYTES),
        call_date: f.timestamp("call_date"),
        caller_number: f.no_controls("caller_number", MAX_PHONE_BYTES),
        recipient_number: f.no_controls("recipient_number", MAX_PHONE_BYTES),
        duration_seconds: f.duration("duration_seconds"),
        recording_url: f.url("recording_url"),
        call_status: f.one_of(
            "call_status",
            CallStatus::parse,
            &CallStatus::ALL.map(CallStatus::as_str),
        ),
        start_time: f.timestamp("start_time"),
        end_time: f.timestamp("end_time"),
        external_call_id: f.identifier("external_call_id", MAX_EXTERNAL_ID_BYTES),
        external_system: f.identifier("external_system", MAX_EXTERNAL_SYSTEM_BYTES),
        next_follow_up: f.date("next_follow_up"),
        next_follow_up_time: f.time("next_follow_up_time"),
        auto_call_followup: f.boolean("auto_call_followup"),
        call_details: f.details("call_details"),
    };
    if let (Some(start), Some(end)) = (record.start_time, record.end_time) {
        if end < start {
            f.fail("end_time", "end_time must not be before start_time");
        }
    }
    if f.errors.is_empty() {
        Ok(record)
    } else {
        Err(ValidationError { errors: f.errors })
    }
}

/// Reads fields off the object, collecting one error per bad field.
struct Fields {
    slots: [Option<Value>; FIELD_NAMES.len()],
    errors: Vec<FieldError>,
}

impl Fields {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// The field's value, taken (each field is read once), with `null` read as absent.
    fn get(&mut self, field: &str) -> Option<Value> {
        let i = FIELD_NAMES.iter().position(|n| *n == field)?;
        self.slots[i].take().filter(|v| !v.is_null())
    }

    /// A string field; `expected` completes "<field> must be …" when it is not a string.
    fn str_of(&mut self, field: &str, expected: &str) -> Option<String> {
        match self.get(field)? {
            Value::String(s) => Some(s),
            _ => {
                self.fail(field, format!("{field} must be {expected}"));
                None
            }
        }
    }

    fn string(&mut self, field: &str, max_bytes: usize) -> Option<String> {
        let s = self.str_of(field, "a string")?;
        if s.len() > max_bytes {
            self.fail(field, format!("{field} must be at most {max_bytes} bytes"));
            return None;
        }
        if s.contains('\0') {
            self.fail(field, format!("{field} must not contain NUL characters"));
            return None;
        }
        Some(s)
    }

    /// A string without control characters (U+0000-U+001F, U+007F-U+009F).
    fn no_controls(&mut self, field: &str, max_bytes: usize) -> Option<String> {
        let s = self.string(field, max_bytes)?;
        if s.chars().any(char::is_control) {
            self.fail(
                field,
                format!("{field} must not contain control characters"),
            );
            return None;
        }
        Some(s)
    }

    /// A part of the record's identity: non-empty and without control characters, so the
    /// separator the id derivation joins the parts with (U+001F) can never occur in one
    /// and two different calls can never derive the same `call_history_id`.
    fn identifier(&mut self, field: &str, max_bytes: usize) -> Option<String> {
        let s = self.no_controls(field, max_bytes)?;
        if s.trim().is_empty() {
            self.fail(field, format!("{field} must not be empty"));
            return None;
        }
        Some(s)
    }

    fn uuid(&mut self, field: &str) -> Option<Uuid> {
        let s = self.str_of(field, "a UUID string")?;
        match Uuid::try_parse(&s) {
            Ok(id) => Some(id),
            Err(_) => {
                self.fail(field, format!("{field} must be a valid UUID"));
                None
            }
        }
    }

    fn one_of<T>(
        &mut self,
        field: &str,
        parse: fn(&str) -> Option<T>,
        allowed: &[&str],
    ) -> Option<T> {
        let s = self.str_of(field, "a string")?;
        let parsed = parse(&s);
        if parsed.is_none() {
            self.fail(
                field,
                format!("{field} must be one of: {}", allowed.join(", ")),
            );
        }
        parsed
    }

    fn timestamp(&mut self, field: &str) -> Option<DateTime<Utc>> {
        let s = self.str_of(field, "an ISO 8601 (RFC 3339) timestamp string")?;
        // One rule for both trust boundaries: what is read here is written so that it is
        // read back to the same instant (see `timestamp`).
        let parsed = crate::timestamp::parse(&s);
        if parsed.is_none() {
            self.fail(
                field,
                format!("{field} must be an RFC 3339 timestamp such as 2025-11-25T10:30:00Z, within years 0000-9999"),
            );
        }
        parsed
    }

    fn date(&mut self, field: &str) -> Option<NaiveDate> {
        let s = self.str_of(field, "a date string (YYYY-MM-DD)")?;
        let parsed = crate::timestamp::parse_date(&s);
        if parsed.is_none() {
            self.fail(
                field,
                format!("{field} must be a date in the form YYYY-MM-DD"),
            );
        }
        parsed
    }

    fn time(&mut self, field: &str) -> Option<NaiveTime> {
        let s = self.str_of(field, "a time string (HH:MM:SS)")?;
        let parsed = (s.len() == 8)
            .then(|| NaiveTime::parse_from_str(&s, "%H:%M:%S").ok())
            .flatten();
        if parsed.is_none() {
            self.fail(
                field,
                format!("{field} must be a time in the form HH:MM:SS"),
            );
        }
        parsed
    }

    fn duration(&mut self, field: &str) -> Option<i32> {
        let value = self.get(field)?;
        // A whole number written with a fraction (`30.0`, as some languages serialize
        // numbers) is that integer, as JSON Schema's `integer` says.
        let whole = value.as_i64().or_else(|| {
            value
                .as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(i32::MAX)).contains(f))
                .map(|f| f as i64)
        });
        let parsed = whole
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n >= 0);
        if parsed.is_none() {
            self.fail(
                field,
                format!(
                    "{field} must be a non-negative integer (at most {})",
                    i32::MAX
                ),
            );
        }
        parsed
    }

    fn boolean(&mut self, field: &str) -> Option<bool> {
        match self.get(field)? {
            Value::Bool(b) => Some(b),
            _ => {
                self.fail(field, format!("{field} must be true or false"));
                None
            }
        }
    }

    /// An absolute http(s) URL, returned in its parsed (normalised) form: what is stored
    /// is exactly what was validated. Control characters are refused outright rather than
    /// silently dropped by the URL parser (a CR LF inside a URL is an injection attempt).
    fn url(&mut self, field: &str) -> Option<String> {
        let s = self.string(field, MAX_URL_BYTES)?;
        let parsed = if s.chars().any(char::is_control) {
            None
        } else {
            url::Url::parse(&s)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        };
        let Some(u) = parsed else {
            self.fail(field, format!("{field} must be an absolute http(s) URL"));
            return None;
        };
        if u.as_str().len() > MAX_URL_BYTES {
            self.fail(
                field,
                format!("{field} must be at most {MAX_URL_BYTES} bytes"),
            );
            return None;
        }
        Some(u.into())
    }

    fn details(&mut self, field: &str) -> Option<Map<String, Value>> {
        let value = self.get(field)?;
        let problem = if !value.is_object() {
            Some(format!("{field} must be a JSON object"))
        } else if json_len(&value) > MAX_CALL_DETAILS_BYTES {
            Some(format!(
                "{field} must be at most {MAX_CALL_DETAILS_BYTES} bytes of JSON"
            ))
        } else if depth(&value) > MAX_CALL_DETAILS_DEPTH {
            Some(format!(
                "{field} must not be nested more than {MAX_CALL_DETAILS_DEPTH} levels deep"
            ))
        } else if contains_nul(&value) {
            // Postgres jsonb cannot hold U+0000; refuse it here rather than dead-letter it later.
            Some(format!("{field} must not contain NUL characters"))
        } else {
            None
        };
        match (problem, value) {
            (None, Value::Object(map)) => Some(map),
            (Some(message), _) => {
                self.fail(field, message);
                None
            }
            (None, _) => unreachable!("a value that is not an object has a problem"),
        }
    }
}

/// Length of a value's compact JSON, counted without building it.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, v) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Nesting depth of a JSON value: 0 for a scalar, 1 for a flat object or array.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    const COMPANY: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn err_fields(v: Value) -> Vec<String> {
        validate(&v)
            .expect_err("payload should be refused")
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn missing_company_id_has_the_documented_message() {
        let e = validate(&json!({"notes": "x"})).unwrap_err();
        assert_eq!(e.message(), "company_id is required");
        let e = validate(&json!({"company_id": null})).unwrap_err();
        assert_eq!(e.message(), "company_id is required");
    }

    #[test]
    fn complete_record_from_the_api_document_is_accepted() {
        let company = Uuid::parse_str(COMPANY).unwrap();
        let r = validate(&crate::examples::complete(company, "CALL-12345")).unwrap();
        assert_eq!(r.duration_seconds, Some(320));
        assert_eq!(r.outcome, Some(Outcome::FollowUp));
        assert_eq!(r.call_status, Some(CallStatus::Completed));
        assert_eq!(r.next_follow_up_time.unwrap().to_string(), "14:00:00");
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            (json!({"company_id": "nope"}), "company_id"),
            (json!({"company_id": 5}), "company_id"),
            (json!({"company_id": COMPANY, "lead_id": "x"}), "lead_id"),
            (
                json!({"company_id": COMPANY, "employee_id": "x"}),
                "employee_id",
            ),
            (
                json!({"company_id": COMPANY, "outcome": "maybe"}),
                "outcome",
            ),
            (
                json!({"company_id": COMPANY, "call_status": "done"}),
                "call_status",
            ),
            (
                json!({"company_id": COMPANY, "duration_seconds": -1}),
                "duration_seconds",
            ),
            (
                json!({"company_id": COMPANY, "duration_seconds": 1.5}),
                "duration_seconds",
            ),
            (
                json!({"company_id": COMPANY, "duration_seconds": "60"}),
                "duration_seconds",
            ),
            (
                json!({"company_id": COMPANY, "duration_seconds": 1_u64 << 40}),
                "duration_seconds",
            ),
            (
                json!({"company_id": COMPANY, "call_date": "yesterday"}),
                "call_date",
            ),
            (
                json!({"company_id": COMPANY, "start_time": "2025-11-25 10:30"}),
                "start_time",
            ),
            (
                json!({"company_id": COMPANY, "next_follow_up": "27/11/2025"}),
                "next_follow_up",
            ),
            (
                json!({"company_id": COMPANY, "next_follow_up": "2025-2-30"}),
                "next_follow_up",
            ),
            (
                json!({"company_id": COMPANY, "next_follow_up_time": "14:00"}),
                "next_follow_up_time",
            ),
            (
                json!({"company_id": COMPANY, "next_follow_up_time": "25:00:00"}),
                "next_follow_up_time",
            ),
            (
                json!({"company_id": COMPANY, "recording_url": "/rec/1.mp3"}),
                "recording_url",
            ),
            (
                json!({"company_id": COMPANY, "recording_url": "ftp://x/1.mp3"}),
                "recording_url",
            ),
            (
                json!({"company_id": COMPANY, "call_details": [1]}),
                "call_details",
            ),
            (
                json!({"company_id": COMPANY, "call_details": {"k": "a\u{0}b"}}),
                "call_details",
            ),
            (
                json!({"company_id": COMPANY, "external_call_id": "X\u{1f}Y"}),
                "external_call_id",
            ),
            (
                json!({"company_id": COMPANY, "external_system": "sysA\n"}),
                "external_system",
            ),
            (
                json!({"company_id": COMPANY, "caller_number": "+1555\r\n"}),
                "caller_number",
            ),
            (
                json!({"company_id": COMPANY, "recording_url": "https://x.example/a\r\nSet-Cookie: y"}),
                "recording_url",
            ),
            (
                json!({"company_id": COMPANY, "call_details": nested(MAX_CALL_DETAILS_DEPTH + 1)}),
                "call_details",
            ),
            (
                json!({"company_id": COMPANY, "auto_call_followup": "yes"}),
                "auto_call_followup",
            ),
            (
                json!({"company_id": COMPANY, "external_call_id": ""}),
                "external_call_id",
            ),
            (json!({"company_id": COMPANY, "notes": "a\u{0}"}), "notes"),
            (
                json!({"company_id": COMPANY, "caller_number": "1".repeat(65)}),
                "caller_number",
            ),
            (
                json!({"company_id": COMPANY, "notes": "n".repeat(MAX_NOTES_BYTES + 1)}),
                "notes",
            ),
            (
                json!({"company_id": COMPANY, "start_time": "2025-11-25T10:35:00Z", "end_time": "2025-11-25T10:30:00Z"}),
                "end_time",
            ),
        ];
        for (payload, field) in cases {
            let fields = err_fields(payload.clone());
            assert_eq!(fields, vec![field.to_string()], "payload {payload}");
            let msg = validate(&payload).unwrap_err().message();
            assert!(
                msg.starts_with(field),
                "message {msg:?} should name {field}"
            );
        }
    }

    #[test]
    fn timestamps_accept_fractions_and_offsets() {
        let r = validate(&json!({
            "company_id": COMPANY,
            "call_date": "2025-11-25T10:30:00.123456Z",
            "start_time": "2025-11-25T16:00:00+05:30",
            "end_time": "2025-11-25T10:31:00Z",
        }))
        .unwrap();
        assert_eq!(
            r.start_time.unwrap().to_rfc3339(),
            "2025-11-25T10:30:00+00:00"
        );
    }

    #[test]
    fn nulls_are_absent_and_unknown_fields_ignored() {
        let r = validate(&json!({"company_id": COMPANY, "notes": null, "lead_name": "x"})).unwrap();
        assert_eq!(r, CallRecord::new(Uuid::parse_str(COMPANY).unwrap()));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let fields = err_fields(json!({"outcome": "x", "duration_seconds": -5}));
        assert_eq!(fields, ["company_id", "outcome", "duration_seconds"]);
    }

    #[test]
    fn non_objects_are_refused() {
        for v in [json!([]), json!("x"), json!(1), json!(null)] {
            assert_eq!(err_fields(v), ["body"]);
        }
    }

    /// An object nested `levels` deep: `{"a":{"a":…{}}}`.
    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn call_details_depth_is_bounded_at_the_limit() {
        let ok = json!({"company_id": COMPANY, "call_details": nested(MAX_CALL_DETAILS_DEPTH)});
        assert!(validate(&ok).is_ok());
        let deep =
            json!({"company_id": COMPANY, "call_details": nested(MAX_CALL_DETAILS_DEPTH + 1)});
        assert_eq!(err_fields(deep), ["call_details"]);
    }

    #[test]
    fn timestamps_keep_the_precision_postgres_stores() {
        let r = validate(&json!({"company_id": COMPANY, "start_time": "2025-11-25T10:30:00.123456789Z", "end_time": "2025-12-31T23:59:60.5Z"}))
            .unwrap();
        assert_eq!(
            r.start_time.unwrap().to_rfc3339(),
            "2025-11-25T10:30:00.123456+00:00"
        );
        assert_eq!(
            r.end_time.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00.500+00:00"
        );
    }

    #[test]
    fn recording_url_is_stored_as_validated() {
        let r = validate(
            &json!({"company_id": COMPANY, "recording_url": "HTTPS://Rec.Example.com/a b.mp3"}),
        )
        .unwrap();
        assert_eq!(
            r.recording_url.as_deref(),
            Some("https://rec.example.com/a%20b.mp3")
        );
    }

    /// What the gateway and the worker do with bytes: read them into [`Incoming`].
    fn from_bytes(text: &str) -> Option<Result<CallRecord, ValidationError>> {
        serde_json::from_str::<Incoming>(text)
            .ok()
            .map(Incoming::validate)
    }

    #[test]
    fn reading_bytes_straight_into_fields_matches_the_parsed_object() {
        let company = Uuid::parse_str(COMPANY).unwrap();
        let complete = crate::examples::complete(company, "CALL-1").to_string();
        assert_eq!(
            from_bytes(&complete),
            Some(validate(&serde_json::from_str(&complete).unwrap()))
        );
        // A repeated key keeps its last value, as in a parsed object; unknown fields of any
        // shape are skipped; null is absent; escaped keys are still recognised.
        let text = format!(
            r#"{{"notes":"first","company_id":"{COMPANY}","extra":{{"deep":[1,{{"x":null}}]}},"notes":"last","lead_id":null,"dura\u0074ion_seconds":5}}"#
        );
        let record = from_bytes(&text).unwrap().unwrap();
        assert_eq!(record.notes.as_deref(), Some("last"));
        assert_eq!(record.duration_seconds, Some(5));
        assert_eq!(
            Some(Ok(record)),
            Some(validate(&serde_json::from_str(&text).unwrap()))
        );
        // Field errors are the same, named the same.
        let bad = r#"{"company_id":"nope","duration_seconds":-1,"call_details":[]}"#;
        assert_eq!(
            from_bytes(bad),
            Some(validate(&serde_json::from_str(bad).unwrap()))
        );
        // Only an object is a record: an array is not read positionally.
        assert!(from_bytes(&format!(r#"["{COMPANY}"]"#)).is_none());
        assert!(from_bytes("\"x\"").is_none());
    }

    proptest::proptest! {
        // Any object text with known and unknown keys, repeated or not: reading it into
        // fields gives exactly what validating the parsed object gives.
        #[test]
        fn incoming_agrees_with_the_parsed_object(
            pairs in proptest::collection::vec(
                (proptest::sample::select(vec![
                    "company_id", "notes", "duration_seconds", "call_date", "outcome",
                    "call_details", "recording_url", "other", "auto_call_followup",
                ]),
                proptest::prop_oneof![
                    proptest::prelude::Just(Value::String(COMPANY.into())),
                    proptest::prelude::Just(Value::Null),
                    proptest::prelude::any::<i64>().prop_map(Value::from),
                    proptest::prelude::any::<bool>().prop_map(Value::from),
                    "[ -~]{0,12}".prop_map(Value::from),
                    proptest::prelude::Just(json!({"a": [1, "b", null]})),
                    proptest::prelude::Just(json!("2025-11-25T10:30:00.1234567+02:00")),
                    proptest::prelude::Just(json!("https://x.example/a b")),
                ]),
                0..10,
            ),
        ) {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::from(*k), v))
                .collect();
            let text = format!("{{{}}}", body.join(","));
            let parsed: Value = serde_json::from_str(&text).unwrap();
            proptest::prop_assert_eq!(from_bytes(&text), Some(validate(&parsed)));
        }

        // No input panics; whatever is accepted survives a serde round trip unchanged.
        #[test]
        fn arbitrary_objects_never_panic(
            keys in proptest::collection::vec("[a-z_]{1,20}", 0..8),
            vals in proptest::collection::vec(proptest::prelude::any::<String>(), 0..8),
            n in proptest::prelude::any::<i64>(),
        ) {
            let mut obj = Map::new();
            obj.insert("company_id".into(), Value::String(COMPANY.into()));
            obj.insert("duration_seconds".into(), Value::from(n));
            for (k, v) in keys.iter().zip(vals) {
                obj.insert(k.clone(), Value::String(v));
            }
            if let Ok(record) = validate_object(&obj) {
                let back: CallRecord = serde_json::from_slice(&record.canonical_json()).unwrap();
                proptest::prop_assert_eq!(back, record);
            }
        }
    }
}
