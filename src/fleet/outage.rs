//! What the log says while Redis cannot be reached: the class of the cause
//! (an operator's first question: DNS, a closed port, a firewall, TLS, the
//! password), a warning when an outage begins and again each minute while
//! it lasts (the worker retries twice a second: a line per retry would
//! flood the log), and one line when Redis is back.
//!
//! [`Outage`] is the bookkeeping alone, with the time passed in, so its
//! rhythm is tested without waiting minutes.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How often a Redis that stays unreachable is reported again.
pub(super) const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why a connection attempt failed, as an operator would look for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port (or a firewall rejects).
    Refused,
    /// No answer in time (a firewall that drops, a stopped server).
    TimedOut,
    /// The TLS handshake failed (certificate, name, a plain-text server).
    Tls,
    /// The password or user was refused, or a password is required.
    Authentication,
    /// Anything else; the error's own text says more.
    Other,
}

impl Cause {
    /// The class as the log writes it.
    pub(super) fn text(self) -> &'static str {
        match self {
            Cause::Dns => "DNS resolution failed",
            Cause::Refused => "connection refused",
            Cause::TimedOut => "timed out",
            Cause::Tls => "TLS handshake failed",
            Cause::Authentication => "authentication failed",
            Cause::Other => "other error",
        }
    }

    /// The class of a failed attempt; `tls` when the URL asks for TLS
    /// (`rediss://`, `valkeys://`), where malformed data means the
    /// handshake failed.
    pub(super) fn of(e: &redis::RedisError, tls: bool) -> Cause {
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        {
            return Cause::Authentication;
        }
        if e.is_connection_refusal() {
            return Cause::Refused;
        }
        if e.is_timeout() {
            return Cause::TimedOut;
        }
        let text = e.to_string();
        // getaddrinfo's failures have no io::ErrorKind of their own.
        if text.contains("No address found for host") || text.contains("failed to lookup address") {
            return Cause::Dns;
        }
        match io_error(e).map(std::io::Error::kind) {
            Some(std::io::ErrorKind::ConnectionRefused) => return Cause::Refused,
            Some(std::io::ErrorKind::TimedOut) => return Cause::TimedOut,
            // rustls reports a failed handshake (certificate, name, a peer
            // that does not speak TLS) as malformed data.
            Some(std::io::ErrorKind::InvalidData) if tls => return Cause::Tls,
            _ => {}
        }
        let lower = text.to_ascii_lowercase();
        if tls
            && ["certificate", "tls", "dns name"]
                .iter()
                .any(|w| lower.contains(w))
        {
            return Cause::Tls;
        }
        Cause::Other
    }
}

/// The IO error under a Redis error: the client keeps it behind an `Arc`.
fn io_error(e: &redis::RedisError) -> Option<&std::io::Error> {
    let source = e.source()?;
    source.downcast_ref::<std::io::Error>().or_else(|| {
        source
            .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()
            .and_then(|inner| (**inner).downcast_ref::<std::io::Error>())
    })
}

/// What to log after an attempt, from [`Outage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Report {
    /// The first failure of an outage (at start-up, or after a loss).
    Unreachable,
    /// Still failing, [`WARN_EVERY`] after the last warning; unreachable
    /// for this long.
    Still(Duration),
    /// Connected again after this long.
    Back(Duration),
    /// Connected at the first attempt.
    Connected,
}

/// The state of the link as the log tells it.
#[derive(Debug, Default)]
pub(super) struct Outage {
    /// Since when Redis is unreachable; `None` while connected (or before
    /// the first attempt).
    since: Option<Instant>,
    /// When the last warning was written.
    warned: Option<Instant>,
    /// Whether a connection ever succeeded.
    connected_once: bool,
}

impl Outage {
    /// A connection in use was lost (a failed call): the outage starts now;
    /// `true` when that is news (the caller warns).
    pub(super) fn lost(&mut self, now: Instant) -> bool {
        if self.since.is_some() {
            return false;
        }
        self.since = Some(now);
        true
    }

    /// An attempt to connect failed: what to warn, if anything.
    pub(super) fn failed(&mut self, now: Instant) -> Option<Report> {
        let since = *self.since.get_or_insert(now);
        match self.warned {
            Some(at) if now.duration_since(at) < WARN_EVERY => None,
            Some(_) => {
                self.warned = Some(now);
                Some(Report::Still(now.duration_since(since)))
            }
            None => {
                self.warned = Some(now);
                Some(Report::Unreachable)
            }
        }
    }

    /// An attempt to connect succeeded: what to say, once per outage.
    pub(super) fn connected(&mut self, now: Instant) -> Option<Report> {
        let first = !self.connected_once;
        self.connected_once = true;
        self.warned = None;
        match self.since.take() {
            Some(since) => Some(Report::Back(now.duration_since(since))),
            None if first => Some(Report::Connected),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_at_once_then_each_minute_and_says_when_it_is_back() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut o = Outage::default();
        // Never reachable from start-up: retries every ~1.5 s.
        assert_eq!(o.failed(at(0)), Some(Report::Unreachable));
        let mut warnings = 0;
        for ms in (1500..=150_000).step_by(1500) {
            if let Some(r) = o.failed(at(ms)) {
                warnings += 1;
                let Report::Still(d) = r else { panic!("{r:?}") };
                assert!(d >= WARN_EVERY * warnings, "{d:?}");
            }
        }
        assert_eq!(warnings, 2, "at 60 s and 120 s, not on every retry");
        assert_eq!(
            o.connected(at(151_000)),
            Some(Report::Back(Duration::from_millis(151_000)))
        );
        assert_eq!(o.connected(at(152_000)), None, "said once");
        // A later loss: warned by the caller, then the first failed retry
        // warns with its cause, the next ones are quiet.
        assert!(o.lost(at(200_000)));
        assert!(!o.lost(at(200_001)));
        assert_eq!(o.failed(at(200_500)), Some(Report::Unreachable));
        assert_eq!(o.failed(at(202_000)), None);
        assert_eq!(
            o.connected(at(203_000)),
            Some(Report::Back(Duration::from_millis(3000)))
        );
    }

    #[test]
    fn a_first_attempt_that_works_is_said_once() {
        let mut o = Outage::default();
        let now = Instant::now();
        assert_eq!(o.connected(now), Some(Report::Connected));
        assert_eq!(o.connected(now), None);
    }

    #[test]
    fn causes_are_classified() {
        use redis::{ErrorKind, RedisError};
        let io = |kind: std::io::ErrorKind| RedisError::from(std::io::Error::from(kind));
        assert_eq!(
            Cause::of(&io(std::io::ErrorKind::ConnectionRefused), false),
            Cause::Refused
        );
        assert_eq!(
            Cause::of(&io(std::io::ErrorKind::TimedOut), false),
            Cause::TimedOut
        );
        assert_eq!(
            Cause::of(&io(std::io::ErrorKind::InvalidData), true),
            Cause::Tls
        );
        assert_eq!(
            Cause::of(&io(std::io::ErrorKind::InvalidData), false),
            Cause::Other
        );
        let dns = RedisError::from(std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        assert_eq!(Cause::of(&dns, false), Cause::Dns);
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(Cause::of(&auth, false), Cause::Authentication);
        let none = RedisError::from((ErrorKind::InvalidClientConfig, "No address found for host"));
        assert_eq!(Cause::of(&none, false), Cause::Dns);
    }
}
