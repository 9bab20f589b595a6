//! The integration checks integrators run (the API document's `node test-webhook.js`):
//! `examples/test-webhook.js`, `examples/test_webhook.py`, `ingest-gateway check` and the
//! README's curl one-liner, each against the real pipeline, rows checked in Postgres.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use callcap_tests::db::TestDb;
use callcap_tests::nats::NatsServer;
use callcap_tests::pipeline::{TestGateway, TestWorker};
use uuid::Uuid;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of the checkers against `base` with `key` and `company`.
async fn run_checker(which: &str, base: &str, key: &str, company: Uuid) -> Output {
    let company = company.to_string();
    let args = ["--url", base, "--key", key, "--company", &company];
    let mut cmd = match which {
        "node" => {
            let mut c = tokio::process::Command::new("node");
            c.arg(repo().join("examples/test-webhook.js"));
            c
        }
        "python" => {
            let mut c = tokio::process::Command::new("python3");
            c.arg(repo().join("examples/test_webhook.py"));
            c
        }
        _ => {
            let mut c = tokio::process::Command::new(crate::GATEWAY_BIN);
            c.arg("check");
            c
        }
    };
    cmd.args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running the {which} checker: {e} (Node.js 18+ and python3 are needed; deploy/test.sh installs them)"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn every_checker_sends_both_examples_and_explains_refusals() {
    let nats = NatsServer::start().await;
    let db = TestDb::create().await;
    let gw = TestGateway::start(&nats.url()).await;
    let worker = TestWorker::start(&nats.url(), &db.url).await;
    let company = Uuid::new_v4();
    let key = gw.create_key(company).await;
    let base = gw.base();

    let mut expected_rows = 0;
    for which in ["node", "python", "binary"] {
        let out = run_checker(which, &base, &key, company).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(0), "{which}: {said}");
        assert!(
            said.contains("✓ Example 1 (minimal record): created, call_history_id"),
            "{which}: {said}"
        );
        assert!(
            said.contains("✓ Example 2 (complete record): created, call_history_id"),
            "{which}: {said}"
        );
        assert!(said.contains("Your integration works"), "{which}: {said}");
        expected_rows += 2;
        callcap_tests::eventually(Duration::from_secs(20), "the checker's rows", || async {
            (db.count_calls().await == expected_rows).then_some(())
        })
        .await;

        // A wrong key: exit 1, the status, and what to do about it.
        let out = run_checker(which, &base, "cc_live_wrong", company).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{which}: {said}");
        assert!(said.contains("refused with 401"), "{which}: {said}");
        assert!(
            said.contains("What to do: check the x-api-key value"),
            "{which}: {said}"
        );

        // Another company's id: 403 and why.
        let out = run_checker(which, &base, &key, Uuid::new_v4()).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{which}: {said}");
        assert!(said.contains("refused with 403"), "{which}: {said}");
        assert!(
            said.contains("company_id must be the company your API key was issued for"),
            "{which}: {said}"
        );

        // Nothing listening.
        let closed = format!("http://127.0.0.1:{}", callcap_tests::free_port());
        let out = run_checker(which, &closed, &key, company).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{which}: {said}");
        assert!(said.contains("could not reach"), "{which}: {said}");
    }
    // Example 2 is stored as sent, external id unique to each run.
    let mut systems: Vec<String> = sqlx::query_scalar(
        "SELECT external_system FROM call_history WHERE external_call_id LIKE 'TEST-WEBHOOK-%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    systems.sort();
    assert_eq!(
        systems,
        ["ingest-gateway check", "test-webhook.js", "test_webhook.py"]
    );

    // The README's curl one-liner, as written there.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("curl -sS -X POST \"$CALLCAP_URL"))
        .expect("the README has the curl one-liner");
    let out = tokio::process::Command::new("sh")
        .args(["-c", line])
        .env("CALLCAP_URL", &base)
        .env("CALLCAP_API_KEY", &key)
        .env("CALLCAP_COMPANY_ID", company.to_string())
        .output()
        .await
        .unwrap();
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(answer["success"], true, "{answer}");
    callcap_tests::eventually(Duration::from_secs(20), "the curl record", || async {
        (db.count_calls().await == expected_rows + 1).then_some(())
    })
    .await;
    worker.stop().await;
}
