//! Model check of admission's counters with loom (issue 3): under every
//! interleaving of concurrent reservations and releases, `active` never
//! exceeds the cap, the per-IP count never exceeds its cap, exactly the
//! expected number of reservations win, and everything returns to 0
//! (loom's `Arc` also proves no slot is leaked); the saturation flag ends
//! consistent with `active`.
//!
//! Not part of the ordinary test run (without `--cfg loom` this crate is
//! empty). Run it with `bash tests/loom.sh`: it compiles this one crate with
//! `--cfg loom`, which makes `src/admission/capacity.rs` and
//! `src/admission/per_ip.rs` (included below by path, with the files they
//! name) use loom's atomics, `Arc` and `Mutex`. Only this crate gets the
//! cfg: given to the whole build (RUSTFLAGS), it would reach tokio, which
//! has its own loom mode. `config` is re-exported from the real library:
//! it holds plain data that loom need not model.
#![cfg(loom)]
#![allow(clippy::print_stdout, reason = "reports the number of interleavings")]

/// The metric toolkit `outcome.rs` declares its label set with.
#[allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "the library's module, included by path"
)]
#[path = "../src/metrics.rs"]
mod metrics;

/// The files of `src/admission/` the model needs, at the paths they name
/// each other by (`super::outcome`, `super::capacity`).
#[allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "the library's modules, included by path"
)]
#[path = "../src/admission"]
mod admission {
    pub(crate) mod capacity;
    pub(crate) mod outcome;
    pub(crate) mod per_ip;
}

/// What the admission files reach through `crate::config`.
mod config {
    pub(crate) use wsgate::config::Watermarks;
}

use std::net::IpAddr;

use admission::capacity::Capacity;
use admission::outcome::Verdict;
use admission::per_ip::PerIp;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use prometheus::IntGauge;

fn capacity(cap: usize, watermarks: Option<config::Watermarks>) -> (Capacity, IntGauge) {
    let active = IntGauge::new("a", "a").expect("metric");
    let max = IntGauge::new("m", "m").expect("metric");
    (Capacity::new(cap, watermarks, active.clone(), max), active)
}

/// Runs `f` under loom with at most `preemptions` forced context switches
/// per execution: bounded so the whole run stays short (2–3 already covers
/// every interleaving of these small models that matters for a CAS loop).
fn model(name: &str, preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&runs);
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    println!(
        "{name}: {} interleavings explored",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Two threads race for the last slot while holding what they get: exactly
/// one wins, active never passes the cap, and all returns to 0.
#[test]
fn one_slot_two_racers_exactly_one_wins() {
    model("one slot, two racers", 3, || {
        let (a, gauge) = capacity(1, None);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || {
                    let g = a.try_reserve();
                    assert!(a.active() <= 1, "active {} over cap 1", a.active());
                    g
                })
            })
            .collect();
        let guards: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        assert_eq!(
            guards.iter().filter(|g| g.is_some()).count(),
            1,
            "exactly one admitted"
        );
        assert_eq!(a.active(), 1);
        drop(guards);
        assert_eq!(a.active(), 0);
        assert_eq!(gauge.get(), 0);
    });
}

/// Cap 2, three threads that reserve and release while others reserve:
/// active never passes 2 at any observation, and ends at 0.
#[test]
fn reserve_release_churn_never_passes_the_cap() {
    model("cap 2, three threads reserve+release", 2, || {
        let (a, gauge) = capacity(2, None);
        let peak = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let a = a.clone();
                let peak = Arc::clone(&peak);
                thread::spawn(move || {
                    if let Some(g) = a.try_reserve() {
                        peak.fetch_max(a.active(), Ordering::AcqRel);
                        drop(g);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("join");
        }
        assert!(peak.load(Ordering::Acquire) <= 2);
        assert_eq!(a.active(), 0);
        assert_eq!(gauge.get(), 0);
    });
}

/// A cap lowered while two threads reserve: nobody is dropped, nothing
/// passes the higher cap, all returns to 0.
#[test]
fn lowering_the_cap_during_reservations() {
    model("cap 2 -> 1 during reservations", 3, || {
        let (a, _) = capacity(2, None);
        let lower = {
            let a = a.clone();
            thread::spawn(move || a.set_cap(1))
        };
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || {
                    let g = a.try_reserve();
                    assert!(a.active() <= 2);
                    g
                })
            })
            .collect();
        lower.join().expect("join");
        let guards: Vec<_> = racers
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        let won = guards.iter().filter(|g| g.is_some()).count();
        assert!((1..=2).contains(&won), "{won} admitted");
        assert_eq!(a.active(), won);
        drop(guards);
        assert_eq!(a.active(), 0);
        assert!(a.try_reserve().is_some(), "cap 1 admits once all is free");
    });
}

/// The per-IP check with a cap of 1: two connections from the same
/// address race; exactly one is admitted, the per-IP count never passes 1,
/// and it returns to 0.
#[test]
fn per_ip_cap_holds_under_races() {
    model("per-IP cap 1, two racers from one address", 3, || {
        let p = PerIp::new(1);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                thread::spawn(move || {
                    let held = match p.check(ip, false) {
                        Verdict::Pass(hold) => Some(hold),
                        Verdict::Over { .. } => None,
                    };
                    assert!(p.active_from(ip) <= 1);
                    held
                })
            })
            .collect();
        let holds: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        assert_eq!(holds.iter().filter(|g| g.is_some()).count(), 1);
        drop(holds);
        assert_eq!(p.active_from(ip), 0);
    });
}

/// Readiness saturation (high 100 %, low 50 % of cap 2): one connection is
/// held, a second arrives while the first leaves. Once both threads are
/// done, one connection is active (≤ the low watermark), so the instance
/// must not be left saturated.
#[test]
fn saturation_flag_ends_consistent_with_active() {
    model(
        "saturation flag vs concurrent reserve and release",
        3,
        || {
            let watermarks = config::Watermarks {
                high: 1.0,
                low: 0.5,
            };
            let (a, _) = capacity(2, Some(watermarks));
            let first = a.try_reserve().expect("first");
            let arriving = {
                let a = a.clone();
                thread::spawn(move || a.try_reserve())
            };
            let leaving = thread::spawn(move || drop(first));
            let second = arriving.join().expect("join").expect("a slot was free");
            leaving.join().expect("join");
            assert_eq!(a.active(), 1);
            assert!(
                !a.is_saturated(),
                "1 of 2 active (≤ low watermark) but still saturated: readiness stuck at 503"
            );
            drop(second);
            assert!(!a.is_saturated());
        },
    );
}
