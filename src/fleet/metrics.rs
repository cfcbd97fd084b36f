//! The fleet's series: Redis health, round trips by operation and result,
//! their duration, and the fleet-wide count and cap.
//!
//! Registered only when `fleet_redis_url` is set: an instance without a
//! fleet has no Redis to report on, and an absent `wsgate_fleet_up` keeps
//! the Redis-down alert quiet there.

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::metrics::{labels, Label, Registrar};

labels! {
    /// A Redis operation of the fleet limits (`op` label).
    pub(crate) enum FleetOp {
        /// The admission script.
        Admit => "admit",
        /// Giving holds back.
        Release => "release",
        /// The batched renewal of an instance's holds.
        Renew => "renew",
    }
}

labels! {
    /// How a fleet Redis operation went (`result` label).
    pub(crate) enum FleetResult {
        /// Answered.
        Ok => "ok",
        /// Failed: connection lost, refused, or a Redis error.
        Error => "error",
        /// No answer within its deadline.
        Timeout => "timeout",
    }
}

/// Round trips to a Redis in the same zone take 0.1-0.2 ms (see
/// `BENCHMARKS.md`); `fleet_timeout` is 100 ms by default.
const FLEET_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 5.0,
];

/// Handles to the fleet's series.
#[derive(Debug, Clone)]
pub(crate) struct FleetMetrics {
    /// `wsgate_fleet_up`.
    pub(crate) up: IntGauge,
    /// `wsgate_fleet_active`: the fleet-wide count seen last.
    pub(crate) active: IntGauge,
    /// `wsgate_fleet_max`: `fleet_max_clients` in force; 0 = off.
    pub(crate) max: IntGauge,
    /// `wsgate_fleet_requests_total{op,result}`, indexed `[op][result]`.
    requests: Vec<Vec<IntCounter>>,
    /// `wsgate_fleet_request_duration_seconds{op}`, indexed by op.
    duration: Vec<Histogram>,
}

impl FleetMetrics {
    /// Registers the fleet series, every one at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        let requests = r.counter_vec(
            "wsgate_fleet_requests_total",
            "Redis operations of the fleet limits, by operation and result",
            &["op", "result"],
        )?;
        let duration = r.histogram_vec(
            "wsgate_fleet_request_duration_seconds",
            "Round-trip time of the fleet limits' Redis operations",
            FLEET_BUCKETS,
            &["op"],
        )?;
        Ok(FleetMetrics {
            up: r.gauge(
                "wsgate_fleet_up",
                "1 while the last Redis round trip of the fleet limits succeeded",
            )?,
            active: r.gauge(
                "wsgate_fleet_active",
                "Fleet-wide connections under fleet_max_clients, as seen at the last admission or renewal",
            )?,
            max: r.gauge("wsgate_fleet_max", "fleet_max_clients in force; 0 = off")?,
            requests: FleetOp::ALL
                .iter()
                .map(|op| {
                    FleetResult::ALL
                        .iter()
                        .map(|res| requests.with_label_values(&[op.label(), res.label()]))
                        .collect()
                })
                .collect(),
            duration: FleetOp::ALL
                .iter()
                .map(|op| duration.with_label_values(&[op.label()]))
                .collect(),
        })
    }

    /// Counts one operation and its time (a timeout counts as its deadline,
    /// so the tail of the histogram shows how slow Redis was).
    /// `wsgate_fleet_up` follows it: 1 while the last round trip succeeded.
    pub(crate) fn observe(&self, op: FleetOp, result: FleetResult, took: std::time::Duration) {
        self.requests[op.index()][result.index()].inc();
        self.duration[op.index()].observe(took.as_secs_f64());
        self.up.set(i64::from(result == FleetResult::Ok));
    }
}
