//! Certificates the TLS tests generate: a private CA and leaf certificates for
//! `localhost` / `127.0.0.1`, written as PEM files (nothing fetched, nothing committed).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A throwaway certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as a PEM file (what clients trust).
    pub pem_file: PathBuf,
}

/// A leaf certificate and its key, as PEM files.
pub struct Leaf {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate in DER, to tell two leaves apart.
    pub der: Vec<u8>,
}

impl TestCa {
    /// A new CA whose certificate is written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Call Capture test CA");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        let pem_file = dir.join("ca.pem");
        std::fs::write(&pem_file, cert.pem()).expect("writing the CA");
        TestCa {
            cert,
            key,
            pem_file,
        }
    }

    /// Issues a certificate for `localhost` and `127.0.0.1`, written (replacing any
    /// earlier one) to `dir/<name>.pem` and `dir/<name>.key`.
    pub fn issue(&self, dir: &Path, name: &str) -> Leaf {
        let key = KeyPair::generate().expect("a leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signing the leaf");
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        // Written to temp names and renamed, as cert-manager and certbot replace files.
        let tmp_cert = dir.join(format!(".{name}.pem.tmp"));
        let tmp_key = dir.join(format!(".{name}.key.tmp"));
        std::fs::write(&tmp_cert, cert.pem()).expect("writing a leaf");
        std::fs::write(&tmp_key, key.serialize_pem()).expect("writing a leaf key");
        std::fs::rename(&tmp_key, &key_file).expect("placing the key");
        std::fs::rename(&tmp_cert, &cert_file).expect("placing the certificate");
        Leaf {
            cert_file,
            key_file,
            der: cert.der().to_vec(),
        }
    }

    /// A rustls client configuration trusting this CA only.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert.der().clone())
            .expect("adding the CA to the roots");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}
