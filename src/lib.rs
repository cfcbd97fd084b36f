//! wsgate: a reverse-proxy sidecar that enforces WebSocket admission.
//!
//! It reserves a slot from a max-clients cap *before* it touches the
//! upstream, forwards the WebSocket handshake, splices the two byte streams,
//! and releases the slot when either side closes, however it closes. Plain
//! HTTP passes through uncounted. Metrics are on a separate admin port.
//!
//! # Layout
//! In the order a connection meets them (each file's `//!` says its one
//! job; `docs/architecture.md` tells the life of a connection):
//!
//! | module | holds |
//! | --- | --- |
//! | `server` | the accept loop; per connection, the fast path for an upgrade or hyper's HTTP/1 server |
//! | `first_head` | the first request head read and parsed: an upgrade takes the fast path, anything else is replayed to hyper |
//! | `tcp` | socket options: `TCP_NODELAY`, keepalive, `TCP_USER_TIMEOUT` |
//! | `proxy` | the request handler: classify, call the admission pipeline once, forward the upgrade or the plain request |
//! | `plain_cap` | `max_plain_requests`: the places of plain requests in flight, held by their bodies |
//! | `body_timeout` | request bodies that stall for `header_read_timeout` fail (408) |
//! | `headers` | pure header logic: classify, validate, rewrite |
//! | `loop_marker` | the `Via` entry naming this process on every forwarded request; a request carrying it is a loop (508) |
//! | `origin` | web origins and `allowed_origins` patterns: parse, normalise, match |
//! | `subprotocols` | `Sec-WebSocket-Protocol`: the offer screened and rewritten, the upstream's selection checked |
//! | `target` | the request target read the way the upstream reads it: path normalised, ambiguous paths refused |
//! | `admission/` | the admission pipeline: the ordered checks, one file per policy, the outcome, the RAII `AdmissionGuard` |
//! | `keys/` | limits per key: rules, key tables, key extraction |
//! | `jwt/` | the JWT verifier, JWKS parsing and its file watch |
//! | `fleet/` | fleet-wide limits through Redis: holds as leases, the admission script, the renewing worker, heartbeats |
//! | `rebalance/` | automatic rebalancing: the heartbeat-driven controller, when to shed and how many |
//! | `error` | `ProxyError`: every way a request fails, mapped to a status and a reason |
//! | `responses` | every answer wsgate writes itself (400 … 504), with static bodies; its own 101 |
//! | `close_refusal` | `refusal_mode = "close"`: a refusal for load said as wsgate's own 101 and Close 1013 |
//! | `tunnel` | the upstream handshake, then the tracked task that owns a slot |
//! | `upstream_http` | the upstream handshake on the wire: request head out, 101 parsed |
//! | `upstream_client` | the pooled plain-HTTP client to the upstream, over TCP or a Unix socket |
//! | `splice/` | the byte mover: per-direction phases, buffer pool, waker gate, deadlines, message guards, wsgate's Pings and the send timeout |
//! | `frames` | RFC 6455 frame-boundary tracker; Close frame encoding |
//! | `drain` | live tunnels in age order; the even-pace drain; the operator's drain |
//! | `session` | how a session ended (`closed_by`, `end`, Close code and reason), and its series |
//! | `access_log` | one record per session; refusals summarised every 10 s at most |
//! | `summary` | counts by cause written as one line per 10 s window (refusal summaries) |
//! | `throttle` | one log line per interval for events a client can cause at will |
//! | `log_format/` | how log lines are written: the text and JSON lines built without `fmt`, the cached timestamp |
//! | `shutdown` | signals → `Control`, the `Shutdown` tokens and tracker, the shutdown timeline |
//! | `reload` | SIGHUP and the config-file watch |
//! | `file_watch` | settled changes of a polled file (configuration, JWKS, admin token) |
//! | `config/` | the keys, their defaults, validation, the figment stack, `check-config` output |
//! | `metrics` | the toolkit each concern registers its own series with; encoding |
//! | `admin/` | `/metrics`, `/healthz`, `/readyz`, `/keys`, `/drain`, `/shutdown` on their own listener; the admin token |
//! | `prestop` | `wsgate prestop`: the pod-deletion hook that starts the drain before the app is signalled |
//! | `demo` | `wsgate demo`: the page-and-echo upstream and its defaults |
//!
//! [`run`] takes listeners that are already bound and a channel of
//! [`Control`] messages, so tests start the real thing on port 0 and drive
//! shutdown without signals.

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod body_timeout;
pub(crate) mod close_refusal;
pub mod config;
pub mod demo;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod file_watch;
pub(crate) mod first_head;
pub(crate) mod fleet;
pub(crate) mod frames;
pub(crate) mod headers;
pub(crate) mod jwt;
pub(crate) mod keys;
pub mod log_format;
pub(crate) mod loop_marker;
pub(crate) mod metrics;
pub(crate) mod origin;
pub(crate) mod plain_cap;
pub(crate) mod prestop;
pub(crate) mod proxy;
pub(crate) mod rebalance;
pub(crate) mod reload;
pub(crate) mod responses;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod shutdown;
pub(crate) mod splice;
pub(crate) mod subprotocols;
pub(crate) mod summary;
pub(crate) mod target;
pub(crate) mod tcp;
pub(crate) mod throttle;
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
use crate::metrics::{labels, Family, Registrar};
pub use crate::prestop::{prestop, PrestopError};
use crate::shutdown::Drive;
pub use crate::shutdown::{os_signals, Control, Shutdown};
pub use crate::tcp::listen;

labels! {
    /// How a configuration reload went (`wsgate_config_reloads_total{result}`).
    enum ReloadResult {
        /// Applied.
        Success => "success",
        /// Refused; the running configuration stays.
        Failure => "failure",
    }
}

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
    let r = Registrar::new(&registry);
    r.process()?;
    let reloads: Family<ReloadResult> = r.family(
        "wsgate_config_reloads_total",
        "Configuration reloads (SIGHUP or a settled change of the --config file)",
        "result",
    )?;
    let drain_metrics = drain::DrainMetrics::register(&r)?;
    let shutdown = Shutdown::new();
    // The fleet worker outlives the shutdown timeline: connections closed
    // by the drain still give their holds back through it.
    let fleet_stop = CancellationToken::new();
    let (fleet, fleet_worker) = match &config.fleet {
        Some(settings) => {
            let fleet_metrics = fleet::FleetMetrics::register(&r)?;
            let (fleet, worker) = fleet::Fleet::start(settings, fleet_metrics, fleet_stop.clone())?;
            // The first clients are judged by Redis when it is there; a
            // Redis that is not costs start-up at most this long.
            fleet.first_attempt(FLEET_START_WAIT).await;
            (Some(fleet), Some(worker))
        }
        None => (None, None),
    };
    let rebalance_metrics = match &fleet {
        Some(_) => Some(rebalance::RebalanceMetrics::register(&r)?),
        None => None,
    };
    let admission = admission::Admission::new(&config, &r, fleet.clone(), shutdown.clone())?;
    let shedding = rebalance::Shedding::default();
    let readiness =
        admin::Readiness::new(shutdown.clone(), admission.clone(), shedding.clone(), &r)?;
    let proxy = proxy::Proxy::new(
        config,
        admission,
        proxy::ProxyMetrics::register(&r)?,
        tunnel::TunnelMetrics::register(&r)?,
        shutdown.clone(),
    )?;
    readiness.check();

    let admin_drain = drain::AdminDrain::default();
    // Heartbeats and automatic rebalancing, wherever there is a fleet.
    let rebalancer = fleet.zip(rebalance_metrics).map(|(fleet, metrics)| {
        tokio::spawn(
            rebalance::Controller {
                fleet,
                proxy: proxy.clone(),
                shutdown: shutdown.clone(),
                admin_drain: admin_drain.clone(),
                shedding,
                metrics,
            }
            .run(),
        )
    });

    let token = admin::AdminToken::new(proxy.config().admin_token_file.clone());
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            registry,
            readiness,
            proxy: proxy.clone(),
            token: token.clone(),
            drain: admin_drain,
            admin_drained: drain_metrics.admin_drained.clone(),
        },
    ));
    let accept = tokio::spawn(server::serve(
        proxy_listener,
        proxy.clone(),
        shutdown.clone(),
    ));

    // Serve, applying reloads, until the first shutdown request: a signal,
    // a closed channel, or the pod's pre-stop hook (`POST /shutdown`).
    let by_hook = loop {
        tokio::select! {
            message = control.recv() => match message {
                Some(Control::Reload(loaded)) => apply_reload(&proxy, &token, &reloads, *loaded),
                Some(Control::Shutdown) | None => break false,
            },
            () = shutdown.requested() => break true,
        }
    };
    let config = proxy.config();
    let drive = Drive {
        config: &config,
        tunnels: proxy.tunnels(),
        drained: &drain_metrics.drained,
        accept,
    };
    shutdown.run_timeline(drive, &mut control).await;
    if by_hook {
        // The drain is over but the pod is not gone yet: the app is still
        // in its own pre-stop pause, and a native sidecar that exited now
        // could be restarted. Stay up, not ready, until the kubelet's
        // SIGTERM (or the channel closing).
        tracing::info!("shutdown: drained at the pre-stop hook's request; exiting at SIGTERM");
        while let Some(Control::Reload(_)) = control.recv().await {
            tracing::warn!("a reload was requested during shutdown: ignored");
        }
    }
    // Refusals of the last window, before the exit.
    proxy.refusals().flush();
    token.flush_refusals();
    if let Some(rebalancer) = rebalancer {
        let _ = rebalancer.await;
    }
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
    reloads: &Family<ReloadResult>,
    loaded: Result<Config, ConfigError>,
) {
    match loaded {
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            token.set_path(config.admin_token_file.clone());
            proxy.reload(config);
            reloads.inc(ReloadResult::Success);
        }
        Err(e) => {
            tracing::error!("reload refused, the running configuration stays: {e}");
            reloads.inc(ReloadResult::Failure);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every labelled series a default instance exports exists at 0 from
    /// start-up, and pairs that cannot happen are not exported.
    #[tokio::test]
    async fn every_labelled_series_exists_at_zero() {
        let config = Config::validate(config::RawConfig {
            upstream: Some("127.0.0.1:9".into()),
            ..config::RawConfig::default()
        })
        .expect("a valid configuration");
        let registry = Registry::new();
        let r = Registrar::new(&registry);
        r.process().expect("process");
        drain::DrainMetrics::register(&r).expect("drain");
        let shutdown = Shutdown::new();
        let admission =
            admission::Admission::new(&config, &r, None, shutdown.clone()).expect("admission");
        admin::Readiness::new(shutdown, admission, rebalance::Shedding::default(), &r)
            .expect("readiness");
        proxy::ProxyMetrics::register(&r).expect("proxy");
        tunnel::TunnelMetrics::register(&r).expect("tunnels");
        let text = String::from_utf8(metrics::encode(&registry)).expect("utf8");
        for series in [
            "wsgate_connections_active 0",
            "wsgate_connections_max 0",
            "wsgate_connections_admitted_total 0",
            "wsgate_connections_rejected_total{reason=\"capacity\"} 0",
            "wsgate_connections_rejected_total{reason=\"draining\"} 0",
            "wsgate_connections_rejected_total{reason=\"fleet_unavailable\"} 0",
            "wsgate_upstream_errors_total{kind=\"connect\"} 0",
            "wsgate_upstream_errors_total{kind=\"timeout\"} 0",
            "wsgate_upstream_errors_total{kind=\"refused_upgrade\"} 0",
            "wsgate_connection_duration_seconds_count 0",
            "wsgate_transferred_bytes_total{direction=\"client_to_upstream\"} 0",
            "wsgate_transferred_bytes_total{direction=\"upstream_to_client\"} 0",
            "wsgate_http_requests_total{class=\"2xx\"} 0",
            "wsgate_http_requests_total{class=\"5xx\"} 0",
            "wsgate_ready 0",
            "wsgate_connections_rejected_total{reason=\"rate\"} 0",
            "wsgate_connections_rejected_total{reason=\"per_ip\"} 0",
            "wsgate_connections_would_reject_total{reason=\"capacity\"} 0",
            "wsgate_connections_would_reject_total{reason=\"per_ip\"} 0",
            "wsgate_connections_would_reject_total{reason=\"rate\"} 0",
            "wsgate_connections_drained_total 0",
            "wsgate_connections_expired_total 0",
            "wsgate_close_frames_sent_total{reason=\"drain\"} 0",
            "wsgate_close_frames_sent_total{reason=\"lifetime\"} 0",
            "wsgate_close_frames_sent_total{reason=\"idle\"} 0",
            "wsgate_messages_total{direction=\"client_to_upstream\"} 0",
            "wsgate_messages_total{direction=\"upstream_to_client\"} 0",
            "wsgate_message_guard_total{action=\"close\",guard=\"size\"} 0",
            "wsgate_message_guard_total{action=\"close\",guard=\"rate\"} 0",
            "wsgate_message_guard_total{action=\"throttle\",guard=\"rate\"} 0",
            "wsgate_message_guard_total{action=\"throttle\",guard=\"bytes\"} 0",
            "wsgate_sessions_ended_total{closed_by=\"client\",end=\"client_close\"} 0",
            "wsgate_sessions_ended_total{closed_by=\"none\",end=\"client_eof\"} 0",
            "wsgate_sessions_ended_total{closed_by=\"wsgate\",end=\"admin_drain\"} 0",
            "wsgate_sessions_ended_total{closed_by=\"none\",end=\"shutdown\"} 0",
            "wsgate_sessions_ended_total{closed_by=\"upstream\",end=\"half_close_timeout\"} 0",
            "wsgate_close_codes_total{closed_by=\"client\",code=\"1000\"} 0",
            "wsgate_close_codes_total{closed_by=\"upstream\",code=\"4xxx\"} 0",
            "wsgate_close_codes_total{closed_by=\"none\",code=\"none\"} 0",
            "wsgate_close_codes_total{closed_by=\"wsgate\",code=\"1001\"} 0",
            "wsgate_close_codes_total{closed_by=\"wsgate\",code=\"1008\"} 0",
            "wsgate_close_codes_total{closed_by=\"wsgate\",code=\"1009\"} 0",
            "wsgate_close_codes_total{closed_by=\"wsgate\",code=\"none\"} 0",
            "wsgate_admin_drained_total 0",
            "process_open_fds",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
        for absent in [
            "closed_by=\"wsgate\",end=\"client_close\"",
            "closed_by=\"client\",code=\"none\"",
            "closed_by=\"none\",code=\"1000\"",
            "would_reject_total{reason=\"draining\"}",
        ] {
            assert!(!text.contains(absent), "{absent} exported");
        }
        assert!(text.contains(&format!(
            "wsgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
