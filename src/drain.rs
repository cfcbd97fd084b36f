//! The gradual drain: a registry of live tunnels in age order, the loop
//! that closes them oldest first at an even pace over `drain_period`, and
//! the operator's drain (`POST /drain`, docs/operations.md#operator-drain) that runs the same loop
//! for part of them while the instance stays ready. Automatic rebalancing
//! (`rebalance/`) sheds through the same loop.
//!
//! Why: holding every connection to the end of the grace and then dropping
//! them all at once sends every client to the other pods in the same second
//! (a reconnect storm). Closing them evenly over the drain period spreads the
//! reconnects. The pace is re-planned after every close as "what is left ÷
//! time left", so connections that end by themselves slow the drain down
//! instead of leaving a burst at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use crate::metrics::Registrar;
use crate::splice::StopReason;

/// The drains' series.
#[derive(Debug, Clone)]
pub(crate) struct DrainMetrics {
    /// `wsgate_connections_drained_total`: closed by the shutdown's drain.
    pub(crate) drained: IntCounter,
    /// `wsgate_admin_drained_total`: closed by an operator's `POST /drain`.
    pub(crate) admin_drained: IntCounter,
}

impl DrainMetrics {
    /// Registers the drains' counters at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        Ok(DrainMetrics {
            drained: r.counter(
                "wsgate_connections_drained_total",
                "Connections closed by the gradual drain",
            )?,
            admin_drained: r.counter(
                "wsgate_admin_drained_total",
                "Connections closed by an operator's POST /drain",
            )?,
        })
    }
}

/// Live tunnels, oldest first (ids grow with time).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tunnels {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Entry>>>,
}

/// How a drain reaches one tunnel.
#[derive(Debug, Default)]
struct Entry {
    notify: Notify,
    /// Set before `notify`: which drain picked it ([`DrainKind`] as a byte).
    kind: AtomicU8,
}

/// Which drain closes a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum DrainKind {
    /// The shutdown timeline's drain (`drain_period`).
    Shutdown = 0,
    /// An operator's `POST /drain`.
    Operator = 1,
    /// Automatic rebalancing shed it.
    Rebalance = 2,
}

/// A tunnel's entry in the registry; dropping it removes the entry.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    entry: Arc<Entry>,
    tunnels: Arc<Inner>,
}

impl Registration {
    /// Resolves once a drain picked this tunnel to close, with the reason
    /// the tunnel then closes for.
    pub(crate) async fn drained(&self) -> StopReason {
        self.entry.notify.notified().await;
        match self.entry.kind.load(Ordering::Acquire) {
            k if k == DrainKind::Operator as u8 => StopReason::AdminDrain,
            k if k == DrainKind::Rebalance as u8 => StopReason::Rebalance,
            _ => StopReason::Drain,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tunnels
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Tunnels {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Registers a new (youngest) tunnel.
    pub(crate) fn register(&self) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry::default());
        self.lock().insert(id, Arc::clone(&entry));
        Registration {
            id,
            entry,
            tunnels: Arc::clone(&self.inner),
        }
    }

    /// Live tunnels.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Tells the oldest live tunnel to close; false if there is none.
    pub(crate) fn close_oldest(&self, kind: DrainKind) -> bool {
        let oldest = self.lock().pop_first();
        match oldest {
            Some((_, entry)) => {
                entry.kind.store(kind as u8, Ordering::Release);
                // `notify_one` stores a permit if the tunnel is not waiting
                // at this instant, so the request cannot be lost.
                entry.notify.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Entry>>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The finest pace the drain sleeps at. tokio's timer has a 1 ms
/// resolution; sleeping once per connection would cap the drain at about a
/// thousand closes a second and push the rest into one burst at the end.
/// Below this pace the drain closes a batch per tick instead.
const MIN_TICK: Duration = Duration::from_millis(10);

/// Closes every live tunnel, oldest first, evenly over `period`; counts each
/// in `drained`. Returns when none is left (at the latest just after
/// `period`, when whatever remains is closed at once).
pub(crate) async fn drain_evenly(tunnels: &Tunnels, period: Duration, drained: &IntCounter) {
    let plan = Plan {
        count: None,
        kind: DrainKind::Shutdown,
    };
    drain_paced(tunnels, period, plan, || drained.inc()).await;
}

/// Closes the `count` oldest tunnels (fewer if fewer are live) for
/// `kind`, evenly over `period`; calls `closed_one` for each. Returns how
/// many it closed. Dropping the future stops it between two closes.
pub(crate) async fn close_oldest_paced(
    tunnels: &Tunnels,
    count: usize,
    period: Duration,
    kind: DrainKind,
    closed_one: impl FnMut(),
) -> usize {
    let plan = Plan {
        count: Some(count),
        kind,
    };
    drain_paced(tunnels, period, plan, closed_one).await
}

/// How many tunnels a paced drain closes, and for which drain.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// `None` = every tunnel, including those that come later.
    count: Option<usize>,
    kind: DrainKind,
}

/// Closes `plan`'s tunnels, oldest first, evenly over `period`: each tick
/// the pace is re-planned as what is left to close ÷ time left, so
/// tunnels that end by themselves slow the drain rather than leave a burst
/// at the end. `closed_one` is called for each close; returns how many.
async fn drain_paced(
    tunnels: &Tunnels,
    period: Duration,
    plan: Plan,
    mut closed_one: impl FnMut(),
) -> usize {
    let end = Instant::now() + period;
    let mut closed = 0;
    let left_to_close = |closed: usize| {
        let live = tunnels.len();
        plan.count
            .map_or(live, |n| n.saturating_sub(closed).min(live))
    };
    let mut close_one = |closed: &mut usize| {
        if tunnels.close_oldest(plan.kind) {
            closed_one();
            *closed += 1;
        }
    };
    loop {
        let remaining = left_to_close(closed);
        if remaining == 0 {
            return closed;
        }
        let planned_at = Instant::now();
        if planned_at >= end {
            break;
        }
        let left = end - planned_at;
        let pace = left / u32::try_from(remaining).unwrap_or(u32::MAX);
        sleep(pace.max(MIN_TICK)).await;
        // What is due after the time that actually passed (timers run
        // late), re-planned from what is left every tick.
        let elapsed = planned_at.elapsed().min(left);
        // Rounded, not rounded up: a timer a hair late must not double the
        // pace (at least one per tick all the same).
        let due = (remaining as f64 * elapsed.as_secs_f64() / left.as_secs_f64()).round();
        for _ in 0..(due as usize).clamp(1, remaining) {
            close_one(&mut closed);
        }
    }
    for _ in 0..left_to_close(closed) {
        close_one(&mut closed);
    }
    closed
}

/// The operator's drain (`POST /drain`): at most one at a time, stoppable.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdminDrain {
    state: Arc<Mutex<AdminState>>,
}

#[derive(Debug, Default)]
struct AdminState {
    /// The running drain's stop token; `None` when none runs.
    running: Option<CancellationToken>,
    /// Drains started so far: a finishing drain clears `running` only if
    /// no later one took its place.
    generation: u64,
    /// The current (or last) drain's plan and progress.
    planned: usize,
    period: Duration,
    drained: Arc<AtomicU64>,
}

/// Where the operator's drain is (the answers of `/drain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdminDrainStatus {
    /// A drain is running.
    pub(crate) running: bool,
    /// Connections it set out to close.
    pub(crate) planned: usize,
    /// Connections it closed so far.
    pub(crate) drained: u64,
    /// Its period.
    pub(crate) period: Duration,
}

/// What the operator asked to drain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Amount {
    /// This fraction of the live connections (rounded to the nearest).
    Fraction(f64),
    /// This many (or all, if fewer are live).
    Count(usize),
}

impl AdminDrain {
    /// Starts a drain of `amount` over `period`, unless one runs already
    /// (`Err` with its status). Connections closed are counted in
    /// `drained`; `stop` (the shutdown's drain starting) ends it.
    pub(crate) fn start(
        &self,
        tunnels: &Tunnels,
        amount: Amount,
        period: Duration,
        drained: IntCounter,
        stop: CancellationToken,
    ) -> Result<AdminDrainStatus, AdminDrainStatus> {
        let mut state = self.lock();
        if state.running.is_some() {
            return Err(status_of(&state));
        }
        let live = tunnels.len();
        let planned = match amount {
            Amount::Fraction(f) => ((live as f64 * f).round() as usize).min(live),
            Amount::Count(n) => n.min(live),
        };
        state.planned = planned;
        state.period = period;
        state.drained = Arc::new(AtomicU64::new(0));
        if planned == 0 {
            return Ok(status_of(&state));
        }
        let cancel = stop.child_token();
        state.running = Some(cancel.clone());
        state.generation += 1;
        let generation = state.generation;
        let progress = Arc::clone(&state.drained);
        let this = self.clone();
        let tunnels = tunnels.clone();
        tokio::spawn(async move {
            let plan = Plan {
                count: Some(planned),
                kind: DrainKind::Operator,
            };
            let closed_one = || {
                drained.inc();
                progress.fetch_add(1, Ordering::Relaxed);
            };
            tokio::select! {
                closed = drain_paced(&tunnels, period, plan, closed_one) => {
                    tracing::info!(closed, planned, "admin drain finished");
                }
                () = cancel.cancelled() => tracing::info!("admin drain stopped"),
            }
            let mut state = this.lock();
            if state.generation == generation {
                state.running = None;
            }
        });
        Ok(status_of(&state))
    }

    /// Stops the running drain, if any; its status as it stopped.
    pub(crate) fn stop(&self) -> Option<AdminDrainStatus> {
        let mut state = self.lock();
        let token = state.running.take()?;
        token.cancel();
        Some(AdminDrainStatus {
            running: false,
            ..status_of(&state)
        })
    }

    /// The current (or last) drain.
    pub(crate) fn status(&self) -> AdminDrainStatus {
        status_of(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdminState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn status_of(state: &AdminState) -> AdminDrainStatus {
    AdminDrainStatus {
        running: state.running.is_some(),
        planned: state.planned,
        drained: state.drained.load(Ordering::Relaxed),
        period: state.period,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closes_oldest_first_at_an_even_pace() {
        let tunnels = Tunnels::new();
        let regs: Vec<_> = (0..10).map(|_| tunnels.register()).collect();
        let drained = IntCounter::new("d", "d").expect("metric");
        let start = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (i, r) in regs.into_iter().enumerate() {
            let order = Arc::clone(&order);
            waiters.push(tokio::spawn(async move {
                r.drained().await;
                order.lock().expect("lock").push((i, start.elapsed()));
                drop(r);
            }));
        }
        drain_evenly(&tunnels, Duration::from_secs(10), &drained).await;
        for w in waiters {
            w.await.expect("join");
        }
        let order = order.lock().expect("lock").clone();
        assert_eq!(
            order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        for (n, (_, at)) in order.iter().enumerate() {
            let want = Duration::from_secs(n as u64 + 1);
            assert!(
                at.abs_diff(want) < Duration::from_millis(50),
                "close {n} at {at:?}, want {want:?}"
            );
        }
        assert_eq!(drained.get(), 10);
        assert_eq!(tunnels.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn thousands_of_connections_are_closed_in_batches_not_one_burst() {
        let tunnels = Tunnels::new();
        let regs: Vec<_> = (0..30_000).map(|_| tunnels.register()).collect();
        let drained = IntCounter::new("d", "d").expect("metric");
        let start = Instant::now();
        let watcher = {
            let tunnels = tunnels.clone();
            tokio::spawn(async move {
                // Sample how many are left every second of the drain.
                let mut left = Vec::new();
                for _ in 0..5 {
                    sleep(Duration::from_secs(1)).await;
                    left.push(tunnels.len());
                }
                left
            })
        };
        drain_evenly(&tunnels, Duration::from_secs(5), &drained).await;
        let left = watcher.await.expect("join");
        drop(regs);
        assert_eq!(drained.get(), 30_000);
        assert!(start.elapsed() <= Duration::from_secs(5) + MIN_TICK);
        // Even pace: about 6,000 a second, not a burst at the end.
        for (second, &n) in left.iter().take(4).enumerate() {
            let want = 30_000 - 6_000 * (second + 1);
            assert!(
                n.abs_diff(want) <= 700,
                "after {}s {n} left, want about {want}",
                second + 1
            );
        }
    }

    /// Which registration was closed, and for which reason, in order.
    type Closed = Arc<Mutex<Vec<(usize, StopReason)>>>;

    /// Registrations whose drain waiters report, in order, the reason each
    /// was closed for.
    fn watched(tunnels: &Tunnels, n: usize) -> (Closed, Vec<tokio::task::JoinHandle<()>>) {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let waiters = (0..n)
            .map(|i| {
                let r = tunnels.register();
                let closed = Arc::clone(&closed);
                tokio::spawn(async move {
                    let reason = r.drained().await;
                    closed.lock().expect("lock").push((i, reason));
                    drop(r);
                })
            })
            .collect();
        (closed, waiters)
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_drain_closes_its_count_oldest_first_and_runs_alone() {
        let tunnels = Tunnels::new();
        let (closed, waiters) = watched(&tunnels, 10);
        let admin = AdminDrain::default();
        let metric = IntCounter::new("a", "a").expect("metric");
        let stop = CancellationToken::new();
        let period = Duration::from_secs(4);
        let started = admin
            .start(
                &tunnels,
                Amount::Fraction(0.35),
                period,
                metric.clone(),
                stop.clone(),
            )
            .expect("started");
        assert_eq!((started.planned, started.running), (4, true));
        // One at a time.
        let busy = admin
            .start(
                &tunnels,
                Amount::Count(1),
                period,
                metric.clone(),
                stop.clone(),
            )
            .expect_err("409");
        assert_eq!((busy.planned, busy.running), (4, true));
        sleep(period + Duration::from_millis(50)).await;
        let status = admin.status();
        assert_eq!((status.running, status.drained), (false, 4));
        assert_eq!(metric.get(), 4);
        let got = closed.lock().expect("lock").clone();
        assert_eq!(
            got,
            (0..4)
                .map(|i| (i, StopReason::AdminDrain))
                .collect::<Vec<_>>(),
            "the four oldest, for the operator"
        );
        assert_eq!(tunnels.len(), 6);
        // The shutdown's drain, later, names its own reason.
        close_rest(&tunnels);
        for w in waiters {
            w.await.expect("join");
        }
        assert!(closed.lock().expect("lock")[4..]
            .iter()
            .all(|(_, r)| *r == StopReason::Drain));
    }

    fn close_rest(tunnels: &Tunnels) {
        while tunnels.close_oldest(DrainKind::Shutdown) {}
    }

    #[tokio::test(start_paused = true)]
    async fn delete_or_a_shutdown_signal_stops_an_operator_drain() {
        for by_signal in [false, true] {
            let tunnels = Tunnels::new();
            let (closed, _waiters) = watched(&tunnels, 10);
            let admin = AdminDrain::default();
            let metric = IntCounter::new("a", "a").expect("metric");
            let signal = CancellationToken::new();
            admin
                .start(
                    &tunnels,
                    Amount::Count(10),
                    Duration::from_secs(10),
                    metric.clone(),
                    signal.clone(),
                )
                .expect("started");
            sleep(Duration::from_millis(3_500)).await;
            if by_signal {
                signal.cancel();
                tokio::task::yield_now().await;
            } else {
                let stopped = admin.stop().expect("it was running");
                assert_eq!((stopped.running, stopped.drained), (false, 3));
            }
            sleep(Duration::from_secs(10)).await;
            assert!(!admin.status().running);
            assert_eq!(metric.get(), 3, "no close after the stop");
            assert_eq!(closed.lock().expect("lock").len(), 3);
            assert!(admin.stop().is_none(), "nothing left to stop");
            // Free again.
            let next = admin.start(
                &tunnels,
                Amount::Count(1),
                Duration::from_secs(1),
                metric.clone(),
                CancellationToken::new(),
            );
            assert_eq!(next.map(|s| s.planned), Ok(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replans_when_connections_end_by_themselves() {
        let tunnels = Tunnels::new();
        let mut regs: Vec<_> = (0..4).map(|_| tunnels.register()).collect();
        let drained = IntCounter::new("d", "d").expect("metric");
        // Two end on their own right away: the other two get 4 s each.
        regs.truncate(2);
        let start = Instant::now();
        drain_evenly(&tunnels, Duration::from_secs(8), &drained).await;
        assert_eq!(drained.get(), 2);
        assert!(start.elapsed() >= Duration::from_secs(8) - Duration::from_millis(10));
    }
}
