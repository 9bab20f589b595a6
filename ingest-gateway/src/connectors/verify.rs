//! Each provider's callback signature, checked as the provider's own SDK checks it,
//! before anything of the callback is used.
//!
//! The URL a provider signed is the connector's public URL plus the request's path and
//! query: never what `Host` or `X-Forwarded-*` say, which a forger controls. Every
//! comparison of a signature or hash is constant-time (`ring::hmac::verify`, `subtle`).
//!
//! - Twilio (`X-Twilio-Signature`): base64 HMAC-SHA1 (or HMAC-SHA256 when
//!   `X-Twilio-Webhooks-Signature-Settings` says so) of the URL followed by every form
//!   parameter, sorted by name, as name then value. A JSON body is signed through the
//!   URL's `bodySHA256` (hex SHA-256 of the body). Twilio signs the URL with or without
//!   the default port, so both are tried.
//! - Plivo (`X-Plivo-Signature-V3`, `X-Plivo-Signature-V3-Nonce`): base64 HMAC-SHA256 of
//!   the URL (query sorted), the sorted POST parameters and `.nonce`; the header may hold
//!   several signatures, comma-separated, and any may match.
//! - Vonage (`Authorization: Bearer <JWT>`): HS256 with the signature secret; the
//!   `application_id` claim is the connector's application; the `payload_hash` claim is
//!   the hex SHA-256 of the body; an expired token (its `exp`, or without one an `iat`
//!   older than [`VONAGE_MAX_AGE_SECS`]) is refused. The token covers the body, not the
//!   URL: nothing of a Vonage callback's URL reaches the record.
//! - Exotel signs nothing: the URL's last segment is the connector's token, and the
//!   connector may restrict the source networks.
//!
//! The check is in two steps: [`check_head`] before the body is read (a signature is
//! there at all; Vonage's token and Exotel's token whole), [`check_body`] after. A JSON
//! body is taken only where a signature covers it (Twilio through `bodySHA256`, Vonage);
//! Twilio and Plivo callbacks without form parameters are refused, their signature
//! covering the URL alone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::http::HeaderMap;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use ring::hmac;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Connector, Provider};

/// Oldest Vonage token taken when it carries no `exp`: its `iat` plus this.
pub const VONAGE_MAX_AGE_SECS: i64 = 300;
/// Clock difference allowed between Vonage and this gateway.
pub const CLOCK_LEEWAY_SECS: i64 = 60;

/// What a callback shows before its body: checked before a byte of the body is read, so
/// a forger without the secret (Vonage) or the token (Exotel), or without any signature,
/// holds no memory.
pub struct Head<'a> {
    pub headers: &'a HeaderMap,
    /// The token segment of the URL (Exotel).
    pub token: Option<&'a str>,
    /// The client's address (the connecting peer, or what a trusted proxy forwarded).
    pub peer: Option<IpAddr>,
    pub now: DateTime<Utc>,
}

/// What the head's check leaves for the body's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Twilio, Plivo: the signature covers the URL and the body; checked with the body.
    Signature,
    /// Vonage: the token is verified; the body must hash to its `payload_hash`.
    PayloadHash(String),
    /// Exotel: the URL's token (and network) were all there is to check.
    Nothing,
}

/// A callback's body as received, for the check of what [`check_head`] left.
pub struct Callback<'a> {
    /// The request's path and query, as sent (`/v1/callbacks/c…?x=1`).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// Whether the body is JSON (else a form).
    pub json: bool,
    /// Parameters of a form body (name → values, in order).
    pub form: &'a BTreeMap<String, Vec<String>>,
    pub now: DateTime<Utc>,
}

/// Why a callback was refused: missing credentials (401), or wrong ones or a body its
/// signature does not cover (403). The text, one of a closed set of literals, names what,
/// never a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Missing(&'static str),
    #[error("{0}")]
    Mismatch(&'static str),
}

/// Checks what can be checked before the body: that a signature is there (Twilio,
/// Plivo), the whole token but its body hash (Vonage: signature, expiry, the connector's
/// application), the URL's token and source network (Exotel).
///
/// # Errors
/// The refusal, when no valid secret verifies it.
pub fn check_head(connector: &Connector, head: &Head<'_>) -> Result<Pending, Refusal> {
    let secrets: Vec<&[u8]> = connector.valid_secrets(head.now).collect();
    match connector.record.provider {
        Provider::Twilio => header(head.headers, "x-twilio-signature")
            .map(|_| Pending::Signature)
            .ok_or(Refusal::Missing("X-Twilio-Signature is missing")),
        Provider::Plivo => {
            header(head.headers, "x-plivo-signature-v3")
                .ok_or(Refusal::Missing("X-Plivo-Signature-V3 is missing"))?;
            header(head.headers, "x-plivo-signature-v3-nonce")
                .ok_or(Refusal::Missing("X-Plivo-Signature-V3-Nonce is missing"))?;
            Ok(Pending::Signature)
        }
        Provider::Vonage => vonage(connector, &secrets, head).map(Pending::PayloadHash),
        Provider::Exotel => exotel(connector, &secrets, head).map(|()| Pending::Nothing),
    }
}

/// Checks the body against what [`check_head`] left: the signature over the URL and the
/// form (Twilio, Plivo), a JSON body through the signed URL's `bodySHA256` (Twilio), the
/// body's hash (Vonage).
///
/// # Errors
/// The refusal, when the body is not what was signed.
pub fn check_body(
    connector: &Connector,
    pending: &Pending,
    cb: &Callback<'_>,
) -> Result<(), Refusal> {
    let url = format!("{}{}", connector.record.public_url, cb.path_and_query);
    let secrets: Vec<&[u8]> = connector.valid_secrets(cb.now).collect();
    match pending {
        Pending::Signature => match connector.record.provider {
            Provider::Twilio => twilio(&secrets, &url, cb),
            _ => plivo(&secrets, &url, cb),
        },
        Pending::PayloadHash(hash) => {
            if equal(
                sha256_hex(cb.body).as_bytes(),
                hash.to_ascii_lowercase().as_bytes(),
            ) {
                Ok(())
            } else {
                Err(Refusal::Mismatch(
                    "the body does not match the token's payload_hash",
                ))
            }
        }
        Pending::Nothing => Ok(()),
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The URL's query parameters (decoded), if it has a query.
fn query_of(url: &str) -> Vec<(String, String)> {
    url.split_once('?')
        .map(|(_, q)| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// `url` with its authority's port removed, and with the scheme's default port added
/// (Twilio signs either).
fn with_and_without_port(url: &str) -> [String; 2] {
    let Some((scheme, rest)) = url.split_once("://") else {
        return [url.to_owned(), url.to_owned()];
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    // An IPv6 literal's colons are inside brackets.
    let port_at = authority
        .rfind(':')
        .filter(|&i| !authority[i..].contains(']'));
    let host = port_at.map_or(authority, |i| &authority[..i]);
    let with = if port_at.is_some() {
        authority.to_owned()
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        };
        format!("{authority}:{port}")
    };
    [
        format!("{scheme}://{with}{tail}"),
        format!("{scheme}://{host}{tail}"),
    ]
}

fn twilio(secrets: &[&[u8]], url: &str, cb: &Callback<'_>) -> Result<(), Refusal> {
    let signature = header(cb.headers, "x-twilio-signature")
        .ok_or(Refusal::Missing("X-Twilio-Signature is missing"))?;
    let algorithm = header(cb.headers, "x-twilio-webhooks-signature-settings")
        .and_then(|s| {
            s.split(',').find_map(|part| {
                let (k, v) = part.split_once('=')?;
                (k.trim() == "algorithm").then(|| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "HMAC_SHA1".to_owned());
    let algorithm = match algorithm.to_ascii_uppercase().as_str() {
        "HMAC_SHA1" => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        "HMAC_SHA256" => hmac::HMAC_SHA256,
        _ => return Err(Refusal::Mismatch("unsupported Twilio signature algorithm")),
    };
    let Ok(signature) = B64.decode(signature) else {
        return Err(Refusal::Mismatch("X-Twilio-Signature does not match"));
    };
    // A JSON body is signed through the URL's bodySHA256; a form body by its parameters.
    // Without either the signature covers the URL alone, and a URL with a query is
    // itself a longer URL: a genuine signature over `URL?q` + `k1v1…` would then
    // authenticate whatever body came with the URL `URL?qk1v1…`. So a callback must carry
    // what it is signed through.
    let body_hash = query_of(url)
        .into_iter()
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v);
    let mut params = String::new();
    match body_hash {
        Some(expected) => {
            if !equal(
                sha256_hex(cb.body).as_bytes(),
                expected.to_ascii_lowercase().as_bytes(),
            ) {
                return Err(Refusal::Mismatch("the body does not match bodySHA256"));
            }
        }
        None if cb.json => {
            return Err(Refusal::Mismatch(
                "a JSON Twilio callback is signed only through the URL's bodySHA256, which this URL lacks",
            ))
        }
        None if cb.form.is_empty() => {
            return Err(Refusal::Mismatch(
                "the Twilio callback carries no form parameters: its signature would cover the URL alone",
            ))
        }
        None => {
            for (name, values) in cb.form {
                let mut values: Vec<&String> = values.iter().collect();
                values.sort();
                values.dedup();
                for v in values {
                    params.push_str(name);
                    params.push_str(v);
                }
            }
        }
    }
    let candidates = with_and_without_port(url);
    for secret in secrets {
        let key = hmac::Key::new(algorithm, secret);
        for candidate in &candidates {
            let message = format!("{candidate}{params}");
            if hmac::verify(&key, message.as_bytes(), &signature).is_ok() {
                return Ok(());
            }
        }
    }
    Err(Refusal::Mismatch("X-Twilio-Signature does not match"))
}

/// The string Plivo's V3 signature covers for a POST to `url` with `params`.
fn plivo_signed(url: &str, params: &BTreeMap<String, Vec<String>>) -> String {
    let (base, _) = url.split_once('?').unwrap_or((url, ""));
    let base = base.split_once('#').map_or(base, |(b, _)| b);
    let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in query_of(url) {
        query.entry(k).or_default().push(v);
    }
    let query = query
        .iter()
        .map(|(k, vs)| {
            let mut vs: Vec<&String> = vs.iter().collect();
            vs.sort();
            vs.iter()
                .map(|v| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        })
        .collect::<Vec<_>>()
        .join("&");
    let mut out = base.to_owned();
    if !query.is_empty() || !params.is_empty() {
        out.push('?');
        out.push_str(&query);
    }
    if !query.is_empty() && !params.is_empty() {
        out.push('.');
    }
    for (k, vs) in params {
        let mut vs: Vec<&String> = vs.iter().collect();
        vs.sort();
        for v in vs {
            out.push_str(k);
            out.push_str(v);
        }
    }
    out
}

fn plivo(secrets: &[&[u8]], url: &str, cb: &Callback<'_>) -> Result<(), Refusal> {
    let signatures = header(cb.headers, "x-plivo-signature-v3")
        .ok_or(Refusal::Missing("X-Plivo-Signature-V3 is missing"))?;
    let nonce = header(cb.headers, "x-plivo-signature-v3-nonce")
        .ok_or(Refusal::Missing("X-Plivo-Signature-V3-Nonce is missing"))?;
    // Plivo signs the form's parameters; a JSON body it does not sign at all, and an
    // empty form leaves the URL alone signed (see `twilio`).
    if cb.json {
        return Err(Refusal::Mismatch(
            "Plivo posts its callbacks as forms; a JSON body is not covered by its signature",
        ));
    }
    if cb.form.is_empty() {
        return Err(Refusal::Mismatch(
            "the Plivo callback carries no form parameters: its signature would cover the URL alone",
        ));
    }
    let message = format!("{}.{nonce}", plivo_signed(url, cb.form));
    let signatures: Vec<Vec<u8>> = signatures
        .split(',')
        .filter_map(|s| B64.decode(s.trim()).ok())
        .collect();
    for secret in secrets {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        if signatures
            .iter()
            .any(|sig| hmac::verify(&key, message.as_bytes(), sig).is_ok())
        {
            return Ok(());
        }
    }
    Err(Refusal::Mismatch("X-Plivo-Signature-V3 does not match"))
}

#[derive(serde::Deserialize)]
struct VonageClaims {
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    payload_hash: Option<String>,
    #[serde(default)]
    application_id: Option<String>,
}

/// Verifies a Vonage token (its signature, age and application): the `payload_hash` the
/// body must match.
fn vonage(connector: &Connector, secrets: &[&[u8]], head: &Head<'_>) -> Result<String, Refusal> {
    let token = header(head.headers, "authorization").ok_or(Refusal::Missing(
        "Authorization (Vonage signed webhook JWT) is missing",
    ))?;
    let token = token
        .strip_prefix("Bearer ")
        .or_else(|| token.strip_prefix("bearer "))
        .unwrap_or(token)
        .trim();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = true;
    validation.leeway = CLOCK_LEEWAY_SECS.unsigned_abs();
    let mut expired = false;
    for secret in secrets {
        let key = jsonwebtoken::DecodingKey::from_secret(secret);
        match jsonwebtoken::decode::<VonageClaims>(token, &key, &validation) {
            Ok(data) => {
                let claims = data.claims;
                let now = head.now.timestamp();
                if claims.exp.is_none() {
                    let Some(iat) = claims.iat else {
                        return Err(Refusal::Mismatch(
                            "the Vonage token has neither exp nor iat",
                        ));
                    };
                    if now - iat > VONAGE_MAX_AGE_SECS + CLOCK_LEEWAY_SECS {
                        return Err(Refusal::Mismatch("the Vonage token has expired"));
                    }
                }
                if claims.iat.is_some_and(|iat| iat > now + CLOCK_LEEWAY_SECS) {
                    return Err(Refusal::Mismatch(
                        "the Vonage token is issued in the future",
                    ));
                }
                // The token does not cover the URL: a signature secret shared by two
                // connectors (one Vonage account, two companies) would let one's events
                // be stored for the other. The application the token names is the
                // connector's own, or the event is not for it.
                let bound = connector.record.account.as_deref();
                if bound.is_none() || claims.application_id.as_deref() != bound {
                    return Err(Refusal::Mismatch(
                        "the Vonage token's application_id is not this connector's application",
                    ));
                }
                return claims
                    .payload_hash
                    .ok_or(Refusal::Mismatch("the Vonage token has no payload_hash"));
            }
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                expired = true;
            }
            Err(_) => {}
        }
    }
    Err(Refusal::Mismatch(if expired {
        "the Vonage token has expired"
    } else {
        "the Vonage token's signature does not match"
    }))
}

fn exotel(connector: &Connector, secrets: &[&[u8]], head: &Head<'_>) -> Result<(), Refusal> {
    let token = head
        .token
        .ok_or(Refusal::Missing("the Exotel callback URL lacks its token"))?;
    let presented = Sha256::digest(token.as_bytes());
    let known = secrets
        .iter()
        .any(|s| equal(&presented, &Sha256::digest(s)));
    if !known {
        return Err(Refusal::Mismatch("the Exotel URL token does not match"));
    }
    if !connector.networks.is_empty()
        && !head
            .peer
            .is_some_and(|ip| connector.networks.iter().any(|n| n.contains(&ip)))
    {
        return Err(Refusal::Mismatch(
            "the callback's source address is outside the connector's allowed networks",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_added_and_removed_as_twilio_does() {
        assert_eq!(
            with_and_without_port("https://calls.example.com/v1/callbacks/c1?a=1"),
            [
                "https://calls.example.com:443/v1/callbacks/c1?a=1".to_owned(),
                "https://calls.example.com/v1/callbacks/c1?a=1".to_owned()
            ]
        );
        assert_eq!(
            with_and_without_port("http://h:8080/x"),
            ["http://h:8080/x".to_owned(), "http://h/x".to_owned()]
        );
        assert_eq!(
            with_and_without_port("https://[::1]/x"),
            [
                "https://[::1]:443/x".to_owned(),
                "https://[::1]/x".to_owned()
            ]
        );
    }

    #[test]
    fn plivo_signed_string_follows_the_sdk() {
        let mut params = BTreeMap::new();
        params.insert("To".to_owned(), vec!["2".to_owned()]);
        params.insert("CallUUID".to_owned(), vec!["u".to_owned()]);
        assert_eq!(
            plivo_signed("https://h/p", &params),
            "https://h/p?CallUUIDuTo2"
        );
        assert_eq!(
            plivo_signed("https://h/p?b=2&a=1", &params),
            "https://h/p?a=1&b=2.CallUUIDuTo2"
        );
        assert_eq!(
            plivo_signed("https://h/p?b=2", &BTreeMap::new()),
            "https://h/p?b=2"
        );
        assert_eq!(plivo_signed("https://h/p", &BTreeMap::new()), "https://h/p");
    }
}
