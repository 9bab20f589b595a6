//! Publishing across the partitions of the current layout (`callcap::partitions`): one
//! [`Publisher`] per partition stream (an atomic batch is one stream's; the real one is a
//! [`GroupCommit`]), each record sent to its company's partition.
//!
//! A record is addressed by its company and lane ([`Outbound`]); its partition is
//! computed from its company by the layout routed by, never parsed from a subject. The
//! layout is read at start and every [`REFRESH`]; when a publish fails, it is read again
//! at once, and when it has changed (the old layout's streams are sealed by
//! `ingest-gateway partitions set`, so they refuse) the failed records are sent again to
//! their partition in the new layout, within the same request. A record is only ever
//! answered 201 for a JetStream ack.
//!
//! How a partition's publisher is made and how the layout is read are given as functions
//! ([`Partitioned::new`]), so the routing is tested over scripted publishers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use callcap::partitions::{self, Layout, Partition};
use futures::future::BoxFuture;

use super::{
    GroupCommit, GroupCommitConfig, NotReady, Outbound, Outcomes, PublishError, PublishStats,
    Publisher, Receipt,
};

/// How often the layout is read again without a failure to prompt it.
pub const REFRESH: Duration = Duration::from_secs(2);

/// What a reading of the layout found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutRead {
    /// The current layout.
    Current(Layout),
    /// A layout change is under way (old streams sealed, new ones not all there yet).
    Switching,
    /// Nothing to go by (no stream yet, or the server did not answer).
    Unknown,
}

/// Makes the publisher of one partition stream.
pub type OpenPartition =
    Box<dyn Fn(Partition) -> BoxFuture<'static, Result<Arc<dyn Publisher>, String>> + Send + Sync>;
/// Reads the current layout.
pub type ReadLayout = Box<dyn Fn() -> BoxFuture<'static, LayoutRead> + Send + Sync>;

struct Routing {
    layout: Layout,
    by_partition: HashMap<Partition, Arc<dyn Publisher>>,
}

/// The gateway's publisher: a publisher per partition of the current layout.
pub struct Partitioned {
    open: OpenPartition,
    read: ReadLayout,
    routing: RwLock<Arc<Routing>>,
    /// One layout read at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// What retired routings had sent (their counters leave with them).
    retired: std::sync::Mutex<PublishStats>,
}

impl Partitioned {
    /// Routes by `layout` with a group commit per partition stream on `client`, reading
    /// the layout from `js` every [`REFRESH`].
    ///
    /// # Errors
    /// When a partition's publisher cannot be made.
    pub async fn start(
        client: async_nats::Client,
        js: jetstream::Context,
        config: GroupCommitConfig,
        layout: Layout,
    ) -> Result<Arc<Self>, String> {
        let open: OpenPartition = Box::new(move |p| {
            let (client, config) = (client.clone(), config.clone());
            Box::pin(async move {
                GroupCommit::start_for(client, config, p)
                    .await
                    .map(|gc| Arc::new(gc) as Arc<dyn Publisher>)
                    .map_err(|e| format!("subscribing for {}: {e}", p.stream_name()))
            })
        });
        let read: ReadLayout = Box::new(move || {
            let js = js.clone();
            Box::pin(async move { read_layout(&js).await })
        });
        let me = Arc::new(Self::new(layout, open, read).await?);
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

    /// Routes by `layout`, making each partition's publisher with `open` and reading the
    /// layout with `read` when a publish fails (and when [`Partitioned::refresh`] is
    /// called).
    ///
    /// # Errors
    /// When a partition's publisher cannot be made.
    pub async fn new(
        layout: Layout,
        open: OpenPartition,
        read: ReadLayout,
    ) -> Result<Self, String> {
        let routing = Self::routing(&open, layout).await?;
        Ok(Partitioned {
            open,
            read,
            routing: RwLock::new(Arc::new(routing)),
            refreshing: tokio::sync::Mutex::new(()),
            retired: std::sync::Mutex::new(PublishStats::default()),
        })
    }

    async fn routing(open: &OpenPartition, layout: Layout) -> Result<Routing, String> {
        let mut by_partition = HashMap::new();
        for p in layout.partitions() {
            by_partition.insert(p, open(p).await?);
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

    /// Reads the layout and, when it changed, routes by the new one.
    pub async fn refresh(&self) -> Refresh {
        let _one = self.refreshing.lock().await;
        let layout = match (self.read)().await {
            LayoutRead::Current(l) => l,
            LayoutRead::Unknown => return Refresh::Same,
            LayoutRead::Switching => return Refresh::Switching,
        };
        if layout == self.layout() {
            return Refresh::Same;
        }
        match Self::routing(&self.open, layout).await {
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
                tracing::warn!(error = %e, "opening the new partition layout's publishers");
                Refresh::Same
            }
        }
    }

    /// Sends `records` (indexes into the request) by `routing`, filling `outcomes`.
    async fn send(
        routing: &Routing,
        records: Vec<(usize, Outbound)>,
        outcomes: &mut [Option<Result<Receipt, PublishError>>],
    ) {
        let mut groups: BTreeMap<Partition, Vec<(usize, Outbound)>> = BTreeMap::new();
        for (i, r) in records {
            let p = routing.layout.partition_of(r.company);
            groups.entry(p).or_default().push((i, r));
        }
        let sends = groups.into_iter().map(|(p, group)| async move {
            let (slots, recs): (Vec<usize>, Vec<Outbound>) = group.into_iter().unzip();
            let got = match routing.by_partition.get(&p) {
                Some(publisher) => publisher.publish(recs).await,
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

/// Reads the current layout from the server.
async fn read_layout(js: &jetstream::Context) -> LayoutRead {
    let found = match partitions::list(js).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "reading the partition layout");
            return LayoutRead::Unknown;
        }
    };
    match partitions::current_of(&found) {
        Ok(Some(l)) => LayoutRead::Current(l),
        Ok(None) => LayoutRead::Unknown,
        // `partitions set` between sealing and creating.
        Err(_) => LayoutRead::Switching,
    }
}

/// What a layout read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Routing by a new layout from now on.
    Changed,
    /// The layout is the one routed by (or could not be read).
    Same,
    /// A layout change is under way (old streams sealed, new ones not all there yet).
    Switching,
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
            let mut outcomes: Vec<Option<Result<Receipt, PublishError>>> = vec![None; n];
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
            for publisher in routing.by_partition.values() {
                publisher.check_ready().await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::scripted::ScriptedPublisher;
    use callcap::subjects::Lane;
    use std::sync::Mutex;
    use uuid::Uuid;

    /// Scripted publishers by partition, made on demand; those of `refusing` layouts'
    /// epochs refuse as a sealed stream does.
    #[derive(Clone, Default)]
    struct Scripted {
        made: Arc<Mutex<HashMap<Partition, Arc<ScriptedPublisher>>>>,
        refusing: Arc<Mutex<Vec<u32>>>,
    }

    impl Scripted {
        fn open(&self) -> OpenPartition {
            let me = self.clone();
            Box::new(move |p| {
                let me = me.clone();
                Box::pin(async move {
                    let refusing = me.refusing.clone();
                    let publisher = Arc::new(ScriptedPublisher::answering(move |_| {
                        if refusing.lock().unwrap().contains(&p.epoch) {
                            Err(PublishError::Refused("stream is sealed".into()))
                        } else {
                            Ok(Receipt {
                                seq: 1,
                                duplicate: false,
                            })
                        }
                    }));
                    me.made.lock().unwrap().insert(p, publisher.clone());
                    Ok(publisher as Arc<dyn Publisher>)
                })
            })
        }

        fn got(&self, p: Partition) -> Vec<Outbound> {
            self.made
                .lock()
                .unwrap()
                .get(&p)
                .map(|s| s.records())
                .unwrap_or_default()
        }
    }

    fn record(company: Uuid, n: usize) -> Outbound {
        Outbound {
            company,
            lane: if n % 2 == 0 {
                Lane::Main
            } else {
                Lane::Overflow
            },
            msg_id: format!("m{n}"),
            payload: bytes::Bytes::from(format!("{n}")),
            trace: None,
        }
    }

    fn reading(current: Arc<Mutex<LayoutRead>>) -> ReadLayout {
        Box::new(move || {
            let now = *current.lock().unwrap();
            Box::pin(async move { now })
        })
    }

    #[tokio::test]
    async fn a_companys_records_always_go_to_its_partition() {
        let layout = Layout { epoch: 2, count: 3 };
        let scripted = Scripted::default();
        let read = reading(Arc::new(Mutex::new(LayoutRead::Current(layout))));
        let p = Partitioned::new(layout, scripted.open(), read)
            .await
            .unwrap();
        let companies: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
        let records: Vec<Outbound> = companies
            .iter()
            .enumerate()
            .map(|(i, c)| record(*c, i))
            .collect();
        let outcomes = p.publish(records).await;
        assert!(outcomes.iter().all(Result::is_ok));
        let mut seen = 0;
        for part in layout.partitions() {
            for r in scripted.got(part) {
                assert_eq!(layout.partition_of(r.company), part);
                assert_eq!(
                    part,
                    partitions::Layout { epoch: 2, count: 3 }.partition_of(r.company)
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 30);
        // The partition is the company's, whatever the lane.
        let c = companies[0];
        p.publish(vec![record(c, 100), record(c, 101)]).await;
        let part = layout.partition_of(c);
        let lanes: Vec<Lane> = scripted
            .got(part)
            .iter()
            .filter(|r| r.company == c)
            .map(|r| r.lane)
            .collect();
        assert!(lanes.contains(&Lane::Main) && lanes.contains(&Lane::Overflow));
    }

    #[tokio::test]
    async fn a_sealed_layouts_refusal_is_sent_again_to_the_new_one() {
        let old = Layout { epoch: 0, count: 1 };
        let new = Layout { epoch: 1, count: 2 };
        let scripted = Scripted::default();
        let current = Arc::new(Mutex::new(LayoutRead::Current(old)));
        let p = Partitioned::new(old, scripted.open(), reading(current.clone()))
            .await
            .unwrap();
        // `partitions set 2`: the old stream is sealed (refuses), the new layout is read.
        scripted.refusing.lock().unwrap().push(0);
        *current.lock().unwrap() = LayoutRead::Current(new);
        let companies: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
        let records: Vec<Outbound> = companies
            .iter()
            .enumerate()
            .map(|(i, c)| record(*c, i))
            .collect();
        let outcomes = p.publish(records).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(p.layout(), new);
        // Tried on the old stream first, then each on its partition of the new layout.
        assert_eq!(scripted.got(Partition::LEGACY).len(), 10);
        let again: usize = new
            .partitions()
            .iter()
            .map(|q| scripted.got(*q).len())
            .sum();
        assert_eq!(again, 10);
        for q in new.partitions() {
            for r in scripted.got(q) {
                assert_eq!(new.partition_of(r.company), q);
            }
        }
        // A refusal with no new layout to go to is answered as it was.
        scripted.refusing.lock().unwrap().push(1);
        let outcomes = p.publish(vec![record(companies[0], 0)]).await;
        assert!(matches!(outcomes[0], Err(PublishError::Refused(_))));
    }
}
