//! `ingest-gateway check`: the integration check of `examples/test-webhook.js`, for
//! machines without Node or Python. Sends the API document's Example 1 and Example 2 to a
//! running service with the integrator's key and reports, in plain words, what happened.
//!
//! It trusts the server no more than a browser would: redirects are not followed (the key
//! and the record would go to whoever the redirect names; a 3xx is reported with its
//! `Location`), only a 201 to the POST itself counts as created, at most
//! [`MAX_ANSWER_BYTES`] of an answer are read, and server text is printed with control
//! characters escaped (no terminal escape sequence reaches the screen).

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::config::CheckArgs;

/// Most bytes of an answer read; the rest is not downloaded.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Server text made safe to print: control characters (ESC, BEL, CR, …, and the C1 range)
/// written as `\u{..}` escapes, and at most 500 characters.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == 500 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads at most [`MAX_ANSWER_BYTES`] of the answer's body.
async fn read_bounded(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ANSWER_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    body
}

/// What to do about each refusal, in the API's own terms.
fn advice(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "fix the field named above and send again",
        401 => "check the x-api-key value; a revoked or expired key must be replaced by a new one",
        403 => "company_id must be the company your API key was issued for",
        408 => "the body arrived too slowly; check the network between you and the service",
        413 => "the record is too large; shorten notes or call_details",
        415 => "send the header Content-Type: application/json",
        429 => "you are over your rate limit; wait for Retry-After and send again",
        503 => "the service could not confirm the record; send it again after Retry-After (a resend is safe)",
        301 | 302 | 303 | 307 | 308 => "use the URL of the service itself: a redirect is not followed, since it would send your API key and the record to another address",
        _ => "see the API document for this status",
    }
}

/// Sends both examples; `Ok(true)` when both were created.
///
/// # Errors
/// Only when the report cannot be written.
pub async fn run(args: &CheckArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the HTTP client")?;
    let base = args.url.trim_end_matches('/');
    let url = format!("{base}/functions/v1/webhook-call-capture");
    let run_id = chrono::Utc::now().timestamp_millis();
    let mut complete = callcap::examples::complete(args.company, &format!("TEST-WEBHOOK-{run_id}"));
    complete["external_system"] = "ingest-gateway check".into();
    writeln!(out, "Testing {base} for company {}", args.company)?;
    let mut all = true;
    for (name, body) in [
        (
            "Example 1 (minimal record)",
            callcap::examples::minimal(args.company),
        ),
        ("Example 2 (complete record)", complete),
    ] {
        all &= send(&http, &url, &args.key, name, &body, out).await?;
    }
    if all {
        writeln!(
            out,
            "Your integration works: both records were accepted and will be stored."
        )?;
    } else {
        writeln!(
            out,
            "Your integration is not working yet: see the lines marked ✗ above."
        )?;
    }
    Ok(all)
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    name: &str,
    body: &Value,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let response = match http
        .post(url)
        .header("x-api-key", key)
        .json(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            writeln!(out, "✗ {name}: could not reach {url}: {e}")?;
            writeln!(
                out,
                "  What to do: check the URL and that this machine can reach it."
            )?;
            return Ok(false);
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let location = response
        .headers()
        .get("location")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let answer: Value =
        serde_json::from_slice(&read_bounded(response).await).unwrap_or(Value::Null);
    if status == StatusCode::CREATED && answer["success"] == true {
        writeln!(
            out,
            "✓ {name}: created, call_history_id {} (accepted at {})",
            printable(answer["data"]["call_history_id"].as_str().unwrap_or("?")),
            printable(answer["data"]["created_at"].as_str().unwrap_or("?"))
        )?;
        return Ok(true);
    }
    writeln!(
        out,
        "✗ {name}: refused with {} {}: {}",
        status.as_u16(),
        printable(
            answer["error"]
                .as_str()
                .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
        ),
        printable(answer["message"].as_str().unwrap_or("(no message)"))
    )?;
    if let Some(to) = location.filter(|_| status.is_redirection()) {
        writeln!(out, "  The server redirects to {}", printable(&to))?;
    }
    for d in answer["details"].as_array().into_iter().flatten().take(20) {
        writeln!(
            out,
            "  field {}: {}",
            printable(d["field"].as_str().unwrap_or("?")),
            printable(d["message"].as_str().unwrap_or(""))
        )?;
    }
    if let Some(secs) = retry_after {
        writeln!(out, "  Retry-After: {}", printable(&secs))?;
    }
    writeln!(out, "  What to do: {}.", advice(status))?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        let hostile = "ok\u{1b}[2J\u{1b}]0;title\u{7}\u{1b}]52;c;ZXZpbA==\u{7}\r\u{9b}x";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.starts_with("ok\\u{1b}[2J"), "{shown}");
        assert_eq!(printable(&"a".repeat(600)).chars().count(), 501);
    }
}
