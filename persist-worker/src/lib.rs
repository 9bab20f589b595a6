//! Call Capture persist worker: boot. Connects, migrates, serves the ops endpoints and
//! runs a component on every partition stream until shutdown — the records (consume) or,
//! with `persist-worker archive`, the archive; the other commands are [`cli`]'s.
//!
//! - [`config`]: command line and environment;
//! - [`runner`]: what a component serves on every partition stream, opened, guarded
//!   ([`guard`]) and supervised, each consumer's [`health`] in one registry that [`ops`]
//!   serves (`/metrics`, `/readyz`, `/healthz`, the status page);
//! - components: [`consume`] (the records: pull, write, ack) and [`archive`] (the
//!   long-term tier in S3-compatible storage);
//! - [`mod@write`]: decode and write until stored (what consume, replay and redrive share),
//!   and the deletion of erased messages; [`store`]: every SQL statement and migrations;
//! - [`privacy`]: erasure (keyed hashes, one matching rule) and retention, applied by
//!   every write; [`retention`]: the background deletes of `RETENTION_DAYS`;
//! - [`cli`]: `migrate`, `replay`, `erase`, `dlq`.

pub mod archive;
pub mod cli;
pub mod config;
pub mod consume;
pub mod guard;
pub mod health;
pub mod ops;
pub mod privacy;
pub mod retention;
pub mod runner;
pub mod store;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use callcap::config::Role;
use callcap::shutdown::Shutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::migrate::MigrateDatabase;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::{ArchiveRunArgs, Cli, Command};
use crate::health::Registry;

/// Runs what the command line asks: consume or archive (with the Prometheus recorder
/// installed and the ops endpoints on METRICS_ADDR), or one of [`cli`]'s commands.
/// SIGTERM/SIGINT stop any of them cleanly.
///
/// # Errors
/// Whatever stopped the command, for `main` to report.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals();
    match &cli.command {
        None | Some(Command::Run) => {
            let metrics = install_recorder()?;
            consume::describe_metrics();
            run(bind(&cli).await?, &cli, Some(metrics), shutdown).await
        }
        Some(Command::Archive(args)) => {
            let store = archive::Archive::from_args(&cli.archive)?.context(
                "archive needs ARCHIVE_URL (s3://bucket[/prefix]) and the AWS_* variables",
            )?;
            let metrics = install_recorder()?;
            archive::component::describe_metrics();
            let listener = bind(&cli).await?;
            run_archive(listener, &cli, store, args, Some(metrics), shutdown).await
        }
        Some(Command::Migrate) => cli::migrate(&cli).await,
        Some(Command::Replay(args)) => cli::replay(&cli, args, &shutdown).await,
        Some(Command::Erase(args)) => cli::erase(&cli, args).await,
        Some(Command::Dlq(cmd)) => cli::dlq(&cli, cmd).await,
        Some(Command::Trace(args)) => cli::trace(&cli, args).await,
    }
}

/// The ops endpoints' listener, on METRICS_ADDR.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(cli: &Cli) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cli.run.metrics_addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {}", cli.run.metrics_addr))
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

/// Runs the worker until `shutdown`: the ops endpoints on `listener`, migrations (unless
/// disabled), retention, and the records component on every partition stream.
///
/// # Errors
/// When NATS cannot be reached, migrations fail, or a lane's consumer fails.
pub async fn run(
    listener: TcpListener,
    cli: &Cli,
    metrics: Option<PrometheusHandle>,
    shutdown: Shutdown,
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
        .map(|lane| {
            Ok((
                *lane,
                store::pool(&cli.db.database_url, cli.db.db_max_connections)?,
            ))
        })
        .collect::<Result<std::collections::HashMap<_, _>, sqlx::Error>>()
        .context("parsing DATABASE_URL")?;
    let pool = pools[&lanes[0]].clone();
    let (js, registry) = start(
        listener,
        cli,
        "persist-worker",
        &pool,
        &policy,
        metrics,
        &shutdown,
    )
    .await?;
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
        tokio::spawn(retention::run(pool.clone(), days, shutdown.clone()));
    }
    if !first_stream(&js, cli, &shutdown).await? {
        return Ok(());
    }
    let records = Arc::new(consume::Records {
        lanes,
        pools: pools.clone(),
        policy,
        args: cli.run.clone(),
    });
    let served = runner::run(&js, records, &registry, cli.run.consumer_check(), &shutdown).await;
    for p in pools.values() {
        p.close().await;
    }
    tracing::info!("persist-worker stopped");
    served
}

/// Runs the archiver until `shutdown`: the ops endpoints on `listener` and the archive
/// component on every partition stream, into `archive`.
///
/// # Errors
/// When NATS cannot be reached or a stream's archiver fails.
pub async fn run_archive(
    listener: TcpListener,
    cli: &Cli,
    archive: archive::Archive,
    args: &ArchiveRunArgs,
    metrics: Option<PrometheusHandle>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let policy = privacy::Policy::from_args(&cli.privacy)?;
    let pool = store::pool(&cli.db.database_url, 2).context("parsing DATABASE_URL")?;
    let (js, registry) = start(
        listener,
        cli,
        "persist-worker archive",
        &pool,
        &policy,
        metrics,
        &shutdown,
    )
    .await?;
    tracing::info!(archive = archive.url(), "archiving");
    let component = archive::component::Archiving::new(
        js.clone(),
        archive,
        pool,
        policy,
        args.clone(),
        cli.run.retry_max(),
    );
    let served = runner::run(&js, Arc::new(component), &registry, args.check(), &shutdown).await;
    tracing::info!("archiver stopped");
    served
}

/// Connects to NATS as the worker identity and serves the ops endpoints on `listener`:
/// the JetStream context and the registry the components' health goes into.
async fn start(
    listener: TcpListener,
    cli: &Cli,
    name: &str,
    pool: &PgPool,
    policy: &privacy::Policy,
    metrics: Option<PrometheusHandle>,
    shutdown: &Shutdown,
) -> anyhow::Result<(jetstream::Context, Registry)> {
    let client = cli
        .nats
        .connect(name, Role::Worker)
        .await
        .context("connecting to NATS")?;
    let registry = Registry::default();
    ops::serve(
        listener,
        ops::OpsState {
            pool: pool.clone(),
            nats: client.clone(),
            metrics,
            consumers: registry.clone(),
            erasure_key: policy.key.clone(),
        },
        shutdown.clone(),
    );
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cli.nats.nats_request_timeout_ms))
        .build(client);
    Ok((js, registry))
}

/// Waits until there is a stream to serve: a fresh deployment may start its workers
/// before any gateway, and the `CALLS` stream is created then (a partitioned layout is
/// only ever made by `ingest-gateway partitions`). False when shut down first.
///
/// # Errors
/// When the server refuses the stream's definition.
async fn first_stream(
    js: &jetstream::Context,
    cli: &Cli,
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    use callcap::subjects::{with_retry, SetupError};
    let found = with_retry(
        "opening the CALLS stream",
        Duration::from_secs(3600),
        || async {
            let found = callcap::partitions::list(js)
                .await
                .map_err(SetupError::Nats)?;
            if found.is_empty() {
                callcap::subjects::open_stream(js, &cli.stream).await?;
            }
            Ok(())
        },
    );
    tokio::select! {
        found = found => found.map(|()| true).map_err(anyhow::Error::from),
        () = shutdown.triggered() => Ok(false),
    }
}
