//! Traces: one call followed from the dialer's request to its row, across NATS.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; then spans go by OTLP over HTTP (protobuf) with the SDK's batch processor, and the
//! standard `OTEL_*` variables apply: `OTEL_SERVICE_NAME` (default: the binary's name),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_EXPORTER_OTLP_COMPRESSION` (gzip), `OTEL_BSP_*`. `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` keep them off; a protocol other than `http/protobuf` is
//! refused at start, never silently ignored.
//!
//! The W3C trace context travels as the `traceparent` and `tracestate` headers: from the
//! dialer's HTTP request, on each record's NATS message, to the worker. With traces off
//! the gateway still forwards a dialer's valid `traceparent` (checked, bounded), so both
//! binaries' log lines carry the dialer's trace id; nothing else is done per request.
//! [`span!`](crate::otel_span) makes a span only when traces are on: the hot path pays a
//! relaxed atomic load when they are off.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header carrying the trace id, the parent span id and the sampled flag.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendors' trace state.
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` carried on (the W3C limit a propagator must keep).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// What `--help` says of the standard variables the trace exporter reads (they are the
/// OpenTelemetry SDK's, not flags).
pub const ENV_HELP: &str = "Traces (OpenTelemetry, off unless an endpoint is set): \
OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://collector:4318; or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), \
OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf only), \
OTEL_EXPORTER_OTLP_COMPRESSION (gzip), OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_SERVICE_NAME \
(default: the binary's name), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and \
OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on), OTEL_BSP_* (the batch exporter), \
OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none (off). A dialer's W3C traceparent is \
continued and carried on the NATS message; README, \"Following one call\".";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured and the layer installed).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An INFO span when traces are on; [`tracing::Span::none`] otherwise, so that the hot
/// path builds nothing with traces off.
#[macro_export]
macro_rules! otel_span {
    ($($arg:tt)*) => {
        if $crate::traces::enabled() {
            ::tracing::info_span!($($arg)*)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// A W3C trace context as received or to send: a checked `traceparent` and, when one
/// came with it, a bounded `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// Reads a `traceparent` (W3C Trace Context level 1) and its `tracestate`. `None` for
    /// anything malformed: a version of `ff`, upper-case hex, an all-zero trace or parent
    /// id, wrong lengths. A later version's extra fields are dropped (the spec's rule).
    /// A `tracestate` over 512 bytes or with control characters is dropped, the
    /// `traceparent` kept.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim();
        if tp.len() < 55 || !tp.is_char_boundary(55) {
            return None;
        }
        let (head, rest) = tp.split_at(55);
        let version = &head[0..2];
        if !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if (version == "00" && !rest.is_empty()) || (!rest.is_empty() && !rest.starts_with('-')) {
            return None;
        }
        let b = head.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (trace, parent, flags) = (&head[3..35], &head[36..52], &head[53..55]);
        if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
            return None;
        }
        if trace.bytes().all(|c| c == b'0') || parent.bytes().all(|c| c == b'0') {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE_BYTES
                    && s.bytes().all(|c| (0x20..0x7f).contains(&c))
            })
            .map(str::to_owned);
        Some(TraceContext {
            // Always written as version 00: the fields this build understands.
            traceparent: format!("00-{trace}-{parent}-{flags}"),
            tracestate,
        })
    }

    /// The context a set of headers carries, read with `get`.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        Self::parse(get(TRACEPARENT)?, get(TRACESTATE))
    }

    /// The context a NATS message carries.
    pub fn from_nats(headers: Option<&async_nats::HeaderMap>) -> Option<Self> {
        let headers = headers?;
        Self::from_headers(|name| headers.get(name).map(|v| v.as_str()))
    }

    /// Writes the context into NATS message headers.
    pub fn to_nats(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.as_str());
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.as_str());
        }
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lower-case hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id: 16 lower-case hex digits.
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    fn span_context(&self) -> SpanContext {
        let trace = TraceId::from_hex(self.trace_id()).unwrap_or(TraceId::INVALID);
        let span = SpanId::from_hex(self.parent_id()).unwrap_or(SpanId::INVALID);
        let flags = u8::from_str_radix(&self.traceparent[53..55], 16).unwrap_or(0);
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        SpanContext::new(
            trace,
            span,
            TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
            true,
            state,
        )
    }

    fn of_span_context(cx: &SpanContext) -> Option<Self> {
        if !cx.is_valid() {
            return None;
        }
        let state = cx.trace_state().header();
        Some(TraceContext {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                cx.trace_id(),
                cx.span_id(),
                cx.trace_flags().to_u8()
            ),
            tracestate: (!state.is_empty()).then_some(state),
        })
    }
}

/// The context to carry for `span`: its own when traces are on (so the next hop is its
/// child), else `fallback` (the dialer's, forwarded as it came).
pub fn carried(span: &tracing::Span, fallback: Option<&TraceContext>) -> Option<TraceContext> {
    if enabled() {
        TraceContext::of_span_context(&span.context().span().span_context().clone())
            .or_else(|| fallback.cloned())
    } else {
        fallback.cloned()
    }
}

/// Makes `span` continue `parent` (the dialer's or a message's), and records the trace id
/// in the span's `trace_id` field (declared `tracing::field::Empty`) so that every log
/// line inside it names the trace. With traces on and no parent, the span starts a trace
/// and that trace's id is recorded.
pub fn adopt(span: &tracing::Span, parent: Option<&TraceContext>) {
    if enabled() {
        if let Some(parent) = parent {
            let cx = opentelemetry::Context::new().with_remote_span_context(parent.span_context());
            let _ = span.set_parent(cx);
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.record("trace_id", tracing::field::display(sc.trace_id()));
            return;
        }
    }
    if let Some(parent) = parent {
        span.record("trace_id", parent.trace_id());
    }
}

/// Links `span` to `to` (a batch to the records in it, a record's write to its batch).
pub fn link(span: &tracing::Span, to: &TraceContext) {
    if enabled() {
        span.add_link(to.span_context());
    }
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0} is not supported: this build sends OTLP over HTTP with protobuf (http/protobuf, the collector's port 4318)")]
    Protocol(String),
    #[error("the OTLP exporter could not be built: {0}")]
    Exporter(String),
}

/// What keeps traces flowing; dropping it sends what is still queued (bounded by
/// `OTEL_EXPORTER_OTLP_TIMEOUT`) and stops the exporter.
#[must_use = "dropping it stops the traces"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// No traces.
    pub fn off() -> Self {
        Traces { provider: None }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: traces not all sent at exit: {e}");
            }
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for traces.
pub fn configured() -> bool {
    let endpoint =
        env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    endpoint && !disabled
}

/// The tracer provider the environment asks for, or `None` when it asks for none.
/// `service` names the binary unless `OTEL_SERVICE_NAME` or a `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` says otherwise.
///
/// # Errors
/// A protocol other than `http/protobuf`, or an exporter that cannot be built.
pub(crate) fn provider(service: &'static str) -> Result<Option<SdkTracerProvider>, SetupError> {
    if !configured() {
        return Ok(None);
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(p) = std::env::var(var) {
            if p.trim() != "http/protobuf" {
                return Err(SetupError::Protocol(p));
            }
            break;
        }
    }
    // reqwest is built without a crypto provider of its own: it uses the process's, ring
    // (what the gateway's TLS uses). Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| SetupError::Exporter(e.to_string()))?;
    let named = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
            a.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !named {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some(provider))
}

/// The `tracing` layer for `provider`.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
    service: &'static str,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        // A span's parent is the tracing span it was made in; nothing here reads
        // OpenTelemetry's own thread-local context, so it is not kept up on every enter.
        .with_context_activation(false)
        .with_error_records_to_exceptions(true)
}

/// Keeps `provider` for [`Traces`]' drop, and marks traces on when there is one.
pub(crate) fn keep(provider: Option<SdkTracerProvider>) -> Traces {
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Traces { provider }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_is_read_and_a_malformed_one_is_not() {
        let tc = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(tc.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.parent_id(), "00f067aa0ba902b7");
        assert_eq!(tc.tracestate(), Some("congo=t61rcWkgMzE"));
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceContext::parse(b, None), None, "{b:?}");
        }
        // A later version: its extra fields are dropped, what is known is kept.
        let later = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds",
            None,
        )
        .expect("a later version is read");
        assert_eq!(later.traceparent(), GOOD);
        // An unbounded or binary tracestate is dropped, the traceparent kept.
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(
            TraceContext::parse(GOOD, Some(&long)).unwrap().tracestate(),
            None
        );
        assert_eq!(
            TraceContext::parse(GOOD, Some("a=b\nc"))
                .unwrap()
                .tracestate(),
            None
        );
    }

    #[test]
    fn a_context_goes_into_nats_headers_and_comes_back_out() {
        let tc = TraceContext::parse(GOOD, Some("k=v")).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        tc.to_nats(&mut headers);
        assert_eq!(TraceContext::from_nats(Some(&headers)), Some(tc.clone()));
        let sc = tc.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            TraceContext::of_span_context(&sc).unwrap().traceparent(),
            GOOD
        );
    }

    #[test]
    fn with_traces_off_the_dialers_context_is_what_is_carried() {
        let tc = TraceContext::parse(GOOD, None).unwrap();
        assert!(!enabled());
        assert_eq!(carried(&tracing::Span::none(), Some(&tc)), Some(tc));
        assert_eq!(carried(&tracing::Span::none(), None), None);
    }
}
