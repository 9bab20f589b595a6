//! `persist-worker`: parse config, set up telemetry, run the library.

use anyhow::Context as _;
use clap::Parser;
use persist_worker::config::{Cli, Command, DlqCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    callcap::telemetry::init(cli.log_format);
    let cancel = persist_worker::shutdown_token();
    match &cli.command {
        None | Some(Command::Run) => {
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .context("configuring histogram buckets")?
                .install_recorder()
                .context("installing the Prometheus recorder")?;
            persist_worker::run(&cli, Some(metrics), cancel).await
        }
        Some(Command::Migrate) => {
            let pool = persist_worker::store::pool(&cli.db.database_url, 1)
                .context("parsing DATABASE_URL")?;
            persist_worker::migrate(
                &cli.db.database_url,
                &pool,
                std::time::Duration::from_secs(30),
            )
            .await?;
            println!("migrations applied");
            Ok(())
        }
        Some(Command::Replay(args)) => {
            let pool = persist_worker::store::pool(&cli.db.database_url, cli.db.db_max_connections)
                .context("parsing DATABASE_URL")?;
            let client = async_nats::connect(cli.nats.nats_url.as_str())
                .await
                .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
            let js = async_nats::jetstream::new(client);
            let summary =
                persist_worker::replay::run(&js, &pool, args, cli.run.retry_max(), &cancel)
                    .await
                    .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
            println!("{summary}");
            Ok(())
        }
        Some(Command::Dlq(cmd)) => {
            let pool = persist_worker::store::pool(&cli.db.database_url, 1)
                .context("parsing DATABASE_URL")?;
            let mut out = std::io::stdout().lock();
            match cmd {
                DlqCommand::List { all, limit } => {
                    persist_worker::dlq::list(&pool, *all, *limit, &mut out).await
                }
                DlqCommand::Redrive { ids, all } => {
                    let ids = (!*all).then_some(ids.as_slice());
                    persist_worker::dlq::redrive(&pool, ids, &mut out)
                        .await
                        .map(|_| ())
                }
            }
        }
    }
}
