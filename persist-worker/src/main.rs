//! `persist-worker`: parse config, set up telemetry, run the library.

use clap::Parser;
use persist_worker::config::Cli;

// The worker allocates per message (decoded envelopes, serde_json values, NATS messages,
// bind arrays); mimalloc is cheaper than glibc's malloc there, as the gateway's profile
// showed for the same kinds of allocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Kept until exit: dropping it sends the traces still queued.
    let _traces = callcap::telemetry::init(cli.log_format, "persist-worker")?;
    persist_worker::execute(cli).await
}
