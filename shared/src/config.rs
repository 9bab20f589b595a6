//! Configuration both binaries share: where NATS is and how the stream is defined.
//!
//! Flattened into each binary's clap `Parser`, so one environment configures the whole
//! pipeline (`NATS_URL`, `STREAM_*`). Binary-specific settings live with each binary.

use std::path::PathBuf;

use clap::Args;

/// Connection to NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated for a cluster. `tls://` requires TLS.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Timeout for JetStream API calls and publish acks, in milliseconds.
    #[arg(long, env = "NATS_REQUEST_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=120_000))]
    pub nats_request_timeout_ms: u64,

    /// File holding this process's NATS nkey seed (a line starting `SU`): its identity
    /// on the broker. The shipped NATS configs know three (gateway, worker, admin; see
    /// SECURITY.md); `deploy/up.sh` creates them with `ingest-gateway nkey create`.
    /// Only the seed's public key is in the server's config; the seed never leaves
    /// this file (NATS signs a challenge with it).
    #[arg(long, env = "NATS_NKEY_FILE", conflicts_with = "nats_creds_file")]
    pub nats_nkey_file: Option<PathBuf>,

    /// A NATS `.creds` file (user JWT and seed) instead of NATS_NKEY_FILE, for brokers
    /// run in operator/JWT mode.
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,

    /// PEM file of the CA(s) that signed the NATS servers' certificates. Setting it (or
    /// NATS_TLS_CERT_FILE) makes the connection require TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// PEM client certificate, for servers that verify clients (`verify: true`). Needs
    /// NATS_TLS_KEY_FILE.
    #[arg(long, env = "NATS_TLS_CERT_FILE", requires = "nats_tls_key_file")]
    pub nats_tls_cert_file: Option<PathBuf>,

    /// PEM private key of NATS_TLS_CERT_FILE.
    #[arg(long, env = "NATS_TLS_KEY_FILE", requires = "nats_tls_cert_file")]
    pub nats_tls_key_file: Option<PathBuf>,
}

/// Which of the pipeline's NATS identities a connection acts as. Each has its own reply
/// inbox prefix, so the broker can let an identity read only its own replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ingest-gateway` serving: publishes records, reads the key bucket.
    Gateway,
    /// `persist-worker` running: consumes through its durable consumer.
    Worker,
    /// The operator's commands: `keys`, `setup`, `replay`, `dlq`.
    Admin,
}

impl Role {
    /// The reply inbox prefix: `_INBOX.gateway`, `_INBOX.worker`, `_INBOX.admin`.
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Role::Gateway => "_INBOX.gateway",
            Role::Worker => "_INBOX.worker",
            Role::Admin => "_INBOX.admin",
        }
    }
}

/// Why the NATS credentials or TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading NATS_NKEY_FILE {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("NATS_NKEY_FILE {path} does not hold a user nkey seed (a line starting with SU)")]
    NotASeed { path: PathBuf },
    #[error("NATS_CREDS_FILE {path}: {source}")]
    Creds {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Definition of the `CALLS` stream.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// How long the stream keeps records (the replay window), in seconds. Default 30 days.
    #[arg(long, env = "STREAM_MAX_AGE_SECS", default_value_t = 30 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub stream_max_age_secs: u64,

    /// Largest size of the stream, in bytes; with several partitions (`ingest-gateway
    /// partitions`), of the layout's streams together, each holding an equal share. When
    /// full, new publishes are refused (the gateway answers 503) rather than deleting
    /// records not yet stored. Default 10 GiB.
    #[arg(long, env = "STREAM_MAX_BYTES", default_value_t = 10 * 1024 * 1024 * 1024,
          value_parser = clap::value_parser!(i64).range(1024 * 1024..))]
    pub stream_max_bytes: i64,

    /// Replicas of the stream and the key bucket (1, 3 or 5). Unset: a new stream gets 3
    /// when the server is part of a cluster and 1 on a single server, and an existing
    /// stream keeps its count. Set: the gateway changes an existing stream to it (a
    /// single server refuses more than 1, and the gateway exits saying so).
    #[arg(long, env = "STREAM_REPLICAS",
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: Option<u8>,

    /// Window in which JetStream drops a publish whose Nats-Msg-Id it has seen, in seconds.
    #[arg(long, env = "STREAM_DUPLICATE_WINDOW_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stream_duplicate_window_secs: u64,
}

impl Default for StreamArgs {
    fn default() -> Self {
        defaults()
    }
}

impl NatsArgs {
    /// Settings for a server at `url` with default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        NatsArgs {
            nats_url: url.into(),
            nats_request_timeout_ms: 5_000,
            nats_nkey_file: None,
            nats_creds_file: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
        }
    }

    /// The same settings, authenticating with the nkey seed in `file`.
    pub fn with_nkey_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.nats_nkey_file = Some(file.into());
        self
    }

    /// The servers named by `NATS_URL`, split at commas (spaces and empty entries
    /// ignored), each checked to be a valid address.
    ///
    /// # Errors
    /// When the list is empty or an entry is not a NATS URL; the error names the entry.
    pub fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
        let parse_error = |msg: String| {
            async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::ServerParse,
                std::io::Error::other(msg),
            )
        };
        let addrs = self
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| parse_error(format!("NATS_URL entry {u:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(parse_error("NATS_URL names no server".into()));
        }
        Ok(addrs)
    }

    /// What every connection shares: its name, identity (nkey or creds), reply inbox,
    /// TLS and the JetStream request timeout.
    async fn options(
        &self,
        name: &str,
        role: Role,
    ) -> Result<async_nats::ConnectOptions, async_nats::ConnectError> {
        let mut options = match (&self.nats_nkey_file, &self.nats_creds_file) {
            (Some(path), _) => {
                async_nats::ConnectOptions::with_nkey(read_seed(path).map_err(auth_error)?)
            }
            (None, Some(path)) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|source| {
                    auth_error(CredentialsError::Creds {
                        path: path.clone(),
                        source,
                    })
                })?,
            (None, None) => async_nats::ConnectOptions::new(),
        };
        if let Some(ca) = &self.nats_tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert_file, &self.nats_tls_key_file) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options
            .name(name)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::ServerError(e) if is_permissions_violation(&e) => {
                        tracing::error!(
                            error = %e,
                            "NATS refused this identity an operation: is NATS_NKEY_FILE this \
                             service's identity, and the server's config the shipped one? (SECURITY.md)"
                        );
                    }
                    other => tracing::info!("NATS: {other}"),
                }
            })
            .custom_inbox_prefix(role.inbox_prefix())
            .request_timeout(Some(std::time::Duration::from_millis(
                self.nats_request_timeout_ms,
            ))))
    }

    /// Connects with unbounded reconnects: a service rides out NATS restarts rather than
    /// exiting. The first connection is retried too, so start order does not matter, and
    /// with several servers listed any one that answers will do.
    ///
    /// # Errors
    /// When the URL list is malformed.
    pub async fn connect(
        &self,
        name: &str,
        role: Role,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        self.options(name, role)
            .await?
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(self.server_addrs()?)
            .await
    }

    /// Connects once, for a command that does one job and exits (`keys`, `replay`,
    /// `dlq`): fails within a few seconds when no listed server answers.
    ///
    /// # Errors
    /// When the URL list is malformed or no server answers.
    pub async fn connect_once(
        &self,
        name: &str,
        role: Role,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        self.options(name, role)
            .await?
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(self.server_addrs()?)
            .await
    }
}

/// Reads an nkey seed file: the first line starting with `SU` (a user seed), so a file
/// with comments or the `nk` tool's output works.
///
/// # Errors
/// The file cannot be read or holds no user seed.
pub fn read_seed(path: &std::path::Path) -> Result<String, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .map(str::to_owned)
        .ok_or_else(|| CredentialsError::NotASeed {
            path: path.to_owned(),
        })
}

fn auth_error(e: CredentialsError) -> async_nats::ConnectError {
    async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Authentication, e)
}

/// Whether the server refused this identity an operation. The NATS protocol reports it
/// as an `-ERR 'Permissions Violation for …'` line, which async-nats hands on as
/// [`async_nats::ServerError::Other`] with that text: the protocol gives no other kind to
/// match.
fn is_permissions_violation(e: &async_nats::ServerError) -> bool {
    matches!(e, async_nats::ServerError::Other(text) if text.starts_with("Permissions Violation"))
}

/// The settings `T` holds when nothing is given: clap's own defaults, the one place they
/// are written (the environment is not read: a default is the same on every machine).
///
/// # Panics
/// When a setting of `T` has neither a default nor an optional type (a bug of `T`).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default or is optional");
    T::from_arg_matches(&matches).expect("the defaults parse as the settings")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_takes_a_comma_separated_list() {
        let args = NatsArgs::new("nats://127.0.0.1:4222, nats://127.0.0.1:4223,,127.0.0.1:4224");
        let addrs = args.server_addrs().expect("a valid list");
        let ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        let bad = NatsArgs::new("nats://127.0.0.1:4222,nats://127.0.0.1:notaport")
            .server_addrs()
            .unwrap_err()
            .to_string();
        assert!(bad.contains("notaport"), "{bad}");
        assert!(NatsArgs::new(" , ").server_addrs().is_err());
    }
}
