//! Postgres: the pool, migrations, errors, and (in the submodules) every SQL statement of
//! the worker.
//!
//! - `merge`: a batch written in one transaction with set-based statements, the merge
//!   rules of DESIGN.md in its `ON CONFLICT` clause;
//! - `dead`: the dead letters, recorded with the batch or on their own, listed and
//!   marked redriven;
//! - [`privacy`]: erasure entries, what erasure and retention delete, their counters.

mod dead;
mod merge;
pub mod privacy;

use std::time::Duration;

use callcap::Envelope;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use dead::{
    dead_letters, dead_letters_by_id, mark_dead_letter, recent_dead_letters, record_dead_letters,
    DeadLetter, DeadLetterRow,
};
pub use merge::write_batch;

/// The schema migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One decoded stream message ready to store.
#[derive(Debug, Clone)]
pub struct Row {
    /// JetStream stream sequence.
    pub seq: u64,
    /// The subject it came on (a dead letter made of it names it: dead letters are
    /// keyed by sequence and subject, and a partition stream's subjects are its own).
    pub subject: String,
    pub envelope: Envelope,
    /// The W3C trace context its message carried (`traceparent`), continued by the
    /// record's write span and named in its log lines.
    pub trace: Option<callcap::traces::TraceContext>,
}

/// A failed database operation, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connection trouble, timeouts, serialization failures, shutdown: retry later.
    #[error("database temporarily unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    /// The data itself is refused (constraint or data exception): retrying cannot help.
    #[error("database refused the data: {0}")]
    Permanent(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether the same write may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // SQLSTATE class 22 (data exception) and 23 (integrity constraint violation) are
        // about the row; everything else (08 connection, 40 rollback, 53 resources, 57
        // operator intervention, pool timeouts, I/O) may pass. Unknown errors count as
        // transient: holding a message is recoverable, dead-lettering a good one is not.
        let permanent = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        };
        if permanent {
            StoreError::Permanent(e)
        } else {
            StoreError::Transient(e)
        }
    }
}

/// Whether an error means Postgres could not be reached (as opposed to refusing a
/// statement): I/O, TLS, pool timeouts, and SQLSTATE classes 08 and 57P (shutdown,
/// "cannot connect now").
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Opens a pool. Connections are made lazily, so a worker starts while Postgres is down
/// and catches up when it returns.
///
/// Every session runs with `enable_seqscan = off`, so no statement's plan depends on when
/// it was made. Each statement of the worker, replay and redrive reads or writes rows by
/// key, and each key has an index; but a plan is chosen for the table as it is when the
/// statement is planned, and a prepared statement keeps its generic plan for the life of
/// the connection. On a fresh deployment that plan was made for an almost empty table, a
/// sequential scan: once the table grew, every batch scanned it whole and the drain fell
/// to a tenth. With sequential scans off, the index path wins whenever one exists,
/// however small the table was at planning time; a statement without one (an operator's
/// `dlq list` over `dead_letters`) still runs, scanning as before.
///
/// Forcing custom plans instead (`plan_cache_mode = force_custom_plan`) is not enough:
/// planned now, with a batch of 500 ids, a 100k-row table that has not been analysed
/// yet is still scanned whole (the cost model's random reads), and each batch pays the
/// planning.
///
/// # Errors
/// When the URL is malformed.
pub fn pool(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(
            options
                .application_name("persist-worker")
                .options([("enable_seqscan", "off")]),
        ))
}

/// What a write did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteStats {
    /// Rows inserted or changed in `call_history`.
    pub rows_changed: u64,
    /// Dead letters recorded.
    pub dead_letters: u64,
    /// Stream sequences of records dropped as erased (to delete from the stream).
    pub erased: Vec<u64>,
    /// Records dropped as older than the retention period.
    pub expired: u64,
    /// Stream sequences of records held, not stored: their company has erasures this
    /// process cannot check. Not to be acknowledged.
    pub held: Vec<u64>,
    /// Why they are held.
    pub hold: Option<crate::privacy::Uncheckable>,
    /// Stream sequences of rows the database refused, dead-lettered instead of stored.
    pub refused: Vec<u64>,
}

impl WriteStats {
    /// Adds what another write of the same batch did.
    pub fn add(&mut self, other: WriteStats) {
        self.rows_changed += other.rows_changed;
        self.dead_letters += other.dead_letters;
        self.erased.extend(other.erased);
        self.expired += other.expired;
        self.held.extend(other.held);
        self.refused.extend(other.refused);
        if self.hold.is_none() {
            self.hold = other.hold;
        }
    }
}

/// Whether the database answers.
///
/// # Errors
/// When it does not.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
