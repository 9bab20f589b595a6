//! A fresh Postgres database per test, from `DATABASE_URL`.
//!
//! `DATABASE_URL` names a server the tests may create databases on (default: the local
//! server, user postgres). Each test gets `callcap_test_<uuid>`, migrated, and dropped when
//! the [`TestDb`] goes away, so tests run in parallel without seeing each other.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The server tests use.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a valid URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// A migrated database of one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates and migrates a new database.
    pub async fn create() -> Self {
        let name = format!("callcap_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&base_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to Postgres at DATABASE_URL ({}): {e}",
                    base_url()
                )
            });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let url = with_database(&base_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connecting to the test database");
        persist_worker::store::MIGRATOR
            .run(&pool)
            .await
            .expect("migrating the test database");
        TestDb { name, url, pool }
    }

    /// Rows in `call_history`.
    pub async fn count_calls(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM call_history")
            .fetch_one(&self.pool)
            .await
            .expect("counting call_history")
    }

    /// Rows in `dead_letters`.
    pub async fn count_dead_letters(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await
            .expect("counting dead_letters")
    }

    /// Every id in `call_history`.
    pub async fn call_ids(&self) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT id FROM call_history ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("listing call_history ids")
    }

    /// A text dump of `call_history` in id order, leaving out `stored_at` (the time of
    /// the write itself), for comparing two builds of the table.
    pub async fn dump_calls(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT (to_jsonb(c) - 'stored_at')::text FROM call_history c ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("dumping call_history")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping needs async I/O; a short-lived runtime on its own thread does it
        // without touching the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(mut admin) = PgConnection::connect(&base_url()).await {
                        let _ = sqlx::query(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .execute(&mut admin)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Waits until `call_history` holds exactly `ids`.
pub async fn assert_stored_exactly(db: &TestDb, ids: &BTreeSet<Uuid>, within: Duration) {
    let want = ids.len() as i64;
    crate::eventually(within, "every accepted record to be stored", || async {
        (db.count_calls().await >= want).then_some(())
    })
    .await;
    let stored: BTreeSet<Uuid> = db.call_ids().await.into_iter().collect();
    assert_eq!(
        db.count_calls().await,
        want,
        "row count must equal the accepted ids"
    );
    assert_eq!(&stored, ids, "stored ids must be exactly the accepted ids");
}
