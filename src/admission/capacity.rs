//! Capacity: the active count, the cap (`max_clients`), and the readiness
//! watermarks that follow them; [`Slot`] is one connection's place under
//! the cap.
//!
//! A slot is reserved with a compare-and-swap on the active count, so no
//! interleaving of concurrent reservations can pass the cap. The cap and
//! the watermarks change at run time (hot reload): lowering the cap below
//! the active count only stops new admissions, nothing already admitted is
//! touched. Dropping a [`Slot`] is the only way the count goes down.
//!
//! Loom model-checks this file (`tests/loom_admission.rs` includes it by
//! path), so it reaches nothing but `super::outcome` and the configuration.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
use loom::sync::{Arc, Mutex};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

use super::outcome::{RejectReason, Verdict};
use crate::config::Watermarks;

/// The shared capacity state.
#[derive(Debug, Clone)]
pub(crate) struct Capacity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    active: AtomicUsize,
    /// 0 = unlimited.
    cap: AtomicUsize,
    /// `wsgate_connections_active`; moved only by reservations and slot drops.
    active_gauge: IntGauge,
    /// `wsgate_connections_max`; follows the cap.
    max_gauge: IntGauge,
    /// Watermark fractions as f64 bits (0 = off): read on every release,
    /// so they live in atomics rather than behind a lock.
    high_bits: AtomicU64,
    low_bits: AtomicU64,
    /// Not ready because of saturation (hysteresis state).
    saturated: AtomicBool,
    /// Serialises judging `saturated`: each judge re-reads `active` under it,
    /// so the last judge always sees the latest count. Without it a reserve
    /// and a release racing could leave the flag stale (found by loom).
    /// Taken only when watermarks are on.
    judging: Mutex<()>,
}

/// One connection's place under the cap. Dropping it frees the place.
#[derive(Debug)]
#[must_use = "dropping the slot frees it at once"]
pub(crate) struct Slot {
    inner: Arc<Inner>,
}

fn fraction_bits(w: Option<Watermarks>) -> (u64, u64) {
    w.map_or((0, 0), |w| (w.high.to_bits(), w.low.to_bits()))
}

impl Capacity {
    /// Creates the state with `cap` (0 = unlimited) and `watermarks`.
    pub(crate) fn new(
        cap: usize,
        watermarks: Option<Watermarks>,
        active_gauge: IntGauge,
        max_gauge: IntGauge,
    ) -> Self {
        max_gauge.set(i64::try_from(cap).unwrap_or(i64::MAX));
        let (high, low) = fraction_bits(watermarks);
        Capacity {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                cap: AtomicUsize::new(cap),
                active_gauge,
                max_gauge,
                high_bits: AtomicU64::new(high),
                low_bits: AtomicU64::new(low),
                saturated: AtomicBool::new(false),
                judging: Mutex::new(()),
            }),
        }
    }

    /// The capacity check. Over the cap, dry run (`take_anyway`) still
    /// takes a slot, so the active gauge shows the real count.
    pub(crate) fn check(&self, take_anyway: bool) -> Verdict<Slot> {
        match self.try_reserve() {
            Some(slot) => Verdict::Pass(slot),
            None => Verdict::over_taking(
                RejectReason::Capacity,
                take_anyway.then(|| self.reserve_over_cap()),
            ),
        }
    }

    /// Reserves a slot without waiting; `None` when the cap is reached.
    pub(crate) fn try_reserve(&self) -> Option<Slot> {
        let inner = &self.inner;
        let mut current = inner.active.load(Ordering::Acquire);
        loop {
            let cap = inner.cap.load(Ordering::Acquire);
            if cap != 0 && current >= cap {
                return None;
            }
            match inner.active.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(self.slot_taken(current + 1, cap)),
                Err(seen) => current = seen,
            }
        }
    }

    /// Dry run over the cap: the count stays exact.
    fn reserve_over_cap(&self) -> Slot {
        let now = self.inner.active.fetch_add(1, Ordering::AcqRel) + 1;
        self.slot_taken(now, self.inner.cap.load(Ordering::Acquire))
    }

    fn slot_taken(&self, active_now: usize, cap: usize) -> Slot {
        let inner = &self.inner;
        inner.active_gauge.inc();
        if inner.at_high_mark(active_now, cap) {
            inner.judge_saturation();
        }
        Slot {
            inner: Arc::clone(inner),
        }
    }

    /// Changes the cap in place (0 = unlimited). Held slots are untouched.
    pub(crate) fn set_cap(&self, cap: usize) {
        self.inner.cap.store(cap, Ordering::Release);
        self.inner
            .max_gauge
            .set(i64::try_from(cap).unwrap_or(i64::MAX));
        self.inner.judge_saturation_afresh();
    }

    /// Changes the watermarks in place.
    pub(crate) fn set_watermarks(&self, watermarks: Option<Watermarks>) {
        let (high, low) = fraction_bits(watermarks);
        self.inner.high_bits.store(high, Ordering::Release);
        self.inner.low_bits.store(low, Ordering::Release);
        self.inner.judge_saturation_afresh();
    }

    /// Slots held right now.
    pub(crate) fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Whether saturation currently makes the instance not ready: set when
    /// active reaches the high watermark, cleared only at the low one.
    pub(crate) fn is_saturated(&self) -> bool {
        self.inner.saturated.load(Ordering::Acquire)
    }
}

impl Inner {
    /// The one saturation test: `active` has reached the high watermark of
    /// a cap (never with no cap or no watermarks).
    fn at_high_mark(&self, active: usize, cap: usize) -> bool {
        let high = f64::from_bits(self.high_bits.load(Ordering::Acquire));
        cap > 0 && high > 0.0 && active as f64 >= high * cap as f64
    }

    /// Sets or clears `saturated` from the count as it is now, with
    /// hysteresis: set at the high watermark, cleared at the low one.
    fn judge_saturation(&self) {
        let _judging = lock(&self.judging);
        let cap = self.cap.load(Ordering::Acquire);
        let active = self.active.load(Ordering::Acquire);
        let low = f64::from_bits(self.low_bits.load(Ordering::Acquire));
        if self.at_high_mark(active, cap) {
            self.saturated.store(true, Ordering::Release);
        } else if active as f64 <= low * cap as f64 || self.high_bits.load(Ordering::Acquire) == 0 {
            self.saturated.store(false, Ordering::Release);
        }
    }

    /// After a cap or watermark change: saturated exactly when at the high
    /// mark (no hysteresis across a change of the marks themselves).
    fn judge_saturation_afresh(&self) {
        let _judging = lock(&self.judging);
        let saturated = self.at_high_mark(
            self.active.load(Ordering::Acquire),
            self.cap.load(Ordering::Acquire),
        );
        self.saturated.store(saturated, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let inner = &self.inner;
        let now = inner.active.fetch_sub(1, Ordering::AcqRel) - 1;
        inner.active_gauge.dec();
        let cap = inner.cap.load(Ordering::Acquire);
        let low = f64::from_bits(inner.low_bits.load(Ordering::Acquire));
        // Not only when the flag reads set: a reserve racing with this
        // release may be about to set it from a count that is now stale.
        if inner.high_bits.load(Ordering::Acquire) != 0 && now as f64 <= low * cap as f64 {
            inner.judge_saturation();
        }
    }
}

/// Locks, ignoring poisoning: every critical section here leaves the data
/// consistent at each step, so a panic elsewhere cannot corrupt it.
#[cfg(not(loom))]
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Locks, ignoring poisoning (loom's mutex).
#[cfg(loom)]
pub(crate) fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn capacity(cap: usize, watermarks: Option<Watermarks>) -> Capacity {
        let a = IntGauge::new("a", "a").expect("valid metric");
        let m = IntGauge::new("m", "m").expect("valid metric");
        Capacity::new(cap, watermarks, a, m)
    }

    #[test]
    fn reserves_up_to_cap_then_refuses() {
        let c = capacity(2, None);
        let s1 = c.try_reserve().expect("slot 1");
        let _s2 = c.try_reserve().expect("slot 2");
        assert!(c.try_reserve().is_none());
        assert_eq!(c.active(), 2);
        drop(s1);
        assert_eq!(c.active(), 1);
        assert!(c.try_reserve().is_some());
    }

    #[test]
    fn zero_cap_is_unlimited() {
        let c = capacity(0, None);
        let slots: Vec<_> = (0..1000).map(|_| c.try_reserve().expect("slot")).collect();
        assert_eq!(c.active(), 1000);
        drop(slots);
        assert_eq!(c.active(), 0);
    }

    #[test]
    fn lowering_cap_only_stops_admissions() {
        let c = capacity(3, None);
        let held: Vec<_> = (0..3).map(|_| c.try_reserve().expect("slot")).collect();
        c.set_cap(1);
        assert_eq!(c.active(), 3, "nothing admitted is dropped");
        assert!(c.try_reserve().is_none());
        drop(held);
        assert!(c.try_reserve().is_some());
    }

    #[test]
    fn gauges_follow_slots_and_the_cap() {
        let c = capacity(5, None);
        let s = c.try_reserve().expect("slot");
        assert_eq!(c.inner.active_gauge.get(), 1);
        assert_eq!(c.inner.max_gauge.get(), 5);
        drop(s);
        assert_eq!(c.inner.active_gauge.get(), 0);
    }

    #[test]
    fn dry_run_takes_a_slot_over_the_cap_and_says_so() {
        let c = capacity(1, None);
        let Verdict::Pass(first) = c.check(true) else {
            panic!("the first fits")
        };
        let Verdict::Over {
            rejection, taken, ..
        } = c.check(true)
        else {
            panic!("the second is over the cap")
        };
        assert_eq!(rejection.reason, RejectReason::Capacity);
        assert!(taken.is_some());
        assert_eq!(c.active(), 2, "the gauge shows the real count");
        drop(taken);
        let Verdict::Over { taken, .. } = c.check(false) else {
            panic!("over the cap")
        };
        assert!(taken.is_none(), "enforcing takes nothing");
        drop(first);
        assert_eq!(c.active(), 0);
    }

    #[test]
    fn watermarks_have_hysteresis() {
        let w = Watermarks {
            high: 0.8,
            low: 0.5,
        };
        let c = capacity(10, Some(w));
        let mut held: Vec<_> = (0..7).map(|_| c.try_reserve().expect("slot")).collect();
        assert!(!c.is_saturated());
        held.push(c.try_reserve().expect("8th"));
        assert!(c.is_saturated(), "8/10 reaches 0.8");
        held.truncate(6);
        assert!(c.is_saturated(), "6/10 is above the low mark");
        held.truncate(5);
        assert!(!c.is_saturated(), "5/10 reaches the low mark");
        held.push(c.try_reserve().expect("6th again"));
        assert!(!c.is_saturated(), "stays ready until the high mark again");
    }

    #[test]
    fn watermarks_change_in_place() {
        let c = capacity(10, None);
        let held: Vec<_> = (0..6).map(|_| c.try_reserve().expect("slot")).collect();
        c.set_watermarks(Some(Watermarks {
            high: 0.5,
            low: 0.2,
        }));
        assert!(c.is_saturated(), "6/10 is past the new high mark");
        assert_eq!(held.len(), 6);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_cap() {
        let c = capacity(10, None);
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        if let Some(s) = c.try_reserve() {
                            peak.fetch_max(c.active(), Ordering::AcqRel);
                            drop(s);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Acquire) <= 10);
        assert_eq!(c.active(), 0);
    }
}
