//! Prometheus metrics: registration on an owned registry, and text encoding.
//!
//! Names are fixed by SPEC §4: the Grafana dashboard, the alerts and the tests
//! depend on them. Every labelled series is created at start-up (at 0) so a
//! healthy pod never shows "no data". Labels come only from closed enums,
//! never from paths or addresses, so cardinality is bounded.
//!
//! The registry is owned, not the global default, so several proxies can run
//! in one test binary without colliding.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Why wsgate refused an upgrade (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The cap is reached.
    Capacity,
    /// The process is shutting down.
    Draining,
    /// The admission rate limit.
    Rate,
    /// The per-client-address cap.
    PerIp,
}

impl RejectReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Capacity => "capacity",
            RejectReason::Draining => "draining",
            RejectReason::Rate => "rate",
            RejectReason::PerIp => "per_ip",
        }
    }
    const ALL: [RejectReason; 4] = [
        RejectReason::Capacity,
        RejectReason::Draining,
        RejectReason::Rate,
        RejectReason::PerIp,
    ];
}

/// How the upstream failed or declined (`kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Could not connect, or the connection failed before a valid answer.
    Connect,
    /// No answer within `upstream_connect_timeout`.
    Timeout,
    /// Answered something other than a valid 101.
    RefusedUpgrade,
}

impl UpstreamErrorKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::RefusedUpgrade => "refused_upgrade",
        }
    }
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::RefusedUpgrade,
    ];
}

/// Cheap clonable handles to every wsgate metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `wsgate_connections_active`: slots held right now (moved only by admission).
    pub active: IntGauge,
    /// `wsgate_connections_max`: the cap in force, 0 = unlimited.
    pub max: IntGauge,
    /// `wsgate_connections_admitted_total`.
    pub admitted: IntCounter,
    rejected: IntCounterVec,
    upstream_errors: IntCounterVec,
    /// `wsgate_connection_duration_seconds`.
    pub duration: Histogram,
    /// `wsgate_transferred_bytes_total{direction="client_to_upstream"}`.
    pub bytes_client_to_upstream: IntCounter,
    /// `wsgate_transferred_bytes_total{direction="upstream_to_client"}`.
    pub bytes_upstream_to_client: IntCounter,
    http_requests: IntCounterVec,
    /// `wsgate_ready`: 1 while `/readyz` answers 200.
    pub ready: IntGauge,
    would_reject: IntCounterVec,
    /// `wsgate_connections_drained_total`: closed by the drain.
    pub drained: IntCounter,
    /// `wsgate_connections_expired_total`: closed by `max_connection_lifetime`.
    pub expired: IntCounter,
    reloads: IntCounterVec,
    close_frames: IntCounterVec,
}

/// Buckets for connection lifetimes: WebSockets live from milliseconds to days.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

const HTTP_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// Creates every metric, registers it on `registry` and zero-initialises
    /// every labelled series. Also registers the process collector.
    ///
    /// # Errors
    /// Fails only if a name is registered twice on the same registry.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let active = IntGauge::new(
            "wsgate_connections_active",
            "WebSocket slots held right now",
        )?;
        let max = IntGauge::new(
            "wsgate_connections_max",
            "Cap on concurrent WebSocket connections in force; 0 = unlimited",
        )?;
        let admitted = IntCounter::new(
            "wsgate_connections_admitted_total",
            "WebSocket upgrades that got a slot",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "wsgate_connections_rejected_total",
                "WebSocket upgrades refused by wsgate",
            ),
            &["reason"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "wsgate_upstream_errors_total",
                "Upstream failures or declined upgrades",
            ),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "wsgate_connection_duration_seconds",
                "Lifetime of spliced WebSocket connections",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let bytes = IntCounterVec::new(
            Opts::new("wsgate_transferred_bytes_total", "Bytes spliced"),
            &["direction"],
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "wsgate_http_requests_total",
                "Plain HTTP requests proxied, by class of the status returned",
            ),
            &["class"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("wsgate_build_info", "Build information; always 1"),
            &["version"],
        )?;
        let ready = IntGauge::new("wsgate_ready", "1 while /readyz answers 200, else 0")?;
        let would_reject = IntCounterVec::new(
            Opts::new(
                "wsgate_connections_would_reject_total",
                "Dry run (enforce = false): upgrades that would have been refused",
            ),
            &["reason"],
        )?;
        let drained = IntCounter::new(
            "wsgate_connections_drained_total",
            "Connections closed by the gradual drain",
        )?;
        let expired = IntCounter::new(
            "wsgate_connections_expired_total",
            "Connections closed by max_connection_lifetime",
        )?;
        let close_frames = IntCounterVec::new(
            Opts::new(
                "wsgate_close_frames_sent_total",
                "Connections wsgate ended with Close frames (counted once per connection)",
            ),
            &["reason"],
        )?;
        for r in ["drain", "lifetime", "idle"] {
            close_frames.with_label_values(&[r]);
        }
        let reloads = IntCounterVec::new(
            Opts::new(
                "wsgate_config_reloads_total",
                "Configuration reloads (SIGHUP or a settled change of the --config file)",
            ),
            &["result"],
        )?;

        for r in RejectReason::ALL {
            rejected.with_label_values(&[r.as_str()]);
            if r != RejectReason::Draining {
                would_reject.with_label_values(&[r.as_str()]);
            }
        }
        for r in ["success", "failure"] {
            reloads.with_label_values(&[r]);
        }
        for k in UpstreamErrorKind::ALL {
            upstream_errors.with_label_values(&[k.as_str()]);
        }
        for c in HTTP_CLASSES {
            http_requests.with_label_values(&[c]);
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(active.clone()),
            Box::new(max.clone()),
            Box::new(admitted.clone()),
            Box::new(rejected.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(duration.clone()),
            Box::new(bytes.clone()),
            Box::new(http_requests.clone()),
            Box::new(build_info),
            Box::new(ready.clone()),
            Box::new(would_reject.clone()),
            Box::new(drained.clone()),
            Box::new(expired.clone()),
            Box::new(reloads.clone()),
            Box::new(close_frames.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Metrics {
            active,
            max,
            admitted,
            rejected,
            upstream_errors,
            duration,
            bytes_client_to_upstream: bytes.with_label_values(&["client_to_upstream"]),
            bytes_upstream_to_client: bytes.with_label_values(&["upstream_to_client"]),
            http_requests,
            ready,
            would_reject,
            drained,
            expired,
            reloads,
            close_frames,
        })
    }

    /// Counts an upgrade refused by wsgate.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts, in dry run, an upgrade that would have been refused.
    pub fn would_reject(&self, reason: RejectReason) {
        self.would_reject
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a connection wsgate ended with Close frames; `reason` is
    /// `drain`, `lifetime` or `idle`.
    pub fn close_frames_sent(&self, reason: &str) {
        self.close_frames.with_label_values(&[reason]).inc();
    }

    /// Counts a configuration reload.
    pub fn reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// Counts a plain HTTP request by the class of the status sent to the client.
    pub fn http_request(&self, status: http::StatusCode) {
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests.with_label_values(&[class]).inc();
    }
}

/// Encodes everything in `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec cannot fail on IO; a collector error would only drop
    // that family, which is better than failing the whole scrape.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_exists_at_zero() {
        let r = Registry::new();
        let _m = Metrics::register(&r).expect("register");
        let text = String::from_utf8(encode(&r)).expect("utf8");
        for series in [
            "wsgate_connections_active 0",
            "wsgate_connections_max 0",
            "wsgate_connections_admitted_total 0",
            "wsgate_connections_rejected_total{reason=\"capacity\"} 0",
            "wsgate_connections_rejected_total{reason=\"draining\"} 0",
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
            "wsgate_config_reloads_total{result=\"success\"} 0",
            "wsgate_config_reloads_total{result=\"failure\"} 0",
            "wsgate_close_frames_sent_total{reason=\"drain\"} 0",
            "wsgate_close_frames_sent_total{reason=\"lifetime\"} 0",
            "wsgate_close_frames_sent_total{reason=\"idle\"} 0",
            "process_open_fds",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
        assert!(text.contains(&format!(
            "wsgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn two_registries_do_not_collide() {
        let (a, b) = (Registry::new(), Registry::new());
        Metrics::register(&a).expect("first");
        Metrics::register(&b).expect("second");
    }
}
