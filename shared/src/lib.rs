//! Call Capture shared library: the wire types and rules both services agree on.
//!
//! - [`record`]: the call record and its enumerations;
//! - [`validate`]: the API document's field rules and size bounds;
//! - [`history`]: the last hour of figures, drawn as inline SVG on the status pages;
//! - [`identity`]: `call_history_id` and the publish dedup id;
//! - [`envelope`]: the versioned stream message;
//! - [`subjects`]: stream, subject, consumer and bucket names and definitions;
//! - [`config`]: settings both binaries read from one environment;
//! - [`examples`]: the API document's example records;
//! - [`partitions`]: the partition layout (which stream a company's records go to);
//! - [`phone`]: reading written phone numbers (connectors' E.164, erasure's matching);
//! - [`recent`]: figures over the last minute and the status pages' HTML frame;
//! - [`shutdown`]: one shutdown for every task of a process (SIGTERM, SIGINT);
//! - [`telemetry`]: logging setup;
//! - [`traces`]: OpenTelemetry traces and the W3C trace context across NATS;
//! - [`timestamp`]: reading and writing timestamps and dates so that both read back.

pub mod config;
pub mod envelope;
pub mod examples;
pub mod history;
pub mod identity;
pub mod partitions;
pub mod phone;
pub mod recent;
pub mod record;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod timestamp;
pub mod traces;
pub mod validate;

pub use envelope::Envelope;
pub use record::{CallRecord, CallStatus, Outcome};
pub use validate::{validate, FieldError, ValidationError};
