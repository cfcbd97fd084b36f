//! The access log (docs/operations.md#access-log), tracing target `wsgate::access`: one record
//! per WebSocket session at its end, and refusals summarised, never one
//! line each.
//!
//! Why a summary: refusals come in storms (a full pod, a reconnect wave, a
//! client in a retry loop), and a line per refusal would turn a storm of
//! cheap 503s into a storm of log writes, the costliest thing wsgate does
//! per refusal. The first refusal after a quiet time opens a window of
//! [`SUMMARY_WINDOW`]; at its end one line gives the window's counts by
//! reason; the exit flushes what is pending. A timer exists only while a
//! window is open.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::RejectReason;
use crate::error::UpstreamErrorKind;
use crate::metrics::Label;
use crate::session::SessionEnd;
use crate::splice::Traffic;

/// The tracing target of every access-log line.
pub(crate) const TARGET: &str = "wsgate::access";

/// How long a refusal summary window lasts.
pub(crate) const SUMMARY_WINDOW: Duration = Duration::from_secs(10);

/// What the record says about a session besides how it ended: taken at
/// the upgrade, kept (boxed, one allocation) for the session's life, and
/// only when the access log is on.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    /// Random, so records of different pods and restarts do not collide.
    pub(crate) id: u64,
    /// The client's address after `trusted_hops`.
    pub(crate) client: IpAddr,
    /// The request path, without the query string (which may carry tokens).
    pub(crate) path: Box<str>,
    /// The subprotocol the upstream chose, or empty.
    pub(crate) subprotocol: Box<str>,
    /// `rule=value` for each key rule the session fell under.
    pub(crate) keys: Box<str>,
}

/// Writes a session's record.
pub(crate) fn session(info: &SessionInfo, end: &SessionEnd, traffic: &Traffic, took: Duration) {
    tracing::info!(
        target: TARGET,
        session = %format_args!("{:016x}", info.id),
        client = %info.client,
        path = &*info.path,
        subprotocol = &*info.subprotocol,
        keys = &*info.keys,
        duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        bytes_in = traffic.bytes_in,
        bytes_out = traffic.bytes_out,
        msgs_in = traffic.msgs_in,
        msgs_out = traffic.msgs_out,
        close_code = end.status.logged(),
        close_reason = end.reason.as_str(),
        closed_by = end.closed_by.label(),
        end = end.end.label(),
        "session"
    );
}

/// Why an upgrade did not become a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// wsgate refused it (`wsgate_connections_rejected_total{reason}`).
    Rejected(RejectReason),
    /// A malformed handshake (400).
    BadHandshake,
    /// The upstream failed or declined (502, 504, its own answer).
    Upstream(UpstreamErrorKind),
}

/// Slots: every reject reason, then the bad handshake, then the upstream kinds.
const SLOTS: usize = RejectReason::ALL.len() + 1 + UpstreamErrorKind::ALL.len();

impl Refusal {
    fn slot(self) -> usize {
        match self {
            Refusal::Rejected(r) => r.index(),
            Refusal::BadHandshake => RejectReason::ALL.len(),
            Refusal::Upstream(k) => RejectReason::ALL.len() + 1 + k.index(),
        }
    }
}

/// Counts refusals and writes the summaries; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refusals {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counts: [AtomicU64; SLOTS],
    /// A window is open (its flush is scheduled).
    open: AtomicBool,
    /// When the open window began.
    since: Mutex<Option<Instant>>,
    /// `access_log`; off = nothing counted, nothing written.
    off: AtomicBool,
}

impl Refusals {
    /// Turns the summaries on or off (`access_log`, applied on reload).
    pub(crate) fn set_enabled(&self, on: bool) {
        self.inner.off.store(!on, Ordering::Relaxed);
    }

    /// Counts one refusal; the first of a window schedules its summary.
    pub(crate) fn count(&self, refusal: Refusal) {
        let inner = &*self.inner;
        if inner.off.load(Ordering::Relaxed) {
            return;
        }
        inner.counts[refusal.slot()].fetch_add(1, Ordering::Relaxed);
        if inner.open.swap(true, Ordering::AcqRel) {
            return;
        }
        *inner.since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SUMMARY_WINDOW).await;
            this.flush();
        });
    }

    /// Writes one line with the counts since the last, if there are any,
    /// and closes the window (at its end, and once more at exit).
    pub(crate) fn flush(&self) {
        let inner = &*self.inner;
        // Closed before the counts are taken: a refusal in between opens a
        // new window and is either in this line or in that one's.
        let since = inner
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        inner.open.store(false, Ordering::Release);
        let counts: [u64; SLOTS] =
            std::array::from_fn(|i| inner.counts[i].swap(0, Ordering::Relaxed));
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        let window_s = since.map_or(SUMMARY_WINDOW.as_secs(), |s| s.elapsed().as_secs().max(1));
        let n = |r: Refusal| Some(counts[r.slot()]).filter(|c| *c > 0);
        let rejected = |r| n(Refusal::Rejected(r));
        let upstream = |k| n(Refusal::Upstream(k));
        tracing::info!(
            target: TARGET,
            window_s,
            total,
            capacity = rejected(RejectReason::Capacity),
            draining = rejected(RejectReason::Draining),
            rate = rejected(RejectReason::Rate),
            per_ip = rejected(RejectReason::PerIp),
            key = rejected(RejectReason::Key),
            key_missing = rejected(RejectReason::KeyMissing),
            key_table_full = rejected(RejectReason::KeyTableFull),
            jwt = rejected(RejectReason::Jwt),
            fleet = rejected(RejectReason::Fleet),
            fleet_unavailable = rejected(RejectReason::FleetUnavailable),
            bad_handshake = n(Refusal::BadHandshake),
            upstream_connect = upstream(UpstreamErrorKind::Connect),
            upstream_timeout = upstream(UpstreamErrorKind::Timeout),
            upstream_refused = upstream(UpstreamErrorKind::RefusedUpgrade),
            "refusals"
        );
    }

    /// The counts not yet written, by slot (tests).
    #[cfg(test)]
    fn pending(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_one_line_per_window() {
        let r = Refusals::default();
        for _ in 0..10_000 {
            r.count(Refusal::Rejected(RejectReason::Capacity));
        }
        r.count(Refusal::Upstream(UpstreamErrorKind::Timeout));
        assert_eq!(r.pending(), 10_001);
        tokio::time::sleep(SUMMARY_WINDOW + Duration::from_millis(1)).await;
        assert_eq!(r.pending(), 0, "the window's line took the counts");
        assert!(!r.inner.open.load(Ordering::Relaxed));
        // The next refusal opens a new window.
        r.count(Refusal::BadHandshake);
        assert!(r.inner.open.load(Ordering::Relaxed));
        r.flush();
        assert_eq!(r.pending(), 0);
    }

    #[tokio::test]
    async fn off_counts_nothing() {
        let r = Refusals::default();
        r.set_enabled(false);
        r.count(Refusal::Rejected(RejectReason::Rate));
        assert_eq!(r.pending(), 0);
        assert!(!r.inner.open.load(Ordering::Relaxed));
    }
}
