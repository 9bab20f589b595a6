//! `ingest-gateway`: parse config, set up telemetry, run the library.

use clap::Parser;
use ingest_gateway::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    callcap::telemetry::init(cli.log_format);
    ingest_gateway::execute(cli).await
}
