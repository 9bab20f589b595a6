//! The test stack in one line: a private nats-server, the gateway with a key for a fresh
//! company, and (for [`Pipeline`]) a fresh database and a worker. A test's set-up is
//!
//! ```ignore
//! let Pipeline { nats, db, gw, company, key, worker } = Pipeline::start().await;
//! ```
//!
//! and the rest of it is the behaviour. Settings go through `start_with`; tests that need
//! another shape (two workers, a worker started later, a cluster) build from the parts in
//! [`crate::nats`], [`crate::db`] and [`crate::pipeline`].

use ingest_gateway::config::ServeArgs;
use persist_worker::config::RunArgs;
use uuid::Uuid;

use crate::db::TestDb;
use crate::nats::NatsServer;
use crate::pipeline::{test_run_args, TestGateway, TestWorker};

/// A nats-server and a gateway holding a key of `company`.
pub struct Edge {
    pub nats: NatsServer,
    pub gw: TestGateway,
    pub company: Uuid,
    pub key: String,
}

impl Edge {
    /// With the gateway's default settings.
    pub async fn start() -> Self {
        Self::start_with(ServeArgs::default()).await
    }

    /// With the given gateway settings.
    pub async fn start_with(serve: ServeArgs) -> Self {
        let nats = NatsServer::start().await;
        let gw = TestGateway::start_with(&nats.url(), serve).await;
        let company = Uuid::new_v4();
        let key = gw.create_key(company).await;
        Edge {
            nats,
            gw,
            company,
            key,
        }
    }
}

/// The whole pipeline: [`Edge`] plus a fresh database and one worker.
pub struct Pipeline {
    pub nats: NatsServer,
    pub db: TestDb,
    pub gw: TestGateway,
    pub company: Uuid,
    pub key: String,
    pub worker: TestWorker,
}

impl Pipeline {
    /// With default gateway settings and [`test_run_args`] for the worker.
    pub async fn start() -> Self {
        Self::start_with(ServeArgs::default(), test_run_args()).await
    }

    /// With the given gateway and worker settings.
    pub async fn start_with(serve: ServeArgs, run: RunArgs) -> Self {
        let Edge {
            nats,
            gw,
            company,
            key,
        } = Edge::start_with(serve).await;
        let db = TestDb::create().await;
        let worker = TestWorker::start_with(&nats.url(), &db.url, run).await;
        Pipeline {
            nats,
            db,
            gw,
            company,
            key,
            worker,
        }
    }
}

/// Waits until every lane's consumer on every partition stream has nothing pending or
/// unacknowledged: the workers have stored (or dead-lettered) everything published.
pub async fn drained(nats_url: &str, within: std::time::Duration) {
    use async_nats::jetstream;
    crate::eventually(within, "the workers to drain the streams", || async {
        let js = jetstream::new(crate::identities::connect(nats_url).await);
        let streams = callcap::partitions::list(&js).await.ok()?;
        if streams.is_empty() {
            return None;
        }
        for found in streams {
            let stream = js.get_stream(found.partition.stream_name()).await.ok()?;
            for lane in callcap::subjects::Lane::ALL {
                let Ok(mut c) = stream
                    .get_consumer::<jetstream::consumer::pull::Config>(lane.consumer_name())
                    .await
                else {
                    // The main lane's consumer must be there (no worker has started
                    // otherwise); the overflow lane may be served by nobody in a test.
                    if lane == callcap::subjects::Lane::Main {
                        return None;
                    }
                    continue;
                };
                let info = c.info().await.ok()?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
}
