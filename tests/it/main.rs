//! wsgate's black-box integration tests, as one test binary (`it`): each
//! module was a `tests/*.rs` binary of its own, each recompiling
//! [`support`] and linking separately. A test's name starts with its
//! module (`fleet::churn_of_20000_connections_...`); pick a module with
//! `cargo nextest run -E 'binary_id(wsgate::it) & test(/^fleet::/)'` (the
//! library's unit tests have `fleet::` names too), or for the on-demand
//! `--ignored` runs, `cargo test --test it fleet::`.
//!
//! nextest still runs every test in a process of its own (the descriptor,
//! task and RSS checks read the whole process): `cargo test` runs them as
//! threads of one process, so it is only for the on-demand `--ignored` runs
//! the modules document.
//!
//! `tests/loom_admission.rs` stays a target of its own: `tests/loom.sh`
//! builds it alone with `--cfg loom`.

// Stays in tests/support: src/keys/jwt.rs includes its jwt.rs by path.
#[path = "../support/mod.rs"]
mod support;

mod access_log;
mod admin_drain;
mod admission;
mod churn;
mod cli;
mod close_frames;
mod close_refusals;
mod demo;
mod faults;
mod fleet;
mod fleet_cluster;
mod fleet_sentinel;
mod frames_props;
mod guards;
mod handshake_policy;
mod hardening;
mod hostile_input;
mod keepalive;
mod key_limits;
mod key_limits_jwt;
mod loops;
mod pings;
mod pod_deletion;
mod props;
mod rebalance;
mod release_paths;
mod rollout;
mod slow_bodies;
mod traffic;
mod unix_upstream;
