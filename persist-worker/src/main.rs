//! `persist-worker`: parse config, set up telemetry, run the library.

use clap::Parser;
use persist_worker::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    callcap::telemetry::init(cli.log_format);
    persist_worker::execute(cli).await
}
