//! Logging setup for both binaries: `RUST_LOG` filter, text for people, JSON when deployed,
//! always on stderr.
//!
//! Each binary's `execute` installs its Prometheus recorder with [`install_metrics`], which
//! also keeps it drained.

use tracing_subscriber::{fmt, EnvFilter};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout belongs to command output (`keys create` prints the key
    // as its last stdout line, and scripts read it with `tail -n1`).
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (e.g. a test binary that already installed one) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// For tests: quiet unless `TEST_LOG=1`, and written through the test harness's capture.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("debug,async_nats=info,sqlx=warn,hyper=info"));
        let _ = fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// Installs `builder`'s Prometheus recorder as the global one and keeps it drained.
///
/// `install_recorder` keeps every histogram observation pending until something renders
/// `/metrics`; with nobody scraping, memory grew with every request (the 30-minute soak
/// showed the gateway's RSS going from 31 to 56 MiB in 15 minutes). An upkeep task folds
/// pending observations into the buckets every 5 seconds, as the exporter's own HTTP
/// listener would. Call it inside the Tokio runtime.
///
/// # Errors
/// When a recorder is already installed.
pub fn install_metrics(
    builder: metrics_exporter_prometheus::PrometheusBuilder,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError>
{
    let handle = builder.install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
