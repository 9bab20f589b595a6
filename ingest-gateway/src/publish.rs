//! Publishing accepted records to JetStream, and nothing else.
//!
//! [`Publisher`] is the seam the handlers see (a fake can stand in for handler unit
//! tests); [`JetStreamPublisher`] is the real one. A publish is done only when JetStream's
//! ack arrives: that ack is what makes the gateway's 201 a promise.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use futures::future::BoxFuture;

/// One record ready to publish.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub subject: String,
    /// `Nats-Msg-Id`: JetStream drops a second publish with the same id in its window.
    pub msg_id: String,
    pub payload: Bytes,
}

/// JetStream's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Stream sequence the record is stored at.
    pub seq: u64,
    /// True when JetStream had it already (a retry inside the duplicate window).
    pub duplicate: bool,
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// NATS is down, slow, or the ack did not come in time.
    #[error("JetStream did not acknowledge the publish in time ({0})")]
    Timeout(String),
    /// JetStream answered but refused (stream full, no stream, leader election…).
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
            PublishError::Timeout(_) | PublishError::Refused(_) => true,
            PublishError::TooLarge => false,
        }
    }
}

/// A pending ack: resolves when JetStream acknowledges (or refuses) the record.
pub type AckFuture = BoxFuture<'static, Result<Receipt, PublishError>>;

/// Where accepted records go.
pub trait Publisher: Send + Sync + 'static {
    /// Sends a record and returns the future of its ack. Sending is in call order, so
    /// records sent one after another are stored in that order.
    fn send(&self, msg: Outbound) -> BoxFuture<'_, Result<AckFuture, PublishError>>;

    /// Whether publishing can work right now (connected, stream present).
    fn check_ready(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// Publishes to the `CALLS` stream through a JetStream context.
pub struct JetStreamPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    timeout: Duration,
}

impl JetStreamPublisher {
    /// `timeout` bounds the wait for each ack; `max_in_flight` sizes the client's own
    /// pending-ack budget (the gateway enforces its own lower bound before it).
    pub fn new(client: async_nats::Client, timeout: Duration, max_in_flight: usize) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .max_ack_inflight(max_in_flight.saturating_mul(2).max(16))
            .build(client.clone());
        JetStreamPublisher {
            client,
            js,
            timeout,
        }
    }

    /// The JetStream context (for stream set-up at start).
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }
}

fn classify(e: async_nats::jetstream::context::PublishError) -> PublishError {
    match e.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => PublishError::Timeout(e.to_string()),
        PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge,
        _ => PublishError::Refused(e.to_string()),
    }
}

impl Publisher for JetStreamPublisher {
    fn send(&self, msg: Outbound) -> BoxFuture<'_, Result<AckFuture, PublishError>> {
        Box::pin(async move {
            let started = Instant::now();
            let publish = jetstream::message::PublishMessage::build()
                .payload(msg.payload)
                .message_id(msg.msg_id);
            let pending =
                tokio::time::timeout(self.timeout, self.js.send_publish(msg.subject, publish))
                    .await
                    .map_err(|_| PublishError::Timeout("send timed out".into()))?
                    .map_err(classify)?;
            let timeout = self.timeout;
            let ack: AckFuture = Box::pin(async move {
                let ack =
                    tokio::time::timeout(timeout, std::future::IntoFuture::into_future(pending))
                        .await
                        .map_err(|_| PublishError::Timeout("ack timed out".into()))?
                        .map_err(classify)?;
                metrics::histogram!("gateway_publish_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(Receipt {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                })
            });
            Ok(ack)
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.client.connection_state() != async_nats::connection::State::Connected {
                return Err("NATS is not connected".into());
            }
            tokio::time::timeout(
                self.timeout,
                self.js.get_stream(callcap::subjects::STREAM_NAME),
            )
            .await
            .map_err(|_| "JetStream did not answer in time".to_owned())?
            .map_err(|e| format!("stream {} unreachable: {e}", callcap::subjects::STREAM_NAME))?;
            Ok(())
        })
    }
}
