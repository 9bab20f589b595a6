//! `ingest-gateway`: parse config, set up telemetry, run the library.

use anyhow::Context as _;
use clap::Parser;
use ingest_gateway::config::{Cli, Command, KeysCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    callcap::telemetry::init(cli.log_format);
    match &cli.command {
        None | Some(Command::Serve) => {
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .context("configuring histogram buckets")?
                .install_recorder()
                .context("installing the Prometheus recorder")?;
            ingest_gateway::serve(&cli, Some(metrics), ingest_gateway::shutdown_signal()).await
        }
        Some(Command::Keys(cmd)) => {
            let store = ingest_gateway::key_store(&cli).await?;
            let mut out = std::io::stdout().lock();
            match cmd {
                KeysCommand::Create {
                    company,
                    name,
                    expires_in_days,
                } => {
                    ingest_gateway::keys::create(&store, *company, name, *expires_in_days, &mut out)
                        .await
                        .map(|_| ())
                }
                KeysCommand::List { company } => {
                    ingest_gateway::keys::list(&store, *company, &mut out).await
                }
                KeysCommand::Revoke { key_id } => {
                    ingest_gateway::keys::revoke(&store, key_id, &mut out).await
                }
            }
        }
    }
}
