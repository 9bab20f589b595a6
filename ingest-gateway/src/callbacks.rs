//! `POST /v1/callbacks/{connector}[/{token}]`: a telephony provider's call status or
//! recording callback, checked with the provider's signature and stored as the
//! connector's company's call record.
//!
//! Order: connector known (401) and usable (503), body within the limits (413, 408, 503),
//! signature (401 missing, 403 wrong: [`crate::connectors::verify`]), mapping (400:
//! [`crate::connectors::map`]), the API's validation (400), publish and ack (503). Nothing
//! is published before the signature has been checked. The success answer is what the
//! provider expects ([`answer`]); errors keep the API's JSON shape.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::Value;

use crate::auth::Principal;
use crate::connectors::verify::{self, Callback, Refusal};
use crate::connectors::{map, Connector, Provider};
use crate::error::ApiError;
use crate::state::AppState;

/// Registers the `# HELP` text of the callback metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_callbacks_total",
        "Provider callbacks by provider and result (accepted, unauthorized, forbidden, invalid, unavailable)"
    );
    // Every series from the start (a bounded set), so alerts see a zero, not no data.
    for provider in [
        Provider::Twilio,
        Provider::Exotel,
        Provider::Plivo,
        Provider::Vonage,
    ] {
        for result in RESULTS {
            metrics::counter!("gateway_callbacks_total", "provider" => provider.as_str(), "result" => result)
                .absolute(0);
        }
    }
}

/// The `result` label's values.
const RESULTS: [&str; 5] = [
    "accepted",
    "unauthorized",
    "forbidden",
    "invalid",
    "unavailable",
];

fn count(provider: Option<Provider>, result: &'static str) {
    metrics::counter!(
        "gateway_callbacks_total",
        "provider" => provider.map_or("unknown", Provider::as_str),
        "result" => result
    )
    .increment(1);
}

/// A signing provider's callback (Twilio, Plivo, Vonage).
#[utoipa::path(
    post, path = "/v1/callbacks/{connector}", tag = "callbacks",
    params(("connector" = String, Path, description = "The connector's id (`ingest-gateway connectors create`)")),
    responses(
        (status = 200, description = "Stored (Plivo)"),
        (status = 204, description = "Stored (Twilio, Vonage)"),
        (status = 400, description = "The callback names no call or a field is invalid", body = crate::error::ErrorBody),
        (status = 401, description = "Unknown or revoked connector, or no signature", body = crate::error::ErrorBody),
        (status = 403, description = "The signature does not match", body = crate::error::ErrorBody),
        (status = 503, description = "Not stored; the provider should retry", body = crate::error::ErrorBody),
    )
)]
pub async fn signed(
    State(state): State<AppState>,
    Path(connector): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    handle(state, &connector, None, req).await
}

/// An Exotel callback: the URL's last segment is the connector's token.
#[utoipa::path(
    post, path = "/v1/callbacks/{connector}/{token}", tag = "callbacks",
    params(
        ("connector" = String, Path, description = "The connector's id"),
        ("token" = String, Path, description = "The connector's URL token (Exotel)"),
    ),
    responses(
        (status = 200, description = "Stored"),
        (status = 401, description = "Unknown or revoked connector", body = crate::error::ErrorBody),
        (status = 403, description = "Wrong token or source network", body = crate::error::ErrorBody),
        (status = 503, description = "Not stored; retry", body = crate::error::ErrorBody),
    )
)]
pub async fn tokened(
    State(state): State<AppState>,
    Path((connector, token)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    handle(state, &connector, Some(&token), req).await
}

async fn handle(
    state: AppState,
    connector_id: &str,
    token: Option<&str>,
    req: Request,
) -> Result<Response, ApiError> {
    let retry_after_secs = u64::from(state.serve.retry_after_secs);
    // Until the whole bucket is read, an unknown connector may be one not read yet.
    if !state.connectors.is_loaded() {
        return Err(ApiError::NotReady { retry_after_secs });
    }
    let Some(connector) = state.connectors.get(connector_id) else {
        count(None, "unauthorized");
        return Err(ApiError::CallbackUnauthorized(
            "unknown or revoked connector".into(),
        ));
    };
    let provider = connector.record.provider;
    let result = accept(&state, &connector, token, req).await;
    count(
        Some(provider),
        match &result {
            Ok(_) => "accepted",
            Err(ApiError::CallbackUnauthorized(_)) => "unauthorized",
            Err(ApiError::CallbackForbidden(_)) => "forbidden",
            Err(e) if e.status().is_server_error() => "unavailable",
            Err(_) => "invalid",
        },
    );
    if let Err(e) = &result {
        if matches!(
            e,
            ApiError::CallbackUnauthorized(_) | ApiError::CallbackForbidden(_)
        ) {
            // Who was refused and why; never the secret, the signature or the token.
            tracing::warn!(
                connector_id = %connector.record.connector_id,
                provider = provider.as_str(),
                reason = %e,
                "provider callback refused"
            );
        }
    }
    result.map(|()| answer(provider))
}

/// What each provider expects of a callback it delivered: a 2xx, quickly (Plivo and
/// Vonage retry anything else; Twilio only reports it). Twilio's and Vonage's
/// documentation take 204; Plivo's asks for 200 OK.
fn answer(provider: Provider) -> Response {
    match provider {
        Provider::Twilio | Provider::Vonage => StatusCode::NO_CONTENT.into_response(),
        Provider::Plivo | Provider::Exotel => {
            (StatusCode::OK, [(header::CONTENT_LENGTH, "0")]).into_response()
        }
    }
}

async fn accept(
    state: &AppState,
    connector: &Connector,
    token: Option<&str>,
    req: Request,
) -> Result<(), ApiError> {
    let retry_after_secs = u64::from(state.serve.retry_after_secs);
    if connector.unusable.is_some() {
        return Err(ApiError::ConnectorUnusable { retry_after_secs });
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let body = crate::body::read_bytes(
        &state.bodies,
        &connector.record.connector_id,
        &parts.headers,
        body,
        state.serve.max_body_bytes as usize,
        state.serve.body_timeout(),
        retry_after_secs,
    )
    .await?;
    let is_json = crate::body::is_json(&parts.headers);
    let mut form: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !is_json {
        for (k, v) in form_urlencoded::parse(&body.text) {
            form.entry(k.into_owned()).or_default().push(v.into_owned());
        }
    }
    let callback = Callback {
        path_and_query: &path_and_query,
        headers: &parts.headers,
        body: &body.text,
        form: &form,
        token,
        peer,
        now: Utc::now(),
    };
    verify::verify(connector, &callback).map_err(|r| match r {
        Refusal::Missing(why) => ApiError::CallbackUnauthorized(why.into()),
        Refusal::Mismatch(why) => ApiError::CallbackForbidden(why.into()),
    })?;

    let params: BTreeMap<String, Value> = if is_json {
        match serde_json::from_slice::<Value>(&body.text) {
            Ok(Value::Object(o)) => o.into_iter().collect(),
            Ok(_) => {
                return Err(ApiError::BadRequest(
                    "a JSON callback must be an object".into(),
                ))
            }
            Err(e) => return Err(ApiError::BadRequest(format!("Malformed JSON: {e}"))),
        }
    } else {
        form.into_iter()
            .map(|(k, mut vs)| {
                let v = if vs.len() == 1 {
                    Value::String(vs.remove(0))
                } else {
                    Value::Array(vs.into_iter().map(Value::String).collect())
                };
                (k, v)
            })
            .collect()
    };
    // Parameters of the URL's query the body does not carry: what the customer put in
    // the URL (a campaign, or the call's `uuid` in a Vonage record action's eventUrl).
    // Twilio and Plivo sign the query; `bodySHA256` is Twilio's, not the call's.
    let mut params = params;
    if let Some((_, query)) = path_and_query.split_once('?') {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k != "bodySHA256" {
                params
                    .entry(k.into_owned())
                    .or_insert_with(|| Value::String(v.into_owned()));
            }
        }
    }
    let object = map::record(&connector.record, &params).map_err(|e| ApiError::BadRequest(e.0))?;
    let record = callcap::validate(&Value::Object(object))?;
    let principal = Principal {
        key_id: connector.record.connector_id.clone(),
        company_id: connector.record.company_id,
    };
    let permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded { retry_after_secs })?;
    let lane = state
        .lanes
        .route(principal.company_id, 1, std::time::Instant::now());
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| callcap::envelope::valid_request_id(id))
        .map(str::to_owned);
    let (id, outbound) =
        crate::ingest::prepare(record, &principal, lane, None, request_id, Utc::now());
    let outcome = state.publisher.publish(vec![outbound]).await.pop();
    drop(permit);
    drop(body);
    let receipt = outcome
        .expect("the publisher answers one outcome per record")
        .map_err(|e| crate::ingest::unavailable(state, e))?;
    tracing::debug!(call_history_id = %id.id, seq = receipt.seq, duplicate = receipt.duplicate, "callback accepted");
    Ok(())
}
