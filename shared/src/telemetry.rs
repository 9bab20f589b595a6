//! Logging setup for both binaries: `RUST_LOG` filter, text for people, JSON when deployed,
//! always on stderr.
//!
//! Metrics recorders are not installed here: a global recorder belongs to `main` only.

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
