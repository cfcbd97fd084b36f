//! How a WebSocket session ended, in the terms of docs/operations.md#access-log: who sent the
//! first Close frame (`closed_by`), why it ended (`end`), and the status
//! code and reason of that Close. Pure functions of the splice's
//! [`Outcome`]; the metrics and the access log (`access_log`) both read
//! the [`SessionEnd`] made here, so they cannot disagree.
//!
//! The rules, in order:
//! - the half-close timeout ended it: `half_close_timeout`, whoever closed;
//! - wsgate's own Close went out before any peer's: the cause that made
//!   wsgate close (`drain`, `admin_drain`, `lifetime`, `idle`, `size`,
//!   `rate`, `ping_timeout`, `send_timeout`, `shutdown`),
//!   `closed_by = wsgate`;
//! - a peer's Close came first: `client_close` / `upstream_close`, however
//!   TCP ended afterwards (a peer that closes and then resets has still
//!   closed the session);
//! - no Close at all: `keepalive` for a timed-out leg (TCP keepalive or
//!   `TCP_USER_TIMEOUT`), `client_eof` / `upstream_eof` for the side whose
//!   FIN or RST came first, `shutdown` for a cut at the second signal,
//!   `error` for any other failure; `closed_by = none`.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec};

use crate::config::CloseSettings;
use crate::metrics::{labels, Label, Registrar};
use crate::splice::{
    Cause, Ended, FirstClose, Guard, Leg, StopReason, Unresponsive, UNRESPONSIVE_CODE,
    UPSTREAM_GUARD_CODE,
};

labels! {
    /// Who sent a session's first Close frame (`closed_by`).
    pub(crate) enum ClosedBy {
        /// The client.
        Client => "client",
        /// The upstream.
        Upstream => "upstream",
        /// wsgate itself.
        Wsgate => "wsgate",
        /// Nobody: TCP ended without a Close frame.
        Nobody => "none",
    }
}

labels! {
    /// Why a session ended (`end`): the one vocabulary of the access log,
    /// `wsgate_sessions_ended_total` and the debug line each session ends with.
    pub(crate) enum End {
        /// The client's Close frame came first.
        ClientClose => "client_close",
        /// The upstream's Close frame came first.
        UpstreamClose => "upstream_close",
        /// No Close; the client's FIN or RST came first.
        ClientEof => "client_eof",
        /// No Close; the upstream's FIN or RST came first.
        UpstreamEof => "upstream_eof",
        /// The shutdown drain (`drain_period`).
        Drain => "drain",
        /// An operator's `POST /drain`.
        AdminDrain => "admin_drain",
        /// Shed by automatic rebalancing.
        Rebalance => "rebalance",
        /// `max_connection_lifetime`.
        Lifetime => "lifetime",
        /// `idle_timeout`.
        Idle => "idle",
        /// `max_message_size`, or `max_fragments`.
        Size => "size",
        /// `message_rate` with `message_rate_action = close`.
        Rate => "rate",
        /// The client sent nothing within `pong_timeout` of wsgate's Ping.
        PingTimeout => "ping_timeout",
        /// Bytes for the client waited `send_timeout` for its socket.
        SendTimeout => "send_timeout",
        /// One side finished and the other did not within `half_close_timeout`.
        HalfCloseTimeout => "half_close_timeout",
        /// A leg timed out: TCP keepalive or `TCP_USER_TIMEOUT`.
        Keepalive => "keepalive",
        /// The end of `shutdown_grace`, or a second signal.
        Shutdown => "shutdown",
        /// Any other failure.
        Error => "error",
    }
}

impl End {
    /// Whether a session can end this way with `closed_by` (the series
    /// created at start-up; the rules above make the others impossible).
    pub(crate) fn happens_with(self, closed_by: ClosedBy) -> bool {
        match self {
            End::ClientClose => closed_by == ClosedBy::Client,
            End::UpstreamClose => closed_by == ClosedBy::Upstream,
            End::ClientEof | End::UpstreamEof | End::Keepalive | End::Error => {
                closed_by == ClosedBy::Nobody
            }
            End::Drain
            | End::AdminDrain
            | End::Rebalance
            | End::Lifetime
            | End::Idle
            | End::Size
            | End::Rate
            | End::PingTimeout
            | End::SendTimeout => closed_by == ClosedBy::Wsgate,
            End::Shutdown => matches!(closed_by, ClosedBy::Wsgate | ClosedBy::Nobody),
            End::HalfCloseTimeout => closed_by != ClosedBy::Wsgate,
        }
    }
}

/// The status of the session's first Close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseStatus {
    /// No Close frame at all (the log says 1006, RFC 6455 §7.1.5).
    NoFrame,
    /// A Close frame without a status code (the log says 1005).
    NoCode,
    /// A Close frame with this code.
    Code(u16),
}

impl CloseStatus {
    /// The access log's `close_code`: always a number, 1005 and 1006
    /// standing for "no status" and "no Close frame" as RFC 6455 §7.1.5
    /// has APIs report them.
    pub(crate) fn logged(self) -> u16 {
        match self {
            CloseStatus::NoFrame => 1006,
            CloseStatus::NoCode => 1005,
            CloseStatus::Code(code) => code,
        }
    }

    /// The `code` label of `wsgate_close_codes_total`: bounded, whatever a
    /// peer sends (`1000`…`1015`, `3xxx`, `4xxx`, `none`, `other`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            CloseStatus::NoFrame => "none",
            CloseStatus::NoCode => "1005",
            CloseStatus::Code(code) => match code {
                1000..=1015 => ALL_CODE_LABELS[usize::from(code - 1000)],
                3000..=3999 => "3xxx",
                4000..=4999 => "4xxx",
                _ => "other",
            },
        }
    }
}

/// Every value of the `code` label: 1000–1015 each its own series (at
/// these positions), then the ranges and the two special values.
pub(crate) const ALL_CODE_LABELS: [&str; 20] = [
    "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011",
    "1012", "1013", "1014", "1015", "3xxx", "4xxx", "none", "other",
];

/// How a session ended, as the access log and the metrics report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionEnd {
    /// Who sent the first Close frame.
    pub(crate) closed_by: ClosedBy,
    /// Why it ended.
    pub(crate) end: End,
    /// The first Close frame's status.
    pub(crate) status: CloseStatus,
    /// The first Close frame's reason, escaped and bounded (see
    /// [`escape_reason`]).
    pub(crate) reason: String,
}

/// The longest reason a Close frame can carry, and the most the access log
/// writes of one after escaping.
pub(crate) const MAX_REASON: usize = 123;

impl SessionEnd {
    /// Reads the splice's outcome. `close` gives the codes wsgate sent for
    /// its own causes.
    pub(crate) fn of(
        ended: &Ended,
        first_close: Option<&FirstClose>,
        first_eof: Option<Leg>,
        close: Option<&CloseSettings>,
    ) -> SessionEnd {
        let (closed_by, status, reason) = match first_close {
            None => (ClosedBy::Nobody, CloseStatus::NoFrame, String::new()),
            Some(FirstClose::Peer(leg, frame)) => {
                let closed_by = match leg {
                    Leg::Client => ClosedBy::Client,
                    Leg::Upstream => ClosedBy::Upstream,
                };
                let (status, reason) = match frame {
                    Some(f) => (
                        f.code().map_or(CloseStatus::NoCode, CloseStatus::Code),
                        escape_reason(f.reason()),
                    ),
                    None => (CloseStatus::NoCode, String::new()),
                };
                (closed_by, status, reason)
            }
            Some(FirstClose::Wsgate(cause)) => {
                let (code, text) = sent_by_wsgate(*cause, close);
                (ClosedBy::Wsgate, CloseStatus::Code(code), text.to_owned())
            }
        };
        let end = match (ended, first_close) {
            (Ended::HalfCloseTimeout, _) => End::HalfCloseTimeout,
            (_, Some(FirstClose::Wsgate(cause))) => wsgate_end(*cause),
            (_, Some(FirstClose::Peer(Leg::Client, _))) => End::ClientClose,
            (_, Some(FirstClose::Peer(Leg::Upstream, _))) => End::UpstreamClose,
            // No Close frame from anyone.
            (Ended::Stopped(reason), None) => wsgate_end(Cause::Stop(*reason)),
            (Ended::Guard(guard), None) => wsgate_end(Cause::Guard(*guard)),
            (Ended::Unresponsive(why), None) => wsgate_end(Cause::Unresponsive(*why)),
            (Ended::Error(leg, e), None) => match e.kind() {
                io::ErrorKind::TimedOut => End::Keepalive,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::NotConnected => eof(*leg),
                _ => End::Error,
            },
            (Ended::Closed, None) => eof(first_eof.unwrap_or(Leg::Client)),
        };
        SessionEnd {
            closed_by,
            end,
            status,
            reason,
        }
    }
}

/// The end for a side whose FIN or RST came first.
fn eof(leg: Leg) -> End {
    match leg {
        Leg::Client => End::ClientEof,
        Leg::Upstream => End::UpstreamEof,
    }
}

/// The end for a cause that made wsgate close the session.
fn wsgate_end(cause: Cause) -> End {
    match cause {
        Cause::Stop(StopReason::Grace | StopReason::Abort) => End::Shutdown,
        Cause::Stop(StopReason::Drain) => End::Drain,
        Cause::Stop(StopReason::AdminDrain) => End::AdminDrain,
        Cause::Stop(StopReason::Rebalance) => End::Rebalance,
        Cause::Stop(StopReason::Lifetime) => End::Lifetime,
        Cause::Stop(StopReason::Idle) => End::Idle,
        Cause::Guard(Guard::Size | Guard::Fragments) => End::Size,
        Cause::Guard(Guard::Rate | Guard::Bytes) => End::Rate,
        Cause::Unresponsive(Unresponsive::Ping) => End::PingTimeout,
        Cause::Unresponsive(Unresponsive::Send) => End::SendTimeout,
    }
}

/// The code and reason wsgate sends the client for `cause` (wsgate sends
/// its own Close for a stop only with close settings: `close` is `Some`).
fn sent_by_wsgate(cause: Cause, close: Option<&CloseSettings>) -> (u16, &'static str) {
    match cause {
        Cause::Stop(reason) => (close.map_or(1001, |c| reason.code(c)), reason.close_text()),
        Cause::Guard(guard) => (guard.client_code(), guard.client_reason()),
        Cause::Unresponsive(why) => (UNRESPONSIVE_CODE, why.close_text()),
    }
}

/// A Close reason as the log writes it: invalid UTF-8 replaced by U+FFFD,
/// control characters (U+0000–U+001F, U+007F) written as `\xNN` so a
/// peer cannot forge log lines or move a terminal's cursor, and at most
/// [`MAX_REASON`] bytes, cut between characters (never inside an escape).
pub(crate) fn escape_reason(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len().min(MAX_REASON));
    for c in text.chars() {
        let escaped = c.is_ascii_control();
        let width = if escaped { 4 } else { c.len_utf8() };
        if out.len() + width > MAX_REASON {
            break;
        }
        if escaped {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Buckets for session lifetimes: WebSockets live from milliseconds to days.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// The series of ended sessions: `wsgate_sessions_ended_total{closed_by,end}`,
/// `wsgate_close_codes_total{closed_by,code}` and
/// `wsgate_connection_duration_seconds`. A handle per label pair, made on
/// first use (no label hashing per session after that); the pairs that
/// can happen are made at start-up so they are exported at 0.
#[derive(Debug, Clone)]
pub(crate) struct SessionMetrics {
    ended_vec: IntCounterVec,
    ended: Arc<[OnceLock<IntCounter>]>,
    codes_vec: IntCounterVec,
    codes: Arc<[OnceLock<IntCounter>]>,
    duration: Histogram,
}

impl SessionMetrics {
    /// Registers the session series, each pair that can happen at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        let slots = |n| (0..n).map(|_| OnceLock::new()).collect();
        let m = SessionMetrics {
            ended: slots(End::ALL.len() * ClosedBy::ALL.len()),
            codes: slots(ALL_CODE_LABELS.len() * ClosedBy::ALL.len()),
            ended_vec: r.counter_vec(
                "wsgate_sessions_ended_total",
                "WebSocket sessions ended, by who sent the first Close frame and why they ended",
                &["closed_by", "end"],
            )?,
            codes_vec: r.counter_vec(
                "wsgate_close_codes_total",
                "Status codes of the sessions' first Close frames (none = no Close frame)",
                &["closed_by", "code"],
            )?,
            duration: r.histogram(
                "wsgate_connection_duration_seconds",
                "Lifetime of spliced WebSocket connections",
                DURATION_BUCKETS,
            )?,
        };
        for &end in End::ALL {
            for &by in ClosedBy::ALL {
                if end.happens_with(by) {
                    m.ended_handle(by, end);
                }
            }
        }
        let none = CloseStatus::NoFrame.label();
        for (i, code) in ALL_CODE_LABELS.iter().enumerate() {
            if *code == none {
                m.code_handle(ClosedBy::Nobody, i);
            } else {
                m.code_handle(ClosedBy::Client, i);
                m.code_handle(ClosedBy::Upstream, i);
            }
        }
        // The codes wsgate sends whatever its settings: the guards' (and
        // the upstream's Close when a guard ends a session) and no Close
        // at all (a cut at the second signal).
        for &guard in Guard::ALL {
            m.code(ClosedBy::Wsgate, CloseStatus::Code(guard.client_code()));
        }
        m.code(ClosedBy::Wsgate, CloseStatus::Code(UPSTREAM_GUARD_CODE));
        m.code(ClosedBy::Wsgate, CloseStatus::Code(UNRESPONSIVE_CODE));
        m.code(ClosedBy::Wsgate, CloseStatus::NoFrame);
        Ok(m)
    }

    /// Makes the series of the codes wsgate is configured to send.
    pub(crate) fn expect_codes(&self, close: &CloseSettings) {
        for code in [close.drain, close.lifetime, close.idle] {
            self.code(ClosedBy::Wsgate, CloseStatus::Code(code));
        }
    }

    /// Counts one ended session that lived `lifetime`.
    pub(crate) fn count(&self, session: &SessionEnd, lifetime: Duration) {
        self.ended_handle(session.closed_by, session.end).inc();
        self.code(session.closed_by, session.status).inc();
        self.duration.observe(lifetime.as_secs_f64());
    }

    fn ended_handle(&self, by: ClosedBy, end: End) -> &IntCounter {
        let i = end.index() * ClosedBy::ALL.len() + by.index();
        self.ended[i].get_or_init(|| self.ended_vec.with_label_values(&[by.label(), end.label()]))
    }

    fn code(&self, by: ClosedBy, status: CloseStatus) -> &IntCounter {
        let label = status.label();
        let i = ALL_CODE_LABELS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(ALL_CODE_LABELS.len() - 1);
        self.code_handle(by, i)
    }

    fn code_handle(&self, by: ClosedBy, code: usize) -> &IntCounter {
        let i = code * ClosedBy::ALL.len() + by.index();
        self.codes[i].get_or_init(|| {
            self.codes_vec
                .with_label_values(&[by.label(), ALL_CODE_LABELS[code]])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{close_frame, FrameTracker};
    use std::time::Duration;

    const CLOSE: CloseSettings = CloseSettings {
        drain: 1001,
        lifetime: 1012,
        idle: 4000,
        rebalance: 1012,
        timeout: Duration::from_secs(2),
    };

    /// How a session ended, with wsgate's codes from `CLOSE`.
    fn end_of(ended: &Ended, first: Option<&FirstClose>, eof: Option<Leg>) -> SessionEnd {
        SessionEnd::of(ended, first, eof, Some(&CLOSE))
    }

    /// A peer's first Close as the tracker captures it from `frame`.
    fn peer(leg: Leg, frame: &[u8]) -> FirstClose {
        let mut t = FrameTracker::new();
        t.advance(frame);
        FirstClose::Peer(leg, t.take_first_close())
    }

    #[test]
    fn a_peer_close_names_the_peer_its_code_and_reason() {
        let first = peer(Leg::Client, &close_frame(1000, "bye", Some([9, 8, 7, 6])));
        let end = end_of(&Ended::Closed, Some(&first), Some(Leg::Upstream));
        assert_eq!(
            end,
            SessionEnd {
                closed_by: ClosedBy::Client,
                end: End::ClientClose,
                status: CloseStatus::Code(1000),
                reason: "bye".into(),
            }
        );
        // The same Close, then a reset: still the client's close.
        let reset = Ended::Error(Leg::Client, io::ErrorKind::ConnectionReset.into());
        let end = end_of(&reset, Some(&first), None);
        assert_eq!(
            (end.closed_by, end.end),
            (ClosedBy::Client, End::ClientClose)
        );

        let first = peer(Leg::Upstream, &close_frame(4000, "app says", None));
        let end = end_of(&Ended::Closed, Some(&first), Some(Leg::Upstream));
        assert_eq!(
            (end.closed_by, end.end, end.status, end.reason.as_str()),
            (
                ClosedBy::Upstream,
                End::UpstreamClose,
                CloseStatus::Code(4000),
                "app says"
            )
        );
        assert_eq!(end.status.label(), "4xxx");
    }

    #[test]
    fn a_close_without_a_status_is_1005_and_no_close_is_1006() {
        let first = peer(Leg::Client, &[0x88, 0x00]);
        let end = end_of(&Ended::Closed, Some(&first), None);
        assert_eq!(end.status, CloseStatus::NoCode);
        assert_eq!((end.status.logged(), end.status.label()), (1005, "1005"));
        let end = end_of(&Ended::Closed, None, Some(Leg::Upstream));
        assert_eq!(
            (
                end.closed_by,
                end.end,
                end.status.logged(),
                end.status.label()
            ),
            (ClosedBy::Nobody, End::UpstreamEof, 1006, "none")
        );
    }

    #[test]
    fn without_a_close_the_failure_says_how_tcp_ended() {
        let cases = [
            (io::ErrorKind::TimedOut, Leg::Client, End::Keepalive),
            (io::ErrorKind::ConnectionReset, Leg::Client, End::ClientEof),
            (io::ErrorKind::BrokenPipe, Leg::Upstream, End::UpstreamEof),
            (io::ErrorKind::PermissionDenied, Leg::Upstream, End::Error),
        ];
        for (kind, leg, want) in cases {
            let end = end_of(&Ended::Error(leg, kind.into()), None, None);
            assert_eq!(
                (end.end, end.closed_by),
                (want, ClosedBy::Nobody),
                "{kind:?}"
            );
        }
        let end = end_of(&Ended::HalfCloseTimeout, None, Some(Leg::Client));
        assert_eq!(
            (end.end, end.closed_by),
            (End::HalfCloseTimeout, ClosedBy::Nobody)
        );
        let cut = Ended::Stopped(StopReason::Abort);
        let end = end_of(&cut, None, None);
        assert_eq!(
            (end.end, end.closed_by, end.status),
            (End::Shutdown, ClosedBy::Nobody, CloseStatus::NoFrame)
        );
    }

    #[test]
    fn wsgate_names_its_cause_and_the_code_it_sent() {
        let cases = [
            (Cause::Stop(StopReason::Drain), End::Drain, 1001),
            (Cause::Stop(StopReason::AdminDrain), End::AdminDrain, 1001),
            (Cause::Stop(StopReason::Rebalance), End::Rebalance, 1012),
            (Cause::Stop(StopReason::Grace), End::Shutdown, 1001),
            (Cause::Stop(StopReason::Lifetime), End::Lifetime, 1012),
            (Cause::Stop(StopReason::Idle), End::Idle, 4000),
            (Cause::Guard(Guard::Size), End::Size, 1009),
            (Cause::Guard(Guard::Fragments), End::Size, 1009),
            (Cause::Guard(Guard::Rate), End::Rate, 1008),
            (
                Cause::Unresponsive(Unresponsive::Ping),
                End::PingTimeout,
                1001,
            ),
            (
                Cause::Unresponsive(Unresponsive::Send),
                End::SendTimeout,
                1001,
            ),
        ];
        for (cause, want, code) in cases {
            // Even when a peer then resets instead of replying.
            for ended in [
                cause.ended(),
                Ended::Error(Leg::Client, io::ErrorKind::ConnectionReset.into()),
            ] {
                let end = end_of(&ended, Some(&FirstClose::Wsgate(cause)), None);
                assert_eq!(
                    (end.end, end.closed_by, end.status),
                    (want, ClosedBy::Wsgate, CloseStatus::Code(code)),
                    "{cause:?}"
                );
                assert!(!end.reason.is_empty());
                assert!(want.happens_with(end.closed_by));
            }
        }
        // A stop that found the peers already closing: the peer closed it.
        let first = peer(Leg::Upstream, &close_frame(1000, "", None));
        let end = end_of(&Ended::Stopped(StopReason::Drain), Some(&first), None);
        assert_eq!(
            (end.end, end.closed_by),
            (End::UpstreamClose, ClosedBy::Upstream)
        );
    }

    #[test]
    fn code_labels_are_bounded() {
        let label = |c| CloseStatus::Code(c).label();
        assert_eq!(
            [
                label(1000),
                label(1015),
                label(1016),
                label(2999),
                label(3000)
            ],
            ["1000", "1015", "other", "other", "3xxx"]
        );
        assert_eq!(
            [label(4999), label(5000), label(0)],
            ["4xxx", "other", "other"]
        );
        for l in [
            label(1000),
            label(1015),
            label(3999),
            label(4000),
            label(65535),
        ] {
            assert!(ALL_CODE_LABELS.contains(&l));
        }
    }

    #[test]
    fn reasons_are_escaped_and_bounded() {
        assert_eq!(escape_reason(b"a\x1b[31m\nb\x7f"), "a\\x1b[31m\\x0ab\\x7f");
        assert_eq!(escape_reason(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
        // 123 bytes with control characters: escaped, still at most 123.
        let mut raw = b"\x1b[2J\r\n".to_vec();
        raw.resize(123, b'x');
        let out = escape_reason(&raw);
        assert!(out.len() <= MAX_REASON, "{} bytes", out.len());
        assert!(out.starts_with("\\x1b[2J\\x0d\\x0a") && out.ends_with('x'));
        assert!(!out.chars().any(|c| c.is_control()));
        // Never cut inside an escape or a character.
        let out = escape_reason(&[b'\n'; 100]);
        assert_eq!(out.len(), 120);
        let out = escape_reason("é".repeat(70).as_bytes());
        assert_eq!(out.len(), 122);
    }

    #[test]
    fn every_end_happens_with_some_closer() {
        for end in End::ALL {
            assert!(
                ClosedBy::ALL.iter().any(|c| end.happens_with(*c)),
                "{end:?}"
            );
        }
    }
}
