//! End-to-end tests: real nats-server, real Postgres, real HTTP. One binary, so the
//! harness compiles once; each test brings its own NATS and database and runs in parallel.

mod archive;
mod callbacks;
mod cluster;
mod deploy;
mod docs;
mod encoding;
mod erasure;
mod examples;
mod faults;
mod fuzz;
mod gateway;
mod group_commit;
mod lanes;
mod merge;
mod overload;
mod partitions;
mod pipeline;
mod plans;
mod power_loss;
mod probe;
mod probe3;
mod schema;
mod security;
mod seeds;
mod status;
mod traces;

/// The service binaries, built from their own `main.rs` by this package.
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_worker-under-test");
pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
