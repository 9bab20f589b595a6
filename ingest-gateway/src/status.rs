//! `GET /status`: the gateway's status page for an operator without Grafana — requests
//! per second by status over the last minute, publish latency percentiles, the last hour
//! of both drawn (inline SVG, [`callcap::history`]), the companies in the overflow lane,
//! readiness and why not. No key needed and nothing secret on it
//! (no keys, no records; a company in the overflow lane shows as the first 8 characters
//! of its id, which the WARN line logged when it entered the lane names in full).
//! It counts the answers itself (the HTTP layer's figure) and reads what the publisher
//! exposes; no stage writes here.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use callcap::history::{self, History, Rates};
use callcap::recent::{html_escape, page, quantile_of, Window};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use crate::state::AppState;

/// The statuses the gateway answers, in the order the page lists them; anything else is
/// counted as "other".
const STATUSES: [u16; 18] = [
    200, 201, 207, 400, 401, 403, 404, 405, 408, 413, 414, 415, 429, 431, 500, 503, 504, 0,
];

static REQUESTS: LazyLock<Window<18>> = LazyLock::new(Window::default);
/// Requests answered since start, by status (for the last hour's chart).
static ANSWERED: [AtomicU64; 18] = [const { AtomicU64::new(0) }; 18];
/// The last hour, per 10 seconds.
static HISTORY: LazyLock<History> = LazyLock::new(History::default);

/// Counts one answered request for the page.
pub fn record_request(status: StatusCode) {
    let i = STATUSES
        .iter()
        .position(|s| *s == status.as_u16())
        .unwrap_or(STATUSES.len() - 1);
    REQUESTS.add(i, 1);
    ANSWERED[i].fetch_add(1, Ordering::Relaxed);
}

fn status_name(status: u16) -> String {
    if status == 0 {
        "other".to_owned()
    } else {
        format!(
            "{status} {}",
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
        )
    }
}

/// Starts keeping the last hour: requests per second by status, and the publishes' p50
/// and p99 to their ack, a point every 10 seconds.
pub fn keep_history() {
    let rates = Rates::default();
    let mut previous = crate::publish::latencies().since_start();
    history::sample_every_step(move |at| {
        let mut requests = Vec::new();
        for (i, status) in STATUSES.iter().enumerate() {
            let total = ANSWERED[i].load(Ordering::Relaxed);
            if let Some(rate) = rates.rate(&status.to_string(), at, total) {
                // A status appears once it has been answered; it stays from then on.
                if total > 0 {
                    requests.push((status_name(*status), rate));
                }
            }
        }
        HISTORY.record(
            "requests",
            "Requests per second, by status",
            "req/s",
            at,
            &requests,
        );
        let now = crate::publish::latencies().since_start();
        let step: [u64; 20] = std::array::from_fn(|i| now[i].saturating_sub(previous[i]));
        previous = now;
        let mut publish = Vec::new();
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            if let Some(ms) = quantile_of(&step, p).filter(|v| v.is_finite()) {
                publish.push((name.to_owned(), ms));
            }
        }
        HISTORY.record(
            "publish",
            "Publish to JetStream until the ack (bucket upper bounds)",
            "ms",
            at,
            &publish,
        );
        std::future::ready(())
    });
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x.is_infinite() => "over 10 s".into(),
        Some(x) => format!("≤ {x} ms"),
    }
}

/// Status page for people: readiness, requests/s by status, publish latency (HTML).
#[utoipa::path(get, path = "/status", tag = "ops", responses((status = 200, description = "HTML status page, refreshing itself", content_type = "text/html")))]
pub async fn status_page(State(state): State<AppState>) -> Response {
    let nats = state.publisher.check_ready().await;
    let keys_loaded = state.keys.is_loaded();
    let mut why_not = Vec::new();
    if let Err(e) = &nats {
        why_not.push(format!("NATS: {e}"));
    }
    if !keys_loaded {
        why_not.push("API keys not loaded yet".to_owned());
    }
    if !state.connectors.is_loaded() {
        why_not.push("provider connectors not loaded yet".to_owned());
    }
    let readiness = if why_not.is_empty() {
        r#"<p>Status: <span class="ok">Ready</span> — taking records.</p>"#.to_owned()
    } else {
        format!(
            r#"<p>Status: <span class="bad">Not ready</span> — {}</p>"#,
            html_escape(&why_not.join("; "))
        )
    };
    let rates = REQUESTS.rates();
    let mut rows = String::new();
    let mut total = 0.0;
    for (status, rate) in STATUSES.iter().zip(rates) {
        total += rate;
        if rate > 0.0 {
            let name = status_name(*status);
            rows.push_str(&format!(
                "<tr><td>{name}</td><td class=\"n\">{rate:.1}</td></tr>\n"
            ));
        }
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"2\">No requests in the last minute</td></tr>\n");
    }
    let now = std::time::Instant::now();
    let (overflowing, in_lane) = state.lanes.overflowing(now, 20);
    let mut lane_rows = String::new();
    for o in &overflowing {
        let id = o.company_id.simple().to_string();
        let why = if o.forced {
            "OVERFLOW_COMPANIES".to_owned()
        } else {
            format!(
                "over OVERFLOW_RATE; back in {:.0} s unless it exceeds it again",
                o.leaves_in_secs.unwrap_or(0.0)
            )
        };
        lane_rows.push_str(&format!(
            "<tr><td><code>{}…</code></td><td>{why}</td><td class=\"n\">{}</td></tr>\n",
            &id[..8],
            o.records
        ));
    }
    if in_lane > overflowing.len() {
        lane_rows.push_str(&format!(
            "<tr><td colspan=\"3\">and {} more</td></tr>\n",
            in_lane - overflowing.len()
        ));
    }
    if lane_rows.is_empty() {
        lane_rows
            .push_str("<tr><td colspan=\"3\">None: every company is in the main lane</td></tr>\n");
    }
    let stats = state.publisher.stats();
    let publish = crate::publish::latencies();
    let body = format!(
        r#"{readiness}
<p>JetStream fsync: {fsync}. Keys loaded: {keys}. Provider connectors: <span id="connectors">{connectors}</span> (<span id="connectors-unusable">{unusable}</span> unusable: their secrets do not open with this gateway's CONNECTOR_SECRETS_KEY_FILE).</p>
<h2>Requests per second, by status</h2>
<table id="requests">
<thead><tr><th scope="col">Status</th><th scope="col">Requests/s</th></tr></thead>
<tbody>
{rows}<tr><th scope="row">All</th><td class="n" id="requests-total">{total:.1}</td></tr>
</tbody>
</table>
<h2>Publish to JetStream (until the ack)</h2>
<table id="publish">
<thead><tr><th scope="col">Figure</th><th scope="col">Value</th></tr></thead>
<tbody>
<tr><td>Publishes in the last minute</td><td class="n" id="publish-count">{count}</td></tr>
<tr><td>p50</td><td class="n">{p50}</td></tr>
<tr><td>p90</td><td class="n">{p90}</td></tr>
<tr><td>p99</td><td class="n">{p99}</td></tr>
<tr><td>Records published since start</td><td class="n" id="records-total">{records}</td></tr>
<tr><td>Atomic batches since start</td><td class="n">{batches}</td></tr>
</tbody>
</table>
<h2>The last hour</h2>
{charts}<h2>Overflow lane: <span id="overflow-count">{in_lane}</span> companies</h2>
<table id="overflow">
<thead><tr><th scope="col">Company</th><th scope="col">Why</th><th scope="col">Records sent there</th></tr></thead>
<tbody>
{lane_rows}</tbody>
</table>"#,
        fsync = html_escape(&state.fsync_mode),
        keys = state.keys.len(),
        connectors = state.connectors.len(),
        unusable = state.connectors.unusable(),
        count = publish.count(),
        p50 = ms(publish.quantile_ms(0.50)),
        p90 = ms(publish.quantile_ms(0.90)),
        p99 = ms(publish.quantile_ms(0.99)),
        records = stats.records,
        batches = stats.batches,
        charts = HISTORY.html(),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page("Call Capture gateway", &body),
    )
        .into_response()
}
