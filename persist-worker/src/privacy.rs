//! Erasure and retention: who was erased (keyed hashes, never the identifier), what a
//! record is erased by, and what a write must therefore drop.
//!
//! An erased subject is a phone number, a lead, an external call id, one call, or a
//! whole company, always within one company. Its entry holds HMAC-SHA256 of the
//! normalized identifier under a key kept outside the database (`ERASURE_KEY_FILE`): a
//! reader of the database or of a backup cannot test phone numbers against it. Every
//! write (consume, replay, redrive) computes the same hashes for each record and drops
//! the record when any is erased: "suppress and delete". Records older than
//! `RETENTION_DAYS` are dropped the same way, so a replay never brings back what
//! retention removed.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use callcap::CallRecord;
use chrono::{DateTime, Utc};
use ring::hmac;
use uuid::Uuid;

/// Fewest bytes of key material.
pub const MIN_KEY_BYTES: usize = 32;

/// The key erased identifiers are hashed with.
pub struct ErasureKey {
    key: hmac::Key,
    fingerprint: String,
}

impl std::fmt::Debug for ErasureKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErasureKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ErasureKey {
    /// Reads a key file: at least 32 random bytes, base64 (`head -c 32 /dev/urandom |
    /// base64`).
    ///
    /// # Errors
    /// When the file is unreadable or holds no such key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading ERASURE_KEY_FILE {}", path.display()))?;
        Self::from_base64(text.trim())
            .with_context(|| format!("ERASURE_KEY_FILE {}", path.display()))
    }

    /// Parses a base64 key.
    ///
    /// # Errors
    /// When it is not base64 of at least 32 bytes.
    pub fn from_base64(text: &str) -> anyhow::Result<Self> {
        let bytes = B64.decode(text).context("the erasure key is not base64")?;
        if bytes.len() < MIN_KEY_BYTES {
            bail!("the erasure key must be at least {MIN_KEY_BYTES} bytes (base64)");
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        Ok(ErasureKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            fingerprint: hex::encode(&digest.as_ref()[..6]),
        })
    }

    /// Identifies the key without revealing it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn hash(&self, parts: &[&str]) -> Vec<u8> {
        // Length-prefixed, so no two part lists give the same message.
        let mut message = Vec::new();
        for p in parts {
            message.extend_from_slice(&(p.len() as u32).to_be_bytes());
            message.extend_from_slice(p.as_bytes());
        }
        hmac::sign(&self.key, &message).as_ref().to_vec()
    }
}

/// Who is erased, within a company.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Every record with this number as caller or recipient (normalized, see
    /// [`normalize_phone`]).
    Phone(String),
    Lead(Uuid),
    /// An external call id; without a system, under any system.
    External {
        id: String,
        system: Option<String>,
    },
    /// One call, by `call_history_id`.
    Call(Uuid),
    /// The whole company.
    Company,
}

impl Subject {
    /// The kind, as stored.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Phone(_) => "phone",
            Subject::Lead(_) => "lead",
            Subject::External { .. } => "external",
            Subject::Call(_) => "call",
            Subject::Company => "company",
        }
    }

    /// The keyed hash stored for this subject of `company`.
    pub fn hash(&self, key: &ErasureKey, company: Uuid) -> Vec<u8> {
        let c = company.to_string();
        match self {
            Subject::Phone(n) => key.hash(&["phone", &c, &normalize_phone(n)]),
            Subject::Lead(l) => key.hash(&["lead", &c, &l.to_string()]),
            Subject::External { id, system } => {
                key.hash(&["external", &c, system.as_deref().unwrap_or("*"), id])
            }
            Subject::Call(id) => key.hash(&["call", &c, &id.to_string()]),
            Subject::Company => key.hash(&["company", &c]),
        }
    }
}

/// A phone number as erasure compares it: separators (spaces, `-`, `.`, `(`, `)`)
/// removed, `00` read as `+`. `+91 98765-43210` and `+919876543210` are one number;
/// `09876543210` (domestic) is another, erased on its own.
pub fn normalize_phone(raw: &str) -> String {
    let compact: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\t'))
        .collect();
    match compact.strip_prefix("00") {
        Some(rest) if rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() => {
            format!("+{rest}")
        }
        _ => compact,
    }
}

/// What a call is erased by, besides its company.
#[derive(Debug, Clone, Copy)]
pub struct Identifiers<'a> {
    pub call: Uuid,
    pub lead: Option<Uuid>,
    pub external_call_id: Option<&'a str>,
    pub external_system: Option<&'a str>,
    pub numbers: [Option<&'a str>; 2],
}

impl<'a> Identifiers<'a> {
    /// A record's, with its `call_history_id`.
    pub fn of_record(call: Uuid, record: &'a CallRecord) -> Self {
        Identifiers {
            call,
            lead: record.lead_id,
            external_call_id: record.external_call_id.as_deref(),
            external_system: record.external_system.as_deref(),
            numbers: [
                record.caller_number.as_deref(),
                record.recipient_number.as_deref(),
            ],
        }
    }
}

/// Every hash a call of `company` is erased by: its company, its call, its lead, its
/// external id (with its system and under any system) and each of its numbers.
pub fn hashes(key: &ErasureKey, company: Uuid, ids: Identifiers<'_>) -> Vec<Vec<u8>> {
    let mut out = vec![
        Subject::Company.hash(key, company),
        Subject::Call(ids.call).hash(key, company),
    ];
    if let Some(lead) = ids.lead {
        out.push(Subject::Lead(lead).hash(key, company));
    }
    if let Some(ext) = ids.external_call_id {
        out.push(
            Subject::External {
                id: ext.to_owned(),
                system: None,
            }
            .hash(key, company),
        );
        if let Some(system) = ids.external_system {
            out.push(
                Subject::External {
                    id: ext.to_owned(),
                    system: Some(system.to_owned()),
                }
                .hash(key, company),
            );
        }
    }
    for n in ids.numbers.into_iter().flatten() {
        out.push(Subject::Phone(n.to_owned()).hash(key, company));
    }
    out
}

/// [`hashes`] of a record.
pub fn record_hashes(key: &ErasureKey, call_id: Uuid, record: &CallRecord) -> Vec<Vec<u8>> {
    hashes(
        key,
        record.company_id,
        Identifiers::of_record(call_id, record),
    )
}

/// What every write applies: the erasure key (to recognise erased records) and the
/// retention period.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub key: Option<Arc<ErasureKey>>,
    pub retention_days: Option<u32>,
}

impl Policy {
    /// From the command line's settings.
    ///
    /// # Errors
    /// When the key file is given but unusable.
    pub fn from_args(args: &crate::config::PrivacyArgs) -> anyhow::Result<Self> {
        Ok(Policy {
            key: match &args.erasure_key_file {
                Some(path) => Some(Arc::new(ErasureKey::from_file(path)?)),
                None => None,
            },
            retention_days: args.retention_days,
        })
    }

    /// The oldest call date kept at `now`.
    pub fn keep_since(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.retention_days
            .map(|d| now - chrono::Duration::days(i64::from(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ErasureKey {
        ErasureKey::from_base64(&B64.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn a_record_is_matched_by_each_of_its_identifiers_and_only_in_its_company() {
        let k = key();
        let company = Uuid::from_u128(1);
        let id = Uuid::from_u128(2);
        let mut r = CallRecord::new(company);
        r.caller_number = Some("+91 98765-43210".into());
        r.external_call_id = Some("CALL-1".into());
        r.external_system = Some("Dialer".into());
        r.lead_id = Some(Uuid::from_u128(3));
        let hashes = record_hashes(&k, id, &r);
        for subject in [
            Subject::Phone("+919876543210".into()),
            Subject::Phone("0091 9876543210".into()),
            Subject::Lead(Uuid::from_u128(3)),
            Subject::External {
                id: "CALL-1".into(),
                system: None,
            },
            Subject::External {
                id: "CALL-1".into(),
                system: Some("Dialer".into()),
            },
            Subject::Call(id),
            Subject::Company,
        ] {
            assert!(hashes.contains(&subject.hash(&k, company)), "{subject:?}");
            assert!(
                !hashes.contains(&subject.hash(&k, Uuid::from_u128(9))),
                "{subject:?} elsewhere"
            );
        }
        for other in [
            Subject::Phone("+919876543211".into()),
            Subject::External {
                id: "CALL-1".into(),
                system: Some("Other".into()),
            },
            Subject::Call(Uuid::from_u128(4)),
        ] {
            assert!(!hashes.contains(&other.hash(&k, company)), "{other:?}");
        }
        // Another key gives other hashes: the entries say nothing without it.
        let k2 = ErasureKey::from_base64(&B64.encode([8u8; 32])).unwrap();
        assert_ne!(
            Subject::Company.hash(&k, company),
            Subject::Company.hash(&k2, company)
        );
    }

    #[test]
    fn short_or_malformed_keys_are_refused() {
        assert!(ErasureKey::from_base64(&B64.encode([0u8; 16])).is_err());
        assert!(ErasureKey::from_base64("%%").is_err());
    }
}
