//! The OpenAPI document against the server, by a schema-driven tester (schemathesis, from
//! PyPI): every request the document allows must get an answer it documents, and every
//! schema-valid request must be taken. Positive cases carry the test key's company (a
//! hook, `tests/schemathesis/callcap_hooks.py`); negative cases are sent as generated.

use std::path::Path;

use callcap_tests::stack::Stack;
use uuid::Uuid;

/// `schemathesis run` against `base` in `mode`, with the hooks when `hooks` is set.
async fn schemathesis(
    base: &str,
    key: &str,
    company: Uuid,
    mode: &str,
    hooks: bool,
) -> (bool, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis");
    let mut cmd = tokio::process::Command::new("schemathesis");
    cmd.args([
        "run",
        &format!("{base}/openapi.json"),
        "--checks",
        "all",
        "--mode",
        mode,
        "--max-examples",
        "40",
        "--seed",
        "7",
        // The phases that apply the hooks (the coverage phase sends its own bodies and
        // headers as they are).
        "--phases",
        "examples,fuzzing",
        "--no-color",
        // NUL inside call_details is refused (Postgres' jsonb cannot hold it), a rule no
        // schema of a free-form object can state.
        "--generation-allow-x00",
        "false",
        "-H",
        &format!("x-api-key: {key}"),
    ])
    .env("CALLCAP_COMPANY_ID", company.to_string())
    .env("PYTHONPATH", &dir)
    // No report files, no telemetry: the test machine has no network.
    .env("SCHEMATHESIS_TELEMETRY", "false");
    if hooks {
        cmd.env("SCHEMATHESIS_HOOKS", "callcap_hooks");
    }
    let out = cmd.output().await.unwrap_or_else(|e| {
        panic!("running schemathesis: {e} (deploy/test.sh installs it from PyPI)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn every_request_the_openapi_document_allows_is_answered_as_documented() {
    let stack = Stack::new().backend().await;
    // The real binary: /metrics is served by its recorder, as deployed.
    let (_gw, base) = stack.gateway_process(crate::GATEWAY_BIN, &[]).await;
    let (company, key) = (stack.company, stack.key.clone());
    callcap_tests::eventually(
        std::time::Duration::from_secs(10),
        "the key to reach the gateway",
        || {
            let (base, key) = (base.clone(), key.clone());
            async move {
                let resp = reqwest::Client::new()
                    .post(format!("{base}/v1/calls"))
                    .header("x-api-key", key)
                    .json(&serde_json::json!({"company_id": company}))
                    .send()
                    .await
                    .ok()?;
                (resp.status() == reqwest::StatusCode::CREATED).then_some(())
            }
        },
    )
    .await;
    for (mode, hooks) in [("positive", true)] {
        let (ok, report) = schemathesis(&base, &key, company, mode, hooks).await;
        assert!(
            ok,
            "schemathesis --mode {mode} found disagreements:\n{report}"
        );
    }
}
