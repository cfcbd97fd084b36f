//! wsgate: a reverse-proxy sidecar that enforces WebSocket admission.
//!
//! It reserves a slot from a max-clients cap *before* it touches the
//! upstream, forwards the WebSocket handshake, splices the two byte streams,
//! and releases the slot when either side closes, however it closes. Plain
//! HTTP passes through uncounted. Metrics are on a separate admin port.
//!
//! # Layout
//! In the order a connection meets them (each file's `//!` says its one job):
//!
//! | module | holds |
//! | --- | --- |
//! | `server` | the accept loop and per-connection HTTP/1 serving |
//! | `tcp` | socket options: `TCP_NODELAY`, keepalive, `TCP_USER_TIMEOUT` |
//! | `proxy` | the request handler: classify, admit, forward the upgrade or the plain request |
//! | `headers` | pure header logic: classify, validate, rewrite |
//! | `admission` | cap, per-IP, rate, dry run, watermarks; `RejectReason`; the RAII `AdmissionGuard` |
//! | `keys/` | limits per key (SPEC §9): rules, key tables, key extraction, the JWT verifier |
//! | `jwt/` | the JWT verifier of `jwt_claim` rules: JWKS parsing and key checks, the JWKS watch |
//! | `fleet/` | fleet-wide limits through Redis (SPEC §10): holds as leases, the admission script, the renewing worker |
//! | `error` | `ProxyError`: every way a request fails, mapped to a status and a reason |
//! | `responses` | every answer wsgate writes itself (400 … 504), with static bodies |
//! | `tunnel` | the upstream handshake, then the tracked task that owns a slot |
//! | `upstream_http` | the upstream handshake on the wire: request head out, 101 parsed |
//! | `upstream_client` | the pooled plain-HTTP client to the upstream, over TCP or a Unix socket |
//! | `splice/` | the byte mover: per-direction phases, buffer pool, waker gate, deadlines |
//! | `frames` | RFC 6455 frame-boundary tracker; Close frame encoding |
//! | `drain` | live tunnels in age order; the even-pace drain; the operator's drain |
//! | `session` | how a session ended: `closed_by`, `end`, the Close code and reason |
//! | `access_log` | one record per session; refusals summarised every 10 s at most |
//! | `log_format` | how log lines are written: the plain field formatter, the cached timestamp |
//! | `shutdown` | signals → `Control`, the `Shutdown` tokens and tracker, the shutdown timeline |
//! | `reload` | SIGHUP and the config-file watch |
//! | `config/` | the keys, their defaults, validation, the figment stack, `check-config` output |
//! | `metrics` | metric registration (names fixed by SPEC), labelled handles, encoding |
//! | `admin/` | `/metrics`, `/healthz`, `/readyz`, `/keys`, `/drain` on their own listener; the admin token |
//! | `demo` | `wsgate demo`: the page-and-echo upstream and its defaults |
//!
//! [`run`] takes listeners that are already bound and a channel of
//! [`Control`] messages, so tests start the real thing on port 0 and drive
//! shutdown without signals.

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod admission;
pub mod config;
pub mod demo;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod file_watch;
pub(crate) mod fleet;
pub(crate) mod frames;
pub(crate) mod headers;
pub(crate) mod jwt;
pub(crate) mod keys;
pub mod log_format;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod reload;
pub(crate) mod responses;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod shutdown;
pub(crate) mod splice;
pub(crate) mod tcp;
pub(crate) mod tunnel;
pub(crate) mod upstream_client;
pub(crate) mod upstream_http;

use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::config::{Config, ConfigError};
pub use crate::file_watch::{FileVersion, CONFIG_POLL_INTERVAL};
use crate::metrics::{FleetMetrics, Metrics, ReloadResult};
use crate::shutdown::Drive;
pub use crate::shutdown::{os_signals, Control, Shutdown};
pub use crate::tcp::listen;

/// How long start-up waits for the first connection to the fleet's Redis.
const FLEET_START_WAIT: Duration = Duration::from_secs(2);

/// A boxed error for start-up plumbing.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs the proxy on already-bound listeners until shut down.
///
/// [`Control::Reload`] applies a new configuration in place. The first
/// [`Control::Shutdown`] (or the channel closing) starts the shutdown
/// timeline (`Shutdown::run_timeline`: readiness 503, the delay, the
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
    // The fleet worker outlives the shutdown timeline: connections closed
    // by the drain still give their holds back through it.
    let fleet_stop = CancellationToken::new();
    let (fleet, fleet_worker) = match &config.fleet {
        Some(settings) => {
            let fleet_metrics = FleetMetrics::register(&registry)?;
            let (fleet, worker) = fleet::Fleet::start(settings, fleet_metrics, fleet_stop.clone())?;
            // The first clients are judged by Redis when it is there; a
            // Redis that is not costs start-up at most this long.
            fleet.first_attempt(FLEET_START_WAIT).await;
            (Some(fleet), Some(worker))
        }
        None => (None, None),
    };
    let proxy = proxy::Proxy::new(config, metrics.clone(), shutdown.clone(), fleet)?;
    let readiness = admin::Readiness {
        shutdown: shutdown.clone(),
        admission: proxy.admission().clone(),
        gauge: metrics.ready.clone(),
    };
    readiness.check();

    let token = admin::AdminToken::new(proxy.config().admin_token_file.clone());
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            registry,
            readiness,
            proxy: proxy.clone(),
            token: token.clone(),
            drain: drain::AdminDrain::default(),
            admin_drained: metrics.admin_drained.clone(),
        },
    ));
    let accept = tokio::spawn(server::serve(
        proxy_listener,
        proxy.clone(),
        shutdown.clone(),
    ));

    // Serve, applying reloads, until the first shutdown request; a closed
    // channel means the same.
    while let Some(Control::Reload(loaded)) = control.recv().await {
        apply_reload(&proxy, &token, &metrics, *loaded);
    }
    let config = proxy.config();
    let drive = Drive {
        config: &config,
        tunnels: proxy.tunnels(),
        drained: &metrics.drained,
        accept,
    };
    shutdown.run_timeline(drive, &mut control).await;
    // Refusals of the last window, before the exit.
    proxy.refusals().flush();
    fleet_stop.cancel();
    if let Some(worker) = fleet_worker {
        let _ = worker.await;
    }
    admin.abort();
    // Dropping the aborted admin task drops its connection set too.
    let _ = admin.await;
    Ok(())
}

fn apply_reload(
    proxy: &proxy::Proxy,
    token: &admin::AdminToken,
    metrics: &Metrics,
    loaded: Result<Config, ConfigError>,
) {
    match loaded {
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            token.set_path(config.admin_token_file.clone());
            proxy.reload(config);
            metrics.reloads.inc(ReloadResult::Success);
        }
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            metrics.reloads.inc(ReloadResult::Failure);
        }
    }
}
