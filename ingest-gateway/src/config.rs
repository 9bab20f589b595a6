//! The gateway's command line: flags with environment fallbacks, checked at boot.
//!
//! `ingest-gateway` with no subcommand serves; `ingest-gateway keys …` manages API keys.
//! Doc comments here are the `--help` text.

use std::net::SocketAddr;
use std::time::Duration;

use callcap::config::{NatsArgs, StreamArgs};
use callcap::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

/// Call Capture ingest gateway: authenticates dialers' call records, validates them,
/// publishes them to the NATS JetStream stream CALLS and answers 201 once JetStream has
/// acknowledged each one.
#[derive(Debug, Parser)]
#[command(name = "ingest-gateway", version, about, long_about = None, after_help = callcap::traces::ENV_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub stream: StreamArgs,

    #[command(flatten)]
    pub serve: ServeArgs,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// What to do; serving is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default when no subcommand is given).
    Serve,
    /// Create, list and revoke API keys (stored hashed in the NATS KV bucket the
    /// gateways watch; changes reach running gateways within a second).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Provider connectors: let Twilio, Exotel, Plivo or Vonage post their call status
    /// and recording callbacks straight to the gateway for one company, checked with the
    /// provider's signature (secrets sealed with CONNECTOR_SECRETS_KEY_FILE; changes
    /// reach running gateways within a second). Admin NATS identity.
    #[command(subcommand)]
    Connectors(ConnectorsCommand),
    /// Create the stream CALLS and the API key and connector buckets, or bring existing ones (the
    /// current partition layout's streams) to the STREAM_* settings (e.g. a new
    /// STREAM_REPLICAS or STREAM_MAX_AGE_SECS). Run with the admin NATS identity: a
    /// serving gateway creates what is missing but never changes what exists.
    Setup,
    /// Show or change the partition layout: how many streams (each with its own leader
    /// on a cluster) the records are spread over, a company always in the same one.
    #[command(subcommand)]
    Partitions(PartitionsCommand),
    /// Check an integration end to end, as `examples/test-webhook.js` does: send the API
    /// document's Example 1 and Example 2 to a running service with your key, and say
    /// what happened. Exits 0 when both were created, 1 otherwise.
    Check(CheckArgs),
    /// NATS identities (nkeys) for the broker's configuration.
    #[command(subcommand)]
    Nkey(NkeyCommand),
}

/// `ingest-gateway partitions`.
#[derive(Debug, Subcommand)]
pub enum PartitionsCommand {
    /// List the partition streams: layout, sealed or not, records, records the workers
    /// have not stored yet per lane, leader.
    Show,
    /// Print KEDA ScaledObjects for the streams on the server: one per lane (scaling
    /// `persist-worker` and `persist-worker-overflow`), with one `nats-jetstream` trigger
    /// per partition stream (sealed ones too, while they hold a backlog), to apply in
    /// place of deploy/k8s/keda-scaledobject.yaml after `partitions set`.
    Keda {
        /// Namespace of the worker Deployments.
        #[arg(long, default_value = "callcap")]
        namespace: String,
        /// The NATS monitoring endpoint KEDA reads (/jsz), host:port.
        #[arg(long, default_value = "nats.nats.svc:8222")]
        monitoring: String,
    },
    /// Change the number of partitions: seals the current streams, creates the new
    /// ones (numbered past every old record, so nothing is reordered), and waits until
    /// the workers have stored everything the sealed ones hold. Gateways and workers
    /// follow by themselves; nothing is lost (a refused publish is sent again to the new
    /// layout). Run again after a failure to complete it; with the current count, it
    /// spreads the leaders again (see `balance`). Run with the admin identity.
    Set {
        /// Partitions of the new layout (1 to 64). On a cluster, at least the node count
        /// spreads the stream leaders over every node.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=64))]
        count: u32,
        /// Return once the new layout exists, without waiting for the drain.
        #[arg(long)]
        no_wait: bool,
    },
    /// On a cluster, move the current layout's stream leaders back to one partition per
    /// node (partition i on the i-th node). A failover leaves a partition's leadership
    /// on whichever node took it over, and nothing moves it back when the node returns:
    /// run this after a node was lost and is back (`partitions show` says when the
    /// leaders are bunched), so that losing one node stops only its partitions'
    /// companies again. Each move is a short election of that partition only. Run with
    /// the admin identity.
    Balance,
}

/// `ingest-gateway check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The service's base URL (http or https).
    #[arg(long, env = "CALLCAP_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Your API key.
    #[arg(long, env = "CALLCAP_API_KEY", hide_env_values = true)]
    pub key: String,
    /// The company id the key belongs to.
    #[arg(long, env = "CALLCAP_COMPANY_ID")]
    pub company: Uuid,
}

/// NATS nkey administration.
#[derive(Debug, Subcommand)]
pub enum NkeyCommand {
    /// Create a user nkey: writes its seed (the secret) to --out, readable only by its
    /// owner, and prints the public key (starts with U) for the server's config, e.g.
    /// CALLCAP_GATEWAY_NKEY. An existing file is never overwritten.
    Create {
        /// Where to write the seed; give it to one service as NATS_NKEY_FILE.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Print the public key of an existing seed file.
    Public {
        /// The seed file.
        seed_file: std::path::PathBuf,
    },
}

/// API key administration.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for a company. The key is printed once, alone on the last line of
    /// stdout; only its SHA-256 hash is stored.
    Create {
        /// The company the key may write for.
        #[arg(long)]
        company: Uuid,
        /// A name to recognise the key by (e.g. the dialer it is for).
        #[arg(long)]
        name: String,
        /// Make the key expire after this many days (1 to 36,500, i.e. 100 years).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_in_days: Option<u32>,
    },
    /// List keys (never the keys themselves): id, company, name, created, expiry.
    List {
        /// Only this company's keys.
        #[arg(long)]
        company: Option<Uuid>,
    },
    /// Revoke a key by its id; running gateways refuse it within a second.
    Revoke {
        /// The key id shown by `keys create` and `keys list`.
        key_id: String,
    },
}

/// `ingest-gateway connectors`.
#[derive(Debug, Subcommand)]
pub enum ConnectorsCommand {
    /// Create a connector for a company and provider. Prints its id and, as the last line
    /// of stdout, the callback URL to paste into the provider's console.
    Create {
        /// The company whose calls the provider's callbacks are.
        #[arg(long)]
        company: Uuid,
        /// The telephony provider.
        #[arg(long, value_enum)]
        provider: crate::connectors::Provider,
        /// The https base URL the provider calls (e.g. https://calls.example.com), as the
        /// provider reaches the gateways through your load balancer: the signature covers
        /// it, so it must be exactly what the provider requests.
        #[arg(long)]
        public_url: String,
        /// A file holding the provider's signing secret: Twilio Auth Token, Plivo Auth
        /// Token, Vonage Signature secret. Not for Exotel (its URL carries a token made
        /// here).
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// ISO country code of the domestic numbers the provider sends (Exotel's
        /// `0…`), to store them in E.164, e.g. IN.
        #[arg(long)]
        country: Option<String>,
        /// Exotel only: a source network (CIDR) callbacks may come from, repeatable;
        /// without it any source with the URL's token is taken. Matched against the
        /// connecting address, so a load balancer in front must keep the client's
        /// address (e.g. proxy protocol off, direct routing).
        #[arg(long)]
        allow_network: Vec<String>,
        /// Vonage only, required: the id of the Vonage application whose Event URL this
        /// connector is. Vonage's signed tokens name their application and do not cover
        /// the URL, so a connector takes only its own application's callbacks.
        #[arg(long)]
        application: Option<String>,
    },
    /// List connectors (never a secret or token): id, company, provider, valid secrets,
    /// created, public URL.
    List {
        /// Only this company's connectors.
        #[arg(long)]
        company: Option<Uuid>,
    },
    /// Make a new signing secret current, keeping the previous one valid for
    /// --overlap-hours (the time the provider may still sign with it). For Exotel, a new
    /// URL token, printed as the last line.
    RotateSecret {
        /// The connector id shown by `connectors create` and `connectors list`.
        connector_id: String,
        /// A file holding the new secret (not for Exotel).
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// Hours the previous secret stays valid (0 to 720).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(0..=720))]
        overlap_hours: u32,
    },
    /// Bind a Vonage connector made before connectors named their application (its
    /// callbacks are answered 503 until it is bound) to its Vonage application.
    Bind {
        /// The connector id.
        connector_id: String,
        /// The id of the Vonage application whose Event URL this connector is.
        #[arg(long)]
        application: String,
    },
    /// Revoke a connector; running gateways refuse its callbacks within a second.
    Revoke {
        /// The connector id.
        connector_id: String,
    },
    /// Write a new secrets key (32 random bytes, base64) to --out, readable only by its
    /// owner: give the same file to every gateway and to whoever runs `connectors create`
    /// as CONNECTOR_SECRETS_KEY_FILE. Never overwrites a file.
    NewSecretsKey {
        /// Where to write the key.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// A setting the gateway refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--rate-limit-per-sec must be a non-negative number")]
    RateLimit,
    #[error("--max-batch-bytes must be at least --max-body-bytes")]
    BatchSmallerThanBody,
    #[error("--overflow-rate (OVERFLOW_RATE) must be a non-negative number of records a second")]
    OverflowRate,
}

/// Settings of the HTTP server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Largest body of a single-record POST, in bytes (413 above it).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_body_bytes: u32,

    /// Largest body of a batch POST, in bytes (413 above it).
    #[arg(long, env = "MAX_BATCH_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=256 * 1024 * 1024))]
    pub max_batch_bytes: u32,

    /// Most records in one batch POST (413 above it).
    #[arg(long, env = "MAX_BATCH_RECORDS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch_records: u32,

    /// Time a client has to send the request headers, in milliseconds; a slower
    /// connection is closed.
    #[arg(long, env = "HEADER_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_timeout_ms: u64,

    /// A connection with no request in progress is closed after this many seconds
    /// (HTTP/1 keep-alive and HTTP/2 alike). Keep it above your load balancer's idle
    /// timeout (60 s on most), so the balancer closes first and never reuses a socket
    /// the gateway is closing. A connection that has not sent a whole request yet gets
    /// HEADER_TIMEOUT_MS instead.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 75,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout_secs: u64,

    /// Most client connections open at once; a connection beyond it is closed at once
    /// (counted in gateway_connections_refused_total), so a flood of sockets cannot use
    /// up the file descriptors the open ones and NATS need. Lowered at start to the
    /// process's open-file limit minus 128 when that is smaller (the soft limit is
    /// first raised to the hard one).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Serve HTTPS with this PEM certificate chain (leaf first). Needs TLS_KEY_FILE.
    /// Without both, the gateway serves plain HTTP and TLS is the load balancer's job.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,

    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,

    /// How often to check TLS_CERT_FILE and TLS_KEY_FILE for a renewed certificate, in
    /// seconds; a change is served to new connections without a restart.
    #[arg(long, env = "TLS_RELOAD_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub tls_reload_secs: u64,

    /// Time a client has to send the request body, in milliseconds (408 after it).
    #[arg(long, env = "BODY_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub body_timeout_ms: u64,

    /// Longest wait for JetStream's acknowledgement of a publish, in milliseconds;
    /// after it the answer is 503 with Retry-After. Until then a publish refused or
    /// unanswered during a leader election is resent (same Nats-Msg-Id). The default
    /// covers JetStream's election (4-9 s after a node dies), so losing a node costs
    /// latency, not 503s; clients' HTTP timeouts should be longer (15 s or more).
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub publish_timeout_ms: u64,

    /// Most publishes awaiting a JetStream ack at once; past it new records get 503 with
    /// Retry-After instead of queueing without bound.
    #[arg(long, env = "MAX_IN_FLIGHT_PUBLISHES", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight_publishes: u32,

    /// Most records in one atomic batch to JetStream (group commit). Keep it at or below
    /// the server's `jetstream.limits.batch.max_msgs` (1,000 by default); the batch
    /// endpoint's records are sent in batches of this size, in order.
    #[arg(long, env = "PUBLISH_BATCH_MAX_RECORDS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub publish_batch_max_records: u32,

    /// Most atomic batches this gateway has awaiting their ack at once. All gateways'
    /// batches count against the server's `jetstream.limits.batch.max_inflight_per_stream`
    /// (50 by default) and `max_inflight_total` (1,000): keep gateways x this below them.
    /// A second batch goes out early only when it is full or has lingered
    /// (PUBLISH_LINGER_US); otherwise it waits for the ack in flight and grows.
    #[arg(long, env = "PUBLISH_BATCHES_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub publish_batches_in_flight: u32,

    /// Longest a record waits for its batch to fill while other batches are in flight,
    /// in microseconds; a batch is sent earlier when the ack in flight returns or it is
    /// full. When nothing is in flight a record is sent at once. Measured on one node:
    /// 10 ms (longer than an ack takes) gives fewer, larger batches than 1 ms and more
    /// throughput at the same latency.
    #[arg(long, env = "PUBLISH_LINGER_US", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub publish_linger_us: u64,

    /// The nats-server's monitoring address (e.g. http://127.0.0.1:8222), read once at
    /// start to log whether JetStream fsyncs before every ack (`sync_interval: always`).
    /// The client protocol does not report it; without this the log says "unknown".
    #[arg(long, env = "NATS_MONITOR_URL")]
    pub nats_monitor_url: Option<String>,

    /// Memory that request bodies being read, parsed and published may hold at once, in
    /// MiB; 0 (the default) is a quarter of the memory the gateway may use (its cgroup's
    /// limit, else the machine's), between 64 and 1,024. What a body costs is counted as
    /// it is decoded and, before it is parsed, what parsing it will allocate (a compressed
    /// body of a few KiB can decode to MiBs of JSON values). Past the budget new bodies
    /// get 503 with Retry-After (counted in gateway_refused_total{reason="memory_busy"}).
    #[arg(long, env = "BODY_MEMORY_MB", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub body_memory_mb: u32,

    /// Share of BODY_MEMORY_MB one API key's requests may hold at once, in percent: one
    /// dialer cannot take the memory every other company's records need. A single body
    /// that costs more than this share gets 413 (send fewer records per request); a key
    /// whose other requests hold its share gets 503 with Retry-After.
    #[arg(long, env = "BODY_MEMORY_PER_KEY_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub body_memory_per_key_percent: u8,

    /// Share of BODY_MEMORY_MB kept for provider callbacks' bodies, in percent. A
    /// callback's body is read before its signature can be checked (Twilio and Plivo sign
    /// the body), so this pool is apart from the API's: forged callbacks cannot take the
    /// memory of dialers' records, nor the reverse. One source address (the connecting
    /// peer, or the client a TRUSTED_PROXIES balancer names) may hold an eighth of it, so
    /// slow bodies from one sender do not hold up the provider's genuine callbacks.
    #[arg(long, env = "CALLBACK_MEMORY_PERCENT", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(1..=50))]
    pub callback_memory_percent: u8,

    /// Networks (CIDR, comma-separated) of the load balancers or proxies in front of the
    /// gateways. A request from one of them is taken to come from the last address in its
    /// X-Forwarded-For that is not itself in these networks: the address the callback
    /// memory is shared by and Exotel's --allow-network is matched against. Empty (the
    /// default): the connecting address, and X-Forwarded-For is ignored (a client can
    /// write anything there).
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Per-key rate limit, in requests per second; 0 turns it off (the API document
    /// promises no hard limit, so off is the default).
    #[arg(long, env = "RATE_LIMIT_PER_SEC", default_value_t = 0.0)]
    pub rate_limit_per_sec: f64,

    /// Requests a key may send at once above the rate before it gets 429.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,

    /// A company's share of the main lane, in records per second (per gateway): a
    /// company posting faster has its records published on the overflow lane, which
    /// workers serve side by side with the main one, so its backlog does not delay other
    /// companies. It still gets 201s. 0 turns detection off (OVERFLOW_COMPANIES still
    /// applies). Default 1,000: a twentieth of what one worker stores a second on a small
    /// machine (BENCHMARKS.md, "Lanes").
    #[arg(long, env = "OVERFLOW_RATE", default_value_t = 1000.0)]
    pub overflow_rate: f64,

    /// Records a company may post at once above OVERFLOW_RATE before it moves to the
    /// overflow lane. Small on purpose: what a burst's start puts in the main lane is
    /// what other companies wait behind (2,000 cost them a p99 of 0.3-0.4 s, 500 about
    /// 0.2 s: BENCHMARKS.md, "Lanes"); a company moved early loses nothing, its records
    /// are stored as fast in the overflow lane while that lane is not busy.
    #[arg(long, env = "OVERFLOW_BURST", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub overflow_burst: u32,

    /// How long a company stays in the overflow lane after it last exceeded its rate, in
    /// seconds: it returns to the main lane once it has stayed within its share this long.
    #[arg(long, env = "OVERFLOW_STICKY_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub overflow_sticky_secs: u64,

    /// Companies whose records always take the overflow lane, comma-separated ids (an
    /// operator moving a known bulk uploader out of everybody's way).
    #[arg(long, env = "OVERFLOW_COMPANIES", value_delimiter = ',')]
    pub overflow_companies: Vec<uuid::Uuid>,

    /// Seconds a client is told to wait (Retry-After) when the gateway cannot take its
    /// record right now (503).
    #[arg(long, env = "RETRY_AFTER_SECS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub retry_after_secs: u32,

    /// A file holding the key that seals the provider connectors' secrets (`connectors
    /// new-secrets-key` makes one). Every gateway serving callbacks needs the same key;
    /// without it, connectors' callbacks are answered 503.
    #[arg(long, env = "CONNECTOR_SECRETS_KEY_FILE", global = true)]
    pub connector_secrets_key_file: Option<std::path::PathBuf>,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,
}

impl Default for ServeArgs {
    fn default() -> Self {
        callcap::config::defaults()
    }
}

impl ServeArgs {
    /// Checks what clap's ranges cannot express.
    ///
    /// # Errors
    /// [`ConfigError`], naming the flag at fault.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.rate_limit_per_sec.is_finite() || self.rate_limit_per_sec < 0.0 {
            return Err(ConfigError::RateLimit);
        }
        if !self.overflow_rate.is_finite() || self.overflow_rate < 0.0 {
            return Err(ConfigError::OverflowRate);
        }
        if self.max_batch_bytes < self.max_body_bytes {
            return Err(ConfigError::BatchSmallerThanBody);
        }
        Ok(())
    }

    /// BODY_MEMORY_MB in bytes, with 0 resolved to the default.
    pub fn body_memory_bytes(&self) -> usize {
        match self.body_memory_mb {
            0 => crate::budget::default_limit_bytes(),
            mb => (mb as usize).saturating_mul(1024 * 1024),
        }
    }

    /// The part of `total` (what [`ServeArgs::body_memory_bytes`] gave) kept for provider
    /// callbacks' bodies; the rest is the API's.
    pub fn callback_memory_bytes(&self, total: usize) -> usize {
        total / 100 * usize::from(self.callback_memory_percent)
    }

    /// What one key may hold of `total` (what [`ServeArgs::body_memory_bytes`] gave).
    pub fn body_memory_per_key_bytes(&self, total: usize) -> usize {
        total / 100 * usize::from(self.body_memory_per_key_percent)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The group-commit settings.
    pub fn group_commit(&self) -> crate::publish::GroupCommitConfig {
        crate::publish::GroupCommitConfig {
            max_batch_records: self.publish_batch_max_records as usize,
            max_batches_in_flight: self.publish_batches_in_flight as usize,
            linger: Duration::from_micros(self.publish_linger_us),
            ack_timeout: self.publish_timeout(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_flags() {
        let cli = Cli::try_parse_from(["ingest-gateway", "--listen-addr", "0.0.0.0:8080"]).unwrap();
        let d = ServeArgs::default();
        assert_eq!(cli.serve.max_body_bytes, d.max_body_bytes);
        assert_eq!(cli.serve.max_batch_records, d.max_batch_records);
        assert_eq!(cli.serve.publish_timeout_ms, d.publish_timeout_ms);
        assert!(cli.command.is_none());
        assert!(d.check().is_ok());
    }
}
