//! wsgate: a reverse-proxy sidecar that enforces WebSocket admission.
//!
//! It reserves a slot from a max-clients cap *before* it touches the
//! upstream, forwards the WebSocket handshake, splices the two byte streams,
//! and releases the slot when either side closes, however it closes. Plain
//! HTTP passes through uncounted. Metrics are on a separate admin port.
//!
//! # Layout
//! | module | holds |
//! | --- | --- |
//! | [`config`] | the figment provider stack, validation, `ConfigError` |
//! | [`admission`] | the active count + cap and the RAII `AdmissionGuard` |
//! | [`headers`] | pure header logic: classify, validate, rewrite |
//! | [`proxy`] | the request handler: upgrade path and plain HTTP forwarding |
//! | [`tunnel`] | upstream handshake, then the tracked task that owns a slot |
//! | [`splice`] | the byte mover: readiness-driven, pooled buffers, deadlines |
//! | [`server`] | accept loop and per-connection HTTP/1 serving |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz` on their own listener |
//! | [`metrics`] | metric registration (names fixed by SPEC §4) and encoding |
//! | [`shutdown`] | drain / hard-stop tokens, the task tracker, OS signals |
//! | [`tcp`] | socket options: `TCP_NODELAY`, keepalive, `TCP_USER_TIMEOUT` |
//! | [`error`] | `ProxyError` and its mapping to status codes |
//! | [`demo`] | the `wsgate demo` echo upstream and defaults |
//!
//! [`run`] takes listeners that are already bound and a channel of
//! [`Control`] messages, so tests start the real thing on port 0 and drive
//! shutdown without signals.

pub mod admin;
pub mod admission;
pub mod config;
pub mod demo;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod tcp;
pub mod tunnel;

use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};

pub use crate::config::{Config, ConfigError};
pub use crate::shutdown::{Control, Shutdown};

/// A boxed error for start-up plumbing.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// After the hard stop, how long tasks get to wind down before `run` returns
/// anyway (they only need to drop their sockets).
const HARD_STOP_WAIT: Duration = Duration::from_secs(5);

/// Runs the proxy on already-bound listeners until shut down.
///
/// Shutdown (SPEC §5): the first [`Control::Shutdown`] (or the channel
/// closing) starts draining: `/readyz` 503, new upgrades 503, the listener
/// closes, connections continue. When all have ended, or `shutdown_grace`
/// after the signal, or at a second [`Control::Shutdown`], the rest are
/// closed and `run` returns.
///
/// # Errors
/// Only set-up failures (metric registration); serving errors are logged.
pub async fn run(
    config: Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Result<(), Error> {
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry)?;
    let admission = admission::Admission::new(
        config.max_clients,
        metrics.active.clone(),
        metrics.max.clone(),
    );
    let shutdown = Shutdown::new();
    let settings = server::ServerSettings {
        header_read_timeout: config.header_read_timeout,
        tcp_keepalive: config.tcp_keepalive,
    };
    let grace = config.shutdown_grace;
    let proxy = proxy::Proxy::new(config, admission, metrics.clone(), shutdown.clone())?;

    let admin = tokio::spawn(admin::serve(admin_listener, registry, shutdown.clone()));
    let accept = tokio::spawn(server::serve(
        proxy_listener,
        proxy,
        settings,
        shutdown.clone(),
    ));
    metrics.ready.set(1);

    // Wait for the first shutdown request; a closed channel means the same.
    let _ = control.recv().await;
    let deadline = Instant::now() + grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutdown: draining");
    shutdown.start_draining();
    metrics.ready.set(0);
    if let Err(e) = accept.await {
        tracing::error!(error = %e, "accept loop failed");
    }

    let tracker = shutdown.tracker();
    tracker.close();
    tokio::select! {
        () = tracker.wait() => tracing::info!("shutdown: every connection ended"),
        () = sleep_until(deadline) => {
            tracing::warn!(remaining = tracker.len(), "shutdown: grace over, closing the remaining connections");
        }
        Some(Control::Shutdown) = control.recv() => {
            tracing::warn!(remaining = tracker.len(), "shutdown: second signal, closing the remaining connections");
        }
    }
    shutdown.stop_now();
    if timeout(HARD_STOP_WAIT, tracker.wait()).await.is_err() {
        tracing::error!(
            remaining = tracker.len(),
            "shutdown: tasks still running after the hard stop"
        );
    }
    admin.abort();
    // Dropping the aborted admin task drops its connection set too.
    let _ = admin.await;
    Ok(())
}
