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
    /// When the gateway accepted the record; also the default `call_date`.
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
}

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
}
