//! Admission: the active count, the cap and the other admission limits, and
//! the RAII guard that holds a slot.
//!
//! A slot is reserved with a compare-and-swap on the active count, so no
//! interleaving of concurrent reservations can pass the cap. The cap and the
//! policy (per-IP cap, rate, dry run, watermarks) can change at run time (hot
//! reload): lowering the cap below the active count only stops new
//! admissions, nothing already admitted is touched.
//!
//! Checks run in SPEC §7/§9's order, first refusal wins: capacity, per-IP,
//! the key rules (supplied by the caller as [`KeyChecks`]), then the
//! caller's fleet check (async, `crate::fleet`), then rate
//! ([`Admission::take_rate_token`]). A rate token is spent only by an
//! admission (it is taken last). In dry run
//! (`enforce = false`) every check still runs and the first that would refuse
//! is reported, but the connection is admitted anyway.
//!
//! [`AdmissionGuard`] is the only thing that gives a slot back: dropping it
//! decrements the count, the per-IP count and the `wsgate_connections_active`
//! gauge, and drops the key holds it owns (each gives its key share back). It is moved into the task that owns the spliced connection, so the
//! slot lives exactly as long as the connection does. There is no `release()`
//! method, so a slot cannot be given back twice or forgotten.

use std::collections::HashMap;
use std::net::IpAddr;

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
use loom::sync::{Arc, Mutex};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::config::{RateLimit, Watermarks};
use crate::fleet::FleetHold;
use crate::keys::KeyHold;

/// Why wsgate refused an upgrade: the `reason` label of
/// `wsgate_connections_rejected_total` and `…_would_reject_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectReason {
    /// The cap is reached.
    Capacity,
    /// The process is shutting down.
    Draining,
    /// The admission rate limit.
    Rate,
    /// The per-client-address cap.
    PerIp,
    /// A key rule: the key holds its limit.
    Key,
    /// A key rule: the request has no usable key (`missing = reject`, or
    /// a value that cannot be a key).
    KeyMissing,
    /// A key rule: the table already tracks `max_keys` values.
    KeyTableFull,
    /// A `jwt_claim` rule: the token is present but not valid.
    Jwt,
    /// The fleet is at `fleet_max_clients` (SPEC §10).
    Fleet,
    /// Redis is down or slow and `fleet_fail_mode = closed`.
    FleetUnavailable,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub(crate) const ALL: [RejectReason; 10] = [
        RejectReason::Capacity,
        RejectReason::Draining,
        RejectReason::Rate,
        RejectReason::PerIp,
        RejectReason::Key,
        RejectReason::KeyMissing,
        RejectReason::KeyTableFull,
        RejectReason::Jwt,
        RejectReason::Fleet,
        RejectReason::FleetUnavailable,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RejectReason::Capacity => "capacity",
            RejectReason::Draining => "draining",
            RejectReason::Rate => "rate",
            RejectReason::PerIp => "per_ip",
            RejectReason::Key => "key",
            RejectReason::KeyMissing => "key_missing",
            RejectReason::KeyTableFull => "key_table_full",
            RejectReason::Jwt => "jwt",
            RejectReason::Fleet => "fleet",
            RejectReason::FleetUnavailable => "fleet_unavailable",
        }
    }
}

/// The key-rule checks (SPEC §9), run after per-IP and before rate. The
/// caller supplies them (`keys::KeyRequest`), so this module needs to know
/// nothing about requests; [`NoKeys`] when there are none.
pub(crate) trait KeyChecks {
    /// Takes this request's key shares, pushing each into `holds` as soon
    /// as it is taken, so a later refusal gives them back with the guard.
    ///
    /// # Errors
    /// The first rule that refuses (only when `enforce`); `Ok(Some(_))` in
    /// dry run names the first that would have.
    fn reserve_keys(
        &mut self,
        enforce: bool,
        holds: &mut Vec<KeyHold>,
    ) -> Result<Option<RejectReason>, RejectReason>;
}

/// No key rules (the unit and loom tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoKeys;

#[cfg(test)]
impl KeyChecks for NoKeys {
    fn reserve_keys(
        &mut self,
        _enforce: bool,
        _holds: &mut Vec<KeyHold>,
    ) -> Result<Option<RejectReason>, RejectReason> {
        Ok(None)
    }
}

/// The admission limits besides the cap, replaced as a whole on reload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Policy {
    /// Concurrent connections per client address; 0 = off.
    pub(crate) max_per_ip: usize,
    /// Token bucket; `None` = off.
    pub(crate) rate: Option<RateLimit>,
    /// false = dry run.
    pub(crate) enforce: bool,
    /// Readiness hysteresis on saturation; `None` = off.
    pub(crate) watermarks: Option<Watermarks>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_per_ip: 0,
            rate: None,
            enforce: true,
            watermarks: None,
        }
    }
}

/// The shared admission state.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    active: AtomicUsize,
    /// 0 = unlimited.
    cap: AtomicUsize,
    /// `wsgate_connections_active`; moved only by reservations and guard drops.
    active_gauge: IntGauge,
    /// `wsgate_connections_max`; follows the cap.
    max_gauge: IntGauge,
    policy: Mutex<Policy>,
    /// Watermark fractions as f64 bits (0 = off): read on every release,
    /// so they live in atomics rather than behind the policy lock.
    high_bits: AtomicU64,
    low_bits: AtomicU64,
    /// Not ready because of saturation (hysteresis state).
    saturated: AtomicBool,
    /// Serialises judging `saturated`: each judge re-reads `active` under it,
    /// so the last judge always sees the latest count. Without it a reserve
    /// and a release racing could leave the flag stale (found by loom,
    /// `tests/loom_admission.rs`). Taken only when watermarks are on.
    judging: Mutex<()>,
    /// Live connections per client address. Always tracked, so a per-IP cap
    /// switched on by a reload sees the connections already open.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    bucket: Mutex<Bucket>,
}

/// A token bucket, refilled lazily on use.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn try_take(&mut self, rate: RateLimit, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(f64::INFINITY, |t| now.duration_since(t).as_secs_f64());
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A successful admission.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The slot.
    pub(crate) guard: AdmissionGuard,
    /// In dry run: the check that would have refused this connection.
    pub(crate) would_reject: Option<RejectReason>,
}

/// A held slot. Dropping it releases the slot.
#[derive(Debug)]
#[must_use = "dropping the guard releases the slot at once"]
pub(crate) struct AdmissionGuard {
    inner: Arc<Inner>,
    /// Set once the per-IP count was incremented for this slot.
    ip: Option<IpAddr>,
    /// The key shares this connection holds (empty without key rules: no
    /// allocation). Given back first when the guard drops.
    keys: Vec<KeyHold>,
    /// The connection's hold in the fleet limits (SPEC §10), if it has one.
    fleet: Option<FleetHold>,
}

fn fraction_bits(w: Option<Watermarks>) -> (u64, u64) {
    w.map_or((0, 0), |w| (w.high.to_bits(), w.low.to_bits()))
}

impl Admission {
    /// Creates the admission state with `cap` (0 = unlimited) and `policy`.
    pub(crate) fn new(
        cap: usize,
        policy: Policy,
        active_gauge: IntGauge,
        max_gauge: IntGauge,
    ) -> Self {
        max_gauge.set(i64::try_from(cap).unwrap_or(i64::MAX));
        let (high, low) = fraction_bits(policy.watermarks);
        Admission {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                cap: AtomicUsize::new(cap),
                active_gauge,
                max_gauge,
                policy: Mutex::new(policy),
                high_bits: AtomicU64::new(high),
                low_bits: AtomicU64::new(low),
                saturated: AtomicBool::new(false),
                judging: Mutex::new(()),
                per_ip: Mutex::new(HashMap::new()),
                bucket: Mutex::new(Bucket {
                    tokens: 0.0,
                    last: None,
                }),
            }),
        }
    }

    /// Runs every check for a new connection from `client` without key
    /// rules (the unit and loom tests).
    ///
    /// # Errors
    /// The first check that refuses (only when enforcing).
    #[cfg(test)]
    pub(crate) fn admit(&self, client: IpAddr) -> Result<Admitted, RejectReason> {
        let mut admitted = self.admit_with_keys(client, &mut NoKeys)?;
        self.take_rate_token(&mut admitted)?;
        Ok(admitted)
    }

    /// Runs the local checks for a new connection from `client`: capacity,
    /// per-IP, then `keys`. The caller runs the fleet check (async, §10)
    /// next and [`Admission::take_rate_token`] last.
    ///
    /// # Errors
    /// The first check that refuses (only when enforcing).
    pub(crate) fn admit_with_keys(
        &self,
        client: IpAddr,
        keys: &mut impl KeyChecks,
    ) -> Result<Admitted, RejectReason> {
        let policy = *lock(&self.inner.policy);
        let mut would_reject = None;

        // Capacity. In dry run the slot is taken even over the cap, so the
        // active gauge shows the real count.
        let mut guard = match self.try_reserve() {
            Some(g) => g,
            None if policy.enforce => return Err(RejectReason::Capacity),
            None => {
                would_reject = Some(RejectReason::Capacity);
                self.reserve_over_cap()
            }
        };
        // From here on an early return drops `guard`, which releases the slot
        // again: a refused client holds it only for these few instructions.
        {
            let mut per_ip = lock(&self.inner.per_ip);
            let count = per_ip.entry(client).or_insert(0);
            if policy.max_per_ip > 0 && *count >= policy.max_per_ip {
                if policy.enforce {
                    return Err(RejectReason::PerIp);
                }
                would_reject.get_or_insert(RejectReason::PerIp);
            }
            *count += 1;
            guard.ip = Some(client);
        }
        if let Some(reason) = keys.reserve_keys(policy.enforce, &mut guard.keys)? {
            would_reject.get_or_insert(reason);
        }
        Ok(Admitted {
            guard,
            would_reject,
        })
    }

    /// The last check, rate: run after the fleet check (SPEC §9's order),
    /// so a token is spent only by an admission. A refusal drops
    /// `admitted`'s guard, which gives back everything earlier checks took.
    ///
    /// # Errors
    /// [`RejectReason::Rate`] (only when enforcing).
    pub(crate) fn take_rate_token(&self, admitted: &mut Admitted) -> Result<(), RejectReason> {
        let policy = *lock(&self.inner.policy);
        if let Some(rate) = policy.rate {
            if !lock(&self.inner.bucket).try_take(rate, Instant::now()) {
                if policy.enforce {
                    return Err(RejectReason::Rate);
                }
                admitted.would_reject.get_or_insert(RejectReason::Rate);
            }
        }
        Ok(())
    }

    /// Reserves a slot without waiting; `None` when the cap is reached.
    /// Only the capacity check: [`Admission::admit`] runs all of them.
    pub(crate) fn try_reserve(&self) -> Option<AdmissionGuard> {
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
    fn reserve_over_cap(&self) -> AdmissionGuard {
        let now = self.inner.active.fetch_add(1, Ordering::AcqRel) + 1;
        self.slot_taken(now, self.inner.cap.load(Ordering::Acquire))
    }

    fn slot_taken(&self, active_now: usize, cap: usize) -> AdmissionGuard {
        let inner = &self.inner;
        inner.active_gauge.inc();
        let high = f64::from_bits(inner.high_bits.load(Ordering::Acquire));
        if cap > 0 && high > 0.0 && active_now as f64 >= high * cap as f64 {
            inner.judge_saturation();
        }
        AdmissionGuard {
            inner: Arc::clone(inner),
            ip: None,
            keys: Vec::new(),
            fleet: None,
        }
    }

    /// Changes the cap in place (0 = unlimited). Held slots are untouched.
    pub(crate) fn set_cap(&self, cap: usize) {
        self.inner.cap.store(cap, Ordering::Release);
        self.inner
            .max_gauge
            .set(i64::try_from(cap).unwrap_or(i64::MAX));
        self.recompute_saturation();
    }

    /// Replaces the policy in place. Held slots are untouched.
    pub(crate) fn set_policy(&self, policy: Policy) {
        let (high, low) = fraction_bits(policy.watermarks);
        self.inner.high_bits.store(high, Ordering::Release);
        self.inner.low_bits.store(low, Ordering::Release);
        if let Some(rate) = policy.rate {
            let mut bucket = lock(&self.inner.bucket);
            bucket.tokens = bucket.tokens.min(rate.burst);
        }
        *lock(&self.inner.policy) = policy;
        self.recompute_saturation();
    }

    /// After a cap or watermark change, judge saturation afresh.
    fn recompute_saturation(&self) {
        let _judging = lock(&self.inner.judging);
        let cap = self.cap();
        let high = f64::from_bits(self.inner.high_bits.load(Ordering::Acquire));
        let saturated = cap > 0 && high > 0.0 && self.active() as f64 >= high * cap as f64;
        self.inner.saturated.store(saturated, Ordering::Release);
    }

    /// The cap in force (0 = unlimited).
    pub(crate) fn cap(&self) -> usize {
        self.inner.cap.load(Ordering::Acquire)
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

    /// Live connections from `client` (for the unit and loom tests).
    #[cfg(test)]
    pub(crate) fn active_from(&self, client: IpAddr) -> usize {
        lock(&self.inner.per_ip).get(&client).copied().unwrap_or(0)
    }
}

impl Inner {
    /// Sets or clears `saturated` from the count as it is now, with
    /// hysteresis: set at the high watermark, cleared at the low one.
    fn judge_saturation(&self) {
        let _judging = lock(&self.judging);
        let cap = self.cap.load(Ordering::Acquire) as f64;
        let high = f64::from_bits(self.high_bits.load(Ordering::Acquire));
        let low = f64::from_bits(self.low_bits.load(Ordering::Acquire));
        let active = self.active.load(Ordering::Acquire) as f64;
        if cap > 0.0 && high > 0.0 && active >= high * cap {
            self.saturated.store(true, Ordering::Release);
        } else if active <= low * cap || high <= 0.0 {
            self.saturated.store(false, Ordering::Release);
        }
    }
}

/// Locks, ignoring poisoning: every critical section here leaves the data
/// consistent at each step, so a panic elsewhere cannot corrupt it.
#[cfg(not(loom))]
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(loom)]
fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AdmissionGuard {
    /// Gives the guard the connection's fleet hold, so it lives and ends
    /// with the slot.
    pub(crate) fn hold_fleet(&mut self, hold: FleetHold) {
        self.fleet = Some(hold);
    }

    /// The key values this connection holds, as `rule=value` separated by
    /// spaces, in rule order (the access log's `keys`; key values are
    /// visible ASCII, so a space cannot occur inside one).
    pub(crate) fn keys_text(&self) -> String {
        let mut text = String::new();
        for hold in &self.keys {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(hold.rule());
            text.push('=');
            text.push_str(hold.key());
        }
        text
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        // Key shares first: once the slot is free, a reconnect of the same
        // tenant must find its key share free too.
        self.keys.clear();
        // The fleet hold's release is queued for the worker at once.
        self.fleet = None;
        let inner = &self.inner;
        if let Some(ip) = self.ip {
            let mut per_ip = lock(&inner.per_ip);
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
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

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn admission(cap: usize, policy: Policy) -> Admission {
        let a = IntGauge::new("a", "a").expect("valid metric");
        let m = IntGauge::new("m", "m").expect("valid metric");
        Admission::new(cap, policy, a, m)
    }

    #[test]
    fn reserves_up_to_cap_then_refuses() {
        let a = admission(2, Policy::default());
        let g1 = a.admit(A).expect("slot 1");
        let _g2 = a.admit(A).expect("slot 2");
        assert_eq!(a.admit(B).err(), Some(RejectReason::Capacity));
        assert_eq!(a.active(), 2);
        drop(g1);
        assert_eq!(a.active(), 1);
        assert!(a.admit(B).is_ok());
    }

    #[test]
    fn zero_cap_is_unlimited() {
        let a = admission(0, Policy::default());
        let guards: Vec<_> = (0..1000).map(|_| a.try_reserve().expect("slot")).collect();
        assert_eq!(a.active(), 1000);
        drop(guards);
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn lowering_cap_only_stops_admissions() {
        let a = admission(3, Policy::default());
        let held: Vec<_> = (0..3).map(|_| a.try_reserve().expect("slot")).collect();
        a.set_cap(1);
        assert_eq!(a.active(), 3, "nothing admitted is dropped");
        assert!(a.try_reserve().is_none());
        drop(held);
        assert!(a.try_reserve().is_some());
    }

    #[test]
    fn gauge_follows_guards() {
        let a = admission(5, Policy::default());
        let g = a.try_reserve().expect("slot");
        assert_eq!(a.inner.active_gauge.get(), 1);
        assert_eq!(a.inner.max_gauge.get(), 5);
        drop(g);
        assert_eq!(a.inner.active_gauge.get(), 0);
    }

    #[test]
    fn per_ip_cap_counts_each_address_and_frees_on_drop() {
        let a = admission(
            0,
            Policy {
                max_per_ip: 2,
                ..Policy::default()
            },
        );
        let a1 = a.admit(A).expect("a1");
        let _a2 = a.admit(A).expect("a2");
        assert_eq!(a.admit(A).err(), Some(RejectReason::PerIp));
        assert_eq!(a.active(), 2, "the refused one holds no slot");
        let _b1 = a.admit(B).expect("another address is not affected");
        drop(a1);
        assert_eq!(a.active_from(A), 1);
        assert!(a.admit(A).is_ok());
    }

    #[test]
    fn capacity_is_checked_before_per_ip() {
        let a = admission(
            1,
            Policy {
                max_per_ip: 1,
                ..Policy::default()
            },
        );
        let _g = a.admit(A).expect("first");
        assert_eq!(a.admit(A).err(), Some(RejectReason::Capacity));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_admits_burst_then_steady_rate() {
        let rate = RateLimit {
            per_second: 10.0,
            burst: 5.0,
        };
        let a = admission(
            0,
            Policy {
                rate: Some(rate),
                ..Policy::default()
            },
        );
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(a.admit(A).expect("burst"));
        }
        assert_eq!(a.admit(A).err(), Some(RejectReason::Rate));
        assert_eq!(a.active(), 5, "a rate refusal holds no slot");
        tokio::time::advance(Duration::from_millis(100)).await;
        held.push(a.admit(A).expect("one token refilled after 100 ms"));
        assert_eq!(a.admit(A).err(), Some(RejectReason::Rate));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_admission_does_not_spend_a_rate_token() {
        let rate = RateLimit {
            per_second: 1.0,
            burst: 1.0,
        };
        let a = admission(
            1,
            Policy {
                rate: Some(rate),
                ..Policy::default()
            },
        );
        let g = a.admit(A).expect("first");
        assert_eq!(a.admit(B).err(), Some(RejectReason::Capacity));
        drop(g);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.admit(B).is_ok(), "the capacity refusal spent no token");
    }

    #[test]
    fn dry_run_admits_everything_and_names_the_first_refusal() {
        let a = admission(
            1,
            Policy {
                enforce: false,
                max_per_ip: 1,
                ..Policy::default()
            },
        );
        let g1 = a.admit(A).expect("first");
        assert_eq!(g1.would_reject, None);
        let g2 = a.admit(A).expect("dry run admits over the cap");
        assert_eq!(
            g2.would_reject,
            Some(RejectReason::Capacity),
            "first refusal wins"
        );
        assert_eq!(
            a.active(),
            2,
            "the gauge shows the real count, over the cap"
        );
        let g3 = a.admit(B).expect("dry run");
        assert_eq!(g3.would_reject, Some(RejectReason::Capacity));
        drop((g1, g2, g3));
        assert_eq!(a.active(), 0);
        assert_eq!(a.active_from(A), 0);
    }

    #[test]
    fn watermarks_have_hysteresis() {
        let w = Watermarks {
            high: 0.8,
            low: 0.5,
        };
        let a = admission(
            10,
            Policy {
                watermarks: Some(w),
                ..Policy::default()
            },
        );
        let mut held: Vec<_> = (0..7).map(|_| a.admit(A).expect("slot")).collect();
        assert!(!a.is_saturated());
        held.push(a.admit(A).expect("8th"));
        assert!(a.is_saturated(), "8/10 reaches 0.8");
        held.truncate(6);
        assert!(a.is_saturated(), "6/10 is above the low mark");
        held.truncate(5);
        assert!(!a.is_saturated(), "5/10 reaches the low mark");
        held.push(a.admit(A).expect("6th again"));
        assert!(!a.is_saturated(), "stays ready until the high mark again");
    }

    #[test]
    fn policy_and_cap_change_in_place() {
        let a = admission(10, Policy::default());
        let held: Vec<_> = (0..6).map(|_| a.admit(A).expect("slot")).collect();
        a.set_policy(Policy {
            max_per_ip: 3,
            watermarks: Some(Watermarks {
                high: 0.5,
                low: 0.2,
            }),
            ..Policy::default()
        });
        assert!(a.is_saturated(), "6/10 is past the new high mark");
        assert_eq!(
            a.admit(A).err(),
            Some(RejectReason::PerIp),
            "connections already open count"
        );
        assert_eq!(held.len(), 6);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_cap() {
        let a = admission(
            10,
            Policy {
                max_per_ip: 4,
                ..Policy::default()
            },
        );
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let a = a.clone();
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, t % 3));
                    for _ in 0..5_000 {
                        if let Ok(g) = a.admit(ip) {
                            peak.fetch_max(a.active(), Ordering::AcqRel);
                            assert!(a.active_from(ip) <= 4);
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
