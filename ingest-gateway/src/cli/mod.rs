//! The gateway's commands besides serving: `keys`, `connectors`, `partitions`, `setup`,
//! `check` and `nkey`, run with the admin NATS identity where they touch NATS. Each
//! prints what it did to stdout (the output a script reads is its last line).
//!
//! - [`keys`]: API keys created, listed and revoked;
//! - [`connectors`]: provider connectors created, bound, rotated and revoked;
//! - [`partitions`]: the partition layout shown, changed and balanced, KEDA's objects;
//! - [`check`]: the integration check of the API document;
//! - [`nkey`]: the services' NATS identities made.

pub mod check;
pub mod connectors;
pub mod keys;
pub mod nkey;
pub mod partitions;

use anyhow::Context as _;
use async_nats::jetstream;
use callcap::config::Role;
use callcap::subjects::{with_retry, SetupError};

use crate::config::{Cli, Command, ConnectorsCommand, KeysCommand, NkeyCommand, PartitionsCommand};
use crate::{auth, kv, SETUP_PATIENCE};

/// Runs `command` (anything but serving), printing to stdout.
///
/// # Errors
/// Whatever stopped it, for `main` to report.
pub async fn run(cli: &Cli, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => anyhow::bail!("serving is not a command of cli::run"),
        Command::Keys(cmd) => {
            let store = key_store(cli).await?;
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
        Command::Connectors(cmd) => run_connectors(cli, cmd).await,
        Command::Setup => {
            let summary = setup(cli).await?;
            println!("{summary}");
            Ok(())
        }
        Command::Partitions(cmd) => {
            let js = admin_context(cli, "ingest-gateway partitions").await?;
            let mut out = std::io::stdout().lock();
            match cmd {
                PartitionsCommand::Show => partitions::show(&js, &mut out).await,
                PartitionsCommand::Keda {
                    namespace,
                    monitoring,
                } => partitions::keda(&js, namespace, monitoring, &mut out).await,
                PartitionsCommand::Set { count, no_wait } => {
                    partitions::set(&js, &cli.stream, *count, !*no_wait, &mut out).await
                }
                PartitionsCommand::Balance => partitions::balance(&js, &mut out).await,
            }
        }
        Command::Check(args) => {
            let mut out = std::io::stdout().lock();
            if check::run(args, &mut out).await? {
                Ok(())
            } else {
                anyhow::bail!("the integration check failed")
            }
        }
        Command::Nkey(cmd) => {
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
    let mut out = std::io::stdout().lock();
    match cmd {
        ConnectorsCommand::NewSecretsKey { out: path } => {
            connectors::new_secrets_key(path, &mut out)
        }
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
            let new = connectors::NewConnector {
                company: *company,
                provider: *provider,
                public_url,
                secret_file: secret_file.as_deref(),
                country: country.as_deref(),
                allow_networks: allow_network,
                application: application.as_deref(),
            };
            connectors::create(&store, &key, &new, &mut out)
                .await
                .map(|_| ())
        }
        ConnectorsCommand::List { company } => {
            connectors::list(&connector_store(cli).await?, *company, &mut out).await
        }
        ConnectorsCommand::RotateSecret {
            connector_id,
            secret_file,
            overlap_hours,
        } => {
            let key = secrets_key(cli)?;
            let store = connector_store(cli).await?;
            connectors::rotate_secret(
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
            connectors::bind(&store, &key, connector_id, application, &mut out).await
        }
        ConnectorsCommand::Revoke { connector_id } => {
            connectors::revoke(&connector_store(cli).await?, connector_id, &mut out).await
        }
    }
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
pub fn secrets_key(cli: &Cli) -> anyhow::Result<crate::connectors::seal::SecretsKey> {
    let path = cli.serve.connector_secrets_key_file.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "CONNECTOR_SECRETS_KEY_FILE (--connector-secrets-key-file) must name the gateways' secrets key file; \
             make one with `ingest-gateway connectors new-secrets-key --out FILE`"
        )
    })?;
    crate::connectors::seal::SecretsKey::from_file(path)
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
