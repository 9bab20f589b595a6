//! `ingest-gateway check`: the integration check of `examples/test-webhook.js`, for
//! machines without Node or Python. Sends the API document's Example 1 and Example 2 to a
//! running service with the integrator's key and reports, in plain words, what happened.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::config::CheckArgs;

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
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if status == StatusCode::CREATED && answer["success"] == true {
        writeln!(
            out,
            "✓ {name}: created, call_history_id {} (accepted at {})",
            answer["data"]["call_history_id"].as_str().unwrap_or("?"),
            answer["data"]["created_at"].as_str().unwrap_or("?")
        )?;
        return Ok(true);
    }
    writeln!(
        out,
        "✗ {name}: refused with {} {}: {}",
        status.as_u16(),
        answer["error"]
            .as_str()
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("")),
        answer["message"].as_str().unwrap_or("(no message)")
    )?;
    for d in answer["details"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  field {}: {}",
            d["field"].as_str().unwrap_or("?"),
            d["message"].as_str().unwrap_or("")
        )?;
    }
    if let Some(secs) = retry_after {
        writeln!(out, "  Retry-After: {secs} s")?;
    }
    writeln!(out, "  What to do: {}.", advice(status))?;
    Ok(false)
}
