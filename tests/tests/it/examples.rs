//! The integration checks integrators run (the API document's `node test-webhook.js`):
//! `examples/test-webhook.js`, `examples/test_webhook.py`, `ingest-gateway check` and the
//! README's curl one-liner, each against the real pipeline, rows checked in Postgres.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use callcap_tests::stack::Pipeline;
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
    let Pipeline {
        nats: _nats,
        db,
        gw,
        worker,
        company,
        key,
        ..
    } = Pipeline::start().await;
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

    worker.stop().await;
}

#[tokio::test]
async fn the_readmes_curl_one_liner_works_as_written() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let base = gw.base();
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
        (db.count_calls().await == 1).then_some(())
    })
    .await;
    worker.stop().await;
}

/// The API document's snippets (`examples/snippets/`: curl, JavaScript, Python, PHP), as
/// written there, each against the real pipeline: a 201, and the record's one row.
#[tokio::test]
async fn the_api_documents_snippets_store_their_record() {
    let Pipeline {
        nats: _nats,
        db,
        gw,
        company,
        key,
        worker,
        ..
    } = Pipeline::start().await;
    let dir = repo().join("examples/snippets");
    let php = std::process::Command::new("php")
        .arg("--version")
        .output()
        .is_ok();
    let mut ran = Vec::new();
    for (program, file) in [
        ("sh", "send.sh"),
        ("node", "send.js"),
        ("python3", "send.py"),
        ("php", "send.php"),
    ] {
        if program == "php" && !php && std::env::var_os("CI").is_none() {
            eprintln!(
                "php is not installed here: send.php is checked in CI (deploy/test.sh installs it)"
            );
            continue;
        }
        let out = tokio::process::Command::new(program)
            .arg(dir.join(file))
            .env("CALLCAP_URL", gw.base())
            .env("CALLCAP_API_KEY", &key)
            .env("CALLCAP_COMPANY_ID", company.to_string())
            .output()
            .await
            .unwrap_or_else(|e| panic!("{program} {file}: {e}"));
        let said = text(&out);
        assert!(out.status.success(), "{file}: {said}");
        // Each prints the call's id, as the API document's example does.
        let id = said
            .split(|c: char| !c.is_ascii_hexdigit() && c != '-')
            .find_map(|w| Uuid::parse_str(w).ok())
            .unwrap_or_else(|| panic!("{file} printed no call id: {said}"));
        ran.push((file, id));
    }
    assert!(ran.len() >= 3, "{ran:?}");
    // Every id a snippet was given is a stored row (CALL-12345 is one call per
    // external_system: the curl and JavaScript snippets name one, the others none).
    callcap_tests::eventually(Duration::from_secs(20), "the snippets' records", || async {
        let stored = db.call_ids().await;
        ran.iter().all(|(_, id)| stored.contains(id)).then_some(())
    })
    .await;
    let distinct: std::collections::BTreeSet<_> = ran.iter().map(|(_, id)| *id).collect();
    assert_eq!(db.count_calls().await as usize, distinct.len(), "{ran:?}");
    worker.stop().await;
}

/// A server that answers every request with `answer` and counts what it received.
async fn canned_server(
    answer: Vec<u8>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await;
                let _ = conn.write_all(&answer).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (base, seen)
}

#[tokio::test]
async fn no_checker_follows_a_redirect_or_lets_the_server_drive_the_terminal() {
    use std::sync::atomic::Ordering;
    // Where a hostile redirect points: it must never see a request (the key would be in it).
    let (elsewhere, seen_elsewhere) = canned_server(
        b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 87\r\nconnection: close\r\n\r\n{\"success\":true,\"data\":{\"call_history_id\":\"stolen\",\"created_at\":\"2026-01-01T00:00:00Z\"}}".to_vec(),
    )
    .await;
    for code in ["307 Temporary Redirect", "302 Found"] {
        let answer = format!(
            "HTTP/1.1 {code}\r\nlocation: {elsewhere}/functions/v1/webhook-call-capture\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (base, _) = canned_server(answer.into_bytes()).await;
        for which in ["node", "python", "binary"] {
            let out = run_checker(which, &base, "cc_live_secret", Uuid::new_v4()).await;
            let said = text(&out);
            assert_eq!(out.status.code(), Some(1), "{which} {code}: {said}");
            assert!(
                said.contains(&format!("refused with {}", &code[..3])),
                "{which} {code}: {said}"
            );
            assert!(
                said.contains("The server redirects to"),
                "{which} {code}: {said}"
            );
            assert!(
                !said.contains("Your integration works"),
                "{which} {code}: {said}"
            );
        }
    }
    assert_eq!(
        seen_elsewhere.load(Ordering::SeqCst),
        0,
        "a checker followed a redirect"
    );

    // Terminal escapes (clear screen, window title, clipboard write) in a 4 MB answer: read
    // in part, printed escaped.
    let hostile = "{\"error\":\"Bad\\u001b[2J\",\"message\":\"\\u001b]0;owned\\u0007\\u001b]52;c;ZXZpbA==\\u0007\\r\"}";
    let padded = format!("{hostile}{}", " ".repeat(4 << 20));
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{padded}",
        padded.len()
    );
    let (base, _) = canned_server(answer.into_bytes()).await;
    for which in ["node", "python", "binary"] {
        let out = run_checker(which, &base, "cc_live_secret", Uuid::new_v4()).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{which}: {said}");
        assert!(said.contains("refused with 400"), "{which}: {said}");
        assert!(
            !said
                .chars()
                .any(|c| c == '\u{1b}' || c == '\u{7}' || c == '\r'),
            "{which} printed a control character: {said:?}"
        );
    }
}
