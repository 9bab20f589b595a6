//! The test stack: how an end-to-end test starts. A test's set-up is one line,
//!
//! ```ignore
//! let Pipeline { nats, db, gw, company, key, worker, .. } = Pipeline::start().await;
//! ```
//!
//! or, with knobs, the builder:
//!
//! ```ignore
//! let s = Stack::new().erasure_key().companies(2).nats(NatsConfig::IntervalFsync).pipeline().await;
//! ```
//!
//! and the rest of the test is the behaviour. Bind what must live as long as the test,
//! `nats: _nats` at least: `nats: _` or a field left to `..` is dropped at once (a server
//! stopped, the temp dir with the key files deleted). What the builder gives, by its
//! last call:
//!
//! | call | NATS | gateway (in process) | database | worker (in process) |
//! |---|---|---|---|---|
//! | [`Stack::edge`] | yes | yes | | |
//! | [`Stack::stored`] | yes | yes | yes | started by the test ([`Workers`]: in process or as a process) |
//! | [`Stack::pipeline`] | yes | yes | yes | yes |
//! | [`Stack::backend`] | yes | started by the test (a process) | yes | started by the test |
//!
//! NATS is one server ([`NatsServer`], settings by [`Stack::nats`], [`Stack::store_dir`],
//! or one the test prepared, [`Stack::nats_server`]) or a three-node cluster
//! ([`Stack::cluster`]). Every company the stack makes ([`Stack::companies`]) has an API key
//! the gateway already accepts; the erasure key ([`Stack::erasure_key`]) and connector
//! secrets key ([`Stack::connectors`]) are files in the stack's own temp dir, given to the
//! services it starts and to the workers a test starts from it.

use std::path::{Path, PathBuf};

use ingest_gateway::config::ServeArgs;
use persist_worker::config::RunArgs;
use uuid::Uuid;

use crate::cluster::NatsCluster;
use crate::db::TestDb;
use crate::nats::{NatsConfig, NatsServer};
use crate::pipeline::{test_run_args, worker_cli, Process, TestGateway, TestWorker};

/// A company and the API key it posts with.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub company: Uuid,
    pub key: String,
}

impl Tenant {
    /// Its company and (a copy of) its key.
    pub fn pair(&self) -> (Uuid, String) {
        (self.company, self.key.clone())
    }
}

/// What the services connect to: one server or a cluster.
pub trait Broker: Sized {
    /// `NATS_URL` (a cluster: every node).
    fn url(&self) -> String;
}

impl Broker for NatsServer {
    fn url(&self) -> String {
        NatsServer::url(self)
    }
}

impl Broker for NatsCluster {
    fn url(&self) -> String {
        self.seeds()
    }
}

/// How the stack's NATS is made.
enum NatsPlan {
    /// A server with this configuration, its store in `store` (default: its own temp dir).
    Server(NatsConfig, Option<PathBuf>),
    /// A server the test prepared (TLS, another binary); started here if it is not.
    Given(Box<NatsServer>),
    /// Three clustered nodes; `cuttable`: every route through a proxy.
    Cluster { cuttable: bool },
}

/// Starting a [`Broker`] from the builder's plan.
pub trait StartBroker: Broker {
    #[allow(async_fn_in_trait)]
    async fn start_from(plan: NatsPlanHandle) -> Self;
}

/// The builder's NATS plan, opaque outside this module.
pub struct NatsPlanHandle(NatsPlan);

impl StartBroker for NatsServer {
    async fn start_from(plan: NatsPlanHandle) -> Self {
        match plan.0 {
            NatsPlan::Server(config, store) => {
                NatsServer::start_with(config, store.as_deref()).await
            }
            NatsPlan::Given(server) => {
                let mut server = *server;
                if !server.is_running() {
                    server.start_again().await;
                }
                server
            }
            NatsPlan::Cluster { .. } => unreachable!("a cluster plan makes a NatsCluster stack"),
        }
    }
}

impl StartBroker for NatsCluster {
    async fn start_from(plan: NatsPlanHandle) -> Self {
        match plan.0 {
            NatsPlan::Cluster { cuttable: false } => NatsCluster::start().await,
            NatsPlan::Cluster { cuttable: true } => NatsCluster::start_with_cuttable_routes().await,
            _ => unreachable!("a single-server plan makes a NatsServer stack"),
        }
    }
}

type GatewayEdit = Box<dyn FnOnce(&mut ingest_gateway::config::Cli)>;
type WorkerEdit = std::sync::Arc<dyn Fn(&mut persist_worker::config::Cli) + Send + Sync>;

/// The stack's builder; `N` is its NATS ([`NatsServer`] unless [`Stack::cluster`]).
pub struct Stack<N = NatsServer> {
    nats: NatsPlan,
    serve: ServeArgs,
    gateway_edit: Option<GatewayEdit>,
    run: RunArgs,
    worker_edit: Option<WorkerEdit>,
    companies: usize,
    erasure_key: bool,
    connectors: bool,
    broker: std::marker::PhantomData<N>,
}

impl Stack<NatsServer> {
    /// One strict-fsync server, default gateway settings, [`test_run_args`] for the worker,
    /// one company.
    pub fn new() -> Self {
        Stack {
            nats: NatsPlan::Server(NatsConfig::Strict, None),
            serve: ServeArgs::default(),
            gateway_edit: None,
            run: test_run_args(),
            worker_edit: None,
            companies: 1,
            erasure_key: false,
            connectors: false,
            broker: std::marker::PhantomData,
        }
    }

    /// The server's configuration (`IntervalFsync`: the broker's default fsync).
    pub fn nats(mut self, config: NatsConfig) -> Self {
        let store = match self.nats {
            NatsPlan::Server(_, store) => store,
            _ => None,
        };
        self.nats = NatsPlan::Server(config, store);
        self
    }

    /// JetStream's store in `dir` (a power-cut filesystem, a directory to look into).
    pub fn store_dir(mut self, dir: &Path) -> Self {
        let config = match self.nats {
            NatsPlan::Server(config, _) => config,
            _ => NatsConfig::Strict,
        };
        self.nats = NatsPlan::Server(config, Some(dir.to_owned()));
        self
    }

    /// A server the test prepared ([`NatsServer::prepare`]: TLS, another version).
    pub fn nats_server(mut self, server: NatsServer) -> Self {
        self.nats = NatsPlan::Given(Box::new(server));
        self
    }

    /// A three-node cluster instead (`cuttable`: every route through a proxy, so that a
    /// node can be cut off while its clients still reach it).
    pub fn cluster(self, cuttable: bool) -> Stack<NatsCluster> {
        Stack {
            nats: NatsPlan::Cluster { cuttable },
            serve: self.serve,
            gateway_edit: self.gateway_edit,
            run: self.run,
            worker_edit: self.worker_edit,
            companies: self.companies,
            erasure_key: self.erasure_key,
            connectors: self.connectors,
            broker: std::marker::PhantomData,
        }
    }
}

impl Default for Stack<NatsServer> {
    fn default() -> Self {
        Self::new()
    }
}

/// The parts every shape holds beside its services.
struct Common<N> {
    nats: N,
    tenants: Vec<Tenant>,
    dir: tempfile::TempDir,
    erasure_key: Option<PathBuf>,
    secrets_key: Option<PathBuf>,
}

impl<N: StartBroker> Stack<N> {
    /// The gateway's `serve` settings (the listen address is ignored: a free port).
    pub fn serve(mut self, serve: ServeArgs) -> Self {
        self.serve = serve;
        self
    }

    /// Edits the gateway's whole command line (NATS identity, stream settings) after the
    /// stack's own settings are in it.
    pub fn gateway_cli(
        mut self,
        edit: impl FnOnce(&mut ingest_gateway::config::Cli) + 'static,
    ) -> Self {
        self.gateway_edit = Some(Box::new(edit));
        self
    }

    /// The worker's `run` settings (default: [`test_run_args`]).
    pub fn run(mut self, run: RunArgs) -> Self {
        self.run = run;
        self
    }

    /// Edits the workers' whole command line (retention, archive, identity) after the
    /// stack's own settings are in it; applies to every worker made from the stack.
    pub fn worker_cli(
        mut self,
        edit: impl Fn(&mut persist_worker::config::Cli) + Send + Sync + 'static,
    ) -> Self {
        self.worker_edit = Some(std::sync::Arc::new(edit));
        self
    }

    /// `n` companies, each with a key: the first is `company`/`key`, the rest `others`.
    /// `0`: no key is made, so nothing touches the key bucket before the test does (the
    /// stack's `company` is then a fresh id without a key, and `key` is empty).
    pub fn companies(mut self, n: usize) -> Self {
        self.companies = n;
        self
    }

    /// An erasure key file (`ERASURE_KEY_FILE`) given to every worker.
    pub fn erasure_key(mut self) -> Self {
        self.erasure_key = true;
        self
    }

    /// A connector secrets key file (`CONNECTOR_SECRETS_KEY_FILE`) given to the gateway.
    pub fn connectors(mut self) -> Self {
        self.connectors = true;
        self
    }

    /// NATS, the key files and the companies' keys (made through `keys create`).
    async fn common(
        self,
    ) -> (
        Common<N>,
        ServeArgs,
        Option<GatewayEdit>,
        Option<WorkerEdit>,
        RunArgs,
    ) {
        let dir = tempfile::tempdir().expect("the stack's temp dir");
        let erasure_key = self.erasure_key.then(|| write_erasure_key(dir.path()));
        let secrets_key = self.connectors.then(|| {
            let path = dir.path().join("connector-secrets.key");
            let key =
                ingest_gateway::connectors::seal::SecretsKey::generate().expect("a secrets key");
            std::fs::write(&path, key).expect("writing the secrets key");
            path
        });
        let mut serve = self.serve;
        if let Some(path) = &secrets_key {
            serve.connector_secrets_key_file = Some(path.clone());
        }
        let nats = N::start_from(NatsPlanHandle(self.nats)).await;
        let mut tenants = Vec::new();
        if self.companies == 0 {
            tenants.push(Tenant {
                company: Uuid::new_v4(),
                key: String::new(),
            });
        }
        for _ in 0..self.companies {
            let company = Uuid::new_v4();
            let key = crate::pipeline::create_key(&nats.url(), company).await;
            tenants.push(Tenant { company, key });
        }
        let common = Common {
            nats,
            tenants,
            dir,
            erasure_key,
            secrets_key,
        };
        (common, serve, self.gateway_edit, self.worker_edit, self.run)
    }

    /// NATS and the gateway.
    pub async fn edge(self) -> Edge<N> {
        let (c, serve, gateway_edit, _, _) = self.common().await;
        let gw = start_gateway(&c, serve, gateway_edit).await;
        let mut tenants = c.tenants.into_iter();
        let first = tenants.next().expect("one company");
        Edge {
            nats: c.nats,
            gw,
            company: first.company,
            key: first.key,
            others: tenants.collect(),
            dir: c.dir,
            secrets_key: c.secrets_key,
        }
    }

    /// NATS, the gateway and a fresh database; the test starts the workers
    /// ([`Stored::workers`]).
    pub async fn stored(self) -> Stored<N> {
        let (c, serve, gateway_edit, worker_edit, run) = self.common().await;
        let gw = start_gateway(&c, serve, gateway_edit).await;
        let db = TestDb::create().await;
        let mut tenants = c.tenants.into_iter();
        let first = tenants.next().expect("one company");
        Stored {
            gw,
            company: first.company,
            key: first.key,
            others: tenants.collect(),
            workers: Workers {
                nats_url: c.nats.url(),
                db_url: db.url.clone(),
                run,
                erasure_key: c.erasure_key.clone(),
                edit: worker_edit,
            },
            nats: c.nats,
            db,
            dir: c.dir,
            erasure_key: c.erasure_key,
            secrets_key: c.secrets_key,
        }
    }

    /// NATS, the gateway, a fresh database and one worker.
    pub async fn pipeline(self) -> Pipeline<N> {
        let s = self.stored().await;
        let worker = s.workers.start().await;
        Pipeline {
            nats: s.nats,
            db: s.db,
            gw: s.gw,
            company: s.company,
            key: s.key,
            others: s.others,
            worker,
            dir: s.dir,
            erasure_key: s.erasure_key,
            secrets_key: s.secrets_key,
            workers: s.workers,
        }
    }

    /// NATS and a fresh database, no service: for tests that run the gateway as a process
    /// (its own metrics, signals, TLS) or no gateway at all. The companies' keys exist.
    pub async fn backend(self) -> Backend<N> {
        let (c, _, _, worker_edit, run) = self.common().await;
        let db = TestDb::create().await;
        let mut tenants = c.tenants.into_iter();
        let first = tenants.next().expect("one company");
        Backend {
            workers: Workers {
                nats_url: c.nats.url(),
                db_url: db.url.clone(),
                run,
                erasure_key: c.erasure_key.clone(),
                edit: worker_edit,
            },
            nats: c.nats,
            db,
            company: first.company,
            key: first.key,
            others: tenants.collect(),
            dir: c.dir,
            erasure_key: c.erasure_key,
            secrets_key: c.secrets_key,
        }
    }
}

async fn start_gateway<N: Broker>(
    c: &Common<N>,
    serve: ServeArgs,
    edit: Option<GatewayEdit>,
) -> TestGateway {
    let mut cli = crate::pipeline::gateway_cli(&c.nats.url(), serve);
    if let Some(edit) = edit {
        edit(&mut cli);
    }
    let gw = TestGateway::start_cli(cli).await;
    for t in c.tenants.iter().filter(|t| !t.key.is_empty()) {
        gw.wait_for_key(&t.key).await;
    }
    gw
}

/// A fresh erasure key (32 random bytes, base64) in `dir`.
pub fn write_erasure_key(dir: &Path) -> PathBuf {
    use base64::Engine as _;
    std::fs::create_dir_all(dir).expect("the key's directory");
    let path = dir.join("erasure.key");
    let bytes: [u8; 32] = rand::random();
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    )
    .expect("writing the erasure key");
    path
}

/// NATS and the gateway, with the stack's companies.
pub struct Edge<N = NatsServer> {
    pub nats: N,
    pub gw: TestGateway,
    pub company: Uuid,
    pub key: String,
    /// The companies after the first ([`Stack::companies`]).
    pub others: Vec<Tenant>,
    pub dir: tempfile::TempDir,
    /// `CONNECTOR_SECRETS_KEY_FILE` ([`Stack::connectors`]).
    pub secrets_key: Option<PathBuf>,
}

impl Edge {
    /// With the gateway's default settings.
    pub async fn start() -> Self {
        Stack::new().edge().await
    }

    /// With the given gateway settings.
    pub async fn start_with(serve: ServeArgs) -> Self {
        Stack::new().serve(serve).edge().await
    }
}

/// Makes the stack's workers: its NATS, database, run settings, erasure key and the
/// builder's [`Stack::worker_cli`] edit, for as many workers as a test starts.
#[derive(Clone)]
pub struct Workers {
    nats_url: String,
    db_url: String,
    run: RunArgs,
    erasure_key: Option<PathBuf>,
    edit: Option<WorkerEdit>,
}

impl Workers {
    /// The command line the stack's workers run with.
    pub fn cli(&self) -> persist_worker::config::Cli {
        let mut cli = worker_cli(&self.nats_url, &self.db_url, self.run.clone());
        cli.privacy.erasure_key_file = self.erasure_key.clone();
        if let Some(edit) = &self.edit {
            edit(&mut cli);
        }
        cli
    }

    /// A worker in this process.
    pub async fn start(&self) -> TestWorker {
        TestWorker::start_cli(self.cli()).await
    }

    /// A worker in this process, its command line edited further by `edit` (another
    /// identity, no erasure key, retention).
    pub async fn start_edited(
        &self,
        edit: impl FnOnce(&mut persist_worker::config::Cli),
    ) -> TestWorker {
        let mut cli = self.cli();
        edit(&mut cli);
        TestWorker::start_cli(cli).await
    }

    /// The environment a worker process of the stack gets beyond NATS and the database.
    fn env<'a>(&self, extra: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        let mut env: Vec<(&str, String)> = Vec::new();
        if let Some(key) = &self.erasure_key {
            env.push(("ERASURE_KEY_FILE", key.display().to_string()));
        }
        env.extend(extra.iter().cloned());
        env
    }

    /// The worker binary `bin` as a process (kill -9, signals, its own metrics), ops on
    /// `port`, with the stack's erasure key and `extra` environment.
    pub fn process(&self, bin: &str, port: u16, extra: &[(&str, String)]) -> Process {
        Process::worker(bin, &self.nats_url, &self.db_url, port, &self.env(extra))
    }

    /// As [`Workers::process`], its output appended to `log`.
    pub fn process_logged(
        &self,
        bin: &str,
        port: u16,
        extra: &[(&str, String)],
        log: &Path,
    ) -> Process {
        Process::worker_logged(
            bin,
            &self.nats_url,
            &self.db_url,
            port,
            &self.env(extra),
            log,
        )
    }
}

/// NATS, the gateway and a database; the workers are the test's ([`Workers`]).
pub struct Stored<N = NatsServer> {
    pub nats: N,
    pub db: TestDb,
    pub gw: TestGateway,
    pub company: Uuid,
    pub key: String,
    pub others: Vec<Tenant>,
    /// The stack's temp dir (key files); bind it while they are needed.
    pub dir: tempfile::TempDir,
    /// `ERASURE_KEY_FILE` ([`Stack::erasure_key`]).
    pub erasure_key: Option<PathBuf>,
    pub secrets_key: Option<PathBuf>,
    pub workers: Workers,
}

/// The whole pipeline: NATS, the gateway, a fresh database and one worker.
pub struct Pipeline<N = NatsServer> {
    pub nats: N,
    pub db: TestDb,
    pub gw: TestGateway,
    pub company: Uuid,
    pub key: String,
    pub others: Vec<Tenant>,
    pub worker: TestWorker,
    pub dir: tempfile::TempDir,
    pub erasure_key: Option<PathBuf>,
    pub secrets_key: Option<PathBuf>,
    /// For more workers like `worker`.
    pub workers: Workers,
}

impl Pipeline {
    /// With default gateway settings and [`test_run_args`] for the worker.
    pub async fn start() -> Self {
        Stack::new().pipeline().await
    }

    /// With the given gateway and worker settings.
    pub async fn start_with(serve: ServeArgs, run: RunArgs) -> Self {
        Stack::new().serve(serve).run(run).pipeline().await
    }
}

/// NATS and a database; the gateway and workers are the test's (processes, usually).
pub struct Backend<N = NatsServer> {
    pub nats: N,
    pub db: TestDb,
    pub company: Uuid,
    pub key: String,
    pub others: Vec<Tenant>,
    pub dir: tempfile::TempDir,
    pub erasure_key: Option<PathBuf>,
    pub secrets_key: Option<PathBuf>,
    pub workers: Workers,
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

impl<N: Broker> Backend<N> {
    /// The gateway binary `bin` as a process (its Prometheus recorder is global, so
    /// `/metrics` needs a process of its own; signals; TLS), with `env` added, once
    /// ready; with its base URL.
    pub async fn gateway_process(&self, bin: &str, env: &[(&str, String)]) -> (Process, String) {
        Process::gateway_ready(bin, &self.nats.url(), env).await
    }

    /// As [`Backend::gateway_process`], its log written to `log`.
    pub async fn gateway_process_logged(
        &self,
        bin: &str,
        env: &[(&str, String)],
        log: &Path,
    ) -> (Process, String) {
        Process::gateway_ready_logged(bin, &self.nats.url(), env, Some(log)).await
    }
}
