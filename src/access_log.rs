//! The access log (docs/operations.md#access-log), tracing target `wsgate::access`: one record
//! per WebSocket session at its end, and refusals summarised, never one
//! line each.
//!
//! Why a summary: refusals come in storms (a full pod, a reconnect wave, a
//! client in a retry loop), and a line per refusal would turn a storm of
//! cheap 503s into a storm of log writes, the costliest thing wsgate does
//! per refusal. The first refusal after a quiet time opens a summary window
//! (`crate::summary`); at its end one line gives the window's counts by
//! reason; the exit flushes what is pending. A timer exists only while a
//! window is open.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::admission::RejectReason;
use crate::error::UpstreamErrorKind;
use crate::metrics::Label;
use crate::session::SessionEnd;
use crate::splice::Traffic;
use crate::summary::Window;

/// The tracing target of every access-log line.
pub(crate) const TARGET: &str = "wsgate::access";

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
///
/// The message is a `message` field of its own, a `&str` rather than
/// `format_args!`, and the id and the address are formatted on the stack:
/// the same bytes in either format, less of `core::fmt` per record.
pub(crate) fn session(info: &SessionInfo, end: &SessionEnd, traffic: &Traffic, took: Duration) {
    tracing::info!(
        target: TARGET,
        message = "session",
        session = %StackText::hex(info.id),
        client = %StackText::ip(info.client),
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
    );
}

/// A short text made on the stack and written as it is by `Display`: the
/// session id as 16 hex digits, the client's address. Through `core::fmt`
/// (`{:016x}`, `Ipv4Addr`'s `Display`) these two fields were a fifth of
/// the record's cost; IPv6 addresses, rarer, still go through `Display`.
#[derive(Clone, Copy)]
struct StackText {
    /// Room for the longest IPv6 text.
    bytes: [u8; 45],
    len: usize,
}

impl StackText {
    const EMPTY: StackText = StackText {
        bytes: [0; 45],
        len: 0,
    };

    /// `n` as `{:016x}` writes it.
    fn hex(n: u64) -> StackText {
        let mut text = StackText::EMPTY;
        for shift in (0..16).rev() {
            // A nibble: the cast cannot truncate.
            text.push(b"0123456789abcdef"[(n >> (4 * shift) & 0xf) as usize]);
        }
        text
    }

    /// `addr` as its `Display` writes it.
    fn ip(addr: IpAddr) -> StackText {
        let mut text = StackText::EMPTY;
        match addr {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            // At most 45 bytes: the write cannot fail.
            IpAddr::V6(v6) => {
                let _ = write!(text, "{v6}");
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        // Only ASCII was written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl fmt::Display for StackText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    window: Window<SLOTS>,
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
        if self.inner.off.load(Ordering::Relaxed) {
            return;
        }
        let this = self.clone();
        self.inner
            .window
            .count(refusal.slot(), move || this.flush());
    }

    /// Writes one line with the counts since the last, if there are any,
    /// and closes the window (at its end, and once more at exit). Every
    /// reason is a field of its own (`summary_names_every_reason` checks
    /// that none is left out).
    pub(crate) fn flush(&self) {
        let Some(c) = self.inner.window.take() else {
            return;
        };
        let rejected = |r: RejectReason| c.of(Refusal::Rejected(r).slot());
        let upstream = |k| c.of(Refusal::Upstream(k).slot());
        tracing::info!(
            target: TARGET,
            window_s = c.window_s,
            total = c.total,
            bad_path = rejected(RejectReason::BadPath),
            capacity = rejected(RejectReason::Capacity),
            r#loop = rejected(RejectReason::Loop),
            origin = rejected(RejectReason::Origin),
            subprotocol = rejected(RejectReason::Subprotocol),
            draining = rejected(RejectReason::Draining),
            rate = rejected(RejectReason::Rate),
            per_ip = rejected(RejectReason::PerIp),
            key = rejected(RejectReason::Key),
            key_missing = rejected(RejectReason::KeyMissing),
            key_ambiguous = rejected(RejectReason::KeyAmbiguous),
            key_table_full = rejected(RejectReason::KeyTableFull),
            jwt = rejected(RejectReason::Jwt),
            fleet = rejected(RejectReason::Fleet),
            fleet_unavailable = rejected(RejectReason::FleetUnavailable),
            bad_handshake = c.of(Refusal::BadHandshake.slot()),
            upstream_connect = upstream(UpstreamErrorKind::Connect),
            upstream_timeout = upstream(UpstreamErrorKind::Timeout),
            upstream_refused = upstream(UpstreamErrorKind::RefusedUpgrade),
            upstream_bad_subprotocol = upstream(UpstreamErrorKind::BadSubprotocol),
            "refusals"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    use crate::config::LogFormat;
    use crate::log_format;
    use crate::session::{CloseStatus, ClosedBy, End};

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line of a window in which each reason was counted once.
    fn summary_of(refusals: &[Refusal]) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let r = Refusals::default();
            for refusal in refusals {
                r.count(*refusal);
            }
            r.flush();
        });
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn summary_names_every_reason() {
        let all: Vec<Refusal> = RejectReason::ALL
            .iter()
            .map(|r| Refusal::Rejected(*r))
            .chain([Refusal::BadHandshake])
            .chain(UpstreamErrorKind::ALL.iter().map(|k| Refusal::Upstream(*k)))
            .collect();
        let line = summary_of(&all);
        assert!(line.contains(&format!("total={SLOTS}")), "{line}");
        for r in RejectReason::ALL {
            assert!(
                line.contains(&format!(" {}=1", r.label())),
                "{} missing: {line}",
                r.label()
            );
        }
        for field in [
            "bad_handshake",
            "upstream_connect",
            "upstream_timeout",
            "upstream_refused",
            "upstream_bad_subprotocol",
        ] {
            assert!(
                line.contains(&format!(" {field}=1")),
                "{field} missing: {line}"
            );
        }
    }

    /// What `session` is given about an ended session.
    type Ended = (SessionInfo, SessionEnd, Traffic, Duration);

    /// What `session` writes through wsgate's own subscriber
    /// (`log_format::dispatch`, not a terminal) in `format` under the
    /// filter directives `filter`.
    fn record_of(format: LogFormat, filter: &str, (info, end, traffic, took): &Ended) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let filter = crate::config::log_filter(filter).expect("filter");
        let dispatch = log_format::dispatch(format, filter, false, move || writer.clone());
        tracing::dispatcher::with_default(&dispatch, || session(info, end, traffic, *took));
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    /// `text` with its timestamp (RFC 3339, microseconds, UTC: the one
    /// part that differs from run to run) checked for shape and replaced
    /// by `<time>`.
    fn timeless(text: &str, at: usize) -> String {
        let stamp = &text.as_bytes()[at..at + 27];
        let shape = b"0000-00-00T00:00:00.000000Z";
        let fits = stamp.iter().zip(shape).all(|(&b, &s)| {
            if s == b'0' {
                b.is_ascii_digit()
            } else {
                b == s
            }
        });
        assert!(fits, "no timestamp at {at}: {text}");
        format!("{}<time>{}", &text[..at], &text[at + 27..])
    }

    /// A session like most: IPv4 client, a Close each way.
    fn common() -> Ended {
        (
            SessionInfo {
                id: 0x00ab_cdef_0123_4567,
                client: IpAddr::from([10, 1, 2, 3]),
                path: "/chat".into(),
                subprotocol: "".into(),
                keys: "".into(),
            },
            SessionEnd {
                closed_by: ClosedBy::Client,
                end: End::ClientClose,
                status: CloseStatus::Code(1000),
                reason: "bye".into(),
            },
            Traffic {
                bytes_in: 10,
                bytes_out: 2_345,
                msgs_in: 1,
                msgs_out: 20,
            },
            Duration::from_micros(1_234_567),
        )
    }

    /// Every value at an edge: an IPv6 client, strings to escape, the
    /// largest numbers, no Close frame.
    fn awkward() -> Ended {
        (
            SessionInfo {
                id: u64::MAX,
                client: "2001:db8::ff:1".parse().expect("ip"),
                path: "/a \"b\"\\c/é".into(),
                subprotocol: "chat.v2".into(),
                keys: "ip=10.0.0.1 tenant=acme".into(),
            },
            SessionEnd {
                closed_by: ClosedBy::Nobody,
                end: End::ClientEof,
                status: CloseStatus::NoFrame,
                reason: "tab\\x09 \u{a0}\u{7f} ü".into(),
            },
            Traffic {
                bytes_in: u64::MAX,
                bytes_out: 0,
                msgs_in: 0,
                msgs_out: u64::MAX,
            },
            Duration::MAX,
        )
    }

    /// The bytes of a text record, as wsgate wrote them before the record
    /// was made cheaper (the timestamp aside): any change is a change of
    /// output.
    #[test]
    fn text_record_bytes_are_pinned() {
        let at = |r: Ended| timeless(&record_of(LogFormat::Text, "info", &r), 0);
        assert_eq!(
            at(common()),
            "<time>  INFO wsgate::access: session session=00abcdef01234567 client=10.1.2.3 \
             path=\"/chat\" subprotocol=\"\" keys=\"\" duration_ms=1234 bytes_in=10 \
             bytes_out=2345 msgs_in=1 msgs_out=20 close_code=1000 close_reason=\"bye\" \
             closed_by=\"client\" end=\"client_close\"\n"
        );
        assert_eq!(
            at(awkward()),
            concat!(
                r#"<time>  INFO wsgate::access: session session=ffffffffffffffff "#,
                r#"client=2001:db8::ff:1 path="/a \"b\"\\c/é" subprotocol="chat.v2" "#,
                r#"keys="ip=10.0.0.1 tenant=acme" duration_ms=18446744073709551615 "#,
                r#"bytes_in=18446744073709551615 bytes_out=0 msgs_in=0 "#,
                r#"msgs_out=18446744073709551615 close_code=1006 "#,
                r#"close_reason="tab\\x09 \u{a0}\u{7f} ü" closed_by="none" end="client_eof""#,
                "\n"
            )
        );
    }

    /// The bytes of a JSON record, as for the text one.
    #[test]
    fn json_record_bytes_are_pinned() {
        let at = |r: Ended| timeless(&record_of(LogFormat::Json, "info", &r), 14);
        assert_eq!(
            at(common()),
            "{\"timestamp\":\"<time>\",\"level\":\"INFO\",\"message\":\"session\",\
             \"session\":\"00abcdef01234567\",\"client\":\"10.1.2.3\",\"path\":\"/chat\",\
             \"subprotocol\":\"\",\"keys\":\"\",\"duration_ms\":1234,\"bytes_in\":10,\
             \"bytes_out\":2345,\"msgs_in\":1,\"msgs_out\":20,\"close_code\":1000,\
             \"close_reason\":\"bye\",\"closed_by\":\"client\",\"end\":\"client_close\",\
             \"target\":\"wsgate::access\"}\n"
        );
        assert_eq!(
            at(awkward()),
            concat!(
                r#"{"timestamp":"<time>","level":"INFO","message":"session","#,
                r#""session":"ffffffffffffffff","client":"2001:db8::ff:1","#,
                r#""path":"/a \"b\"\\c/é","subprotocol":"chat.v2","#,
                r#""keys":"ip=10.0.0.1 tenant=acme","duration_ms":18446744073709551615,"#,
                r#""bytes_in":18446744073709551615,"bytes_out":0,"msgs_in":0,"#,
                r#""msgs_out":18446744073709551615,"close_code":1006,"#,
                r#""close_reason":"tab\\x09 "#,
                "\u{a0}\u{7f}",
                r#" ü","closed_by":"none","end":"client_eof","target":"wsgate::access"}"#,
                "\n"
            )
        );
    }

    /// `log_level` / `RUST_LOG` directives still turn the record off by
    /// target or level, in both formats.
    #[test]
    fn filters_turn_the_record_off() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for filter in [
                "info,wsgate::access=off",
                "warn",
                "wsgate=info,wsgate::access=warn",
            ] {
                assert_eq!(record_of(format, filter, &common()), "", "{filter}");
            }
            for filter in ["off,wsgate::access=info", "wsgate::access"] {
                assert!(
                    record_of(format, filter, &common()).contains("session"),
                    "{filter}"
                );
            }
        }
    }

    #[test]
    fn stack_text_is_what_fmt_writes() {
        for n in [0, 1, 0xabc, 0x00ab_cdef_0123_4567, u64::MAX >> 4, u64::MAX] {
            assert_eq!(StackText::hex(n).as_str(), format!("{n:016x}"));
        }
        let v4 = (0..=255_u8).flat_map(|o| {
            [
                IpAddr::from([o, 0, 0, 1]),
                IpAddr::from([10, o, 99, 100]),
                IpAddr::from([255, 9, o, o]),
            ]
        });
        let v6 = [
            "::",
            "::1",
            "2001:db8::ff:1",
            "fe80::1:2:3:4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::192.0.2.33",
            "1:0:0:1::1",
        ]
        .map(|a| a.parse::<IpAddr>().expect("ip"));
        for addr in v4.chain(v6) {
            assert_eq!(StackText::ip(addr).as_str(), addr.to_string());
        }
    }

    #[tokio::test]
    async fn off_counts_nothing() {
        let r = Refusals::default();
        r.set_enabled(false);
        r.count(Refusal::Rejected(RejectReason::Rate));
        assert_eq!(r.inner.window.pending(), 0);
        assert!(!r.inner.window.is_open());
    }
}
