//! `ingest-gateway connectors …`: create, list, rotate and revoke provider connectors,
//! and make the secrets key that seals their secrets.
//!
//! Output goes to the given writer (stdout in `main`), so tests read it back. `create`
//! and an Exotel `rotate-secret` print the URL to paste into the provider's console as
//! the last line, for scripts (`URL=$(… | tail -n1)`).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context as _};
use async_nats::jetstream::kv;
use chrono::{Duration, Utc};
use rand::distr::{Alphanumeric, SampleString};
use uuid::Uuid;

use crate::connectors::seal::SecretsKey;
use crate::connectors::{ConnectorRecord, Provider, StoredSecret};
use callcap::phone;

/// Longest provider secret taken (Twilio and Plivo tokens are 32 characters).
const MAX_SECRET_BYTES: usize = 512;
/// Characters of an Exotel URL token (~238 random bits).
const TOKEN_CHARS: usize = 40;
/// Most retired secrets kept besides the current one.
const MAX_PREVIOUS_SECRETS: usize = 2;

/// What `connectors create` takes.
pub struct NewConnector<'a> {
    pub company: Uuid,
    pub provider: Provider,
    pub public_url: &'a str,
    pub secret_file: Option<&'a Path>,
    pub country: Option<&'a str>,
    pub allow_networks: &'a [String],
    /// Vonage: the application id whose callbacks the connector takes.
    pub application: Option<&'a str>,
}

/// Checks an application id given for `provider`: required for Vonage (its token does
/// not cover the URL), refused for the others (their signature covers the connector's
/// URL, which names the connector).
fn application(provider: Provider, given: Option<&str>) -> anyhow::Result<Option<String>> {
    match (provider, given.map(str::trim)) {
        (Provider::Vonage, None) => bail!(
            "--application is required for Vonage: the id of the Vonage application whose Event URL this is \
             (its signed tokens name it; a connector takes only its own application's callbacks)"
        ),
        (Provider::Vonage, Some(a)) => {
            if a.is_empty()
                || a.len() > 64
                || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                bail!("--application must be a Vonage application id (letters, digits and dashes)");
            }
            Ok(Some(a.to_ascii_lowercase()))
        }
        (_, None) => Ok(None),
        (_, Some(_)) => bail!(
            "--application is for Vonage; the other providers sign the connector's own URL"
        ),
    }
}

/// Refuses a Vonage secret and application that another company's connector already
/// holds: one signed event would be stored for both companies. The same account serving
/// two companies needs one application per company (each connector takes only its own).
async fn refuse_shared(
    store: &kv::Store,
    key: &SecretsKey,
    record: &ConnectorRecord,
    secret: &[u8],
) -> anyhow::Result<()> {
    if record.provider != Provider::Vonage {
        return Ok(());
    }
    for other in records(store, None).await? {
        if other.company_id == record.company_id
            || other.provider != Provider::Vonage
            || other.account != record.account
        {
            continue;
        }
        let context = other.seal_context();
        let shares = other
            .secrets
            .iter()
            .filter_map(|s| key.open(&s.sealed, &context).ok())
            .any(|plain| plain == secret);
        if shares {
            bail!(
                "connector {} of company {} already takes this Vonage application's callbacks with the same \
                 signature secret: one signed event would be stored for both companies. Give each company \
                 its own Vonage application",
                other.connector_id,
                other.company_id
            );
        }
    }
    Ok(())
}

/// Checks and normalizes the public base URL: https (http only for loopback, for local
/// trials), no query or fragment, no trailing `/`.
fn public_url(raw: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(raw.trim())
        .with_context(|| format!("--public-url {raw:?} is not a URL"))?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        bail!("--public-url must be https (providers refuse or warn on plain http); http is taken for localhost only");
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        bail!("--public-url must be a base URL without query, fragment or credentials");
    }
    if raw.len() > 512 {
        bail!("--public-url must be at most 512 characters");
    }
    // As typed (less a trailing slash): the provider signs the URL exactly as it is
    // pasted, so no normalization may change it.
    Ok(raw.trim().trim_end_matches('/').to_owned())
}

fn read_secret(provider: Provider, file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match (provider.signs(), file) {
        (false, None) => Ok(Alphanumeric
            .sample_string(&mut rand::rng(), TOKEN_CHARS)
            .into_bytes()),
        (false, Some(_)) => bail!("Exotel signs nothing: its connector URL carries a token this command makes; leave out --secret-file"),
        (true, None) => bail!(
            "--secret-file is required for {}: a file holding its {}",
            provider.as_str(),
            provider.secret_name()
        ),
        (true, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --secret-file {}", path.display()))?;
            let secret = text.trim();
            if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
                bail!("--secret-file must hold the {} (1 to {MAX_SECRET_BYTES} bytes)", provider.secret_name());
            }
            Ok(secret.as_bytes().to_vec())
        }
    }
}

/// Creates a connector, stores it and prints it; the callback URL is the last line.
///
/// # Errors
/// When an argument is unusable or the bucket cannot be written.
pub async fn create(
    store: &kv::Store,
    key: &SecretsKey,
    new: &NewConnector<'_>,
    out: &mut impl Write,
) -> anyhow::Result<ConnectorRecord> {
    let public_url = public_url(new.public_url)?;
    let country = match new.country {
        None => None,
        Some(c) => Some(
            phone::country(c)
                .with_context(|| {
                    format!(
                        "--country {c:?} is not one this gateway knows; known: {}",
                        phone::COUNTRIES
                            .iter()
                            .map(|c| c.iso)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
                .iso
                .to_owned(),
        ),
    };
    for n in new.allow_networks {
        n.parse::<ipnet::IpNet>().with_context(|| {
            format!("--allow-network {n:?} is not a network (e.g. 203.0.113.0/24)")
        })?;
    }
    if !new.allow_networks.is_empty() && new.provider != Provider::Exotel {
        bail!("--allow-network is for Exotel, which signs nothing; the other providers' signatures authenticate them");
    }
    let account = application(new.provider, new.application)?;
    let secret = read_secret(new.provider, new.secret_file)?;
    let mut record = ConnectorRecord {
        connector_id: format!(
            "c{}",
            Alphanumeric
                .sample_string(&mut rand::rng(), 15)
                .to_lowercase()
        ),
        company_id: new.company,
        provider: new.provider,
        public_url,
        country,
        allow_networks: new.allow_networks.to_vec(),
        account,
        secrets: Vec::new(),
        created_at: Utc::now(),
    };
    refuse_shared(store, key, &record, &secret).await?;
    record.secrets.push(StoredSecret {
        sealed: key.seal(&secret, &record.seal_context())?,
        added_at: record.created_at,
        retire_at: None,
    });
    let value = serde_json::to_vec(&record).context("encoding the connector")?;
    store
        .create(&record.connector_id, value.into())
        .await
        .context("storing the connector in NATS KV")?;
    writeln!(out, "connector_id: {}", record.connector_id)?;
    writeln!(out, "company_id:   {}", record.company_id)?;
    writeln!(out, "provider:     {}", record.provider.as_str())?;
    if let Some(c) = &record.country {
        writeln!(out, "country:      {c}")?;
    }
    if let Some(a) = &record.account {
        writeln!(out, "application:  {a}")?;
    }
    writeln!(
        out,
        "Paste the URL below into the {} console as the status (and recording) callback, method POST.",
        record.provider.as_str()
    )?;
    let token = (!record.provider.signs()).then(|| String::from_utf8_lossy(&secret).into_owned());
    writeln!(out, "{}", record.callback_url(token.as_deref()))?;
    Ok(record)
}

/// Reads every connector, optionally for one company, sorted by creation time.
///
/// # Errors
/// When the bucket cannot be read.
pub async fn records(
    store: &kv::Store,
    company: Option<Uuid>,
) -> anyhow::Result<Vec<ConnectorRecord>> {
    let mut out: Vec<ConnectorRecord> = crate::kv::read_all(store, "connector").await?;
    out.retain(|r| company.is_none_or(|c| c == r.company_id));
    out.sort_by_key(|r| r.created_at);
    Ok(out)
}

/// Prints the connectors as a table (never a secret or token).
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
        "{:<17} {:<36} {:<8} {:<7} {:<20} PUBLIC_URL",
        "CONNECTOR_ID", "COMPANY_ID", "PROVIDER", "SECRETS", "CREATED_AT"
    )?;
    let now = Utc::now();
    for r in &rows {
        let valid = r
            .secrets
            .iter()
            .filter(|s| s.retire_at.is_none_or(|t| t > now))
            .count();
        writeln!(
            out,
            "{:<17} {:<36} {:<8} {:<7} {:<20} {}",
            r.connector_id,
            r.company_id,
            r.provider.as_str(),
            valid,
            r.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.public_url
        )?;
    }
    writeln!(out, "{} connector(s)", rows.len())?;
    Ok(())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

async fn read(store: &kv::Store, id: &str) -> anyhow::Result<(ConnectorRecord, u64)> {
    if !valid_id(id) {
        bail!("no connector with id {id:?}");
    }
    let entry = store
        .entry(id)
        .await
        .context("reading the connector")?
        .filter(|e| e.operation == kv::Operation::Put)
        .with_context(|| format!("no connector with id {id:?}"))?;
    let record = serde_json::from_slice(&entry.value)
        .with_context(|| format!("connector {id} is unreadable"))?;
    Ok((record, entry.revision))
}

/// Makes a new secret current and keeps the previous ones valid for `overlap` (the
/// window in which the provider still signs with the old one), then retired. For Exotel
/// a new URL token is made and the new URL printed last.
///
/// # Errors
/// When there is no such connector, the secret is unusable, or the bucket changed
/// meanwhile (run it again).
pub async fn rotate_secret(
    store: &kv::Store,
    key: &SecretsKey,
    id: &str,
    secret_file: Option<&Path>,
    overlap: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (mut record, revision) = read(store, id).await?;
    let secret = read_secret(record.provider, secret_file)?;
    refuse_shared(store, key, &record, &secret).await?;
    let now = Utc::now();
    let retire = now + overlap;
    for s in &mut record.secrets {
        s.retire_at = Some(s.retire_at.map_or(retire, |t| t.min(retire)));
    }
    record
        .secrets
        .retain(|s| s.retire_at.is_none_or(|t| t > now));
    record.secrets.truncate(MAX_PREVIOUS_SECRETS);
    record.secrets.insert(
        0,
        StoredSecret {
            sealed: key.seal(&secret, &record.seal_context())?,
            added_at: now,
            retire_at: None,
        },
    );
    let value = serde_json::to_vec(&record).context("encoding the connector")?;
    store
        .update(id, value.into(), revision)
        .await
        .context("storing the connector (changed meanwhile? run again)")?;
    writeln!(
        out,
        "rotated the secret of {id}; the previous one is accepted until {}",
        retire.to_rfc3339()
    )?;
    if !record.provider.signs() {
        writeln!(
            out,
            "Paste the new URL into the Exotel console before then:"
        )?;
        writeln!(
            out,
            "{}",
            record.callback_url(Some(&String::from_utf8_lossy(&secret)))
        )?;
    }
    Ok(())
}

/// Binds a Vonage connector made before connectors named their application to
/// `application`: until then its callbacks are answered 503 (Vonage retries).
///
/// # Errors
/// When there is no such connector, it is not Vonage's, another company's connector
/// holds the same secret for that application, or the bucket changed meanwhile.
pub async fn bind(
    store: &kv::Store,
    key: &SecretsKey,
    id: &str,
    application_id: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (mut record, revision) = read(store, id).await?;
    if record.provider != Provider::Vonage {
        bail!(
            "connector {id} is {}'s: only Vonage connectors are bound to an application",
            record.provider.as_str()
        );
    }
    record.account = application(record.provider, Some(application_id))?;
    let context = record.seal_context();
    for s in &record.secrets {
        let plain = key
            .open(&s.sealed, &context)
            .context("opening the connector's secret (CONNECTOR_SECRETS_KEY_FILE is not the key that sealed it?)")?;
        refuse_shared(store, key, &record, &plain).await?;
    }
    let value = serde_json::to_vec(&record).context("encoding the connector")?;
    store
        .update(id, value.into(), revision)
        .await
        .context("storing the connector (changed meanwhile? run again)")?;
    writeln!(
        out,
        "bound {id} to Vonage application {}; it takes that application's callbacks only",
        record.account.as_deref().unwrap_or_default()
    )?;
    Ok(())
}

/// Revokes a connector: its callbacks are refused from then on.
///
/// # Errors
/// When there is no such connector or the bucket cannot be written.
pub async fn revoke(store: &kv::Store, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    read(store, id).await?;
    store.delete(id).await.context("deleting the connector")?;
    writeln!(out, "revoked {id}")?;
    Ok(())
}

/// Writes a new secrets key to `path` (readable by its owner only; never overwrites).
///
/// # Errors
/// When the file exists or cannot be written.
pub fn new_secrets_key(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = SecretsKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    writeln!(file, "{text}")?;
    let key = SecretsKey::from_base64(&text)?;
    writeln!(
        out,
        "wrote a connector secrets key to {} (fingerprint {}); give it to every gateway as CONNECTOR_SECRETS_KEY_FILE",
        path.display(),
        key.fingerprint()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_https_bases() {
        assert_eq!(
            public_url("https://calls.example.com/").unwrap(),
            "https://calls.example.com"
        );
        assert_eq!(
            public_url("https://example.com/callcap").unwrap(),
            "https://example.com/callcap"
        );
        assert_eq!(
            public_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(public_url("http://calls.example.com").is_err());
        assert!(public_url("https://calls.example.com/?a=1").is_err());
        assert!(public_url("https://u:p@calls.example.com").is_err());
        assert!(public_url("calls.example.com").is_err());
    }
}
