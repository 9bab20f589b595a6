//! Reading a request body: content type, `Content-Encoding`, size and time limits,
//! decompression, and the memory the body will cost ([`crate::budget`]), all before a
//! handler sees a byte of JSON.
//!
//! The result is the decoded JSON text and the request's memory reservation, which the
//! handler keeps until it answers. What the text means is the handlers' business.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use futures::TryStreamExt as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _};

use crate::budget::{self, Exhausted, MemoryBudget, Reservation};
use crate::error::ApiError;

/// A body read whole and paid for.
pub struct JsonBody {
    /// The decoded JSON text.
    pub text: Bytes,
    /// What the request may hold while it is handled: the text, what parsing it costs and
    /// the stream messages built from it. Released when dropped.
    pub reservation: Reservation,
}

/// The request body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Zstd,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate (zlib)",
            Encoding::Zstd => "zstd",
            Encoding::Identity => "plain",
        }
    }
}

/// The `Content-Encoding` values a request body may carry, as the OpenAPI document lists
/// them (a client or a schema-driven tester sends nothing else and gets no 415).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)] // Documents the header for OpenAPI; `content_encoding` reads the text.
pub enum ContentEncoding {
    Gzip,
    XGzip,
    Deflate,
    Zstd,
    Identity,
}

/// Reads `Content-Encoding`: none, `identity`, `gzip` (or `x-gzip`), `deflate` (zlib, as
/// HTTP defines it) or `zstd`; anything else — including a list of several — is 415.
fn content_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
    let Some(value) = values.next() else {
        return Ok(Encoding::Identity);
    };
    let raw = value.to_str().unwrap_or("(not text)").trim();
    if values.next().is_some() || raw.contains(',') {
        return Err(ApiError::UnsupportedEncoding(
            headers
                .get_all(header::CONTENT_ENCODING)
                .iter()
                .map(|v| v.to_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
                .chars()
                .take(64)
                .collect(),
        ));
    }
    match raw.to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "deflate" => Ok(Encoding::Deflate),
        "zstd" => Ok(Encoding::Zstd),
        _ => Err(ApiError::UnsupportedEncoding(
            raw.chars().take(64).collect(),
        )),
    }
}

/// The answer to a reservation that could not grow.
pub fn exhausted(e: Exhausted, retry_after_secs: u64) -> ApiError {
    match e {
        Exhausted::TooLarge { needed, limit } => ApiError::BodyTooCostly { needed, limit },
        Exhausted::Gateway | Exhausted::Key => ApiError::MemoryBusy {
            retry_after_secs,
            cause: e,
        },
    }
}

/// Checks the content type and encoding and reads the body within the size and time
/// limits and the memory budget, for the key `key_id`. A compressed body is decompressed
/// as it arrives and the limit applies to the decompressed bytes, so a decompression bomb
/// is refused (413) after `limit` bytes without ever being held whole; the bytes on the
/// wire are bounded by `limit` too. Every gzip member and zstd frame is decoded (RFC 1952,
/// RFC 8878), and bytes after the last one are refused (400), as are bytes after a zlib
/// stream: nothing a client sent is silently dropped. The JSON text is then costed
/// ([`budget::parse_cost`]) and that cost reserved; text that is not JSON is 400 here.
///
/// # Errors
/// 415, 413, 408, 400, or 503 when the memory budget is in use.
pub async fn read_json(
    budget: &std::sync::Arc<MemoryBudget>,
    key_id: &str,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
    retry_after_secs: u64,
) -> Result<JsonBody, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let JsonBody {
        text,
        mut reservation,
    } = read_bytes(
        budget,
        key_id,
        headers,
        body,
        limit,
        timeout,
        retry_after_secs,
    )
    .await?;
    let cost = budget::parse_cost(&text)
        .map_err(|e| ApiError::BadRequest(format!("Malformed JSON: {e}")))?;
    // Parsed values, and the stream messages built from them (about the text again).
    reservation
        .grow(cost.saturating_add(text.len()))
        .map_err(|e| exhausted(e, retry_after_secs))?;
    Ok(JsonBody { text, reservation })
}

/// Whether the request says its body is JSON (`Content-Type: application/json`, any
/// parameters).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a body of any content type within the size and time limits and the memory
/// budget of `key_id` (decoding a `Content-Encoding`), without parsing it: the provider
/// callbacks' form and JSON bodies. The returned [`JsonBody`] holds the raw bytes.
///
/// # Errors
/// 415 (encoding), 413, 408, or 503 when the memory budget is in use.
pub async fn read_bytes(
    budget: &std::sync::Arc<MemoryBudget>,
    key_id: &str,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
    retry_after_secs: u64,
) -> Result<JsonBody, ApiError> {
    let encoding = content_encoding(headers)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut reservation = budget.reserve(key_id);
    let read = read_decoded(body, encoding, limit, &mut reservation, retry_after_secs);
    let text = match tokio::time::timeout(timeout, read).await {
        Err(_) => return Err(ApiError::RequestTimeout),
        Ok(result) => result?,
    };
    Ok(JsonBody { text, reservation })
}

/// Reads and decodes `body` up to `limit` decoded bytes (one more means 413), reserving
/// each piece of the buffer before it is allocated.
async fn read_decoded(
    body: Body,
    encoding: Encoding,
    limit: usize,
    reservation: &mut Reservation,
    retry_after_secs: u64,
) -> Result<Bytes, ApiError> {
    use async_compression::tokio::bufread::{GzipDecoder, ZlibDecoder, ZstdDecoder};
    // The compressed bytes are bounded by the same limit (a body that does not shrink is
    // no reason to read more of it).
    let wire = http_body_util::Limited::new(body, limit);
    let stream = http_body_util::BodyStream::new(wire)
        // Trailers (never sent by dialers) become empty chunks.
        .map_ok(|frame| frame.into_data().unwrap_or_default())
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let mut out = Vec::new();
    let result = match encoding {
        Encoding::Identity => read_limited(reader, &mut out, limit, reservation).await,
        Encoding::Gzip => {
            let mut d = GzipDecoder::new(reader);
            d.multiple_members(true);
            decode_all(d, &mut out, limit, reservation).await
        }
        Encoding::Deflate => {
            decode_all(ZlibDecoder::new(reader), &mut out, limit, reservation).await
        }
        Encoding::Zstd => {
            let mut d = ZstdDecoder::new(reader);
            d.multiple_members(true);
            decode_all(d, &mut out, limit, reservation).await
        }
    };
    match result {
        Ok(()) => Ok(Bytes::from(out)),
        Err(ReadError::TooLarge) => Err(ApiError::PayloadTooLarge { limit }),
        Err(ReadError::Budget(e)) => Err(exhausted(e, retry_after_secs)),
        Err(ReadError::Trailing) => Err(ApiError::BadRequest(format!(
            "the body has bytes after its {} data; send one complete body",
            encoding.name()
        ))),
        Err(ReadError::Io(e)) => {
            let wire_too_large = e
                .get_ref()
                .is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>());
            if wire_too_large {
                Err(ApiError::PayloadTooLarge { limit })
            } else if encoding == Encoding::Identity {
                Err(ApiError::BadRequest(format!(
                    "could not read the request body: {e}"
                )))
            } else {
                Err(ApiError::BadRequest(format!(
                    "the body is not valid {} as its Content-Encoding says: {e}",
                    encoding.name()
                )))
            }
        }
    }
}

enum ReadError {
    TooLarge,
    Budget(Exhausted),
    Trailing,
    Io(std::io::Error),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// A decoder read to its end, then its input checked for bytes it did not consume.
async fn decode_all<D, R>(
    decoder: D,
    out: &mut Vec<u8>,
    limit: usize,
    reservation: &mut Reservation,
) -> Result<(), ReadError>
where
    D: AsyncRead + Unpin + IntoInner<R>,
    R: AsyncBufRead + Unpin,
{
    let mut decoder = decoder;
    read_limited(&mut decoder, out, limit, reservation).await?;
    let mut rest = decoder.into_inner_reader();
    if rest.fill_buf().await?.is_empty() {
        Ok(())
    } else {
        Err(ReadError::Trailing)
    }
}

/// The decoders' `into_inner`, named once for [`decode_all`].
trait IntoInner<R> {
    fn into_inner_reader(self) -> R;
}

macro_rules! into_inner {
    ($($decoder:ident),*) => {$(
        impl<R: AsyncBufRead> IntoInner<R> for async_compression::tokio::bufread::$decoder<R> {
            fn into_inner_reader(self) -> R {
                self.into_inner()
            }
        }
    )*};
}
into_inner!(GzipDecoder, ZlibDecoder, ZstdDecoder);

/// Reads `reader` to its end into `out`, at most `limit` bytes, growing `reservation`
/// before the buffer grows (by doubling, so a body costs at most twice its size).
async fn read_limited<R: AsyncRead + Unpin>(
    mut reader: R,
    out: &mut Vec<u8>,
    limit: usize,
    reservation: &mut Reservation,
) -> Result<(), ReadError> {
    const FIRST: usize = 16 * 1024;
    loop {
        if out.len() == out.capacity() {
            if out.len() > limit {
                return Err(ReadError::TooLarge);
            }
            // One byte past the limit tells "too large" from "exactly the limit".
            let target = (out.capacity() * 2).max(FIRST).min(limit + 1);
            let more = target - out.capacity();
            reservation.grow(more).map_err(ReadError::Budget)?;
            out.reserve_exact(more);
        }
        let room = out.capacity() - out.len();
        let n = (&mut reader).take(room as u64).read_to_end(out).await?;
        if out.len() > limit {
            return Err(ReadError::TooLarge);
        }
        if n < room {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn gzip(text: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    fn headers(encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        if let Some(e) = encoding {
            h.insert(header::CONTENT_ENCODING, e.parse().unwrap());
        }
        h
    }

    async fn read(
        budget: &std::sync::Arc<MemoryBudget>,
        encoding: Option<&str>,
        bytes: Vec<u8>,
        limit: usize,
    ) -> Result<JsonBody, ApiError> {
        read_json(
            budget,
            "k1",
            &headers(encoding),
            Body::from(bytes),
            limit,
            std::time::Duration::from_secs(5),
            1,
        )
        .await
    }

    #[tokio::test]
    async fn every_gzip_member_and_zstd_frame_is_read_and_trailing_bytes_refused() {
        let budget = MemoryBudget::new(64 << 20, 64 << 20);
        let mut two = gzip(b"[1,");
        two.extend(gzip(b"2]"));
        let body = read(&budget, Some("gzip"), two, 1 << 20)
            .await
            .ok()
            .unwrap();
        assert_eq!(&body.text[..], b"[1,2]");
        drop(body);

        let mut frames = zstd::encode_all(&b"[1,"[..], 1).unwrap();
        frames.extend(zstd::encode_all(&b"2]"[..], 1).unwrap());
        let body = read(&budget, Some("zstd"), frames, 1 << 20)
            .await
            .ok()
            .unwrap();
        assert_eq!(&body.text[..], b"[1,2]");
        drop(body);

        // A skippable frame (magic 0x184D2A50, 4-byte length, payload) before the data.
        let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        skippable.extend(zstd::encode_all(&b"{}"[..], 1).unwrap());
        let body = read(&budget, Some("zstd"), skippable, 1 << 20)
            .await
            .ok()
            .unwrap();
        assert_eq!(&body.text[..], b"{}");
        drop(body);

        for (encoding, mut data) in [
            ("gzip", gzip(b"{}")),
            ("zstd", zstd::encode_all(&b"{}"[..], 1).unwrap()),
            ("deflate", {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(b"{}").unwrap();
                e.finish().unwrap()
            }),
        ] {
            data.extend(b"garbage");
            match read(&budget, Some(encoding), data, 1 << 20).await {
                Err(ApiError::BadRequest(m)) => assert!(
                    m.contains("bytes after") || m.contains("not valid"),
                    "{encoding}: {m}"
                ),
                Err(other) => panic!("{encoding}: {other}"),
                Ok(b) => panic!("{encoding}: accepted {:?}", b.text),
            }
        }
        assert_eq!(budget.used(), 0, "every reservation is released");
    }

    #[tokio::test]
    async fn a_body_that_costs_more_than_a_key_may_hold_is_413_and_a_busy_budget_503() {
        let zeros = format!("{{\"a\":[{}0]}}", "0,".repeat(100_000));
        let packed = zstd::encode_all(zeros.as_bytes(), 3).unwrap();
        assert!(packed.len() < 2_000);
        let budget = MemoryBudget::new(16 << 20, 4 << 20);
        match read(&budget, Some("zstd"), packed.clone(), 8 << 20).await {
            Err(ApiError::BodyTooCostly { needed, limit }) => {
                assert!(needed > 4 << 20 && limit == 4 << 20, "{needed} {limit}")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted"),
        }
        // The same body fits a larger share, and while it is held, the key's next body
        // waits its turn (503) while another key's body is read.
        let cost = {
            let roomy = MemoryBudget::new(1 << 30, 1 << 30);
            let body = read(&roomy, Some("zstd"), packed.clone(), 8 << 20)
                .await
                .ok()
                .unwrap();
            body.reservation.bytes()
        };
        let budget = MemoryBudget::new(4 * cost, cost + cost / 2);
        let held = match read(&budget, Some("zstd"), packed.clone(), 8 << 20).await {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        assert!(held.reservation.bytes() > zeros.len() * 16);
        let second = read(&budget, Some("zstd"), packed.clone(), 8 << 20).await;
        assert!(
            matches!(second, Err(ApiError::MemoryBusy { .. })),
            "{:?}",
            second.err()
        );
        let other = read_json(
            &budget,
            "k2",
            &headers(None),
            Body::from("{}"),
            1 << 20,
            std::time::Duration::from_secs(5),
            1,
        )
        .await;
        assert!(other.is_ok());
        drop((held, other));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn limits_count_decoded_bytes_and_malformed_json_names_the_place() {
        let budget = MemoryBudget::new(64 << 20, 64 << 20);
        let bomb = zstd::encode_all(&vec![b' '; 4 << 20][..], 3).unwrap();
        assert!(matches!(
            read(&budget, Some("zstd"), bomb, 1 << 20).await,
            Err(ApiError::PayloadTooLarge { limit }) if limit == 1 << 20
        ));
        let exact = vec![b' '; 1023]
            .into_iter()
            .chain(*b"1")
            .collect::<Vec<u8>>();
        assert!(read(&budget, None, exact, 1024).await.is_ok());
        match read(&budget, None, b"{\"a\":".to_vec(), 1024).await {
            Err(ApiError::BadRequest(m)) => {
                assert!(m.starts_with("Malformed JSON: EOF while parsing"), "{m}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(budget.used(), 0);
    }
}
