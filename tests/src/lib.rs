//! Test harness for Call Capture: real NATS and real Postgres, nothing mocked.
//!
//! - [`nats`]: a private `nats-server -js` per test (free port, temp store) that a test can
//!   stop, kill and restart on the same port and store;
//! - [`identities`]: the NATS identities (nkeys) the shipped configs require;
//! - [`db`]: a fresh, migrated, UUID-named Postgres database per test, dropped afterwards;
//! - [`proxy`]: a TCP proxy in front of Postgres that a test can cut, so "Postgres refuses
//!   connections" is real without disturbing the shared server;
//! - [`pipeline`]: the gateway and the worker, in-process or as spawned binaries;
//! - [`load`]: concurrent clients posting unique records, counting what they saw;
//! - [`payloads`]: the API document's examples; [`providers`] and [`connectors`]: provider
//!   callbacks signed by the providers' SDKs, and connectors on the test stack;
//! - [`s3`]: a real S3-compatible object store (SeaweedFS) for the archive;
//! - [`powerfs`]: a FUSE filesystem that loses every write not fsynced on a "power cut";
//! - [`stack`]: the usual set-up in one line (nats-server, gateway and key; database and
//!   worker).

pub mod cluster;
pub mod connectors;
pub mod db;
pub mod identities;
pub mod load;
pub mod nats;
pub mod payloads;
pub mod pipeline;
pub mod powerfs;
pub mod providers;
pub mod proxy;
pub mod s3;
pub mod stack;
pub mod tls;

use std::future::Future;
use std::time::Duration;

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a server process gracefully (SIGTERM), killing it after 10 s if it is still up.
pub fn stop_child(mut child: std::process::Child) {
    let pid = child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
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

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on loopback")
}

/// How long until the peer closes `conn` (a read returns end of file or an error),
/// reading and dropping whatever it sends meanwhile; `None` when still open after
/// `patience`.
pub async fn closed_within(
    conn: &mut tokio::net::TcpStream,
    patience: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = patience.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// GETs `url`: status and body text (panics when nothing answers: the caller expects a
/// server there; poll with [`try_get`] while one may be starting).
pub async fn get(url: &str) -> (reqwest::StatusCode, String) {
    try_get(url)
        .await
        .unwrap_or_else(|| panic!("nothing answered GET {url}"))
}

/// GETs `url`: status and body text, or `None` when nothing answers (yet).
pub async fn try_get(url: &str) -> Option<(reqwest::StatusCode, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let status = resp.status();
    Some((status, resp.text().await.ok()?))
}

/// `http://127.0.0.1:PORT/PATH` of a process's ops or HTTP port, as [`get`].
pub async fn get_port(port: u16, path: &str) -> (reqwest::StatusCode, String) {
    get(&format!("http://127.0.0.1:{port}{path}")).await
}

/// The sum of the samples of `name` in a Prometheus text page (every label set), or
/// `None` when it has none.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
