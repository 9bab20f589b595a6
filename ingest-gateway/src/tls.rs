//! HTTPS served by the gateway itself (rustls), for deployments without a terminating
//! load balancer: the API document promises HTTPS only.
//!
//! The certificate and key are PEM files (`TLS_CERT_FILE`, `TLS_KEY_FILE`). They are read
//! again whenever either file changes (checked every `TLS_RELOAD_SECS`), so a renewed
//! certificate (cert-manager, certbot) is served without a restart; a renewal that cannot
//! be read is logged and the previous certificate kept. New connections get the new
//! certificate; open ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the certificate chain {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCert { path: PathBuf },
    #[error("reading the private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key in {path} cannot be used: {source}")]
    KeyType {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate files and the key they hold now.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert_file.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert_file.to_owned(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Key {
        path: key_file.to_owned(),
        source,
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|source| {
        TlsError::KeyType {
            path: key_file.to_owned(),
            source,
        }
    })?;
    let key = CertifiedKey::new(chain, signer);
    if key.keys_match().is_err() {
        return Err(TlsError::Mismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
        });
    }
    Ok(key)
}

impl ReloadingCert {
    /// Reads both files.
    ///
    /// # Errors
    /// A [`TlsError`] naming the file at fault.
    pub fn open(cert_file: PathBuf, key_file: PathBuf) -> Result<Self, TlsError> {
        let stamp = (modified(&cert_file), modified(&key_file));
        let key = Arc::new(load(&cert_file, &key_file)?);
        Ok(ReloadingCert {
            cert_file,
            key_file,
            current: RwLock::new(Loaded { key, stamp }),
        })
    }

    /// Reads the files again if either changed since the last read. Returns whether a
    /// new certificate is now served.
    ///
    /// # Errors
    /// The files changed but cannot be used; the previous certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = (modified(&self.cert_file), modified(&self.key_file));
        if self.current.read().expect("cert lock").stamp == stamp {
            return Ok(false);
        }
        let loaded = load(&self.cert_file, &self.key_file);
        let mut current = self.current.write().expect("cert lock");
        // Remember the stamp even on failure: one error line per change, not one per check.
        current.stamp = stamp;
        current.key = Arc::new(loaded?);
        Ok(true)
    }

    /// The acceptor for new connections: TLS 1.2 and 1.3, ALPN h2 and http/1.1.
    ///
    /// # Errors
    /// When rustls refuses the protocol versions (not in practice).
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Checks the files every `every` until the process ends, logging each reload.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate changed but cannot be used; still serving the previous one")
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().expect("cert lock").key))
    }
}
