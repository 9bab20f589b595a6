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
    let JsonBody { text, reservation } = read_bytes(
        budget,
        key_id,
        headers,
        body,
        limit,
        timeout,
        retry_after_secs,
    )
    .await?;
    let mut body = JsonBody { text, reservation };
    body.reserve_parse(retry_after_secs)?;
    Ok(body)
}

impl JsonBody {
    /// Reserves what parsing the text as JSON will cost, and the stream messages built
    /// from it (about the text again).
    ///
    /// # Errors
    /// 400 when the text is not JSON; 413 or 503 when the memory cannot be held.
    pub fn reserve_parse(&mut self, retry_after_secs: u64) -> Result<(), ApiError> {
        let cost = budget::parse_cost(&self.text)
            .map_err(|e| ApiError::BadRequest(format!("Malformed JSON: {e}")))?;
        self.reservation
            .grow(cost.saturating_add(self.text.len()))
            .map_err(|e| exhausted(e, retry_after_secs))
    }

    /// Reserves what reading the text as a form will cost: every name and value copied
    /// into a map of strings, and the stream message built from them.
    ///
    /// # Errors
    /// 400 for more than [`MAX_FORM_PARAMS`] parameters (a provider sends a few dozen);
    /// 413 or 503 when the memory cannot be held.
    pub fn reserve_form(&mut self, retry_after_secs: u64) -> Result<(), ApiError> {
        let pairs = self.text.split(|b| *b == b'&').count();
        if pairs > MAX_FORM_PARAMS {
            return Err(ApiError::BadRequest(format!(
                "the form has {pairs} parameters; at most {MAX_FORM_PARAMS} are taken"
            )));
        }
        // Decoded names and values (at most the text), a map entry and a JSON value per
        // pair, and the message (about the text again).
        self.reservation
            .grow(
                (2 * self.text.len()).saturating_add(pairs.saturating_mul(budget::FORM_PAIR_BYTES)),
            )
            .map_err(|e| exhausted(e, retry_after_secs))
    }
}

/// Most parameters a form body (a provider callback) may have.
pub const MAX_FORM_PARAMS: usize = 256;

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
    // A declared length sizes the first allocation: a small body reserves what it is.
    let first = declared.map_or(FIRST_READ, |n| (n as usize).saturating_add(1));
    let read = read_decoded(
        body,
        encoding,
        limit,
        first,
        &mut reservation,
        retry_after_secs,
    );
    let text = match tokio::time::timeout(timeout, read).await {
        Err(_) => return Err(ApiError::RequestTimeout),
        Ok(result) => result?,
    };
    Ok(JsonBody { text, reservation })
}

/// The first allocation for a body of unknown length.
const FIRST_READ: usize = 16 * 1024;
/// What an inflate (gzip, deflate) decoder holds: its 32 KiB window and state, with room.
const INFLATE_BYTES: usize = 64 * 1024;
/// A zstd decoding context without its buffers (`ZSTD_sizeof_DCtx` is ~95 KiB in 1.5).
const ZSTD_CONTEXT_BYTES: usize = 128 * 1024;
/// The largest zstd block, and so the decoder's input buffer.
const ZSTD_BLOCK_MAX: u64 = 128 * 1024;
/// Largest zstd window taken (the library's default limit): 2^27 bytes.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Longest zstd frame header: magic, descriptor, window, dictionary id, content size.
const ZSTD_HEADER_MAX: usize = 18;

/// Reads and decodes `body` up to `limit` decoded bytes (one more means 413), reserving
/// each piece of the buffer before it is allocated, and the decoder's own memory before
/// it is made: an inflate window, or what the zstd frame's header says its decoder holds.
async fn read_decoded(
    body: Body,
    encoding: Encoding,
    limit: usize,
    first: usize,
    reservation: &mut Reservation,
    retry_after_secs: u64,
) -> Result<Bytes, ApiError> {
    use async_compression::tokio::bufread::{GzipDecoder, ZlibDecoder};
    // The compressed bytes are bounded by the same limit (a body that does not shrink is
    // no reason to read more of it).
    let wire = http_body_util::Limited::new(body, limit);
    let stream = http_body_util::BodyStream::new(wire)
        // Trailers (never sent by dialers) become empty chunks.
        .map_ok(|frame| frame.into_data().unwrap_or_default())
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let mut out = Buffer {
        bytes: Vec::new(),
        first: first.min(limit + 1),
        limit,
    };
    let result = match encoding {
        Encoding::Identity => out.read_from(reader, reservation).await,
        Encoding::Gzip => {
            let mut d = GzipDecoder::new(reader);
            d.multiple_members(true);
            decode_all(d, INFLATE_BYTES, &mut out, reservation).await
        }
        Encoding::Deflate => {
            decode_all(
                ZlibDecoder::new(reader),
                INFLATE_BYTES,
                &mut out,
                reservation,
            )
            .await
        }
        Encoding::Zstd => decode_zstd(reader, &mut out, reservation).await,
    };
    let out = out.bytes;
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

/// A decoder holding `state` bytes of its own, read to its end, then its input checked
/// for bytes it did not consume.
async fn decode_all<D, R>(
    decoder: D,
    state: usize,
    out: &mut Buffer,
    reservation: &mut Reservation,
) -> Result<(), ReadError>
where
    D: AsyncRead + Unpin + IntoInner<R>,
    R: AsyncBufRead + Unpin,
{
    reservation.grow(state).map_err(ReadError::Budget)?;
    let mut decoder = decoder;
    out.read_from(&mut decoder, reservation).await?;
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
into_inner!(GzipDecoder, ZlibDecoder);

/// A zstd frame's header, as far as memory goes (RFC 8878, 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZstdFrame {
    /// A data frame whose decoder holds this many bytes.
    Data { memory: usize },
    /// A skippable frame: this many bytes after its 8-byte header.
    Skippable(u64),
}

/// Reads the frame header at the start of `bytes` (up to [`ZSTD_HEADER_MAX`] of them);
/// `None` when they are not one.
fn zstd_frame(bytes: &[u8]) -> Option<ZstdFrame> {
    let magic = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
        let len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
        return Some(ZstdFrame::Skippable(u64::from(len)));
    }
    if magic != 0xFD2F_B528 {
        return None;
    }
    let descriptor = *bytes.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    let mut at = 5;
    let mut window = 0u64;
    if !single_segment {
        let w = *bytes.get(at)?;
        at += 1;
        let log = 10 + u32::from(w >> 3);
        let base = 1u64.checked_shl(log)?;
        window = base + base / 8 * u64::from(w & 7);
    }
    at += [0, 1, 2, 4][usize::from(descriptor & 3)];
    let size_bytes = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let content = if size_bytes == 0 {
        None
    } else {
        let raw = bytes.get(at..at + size_bytes)?;
        let mut le = [0u8; 8];
        le[..size_bytes].copy_from_slice(raw);
        let n = u64::from_le_bytes(le);
        Some(if size_bytes == 2 { n + 256 } else { n })
    };
    if single_segment {
        window = content?;
    }
    // What libzstd's streaming decoder allocates (`ZSTD_decodingBufferSize_min`): the
    // window and two blocks, or the whole content when that is less; an input block.
    let block = window.min(ZSTD_BLOCK_MAX);
    let ring = window.saturating_add(2 * block + 64);
    let output = content.map_or(ring, |c| c.min(ring));
    let memory = usize::try_from(output.saturating_add(block))
        .unwrap_or(usize::MAX)
        .saturating_add(ZSTD_CONTEXT_BYTES);
    Some(ZstdFrame::Data { memory })
}

/// Decodes a zstd body frame by frame, reserving each frame's decoder memory (from its
/// header) before the decoder is made: a frame declaring a large window without a
/// content size costs that window, however few bytes it holds. Skippable frames are
/// skipped; anything else after a frame is trailing bytes.
async fn decode_zstd<R: AsyncBufRead + Unpin>(
    reader: R,
    out: &mut Buffer,
    reservation: &mut Reservation,
) -> Result<(), ReadError> {
    use async_compression::tokio::bufread::ZstdDecoder;
    use async_compression::zstd::DParameter;
    // Bytes read ahead of `reader` (a header peeked, or what a short frame left).
    let mut ahead: Vec<u8> = Vec::with_capacity(ZSTD_HEADER_MAX);
    let mut reader = reader;
    let mut held = 0usize;
    let mut frames = 0u32;
    loop {
        while ahead.len() < ZSTD_HEADER_MAX {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len().min(ZSTD_HEADER_MAX - ahead.len());
            ahead.extend_from_slice(&buf[..n]);
            reader.consume(n);
        }
        if ahead.is_empty() && frames > 0 {
            return Ok(());
        }
        match zstd_frame(&ahead) {
            Some(ZstdFrame::Skippable(len)) => {
                let mut skip = len.saturating_add(8);
                let from_ahead = ahead.len().min(usize::try_from(skip).unwrap_or(usize::MAX));
                ahead.drain(..from_ahead);
                skip -= from_ahead as u64;
                let skipped =
                    tokio::io::copy(&mut (&mut reader).take(skip), &mut tokio::io::sink()).await?;
                if skipped < skip {
                    return Err(ReadError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "a skippable frame is cut short",
                    )));
                }
            }
            Some(ZstdFrame::Data { memory }) => {
                if memory > held {
                    reservation.grow(memory - held).map_err(ReadError::Budget)?;
                    held = memory;
                }
                let input = std::io::Cursor::new(std::mem::take(&mut ahead)).chain(reader);
                let mut decoder = ZstdDecoder::with_params(
                    input,
                    &[DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)],
                );
                out.read_from(&mut decoder, reservation).await?;
                let (left, rest) = decoder.into_inner().into_inner();
                let at = usize::try_from(left.position()).unwrap_or(usize::MAX);
                ahead = left.into_inner().get(at..).unwrap_or_default().to_vec();
                reader = rest;
                frames += 1;
            }
            None if frames == 0 => {
                return Err(ReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "no zstd frame at its start",
                )))
            }
            None => return Err(ReadError::Trailing),
        }
    }
}

/// The decoded body as it grows, within its limit and its reservation.
struct Buffer {
    bytes: Vec<u8>,
    /// The first allocation (the declared length, or [`FIRST_READ`]).
    first: usize,
    limit: usize,
}

impl Buffer {
    /// Reads `reader` to its end, at most `limit` bytes in all, growing the reservation
    /// before the buffer grows. Growing doubles the buffer and moves it: the old and the
    /// new allocation are both held until the copy is done, and so both reserved (a body
    /// then costs at most twice its size, and at its peak three times).
    async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        reservation: &mut Reservation,
    ) -> Result<(), ReadError> {
        // `bytes` is kept at its full length (zeroed, then overwritten) and `filled`
        // counts what was read: the reader writes only into what was reserved, never
        // into room an adaptive `read_to_end` would add on its own.
        let out = &mut self.bytes;
        let mut filled = out.len();
        out.resize(out.capacity(), 0);
        loop {
            if filled == out.len() {
                if filled > self.limit {
                    return Err(ReadError::TooLarge);
                }
                let old = out.capacity();
                // One byte past the limit tells "too large" from "exactly the limit".
                let target = (old * 2).max(self.first).min(self.limit + 1);
                if let Err(e) = reservation.grow(target) {
                    out.truncate(filled);
                    return Err(ReadError::Budget(e));
                }
                out.reserve_exact(target - out.len());
                out.resize(target, 0);
                reservation.shrink(old);
            }
            let n = match reader.read(&mut out[filled..]).await {
                Ok(n) => n,
                Err(e) => {
                    out.truncate(filled);
                    return Err(e.into());
                }
            };
            filled += n;
            if n == 0 {
                out.truncate(filled);
                return if filled > self.limit {
                    Err(ReadError::TooLarge)
                } else {
                    Ok(())
                };
            }
            if filled > self.limit {
                out.truncate(filled);
                return Err(ReadError::TooLarge);
            }
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

    /// The third probe, item 18: zstd bodies held more than the budget counted (the
    /// decoder's window and buffers). A frame's header says what its decoder holds; it is
    /// reserved before the decoder is made, so a 2 KB body declaring a 128 MiB window is
    /// refused at once instead of allocating it.
    #[tokio::test]
    async fn a_zstd_frames_decoder_memory_is_counted_before_it_is_made() {
        // Content size in the header (single segment): the decoder needs the content.
        let sized = zstd::bulk::compress(b"{\"a\":1}", 3).unwrap();
        let Some(ZstdFrame::Data { memory }) = zstd_frame(&sized) else {
            panic!("a data frame")
        };
        assert!(memory < ZSTD_CONTEXT_BYTES + 64 * 1024, "{memory}");
        // Streamed without a size (what many encoders write): the level's window (2 MiB
        // at level 3) and two blocks, however small the body — what libzstd allocates.
        let streamed = zstd::encode_all(&b"{\"a\":1}"[..], 3).unwrap();
        let Some(ZstdFrame::Data { memory }) = zstd_frame(&streamed) else {
            panic!("a data frame")
        };
        assert!(memory > 2 << 20 && memory < 3 << 20, "{memory}");
        // A streamed frame with a 128 MiB window and no content size.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.include_contentsize(false).unwrap();
        e.window_log(27).unwrap();
        e.long_distance_matching(true).unwrap();
        std::io::Write::write_all(&mut e, b"{\"a\":[1,2,3]}").unwrap();
        let wide = e.finish().unwrap();
        assert!(wide.len() < 2048);
        let Some(ZstdFrame::Data { memory }) = zstd_frame(&wide) else {
            panic!("a data frame")
        };
        assert!(memory > 128 << 20, "{memory}");
        let budget = MemoryBudget::new(256 << 20, 64 << 20);
        match read(&budget, Some("zstd"), wide.clone(), 8 << 20).await {
            Err(ApiError::BodyTooCostly { needed, .. }) => assert!(needed > 128 << 20),
            other => panic!("{:?}", other.map(|b| b.text)),
        }
        // With room for it, it is read, and the reservation covered the window.
        let roomy = MemoryBudget::new(1 << 30, 1 << 30);
        let body = read(&roomy, Some("zstd"), wide, 8 << 20)
            .await
            .ok()
            .unwrap();
        assert!(body.reservation.bytes() > 128 << 20);
        assert_eq!(&body.text[..], b"{\"a\":[1,2,3]}");
        assert!(zstd_frame(b"not zstd").is_none());
    }

    /// A buffer that grows is held twice while it moves: counted so.
    #[tokio::test]
    async fn a_growing_buffer_counts_its_old_and_new_allocation() {
        // 200 KB of JSON, length not declared: 16K, 32K, …, 256K; while growing from 128K
        // to 256K both are held (384K): a key share of 300K refuses it.
        let text = format!("[{}0]", "0,".repeat(100_000));
        let budget = MemoryBudget::new(1 << 30, 300 * 1024);
        let got = read_bytes(
            &budget,
            "k1",
            &headers(None),
            Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(
                bytes::Bytes::from(text.clone()),
            )])),
            1 << 20,
            std::time::Duration::from_secs(5),
            1,
        )
        .await;
        assert!(
            matches!(got, Err(ApiError::BodyTooCostly { .. })),
            "{:?}",
            got.err()
        );
        assert_eq!(budget.used(), 0);
        let budget = MemoryBudget::new(1 << 30, 400 * 1024);
        let got = read_bytes(
            &budget,
            "k1",
            &headers(None),
            Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(
                bytes::Bytes::from(text.clone()),
            )])),
            1 << 20,
            std::time::Duration::from_secs(5),
            1,
        )
        .await
        .ok()
        .unwrap();
        assert_eq!(got.text.len(), text.len());
        // What is kept once read: the final buffer alone.
        assert_eq!(got.reservation.bytes(), 256 * 1024);
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
