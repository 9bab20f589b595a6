//! What a callback's answer is counted and logged as: `gateway_callbacks_total{provider,
//! result}` for every callback, and for a refused one a WARN line naming the connector
//! and the reason — at most one per connector and reason per 10 seconds, with the number
//! suppressed since, so that a flood of forgeries leaves a few lines, not one each.

use crate::connectors::Provider;
use crate::error::{ApiError, RefusalLog};

/// The `result` label's values.
const RESULTS: [&str; 5] = [
    "accepted",
    "unauthorized",
    "forbidden",
    "invalid",
    "unavailable",
];

/// Refusal lines already written, by connector and reason. Bounded: connectors are a
/// known set (an unknown connector id is logged under one key) and reasons are literals.
static LOG: std::sync::LazyLock<RefusalLog<(String, &'static str)>> =
    std::sync::LazyLock::new(RefusalLog::default);

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

fn count(provider: Option<Provider>, result: &'static str) {
    metrics::counter!(
        "gateway_callbacks_total",
        "provider" => provider.map_or("unknown", Provider::as_str),
        "result" => result
    )
    .increment(1);
}

/// Counts a stored callback.
pub fn accepted(provider: Provider) {
    count(Some(provider), "accepted");
}

/// Counts (and for a refused signature or token, logs) a callback answered `e`, of
/// `connector` when it is known; returns `e` to answer with.
pub fn refused(connector: Option<(&str, Provider)>, e: ApiError) -> ApiError {
    let result = match &e {
        ApiError::CallbackUnauthorized(_) => "unauthorized",
        ApiError::CallbackForbidden(_) => "forbidden",
        e if e.status().is_server_error() => "unavailable",
        _ => "invalid",
    };
    count(connector.map(|(_, p)| p), result);
    if let ApiError::CallbackUnauthorized(why) | ApiError::CallbackForbidden(why) = &e {
        let id = connector.map_or("(unknown)", |(id, _)| id);
        if let Some(suppressed) = LOG.admit((id.to_owned(), why)) {
            // Who was refused and why; never the secret, the signature or the token.
            tracing::warn!(
                connector_id = %id,
                provider = connector.map_or("unknown", |(_, p)| p.as_str()),
                reason = %why,
                suppressed,
                "provider callback refused"
            );
        }
    }
    e
}
