//! Record identity: the `call_history_id` the gateway answers with and the publish dedup id.
//!
//! Owns the derivation rules of DESIGN.md ("Identity and idempotency"). The gateway calls
//! them; Postgres relies on them (`id` is the primary key the worker upserts on).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::record::CallRecord;

/// UUIDv5 namespace of Call Capture identities. Changing it changes every derived id, so
/// it is fixed forever.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a8e_4b7d_4e0a_9c3f_51d2_8e7a_b104);

/// Longest accepted `Idempotency-Key` header value.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The id of a record, and whether a retry of it gets the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallId {
    pub id: Uuid,
    /// True when derived from the caller's identity (external id or Idempotency-Key).
    pub deterministic: bool,
}

/// Derives the `call_history_id`.
///
/// - With `external_call_id`: UUIDv5 of company, external system and external call id, so
///   a resend of the same call (a retry or an update) lands on the same row.
/// - Else with an `Idempotency-Key` header: UUIDv5 of company and key.
/// - Else a fresh UUIDv7 (time-ordered, so the primary key index stays append-mostly).
///
/// The external id wins over the header so that a call has one id whichever way it is
/// sent; otherwise two sends of one call could collide on the unique external-id index.
/// Parts are joined with U+001F, which no part can contain unnoticed, so `("a/b","c")`
/// and `("a","b/c")` stay different.
pub fn call_history_id(record: &CallRecord, idempotency_key: Option<&str>) -> CallId {
    let name = match (&record.external_call_id, idempotency_key) {
        (Some(ext), _) => Some(external_name(
            record.company_id,
            record.external_system.as_deref(),
            ext,
        )),
        (None, Some(key)) => Some(format!("idem\u{1f}{}\u{1f}{}", record.company_id, key)),
        (None, None) => None,
    };
    match name {
        Some(name) => CallId {
            id: Uuid::new_v5(&NAMESPACE, name.as_bytes()),
            deterministic: true,
        },
        None => CallId {
            id: Uuid::now_v7(),
            deterministic: false,
        },
    }
}

fn external_name(company: Uuid, system: Option<&str>, external_call_id: &str) -> String {
    format!(
        "ext\u{1f}{company}\u{1f}{}\u{1f}{external_call_id}",
        system.unwrap_or("")
    )
}

/// The `call_history_id` of a company's call sent with `external_call_id` (and
/// `external_system`): what [`call_history_id`] gives such a record, whatever else it holds.
pub fn external_call_history_id(
    company: Uuid,
    system: Option<&str>,
    external_call_id: &str,
) -> Uuid {
    Uuid::new_v5(
        &NAMESPACE,
        external_name(company, system, external_call_id).as_bytes(),
    )
}

/// The `Nats-Msg-Id` of a publish: SHA-256 over the id and the canonical record.
///
/// An exact retry (same id, same fields) gets the same value and JetStream drops it inside
/// its duplicate window; an update (same id, new fields) gets a new value and goes through.
/// Because the id is part of it, two records can only share a dedup id if they share a
/// `call_history_id`, so a duplicate ack never hides a record under another id.
pub fn msg_id(id: Uuid, record: &CallRecord) -> String {
    msg_id_of(id, &record.canonical_json())
}

/// [`msg_id`] from the record's canonical JSON already in hand
/// ([`crate::Envelope::encode_with_record`]).
pub fn msg_id_of(id: Uuid, canonical_json: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(id.as_bytes());
    h.update(canonical_json);
    hex::encode(h.finalize())
}

/// Checks an `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
pub fn valid_idempotency_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_BYTES
        && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_id_of_an_external_call_id_is_the_records_id() {
        let company = Uuid::from_u128(7);
        let mut r = CallRecord::new(company);
        r.external_call_id = Some("CALL-123".into());
        assert_eq!(
            call_history_id(&r, Some("ignored")).id,
            external_call_history_id(company, None, "CALL-123")
        );
        r.external_system = Some("dialer-a".into());
        assert_eq!(
            call_history_id(&r, None).id,
            external_call_history_id(company, Some("dialer-a"), "CALL-123")
        );
        assert_ne!(
            external_call_history_id(company, None, "CALL-123"),
            external_call_history_id(company, Some("dialer-a"), "CALL-123")
        );
    }

    use super::*;

    fn record(ext: Option<&str>, system: Option<&str>) -> CallRecord {
        let mut r = CallRecord::new(Uuid::from_u128(7));
        r.external_call_id = ext.map(str::to_owned);
        r.external_system = system.map(str::to_owned);
        r
    }

    #[test]
    fn external_id_gives_a_stable_id_per_company_and_system() {
        let a = call_history_id(&record(Some("CALL-1"), Some("Dialer")), None);
        let b = call_history_id(&record(Some("CALL-1"), Some("Dialer")), Some("ignored"));
        assert!(a.deterministic);
        assert_eq!(a, b);
        let other_system = call_history_id(&record(Some("CALL-1"), Some("Other")), None);
        assert_ne!(a.id, other_system.id);
        let mut other_company = record(Some("CALL-1"), Some("Dialer"));
        other_company.company_id = Uuid::from_u128(8);
        assert_ne!(a.id, call_history_id(&other_company, None).id);
    }

    #[test]
    fn separators_keep_parts_apart() {
        let a = call_history_id(&record(Some("b/c"), Some("a")), None);
        let b = call_history_id(&record(Some("c"), Some("a/b")), None);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn idempotency_key_is_used_without_external_id() {
        let a = call_history_id(&record(None, None), Some("k1"));
        assert_eq!(a, call_history_id(&record(None, None), Some("k1")));
        assert_ne!(a.id, call_history_id(&record(None, None), Some("k2")).id);
    }

    #[test]
    fn anonymous_records_get_fresh_v7_ids() {
        let a = call_history_id(&record(None, None), None);
        let b = call_history_id(&record(None, None), None);
        assert!(!a.deterministic);
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.get_version_num(), 7);
    }

    #[test]
    fn msg_id_changes_with_fields_but_not_with_retries() {
        let r = record(Some("CALL-1"), None);
        let id = call_history_id(&r, None).id;
        assert_eq!(msg_id(id, &r), msg_id(id, &r.clone()));
        let mut updated = r.clone();
        updated.notes = Some("later".into());
        assert_ne!(msg_id(id, &r), msg_id(id, &updated));
    }

    #[test]
    fn idempotency_key_bounds() {
        assert!(valid_idempotency_key("abc-123"));
        assert!(!valid_idempotency_key(""));
        assert!(!valid_idempotency_key("with space"));
        assert!(!valid_idempotency_key(&"k".repeat(256)));
    }
}
