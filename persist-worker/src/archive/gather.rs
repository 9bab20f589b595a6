//! Gathering one stream's messages into archive objects, and writing them.
//!
//! Messages gather into an object until it holds `ARCHIVE_OBJECT_RECORDS` records or
//! `ARCHIVE_OBJECT_BYTES` bytes, has been open `ARCHIVE_LINGER_SECS`, or the day changes.
//! The object is then handed to the [`Sink`] (written once, `If-None-Match: *`) and only
//! after the sink has it is its last message acked (the archiver's consumer acks "all":
//! acking a message acks every one before it). The next object gathers while one is
//! written (two in hand at most); acks go in order.
//!
//! Nothing is lost and nothing archived twice across a crash:
//! - a crash before the write loses only the object in hand: its messages were not acked
//!   and come again;
//! - a crash after the write and before the ack: the component resumes past the highest
//!   sequence the archive holds (and the gatherer skips, and acks, what it covers); a put
//!   that finds the very name already there counts as done;
//! - each object starts right after the previous one's last sequence, so the objects
//!   tile the stream and a gap would show.
//!
//! The gatherer sees messages ([`Incoming`]), a way to ack them ([`Ack`]) and a sink; the
//! component ([`super::component`]) feeds it from JetStream and the archive, the tests
//! from memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callcap::shutdown::Shutdown;
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;

use super::{Entry, Put};
use crate::health::ConsumerHealth;
use crate::store::Row;

/// Acknowledges a message (and, ack policy "all", every one before it).
pub trait Ack: Send + Sync + 'static {
    /// Confirmed by the server.
    fn ack(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// One stream message as gathered.
pub struct Incoming {
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it.
    pub time: DateTime<Utc>,
    pub payload: Bytes,
    pub ack: Arc<dyn Ack>,
}

/// An object gathered: the sequences it covers, its lines, the records to check against
/// erasures.
pub struct Object {
    /// Right after the previous object's last: the objects tile the stream.
    pub first: u64,
    pub last: u64,
    /// The day (UTC) every message of it was stored.
    pub day: NaiveDate,
    /// Each message's line, by sequence.
    pub lines: Vec<(u64, Vec<u8>)>,
    /// The messages that decode as envelopes, to check against erasures.
    pub rows: Vec<Row>,
    opened: Instant,
    bytes: usize,
    /// The last message's ack: acks the whole object.
    last_ack: Arc<dyn Ack>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub put: Put,
    /// Compressed bytes, and records kept (erased ones are left out).
    pub bytes: u64,
    pub records: u64,
}

/// Where objects go.
pub trait Sink: Send + Sync + 'static {
    /// Writes `object` once, leaving out what is erased. Retried until it succeeds.
    fn write<'a>(
        &'a self,
        stream: &'a str,
        object: &'a Object,
    ) -> BoxFuture<'a, anyhow::Result<Written>>;
}

/// When an object closes, and how long a failed write waits at most before its retry.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub records: usize,
    pub bytes: usize,
    pub linger: Duration,
    pub retry_max: Duration,
}

/// One stream's gatherer.
pub struct Gatherer {
    stream: String,
    limits: Limits,
    sink: Arc<dyn Sink>,
    health: Arc<ConsumerHealth>,
    shutdown: Shutdown,
    /// The last sequence written and acked.
    acked: u64,
    /// The last sequence handed over to be written (an object is written while the next
    /// one gathers).
    covered: u64,
    open: Option<Object>,
    writing: Option<tokio::task::JoinHandle<Option<u64>>>,
}

impl Gatherer {
    /// A gatherer resuming after `position` (what the archive holds and the consumer
    /// acked).
    pub fn new(
        stream: &str,
        position: u64,
        limits: Limits,
        sink: Arc<dyn Sink>,
        health: Arc<ConsumerHealth>,
        shutdown: Shutdown,
    ) -> Self {
        health.set_position(position);
        metrics::gauge!("archive_position", "stream" => stream.to_owned()).set(position as f64);
        Gatherer {
            stream: stream.to_owned(),
            limits,
            sink,
            health,
            shutdown,
            acked: position,
            covered: position,
            open: None,
            writing: None,
        }
    }

    /// How long to wait for the next message before [`Gatherer::idle`].
    pub fn wait(&self) -> Duration {
        self.open.as_ref().map_or(Duration::from_secs(1), |o| {
            self.limits.linger.saturating_sub(o.opened.elapsed())
        })
    }

    /// Takes one message. False once shutting down (the object in hand is then dropped
    /// unacked: its messages come again).
    pub async fn take(&mut self, m: Incoming) -> bool {
        if m.seq <= self.acked {
            // Archived and acked already (a redelivery): acked again, harmlessly.
            if let Err(e) = m.ack.ack().await {
                tracing::debug!(error = %e, "acking an archived message");
            }
            return true;
        }
        if m.seq <= self.covered || self.open.as_ref().is_some_and(|o| m.seq <= o.last) {
            // A redelivery of a message being written or in hand (the store was slow):
            // never acked here, its object's ack covers it.
            return true;
        }
        let day = m.time.date_naive();
        if self.open.as_ref().is_some_and(|o| o.day != day) && !self.hand_over().await {
            return false;
        }
        let first = if self.covered == 0 {
            m.seq
        } else {
            self.covered + 1
        };
        let records = self.limits.records.min(16_384);
        let o = self.open.get_or_insert_with(|| Object {
            first,
            last: m.seq,
            day,
            lines: Vec::with_capacity(records),
            rows: Vec::with_capacity(records),
            opened: Instant::now(),
            bytes: 0,
            last_ack: m.ack.clone(),
        });
        // Decoded only to check erasures (a replay checks everything else); what does not
        // decode as an envelope names no record to match, as for the workers.
        let line = match callcap::Envelope::decode(&m.payload) {
            Ok(envelope) => {
                o.rows.push(Row {
                    seq: m.seq,
                    subject: m.subject.clone(),
                    trace: None,
                    envelope,
                });
                Entry::line_of_json(m.seq, &m.subject, m.time, &m.payload)
            }
            Err(_) => Entry::new(m.seq, &m.subject, m.time, &m.payload).line(),
        };
        o.bytes += line.len();
        o.lines.push((m.seq, line));
        o.last = m.seq;
        o.last_ack = m.ack;
        let full = o.lines.len() >= self.limits.records || o.bytes >= self.limits.bytes;
        !full || self.hand_over().await
    }

    /// No message came within [`Gatherer::wait`]: an object open for the linger is
    /// handed over. False once shutting down.
    pub async fn idle(&mut self) -> bool {
        let lingered = self
            .open
            .as_ref()
            .is_some_and(|o| o.opened.elapsed() >= self.limits.linger);
        !lingered || self.hand_over().await
    }

    /// Lets the object being written finish its attempt (and its ack); the one in hand is
    /// dropped unacked.
    pub async fn drain(self) {
        if let Some(w) = self.writing {
            let _ = w.await;
        }
    }

    /// Hands the open object over to be written while the next one gathers, once the one
    /// before it is written and acked (in order: acking a message acks every one before
    /// it). False when shutting down.
    async fn hand_over(&mut self) -> bool {
        let Some(o) = self.open.take() else {
            return true;
        };
        if let Some(previous) = self.writing.take() {
            match previous.await {
                Ok(Some(p)) => self.acked = p,
                _ => return false,
            }
        }
        self.covered = o.last;
        let writer = Writer {
            stream: self.stream.clone(),
            sink: self.sink.clone(),
            health: self.health.clone(),
            retry_max: self.limits.retry_max,
            shutdown: self.shutdown.clone(),
        };
        self.writing = Some(tokio::spawn(async move { writer.flush(o).await }));
        true
    }
}

/// Writes one object and acks it.
struct Writer {
    stream: String,
    sink: Arc<dyn Sink>,
    health: Arc<ConsumerHealth>,
    retry_max: Duration,
    shutdown: Shutdown,
}

impl Writer {
    /// Writes the object (until the sink takes it), then acks it: the new position.
    /// `None` when shutting down before it was written.
    async fn flush(&self, o: Object) -> Option<u64> {
        let started = Instant::now();
        let written = self.until_written(&o).await?;
        // The ack confirmed by the server; lost, the position read at the next start
        // (the archive's last object) covers it.
        for attempt in 0..3 {
            match o.last_ack.ack().await {
                Ok(()) => break,
                Err(e) if attempt == 2 => {
                    tracing::warn!(stream = %self.stream, error = %e, "acking an archived object; it is skipped at the next start")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let stream = self.stream.clone();
        if written.put == Put::Created {
            metrics::counter!("archive_objects_total", "stream" => stream.clone()).increment(1);
            metrics::counter!("archive_records_total", "stream" => stream.clone())
                .increment(written.records);
            metrics::counter!("archive_bytes_total", "stream" => stream.clone())
                .increment(written.bytes);
        }
        metrics::histogram!("archive_put_duration_seconds").record(started.elapsed().as_secs_f64());
        metrics::gauge!("archive_position", "stream" => stream).set(o.last as f64);
        self.health.set_position(o.last);
        tracing::debug!(stream = %self.stream, first = o.first, last = o.last, records = written.records, put = ?written.put, "archived");
        Some(o.last)
    }

    /// Writes until the sink takes it, pausing with capped backoff (and counting the
    /// failure, shown as the stream's trouble) between attempts; `None` when shutting
    /// down first.
    async fn until_written(&self, o: &Object) -> Option<Written> {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.sink.write(&self.stream, o).await {
                Ok(w) => {
                    self.health.set_trouble(None);
                    return Some(w);
                }
                Err(e) => {
                    metrics::counter!("archive_errors_total", "stream" => self.stream.clone())
                        .increment(1);
                    self.health
                        .set_trouble(Some(format!("writing an archive object: {e:#}")));
                    tracing::warn!(
                        stream = %self.stream,
                        error = format!("{e:#}"),
                        retry_in_ms = pause.as_millis() as u64,
                        "writing an archive object failed; the stream keeps the records meanwhile"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.shutdown.triggered() => return None,
                    }
                    pause = (pause * 2).min(self.retry_max);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Acks recorded by sequence.
    #[derive(Clone, Default)]
    struct Acks(Arc<Mutex<Vec<u64>>>);

    struct SeqAck(u64, Acks);

    impl Ack for SeqAck {
        fn ack(&self) -> BoxFuture<'_, Result<(), String>> {
            (self.1).0.lock().unwrap().push(self.0);
            Box::pin(async { Ok(()) })
        }
    }

    /// Objects written, as (first, last, sequences held); fails the first `failures`
    /// writes.
    #[derive(Default)]
    struct Memory {
        written: Mutex<Vec<(u64, u64, Vec<u64>)>>,
        failures: Mutex<u32>,
    }

    impl Sink for Memory {
        fn write<'a>(
            &'a self,
            _: &'a str,
            o: &'a Object,
        ) -> BoxFuture<'a, anyhow::Result<Written>> {
            Box::pin(async move {
                {
                    let mut f = self.failures.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        anyhow::bail!("the store is down");
                    }
                }
                self.written.lock().unwrap().push((
                    o.first,
                    o.last,
                    o.lines.iter().map(|(s, _)| *s).collect(),
                ));
                Ok(Written {
                    put: Put::Created,
                    bytes: 1,
                    records: o.lines.len() as u64,
                })
            })
        }
    }

    struct Setup {
        gatherer: Gatherer,
        sink: Arc<Memory>,
        acks: Acks,
        health: Arc<ConsumerHealth>,
    }

    fn setup(position: u64, limits: Limits) -> Setup {
        let sink = Arc::new(Memory::default());
        let health = Arc::new(ConsumerHealth::new(
            "callcap-archiver",
            None,
            callcap::partitions::Partition::LEGACY,
        ));
        let gatherer = Gatherer::new(
            "CALLS",
            position,
            limits,
            sink.clone(),
            health.clone(),
            Shutdown::new(),
        );
        Setup {
            gatherer,
            sink,
            acks: Acks::default(),
            health,
        }
    }

    fn limits(records: usize) -> Limits {
        Limits {
            records,
            bytes: 1 << 20,
            linger: Duration::from_secs(3600),
            retry_max: Duration::from_millis(20),
        }
    }

    fn message(seq: u64, time: DateTime<Utc>, acks: &Acks) -> Incoming {
        Incoming {
            seq,
            subject: "calls.ingest.x".into(),
            time,
            payload: Bytes::from(format!("{{\"n\":{seq}}}")),
            ack: Arc::new(SeqAck(seq, acks.clone())),
        }
    }

    fn noon() -> DateTime<Utc> {
        "2026-12-02T12:00:00Z".parse().unwrap()
    }

    async fn settle(s: Setup) -> (Vec<(u64, u64, Vec<u64>)>, Vec<u64>, Arc<ConsumerHealth>) {
        s.gatherer.drain().await;
        let written = s.sink.written.lock().unwrap().clone();
        let acks = s.acks.0.lock().unwrap().clone();
        (written, acks, s.health)
    }

    #[tokio::test]
    async fn objects_close_at_their_record_count_and_are_acked_by_their_last_message() {
        let mut s = setup(0, limits(3));
        for seq in 1..=7 {
            assert!(s.gatherer.take(message(seq, noon(), &s.acks)).await);
        }
        // 7 is in hand: not written, not acked.
        let (written, acks, health) = settle(s).await;
        assert_eq!(written, [(1, 3, vec![1, 2, 3]), (4, 6, vec![4, 5, 6])]);
        assert_eq!(acks, [3, 6]);
        assert_eq!(health.position(), 6);
    }

    #[tokio::test]
    async fn objects_close_at_their_bytes_at_midnight_and_after_the_linger() {
        // Bytes: each line is ~90 bytes; 200 closes after the third.
        let mut s = setup(
            0,
            Limits {
                bytes: 200,
                ..limits(1000)
            },
        );
        for seq in 1..=4 {
            s.gatherer.take(message(seq, noon(), &s.acks)).await;
        }
        let (written, _, _) = settle(s).await;
        assert_eq!(written[0].0..=written[0].1, 1..=3);

        // A day change closes the object: one object, one day.
        let mut s = setup(0, limits(1000));
        let late = "2026-12-02T23:59:59Z".parse().unwrap();
        let early = "2026-12-03T00:00:01Z".parse().unwrap();
        s.gatherer.take(message(1, late, &s.acks)).await;
        s.gatherer.take(message(2, late, &s.acks)).await;
        s.gatherer.take(message(3, early, &s.acks)).await;
        let (written, acks, _) = settle(s).await;
        assert_eq!(written, [(1, 2, vec![1, 2])]);
        assert_eq!(acks, [2]);

        // The linger: an object open that long is written when idle.
        let mut s = setup(
            0,
            Limits {
                linger: Duration::from_millis(50),
                ..limits(1000)
            },
        );
        s.gatherer.take(message(1, noon(), &s.acks)).await;
        assert!(s.gatherer.idle().await);
        assert!(
            s.sink.written.lock().unwrap().is_empty(),
            "not yet lingered"
        );
        tokio::time::sleep(s.gatherer.wait()).await;
        assert!(s.gatherer.idle().await);
        let (written, acks, _) = settle(s).await;
        assert_eq!(written, [(1, 1, vec![1])]);
        assert_eq!(acks, [1]);
    }

    #[tokio::test]
    async fn nothing_is_acked_before_its_object_is_written() {
        let mut s = setup(0, limits(2));
        *s.sink.failures.lock().unwrap() = 3;
        for seq in 1..=2 {
            s.gatherer.take(message(seq, noon(), &s.acks)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            s.acks.0.lock().unwrap().is_empty(),
            "acked while the store was down"
        );
        assert!(s.health.trouble().unwrap().contains("the store is down"));
        let (written, acks, health) = settle(s).await;
        assert_eq!(written, [(1, 2, vec![1, 2])]);
        assert_eq!(acks, [2]);
        assert_eq!(health.trouble(), None, "the trouble clears once written");
    }

    #[tokio::test]
    async fn a_resumed_gatherer_skips_what_the_archive_holds_and_tiles_on() {
        // The archive holds 1..=10; the consumer delivers again from 8 (acks lost).
        let mut s = setup(10, limits(3));
        for seq in 8..=15 {
            s.gatherer.take(message(seq, noon(), &s.acks)).await;
        }
        let (written, acks, _) = settle(s).await;
        // 8..=10 acked again without an object; the next object starts at 11.
        assert_eq!(&acks[..3], [8, 9, 10]);
        assert_eq!(written, [(11, 13, vec![11, 12, 13])]);
        // A hole in the stream (messages deleted by an erasure) stays inside the range.
        let mut s = setup(0, limits(3));
        for seq in [1, 2, 5] {
            s.gatherer.take(message(seq, noon(), &s.acks)).await;
        }
        let (written, _, _) = settle(s).await;
        assert_eq!(written, [(1, 5, vec![1, 2, 5])]);
    }
}
