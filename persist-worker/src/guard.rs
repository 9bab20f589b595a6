//! The consumer guard: keeps the durable consumer the workers share the one this build
//! defines, and there.
//!
//! Whoever holds the worker's NATS identity can create the consumer (a fresh deployment
//! comes up in any start order) and so can also change it: a filter naming no company
//! made every later record silently unstored, with no dead letter and no log line. And a
//! deleted consumer left a running worker idle for good. So every CONSUMER_CHECK_SECS the
//! guard reads the consumer's configuration and position; a consumer that is missing or
//! differs from [`crate::consume::consumer_config`] in anything that governs delivery is
//! logged at ERROR with the differences, counted (`worker_consumer_repairs_total`), and
//! recreated from the last position seen while it was right: the records a wrong filter
//! skipped are delivered again (the upsert makes that harmless), none is lost. The
//! consume loop is told to reopen its pull. `/readyz` says `consumer: missing` or
//! `consumer: changed` from the moment it is seen until it is repaired. The same reading
//! feeds the backlog gauges KEDA scales on.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use callcap::shutdown::Shutdown;

use crate::health::{Condition, ConsumerHealth};

/// What differs between the consumer on the server and the one wanted, in what governs
/// which records are delivered and whether they are delivered at all. Two kinds of
/// setting: those no worker version changes (filter, push delivery, ack policy,
/// headers-only, rate and pull limits, inactivity deletion) must be as defined; the
/// tunables (`ACK_WAIT_SECS`, `MAX_DELIVER`) must lie within what the worker's own flags
/// allow, so that during a rolling change of them old and new workers do not take turns
/// recreating the consumer. Settings the server fills in itself, or that only say where a
/// new consumer starts, are not compared.
pub fn differences(current: &consumer::Config, wanted: &consumer::Config) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {$(
            if current.$field != wanted.$field {
                out.push(format!(
                    "{}: {:?} (wanted {:?})",
                    stringify!($field),
                    current.$field,
                    wanted.$field
                ));
            }
        )*};
    }
    compare!(
        durable_name,
        filter_subject,
        filter_subjects,
        ack_policy,
        headers_only,
        rate_limit,
        max_batch,
        max_bytes,
        max_expires,
        inactive_threshold,
        deliver_subject
    );
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&current.ack_wait) {
        out.push(format!("ack_wait: {:?} (1 s to 1 h)", current.ack_wait));
    }
    // A consumer that never gives up (the archiver's, -1) must stay so; the workers'
    // bounded redeliveries may be tuned within their flag's range.
    if wanted.max_deliver <= 0 {
        if current.max_deliver != wanted.max_deliver {
            out.push(format!(
                "max_deliver: {} (wanted {})",
                current.max_deliver, wanted.max_deliver
            ));
        }
    } else if !(4..=1000).contains(&current.max_deliver) {
        out.push(format!("max_deliver: {} (4 to 1,000)", current.max_deliver));
    }
    out
}

/// Reads the consumer, creating it when it is missing; returns it for the consume loop.
/// A consumer found with another definition is recreated from its own ack floor (before
/// this start nobody can say what a wrong one skipped: the error says how to replay).
///
/// # Errors
/// When the consumer can neither be read nor created.
pub async fn open(
    stream: &Stream,
    wanted: &pull::Config,
    health: &ConsumerHealth,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let want = consumer::IntoConsumerConfig::into_consumer_config(wanted.clone());
    let name = health.consumer();
    match stream.consumer_info(name).await {
        Ok(info) => {
            let diff = differences(&info.config, &want);
            if diff.is_empty() {
                health.set(Condition::Right);
            } else {
                tracing::error!(
                    consumer = name,
                    differences = %diff.join("; "),
                    ack_floor = info.ack_floor.stream_sequence,
                    "the durable consumer was changed before this worker started; recreating it \
                     from its ack floor (records a wrong filter skipped before now: \
                     `persist-worker replay --since <when it was changed>`)"
                );
                recreate(
                    stream,
                    wanted,
                    info.ack_floor.stream_sequence + 1,
                    health,
                    "changed",
                )
                .await?;
                health.repaired();
            }
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let consumer = stream.get_or_create_consumer(name, wanted.clone()).await?;
    health.set(Condition::Right);
    Ok(consumer)
}

/// Creates the consumer anew, delivering from `from`: for a component that knows better
/// than the consumer where to resume (the archiver: past what the archive holds), so
/// that what a previous run had in hand unacked comes again in order, not after the
/// ack wait behind newer messages.
///
/// # Errors
/// When the consumer cannot be created.
pub async fn open_fresh(
    stream: &Stream,
    wanted: &pull::Config,
    from: u64,
    health: &ConsumerHealth,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    if let Err(e) = stream.delete_consumer(health.consumer()).await {
        tracing::debug!(error = %e, "deleting the consumer before creating it anew");
    }
    let config = pull::Config {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: from.max(1),
        },
        ..wanted.clone()
    };
    let consumer = stream.create_consumer(config).await?;
    health.set(Condition::Right);
    Ok(consumer)
}

/// Checks the consumer every `every` until `shutdown`, repairing it as the module says.
pub async fn watch(
    stream: Stream,
    wanted: pull::Config,
    health: Arc<ConsumerHealth>,
    every: Duration,
    shutdown: Shutdown,
) {
    let want = consumer::IntoConsumerConfig::into_consumer_config(wanted.clone());
    // The next sequence to deliver were the consumer recreated now: one past the ack floor
    // last seen while it was right.
    let mut resume_from: Option<u64> = None;
    let name = health.consumer();
    let stream_label = health.partition().label();
    loop {
        match stream.consumer_info(name).await {
            Ok(info) => {
                health.set_backlog(info.num_pending, info.num_ack_pending as u64);
                if let Some(lane) = health.lane() {
                    let lane = lane.as_str();
                    metrics::gauge!("worker_consumer_pending", "lane" => lane, "stream" => stream_label.clone())
                        .set(info.num_pending as f64);
                    metrics::gauge!("worker_consumer_ack_pending", "lane" => lane, "stream" => stream_label.clone())
                        .set(info.num_ack_pending as f64);
                }
                let diff = differences(&info.config, &want);
                if diff.is_empty() {
                    health.set(Condition::Right);
                    resume_from = Some(info.ack_floor.stream_sequence + 1);
                } else {
                    health.set(Condition::Changed(diff.clone()));
                    let from = resume_from.unwrap_or(info.ack_floor.stream_sequence + 1);
                    tracing::error!(
                        consumer = name,
                        differences = %diff.join("; "),
                        resume_from = from,
                        "the durable consumer was changed; recreating it as defined from the last \
                         position seen while it was right"
                    );
                    repair(&stream, &wanted, from, &health, "changed").await;
                }
            }
            Err(e) if is_not_found(&e) => {
                health.set(Condition::Missing);
                let from = resume_from.unwrap_or(1);
                tracing::error!(
                    consumer = name,
                    resume_from = from,
                    "the durable consumer is gone; recreating it from the last position seen"
                );
                repair(&stream, &wanted, from, &health, "missing").await;
            }
            Err(e) => tracing::warn!(error = %e, "reading the durable consumer failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.triggered() => return,
        }
    }
}

async fn repair(
    stream: &Stream,
    wanted: &pull::Config,
    from: u64,
    health: &ConsumerHealth,
    reason: &'static str,
) {
    match recreate(stream, wanted, from, health, reason).await {
        Ok(()) => {
            health.set(Condition::Right);
            health.repaired();
        }
        // Another worker may have repaired it first; the next check sees.
        Err(e) => tracing::warn!(error = %e, "recreating the durable consumer failed; retrying"),
    }
}

/// Deletes the consumer (when there) and creates it as defined, delivering from `from`.
async fn recreate(
    stream: &Stream,
    wanted: &pull::Config,
    from: u64,
    health: &ConsumerHealth,
    reason: &'static str,
) -> Result<(), async_nats::Error> {
    let name = health.consumer();
    if let Err(e) = stream.delete_consumer(name).await {
        tracing::debug!(error = %e, "deleting the durable consumer before recreating it");
    }
    let config = pull::Config {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: from.max(1),
        },
        ..wanted.clone()
    };
    stream.create_consumer(config).await?;
    if let Some(lane) = health.lane() {
        metrics::counter!("worker_consumer_repairs_total", "lane" => lane.as_str(), "reason" => reason)
            .increment(1);
    }
    tracing::warn!(consumer = name, from, reason, "durable consumer recreated");
    Ok(())
}

/// Whether a consumer lookup failed because the consumer is not there (by the error's
/// kind, not its text).
pub fn is_not_found(e: &async_nats::jetstream::context::ConsumerInfoError) -> bool {
    matches!(
        e.kind(),
        async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunArgs;
    use callcap::partitions::Partition;
    use callcap::subjects::Lane;

    fn wanted() -> consumer::Config {
        consumer::IntoConsumerConfig::into_consumer_config(crate::consume::consumer_config(
            &RunArgs::default(),
            Lane::Main,
            Partition::LEGACY,
        ))
    }

    #[test]
    fn a_consumer_as_defined_has_no_differences_whatever_it_starts_from() {
        let mut on_server = wanted();
        on_server.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence: 42 };
        on_server.num_replicas = 3;
        assert!(differences(&on_server, &wanted()).is_empty());
        // Another worker's tunables, within its flags' ranges (a rolling change).
        on_server.ack_wait = Duration::from_secs(60);
        on_server.max_deliver = 5;
        on_server.max_ack_pending = 100;
        assert!(differences(&on_server, &wanted()).is_empty());
    }

    #[test]
    fn every_change_that_stops_or_slows_delivery_is_named() {
        type Change = fn(&mut consumer::Config);
        let changes: [(&str, Change); 8] = [
            ("filter_subject", |c| {
                c.filter_subject = "calls.ingest.nobody".into()
            }),
            ("filter_subjects", |c| {
                c.filter_subjects = vec!["calls.ingest.x".into()]
            }),
            ("max_deliver", |c| c.max_deliver = 1),
            ("ack_wait", |c| c.ack_wait = Duration::from_millis(1)),
            ("headers_only", |c| c.headers_only = true),
            ("rate_limit", |c| c.rate_limit = 8),
            ("max_expires", |c| c.max_expires = Duration::from_millis(1)),
            ("inactive_threshold", |c| {
                c.inactive_threshold = Duration::from_secs(1)
            }),
        ];
        for (field, change) in changes {
            let mut on_server = wanted();
            change(&mut on_server);
            let diff = differences(&on_server, &wanted());
            assert_eq!(diff.len(), 1, "{field}: {diff:?}");
            assert!(diff[0].starts_with(field), "{field}: {diff:?}");
        }
    }
}
