//! Call Capture persist worker.
//!
//! Consumes the `CALLS` stream's lanes (main and overflow, each through its own shared
//! durable consumer) and writes every record to Postgres exactly once. Any number of
//! workers may run side by side, serving both lanes or one (`LANES`).
//!
//! - [`config`]: command line and environment;
//! - [`consume`]: the pull/write/ack loop; [`write`]: decode and write until stored (the
//!   policy consume and replay share); [`store`]: every SQL statement and migrations;
//! - [`guard`]: keeps the durable consumer as defined (recreated when deleted or changed);
//! - [`replay`]: re-applying a window of the stream; [`dlq`]: dead letters;
//! - [`privacy`] and [`erase`]: erasure (keyed hashes, `persist-worker erase`) and
//!   retention (`RETENTION_DAYS`), applied by every write;
//! - [`archive`]: the long-term tier in S3-compatible storage (`persist-worker archive`,
//!   `replay --from-archive`);
//! - [`ops`]: `/metrics`, `/readyz`, `/healthz` and the status page, reading what the
//!   stages expose.

pub mod archive;
pub mod config;
pub mod consume;
pub mod dlq;
pub mod erase;
pub mod guard;
pub mod ops;
pub mod privacy;
pub mod replay;
pub mod retention;
pub mod store;
pub mod write;

use callcap::config::Role;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::migrate::MigrateDatabase;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Cli, Command, DlqCommand};

/// Runs what the command line asks: consume (with the Prometheus recorder installed),
/// `migrate`, `replay` or a `dlq` command. SIGTERM/SIGINT stop any of them cleanly.
///
/// # Errors
/// Whatever stopped the command, for `main` to report.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let cancel = shutdown_token();
    let pool = || {
        store::pool(&cli.db.database_url, cli.db.db_max_connections).context("parsing DATABASE_URL")
    };
    match &cli.command {
        None | Some(Command::Run) => {
            let metrics = install_recorder()?;
            describe_metrics();
            run(&cli, Some(metrics), cancel).await
        }
        Some(Command::Archive(args)) => {
            let archive = archive::Archive::from_args(&cli.archive)?.context(
                "archive needs ARCHIVE_URL (s3://bucket[/prefix]) and the AWS_* variables",
            )?;
            let metrics = install_recorder()?;
            archive::run::describe_metrics();
            archive::run::run(&cli, archive, args, Some(metrics), cancel).await
        }
        Some(Command::Migrate) => {
            migrate(&cli.db.database_url, &pool()?, Duration::from_secs(30)).await?;
            println!("migrations applied");
            Ok(())
        }
        Some(Command::Replay(args)) => {
            let client = cli
                .nats
                .connect_once("persist-worker replay", Role::Admin)
                .await
                .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
            let js = jetstream::new(client);
            let policy = privacy::Policy::from_args(&cli.privacy)?;
            let archive = if args.from_archive {
                Some(archive::Archive::from_args(&cli.archive)?.context(
                    "--from-archive needs ARCHIVE_URL (s3://bucket[/prefix]) and the AWS_* variables",
                )?)
            } else {
                None
            };
            refuse_uncheckable(&pool()?, &policy, "replay").await?;
            let summary = replay::run(
                &js,
                archive.as_ref(),
                &pool()?,
                &policy,
                args,
                cli.run.retry_max(),
                &cancel,
            )
            .await
            .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
            println!("{summary}");
            // Fail loudly: a script must not take a replay that skipped records for whole.
            anyhow::ensure!(
                summary.is_whole(),
                "the replay did not apply everything it was asked to (see the lines above)"
            );
            Ok(())
        }
        Some(Command::Erase(args)) => {
            let policy = privacy::Policy::from_args(&cli.privacy)?;
            let client = cli
                .nats
                .connect_once("persist-worker erase", Role::Admin)
                .await
                .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
            let js = jetstream::new(client);
            let pool = pool()?;
            migrate(&cli.db.database_url, &pool, Duration::from_secs(30)).await?;
            let mut out = std::io::stdout().lock();
            let archive = archive::Archive::from_args(&cli.archive)?;
            erase::run(&js, archive.as_ref(), &pool, &policy, args, &mut out)
                .await
                .map(|_| ())
        }
        Some(Command::Dlq(cmd)) => {
            let mut out = std::io::stdout().lock();
            match cmd {
                DlqCommand::List { all, limit } => {
                    dlq::list(&pool()?, *all, *limit, &mut out).await
                }
                DlqCommand::Redrive { ids, all } => {
                    let ids = (!*all).then_some(ids.as_slice());
                    let policy = privacy::Policy::from_args(&cli.privacy)?;
                    refuse_uncheckable(&pool()?, &policy, "dlq redrive").await?;
                    dlq::redrive(&pool()?, &policy, ids, &mut out)
                        .await
                        .map(|_| ())
                }
            }
        }
    }
}

/// Refuses to run `what` (a command that writes records) when it could not check them
/// against every erasure: it would have to hold records it has no place to hold.
///
/// # Errors
/// The reason, or Postgres unavailable.
async fn refuse_uncheckable(
    pool: &PgPool,
    policy: &privacy::Policy,
    what: &str,
) -> anyhow::Result<()> {
    if let Some(why) = store::privacy::key_state(pool, policy.key.as_deref())
        .await
        .context("reading the erasures")?
    {
        anyhow::bail!(
            "{what} cannot check records against every erasure ({why}): it would store erased data. \
             Give it the workers' ERASURE_KEY_FILE"
        );
    }
    Ok(())
}

/// Installs the Prometheus recorder with the worker's histogram buckets.
fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    callcap::telemetry::install_metrics(
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .context("configuring histogram buckets")?
            // A count, not a duration: messages per batch.
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("worker_batch_size".into()),
                &[
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                ],
            )
            .context("configuring batch-size buckets")?,
    )
    .context("installing the Prometheus recorder")
}

/// Creates the database when missing and applies pending migrations, retrying while
/// Postgres is unreachable (up to `patience`) so start order does not matter.
///
/// # Errors
/// When Postgres stays unreachable past `patience`, or a migration fails.
pub async fn migrate(database_url: &str, pool: &PgPool, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let attempt = async {
            if !sqlx::Postgres::database_exists(database_url).await? {
                sqlx::Postgres::create_database(database_url).await?;
            }
            store::MIGRATOR.run(pool).await.map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => inner,
                other => sqlx::Error::from(other),
            })
        };
        let err = match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // Only "cannot reach Postgres" is worth waiting out; a failing migration is not.
        if !store::is_connection_error(&err) || tokio::time::Instant::now() >= deadline {
            return Err(anyhow::Error::new(err).context("applying migrations"));
        }
        tracing::warn!(error = %err, "Postgres not reachable yet for migrations; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the worker until `cancel` fires: migrations (unless disabled), the ops endpoints,
/// the pending-count gauge and the consumer loop.
///
/// # Errors
/// When the ops address cannot be bound, migrations fail, or the consumer cannot be set up.
pub async fn run(
    cli: &Cli,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let policy = privacy::Policy::from_args(&cli.privacy)?;
    let mut lanes = cli.run.lanes.clone();
    lanes.sort_unstable();
    lanes.dedup();
    anyhow::ensure!(
        !lanes.is_empty(),
        "LANES names no lane: main, overflow or both"
    );
    // Each lane writes on its own connections: a backlog in one never waits for the
    // other's pool.
    let pools = lanes
        .iter()
        .map(|_| store::pool(&cli.db.database_url, cli.db.db_max_connections))
        .collect::<Result<Vec<_>, _>>()
        .context("parsing DATABASE_URL")?;
    let pool = pools[0].clone();
    let client = cli
        .nats
        .connect("persist-worker", Role::Worker)
        .await
        .context("connecting to NATS")?;
    let listener = tokio::net::TcpListener::bind(cli.run.metrics_addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {}", cli.run.metrics_addr))?;
    let served: ops::Served = Default::default();
    let ops = ops::router(ops::OpsState {
        pool: pool.clone(),
        nats: client.clone(),
        metrics,
        consumers: served.clone(),
        erasure_key: policy.key.clone(),
    });
    let ops_cancel = cancel.clone();
    tokio::spawn(async move {
        let served =
            axum::serve(listener, ops).with_graceful_shutdown(ops_cancel.cancelled_owned());
        if let Err(e) = served.await {
            tracing::error!(error = %e, "ops endpoint failed");
        }
    });
    if !cli.run.no_migrate {
        migrate(&cli.db.database_url, &pool, Duration::from_secs(3600)).await?;
    }
    if let Ok(Some(why)) = store::privacy::key_state(&pool, policy.key.as_deref()).await {
        tracing::error!(
            cause = %why,
            "this worker cannot check records against every erasure: the records of companies with \
             erasures will be held, not stored, until a worker with the erasures' ERASURE_KEY_FILE takes them"
        );
    }
    if let Some(days) = policy.retention_days {
        tokio::spawn(retention::run(pool.clone(), days, cancel.clone()));
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cli.nats.nats_request_timeout_ms))
        .build(client);
    // A fresh deployment may start its workers before any gateway: the CALLS stream is
    // created then (a partitioned layout is only ever made by `ingest-gateway partitions`).
    loop {
        let found: Result<(), callcap::subjects::SetupError> = async {
            let found = callcap::partitions::list(&js)
                .await
                .map_err(callcap::subjects::SetupError::Nats)?;
            if found.is_empty() {
                callcap::subjects::open_stream(&js, &cli.stream).await?;
            }
            Ok(())
        }
        .await;
        match found {
            Ok(()) => break,
            Err(callcap::subjects::SetupError::Refused(why)) => {
                anyhow::bail!("setting up the CALLS stream: {why}")
            }
            Err(e) => {
                tracing::warn!(error = %e, "streams not reachable yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = cancel.cancelled() => return Ok(()),
                }
            }
        }
    }
    // Every partition stream (sealed ones too, until they are drained: a layout change
    // leaves them to the workers), each lane on its own consumer. New streams are found at
    // each consumer check.
    let mut loops = tokio::task::JoinSet::new();
    let mut serving = std::collections::HashSet::new();
    let lane_pools: std::collections::HashMap<_, _> =
        lanes.iter().copied().zip(pools.iter().cloned()).collect();
    loop {
        match callcap::partitions::list(&js).await {
            Ok(found) => {
                for f in found {
                    for lane in &lanes {
                        if serving.contains(&(f.partition, *lane)) {
                            continue;
                        }
                        let health =
                            std::sync::Arc::new(guard::ConsumerHealth::new(*lane, f.partition));
                        if !f.subjects.contains(&f.partition.filter(*lane)) {
                            // A stream from before lanes: nothing can arrive in this lane
                            // until `setup` adds its subjects (the gateways route
                            // everything to the main lane meanwhile).
                            tracing::warn!(
                                %lane,
                                stream = %f.partition.stream_name(),
                                "the stream has no subjects for this lane yet; not serving it. Run \
                                 `ingest-gateway setup` with the admin NATS identity, then restart the workers"
                            );
                            health.set_absent();
                            served.add(health);
                            serving.insert((f.partition, *lane));
                            continue;
                        }
                        let stream = match js.get_stream(f.partition.stream_name()).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(error = %e, stream = %f.partition.stream_name(), "opening a partition stream; retrying");
                                continue;
                            }
                        };
                        let wanted = consume::consumer_config(&cli.run, *lane, f.partition);
                        let consumer = match guard::open(&stream, &wanted, &health).await {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(error = %e, %lane, stream = %f.partition.stream_name(), "opening the durable consumer; retrying");
                                continue;
                            }
                        };
                        tracing::info!(%lane, partition = %f.partition, "serving");
                        serving.insert((f.partition, *lane));
                        served.add(health.clone());
                        tokio::spawn(guard::watch(
                            stream,
                            wanted,
                            health.clone(),
                            cli.run.consumer_check(),
                            cancel.clone(),
                        ));
                        let (lane_pool, policy, args, cancel, lane) = (
                            lane_pools[lane].clone(),
                            policy.clone(),
                            cli.run.clone(),
                            cancel.clone(),
                            *lane,
                        );
                        loops.spawn(async move {
                            consume::run(consumer, &health, lane_pool, policy, args, cancel)
                                .await
                                .map_err(|e| {
                                    anyhow::anyhow!("the {lane} lane's consumer failed: {e}")
                                })
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the partition streams; retrying"),
        }
        // A lane's loop that fails stops the worker (the orchestrator restarts it), so
        // nothing is served partly without anyone noticing.
        if supervise(
            &mut loops,
            cli.run.consumer_check(),
            &cancel,
            "a lane's consumer",
        )
        .await?
        .is_break()
        {
            break;
        }
    }
    while let Some(done) = loops.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "a lane's consumer stopped with an error");
        }
    }
    for p in &pools {
        p.close().await;
    }
    tracing::info!("persist-worker stopped");
    Ok(())
}

/// Waits `pause`, until `cancel` fires (`Break`), or until one of `tasks` ends: one that
/// failed or panicked cancels and waits for the others, and is returned as the error.
///
/// # Errors
/// The failed task's error.
pub(crate) async fn supervise(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    pause: Duration,
    cancel: &CancellationToken,
    what: &str,
) -> anyhow::Result<std::ops::ControlFlow<()>> {
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        () = cancel.cancelled() => return Ok(std::ops::ControlFlow::Break(())),
        Some(done) = tasks.join_next() => {
            let outcome = done.map_err(|e| anyhow::anyhow!("{what} panicked: {e}"));
            if let Err(e) = outcome.and_then(|r| r) {
                cancel.cancel();
                while tasks.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    Ok(std::ops::ControlFlow::Continue(()))
}

/// Registers the `# HELP` text of the worker's metrics and starts its counters at 0 (a
/// series that first appears at 1 shows no increase to Prometheus: the first dead letter
/// or database error would not fire its alert).
fn describe_metrics() {
    let counters = [
        (
            "worker_messages_total",
            "Stream messages handled (stored, merged or dead-lettered) and acked",
        ),
        (
            "worker_rows_written_total",
            "Rows inserted or changed in Postgres",
        ),
        (
            "worker_dead_letters_total",
            "Messages moved to the dead-letter table instead of stored",
        ),
        (
            "worker_redeliveries_total",
            "Messages delivered more than once (a worker died or was slow before its ack)",
        ),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
        for lane in callcap::subjects::Lane::ALL {
            metrics::counter!(name, "lane" => lane.as_str()).absolute(0);
        }
    }
    metrics::describe_counter!(
        "worker_records_dropped_total",
        "Records not stored by reason: erased (a matching erasure; deleted from the stream) or expired (older than RETENTION_DAYS)"
    );
    for lane in callcap::subjects::Lane::ALL {
        for reason in ["erased", "expired"] {
            metrics::counter!("worker_records_dropped_total", "lane" => lane.as_str(), "reason" => reason)
                .absolute(0);
        }
    }
    metrics::describe_counter!(
        "worker_messages_erased_total",
        "Stream messages deleted (payload overwritten) because they held erased data"
    );
    metrics::counter!("worker_messages_erased_total").absolute(0);
    metrics::describe_counter!(
        "worker_rows_expired_total",
        "Stored calls deleted by RETENTION_DAYS"
    );
    metrics::counter!("worker_rows_expired_total").absolute(0);
    // Not a lane's: the database is shared.
    metrics::describe_counter!(
        "worker_db_errors_total",
        "Failed database transactions (retried with backoff; nothing is acked)"
    );
    metrics::counter!("worker_db_errors_total").absolute(0);
    metrics::describe_counter!(
        "worker_consumer_repairs_total",
        "Times the durable consumer was found missing or changed and recreated as defined, by reason"
    );
    for reason in ["missing", "changed"] {
        for lane in callcap::subjects::Lane::ALL {
            metrics::counter!("worker_consumer_repairs_total", "lane" => lane.as_str(), "reason" => reason)
                .absolute(0);
        }
    }
    metrics::describe_gauge!(
        "worker_consumer_pending",
        "Records of a lane not yet delivered to any worker (the backlog KEDA scales on), by lane"
    );
    metrics::describe_gauge!(
        "worker_consumer_ack_pending",
        "Records delivered to a worker and not yet acked (being stored)"
    );
    metrics::describe_histogram!(
        "worker_batch_size",
        "Messages per batch written in one transaction"
    );
    metrics::describe_histogram!(
        "worker_batch_duration_seconds",
        metrics::Unit::Seconds,
        "Time to write a batch: transaction and acks"
    );
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler only fails outside a Tokio runtime");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received: finishing the batch in hand");
        t.cancel();
    });
    token
}
