//! Per client address: concurrent connections per address
//! (`max_clients_per_ip`); [`IpHold`] is one connection's share.
//!
//! The client is the socket peer, or the `trusted_hops`-th `X-Forwarded-For`
//! entry from the right (`headers::client_address`). Counts are kept even
//! with the cap off, so a cap switched on by a reload sees the connections
//! already open. Loom model-checks this file (`tests/loom_admission.rs`).

use std::collections::HashMap;
use std::net::IpAddr;

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(loom)]
use loom::sync::{Arc, Mutex};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::{Arc, Mutex};

use super::capacity::lock;
use super::outcome::{RejectReason, Verdict};

/// Live connections per client address, and the cap on them.
#[derive(Debug, Clone)]
pub(crate) struct PerIp {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// 0 = off.
    max: AtomicUsize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its address's count. Dropping it gives the
/// share back (and forgets the address once its count is 0).
#[derive(Debug)]
#[must_use = "dropping the hold gives the share back at once"]
pub(crate) struct IpHold {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts with a cap of `max` per address (0 = off).
    pub(crate) fn new(max: usize) -> Self {
        PerIp {
            inner: Arc::new(Inner {
                max: AtomicUsize::new(max),
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The per-IP check for a connection from `client`: takes its share.
    /// Over the cap, dry run (`take_anyway`) takes it all the same.
    pub(crate) fn check(&self, client: IpAddr, take_anyway: bool) -> Verdict<IpHold> {
        let max = self.inner.max.load(Ordering::Acquire);
        let mut counts = lock(&self.inner.counts);
        let count = counts.entry(client).or_insert(0);
        let over = max > 0 && *count >= max;
        if over && !take_anyway {
            return Verdict::over(RejectReason::PerIp);
        }
        *count += 1;
        let hold = IpHold {
            inner: Arc::clone(&self.inner),
            ip: client,
        };
        if over {
            Verdict::over_taking(RejectReason::PerIp, Some(hold))
        } else {
            Verdict::Pass(hold)
        }
    }

    /// Changes the cap in place; connections already open keep their share.
    pub(crate) fn set_max(&self, max: usize) {
        self.inner.max.store(max, Ordering::Release);
    }

    /// Live connections from `client` (tests and the loom model).
    #[cfg(any(test, loom))]
    pub(crate) fn active_from(&self, client: IpAddr) -> usize {
        lock(&self.inner.counts).get(&client).copied().unwrap_or(0)
    }
}

impl Drop for IpHold {
    fn drop(&mut self) {
        let mut counts = lock(&self.inner.counts);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn pass(v: Verdict<IpHold>) -> IpHold {
        match v {
            Verdict::Pass(h) => h,
            Verdict::Over { .. } => panic!("refused"),
        }
    }

    #[test]
    fn counts_each_address_and_frees_on_drop() {
        let p = PerIp::new(2);
        let a1 = pass(p.check(A, false));
        let _a2 = pass(p.check(A, false));
        assert!(matches!(
            p.check(A, false),
            Verdict::Over { taken: None, .. }
        ));
        assert_eq!(p.active_from(A), 2, "the refused one holds no share");
        let _b1 = pass(p.check(B, false));
        drop(a1);
        assert_eq!(p.active_from(A), 1);
        assert!(matches!(p.check(A, false), Verdict::Pass(_)));
    }

    #[test]
    fn counts_with_the_cap_off_so_a_reload_sees_open_connections() {
        let p = PerIp::new(0);
        let held: Vec<_> = (0..3).map(|_| pass(p.check(A, false))).collect();
        p.set_max(3);
        assert!(matches!(p.check(A, false), Verdict::Over { .. }));
        drop(held);
        assert_eq!(p.active_from(A), 0);
    }

    #[test]
    fn dry_run_takes_the_share_over_the_cap() {
        let p = PerIp::new(1);
        let _a1 = pass(p.check(A, true));
        let Verdict::Over { taken, .. } = p.check(A, true) else {
            panic!("over")
        };
        assert_eq!(p.active_from(A), 2);
        drop(taken);
        assert_eq!(p.active_from(A), 1);
    }

    #[test]
    fn concurrent_holds_never_pass_the_cap() {
        let p = PerIp::new(4);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, t % 3));
                    for _ in 0..5_000 {
                        if let Verdict::Pass(h) = p.check(ip, false) {
                            assert!(p.active_from(ip) <= 4);
                            drop(h);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for t in 0..3 {
            assert_eq!(
                p.active_from(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, t))),
                0
            );
        }
    }
}
