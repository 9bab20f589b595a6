//! Call Capture ingest gateway.
//!
//! Authenticates (`x-api-key`), validates, publishes each record to the JetStream stream
//! `CALLS` and answers 201 once JetStream has acknowledged it. Never touches Postgres.
//!
//! - [`config`]: command line and environment;
//! - [`state`]: what handlers share; [`app`]: routes, middleware, operational endpoints;
//!   [`server`]: connections and drain;
//! - [`ingest`]: the record handlers; [`answers`]: what they answer; [`extract`]: who is
//!   calling and the body; [`body`]: reading a request body within its limits;
//!   [`budget`]: the memory request bodies may hold; [`error`]: every error answer;
//! - [`auth`]: API keys and the watched cache; [`keys`]: the `keys` admin commands;
//! - [`publish`]: the JetStream publisher; [`ratelimit`]: per-key token buckets;
//! - [`status`]: the status page; [`check`]: the `check` command; [`tls`]: HTTPS;
//!   [`nkey`]: the `nkey` commands.

pub mod answers;
pub mod app;
pub mod auth;
pub mod body;
pub mod budget;
pub mod callbacks;
pub mod check;
pub mod config;
pub mod connectors;
pub mod error;
pub mod extract;
pub mod ingest;
pub mod intake;
pub mod keys;
pub mod kv;
pub mod lanes;
pub mod layout;
pub mod nkey;
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
use async_nats::jetstream;
use callcap::subjects::{with_retry, SetupError};

/// How long the gateway waits at start (and `setup` at each step) for NATS to answer.
const SETUP_PATIENCE: Duration = Duration::from_secs(30);
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::app::AppState;
use crate::auth::KeyCache;
use crate::config::{Cli, Command, ConnectorsCommand, KeysCommand, NkeyCommand, PartitionsCommand};
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
        Some(Command::Keys(cmd)) => {
            let store = key_store(&cli).await?;
            let mut out = std::io::stdout().lock();
            match cmd {
                KeysCommand::Create {
                    company,
                    name,
                    expires_in_days,
                } => keys::create(&store, *company, name, *expires_in_days, &mut out)
                    .await
                    .map(|_| ()),
                KeysCommand::List { company } => keys::list(&store, *company, &mut out).await,
                KeysCommand::Revoke { key_id } => keys::revoke(&store, key_id, &mut out).await,
            }
        }
        Some(Command::Connectors(cmd)) => run_connectors(&cli, cmd).await,
        Some(Command::Setup) => {
            let summary = setup(&cli).await?;
            println!("{summary}");
            Ok(())
        }
        Some(Command::Partitions(cmd)) => {
            let js = admin_context(&cli, "ingest-gateway partitions").await?;
            let mut out = std::io::stdout().lock();
            match cmd {
                PartitionsCommand::Show => layout::show(&js, &mut out).await,
                PartitionsCommand::Keda {
                    namespace,
                    monitoring,
                } => layout::keda(&js, namespace, monitoring, &mut out).await,
                PartitionsCommand::Set { count, no_wait } => {
                    layout::set(&js, &cli.stream, *count, !*no_wait, &mut out).await
                }
                PartitionsCommand::Balance => layout::balance(&js, &mut out).await,
            }
        }
        Some(Command::Check(args)) => {
            let mut out = std::io::stdout().lock();
            if check::run(args, &mut out).await? {
                Ok(())
            } else {
                anyhow::bail!("the integration check failed")
            }
        }
        Some(Command::Nkey(cmd)) => {
            let mut out = std::io::stdout().lock();
            match cmd {
                NkeyCommand::Create { out: path } => nkey::create(path, &mut out),
                NkeyCommand::Public { seed_file } => nkey::public(seed_file, &mut out),
            }
        }
    }
}

/// `ingest-gateway connectors …`, printing to stdout.
async fn run_connectors(cli: &Cli, cmd: &ConnectorsCommand) -> anyhow::Result<()> {
    use connectors::admin;
    let mut out = std::io::stdout().lock();
    match cmd {
        ConnectorsCommand::NewSecretsKey { out: path } => admin::new_secrets_key(path, &mut out),
        ConnectorsCommand::Create {
            company,
            provider,
            public_url,
            secret_file,
            country,
            allow_network,
            application,
        } => {
            let key = secrets_key(cli)?;
            let store = connector_store(cli).await?;
            let new = admin::NewConnector {
                company: *company,
                provider: *provider,
                public_url,
                secret_file: secret_file.as_deref(),
                country: country.as_deref(),
                allow_networks: allow_network,
                application: application.as_deref(),
            };
            admin::create(&store, &key, &new, &mut out)
                .await
                .map(|_| ())
        }
        ConnectorsCommand::List { company } => {
            admin::list(&connector_store(cli).await?, *company, &mut out).await
        }
        ConnectorsCommand::RotateSecret {
            connector_id,
            secret_file,
            overlap_hours,
        } => {
            let key = secrets_key(cli)?;
            let store = connector_store(cli).await?;
            admin::rotate_secret(
                &store,
                &key,
                connector_id,
                secret_file.as_deref(),
                chrono::Duration::hours(i64::from(*overlap_hours)),
                &mut out,
            )
            .await
        }
        ConnectorsCommand::Bind {
            connector_id,
            application,
        } => {
            let key = secrets_key(cli)?;
            let store = connector_store(cli).await?;
            admin::bind(&store, &key, connector_id, application, &mut out).await
        }
        ConnectorsCommand::Revoke { connector_id } => {
            admin::revoke(&connector_store(cli).await?, connector_id, &mut out).await
        }
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

/// Creates the stream and the key bucket, or brings existing ones to the STREAM_*
/// settings (`ingest-gateway setup`, admin identity): the current partition layout's
/// streams (sealed ones from older layouts are left as they are). Returns a line per
/// stream.
///
/// # Errors
/// When NATS is unreachable, refuses the definition, or the identity may not change it.
pub async fn setup(cli: &Cli) -> anyhow::Result<String> {
    let js = admin_context(cli, "ingest-gateway setup").await?;
    let found = with_retry("reading the partition layout", SETUP_PATIENCE, || async {
        callcap::partitions::list(&js)
            .await
            .map_err(SetupError::Nats)
    })
    .await?;
    let layout = callcap::partitions::current_of(&found)
        .map_err(|why| anyhow::anyhow!("reading the partition layout: {why}"))?;
    // The current layout's streams get the settings; sealed ones (older layouts) keep
    // what they hold as it is.
    let streams = match layout {
        Some(l) if l != callcap::partitions::Layout::default() => {
            for p in l.partitions() {
                with_retry("updating a partition stream", SETUP_PATIENCE, || async {
                    let name = p.stream_name();
                    let existing = js
                        .get_stream(&name)
                        .await
                        .map_err(|e| SetupError::Nats(e.into()))?
                        .cached_info()
                        .config
                        .clone();
                    let replicas = callcap::subjects::target_replicas(
                        &name,
                        cli.stream.stream_replicas,
                        Some(existing.num_replicas),
                        callcap::subjects::clustered(&js),
                    )?;
                    let mut config = callcap::partitions::stream_config(&cli.stream, replicas, p);
                    config.first_sequence = existing.first_sequence;
                    js.update_stream(config)
                        .await
                        .map_err(|e| SetupError::Nats(e.into()))?;
                    Ok(())
                })
                .await?;
            }
            l.partitions().iter().map(|p| p.stream_name()).collect()
        }
        _ => {
            with_retry(
                "creating or updating the CALLS stream",
                SETUP_PATIENCE,
                || callcap::subjects::ensure_stream(&js, &cli.stream),
            )
            .await?;
            vec![callcap::subjects::STREAM_NAME.to_owned()]
        }
    };
    with_retry(
        "creating or updating the API key bucket",
        SETUP_PATIENCE,
        || auth::key_bucket(&js, cli.stream.stream_replicas),
    )
    .await?;
    with_retry(
        "creating or updating the connector bucket",
        SETUP_PATIENCE,
        || kv::bucket(&js, kv::CONNECTORS, cli.stream.stream_replicas),
    )
    .await?;
    let mut lines = Vec::new();
    for name in streams {
        let mut stream = js
            .get_stream(&name)
            .await
            .context("reading the stream back")?;
        let info = stream.info().await.context("reading the stream back")?;
        lines.push(format!(
            "stream {} ready: {} replica(s), max age {} s, max {} bytes, {} records held",
            info.config.name,
            info.config.num_replicas,
            info.config.max_age.as_secs(),
            info.config.max_bytes,
            info.state.messages
        ));
    }
    Ok(lines.join("\n"))
}

/// A JetStream context as the admin identity, for the operator's commands (`name` is the
/// connection's name in the server's monitoring).
///
/// # Errors
/// When NATS is unreachable.
async fn admin_context(cli: &Cli, name: &str) -> anyhow::Result<jetstream::Context> {
    let client = cli
        .nats
        .connect_once(name, Role::Admin)
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
    Ok(jetstream::new(client))
}

/// Opens the connector bucket as the admin identity (`connectors` commands).
///
/// # Errors
/// When NATS is unreachable or the bucket cannot be created.
pub async fn connector_store(cli: &Cli) -> anyhow::Result<jetstream::kv::Store> {
    let js = admin_context(cli, "ingest-gateway connectors").await?;
    kv::bucket(&js, kv::CONNECTORS, cli.stream.stream_replicas)
        .await
        .map_err(|e| anyhow::anyhow!("opening the connector bucket: {e}"))
}

/// The secrets key of the `connectors` commands that seal a secret.
///
/// # Errors
/// When `CONNECTOR_SECRETS_KEY_FILE` is not set or does not hold a key.
pub fn secrets_key(cli: &Cli) -> anyhow::Result<connectors::seal::SecretsKey> {
    let path = cli.serve.connector_secrets_key_file.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "CONNECTOR_SECRETS_KEY_FILE (--connector-secrets-key-file) must name the gateways' secrets key file; \
             make one with `ingest-gateway connectors new-secrets-key --out FILE`"
        )
    })?;
    connectors::seal::SecretsKey::from_file(path)
}

/// Opens the key bucket for the `keys` commands.
///
/// # Errors
/// When NATS is unreachable.
pub async fn key_store(cli: &Cli) -> anyhow::Result<jetstream::kv::Store> {
    let js = admin_context(cli, "ingest-gateway keys").await?;
    auth::key_bucket(&js, cli.stream.stream_replicas)
        .await
        .map_err(|e| anyhow::anyhow!("opening the API key bucket: {e}"))
}
