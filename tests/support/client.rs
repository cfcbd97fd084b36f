//! Clients: a real WebSocket client (tokio-tungstenite), minimal HTTP, and
//! raw sockets down to single frames, so that tests can end a connection in
//! exact ways (FIN, RST, half a frame).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::within;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------- WebSocket

pub async fn connect(url: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| ws)
}

/// Connects and expects an HTTP refusal; returns the response.
pub async fn connect_refused(
    url: &str,
) -> tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>> {
    match within("refused upgrade", tokio_tungstenite::connect_async(url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => *resp,
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// How an upgrade ended, without failing the test: for tests that count.
#[derive(Debug)]
pub enum Upgrade {
    /// 101: the client.
    Admitted(Box<Ws>),
    /// An HTTP refusal: its status and `Retry-After`.
    Refused(u16, Option<String>),
    /// Anything else (I/O error, a bad handshake), as text.
    Failed(String),
}

/// An upgrade to `url` with extra request `headers`, unbounded (the caller
/// bounds it), never panicking.
pub async fn upgrade_outcome(url: &str, headers: &[(&str, &str)]) -> Upgrade {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut req = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Upgrade::Failed(format!("bad request for {url}: {e}")),
    };
    for (k, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Upgrade::Admitted(Box::new(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Upgrade::Refused(
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(e) => Upgrade::Failed(e.to_string()),
    }
}

/// [`upgrade_outcome`] within [`crate::support::DEADLINE`]: the client, or
/// the refusal's status and `Retry-After`; fails the test on anything else.
pub async fn try_upgrade(url: &str, headers: &[(&str, &str)]) -> Result<Ws, (u16, Option<String>)> {
    match within("upgrade", upgrade_outcome(url, headers)).await {
        Upgrade::Admitted(ws) => Ok(*ws),
        Upgrade::Refused(status, retry_after) => Err((status, retry_after)),
        Upgrade::Failed(e) => panic!("expected an upgrade or an HTTP refusal from {url}, got {e}"),
    }
}

/// Echo round trip of one text message.
pub async fn echo_text(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("stream open")
        .expect("message");
    assert_eq!(got, Message::text(text));
}

/// Closes with a Close frame and reads until the server's TCP close, as a
/// well-behaved client does.
pub async fn close_cleanly(mut ws: Ws) {
    within("close", ws.close(None)).await.expect("close");
    within("read to EOF after close", async {
        while ws.next().await.is_some() {}
    })
    .await;
}

/// Reading helpers on a client.
pub trait WsExt {
    /// Reads one message; false once the stream ended or failed.
    fn next_message(&mut self) -> impl std::future::Future<Output = bool>;
}

impl WsExt for Ws {
    async fn next_message(&mut self) -> bool {
        matches!(self.next().await, Some(Ok(_)))
    }
}

// ---------------------------------------------------------------- plain HTTP

/// Sends raw bytes on a new connection and returns everything read until EOF.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = within("raw response", s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// A minimal HTTP/1.1 GET returning (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let text = raw_exchange(addr, get_request(addr, path).as_bytes()).await;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status_of(&text), body)
}

/// The status code of a response head, 0 if there is none.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- raw upgrade

/// The `Sec-WebSocket-Key` of every raw upgrade (RFC 6455's sample nonce).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid WebSocket upgrade request head.
pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// Reads a head (up to the blank line) byte by byte, so nothing after it is
/// consumed, within [`crate::support::DEADLINE`]. Returns the head, or what
/// was read before EOF or an error.
pub async fn read_head(s: &mut TcpStream) -> String {
    within("a response head", read_head_unbounded(s)).await
}

/// [`read_head`] without the deadline: for upstreams, which wait as long as
/// wsgate keeps the connection (the test around them has its deadlines).
pub(crate) async fn read_head_unbounded(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A raw-socket WebSocket upgrade (no library): returns the socket and the
/// response head, whatever the status. Lets tests close the connection in
/// exact ways (FIN, RST).
pub async fn raw_upgrade(addr: SocketAddr) -> (TcpStream, String) {
    let s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    upgrade_on(s).await
}

/// Sends a WebSocket handshake on a connected socket and reads the response
/// head (nothing after it is consumed); fails if the connection closes first.
pub async fn upgrade_on(mut s: TcpStream) -> (TcpStream, String) {
    let addr = s.peer_addr().expect("peer");
    s.write_all(upgrade_request(addr).as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(
        head.ends_with("\r\n\r\n"),
        "connection closed before the response head: {head}"
    );
    (s, head)
}

/// A raw upgrade that must succeed: the stream is then a raw byte pipe to
/// the upstream (no framing needed: wsgate splices bytes).
pub async fn raw_tunnel(addr: SocketAddr) -> TcpStream {
    let (s, head) = raw_upgrade(addr).await;
    assert_eq!(status_of(&head), 101, "upgrade refused: {head}");
    s
}

/// Reads until EOF or error, all within [`crate::support::DEADLINE`] (a
/// peer that keeps sending cannot hold it forever); returns the number of
/// bytes read.
pub async fn read_to_eof(s: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    within("read to EOF", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
}

/// Reads whatever comes until EOF, reset or `limit`; true if the peer closed.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_to_end).await.is_ok()
}

/// Makes `close` send RST instead of FIN.
pub fn set_reset_on_close(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

// ---------------------------------------------------------------- raw frames

/// A client frame: masked with a fixed key, as RFC 6455 requires of clients.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// A server frame: unmasked, as RFC 6455 requires of servers; first byte
/// `b0` (FIN and opcode), then the length and `payload`.
pub fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![b0];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Reads one whole frame from a raw socket or one half of it: (first byte,
/// masked?, payload unmasked).
pub async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> (u8, bool, Vec<u8>) {
    let mut h = [0u8; 2];
    within("frame header", s.read_exact(&mut h))
        .await
        .expect("frame header");
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.expect("length");
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.expect("length");
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut key = [0u8; 4];
    if masked {
        s.read_exact(&mut key).await.expect("mask");
    }
    let mut payload = vec![0u8; len as usize];
    within("frame payload", s.read_exact(&mut payload))
        .await
        .expect("payload");
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    (h[0], masked, payload)
}
