//! The API document's examples, as its clients send them (placeholders replaced by real
//! UUIDs, as a real integration does).

use serde_json::{json, Value};
use uuid::Uuid;

pub use callcap::examples::{complete, minimal};

/// The Quick Start curl body.
pub fn quick_start(company: Uuid) -> Value {
    json!({
        "company_id": company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 180,
        "outcome": "follow_up",
        "notes": "Customer interested in service"
    })
}

/// Example 3, Python: `datetime.utcnow().isoformat() + 'Z'` gives microseconds.
pub fn python(company: Uuid) -> Value {
    json!({
        "company_id": company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 180,
        "outcome": "follow_up",
        "notes": "Customer interested in service",
        "call_date": "2025-11-25T10:30:00.123456Z",
        "external_call_id": "CALL-12345",
        "call_status": "completed"
    })
}

/// Example 4, PHP: `gmdate('Y-m-d\TH:i:s\Z')`.
pub fn php(company: Uuid) -> Value {
    json!({
        "company_id": company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 180,
        "outcome": "follow_up",
        "notes": "Customer interested in service",
        "call_date": "2025-11-25T10:30:00Z",
        "external_call_id": "CALL-PHP-1"
    })
}

/// The "Testing" section's curl body.
pub fn testing(company: Uuid) -> Value {
    json!({
        "company_id": company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 60,
        "outcome": "follow_up",
        "notes": "Test call"
    })
}

/// `bytes` compressed as the `Content-Encoding` `encoding` says (`gzip`, `deflate` —
/// zlib, as HTTP defines it — or `zstd`).
///
/// # Panics
/// On another encoding name.
pub fn compress(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).expect("compressing in memory");
            e.finish().expect("compressing in memory")
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).expect("compressing in memory");
            e.finish().expect("compressing in memory")
        }
        "zstd" => zstd::encode_all(bytes, 3).expect("compressing in memory"),
        other => panic!("no encoder for {other}"),
    }
}
