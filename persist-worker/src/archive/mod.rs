//! The stream's long-term tier: immutable objects in S3-compatible storage.
//!
//! `persist-worker archive` ([`component`], gathering objects with [`gather`]) copies
//! every partition stream into objects; `replay --from-archive` reads them back through
//! the normal write path; `erase` rewrites the objects that hold erased records.
//!
//! Layout under `ARCHIVE_URL` (`s3://bucket/prefix`):
//!
//! ```text
//! <prefix>/<stream>/<yyyy>/<mm>/<dd>/<first seq>-<last seq>.jsonl.zst
//! ```
//!
//! - an object covers the stream sequences `first..=last` and holds every message of that
//!   range the stream still had (messages deleted by an erasure leave holes inside a
//!   range, never between ranges): the objects of a stream tile its sequence space, so a
//!   missing range is visible as a gap between one object's `last` and the next `first`;
//! - `<yyyy>/<mm>/<dd>` is the day (UTC) every message of the object was stored in the
//!   stream (the archiver closes an object at midnight): the date folders are the index
//!   that lets a replay find a time range by listing only the days it covers;
//! - sequences are zero-padded to 20 digits, so names sort in sequence order;
//! - an object is zstd-compressed JSON lines, one [`Entry`] per message: readable with
//!   `zstd -dc | jq` and nothing of ours.

pub mod component;
pub mod gather;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The suffix of an archive object.
const SUFFIX: &str = ".jsonl.zst";

/// One archived stream message, a line of an object.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Stream sequence.
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it.
    pub time: DateTime<Utc>,
    /// The payload as it was, when it is one line of JSON (what the gateway writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// Any other payload, base64: a forged or broken message is archived as it was (a
    /// replay dead-letters it as the worker did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
}

impl Entry {
    /// The entry of a stream message.
    pub fn new(seq: u64, subject: &str, time: DateTime<Utc>, payload: &[u8]) -> Entry {
        // Kept as JSON only when it comes back byte for byte and cannot break the line.
        let raw = serde_json::from_slice::<Box<RawValue>>(payload)
            .ok()
            .filter(|r| r.get().len() == payload.len() && !payload.contains(&b'\n'));
        let payload_b64 = raw
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(payload));
        Entry {
            seq,
            subject: subject.to_owned(),
            time,
            payload: raw,
            payload_b64,
        }
    }

    /// The payload's bytes as the stream held them.
    pub fn payload(&self) -> Cow<'_, [u8]> {
        match (&self.payload, &self.payload_b64) {
            (Some(raw), _) => Cow::Borrowed(raw.get().as_bytes()),
            (None, Some(b64)) => Cow::Owned(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_default(),
            ),
            (None, None) => Cow::Borrowed(&[]),
        }
    }

    /// The line of a stream message whose payload is known to be one JSON object (it
    /// decoded as an envelope): written directly, the payload copied as it is, without
    /// parsing it again. Anything else goes through [`Entry::new`].
    pub fn line_of_json(seq: u64, subject: &str, time: DateTime<Utc>, payload: &[u8]) -> Vec<u8> {
        let verbatim = payload.first() == Some(&b'{')
            && payload.last() == Some(&b'}')
            && !payload.contains(&b'\n');
        if !verbatim {
            return Entry::new(seq, subject, time, payload).line();
        }
        let mut line = Vec::with_capacity(payload.len() + subject.len() + 96);
        line.extend_from_slice(b"{\"seq\":");
        line.extend_from_slice(seq.to_string().as_bytes());
        line.extend_from_slice(b",\"subject\":");
        serde_json::to_writer(&mut line, subject).expect("a string always serializes");
        line.extend_from_slice(b",\"time\":");
        serde_json::to_writer(&mut line, &time).expect("a time always serializes");
        line.extend_from_slice(b",\"payload\":");
        line.extend_from_slice(payload);
        line.extend_from_slice(b"}\n");
        line
    }

    /// The entry as one line (with its newline).
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("an Entry always serializes");
        line.push(b'\n');
        line
    }
}

/// Compresses lines into an object's bytes.
pub fn compress<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
    for l in lines {
        enc.write_all(l)?;
    }
    enc.finish()
}

/// The zstd window the reader accepts: 2^23 bytes (the archiver's level 3 uses 2^21).
const WINDOW_LOG_MAX: u32 = 23;

/// Reads an object's bytes back into entries, decompressing at most `max` bytes.
///
/// # Errors
/// When the bytes are not zstd, decompress to more than `max` bytes, or a line is not an
/// [`Entry`].
pub fn decompress(bytes: &[u8], max: u64) -> anyhow::Result<Vec<Entry>> {
    use std::io::Read as _;
    let mut decoder = zstd::stream::read::Decoder::new(bytes).context("not a zstd object")?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .context("configuring the zstd decoder")?;
    let mut plain = Vec::new();
    decoder
        .take(max.saturating_add(1))
        .read_to_end(&mut plain)
        .context("not a zstd object")?;
    anyhow::ensure!(
        plain.len() as u64 <= max,
        "it decompresses to more than {max} bytes (ARCHIVE_READ_MAX_BYTES)"
    );
    plain
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).context("a line is not an archive entry"))
        .collect()
}

/// An object read back: its entries within its named range, and those refused.
#[derive(Debug, Default)]
pub struct Read {
    pub entries: Vec<Entry>,
    /// Entries not taken, each with why: a sequence outside the object's named range,
    /// above the stream's last, or not after the one before it (forged or corrupt).
    pub refused: Vec<String>,
}

/// Keeps the entries of `object` whose sequence lies in its named range, after the one
/// before it, and at most `stream_last` (when the stream is known): an entry is trusted
/// no more than the object's name, which the archiver wrote from the stream.
fn checked(object: &ObjectRef, entries: Vec<Entry>, stream_last: Option<u64>) -> Read {
    let mut read = Read::default();
    let mut prev: Option<u64> = None;
    for e in entries {
        let why = if e.seq < object.first || e.seq > object.last {
            Some(format!(
                "sequence {} is outside the object's range {}..={}",
                e.seq, object.first, object.last
            ))
        } else if stream_last.is_some_and(|l| e.seq > l) {
            Some(format!(
                "sequence {} is above the stream's last sequence {}",
                e.seq,
                stream_last.unwrap_or_default()
            ))
        } else if prev.is_some_and(|p| e.seq <= p) {
            Some(format!(
                "sequence {} does not follow {}",
                e.seq,
                prev.unwrap_or_default()
            ))
        } else {
            None
        };
        match why {
            Some(why) => read.refused.push(format!("{}: {why}", object.path)),
            None => {
                prev = Some(e.seq);
                read.entries.push(e);
            }
        }
    }
    read
}

/// An archive object, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub path: Path,
    pub stream: String,
    pub day: NaiveDate,
    pub first: u64,
    pub last: u64,
}

/// The archive: a bucket and a prefix, by `ARCHIVE_URL` and the `AWS_*` variables.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    /// Most bytes an object may decompress to when read back.
    read_max: u64,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive").field("url", &self.url).finish()
    }
}

/// What a put of a new object found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    /// An object of this name was there already (written before a crash): the same range
    /// of the same stream, so the same messages.
    AlreadyThere,
}

impl Archive {
    /// Opens the archive `url` names (`s3://bucket[/prefix]`), with the standard `AWS_*`
    /// variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, …). Nothing is contacted yet.
    ///
    /// # Errors
    /// When the URL is not `s3://bucket[/prefix]` or the settings are incomplete.
    pub fn open(url: &str) -> anyhow::Result<Archive> {
        Self::open_with(url, std::env::vars())
    }

    /// As [`Archive::open`], with the `AWS_*` settings taken from `vars` instead of the
    /// environment.
    ///
    /// # Errors
    /// As [`Archive::open`].
    pub fn open_with(
        url: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Archive> {
        let parsed = url::Url::parse(url).with_context(|| format!("ARCHIVE_URL {url}"))?;
        anyhow::ensure!(
            parsed.scheme() == "s3" && parsed.host_str().is_some_and(|h| !h.is_empty()),
            "ARCHIVE_URL must be s3://bucket[/prefix], not {url}"
        );
        let bucket = parsed.host_str().unwrap_or_default();
        let prefix = parsed.path().trim_matches('/').to_owned();
        // Few quick retries: an outage is waited out (and shown) by the archiver's own
        // loop, not hidden for minutes inside one request.
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let mut builder = object_store::aws::AmazonS3Builder::new();
        for (k, v) in vars {
            if k.starts_with("AWS_") {
                if let Ok(key) = k.to_ascii_lowercase().parse() {
                    builder = builder.with_config(key, v);
                }
            }
        }
        let store = builder
            .with_bucket_name(bucket)
            .with_retry(retry)
            .build()
            .context("configuring the archive's S3 client (ARCHIVE_URL and AWS_* variables)")?;
        Ok(Archive {
            store: Arc::new(store),
            prefix,
            url: url.to_owned(),
            read_max: crate::config::ArchiveArgs::default().archive_read_max_bytes,
        })
    }

    /// Bounds what one object may decompress to when read back.
    #[must_use]
    pub fn with_read_max(mut self, bytes: u64) -> Self {
        self.read_max = bytes;
        self
    }

    /// The archive the command line names, when one is configured.
    ///
    /// # Errors
    /// When ARCHIVE_URL is malformed.
    pub fn from_args(args: &crate::config::ArchiveArgs) -> anyhow::Result<Option<Archive>> {
        args.archive_url
            .as_deref()
            .map(|url| Archive::open(url).map(|a| a.with_read_max(args.archive_read_max_bytes)))
            .transpose()
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn dir(&self, parts: &[&str]) -> Path {
        let mut all: Vec<&str> = Vec::with_capacity(parts.len() + 1);
        if !self.prefix.is_empty() {
            all.push(&self.prefix);
        }
        all.extend_from_slice(parts);
        Path::from(all.join("/"))
    }

    /// The name of the object holding `first..=last` of `stream`, stored on `day`.
    pub fn object_path(&self, stream: &str, day: NaiveDate, first: u64, last: u64) -> Path {
        self.dir(&[
            stream,
            &format!("{:04}", day.year()),
            &format!("{:02}", day.month()),
            &format!("{:02}", day.day()),
            &format!("{first:020}-{last:020}{SUFFIX}"),
        ])
    }

    /// Reads an object's name back; `None` for anything else.
    fn parse(&self, path: &Path) -> Option<ObjectRef> {
        let text = path.as_ref();
        let rest = if self.prefix.is_empty() {
            text
        } else {
            text.strip_prefix(&self.prefix)?.strip_prefix('/')?
        };
        let mut parts = rest.split('/');
        let stream = parts.next()?;
        let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
        let name = parts.next()?.strip_suffix(SUFFIX)?;
        if parts.next().is_some() {
            return None;
        }
        let day = NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)?;
        let (first, last) = name.split_once('-')?;
        Some(ObjectRef {
            path: path.clone(),
            stream: stream.to_owned(),
            day,
            first: first.parse().ok()?,
            last: last.parse().ok()?,
        })
    }

    /// The folder names directly under `parts`.
    async fn folders(&self, parts: &[&str]) -> anyhow::Result<Vec<String>> {
        let dir = self.dir(parts);
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .with_context(|| format!("listing {dir} in the archive"))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The objects of one day of one stream, in sequence order.
    async fn day_objects(&self, stream: &str, day: NaiveDate) -> anyhow::Result<Vec<ObjectRef>> {
        let dir = self.dir(&[
            stream,
            &format!("{:04}", day.year()),
            &format!("{:02}", day.month()),
            &format!("{:02}", day.day()),
        ]);
        let listed: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .with_context(|| format!("listing {dir} in the archive"))?;
        let mut objects: Vec<ObjectRef> = listed
            .iter()
            .filter_map(|m| self.parse(&m.location))
            .collect();
        objects.sort_by_key(|o| o.first);
        Ok(objects)
    }

    /// The streams the archive holds.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn streams(&self) -> anyhow::Result<Vec<String>> {
        self.folders(&[]).await
    }

    /// The days of `stream` that hold objects, between `since` and `until` (inclusive,
    /// by day), walking the year and month folders so that only the range is listed.
    async fn days(
        &self,
        stream: &str,
        since: Option<NaiveDate>,
        until: Option<NaiveDate>,
    ) -> anyhow::Result<Vec<NaiveDate>> {
        let mut days = Vec::new();
        let in_range = |d: NaiveDate| since.is_none_or(|s| d >= s) && until.is_none_or(|u| d <= u);
        for y in self.folders(&[stream]).await? {
            let Ok(year) = y.parse::<i32>() else { continue };
            if since.is_some_and(|s| year < s.year()) || until.is_some_and(|u| year > u.year()) {
                continue;
            }
            for m in self.folders(&[stream, &y]).await? {
                let Ok(month) = m.parse::<u32>() else {
                    continue;
                };
                let Some(first) = NaiveDate::from_ymd_opt(year, month, 1) else {
                    continue;
                };
                let last = first
                    .checked_add_months(chrono::Months::new(1))
                    .and_then(|n| n.pred_opt())
                    .unwrap_or(first);
                if since.is_some_and(|s| s > last) || until.is_some_and(|u| u < first) {
                    continue;
                }
                for d in self.folders(&[stream, &y, &m]).await? {
                    if let Some(day) = d
                        .parse::<u32>()
                        .ok()
                        .and_then(|d| NaiveDate::from_ymd_opt(year, month, d))
                    {
                        if in_range(day) {
                            days.push(day);
                        }
                    }
                }
            }
        }
        days.sort();
        Ok(days)
    }

    /// The objects of `stream` whose day falls in `since..=until` (by day; open ends
    /// unbounded), in sequence order.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn objects(
        &self,
        stream: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> anyhow::Result<Vec<ObjectRef>> {
        let mut all = Vec::new();
        for day in self
            .days(
                stream,
                since.map(|t| t.date_naive()),
                until.map(|t| t.date_naive()),
            )
            .await?
        {
            all.extend(self.day_objects(stream, day).await?);
        }
        all.sort_by_key(|o| o.first);
        Ok(all)
    }

    /// The object of `stream` holding the highest sequence: the last one of the latest
    /// day (a handful of listings, whatever the archive's size).
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn last_object(&self, stream: &str) -> anyhow::Result<Option<ObjectRef>> {
        for y in self.folders(&[stream]).await?.iter().rev() {
            for m in self.folders(&[stream, y]).await?.iter().rev() {
                for d in self.folders(&[stream, y, m]).await?.iter().rev() {
                    let Some(day) = (|| {
                        NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)
                    })() else {
                        continue;
                    };
                    if let Some(o) = self
                        .day_objects(stream, day)
                        .await?
                        .into_iter()
                        .max_by_key(|o| o.last)
                    {
                        return Ok(Some(o));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Reads one object whole (what `erase` rewrites): every entry as stored, within
    /// `ARCHIVE_READ_MAX_BYTES`.
    ///
    /// # Errors
    /// When it cannot be fetched, is larger than the bound, or is not an object.
    pub async fn read(&self, object: &ObjectRef) -> anyhow::Result<Vec<Entry>> {
        let got = self
            .store
            .get(&object.path)
            .await
            .with_context(|| format!("fetching {}", object.path))?;
        // Compressed bytes never exceed what they decompress to by much: the same bound.
        anyhow::ensure!(
            got.meta.size <= self.read_max,
            "{} is {} bytes, more than ARCHIVE_READ_MAX_BYTES ({})",
            object.path,
            got.meta.size,
            self.read_max
        );
        let bytes = got
            .bytes()
            .await
            .with_context(|| format!("fetching {}", object.path))?;
        decompress(&bytes, self.read_max).with_context(|| format!("reading {}", object.path))
    }

    /// Reads one object for a replay: the entries whose sequence its name and the stream
    /// vouch for ([`Read`]), the others refused and named.
    ///
    /// # Errors
    /// As [`Archive::read`].
    pub async fn read_checked(
        &self,
        object: &ObjectRef,
        stream_last: Option<u64>,
    ) -> anyhow::Result<Read> {
        Ok(checked(object, self.read(object).await?, stream_last))
    }

    /// Writes a new object, only if no object of that name exists (`If-None-Match: *`).
    ///
    /// # Errors
    /// When the store refuses or cannot be reached.
    pub async fn put_new(&self, path: &Path, bytes: Vec<u8>) -> object_store::Result<Put> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::AlreadyThere),
            Err(e) => Err(e),
        }
    }

    /// Replaces an object (erasure rewrites objects without the erased records).
    ///
    /// # Errors
    /// When the store refuses or cannot be reached.
    pub async fn replace(&self, path: &Path, bytes: Vec<u8>) -> object_store::Result<()> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn in_memory(prefix: &str) -> Archive {
        Archive {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: prefix.to_owned(),
            url: format!("memory:///{prefix}"),
            read_max: 1 << 20,
        }
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn at(d: NaiveDate) -> DateTime<Utc> {
        d.and_hms_opt(12, 0, 0).unwrap().and_utc()
    }

    #[tokio::test]
    async fn a_time_range_lists_only_its_days_and_the_last_object_is_found() {
        let a = in_memory("calls");
        let days = [
            day(2025, 12, 31),
            day(2026, 1, 1),
            day(2026, 1, 31),
            day(2026, 2, 1),
            day(2026, 3, 15),
        ];
        let mut seq = 1;
        for (i, d) in days.iter().enumerate() {
            for _ in 0..=i {
                let path = a.object_path("CALLS", *d, seq, seq + 9);
                assert_eq!(a.put_new(&path, vec![1]).await.unwrap(), Put::Created);
                seq += 10;
            }
        }
        // Another stream and a stray object are not mixed in.
        let other = a.object_path("CALLS_E1_P0", day(2026, 1, 1), 1, 5);
        a.put_new(&other, vec![1]).await.unwrap();
        a.replace(&Path::from("calls/CALLS/2026/01/01/notes.txt"), vec![1])
            .await
            .unwrap();

        assert_eq!(a.streams().await.unwrap(), ["CALLS", "CALLS_E1_P0"]);
        let all = a.objects("CALLS", None, None).await.unwrap();
        assert_eq!(all.len(), 15);
        assert!(all.windows(2).all(|w| w[1].first == w[0].last + 1));
        let jan = a
            .objects(
                "CALLS",
                Some(at(day(2026, 1, 1))),
                Some(at(day(2026, 1, 31))),
            )
            .await
            .unwrap();
        assert_eq!(
            jan.iter().map(|o| o.day).collect::<Vec<_>>(),
            [
                day(2026, 1, 1),
                day(2026, 1, 1),
                day(2026, 1, 31),
                day(2026, 1, 31),
                day(2026, 1, 31)
            ]
        );
        let since_feb = a
            .objects("CALLS", Some(at(day(2026, 2, 1))), None)
            .await
            .unwrap();
        assert_eq!(since_feb.len(), 9);
        let until_2025 = a
            .objects("CALLS", None, Some(at(day(2025, 12, 31))))
            .await
            .unwrap();
        assert_eq!(until_2025.len(), 1);
        assert!(a
            .objects("CALLS", Some(at(day(2027, 1, 1))), None)
            .await
            .unwrap()
            .is_empty());
        let last = a.last_object("CALLS").await.unwrap().unwrap();
        assert_eq!((last.day, last.last), (day(2026, 3, 15), 150));
        assert_eq!(a.last_object("NOPE").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_object_is_written_once() {
        let a = in_memory("");
        let path = a.object_path("CALLS", day(2026, 1, 1), 1, 2);
        let line = Entry::new(1, "s", Utc::now(), b"{}").line();
        let bytes = compress([line.as_slice()]).unwrap();
        assert_eq!(a.put_new(&path, bytes.clone()).await.unwrap(), Put::Created);
        assert_eq!(a.put_new(&path, vec![0]).await.unwrap(), Put::AlreadyThere);
        let o = a.parse(&path).unwrap();
        assert_eq!(a.read(&o).await.unwrap().len(), 1, "the first write stays");
    }

    #[test]
    fn entries_keep_the_payload_byte_for_byte() {
        let t = Utc::now();
        for payload in [
            br#"{"v":1,"a":[1,2]}"#.as_slice(),
            b" {\"padded\":true} ",
            b"{\"multi\":\n1}",
            b"not json",
            b"\xff\xfe",
            b"",
        ] {
            let e = Entry::new(7, "calls.ingest.x", t, payload);
            let line = e.line();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            let back: Entry = serde_json::from_slice(&line).unwrap();
            assert_eq!(back.payload().as_ref(), payload);
            assert_eq!(back.seq, 7);
            assert_eq!(back.time, t);
        }
    }

    #[test]
    fn the_direct_line_of_an_envelope_is_the_entry_line() {
        let t = Utc::now();
        let payload = br#"{"v":1,"s":"a \"quoted\" \u00e9 text","n":[1,2.5]}"#;
        let direct = Entry::line_of_json(42, "calls.ingest.\"x\"", t, payload);
        assert_eq!(
            direct,
            Entry::new(42, "calls.ingest.\"x\"", t, payload).line()
        );
        let back: Entry = serde_json::from_slice(&direct).unwrap();
        assert_eq!(back.payload().as_ref(), payload);
        // Not a one-line object: the checked path (base64 when it cannot be embedded).
        for odd in [b" {} ".as_slice(), b"{\n}", b"[1]"] {
            let line = Entry::line_of_json(1, "s", t, odd);
            let back: Entry = serde_json::from_slice(&line).unwrap();
            assert_eq!(back.payload().as_ref(), odd);
        }
    }

    #[test]
    fn objects_round_trip_through_zstd() {
        let t = Utc::now();
        let lines: Vec<Vec<u8>> = (1..=3)
            .map(|s| Entry::new(s, "calls.ingest.x", t, br#"{"n":1}"#).line())
            .collect();
        let bytes = compress(lines.iter().map(Vec::as_slice)).unwrap();
        let back = decompress(&bytes, 1 << 20).unwrap();
        assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(decompress(b"plain", 1 << 20).is_err());
    }

    /// The third probe's bomb: a small object that decompresses to gigabytes. It is
    /// refused once the bound is passed, never held whole.
    #[test]
    fn an_object_decompressing_past_the_bound_is_refused() {
        let bomb = zstd::encode_all(std::io::repeat(b'{').take(64 << 20), 19).unwrap();
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        let e = decompress(&bomb, 8 << 20).unwrap_err();
        assert!(
            format!("{e:#}").contains("more than 8388608 bytes"),
            "{e:#}"
        );
    }

    /// An entry is trusted no more than its object's name and the stream: the probe's
    /// `seq` 2^64-1 froze a row.
    #[test]
    fn entries_outside_their_objects_range_or_the_stream_are_refused() {
        let t = Utc::now();
        let object = ObjectRef {
            path: Path::from("calls/CALLS/2026/12/02/1-3.jsonl.zst"),
            stream: "CALLS".into(),
            day: t.date_naive(),
            first: 10,
            last: 20,
        };
        let entry = |seq| Entry::new(seq, "calls.ingest.x", t, br#"{"n":1}"#);
        let read = checked(
            &object,
            vec![
                entry(10),
                entry(u64::MAX),
                entry(12),
                entry(12),
                entry(9),
                entry(19),
                entry(20),
            ],
            Some(19),
        );
        assert_eq!(
            read.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [10, 12, 19]
        );
        assert_eq!(read.refused.len(), 4, "{:?}", read.refused);
        assert!(read.refused[0].contains("outside the object's range 10..=20"));
        assert!(read
            .refused
            .iter()
            .any(|r| r.contains("above the stream's last sequence 19")));
        assert!(read
            .refused
            .iter()
            .any(|r| r.contains("does not follow 12")));
    }

    #[test]
    fn names_sort_by_sequence_and_parse_back() {
        let a = Archive::open("s3://bucket/some/prefix").unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 3, 9).unwrap();
        let p = a.object_path("CALLS_E1_P0", day, 9, 120);
        assert_eq!(
            p.as_ref(),
            "some/prefix/CALLS_E1_P0/2026/03/09/00000000000000000009-00000000000000000120.jsonl.zst"
        );
        assert!(a.object_path("S", day, 9, 9).as_ref() < a.object_path("S", day, 10, 11).as_ref());
        assert_eq!(
            a.parse(&p),
            Some(ObjectRef {
                path: p.clone(),
                stream: "CALLS_E1_P0".into(),
                day,
                first: 9,
                last: 120
            })
        );
        assert_eq!(
            a.parse(&Path::from("some/prefix/CALLS/2026/03/09/x.txt")),
            None
        );
        let root = Archive::open("s3://bucket").unwrap();
        let p = root.object_path("CALLS", day, 1, 2);
        assert!(p.as_ref().starts_with("CALLS/2026/03/09/"));
        assert_eq!(root.parse(&p).map(|o| o.last), Some(2));
        assert!(Archive::open("http://bucket/x").is_err());
        assert!(Archive::open("s3:///x").is_err());
    }
}
