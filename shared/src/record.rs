//! The call record as it travels through the pipeline: typed, validated, canonical.
//!
//! Owns the field types of the public API document (`shared/000_*.txt`) and their wire
//! spelling. Parsing untrusted JSON into a [`CallRecord`] is [`crate::validate`]'s job;
//! where the record goes afterwards (stream, table) belongs to the gateway and the worker.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// How the call ended for the business, as the API document lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Converted,
    FollowUp,
    NotAnswered,
    Completed,
    NotInterested,
}

impl Outcome {
    /// Every accepted value, in the API document's order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Converted,
        Outcome::FollowUp,
        Outcome::NotAnswered,
        Outcome::Completed,
        Outcome::NotInterested,
    ];

    /// The wire (and database) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Converted => "converted",
            Outcome::FollowUp => "follow_up",
            Outcome::NotAnswered => "not_answered",
            Outcome::Completed => "completed",
            Outcome::NotInterested => "not_interested",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// Telephony status of the call: the API document's four final states plus the lifecycle
/// states dialers such as Twilio report while a call is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    Completed,
    Busy,
    NoAnswer,
    Failed,
    Canceled,
    Queued,
    Initiated,
    Ringing,
    InProgress,
}

impl CallStatus {
    /// Every accepted value.
    pub const ALL: [CallStatus; 9] = [
        CallStatus::Completed,
        CallStatus::Busy,
        CallStatus::NoAnswer,
        CallStatus::Failed,
        CallStatus::Canceled,
        CallStatus::Queued,
        CallStatus::Initiated,
        CallStatus::Ringing,
        CallStatus::InProgress,
    ];

    /// The wire (and database) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Completed => "completed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no-answer",
            CallStatus::Failed => "failed",
            CallStatus::Canceled => "canceled",
            CallStatus::Queued => "queued",
            CallStatus::Initiated => "initiated",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "in-progress",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// A terminal status is final: the merge rules never replace it by a lifecycle one.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CallStatus::Completed
                | CallStatus::Busy
                | CallStatus::NoAnswer
                | CallStatus::Failed
                | CallStatus::Canceled
        )
    }
}

/// One validated call record, field for field the API document's payload.
///
/// The OpenAPI schema states the string rules in characters (the server's limits are in
/// bytes, so the schema's lengths are the byte limits divided by 4, the longest UTF-8
/// character): whatever the schema allows, the server takes.
///
/// Absent optional fields stay `None` all the way to Postgres, where the merge rules rely
/// on the difference between "not sent" and a value. `call_date` is `None` when the client
/// did not send it; the worker then stores the gateway's receipt time (the envelope's
/// `received_at`), which keeps the record — and so its `Nats-Msg-Id` — identical across
/// client retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRecord {
    /// Your company's id in our system (required).
    pub company_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lead_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub employee_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096, pattern = r"^[^\u0000]*$")]
    pub notes: Option<String>,
    /// When the call was made; defaults to the time the gateway received the record.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::timestamp::optional"
    )]
    pub call_date: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub caller_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub recipient_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub duration_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 512,
        pattern = r"^https?://([A-Za-z0-9-]+\.)*[A-Za-z][A-Za-z0-9-]*(:[0-9]{1,4})?(/[!-~]*)?$"
    )]
    pub recording_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_status: Option<CallStatus>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::timestamp::optional"
    )]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::timestamp::optional"
    )]
    pub end_time: Option<DateTime<Utc>>,
    /// Your system's id for the call; with `company_id` and `external_system` it makes the
    /// record's identity, so a resend updates instead of duplicating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 63,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub external_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 25,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub external_system: Option<String>,
    /// Next follow-up date, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Date)]
    pub next_follow_up: Option<NaiveDate>,
    /// Next follow-up time, `HH:MM:SS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "14:00:00", pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]$")]
    pub next_follow_up_time: Option<NaiveTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_call_followup: Option<bool>,
    /// Any additional custom fields, as a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub call_details: Option<serde_json::Map<String, serde_json::Value>>,
}

impl CallRecord {
    /// The canonical bytes of the record: field order fixed by the struct, object keys
    /// sorted (serde_json's default map), absent fields omitted. Equal records give equal
    /// bytes, which is what the publish dedup id is computed over.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a CallRecord always serializes: every field is plain data")
    }

    /// A record with only the required field set.
    pub fn new(company_id: Uuid) -> Self {
        CallRecord {
            company_id,
            lead_id: None,
            employee_id: None,
            outcome: None,
            notes: None,
            call_date: None,
            caller_number: None,
            recipient_number: None,
            duration_seconds: None,
            recording_url: None,
            call_status: None,
            start_time: None,
            end_time: None,
            external_call_id: None,
            external_system: None,
            next_follow_up: None,
            next_follow_up_time: None,
            auto_call_followup: None,
            call_details: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_spellings_round_trip_through_serde() {
        for o in Outcome::ALL {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        for c in CallStatus::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(CallStatus::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn only_final_states_are_terminal() {
        let terminal: Vec<_> = CallStatus::ALL
            .into_iter()
            .filter(|c| c.is_terminal())
            .map(CallStatus::as_str)
            .collect();
        assert_eq!(
            terminal,
            ["completed", "busy", "no-answer", "failed", "canceled"]
        );
    }

    #[test]
    fn canonical_json_omits_absent_fields_and_sorts_details() {
        let mut r = CallRecord::new(Uuid::nil());
        let mut details = serde_json::Map::new();
        details.insert("z".into(), 1.into());
        details.insert("a".into(), 2.into());
        r.call_details = Some(details);
        let s = String::from_utf8(r.canonical_json()).unwrap();
        assert_eq!(
            s,
            r#"{"company_id":"00000000-0000-0000-0000-000000000000","call_details":{"a":2,"z":1}}"#
        );
    }
}
