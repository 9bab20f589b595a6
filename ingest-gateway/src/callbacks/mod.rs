//! `POST /v1/callbacks/{connector}[/{token}]`: a telephony provider's call status or
//! recording callback, checked with the provider's signature and stored as the
//! connector's company's call record.
//!
//! The extractors ([`extract`]) find the connector and check what the request's head can
//! prove before the body is read; the handler checks the body against the signature
//! ([`crate::connectors::verify`]), maps it ([`crate::connectors::map`]), validates it as
//! the API does (400) and hands it to the shared [`crate::intake`] (503). Only what the
//! signature covers reaches the record: the form or JSON body, and the URL's query where
//! the provider signs the URL (Twilio, Plivo; Exotel's URL carries its token). Nothing is
//! published before the signature has been checked. The success answer is what the
//! provider expects (`answer`); errors keep the API's JSON shape. Every answer is
//! counted ([`outcome`]).

pub mod extract;
pub mod outcome;

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::Value;

use self::extract::{refusal, CallbackText, Signer};
pub use self::outcome::describe_metrics;
use self::outcome::refused;
use crate::auth::Principal;
use crate::connectors::verify::{self, Callback};
use crate::connectors::{map, Provider};
use crate::error::ApiError;
use crate::intake;
use crate::state::AppState;

/// A signing provider's callback (Twilio, Plivo, Vonage).
#[utoipa::path(
    post, path = "/v1/callbacks/{connector}", tag = "callbacks",
    params(("connector" = String, Path, description = "The connector's id (`ingest-gateway connectors create`)")),
    responses(
        (status = 200, description = "Stored (Plivo)"),
        (status = 204, description = "Stored (Twilio, Vonage)"),
        (status = 400, description = "The callback names no call, repeats a parameter, or a field is invalid", body = crate::error::ErrorBody),
        (status = 401, description = "Unknown or revoked connector, or no signature", body = crate::error::ErrorBody),
        (status = 403, description = "The signature does not match, or does not cover the body", body = crate::error::ErrorBody),
        (status = 503, description = "Not stored; the provider should retry", body = crate::error::ErrorBody),
    )
)]
pub async fn signed(
    State(state): State<AppState>,
    signer: Signer,
    uri: Uri,
    headers: HeaderMap,
    CallbackText(body): CallbackText,
) -> Result<Response, ApiError> {
    accept(&state, signer, &uri, &headers, body).await
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
    signer: Signer,
    uri: Uri,
    headers: HeaderMap,
    CallbackText(body): CallbackText,
) -> Result<Response, ApiError> {
    accept(&state, signer, &uri, &headers, body).await
}

async fn accept(
    state: &AppState,
    signer: Signer,
    uri: &Uri,
    headers: &HeaderMap,
    body: crate::body::JsonBody,
) -> Result<Response, ApiError> {
    let provider = signer.connector.record.provider;
    match store(state, &signer, uri, headers, &body).await {
        Ok(()) => {
            outcome::accepted(provider);
            Ok(answer(provider))
        }
        Err(e) => Err(refused(signer.named(), e)),
    }
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

/// Checks the body against the signature, maps it and publishes the record.
async fn store(
    state: &AppState,
    signer: &Signer,
    uri: &Uri,
    headers: &HeaderMap,
    body: &crate::body::JsonBody,
) -> Result<(), ApiError> {
    let connector = &signer.connector;
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let json = crate::body::is_json(headers);
    let form = if json {
        BTreeMap::new()
    } else {
        form_of(&body.text)
    };
    let callback = Callback {
        path_and_query: &path_and_query,
        headers,
        body: &body.text,
        json,
        form: &form,
        now: Utc::now(),
    };
    verify::check_body(connector, &signer.pending, &callback).map_err(refusal)?;
    let params = params(
        connector.record.provider,
        &path_and_query,
        json,
        &body.text,
        form,
    )?;
    let object = map::record(&connector.record, &params).map_err(|e| ApiError::BadRequest(e.0))?;
    let record = callcap::validate(&Value::Object(object))?;
    let principal = Principal {
        key_id: connector.record.connector_id.clone(),
        company_id: connector.record.company_id,
    };
    let (id, receipt) = intake::publish_one(
        state,
        &principal,
        record,
        None,
        &intake::Origin::of(headers),
        Utc::now(),
    )
    .await?;
    tracing::debug!(call_history_id = %id.id, seq = receipt.seq, duplicate = receipt.duplicate, "callback accepted");
    Ok(())
}

/// A form body's parameters, name → values in order.
fn form_of(text: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut form: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(text) {
        form.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    form
}

/// The callback's parameters as the mapping reads them: the signed body's, and the URL
/// query's where the provider's signature covers the URL.
///
/// # Errors
/// 400 for a JSON body that is not an object, and for a form repeating a parameter:
/// Twilio's signature covers each distinct value once, so repeats would let one signed
/// callback become many different records; no provider sends a parameter twice.
fn params(
    provider: Provider,
    path_and_query: &str,
    json: bool,
    text: &[u8],
    form: BTreeMap<String, Vec<String>>,
) -> Result<BTreeMap<String, Value>, ApiError> {
    let mut params: BTreeMap<String, Value> = if json {
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(o)) => o.into_iter().collect(),
            Ok(_) => {
                return Err(ApiError::BadRequest(
                    "a JSON callback must be an object".into(),
                ))
            }
            Err(e) => return Err(ApiError::BadRequest(format!("Malformed JSON: {e}"))),
        }
    } else {
        let mut out = BTreeMap::new();
        for (k, mut vs) in form {
            if vs.len() > 1 {
                return Err(ApiError::BadRequest(format!(
                    "the callback repeats the parameter {:?}; providers send each parameter once",
                    k.chars().take(64).collect::<String>()
                )));
            }
            out.insert(k, Value::String(vs.remove(0)));
        }
        out
    };
    // Parameters of the URL's query the body does not carry (what the customer put in the
    // URL, e.g. a campaign), only where the URL is signed or is itself the credential.
    // Vonage's token covers the body alone: nothing of its URL may reach the record.
    // `bodySHA256` is Twilio's, not the call's.
    let url_signed = matches!(
        provider,
        Provider::Twilio | Provider::Plivo | Provider::Exotel
    );
    if let (true, Some((_, query))) = (url_signed, path_and_query.split_once('?')) {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k != "bodySHA256" {
                params
                    .entry(k.into_owned())
                    .or_insert_with(|| Value::String(v.into_owned()));
            }
        }
    }
    Ok(params)
}

#[cfg(test)]
#[path = "../callbacks_tests.rs"]
mod tests;
