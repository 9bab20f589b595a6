//! The status pages, in a real browser (Debian's chromium, headless): the gateway's
//! `/status` and the worker's `/` load, say whether they are ready and why, and their
//! numbers move while records flow. Screenshots at phone width go to
//! `target/test-output/` (the path is printed).

use std::path::PathBuf;
use std::time::Duration;

use callcap_tests::payloads;
use callcap_tests::stack::Stack;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

fn chromium() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into())
}

/// The DOM of `url` after chromium has loaded and rendered it.
async fn rendered(url: &str) -> String {
    let out = tokio::process::Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            url,
        ])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "running {} ({e}): install Debian's chromium (deploy/test.sh does)",
                chromium()
            )
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A screenshot of `url` at phone width, kept under target/test-output.
async fn screenshot(url: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-output");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    let out = tokio::process::Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=390,1100",
        ])
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot of {url} at {}", path.display());
    println!("screenshot of {url}: {}", path.display());
    path
}

/// The number in the element with `id`.
fn number(dom: &str, id: &str) -> f64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let text = &dom[at..];
    let start = text.find('>').unwrap() + 1;
    let end = text[start..].find('<').unwrap() + start;
    text[start..end]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("#{id} is not a number: {:?}", &text[start..end]))
}

/// The accessibility basics every page keeps: language, phone viewport, headed tables,
/// and states in words (not only colour).
fn assert_accessible(dom: &str) {
    assert!(dom.contains("<html lang=\"en\""), "no language");
    assert!(dom.contains("name=\"viewport\""), "no viewport for phones");
    assert!(dom.contains("<th scope=\"col\">"), "tables without headers");
    assert!(!dom.contains("<script"), "the page needs no script");
}

#[tokio::test]
async fn the_status_pages_show_readiness_and_figures_that_move_in_a_browser() {
    let stack = Stack::new().backend().await;
    let (_gw, base) = stack.gateway_process(crate::GATEWAY_BIN, &[]).await;
    let metrics_port = callcap_tests::free_port();
    let _worker = stack.workers.process(crate::WORKER_BIN, metrics_port, &[]);
    let worker_page = format!("http://127.0.0.1:{metrics_port}/");
    let (company, key, db) = (stack.company, stack.key.clone(), &stack.db);

    // Records flow for the rest of the test: 8 clients posting.
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (http, url, key, stop) = (
            reqwest::Client::new(),
            format!("{base}/v1/calls"),
            key.clone(),
            stop.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut created = 0u64;
            while !stop.is_cancelled() {
                let r = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .json(&payloads::minimal(company))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == StatusCode::CREATED) {
                    created += 1;
                }
            }
            created
        }));
    }
    callcap_tests::eventually(Duration::from_secs(20), "records stored", || async {
        (db.count_calls().await > 50).then_some(())
    })
    .await;

    let first = rendered(&format!("{base}/status")).await;
    assert_accessible(&first);
    assert!(first.contains("Ready</span> — taking records"), "{first}");
    assert!(first.contains("201 Created"), "{first}");
    assert!(number(&first, "requests-total") > 0.0, "{first}");
    assert!(number(&first, "publish-count") > 0.0, "{first}");
    let records_before = number(&first, "records-total");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = rendered(&format!("{base}/status")).await;
    assert!(
        number(&second, "records-total") > records_before,
        "the gateway's figures do not move"
    );

    let worker_first = callcap_tests::eventually(
        Duration::from_secs(15),
        "the worker's consumer figures",
        || {
            let url = worker_page.clone();
            async move {
                let dom = rendered(&url).await;
                // The page bounds each read at 2 s: on a loaded machine one render may
                // say Postgres is unavailable; the next one must not.
                (dom.contains("id=\"pending\"")
                    && !dom.contains("not read yet")
                    && dom.contains("<td>Postgres</td><td><span class=\"ok\">OK</span>"))
                .then_some(dom)
            }
        },
    )
    .await;
    assert_accessible(&worker_first);
    assert!(
        worker_first.contains("<td>NATS</td><td><span class=\"ok\">OK</span>"),
        "{worker_first}"
    );
    assert!(
        worker_first.contains("<td>Postgres</td><td><span class=\"ok\">OK</span>"),
        "{worker_first}"
    );
    assert!(number(&worker_first, "stored-rate") > 0.0, "{worker_first}");
    assert_eq!(number(&worker_first, "dead-letters"), 0.0);
    screenshot(&format!("{base}/status"), "status-gateway").await;
    screenshot(&worker_page, "status-worker").await;

    stop.cancel();
    let mut created = 0;
    for c in clients {
        created += c.await.unwrap();
    }
    assert!(created > 0);
    // Once the flow stops, the figures say so: the stored rate stays, the backlog drains.
    callcap_tests::eventually(Duration::from_secs(30), "the backlog to drain", || {
        let url = worker_page.clone();
        async move {
            let dom = rendered(&url).await;
            (number(&dom, "pending") == 0.0 && number(&dom, "ack-pending") == 0.0).then_some(())
        }
    })
    .await;
}
