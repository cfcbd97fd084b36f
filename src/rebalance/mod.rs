//! Automatic rebalancing (docs/operations.md#automatic-rebalancing): after a
//! scale-out or a rolling update, the instances of a fleet even out their
//! long-lived sessions by themselves.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the controller task: a heartbeat each renewal interval, the decision, the shed's life |
//! | `plan.rs` | when to shed and how many: the hysteresis, the cooldown, the "no shedding" rules |
//!
//! While `rebalance` is on, each interval (`fleet_lease_ttl / 3`) the
//! controller publishes the instance's active count and state and reads
//! everyone's (`fleet/heartbeat.rs`).
//! A shed first turns `/readyz` to 503 `rebalancing`, so fronts that
//! health-check send the reconnects to the others, waits `shutdown_delay`
//! (the same notice the shutdown gives fronts), then closes the planned
//! count oldest first, evenly over `rebalance_period`, with
//! `close_code_rebalance`. It stops early when Redis stops answering, an
//! operator's drain or the shutdown starts, rebalancing is turned off, or
//! the instance is down to the mean; then it is ready again and the
//! cooldown runs.

mod plan;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use self::plan::{Decision, Planner};
use crate::drain::{close_oldest_paced, AdminDrain, DrainKind, Tunnels};
use crate::fleet::{BeatState, Fleet, FleetView};
use crate::metrics::Registrar;
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;

/// Whether a shed runs now (`/readyz` answers 503 `rebalancing` meanwhile).
#[derive(Debug, Clone, Default)]
pub(crate) struct Shedding(Arc<AtomicBool>);

impl Shedding {
    /// Whether a shed runs.
    pub(crate) fn is_on(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }
}

/// Rebalancing's series (registered with the fleet's).
#[derive(Debug, Clone)]
pub(crate) struct RebalanceMetrics {
    /// `wsgate_rebalance_shed_total`.
    shed: IntCounter,
    /// `wsgate_fleet_instances`.
    instances: IntGauge,
    /// `wsgate_fleet_mean`.
    mean: Gauge,
}

impl RebalanceMetrics {
    /// Registers the three series at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        Ok(RebalanceMetrics {
            shed: r.counter(
                "wsgate_rebalance_shed_total",
                "Sessions closed to rebalance the fleet",
            )?,
            instances: r.gauge(
                "wsgate_fleet_instances",
                "Live instances of the fleet namespace seen at the last heartbeat",
            )?,
            mean: r.float_gauge(
                "wsgate_fleet_mean",
                "The fleet mean of active connections at the last heartbeat",
            )?,
        })
    }
}

/// What the controller reads and drives.
#[derive(Debug)]
pub(crate) struct Controller {
    pub(crate) fleet: Fleet,
    pub(crate) proxy: Proxy,
    pub(crate) shutdown: Shutdown,
    pub(crate) admin_drain: AdminDrain,
    pub(crate) shedding: Shedding,
    pub(crate) metrics: RebalanceMetrics,
}

/// A shed in progress.
#[derive(Debug)]
struct Shed {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Controller {
    /// Beats until the shutdown signal, then says the instance is leaving
    /// (the others stop counting it at once) and returns.
    pub(crate) async fn run(self) {
        let interval = self.fleet.beat_interval();
        let leaving = self.shutdown.signalled_token();
        let mut planner = Planner::default();
        let mut shed: Option<Shed> = None;
        // Whether this instance's beat is in Redis: only while rebalancing
        // is on (it is reloadable), so a fleet without it writes nothing.
        let mut beating = false;
        loop {
            let config = self.proxy.config();
            let settings = &config.rebalance;
            if !settings.enabled {
                if let Some(running) = shed.take() {
                    running.stop.cancel();
                    let _ = running.task.await;
                }
                if beating && self.fleet.heartbeat(None).await.is_some() {
                    beating = false;
                }
                tokio::select! {
                    () = leaving.cancelled() => return,
                    () = sleep(interval) => continue,
                }
            }
            beating = true;
            let state = if self.shedding.is_on() {
                BeatState::Shedding
            } else {
                BeatState::Serving
            };
            let active = self.proxy.admission().active() as u64;
            let view = self.fleet.heartbeat(Some((active, state))).await;
            if let Some(v) = &view {
                self.metrics.instances.set(v.beats.len() as i64);
                self.metrics.mean.set(v.mean());
            }
            let draining = self.admin_drain.status().running || self.shutdown.is_signalled();
            match &shed {
                Some(running) => {
                    if let Some(why) = stop_reason(view.as_ref(), draining, settings.enabled) {
                        tracing::info!("rebalance: shed stopped early: {why}");
                        running.stop.cancel();
                    }
                }
                None => {
                    let now = Instant::now();
                    match planner.decide(now, view.as_ref(), draining, settings) {
                        Decision::Shed(count) => {
                            let mean = view.as_ref().map_or(0.0, FleetView::mean);
                            tracing::info!(
                                active,
                                mean = format_args!("{mean:.1}"),
                                count,
                                period = ?settings.period,
                                "rebalance: above the fleet mean for {:?}: shedding {count} \
                                 sessions, oldest first",
                                settings.after
                            );
                            shed = Some(self.start_shed(
                                count,
                                settings.period,
                                config.shutdown_delay,
                            ));
                        }
                        Decision::Stay(why) => tracing::trace!(?why, "rebalance: no shed"),
                    }
                }
            }
            let next = sleep(interval);
            tokio::select! {
                () = leaving.cancelled() => break,
                () = next => {}
                () = ended(&mut shed) => {
                    shed = None;
                    planner.shed_ended(Instant::now(), &self.proxy.config().rebalance);
                }
            }
        }
        if let Some(running) = shed.take() {
            running.stop.cancel();
            let _ = running.task.await;
        }
        if beating {
            self.fleet.heartbeat(None).await;
        }
    }

    /// Starts a shed of `count` sessions over `period`, after `notice`.
    fn start_shed(&self, count: usize, period: Duration, notice: Duration) -> Shed {
        let stop = CancellationToken::new();
        let tunnels: Tunnels = self.proxy.tunnels().clone();
        let shedding = self.shedding.clone();
        let metric = self.metrics.shed.clone();
        let token = stop.clone();
        shedding.set(true);
        let task = tokio::spawn(async move {
            let closed = AtomicUsize::new(0);
            let work = async {
                sleep(notice).await;
                close_oldest_paced(&tunnels, count, period, DrainKind::Rebalance, || {
                    metric.inc();
                    closed.fetch_add(1, Ordering::Relaxed);
                })
                .await;
            };
            tokio::select! {
                () = work => {}
                () = token.cancelled() => {}
            }
            shedding.set(false);
            tracing::info!(
                closed = closed.load(Ordering::Relaxed),
                planned = count,
                "rebalance: shed over; ready again"
            );
        });
        Shed { stop, task }
    }
}

/// Resolves when the running shed's task ends; never without one.
async fn ended(shed: &mut Option<Shed>) {
    match shed {
        Some(s) => {
            let _ = (&mut s.task).await;
        }
        None => std::future::pending().await,
    }
}

/// Why a running shed must stop now, if it must.
fn stop_reason(view: Option<&FleetView>, draining: bool, enabled: bool) -> Option<&'static str> {
    if !enabled {
        return Some("rebalance was turned off");
    }
    let Some(view) = view else {
        return Some("Redis is unreachable");
    };
    if draining {
        return Some("a drain started");
    }
    let me = view.mine()?;
    (me.active as f64 <= view.mean()).then_some("down to the fleet mean")
}
