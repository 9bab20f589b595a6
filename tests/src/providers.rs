//! Provider callbacks as the providers send them: signed by the providers' own SDKs
//! (`tests/providers/sign.py`, PyPI `twilio`, `plivo`, `vonage`, `PyJWT`), sent to a
//! gateway under test.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::Value;

/// A request the signer made: the URL the provider calls (the connector's public URL),
/// headers, body.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Signed {
    pub url: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
    pub content_type: String,
}

/// The signer script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("providers/sign.py")
}

/// The Python the tests run the signer with (`PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Signs `request` (see the script's docstring) with the provider's SDK.
pub async fn sign(request: &Value) -> Signed {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(python())
        .arg(script())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("PYTHONWARNINGS", "ignore")
        .spawn()
        .expect("running the provider signer (python3 with twilio, plivo, vonage, PyJWT)");
    let mut stdin = child.stdin.take().expect("signer stdin");
    stdin
        .write_all(request.to_string().as_bytes())
        .await
        .expect("writing to the signer");
    drop(stdin);
    let out = child.wait_with_output().await.expect("the signer ran");
    assert!(
        out.status.success(),
        "the signer failed ({}); are the providers' SDKs installed (pip install twilio plivo vonage PyJWT)? {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the signer prints JSON")
}

/// Sends `signed` to the gateway at `base` (the signed URL's path and query on the
/// gateway's own address: what a load balancer forwards), with `extra` headers; the
/// answer's status and body.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    public_url: &str,
    signed: &Signed,
    extra: &[(&str, &str)],
) -> (StatusCode, String) {
    let path = signed
        .url
        .strip_prefix(public_url)
        .unwrap_or_else(|| panic!("{} is not under {public_url}", signed.url));
    let mut req = http
        .post(format!("{base}{path}"))
        .header("content-type", &signed.content_type)
        .body(signed.body.clone());
    for (k, v) in &signed.headers {
        req = req.header(k, v);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("POST to the gateway");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}
