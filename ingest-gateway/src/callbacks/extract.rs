//! A callback's extractors: who signs it ([`Signer`]: the connector the URL names, checked
//! as far as the request's head allows) and its body ([`CallbackText`]: within
//! `MAX_BODY_BYTES`, `BODY_TIMEOUT_MS` and the callbacks' own memory pool).
//!
//! Order: connector known (401) and usable (503), what the head can prove (401, 403:
//! [`verify::check_head`]), then the body (413, 408, 503). So a callback without any
//! signature, with a forged Vonage token or a wrong Exotel token holds no memory, and the
//! bodies still unverified are held against the sending address's share of a pool apart
//! from the API's: slow forged bodies cannot take the memory a provider's genuine
//! callback needs, nor dialers' records.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::outcome::refused;
use crate::body::{self, JsonBody};
use crate::connectors::verify::{self, Head, Pending, Refusal};
use crate::connectors::{Connector, Provider};
use crate::error::ApiError;
use crate::state::AppState;

/// The connector a callback is for, its head checked; what is left to check with the body.
pub struct Signer {
    pub connector: Arc<Connector>,
    pub pending: Pending,
}

impl Signer {
    /// The connector's id and provider, as counted and logged.
    pub fn named(&self) -> Option<(&str, Provider)> {
        Some((
            self.connector.record.connector_id.as_str(),
            self.connector.record.provider,
        ))
    }
}

/// What [`Signer`] leaves for [`CallbackText`]: the address the body's memory is shared
/// by, and the connector its refusals are counted for.
#[derive(Debug, Clone)]
struct Source {
    client: Option<IpAddr>,
    connector_id: String,
    provider: Provider,
}

impl FromRequestParts<AppState> for Signer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let retry_after_secs = u64::from(state.serve.retry_after_secs);
        // Until the whole bucket is read, an unknown connector may be one not read yet.
        if !state.connectors.is_loaded() {
            return Err(refused(None, ApiError::NotReady { retry_after_secs }));
        }
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound)?;
        let (mut id, mut token) = (None, None);
        for (name, value) in &params {
            match name {
                "connector" => id = Some(value.to_owned()),
                "token" => token = Some(value.to_owned()),
                _ => {}
            }
        }
        let Some(connector) = id.and_then(|id| state.connectors.get(&id)) else {
            return Err(refused(
                None,
                ApiError::CallbackUnauthorized("unknown or revoked connector"),
            ));
        };
        let named = Some((
            connector.record.connector_id.as_str(),
            connector.record.provider,
        ));
        if connector.unusable.is_some() {
            return Err(refused(
                named,
                ApiError::ConnectorUnusable { retry_after_secs },
            ));
        }
        let client = client_address(parts, &state.serve.trusted_proxies);
        let head = Head {
            headers: &parts.headers,
            token: token.as_deref(),
            peer: client,
            now: chrono::Utc::now(),
        };
        let pending =
            verify::check_head(&connector, &head).map_err(|r| refused(named, refusal(r)))?;
        parts.extensions.insert(Source {
            client,
            connector_id: connector.record.connector_id.clone(),
            provider: connector.record.provider,
        });
        Ok(Signer { connector, pending })
    }
}

/// The answer to a refused signature or token.
pub fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Missing(why) => ApiError::CallbackUnauthorized(why),
        Refusal::Mismatch(why) => ApiError::CallbackForbidden(why),
    }
}

/// The client's address: the connecting peer, or when the peer is a trusted proxy, the
/// last address of `X-Forwarded-For` that is not one (what the first trusted hop saw).
pub fn client_address(parts: &Parts, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())?;
    Some(forwarded_client(peer, &parts.headers, trusted))
}

fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        hops.extend(text.split(',').map(str::trim));
    }
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => continue,
            Ok(ip) => return ip,
            // A hop that is not an address: nothing before it can be trusted.
            Err(_) => return peer,
        }
    }
    peer
}

/// A callback's body, read whole within its limits and the callbacks' memory pool.
pub struct CallbackText(pub JsonBody);

impl FromRequest<AppState> for CallbackText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let source = parts.extensions.get::<Source>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "the callback body extractor ran without Signer before it"
            ))
        })?;
        let named = Some((source.connector_id.as_str(), source.provider));
        read_text(state, &source, &parts.headers, body)
            .await
            .map(CallbackText)
            .map_err(|e| refused(named, e))
    }
}

async fn read_text(
    state: &AppState,
    source: &Source,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<JsonBody, ApiError> {
    let share = source.client.map_or_else(
        || "callback:unknown".to_owned(),
        |ip| format!("callback:{ip}"),
    );
    let retry_after_secs = u64::from(state.serve.retry_after_secs);
    let mut text = body::read_bytes(
        &state.callback_bodies,
        &share,
        headers,
        body,
        state.serve.max_body_bytes as usize,
        state.serve.body_timeout(),
        retry_after_secs,
    )
    .await?;
    if body::is_json(headers) {
        text.reserve_parse(retry_after_secs)?;
    } else {
        text.reserve_form(retry_after_secs)?;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let lb: IpAddr = "10.1.2.3".parse().unwrap();
        let outsider: IpAddr = "198.51.100.7".parse().unwrap();
        // From the balancer: the last address it did not add itself.
        assert_eq!(
            forwarded_client(lb, &xff(&["203.0.113.9, 198.51.100.7"]), &trusted),
            outsider
        );
        assert_eq!(
            forwarded_client(
                lb,
                &xff(&["203.0.113.9", "198.51.100.7, 10.9.9.9"]),
                &trusted
            ),
            outsider
        );
        // From anyone else, the header is theirs to write: ignored.
        assert_eq!(
            forwarded_client(outsider, &xff(&["10.1.1.1"]), &trusted),
            outsider
        );
        // Nothing untrusted, or garbage: the balancer itself.
        assert_eq!(forwarded_client(lb, &xff(&["10.5.5.5"]), &trusted), lb);
        assert_eq!(
            forwarded_client(lb, &xff(&["bogus, 10.5.5.5"]), &trusted),
            lb
        );
        assert_eq!(forwarded_client(lb, &HeaderMap::new(), &[]), lb);
    }
}
