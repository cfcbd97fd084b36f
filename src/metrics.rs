//! Prometheus metrics: registration on an owned registry, and text encoding.
//!
//! Names are fixed by SPEC §4: the Grafana dashboard, the alerts and the tests
//! depend on them. Every labelled series is created at start-up (at 0) so a
//! healthy pod never shows "no data". Labels come only from closed enums,
//! never from paths or addresses, so cardinality is bounded.
//!
//! The registry is owned, not the global default, so several proxies can run
//! in one test binary without colliding.

use std::marker::PhantomData;
use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::admission::RejectReason;
use crate::error::UpstreamErrorKind;
use crate::session::{CloseStatus, ClosedBy, End, SessionEnd, ALL_CODE_LABELS};
use crate::splice::{Guard, GuardAction, StopReason};

/// A closed set of label values: the only way a label reaches a series, so
/// a misspelt label cannot compile.
pub(crate) trait Label: Copy + 'static {
    /// Every value, each at the position [`Label::index`] gives it.
    const ALL: &'static [Self];
    /// The label value on the wire.
    fn label(self) -> &'static str;
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
}

impl Label for RejectReason {
    const ALL: &'static [Self] = &RejectReason::ALL;
    fn label(self) -> &'static str {
        RejectReason::label(self)
    }
    fn index(self) -> usize {
        self as usize
    }
}

impl Label for UpstreamErrorKind {
    const ALL: &'static [Self] = &UpstreamErrorKind::ALL;
    fn label(self) -> &'static str {
        UpstreamErrorKind::label(self)
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Several stop reasons share one `wsgate_close_frames_sent_total` series
/// (the end of the grace counts as the drain): their handles are the same
/// counter.
impl Label for StopReason {
    const ALL: &'static [Self] = &StopReason::ALL;
    fn label(self) -> &'static str {
        StopReason::label(self)
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// The class of an HTTP status (`wsgate_http_requests_total{class}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpClass {
    /// 1xx.
    Informational,
    /// 2xx.
    Success,
    /// 3xx.
    Redirection,
    /// 4xx.
    ClientError,
    /// 5xx (and anything out of range).
    ServerError,
}

impl HttpClass {
    fn of(status: http::StatusCode) -> Self {
        match status.as_u16() {
            100..=199 => HttpClass::Informational,
            200..=299 => HttpClass::Success,
            300..=399 => HttpClass::Redirection,
            400..=499 => HttpClass::ClientError,
            _ => HttpClass::ServerError,
        }
    }
}

impl Label for HttpClass {
    const ALL: &'static [Self] = &[
        HttpClass::Informational,
        HttpClass::Success,
        HttpClass::Redirection,
        HttpClass::ClientError,
        HttpClass::ServerError,
    ];
    fn label(self) -> &'static str {
        match self {
            HttpClass::Informational => "1xx",
            HttpClass::Success => "2xx",
            HttpClass::Redirection => "3xx",
            HttpClass::ClientError => "4xx",
            HttpClass::ServerError => "5xx",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// How a configuration reload went (`wsgate_config_reloads_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadResult {
    /// Applied.
    Success,
    /// Refused; the running configuration stays.
    Failure,
}

impl Label for ReloadResult {
    const ALL: &'static [Self] = &[ReloadResult::Success, ReloadResult::Failure];
    fn label(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// One counter handle per label value, looked up once at start-up:
/// counting is then an index and an atomic add, with no label hashing on
/// the hot path.
#[derive(Debug, Clone)]
pub(crate) struct Family<L> {
    /// `None` for a value whose series is deliberately not exported.
    handles: Box<[Option<IntCounter>]>,
    label: PhantomData<L>,
}

impl<L: Label> Family<L> {
    /// Handles for every value of `L`, each series created at 0.
    fn new(vec: &IntCounterVec) -> Self {
        Self::only(vec, |_| true)
    }

    /// Handles for the values `keep` accepts; the others are not exported.
    fn only(vec: &IntCounterVec, keep: impl Fn(L) -> bool) -> Self {
        Family {
            handles: L::ALL
                .iter()
                .map(|l| keep(*l).then(|| vec.with_label_values(&[l.label()])))
                .collect(),
            label: PhantomData,
        }
    }

    /// Counts one event labelled `l`.
    pub(crate) fn inc(&self, l: L) {
        match self.handles.get(l.index()) {
            Some(Some(counter)) => counter.inc(),
            _ => debug_assert!(false, "no series for {}", l.label()),
        }
    }
}

/// Cheap clonable handles to every wsgate metric.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// `wsgate_connections_active`: slots held right now (moved only by admission).
    pub(crate) active: IntGauge,
    /// `wsgate_connections_max`: the cap in force, 0 = unlimited.
    pub(crate) max: IntGauge,
    /// `wsgate_connections_admitted_total`.
    pub(crate) admitted: IntCounter,
    /// `wsgate_connections_rejected_total{reason}`.
    pub(crate) rejected: Family<RejectReason>,
    /// `wsgate_upstream_errors_total{kind}`.
    pub(crate) upstream_errors: Family<UpstreamErrorKind>,
    /// `wsgate_connection_duration_seconds`.
    pub(crate) duration: Histogram,
    /// `wsgate_transferred_bytes_total{direction="client_to_upstream"}`.
    pub(crate) bytes_client_to_upstream: IntCounter,
    /// `wsgate_transferred_bytes_total{direction="upstream_to_client"}`.
    pub(crate) bytes_upstream_to_client: IntCounter,
    /// `wsgate_http_requests_total{class}`.
    http_requests: Family<HttpClass>,
    /// `wsgate_ready`: 1 while `/readyz` answers 200.
    pub(crate) ready: IntGauge,
    /// `wsgate_connections_would_reject_total{reason}` (dry run; never `draining`).
    pub(crate) would_reject: Family<RejectReason>,
    /// `wsgate_connections_drained_total`: closed by the drain.
    pub(crate) drained: IntCounter,
    /// `wsgate_connections_expired_total`: closed by `max_connection_lifetime`.
    pub(crate) expired: IntCounter,
    /// `wsgate_config_reloads_total{result}`.
    pub(crate) reloads: Family<ReloadResult>,
    /// `wsgate_close_frames_sent_total{reason}`.
    pub(crate) close_frames: Family<StopReason>,
    /// The per-rule series of limits per key (SPEC §9).
    pub(crate) keys: KeyMetrics,
    /// `wsgate_messages_total{direction="client_to_upstream"}`.
    pub(crate) messages_client_to_upstream: IntCounter,
    /// `wsgate_messages_total{direction="upstream_to_client"}`.
    pub(crate) messages_upstream_to_client: IntCounter,
    /// `wsgate_message_guard_total{guard,action}` (SPEC §11).
    pub(crate) guards: GuardMetrics,
    /// `wsgate_sessions_ended_total` and `wsgate_close_codes_total` (SPEC §12).
    pub(crate) sessions: SessionMetrics,
    /// `wsgate_admin_drained_total`: closed by an operator's `POST /drain`.
    pub(crate) admin_drained: IntCounter,
}

/// `wsgate_sessions_ended_total{closed_by,end}` and
/// `wsgate_close_codes_total{closed_by,code}`: a handle per label pair,
/// made on first use (no label hashing per session after that); the pairs
/// that can happen are made at start-up so they are exported at 0.
#[derive(Debug, Clone)]
pub(crate) struct SessionMetrics {
    ended_vec: IntCounterVec,
    ended: std::sync::Arc<[OnceLock<IntCounter>]>,
    codes_vec: IntCounterVec,
    codes: std::sync::Arc<[OnceLock<IntCounter>]>,
}

impl SessionMetrics {
    fn of(ended_vec: IntCounterVec, codes_vec: IntCounterVec) -> Self {
        let slots = |n| (0..n).map(|_| OnceLock::new()).collect();
        let m = SessionMetrics {
            ended: slots(End::ALL.len() * ClosedBy::ALL.len()),
            codes: slots(ALL_CODE_LABELS.len() * ClosedBy::ALL.len()),
            ended_vec,
            codes_vec,
        };
        for end in End::ALL {
            for by in ClosedBy::ALL {
                if end.happens_with(by) {
                    m.ended_handle(by, end);
                }
            }
        }
        for (i, code) in ALL_CODE_LABELS.iter().enumerate() {
            let peers = *code != "none";
            if peers {
                m.code_handle(ClosedBy::Client, i);
                m.code_handle(ClosedBy::Upstream, i);
            }
            if matches!(*code, "1001" | "1008" | "1009" | "none") {
                m.code_handle(ClosedBy::Wsgate, i);
            }
            if !peers {
                m.code_handle(ClosedBy::Nobody, i);
            }
        }
        m
    }

    /// Makes the series of the codes wsgate is configured to send.
    pub(crate) fn expect_codes(&self, close: &crate::config::CloseSettings) {
        for code in [close.drain, close.lifetime, close.idle] {
            self.code(ClosedBy::Wsgate, CloseStatus::Code(code));
        }
    }

    /// Counts one ended session.
    pub(crate) fn count(&self, session: &SessionEnd) {
        self.ended_handle(session.closed_by, session.end).inc();
        self.code(session.closed_by, session.status).inc();
    }

    fn ended_handle(&self, by: ClosedBy, end: End) -> &IntCounter {
        let i = end as usize * ClosedBy::ALL.len() + by as usize;
        self.ended[i].get_or_init(|| self.ended_vec.with_label_values(&[by.label(), end.label()]))
    }

    fn code(&self, by: ClosedBy, status: CloseStatus) -> &IntCounter {
        let label = status.label();
        let i = ALL_CODE_LABELS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(ALL_CODE_LABELS.len() - 1);
        self.code_handle(by, i)
    }

    fn code_handle(&self, by: ClosedBy, code: usize) -> &IntCounter {
        let i = code * ClosedBy::ALL.len() + by as usize;
        self.codes[i].get_or_init(|| {
            self.codes_vec
                .with_label_values(&[by.label(), ALL_CODE_LABELS[code]])
        })
    }
}

/// `wsgate_message_guard_total{guard,action}`: one handle per pair that can
/// happen (the size guard only closes, the byte guard only throttles).
#[derive(Debug, Clone)]
pub(crate) struct GuardMetrics {
    size_close: IntCounter,
    rate_close: IntCounter,
    rate_throttle: IntCounter,
    bytes_throttle: IntCounter,
}

impl GuardMetrics {
    /// Counts one action of `guard` (a throttle once per episode).
    pub(crate) fn count(&self, guard: Guard, action: GuardAction) {
        let counter = match (guard, action) {
            (Guard::Size, _) => &self.size_close,
            (Guard::Rate, GuardAction::Close) => &self.rate_close,
            (Guard::Rate, GuardAction::Throttle) => &self.rate_throttle,
            (Guard::Bytes, _) => &self.bytes_throttle,
        };
        counter.inc();
    }

    /// Handles that count into no registry (tests of the splice).
    #[cfg(test)]
    pub(crate) fn unregistered() -> Self {
        let vec =
            IntCounterVec::new(Opts::new("g", "g"), &["guard", "action"]).expect("a valid metric");
        Self::of(&vec)
    }

    fn of(vec: &IntCounterVec) -> Self {
        GuardMetrics {
            size_close: vec.with_label_values(&["size", "close"]),
            rate_close: vec.with_label_values(&["rate", "close"]),
            rate_throttle: vec.with_label_values(&["rate", "throttle"]),
            bytes_throttle: vec.with_label_values(&["bytes", "throttle"]),
        }
    }
}

/// The per-rule series of SPEC §9, labelled by rule name (never by a key
/// value): they exist for the rules in force, created when a rule appears
/// and removed when a reload drops it.
#[derive(Debug, Clone)]
pub(crate) struct KeyMetrics {
    /// `wsgate_key_rejected_total{rule}`.
    rejected: IntCounterVec,
    /// `wsgate_keys_tracked{rule}`.
    tracked: IntGaugeVec,
    /// `wsgate_key_busiest_ratio{rule}`.
    busiest: GaugeVec,
}

impl KeyMetrics {
    /// `wsgate_key_rejected_total{rule}`.
    pub(crate) fn rejected(&self, rule: &str) -> IntCounter {
        self.rejected.with_label_values(&[rule])
    }

    /// `wsgate_keys_tracked{rule}`.
    pub(crate) fn tracked(&self, rule: &str) -> IntGauge {
        self.tracked.with_label_values(&[rule])
    }

    /// `wsgate_key_busiest_ratio{rule}`.
    pub(crate) fn busiest(&self, rule: &str) -> Gauge {
        self.busiest.with_label_values(&[rule])
    }

    /// Drops a removed rule's series. Handles still held (by connections
    /// admitted under the rule) keep working but are no longer exported.
    pub(crate) fn remove(&self, rule: &str) {
        let _ = self.rejected.remove_label_values(&[rule]);
        let _ = self.tracked.remove_label_values(&[rule]);
        let _ = self.busiest.remove_label_values(&[rule]);
    }
}

/// A Redis operation of the fleet limits (`op` label, SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FleetOp {
    /// The admission script.
    Admit,
    /// Giving holds back.
    Release,
    /// The batched renewal of an instance's holds.
    Renew,
}

/// How a fleet Redis operation went (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FleetResult {
    /// Answered.
    Ok,
    /// Failed: connection lost, refused, or a Redis error.
    Error,
    /// No answer within its deadline.
    Timeout,
}

impl FleetOp {
    const ALL: [FleetOp; 3] = [FleetOp::Admit, FleetOp::Release, FleetOp::Renew];
    fn label(self) -> &'static str {
        match self {
            FleetOp::Admit => "admit",
            FleetOp::Release => "release",
            FleetOp::Renew => "renew",
        }
    }
}

impl FleetResult {
    const ALL: [FleetResult; 3] = [FleetResult::Ok, FleetResult::Error, FleetResult::Timeout];
    fn label(self) -> &'static str {
        match self {
            FleetResult::Ok => "ok",
            FleetResult::Error => "error",
            FleetResult::Timeout => "timeout",
        }
    }
}

/// The series of SPEC §10. Registered only when `fleet_redis_url` is set:
/// an instance without a fleet has no Redis to report on, and an absent
/// `wsgate_fleet_up` keeps `WsgateFleetRedisDown` quiet there.
#[derive(Debug, Clone)]
pub(crate) struct FleetMetrics {
    /// `wsgate_fleet_up`.
    pub(crate) up: IntGauge,
    /// `wsgate_fleet_active`: the fleet-wide count seen last.
    pub(crate) active: IntGauge,
    /// `wsgate_fleet_max`: `fleet_max_clients` in force; 0 = off.
    pub(crate) max: IntGauge,
    /// `wsgate_fleet_requests_total{op,result}`, indexed `[op][result]`.
    requests: [[IntCounter; 3]; 3],
    /// `wsgate_fleet_request_duration_seconds{op}`, indexed by op.
    duration: [Histogram; 3],
}

/// Round trips to a Redis in the same zone take 0.1-0.2 ms (`fleet-latency.py`
/// measured 90-95 % of admissions under 0.2 ms on loopback); `fleet_timeout`
/// is 100 ms by default.
const FLEET_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 5.0,
];

impl FleetMetrics {
    /// Creates the fleet series on `registry`, every one at 0.
    ///
    /// # Errors
    /// Fails only if they are registered twice on the same registry.
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let up = IntGauge::new(
            "wsgate_fleet_up",
            "1 while the last Redis round trip of the fleet limits succeeded",
        )?;
        let active = IntGauge::new(
            "wsgate_fleet_active",
            "Fleet-wide connections under fleet_max_clients, as seen at the last admission or renewal",
        )?;
        let max = IntGauge::new("wsgate_fleet_max", "fleet_max_clients in force; 0 = off")?;
        let requests = IntCounterVec::new(
            Opts::new(
                "wsgate_fleet_requests_total",
                "Redis operations of the fleet limits, by operation and result",
            ),
            &["op", "result"],
        )?;
        let duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "wsgate_fleet_request_duration_seconds",
                "Round-trip time of the fleet limits' Redis operations",
            )
            .buckets(FLEET_BUCKETS.to_vec()),
            &["op"],
        )?;
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(up.clone()),
            Box::new(active.clone()),
            Box::new(max.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(FleetMetrics {
            up,
            active,
            max,
            requests: FleetOp::ALL.map(|op| {
                FleetResult::ALL.map(|r| requests.with_label_values(&[op.label(), r.label()]))
            }),
            duration: FleetOp::ALL.map(|op| duration.with_label_values(&[op.label()])),
        })
    }

    /// Counts one operation and its time (a timeout counts as its deadline,
    /// so the tail of the histogram shows how slow Redis was).
    /// `wsgate_fleet_up` follows it: 1 while the last round trip succeeded.
    pub(crate) fn observe(&self, op: FleetOp, result: FleetResult, took: std::time::Duration) {
        self.requests[op as usize][result as usize].inc();
        self.duration[op as usize].observe(took.as_secs_f64());
        self.up.set(i64::from(result == FleetResult::Ok));
    }
}

/// Buckets for connection lifetimes: WebSockets live from milliseconds to days.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

impl Metrics {
    /// Creates every metric, registers it on `registry` and zero-initialises
    /// every labelled series. Also registers the process collector.
    ///
    /// # Errors
    /// Fails only if a name is registered twice on the same registry.
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
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
        let key_rejected = IntCounterVec::new(
            Opts::new(
                "wsgate_key_rejected_total",
                "WebSocket upgrades refused by a key rule, by rule",
            ),
            &["rule"],
        )?;
        let keys_tracked = IntGaugeVec::new(
            Opts::new(
                "wsgate_keys_tracked",
                "Distinct key values with connections now, by rule",
            ),
            &["rule"],
        )?;
        let key_busiest = GaugeVec::new(
            Opts::new(
                "wsgate_key_busiest_ratio",
                "Highest active / limit among a rule's key values (1 = some key is full)",
            ),
            &["rule"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "wsgate_config_reloads_total",
                "Configuration reloads (SIGHUP or a settled change of the --config file)",
            ),
            &["result"],
        )?;

        let messages = IntCounterVec::new(
            Opts::new(
                "wsgate_messages_total",
                "WebSocket messages spliced: each data message once, and each control frame",
            ),
            &["direction"],
        )?;
        let guard_actions = IntCounterVec::new(
            Opts::new(
                "wsgate_message_guard_total",
                "Message guard actions: connections closed, throttle episodes begun",
            ),
            &["guard", "action"],
        )?;

        let sessions_ended = IntCounterVec::new(
            Opts::new(
                "wsgate_sessions_ended_total",
                "WebSocket sessions ended, by who sent the first Close frame and why they ended",
            ),
            &["closed_by", "end"],
        )?;
        let close_codes = IntCounterVec::new(
            Opts::new(
                "wsgate_close_codes_total",
                "Status codes of the sessions' first Close frames (none = no Close frame)",
            ),
            &["closed_by", "code"],
        )?;
        let admin_drained = IntCounter::new(
            "wsgate_admin_drained_total",
            "Connections closed by an operator's POST /drain",
        )?;

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
            Box::new(key_rejected.clone()),
            Box::new(keys_tracked.clone()),
            Box::new(key_busiest.clone()),
            Box::new(messages.clone()),
            Box::new(guard_actions.clone()),
            Box::new(sessions_ended.clone()),
            Box::new(close_codes.clone()),
            Box::new(admin_drained.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Metrics {
            active,
            max,
            admitted,
            rejected: Family::new(&rejected),
            upstream_errors: Family::new(&upstream_errors),
            duration,
            bytes_client_to_upstream: bytes.with_label_values(&["client_to_upstream"]),
            bytes_upstream_to_client: bytes.with_label_values(&["upstream_to_client"]),
            http_requests: Family::new(&http_requests),
            ready,
            // Dry run never sees `draining`: a draining refusal is not a policy.
            would_reject: Family::only(&would_reject, |r| r != RejectReason::Draining),
            drained,
            expired,
            reloads: Family::new(&reloads),
            keys: KeyMetrics {
                rejected: key_rejected,
                tracked: keys_tracked,
                busiest: key_busiest,
            },
            close_frames: Family::new(&close_frames),
            messages_client_to_upstream: messages.with_label_values(&["client_to_upstream"]),
            messages_upstream_to_client: messages.with_label_values(&["upstream_to_client"]),
            guards: GuardMetrics::of(&guard_actions),
            sessions: SessionMetrics::of(sessions_ended, close_codes),
            admin_drained,
        })
    }

    /// Counts a plain HTTP request by the class of the status sent to the client.
    pub(crate) fn http_request(&self, status: http::StatusCode) {
        self.http_requests.inc(HttpClass::of(status));
    }
}

/// Encodes everything in `registry` in the Prometheus text format.
pub(crate) fn encode(registry: &Registry) -> Vec<u8> {
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
            "wsgate_close_codes_total{closed_by=\"wsgate\",code=\"1009\"} 0",
            "wsgate_admin_drained_total 0",
            "process_open_fds",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
        // Pairs that cannot happen are not exported.
        for absent in [
            "closed_by=\"wsgate\",end=\"client_close\"",
            "closed_by=\"client\",code=\"none\"",
            "closed_by=\"none\",code=\"1000\"",
        ] {
            assert!(!text.contains(absent), "{absent} exported");
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
