//! The API document's Example 1 and Example 2, as a client sends them (the document's
//! placeholder lead and employee ids replaced by real UUIDs): used by `ingest-gateway
//! check` and by the tests.

use serde_json::{json, Value};
use uuid::Uuid;

/// Example 2, "Complete Call Record": every field.
pub fn complete(company: Uuid, external_call_id: &str) -> Value {
    json!({
        "company_id": company,
        "lead_id": "234e5678-e89b-12d3-a456-426614174001",
        "employee_id": "345e6789-e89b-12d3-a456-426614174002",
        "outcome": "follow_up",
        "notes": "Customer interested in premium package. Needs time to discuss with spouse.",
        "call_date": "2025-11-25T10:30:00Z",
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 320,
        "recording_url": "https://your-system.com/recordings/12345.mp3",
        "call_status": "completed",
        "start_time": "2025-11-25T10:30:00Z",
        "end_time": "2025-11-25T10:35:20Z",
        "external_call_id": external_call_id,
        "external_system": "YourDialer",
        "next_follow_up": "2025-11-27",
        "next_follow_up_time": "14:00:00",
        "auto_call_followup": true,
        "call_details": {
            "campaign_id": "CAMP-001",
            "agent_name": "John Doe",
            "disposition": "interested",
            "tags": ["premium", "follow-up-needed"]
        }
    })
}

/// Example 1, "Minimal Call Record".
pub fn minimal(company: Uuid) -> Value {
    json!({
        "company_id": company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 180,
        "outcome": "completed"
    })
}
