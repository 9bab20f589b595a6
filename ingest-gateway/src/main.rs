//! `ingest-gateway`: parse config, set up telemetry, run the library.

use clap::Parser;
use ingest_gateway::config::Cli;

// Profiling the gateway under load showed a quarter of its CPU in glibc malloc/free
// (serde_json values, envelopes, NATS messages); mimalloc cuts most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's settings under which the body memory budget holds: freed memory given back
/// to the system at once (`purge_delay` 0) and arena memory committed as it is used
/// (`arena_eager_commit` 0). With the defaults, the memory of bodies already answered
/// stayed resident, and a gateway at a 256 MiB budget peaked at 467 MiB (BENCHMARKS.md,
/// "Memory"). mimalloc reads them from the environment as the process starts, so a
/// gateway started without them starts itself again with them: same pid, arguments and
/// descriptors. Set either variable to choose otherwise.
const ALLOCATOR_SETTINGS: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

fn settle_allocator() {
    if ALLOCATOR_SETTINGS
        .iter()
        .any(|(k, _)| std::env::var_os(k).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut again = std::process::Command::new(exe);
    again.args(std::env::args_os().skip(1));
    again.envs(ALLOCATOR_SETTINGS);
    // Only returns on failure.
    let e = std::os::unix::process::CommandExt::exec(&mut again);
    eprintln!(
        "warning: could not start again with the allocator settings ({e}); freed request bodies may stay resident past BODY_MEMORY_MB"
    );
}

fn main() -> anyhow::Result<()> {
    settle_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Kept until exit: dropping it sends the traces still queued.
    let _traces = callcap::telemetry::init(cli.log_format, "ingest-gateway")?;
    ingest_gateway::execute(cli).await
}
