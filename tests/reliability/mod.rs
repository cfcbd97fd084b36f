//! Support for the reliability tests (faults, hostile input, churn): the
//! wsgate binary run as a child process, /proc readings of a process, a raw
//! WebSocket handshake, and an upstream that counts every request it sees.
//!
//! Why a child process: descriptor limits, CPU time, RSS and SIGKILL are
//! properties of a process; measuring them on the test process would mix in
//! the clients and upstreams the test runs itself. Kept apart from
//! `tests/support/mod.rs` so that the two can change independently.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "each test binary uses a subset"
)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Every wait on a child process is bounded by this.
pub const CHILD_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- child process

/// A wsgate binary running as a child; SIGKILLed and reaped on drop.
pub struct GateProcess {
    child: Child,
    pub pid: u32,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
}

impl GateProcess {
    /// Starts `wsgate ARGS` with `env` (on top of a cleared `WSGATE_*`/`RUST_LOG`),
    /// optionally under `prlimit --nofile=N:N` (soft and hard, because wsgate
    /// raises its soft limit to the hard one at start-up).
    pub fn start(args: &[&str], env: &[(&str, String)], nofile: Option<u64>) -> GateProcess {
        let bin = env!("CARGO_BIN_EXE_wsgate");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("WSGATE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("WSGATE_") || k == "WS_MAX_CLIENTS" {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the wsgate binary");
        let pid = child.id();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("stdout"), Arc::clone(&stdout));
        collect(child.stderr.take().expect("stderr"), Arc::clone(&stderr));
        GateProcess {
            child,
            pid,
            stdout,
            stderr,
        }
    }

    /// `wsgate demo` on port 0 with `env` on top; returns it with the
    /// addresses from its banner: (echo upstream, proxy, admin).
    pub fn demo(env: &[(&str, String)]) -> (GateProcess, SocketAddr, SocketAddr, SocketAddr) {
        let mut all = vec![
            ("WSGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ];
        all.extend(env.iter().cloned());
        let gate = GateProcess::start(&["demo"], &all, None);
        let echo = gate.wait_addr(&gate.stdout, "upstream  ws://");
        let proxy = gate.wait_addr(&gate.stdout, "proxy     ws://");
        let admin = gate.wait_addr(&gate.stdout, "metrics   http://");
        (gate, echo, proxy, admin)
    }

    /// `wsgate` in front of `upstream` on port 0; returns it with (proxy, admin)
    /// as read from its start-up log.
    pub fn proxy(
        upstream: SocketAddr,
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> (GateProcess, SocketAddr, SocketAddr) {
        let mut all = vec![
            ("WSGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("WSGATE_UPSTREAM", upstream.to_string()),
        ];
        all.extend(env.iter().cloned());
        let gate = GateProcess::start(&[], &all, nofile);
        let proxy = gate.wait_addr(&gate.stderr, "proxy listening addr=");
        let admin = gate.wait_addr(&gate.stderr, "admin listening addr=");
        (gate, proxy, admin)
    }

    /// Polls `stream` until it holds `prefix` followed by an address.
    fn wait_addr(&self, stream: &Arc<Mutex<String>>, prefix: &str) -> SocketAddr {
        let text = self.wait_for(stream, prefix);
        let rest = &text[text.find(prefix).expect("found") + prefix.len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse()
            .unwrap_or_else(|_| panic!("no address after {prefix:?} in {text}"))
    }

    /// Polls `stream` until it contains `needle` (a whole line read); returns its text.
    pub fn wait_for(&self, stream: &Arc<Mutex<String>>, needle: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            let text = stream.lock().expect("lock").clone();
            if let Some(i) = text.find(needle) {
                if text[i..].contains('\n') {
                    return text;
                }
            }
            assert!(
                start.elapsed() < CHILD_DEADLINE,
                "wsgate child never printed {needle:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout.lock().expect("lock"),
                self.stderr.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// Sends a signal with `kill(1)` to this child (and only this child).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.pid);
    }

    /// Waits (bounded) for the child to exit; its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < CHILD_DEADLINE,
                "wsgate child {} did not exit",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id of the wsgate process itself (prlimit execs it, so it
    /// is the same pid).
    pub fn stat(&self) -> ProcStat {
        ProcStat::read(self.pid)
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn collect(pipe: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            into.lock().expect("lock").push_str(&line);
            line.clear();
        }
    });
}

/// Runs the wsgate binary to completion (bounded) with `env`; (exit code, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, String)]) -> (Option<i32>, String) {
    let mut gate = GateProcess::start(args, env, None);
    let status = gate.wait_exit();
    // The collector threads finish at EOF, which follows the exit closely.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2) && !gate.stderr_text().contains("wsgate:") {
        std::thread::sleep(Duration::from_millis(10));
    }
    (status.code(), gate.stderr_text())
}

// ---------------------------------------------------------------- /proc

/// What /proc says about one process.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open descriptors.
    pub fds: usize,
    /// User + system CPU time, clock ticks (1/100 s on Linux).
    pub cpu_ticks: u64,
}

impl ProcStat {
    pub fn read(pid: u32) -> ProcStat {
        ProcStat {
            rss_kib: rss_kib(&format!("/proc/{pid}/status")),
            fds: fd_count(&format!("/proc/{pid}/fd")),
            cpu_ticks: cpu_ticks(pid),
        }
    }

    pub fn own() -> ProcStat {
        ProcStat::read(std::process::id())
    }
}

fn rss_kib(path: &str) -> u64 {
    let status = std::fs::read_to_string(path).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fd_count(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, i.e. the 12th and 13th after ")".
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// Live tokio tasks on the current runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

// ---------------------------------------------------------------- raw clients

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid WebSocket upgrade request head.
pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// Reads a response head (up to the blank line) byte by byte, so nothing
/// after it is consumed. Returns the head, or what was read before EOF.
pub async fn read_head(s: &mut TcpStream) -> String {
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

/// The status code of a response head, 0 if there is none.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Opens a raw TCP connection and completes a WebSocket upgrade through it;
/// the stream is then a raw byte pipe to the upstream (no framing needed:
/// wsgate splices bytes).
pub async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(upgrade_request(addr).as_bytes())
        .await
        .expect("send upgrade");
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "upgrade refused: {head}");
    s
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

// ---------------------------------------------------------------- counting upstream

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
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
    task: JoinHandle<()>,
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
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

type UpBody = BoxBody<Bytes, hyper::Error>;

pub async fn spawn_counting_upstream() -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let record = Arc::clone(&record);
            conns.spawn(async move {
                let service = service_fn(move |req| counting_handle(req, Arc::clone(&record)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    CountingUpstream { addr, seen, task }
}

async fn counting_handle(
    mut req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpBody>, Infallible> {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_upgrade {
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
                headers,
                body,
            });
            seen.len()
        };
        let mut r = Response::new(
            Full::new(Bytes::from(format!("seen {n}\n")))
                .map_err(|e: Infallible| match e {})
                .boxed(),
        );
        r.headers_mut()
            .insert("x-upstream", HeaderValue::from_static("yes"));
        return Ok(r);
    }
    record.lock().expect("lock").push(Seen {
        method,
        path,
        headers,
        body: Vec::new(),
    });
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .unwrap_or(HeaderValue::from_static(""));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("accept"),
    );
    Ok(r)
}

// ---------------------------------------------------------------- raw upstreams

/// An upstream that takes each connection and hands it to `f` (a raw
/// misbehaving upstream); counts accepted connections.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub accepts: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_raw_upstream<F, Fut>(f: F) -> RawUpstream
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&accepts);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            conns.spawn(f(stream));
        }
    });
    RawUpstream {
        addr,
        accepts,
        task,
    }
}

/// Reads an HTTP request head from `s` (up to the blank line); returns it.
pub async fn read_request_head(s: &mut TcpStream) -> String {
    read_head(s).await
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
