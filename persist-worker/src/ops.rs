//! The worker's operational HTTP endpoints on `METRICS_ADDR`: `/` (the status page, with
//! the last hour drawn: [`callcap::history`]), `/metrics`, `/readyz`, `/healthz`. Nothing
//! here touches records.

use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use callcap::history::{self, History, Rates};
use callcap::recent::{html_escape, page};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use callcap::shutdown::Shutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use callcap::subjects::Lane;

use crate::health::{Condition, ConsumerHealth, Registry};

/// What the endpoints look at.
#[derive(Clone)]
pub struct OpsState {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub metrics: Option<PrometheusHandle>,
    /// Every consumer this process serves, as the guard and its component last saw it.
    pub consumers: Registry,
    /// The erasure key this process checks records with, if any.
    pub erasure_key: Option<std::sync::Arc<crate::privacy::ErasureKey>>,
}

/// The last hour, per 10 seconds.
static HISTORY: std::sync::LazyLock<History> = std::sync::LazyLock::new(History::default);

/// Starts keeping the last hour: records stored and dead-lettered per second, the
/// backlog of each lane on each partition stream, the dead letters waiting, and how far
/// the archive is behind each stream, a point every 10 seconds.
fn keep_history(state: OpsState) {
    let rates = std::sync::Arc::new(Rates::default());
    history::sample_every_step(move |at| {
        let (state, rates) = (state.clone(), rates.clone());
        async move {
            let [stored, dead] = crate::consume::totals();
            let mut work = Vec::new();
            if let Some(r) = rates.rate("stored", at, stored) {
                work.push(("stored".to_owned(), r));
            }
            if let Some(r) = rates.rate("dead", at, dead) {
                work.push(("dead-lettered".to_owned(), r));
            }
            HISTORY.record(
                "records",
                "Records per second (this worker)",
                "records/s",
                at,
                &work,
            );
            let consumers = state.consumers.all();
            let backlog: Vec<(String, f64)> = consumers
                .iter()
                .filter(|h| h.condition() != Condition::Unknown)
                .filter_map(|h| {
                    let lane = h.lane()?;
                    let p = h.partition();
                    Some((
                        format!("{lane} · partition {} of {}", p.index + 1, p.count.max(1)),
                        h.backlog().0 as f64,
                    ))
                })
                .collect();
            HISTORY.record(
                "backlog",
                "Backlog: records not yet delivered, per lane and partition",
                "records",
                at,
                &backlog,
            );
            let waiting = tokio::time::timeout(
                Duration::from_secs(2),
                crate::store::recent_dead_letters(&state.pool, 0),
            )
            .await;
            if let Ok(Ok((total, _))) = waiting {
                HISTORY.record(
                    "dead-letters",
                    "Dead letters waiting for redrive",
                    "messages",
                    at,
                    &[("waiting".to_owned(), total as f64)],
                );
            }
            let lag = archive_lag(&state.nats, &consumers).await;
            if !lag.is_empty() {
                HISTORY.record(
                    "archive",
                    "Archive lag: messages not yet archived, per stream",
                    "messages",
                    at,
                    &lag,
                );
            }
        }
    });
}

/// Messages each stream's archiver has not archived yet (streams without an archiver
/// are left out).
async fn archive_lag(
    nats: &async_nats::Client,
    consumers: &[std::sync::Arc<ConsumerHealth>],
) -> Vec<(String, f64)> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut streams: Vec<String> = consumers
        .iter()
        .map(|h| h.partition().stream_name())
        .collect();
    streams.sort();
    streams.dedup();
    let mut lag = Vec::new();
    for name in streams {
        let read = async {
            let stream = js.get_stream(&name).await?;
            let info = stream
                .consumer_info(crate::archive::component::CONSUMER)
                .await?;
            Ok::<_, async_nats::Error>(info.num_pending + info.num_ack_pending as u64)
        };
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), read).await {
            lag.push((name, n as f64));
        }
    }
    lag
}

/// Serves the ops endpoints on `listener` until `shutdown`, in a task of its own.
pub fn serve(listener: tokio::net::TcpListener, state: OpsState, shutdown: Shutdown) {
    keep_history(state.clone());
    let app = router(state);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.triggered_owned());
        if let Err(e) = served.await {
            tracing::error!(error = %e, "ops endpoint failed");
        }
    });
}

/// The ops router.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, String) {
    let nats_ok = s.nats.connection_state() == async_nats::connection::State::Connected;
    let db = tokio::time::timeout(Duration::from_secs(2), crate::store::ping(&s.pool)).await;
    let db_ok = matches!(db, Ok(Ok(())));
    // `consumer:` is the worst lane's state; one line per lane follows.
    let consumers = s.consumers.all();
    let states: Vec<&str> = consumers
        .iter()
        .map(|h| consumer_state(&h.condition()))
        .collect();
    let consumer = states
        .iter()
        .copied()
        .find(|c| *c != "ok" && *c != ABSENT)
        .unwrap_or("ok");
    let lanes: String = consumers
        .iter()
        .zip(&states)
        .map(|(h, c)| consumer_line(h, c))
        .collect();
    let repairs: u64 = consumers.iter().map(|h| h.repairs()).sum();
    // Not one consumer yet (no stream found): not ready.
    let consumer = if consumers.is_empty() {
        "not checked yet"
    } else {
        consumer
    };
    let consumer_ok = consumer == "ok";
    let erasures = erasure_checks(&s, &consumers).await;
    let troubled = consumers.iter().any(|h| h.trouble().is_some());
    let status = if nats_ok && db_ok && consumer_ok && erasures == "ok" && !troubled {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!(
            "nats: {}\npostgres: {}\nconsumer: {consumer}\nerasure checks: {erasures}\nconsumer repairs: {repairs}\n{lanes}",
            ok(nats_ok),
            ok(db_ok),
        ),
    )
}

/// One consumer's line of `/readyz`: a lane's with its backlog, a whole stream's (the
/// archiver's) with its position and what keeps it from its work.
fn consumer_line(h: &ConsumerHealth, state: &str) -> String {
    match h.lane() {
        Some(_) => {
            let (pending, ack_pending) = h.backlog();
            format!(
                "lane {}: {state} (pending {pending}, ack pending {ack_pending})\n",
                h.name()
            )
        }
        None => format!(
            "stream {}: {} (consumer {state}; done through sequence {})\n",
            h.name(),
            h.trouble()
                .map_or_else(|| "ok".to_owned(), |t| format!("failing: {t}")),
            h.position()
        ),
    }
}

/// Whether this worker can check records against every erasure: `ok`, or why not and
/// how many records its lanes hold meanwhile (their companies' records are held, the
/// others stored).
async fn erasure_checks(s: &OpsState, consumers: &[std::sync::Arc<ConsumerHealth>]) -> String {
    let state = tokio::time::timeout(
        Duration::from_secs(2),
        crate::store::privacy::key_state(&s.pool, s.erasure_key.as_deref()),
    )
    .await;
    let held: u64 = consumers
        .iter()
        .filter_map(|h| h.holding())
        .map(|(n, _)| n)
        .sum();
    let cause = match state {
        Ok(Ok(None)) => consumers
            .iter()
            .find_map(|h| h.holding())
            .map(|(_, why)| why),
        Ok(Ok(Some(why))) => Some(why),
        // Postgres unavailable: the postgres line says so.
        _ => consumers
            .iter()
            .find_map(|h| h.holding())
            .map(|(_, why)| why),
    };
    match cause {
        None => "ok".to_owned(),
        Some(why) => format!(
            "{why}; the records of companies with erasures are held, not stored ({held} held now)"
        ),
    }
}

/// A lane the stream does not have yet: nothing can arrive in it, so not a reason to be
/// unready.
const ABSENT: &str = "not in the stream (run `ingest-gateway setup`)";

/// The consumer's condition in a word: `ok`, `missing`, `changed`, or `not checked yet`.
fn consumer_state(c: &Condition) -> &'static str {
    match c {
        Condition::Right => "ok",
        Condition::Absent => ABSENT,
        Condition::Missing => "missing",
        Condition::Changed(_) => "changed",
        Condition::Unknown => "not checked yet",
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "unavailable"
    }
}

async fn metrics(State(s): State<OpsState>) -> (StatusCode, String) {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}

/// A backlog figure summed over `healths`, or "not read yet" before every one was read.
fn figure(healths: &[std::sync::Arc<ConsumerHealth>], pick: fn((u64, u64)) -> u64) -> String {
    if healths.iter().any(|h| h.condition() == Condition::Unknown) {
        "not read yet".into()
    } else {
        healths
            .iter()
            .map(|h| pick(h.backlog()))
            .sum::<u64>()
            .to_string()
    }
}

/// The archive's position on each stream this worker serves, from the archiver's durable
/// consumer (read from JetStream, so it shows even when no archiver runs).
async fn archive_rows(
    nats: &async_nats::Client,
    consumers: &[std::sync::Arc<ConsumerHealth>],
) -> String {
    let js = async_nats::jetstream::new(nats.clone());
    let mut streams: Vec<String> = consumers
        .iter()
        .map(|h| h.partition().stream_name())
        .collect();
    streams.sort();
    streams.dedup();
    let mut rows = String::new();
    for name in streams {
        let read = async {
            let mut stream = js.get_stream(&name).await?;
            let last = stream.info().await?.state.last_sequence;
            let archiver = stream
                .consumer_info(crate::archive::component::CONSUMER)
                .await
                .ok()
                .map(|i| {
                    (
                        i.ack_floor.stream_sequence,
                        i.num_pending + i.num_ack_pending as u64,
                    )
                });
            Ok::<_, async_nats::Error>((last, archiver))
        };
        let row = match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok((last, Some((floor, waiting))))) => {
                format!("<td class=\"n\" id=\"archived-{name}\">{floor}</td><td class=\"n\">{waiting}</td><td class=\"n\">{last}</td>")
            }
            Ok(Ok((last, None))) => format!(
                "<td id=\"archived-{name}\">no archiver</td><td></td><td class=\"n\">{last}</td>"
            ),
            _ => {
                format!("<td id=\"archived-{name}\" colspan=\"3\">unknown (NATS unavailable)</td>")
            }
        };
        rows.push_str(&format!("<tr><td><code>{name}</code></td>{row}</tr>\n"));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"4\">No stream served yet</td></tr>\n");
    }
    rows
}

/// The erasure and retention figures of all workers and `erase` runs together (counts
/// only), as table rows.
async fn privacy_rows(pool: &PgPool) -> String {
    let counters = tokio::time::timeout(
        Duration::from_secs(2),
        crate::store::privacy::counters(pool),
    )
    .await
    .ok()
    .and_then(Result::ok);
    let mut privacy = String::new();
    for (name, label) in [
        ("erasures", "Erasure runs completed"),
        ("rows_erased", "Calls erased"),
        ("dead_letters_erased", "Dead letters erased"),
        ("messages_erased", "Stream messages erased"),
        (
            "records_dropped_erased",
            "Records dropped since as erased (replay, redrive, resends)",
        ),
        (
            "rows_expired",
            "Calls deleted by retention (RETENTION_DAYS)",
        ),
        (
            "records_dropped_expired",
            "Records dropped as older than the retention",
        ),
    ] {
        let value = counters.as_ref().map_or_else(
            || "unknown (Postgres unavailable)".to_owned(),
            |c| {
                c.iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, v)| *v)
                    .to_string()
            },
        );
        privacy.push_str(&format!(
            "<tr><td>{label}</td><td class=\"n\" id=\"privacy-{name}\">{value}</td></tr>\n"
        ));
    }
    privacy
}

/// The consumers' rows of the status page.
fn consumer_rows(consumers: &[std::sync::Arc<ConsumerHealth>]) -> String {
    let mut lanes = String::new();
    for h in consumers {
        let lane = h.lane().map_or("archive", Lane::as_str);
        let id = h.name().replace(' ', "-");
        let one = std::slice::from_ref(h);
        lanes.push_str(&format!(
            "<tr><td>{lane} (<code>{name}</code> on <code>{stream}</code>)</td><td id=\"consumer-{id}\">{state}</td>\
             <td class=\"n\" id=\"pending-{id}\">{pending}</td>\
             <td class=\"n\" id=\"ack-pending-{id}\">{ack_pending}</td>\
             <td class=\"n\">{repairs}</td></tr>\n",
            name = h.consumer(),
            stream = h.partition().stream_name(),
            state = match consumer_state(&h.condition()) {
                "ok" => r#"<span class="ok">OK</span>"#.to_owned(),
                other => format!(r#"<span class="bad">{other}</span>"#),
            },
            pending = figure(one, |b| b.0),
            ack_pending = figure(one, |b| b.1),
            repairs = h.repairs(),
        ));
    }
    lanes
}

/// A dependency's state on the page.
fn available(ok: bool) -> &'static str {
    if ok {
        r#"<span class="ok">OK</span>"#
    } else {
        r#"<span class="bad">Unavailable</span>"#
    }
}

/// The latest dead letters' rows: when, and why.
fn reason_rows(recent: &[(chrono::DateTime<chrono::Utc>, String)]) -> String {
    let mut reasons = String::new();
    for (at, reason) in recent {
        reasons.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>\n",
            at.format("%Y-%m-%d %H:%M:%S UTC"),
            html_escape(reason)
        ));
    }
    if reasons.is_empty() {
        reasons.push_str("<tr><td colspan=\"2\">None waiting</td></tr>\n");
    }
    reasons
}

/// `GET /`: the worker's status page for an operator without Grafana.
async fn status_page(State(s): State<OpsState>) -> Response {
    let nats_ok = s.nats.connection_state() == async_nats::connection::State::Connected;
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        crate::store::recent_dead_letters(&s.pool, 5),
    )
    .await;
    let (db_ok, dead_total, recent) = match db {
        Ok(Ok((total, recent))) => (true, Some(total), recent),
        _ => (false, None, Vec::new()),
    };
    let privacy = privacy_rows(&s.pool).await;
    let [stored, dead] = crate::consume::throughput().rates();
    let reasons = reason_rows(&recent);
    let consumers = s.consumers.all();
    let lanes = consumer_rows(&consumers);
    let archive = archive_rows(&s.nats, &consumers).await;
    let worst = consumers
        .iter()
        .map(|h| consumer_state(&h.condition()))
        .find(|c| *c != "ok" && *c != ABSENT)
        .unwrap_or("ok");
    let body = format!(
        r#"<table id="health">
<thead><tr><th scope="col">Dependency</th><th scope="col">State</th></tr></thead>
<tbody>
<tr><td>NATS</td><td>{nats}</td></tr>
<tr><td>Postgres</td><td>{db}</td></tr>
<tr><td>Durable consumers (repairs: {repairs})</td><td id="consumer">{consumer}</td></tr>
<tr><td>Erasure checks</td><td id="erasure-checks">{erasures}</td></tr>
</tbody>
</table>
<h2>Work</h2>
<table id="work">
<thead><tr><th scope="col">Figure</th><th scope="col">Value</th></tr></thead>
<tbody>
<tr><td>Records stored per second (this worker)</td><td class="n" id="stored-rate">{stored:.1}</td></tr>
<tr><td>Dead-lettered per second (this worker)</td><td class="n">{dead:.2}</td></tr>
<tr><td>Consumer pending (not yet delivered, all workers, lanes served here)</td><td class="n" id="pending">{pending}</td></tr>
<tr><td>Consumer ack pending (being stored)</td><td class="n" id="ack-pending">{ack_pending}</td></tr>
<tr><td>Dead letters waiting for redrive</td><td class="n" id="dead-letters">{dead_total}</td></tr>
</tbody>
</table>
<h2>The last hour</h2>
{charts}<h2>Lanes served by this worker</h2>
<table id="lanes">
<thead><tr><th scope="col">Lane (consumer)</th><th scope="col">Consumer</th><th scope="col">Pending</th><th scope="col">Ack pending</th><th scope="col">Repairs</th></tr></thead>
<tbody>
{lanes}</tbody>
</table>
<h2>Archive</h2>
<table id="archive">
<thead><tr><th scope="col">Stream</th><th scope="col">Archived through sequence</th><th scope="col">Not yet archived</th><th scope="col">Stream's last sequence</th></tr></thead>
<tbody>
{archive}</tbody>
</table>
<p><small>The archiver (<code>persist-worker archive</code>) as JetStream sees its consumer; its own <code>/readyz</code> says whether the object store takes its writes.</small></p>
<h2>Erasure and retention</h2>
<table id="privacy">
<thead><tr><th scope="col">Figure</th><th scope="col">Count</th></tr></thead>
<tbody>
{privacy}</tbody>
</table>
<h2>Latest dead letters</h2>
<table id="reasons">
<thead><tr><th scope="col">When</th><th scope="col">Reason</th></tr></thead>
<tbody>
{reasons}</tbody>
</table>
<p><small><code>persist-worker dlq list</code> shows them all; <code>dlq redrive</code> stores them again once the cause is fixed.</small></p>"#,
        nats = available(nats_ok),
        db = available(db_ok),
        pending = figure(&consumers, |b| b.0),
        ack_pending = figure(&consumers, |b| b.1),
        consumer = match worst {
            "ok" => r#"<span class="ok">OK</span>"#.to_owned(),
            other => format!(r#"<span class="bad">{other}</span>"#),
        },
        repairs = consumers.iter().map(|h| h.repairs()).sum::<u64>(),
        erasures = match erasure_checks(&s, &consumers).await.as_str() {
            "ok" => r#"<span class="ok">OK</span>"#.to_owned(),
            other => format!(r#"<span class="bad">{}</span>"#, html_escape(other)),
        },
        charts = HISTORY.html(),
        dead_total = dead_total.map_or_else(
            || "unknown (Postgres unavailable)".into(),
            |n| n.to_string()
        ),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page("Call Capture worker", &body),
    )
        .into_response()
}
