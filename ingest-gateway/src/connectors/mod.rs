//! Provider connectors: a telephony provider (Twilio, Exotel, Plivo, Vonage) posting its
//! call status callbacks straight to the gateway, for one company.
//!
//! A connector is a record in the KV bucket `callcap_connectors` (see [`ConnectorRecord`]):
//! its company, provider, the public URL the provider calls (what it signs), and the
//! provider's signing secret(s), sealed ([`seal`]). Providers cannot send `x-api-key`, so
//! the URL identifies the connector and the provider's signature authenticates it.
//! Every gateway mirrors the bucket ([`ConnectorCache`]) and opens the secrets with
//! `CONNECTOR_SECRETS_KEY_FILE`. Admin commands are in [`crate::cli::connectors`], signature checks in
//! [`verify`], the mapping of a callback to a call record in [`map`] (numbers read by
//! [`callcap::phone`]), and
//! the HTTP handler in [`crate::callbacks`].

pub mod map;
pub mod seal;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::seal::{Sealed, SecretsKey};

/// The path every callback URL starts with.
pub const CALLBACK_PATH: &str = "/v1/callbacks";

/// A telephony provider whose callbacks the gateway takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Twilio,
    Exotel,
    Plivo,
    Vonage,
}

impl Provider {
    /// The spelling in records (`external_system`), URLs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Twilio => "twilio",
            Provider::Exotel => "exotel",
            Provider::Plivo => "plivo",
            Provider::Vonage => "vonage",
        }
    }

    /// Whether the provider signs its callbacks with a secret of the customer's account;
    /// Exotel signs nothing, and its connector URL carries a token instead.
    pub fn signs(self) -> bool {
        !matches!(self, Provider::Exotel)
    }

    /// What the signing secret is called in the provider's console.
    pub fn secret_name(self) -> &'static str {
        match self {
            Provider::Twilio => "Auth Token",
            Provider::Exotel => "URL token",
            Provider::Plivo => "Auth Token",
            Provider::Vonage => "Signature secret",
        }
    }
}

/// One signing secret of a connector, sealed; `retire_at` ends its validity (the previous
/// secret after a rotation, accepted until then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    pub sealed: Sealed,
    pub added_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<DateTime<Utc>>,
}

/// A connector as stored in the bucket (key: `connector_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorRecord {
    pub connector_id: String,
    pub company_id: Uuid,
    pub provider: Provider,
    /// The base URL the provider calls, as the operator gave it (no trailing `/`): the
    /// signed URL is this plus the callback path, whatever `Host` or `X-Forwarded-*` say.
    pub public_url: String,
    /// ISO 3166 country of domestic numbers (`0…`), for E.164.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Source networks (CIDR) callbacks may come from; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_networks: Vec<String>,
    /// The provider application whose callbacks this connector takes, where the
    /// signature does not cover the URL (Vonage: the token's `application_id`). Required
    /// for Vonage: a signature secret is an account's, and one account may serve two
    /// companies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Newest first.
    pub secrets: Vec<StoredSecret>,
    pub created_at: DateTime<Utc>,
}

impl ConnectorRecord {
    /// What a sealed secret of this connector is bound to.
    pub fn seal_context(&self) -> String {
        format!(
            "{}|{}|{}",
            self.connector_id,
            self.company_id,
            self.provider.as_str()
        )
    }

    /// The URL to paste into the provider's console (for Exotel, with the newest token).
    pub fn callback_url(&self, token: Option<&str>) -> String {
        match token {
            Some(t) => format!(
                "{}{CALLBACK_PATH}/{}/{t}",
                self.public_url, self.connector_id
            ),
            None => format!("{}{CALLBACK_PATH}/{}", self.public_url, self.connector_id),
        }
    }
}

/// A connector ready to check callbacks: its record with the secrets opened.
pub struct Connector {
    pub record: ConnectorRecord,
    /// Opened secrets with their end of validity, newest first.
    secrets: Vec<(Vec<u8>, Option<DateTime<Utc>>)>,
    /// Parsed `allow_networks`.
    pub networks: Vec<ipnet::IpNet>,
    /// Why the connector cannot check callbacks (its secrets do not open here).
    pub unusable: Option<String>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("connector_id", &self.record.connector_id)
            .field("provider", &self.record.provider)
            .field("secrets", &self.secrets.len())
            .field("unusable", &self.unusable)
            .finish()
    }
}

impl Connector {
    /// Opens `record`'s secrets with `key`; a connector whose secrets do not open is kept,
    /// marked unusable (its callbacks get 503, so providers retry once it is fixed).
    pub fn open(record: ConnectorRecord, key: Option<&SecretsKey>) -> Self {
        let context = record.seal_context();
        let mut secrets = Vec::with_capacity(record.secrets.len());
        let mut unusable = None;
        match key {
            None => {
                unusable = Some(
                    "this gateway has no CONNECTOR_SECRETS_KEY_FILE to open connector secrets with"
                        .to_owned(),
                );
            }
            Some(key) => {
                for s in &record.secrets {
                    match key.open(&s.sealed, &context) {
                        Ok(plain) => secrets.push((plain, s.retire_at)),
                        Err(e) => unusable = Some(format!("{e:#}")),
                    }
                }
            }
        }
        if record.provider == Provider::Vonage && record.account.is_none() {
            unusable = Some(
                "a Vonage connector must name its application: `ingest-gateway connectors bind <id> --application <APPLICATION_ID>`"
                    .to_owned(),
            );
        }
        let networks = record
            .allow_networks
            .iter()
            .filter_map(|n| n.parse::<ipnet::IpNet>().ok())
            .collect();
        Connector {
            record,
            secrets,
            networks,
            unusable,
        }
    }

    /// The secrets valid at `now`, newest first.
    pub fn valid_secrets(&self, now: DateTime<Utc>) -> impl Iterator<Item = &[u8]> {
        self.secrets
            .iter()
            .filter(move |(_, retire)| retire.is_none_or(|t| t > now))
            .map(|(s, _)| s.as_slice())
    }
}

/// The gateway's in-memory copy of the connector bucket, secrets opened.
pub struct ConnectorCache {
    key: Option<SecretsKey>,
    by_id: RwLock<HashMap<String, Arc<Connector>>>,
    loaded: AtomicBool,
}

impl ConnectorCache {
    /// An empty cache opening secrets with `key`.
    pub fn new(key: Option<SecretsKey>) -> Self {
        ConnectorCache {
            key,
            by_id: RwLock::default(),
            loaded: AtomicBool::new(false),
        }
    }

    /// The connector with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Connector>> {
        self.by_id
            .read()
            .expect("connector cache lock is never held across a panic")
            .get(id)
            .cloned()
    }

    /// Adds or replaces a connector.
    pub fn upsert(&self, record: ConnectorRecord) {
        let connector = Connector::open(record, self.key.as_ref());
        if let Some(why) = &connector.unusable {
            tracing::error!(
                connector_id = %connector.record.connector_id,
                "connector unusable, its callbacks get 503 until fixed: {why}"
            );
        }
        self.by_id
            .write()
            .expect("connector cache lock is never held across a panic")
            .insert(connector.record.connector_id.clone(), Arc::new(connector));
    }

    /// Removes a connector (revocation).
    pub fn remove(&self, id: &str) {
        self.by_id
            .write()
            .expect("connector cache lock is never held across a panic")
            .remove(id);
    }

    /// Whether the bucket's initial contents have been read.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Number of connectors held.
    pub fn len(&self) -> usize {
        self.by_id
            .read()
            .expect("connector cache lock is never held across a panic")
            .len()
    }

    /// Connectors whose secrets do not open here (their callbacks get 503).
    pub fn unusable(&self) -> usize {
        self.by_id
            .read()
            .expect("connector cache lock is never held across a panic")
            .values()
            .filter(|c| c.unusable.is_some())
            .count()
    }

    /// Whether no connector is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::kv::Mirror for ConnectorCache {
    const WHAT: &'static str = "connector";

    fn put(&self, key: &str, value: &[u8]) {
        match serde_json::from_slice::<ConnectorRecord>(value) {
            Ok(record) if record.connector_id == key => self.upsert(record),
            Ok(_) | Err(_) => tracing::warn!(key = %key, "unreadable connector record ignored"),
        }
    }

    fn delete(&self, key: &str) {
        self.remove(key);
    }

    fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }
}
