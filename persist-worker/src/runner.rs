//! The stream runner: what a component serves on every partition stream (each lane for
//! the records, the whole stream for the archive), its durable consumer opened and kept
//! as defined ([`crate::guard`]), each served by its own task, all supervised; streams
//! that appear later (a layout change) are picked up at the next check. Every consumer's
//! health goes into one [`Registry`], which the ops endpoints serve.
//!
//! A [`Component`] says what it serves and how (Vector's components, small): the
//! consumers it wants on a stream ([`Component::lanes`], [`Component::spec`]) and the task
//! serving one ([`Component::serve`]). A task that fails stops the process (the
//! orchestrator restarts it): nothing is served partly without anyone noticing.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer};
use callcap::partitions::{Found, Partition};
use callcap::shutdown::Shutdown;
use callcap::subjects::Lane;
use futures::future::BoxFuture;
use tokio::task::JoinSet;

use crate::guard;
use crate::health::{ConsumerHealth, Registry};

/// One consumer a component wants on a stream.
pub struct Spec {
    /// The durable consumer's name.
    pub consumer: &'static str,
    /// Its definition; `None` when the stream cannot carry it (a lane it has no subjects
    /// for, from before lanes): then it is shown as absent and not served.
    pub wanted: Option<pull::Config>,
    /// Create the consumer anew, delivering from this sequence, instead of opening it as
    /// defined (a component that knows better where to resume).
    pub fresh_from: Option<u64>,
}

/// Something served on every partition stream through durable consumers.
pub trait Component: Send + Sync + 'static {
    /// What one of its tasks is, for logs ("a lane's consumer").
    fn what(&self) -> &'static str;

    /// The consumers it serves on `found`, by lane (`None`: one for the whole stream).
    fn lanes(&self, found: &Found) -> Vec<Option<Lane>>;

    /// The consumer of `lane` on `found`; an error is retried at the next check.
    fn spec<'a>(
        &'a self,
        found: &'a Found,
        lane: Option<Lane>,
    ) -> BoxFuture<'a, anyhow::Result<Spec>>;

    /// Serves one consumer until `shutdown`. An error stops the process.
    fn serve(
        &self,
        consumer: PullConsumer,
        health: Arc<ConsumerHealth>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, anyhow::Result<()>>;
}

/// Runs `component` on every partition stream until `shutdown`, checking for new
/// streams (and each consumer's definition) every `check`.
///
/// # Errors
/// The first task that failed (the others are stopped first).
pub async fn run(
    js: &jetstream::Context,
    component: Arc<dyn Component>,
    registry: &Registry,
    check: Duration,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let mut serving: HashSet<(Partition, Option<Lane>)> = HashSet::new();
    // The tasks stop with `shutdown`, or alone when one of them fails.
    let stopping = shutdown.child();
    loop {
        match callcap::partitions::list(js).await {
            Ok(found) => {
                for f in &found {
                    for lane in component.lanes(f) {
                        if serving.contains(&(f.partition, lane)) {
                            continue;
                        }
                        let opened = open(js, &*component, f, lane, registry, check, &stopping);
                        match opened.await {
                            Opened::Serving(consumer, health) => {
                                serving.insert((f.partition, lane));
                                tasks.spawn(component.serve(*consumer, health, stopping.clone()));
                            }
                            // Nothing can arrive there: shown, not retried.
                            Opened::Absent => {
                                serving.insert((f.partition, lane));
                            }
                            Opened::Later => {}
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the partition streams; retrying"),
        }
        if supervise(&mut tasks, check, &stopping, component.what())
            .await?
            .is_break()
        {
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What opening one consumer came to.
enum Opened {
    /// Open and guarded: serve it.
    Serving(Box<PullConsumer>, Arc<ConsumerHealth>),
    /// The stream cannot carry it (registered as absent).
    Absent,
    /// Not now: retried at the next check.
    Later,
}

/// Opens the consumer of `lane` on `found`, guarding it from then on.
async fn open(
    js: &jetstream::Context,
    component: &dyn Component,
    found: &Found,
    lane: Option<Lane>,
    registry: &Registry,
    check: Duration,
    shutdown: &Shutdown,
) -> Opened {
    let name = found.partition.stream_name();
    let spec = match component.spec(found, lane).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), stream = %name, "preparing {}; retrying", component.what());
            return Opened::Later;
        }
    };
    let health = Arc::new(ConsumerHealth::new(spec.consumer, lane, found.partition));
    let Some(wanted) = spec.wanted else {
        tracing::warn!(
            lane = lane.map_or("-", Lane::as_str),
            stream = %name,
            "the stream has no subjects for this lane yet; not serving it. Run \
             `ingest-gateway setup` with the admin NATS identity, then restart the workers"
        );
        health.set_absent();
        registry.add(health);
        return Opened::Absent;
    };
    let stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, stream = %name, "opening a partition stream; retrying");
            return Opened::Later;
        }
    };
    let opened = match spec.fresh_from {
        Some(from) => guard::open_fresh(&stream, &wanted, from, &health).await,
        None => guard::open(&stream, &wanted, &health).await,
    };
    let consumer = match opened {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, consumer = spec.consumer, stream = %name, "opening the durable consumer; retrying");
            return Opened::Later;
        }
    };
    tracing::info!(consumer = spec.consumer, stream = %name, "serving");
    registry.add(health.clone());
    tokio::spawn(guard::watch(
        stream,
        wanted,
        health.clone(),
        check,
        shutdown.clone(),
    ));
    Opened::Serving(Box::new(consumer), health)
}

/// Waits `pause`, until `shutdown` (`Break`), or until one of `tasks` ends: one that
/// failed or panicked stops the others (through `shutdown`, which must be theirs), waits
/// for them, and is returned as the error.
///
/// # Errors
/// The failed task's error.
pub async fn supervise(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    pause: Duration,
    shutdown: &Shutdown,
    what: &str,
) -> anyhow::Result<ControlFlow<()>> {
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        () = shutdown.triggered() => return Ok(ControlFlow::Break(())),
        Some(done) = tasks.join_next() => {
            let outcome = done.map_err(|e| anyhow::anyhow!("{what} panicked: {e}"));
            if let Err(e) = outcome.and_then(|r| r) {
                shutdown.trigger();
                while tasks.join_next().await.is_some() {}
                return Err(e.context(format!("{what} failed")));
            }
        }
    }
    Ok(ControlFlow::Continue(()))
}
