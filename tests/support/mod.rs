//! Shared test support: real upstreams on port 0, the sidecar started through
//! its real entry point, clients, and metric matchers that poll with a
//! deadline instead of sleeping.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "each test binary uses a subset"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::config::{Config, RawConfig};
use wsgate::Control;

/// Everything waits at most this long; a hang fails instead of blocking CI.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A slot freed by a close wsgate can see (FIN, RST, Close frame, a failed
/// handshake) must be back within this: the bound the original hub promised.
/// On loopback it takes milliseconds; the margin is for a loaded CI machine.
pub const RELEASE_BOUND: Duration = Duration::from_secs(2);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Runs `f` under [`DEADLINE`], failing the test with `what` if it hangs.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------- upstream

/// How the test upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// WebSocket echo (choosing the first offered subprotocol) and plain
    /// HTTP (GET: a dump of the request headers; POST: the body echoed).
    Echo,
    /// Answers every upgrade with 403 and a body.
    Refuse,
    /// Accepts TCP, reads, never answers.
    Silent,
    /// Completes the upgrade, then closes the WebSocket at once.
    CloseAfterUpgrade,
    /// Answers 101 with a wrong `Sec-WebSocket-Accept`.
    BadAccept,
    /// Completes the upgrade, reads until EOF, then keeps sending a small
    /// binary frame every 100 ms until a write fails: a peer that holds a
    /// half-closed connection open.
    HoldOpen,
}

/// A running test upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    /// TCP connections it accepted.
    pub accepts: Arc<AtomicUsize>,
    /// Every WebSocket message the echo upstream received, Close frames
    /// included (tungstenite refuses unmasked client frames, so each one
    /// here arrived masked).
    pub received: Received,
    task: JoinHandle<()>,
}

pub type Received = Arc<std::sync::Mutex<Vec<tokio_tungstenite::tungstenite::Message>>>;

impl Upstream {
    /// The Close frames the upstream received: (code, reason).
    pub fn closes(&self) -> Vec<(u16, String)> {
        use tokio_tungstenite::tungstenite::Message;
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|m| match m {
                Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
                _ => None,
            })
            .collect()
    }

    /// The data messages the upstream received.
    pub fn data_messages(&self) -> Vec<tokio_tungstenite::tungstenite::Message> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.is_text() || m.is_binary())
            .cloned()
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_upstream(behaviour: Behaviour) -> Upstream {
    spawn_upstream_with(behaviour, false).await
}

/// An echo upstream that keeps every message it receives in `received`
/// (only for tests that look at them: it never frees them).
pub async fn spawn_recording_upstream() -> Upstream {
    spawn_upstream_with(Behaviour::Echo, true).await
}

async fn spawn_upstream_with(behaviour: Behaviour, record: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepts);
    let received: Received = Arc::default();
    let log = Arc::clone(&received);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            conns.spawn(serve_upstream_conn(
                stream,
                behaviour,
                record.then(|| Arc::clone(&log)),
            ));
        }
    });
    Upstream {
        addr,
        accepts,
        received,
        task,
    }
}

pub async fn spawn_echo_upstream() -> Upstream {
    spawn_upstream(Behaviour::Echo).await
}

async fn serve_upstream_conn(stream: TcpStream, behaviour: Behaviour, log: Option<Received>) {
    if behaviour == Behaviour::Silent {
        let mut stream = stream;
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let service = service_fn(move |req| upstream_handle(req, behaviour, log.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

type UpBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

async fn upstream_handle(
    mut req: Request<Incoming>,
    behaviour: Behaviour,
    log: Option<Received>,
) -> Result<Response<UpBody>, Infallible> {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_upgrade {
        let dump = header_dump(&req);
        return Ok(if req.method() == http::Method::POST {
            Response::new(req.into_body().boxed())
        } else {
            let mut r = Response::new(full(dump));
            r.headers_mut()
                .insert("x-upstream", HeaderValue::from_static("yes"));
            r
        });
    }
    if behaviour == Behaviour::Refuse {
        let mut r = Response::new(full("go away"));
        *r.status_mut() = StatusCode::FORBIDDEN;
        return Ok(r);
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .unwrap_or(HeaderValue::from_static(""));
    let accept = if behaviour == Behaviour::BadAccept {
        "bm90IHRoZSByaWdodCBhY2NlcHQ=".to_owned()
    } else {
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
    };
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        if behaviour == Behaviour::HoldOpen {
            hold_open(TokioIo::new(upgraded)).await;
            return;
        }
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if behaviour == Behaviour::CloseAfterUpgrade {
            let _ = ws.close(None).await;
            while ws.next().await.is_some() {}
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if let Some(log) = &log {
                log.lock().expect("lock").push(msg.clone());
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("accept"),
    );
    if let Some(p) = protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&p).expect("protocol"),
        );
    }
    Ok(r)
}

async fn hold_open(mut io: TokioIo<hyper::upgrade::Upgraded>) {
    let mut sink = [0u8; 1024];
    while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    // An unmasked binary frame with a 1-byte payload, valid server->client.
    while io.write_all(&[0x82, 0x01, 0x00]).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `name: value` lines of the request as the upstream saw it.
fn header_dump<B>(req: &Request<B>) -> String {
    let mut out = format!("{} {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    out
}

/// An address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------- sidecar

/// A wsgate started in-process through `wsgate::run` on port 0.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub control: mpsc::UnboundedSender<Control>,
    pub task: JoinHandle<Result<(), wsgate::Error>>,
}

impl Sidecar {
    /// Sends one shutdown signal.
    pub fn signal(&self) {
        let _ = self.control.send(Control::Shutdown);
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

/// The configuration tests start from: loopback, port 0, short timeouts.
pub fn test_config(upstream: SocketAddr) -> RawConfig {
    RawConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: Some(upstream.to_string()),
        ..RawConfig::default()
    }
}

pub async fn spawn_sidecar(raw: RawConfig) -> Sidecar {
    let (config, proxy, admin) = bind_sidecar(raw).await;
    start_sidecar(config, proxy, admin)
}

/// The validated configuration and its two listeners, bound but not served
/// yet (connections to them wait in the kernel's accept queue).
pub async fn bind_sidecar(raw: RawConfig) -> (Config, TcpListener, TcpListener) {
    let config = Config::validate(raw).expect("valid test config");
    let proxy = TcpListener::bind(config.listen).await.expect("bind proxy");
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .expect("bind admin");
    (config, proxy, admin)
}

/// Starts wsgate in-process on listeners from [`bind_sidecar`].
pub fn start_sidecar(config: Config, proxy: TcpListener, admin: TcpListener) -> Sidecar {
    let (addr, admin_addr) = (
        proxy.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(wsgate::run(config, proxy, admin, rx));
    Sidecar {
        addr,
        admin: admin_addr,
        control: tx,
        task,
    }
}

// ---------------------------------------------------------------- clients

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

/// Sends raw bytes on a new connection and returns everything read until EOF.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = within("raw response", s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// A minimal HTTP/1.1 GET returning (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let text = raw_exchange(addr, get_request(addr, path).as_bytes()).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------- metrics

/// The gauge of spliced connections holding a slot.
pub const ACTIVE: &str = "wsgate_connections_active";
/// Upgrades the upstream answered with something other than 101.
pub const REFUSED_UPGRADE: &str = "wsgate_upstream_errors_total{kind=\"refused_upgrade\"}";

pub async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "scrape failed");
    body
}

/// The value of one series, e.g. `wsgate_connections_rejected_total{reason="capacity"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = scrape(admin).await;
    metric_value(&text, series).unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

/// The value of `series`, or `None` when the admin port no longer answers
/// with metrics: for sampling while the process may be exiting.
pub async fn try_metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(get_request(admin, "/metrics").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    // Short: a caller samples in a loop, and one stalled scrape must not
    // use up its window.
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200"))
        .then(|| metric_value(body, series))
        .flatten()
}

/// Polls until `series` equals `want`, or fails after [`DEADLINE`].
pub async fn wait_metric(admin: SocketAddr, series: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = metric(admin, series).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{series}: wanted {want}, still {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `series` equals `want`; returns how long it took.
pub async fn time_until_metric(admin: SocketAddr, series: &str, want: f64) -> Duration {
    let start = Instant::now();
    wait_metric(admin, series, want).await;
    start.elapsed()
}

// ---------------------------------------------------------------- process

/// Open descriptors of this (test) process, which hosts upstream, sidecar
/// and clients alike: every leak shows up here.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls until the descriptor count is back to `baseline` (± `slack`).
pub async fn wait_fds(baseline: usize, slack: usize) {
    let start = Instant::now();
    loop {
        let now = open_fds();
        if now <= baseline + slack {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "descriptors: baseline {baseline}, still {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Echo round trip of one text message.
pub async fn echo_text(ws: &mut Ws, text: &str) {
    use tokio_tungstenite::tungstenite::Message;
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("stream open")
        .expect("message");
    assert_eq!(got, Message::text(text));
}

/// Small builders on the raw configuration.
pub trait RawConfigExt {
    fn cap(self, max_clients: i64) -> Self;
}

impl RawConfigExt for RawConfig {
    fn cap(mut self, max_clients: i64) -> Self {
        self.max_clients = max_clients;
        self
    }
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

/// A raw-socket WebSocket upgrade (no library): returns the socket and the
/// response head. Lets tests close the connection in exact ways (FIN, RST).
pub async fn raw_upgrade(addr: SocketAddr) -> (TcpStream, String) {
    let s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    upgrade_on(s).await
}

/// Sends a WebSocket handshake on a connected socket and reads the response
/// head byte by byte (nothing after it is consumed).
pub async fn upgrade_on(mut s: TcpStream) -> (TcpStream, String) {
    let addr = s.peer_addr().expect("peer");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("response head", s.read(&mut byte))
            .await
            .expect("read");
        assert!(
            n > 0,
            "connection closed before the response head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Reads until EOF or error; returns the number of bytes read.
pub async fn read_to_eof(s: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match within("read to EOF", s.read(&mut buf)).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// Makes `close` send RST instead of FIN.
pub fn set_reset_on_close(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
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

/// Reads one whole frame from a raw socket: (first byte, masked?, payload unmasked).
pub async fn read_frame(s: &mut TcpStream) -> (u8, bool, Vec<u8>) {
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
