//! The connectors' secrets at rest: sealed with AES-256-GCM under a key only the gateways
//! (and the operator running `connectors` commands) hold, `CONNECTOR_SECRETS_KEY_FILE`.
//!
//! A provider's signing secret is needed in clear to compute an HMAC, so it cannot be
//! stored hashed like an API key. Sealed, the KV bucket holds nothing a reader of the
//! NATS port, of the broker's disk or of a backup can forge a callback with. The
//! connector's id, company and provider are the cipher's associated data: a sealed secret
//! copied into another connector's record does not open.

use std::path::Path;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of a secrets key.
pub const KEY_BYTES: usize = 32;

/// The key the connectors' secrets are sealed with.
pub struct SecretsKey {
    key: LessSafeKey,
    fingerprint: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A secret as stored: which key sealed it (fingerprint), the nonce and the ciphertext
/// with its tag, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key: String,
    pub nonce: String,
    pub data: String,
}

impl SecretsKey {
    /// Reads a key file: 32 random bytes, base64, as `connectors new-secrets-key` writes.
    ///
    /// # Errors
    /// When the file is unreadable or does not hold such a key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading CONNECTOR_SECRETS_KEY_FILE {}", path.display()))?;
        Self::from_base64(text.trim())
            .with_context(|| format!("CONNECTOR_SECRETS_KEY_FILE {}", path.display()))
    }

    /// Parses a base64 key.
    ///
    /// # Errors
    /// When it is not base64 of exactly 32 bytes.
    pub fn from_base64(text: &str) -> anyhow::Result<Self> {
        let bytes = B64.decode(text).context("the secrets key is not base64")?;
        if bytes.len() != KEY_BYTES {
            bail!(
                "the secrets key must be {KEY_BYTES} bytes (base64), not {}",
                bytes.len()
            );
        }
        let fingerprint = hex::encode(&Sha256::digest(&bytes)[..6]);
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte key is an AES-256 key"),
        );
        Ok(SecretsKey { key, fingerprint })
    }

    /// A new random key, base64 (what a key file holds).
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn generate() -> anyhow::Result<String> {
        let mut bytes = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        Ok(B64.encode(bytes))
    }

    /// Identifies the key without revealing it (first 6 bytes of its SHA-256, hex).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals `secret`, bound to `context` (the connector's identity).
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn seal(&self, secret: &[u8], context: &str) -> anyhow::Result<Sealed> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let mut data = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| anyhow::anyhow!("sealing the secret failed"))?;
        Ok(Sealed {
            key: self.fingerprint.clone(),
            nonce: B64.encode(nonce),
            data: B64.encode(data),
        })
    }

    /// Opens a sealed secret bound to `context`.
    ///
    /// # Errors
    /// When it was sealed with another key, for another connector, or altered.
    pub fn open(&self, sealed: &Sealed, context: &str) -> anyhow::Result<Vec<u8>> {
        if sealed.key != self.fingerprint {
            bail!(
                "sealed with secrets key {}, but this process has key {} (CONNECTOR_SECRETS_KEY_FILE)",
                sealed.key,
                self.fingerprint
            );
        }
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .context("the sealed secret's nonce is malformed")?;
        let mut data = B64
            .decode(&sealed.data)
            .context("the sealed secret is not base64")?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "the sealed secret does not open: altered, or sealed for another connector"
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_context() {
        let key = SecretsKey::from_base64(&SecretsKey::generate().unwrap()).unwrap();
        let sealed = key.seal(b"auth-token-123", "c1|company|twilio").unwrap();
        assert!(!sealed.data.contains("auth-token"));
        assert_eq!(
            key.open(&sealed, "c1|company|twilio").unwrap(),
            b"auth-token-123"
        );
        // Moved to another connector's record: refused.
        assert!(key.open(&sealed, "c2|company|twilio").is_err());
        // Another key: refused, and the message names both fingerprints.
        let other = SecretsKey::from_base64(&SecretsKey::generate().unwrap()).unwrap();
        let e = other.open(&sealed, "c1|company|twilio").unwrap_err();
        // What the operator reads: the whole chain, as logged.
        let logged = format!("{e:#}");
        assert!(logged.contains(key.fingerprint()), "{logged}");
        // Altered ciphertext: refused.
        let mut bytes = B64.decode(&sealed.data).unwrap();
        bytes[0] ^= 1;
        let altered = Sealed {
            data: B64.encode(bytes),
            ..sealed
        };
        assert!(key.open(&altered, "c1|company|twilio").is_err());
        // Two seals of one secret differ (random nonce).
        let again = key.seal(b"auth-token-123", "c1|company|twilio").unwrap();
        assert_ne!(
            again.data,
            key.seal(b"auth-token-123", "c1|company|twilio")
                .unwrap()
                .data
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(SecretsKey::from_base64("not base64!").is_err());
        assert!(SecretsKey::from_base64(&B64.encode([0u8; 16])).is_err());
    }
}
