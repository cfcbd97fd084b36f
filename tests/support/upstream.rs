//! Test upstreams on `127.0.0.1:0`: an echo that can misbehave in named
//! ways ([`Behaviour`]), one that records every request it sees
//! ([`CountingUpstream`]), a raw one that hands each connection to the test
//! ([`spawn_raw_upstream`]), and an address that refuses ([`closed_port`]).
//! All of them accept through one loop, [`serve_each`], on TCP or, for the
//! same behaviours on a Unix socket in a temp dir (docs/operations.md#unix-socket-upstream), as
//! [`UnixUpstream`]s through [`spawn_unix_raw_upstream_at`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::client::read_head_unbounded;

// ---------------------------------------------------------------- raw

/// An upstream that takes each connection and hands it to a function; counts
/// accepted connections. Every other upstream here is one of these.
pub struct RawUpstream {
    pub addr: SocketAddr,
    /// TCP connections it accepted.
    pub accepts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listening socket of either kind an upstream stands on.
pub trait Listener: Send + 'static {
    /// What an accept gives.
    type Stream: Send + 'static;
    /// The next connection.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send + '_;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The accept loop of every upstream here: runs `f` on each connection in
/// a task of its own, counting accepts into `accepts`.
fn serve_each<L, F, Fut>(listener: L, accepts: Arc<AtomicUsize>, f: F) -> JoinHandle<()>
where
    L: Listener,
    F: Fn(L::Stream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok(stream) = listener.accept_one().await else {
                continue;
            };
            accepts.fetch_add(1, Ordering::SeqCst);
            conns.spawn(f(stream));
        }
    })
}

/// Accepts on `127.0.0.1:0` and runs `f` on each connection (a raw,
/// possibly misbehaving upstream).
pub async fn spawn_raw_upstream<F, Fut>(f: F) -> RawUpstream
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let task = serve_each(listener, Arc::clone(&accepts), f);
    RawUpstream {
        addr,
        accepts,
        task,
    }
}

/// Reads and throws away until EOF or an error.
pub async fn discard_until_eof(s: &mut (impl AsyncRead + Unpin)) {
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// An upstream that answers every upgrade with a valid 101 and then reads
/// and discards: it never writes a frame, so only wsgate's own deadlines
/// end its connections.
pub async fn spawn_sink_upstream() -> RawUpstream {
    spawn_raw_upstream(|mut s: TcpStream| async move {
        let head = read_request_head(&mut s).await;
        if s.write_all(switching_response(&head).as_bytes())
            .await
            .is_ok()
        {
            discard_until_eof(&mut s).await;
        }
    })
    .await
}

/// Reads an HTTP request head from `s` (up to the blank line); returns it.
pub async fn read_request_head(s: &mut (impl AsyncRead + Unpin)) -> String {
    read_head_unbounded(s).await
}

/// The `Sec-WebSocket-Accept` for the key in a request head.
pub fn accept_for(request_head: &str) -> String {
    let key = request_head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// A 101 answer to `request_head`.
pub fn switching_response(request_head: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_for(request_head)
    )
}

// ---------------------------------------------------------------- closed

/// An address that refuses connections and stays reserved while this lives:
/// a socket bound to `127.0.0.1:0` that never listens. A SYN to it is
/// answered with RST (connection refused), and no other test can take the
/// port in the meantime, as it could after a bind-and-drop.
#[derive(Debug)]
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

/// See [`ClosedPort`]; keep it for as long as something may connect to it.
pub fn closed_port() -> ClosedPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&any.into()).expect("bind");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    ClosedPort {
        addr,
        _socket: socket,
    }
}

// ---------------------------------------------------------------- echo

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
    _raw: RawUpstream,
}

pub type Received = Arc<Mutex<Vec<Message>>>;

impl Upstream {
    /// The Close frames the upstream received: (code, reason).
    pub fn closes(&self) -> Vec<(u16, String)> {
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
    pub fn data_messages(&self) -> Vec<Message> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.is_text() || m.is_binary())
            .cloned()
            .collect()
    }
}

pub async fn spawn_upstream(behaviour: Behaviour) -> Upstream {
    spawn_upstream_with(behaviour, false).await
}

pub async fn spawn_echo_upstream() -> Upstream {
    spawn_upstream(Behaviour::Echo).await
}

/// An echo upstream that keeps every message it receives in `received`
/// (only for tests that look at them: it never frees them).
pub async fn spawn_recording_upstream() -> Upstream {
    spawn_upstream_with(Behaviour::Echo, true).await
}

async fn spawn_upstream_with(behaviour: Behaviour, record: bool) -> Upstream {
    let received: Received = Arc::default();
    let log = record.then(|| Arc::clone(&received));
    let raw =
        spawn_raw_upstream(move |stream| serve_upstream_conn(stream, behaviour, log.clone())).await;
    Upstream {
        addr: raw.addr,
        accepts: Arc::clone(&raw.accepts),
        received,
        _raw: raw,
    }
}

async fn serve_upstream_conn<S>(mut stream: S, behaviour: Behaviour, log: Option<Received>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if behaviour == Behaviour::Silent {
        discard_until_eof(&mut stream).await;
        return;
    }
    let service = service_fn(move |req| upstream_handle(req, behaviour, log.clone()));
    serve_http(stream, service).await;
}

/// Serves HTTP/1.1 with upgrades on one connection (TCP or Unix).
async fn serve_http<IO, S>(stream: IO, service: S)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<UpBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
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

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

async fn upstream_handle(
    req: Request<Incoming>,
    behaviour: Behaviour,
    log: Option<Received>,
) -> Result<Response<UpBody>, Infallible> {
    if !is_upgrade(&req) {
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
    Ok(upgrade_response(req, behaviour, log))
}

/// Answers an upgrade with 101 and serves the WebSocket the way
/// `behaviour` says.
fn upgrade_response(
    mut req: Request<Incoming>,
    behaviour: Behaviour,
    log: Option<Received>,
) -> Response<UpBody> {
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
    r
}

async fn hold_open(mut io: TokioIo<hyper::upgrade::Upgraded>) {
    discard_until_eof(&mut io).await;
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

// ---------------------------------------------------------------- counting

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The request target as received: path and query.
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The path a bystander connection uses: a connection opened before the
/// abuse and checked after it, to show other connections are unaffected.
/// The counting upstream leaves it out of its counts.
pub const BYSTANDER_PATH: &str = "/bystander";

/// An upstream that records every request: WebSocket upgrades get an echo,
/// anything else 200 with `x-upstream: yes` and the request count as body.
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _raw: RawUpstream,
}

impl CountingUpstream {
    /// Requests seen, not counting the bystander's (see [`BYSTANDER_PATH`]).
    pub fn count(&self) -> usize {
        self.requests().len()
    }

    /// Requests seen, in order, without the bystander's.
    pub fn requests(&self) -> Vec<Seen> {
        let seen = self.seen.lock().expect("lock");
        seen.iter()
            .filter(|r| r.path != BYSTANDER_PATH)
            .cloned()
            .collect()
    }
}

pub async fn spawn_counting_upstream() -> CountingUpstream {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let raw = spawn_raw_upstream(move |stream| {
        let record = Arc::clone(&record);
        serve_http(
            stream,
            service_fn(move |req| counting_handle(req, Arc::clone(&record))),
        )
    })
    .await;
    CountingUpstream {
        addr: raw.addr,
        seen,
        _raw: raw,
    }
}

async fn counting_handle(
    req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpBody>, Infallible> {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let target = req.uri().to_string();
    if is_upgrade(&req) {
        record.lock().expect("lock").push(Seen {
            method,
            path,
            target,
            headers,
            body: Vec::new(),
        });
        return Ok(upgrade_response(req, Behaviour::Echo, None));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let n = {
        let mut seen = record.lock().expect("lock");
        seen.push(Seen {
            method,
            path,
            target,
            headers,
            body,
        });
        seen.len()
    };
    let mut r = Response::new(full(format!("seen {n}\n")));
    r.headers_mut()
        .insert("x-upstream", HeaderValue::from_static("yes"));
    Ok(r)
}

// ---------------------------------------------------------------- unix socket

/// An upstream on a Unix domain socket (docs/operations.md#unix-socket-upstream): the same behaviours as
/// the TCP ones, at a socket file. Requests it serves with the counting
/// handler are recorded in `seen`.
pub struct UnixUpstream {
    /// The socket file.
    pub path: PathBuf,
    /// Connections it accepted.
    pub accepts: Arc<AtomicUsize>,
    /// Requests recorded by [`spawn_unix_counting_upstream`] (empty for the others).
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
    /// The temp dir holding the socket file, when this upstream made it.
    _dir: Option<tempfile::TempDir>,
}

impl UnixUpstream {
    /// The `upstream` value that names it: `unix:/path`.
    pub fn upstream(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

impl Drop for UnixUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fresh temp dir and the socket path in it (`ws.sock`).
pub fn unix_socket_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ws.sock");
    (dir, path)
}

/// Listens at `path` and runs `f` on each connection, like
/// [`spawn_raw_upstream`]; the caller owns the directory.
pub fn spawn_unix_raw_upstream_at<F, Fut>(path: &Path, f: F) -> UnixUpstream
where
    F: Fn(UnixStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    start_unix(path, None, Arc::default(), f)
}

/// [`spawn_unix_raw_upstream_at`] in a temp dir of its own.
pub fn spawn_unix_raw_upstream<F, Fut>(f: F) -> UnixUpstream
where
    F: Fn(UnixStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (dir, path) = unix_socket_path();
    start_unix(&path, Some(dir), Arc::default(), f)
}

/// The accept loop of every [`UnixUpstream`].
fn start_unix<F, Fut>(
    path: &Path,
    dir: Option<tempfile::TempDir>,
    seen: Arc<Mutex<Vec<Seen>>>,
    f: F,
) -> UnixUpstream
where
    F: Fn(UnixStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = UnixListener::bind(path).expect("bind the upstream's socket");
    let accepts = Arc::new(AtomicUsize::new(0));
    let task = serve_each(listener, Arc::clone(&accepts), f);
    UnixUpstream {
        path: path.to_owned(),
        accepts,
        seen,
        task,
        _dir: dir,
    }
}

/// An upstream behaving as `behaviour` says, at `path`.
pub fn spawn_unix_upstream_at(path: &Path, behaviour: Behaviour) -> UnixUpstream {
    spawn_unix_raw_upstream_at(path, move |stream| {
        serve_upstream_conn(stream, behaviour, None)
    })
}

/// An upstream behaving as `behaviour` says, in a temp dir of its own.
pub fn spawn_unix_upstream(behaviour: Behaviour) -> UnixUpstream {
    spawn_unix_raw_upstream(move |stream| serve_upstream_conn(stream, behaviour, None))
}

/// The counting upstream ([`spawn_counting_upstream`]) on a Unix socket:
/// every request is recorded in `seen`.
pub fn spawn_unix_counting_upstream() -> UnixUpstream {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let (dir, path) = unix_socket_path();
    start_unix(&path, Some(dir), seen, move |stream| {
        let record = Arc::clone(&record);
        serve_http(
            stream,
            service_fn(move |req| counting_handle(req, Arc::clone(&record))),
        )
    })
}
