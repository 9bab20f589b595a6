//! Logging setup for both binaries: `RUST_LOG` filter, text for people, JSON when deployed,
//! always on stderr; and traces when configured ([`crate::traces`]).
//!
//! Each binary's `execute` installs its Prometheus recorder with [`install_metrics`], which
//! also keeps it drained.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, EnvFilter, Layer as _};

use crate::traces::{self, SetupError, Traces};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default `info`) and, when
/// the environment asks for them (`OTEL_EXPORTER_OTLP_ENDPOINT`, see [`crate::traces`]),
/// traces of the same spans. `service` is the name traces carry unless
/// `OTEL_SERVICE_NAME` says otherwise. Keep the returned [`Traces`] until exit: dropping
/// it sends what is still queued.
///
/// # Errors
/// When traces are asked for in a way this build cannot send (another OTLP protocol, an
/// exporter that cannot be built): better refused at start than silently lost.
pub fn init(format: LogFormat, service: &'static str) -> Result<Traces, SetupError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout belongs to command output (`keys create` prints the key
    // as its last stdout line, and scripts read it with `tail -n1`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_target(true)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = traces::provider(service)?;
    let otel = provider.as_ref().map(|p| traces::layer(p, service));
    let filter = LogsAndSpans {
        logs: filter,
        spans: provider.is_some(),
    };
    // A second init (e.g. a test binary that already installed one) is harmless.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok();
    Ok(traces::keep(provider.filter(|_| installed)))
}

/// The one filter in front of every layer: what `RUST_LOG` enables and, with traces on,
/// every span at INFO or above, so that traces do not vanish when logs are at WARN.
///
/// One global filter, not a filter per layer: per-layer filters keep each callsite's
/// verdict in a thread-local until the span or event it was asked for is made, and sqlx
/// asks (`enabled!`) without making one. The next span made on that thread then took the
/// stale verdict: a batch's commit and ack spans went missing from its trace.
struct LogsAndSpans {
    logs: EnvFilter,
    spans: bool,
}

impl LogsAndSpans {
    fn traced(&self, meta: &tracing::Metadata<'_>) -> bool {
        self.spans && meta.is_span() && *meta.level() <= tracing::Level::INFO
    }
}

impl<S> tracing_subscriber::Layer<S> for LogsAndSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.traced(meta) {
            return tracing::subscriber::Interest::always();
        }
        tracing_subscriber::Layer::<S>::register_callsite(&self.logs, meta)
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.traced(meta) || tracing_subscriber::Layer::<S>::enabled(&self.logs, meta, cx)
    }

    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        let logs = tracing_subscriber::Layer::<S>::max_level_hint(&self.logs);
        if self.spans {
            logs.map(|l| l.max(tracing_subscriber::filter::LevelFilter::INFO))
        } else {
            logs
        }
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.logs.on_new_span(attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.logs.on_record(id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.logs.on_enter(id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.logs.on_exit(id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.logs.on_close(id, cx);
    }
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
