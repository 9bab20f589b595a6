//! A [`Publisher`] that records what it is given and answers as scripted: the handlers'
//! test double (PostHog's capture keeps test sinks beside its Kafka sink the same way).
//! Whatever claims the pipeline works uses the real [`super::GroupCommit`] and a real
//! nats-server; this one lets every status a handler answers be checked in milliseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{NotReady, Outbound, Outcomes, PublishError, PublishStats, Publisher, Receipt};

/// How the scripted publisher answers one record.
pub type Script = Box<dyn Fn(&Outbound) -> Result<Receipt, PublishError> + Send + Sync>;

/// Records every publish call; answers each record by its script (by default: stored at
/// the next sequence).
pub struct ScriptedPublisher {
    calls: Mutex<Vec<Vec<Outbound>>>,
    script: Script,
    ready: Mutex<Result<(), NotReady>>,
    seq: AtomicU64,
}

impl Default for ScriptedPublisher {
    fn default() -> Self {
        ScriptedPublisher {
            calls: Mutex::new(Vec::new()),
            script: Box::new(|_| {
                Ok(Receipt {
                    seq: 0,
                    duplicate: false,
                })
            }),
            ready: Mutex::new(Ok(())),
            seq: AtomicU64::new(0),
        }
    }
}

impl ScriptedPublisher {
    /// A publisher that answers each record with `script`.
    pub fn answering(
        script: impl Fn(&Outbound) -> Result<Receipt, PublishError> + Send + Sync + 'static,
    ) -> Self {
        ScriptedPublisher {
            script: Box::new(script),
            ..Self::default()
        }
    }

    /// What `check_ready` answers from now on.
    pub fn set_ready(&self, ready: Result<(), NotReady>) {
        *self
            .ready
            .lock()
            .expect("not poisoned: no code panics holding it") = ready;
    }

    /// Every call's records, in order.
    pub fn calls(&self) -> Vec<Vec<Outbound>> {
        self.calls
            .lock()
            .expect("not poisoned: no code panics holding it")
            .clone()
    }

    /// Every record given, in order.
    pub fn records(&self) -> Vec<Outbound> {
        self.calls().into_iter().flatten().collect()
    }
}

impl Publisher for ScriptedPublisher {
    fn publish(&self, records: Vec<Outbound>) -> BoxFuture<'_, Outcomes> {
        let outcomes: Outcomes = records
            .iter()
            .map(|r| {
                (self.script)(r).map(|mut receipt| {
                    if receipt.seq == 0 {
                        receipt.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
                    }
                    receipt
                })
            })
            .collect();
        self.calls
            .lock()
            .expect("not poisoned: no code panics holding it")
            .push(records);
        async move { outcomes }.boxed()
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), NotReady>> {
        let ready = self
            .ready
            .lock()
            .expect("not poisoned: no code panics holding it")
            .clone();
        async move { ready }.boxed()
    }

    fn stats(&self) -> PublishStats {
        let calls = self.calls();
        PublishStats {
            batches: calls.len() as u64,
            records: calls.iter().map(|c| c.len() as u64).sum(),
            ..PublishStats::default()
        }
    }
}
