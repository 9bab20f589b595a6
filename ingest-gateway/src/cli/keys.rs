//! `ingest-gateway keys …`: create, list and revoke API keys in the KV bucket.
//!
//! Output goes to the given writer (stdout in `main`), so tests read it back. The secret is
//! printed once, alone on the last line, for scripts (`KEY=$(… | tail -n1)`).

use std::io::Write;

use anyhow::{bail, Context as _};
use async_nats::jetstream::kv;
use chrono::Utc;
use uuid::Uuid;

use crate::auth::{mint, KeyRecord};

/// Creates a key, stores its record and prints it.
///
/// # Errors
/// When the bucket cannot be written or the name is unusable.
pub async fn create(
    store: &kv::Store,
    company: Uuid,
    name: &str,
    expires_in_days: Option<u32>,
    out: &mut impl Write,
) -> anyhow::Result<KeyRecord> {
    if name.trim().is_empty() || name.len() > 200 {
        bail!("--name must be 1 to 200 characters");
    }
    let expires_at = expires_in_days.map(|d| Utc::now() + chrono::Duration::days(i64::from(d)));
    let new = mint(company, name, expires_at);
    let value = serde_json::to_vec(&new.record).context("encoding the key record")?;
    store
        .create(&new.record.key_id, value.into())
        .await
        .context("storing the key record in NATS KV")?;
    writeln!(out, "key_id:     {}", new.record.key_id)?;
    writeln!(out, "company_id: {}", new.record.company_id)?;
    writeln!(out, "name:       {}", new.record.name)?;
    if let Some(t) = new.record.expires_at {
        writeln!(out, "expires_at: {}", t.to_rfc3339())?;
    }
    writeln!(
        out,
        "The key below is shown once; store it now. Only its SHA-256 is kept."
    )?;
    writeln!(out, "{}", new.key)?;
    Ok(new.record)
}

/// Reads every key record, optionally for one company, sorted by creation time.
///
/// # Errors
/// When the bucket cannot be read.
pub async fn records(store: &kv::Store, company: Option<Uuid>) -> anyhow::Result<Vec<KeyRecord>> {
    let mut out: Vec<KeyRecord> = crate::kv::read_all(store, "key record").await?;
    out.retain(|r| company.is_none_or(|c| c == r.company_id));
    out.sort_by_key(|r| r.created_at);
    Ok(out)
}

/// Prints the key records as a table.
///
/// # Errors
/// When the bucket cannot be read.
pub async fn list(
    store: &kv::Store,
    company: Option<Uuid>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rows = records(store, company).await?;
    writeln!(
        out,
        "{:<17} {:<36} {:<25} {:<25} NAME",
        "KEY_ID", "COMPANY_ID", "CREATED_AT", "EXPIRES_AT"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<17} {:<36} {:<25} {:<25} {}",
            r.key_id,
            r.company_id,
            r.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.expires_at.map_or("-".to_owned(), |t| t
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()),
            r.name
        )?;
    }
    writeln!(out, "{} key(s)", rows.len())?;
    Ok(())
}

/// Revokes a key by id.
///
/// # Errors
/// When there is no such key or the bucket cannot be written.
pub async fn revoke(store: &kv::Store, key_id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let valid_id = !key_id.is_empty()
        && key_id.len() <= 64
        && key_id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid_id
        || store
            .get(key_id)
            .await
            .context("reading the key record")?
            .is_none()
    {
        bail!("no API key with id {key_id:?}");
    }
    store
        .delete(key_id)
        .await
        .context("deleting the key record")?;
    writeln!(out, "revoked {key_id}")?;
    Ok(())
}
