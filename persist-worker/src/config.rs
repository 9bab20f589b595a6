//! The worker's command line: flags with environment fallbacks, checked at boot.
//!
//! `persist-worker` with no subcommand consumes; `archive` runs the archiver; `migrate`,
//! `replay`, `dlq` and `erase` are operator commands. Doc comments here are the `--help`
//! text.

use std::net::SocketAddr;
use std::time::Duration;

use callcap::config::{NatsArgs, StreamArgs};
use callcap::telemetry::LogFormat;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

/// Call Capture persist worker: consumes the JetStream stream CALLS through the shared
/// durable consumer and writes each record to Postgres exactly once (idempotent upserts,
/// acks only after commit). Run as many as you like side by side.
#[derive(Debug, Parser)]
#[command(name = "persist-worker", version, about, long_about = None, after_help = callcap::traces::ENV_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub db: DbArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub stream: StreamArgs,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub privacy: PrivacyArgs,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// What to do; consuming is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the stream (the default when no subcommand is given).
    Run,
    /// Apply pending schema migrations and exit.
    Migrate,
    /// Re-apply part of the stream to Postgres (backfill or rebuild). Safe while workers
    /// run: writes are idempotent and never regress newer data.
    Replay(ReplayArgs),
    /// Inspect and re-drive dead letters (messages that could not be stored).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Erase a caller's data everywhere: the matching rows (calls, follow-ups, leads),
    /// dead letters and stream messages (deleted with their payload overwritten), and
    /// keep a keyed hash of the identifier so that no replay, redrive, in-flight message
    /// or resent record stores it again. Safe while gateways and workers run; run it
    /// again, or with --resume, to complete one that was interrupted. Needs
    /// ERASURE_KEY_FILE and the admin NATS identity.
    Erase(EraseArgs),
    /// Copy every partition stream into the archive (ARCHIVE_URL): immutable zstd JSON
    /// lines objects, written once and acked after the store has them, so the stream's
    /// age limit can be short. Run one (one replica). Needs Postgres (erasures are
    /// checked before archiving) and the worker NATS identity.
    Archive(ArchiveRunArgs),
    /// Where one call's record is: on which stream and sequence and whether a worker has
    /// acked it, stored (the row's stored_at and status), dead-lettered (why), erased
    /// (when), archived (which object) — one answer to paste into a ticket. Reads only.
    /// Exits 1 when the record is found nowhere. Needs Postgres and the admin NATS
    /// identity; ERASURE_KEY_FILE to check erasures, ARCHIVE_URL to look in the archive.
    Trace(TraceArgs),
}

/// Which call `trace` looks for: a company's, by external id or by `call_history_id`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("call").required(true).args(["external_call_id", "call_history_id"])))]
pub struct TraceArgs {
    /// The company the call belongs to.
    #[arg(long)]
    pub company: Uuid,

    /// The dialer's `external_call_id` (the id the ticket usually quotes).
    #[arg(value_name = "EXTERNAL_CALL_ID")]
    pub external_call_id: Option<String>,

    /// The record's `external_system`, when it was sent with one.
    #[arg(long, requires = "external_call_id")]
    pub external_system: Option<String>,

    /// The `call_history_id` the 201 answered, instead of the external id.
    #[arg(long, conflicts_with = "external_call_id")]
    pub call_history_id: Option<Uuid>,

    /// One JSON object instead of lines for people.
    #[arg(long)]
    pub json: bool,
}

/// Where the archive is, for every command that reads or writes it.
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// The archive: `s3://bucket[/prefix]` in S3-compatible storage. Credentials and
    /// endpoint come from the standard variables: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL (any S3-compatible server;
    /// a plain http:// endpoint needs AWS_ALLOW_HTTP=true). Used by `archive`, `replay
    /// --from-archive` and `erase` (which then also rewrites archived objects).
    #[arg(long, env = "ARCHIVE_URL", global = true)]
    pub archive_url: Option<String>,

    /// Most bytes one archived object may decompress to when it is read back (`replay
    /// --from-archive`, `erase`): a larger one is reported as unreadable and the others
    /// are still read. The archiver writes objects of at most ARCHIVE_OBJECT_BYTES (and
    /// one record), so keep this above it.
    #[arg(long, env = "ARCHIVE_READ_MAX_BYTES", default_value_t = 64 * 1024 * 1024, global = true,
          value_parser = clap::value_parser!(u64).range(1024 * 1024..=4 * 1024 * 1024 * 1024))]
    pub archive_read_max_bytes: u64,
}

impl Default for ArchiveArgs {
    fn default() -> Self {
        callcap::config::defaults()
    }
}

/// Settings of `persist-worker archive`.
#[derive(Debug, Clone, Args)]
pub struct ArchiveRunArgs {
    /// Most records per archive object.
    #[arg(long, env = "ARCHIVE_OBJECT_RECORDS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub object_records: u32,

    /// Most uncompressed bytes per archive object (bounds the archiver's memory: two
    /// objects in hand per partition stream, one gathering while the other is written).
    #[arg(long, env = "ARCHIVE_OBJECT_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub object_bytes: u64,

    /// Longest time an object stays open before it is written, in seconds: how far the
    /// archive trails the stream when traffic is light.
    #[arg(long, env = "ARCHIVE_LINGER_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub linger_secs: u64,

    /// How often new partition streams are looked for and the lag gauges refreshed, in
    /// seconds.
    #[arg(long, env = "ARCHIVE_CHECK_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub check_secs: u64,
}

impl ArchiveRunArgs {
    pub fn check(&self) -> Duration {
        Duration::from_secs(self.check_secs)
    }
}

/// Erasure and retention settings, for every command that writes records.
#[derive(Debug, Clone, Default, Args)]
pub struct PrivacyArgs {
    /// A file holding the key erased identifiers are hashed with (at least 32 random
    /// bytes, base64: `head -c 32 /dev/urandom | base64`). The same file for every
    /// worker and for `erase`; required once anything was erased (a worker without it
    /// holds the records of companies with erasures rather than risk storing erased data).
    #[arg(long, env = "ERASURE_KEY_FILE", global = true)]
    pub erasure_key_file: Option<std::path::PathBuf>,

    /// Keep stored calls this many days (by call date), deleting older ones (and dead
    /// letters recorded before then) in small batches; records older than that are not
    /// stored again by a replay. Unset: keep everything. Independent of the stream's
    /// replay window (STREAM_MAX_AGE_SECS).
    #[arg(long, env = "RETENTION_DAYS", global = true,
          value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub retention_days: Option<u32>,
}

/// `persist-worker erase`: whose data, and one of what identifies it.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("subject").required(true)
    .args(["phone", "lead", "external_call_id", "call", "all", "resume"])))]
pub struct EraseArgs {
    /// The company whose data it is.
    #[arg(long, required_unless_present = "resume")]
    pub company: Option<Uuid>,
    /// Every call with this number as caller or recipient, or in a number field of
    /// call_details (From, To, Caller, Called, ForwardedFrom, … and any field named
    /// *number or *phone), in any written form: separators of any kind, full-width
    /// digits, tel:, 00 or + are ignored; with a country (--country, or the company's
    /// connectors'), its domestic forms (0…, the national number) too. What is not
    /// covered is printed.
    #[arg(long)]
    pub phone: Option<String>,
    /// ISO country of --phone (e.g. IN), repeatable: its domestic forms are erased too.
    /// Without it, the countries of the company's provider connectors are used.
    #[arg(long, requires = "phone")]
    pub country: Vec<String>,
    /// Every call of this lead, and the lead.
    #[arg(long)]
    pub lead: Option<Uuid>,
    /// The call with this external id (under any system, or --external-system's).
    #[arg(long)]
    pub external_call_id: Option<String>,
    /// The external system of --external-call-id.
    #[arg(long, requires = "external_call_id")]
    pub external_system: Option<String>,
    /// One call, by its call_history_id.
    #[arg(long)]
    pub call: Option<Uuid>,
    /// The whole company: every call, lead, employee and the company itself.
    #[arg(long)]
    pub all: bool,
    /// Complete every erasure that was interrupted (identified by their hashes alone).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (for logs and scripts).
    #[arg(long)]
    pub quiet: bool,
    /// How long reading a stream may go without a message before its end, in seconds:
    /// then the erasure stops, is left incomplete (with the reason) and `--resume`
    /// completes it. A stall is never taken for the end of the stream.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_secs: u64,
}

/// Postgres connection.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/callcap",
        hide_env_values = true,
        hide_default_value = false
    )]
    pub database_url: String,

    /// Most Postgres connections of each lane this worker serves (each lane writes on
    /// its own connections, so a backlog in one never waits for the other's pool).
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub db_max_connections: u32,
}

/// Settings of the consumer loop.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the worker's /metrics, /readyz and /healthz.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,

    /// Lanes this worker serves, comma-separated: `main`, `overflow`, or both (the
    /// default: each lane its own durable consumer, pull and connections, side by side).
    /// Serving them from separate deployments lets each scale on its own lag.
    #[arg(long, env = "LANES", value_delimiter = ',', default_value = "main,overflow",
          value_parser = clap::value_parser!(callcap::subjects::Lane))]
    pub lanes: Vec<callcap::subjects::Lane>,

    /// Most messages written per transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// Most batches written at once, each in its own transaction on its own connection,
    /// while the next one is pulled and decoded. Batches that share a call id are never
    /// written at the same time. Keep below DB_MAX_CONNECTIONS; 1 writes one batch at a
    /// time.
    #[arg(long, env = "BATCHES_IN_FLIGHT", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub batches_in_flight: u32,

    /// Longest wait for a batch to fill after its first message, in milliseconds.
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_linger_ms: u64,

    /// How long a delivered message may stay unacknowledged before JetStream redelivers
    /// it (to this or another worker), in seconds. Held batches are kept alive with
    /// progress acks, so this only matters when a worker dies.
    #[arg(long, env = "ACK_WAIT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ack_wait_secs: u64,

    /// Most deliveries of one message. Database outages do not count against it (the
    /// worker holds the batch and retries); it bounds crash loops. After the last
    /// delivery a message stays in the stream for `replay`.
    #[arg(long, env = "MAX_DELIVER", default_value_t = 20,
          value_parser = clap::value_parser!(i64).range(4..=1000))]
    pub max_deliver: i64,

    /// Most messages delivered and not yet acknowledged across all workers.
    #[arg(long, env = "MAX_ACK_PENDING", default_value_t = 20_000,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub max_ack_pending: i64,

    /// Longest pause between retries of a batch while Postgres is unavailable, in ms.
    #[arg(long, env = "RETRY_MAX_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub retry_max_ms: u64,

    /// How often the durable consumer's definition and position are read, in seconds: a
    /// consumer found deleted, or changed in what governs delivery (filter, acks,
    /// limits), is recreated as defined from the last position seen while it was right,
    /// and /readyz says so until then. Also how often the backlog gauges are refreshed.
    #[arg(long, env = "CONSUMER_CHECK_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub consumer_check_secs: u64,

    /// Do not apply migrations on start.
    #[arg(long, env = "NO_MIGRATE")]
    pub no_migrate: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        callcap::config::defaults()
    }
}

impl RunArgs {
    pub fn consumer_check(&self) -> Duration {
        Duration::from_secs(self.consumer_check_secs)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
}

/// Which part of the stream to replay. Give `--from-seq` or `--since`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["from_seq", "since"])))]
pub struct ReplayArgs {
    /// First stream sequence to replay.
    #[arg(long, conflicts_with = "from_archive")]
    pub from_seq: Option<u64>,

    /// Read the archive (ARCHIVE_URL) first, from --since, then continue in the stream
    /// right after the last archived sequence: a window older than the stream's age
    /// limit, with no gap at the boundary.
    #[arg(long, requires = "since")]
    pub from_archive: bool,

    /// Replay messages stored at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,

    /// Stop at messages stored after this time (RFC 3339). Default: the end of the stream
    /// as it is when the replay starts.
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,

    /// Only this company's records.
    #[arg(long)]
    pub company: Option<Uuid>,

    /// Messages per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// No progress bar (for logs and scripts).
    #[arg(long)]
    pub quiet: bool,
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters not yet re-driven.
    List {
        /// Include those already re-driven.
        #[arg(long)]
        all: bool,
        /// Most rows shown.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Write dead letters again through the normal path; those that now succeed are
    /// marked re-driven, the others keep their (updated) reason.
    Redrive {
        /// Dead letter ids (from `dlq list`).
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
        /// Every dead letter not yet re-driven.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
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
    fn replay_needs_a_start() {
        assert!(Cli::try_parse_from(["persist-worker", "replay"]).is_err());
        let cli = Cli::try_parse_from(["persist-worker", "replay", "--from-seq", "1"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Replay(ReplayArgs {
                from_seq: Some(1),
                ..
            }))
        ));
        let cli = Cli::try_parse_from([
            "persist-worker",
            "replay",
            "--since",
            "2025-11-25T10:30:00Z",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Replay(ReplayArgs { since: Some(_), .. }))
        ));
    }
}
