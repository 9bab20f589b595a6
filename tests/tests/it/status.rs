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

/// A screenshot of `url` in a window `width` wide (and tall enough for the page), under
/// target/test-output; its path.
async fn screenshot_at(url: &str, name: &str, width: u32, height: u32) -> PathBuf {
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
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--window-size={width},{height}"))
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
    path
}

/// How many pixels of each of the charts' series colours each horizontal band of `band`
/// rows of a PNG holds.
fn painted(png_path: &std::path::Path, band: usize) -> Vec<Vec<usize>> {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let colours: Vec<[i32; 3]> = callcap::history::COLOURS
        .iter()
        .map(|c| {
            let v = u32::from_str_radix(&c[1..], 16).unwrap();
            [
                (v >> 16) as i32,
                ((v >> 8) & 0xff) as i32,
                (v & 0xff) as i32,
            ]
        })
        .collect();
    let row = info.width as usize * channels;
    let mut bands = Vec::new();
    for (r, line) in buf[..info.buffer_size()].chunks(row).enumerate() {
        if r % band == 0 {
            bands.push(vec![0; colours.len()]);
        }
        let counts = bands.last_mut().unwrap();
        for px in line.chunks(channels) {
            let p = [px[0] as i32, px[1] as i32, px[2] as i32];
            for (i, c) in colours.iter().enumerate() {
                if (0..3).map(|k| (p[k] - c[k]).abs()).sum::<i32>() <= 24 {
                    counts[i] += 1;
                }
            }
        }
    }
    bands
}

/// The charts of a rendered page: (id, series count, each series' path data).
fn charts(dom: &str) -> Vec<(String, usize, Vec<String>)> {
    let mut out = Vec::new();
    for part in dom.split("<figure class=\"chart\" id=\"chart-").skip(1) {
        let id = part[..part.find('"').unwrap()].to_owned();
        let count: usize = {
            let at = part.find("data-series-count=\"").unwrap() + 19;
            part[at..at + part[at..].find('"').unwrap()]
                .parse()
                .unwrap()
        };
        let figure = &part[..part.find("</figure>").unwrap()];
        let paths = figure
            .split("<path d=\"")
            .skip(1)
            .map(|p| p[..p.find('"').unwrap()].to_owned())
            .collect();
        out.push((id, count, paths));
    }
    out
}

/// Each series of each chart drawn on its own (the chart's SVG with the other series
/// taken out), as Chromium paints it at phone and desktop width: a series whose colour is
/// nowhere on its picture was not drawn. (Series with equal values overlap on the page,
/// so they are looked at one by one: one picture per series, stacked in one page.)
async fn assert_charts_painted(dom: &str, name: &str) {
    let mut alone_svgs = Vec::new();
    for part in dom.split("<figure class=\"chart\" id=\"chart-").skip(1) {
        let id = part[..part.find('"').unwrap()].to_owned();
        let svg_start = part.find("<svg viewBox").unwrap();
        let svg = &part[svg_start..svg_start + part[svg_start..].find("</svg>").unwrap() + 6];
        let groups: Vec<&str> = svg
            .split("<g data-series=")
            .skip(1)
            .map(|g| &g[..g.find("</g>").unwrap() + 4])
            .collect();
        assert!(!groups.is_empty(), "chart {id} has no series");
        for i in 0..groups.len() {
            let mut alone = svg.to_owned();
            for (j, other) in groups.iter().enumerate() {
                if j != i {
                    alone = alone.replace(&format!("<g data-series={other}"), "");
                }
            }
            alone_svgs.push((id.clone(), i, alone));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for width in [390_usize, 1280] {
        let band = width * 160 / 600 + 8;
        let mut html = String::from("<!doctype html><html><body style=\"margin:0\">");
        for (_, _, svg) in &alone_svgs {
            html.push_str(&format!(
                "<div style=\"height:{band}px;overflow:hidden\">{svg}</div>"
            ));
        }
        html.push_str("</body></html>");
        let file = dir.path().join(format!("{name}-{width}.html"));
        std::fs::write(&file, html).unwrap();
        let height = u32::try_from(band * alone_svgs.len()).unwrap();
        let shot = screenshot_at(
            &format!("file://{}", file.display()),
            &format!("{name}-series-{width}"),
            u32::try_from(width).unwrap(),
            height,
        )
        .await;
        let bands = painted(&shot, band);
        for (k, (id, i, _)) in alone_svgs.iter().enumerate() {
            let counts = &bands[k];
            assert!(
                counts[i % counts.len()] >= 8,
                "chart {id}, series {i} at {width} px is not painted ({counts:?}); {}",
                shot.display()
            );
        }
    }
}

#[tokio::test]
async fn the_status_pages_draw_the_last_hour_at_phone_and_desktop_width() {
    let stack = Stack::new().backend().await;
    let (_gw, base) = stack.gateway_process(crate::GATEWAY_BIN, &[]).await;
    let metrics_port = callcap_tests::free_port();
    let _worker = stack.workers.process(crate::WORKER_BIN, metrics_port, &[]);
    let worker_page = format!("http://127.0.0.1:{metrics_port}/");
    let stop = CancellationToken::new();
    let poster = {
        let (http, url, key, stop, company) = (
            reqwest::Client::new(),
            format!("{base}/v1/calls"),
            stack.key.clone(),
            stop.clone(),
            stack.company,
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let _ = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .json(&payloads::minimal(company))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Two points (the first at start, the next 10 s later) make the first rates.
    let gateway = callcap_tests::eventually(
        Duration::from_secs(40),
        "the gateway's charts with points",
        || async {
            let dom = rendered(&format!("{base}/status")).await;
            let c = charts(&dom);
            let requests = c.iter().find(|(id, ..)| id == "requests")?;
            let publish = c.iter().find(|(id, ..)| id == "publish")?;
            (dom.contains("data-series=\"201 Created\"")
                && !requests.2.iter().all(String::is_empty)
                && publish.1 == 2
                && publish.2.iter().all(|d| d.starts_with('M')))
            .then_some(dom)
        },
    )
    .await;
    let worker = callcap_tests::eventually(
        Duration::from_secs(40),
        "the worker's charts with points",
        || {
            let url = worker_page.clone();
            async move {
                let dom = rendered(&url).await;
                let c = charts(&dom);
                let records = c.iter().find(|(id, ..)| id == "records")?;
                let backlog = c.iter().find(|(id, ..)| id == "backlog")?;
                let lanes = dom.matches("id=\"pending-").count();
                (records.1 == 2
                    && records.2.iter().all(|d| d.starts_with('M'))
                    && backlog.1 == lanes
                    && backlog.2.iter().all(|d| d.starts_with('M')))
                .then_some(dom)
            }
        },
    )
    .await;
    stop.cancel();
    poster.await.unwrap();
    for dom in [&gateway, &worker] {
        assert_accessible(dom);
        // Every chart says what it shows in words too: a legend line per series.
        for (id, count, paths) in charts(dom) {
            assert_eq!(paths.len(), count, "chart {id}");
        }
    }
    assert!(gateway.contains("201 Created: "), "no legend value");
    assert_charts_painted(&gateway, "status-gateway").await;
    assert_charts_painted(&worker, "status-worker").await;
    // The whole pages at phone and desktop width, for people to look at.
    for width in [390, 1280] {
        screenshot_at(
            &format!("{base}/status"),
            &format!("status-gateway-{width}"),
            width,
            2400,
        )
        .await;
        screenshot_at(&worker_page, &format!("status-worker-{width}"), width, 2800).await;
    }
}
