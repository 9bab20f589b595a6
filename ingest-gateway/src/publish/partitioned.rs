//! Publishing across the partitions of the current layout (`callcap::partitions`): one
//! [`GroupCommit`] per partition stream (an atomic batch is one stream's), each record
//! sent to its company's partition.
//!
//! Handlers name a record's subject in the layout-0 form (`calls.<lane>.<company>`); the
//! publisher puts it on the subject of the company's partition in the layout it routes
//! by. The layout is read from the server at start and every [`REFRESH`]; when a publish
//! fails, it is read again at once, and when it has changed (the old layout's streams
//! are sealed by `ingest-gateway partitions set`, so they refuse) the failed records are
//! sent again to their partition in the new layout, within the same request. A record is
//! only ever answered 201 for a JetStream ack.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use callcap::partitions::{self, Layout, Partition};
use callcap::subjects::Lane;
use futures::future::BoxFuture;

use super::{
    GroupCommit, GroupCommitConfig, NotReady, Outbound, Outcomes, PublishError, PublishStats,
    Publisher,
};

/// How often the layout is read again without a failure to prompt it.
pub const REFRESH: Duration = Duration::from_secs(2);

struct Routing {
    layout: Layout,
    by_partition: HashMap<Partition, Arc<GroupCommit>>,
}

/// The gateway's publisher: group commit per partition of the current layout.
pub struct Partitioned {
    client: async_nats::Client,
    js: jetstream::Context,
    config: GroupCommitConfig,
    routing: RwLock<Arc<Routing>>,
    /// One layout read at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// What retired routings had sent (their counters leave with them).
    retired: std::sync::Mutex<PublishStats>,
}

impl Partitioned {
    /// Routes by `layout` (read by the caller at start).
    ///
    /// # Errors
    /// When a partition's reply inbox cannot be subscribed.
    pub async fn start(
        client: async_nats::Client,
        js: jetstream::Context,
        config: GroupCommitConfig,
        layout: Layout,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let routing = Self::routing(&client, &config, layout).await?;
        let me = Arc::new(Partitioned {
            client,
            js,
            config,
            routing: RwLock::new(Arc::new(routing)),
            refreshing: tokio::sync::Mutex::new(()),
            retired: std::sync::Mutex::new(PublishStats::default()),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let Some(me) = weak.upgrade() else { return };
                me.refresh().await;
            }
        });
        Ok(me)
    }

    async fn routing(
        client: &async_nats::Client,
        config: &GroupCommitConfig,
        layout: Layout,
    ) -> Result<Routing, async_nats::SubscribeError> {
        let mut by_partition = HashMap::new();
        for p in layout.partitions() {
            let gc =
                GroupCommit::start_for(client.clone(), config.clone(), &p.stream_name()).await?;
            by_partition.insert(p, Arc::new(gc));
        }
        Ok(Routing {
            layout,
            by_partition,
        })
    }

    fn current(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The layout records are routed by now.
    pub fn layout(&self) -> Layout {
        self.current().layout
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Reads the layout from the server and, when it changed, routes by the new one.
    pub async fn refresh(&self) -> Refresh {
        let _one = self.refreshing.lock().await;
        let found = match partitions::list(&self.js).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "reading the partition layout");
                return Refresh::Same;
            }
        };
        let layout = match partitions::current_of(&found) {
            Ok(Some(l)) => l,
            Ok(None) => return Refresh::Same,
            // `partitions set` between sealing and creating.
            Err(_) => return Refresh::Switching,
        };
        if layout == self.layout() {
            return Refresh::Same;
        }
        match Self::routing(&self.client, &self.config, layout).await {
            Ok(routing) => {
                let old = std::mem::replace(
                    &mut *self
                        .routing
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Arc::new(routing),
                );
                let sent = sum(old.by_partition.values().map(|g| g.stats()));
                let mut retired = self
                    .retired
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *retired = add(*retired, sent);
                tracing::warn!(
                    from_epoch = old.layout.epoch,
                    from_partitions = old.layout.count,
                    epoch = layout.epoch,
                    partitions = layout.count,
                    "the partition layout changed; publishing to the new one"
                );
                metrics::gauge!("gateway_partitions").set(f64::from(layout.count));
                Refresh::Changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscribing for the new partition layout");
                Refresh::Same
            }
        }
    }

    /// Sends `records` (indexes into the request) by `routing`, filling `outcomes`.
    async fn send(
        routing: &Routing,
        records: Vec<(usize, Outbound)>,
        outcomes: &mut [Option<Result<super::Receipt, PublishError>>],
    ) {
        let mut groups: BTreeMap<Partition, Vec<(usize, Outbound)>> = BTreeMap::new();
        for (i, mut r) in records {
            match Lane::of_subject(&r.subject) {
                Some((lane, company)) => {
                    let p = routing.layout.partition_of(company);
                    r.subject = p.subject(lane, company);
                    groups.entry(p).or_default().push((i, r));
                }
                None => {
                    outcomes[i] = Some(Err(PublishError::Refused(format!(
                        "{:?} is not a record subject",
                        r.subject
                    ))));
                }
            }
        }
        let sends = groups.into_iter().map(|(p, group)| async move {
            let (slots, recs): (Vec<usize>, Vec<Outbound>) = group.into_iter().unzip();
            let got = match routing.by_partition.get(&p) {
                Some(gc) => gc.publish(recs).await,
                None => recs
                    .iter()
                    .map(|_| Err(PublishError::NoLeader(format!("no publisher for {p}"))))
                    .collect(),
            };
            (slots, got)
        });
        for (slots, got) in futures::future::join_all(sends).await {
            for (i, o) in slots.into_iter().zip(got) {
                outcomes[i] = Some(o);
            }
        }
    }
}

/// What a layout read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Routing by a new layout from now on.
    Changed,
    /// The layout is the one routed by (or could not be read).
    Same,
    /// A layout change is under way (old streams sealed, new ones not all there yet).
    Switching,
}

impl Partitioned {
    /// After a refused publish: whether the layout moved on from `sent_by`, waiting out
    /// a change under way (sealing to creating takes milliseconds) for up to 3 s.
    async fn follow(&self, sent_by: Layout) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let r = self.refresh().await;
            if r == Refresh::Changed || self.layout() != sent_by {
                return true;
            }
            if r != Refresh::Switching || tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn add(a: PublishStats, b: PublishStats) -> PublishStats {
    PublishStats {
        batches: a.batches + b.batches,
        records: a.records + b.records,
        fallbacks: a.fallbacks + b.fallbacks,
        retries: a.retries + b.retries,
    }
}

fn sum(stats: impl Iterator<Item = PublishStats>) -> PublishStats {
    stats.fold(PublishStats::default(), add)
}

impl Publisher for Partitioned {
    fn publish(&self, records: Vec<Outbound>) -> BoxFuture<'_, Outcomes> {
        Box::pin(async move {
            let n = records.len();
            let mut outcomes: Vec<Option<Result<super::Receipt, PublishError>>> = vec![None; n];
            let kept: Vec<(usize, Outbound)> = records.iter().cloned().enumerate().collect();
            let routing = self.current();
            Self::send(&routing, kept, &mut outcomes).await;
            // Refused by a partition that is no longer current (sealed by a layout change)
            // or by none: read the layout; if it changed, send those records again.
            let failed: Vec<usize> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| {
                    matches!(o, Some(Err(e)) if e.is_retryable() && !matches!(e, PublishError::Timeout(_)))
                })
                .map(|(i, _)| i)
                .collect();
            if !failed.is_empty() && self.follow(routing.layout).await {
                let again: Vec<(usize, Outbound)> =
                    failed.iter().map(|i| (*i, records[*i].clone())).collect();
                Self::send(&self.current(), again, &mut outcomes).await;
            }
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err(PublishError::Refused("not sent".into()))))
                .collect()
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), NotReady>> {
        Box::pin(async move {
            let routing = self.current();
            for gc in routing.by_partition.values() {
                gc.check_ready().await?;
            }
            Ok(())
        })
    }

    fn stats(&self) -> PublishStats {
        let retired = *self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        add(
            retired,
            sum(self.current().by_partition.values().map(|g| g.stats())),
        )
    }
}
