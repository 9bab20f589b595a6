//! `persist-worker`: parse config, set up telemetry, run the library.

use clap::Parser;
use persist_worker::config::Cli;

// Profiling the gateway under load showed a quarter of its CPU in glibc malloc/free
// (serde_json values, envelopes, NATS messages); mimalloc cuts most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    callcap::telemetry::init(cli.log_format);
    persist_worker::execute(cli).await
}
