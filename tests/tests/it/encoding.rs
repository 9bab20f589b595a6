//! Compressed request bodies: gzip, deflate and zstd on both routes; unknown encodings
//! refused with 415 naming the accepted ones; the size limits apply to the decompressed
//! bytes, so a decompression bomb gets 413; big answers compressed on request.

use callcap_tests::payloads::{self, compress};
use callcap_tests::pipeline::TestGateway;
use callcap_tests::stack::Edge;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn post_raw(
    gw: &TestGateway,
    path: &str,
    key: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = gw
        .http
        .post(format!("{}{path}", gw.base()))
        .header("x-api-key", key)
        .header("content-type", "application/json");
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn compressed_bodies_are_accepted_bounded_and_refused_when_unknown() {
    let Edge {
        nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;

    let mut sent = 0;
    for encoding in ["gzip", "deflate", "zstd"] {
        let one =
            serde_json::to_vec(&payloads::complete(company, &format!("ENC-{encoding}"))).unwrap();
        for path in ["/v1/calls", "/functions/v1/webhook-call-capture"] {
            let (s, _, body) =
                post_raw(&gw, path, &key, Some(encoding), compress(encoding, &one)).await;
            assert_eq!(
                s,
                StatusCode::CREATED,
                "{encoding} {path}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let calls: Vec<Value> = (0..100)
            .map(|i| payloads::complete(company, &format!("ENC-{encoding}-{i}")))
            .collect();
        let batch = serde_json::to_vec(&json!({ "calls": calls })).unwrap();
        let (s, _, body) = post_raw(
            &gw,
            "/v1/calls/batch",
            &key,
            Some(encoding),
            compress(encoding, &batch),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{encoding} batch: {}",
            String::from_utf8_lossy(&body)
        );
        sent += 1 + 100;
    }
    // Every one is on the stream once (the second single post per encoding is the same
    // record again: same id and Nats-Msg-Id, deduplicated by JetStream).
    let envelopes = callcap_tests::nats::stream_envelopes(&nats.url()).await;
    assert_eq!(envelopes.len(), sent);
    assert!(envelopes
        .iter()
        .any(|(_, e)| e.record.external_call_id.as_deref() == Some("ENC-zstd-99")));

    // Unknown or stacked encodings: 415 naming what is accepted; br on a plain body is no
    // longer taken as plain.
    let plain = serde_json::to_vec(&payloads::minimal(company)).unwrap();
    for encoding in ["br", "gzip, zstd", "compress"] {
        let (s, _, body) = post_raw(&gw, "/v1/calls", &key, Some(encoding), plain.clone()).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{encoding}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("gzip, deflate, zstd"), "{message}");
    }
    // A body that is not what its header says: 400.
    let (s, _, _) = post_raw(&gw, "/v1/calls", &key, Some("gzip"), plain.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = post_raw(&gw, "/v1/calls", &key, Some("identity"), plain).await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn a_decompression_bomb_gets_413_and_large_answers_are_compressed_on_request() {
    let Edge {
        nats: _nats,
        gw,
        company,
        key,
        ..
    } = Edge::start().await;
    // 256 MiB of one repeated record's worth of spaces: ~250 KiB of gzip, ~8 KiB of zstd.
    let mut bomb = br#"{"company_id":""#.to_vec();
    bomb.extend(company.to_string().as_bytes());
    bomb.extend(br#"","notes":""#);
    bomb.resize(bomb.len() + 256 * 1024 * 1024, b' ');
    bomb.extend(br#""}"#);
    for encoding in ["gzip", "zstd"] {
        let packed = compress(encoding, &bomb);
        assert!(
            packed.len() < 1024 * 1024,
            "{encoding}: {} bytes",
            packed.len()
        );
        for path in ["/v1/calls", "/v1/calls/batch"] {
            let (s, _, body) = post_raw(&gw, path, &key, Some(encoding), packed.clone()).await;
            assert_eq!(
                s,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{encoding} {path}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    drop(bomb);

    // A batch answer (a result per record) is compressed when the client accepts it.
    let calls: Vec<Value> = (0..200).map(|_| payloads::minimal(company)).collect();
    for (accept, expect) in [
        ("gzip", Some("gzip")),
        ("zstd", Some("zstd")),
        ("identity", None),
    ] {
        let resp = gw
            .http
            .post(format!("{}/v1/calls/batch", gw.base()))
            .header("x-api-key", &key)
            .header("accept-encoding", accept)
            .json(&json!({ "calls": calls }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(
            resp.headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            expect,
            "Accept-Encoding: {accept}"
        );
    }
}
