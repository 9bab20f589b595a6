//! The JetStream publish protocol on one NATS connection: single publishes and atomic
//! batches (ADR-50, nats-server 2.12+), with every reply routed back to the call that is
//! waiting for it.
//!
//! Why not async-nats' `Context::publish` or the `jetstream-extra` crate: the former has
//! no atomic batches; the latter refuses `Nats-Msg-Id` inside a batch (we need it on every
//! record: JetStream's deduplication is what makes a client's retry safe) and is built on
//! an older async-nats. The protocol itself is small: every message of a batch carries
//! `Nats-Batch-Id` and `Nats-Batch-Sequence`; the last one also `Nats-Batch-Commit: 1`
//! and a reply subject, and the server answers that one with the ack of the whole batch
//! (the sequence of its last record and the count) or with the error that abandoned it.
//!
//! Sending is in call order (one NATS connection keeps the order of what is published on
//! it), so the caller decides the order of records in the stream. Waiting for a reply is
//! separate from sending, so several batches can be in flight at once. One wildcard
//! subscription on a private inbox carries every reply; a token in the reply subject
//! finds its waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::{self, HeaderMap};
use async_nats::StatusCode;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;

use bytes::Bytes;

use super::PublishError;

/// A record as the connection sends it: its subject on the stream, its `Nats-Msg-Id`,
/// its payload.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    /// `Nats-Msg-Id`: JetStream drops a second publish with the same id in its window.
    pub msg_id: String,
    pub payload: Bytes,
    /// Sent as the `traceparent`/`tracestate` headers.
    pub trace: Option<callcap::traces::TraceContext>,
}

/// JetStream's error code for an atomic batch holding a `Nats-Msg-Id` the stream has
/// already stored (or one that appears twice in the batch).
pub const ERR_BATCH_DUPLICATE_MSG_ID: u32 = 10201;
/// JetStream's error code for too many atomic batches in flight (per stream or server).
pub const ERR_BATCH_TOO_MANY_INFLIGHT: u32 = 10210;
/// JetStream's error code for an atomic batch abandoned before its commit (its messages
/// went to a leader that stepped down, or it timed out on the server).
pub const ERR_BATCH_INCOMPLETE: u32 = 10176;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// What the server answered to a single publish or a batch commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Stored. For a batch, `seq` is the sequence of its last record and `count` the
    /// number of records; for a single publish `count` is 1.
    Ack {
        seq: u64,
        count: u64,
        duplicate: bool,
    },
    /// Refused with a JetStream API error.
    Error {
        code: u16,
        err_code: u32,
        description: String,
    },
    /// Nobody listens on the subject: the stream is missing or has no leader.
    NoResponders,
    /// An answer that is not a publish ack.
    Garbled(String),
}

impl Reply {
    /// Whether sending the same records again may succeed soon: no stream leader (an
    /// election), a service-unavailable answer, a batch cut short, or too many batches
    /// in flight.
    pub fn is_transient(&self) -> bool {
        match self {
            Reply::NoResponders => true,
            Reply::Error { code, err_code, .. } => {
                *code == 503
                    || *err_code == ERR_BATCH_TOO_MANY_INFLIGHT
                    || *err_code == ERR_BATCH_INCOMPLETE
            }
            Reply::Ack { .. } | Reply::Garbled(_) => false,
        }
    }

    /// The error this reply means for the records it covers, if it is not an ack.
    pub fn into_error(self) -> Option<PublishError> {
        match self {
            Reply::Ack { .. } => None,
            Reply::Error {
                code,
                err_code,
                description,
            } => {
                let what = format!("{description} (status {code}, code {err_code})");
                Some(match err_code {
                    // Store failed (maximum bytes or messages), storage or account
                    // resources exceeded, the stream's byte limit.
                    10077 | 10047 | 10028 | 10002 | 10122 => PublishError::StreamFull(what),
                    10054 => PublishError::TooLarge,
                    _ if code == 503 => PublishError::NoLeader(what),
                    _ => PublishError::Refused(what),
                })
            }
            Reply::NoResponders => Some(PublishError::NoLeader(
                "no stream is listening on the subject (stream missing or leaderless)".into(),
            )),
            Reply::Garbled(what) => Some(PublishError::Refused(format!(
                "unexpected answer to a publish: {what}"
            ))),
        }
    }
}

#[derive(Deserialize)]
struct AckBody {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<ApiErrorBody>,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

fn parse_reply(msg: &async_nats::Message) -> Reply {
    if msg.status == Some(StatusCode::NO_RESPONDERS) {
        return Reply::NoResponders;
    }
    match serde_json::from_slice::<AckBody>(&msg.payload) {
        Ok(AckBody { error: Some(e), .. }) => Reply::Error {
            code: e.code,
            err_code: e.err_code,
            description: e.description,
        },
        Ok(ack) if ack.seq > 0 => Reply::Ack {
            seq: ack.seq,
            count: ack.count.unwrap_or(1),
            duplicate: ack.duplicate,
        },
        Ok(_) => Reply::Garbled("an ack without a sequence".into()),
        Err(e) => Reply::Garbled(format!(
            "{e} (status {:?}, {} bytes)",
            msg.status,
            msg.payload.len()
        )),
    }
}

/// What group commit needs of the connection: hand over a single publish or an atomic
/// batch and get the pending reply. [`Wire`] is the real one; group commit's tests
/// script one.
pub trait Transport: Send + Sync + 'static {
    /// Publishes one record on its own (see [`Wire::send_single`]).
    fn send_single<'a>(
        &'a self,
        record: &'a Message,
    ) -> futures::future::BoxFuture<'a, Result<PendingReply, PublishError>>;

    /// Publishes two or more records as one atomic batch (see [`Wire::send_atomic`]).
    fn send_atomic<'a>(
        &'a self,
        records: &'a [&'a Message],
    ) -> futures::future::BoxFuture<'a, Result<PendingReply, PublishError>>;
}

impl Transport for Wire {
    fn send_single<'a>(
        &'a self,
        record: &'a Message,
    ) -> futures::future::BoxFuture<'a, Result<PendingReply, PublishError>> {
        Box::pin(Wire::send_single(self, record))
    }

    fn send_atomic<'a>(
        &'a self,
        records: &'a [&'a Message],
    ) -> futures::future::BoxFuture<'a, Result<PendingReply, PublishError>> {
        Box::pin(Wire::send_atomic(self, records))
    }
}

/// A reply not received yet. Dropping it forgets the waiter (a late reply is discarded).
pub struct PendingReply {
    token: u64,
    rx: oneshot::Receiver<Reply>,
    waiters: Waiters,
}

impl PendingReply {
    /// A reply that arrives on `rx`, routed by nobody (a scripted [`Transport`]'s).
    pub fn from_channel(rx: oneshot::Receiver<Reply>) -> Self {
        PendingReply {
            token: 0,
            rx,
            waiters: Waiters::default(),
        }
    }

    /// Waits for the reply up to `timeout`.
    ///
    /// # Errors
    /// [`PublishError::Timeout`] when no reply came in time (the records may still have
    /// been stored; a retry with the same `Nats-Msg-Id` is deduplicated).
    pub async fn wait(mut self, timeout: Duration) -> Result<Reply, PublishError> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(PublishError::Timeout(
                "the connection to NATS was closed".into(),
            )),
            Err(_) => Err(PublishError::Timeout(format!(
                "no ack within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&self.token);
        }
    }
}

/// Publishes on one NATS connection and routes the replies.
pub struct Wire {
    client: async_nats::Client,
    inbox: String,
    next_token: AtomicU64,
    waiters: Waiters,
}

impl Wire {
    /// Subscribes the private reply inbox and starts routing replies.
    ///
    /// # Errors
    /// When the subscription cannot be made (the client is closed).
    pub async fn new(client: async_nats::Client) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(format!("{inbox}.*")).await?;
        let waiters: Waiters = Arc::default();
        let routed = waiters.clone();
        tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Some(token) = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    continue;
                };
                let waiter = routed.lock().ok().and_then(|mut w| w.remove(&token));
                if let Some(tx) = waiter {
                    let _ = tx.send(parse_reply(&msg));
                }
            }
        });
        Ok(Wire {
            client,
            inbox,
            next_token: AtomicU64::new(1),
            waiters,
        })
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn register(&self) -> (String, PendingReply) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("the waiter map is never poisoned: no code panics while holding it")
            .insert(token, tx);
        (
            format!("{}.{token}", self.inbox),
            PendingReply {
                token,
                rx,
                waiters: self.waiters.clone(),
            },
        )
    }

    /// Publishes one record on its own; the reply is its ack.
    ///
    /// # Errors
    /// When the message cannot be handed to the connection (too large, client closed).
    pub async fn send_single(&self, record: &Message) -> Result<PendingReply, PublishError> {
        self.send_expecting_reply(record, record_headers(record))
            .await
    }

    /// Publishes `records` (two or more, at most the server's batch limit) as one atomic
    /// batch: stored all together at consecutive sequences, or not at all. The reply is
    /// the ack of the whole batch.
    ///
    /// # Errors
    /// When a message cannot be handed to the connection; the server then abandons the
    /// incomplete batch after its batch timeout.
    pub async fn send_atomic(&self, records: &[&Message]) -> Result<PendingReply, PublishError> {
        debug_assert!(records.len() >= 2, "a batch of one is a single publish");
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let (last, rest) = records
            .split_last()
            .expect("a batch has at least one record");
        let batch_headers = |record: &Message, n: usize| {
            let mut headers = record_headers(record);
            headers.insert(header::NATS_BATCH_ID, batch_id.as_str());
            headers.insert(header::NATS_BATCH_SEQUENCE, n.to_string());
            headers
        };
        // Only the commit carries a reply subject: an error earlier in the batch
        // abandons it, and the commit is then answered "incomplete".
        for (i, record) in rest.iter().enumerate() {
            self.client
                .publish_with_headers(
                    record.subject.clone(),
                    batch_headers(record, i + 1),
                    record.payload.clone(),
                )
                .await
                .map_err(classify_send)?;
        }
        let mut headers = batch_headers(last, records.len());
        headers.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
        self.send_expecting_reply(last, headers).await
    }

    async fn send_expecting_reply(
        &self,
        record: &Message,
        headers: HeaderMap,
    ) -> Result<PendingReply, PublishError> {
        let (reply_to, pending) = self.register();
        self.client
            .publish_with_reply_and_headers(
                record.subject.clone(),
                reply_to,
                headers,
                record.payload.clone(),
            )
            .await
            .map_err(classify_send)?;
        Ok(pending)
    }
}

/// Every record carries its `Nats-Msg-Id`: JetStream deduplicates retries by it.
fn record_headers(record: &Message) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::NATS_MESSAGE_ID, record.msg_id.as_str());
    if let Some(trace) = &record.trace {
        trace.to_nats(&mut headers);
    }
    headers
}

fn classify_send(e: async_nats::PublishError) -> PublishError {
    match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge,
        _ => PublishError::Timeout(format!("handing the message to NATS failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_has_the_kind_logs_and_metrics_tell_apart() {
        let error = |code, err_code, d: &str| Reply::Error {
            code,
            err_code,
            description: d.into(),
        };
        let kinds: Vec<&str> = [
            error(503, 10077, "maximum bytes exceeded"),
            error(400, 10047, "insufficient storage resources available"),
            error(503, 0, "no responders"),
            Reply::NoResponders,
            error(400, 10054, "message size exceeds maximum allowed"),
            error(400, 10176, "atomic publish batch is incomplete"),
        ]
        .into_iter()
        .map(|r| r.into_error().expect("not an ack").kind())
        .collect();
        assert_eq!(
            kinds,
            [
                "stream_full",
                "stream_full",
                "no_leader",
                "no_leader",
                "too_large",
                "refused"
            ]
        );
    }

    fn msg(payload: &str, status: Option<StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: bytes::Bytes::from(payload.to_owned()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn parses_acks_errors_and_no_responders() {
        assert_eq!(
            parse_reply(&msg(
                r#"{"stream":"CALLS","seq":42,"batch":"b","count":3}"#,
                None
            )),
            Reply::Ack {
                seq: 42,
                count: 3,
                duplicate: false
            }
        );
        assert_eq!(
            parse_reply(&msg(r#"{"stream":"CALLS","seq":7,"duplicate":true}"#, None)),
            Reply::Ack {
                seq: 7,
                count: 1,
                duplicate: true
            }
        );
        let dup = parse_reply(&msg(
            r#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"},"stream":"CALLS","seq":0}"#,
            None,
        ));
        assert!(matches!(
            dup,
            Reply::Error {
                err_code: ERR_BATCH_DUPLICATE_MSG_ID,
                ..
            }
        ));
        assert_eq!(
            parse_reply(&msg("", Some(StatusCode::NO_RESPONDERS))),
            Reply::NoResponders
        );
        assert!(
            !dup.is_transient(),
            "a duplicate is answered from the dedup, not resent"
        );
        assert!(Reply::NoResponders.is_transient());
        let incomplete = parse_reply(&msg(
            r#"{"error":{"code":400,"err_code":10176,"description":"atomic publish batch is incomplete"},"stream":"CALLS","seq":0}"#,
            None,
        ));
        assert!(incomplete.is_transient());
        let full = parse_reply(&msg(
            r#"{"error":{"code":400,"err_code":10077,"description":"maximum bytes exceeded"},"stream":"CALLS","seq":0}"#,
            None,
        ));
        assert!(!full.is_transient(), "a full stream is not an election");
        assert!(matches!(
            parse_reply(&msg("not json", None)),
            Reply::Garbled(_)
        ));
        assert!(matches!(
            parse_reply(&msg(r#"{"stream":"CALLS"}"#, None)),
            Reply::Garbled(_)
        ));
    }
}
