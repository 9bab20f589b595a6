//! Serving connections: accept loop, connection cap, header/idle timeouts, optional TLS,
//! graceful drain.
//!
//! axum's own `serve` has none of these, so this drives hyper-util directly:
//! - at most `MAX_CONNECTIONS` connections are open; one more is closed at once;
//! - a new connection that has not sent a complete request head within
//!   `HEADER_TIMEOUT_MS` (a silent or dribbling client, a stalled TLS handshake) is closed,
//!   and so is one with no request in progress for `IDLE_TIMEOUT_SECS` after its last
//!   answer — the same rule for HTTP/1 keep-alive and HTTP/2, whose idle connections hyper
//!   never closes by itself;
//! - on shutdown the listener closes first, then every connection is told to finish
//!   (HTTP/2 GOAWAY, HTTP/1 close after the response) and in-flight requests get
//!   `SHUTDOWN_GRACE_SECS` (each has been published or will answer 503; none is lost).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app::{app, AppState, MAX_HEADERS};

/// File descriptors kept for everything but client connections (NATS, logs, files).
const RESERVED_FDS: u64 = 128;

/// hyper's own head limits, above the router's ([`crate::app::MAX_HEADER_BYTES`] and
/// [`MAX_HEADERS`]) so that the router answers those with the JSON body.
const HYPER_MAX_BUF: usize = 256 * 1024;

/// Registers the `# HELP` text of the connection metrics.
pub fn describe_metrics() {
    metrics::describe_gauge!("gateway_connections_open", "Client connections open now");
    metrics::describe_counter!(
        "gateway_connections_refused_total",
        "Connections closed on arrival because MAX_CONNECTIONS were open"
    );
    metrics::describe_counter!(
        "gateway_connections_timed_out_total",
        "Connections closed for sending no complete request in time or staying idle"
    );
    metrics::counter!("gateway_connections_refused_total").absolute(0);
    metrics::counter!("gateway_connections_timed_out_total").absolute(0);
    metrics::gauge!("gateway_connections_open").set(0.0);
}

/// The connection cap actually used: `wanted`, or less when the process may not open that
/// many files. The soft open-file limit is first raised to the hard one (containers often
/// start with 1,024 soft and far more hard).
pub fn effective_max_connections(wanted: u32) -> u32 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    match limit.current {
        Some(files) => {
            let room = files.saturating_sub(RESERVED_FDS).max(1);
            u32::try_from(room.min(u64::from(wanted))).unwrap_or(wanted)
        }
        None => wanted,
    }
}

/// What one connection has been doing, for the idle timeout.
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last request's start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    served_one: AtomicBool,
}

impl Activity {
    /// A connection accepted at `started` (before any TLS handshake: the header timeout
    /// counts from there).
    fn new(started: Instant) -> Self {
        Activity {
            started,
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served_one: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection becomes closable if nothing happens before; `None` while a
    /// request is in progress.
    fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let wait = if self.served_one.load(Ordering::Acquire) {
            idle_timeout
        } else {
            header_timeout
        };
        Some(self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + wait)
    }
}

/// Marks a request in progress until dropped (the response has been produced).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.served_one.store(true, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `shutdown`
/// resolves, then drains.
///
/// # Errors
/// Never in practice: accept errors (e.g. out of file descriptors) are logged and retried.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    tls: Option<TlsAcceptor>,
    shutdown: callcap::shutdown::Shutdown,
) -> std::io::Result<()> {
    let header_timeout = state.serve.header_timeout();
    let idle_timeout = Duration::from_secs(state.serve.idle_timeout_secs);
    let grace = Duration::from_secs(state.serve.shutdown_grace_secs);
    let max_connections = effective_max_connections(state.serve.max_connections);
    if max_connections < state.serve.max_connections {
        tracing::warn!(
            max_connections,
            wanted = state.serve.max_connections,
            "open-file limit is lower than MAX_CONNECTIONS; capping connections to fit"
        );
    }
    let router = app(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own header timeout also runs while a kept-alive connection waits for its
        // next request, which would close idle keep-alive connections after
        // HEADER_TIMEOUT_MS — under a load balancer's 60 s idle timeout, a source of 502s.
        // The connection watchdog below applies the header timeout to the first request
        // and the idle timeout after it.
        .header_read_timeout(None)
        .max_buf_size(HYPER_MAX_BUF)
        .max_headers(MAX_HEADERS * 2)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Pings find peers that vanished without closing (the idle rule finds the rest).
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size(u32::try_from(HYPER_MAX_BUF).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let closing = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shutdown = shutdown.triggered_owned();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    metrics::counter!("gateway_connections_refused_total").increment(1);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    builder: Arc::clone(&builder),
                    router: router.clone(),
                    closing: closing.clone(),
                    header_timeout,
                    idle_timeout,
                    peer,
                };
                let tls = tls.clone();
                let accepted_at = Instant::now();
                tracker.spawn(async move {
                    metrics::gauge!("gateway_connections_open").increment(1.0);
                    match tls {
                        None => conn.serve(stream, accepted_at).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => conn.serve(tls_stream, accepted_at).await,
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => {
                                    metrics::counter!("gateway_connections_timed_out_total").increment(1);
                                }
                            }
                        }
                    }
                    metrics::gauge!("gateway_connections_open").decrement(1.0);
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracker.close();
    tracing::info!(
        connections = tracker.len(),
        "shutting down: draining in-flight requests"
    );
    closing.cancel();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    Ok(())
}

/// One accepted connection and what it needs.
struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: axum::Router,
    closing: CancellationToken,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The connecting peer, given to handlers as axum's `ConnectInfo` (the provider
    /// callbacks' source-network allow-list).
    peer: std::net::SocketAddr,
}

impl Conn {
    async fn serve<S>(self, stream: S, accepted_at: Instant)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let activity = Arc::new(Activity::new(accepted_at));
        let router = self.router;
        let tracked = Arc::clone(&activity);
        let peer = axum::extract::ConnectInfo(self.peer);
        let service = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let guard = InFlight::begin(&tracked);
            req.extensions_mut().insert(peer);
            let call = router.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let response = call.await;
                drop(guard);
                response
            }
        });
        let conn = self
            .builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(conn);
        // Once told to close, a peer that does not cooperate (an HTTP/2 client that never
        // answers the GOAWAY's ping) is dropped after this long.
        let mut hard_close: Option<tokio::time::Instant> = None;
        loop {
            let told_to_close = hard_close.is_some();
            let deadline = activity.deadline(self.header_timeout, self.idle_timeout);
            let wake = deadline.unwrap_or_else(|| Instant::now() + self.idle_timeout);
            let drop_at =
                hard_close.unwrap_or_else(|| tokio::time::Instant::now() + self.idle_timeout);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(wake.into()), if !told_to_close => {
                    let still_idle = activity
                        .deadline(self.header_timeout, self.idle_timeout)
                        .is_some_and(|d| d <= Instant::now());
                    if still_idle {
                        metrics::counter!("gateway_connections_timed_out_total").increment(1);
                        if !activity.served_one.load(Ordering::Acquire) {
                            // No whole request head within HEADER_TIMEOUT_MS of connecting:
                            // closed now. A graceful shutdown would let hyper go on reading a
                            // head that arrives a byte at a time, and close only after a
                            // second timeout (11-16 s with the defaults).
                            return;
                        }
                        conn.as_mut().graceful_shutdown();
                        hard_close = Some(tokio::time::Instant::now() + self.header_timeout);
                    }
                }
                () = self.closing.cancelled(), if !told_to_close => {
                    conn.as_mut().graceful_shutdown();
                    // In-flight requests get the shutdown grace (the caller's timeout).
                    hard_close = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
                () = tokio::time::sleep_until(drop_at), if told_to_close => {
                    if activity.in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    hard_close = Some(tokio::time::Instant::now() + self.header_timeout);
                }
            }
        }
    }
}
