//! `callcap-bench`: the load generator and ceiling measurements behind BENCHMARKS.md.
//!
//! Each subcommand measures one thing and prints one line of `key=value` results, so
//! `deploy/dev/bench.sh` can run them side by side in one session and compute ratios:
//!
//! - `http-ceiling`: an axum server whose handler parses the same JSON and answers a fixed
//!   201 (what HTTP + JSON cost on this machine, without auth or NATS); driven by wrk;
//! - `broker`: records published straight to JetStream from one client, many in flight
//!   (what the broker can take);
//! - `db-ceiling`: a plain multi-row `INSERT … SELECT FROM UNNEST` of the same rows into a
//!   copy of `call_history` (what Postgres can take);
//! - `worker`: the real consumer loop draining a pre-filled stream into `call_history`;
//! - `e2e`: single POSTs through the running gateway, then the lag from each 201 to its
//!   committed row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use callcap::{CallRecord, Envelope};
use chrono::Utc;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use hdrhistogram::Histogram;
use uuid::Uuid;

// The same allocator as the services' binaries: `worker` runs the worker's loop in this
// process, and its figure must be the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "callcap-bench",
    about = "Call Capture load generator and ceiling measurements"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve POST /v1/calls that parses the JSON body and returns a fixed 201.
    HttpCeiling {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: String,
    },
    /// Publish Example-2 envelopes straight to the CALLS stream.
    Broker {
        #[arg(long, env = "NATS_URL")]
        nats_url: String,
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Publishes (or, with --atomic-batch, batches) awaiting their ack at once.
        #[arg(long, default_value_t = 512)]
        in_flight: usize,
        /// Publish ADR-50 atomic batches of this many records (one commit ack each)
        /// instead of one publish per record: the group-commit ceiling.
        #[arg(long)]
        atomic_batch: Option<usize>,
    },
    /// Read a whole stream once with an ordered consumer, as fast as it comes: the
    /// stream's read rate, the ceiling of anything that copies it (the archiver).
    StreamRead {
        #[arg(long, env = "NATS_URL")]
        nats_url: String,
        #[arg(long, default_value = "CALLS")]
        stream: String,
    },
    /// Delete every message of a stream as `erase` does (JetStream's message delete,
    /// which overwrites the payload), the first half one request at a time, the second
    /// half `in_flight` at once: msgs/s of each.
    DeleteMessages {
        #[arg(long, env = "NATS_URL")]
        nats_url: String,
        #[arg(long, default_value = "CALLS")]
        stream: String,
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
    },
    /// Time one fsync on this disk: append a record-sized block to a file in `dir` and
    /// fdatasync it, `count` times (the floor of a power-loss-safe ack).
    Fsync {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2000)]
        count: u32,
    },
    /// Insert rows into a copy of call_history: a plain INSERT … SELECT FROM UNNEST per
    /// batch, or (`--copy`) a binary COPY into a staging table followed by one
    /// INSERT … SELECT … ON CONFLICT per batch.
    DbCeiling {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long)]
        copy: bool,
    },
    /// Drain a pre-filled stream (`broker` first) into call_history with the real worker.
    Worker {
        #[arg(long, env = "NATS_URL")]
        nats_url: String,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Rows expected (the number of messages pre-filled).
        #[arg(long)]
        count: i64,
        #[arg(long, default_value_t = 1000)]
        batch_size: u32,
        /// Batches written at once (the worker's BATCHES_IN_FLIGHT).
        #[arg(long, default_value_t = 3)]
        batches_in_flight: u32,
    },
    /// Print a request body for wrk: Example 2 with `__EXT__` where the external id goes
    /// (`--records N` wraps N of them, ids `__EXT__-0` … , in a batch body).
    Body {
        #[arg(long)]
        company: Uuid,
        #[arg(long)]
        records: Option<usize>,
    },
    /// POST batches with a Content-Encoding (plain, gzip, deflate, zstd) to a running
    /// gateway: records/s, latency and bytes on the wire. Bodies (distinct records) are
    /// prepared and compressed before the clock starts: this measures the gateway.
    Encoded {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        company: Uuid,
        #[arg(long, default_value = "plain")]
        encoding: String,
        /// Records per batch.
        #[arg(long, default_value_t = 100)]
        records: usize,
        /// Batches to send (each with its own records).
        #[arg(long, default_value_t = 1000)]
        batches: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// One company's burst next to another's trickle (issue "no single FIFO"): the quiet
    /// company posts one record every `quiet_interval_ms` throughout; after
    /// `warmup_secs` the hot company floods `/v1/calls/batch` (`connections` clients,
    /// `records` a request) for `burst_secs`. Waits until every accepted record is
    /// stored, then reports the quiet company's lag (its rows' stored_at − received_at)
    /// before the burst (baseline) and from the burst's start until the hot backlog was
    /// stored, and the hot company's accept and drain rates (drain: its rows over the
    /// span of their stored_at).
    Isolation {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long)]
        hot_key: String,
        #[arg(long)]
        hot_company: Uuid,
        #[arg(long)]
        quiet_key: String,
        #[arg(long)]
        quiet_company: Uuid,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 8)]
        warmup_secs: u64,
        #[arg(long, default_value_t = 20)]
        burst_secs: u64,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 500)]
        records: usize,
        #[arg(long, default_value_t = 100)]
        quiet_interval_ms: u64,
    },
    /// Provider callbacks against the API they stand in for: `--mode api` POSTs single
    /// records to `/v1/calls` with the key; `--mode twilio` POSTs Twilio status callbacks
    /// (form, `X-Twilio-Signature` HMAC-SHA1 over `--public-url` and the sorted
    /// parameters) to the connector's URL. The same calls either way, each distinct, all
    /// prepared (and signed) before the clock starts: this measures the gateway.
    Callbacks {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long)]
        mode: String,
        /// API key (api mode).
        #[arg(long, default_value = "")]
        key: String,
        #[arg(long)]
        company: Uuid,
        /// The connector's callback URL as `connectors create` printed it (twilio mode).
        #[arg(long, default_value = "")]
        callback_url: String,
        /// The connector's public URL (what Twilio signs; twilio mode).
        #[arg(long, default_value = "")]
        public_url: String,
        /// The Twilio auth token (twilio mode).
        #[arg(long, default_value = "")]
        token: String,
        #[arg(long, default_value_t = 20000)]
        requests: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// POST single records to a running gateway, then measure the lag from 201 to row.
    E2e {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        company: Uuid,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Only POST (no worker is expected to run): the gateway alone, measured with the
        /// same client as the end-to-end figure.
        #[arg(long)]
        post_only: bool,
        /// Send at this many records per second in all (paced, open loop) instead of as
        /// fast as the gateway answers: the soak's load.
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::HttpCeiling { listen } => http_ceiling(&listen).await,
        Cmd::Callbacks {
            gateway,
            mode,
            key,
            company,
            callback_url,
            public_url,
            token,
            requests,
            concurrency,
        } => {
            let twilio = match mode.as_str() {
                "api" => None,
                "twilio" => Some(TwilioTarget {
                    callback_url,
                    public_url,
                    token,
                }),
                other => anyhow::bail!("--mode {other}: api or twilio"),
            };
            callbacks(
                &gateway,
                &key,
                company,
                twilio.as_ref(),
                requests,
                concurrency,
            )
            .await
        }
        Cmd::Encoded {
            gateway,
            key,
            company,
            encoding,
            records,
            batches,
            concurrency,
        } => {
            encoded(
                &gateway,
                &key,
                company,
                &encoding,
                records,
                batches,
                concurrency,
            )
            .await
        }
        Cmd::Fsync { dir, count } => fsync_latency(&dir, count),
        Cmd::Isolation {
            gateway,
            hot_key,
            hot_company,
            quiet_key,
            quiet_company,
            database_url,
            warmup_secs,
            burst_secs,
            connections,
            records,
            quiet_interval_ms,
        } => {
            isolation(&Isolation {
                gateway,
                hot: (hot_key, hot_company),
                quiet: (quiet_key, quiet_company),
                database_url,
                warmup: Duration::from_secs(warmup_secs),
                burst: Duration::from_secs(burst_secs),
                connections,
                records,
                quiet_interval: Duration::from_millis(quiet_interval_ms),
            })
            .await
        }
        Cmd::Body { company, records } => {
            let body = match records {
                None => callcap_tests::payloads::complete(company, "__EXT__"),
                Some(n) => serde_json::json!({
                    "calls": (0..n)
                        .map(|i| callcap_tests::payloads::complete(company, &format!("__EXT__-{i}")))
                        .collect::<Vec<_>>()
                }),
            };
            println!("{body}");
            Ok(())
        }
        Cmd::Broker {
            nats_url,
            count,
            in_flight,
            atomic_batch,
        } => broker(&nats_url, count, in_flight, atomic_batch).await,
        Cmd::StreamRead { nats_url, stream } => stream_read(&nats_url, &stream).await,
        Cmd::DeleteMessages {
            nats_url,
            stream,
            in_flight,
        } => delete_messages(&nats_url, &stream, in_flight).await,
        Cmd::DbCeiling {
            database_url,
            count,
            batch,
            copy,
        } => {
            if copy {
                db_ceiling_copy(&database_url, count, batch).await
            } else {
                db_ceiling(&database_url, count, batch).await
            }
        }
        Cmd::Worker {
            nats_url,
            database_url,
            count,
            batch_size,
            batches_in_flight,
        } => {
            worker(
                &nats_url,
                &database_url,
                count,
                batch_size,
                batches_in_flight,
            )
            .await
        }
        Cmd::E2e {
            gateway,
            key,
            company,
            database_url,
            seconds,
            concurrency,
            post_only,
            rate,
        } => {
            let load = Load {
                seconds,
                concurrency,
                post_only,
                rate,
            };
            e2e(&gateway, &key, company, &database_url, &load).await
        }
    }
}

async fn http_ceiling(listen: &str) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::post;
    const FIXED: &str = r#"{"success":true,"message":"Call record created successfully","data":{"call_history_id":"456e7890-e89b-12d3-a456-426614174003","created_at":"2025-11-25T10:36:00.000Z"}}"#;
    let app = axum::Router::new().route(
        "/v1/calls",
        post(|body: Bytes| async move {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) if v.is_object() => (StatusCode::CREATED, FIXED),
                _ => (StatusCode::BAD_REQUEST, "{}"),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("http-ceiling listening on {listen}");
    axum::serve(listener, app).await?;
    Ok(())
}

fn fsync_latency(dir: &std::path::Path, count: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = std::fs::File::create(&path)?;
    let block = vec![b'x'; 830];
    let mut hist = Histogram::<u64>::new(3)?;
    for _ in 0..count {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        hist.record(t.elapsed().as_micros() as u64)?;
    }
    drop(file);
    std::fs::remove_file(&path)?;
    println!(
        "fsync count={count} p50_ms={:.3} p99_ms={:.3}",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
    Ok(())
}

/// The Example-2 record with a unique external id.
fn example_record(company: Uuid, n: u64) -> CallRecord {
    let v = callcap_tests::payloads::complete(company, &format!("BENCH-{n}"));
    callcap::validate(&v).expect("Example 2 is valid")
}

fn example_envelope(company: Uuid, n: u64) -> Envelope {
    let record = example_record(company, n);
    let id = callcap::identity::call_history_id(&record, None).id;
    Envelope::new(id, Utc::now(), "kbench".into(), None, record)
}

async fn delete_messages(nats_url: &str, name: &str, in_flight: usize) -> anyhow::Result<()> {
    let client = callcap_tests::identities::connect(nats_url).await;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .clone();
    let seqs: Vec<u64> = (state.first_sequence..=state.last_sequence).collect();
    let (one, many) = seqs.split_at(seqs.len() / 2);
    for (label, part, k) in [("one at a time", one, 1), ("in flight", many, in_flight)] {
        let started = Instant::now();
        let done = persist_worker::write::delete_messages_with(&js, name, part, k).await;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(done.failed == 0, "{} deletes failed", done.failed);
        println!(
            "{label}: in_flight={k} deleted={} secs={secs:.3} msgs_per_sec={}",
            done.deleted,
            (done.deleted as f64 / secs) as u64
        );
    }
    Ok(())
}

async fn stream_read(nats_url: &str, name: &str) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let client = callcap_tests::identities::connect(nats_url).await;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let total = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut n, mut bytes) = (0u64, 0u64);
    while n < total {
        let m = messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the stream ended early"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        bytes += m.payload.len() as u64;
        n += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "messages={n} bytes={bytes} secs={secs:.3} msgs_per_sec={}",
        (n as f64 / secs) as u64
    );
    Ok(())
}

async fn broker(
    nats_url: &str,
    count: u64,
    in_flight: usize,
    atomic_batch: Option<usize>,
) -> anyhow::Result<()> {
    let client = callcap_tests::identities::connect(nats_url).await;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(in_flight * 2)
        .build(client);
    callcap::subjects::ensure_stream(&js, &Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("stream: {e}"))?;
    let company = Uuid::new_v4();
    let subject = callcap::subjects::ingest_subject(company);
    // Payloads are prepared up front: this measures the broker, not serialization.
    let payloads: Vec<(String, Bytes)> = (0..count)
        .map(|n| {
            let e = example_envelope(company, n);
            (
                callcap::identity::msg_id(e.call_history_id, &e.record),
                Bytes::from(e.encode()),
            )
        })
        .collect();
    if let Some(size) = atomic_batch {
        return broker_atomic(js.client(), &subject, payloads, size, in_flight).await;
    }
    let started = Instant::now();
    let acked = futures::stream::iter(payloads)
        .map(|(id, payload)| {
            let js = js.clone();
            let subject = subject.clone();
            async move {
                let msg = jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(id);
                js.send_publish(subject, msg).await?.await
            }
        })
        .buffer_unordered(in_flight)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "broker count={count} acked={acked} in_flight={in_flight} seconds={secs:.2} msgs_per_sec={:.0}",
        acked as f64 / secs
    );
    Ok(())
}

/// Atomic batches through the gateway's own wire protocol, `in_flight` batches at once.
async fn broker_atomic(
    client: async_nats::Client,
    subject: &str,
    payloads: Vec<(String, Bytes)>,
    size: usize,
    in_flight: usize,
) -> anyhow::Result<()> {
    use ingest_gateway::publish::wire::{Message, Reply, Wire};
    let wire = Wire::new(client).await?;
    let records: Vec<Message> = payloads
        .into_iter()
        .map(|(msg_id, payload)| Message {
            subject: subject.to_owned(),
            msg_id,
            payload,
            trace: None,
        })
        .collect();
    let count = records.len();
    let started = Instant::now();
    let mut waiting = futures::stream::FuturesUnordered::new();
    let mut acked = 0u64;
    let mut errors = 0u64;
    let timeout = Duration::from_secs(10);
    for chunk in records.chunks(size.max(1)) {
        while waiting.len() >= in_flight.max(1) {
            match waiting.next().await {
                Some(Ok(Reply::Ack { count, .. })) => acked += count,
                _ => errors += 1,
            }
        }
        let refs: Vec<&Message> = chunk.iter().collect();
        let pending = if refs.len() == 1 {
            wire.send_single(refs[0]).await?
        } else {
            wire.send_atomic(&refs).await?
        };
        waiting.push(pending.wait(timeout));
    }
    while let Some(r) = waiting.next().await {
        match r {
            Ok(Reply::Ack { count, .. }) => acked += count,
            _ => errors += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "broker count={count} acked={acked} failed_batches={errors} atomic_batch={size} in_flight={in_flight} seconds={secs:.2} msgs_per_sec={:.0}",
        acked as f64 / secs
    );
    Ok(())
}

async fn db_ceiling(database_url: &str, count: u64, batch: usize) -> anyhow::Result<()> {
    let (pool, records) = ceiling_setup(database_url, count).await?;
    let started = Instant::now();
    for (k, chunk) in records.chunks(batch).enumerate() {
        let ids: Vec<Uuid> = chunk.iter().map(|e| e.call_history_id).collect();
        let companies: Vec<Uuid> = chunk.iter().map(|e| e.record.company_id).collect();
        let notes: Vec<Option<String>> = chunk.iter().map(|e| e.record.notes.clone()).collect();
        let outcome: Vec<Option<&str>> = chunk
            .iter()
            .map(|e| e.record.outcome.map(|o| o.as_str()))
            .collect();
        let status: Vec<Option<&str>> = chunk
            .iter()
            .map(|e| e.record.call_status.map(|o| o.as_str()))
            .collect();
        let caller: Vec<Option<String>> = chunk
            .iter()
            .map(|e| e.record.caller_number.clone())
            .collect();
        let recipient: Vec<Option<String>> = chunk
            .iter()
            .map(|e| e.record.recipient_number.clone())
            .collect();
        let ext: Vec<Option<String>> = chunk
            .iter()
            .map(|e| e.record.external_call_id.clone())
            .collect();
        let sys: Vec<Option<String>> = chunk
            .iter()
            .map(|e| e.record.external_system.clone())
            .collect();
        let url: Vec<Option<String>> = chunk
            .iter()
            .map(|e| e.record.recording_url.clone())
            .collect();
        let dur: Vec<Option<i32>> = chunk.iter().map(|e| e.record.duration_seconds).collect();
        let lead: Vec<Option<Uuid>> = chunk.iter().map(|e| e.record.lead_id).collect();
        let emp: Vec<Option<Uuid>> = chunk.iter().map(|e| e.record.employee_id).collect();
        let call_date: Vec<chrono::DateTime<Utc>> = chunk
            .iter()
            .map(|e| e.record.call_date.unwrap_or(e.received_at))
            .collect();
        let start: Vec<Option<chrono::DateTime<Utc>>> =
            chunk.iter().map(|e| e.record.start_time).collect();
        let end: Vec<Option<chrono::DateTime<Utc>>> =
            chunk.iter().map(|e| e.record.end_time).collect();
        let fu: Vec<Option<chrono::NaiveDate>> =
            chunk.iter().map(|e| e.record.next_follow_up).collect();
        let fut: Vec<Option<chrono::NaiveTime>> =
            chunk.iter().map(|e| e.record.next_follow_up_time).collect();
        let auto: Vec<Option<bool>> = chunk.iter().map(|e| e.record.auto_call_followup).collect();
        let details: Vec<Option<serde_json::Value>> = chunk
            .iter()
            .map(|e| e.record.call_details.clone().map(serde_json::Value::Object))
            .collect();
        let received: Vec<chrono::DateTime<Utc>> = chunk.iter().map(|e| e.received_at).collect();
        let seq: Vec<i64> = (0..chunk.len()).map(|i| (k * batch + i) as i64).collect();
        sqlx::query(
            "INSERT INTO bench_ceiling (id, company_id, lead_id, employee_id, outcome, notes, call_date, \
               caller_number, recipient_number, duration_seconds, recording_url, call_status, start_time, end_time, \
               external_call_id, external_system, next_follow_up, next_follow_up_time, auto_call_followup, call_details, \
               received_at, stream_seq, call_date_given, key_id) \
             SELECT u.*, true, 'kbench' FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], \
               $7::timestamptz[], $8::text[], $9::text[], $10::int4[], $11::text[], $12::text[], $13::timestamptz[], \
               $14::timestamptz[], $15::text[], $16::text[], $17::date[], $18::time[], $19::bool[], $20::jsonb[], \
               $21::timestamptz[], $22::int8[]) \
             AS u(id, company_id, lead_id, employee_id, outcome, notes, call_date, caller_number, recipient_number, \
               duration_seconds, recording_url, call_status, start_time, end_time, external_call_id, external_system, \
               next_follow_up, next_follow_up_time, auto_call_followup, call_details, received_at, stream_seq)",
        )
        .bind(&ids)
        .bind(&companies)
        .bind(&lead)
        .bind(&emp)
        .bind(&outcome)
        .bind(&notes)
        .bind(&call_date)
        .bind(&caller)
        .bind(&recipient)
        .bind(&dur)
        .bind(&url)
        .bind(&status)
        .bind(&start)
        .bind(&end)
        .bind(&ext)
        .bind(&sys)
        .bind(&fu)
        .bind(&fut)
        .bind(&auto)
        .bind(&details)
        .bind(&received)
        .bind(&seq)
        .execute(&pool)
        .await
        .context("ceiling insert")?;
    }
    let secs = started.elapsed().as_secs_f64();
    ensure_rows(&pool, count).await?;
    sqlx::query("DROP TABLE bench_ceiling")
        .execute(&pool)
        .await?;
    println!(
        "db_ceiling count={count} batch={batch} seconds={secs:.2} rows_per_sec={:.0}",
        count as f64 / secs
    );
    Ok(())
}

/// A fresh `bench_ceiling` table and the rows both ceilings write.
async fn ceiling_setup(
    database_url: &str,
    count: u64,
) -> anyhow::Result<(sqlx::PgPool, Vec<Envelope>)> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    sqlx::query("DROP TABLE IF EXISTS bench_ceiling")
        .execute(&pool)
        .await?;
    // Same columns and indexes as call_history, no foreign keys and no merge: the cost of
    // putting the rows into Postgres, nothing more.
    sqlx::query(
        "CREATE TABLE bench_ceiling (LIKE call_history INCLUDING DEFAULTS INCLUDING INDEXES)",
    )
    .execute(&pool)
    .await?;
    let company = Uuid::new_v4();
    let records = (0..count).map(|n| example_envelope(company, n)).collect();
    Ok((pool, records))
}

/// A ceiling counts only if every row arrived.
async fn ensure_rows(pool: &sqlx::PgPool, count: u64) -> anyhow::Result<()> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_ceiling")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        n as u64 == count,
        "ceiling table holds {n} rows, not {count}"
    );
    Ok(())
}

/// The columns both ceilings write, in order.
const CEILING_COLUMNS: &str = "id, company_id, lead_id, employee_id, outcome, notes, call_date, caller_number, \
    recipient_number, duration_seconds, recording_url, call_status, start_time, end_time, external_call_id, \
    external_system, next_follow_up, next_follow_up_time, auto_call_followup, call_details, received_at, \
    stream_seq, call_date_given, key_id";

/// See [`Cmd::DbCeiling`] (`--copy`): rows encoded in Postgres' binary COPY format.
async fn db_ceiling_copy(database_url: &str, count: u64, batch: usize) -> anyhow::Result<()> {
    let (pool, records) = ceiling_setup(database_url, count).await?;
    let mut conn = pool.acquire().await?;
    sqlx::query(&format!(
        "CREATE TEMP TABLE bench_staging AS SELECT {CEILING_COLUMNS} FROM call_history WITH NO DATA"
    ))
    .execute(&mut *conn)
    .await?;
    let started = Instant::now();
    for (k, chunk) in records.chunks(batch).enumerate() {
        let mut out = BinaryCopy::new();
        for (i, e) in chunk.iter().enumerate() {
            let r = &e.record;
            out.row(24);
            out.uuid(Some(e.call_history_id));
            out.uuid(Some(r.company_id));
            out.uuid(r.lead_id);
            out.uuid(r.employee_id);
            out.text(r.outcome.map(|o| o.as_str()));
            out.text(r.notes.as_deref());
            out.timestamp(Some(r.call_date.unwrap_or(e.received_at)));
            out.text(r.caller_number.as_deref());
            out.text(r.recipient_number.as_deref());
            out.field(r.duration_seconds.map(|d| d.to_be_bytes()));
            out.text(r.recording_url.as_deref());
            out.text(r.call_status.map(|s| s.as_str()));
            out.timestamp(r.start_time);
            out.timestamp(r.end_time);
            out.text(r.external_call_id.as_deref());
            out.text(r.external_system.as_deref());
            out.field(r.next_follow_up.map(|d| {
                let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1).expect("a date");
                (i32::try_from((d - epoch).num_days()).unwrap_or(i32::MAX)).to_be_bytes()
            }));
            out.field(r.next_follow_up_time.map(|t| {
                let micros = (t - chrono::NaiveTime::MIN).num_microseconds().unwrap_or(0);
                micros.to_be_bytes()
            }));
            out.field(r.auto_call_followup.map(|b| [u8::from(b)]));
            out.field(r.call_details.as_ref().map(|d| {
                let mut v = vec![1u8]; // jsonb binary format version
                serde_json::to_writer(&mut v, d).expect("a map serializes");
                v
            }));
            out.timestamp(Some(e.received_at));
            out.field(Some(((k * batch + i) as i64).to_be_bytes()));
            out.field(Some([1u8]));
            out.text(Some("kbench"));
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY bench_staging ({CEILING_COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        copy.send(out.finish()).await?;
        copy.finish().await.context("binary COPY")?;
        sqlx::query(&format!(
            "INSERT INTO bench_ceiling ({CEILING_COLUMNS}) SELECT {CEILING_COLUMNS} FROM bench_staging \
             ON CONFLICT (id) DO NOTHING"
        ))
        .execute(&mut *tx)
        .await
        .context("insert from staging")?;
        sqlx::query("TRUNCATE bench_staging")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(conn);
    ensure_rows(&pool, count).await?;
    sqlx::query("DROP TABLE bench_ceiling")
        .execute(&pool)
        .await?;
    println!(
        "db_ceiling_copy count={count} batch={batch} seconds={secs:.2} rows_per_sec={:.0}",
        count as f64 / secs
    );
    Ok(())
}

/// Rows in Postgres' binary COPY format (header, per row a field count and per field a
/// length and the value in the type's binary send format, trailer).
struct BinaryCopy(Vec<u8>);

impl BinaryCopy {
    fn new() -> Self {
        let mut buf = b"PGCOPY\n\xff\r\n\0".to_vec();
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        BinaryCopy(buf)
    }
    fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }
    fn field(&mut self, value: Option<impl AsRef<[u8]>>) {
        match value {
            None => self.0.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                let v = v.as_ref();
                self.0
                    .extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
                self.0.extend_from_slice(v);
            }
        }
    }
    fn uuid(&mut self, v: Option<Uuid>) {
        self.field(v.map(|u| *u.as_bytes()));
    }
    fn text(&mut self, v: Option<&str>) {
        self.field(v);
    }
    /// Microseconds since 2000-01-01 UTC.
    fn timestamp(&mut self, v: Option<chrono::DateTime<Utc>>) {
        const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
        self.field(v.map(|t| (t.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes()));
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

async fn worker(
    nats_url: &str,
    database_url: &str,
    count: i64,
    batch_size: u32,
    batches_in_flight: u32,
) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    let run = persist_worker::config::RunArgs {
        metrics_addr: "127.0.0.1:0".parse()?,
        batch_size,
        batches_in_flight,
        ..Default::default()
    };
    let cli = callcap_tests::pipeline::worker_cli(nats_url, database_url, run);
    let cancel = callcap::shutdown::Shutdown::new();
    let started = Instant::now();
    let c = cancel.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let task = tokio::spawn(async move { persist_worker::run(listener, &cli, None, c).await });
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM call_history")
            .fetch_one(&pool)
            .await?;
        if n >= count {
            break;
        }
        if task.is_finished() {
            task.await??;
            anyhow::bail!("the worker stopped before storing all rows ({n} of {count})");
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "worker did not finish: {n} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time from the worker's start to the last commit, read from the rows themselves.
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(stored_at) - min(stored_at))::float8 FROM call_history",
    )
    .fetch_one(&pool)
    .await?;
    let wall = started.elapsed().as_secs_f64();
    cancel.trigger();
    let _ = task.await;
    println!(
        "worker count={count} batch_size={batch_size} batches_in_flight={batches_in_flight} seconds_wall={wall:.2} seconds_first_to_last_commit={span:.2} rows_per_sec={:.0}",
        count as f64 / span.max(1e-3)
    );
    Ok(())
}

/// How `e2e` loads the gateway.
#[derive(Clone, Copy)]
struct Load {
    seconds: u64,
    concurrency: usize,
    post_only: bool,
    rate: Option<f64>,
}

async fn e2e(
    gateway: &str,
    key: &str,
    company: Uuid,
    database_url: &str,
    load: &Load,
) -> anyhow::Result<()> {
    let Load {
        seconds,
        concurrency,
        post_only,
        rate,
    } = *load;
    let pool = sqlx::PgPool::connect(database_url).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let url = format!("{gateway}/v1/calls");
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let run_id = Uuid::new_v4().simple().to_string();
    let started = Utc::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, key, counter, run_id) = (
            http.clone(),
            url.clone(),
            key.to_owned(),
            counter.clone(),
            run_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut accepted: Vec<(Uuid, chrono::DateTime<Utc>)> = Vec::new();
            let mut refused = 0u64;
            // Paced: each client sends its share of the rate on a fixed schedule.
            let mut pace = rate.map(|r| {
                let period = Duration::from_secs_f64(concurrency as f64 / r.max(0.001));
                let mut t = tokio::time::interval(period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < deadline {
                if let Some(t) = pace.as_mut() {
                    t.tick().await;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let body = callcap_tests::payloads::complete(company, &format!("E2E-{run_id}-{n}"));
                let Ok(resp) = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .json(&body)
                    .send()
                    .await
                else {
                    refused += 1;
                    continue;
                };
                if resp.status() != reqwest::StatusCode::CREATED {
                    refused += 1;
                    continue;
                }
                let at = Utc::now();
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                if let Some(id) = v["data"]["call_history_id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    accepted.push((id, at));
                }
            }
            (accepted, refused)
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (a, r) = t.await?;
        accepted.extend(a);
        refused += r;
    }
    if post_only {
        let span = (Utc::now() - started).num_milliseconds() as f64 / 1000.0;
        println!(
            "e2e_post_only seconds={seconds} concurrency={concurrency} accepted={} refused={refused} records_per_sec={:.0}",
            accepted.len(),
            accepted.len() as f64 / span.max(1e-3),
        );
        return Ok(());
    }
    // The run's rows are its company's (a fresh company per run): count until every
    // accepted record is there, then read when each was stored.
    let wait_started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM call_history WHERE company_id = $1")
            .bind(company)
            .fetch_one(&pool)
            .await?;
        if n as usize >= accepted.len() || wait_started.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: Vec<(Uuid, chrono::DateTime<Utc>)> =
        sqlx::query_as("SELECT id, stored_at FROM call_history WHERE company_id = $1")
            .bind(company)
            .fetch_all(&pool)
            .await?;
    let stored: std::collections::HashMap<Uuid, chrono::DateTime<Utc>> = rows.into_iter().collect();
    let mut lag = Histogram::<u64>::new(3)?;
    for (id, at) in &accepted {
        if let Some(s) = stored.get(id) {
            lag.record((*s - *at).num_microseconds().unwrap_or(0).max(0) as u64)?;
        }
    }
    let last = stored.values().max().copied().unwrap_or(started);
    let span = (last - started).num_milliseconds() as f64 / 1000.0;
    println!(
        "e2e seconds={seconds} concurrency={concurrency} accepted={} refused={refused} stored={} \
         records_per_sec={:.0} lag_p50_ms={:.1} lag_p99_ms={:.1} lag_max_ms={:.1}",
        accepted.len(),
        stored.len(),
        stored.len() as f64 / span.max(1e-3),
        lag.value_at_quantile(0.5) as f64 / 1000.0,
        lag.value_at_quantile(0.99) as f64 / 1000.0,
        lag.max() as f64 / 1000.0,
    );
    let missing = accepted
        .iter()
        .filter(|(id, _)| !stored.contains_key(id))
        .count();
    anyhow::ensure!(missing == 0, "{missing} accepted records were not stored");
    Ok(())
}

/// See [`Cmd::Encoded`].
async fn encoded(
    gateway: &str,
    key: &str,
    company: Uuid,
    encoding: &str,
    records: usize,
    batches: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let run_id = Uuid::new_v4().simple().to_string();
    let mut plain_bytes = 0usize;
    let bodies: Vec<Bytes> = (0..batches)
        .map(|b| {
            let calls: Vec<serde_json::Value> = (0..records)
                .map(|i| varied(company, &format!("ENC-{run_id}-{b}-{i}")))
                .collect();
            let json = serde_json::to_vec(&serde_json::json!({ "calls": calls }))
                .expect("a batch serializes");
            plain_bytes += json.len();
            Bytes::from(if encoding == "plain" {
                json
            } else {
                callcap_tests::payloads::compress(encoding, &json)
            })
        })
        .collect();
    let wire_bytes: usize = bodies.iter().map(Bytes::len).sum();
    let url = format!("{gateway}/v1/calls/batch");
    let mut headers = vec![
        ("x-api-key".to_owned(), key.to_owned()),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    if encoding != "plain" {
        headers.push(("content-encoding".to_owned(), encoding.to_owned()));
    }
    let prepared = bodies
        .into_iter()
        .map(|body| Prepared {
            url: url.clone(),
            headers: headers.clone(),
            body,
        })
        .collect();
    let sent = send_all(prepared, concurrency, &[reqwest::StatusCode::CREATED]).await?;
    let (secs, failed, pct) = (sent.secs, sent.failed, |p| sent.pct_ms(p));
    let latencies = &sent.latencies;
    let stored = latencies.len() * records;
    println!(
        "encoding={encoding} batches={} records_per_sec={:.0} p50_ms={:.1} p99_ms={:.1} failed={failed} wire_bytes_per_record={:.0} plain_bytes_per_record={:.0} ratio={:.3}",
        latencies.len(),
        stored as f64 / secs,
        pct(0.50),
        pct(0.99),
        wire_bytes as f64 / (batches * records) as f64,
        plain_bytes as f64 / (batches * records) as f64,
        wire_bytes as f64 / plain_bytes as f64,
    );
    Ok(())
}

/// A request prepared before the clock starts.
struct Prepared {
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// What [`send_all`] measured.
struct Sent {
    secs: f64,
    /// Latencies of the answers with an expected status, sorted.
    latencies: Vec<Duration>,
    failed: u64,
}

impl Sent {
    fn pct_ms(&self, p: f64) -> f64 {
        let l = &self.latencies;
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// POSTs every prepared request from `concurrency` clients, as fast as answered.
async fn send_all(
    requests: Vec<Prepared>,
    concurrency: usize,
    expected: &'static [reqwest::StatusCode],
) -> anyhow::Result<Sent> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, requests, next) = (http.clone(), requests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(r) = requests.get(i) else { break };
                let mut req = http.post(&r.url);
                for (k, v) in &r.headers {
                    req = req.header(k, v);
                }
                let t = Instant::now();
                match req.body(r.body.clone()).send().await {
                    Ok(resp) if expected.contains(&resp.status()) => {
                        let _ = resp.bytes().await;
                        latencies.push(t.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        latencies.extend(l);
        failed += f;
    }
    latencies.sort();
    Ok(Sent {
        secs: started.elapsed().as_secs_f64(),
        latencies,
        failed,
    })
}

/// Where Twilio-mode callbacks go and how they are signed.
struct TwilioTarget {
    callback_url: String,
    public_url: String,
    token: String,
}

/// See [`Cmd::Callbacks`].
async fn callbacks(
    gateway: &str,
    key: &str,
    company: Uuid,
    twilio: Option<&TwilioTarget>,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let run_id = Uuid::new_v4().simple().to_string();
    let prepared: Vec<Prepared> = (0..requests)
        .map(|i| {
            let sid = format!("CA{run_id}{i:08}");
            match twilio {
                None => Prepared {
                    url: format!("{gateway}/v1/calls"),
                    headers: vec![
                        ("x-api-key".into(), key.into()),
                        ("content-type".into(), "application/json".into()),
                    ],
                    body: Bytes::from(
                        serde_json::to_vec(&serde_json::json!({
                            "company_id": company,
                            "external_call_id": sid,
                            "external_system": "twilio",
                            "caller_number": "+14155550100",
                            "recipient_number": "+919876543210",
                            "call_status": "completed",
                            "duration_seconds": 42,
                            "end_time": "2026-12-01T10:00:47.000Z",
                            "start_time": "2026-12-01T10:00:05.000Z",
                            "call_details": {"AccountSid": "AC0123456789abcdef0123456789abcdef", "ApiVersion": "2010-04-01", "Direction": "outbound-api"},
                        }))
                        .expect("a record serializes"),
                    ),
                },
                Some(t) => {
                    let mut params = vec![
                        ("AccountSid", "AC0123456789abcdef0123456789abcdef".to_owned()),
                        ("ApiVersion", "2010-04-01".to_owned()),
                        ("CallDuration", "42".to_owned()),
                        ("CallSid", sid),
                        ("CallStatus", "completed".to_owned()),
                        ("Direction", "outbound-api".to_owned()),
                        ("From", "+14155550100".to_owned()),
                        ("Timestamp", "Tue, 01 Dec 2026 10:00:47 +0000".to_owned()),
                        ("To", "+919876543210".to_owned()),
                    ];
                    params.sort();
                    let path = t
                        .callback_url
                        .strip_prefix(&t.public_url)
                        .expect("the callback URL is under the public URL");
                    let mut signed = t.callback_url.clone();
                    for (k, v) in &params {
                        signed.push_str(k);
                        signed.push_str(v);
                    }
                    let mac = ring::hmac::sign(
                        &ring::hmac::Key::new(
                            ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
                            t.token.as_bytes(),
                        ),
                        signed.as_bytes(),
                    );
                    let body: String = url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
                        .finish();
                    Prepared {
                        url: format!("{gateway}{path}"),
                        headers: vec![
                            (
                                "x-twilio-signature".into(),
                                base64::engine::general_purpose::STANDARD.encode(mac.as_ref()),
                            ),
                            (
                                "content-type".into(),
                                "application/x-www-form-urlencoded".into(),
                            ),
                        ],
                        body: Bytes::from(body),
                    }
                }
            }
        })
        .collect();
    let sent = send_all(
        prepared,
        concurrency,
        &[
            reqwest::StatusCode::CREATED,
            reqwest::StatusCode::NO_CONTENT,
        ],
    )
    .await?;
    println!(
        "mode={} requests={} per_sec={:.0} p50_ms={:.2} p99_ms={:.2} failed={}",
        if twilio.is_some() { "twilio" } else { "api" },
        sent.latencies.len(),
        sent.latencies.len() as f64 / sent.secs,
        sent.pct_ms(0.50),
        sent.pct_ms(0.99),
        sent.failed
    );
    Ok(())
}

/// Example 2 with the values a real dialer's records vary in (lead, agent, numbers,
/// duration, times, recording, notes) drawn at random, so that a compressed batch is not
/// just one record repeated.
fn varied(company: Uuid, external_call_id: &str) -> serde_json::Value {
    const PHRASES: [&str; 16] = [
        "Customer interested in premium package.",
        "Needs time to discuss with spouse.",
        "Asked for a call back next week.",
        "Not interested at the moment.",
        "Wants a quote by email.",
        "Already a customer, upsell possible.",
        "Line busy on first attempt.",
        "Spoke to the assistant, decision maker away.",
        "Requested product brochure.",
        "Complained about the previous invoice.",
        "Happy with the demo.",
        "Budget approved for next quarter.",
        "Prefers WhatsApp follow-up.",
        "Do not call before 10am.",
        "Transferred to sales manager.",
        "Left a voicemail.",
    ];
    let r = Uuid::new_v4().as_u128();
    let pick = |shift: u32, n: u128| ((r >> shift) % n) as u64;
    let mut v = callcap_tests::payloads::complete(company, external_call_id);
    v["lead_id"] = Uuid::new_v4().to_string().into();
    v["employee_id"] = Uuid::new_v4().to_string().into();
    v["caller_number"] = format!("+9198{:08}", pick(0, 100_000_000)).into();
    v["recipient_number"] = format!("+9191{:08}", pick(27, 100_000_000)).into();
    let duration = pick(54, 3600);
    let start = 8 * 3600 + pick(66, 10 * 3600);
    let end = start + duration;
    let hms = |t: u64| {
        format!(
            "2025-11-25T{:02}:{:02}:{:02}Z",
            t / 3600,
            t / 60 % 60,
            t % 60
        )
    };
    v["duration_seconds"] = duration.into();
    v["start_time"] = hms(start).into();
    v["call_date"] = hms(start).into();
    v["end_time"] = hms(end).into();
    v["recording_url"] = format!(
        "https://your-system.com/recordings/{}.mp3",
        Uuid::new_v4().simple()
    )
    .into();
    v["notes"] = format!(
        "{} {} {}",
        PHRASES[pick(80, 16) as usize],
        PHRASES[pick(84, 16) as usize],
        PHRASES[pick(88, 16) as usize]
    )
    .into();
    v["call_details"]["agent_name"] = format!("Agent {}", pick(92, 200)).into();
    v
}

struct Isolation {
    gateway: String,
    hot: (String, Uuid),
    quiet: (String, Uuid),
    database_url: String,
    warmup: Duration,
    burst: Duration,
    connections: usize,
    records: usize,
    quiet_interval: Duration,
}

/// Milliseconds at quantile `q` of `v` (sorted here).
fn quantile_ms(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

async fn isolation(o: &Isolation) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&o.database_url).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(o.connections + 4)
        .build()?;
    let run = Uuid::new_v4().simple().to_string();
    let stop_quiet = callcap::shutdown::Shutdown::new();
    // The quiet company: open loop, one record per interval, each post its own task so a
    // slow answer never delays the next record.
    let quiet = {
        let (http, stop, run) = (http.clone(), stop_quiet.clone(), run.clone());
        let url = format!("{}/v1/calls", o.gateway);
        let (key, company) = o.quiet.clone();
        let every = o.quiet_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut posts = Vec::new();
            let mut n = 0u64;
            loop {
                tokio::select! {
                    () = stop.triggered() => break,
                    _ = tick.tick() => {}
                }
                n += 1;
                let body = callcap_tests::payloads::complete(company, &format!("Q-{run}-{n}"));
                let (http, url, key) = (http.clone(), url.clone(), key.clone());
                posts.push(tokio::spawn(async move {
                    http.post(&url)
                        .header("x-api-key", &key)
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == reqwest::StatusCode::CREATED)
                }));
            }
            let mut accepted = 0u64;
            for p in posts {
                accepted += u64::from(p.await.unwrap_or(false));
            }
            accepted
        })
    };
    tokio::time::sleep(o.warmup).await;
    let burst_start = Utc::now();
    let deadline = Instant::now() + o.burst;
    let mut hot = Vec::new();
    for c in 0..o.connections {
        let (http, run) = (http.clone(), run.clone());
        let url = format!("{}/v1/calls/batch", o.gateway);
        let (key, company) = o.hot.clone();
        let records = o.records;
        hot.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let calls: Vec<serde_json::Value> = (0..records)
                    .map(|i| {
                        callcap_tests::payloads::complete(company, &format!("H-{run}-{c}-{n}-{i}"))
                    })
                    .collect();
                let Ok(resp) = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .json(&serde_json::json!({ "calls": calls }))
                    .send()
                    .await
                else {
                    continue;
                };
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                accepted += v["accepted"].as_u64().unwrap_or(0);
            }
            accepted
        }));
    }
    let mut hot_accepted = 0u64;
    for t in hot {
        hot_accepted += t.await?;
    }
    let burst_secs = (Utc::now() - burst_start).num_milliseconds() as f64 / 1000.0;
    let count = |company: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM call_history WHERE company_id = $1")
                .bind(company)
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
        }
    };
    let drain_deadline = Instant::now() + Duration::from_secs(1800);
    while (count(o.hot.1).await as u64) < hot_accepted {
        anyhow::ensure!(
            Instant::now() < drain_deadline,
            "the hot company's {hot_accepted} records were not all stored in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_at = Utc::now();
    // A few more quiet records after the backlog is gone, then stop and wait for them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_quiet.trigger();
    let quiet_accepted = quiet.await?;
    let quiet_deadline = Instant::now() + Duration::from_secs(120);
    while (count(o.quiet.1).await as u64) < quiet_accepted {
        anyhow::ensure!(
            Instant::now() < quiet_deadline,
            "quiet records not all stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lags: Vec<(chrono::DateTime<Utc>, f64)> = sqlx::query_as(
        "SELECT received_at, extract(epoch from stored_at - received_at)::float8 * 1000 \
         FROM call_history WHERE company_id = $1",
    )
    .bind(o.quiet.1)
    .fetch_all(&pool)
    .await?;
    let mut baseline: Vec<f64> = lags
        .iter()
        .filter(|(at, _)| *at < burst_start)
        .map(|(_, ms)| *ms)
        .collect();
    let mut during: Vec<f64> = lags
        .iter()
        .filter(|(at, _)| *at >= burst_start && *at <= drained_at)
        .map(|(_, ms)| *ms)
        .collect();
    let (first, last): (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as(
            "SELECT min(stored_at), max(stored_at) FROM call_history WHERE company_id = $1",
        )
        .bind(o.hot.1)
        .fetch_one(&pool)
        .await?;
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => f64::NAN,
    };
    let accept_rate = hot_accepted as f64 / burst_secs.max(1e-3);
    let drain_rate = hot_accepted as f64 / span.max(1e-3);
    println!(
        "isolation hot_accepted={hot_accepted} accept_rate={accept_rate:.0} drain_rate={drain_rate:.0} \
         outrun={:.2} quiet_baseline_n={} quiet_baseline_p99_ms={:.0} quiet_n={} quiet_p50_ms={:.0} \
         quiet_p99_ms={:.0} quiet_max_ms={:.0}",
        accept_rate / drain_rate,
        baseline.len(),
        quantile_ms(&mut baseline, 0.99),
        during.len(),
        quantile_ms(&mut during, 0.50),
        quantile_ms(&mut during, 0.99),
        quantile_ms(&mut during, 1.0),
    );
    Ok(())
}
