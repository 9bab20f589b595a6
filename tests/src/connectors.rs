//! Provider connectors on the test stack: a [`Pipeline`] whose gateway holds a connector
//! secrets key, a company whose calls arrive through its connectors (made with the real
//! `ingest-gateway connectors` command), and the pipeline's own company posting through
//! its API key all along — every tenant is watched.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ingest_gateway::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::eventually;
use crate::nats::stream_messages;
use crate::pipeline::admin_command_env;
use crate::providers::{send, Signed};
use crate::stack::{Pipeline, Stack};

/// The URL the providers call, as given to `connectors create`: not the gateway's own
/// address, which the tests send to (as a load balancer would forward).
pub const PUBLIC: &str = "https://calls.example.test";

/// A stored call as the connector tests read it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Stored {
    pub call_status: Option<String>,
    pub caller_number: Option<String>,
    pub recipient_number: Option<String>,
    pub duration_seconds: Option<i32>,
    pub recording_url: Option<String>,
    pub external_system: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub call_details: Option<Value>,
    pub key_id: Option<String>,
}

/// The pipeline, the connectors' company and what the other company sent.
pub struct Connectors {
    pub p: Pipeline,
    /// The gateway binary the `connectors` commands run (the test crate's).
    bin: String,
    /// `CONNECTOR_SECRETS_KEY_FILE` (in the stack's dir, `p.dir`).
    pub key_file: PathBuf,
    /// The company whose calls the connectors carry.
    pub company: Uuid,
    /// External ids the pipeline's own company posted through its API key.
    pub other_sent: Vec<String>,
}

impl Connectors {
    /// A pipeline (gateway `serve` settings as given, plus the stack's connector secrets
    /// key) and a fresh company for the connectors; `bin` is the gateway binary.
    pub async fn start_with(bin: &str, serve: ServeArgs) -> Self {
        let p = Stack::new().serve(serve).connectors().pipeline().await;
        let key_file = p.secrets_key.clone().expect("the stack made a secrets key");
        Connectors {
            p,
            bin: bin.to_owned(),
            key_file,
            company: Uuid::new_v4(),
            other_sent: Vec::new(),
        }
    }

    /// With the gateway's default settings.
    pub async fn start(bin: &str) -> Self {
        Self::start_with(bin, ServeArgs::default()).await
    }

    /// `ingest-gateway connectors <args>` as the operator runs it: its output.
    pub async fn command(&self, args: &[&str]) -> std::process::Output {
        let full = [&["connectors"][..], args].concat();
        let key = self.key_file.display().to_string();
        admin_command_env(
            &self.bin,
            &self.p.nats.url(),
            &full,
            &[("CONNECTOR_SECRETS_KEY_FILE", key.as_str())],
        )
        .await
    }

    /// `ingest-gateway connectors <args>`, which must succeed: its stdout.
    pub async fn connectors(&self, args: &[&str]) -> String {
        let out = self.command(args).await;
        assert!(
            out.status.success(),
            "connectors {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Creates a connector of this company; (id, callback URL), once the gateway has it.
    pub async fn create(
        &self,
        provider: &str,
        secret: Option<&str>,
        extra: &[&str],
    ) -> (String, String) {
        self.create_for(self.company, provider, secret, extra).await
    }

    /// Creates a connector of `company`; (id, callback URL), once the gateway has it.
    pub async fn create_for(
        &self,
        company: Uuid,
        provider: &str,
        secret: Option<&str>,
        extra: &[&str],
    ) -> (String, String) {
        let company = company.to_string();
        let secret_path = self
            .p
            .dir
            .path()
            .join(format!("{provider}-{}.secret", Uuid::new_v4()));
        let mut args = vec![
            "create",
            "--company",
            &company,
            "--provider",
            provider,
            "--public-url",
            PUBLIC,
        ];
        let secret_arg = secret_path.display().to_string();
        if let Some(s) = secret {
            std::fs::write(&secret_path, format!("{s}\n")).expect("writing the secret");
            args.extend(["--secret-file", secret_arg.as_str()]);
        }
        args.extend(extra);
        let out = self.connectors(&args).await;
        let url = out.lines().last().expect("a URL line").to_owned();
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("connector_id:"))
            .expect("a connector_id line")
            .trim()
            .to_owned();
        assert!(
            url.starts_with(&format!("{PUBLIC}/v1/callbacks/{id}")),
            "{out}"
        );
        self.until_known(&id).await;
        (id, url)
    }

    /// Waits until the gateway holds connector `id`.
    pub async fn until_known(&self, id: &str) {
        let cache = self.p.gw.state.connectors.clone();
        eventually(
            Duration::from_secs(5),
            "the connector to reach the gateway",
            || {
                let found = cache.get(id).is_some();
                async move { found.then_some(()) }
            },
        )
        .await;
    }

    /// Sends `signed` to the gateway: its status and body.
    pub async fn post(&self, signed: &Signed) -> (StatusCode, String) {
        self.post_with(signed, &[]).await
    }

    /// Sends `signed` with `extra` headers.
    pub async fn post_with(&self, signed: &Signed, extra: &[(&str, &str)]) -> (StatusCode, String) {
        send(&self.p.gw.http, &self.p.gw.base(), PUBLIC, signed, extra).await
    }

    /// Posts `signed` until the gateway answers `status` (a change made by a `connectors`
    /// command reaches it within a second).
    pub async fn until_answered(&self, signed: &Signed, status: StatusCode, what: &str) {
        eventually(Duration::from_secs(2), what, || async {
            (self.post(signed).await.0 == status).then_some(())
        })
        .await;
    }

    /// The other company's traffic: `n` records through its API key.
    pub async fn other_posts(&mut self, n: usize) {
        for _ in 0..n {
            let ext = format!("OTHER-{}", Uuid::new_v4());
            let (status, body) = self
                .p
                .gw
                .post_call(
                    &self.p.key,
                    &json!({"company_id": self.p.company, "external_call_id": ext, "external_system": "Dialer", "call_status": "completed"}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            self.other_sent.push(ext);
        }
    }

    /// The stored call of this company with external id `ext`.
    pub async fn row(&self, ext: &str) -> Option<Stored> {
        self.row_of(self.company, ext).await
    }

    /// The stored call of `company` with external id `ext`.
    pub async fn row_of(&self, company: Uuid, ext: &str) -> Option<Stored> {
        sqlx::query_as(
            "SELECT call_status, caller_number, recipient_number, duration_seconds, recording_url, \
             external_system, start_time, end_time, call_details, key_id \
             FROM call_history WHERE company_id = $1 AND external_call_id = $2",
        )
        .bind(company)
        .bind(ext)
        .fetch_optional(&self.p.db.pool)
        .await
        .expect("reading call_history")
    }

    /// Rows of this company with external id `ext`.
    pub async fn rows_of(&self, ext: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM call_history WHERE company_id = $1 AND external_call_id = $2",
        )
        .bind(self.company)
        .bind(ext)
        .fetch_one(&self.p.db.pool)
        .await
        .expect("counting call_history")
    }

    /// Waits until the worker has stored everything published so far.
    pub async fn drained(&self) {
        crate::stack::drained(&self.p.nats.url(), Duration::from_secs(20)).await;
    }

    /// The call `ext` once everything published is stored.
    pub async fn stored(&self, ext: &str) -> Stored {
        self.drained().await;
        self.row(ext)
            .await
            .unwrap_or_else(|| panic!("call {ext} is not stored"))
    }

    /// Every record of the other company was stored, and nothing of the connectors' landed
    /// on it; the stream holds no record with any of `forged` anywhere. Stops the services.
    pub async fn finish(self, forged: &[&str]) {
        self.drained().await;
        for ext in &self.other_sent {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM call_history WHERE company_id = $1 AND external_call_id = $2",
            )
            .bind(self.p.company)
            .bind(ext)
            .fetch_one(&self.p.db.pool)
            .await
            .expect("counting call_history");
            assert_eq!(n, 1, "the other company's call {ext}");
        }
        for (_, _, envelope) in stream_messages(&self.p.nats.url()).await {
            let text = serde_json::to_string(&envelope.record).expect("a record serializes");
            for f in forged {
                assert!(
                    !text.contains(f),
                    "an altered callback reached the stream: {text}"
                );
            }
            if envelope.record.company_id == self.p.company {
                assert_eq!(envelope.record.external_system.as_deref(), Some("Dialer"));
            }
        }
        self.p.worker.stop().await;
        self.p.gw.stop().await;
    }
}

/// A provider's call id: `prefix` and a fresh hex string.
pub fn call_id(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}
