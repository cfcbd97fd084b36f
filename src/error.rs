//! `ProxyError`: every way a request can fail before it is spliced or
//! passed on, each mapped to a status and a reason.
//!
//! Status mapping (docs/behaviour.md#the-client-port): malformed handshake or request → 400; a
//! request body that stalled → 408 with `Connection: close`; refused
//! by wsgate (over the cap, draining, …) → 503 with `Retry-After` and
//! `Connection: close`; a request that came back round a loop → 508;
//! upstream unreachable or answering nonsense → 502; no answer in time →
//! 504. The response itself is built by
//! [`crate::responses`], so this module imports nothing from the request
//! path.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use http::StatusCode;

use crate::admission::{RejectReason, Rejection};
use crate::headers::{HandshakeError, RequestError};
use crate::metrics::{labels, Label};
use crate::responses::Synthetic;
use crate::target::BadTarget;

/// A boxed error from the upstream connection or the HTTP client.
type Cause = Box<dyn StdError + Send + Sync>;

/// Why a request was not proxied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The WebSocket handshake is malformed.
    #[error("{0}")]
    BadHandshake(#[from] HandshakeError),
    /// A request no kind of which is accepted (405 or 400).
    #[error("{0}")]
    Request(#[from] RequestError),
    /// A plain request whose path cannot be read unambiguously (400).
    #[error("{0}")]
    Path(#[from] BadTarget),
    /// The upstream switched protocols on a plain request that did not
    /// ask it to (502): the bytes after it are not HTTP any more.
    #[error("the upstream answered 101 to a request that did not ask to upgrade")]
    UnrequestedSwitch,
    /// The admission pipeline refused the upgrade, with its status.
    #[error("upgrade refused: {}", .0.reason.label())]
    Rejected(Rejection),
    /// The upstream could not be reached.
    #[error("cannot connect to the upstream: {0}")]
    UpstreamConnect(#[source] io::Error),
    /// The upstream connection failed or answered something that is not HTTP.
    #[error("the upstream handshake failed: {}", Causes(.0.as_ref()))]
    UpstreamHandshake(#[source] Cause),
    /// The upstream answered 101 but not a valid WebSocket acceptance.
    #[error("the upstream answered 101 without a valid Sec-WebSocket-Accept")]
    UpstreamBadAccept,
    /// The upstream's 101 selected a subprotocol it was not offered, which
    /// a browser would fail silently (502).
    #[error("the upstream's 101 selected a subprotocol the client did not offer")]
    UpstreamBadSubprotocol,
    /// No answer within `upstream_connect_timeout`.
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// A plain request whose target cannot be forwarded.
    #[error("the request target cannot be forwarded: {0}")]
    BadTarget(#[source] http::Error),
    /// A plain request whose own body failed (a bad chunk, a short body):
    /// the client's fault, not the upstream's.
    #[error("the client's request body failed: {}", Causes(.0.as_ref()))]
    ClientBody(#[source] Cause),
    /// A plain request whose body stalled for `header_read_timeout`
    /// (docs/behaviour.md#slow-request-bodies): the client's fault.
    #[error("the client's request body stalled for {0:?}")]
    ClientBodyStalled(Duration),
    /// A plain request over `max_plain_requests`, refused before the upstream.
    #[error("too many plain requests in flight")]
    PlainRequestsFull,
    /// A plain request carrying this process's own loop marker: it came
    /// back round a loop (508, docs/behaviour.md#loop-detection).
    #[error("the request came back to this wsgate (loop)")]
    Loop,
    /// A plain request the upstream could not be reached for, or did not answer.
    #[error("the plain request to the upstream failed: {}", Causes(.0.as_ref()))]
    UpstreamRequest(#[source] Cause),
    /// A plain request whose upstream connection timed out.
    #[error("connecting to the upstream for a plain request timed out: {}", Causes(.0.as_ref()))]
    UpstreamRequestTimeout(#[source] Cause),
}

labels! {
    /// How the upstream failed or declined (`wsgate_upstream_errors_total{kind}`).
    pub(crate) enum UpstreamErrorKind {
        /// Could not connect, or the connection failed before a valid answer.
        Connect => "connect",
        /// No answer within `upstream_connect_timeout`.
        Timeout => "timeout",
        /// Answered something other than a valid 101.
        RefusedUpgrade => "refused_upgrade",
        /// Answered 101 selecting a subprotocol the client did not offer.
        BadSubprotocol => "bad_subprotocol",
    }
}

impl ProxyError {
    /// The status sent to the client.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHandshake(_) | ProxyError::BadTarget(_) | ProxyError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Rejected(r) => r.status,
            ProxyError::Request(RequestError::Method) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Request(RequestError::Host) | ProxyError::Path(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UnrequestedSwitch => StatusCode::BAD_GATEWAY,
            ProxyError::PlainRequestsFull => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamHandshake(_)
            | ProxyError::UpstreamBadAccept
            | ProxyError::UpstreamBadSubprotocol
            | ProxyError::UpstreamRequest(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) | ProxyError::UpstreamRequestTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// What the client is told: one static line.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProxyError::BadHandshake(e) => e.reason(),
            ProxyError::Rejected(r) => rejection_text(r.reason),
            ProxyError::Request(e) => e.text(),
            ProxyError::Path(e) => e.text(),
            ProxyError::BadTarget(_) => "bad request target\n",
            ProxyError::ClientBody(_) => "wsgate: bad request body\n",
            ProxyError::ClientBodyStalled(_) => "wsgate: the request body stopped arriving\n",
            ProxyError::PlainRequestsFull => "wsgate: too many requests in flight, retry later\n",
            ProxyError::Loop => LOOP_TEXT,
            ProxyError::UpstreamTimeout(_) | ProxyError::UpstreamRequestTimeout(_) => {
                "wsgate: upstream timed out\n"
            }
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamHandshake(_)
            | ProxyError::UpstreamBadAccept
            | ProxyError::UpstreamBadSubprotocol
            | ProxyError::UnrequestedSwitch
            | ProxyError::UpstreamRequest(_) => "wsgate: upstream unavailable\n",
        }
    }

    /// The `wsgate_upstream_errors_total` kind, if this is a failed upgrade
    /// that is the upstream's fault.
    pub(crate) fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamHandshake(_) => {
                Some(UpstreamErrorKind::Connect)
            }
            ProxyError::UpstreamBadAccept => Some(UpstreamErrorKind::RefusedUpgrade),
            ProxyError::UpstreamBadSubprotocol => Some(UpstreamErrorKind::BadSubprotocol),
            ProxyError::UpstreamTimeout(_) => Some(UpstreamErrorKind::Timeout),
            _ => None,
        }
    }

    /// Whether the connection ends after the answer: always on the upgrade
    /// path (see [`Synthetic::close`]), and for requests refused before
    /// anything was read of them; a plain request that failed upstream
    /// keeps its connection.
    fn closes(&self) -> bool {
        !matches!(
            self,
            ProxyError::BadTarget(_)
                | ProxyError::ClientBody(_)
                | ProxyError::UpstreamRequest(_)
                | ProxyError::UpstreamRequestTimeout(_)
        )
    }

    /// The answer the client gets. A failed upgrade always closes the
    /// connection (see [`Synthetic::close`]), and so do a stalled body (the
    /// rest of it may still come, and must not be read as a next request)
    /// and a plain request over the cap (its socket is what the cap spares);
    /// every 503 carries `Retry-After: retry_after_secs`, and so does every 429.
    pub(crate) fn answer(&self, retry_after_secs: u64) -> Synthetic {
        let status = self.status();
        Synthetic {
            retry_after: matches!(
                status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            )
            .then_some(retry_after_secs),
            close: self.closes(),
            websocket_version: matches!(
                self,
                ProxyError::BadHandshake(HandshakeError::WebSocketVersion)
            ),
            allow: matches!(self, ProxyError::Request(RequestError::Method))
                .then_some(RequestError::ALLOWED),
            ..Synthetic::new(status, self.reason())
        }
    }
}

/// What a request that came back round a loop is answered (508), upgrade
/// or not.
const LOOP_TEXT: &str =
    "wsgate: loop detected: this request already passed through this wsgate (its Via names it)\n";

/// What a refused client is told, by reason: one static line.
fn rejection_text(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::Capacity => "wsgate: too many websocket connections, retry later\n",
        RejectReason::Loop => LOOP_TEXT,
        RejectReason::BadPath => "wsgate: the request target is not a path that can be read unambiguously\n",
        RejectReason::Origin => "wsgate: websocket connections from this origin are not allowed\n",
        RejectReason::Subprotocol => {
            "wsgate: the offered subprotocols include none this endpoint accepts\n"
        }
        RejectReason::Draining => "wsgate: shutting down, connect to another instance\n",
        RejectReason::Rate => "wsgate: too many new websocket connections, retry later\n",
        RejectReason::PerIp => {
            "wsgate: too many websocket connections from your address, retry later\n"
        }
        RejectReason::Key => "wsgate: too many websocket connections for your key, retry later\n",
        RejectReason::KeyMissing => {
            "wsgate: this endpoint needs a key the request does not carry (or one that is not usable)\n"
        }
        RejectReason::KeyAmbiguous => {
            "wsgate: a value this endpoint keys on is given more than once\n"
        }
        RejectReason::KeyTableFull => "wsgate: too many distinct keys connected, retry later\n",
        RejectReason::Jwt => "wsgate: the token is not valid\n",
        RejectReason::Fleet => {
            "wsgate: too many websocket connections across the service, retry later\n"
        }
        RejectReason::FleetUnavailable => {
            "wsgate: the shared connection count is unavailable, retry later\n"
        }
    }
}

/// An error and its causes as one sentence: `outer: inner: innermost`.
/// Errors from the HTTP client say little at the top ("client error
/// (SendRequest)"); the cause that matters to an operator is at the bottom.
#[derive(Clone, Copy)]
pub(crate) struct Causes<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn statuses_follow_the_spec() {
        let cases = [
            (ProxyError::BadHandshake(HandshakeError::Key), 400),
            (ProxyError::Rejected(RejectReason::Capacity.into()), 503),
            (ProxyError::Rejected(RejectReason::Draining.into()), 503),
            (
                ProxyError::UpstreamConnect(io::ErrorKind::ConnectionRefused.into()),
                502,
            ),
            (ProxyError::UpstreamBadAccept, 502),
            (ProxyError::UpstreamTimeout(Duration::from_secs(5)), 504),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }

    #[test]
    fn rejections_carry_retry_after_and_close() {
        let r = ProxyError::Rejected(RejectReason::Capacity.into())
            .answer(3)
            .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = ProxyError::BadHandshake(HandshakeError::Key)
            .answer(3)
            .into_response();
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn plain_request_failures_keep_the_connection() {
        let e = ProxyError::UpstreamRequest(io::Error::other("down").into());
        let a = e.answer(1);
        assert_eq!((a.status.as_u16(), a.close), (502, false));
        assert_eq!(a.text, "wsgate: upstream unavailable\n");
    }

    #[test]
    fn a_stalled_body_is_408_and_over_the_plain_cap_503_both_closing() {
        let a = ProxyError::ClientBodyStalled(Duration::from_secs(1)).answer(2);
        assert_eq!(
            (a.status.as_u16(), a.close, a.retry_after),
            (408, true, None)
        );
        let a = ProxyError::PlainRequestsFull.answer(2);
        assert_eq!(
            (a.status.as_u16(), a.close, a.retry_after),
            (503, true, Some(2))
        );
        assert_eq!(ProxyError::PlainRequestsFull.upstream_kind(), None);
    }

    #[test]
    fn causes_read_as_one_sentence() {
        let inner = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        let e = ProxyError::UpstreamHandshake(Box::new(inner));
        assert_eq!(
            e.to_string(),
            "the upstream handshake failed: reset by peer"
        );
    }
}
