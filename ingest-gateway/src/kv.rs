//! The NATS KV buckets the gateways read (API keys, provider connectors): opening them
//! with the stream's replica count, and mirroring one into memory.
//!
//! Each gateway keeps an in-memory copy of a bucket ([`Mirror`]) current through a watch,
//! so a change made by an admin command reaches every running gateway within a second and
//! a request never waits on NATS to learn who is calling.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use callcap::subjects::{self, SetupError};
use futures::StreamExt;

/// A bucket's name, the stream JetStream keeps it in, and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct BucketSpec {
    pub name: &'static str,
    pub stream: &'static str,
    pub description: &'static str,
}

/// The API key bucket.
pub const KEYS: BucketSpec = BucketSpec {
    name: subjects::KEYS_BUCKET,
    stream: subjects::KEYS_BUCKET_STREAM,
    description: "Call Capture API keys (SHA-256 only)",
};

/// The provider connector bucket.
pub const CONNECTORS: BucketSpec = BucketSpec {
    name: subjects::CONNECTORS_BUCKET,
    stream: subjects::CONNECTORS_BUCKET_STREAM,
    description: "Call Capture provider connectors (secrets sealed with the gateways' key)",
};

/// Opens a bucket, creating it on first use with as many replicas as the stream
/// (`STREAM_REPLICAS`, see [`callcap::subjects::target_replicas`]), and applying a
/// changed `STREAM_REPLICAS` to an existing one (admin commands).
///
/// # Errors
/// When JetStream is unreachable or cannot have the replica count.
pub async fn bucket(
    js: &jetstream::Context,
    spec: BucketSpec,
    requested_replicas: Option<u8>,
) -> Result<kv::Store, SetupError> {
    if let Ok(store) = js.get_key_value(spec.name).await {
        subjects::apply_replicas(js, spec.stream, requested_replicas).await?;
        return Ok(store);
    }
    let replicas =
        subjects::target_replicas(spec.name, requested_replicas, None, subjects::clustered(js))?;
    js.create_key_value(kv::Config {
        bucket: spec.name.to_owned(),
        description: spec.description.into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| SetupError::Nats(e.into()))
}

/// Opens a bucket for a serving gateway: creates it when missing, otherwise uses it as
/// it is (changing its replicas is `ingest-gateway setup`'s job, admin identity).
///
/// # Errors
/// As [`bucket`].
pub async fn open_bucket(
    js: &jetstream::Context,
    spec: BucketSpec,
    requested_replicas: Option<u8>,
) -> Result<kv::Store, SetupError> {
    match js.get_key_value(spec.name).await {
        Ok(store) => Ok(store),
        Err(_) => bucket(js, spec, requested_replicas).await,
    }
}

/// Reads every record of a bucket (admin listings), decoded as `T`.
///
/// # Errors
/// When the bucket cannot be read or a record is unreadable.
pub async fn read_all<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    use anyhow::Context as _;
    use futures::TryStreamExt as _;
    let ids: Vec<String> = store
        .keys()
        .await
        .with_context(|| format!("listing {what}s"))?
        .try_collect()
        .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(bytes) = store
            .get(&id)
            .await
            .with_context(|| format!("reading {what} {id}"))?
        else {
            continue;
        };
        out.push(
            serde_json::from_slice(&bytes).with_context(|| format!("{what} {id} is unreadable"))?,
        );
    }
    Ok(out)
}

/// An in-memory copy of a bucket, kept current by [`watch`].
pub trait Mirror: Send + Sync + 'static {
    /// What the bucket holds, for logs ("API key", "connector").
    const WHAT: &'static str;
    /// A put of `key`; `value` is the stored record (an unreadable one is the mirror's to
    /// log and ignore).
    fn put(&self, key: &str, value: &[u8]);
    /// A delete or purge of `key`.
    fn delete(&self, key: &str);
    /// The whole bucket as it was when the watch started has been applied.
    fn mark_loaded(&self);
}

/// Keeps `mirror` in step with the bucket until the process ends: reads every entry,
/// marks the mirror loaded, then applies puts and deletes as they happen. Rewatches
/// after errors.
pub async fn watch<M: Mirror>(store: kv::Store, mirror: Arc<M>) {
    loop {
        if let Err(e) = watch_once(&store, mirror.as_ref()).await {
            tracing::warn!(error = %e, what = M::WHAT, "bucket watch interrupted; rewatching");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn watch_once<M: Mirror>(store: &kv::Store, mirror: &M) -> Result<(), async_nats::Error> {
    let last = store.status().await?.info.state.last_sequence;
    let mut watch = store.watch_all_from_revision(1).await?;
    if last == 0 {
        mirror.mark_loaded();
    }
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        match entry.operation {
            kv::Operation::Put => mirror.put(&entry.key, &entry.value),
            kv::Operation::Delete | kv::Operation::Purge => mirror.delete(&entry.key),
        }
        if entry.revision >= last {
            mirror.mark_loaded();
        }
    }
    Ok(())
}
