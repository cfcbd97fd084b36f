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
//! | [`admission`] | cap, per-IP, rate, dry run, watermarks; the RAII `AdmissionGuard` |
//! | [`headers`] | pure header logic: classify, validate, rewrite |
//! | [`proxy`] | the request handler: upgrade path and plain HTTP forwarding |
//! | [`tunnel`] | upstream handshake, then the tracked task that owns a slot |
//! | [`upstream_http`] | the upstream handshake on the wire: request head out, 101 parsed |
//! | [`splice`] | the byte mover: readiness-driven, pooled buffers, deadlines |
//! | [`drain`] | live tunnels in age order; the even-pace drain |
//! | [`frames`] | RFC 6455 frame-boundary tracker; Close frame encoding |
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
pub mod drain;
pub mod error;
pub mod frames;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod responses;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod tcp;
pub mod tunnel;
pub mod upstream_http;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, ReloadResult};
use crate::shutdown::Drive;
pub use crate::shutdown::{Control, Shutdown};

/// A boxed error for start-up plumbing.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs the proxy on already-bound listeners until shut down.
///
/// [`Control::Reload`] applies a new configuration in place. The first
/// [`Control::Shutdown`] (or the channel closing) starts the shutdown
/// timeline ([`Shutdown::run_timeline`]: readiness 503, the delay, the
/// paced drain, the grace); `run` returns when it is over.
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
    let metrics = Metrics::register(&registry)?;
    let shutdown = Shutdown::new();
    let proxy = proxy::Proxy::new(config, metrics.clone(), shutdown.clone())?;
    let readiness = admin::Readiness {
        shutdown: shutdown.clone(),
        admission: proxy.admission().clone(),
        gauge: metrics.ready.clone(),
    };
    readiness.check();

    let admin = tokio::spawn(admin::serve(admin_listener, registry, readiness));
    let accept = tokio::spawn(server::serve(
        proxy_listener,
        proxy.clone(),
        shutdown.clone(),
    ));

    // Serve, applying reloads, until the first shutdown request; a closed
    // channel means the same.
    while let Some(Control::Reload(loaded)) = control.recv().await {
        apply_reload(&proxy, &metrics, *loaded);
    }
    let config = proxy.config();
    let drive = Drive {
        config: &config,
        tunnels: proxy.tunnels(),
        drained: &metrics.drained,
        accept,
    };
    shutdown.run_timeline(drive, &mut control).await;
    admin.abort();
    // Dropping the aborted admin task drops its connection set too.
    let _ = admin.await;
    Ok(())
}

fn apply_reload(proxy: &proxy::Proxy, metrics: &Metrics, loaded: Result<Config, ConfigError>) {
    match loaded {
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            proxy.reload(config);
            metrics.reloads.inc(ReloadResult::Success);
        }
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            metrics.reloads.inc(ReloadResult::Failure);
        }
    }
}
