//! The gradual drain: a registry of live tunnels in age order, and the loop
//! that closes them oldest first at an even pace over `drain_period`.
//!
//! Why: holding every connection to the end of the grace and then dropping
//! them all at once sends every client to the other pods in the same second
//! (a reconnect storm). Closing them evenly over the drain period spreads the
//! reconnects. The pace is re-planned after every close as "what is left ÷
//! time left", so connections that end by themselves slow the drain down
//! instead of leaving a burst at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};

/// Live tunnels, oldest first (ids grow with time).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tunnels {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// A tunnel's entry in the registry; dropping it removes the entry.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    notify: Arc<Notify>,
    tunnels: Arc<Inner>,
}

impl Registration {
    /// Resolves once the drain picked this tunnel to close.
    pub(crate) async fn drained(&self) {
        self.notify.notified().await;
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
        let notify = Arc::new(Notify::new());
        self.lock().insert(id, Arc::clone(&notify));
        Registration {
            id,
            notify,
            tunnels: Arc::clone(&self.inner),
        }
    }

    /// Live tunnels.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Tells the oldest live tunnel to close; false if there is none.
    pub(crate) fn close_oldest(&self) -> bool {
        let oldest = self.lock().pop_first();
        match oldest {
            // `notify_one` stores a permit if the tunnel is not waiting at
            // this instant, so the request cannot be lost.
            Some((_, notify)) => {
                notify.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
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
    let end = Instant::now() + period;
    loop {
        let remaining = tunnels.len();
        if remaining == 0 {
            return;
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
            if tunnels.close_oldest() {
                drained.inc();
            }
        }
    }
    while tunnels.close_oldest() {
        drained.inc();
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
