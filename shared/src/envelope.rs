//! The stream envelope: what the gateway publishes and the worker consumes.
//!
//! Versioned JSON `{v, call_history_id, received_at, key_id, request_id, record}`. A worker
//! refuses (dead-letters) a version it does not know rather than guessing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::record::CallRecord;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// One accepted call record on its way to Postgres.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Envelope version, [`ENVELOPE_VERSION`].
    pub v: u32,
    pub call_history_id: Uuid,
    /// When the gateway accepted the record; also the default `call_date`. Read with the
    /// record's own timestamp rule, so a forged one the worker could not store is refused.
    #[serde(with = "crate::timestamp::required")]
    pub received_at: DateTime<Utc>,
    /// Id of the API key that wrote the record (never the key itself).
    pub key_id: String,
    /// The HTTP request id, to follow one record through the logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub record: CallRecord,
}

/// Why a stream message could not be read as an [`Envelope`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a valid envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported envelope version {0} (this build reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion(u64),
    /// Well-formed, but not something the gateway could have published.
    #[error("refused: {0}")]
    Refused(String),
}

/// Longest `x-request-id` the gateway copies into the envelope; a longer or non-visible
/// ASCII one is replaced by a generated id (a request id is copied into every record of a
/// batch, so an unbounded one multiplies into the stream).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Whether a request id may be copied into the envelope: 1 to 128 visible ASCII characters.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Longest key id (`auth` creates `k` + 15 characters).
const MAX_KEY_ID_BYTES: usize = 64;

impl DecodeError {
    /// Never retryable: the bytes will not change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u64,
}

impl Envelope {
    /// A version-1 envelope.
    pub fn new(
        call_history_id: Uuid,
        received_at: DateTime<Utc>,
        key_id: String,
        request_id: Option<String>,
        record: CallRecord,
    ) -> Self {
        Envelope {
            v: ENVELOPE_VERSION,
            call_history_id,
            received_at,
            key_id,
            request_id,
            record,
        }
    }

    /// Serializes for publishing.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Envelope always serializes: every field is plain data")
    }

    /// Reads a stream message.
    ///
    /// # Errors
    /// [`DecodeError::UnsupportedVersion`] for another version, [`DecodeError::Malformed`]
    /// for anything that is not a well-formed version-1 envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let probe: VersionProbe = serde_json::from_slice(bytes)?;
        if probe.v != u64::from(ENVELOPE_VERSION) {
            return Err(DecodeError::UnsupportedVersion(probe.v));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Reads a stream message and checks it as the gateway would have built it; the worker
    /// trusts nothing it reads from the stream. One pass over the bytes: the record is
    /// read into [`Incoming`] and put through the gateway's own validation, so what is
    /// stored is exactly what the rules produce.
    ///
    /// # Errors
    /// As [`Envelope::decode`], and [`DecodeError::Refused`] with the reason when the
    /// subject is not the record's company's, the record breaks a rule the gateway
    /// enforces, the id is not the one the gateway derives, or a header copy is unbounded.
    pub fn decode_checked(subject: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        let received: Received = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                // Name a version this build does not read rather than its fields.
                return Err(match serde_json::from_slice::<VersionProbe>(bytes) {
                    Ok(p) if p.v != u64::from(ENVELOPE_VERSION) => {
                        DecodeError::UnsupportedVersion(p.v)
                    }
                    _ => DecodeError::Malformed(e),
                });
            }
        };
        if received.v != u64::from(ENVELOPE_VERSION) {
            return Err(DecodeError::UnsupportedVersion(received.v));
        }
        let record = received
            .record
            .validate()
            .map_err(|e| DecodeError::Refused(format!("record breaks a rule: {e}")))?;
        let envelope = Envelope::new(
            received.call_history_id,
            received.received_at,
            received.key_id,
            received.request_id,
            record,
        );
        envelope.check_origin(subject)?;
        Ok(envelope)
    }

    /// Checks an envelope already in hand as [`Envelope::decode_checked`] checks bytes:
    /// the record must re-validate to itself.
    ///
    /// # Errors
    /// [`DecodeError::Refused`] with the reason.
    pub fn check(&self, subject: &str) -> Result<(), DecodeError> {
        let as_sent = serde_json::to_value(&self.record)?;
        match crate::validate::validate(&as_sent) {
            Ok(record) if record == self.record => {}
            Ok(_) => {
                return Err(DecodeError::Refused(
                    "record is not in the form the gateway stores".into(),
                ))
            }
            Err(e) => return Err(DecodeError::Refused(format!("record breaks a rule: {e}"))),
        }
        self.check_origin(subject)
    }

    /// Everything but the record's fields: the subject is the record's company's, the id is
    /// the one the gateway derives, the key id and request id are bounded.
    fn check_origin(&self, subject: &str) -> Result<(), DecodeError> {
        self.origin(subject).map_err(DecodeError::Refused)
    }

    fn origin(&self, subject: &str) -> Result<(), String> {
        let company = self.record.company_id;
        if crate::subjects::Lane::of_subject(subject).map(|(_, c)| c) != Some(company) {
            return Err(format!(
                "subject {subject:?} is not the record's company's ({} or {})",
                crate::subjects::Lane::Main.subject(company),
                crate::subjects::Lane::Overflow.subject(company)
            ));
        }
        let derived = crate::identity::call_history_id(&self.record, None);
        let id = self.call_history_id;
        let id_ok = if derived.deterministic {
            id == derived.id
        } else {
            // From an Idempotency-Key (v5, the key is not in the envelope) or fresh (v7).
            matches!(id.get_version_num(), 5 | 7)
        };
        if !id_ok {
            return Err(format!(
                "call_history_id {id} is not the id the gateway derives for this record"
            ));
        }
        if self.key_id.is_empty()
            || self.key_id.len() > MAX_KEY_ID_BYTES
            || !self.key_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err("key_id is not a key id".into());
        }
        if self
            .request_id
            .as_deref()
            .is_some_and(|r| !valid_request_id(r))
        {
            return Err(format!(
                "request_id must be 1 to {MAX_REQUEST_ID_BYTES} visible ASCII characters"
            ));
        }
        Ok(())
    }

    /// The record's canonical bytes (what the publish dedup id hashes) and the envelope's
    /// bytes, serializing the record once: the envelope embeds the same bytes. Equal to
    /// `(record.canonical_json(), encode())`.
    pub fn encode_with_record(&self) -> (Vec<u8>, Vec<u8>) {
        let record = self.record.canonical_json();
        let head = Head {
            v: self.v,
            call_history_id: self.call_history_id,
            received_at: self.received_at,
            key_id: &self.key_id,
            request_id: self.request_id.as_deref(),
        };
        let mut bytes = Vec::with_capacity(record.len() + 192);
        serde_json::to_writer(&mut bytes, &head).expect("an Envelope always serializes");
        // `{…}` of the head fields, then the record as the last field, as `encode` writes it.
        bytes.pop();
        bytes.extend_from_slice(b",\"record\":");
        bytes.extend_from_slice(&record);
        bytes.push(b'}');
        (record, bytes)
    }
}

/// [`Envelope`]'s fields before the record, in its order.
#[derive(Serialize)]
struct Head<'a> {
    v: u32,
    call_history_id: Uuid,
    received_at: DateTime<Utc>,
    key_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

/// An envelope as read off the stream, its record not yet checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Received {
    v: u64,
    call_history_id: Uuid,
    #[serde(with = "crate::timestamp::required")]
    received_at: DateTime<Utc>,
    key_id: String,
    #[serde(default)]
    request_id: Option<String>,
    record: crate::validate::Incoming,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let e = Envelope::new(
            Uuid::from_u128(1),
            Utc::now(),
            "k1".into(),
            Some("req".into()),
            CallRecord::new(Uuid::from_u128(2)),
        );
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        let mut v2: serde_json::Value = serde_json::from_slice(&e.encode()).unwrap();
        v2["v"] = 2.into();
        let err = Envelope::decode(&serde_json::to_vec(&v2).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion(2)));
        assert!(matches!(
            Envelope::decode(b"not json").unwrap_err(),
            DecodeError::Malformed(_)
        ));
    }

    fn genuine() -> Envelope {
        let mut record = CallRecord::new(Uuid::from_u128(2));
        record.external_call_id = Some("X".into());
        let id = crate::identity::call_history_id(&record, None).id;
        Envelope::new(id, Utc::now(), "kabc".into(), Some("req-1".into()), record)
    }

    #[test]
    fn what_the_gateway_builds_passes_the_check() {
        let e = genuine();
        let subject = crate::subjects::ingest_subject(e.record.company_id);
        assert_eq!(Envelope::decode_checked(&subject, &e.encode()).unwrap(), e);
    }

    #[test]
    fn the_record_is_serialized_once_into_the_same_bytes() {
        let mut e = genuine();
        e.record.notes = Some("quote \" and é".into());
        e.record.call_details = serde_json::json!({"b": 1, "a": [true]})
            .as_object()
            .cloned();
        let (record, payload) = e.encode_with_record();
        assert_eq!(record, e.record.canonical_json());
        assert_eq!(payload, e.encode());
        e.request_id = None;
        assert_eq!(e.encode_with_record().1, e.encode());
    }

    #[test]
    fn decode_checked_names_another_version_and_stores_the_validated_record() {
        let e = genuine();
        let subject = crate::subjects::ingest_subject(e.record.company_id);
        let mut v2: serde_json::Value = serde_json::from_slice(&e.encode()).unwrap();
        v2["v"] = 2.into();
        v2["new_field"] = true.into();
        let err = Envelope::decode_checked(&subject, &serde_json::to_vec(&v2).unwrap());
        assert!(
            matches!(err, Err(DecodeError::UnsupportedVersion(2))),
            "{err:?}"
        );
        // A record field the gateway would have normalised is stored normalised.
        let mut raw: serde_json::Value = serde_json::from_slice(&e.encode()).unwrap();
        raw["record"]["call_date"] = "2025-11-25T12:30:00+02:00".into();
        let decoded =
            Envelope::decode_checked(&subject, &serde_json::to_vec(&raw).unwrap()).unwrap();
        assert_eq!(
            decoded.record.call_date.unwrap().to_rfc3339(),
            "2025-11-25T10:30:00+00:00"
        );
        // Unknown envelope fields are refused, unknown record fields skipped.
        let mut extra = raw.clone();
        extra["smuggled"] = 1.into();
        assert!(matches!(
            Envelope::decode_checked(&subject, &serde_json::to_vec(&extra).unwrap()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn forged_envelopes_are_refused_with_the_reason() {
        let e = genuine();
        let subject = crate::subjects::ingest_subject(e.record.company_id);
        let refused = |e: &Envelope, subject: &str| match e.check(subject) {
            Err(reason) => reason.to_string(),
            Ok(()) => panic!("{e:?} on {subject} passed the check"),
        };
        // Another company's subject, and a subject that is not a company at all.
        let other = crate::subjects::ingest_subject(Uuid::from_u128(3));
        assert!(refused(&e, &other).contains("subject"));
        assert!(refused(&e, "calls.ingest.not-a-uuid").contains("subject"));
        // Either lane carries the company's records; another company's overflow does not.
        let company = e.record.company_id;
        assert!(e
            .check(&crate::subjects::Lane::Overflow.subject(company))
            .is_ok());
        let other_overflow = crate::subjects::Lane::Overflow.subject(Uuid::from_u128(3));
        assert!(refused(&e, &other_overflow).contains("subject"));
        assert!(refused(&e, &format!("calls.elsewhere.{company}")).contains("subject"));
        // An id that is not the derived one (e.g. another company's row).
        let mut wrong_id = e.clone();
        wrong_id.call_history_id = Uuid::from_u128(9);
        assert!(refused(&wrong_id, &subject).contains("call_history_id"));
        // A record the gateway would refuse.
        let mut bad = e.clone();
        bad.record.duration_seconds = Some(-5);
        assert!(refused(&bad, &subject).contains("rule"));
        let mut deep = e.clone();
        let mut details = serde_json::json!({});
        for _ in 0..40 {
            details = serde_json::json!({ "a": details });
        }
        deep.record.call_details = details.as_object().cloned();
        assert!(refused(&deep, &subject).contains("call_details"));
        // Unbounded copies of headers.
        let mut long_rid = e.clone();
        long_rid.request_id = Some("r".repeat(MAX_REQUEST_ID_BYTES + 1));
        assert!(refused(&long_rid, &subject).contains("request_id"));
        let mut no_key = e;
        no_key.key_id = String::new();
        assert!(refused(&no_key, &subject).contains("key_id"));
    }
}
