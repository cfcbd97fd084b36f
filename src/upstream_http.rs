//! The upstream handshake on the wire: the request head written in one
//! buffer and the answer head parsed with `httparse`, without a hyper client
//! connection. An upgrade is the hot path of a proxy whose connections churn,
//! and hyper's client holds two 8 KiB buffers and its header machinery for
//! each handshake in flight; a WebSocket answer head is a few hundred bytes.
//!
//! Only a 101 is handled here. Any other answer may carry a body in any HTTP
//! framing, so it is handed to a hyper client connection after all, through
//! [`Replay`]: the bytes already read are read again, and the request hyper
//! writes is dropped (it went out already).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::headers;

/// The largest answer head accepted from the upstream: the same 64 KiB a
/// client's request head may take.
pub(crate) const MAX_ANSWER_HEAD: usize = 64 * 1024;

/// The most header lines accepted in an answer (hyper's limit too).
const MAX_ANSWER_HEADERS: usize = 100;

/// Why the upstream's answer could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    /// Not HTTP/1.x, or not valid HTTP.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// More than [`MAX_ANSWER_HEAD`] bytes without the end of the head.
    #[error("answer head over {MAX_ANSWER_HEAD} bytes")]
    TooLarge,
    /// The connection ended before the head did.
    #[error("connection closed before a complete answer")]
    Closed,
}

/// A request head as it goes on the wire (origin-form target, HTTP/1.1),
/// for tests: the upgrade path writes its head itself
/// (`headers::write_upstream_upgrade`).
#[cfg(test)]
pub(crate) fn encode_request<B>(req: &http::Request<B>) -> Vec<u8> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let method = req.method().as_str();
    let size = method.len()
        + target.len()
        + 12
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
        + 2;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether the blank line that ends a head is in `buf`, looking only at what
/// came after the first `from` bytes (and the two before them, where a line
/// end may have started). LF-only line ends count too, as `httparse` takes them.
pub(crate) fn head_ends_after(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    buf[start..].windows(2).enumerate().any(|(i, w)| {
        w[0] == b'\n'
            && (w[1] == b'\n' || (w[1] == b'\r' && buf.get(start + i + 2) == Some(&b'\n')))
    })
}

/// What the upstream answered, once its head is whole.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// 101: what the checks and the client need of it.
    Switching(Switched),
    /// Any other status: the answer is read again by a hyper client
    /// connection ([`Replay`]) to pass it on with its body.
    Other,
}

/// The upstream's 101, read in one pass over its head, without a header
/// map: the client's copy written as it goes, and what the checks need.
#[derive(Debug)]
pub(crate) struct Switched {
    /// The 101 as the client gets it (`headers::write_client_switching`).
    pub(crate) for_client: Vec<u8>,
    /// `Sec-WebSocket-Accept`, if exactly one.
    accept: One,
    /// `Sec-WebSocket-Protocol`: none, one, or (a broken answer) several.
    protocol: One,
    /// Whether `Upgrade` names `websocket`.
    upgrade_websocket: bool,
}

/// A header that must appear at most once: its value, copied (a few dozen bytes).
#[derive(Debug, Default)]
enum One {
    #[default]
    Absent,
    Once(Box<[u8]>),
    Several,
}

impl One {
    fn see(&mut self, value: &[u8]) {
        *self = match self {
            One::Absent => One::Once(value.into()),
            One::Once(_) | One::Several => One::Several,
        };
    }
}

impl Switched {
    /// The `Sec-WebSocket-Accept` value, when there is exactly one.
    pub(crate) fn accept(&self) -> Option<&[u8]> {
        match &self.accept {
            One::Once(v) => Some(v),
            One::Absent | One::Several => None,
        }
    }

    /// Whether the answer's `Upgrade` names `websocket`.
    pub(crate) fn upgrades_to_websocket(&self) -> bool {
        self.upgrade_websocket
    }

    /// The subprotocol selected: `Ok(None)` for none, `Err(())` when the
    /// answer has more than one `Sec-WebSocket-Protocol` line.
    #[allow(clippy::result_unit_err)]
    pub(crate) fn protocol(&self) -> Result<Option<&[u8]>, ()> {
        match &self.protocol {
            One::Absent => Ok(None),
            One::Once(v) => Ok(Some(v)),
            One::Several => Err(()),
        }
    }

    /// The client's copy as a response head (for hyper's server, which
    /// writes it on connections it serves).
    pub(crate) fn client_head(&self) -> http::response::Parts {
        let (mut head, ()) = Response::new(()).into_parts();
        head.status = StatusCode::SWITCHING_PROTOCOLS;
        let mut slots = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS + 2];
        let mut answer = httparse::Response::new(&mut slots);
        // Written by us from a head that parsed: it parses again.
        if answer.parse(&self.for_client).is_ok() {
            for h in answer.headers.iter() {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_bytes(h.value),
                ) {
                    head.headers.append(name, value);
                }
            }
        }
        head
    }
}

/// Parses an answer head from the start of `buf`: `None` while incomplete,
/// otherwise what it is and its length in bytes.
///
/// # Errors
/// Anything that is not a well-formed HTTP/1.x status line and headers.
pub(crate) fn parse_answer(buf: &[u8]) -> Result<Option<(Parsed, usize)>, AnswerError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
    let mut answer = httparse::Response::new(&mut slots);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_ANSWER_HEAD => {
            return Err(AnswerError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(AnswerError::Malformed("too many headers"))
        }
        Err(_) => return Err(AnswerError::Malformed("not an HTTP/1.x answer")),
    };
    if len > MAX_ANSWER_HEAD {
        return Err(AnswerError::TooLarge);
    }
    let status = answer
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(AnswerError::Malformed("status code"))?;
    for h in answer.headers.iter() {
        // What a header map would refuse (httparse takes DEL in a value).
        if !h
            .value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        {
            return Err(AnswerError::Malformed("header value"));
        }
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some((Parsed::Other, len)));
    }
    let mut switched = Switched {
        for_client: Vec::with_capacity(len + 32),
        accept: One::Absent,
        protocol: One::Absent,
        upgrade_websocket: false,
    };
    for h in answer.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            switched.accept.see(h.value.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            switched.protocol.see(h.value.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            switched.upgrade_websocket |= headers::names_token(h.value, "websocket");
        }
    }
    headers::write_client_switching(&mut switched.for_client, answer.headers);
    Ok(Some((Parsed::Switching(switched), len)))
}

/// Moves what is left of `read` (bytes already taken from a socket, read
/// again) into `buf`, as much as fits; `false` when nothing was left, and
/// the socket itself is next.
pub(crate) fn replay_into(read: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if !read.has_remaining() {
        return false;
    }
    let n = read.len().min(buf.remaining());
    buf.put_slice(&read[..n]);
    read.advance(n);
    true
}

/// The upstream socket seen again from the start of its answer: reads return
/// the bytes already read, then the socket's; writes are dropped, since the
/// request was written already. Lets hyper frame the body of an answer that
/// is not a 101.
///
/// Nothing is readable until hyper has written its request: hyper takes
/// bytes that arrive on an idle connection for an unexpected message.
///
/// `IO` is the upstream socket, TCP or Unix (docs/operations.md#unix-socket-upstream).
#[derive(Debug)]
pub(crate) struct Replay<IO> {
    read: Bytes,
    io: IO,
    request_written: bool,
    reader: Option<Waker>,
}

impl<IO> Replay<IO> {
    /// `read`: what was read from `io` so far, the answer head first.
    pub(crate) fn new(read: Bytes, io: IO) -> Self {
        Replay {
            read,
            io,
            request_written: false,
            reader: None,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.request_written {
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if replay_into(&mut this.read, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.request_written = true;
        if let Some(reader) = this.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn the_request_head_is_what_hyper_would_send() {
        let req = Request::get("/chat?room=1")
            .header("host", "up:8080")
            .header("upgrade", "websocket")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(())
            .expect("request");
        let head = encode_request(&req);
        assert_eq!(
            head,
            b"GET /chat?room=1 HTTP/1.1\r\nhost: up:8080\r\nupgrade: websocket\r\nx-multi: a\r\nx-multi: b\r\n\r\n"
        );
        assert_eq!(head.capacity(), head.len(), "sized exactly");
    }

    #[test]
    fn a_101_is_parsed_with_what_follows_it_left_over() {
        let wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        for cut in 0..wire.len() - 4 {
            assert!(
                parse_answer(&wire[..cut])
                    .expect("a prefix is fine")
                    .is_none(),
                "incomplete at {cut}"
            );
        }
        let (Parsed::Switching(switched), len) =
            parse_answer(wire).expect("valid").expect("complete")
        else {
            panic!("a 101")
        };
        assert_eq!(
            switched.accept(),
            Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
        );
        assert!(switched.upgrades_to_websocket());
        assert_eq!(switched.protocol(), Ok(None));
        assert_eq!(&wire[len..], b"\x81\x02hi");
        assert_eq!(
            switched.for_client,
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let head = switched.client_head();
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            head.headers["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(head.headers["upgrade"], "websocket");
    }

    #[test]
    fn the_client_s_101_loses_hop_by_hop_headers_and_what_connection_names() {
        let wire =
            b"HTTP/1.1 101 Whatever\r\nUpgrade: WebSocket\r\nConnection: Upgrade, X-Internal\r\n\
            X-Internal: secret\r\nKeep-Alive: timeout=5\r\nSec-WebSocket-Protocol: chat\r\n\
            Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Accept: a\r\nSec-WebSocket-Accept: b\r\n\
            Set-Cookie: x=1\r\n\r\n";
        let (Parsed::Switching(s), _) = parse_answer(wire).expect("valid").expect("complete")
        else {
            panic!("a 101")
        };
        assert_eq!(s.accept(), None, "two accept lines");
        assert_eq!(s.protocol(), Err(()), "two protocol lines");
        assert!(s.upgrades_to_websocket(), "tokens compare without case");
        let text = String::from_utf8(s.for_client).expect("text");
        assert!(!text.contains("X-Internal"), "{text}");
        assert!(!text.contains("Keep-Alive"), "{text}");
        assert!(!text.contains("Upgrade: WebSocket"), "{text}");
        assert!(text.contains("Set-Cookie: x=1\r\n"), "{text}");
        assert!(
            text.ends_with("connection: upgrade\r\nupgrade: websocket\r\n\r\n"),
            "{text}"
        );
        let (other, _) = parse_answer(b"HTTP/1.1 403 No\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(matches!(other, Parsed::Other));
    }

    #[test]
    fn the_end_of_a_head_is_found_however_the_reads_split_it() {
        for wire in [
            &b"HTTP/1.1 101 x\r\na: b\r\n\r\n"[..],
            b"HTTP/1.1 101 x\na: b\n\n",
        ] {
            for cut in 0..wire.len() {
                // Two reads: `wire[..cut]`, then the rest.
                assert!(!head_ends_after(&wire[..cut], 0), "too early at {cut}");
                assert!(
                    head_ends_after(wire, cut),
                    "missed with a read split at {cut}"
                );
            }
        }
    }

    #[test]
    fn bad_answers_are_errors_not_panics() {
        let cases: [&[u8]; 7] = [
            b"garbage garbage\r\n\r\n",
            b"HTTP/1.1 99999 Nope\r\n\r\n",
            b"HTTP/2 101 x\r\n\r\n",
            b"HTTP/1.1 101 x\r\nbad header\r\n\r\n",
            b"HTTP/1.1 101 x\r\nname: \x01\r\n\r\n",
            b"HTTP/1.1 101 x\r\nname: a\x7fb\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ];
        for wire in cases {
            assert!(
                parse_answer(wire).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let many = format!("HTTP/1.1 101 x\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert!(matches!(
            parse_answer(many.as_bytes()),
            Err(AnswerError::Malformed("too many headers"))
        ));
        let long = format!("HTTP/1.1 101 x\r\nx: {}", "y".repeat(MAX_ANSWER_HEAD));
        assert!(matches!(
            parse_answer(long.as_bytes()),
            Err(AnswerError::TooLarge)
        ));
    }
}
