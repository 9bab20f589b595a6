//! Call Capture ingest gateway: boot. Connects, sets up the streams and buckets, and
//! serves until shutdown; the other commands are [`cli`]'s.
//!
//! Authenticates (`x-api-key`, or a provider's signature for its connector), validates,
//! publishes each record to its company's partition stream and answers 201 once
//! JetStream has acknowledged it. Never touches Postgres.
//!
//! - [`config`]: command line and environment;
//! - [`state`]: what handlers share; [`app`]: routes, middleware, operational endpoints;
//!   [`server`]: connections and drain; [`status`]: the status page; [`tls`]: HTTPS;
//! - the record handlers: [`ingest`] (API keys) and [`callbacks`] (provider connectors),
//!   both ending in the shared [`intake`]; [`answers`]: what they answer; [`extract`]:
//!   who is calling and the body; [`body`]: reading a request body within its limits;
//!   [`budget`]: the memory request bodies may hold; [`error`]: every error answer;
//! - [`auth`]: API keys and their watched cache; [`connectors`]: provider connectors,
//!   their secrets, signatures and mapping; [`kv`]: the watched buckets;
//! - [`publish`]: the JetStream publisher; [`lanes`]: which lane a company's records
//!   take; [`ratelimit`]: per-key token buckets;
//! - [`cli`]: `keys`, `connectors`, `partitions`, `setup`, `check`, `nkey`.

pub mod answers;
pub mod app;
pub mod auth;
pub mod body;
pub mod budget;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod error;
pub mod extract;
pub mod ingest;
pub mod intake;
pub mod kv;
pub mod lanes;
pub mod publish;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod status;
pub mod tls;

use callcap::config::Role;
use callcap::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use callcap::subjects::{with_retry, SetupError};

/// How long the gateway waits at start (and `setup` at each step) for NATS to answer.
pub(crate) const SETUP_PATIENCE: Duration = Duration::from_secs(30);
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::app::AppState;
use crate::auth::KeyCache;
use crate::config::{Cli, Command};
use crate::publish::Partitioned;

/// Runs what the command line asks: serve (with the Prometheus recorder installed and
/// SIGTERM/SIGINT as the shutdown signal) or a `keys` command printing to stdout.
///
/// # Errors
/// Whatever stopped the command, for `main` to report.
pub async fn execute(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        None | Some(Command::Serve) => {
            let metrics = callcap::telemetry::install_metrics(
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .set_buckets(&[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ])
                    .context("configuring histogram buckets")?
                    // A count, not a duration: records per atomic batch.
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            "gateway_publish_batch_records".into(),
                        ),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                    .context("configuring batch-size buckets")?,
            )
            .context("installing the Prometheus recorder")?;
            publish::describe_metrics();
            lanes::describe_metrics();
            app::describe_metrics();
            callbacks::describe_metrics();
            server::describe_metrics();
            serve(&cli, Some(metrics), Shutdown::on_signals()).await
        }
        Some(command) => cli::run(&cli, command).await,
    }
}

/// Connects to NATS, prepares the stream and key bucket, and serves until `shutdown`.
///
/// # Errors
/// When the listen address cannot be bound or NATS set-up fails.
pub async fn serve(
    cli: &Cli,
    metrics: Option<PrometheusHandle>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    cli.serve.check()?;
    let listener = TcpListener::bind(cli.serve.listen_addr)
        .await
        .with_context(|| format!("binding {}", cli.serve.listen_addr))?;
    let tls = match (&cli.serve.tls_cert_file, &cli.serve.tls_key_file) {
        (Some(cert), Some(key)) => {
            let reloading = Arc::new(
                tls::ReloadingCert::open(cert.clone(), key.clone())
                    .context("loading the TLS certificate")?,
            );
            let acceptor = reloading.acceptor()?;
            tokio::spawn(reloading.watch(Duration::from_secs(cli.serve.tls_reload_secs)));
            Some(acceptor)
        }
        (None, None) => None,
        _ => anyhow::bail!("TLS_CERT_FILE and TLS_KEY_FILE must be set together"),
    };
    let state = connect(cli, metrics).await?;
    tokio::spawn(app::report_readiness(state.clone()));
    status::keep_history();
    tracing::info!(
        addr = %listener.local_addr()?,
        https = tls.is_some(),
        "ingest-gateway listening"
    );
    server::run(listener, state, tls, shutdown).await?;
    Ok(())
}

/// Builds the production state: NATS connection, stream, key bucket and its watch.
///
/// # Errors
/// When the stream or the key bucket cannot be set up.
pub async fn connect(cli: &Cli, metrics: Option<PrometheusHandle>) -> anyhow::Result<AppState> {
    let client = cli
        .nats
        .connect("ingest-gateway", Role::Gateway)
        .await
        .context("connecting to NATS")?;
    // A flush round trip means the connection is up and its INFO is the server's.
    with_retry("reaching NATS", SETUP_PATIENCE, || async {
        match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| SetupError::Nats(e.into())),
            Err(_) => Err(SetupError::Nats("no answer from NATS within 2 s".into())),
        }
    })
    .await?;
    let server = client.server_info();
    callcap::subjects::check_server_version(&server.version)?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(cli.serve.publish_timeout())
        .build(client.clone());
    // The layout on the server (`ingest-gateway partitions`); none yet means a fresh
    // deployment: the CALLS stream, created here.
    let found = with_retry("reading the partition layout", SETUP_PATIENCE, || async {
        callcap::partitions::list(&js)
            .await
            .map_err(SetupError::Nats)
    })
    .await?;
    let layout = callcap::partitions::current_of(&found)
        .map_err(|why| anyhow::anyhow!("reading the partition layout: {why}"))?;
    let mut serve = cli.serve.clone();
    let layout = match layout {
        Some(l) if l != callcap::partitions::Layout::default() => l,
        _ => {
            let stream = with_retry("opening the CALLS stream", SETUP_PATIENCE, || {
                callcap::subjects::open_stream(&js, &cli.stream)
            })
            .await?;
            // A stream created before lanes existed has no overflow subjects until
            // `setup` (admin) adds them: until then every record takes the main lane,
            // rather than a publish nobody would take.
            if !stream
                .cached_info()
                .config
                .subjects
                .contains(&callcap::subjects::Lane::Overflow.filter())
            {
                tracing::warn!(
                    "the CALLS stream has no overflow lane yet: every record takes the main lane. Run \
                     `ingest-gateway setup` with the admin NATS identity, then restart the gateways \
                     and workers"
                );
                serve.overflow_rate = 0.0;
                serve.overflow_companies.clear();
            }
            callcap::partitions::Layout::default()
        }
    };
    tracing::info!(
        epoch = layout.epoch,
        partitions = layout.count,
        "publishing by the partition layout"
    );
    metrics::gauge!("gateway_partitions").set(f64::from(layout.count));
    let publisher = Partitioned::start(client, js.clone(), cli.serve.group_commit(), layout)
        .await
        .map_err(|e| anyhow::anyhow!("starting the publishers: {e}"))?;
    let fsync_mode = report_fsync_mode(&server, cli.serve.nats_monitor_url.as_deref()).await;
    let bucket = with_retry("opening the API key bucket", SETUP_PATIENCE, || {
        auth::open_key_bucket(&js, cli.stream.stream_replicas)
    })
    .await?;
    let keys = Arc::new(KeyCache::default());
    tokio::spawn(auth::watch_keys(bucket, keys.clone()));
    let secrets_key = match &cli.serve.connector_secrets_key_file {
        Some(path) => {
            let key = connectors::seal::SecretsKey::from_file(path)?;
            tracing::info!(
                fingerprint = key.fingerprint(),
                "provider connector secrets key loaded"
            );
            Some(key)
        }
        None => None,
    };
    let connector_bucket = with_retry("opening the connector bucket", SETUP_PATIENCE, || {
        kv::open_bucket(&js, kv::CONNECTORS, cli.stream.stream_replicas)
    })
    .await?;
    let connectors = Arc::new(connectors::ConnectorCache::new(secrets_key));
    tokio::spawn(kv::watch(connector_bucket, connectors.clone()));
    Ok(AppState::with_connectors(
        publisher, keys, connectors, serve, metrics, fsync_mode,
    ))
}

/// Logs the fsync mode of the server: whether a JetStream ack means "on disk" (a 201
/// survives power loss) or "in the page cache".
///
/// The client protocol does not carry it (neither the connection's INFO nor JetStream's
/// account info has `sync_interval`), so it is read from the server's monitoring endpoint
/// (`/jsz`) when `NATS_MONITOR_URL` is set.
async fn report_fsync_mode(server: &async_nats::ServerInfo, monitor_url: Option<&str>) -> String {
    let Some(url) = monitor_url else {
        tracing::info!(
            server = %server.server_name, version = %server.version,
            "JetStream fsync mode unknown: the client protocol does not report it; set \
             NATS_MONITOR_URL to the server's monitoring address to have it checked"
        );
        return "unknown (set NATS_MONITOR_URL)".into();
    };
    match fetch_fsync_mode(url).await {
        Ok(mode) if mode.always => {
            tracing::info!(
                server = %server.server_name, version = %server.version,
                "JetStream fsync mode: sync_interval always (an ack is on disk; a 201 survives power loss)"
            );
            "always".into()
        }
        Ok(mode) => {
            tracing::warn!(
                server = %server.server_name, version = %server.version,
                interval_secs = mode.interval_secs,
                "JetStream fsync mode: every {} s, NOT always: a 201 survives a crash of \
                 nats-server but not a power loss of its machine; set `sync_interval: always`",
                mode.interval_secs
            );
            format!("every {} s (not power-loss safe)", mode.interval_secs)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read the JetStream fsync mode from {url}");
            format!("unknown ({url}/jsz: {e})")
        }
    }
}

/// The fsync setting a nats-server reports on its monitoring endpoint.
struct FsyncMode {
    always: bool,
    interval_secs: u64,
}

async fn fetch_fsync_mode(monitor_url: &str) -> anyhow::Result<FsyncMode> {
    #[derive(serde::Deserialize)]
    struct Jsz {
        config: JszConfig,
    }
    #[derive(serde::Deserialize)]
    struct JszConfig {
        #[serde(default)]
        sync_always: bool,
        /// Nanoseconds; absent means the server's default (2 minutes).
        #[serde(default)]
        sync_interval: Option<u64>,
    }
    let url = format!("{}/jsz", monitor_url.trim_end_matches('/'));
    let jsz: Jsz = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(FsyncMode {
        always: jsz.config.sync_always,
        interval_secs: jsz
            .config
            .sync_interval
            .map_or(120, |ns| ns / 1_000_000_000),
    })
}
