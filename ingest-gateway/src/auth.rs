//! API keys: minting, hashing, the KV records, and the in-memory cache every gateway
//! authenticates against.
//!
//! A key is `cc_live_` plus 40 random alphanumerics (~238 bits). Only its SHA-256 is
//! stored, in the NATS KV bucket `callcap_api_keys`, keyed by a separate key id. Each gateway
//! watches the bucket, so a create or revoke reaches it within a second, and a request
//! costs one hash and one map lookup. Admin commands (`keys …`) live in [`crate::cli::keys`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv};
use callcap::subjects::SetupError;
use chrono::{DateTime, Utc};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Prefix of every key, so a leaked one is recognisable (and greppable by scanners).
pub const KEY_PREFIX: &str = "cc_live_";
const KEY_RANDOM_CHARS: usize = 40;

/// A key as stored in the bucket: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub company_id: Uuid,
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A freshly minted key: the secret (shown once) and its record.
pub struct NewKey {
    pub key: String,
    pub record: KeyRecord,
}

/// Mints a key for a company.
pub fn mint(company_id: Uuid, name: &str, expires_at: Option<DateTime<Utc>>) -> NewKey {
    let mut rng = rand::rng();
    let key = format!(
        "{KEY_PREFIX}{}",
        Alphanumeric.sample_string(&mut rng, KEY_RANDOM_CHARS)
    );
    let key_id = format!(
        "k{}",
        Alphanumeric.sample_string(&mut rng, 15).to_lowercase()
    );
    NewKey {
        record: KeyRecord {
            key_id,
            company_id,
            name: name.to_owned(),
            sha256: hex::encode(hash(&key)),
            created_at: Utc::now(),
            expires_at,
        },
        key,
    }
}

/// SHA-256 of a presented key. A fast hash is right here: keys carry ~238 random bits, so
/// there is nothing for a slow hash to protect against, and auth stays one hash per request.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub company_id: Uuid,
}

#[derive(Default)]
struct Index {
    by_hash: HashMap<[u8; 32], Arc<KeyRecord>>,
    hash_by_id: HashMap<String, [u8; 32]>,
}

/// The gateway's in-memory copy of the key bucket.
#[derive(Default)]
pub struct KeyCache {
    index: RwLock<Index>,
    loaded: AtomicBool,
}

impl KeyCache {
    /// Resolves a presented key; `None` when unknown, revoked, expired or malformed.
    pub fn authenticate(&self, presented: &str, now: DateTime<Utc>) -> Option<Principal> {
        if !presented.starts_with(KEY_PREFIX) || presented.len() > 128 {
            return None;
        }
        let digest = hash(presented);
        let index = self
            .index
            .read()
            .expect("key cache lock is never held across a panic");
        let record = index.by_hash.get(&digest)?;
        if record.expires_at.is_some_and(|t| t <= now) {
            return None;
        }
        Some(Principal {
            key_id: record.key_id.clone(),
            company_id: record.company_id,
        })
    }

    /// Adds or replaces a key.
    pub fn upsert(&self, record: KeyRecord) {
        let Ok(bytes) = hex::decode(&record.sha256) else {
            tracing::warn!(key_id = %record.key_id, "key record with a malformed hash ignored");
            return;
        };
        let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) else {
            tracing::warn!(key_id = %record.key_id, "key record with a malformed hash ignored");
            return;
        };
        let mut index = self
            .index
            .write()
            .expect("key cache lock is never held across a panic");
        if let Some(old) = index.hash_by_id.insert(record.key_id.clone(), digest) {
            index.by_hash.remove(&old);
        }
        index.by_hash.insert(digest, Arc::new(record));
    }

    /// Removes a key by id (revocation).
    pub fn remove(&self, key_id: &str) {
        let mut index = self
            .index
            .write()
            .expect("key cache lock is never held across a panic");
        if let Some(digest) = index.hash_by_id.remove(key_id) {
            index.by_hash.remove(&digest);
        }
    }

    /// Whether the initial contents of the bucket have been read.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Marks the cache as holding the whole bucket.
    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.index
            .read()
            .expect("key cache lock is never held across a panic")
            .by_hash
            .len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens the key bucket (admin commands: creates it, or applies a changed
/// `STREAM_REPLICAS`).
///
/// # Errors
/// When JetStream is unreachable or cannot have the replica count.
pub async fn key_bucket(
    js: &jetstream::Context,
    requested_replicas: Option<u8>,
) -> Result<kv::Store, SetupError> {
    crate::kv::bucket(js, crate::kv::KEYS, requested_replicas).await
}

/// Opens the key bucket for a serving gateway (creates it when missing).
///
/// # Errors
/// As [`key_bucket`].
pub async fn open_key_bucket(
    js: &jetstream::Context,
    requested_replicas: Option<u8>,
) -> Result<kv::Store, SetupError> {
    crate::kv::open_bucket(js, crate::kv::KEYS, requested_replicas).await
}

impl crate::kv::Mirror for KeyCache {
    const WHAT: &'static str = "API key";

    fn put(&self, key: &str, value: &[u8]) {
        match serde_json::from_slice::<KeyRecord>(value) {
            Ok(record) if record.key_id == key => self.upsert(record),
            Ok(_) | Err(_) => tracing::warn!(key = %key, "unreadable API key record ignored"),
        }
    }

    fn delete(&self, key: &str) {
        self.remove(key);
    }

    fn mark_loaded(&self) {
        KeyCache::mark_loaded(self);
    }
}

/// Keeps `cache` in step with the key bucket until the process ends.
pub async fn watch_keys(store: kv::Store, cache: Arc<KeyCache>) {
    crate::kv::watch(store, cache).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_authenticate_until_removed_or_expired() {
        let cache = KeyCache::default();
        let company = Uuid::from_u128(1);
        let k = mint(company, "dialer", None);
        assert!(k.key.starts_with(KEY_PREFIX));
        assert_eq!(k.key.len(), KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert!(!k.record.sha256.contains(&k.key[KEY_PREFIX.len()..]));
        cache.upsert(k.record.clone());
        let p = cache.authenticate(&k.key, Utc::now()).unwrap();
        assert_eq!(p.company_id, company);
        assert_eq!(p.key_id, k.record.key_id);
        assert!(cache.authenticate("cc_live_wrong", Utc::now()).is_none());
        assert!(cache.authenticate("", Utc::now()).is_none());
        cache.remove(&k.record.key_id);
        assert!(cache.authenticate(&k.key, Utc::now()).is_none());

        let expiring = mint(
            company,
            "old",
            Some(Utc::now() - chrono::Duration::seconds(1)),
        );
        cache.upsert(expiring.record);
        assert!(cache.authenticate(&expiring.key, Utc::now()).is_none());
    }

    #[test]
    fn keys_are_unique() {
        let a = mint(Uuid::nil(), "a", None);
        let b = mint(Uuid::nil(), "a", None);
        assert_ne!(a.key, b.key);
        assert_ne!(a.record.key_id, b.record.key_id);
    }
}
