//! Publishing accepted records to JetStream, and nothing else.
//!
//! [`Publisher`] is the seam the handlers see; [`GroupCommit`] is the real one. A record is
//! published only when JetStream's ack for it arrives: that ack is what makes the
//! gateway's 201 a promise.
//!
//! - [`wire`]: the JetStream publish protocol (single publishes and ADR-50 atomic batches)
//!   over one NATS connection, with replies routed back to their batch;
//! - [`group`]: group commit — concurrent records coalesced into atomic batches, so that
//!   under `sync_interval: always` one fsync covers many records;
//! - [`partitioned`]: one group commit per partition stream of the current layout, each
//!   record to its company's partition, the layout followed as it changes;
//! - [`scripted`]: a publisher that records and answers as scripted, for handler tests.

pub mod group;
pub mod partitioned;
pub mod scripted;
pub mod wire;

use std::sync::LazyLock;

use bytes::Bytes;
use callcap::recent::Latencies;
use futures::future::BoxFuture;

pub use group::{GroupCommit, GroupCommitConfig};
pub use partitioned::Partitioned;

/// Registers the `# HELP` text of the publish metrics (call once the recorder is in).
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "gateway_publish_batch_records",
        "Records per publish to JetStream (an atomic batch, or 1): group commit at work"
    );
    metrics::describe_histogram!(
        "gateway_publish_duration_seconds",
        metrics::Unit::Seconds,
        "From handing a batch to NATS to its ack (the fsync included)"
    );
    metrics::describe_counter!(
        "gateway_publish_retries_total",
        "Publishes sent again within the publish deadline (leader election, lost reply, in-flight limit)"
    );
    metrics::describe_counter!(
        "gateway_publish_batch_fallbacks_total",
        "Atomic batches refused for holding an already stored record, republished one by one"
    );
    // Counters exist from the start at 0: a series that first appears at 1 shows no
    // increase to Prometheus, so the first event would go unseen by rate() and alerts.
    metrics::describe_gauge!(
        "gateway_partitions",
        "Partition streams of the layout this gateway publishes by (ingest-gateway partitions)"
    );
    metrics::counter!("gateway_publish_retries_total").absolute(0);
    metrics::counter!("gateway_publish_batch_fallbacks_total").absolute(0);
}

/// Publish times to JetStream's ack over the last minute (for the status page).
static LATENCIES: LazyLock<Latencies> = LazyLock::new(Latencies::default);

/// The publishes' times to their ack over the last minute, as the status page shows them.
pub fn latencies() -> &'static Latencies {
    &LATENCIES
}

/// Records one publish's time to its ack.
pub(crate) fn record_latency(seconds: f64) {
    LATENCIES.record(seconds);
}

/// One record ready to publish, addressed by what it is: its company and lane. The
/// stream and subject follow from them and the current layout ([`Partitioned`]), never
/// from a string parsed back.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub company: uuid::Uuid,
    pub lane: callcap::subjects::Lane,
    /// `Nats-Msg-Id`: JetStream drops a second publish with the same id in its window.
    pub msg_id: String,
    pub payload: Bytes,
    /// The W3C trace context the message carries to the worker (`traceparent`,
    /// `tracestate` headers): the publish span's when traces are on, the dialer's as it
    /// came when they are off, none when there is neither.
    pub trace: Option<callcap::traces::TraceContext>,
}

/// JetStream's acknowledgement of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Stream sequence the record is stored at.
    pub seq: u64,
    /// True when JetStream had it already (a retry inside the duplicate window).
    pub duplicate: bool,
}

/// Why a record was not acknowledged. The variant is the kind (nats.rs' `Error<Kind>`
/// idea): logs and `gateway_refused_total` tell them apart with [`PublishError::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// NATS is down, slow, or the ack did not come in time. The record may or may not
    /// have been stored: a retry with the same `Nats-Msg-Id` is deduplicated.
    #[error("JetStream did not acknowledge the publish in time ({0})")]
    Timeout(String),
    /// No stream leader took it (an election, a leaderless or missing stream).
    #[error("no JetStream stream leader took the publish: {0}")]
    NoLeader(String),
    /// The stream is at its limits (`discard: new` refuses rather than drops records
    /// nobody has stored yet) or the server is out of storage.
    #[error("the stream is full: {0}")]
    StreamFull(String),
    /// JetStream answered but refused for another reason (batch abandoned, …).
    #[error("JetStream refused the publish: {0}")]
    Refused(String),
    /// The message is over the server's max payload.
    #[error("message is larger than the server accepts")]
    TooLarge,
}

impl PublishError {
    /// Whether the client should retry the same record later (503 + Retry-After).
    pub fn is_retryable(&self) -> bool {
        match self {
            PublishError::Timeout(_)
            | PublishError::NoLeader(_)
            | PublishError::StreamFull(_)
            | PublishError::Refused(_) => true,
            PublishError::TooLarge => false,
        }
    }

    /// The kind, as a label: `timeout`, `no_leader`, `stream_full`, `refused`, `too_large`.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) => "timeout",
            PublishError::NoLeader(_) => "no_leader",
            PublishError::StreamFull(_) => "stream_full",
            PublishError::Refused(_) => "refused",
            PublishError::TooLarge => "too_large",
        }
    }
}

/// What a publisher has sent since it started (for `/readyz` and the tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PublishStats {
    /// Publishes sent: atomic batches, plus single records sent on their own.
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// Batches refused for holding an already stored record and republished one by one.
    pub fallbacks: u64,
    /// Publishes sent again because the first attempt met an election, a lost reply or
    /// the in-flight limit.
    pub retries: u64,
}

/// Why publishing cannot work right now, in the words `/readyz` and the status page show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("NATS is not connected")]
    Disconnected,
    #[error("JetStream did not answer in time")]
    NoAnswer,
    #[error("stream {stream} unreachable: {reason}")]
    StreamUnreachable { stream: String, reason: String },
    /// Another reason (a test double's).
    #[error("{0}")]
    Other(String),
}

/// One outcome per record, in the order the records were given.
pub type Outcomes = Vec<Result<Receipt, PublishError>>;

/// Where accepted records go.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `records` in order and resolves once each has been acknowledged or
    /// refused, with one outcome per record in the same order. Calls are published in
    /// the order they were made; a call's records keep their order in the stream.
    fn publish(&self, records: Vec<Outbound>) -> BoxFuture<'_, Outcomes>;

    /// Whether publishing can work right now (connected, stream present).
    fn check_ready(&self) -> BoxFuture<'_, Result<(), NotReady>>;

    /// Counts of what has been sent.
    fn stats(&self) -> PublishStats;
}
