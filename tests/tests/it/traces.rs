//! Traces end to end: a dialer's `traceparent` continued by the gateway, carried on the
//! NATS message, continued by the worker, and received by a real OTLP/HTTP receiver
//! (tests/otlp/receiver.py, decoding with the OpenTelemetry project's protobuf types).
//! And with traces off: the dialer's trace id still in both binaries' log lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use callcap_tests::{eventually, payloads, stack::Stack};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use uuid::Uuid;

/// An OTLP/HTTP receiver process and the file it writes spans to.
struct Receiver {
    _child: tokio::process::Child,
    endpoint: String,
    spans: PathBuf,
}

impl Receiver {
    async fn start(dir: &Path) -> Receiver {
        let spans = dir.join("spans.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/receiver.py");
        let mut child = tokio::process::Command::new(callcap_tests::providers::python())
            .arg(script)
            .arg(&spans)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 with opentelemetry-proto (deploy/lib.sh ensure_otlp_proto)");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver to print its port")
            .unwrap()
            .expect("the receiver's port line (is opentelemetry-proto installed?)");
        Receiver {
            _child: child,
            endpoint: format!("http://127.0.0.1:{}", port.trim()),
            spans,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a span line"))
            .collect()
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>() | 1))
        .collect()
}

fn by_id<'a>(spans: &'a [Value], id: &str) -> Option<&'a Value> {
    spans.iter().find(|s| s["span_id"] == id)
}

fn named<'a>(spans: &'a [Value], trace: &str, service: &str, name: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["trace_id"] == trace && s["service"] == service && s["name"] == name)
        .collect()
}

/// Lines of a log file holding `needle`.
fn lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

async fn post(base: &str, key: &str, record: &Value, traceparent: &str, rid: &str) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/calls"))
        .header("x-api-key", key)
        .header("traceparent", traceparent)
        .header("tracestate", "dialer=abc")
        .header("x-request-id", rid)
        .json(record)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
}

#[tokio::test]
async fn one_posts_trace_runs_from_the_dialers_parent_through_the_gateway_to_the_workers_row() {
    let stack = Stack::new().backend().await;
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path()).await;
    let otel = |extra: &[(&'static str, &str)]| {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    };
    let (gw_log, worker_log) = (
        dir.path().join("gateway.log"),
        dir.path().join("worker.log"),
    );
    let (_gw, base) = stack
        .gateway_process_logged(
            crate::GATEWAY_BIN,
            &otel(&[("RUST_LOG", "info,ingest_gateway=debug")]),
            &gw_log,
        )
        .await;
    let _worker = stack.workers.process_logged(
        crate::WORKER_BIN,
        callcap_tests::free_port(),
        &otel(&[("RUST_LOG", "warn,persist_worker::consume=debug")]),
        &worker_log,
    );

    // First a call whose dialer did not sample its trace: the standard parent-based
    // sampler exports none of it.
    let unsampled = random_hex(16);
    let mut quiet = payloads::quick_start(stack.company);
    quiet["external_call_id"] = "TRACE-UNSAMPLED".into();
    post(
        &base,
        &stack.key,
        &quiet,
        &format!("00-{unsampled}-{}-00", random_hex(8)),
        "req-unsampled",
    )
    .await;

    let (trace, parent) = (random_hex(16), random_hex(8));
    let mut record = payloads::quick_start(stack.company);
    record["external_call_id"] = "TRACE-1".into();
    post(
        &base,
        &stack.key,
        &record,
        &format!("00-{trace}-{parent}-01"),
        "req-traced-1",
    )
    .await;

    let spans = eventually(
        Duration::from_secs(30),
        "the worker's span of the record at the receiver",
        || async {
            let spans = receiver.spans();
            (!named(&spans, &trace, "persist-worker", "store record").is_empty()
                && !named(&spans, &trace, "ingest-gateway", "request").is_empty())
            .then_some(spans)
        },
    )
    .await;
    let show = || serde_json::to_string_pretty(&spans).unwrap();

    // The gateway continued the dialer's trace: its request span's parent is the
    // dialer's span, and auth, validate and publish sit under it.
    let request = named(&spans, &trace, "ingest-gateway", "request")[0];
    assert_eq!(request["parent_span_id"], parent.as_str(), "{}", show());
    for step in ["auth", "validate", "publish"] {
        let s = named(&spans, &trace, "ingest-gateway", step);
        assert_eq!(s.len(), 1, "one {step} span: {}", show());
        assert_eq!(
            s[0]["parent_span_id"],
            request["span_id"],
            "{step}: {}",
            show()
        );
    }
    let publish = named(&spans, &trace, "ingest-gateway", "publish")[0];
    assert!(
        publish["attributes"]["stream_seq"].as_i64().unwrap_or(0) > 0,
        "{}",
        show()
    );
    // Probes are not traced.
    assert!(spans.iter().all(|s| s["attributes"]["path"] != "/readyz"));
    // The atomic batch it went in links to it.
    assert!(
        spans.iter().any(|s| s["name"] == "atomic batch"
            && s["links"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["span_id"] == publish["span_id"])),
        "no batch span links to the publish: {}",
        show()
    );

    // The worker continued it from the NATS message: the record's span is the publish
    // span's child, in the same trace, and links to the batch transaction, whose pull,
    // decode, upsert, commit and ack are its children.
    let store = named(&spans, &trace, "persist-worker", "store record")[0];
    assert_eq!(store["parent_span_id"], publish["span_id"], "{}", show());
    assert_eq!(store["attributes"]["request_id"], "req-traced-1");
    assert_eq!(store["attributes"]["via"], "consume");
    let batch_link = &store["links"][0];
    let batch = eventually(
        Duration::from_secs(10),
        "the worker's batch span",
        || async {
            receiver
                .spans()
                .into_iter()
                .find(|s| s["span_id"] == batch_link["span_id"])
        },
    )
    .await;
    assert_eq!(batch["name"], "write batch");
    let spans = receiver.spans();
    for step in ["pull", "decode", "upsert", "commit", "ack"] {
        assert!(
            spans
                .iter()
                .any(|s| s["name"] == step && s["parent_span_id"] == batch["span_id"]),
            "no {step} span under the batch: {}",
            serde_json::to_string_pretty(&spans).unwrap()
        );
    }
    assert!(by_id(&spans, store["span_id"].as_str().unwrap()).is_some());

    // Nothing of the unsampled trace was exported (it went earlier through the same
    // exporters, which send in order).
    assert!(
        spans.iter().all(|s| s["trace_id"] != unsampled.as_str()),
        "an unsampled trace was exported"
    );

    // The record's log lines name both its request id and its trace id, in both binaries.
    for (log, what) in [
        (&gw_log, "record accepted"),
        (&worker_log, "record written"),
    ] {
        let lines = lines_with(log, what);
        let line = lines
            .iter()
            .find(|l| l.contains("req-traced-1"))
            .unwrap_or_else(|| panic!("no {what:?} line with the request id in {lines:?}"));
        assert!(
            line.contains(&trace),
            "{what} line without the trace id: {line}"
        );
    }
    // A replay continues the same trace: the message still carries the publish span's
    // context.
    let out = callcap_tests::pipeline::admin_command_env(
        crate::WORKER_BIN,
        &stack.nats.url(),
        &["replay", "--from-seq", "1", "--quiet"],
        &[
            ("DATABASE_URL", stack.db.url.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        callcap_tests::pipeline::output_text(&out)
    );
    let replayed = eventually(Duration::from_secs(20), "the replay's span", || async {
        receiver.spans().into_iter().find(|s| {
            s["trace_id"] == trace.as_str()
                && s["name"] == "store record"
                && s["attributes"]["via"] == "replay"
        })
    })
    .await;
    assert_eq!(replayed["parent_span_id"], publish["span_id"]);
    assert_eq!(replayed["service"], "persist-worker");
    // The row is there.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM call_history WHERE external_call_id = 'TRACE-1'")
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn with_traces_off_the_dialers_trace_id_is_still_in_both_binaries_log_lines() {
    let stack = Stack::new().backend().await;
    let dir = tempfile::tempdir().unwrap();
    let (gw_log, worker_log) = (
        dir.path().join("gateway.log"),
        dir.path().join("worker.log"),
    );
    let (_gw, base) = stack
        .gateway_process_logged(
            crate::GATEWAY_BIN,
            &[("RUST_LOG", "info,ingest_gateway=debug".to_owned())],
            &gw_log,
        )
        .await;
    let _worker = stack.workers.process_logged(
        crate::WORKER_BIN,
        callcap_tests::free_port(),
        &[("RUST_LOG", "info,persist_worker=debug".to_owned())],
        &worker_log,
    );
    let trace = random_hex(16);
    let mut record = payloads::quick_start(stack.company);
    record["external_call_id"] = "TRACE-OFF".into();
    post(
        &base,
        &stack.key,
        &record,
        &format!("00-{trace}-{}-01", random_hex(8)),
        "req-untraced",
    )
    .await;
    let line = eventually(
        Duration::from_secs(20),
        "the worker's record line",
        || async {
            lines_with(&worker_log, "record written")
                .into_iter()
                .find(|l| l.contains("req-untraced"))
        },
    )
    .await;
    assert!(line.contains(&trace), "{line}");
    let gw_line = lines_with(&gw_log, "record accepted")
        .into_iter()
        .find(|l| l.contains("req-untraced"))
        .expect("the gateway's record line");
    assert!(gw_line.contains(&trace), "{gw_line}");
    // A malformed traceparent is neither forwarded nor logged.
    let mut other = payloads::quick_start(stack.company);
    other["external_call_id"] = "TRACE-BAD".into();
    post(
        &base,
        &stack.key,
        &other,
        "00-ZZZZ-not-a-trace-01",
        "req-bad-trace",
    )
    .await;
    let line = eventually(Duration::from_secs(20), "the worker's line", || async {
        lines_with(&worker_log, "record written")
            .into_iter()
            .find(|l| l.contains("req-bad-trace"))
    })
    .await;
    assert!(!line.contains("ZZZZ"), "{line}");
}

// ---- `persist-worker trace CALL-ID`: where one call's record is ----

/// Runs `persist-worker trace` with `args`; its JSON report and exit code.
async fn trace_cmd(
    nats_url: &str,
    db: &callcap_tests::db::TestDb,
    erasure_key: Option<&Path>,
    args: &[&str],
) -> (Value, Option<i32>, String) {
    let key = erasure_key.map(|k| k.display().to_string());
    let mut env = vec![("DATABASE_URL", db.url.as_str())];
    if let Some(k) = &key {
        env.push(("ERASURE_KEY_FILE", k.as_str()));
    }
    let json = [&["trace", "--json"][..], args].concat();
    let out =
        callcap_tests::pipeline::admin_command_env(crate::WORKER_BIN, nats_url, &json, &env).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "trace {args:?} printed no JSON ({e}): {}",
            callcap_tests::pipeline::output_text(&out)
        )
    });
    // The same answer for people, as pasted into a ticket.
    let text = callcap_tests::pipeline::admin_command_env(
        crate::WORKER_BIN,
        nats_url,
        &[&["trace"][..], args].concat(),
        &env,
    )
    .await;
    (
        report,
        out.status.code(),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

#[tokio::test]
async fn trace_says_a_pending_record_is_pending_then_stored_and_acked() {
    let stack = Stack::new().stored().await;
    let company = stack.company.to_string();
    let mut record = payloads::quick_start(stack.company);
    record["external_call_id"] = "CALL-123".into();
    record["call_status"] = "completed".into();
    let (status, body) = stack.gw.post_call(&stack.key, &record).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["data"]["call_history_id"].as_str().unwrap().to_owned();

    // No worker yet: accepted, on the stream, not delivered.
    let url = stack.nats.url();
    let (r, code, text) =
        trace_cmd(&url, &stack.db, None, &["--company", &company, "CALL-123"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(r["call_history_id"], id.as_str());
    assert!(r["stored"].is_null(), "{r}");
    let hit = &r["in_stream"][0];
    assert!(hit["seq"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        hit["state"].as_str().unwrap().starts_with("pending")
            || hit["state"].as_str().unwrap().starts_with("no consumer"),
        "{r}"
    );
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .starts_with("accepted, not stored yet"),
        "{r}"
    );
    assert!(
        text.contains("verdict:      accepted, not stored yet"),
        "{text}"
    );

    // A worker stores it: stored, and the stream message acked.
    let _worker = stack.workers.start().await;
    callcap_tests::stack::drained(&url, Duration::from_secs(20)).await;
    // By call_history_id this time: the same call.
    let (r, code, text) = trace_cmd(
        &url,
        &stack.db,
        None,
        &["--company", &company, "--call-history-id", &id],
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(r["external_call_id"], "CALL-123");
    assert_eq!(r["stored"]["call_status"], "completed", "{r}");
    assert_eq!(r["in_stream"][0]["state"], "acked", "{r}");
    assert!(r["verdict"]
        .as_str()
        .unwrap()
        .starts_with("stored: row written"));
    assert!(text.contains("stored:       stored_at "), "{text}");
    assert!(text.contains(": acked [consumer "), "{text}");

    // Another company asking for the same external id finds nothing of this one's, and
    // says so with a non-zero exit.
    let other = stack
        .others
        .first()
        .map(|t| t.company)
        .unwrap_or_else(Uuid::new_v4);
    let (r, code, _) = trace_cmd(
        &url,
        &stack.db,
        None,
        &["--company", &other.to_string(), "CALL-123"],
    )
    .await;
    assert_eq!(code, Some(1), "{r}");
    assert!(
        r["verdict"].as_str().unwrap().starts_with("not found"),
        "{r}"
    );
}

#[tokio::test]
async fn trace_says_why_a_record_was_dead_lettered() {
    let stack = Stack::new().pipeline().await;
    let (status, body) = stack
        .gw
        .post_call(
            &stack.key,
            &serde_json::json!({"company_id": stack.company, "notes": "A's call"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let a_id: Uuid = body["data"]["call_history_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    eventually(Duration::from_secs(20), "A's row", || async {
        (stack.db.count_calls().await == 1).then_some(())
    })
    .await;
    // Company B's record carrying A's id: the worker refuses it (another company's
    // call) and dead-letters it.
    let admin =
        async_nats::jetstream::new(callcap_tests::identities::connect(&stack.nats.url()).await);
    let layout = callcap::partitions::current(&admin).await.unwrap().unwrap();
    let b = Uuid::new_v4();
    let subject = layout
        .partition_of(b)
        .subject(callcap::subjects::Lane::Main, b);
    let forged = callcap::Envelope::new(
        a_id,
        chrono::Utc::now(),
        "kx".into(),
        None,
        callcap::CallRecord::new(b),
    );
    admin
        .publish(subject, forged.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the dead letter", || async {
        (stack.db.count_dead_letters().await == 1).then_some(())
    })
    .await;
    let (r, code, text) = trace_cmd(
        &stack.nats.url(),
        &stack.db,
        None,
        &[
            "--company",
            &b.to_string(),
            "--call-history-id",
            &a_id.to_string(),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    assert!(r["stored"].is_null(), "B has no row: {r}");
    let reason = r["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("another company"), "{r}");
    let verdict = r["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("dead-lettered"), "{r}");
    assert!(verdict.contains("persist-worker dlq redrive"), "{r}");
    assert!(text.contains("dead letter:  id "), "{text}");
}

#[tokio::test]
async fn trace_says_an_erased_record_was_erased_and_names_no_data() {
    let stack = Stack::new().erasure_key().pipeline().await;
    let company = stack.company.to_string();
    let mut record = payloads::quick_start(stack.company);
    record["external_call_id"] = "CALL-ERASED".into();
    let (status, body) = stack.gw.post_call(&stack.key, &record).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    callcap_tests::stack::drained(&stack.nats.url(), Duration::from_secs(20)).await;
    let key = stack.erasure_key.clone().expect("the stack's erasure key");
    let out = callcap_tests::pipeline::admin_command_env(
        crate::WORKER_BIN,
        &stack.nats.url(),
        &[
            "erase",
            "--quiet",
            "--company",
            &company,
            "--external-call-id",
            "CALL-ERASED",
        ],
        &[
            ("DATABASE_URL", stack.db.url.as_str()),
            ("ERASURE_KEY_FILE", &key.display().to_string()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        callcap_tests::pipeline::output_text(&out)
    );
    let (r, code, text) = trace_cmd(
        &stack.nats.url(),
        &stack.db,
        Some(&key),
        &["--company", &company, "CALL-ERASED"],
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    assert!(r["stored"].is_null(), "{r}");
    assert!(r["in_stream"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["erased"][0]["kind"], "external", "{r}");
    assert!(
        r["verdict"].as_str().unwrap().starts_with("erased: "),
        "{r}"
    );
    // The caller's number is in no line of the answer.
    assert!(!text.contains("9876543210"), "{text}");
    // Without the key, the answer says it could not check, and does not claim "not erased".
    let (r, code, _) = trace_cmd(
        &stack.nats.url(),
        &stack.db,
        None,
        &["--company", &company, "CALL-ERASED"],
    )
    .await;
    assert_eq!(code, Some(1), "{r}");
    assert!(
        r["erasures_unchecked"]
            .as_str()
            .unwrap()
            .contains("ERASURE_KEY_FILE"),
        "{r}"
    );
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .contains("erasures not checked"),
        "{r}"
    );
}
