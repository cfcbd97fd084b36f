//! Shared test support, for every module of the test binary (tests/it): real upstreams on
//! port 0 ([`upstream`]), the sidecar started through its real entry point
//! (here), clients down to raw bytes ([`client`]), metric matchers that poll
//! with a deadline instead of sleeping ([`metrics`]), the wsgate binary
//! as a child process with /proc readings, and python3 helpers
//! ([`process`]), and JWTs signed
//! with the test keys in `tests/fixtures/jwt` ([`jwt`]), and a real
//! `redis-server` for the fleet tests ([`redis`]), a real Redis Cluster
//! ([`redis_cluster`]) and a Sentinel-managed primary ([`redis_sentinel`]).
//!
//! Everything is re-exported here, so a test module (tests/it/*.rs) says
//! `use crate::support::*;`; except [`jwt`], whose names (`token`) are too generic
//! for a glob: it is `support::jwt::token(..)`.
#![allow(
    unreachable_pub,
    reason = "`pub` marks what the test modules use; the crate exports nothing"
)]

pub mod admin;
pub mod client;
pub mod jwt;
pub mod metrics;
pub mod process;
pub mod redis;
pub mod redis_cluster;
pub mod redis_sentinel;
pub mod upstream;
pub mod watched;
// Not glob-exported: `use support::access::*;` where needed (its names stay out of every other binary).
pub mod access;

pub use client::*;
pub use metrics::*;
pub use process::*;
// `self::`: the `redis` crate (wsgate's own dependency) has the same name.
pub use self::redis::*;
pub use redis_cluster::*;
pub use redis_sentinel::*;
pub use upstream::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wsgate::config::{Config, RawConfig};
use wsgate::Control;

/// Everything waits at most this long; a hang fails instead of blocking CI.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A slot freed by a close wsgate can see (FIN, RST, Close frame, a failed
/// handshake) must be back within this: the bound the original hub promised.
/// On loopback it takes milliseconds; the margin is for a loaded CI machine.
pub const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// Runs `f` under [`DEADLINE`], failing the test with `what` if it hangs.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------- sidecar

/// A wsgate started in-process through `wsgate::run` on port 0.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub control: mpsc::UnboundedSender<Control>,
    pub task: JoinHandle<Result<(), wsgate::Error>>,
}

impl Sidecar {
    /// Sends one shutdown signal.
    pub fn signal(&self) {
        let _ = self.control.send(Control::Shutdown);
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

/// The configuration tests start from: loopback, port 0, short timeouts.
pub fn test_config(upstream: SocketAddr) -> RawConfig {
    RawConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: Some(upstream.to_string()),
        ..RawConfig::default()
    }
}

pub async fn spawn_sidecar(raw: RawConfig) -> Sidecar {
    let (config, proxy, admin) = bind_sidecar(raw).await;
    start_sidecar(config, proxy, admin)
}

/// The validated configuration and its two listeners, bound but not served
/// yet (connections to them wait in the kernel's accept queue).
pub async fn bind_sidecar(raw: RawConfig) -> (Config, TcpListener, TcpListener) {
    let config = Config::validate(raw).expect("valid test config");
    let proxy = TcpListener::bind(config.listen).await.expect("bind proxy");
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .expect("bind admin");
    (config, proxy, admin)
}

/// Starts wsgate in-process on listeners from [`bind_sidecar`].
pub fn start_sidecar(config: Config, proxy: TcpListener, admin: TcpListener) -> Sidecar {
    let (addr, admin_addr) = (
        proxy.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(wsgate::run(config, proxy, admin, rx));
    Sidecar {
        addr,
        admin: admin_addr,
        control: tx,
        task,
    }
}

/// Small builders on the raw configuration.
pub trait RawConfigExt {
    fn cap(self, max_clients: i64) -> Self;
}

impl RawConfigExt for RawConfig {
    fn cap(mut self, max_clients: i64) -> Self {
        self.max_clients = max_clients;
        self
    }
}
