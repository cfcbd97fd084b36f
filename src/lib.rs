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
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod tcp;
pub mod tunnel;
pub mod upstream_http;

use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

pub use crate::config::{Config, ConfigError};
pub use crate::shutdown::{Control, Shutdown};

/// A boxed error for start-up plumbing.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// After everything is cut, how long tasks get to drop their sockets
/// before `run` returns anyway.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(2);

/// Runs the proxy on already-bound listeners until shut down.
///
/// Timeline (SPEC §5, §7): the first [`Control::Shutdown`] (or the channel
/// closing) turns readiness 503; admissions continue for `shutdown_delay`;
/// then the listener closes, new upgrades get 503 `draining`, and the
/// remaining connections are closed oldest first, evenly over
/// `drain_period`; at `shutdown_grace` after the signal (or at a second
/// [`Control::Shutdown`]) whatever is left is closed and `run` returns.
/// [`Control::Reload`] applies a new configuration in place.
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
    let shutdown = Shutdown::new();
    let proxy = proxy::Proxy::new(config, metrics.clone(), shutdown.clone())?;
    let readiness = admin::Readiness {
        shutdown: shutdown.clone(),
        admission: proxy.admission().clone(),
        gauge: metrics.ready.clone(),
    };
    readiness.check();

    let admin = tokio::spawn(admin::serve(admin_listener, registry, readiness.clone()));
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
    let signalled_at = Instant::now();
    let config = proxy.config();
    tracing::info!(
        delay_ms = config.shutdown_delay.as_millis() as u64,
        drain_ms = config.drain_period.as_millis() as u64,
        grace_ms = config.shutdown_grace.as_millis() as u64,
        active = proxy.admission().active(),
        "shutdown: not ready any more"
    );
    shutdown.signal_received();
    readiness.check();

    // Keep admitting through the delay, so clients routed here while the
    // endpoint removal propagates are not refused.
    let mut second_signal = tokio::select! {
        () = tokio::time::sleep(config.shutdown_delay) => false,
        () = next_shutdown(&mut control) => true,
    };
    tracing::info!("shutdown: draining");
    shutdown.start_draining();
    if let Err(e) = accept.await {
        tracing::error!(error = %e, "accept loop failed");
    }
    let tracker = shutdown.tracker();
    tracker.close();
    if !second_signal {
        // The closing handshakes of whatever is left start `close_timeout`
        // before the end of the grace, so that the grace stays the bound on
        // the whole shutdown (it must fit in terminationGracePeriodSeconds).
        let grace_end = signalled_at + config.shutdown_grace;
        let close_start = grace_end
            .checked_sub(config.close.timeout)
            .unwrap_or(signalled_at)
            .max(signalled_at);
        // The drain ends by then too, so its own closing handshakes fit in
        // the grace instead of being cut by it.
        let drain_period = config
            .drain_period
            .min(close_start.saturating_duration_since(Instant::now()));
        let drained = async {
            if !drain_period.is_zero() {
                drain::drain_evenly(proxy.tunnels(), drain_period, &metrics.drained).await;
            }
            tracker.wait().await;
        };
        tokio::select! {
            () = drained => tracing::info!("shutdown: every connection ended"),
            () = sleep_until(close_start) => {
                tracing::warn!(
                    remaining = proxy.tunnels().len(),
                    "shutdown: grace ending, closing the remaining connections with Close frames"
                );
            }
            () = next_shutdown(&mut control) => second_signal = true,
        }
    }
    if !second_signal {
        // Tunnels still open send their Close frames and wait for the
        // replies until the end of the grace; another signal cuts them.
        shutdown.stop_now();
        let grace_end = (signalled_at + config.shutdown_grace).max(Instant::now());
        tokio::select! {
            _ = timeout_at(grace_end, tracker.wait()) => {}
            () = next_shutdown(&mut control) => second_signal = true,
        }
    }
    if second_signal {
        tracing::warn!(
            remaining = proxy.tunnels().len(),
            "shutdown: second signal, cutting the remaining connections"
        );
    }
    shutdown.abort_now();
    if timeout(HARD_STOP_MARGIN, tracker.wait()).await.is_err() {
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

/// Waits for the next shutdown request; reloads during shutdown are
/// refused (the process is going away); a closed channel never resolves.
async fn next_shutdown(control: &mut mpsc::UnboundedReceiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown) => return,
            Some(Control::Reload(_)) => tracing::warn!("reload ignored: shutting down"),
            None => std::future::pending().await,
        }
    }
}

fn apply_reload(
    proxy: &proxy::Proxy,
    metrics: &metrics::Metrics,
    loaded: Result<Config, ConfigError>,
) {
    match loaded {
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            proxy.reload(config);
            metrics.reload(true);
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the running configuration stays");
            metrics.reload(false);
        }
    }
}
