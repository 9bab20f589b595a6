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

/// What an erasure names, as stored in `erasures.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Phone,
    Lead,
    External,
    Call,
    Company,
}

impl Kind {
    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Phone => "phone",
            Kind::Lead => "lead",
            Kind::External => "external",
            Kind::Call => "call",
            Kind::Company => "company",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored kind this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown erasure kind {0:?}")]
pub struct UnknownKind(pub String);

impl TryFrom<String> for Kind {
    type Error = UnknownKind;

    fn try_from(s: String) -> Result<Self, UnknownKind> {
        Ok(match s.as_str() {
            "phone" => Kind::Phone,
            "lead" => Kind::Lead,
            "external" => Kind::External,
            "call" => Kind::Call,
            "company" => Kind::Company,
            _ => return Err(UnknownKind(s)),
        })
    }
}

/// How an entry's hashes were made: `1` hashed a number with its `+` ([`legacy_phone`]),
/// `2` its digits ([`callcap::phone::match_key`]).
pub const SCHEME: i16 = 2;

/// Who is erased, within a company.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Every record with this number as caller or recipient, or in a number field of
    /// `call_details`: a key as [`callcap::phone::match_key`] gives it.
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
    pub fn kind(&self) -> Kind {
        match self {
            Subject::Phone(_) => Kind::Phone,
            Subject::Lead(_) => Kind::Lead,
            Subject::External { .. } => Kind::External,
            Subject::Call(_) => Kind::Call,
            Subject::Company => Kind::Company,
        }
    }

    /// The keyed hash stored for this subject of `company`.
    pub fn hash(&self, key: &ErasureKey, company: Uuid) -> Vec<u8> {
        let c = company.to_string();
        match self {
            Subject::Phone(n) => key.hash(&["phone", &c, n]),
            Subject::Lead(l) => key.hash(&["lead", &c, &l.to_string()]),
            Subject::External { id, system } => {
                key.hash(&["external", &c, system.as_deref().unwrap_or("*"), id])
            }
            Subject::Call(id) => key.hash(&["call", &c, &id.to_string()]),
            Subject::Company => key.hash(&["company", &c]),
        }
    }
}

/// A phone number as the first scheme compared it: separators (spaces, `-`, `.`, `(`,
/// `)`) removed, `00` read as `+`, the `+` kept. Entries made then (scheme 1) hold hashes
/// of this form, so records are also hashed this way for the companies that have them.
pub fn legacy_phone(raw: &str) -> String {
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

/// The `call_details` keys searched for numbers (compared in lower case, `_` and `-`
/// removed), besides any key ending in `number` or `phone`: the providers' number fields
/// (Twilio's `Caller`, `Called`, `ForwardedFrom`, …) and the usual names of dialers.
const DETAIL_NUMBER_KEYS: [&str; 14] = [
    "from",
    "to",
    "caller",
    "called",
    "callerid",
    "forwardedfrom",
    "forwardedto",
    "divertedfrom",
    "mobile",
    "msisdn",
    "ani",
    "dnis",
    "cli",
    "contact",
];
/// Most `call_details` values looked at for numbers (its top level only).
const DETAIL_NUMBERS_MAX: usize = 64;

/// Whether `key` of `call_details` names a phone number.
fn names_a_number(key: &str) -> bool {
    let k: String = key
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    DETAIL_NUMBER_KEYS.contains(&k.as_str()) || k.ends_with("number") || k.ends_with("phone")
}

/// The numbers in the number fields of `call_details`' top level (`names_a_number`):
/// strings holding at least 6 digits once written forms are folded.
pub fn detail_numbers(details: Option<&serde_json::Map<String, serde_json::Value>>) -> Vec<&str> {
    let Some(map) = details else {
        return Vec::new();
    };
    map.iter()
        .filter(|(k, _)| names_a_number(k))
        .filter_map(|(_, v)| v.as_str())
        .filter(|v| callcap::phone::compact(v).is_some_and(|c| c.digits.len() >= 6))
        .take(DETAIL_NUMBERS_MAX)
        .collect()
}

/// What a call is erased by, besides its company.
#[derive(Debug, Clone)]
pub struct Identifiers<'a> {
    pub call: Uuid,
    pub lead: Option<Uuid>,
    pub external_call_id: Option<&'a str>,
    pub external_system: Option<&'a str>,
    /// Caller and recipient, and the numbers of `call_details`' number fields.
    pub numbers: Vec<&'a str>,
}

impl<'a> Identifiers<'a> {
    /// A record's, with its `call_history_id`.
    pub fn of_record(call: Uuid, record: &'a CallRecord) -> Self {
        let mut numbers: Vec<&str> = [
            record.caller_number.as_deref(),
            record.recipient_number.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        numbers.extend(detail_numbers(record.call_details.as_ref()));
        Identifiers {
            call,
            lead: record.lead_id,
            external_call_id: record.external_call_id.as_deref(),
            external_system: record.external_system.as_deref(),
            numbers,
        }
    }
}

/// Every hash a call of `company` is erased by: its company, its call, its lead, its
/// external id (with its system and under any system) and each of its numbers (in the
/// first scheme's form too, when `legacy_phones`).
pub fn hashes(
    key: &ErasureKey,
    company: Uuid,
    ids: &Identifiers<'_>,
    legacy_phones: bool,
) -> Vec<Vec<u8>> {
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
    for n in &ids.numbers {
        out.push(Subject::Phone(callcap::phone::match_key(n)).hash(key, company));
        if legacy_phones {
            out.push(Subject::Phone(legacy_phone(n)).hash(key, company));
        }
    }
    out
}

/// The one rule of "does this hold erased data": the erasures of one company (all of
/// them, for a write; one, for `erase`) and whether a call, or a stream message, matches.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    company: Uuid,
    hashes: std::collections::HashSet<Vec<u8>>,
    legacy_phones: bool,
    whole_company: bool,
}

impl Matcher {
    /// The erasures of `company`: their hashes (each form's), whether any was made under
    /// the first scheme for a number, and whether the whole company is erased.
    pub fn new(
        company: Uuid,
        hashes: impl IntoIterator<Item = Vec<u8>>,
        legacy_phones: bool,
        whole_company: bool,
    ) -> Self {
        Matcher {
            company,
            hashes: hashes.into_iter().collect(),
            legacy_phones,
            whole_company,
        }
    }

    /// Whether a call of `company` is erased.
    pub fn matches(&self, key: &ErasureKey, company: Uuid, ids: &Identifiers<'_>) -> bool {
        company == self.company
            && hashes(key, company, ids, self.legacy_phones)
                .iter()
                .any(|h| self.hashes.contains(h))
    }

    /// Whether a stream message (or an archived one, or a dead letter's payload) holds
    /// erased data: an envelope is matched as a call; anything else on this company's
    /// subject is when the whole company is erased, or when it holds `needle` (the
    /// identifier as the operator typed it; unknown after the fact: then only the whole
    /// company's erasure matches it).
    pub fn holds(
        &self,
        key: &ErasureKey,
        needle: Option<&str>,
        subject: &str,
        payload: &[u8],
    ) -> bool {
        match callcap::Envelope::decode(payload) {
            Ok(e) => self.matches(
                key,
                e.record.company_id,
                &Identifiers::of_record(e.call_history_id, &e.record),
            ),
            Err(_) => {
                subject_company(subject) == Some(self.company)
                    && (self.whole_company
                        || needle.is_some_and(|n| String::from_utf8_lossy(payload).contains(n)))
            }
        }
    }
}

/// The company a record subject names (its last token), if it is one.
pub fn subject_company(subject: &str) -> Option<Uuid> {
    subject.rsplit('.').next().and_then(|t| t.parse().ok())
}

/// Why a company's records cannot be checked against its erasures here: they are held
/// (not stored, not acknowledged) until a worker that can check them takes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Uncheckable {
    #[error("erasures exist but ERASURE_KEY_FILE is not set")]
    NoKey,
    #[error("erasures were hashed with key {entries}, but ERASURE_KEY_FILE holds key {ours}")]
    OtherKey { entries: String, ours: String },
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

    fn matcher_of(k: &ErasureKey, company: Uuid, subjects: &[Subject]) -> Matcher {
        Matcher::new(
            company,
            subjects.iter().map(|s| s.hash(k, company)),
            false,
            subjects.contains(&Subject::Company),
        )
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
        r.call_details =
            serde_json::json!({"ForwardedFrom": "+1 (415) 555-0100", "note": "+14155550199"})
                .as_object()
                .cloned();
        let ids = Identifiers::of_record(id, &r);
        for subject in [
            Subject::Phone(callcap::phone::match_key("+919876543210")),
            Subject::Phone(callcap::phone::match_key("0091 9876543210")),
            Subject::Phone(callcap::phone::match_key("tel:+1-415-555-0100")),
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
            let m = matcher_of(&k, company, std::slice::from_ref(&subject));
            assert!(m.matches(&k, company, &ids), "{subject:?}");
            let elsewhere = Uuid::from_u128(9);
            let m = matcher_of(&k, elsewhere, std::slice::from_ref(&subject));
            assert!(!m.matches(&k, company, &ids), "{subject:?} elsewhere");
        }
        for other in [
            Subject::Phone(callcap::phone::match_key("+919876543211")),
            // A key that does not name a number is not searched.
            Subject::Phone(callcap::phone::match_key("+14155550199")),
            Subject::External {
                id: "CALL-1".into(),
                system: Some("Other".into()),
            },
            Subject::Call(Uuid::from_u128(4)),
        ] {
            let m = matcher_of(&k, company, std::slice::from_ref(&other));
            assert!(!m.matches(&k, company, &ids), "{other:?}");
        }
        // An entry of the first scheme (the number with its `+`) matches when the company
        // has such entries.
        let legacy = Subject::Phone(legacy_phone("+91 98765 43210")).hash(&k, company);
        assert!(Matcher::new(company, [legacy.clone()], true, false).matches(&k, company, &ids));
        assert!(!Matcher::new(company, [legacy], false, false).matches(&k, company, &ids));
        // Another key gives other hashes: the entries say nothing without it.
        let k2 = ErasureKey::from_base64(&B64.encode([8u8; 32])).unwrap();
        assert_ne!(
            Subject::Company.hash(&k, company),
            Subject::Company.hash(&k2, company)
        );
    }

    #[test]
    fn a_payload_that_is_no_envelope_is_held_by_its_subject_and_the_identifier() {
        let k = key();
        let company = Uuid::from_u128(1);
        let subject = format!("calls.ingest.{company}");
        let phone = matcher_of(&k, company, &[Subject::Phone("919876543210".into())]);
        let payload = b"not json +919876543210";
        assert!(phone.holds(&k, Some("919876543210"), &subject, payload));
        assert!(
            !phone.holds(&k, None, &subject, payload),
            "unknown identifier"
        );
        assert!(!phone.holds(&k, Some("919876543210"), "calls.ingest.other", payload));
        let all = matcher_of(&k, company, &[Subject::Company]);
        assert!(all.holds(&k, None, &subject, b"garbage"));
    }

    #[test]
    fn short_or_malformed_keys_are_refused() {
        assert!(ErasureKey::from_base64(&B64.encode([0u8; 16])).is_err());
        assert!(ErasureKey::from_base64("%%").is_err());
    }
}
