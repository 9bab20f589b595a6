//! The services under test: in-process (library `run` functions, for most tests) or as
//! spawned binaries (for kill -9 and for the Prometheus recorder, which is global).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callcap::config::{Role, StreamArgs};
use callcap::shutdown::Shutdown;
use callcap::telemetry::LogFormat;
use futures::StreamExt;
use ingest_gateway::app::AppState;
use ingest_gateway::config::ServeArgs;
use persist_worker::config::{DbArgs, RunArgs};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub state: AppState,
    pub nats_url: String,
    pub http: reqwest::Client,
    cancel: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// The gateway's CLI for a test NATS.
pub fn gateway_cli(nats_url: &str, serve: ServeArgs) -> ingest_gateway::config::Cli {
    ingest_gateway::config::Cli {
        command: None,
        nats: crate::identities::nats_args(nats_url, Role::Gateway),
        stream: StreamArgs::default(),
        serve,
        log_format: LogFormat::Text,
    }
}

impl TestGateway {
    /// Starts with default settings.
    pub async fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, ServeArgs::default()).await
    }

    /// Starts with the given settings (the listen address is ignored: a free port is used).
    pub async fn start_with(nats_url: &str, serve: ServeArgs) -> Self {
        Self::start_cli(gateway_cli(nats_url, serve)).await
    }

    /// Starts from a full command line (e.g. `STREAM_REPLICAS=3` on a cluster).
    pub async fn start_cli(cli: ingest_gateway::config::Cli) -> Self {
        callcap::telemetry::init_for_tests();
        let nats_url = cli.nats.nats_url.clone();
        let state = ingest_gateway::connect(&cli, None)
            .await
            .expect("gateway set-up");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the gateway");
        let addr = listener.local_addr().expect("gateway address");
        let cancel = Shutdown::new();
        let shutdown = cancel.clone();
        let run_state = state.clone();
        let task = tokio::spawn(async move {
            ingest_gateway::server::run(listener, run_state, None, shutdown)
                .await
                .expect("gateway server");
        });
        let gw = TestGateway {
            addr,
            state,
            nats_url,
            http: reqwest::Client::new(),
            cancel,
            task,
        };
        let keys = gw.state.keys.clone();
        crate::eventually(Duration::from_secs(10), "the key cache to load", || {
            let keys = keys.clone();
            async move { keys.is_loaded().then_some(()) }
        })
        .await;
        gw
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates an API key for `company` through the `keys create` code path and waits
    /// until this gateway accepts it.
    pub async fn create_key(&self, company: Uuid) -> String {
        let key = create_key(&self.nats_url, company).await;
        self.wait_for_key(&key).await;
        key
    }

    /// Waits until this gateway accepts `key` (created elsewhere).
    pub async fn wait_for_key(&self, key: &str) {
        let key = key.to_owned();
        let keys = self.state.keys.clone();
        let k = key.clone();
        crate::eventually(
            Duration::from_secs(5),
            "the new key to reach the gateway",
            || {
                let keys = keys.clone();
                let k = k.clone();
                async move { keys.authenticate(&k, chrono::Utc::now()).map(|_| ()) }
            },
        )
        .await;
    }

    /// GETs `path` (`/readyz`, `/status`, `/openapi.json`): status and body text.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        crate::get(&format!("{}{path}", self.base())).await
    }

    /// GETs `path` and reads its JSON body (`/readyz`, `/openapi.json`).
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let (status, body) = self.get(path).await;
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
        (status, json)
    }

    /// POSTs JSON to `path` with `key`; returns status, headers and JSON body.
    pub async fn post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base()))
            .header("x-api-key", key)
            .json(body)
            .send()
            .await
            .expect("POST to the gateway");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json::<Value>().await.expect("gateway answers JSON");
        (status, headers, body)
    }

    /// POSTs one record to `/v1/calls` and returns status and body.
    pub async fn post_call(&self, key: &str, body: &Value) -> (StatusCode, Value) {
        let (s, _, b) = self.post("/v1/calls", key, body).await;
        (s, b)
    }

    /// Stops serving (drains in-flight requests).
    pub async fn stop(self) {
        self.cancel.trigger();
        let _ = self.task.await;
    }
}

/// The gateway's CLI as the operator runs its admin commands (`keys`, `setup`): with the
/// admin NATS identity.
pub fn admin_cli(nats_url: &str) -> ingest_gateway::config::Cli {
    let mut cli = gateway_cli(nats_url, ServeArgs::default());
    cli.nats = crate::identities::nats_args(nats_url, Role::Admin);
    cli
}

/// Creates a key in the bucket on `nats_url`; returns the secret (the last line printed).
/// On a cluster that has just started, the bucket the first key creates is not readable on
/// every node at once ("no stream found"): the key is made again until it is (a key
/// that was made and not reported is an unused key, which harms nothing).
pub async fn create_key(nats_url: &str, company: Uuid) -> String {
    let cli = admin_cli(nats_url);
    crate::eventually(
        Duration::from_secs(30),
        "the key bucket to take a key",
        || async {
            let store = ingest_gateway::cli::key_store(&cli).await.ok()?;
            let mut out = Vec::new();
            ingest_gateway::cli::keys::create(&store, company, "test dialer", None, &mut out)
                .await
                .ok()?;
            let printed = String::from_utf8(out).ok()?;
            printed.lines().last().map(str::to_owned)
        },
    )
    .await
}

/// The worker's CLI for a test NATS and database.
pub fn worker_cli(nats_url: &str, db_url: &str, run: RunArgs) -> persist_worker::config::Cli {
    persist_worker::config::Cli {
        command: None,
        db: DbArgs {
            database_url: db_url.to_owned(),
            db_max_connections: 4,
        },
        nats: crate::identities::nats_args(nats_url, Role::Worker),
        stream: StreamArgs::default(),
        run,
        privacy: persist_worker::config::PrivacyArgs::default(),
        archive: persist_worker::config::ArchiveArgs::default(),
        log_format: LogFormat::Text,
    }
}

/// Worker settings for tests: an ephemeral ops port and a short ack wait, so redelivery
/// after a kill happens within the test's patience.
pub fn test_run_args() -> RunArgs {
    RunArgs {
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ack_wait_secs: 2,
        retry_max_ms: 500,
        ..RunArgs::default()
    }
}

/// A worker running in this process.
pub struct TestWorker {
    /// Its ops endpoints (`/readyz`, `/metrics`, the status page).
    pub ops: SocketAddr,
    cancel: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    /// Starts a worker with [`test_run_args`].
    pub async fn start(nats_url: &str, db_url: &str) -> Self {
        Self::start_with(nats_url, db_url, test_run_args()).await
    }

    /// Starts a worker with the given settings.
    pub async fn start_with(nats_url: &str, db_url: &str, run: RunArgs) -> Self {
        Self::start_cli(worker_cli(nats_url, db_url, run)).await
    }

    /// Starts a worker from a full command line (e.g. with erasure and retention settings).
    pub async fn start_cli(cli: persist_worker::config::Cli) -> Self {
        callcap::telemetry::init_for_tests();
        // Its METRICS_ADDR (test_run_args: a free port).
        let listener = tokio::net::TcpListener::bind(cli.run.metrics_addr)
            .await
            .expect("binding the worker's ops endpoints");
        let ops = listener.local_addr().expect("the ops address");
        let cancel = Shutdown::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { persist_worker::run(listener, &cli, None, c).await });
        TestWorker { ops, cancel, task }
    }

    /// `http://` its ops address.
    pub fn ops_base(&self) -> String {
        format!("http://{}", self.ops)
    }

    /// GETs `path` of its ops endpoints (`/readyz`, `/metrics`, `/`): status and body.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        crate::get(&format!("{}{path}", self.ops_base())).await
    }

    /// SIGTERM-equivalent: finish the batch in hand and exit.
    pub async fn stop(self) {
        self.cancel.trigger();
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("worker did not stop cleanly: {other:?}"),
        }
    }
}

/// Runs `bin` (a service binary) with `args` as the admin identity against `nats_url`,
/// awaited (the services under test may run on the caller's runtime); its output.
pub async fn admin_command(bin: &str, nats_url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(bin)
        .args(args)
        .env("NATS_URL", nats_url)
        .env("NATS_NKEY_FILE", seed_path(Role::Admin))
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {bin} {args:?}: {e}"))
}

/// As [`admin_command`], with more environment variables (e.g. `CONNECTOR_SECRETS_KEY_FILE`).
pub async fn admin_command_env(
    bin: &str,
    nats_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    tokio::process::Command::new(bin)
        .args(args)
        .env("NATS_URL", nats_url)
        .env("NATS_NKEY_FILE", seed_path(Role::Admin))
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {bin} {args:?}: {e}"))
}

/// A finished command's stdout then stderr, as text (for assertions and their messages).
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The seed file of `role`'s NATS identity, for `NATS_NKEY_FILE`.
pub fn seed_path(role: Role) -> String {
    crate::identities::identities()
        .of(role)
        .seed_file
        .display()
        .to_string()
}

/// The environment of a worker binary under test.
fn worker_env<'a>(
    nats_url: &str,
    db_url: &str,
    metrics_port: u16,
    extra: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("NATS_URL", nats_url.to_owned()),
        ("NATS_NKEY_FILE", seed_path(Role::Worker)),
        ("DATABASE_URL", db_url.to_owned()),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
        ("ACK_WAIT_SECS", "2".to_owned()),
        ("RETRY_MAX_MS", "500".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// The environment of a gateway binary under test.
fn gateway_env<'a>(
    nats_url: &str,
    port: u16,
    extra: &[(&'a str, String)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("NATS_URL", nats_url.to_owned()),
        ("NATS_NKEY_FILE", seed_path(Role::Gateway)),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// A service binary run as its own process.
pub struct Process {
    child: Option<Child>,
}

impl Process {
    /// As [`Process::worker`], its stdout and stderr (the log, at the default level)
    /// written to `log`.
    pub fn worker_logged(
        bin: &str,
        nats_url: &str,
        db_url: &str,
        metrics_port: u16,
        extra: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        Self::spawn_logged(
            bin,
            &worker_env(nats_url, db_url, metrics_port, extra),
            Some(log),
        )
    }

    /// As [`Process::gateway`], its log written to `log`.
    pub fn gateway_logged(
        bin: &str,
        nats_url: &str,
        port: u16,
        extra: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        Self::spawn_logged(bin, &gateway_env(nats_url, port, extra), Some(log))
    }

    /// The worker binary running a subcommand (`args`, e.g. `["archive"]`) with the
    /// worker's environment and `extra`; its log to `log` when given.
    pub fn worker_command(
        bin: &str,
        args: &[&str],
        (nats_url, db_url, metrics_port): (&str, &str, u16),
        extra: &[(&str, String)],
        log: Option<&std::path::Path>,
    ) -> Self {
        Self::spawn_with(
            bin,
            args,
            &worker_env(nats_url, db_url, metrics_port, extra),
            log,
        )
    }

    /// Spawns `bin` with `env`; its output to `log`, or discarded (unless `TEST_LOG` is set).
    fn spawn_logged(bin: &str, env: &[(&str, String)], log: Option<&std::path::Path>) -> Self {
        Self::spawn_with(bin, &[], env, log)
    }

    fn spawn_with(
        bin: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null());
        if let Some(path) = log {
            let file = std::fs::File::create(path).expect("creating the process's log file");
            cmd.stdout(file.try_clone().expect("the log file"))
                .stderr(file);
        } else if std::env::var_os("TEST_LOG").is_none() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Process {
            child: Some(
                cmd.spawn()
                    .unwrap_or_else(|e| panic!("spawning {bin}: {e}")),
            ),
        }
    }

    /// The real `persist-worker` binary at `bin` (integration tests pass
    /// `env!("CARGO_BIN_EXE_worker-under-test")`).
    pub fn worker(
        bin: &str,
        nats_url: &str,
        db_url: &str,
        metrics_port: u16,
        extra: &[(&str, String)],
    ) -> Self {
        Self::spawn_logged(
            bin,
            &worker_env(nats_url, db_url, metrics_port, extra),
            None,
        )
    }

    /// The real `ingest-gateway` binary at `bin`.
    pub fn gateway(bin: &str, nats_url: &str, port: u16, extra: &[(&str, String)]) -> Self {
        Self::spawn_logged(bin, &gateway_env(nats_url, port, extra), None)
    }

    /// The real `ingest-gateway` binary on a free port, once `/readyz` answers 200;
    /// returns it and its base URL.
    pub async fn gateway_ready(
        bin: &str,
        nats_url: &str,
        extra: &[(&str, String)],
    ) -> (Self, String) {
        Self::gateway_ready_logged(bin, nats_url, extra, None).await
    }

    /// As [`Process::gateway_ready`], its log written to `log` when given.
    pub async fn gateway_ready_logged(
        bin: &str,
        nats_url: &str,
        extra: &[(&str, String)],
        log: Option<&std::path::Path>,
    ) -> (Self, String) {
        let port = crate::free_port();
        let gw = Self::spawn_logged(bin, &gateway_env(nats_url, port, extra), log);
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        crate::eventually(
            Duration::from_secs(20),
            "the gateway binary to be ready",
            || async {
                let r = http.get(format!("{base}/readyz")).send().await.ok()?;
                (r.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
        (gw, base)
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Posts `n` records (`make(i)`) with `concurrency` in flight; returns the ids of the 201s.
pub async fn post_many(
    gw: &TestGateway,
    key: &str,
    n: usize,
    concurrency: usize,
    make: impl Fn(usize) -> Value,
) -> BTreeSet<Uuid> {
    let bodies: Vec<Value> = (0..n).map(make).collect();
    let ids: Vec<Uuid> = futures::stream::iter(bodies)
        .map(|body| async move {
            let (status, resp) = gw.post_call(key, &body).await;
            assert_eq!(status, StatusCode::CREATED, "{resp}");
            Uuid::parse_str(resp["data"]["call_history_id"].as_str().unwrap()).unwrap()
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    ids.into_iter().collect()
}
