//! The three NATS identities (nkeys) every test server knows, as `deploy/nats/identities.conf`
//! requires: created once per test process, seeds in a private temp dir.
//!
//! With `CALLCAP_NKEY_DIR` set (the benchmark scripts, against a broker `deploy/lib.sh`
//! started), the identities are read from that directory instead — `gateway.nk`,
//! `worker.nk`, `admin.nk` and `route.password`, as `ensure_nkeys` writes them.
//!
//! The services under test connect as the identity they have in production (gateway,
//! worker); the tests' own checks and the admin commands connect as admin. So every test
//! also shows that each identity's permissions are enough for its job.

use std::path::PathBuf;
use std::sync::OnceLock;

use callcap::config::{NatsArgs, Role};
use tempfile::TempDir;

/// One identity: its seed file (for `NATS_NKEY_FILE`) and public key.
pub struct Identity {
    pub seed_file: PathBuf,
    pub public_key: String,
}

/// The gateway's, the worker's and the admin's identity, and the cluster route password.
pub struct Identities {
    _dir: Option<TempDir>,
    pub gateway: Identity,
    pub worker: Identity,
    pub admin: Identity,
    pub route_password: String,
}

fn load(dir: &std::path::Path, name: &str) -> Identity {
    let seed_file = dir.join(format!("{name}.nk"));
    let seed =
        callcap::config::read_seed(&seed_file).unwrap_or_else(|e| panic!("CALLCAP_NKEY_DIR: {e}"));
    let pair = nkeys::KeyPair::from_seed(&seed)
        .unwrap_or_else(|e| panic!("{}: not an nkey seed: {e}", seed_file.display()));
    Identity {
        seed_file,
        public_key: pair.public_key(),
    }
}

fn make(dir: &TempDir, name: &str) -> Identity {
    let pair = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join(format!("{name}.nk"));
    std::fs::write(&seed_file, pair.seed().expect("an nkey seed")).expect("writing a seed");
    Identity {
        seed_file,
        public_key: pair.public_key(),
    }
}

/// The identities of this test process.
pub fn identities() -> &'static Identities {
    static IDS: OnceLock<Identities> = OnceLock::new();
    IDS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("CALLCAP_NKEY_DIR").map(PathBuf::from) {
            let password = std::fs::read_to_string(dir.join("route.password"))
                .unwrap_or_else(|e| panic!("{}/route.password: {e}", dir.display()));
            return Identities {
                gateway: load(&dir, "gateway"),
                worker: load(&dir, "worker"),
                admin: load(&dir, "admin"),
                route_password: password.trim().to_owned(),
                _dir: None,
            };
        }
        let dir = tempfile::tempdir().expect("a temp dir for nkeys");
        Identities {
            gateway: make(&dir, "gateway"),
            worker: make(&dir, "worker"),
            admin: make(&dir, "admin"),
            route_password: uuid::Uuid::new_v4().simple().to_string(),
            _dir: Some(dir),
        }
    })
}

impl Identities {
    /// The environment a nats-server running a shipped config needs.
    pub fn server_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "CALLCAP_GATEWAY_NKEY".into(),
                self.gateway.public_key.clone(),
            ),
            ("CALLCAP_WORKER_NKEY".into(), self.worker.public_key.clone()),
            ("CALLCAP_ADMIN_NKEY".into(), self.admin.public_key.clone()),
            ("CALLCAP_ROUTE_PASSWORD".into(), self.route_password.clone()),
        ]
    }

    /// The identity of `role`.
    pub fn of(&self, role: Role) -> &Identity {
        match role {
            Role::Gateway => &self.gateway,
            Role::Worker => &self.worker,
            Role::Admin => &self.admin,
        }
    }
}

/// NATS settings for `nats_url` (one URL or a comma-separated seed list) as `role`.
pub fn nats_args(nats_url: &str, role: Role) -> NatsArgs {
    NatsArgs::new(nats_url).with_nkey_file(identities().of(role).seed_file.clone())
}

/// A connection as `role`, retrying until a server answers.
pub async fn connect_as(nats_url: &str, role: Role) -> async_nats::Client {
    nats_args(nats_url, role)
        .connect_once("callcap-tests", role)
        .await
        .unwrap_or_else(|e| panic!("connecting to NATS at {nats_url} as {role:?}: {e}"))
}

/// A connection as admin: what the tests' own checks use.
pub async fn connect(nats_url: &str) -> async_nats::Client {
    connect_as(nats_url, Role::Admin).await
}

/// As [`connect`], `None` when no server answers (for polling).
pub async fn try_connect(nats_url: &str) -> Option<async_nats::Client> {
    nats_args(nats_url, Role::Admin)
        .connect_once("callcap-tests", Role::Admin)
        .await
        .ok()
}
