//! Admission: the active count, the cap, and the RAII guard that holds a slot.
//!
//! A slot is reserved with a compare-and-swap on the active count, so no
//! interleaving of concurrent reservations can pass the cap. The cap lives in
//! an atomic so it can change at run time: lowering it below the active count
//! only stops new admissions, nothing already admitted is touched.
//!
//! [`AdmissionGuard`] is the only thing that gives a slot back: dropping it
//! decrements the count and the `wsgate_connections_active` gauge. It is moved
//! into the task that owns the spliced connection, so the slot lives exactly as
//! long as the connection does, whichever way that ends. There is no
//! `release()` method, so a slot cannot be given back twice or forgotten.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// The shared active count and cap.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    active: AtomicUsize,
    /// 0 = unlimited.
    cap: AtomicUsize,
    /// `wsgate_connections_active`; moved only by reserve and guard drop.
    active_gauge: IntGauge,
    /// `wsgate_connections_max`; follows the cap.
    max_gauge: IntGauge,
}

/// A held slot. Dropping it releases the slot.
#[derive(Debug)]
#[must_use = "dropping the guard releases the slot at once"]
pub struct AdmissionGuard {
    inner: Arc<Inner>,
}

impl Admission {
    /// Creates the admission state with `cap` (0 = unlimited).
    pub fn new(cap: usize, active_gauge: IntGauge, max_gauge: IntGauge) -> Self {
        max_gauge.set(i64::try_from(cap).unwrap_or(i64::MAX));
        Admission {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                cap: AtomicUsize::new(cap),
                active_gauge,
                max_gauge,
            }),
        }
    }

    /// Reserves a slot without waiting; `None` when the cap is reached.
    pub fn try_reserve(&self) -> Option<AdmissionGuard> {
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
                Ok(_) => {
                    inner.active_gauge.inc();
                    return Some(AdmissionGuard {
                        inner: Arc::clone(inner),
                    });
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Changes the cap in place (0 = unlimited). Held slots are untouched.
    pub fn set_cap(&self, cap: usize) {
        self.inner.cap.store(cap, Ordering::Release);
        self.inner
            .max_gauge
            .set(i64::try_from(cap).unwrap_or(i64::MAX));
    }

    /// The cap in force (0 = unlimited).
    pub fn cap(&self) -> usize {
        self.inner.cap.load(Ordering::Acquire)
    }

    /// Slots held right now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
        self.inner.active_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(cap: usize) -> Admission {
        let a = IntGauge::new("a", "a").expect("valid metric");
        let m = IntGauge::new("m", "m").expect("valid metric");
        Admission::new(cap, a, m)
    }

    #[test]
    fn reserves_up_to_cap_then_refuses() {
        let a = admission(2);
        let g1 = a.try_reserve().expect("slot 1");
        let _g2 = a.try_reserve().expect("slot 2");
        assert!(a.try_reserve().is_none());
        assert_eq!(a.active(), 2);
        drop(g1);
        assert_eq!(a.active(), 1);
        assert!(a.try_reserve().is_some());
    }

    #[test]
    fn zero_cap_is_unlimited() {
        let a = admission(0);
        let guards: Vec<_> = (0..1000).map(|_| a.try_reserve().expect("slot")).collect();
        assert_eq!(a.active(), 1000);
        drop(guards);
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn lowering_cap_only_stops_admissions() {
        let a = admission(3);
        let held: Vec<_> = (0..3).map(|_| a.try_reserve().expect("slot")).collect();
        a.set_cap(1);
        assert_eq!(a.active(), 3, "nothing admitted is dropped");
        assert!(a.try_reserve().is_none());
        drop(held);
        assert!(a.try_reserve().is_some());
    }

    #[test]
    fn gauge_follows_guards() {
        let a = admission(5);
        let g = a.try_reserve().expect("slot");
        assert_eq!(a.inner.active_gauge.get(), 1);
        assert_eq!(a.inner.max_gauge.get(), 5);
        drop(g);
        assert_eq!(a.inner.active_gauge.get(), 0);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_cap() {
        let a = admission(10);
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let a = a.clone();
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        if let Some(g) = a.try_reserve() {
                            peak.fetch_max(a.active(), Ordering::AcqRel);
                            drop(g);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Acquire) <= 10);
        assert_eq!(a.active(), 0);
    }
}
