//! The first request head of every client connection, read and parsed by
//! wsgate itself (`httparse`), to send a WebSocket upgrade down the fast
//! path: judged, answered and spliced without hyper's server (no
//! dispatcher, no upgrade channel, a 1 KiB head buffer instead of hyper's
//! 8 KiB while it waits). Reconnect storms are made of exactly these
//! requests (docs/architecture.md#the-life-of-a-connection).
//!
//! Anything else goes to hyper's server, which reads the bytes already
//! read again ([`Replayed`]) and answers exactly as it always has: a plain
//! request (and whatever follows it on a keep-alive connection), a head
//! over 64 KiB (431), a head hyper cannot parse (400), a malformed upgrade
//! (400, `classify`). So the fast path takes only heads that both parsers
//! read the same way, and every refusal of a hostile head stays hyper's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::headers::{self, RequestKind};
use crate::upstream_http::{head_ends_after, replay_into};

/// Request heads above this size get 431 (docs/behaviour.md#the-client-port).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The head buffer's first size: a browser's upgrade head is 400–900
/// bytes. It doubles for a longer head, up to [`MAX_HEAD_BYTES`].
const HEAD_BUFFER: usize = 1024;

/// hyper's limit on header lines: a head with more goes to hyper (431).
const MAX_HEADERS: usize = 100;

/// What the first bytes of a connection turned out to be.
#[derive(Debug)]
// Matched at once where it is made, never stored: boxing the head would
// cost every upgrade an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum First {
    /// A well-formed WebSocket upgrade (`headers::classify` passed).
    Upgrade(UpgradeHead),
    /// Anything else: hyper serves the connection, from these bytes on.
    Other(Bytes),
    /// Closed, failed or past `header_read_timeout` before a whole head:
    /// nothing to answer (hyper closed such connections too).
    Gone,
}

/// The head of an upgrade, for the fast path.
#[derive(Debug)]
pub(crate) struct UpgradeHead {
    /// Method, target, version and headers (their values share `read`).
    pub(crate) head: Parts,
    /// Everything read from the client so far, the head first: what
    /// follows it is what the client sent early (frames).
    pub(crate) read: Bytes,
    /// The head's length in `read`.
    pub(crate) head_len: usize,
}

/// Reads until a whole head is in, at most `timeout` after the accept.
/// `idle_stop` resolves when a connection that has sent nothing yet should
/// be closed (draining); once a byte is in, the head is read to its end.
pub(crate) async fn read(
    stream: &mut TcpStream,
    timeout: Duration,
    idle_stop: impl std::future::Future<Output = ()>,
) -> First {
    let mut buf = BytesMut::with_capacity(HEAD_BUFFER);
    let reading = async {
        let mut idle_stop = std::pin::pin!(idle_stop);
        loop {
            if buf.len() == buf.capacity() {
                buf.reserve(buf.len());
            }
            let scanned = buf.len();
            let n = if scanned == 0 {
                tokio::select! {
                    biased;
                    r = stream.read_buf(&mut buf) => r,
                    () = &mut idle_stop => return false,
                }
            } else {
                stream.read_buf(&mut buf).await
            };
            match n {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            // Parsed once the blank line is in: a trickled head costs one
            // scan of each byte, not a parse per read.
            if head_ends_after(&buf, scanned) || buf.len() > MAX_HEAD_BYTES {
                return true;
            }
        }
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(true) => judge(buf.freeze()),
        Ok(false) | Err(_) => First::Gone,
    }
}

/// Parses `bytes` (a whole head, perhaps more) and decides which path it takes.
fn judge(bytes: Bytes) -> First {
    match parse(&bytes) {
        Some((head, len))
            if headers::screen_request(&head.method, &head.headers).is_ok()
                && matches!(
                    headers::classify(&head.method, head.version, &head.headers),
                    Ok(RequestKind::WebSocket)
                ) =>
        {
            First::Upgrade(UpgradeHead {
                head,
                read: bytes,
                head_len: len,
            })
        }
        _ => First::Other(bytes),
    }
}

/// The head at the start of `bytes`, as hyper would build it (names
/// lowercased, values sharing `bytes`), and its length; `None` for
/// anything hyper would refuse or that is not whole.
fn parse(bytes: &Bytes) -> Option<(Parts, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        _ => return None,
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::from_maybe_shared(bytes.slice_ref(req.path?.as_bytes())).ok()?;
    let version = match req.version? {
        1 => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(h.value)).ok()?;
        map.append(name, value);
    }
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = method;
    head.uri = uri;
    head.version = version;
    head.headers = map;
    Some((head, len))
}

/// The client socket seen again from its first byte: reads return the bytes
/// [`read`] took first, then the socket's. Writes go to the socket.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// Read, not yet handed to hyper.
    read: Bytes,
    stream: TcpStream,
}

impl Replayed {
    /// The socket, with `read` to be read again first.
    pub(crate) fn new(read: Bytes, stream: TcpStream) -> Self {
        Replayed { read, stream }
    }

    /// The socket and what of the replayed bytes hyper has not read yet.
    pub(crate) fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.read)
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if replay_into(&mut this.read, buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn judged(bytes: &[u8]) -> First {
        judge(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn an_upgrade_takes_the_fast_path_with_what_followed_it() {
        let mut bytes = UPGRADE.to_vec();
        bytes.extend_from_slice(b"\x81\x80early");
        let First::Upgrade(UpgradeHead {
            head,
            read,
            head_len,
        }) = judged(&bytes)
        else {
            panic!("not the fast path")
        };
        let rest = &read[head_len..];
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri, "/chat?room=1");
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["upgrade"], "websocket");
        assert_eq!(head.headers.len(), 5);
        assert_eq!(rest, b"\x81\x80early");
    }

    #[test]
    fn everything_else_goes_to_hyper_untouched() {
        let cases: [&[u8]; 7] = [
            // plain requests
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
            // malformed upgrades: classify refuses them, hyper's path says 400
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // two Host headers: screen_request refuses it
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // what httparse refuses: a space before the colon, a bare CR
            b"GET / HTTP/1.1\r\nUpgrade : websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        ];
        for case in cases {
            let First::Other(bytes) = judged(case) else {
                panic!("{:?} took the fast path", String::from_utf8_lossy(case))
            };
            assert_eq!(&bytes[..], case, "replayed as read");
        }
    }

    #[test]
    fn a_head_with_more_lines_than_hyper_takes_goes_to_hyper() {
        let mut head = UPGRADE[..UPGRADE.len() - 2].to_vec();
        for i in 0..MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert!(matches!(judged(&head), First::Other(_)));
    }

    #[tokio::test]
    async fn a_trickled_head_is_read_whole_and_replayed_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut c = TcpStream::connect(addr).await.expect("connect");
            for chunk in UPGRADE.chunks(7) {
                c.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
            c
        });
        let (mut s, _) = listener.accept().await.expect("accept");
        let first = read(&mut s, Duration::from_secs(5), std::future::pending()).await;
        assert!(matches!(first, First::Upgrade(_)), "{first:?}");
        drop(client.await.expect("client"));

        // Replayed: hyper reads the same bytes, then the socket's.
        let mut r = Replayed::new(Bytes::from_static(b"abc"), s);
        let mut got = [0u8; 2];
        r.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ab");
        let (_, left) = r.into_parts();
        assert_eq!(&left[..], b"c");
    }

    #[tokio::test]
    async fn silence_ends_at_the_timeout_and_an_idle_stop_closes_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _c = TcpStream::connect(addr).await.expect("connect");
        let (mut s, _) = listener.accept().await.expect("accept");
        let t = tokio::time::Instant::now();
        let first = read(&mut s, Duration::from_millis(200), std::future::pending()).await;
        assert!(matches!(first, First::Gone));
        assert!(t.elapsed() >= Duration::from_millis(200));
        let first = read(&mut s, Duration::from_secs(30), async {}).await;
        assert!(
            matches!(first, First::Gone),
            "draining closes an idle connection"
        );
    }
}
