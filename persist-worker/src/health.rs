//! What the ops endpoints read of the work: one [`ConsumerHealth`] per durable consumer a
//! process serves (each lane on each partition stream for the workers, each stream for
//! the archiver), kept in one [`Registry`]. The stream runner adds them, the guard
//! writes the consumer's condition and backlog, the component its own figures (records
//! held, the archive's position and trouble); nothing here touches records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use callcap::partitions::Partition;
use callcap::subjects::Lane;
use tokio::sync::watch;

/// What the guard last saw of the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Not checked yet.
    Unknown,
    /// The stream has no subjects for this lane (created before lanes): not served.
    Absent,
    /// As defined.
    Right,
    /// Not on the server.
    Missing,
    /// On the server with another definition: the differences.
    Changed(Vec<String>),
}

/// One consumer's health, shared by the guard, the component serving it and the ops
/// endpoints.
#[derive(Debug)]
pub struct ConsumerHealth {
    consumer: &'static str,
    lane: Option<Lane>,
    partition: Partition,
    condition: Mutex<Condition>,
    repairs: AtomicU64,
    pending: AtomicU64,
    ack_pending: AtomicU64,
    /// Counts repairs for the component, which reopens its pull on the new consumer.
    reopened: watch::Sender<u64>,
    /// Records held unstored (their company's erasures cannot be checked here), and why.
    holding: Mutex<Option<(u64, crate::privacy::Uncheckable)>>,
    /// The last stream sequence the component finished with (the archive's position).
    position: AtomicU64,
    /// What keeps the component from its work now (an object store refusing), if so.
    trouble: Mutex<Option<String>>,
}

impl ConsumerHealth {
    /// Nothing seen yet of the durable consumer `consumer` (of `lane`, when it is one
    /// lane's) on `partition`'s stream.
    pub fn new(consumer: &'static str, lane: Option<Lane>, partition: Partition) -> Self {
        ConsumerHealth {
            consumer,
            lane,
            partition,
            condition: Mutex::new(Condition::Unknown),
            repairs: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            ack_pending: AtomicU64::new(0),
            reopened: watch::Sender::new(0),
            holding: Mutex::new(None),
            position: AtomicU64::new(0),
            trouble: Mutex::new(None),
        }
    }

    /// The durable consumer's name.
    pub fn consumer(&self) -> &'static str {
        self.consumer
    }

    /// The lane whose consumer this is, when it is one lane's.
    pub fn lane(&self) -> Option<Lane> {
        self.lane
    }

    /// The partition stream the consumer is on.
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// How the pages name it: `main` on `CALLS`, `main CALLS_E1_P0` on a partition
    /// stream, the stream's name for a whole-stream consumer.
    pub fn name(&self) -> String {
        match (self.lane, self.partition == Partition::LEGACY) {
            (Some(lane), true) => lane.to_string(),
            (Some(lane), false) => format!("{lane} {}", self.partition.stream_name()),
            (None, _) => self.partition.stream_name(),
        }
    }

    /// The consumer's condition as last seen.
    pub fn condition(&self) -> Condition {
        lock(&self.condition).clone()
    }

    /// Sets the consumer's condition.
    pub fn set(&self, c: Condition) {
        *lock(&self.condition) = c;
    }

    /// Marks the lane as not in the stream (not served, nothing can arrive in it).
    pub fn set_absent(&self) {
        self.set(Condition::Absent);
    }

    /// Changes after each repair: the component reopens its pull then.
    pub fn reopened(&self) -> watch::Receiver<u64> {
        self.reopened.subscribe()
    }

    /// Counts a repair and tells the component.
    pub fn repaired(&self) {
        self.repairs.fetch_add(1, Ordering::Relaxed);
        self.reopened.send_modify(|n| *n += 1);
    }

    /// Times the consumer was recreated by this process.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Sets the backlog as last read.
    pub fn set_backlog(&self, pending: u64, ack_pending: u64) {
        self.pending.store(pending, Ordering::Relaxed);
        self.ack_pending.store(ack_pending, Ordering::Relaxed);
    }

    /// Records not yet delivered, and delivered but not acked, as last read.
    pub fn backlog(&self) -> (u64, u64) {
        (
            self.pending.load(Ordering::Relaxed),
            self.ack_pending.load(Ordering::Relaxed),
        )
    }

    /// Records held unstored (their company's erasures cannot be checked here), and why;
    /// `None` when none is.
    pub fn holding(&self) -> Option<(u64, crate::privacy::Uncheckable)> {
        lock(&self.holding).clone()
    }

    /// Sets what [`ConsumerHealth::holding`] says.
    pub fn set_holding(&self, held: Option<(u64, crate::privacy::Uncheckable)>) {
        *lock(&self.holding) = held;
    }

    /// The last stream sequence the component finished with.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Relaxed)
    }

    /// Sets [`ConsumerHealth::position`].
    pub fn set_position(&self, seq: u64) {
        self.position.store(seq, Ordering::Relaxed);
    }

    /// What keeps the component from its work now, if anything.
    pub fn trouble(&self) -> Option<String> {
        lock(&self.trouble).clone()
    }

    /// Sets (or with `None` clears) [`ConsumerHealth::trouble`].
    pub fn set_trouble(&self, trouble: Option<String>) {
        *lock(&self.trouble) = trouble;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every consumer a process serves; grows as partition streams appear.
#[derive(Clone, Default)]
pub struct Registry(Arc<RwLock<Vec<Arc<ConsumerHealth>>>>);

impl Registry {
    /// Adds a consumer being served.
    pub fn add(&self, h: Arc<ConsumerHealth>) {
        let mut all = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.push(h);
        all.sort_by_key(|h| (h.partition(), h.lane()));
    }

    /// The consumers as now.
    pub fn all(&self) -> Vec<Arc<ConsumerHealth>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
