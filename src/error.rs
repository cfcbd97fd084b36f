//! `ProxyError`: every way a request can fail before it is spliced, and the
//! single place that turns such an error into the response the client sees.
//!
//! Status mapping (SPEC §3): malformed handshake → 400; over the cap or
//! draining → 503 with `Retry-After` and `Connection: close`; upstream
//! unreachable or answering nonsense → 502; no answer in time → 504.

use std::io;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::headers::HandshakeError;
use crate::metrics::{RejectReason, UpstreamErrorKind};
use crate::proxy::{text_body, ProxyBody};

/// Why a request was not proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The WebSocket handshake is malformed.
    #[error("bad websocket handshake: {0}")]
    BadHandshake(#[from] HandshakeError),
    /// wsgate refused the upgrade (capacity or draining).
    #[error("upgrade refused: {}", .0.as_str())]
    Rejected(RejectReason),
    /// The upstream could not be reached.
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(#[source] io::Error),
    /// The upstream connection failed or answered something that is not HTTP.
    #[error("upstream handshake failed: {0}")]
    UpstreamHandshake(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The upstream answered 101 but not a valid WebSocket acceptance.
    #[error("upstream answered 101 without a valid Sec-WebSocket-Accept")]
    UpstreamBadAccept,
    /// No answer within `upstream_connect_timeout`.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
}

/// Which side an error is attributed to, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong.
    Client,
    /// The upstream failed.
    Upstream,
    /// wsgate's own policy.
    Policy,
}

impl ProxyError {
    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHandshake(_) => StatusCode::BAD_REQUEST,
            ProxyError::Rejected(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamHandshake(_)
            | ProxyError::UpstreamBadAccept => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Who is to blame.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadHandshake(_) => Side::Client,
            ProxyError::Rejected(_) => Side::Policy,
            _ => Side::Upstream,
        }
    }

    /// The `wsgate_upstream_errors_total` kind, if this is an upstream failure.
    pub fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamHandshake(_) => {
                Some(UpstreamErrorKind::Connect)
            }
            ProxyError::UpstreamBadAccept => Some(UpstreamErrorKind::RefusedUpgrade),
            ProxyError::UpstreamTimeout(_) => Some(UpstreamErrorKind::Timeout),
            _ => None,
        }
    }

    /// The synthetic response for this error. Every one carries
    /// `Connection: close`: a client that asked to upgrade may already be
    /// sending frames, which must never be parsed as a next request. 503s
    /// also carry `Retry-After`: a shed client should go away, not queue here.
    pub fn to_response(&self, retry_after_secs: u64) -> Response<ProxyBody> {
        let status = self.status();
        let body = match self {
            ProxyError::BadHandshake(e) => format!("bad websocket handshake: {e}\n"),
            ProxyError::Rejected(RejectReason::Capacity) => {
                "wsgate: too many websocket connections, retry later\n".to_owned()
            }
            ProxyError::Rejected(RejectReason::Draining) => {
                "wsgate: shutting down, connect to another instance\n".to_owned()
            }
            ProxyError::UpstreamTimeout(_) => "wsgate: upstream timed out\n".to_owned(),
            _ => "wsgate: upstream unavailable\n".to_owned(),
        };
        let mut resp = Response::new(text_body(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let ProxyError::BadHandshake(HandshakeError::WebSocketVersion) = self {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_spec() {
        let cases = [
            (ProxyError::BadHandshake(HandshakeError::Key), 400),
            (ProxyError::Rejected(RejectReason::Capacity), 503),
            (ProxyError::Rejected(RejectReason::Draining), 503),
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
        let r = ProxyError::Rejected(RejectReason::Capacity).to_response(3);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = ProxyError::BadHandshake(HandshakeError::Key).to_response(3);
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }
}
