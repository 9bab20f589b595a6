//! The state every handler shares: where records go, the API keys, the limits and the
//! budgets. Imports no handler and no route: handlers, extractors and pages import it.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use crate::auth::KeyCache;
use crate::budget::MemoryBudget;
use crate::config::ServeArgs;
use crate::connectors::ConnectorCache;
use crate::lanes::Lanes;
use crate::publish::Publisher;
use crate::ratelimit::RateLimiter;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// Where accepted records go.
    pub publisher: Arc<dyn Publisher>,
    /// API keys, kept current by the KV watch.
    pub keys: Arc<KeyCache>,
    /// Provider connectors, kept current by the KV watch.
    pub connectors: Arc<ConnectorCache>,
    /// Limits and timeouts.
    pub serve: ServeArgs,
    /// Budget of publishes awaiting an ack; exhausted means 503.
    pub inflight: Arc<Semaphore>,
    /// Memory of request bodies being read, parsed and published; exhausted means 503.
    pub bodies: Arc<MemoryBudget>,
    /// Memory of provider callbacks' bodies, shared by source address (a callback's body
    /// is read before its signature is checked): apart from [`Shared::bodies`].
    pub callback_bodies: Arc<MemoryBudget>,
    /// Which lane each company's records take.
    pub lanes: Lanes,
    /// Per-key rate limit, when configured.
    pub rate_limiter: Option<RateLimiter>,
    /// Renders `/metrics`; `None` where no recorder is installed (library tests).
    pub metrics: Option<PrometheusHandle>,
    /// The JetStream fsync mode the server reported at start (`always`, …).
    pub fsync_mode: String,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Builds the state from its parts and the serve settings, with no provider
    /// connectors (handler tests).
    pub fn new(
        publisher: Arc<dyn Publisher>,
        keys: Arc<KeyCache>,
        serve: ServeArgs,
        metrics: Option<PrometheusHandle>,
        fsync_mode: String,
    ) -> Self {
        let connectors = Arc::new(ConnectorCache::new(None));
        crate::kv::Mirror::mark_loaded(connectors.as_ref());
        Self::with_connectors(publisher, keys, connectors, serve, metrics, fsync_mode)
    }

    /// Builds the state from its parts, provider connectors included.
    pub fn with_connectors(
        publisher: Arc<dyn Publisher>,
        keys: Arc<KeyCache>,
        connectors: Arc<ConnectorCache>,
        serve: ServeArgs,
        metrics: Option<PrometheusHandle>,
        fsync_mode: String,
    ) -> Self {
        let rate_limiter = (serve.rate_limit_per_sec > 0.0)
            .then(|| RateLimiter::new(serve.rate_limit_per_sec, serve.rate_limit_burst));
        // Resolved once: the default reads the cgroup's and the machine's memory.
        let body_memory = serve.body_memory_bytes();
        let callback_memory = serve.callback_memory_bytes(body_memory);
        let api_memory = body_memory - callback_memory;
        AppState(Arc::new(Shared {
            publisher,
            keys,
            connectors,
            inflight: Arc::new(Semaphore::new(serve.max_in_flight_publishes as usize)),
            bodies: MemoryBudget::new(api_memory, serve.body_memory_per_key_bytes(api_memory)),
            callback_bodies: MemoryBudget::new(callback_memory, callback_memory / 8),
            lanes: Lanes::new(
                serve.overflow_rate,
                serve.overflow_burst,
                std::time::Duration::from_secs(serve.overflow_sticky_secs),
                serve.overflow_companies.iter().copied().collect(),
            ),
            rate_limiter,
            metrics,
            serve,
            fsync_mode,
        }))
    }
}
