//! wsgate-bench: the project's own WebSocket benchmark tool.
//!
//! * `echo`        – the echo upstream: `--kind frame` (default) a fast, hand-rolled frame-level
//!   echo (no message reassembly, large reads, TCP_NODELAY, multi-thread tokio); `--kind
//!   tungstenite` a tokio-tungstenite message echo on a current-thread runtime (writes each message
//!   back as the library frames it, flushing after each). `--unix PATH` listens there too.
//! * `latency`     – C connections, one small message in flight each: msgs/s, RTT p50/p99.
//! * `throughput`  – a few connections keeping several 64 KiB binary messages in flight: MB/s.
//! * `handshake`   – open-upgrade-close N connections, C at a time: upgrades/s, failures.
//! * `idle`        – hold N idle connections, report the proxy's RSS delta per connection.
//! * `cap`         – A upgrades at once against a proxy capped at K: admitted, 503, hung,
//!   time-to-503 percentiles.
//! * `refuse`      – N upgrades, C at a time, against a proxy whose cap is full: each an HTTP
//!   refusal, or (wsgate's `refusal_mode = "close"`) a 101 then Close 1013 answered by the
//!   client; counts of each, refusals/s.
//! * `storm`       – reconnect storm: N clients held on the upstream itself are cut at once and
//!   all reconnect through a proxy capped at K, retrying at once on every refusal: time until K
//!   are admitted (a message echoed), refusals (503 / Close 1013), attempts, the proxy's CPU and
//!   peak RSS over the storm.
//!
//! Every load mode is bounded in count *and* time, talks to loopback only, reads the proxy's CPU
//! time (utime+stime of the process tree under `--proxy-pid`) from /proc before and after (and,
//! in latency, throughput and handshake, the echo's and the generator's own, for the whole
//! machine's CPU per unit), and prints exactly one JSON line on stdout. Exit code 1 when the mode
//! failed its own sanity checks.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UnixListener};
use tokio::sync::{Barrier, Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

#[derive(Parser)]
#[command(name = "wsgate-bench", version, about = "WebSocket proxy benchmark (loopback only)")]
struct Cli {
    /// Tokio worker threads for this process; 0 = a current-thread runtime (one thread does it
    /// all). `echo --kind tungstenite` always runs on a current-thread runtime.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the echo upstream; prints `echo listening addr=IP:PORT kind=K` (and, with --unix,
    /// `echo listening unix=PATH`) on stdout.
    Echo(EchoArgs),
    /// C connections, each sending a small message and awaiting its echo, one at a time.
    Latency(LatencyArgs),
    /// A few connections, each keeping several large binary messages in flight.
    Throughput(ThroughputArgs),
    /// Open-upgrade-close N connections, C at a time.
    Handshake(HandshakeArgs),
    /// Hold N idle upgraded connections; report the proxy's RSS per connection.
    Idle(IdleArgs),
    /// A upgrades at once against a capped proxy: admitted / 503 / hung and time-to-503.
    Cap(CapArgs),
    /// N upgrades, C at a time, against a proxy whose cap is full: HTTP refusals or Close 1013.
    Refuse(HandshakeArgs),
    /// Reconnect storm: N clients cut from the upstream at once reconnect through a proxy capped
    /// at K, with no backoff, until K are admitted.
    Storm(StormArgs),
}

#[derive(Args, Clone)]
struct EchoArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// `frame`: hand-rolled frame-level echo (multi-thread runtime, --threads workers);
    /// `tungstenite`: tokio-tungstenite echo of whole messages on a current-thread runtime.
    #[arg(long, default_value = "frame")]
    kind: EchoKind,
    /// Also listen on a Unix stream socket at PATH (an existing file there is removed first).
    #[arg(long)]
    unix: Option<std::path::PathBuf>,
    /// Listen backlog of the TCP socket (the kernel caps it at net.core.somaxconn). A burst of
    /// upstream connects (cap and storm modes: thousands at once) must not overflow the echo's
    /// accept queue, whose overflow costs a 1 s SYN retransmit: tokio's default is 128.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EchoKind {
    Frame,
    Tungstenite,
}

impl EchoKind {
    fn name(self) -> &'static str {
        match self {
            EchoKind::Frame => "frame",
            EchoKind::Tungstenite => "tungstenite",
        }
    }
}

#[derive(Args, Clone)]
struct Common {
    /// ws://IP:PORT/path of the target (a proxy, or the echo itself for `direct`).
    #[arg(long)]
    url: String,
    /// PID(s) of the proxy, comma-separated; their descendants (nginx workers) are included.
    #[arg(long, value_delimiter = ',')]
    proxy_pid: Vec<u32>,
    /// PID of the echo upstream (its CPU time is reported too, as a reference).
    #[arg(long)]
    echo_pid: Option<u32>,
    /// Label copied into the JSON line.
    #[arg(long, default_value = "unnamed")]
    target: String,
    /// Round number copied into the JSON line.
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Hard time bound of the whole mode, seconds (measurement + set-up + drain).
    #[arg(long, default_value_t = 60.0)]
    max_time: f64,
}

#[derive(Args, Clone)]
struct LatencyArgs {
    #[command(flatten)]
    c: Common,
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Measurement duration, seconds.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Upper bound on round trips per connection.
    #[arg(long, default_value_t = 2_000_000)]
    max_msgs: u64,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Client data path after the (tungstenite) upgrade: `raw` = pre-built masked frames and a
    /// minimal frame parser (cheapest generator, leaves more CPU to the proxy), `tungstenite`.
    #[arg(long, default_value = "raw")]
    client: ClientKind,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ClientKind {
    Raw,
    Tungstenite,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Raw => "raw",
            ClientKind::Tungstenite => "tungstenite",
        }
    }
}

#[derive(Args, Clone)]
struct ThroughputArgs {
    #[command(flatten)]
    c: Common,
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    #[arg(long, default_value_t = 65536)]
    size: usize,
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Upper bound on messages per connection.
    #[arg(long, default_value_t = 1_000_000)]
    max_msgs: u64,
    /// Client data path after the upgrade (see `latency --help`).
    #[arg(long, default_value = "raw")]
    client: ClientKind,
}

#[derive(Args, Clone)]
struct HandshakeArgs {
    #[command(flatten)]
    c: Common,
    /// Total upgrades.
    #[arg(long, default_value_t = 2000)]
    total: u64,
    /// Concurrent upgrades.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Per-attempt timeout, seconds.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Args, Clone)]
struct IdleArgs {
    #[command(flatten)]
    c: Common,
    /// Idle connections to hold.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Concurrent opens.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Wait after the last open before reading RSS, seconds.
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// Per-attempt timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Round trips of a small message on each connection right after its upgrade, before it
    /// goes idle (so a design that keeps buffers after the first data is caught too).
    #[arg(long, default_value_t = 1)]
    warm: u32,
}

#[derive(Args, Clone)]
struct CapArgs {
    #[command(flatten)]
    c: Common,
    /// Upgrades launched at once.
    #[arg(long, default_value_t = 4000)]
    attempts: usize,
    /// The cap the proxy was configured with (0 = unknown / none): checked, not enforced here.
    #[arg(long, default_value_t = 0)]
    cap: usize,
    /// An attempt with no answer after this many seconds counts as hung.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Args, Clone)]
struct StormArgs {
    #[command(flatten)]
    c: Common,
    /// ws://IP:PORT/ of the echo upstream itself: where the clients are connected before the cut
    /// (the pod that goes away). `--url` is the proxy they all reconnect through.
    #[arg(long)]
    direct_url: String,
    /// Clients: each holds a connection to the upstream before the cut, then reconnects.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// The cap the proxy was configured with: the storm is over when this many are admitted.
    #[arg(long, default_value_t = 5_000)]
    cap: usize,
    /// Opens in flight while the clients connect to the upstream, before the cut.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Bound on one attempt (connect, upgrade, one round trip), seconds; past it the attempt is
    /// an error of kind `timeout (<phase>)` and the client retries at once.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

// ---------------------------------------------------------------------------------------------
// /proc helpers

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime+stime ticks) of one process.
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// The given PIDs plus all their live descendants.
fn proc_tree(roots: &[u32]) -> Vec<u32> {
    if roots.is_empty() {
        return vec![];
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((ppid, _)) = read_stat(pid) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        if seen.insert(p) {
            if let Some(c) = children.get(&p) {
                stack.extend(c);
            }
        }
    }
    let mut v: Vec<u32> = seen.into_iter().collect();
    v.sort_unstable();
    v
}

#[derive(Clone, Copy, Default)]
struct ProcSnap {
    cpu_s: f64,
    rss_kib: u64,
    fds: u64,
    procs: usize,
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn snap(roots: &[u32]) -> Option<ProcSnap> {
    if roots.is_empty() {
        return None;
    }
    let tck = clk_tck();
    let mut s = ProcSnap::default();
    for pid in proc_tree(roots) {
        if let Some((_, t)) = read_stat(pid) {
            s.cpu_s += t as f64 / tck;
            s.rss_kib += vm_rss_kib(pid);
            s.fds += std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
            s.procs += 1;
        }
    }
    Some(s)
}

fn cpu_delta(a: Option<ProcSnap>, b: Option<ProcSnap>) -> Option<f64> {
    Some(b?.cpu_s - a?.cpu_s)
}

/// The load generator's own CPU time (user + system, all threads), seconds: getrusage(SELF).
fn self_cpu_s() -> f64 {
    // SAFETY: getrusage fills a local struct.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut r) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }
}

/// CPU seconds of one measurement window: the proxy's (None for `direct`), the echo's and the
/// generator's own; `machine` is their sum (None when the echo was not measured).
struct CpuWindow {
    proxy: Option<f64>,
    echo: Option<f64>,
    gen: f64,
}

impl CpuWindow {
    fn machine(&self) -> Option<f64> {
        Some(self.echo? + self.gen + self.proxy.unwrap_or(0.0))
    }
}

/// Snapshots of the proxy tree, the echo and this process at the start of a window.
struct CpuMark {
    proxy: Option<ProcSnap>,
    echo: Option<ProcSnap>,
    gen: f64,
}

impl CpuMark {
    fn now(c: &Common) -> Self {
        CpuMark { proxy: snap(&c.proxy_pid), echo: c.echo_pid.and_then(|p| snap(&[p])), gen: self_cpu_s() }
    }
    fn since(&self, c: &Common) -> CpuWindow {
        let end = CpuMark::now(c);
        CpuWindow {
            proxy: cpu_delta(self.proxy, end.proxy),
            echo: cpu_delta(self.echo, end.echo),
            gen: end.gen - self.gen,
        }
    }
}

fn raise_nofile() -> (u64, u64) {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            if r.rlim_cur < r.rlim_max {
                let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    r.rlim_cur = r.rlim_max;
                }
            }
            (r.rlim_cur, r.rlim_max)
        } else {
            (0, 0)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// output helpers

fn new_hist() -> Histogram<u64> {
    // nanoseconds, 1 ns .. 100 s, 3 significant digits
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> Value {
    if h.is_empty() {
        Value::Null
    } else {
        json!(round3(h.value_at_quantile(q) as f64 / 1000.0))
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn opt(x: Option<f64>) -> Value {
    match x {
        Some(v) if v.is_finite() => json!(round3(v)),
        _ => Value::Null,
    }
}

/// `--threads` of this process (0 = current-thread runtime), copied into every JSON line.
static GEN_THREADS: AtomicU64 = AtomicU64::new(0);

fn emit(mode: &str, c: &Common, ok: bool, mut v: Value) -> bool {
    let obj = v.as_object_mut().expect("object");
    obj.insert("mode".into(), json!(mode));
    obj.insert("gen_threads".into(), json!(GEN_THREADS.load(Ordering::Relaxed)));
    obj.insert("target".into(), json!(c.target));
    obj.insert("round".into(), json!(c.round));
    obj.insert("ok".into(), json!(ok));
    let line = serde_json::to_string(&v).expect("json");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    ok
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

#[allow(clippy::large_enum_variant)]
enum Open {
    Upgraded(Ws),
    Status(u16),
    Failed(String),
}

/// Extra request headers for every upgrade, from `WSGATE_BENCH_HEADERS` (one `Name: value` per
/// line): how run.sh's variants send an `Origin` or a `Sec-WebSocket-Protocol` offer.
fn extra_headers() -> &'static [(String, String)] {
    static HEADERS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    HEADERS.get_or_init(|| {
        let text = std::env::var("WSGATE_BENCH_HEADERS").unwrap_or_default();
        text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
    })
}

async fn open(addr: &str, url: &str) -> Open {
    use tungstenite::client::IntoClientRequest as _;
    use tungstenite::http::{HeaderName, HeaderValue};
    let s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Open::Failed(format!("connect: {e}")),
    };
    let _ = s.set_nodelay(true);
    let mut req = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Open::Failed(format!("request: {e}")),
    };
    for (k, v) in extra_headers() {
        match (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            (Ok(k), Ok(v)) => req.headers_mut().append(k, v),
            _ => return Open::Failed(format!("bad WSGATE_BENCH_HEADERS line {k}: {v}")),
        };
    }
    match tokio_tungstenite::client_async(req, s).await {
        Ok((ws, _)) => Open::Upgraded(ws),
        Err(tungstenite::Error::Http(resp)) => Open::Status(resp.status().as_u16()),
        Err(e) => Open::Failed(format!("handshake: {e}")),
    }
}

async fn open_timeout(addr: &str, url: &str, t: Duration) -> Open {
    match tokio::time::timeout(t, open(addr, url)).await {
        Ok(o) => o,
        Err(_) => Open::Failed("timeout".into()),
    }
}

/// Next data message (skipping control frames); None on close/error.
async fn next_data(ws: &mut Ws) -> Result<usize, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b.len()),
            Some(Ok(Message::Text(t))) => return Ok(t.len()),
            Some(Ok(Message::Close(_))) | None => return Err("closed".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// echo upstream

async fn echo_main(a: EchoArgs) -> std::io::Result<()> {
    let addr = tokio::net::lookup_host(&a.listen).await?.next().ok_or_else(|| std::io::Error::other("no address to listen on"))?;
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.bind(addr)?;
    let l = sock.listen(a.backlog)?;
    let unix = match &a.unix {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(UnixListener::bind(p)?)
        }
        None => None,
    };
    // both lines only once both sockets listen
    println!("echo listening addr={} kind={}", l.local_addr()?, a.kind.name());
    if let Some(p) = &a.unix {
        println!("echo listening unix={}", p.display());
    }
    std::io::stdout().flush()?;
    let kind = a.kind;
    if let Some(u) = unix {
        tokio::spawn(async move {
            loop {
                match u.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(echo_serve(kind, s));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
    }
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(echo_serve(kind, s));
    }
}

async fn echo_serve<S: AsyncRead + AsyncWrite + Unpin>(kind: EchoKind, s: S) {
    match kind {
        EchoKind::Frame => {
            let _ = echo_conn(s).await;
        }
        EchoKind::Tungstenite => {
            let _ = echo_tungstenite(s).await;
        }
    }
}

/// The echo a WebSocket library makes: tokio-tungstenite reads whole messages (reassembling
/// fragments, unmasking) and each is sent back with `send` (the library frames it into its write
/// buffer, header and payload, and flushes). Pings are answered by the library; a Close is
/// answered by it too, and the loop keeps reading until the closing handshake is done.
async fn echo_tungstenite<S: AsyncRead + AsyncWrite + Unpin>(s: S) -> Result<(), tungstenite::Error> {
    let cfg = WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20));
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(s, select_first_subprotocol, Some(cfg)).await?;
    while let Some(m) = ws.next().await {
        match m? {
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await?,
            // the reply Close is queued by the library and written by the next read
            Message::Close(_) => {}
            _ => {}
        }
    }
    Ok(())
}

/// The handshake callback of the tungstenite echo: selects the first offered subprotocol, as an
/// application would.
#[allow(clippy::result_large_err, reason = "the callback type is tungstenite's")]
fn select_first_subprotocol(
    req: &tungstenite::handshake::server::Request,
    mut resp: tungstenite::handshake::server::Response,
) -> Result<tungstenite::handshake::server::Response, tungstenite::handshake::server::ErrorResponse> {
    let first = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next());
    if let Some(p) = first.and_then(|p| tungstenite::http::HeaderValue::from_str(p.trim()).ok()) {
        resp.headers_mut().insert("sec-websocket-protocol", p);
    }
    Ok(resp)
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

fn unmask(p: &mut [u8], m: [u8; 4]) {
    let m8 = [m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]];
    let m64 = u64::from_ne_bytes(m8);
    let mut chunks = p.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m8[i & 3];
    }
}

async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut inb: Vec<u8> = Vec::with_capacity(2048);
    let end = loop {
        if s.read_buf(&mut inb).await? == 0 {
            return Ok(());
        }
        if let Some(e) = find_head_end(&inb) {
            break e;
        }
        if inb.len() > 65536 {
            return Ok(());
        }
        if inb.capacity() == inb.len() {
            inb.reserve(4096);
        }
    };
    let head = String::from_utf8_lossy(&inb[..end]).to_string();
    let key = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("sec-websocket-key").then(|| v.trim().to_string())
    });
    let Some(key) = key else {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await?;
        return Ok(());
    };
    // The first offered subprotocol is selected, as an application would.
    let protocol = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("sec-websocket-protocol").then(|| v.split(',').next().unwrap_or("").trim().to_string())
    });
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{}\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
        protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default()
    );
    s.write_all(resp.as_bytes()).await?;
    inb.drain(..end + 4);
    inb.shrink_to(256);
    let mut out: Vec<u8> = Vec::new();
    let mut start = 0usize; // consumed prefix of inb
    loop {
        let mut close = false;
        loop {
            let avail = &mut inb[start..];
            if avail.len() < 2 {
                break;
            }
            let (b0, b1) = (avail[0], avail[1]);
            let masked = b1 & 0x80 != 0;
            let mut len = (b1 & 0x7f) as usize;
            let mut hl = 2usize;
            if len == 126 {
                if avail.len() < 4 {
                    break;
                }
                len = u16::from_be_bytes([avail[2], avail[3]]) as usize;
                hl = 4;
            } else if len == 127 {
                if avail.len() < 10 {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                len = u64::from_be_bytes(b) as usize;
                if len > (64 << 20) {
                    return Ok(());
                }
                hl = 10;
            }
            let mk = hl;
            if masked {
                hl += 4;
            }
            if avail.len() < hl + len {
                // make sure the whole frame will fit
                let need = hl + len;
                if inb.capacity() - start < need {
                    inb.drain(..start);
                    start = 0;
                    inb.reserve(need.max(65536));
                }
                break;
            }
            let opcode = b0 & 0x0f;
            let (hdr, payload) = avail.split_at_mut(hl);
            if masked {
                unmask(&mut payload[..len], [hdr[mk], hdr[mk + 1], hdr[mk + 2], hdr[mk + 3]]);
            }
            let ob0 = if opcode == 0x9 { (b0 & 0xf0) | 0xA } else { b0 };
            out.push(ob0);
            if len < 126 {
                out.push(len as u8);
            } else if len < 65536 {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
            out.extend_from_slice(&payload[..len]);
            start += hl + len;
            if opcode == 0x8 {
                close = true;
                break;
            }
        }
        if start == inb.len() {
            inb.clear();
            start = 0;
        } else if start > 0 && start > inb.len() / 2 {
            inb.drain(..start);
            start = 0;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
            if out.capacity() > (1 << 20) {
                out.shrink_to(65536);
            }
        }
        if close {
            let _ = s.shutdown().await;
            return Ok(());
        }
        if inb.capacity() - inb.len() < 16384 {
            inb.reserve(65536);
        }
        if s.read_buf(&mut inb).await? == 0 {
            return Ok(());
        }
    }
}


// ---------------------------------------------------------------------------------------------
// raw client data path: the upgrade is done by tokio-tungstenite, then frames are written from a
// pre-built masked buffer and read back with a minimal parser (server frames are unmasked).

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn masked_frame(payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload_len + 14);
    f.push(0x82); // FIN + binary
    if payload_len < 126 {
        f.push(0x80 | payload_len as u8);
    } else if payload_len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
    f.extend_from_slice(&MASK);
    let start = f.len();
    f.resize(start + payload_len, fill);
    unmask(&mut f[start..], MASK); // XOR is its own inverse
    f
}

/// Incremental parser of unmasked server frames: counts data frames and payload bytes.
#[derive(Default)]
struct FrameCounter {
    hdr: Vec<u8>,
    remaining: u64,
    in_data: bool,
    closed: bool,
}

impl FrameCounter {
    /// Feed bytes; returns (completed data frames, data payload bytes).
    fn feed(&mut self, mut b: &[u8]) -> (u64, u64) {
        let (mut frames, mut bytes) = (0u64, 0u64);
        while !b.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(b.len());
                self.remaining -= n as u64;
                if self.in_data {
                    bytes += n as u64;
                }
                b = &b[n..];
                if self.remaining == 0 && self.in_data {
                    frames += 1;
                }
                continue;
            }
            // header bytes
            let need = |h: &[u8]| -> usize {
                if h.len() < 2 {
                    return 2;
                }
                let l = h[1] & 0x7f;
                let m = if h[1] & 0x80 != 0 { 4 } else { 0 };
                2 + m + if l == 126 { 2 } else if l == 127 { 8 } else { 0 }
            };
            while self.hdr.len() < need(&self.hdr) && !b.is_empty() {
                self.hdr.push(b[0]);
                b = &b[1..];
            }
            if self.hdr.len() < need(&self.hdr) {
                break;
            }
            let h = &self.hdr;
            let l = h[1] & 0x7f;
            let len = if l == 126 {
                u16::from_be_bytes([h[2], h[3]]) as u64
            } else if l == 127 {
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]])
            } else {
                l as u64
            };
            let op = h[0] & 0x0f;
            if op == 0x8 {
                self.closed = true;
            }
            self.in_data = op < 0x8;
            self.remaining = len;
            self.hdr.clear();
            if len == 0 && self.in_data {
                frames += 1;
            }
        }
        (frames, bytes)
    }
}

/// Send one pre-built frame and wait for one echoed data frame.
async fn raw_round_trip(s: &mut TcpStream, frame: &[u8], fc: &mut FrameCounter, buf: &mut [u8]) -> Result<(), String> {
    s.write_all(frame).await.map_err(|e| e.to_string())?;
    loop {
        let n = s.read(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        let (frames, _) = fc.feed(&buf[..n]);
        if fc.closed {
            return Err("close frame".into());
        }
        if frames > 0 {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// latency

async fn latency(a: LatencyArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let hard = Instant::now() + Duration::from_secs_f64(c.max_time);
    let dur = Duration::from_secs_f64(a.duration);
    let barrier = Arc::new(Barrier::new(a.conns + 1));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (addr, url, barrier, errors) = (addr.clone(), c.url.clone(), barrier.clone(), errors.clone());
        let (max_msgs, size, kind) = (a.max_msgs, a.size, a.client);
        tasks.push(tokio::spawn(async move {
            let mut h = new_hist();
            let ws = open_timeout(&addr, &url, Duration::from_secs(10)).await;
            barrier.wait().await;
            let mut ws = match ws {
                Open::Upgraded(ws) => ws,
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return (h, None);
                }
            };
            let payload = tungstenite::Bytes::from(vec![b'x'; size]);
            let deadline = (Instant::now() + dur).min(hard);
            let mut n = 0u64;
            if kind == ClientKind::Raw {
                let mut s = ws.into_inner();
                let frame = masked_frame(size, b'x');
                let mut fc = FrameCounter::default();
                let mut buf = vec![0u8; 4096.max(size + 16)];
                while n < max_msgs && Instant::now() < deadline {
                    let t0 = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(5), raw_round_trip(&mut s, &frame, &mut fc, &mut buf)).await {
                        Ok(Ok(())) => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    let _ = h.record((t0.elapsed().as_nanos() as u64).max(1));
                    n += 1;
                }
                return (h, None);
            }
            while n < max_msgs && Instant::now() < deadline {
                let t0 = Instant::now();
                if ws.send(Message::Binary(payload.clone())).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), next_data(&mut ws)).await {
                    Ok(Ok(_)) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                let _ = h.record((t0.elapsed().as_nanos() as u64).max(1));
                n += 1;
            }
            (h, Some(ws))
        }));
    }
    barrier.wait().await;
    let m0 = CpuMark::now(c);
    let t0 = Instant::now();
    let mut h = new_hist();
    let mut keep = Vec::new();
    for t in tasks {
        if let Ok((th, ws)) = t.await {
            let _ = h.add(&th);
            keep.extend(ws);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let w = m0.since(c);
    for mut ws in keep {
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    }
    let msgs = h.len();
    let cpu = w.proxy;
    let errs = errors.load(Ordering::Relaxed);
    let ok = msgs > 0 && errs == 0;
    let per_msg = |x: Option<f64>| opt(x.map(|c| c * 1e6 / msgs.max(1) as f64));
    emit(
        "latency",
        c,
        ok,
        json!({
            "conns": a.conns, "size": a.size, "msgs": msgs, "client": a.client.name(), "elapsed_s": round3(el),
            "msgs_per_s": round3(msgs as f64 / el),
            "p50_us": us(&h, 0.5), "p99_us": us(&h, 0.99), "p999_us": us(&h, 0.999), "max_us": us(&h, 1.0),
            "errors": errs,
            "proxy_cpu_s": opt(cpu),
            "cpu_us_per_msg": per_msg(cpu),
            "echo_cpu_s": opt(w.echo),
            "echo_cpu_us_per_msg": per_msg(w.echo),
            "gen_cpu_s": opt(Some(w.gen)),
            "gen_cpu_us_per_msg": per_msg(Some(w.gen)),
            "machine_cpu_s": opt(w.machine()),
            "machine_cpu_us_per_msg": per_msg(w.machine()),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// throughput

async fn throughput(a: ThroughputArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let hard = Instant::now() + Duration::from_secs_f64(c.max_time);
    let dur = Duration::from_secs_f64(a.duration);
    let barrier = Arc::new(Barrier::new(a.conns + 1));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (addr, url, barrier, errors) = (addr.clone(), c.url.clone(), barrier.clone(), errors.clone());
        let (max_msgs, size, inflight, kind) = (a.max_msgs, a.size, a.inflight, a.client);
        tasks.push(tokio::spawn(async move {
            let ws = open_timeout(&addr, &url, Duration::from_secs(10)).await;
            barrier.wait().await;
            let ws = match ws {
                Open::Upgraded(ws) => ws,
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return 0u64;
                }
            };
            if kind == ClientKind::Raw {
                return raw_throughput(ws.into_inner(), size, inflight, max_msgs, (Instant::now() + dur).min(hard), errors).await;
            }
            let (mut sink, mut stream) = ws.split();
            let payload = tungstenite::Bytes::from(vec![0xA5u8; size]);
            let sem = Arc::new(Semaphore::new(inflight));
            let done = Arc::new(Notify::new());
            let deadline = (Instant::now() + dur).min(hard);
            let writer = {
                let (sem, done, errors) = (sem.clone(), done.clone(), errors.clone());
                async move {
                    let mut n = 0u64;
                    while n < max_msgs && Instant::now() < deadline {
                        match sem.acquire().await {
                            Ok(p) => p.forget(),
                            Err(_) => break,
                        }
                        if sink.send(Message::Binary(payload.clone())).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        n += 1;
                    }
                    // drain: wait until every message in flight has come back (bounded)
                    let drained = tokio::time::timeout(Duration::from_secs(5), sem.acquire_many(inflight as u32)).await;
                    if !matches!(drained, Ok(Ok(_))) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    done.notify_one();
                    let _ = tokio::time::timeout(Duration::from_millis(200), sink.close()).await;
                }
            };
            let reader = async {
                let mut bytes = 0u64;
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(Message::Binary(b))) => { bytes += b.len() as u64; sem.add_permits(1); }
                            Some(Ok(Message::Close(_))) | None => break,
                            Some(Ok(_)) => {}
                            Some(Err(_)) => { errors.fetch_add(1, Ordering::Relaxed); break; }
                        },
                        _ = done.notified() => break,
                    }
                }
                bytes
            };
            let ((), bytes) = tokio::join!(writer, reader);
            bytes
        }));
    }
    barrier.wait().await;
    let m0 = CpuMark::now(c);
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await.unwrap_or(0);
    }
    let el = t0.elapsed().as_secs_f64();
    let w = m0.since(c);
    let cpu = w.proxy;
    let errs = errors.load(Ordering::Relaxed);
    // each echoed payload byte crossed the proxy twice (there and back)
    let gb_proxied = 2.0 * bytes as f64 / 1e9;
    let per_gb = |x: Option<f64>| opt(x.map(|c| c / gb_proxied.max(1e-12)));
    emit(
        "throughput",
        c,
        bytes > 0 && errs == 0,
        json!({
            "conns": a.conns, "inflight": a.inflight, "size": a.size, "client": a.client.name(),
            "bytes_echoed": bytes, "elapsed_s": round3(el),
            "mb_per_s": round3(bytes as f64 / 1e6 / el),
            "errors": errs,
            "proxy_cpu_s": opt(cpu),
            "cpu_s_per_gb": per_gb(cpu),
            "echo_cpu_s": opt(w.echo),
            "echo_cpu_s_per_gb": per_gb(w.echo),
            "gen_cpu_s": opt(Some(w.gen)),
            "gen_cpu_s_per_gb": per_gb(Some(w.gen)),
            "machine_cpu_s": opt(w.machine()),
            "machine_cpu_s_per_gb": per_gb(w.machine()),
        }),
    )
}

async fn raw_throughput(
    s: TcpStream,
    size: usize,
    inflight: usize,
    max_msgs: u64,
    deadline: Instant,
    errors: Arc<AtomicU64>,
) -> u64 {
    let (mut rd, mut wr) = s.into_split();
    let frame = masked_frame(size, 0xA5);
    let sem = Arc::new(Semaphore::new(inflight));
    let done = Arc::new(Notify::new());
    let writer = {
        let (sem, done, errors) = (sem.clone(), done.clone(), errors.clone());
        async move {
            let mut n = 0u64;
            while n < max_msgs && Instant::now() < deadline {
                match sem.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
                if wr.write_all(&frame).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                n += 1;
            }
            let drained = tokio::time::timeout(Duration::from_secs(5), sem.acquire_many(inflight as u32)).await;
            if !matches!(drained, Ok(Ok(_))) {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            done.notify_one();
        }
    };
    let reader = async {
        let mut fc = FrameCounter::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) => break,
                    Ok(n) => {
                        let (frames, b) = fc.feed(&buf[..n]);
                        bytes += b;
                        if frames > 0 { sem.add_permits(frames as usize); }
                        if fc.closed { break; }
                    }
                    Err(_) => { errors.fetch_add(1, Ordering::Relaxed); break; }
                },
                _ = done.notified() => break,
            }
        }
        bytes
    };
    let ((), bytes) = tokio::join!(writer, reader);
    bytes
}

// ---------------------------------------------------------------------------------------------
// handshake

async fn handshake(a: HandshakeArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let hard = Instant::now() + Duration::from_secs_f64(c.max_time);
    let to = Duration::from_secs_f64(a.timeout);
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let fail_kinds = Arc::new(std::sync::Mutex::new(HashMap::<String, u64>::new()));
    let m0 = CpuMark::now(c);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (addr, url, next, failures, kinds) =
            (addr.clone(), c.url.clone(), next.clone(), failures.clone(), fail_kinds.clone());
        let total = a.total;
        tasks.push(tokio::spawn(async move {
            let mut h = new_hist();
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < hard {
                let t = Instant::now();
                let kind = match open_timeout(&addr, &url, to).await {
                    Open::Upgraded(mut ws) => {
                        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
                        // clean close: send Close, wait for the echo's Close / EOF (bounded)
                        let _ = tokio::time::timeout(to, async {
                            let _ = ws.close(None).await;
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        continue;
                    }
                    Open::Status(s) => format!("status {s}"),
                    Open::Failed(e) => e,
                };
                failures.fetch_add(1, Ordering::Relaxed);
                *kinds.lock().expect("lock").entry(kind).or_default() += 1;
            }
            h
        }));
    }
    let mut h = new_hist();
    for t in tasks {
        if let Ok(th) = t.await {
            let _ = h.add(&th);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let w = m0.since(c);
    let okn = h.len();
    let fails = failures.load(Ordering::Relaxed);
    let cpu = w.proxy;
    let kinds = fail_kinds.lock().expect("lock").clone();
    let per_up = |x: Option<f64>| opt(x.map(|c| c * 1e6 / okn.max(1) as f64));
    emit(
        "handshake",
        c,
        okn > 0 && fails == 0,
        json!({
            "conns": a.conns, "total": a.total, "upgrades": okn, "failures": fails,
            "failure_kinds": kinds, "elapsed_s": round3(el),
            "upgrades_per_s": round3(okn as f64 / el),
            "upgrade_p50_us": us(&h, 0.5), "upgrade_p99_us": us(&h, 0.99),
            "proxy_cpu_s": opt(cpu),
            "cpu_us_per_upgrade": per_up(cpu),
            "echo_cpu_s": opt(w.echo),
            "echo_cpu_us_per_upgrade": per_up(w.echo),
            "gen_cpu_s": opt(Some(w.gen)),
            "gen_cpu_us_per_upgrade": per_up(Some(w.gen)),
            "machine_cpu_s": opt(w.machine()),
            "machine_cpu_us_per_upgrade": per_up(w.machine()),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// idle

async fn idle(a: IdleArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let hard = Instant::now() + Duration::from_secs_f64(c.max_time);
    let to = Duration::from_secs_f64(a.timeout);
    let base = snap(&c.proxy_pid);
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let first_err = Arc::new(std::sync::Mutex::new(None::<String>));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        let (addr, url, next, failures, first_err) =
            (addr.clone(), c.url.clone(), next.clone(), failures.clone(), first_err.clone());
        let (count, warm) = (a.count as u64, a.warm);
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < hard {
                match open_timeout(&addr, &url, to).await {
                    Open::Upgraded(mut ws) => {
                        let mut good = true;
                        for _ in 0..warm {
                            let r = tokio::time::timeout(to, async {
                                ws.send(Message::Binary(tungstenite::Bytes::from_static(b"hello, upstream"))).await.ok()?;
                                next_data(&mut ws).await.ok()
                            })
                            .await;
                            if !matches!(r, Ok(Some(_))) {
                                good = false;
                                break;
                            }
                        }
                        if good {
                            held.push(ws);
                        } else {
                            failures.fetch_add(1, Ordering::Relaxed);
                            first_err.lock().expect("lock").get_or_insert("warm-up echo failed".into());
                        }
                    }
                    other => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        let e = match other {
                            Open::Status(s) => format!("status {s}"),
                            Open::Failed(e) => e,
                            Open::Upgraded(_) => unreachable!(),
                        };
                        first_err.lock().expect("lock").get_or_insert(e);
                    }
                }
            }
            held
        }));
    }
    let mut held: Vec<Ws> = Vec::with_capacity(a.count);
    for t in tasks {
        if let Ok(v) = t.await {
            held.extend(v);
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let after = snap(&c.proxy_pid);
    // liveness: a few held connections must still echo
    let mut alive = 0u64;
    let mut checked = 0u64;
    let step = (held.len() / 8).max(1);
    for i in (0..held.len()).step_by(step).take(8) {
        checked += 1;
        let ws = &mut held[i];
        let r = tokio::time::timeout(Duration::from_secs(3), async {
            ws.send(Message::Binary(tungstenite::Bytes::from_static(b"ping"))).await.ok()?;
            next_data(ws).await.ok()
        })
        .await;
        if matches!(r, Ok(Some(_))) {
            alive += 1;
        }
    }
    let n = held.len();
    let fails = failures.load(Ordering::Relaxed);
    let per_conn = match (base, after) {
        (Some(b), Some(x)) if n > 0 => Some((x.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / n as f64),
        _ => None,
    };
    let fds_per_conn = match (base, after) {
        (Some(b), Some(x)) if n > 0 => Some((x.fds as f64 - b.fds as f64) / n as f64),
        _ => None,
    };
    let cpu = cpu_delta(base, after);
    let ok = n == a.count && alive == checked;
    let err = first_err.lock().expect("lock").clone();
    let r = emit(
        "idle",
        c,
        ok,
        json!({
            "count": a.count, "concurrency": a.concurrency.max(1), "warm": a.warm, "held": n, "failures": fails, "first_error": err,
            "open_s": round3(open_s), "alive_checked": checked, "alive_ok": alive,
            "rss_base_kib": base.map(|b| b.rss_kib), "rss_kib": after.map(|b| b.rss_kib),
            "proxy_procs": after.map(|b| b.procs),
            "rss_bytes_per_conn": opt(per_conn),
            "fds_per_conn": opt(fds_per_conn),
            "proxy_cpu_s": opt(cpu),
            "cpu_us_per_conn": opt(cpu.map(|c| c * 1e6 / n.max(1) as f64)),
        }),
    );
    // drop without closing handshakes: the proxy is thrown away after this measurement
    drop(held);
    r
}

// ---------------------------------------------------------------------------------------------
// cap

async fn cap(a: CapArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let to = Duration::from_secs_f64(a.timeout.min(c.max_time));
    let barrier = Arc::new(Barrier::new(a.attempts + 1));
    let release = Arc::new(tokio::sync::watch::channel(false).0);
    let (otx, mut orx) = tokio::sync::mpsc::unbounded_channel::<(u8, u64, String)>();
    let mut tasks = Vec::new();
    for _ in 0..a.attempts {
        let (addr, url, barrier, otx) = (addr.clone(), c.url.clone(), barrier.clone(), otx.clone());
        let mut rel = release.subscribe();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let t = Instant::now();
            let o = open_timeout(&addr, &url, to).await;
            let dt = t.elapsed().as_nanos() as u64;
            match o {
                Open::Upgraded(ws) => {
                    let _ = otx.send((0, dt, String::new()));
                    // hold the slot until every attempt has an outcome (bounded)
                    let _ = tokio::time::timeout(to * 3, rel.wait_for(|v| *v)).await;
                    drop(ws);
                }
                Open::Status(503) => {
                    let _ = otx.send((1, dt, String::new()));
                }
                Open::Status(s) => {
                    let _ = otx.send((2, dt, format!("status {s}")));
                }
                Open::Failed(e) if e == "timeout" => {
                    let _ = otx.send((3, dt, e));
                }
                Open::Failed(e) => {
                    let _ = otx.send((4, dt, e));
                }
            }
        }));
    }
    drop(otx);
    let p0 = snap(&c.proxy_pid);
    barrier.wait().await;
    let t0 = Instant::now();
    let (mut admitted, mut rejected, mut other, mut hung, mut errs) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut h101, mut h503) = (new_hist(), new_hist());
    let mut kinds: HashMap<String, u64> = HashMap::new();
    let mut got = 0usize;
    while got < a.attempts {
        let Ok(Some((k, dt, e))) = tokio::time::timeout(to * 2, orx.recv()).await else {
            break;
        };
        got += 1;
        match k {
            0 => {
                admitted += 1;
                let _ = h101.record(dt.max(1));
            }
            1 => {
                rejected += 1;
                let _ = h503.record(dt.max(1));
            }
            2 => other += 1,
            3 => hung += 1,
            _ => errs += 1,
        }
        if !e.is_empty() {
            *kinds.entry(e).or_default() += 1;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let p1 = snap(&c.proxy_pid);
    let _ = release.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let cpu = cpu_delta(p0, p1);
    hung += (a.attempts - got) as u64;
    let mut ok = hung == 0 && errs == 0 && other == 0 && admitted > 0;
    if a.cap > 0 {
        ok = ok && admitted <= a.cap as u64;
    }
    emit(
        "cap",
        c,
        ok,
        json!({
            "attempts": a.attempts, "cap": a.cap, "admitted": admitted, "rejected_503": rejected,
            "other_status": other, "hung": hung, "errors": errs, "failure_kinds": kinds,
            "elapsed_s": round3(el),
            "t503_p50_us": us(&h503, 0.5), "t503_p99_us": us(&h503, 0.99), "t503_max_us": us(&h503, 1.0),
            "t101_p50_us": us(&h101, 0.5), "t101_p99_us": us(&h101, 0.99),
            "proxy_cpu_s": opt(cpu),
            "cpu_us_per_attempt": opt(cpu.map(|c| c * 1e6 / a.attempts.max(1) as f64)),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// refuse

/// How one refused upgrade ended.
enum Refused {
    /// An HTTP refusal with this status.
    Status(u16),
    /// A 101, then Close 1013 (answered by tungstenite's automatic Close reply).
    Close1013,
    /// Anything else: an admission, another Close, an error.
    Other(String),
}

async fn refuse_one(addr: &str, url: &str, to: Duration) -> Refused {
    match open_timeout(addr, url, to).await {
        Open::Status(s) => Refused::Status(s),
        Open::Failed(e) => Refused::Other(e),
        Open::Upgraded(mut ws) => {
            let first = tokio::time::timeout(to, ws.next()).await;
            let r = match first {
                Ok(Some(Ok(Message::Close(Some(f))))) if u16::from(f.code) == 1013 => {
                    Refused::Close1013
                }
                Ok(Some(Ok(Message::Close(f)))) => Refused::Other(format!("close {f:?}")),
                Ok(Some(Ok(_))) => Refused::Other("admitted (a message before any Close)".into()),
                Ok(Some(Err(e))) => Refused::Other(format!("read: {e}")),
                Ok(None) => Refused::Other("closed without a Close".into()),
                Err(_) => Refused::Other("no Close in time (admitted?)".into()),
            };
            // tungstenite queued its Close reply: send it and read to the proxy's close (bounded).
            let _ = tokio::time::timeout(to, async { while let Some(Ok(_)) = ws.next().await {} })
                .await;
            r
        }
    }
}

async fn refuse(a: HandshakeArgs) -> bool {
    let c = &a.c;
    let addr = host_port(&c.url);
    let hard = Instant::now() + Duration::from_secs_f64(c.max_time);
    let to = Duration::from_secs_f64(a.timeout);
    let next = Arc::new(AtomicU64::new(0));
    let m0 = CpuMark::now(c);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (addr, url, next) = (addr.clone(), c.url.clone(), next.clone());
        let total = a.total;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < hard {
                seen.push(refuse_one(&addr, &url, to).await);
            }
            seen
        }));
    }
    let (mut statuses, mut closes, mut others) = (
        HashMap::<String, u64>::new(),
        0u64,
        HashMap::<String, u64>::new(),
    );
    for t in tasks {
        for r in t.await.unwrap_or_default() {
            match r {
                Refused::Status(s) => *statuses.entry(s.to_string()).or_default() += 1,
                Refused::Close1013 => closes += 1,
                Refused::Other(e) => *others.entry(e).or_default() += 1,
            }
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let w = m0.since(c);
    let refusals = statuses.values().sum::<u64>() + closes;
    let per = |x: Option<f64>| opt(x.map(|c| c * 1e6 / refusals.max(1) as f64));
    emit(
        "refuse",
        c,
        refusals == a.total && others.is_empty(),
        json!({
            "conns": a.conns, "total": a.total, "refusals": refusals, "statuses": statuses,
            "closed_1013": closes, "other": others, "elapsed_s": round3(el),
            "refusals_per_s": round3(refusals as f64 / el),
            "proxy_cpu_s": opt(w.proxy),
            "cpu_us_per_refusal": per(w.proxy),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// storm
//
// Client ports and TIME_WAIT. A storm goes through tens of thousands of refused attempts, each
// on a new client port (32768-60999 here, 28,232 of them), and whoever closes a TCP connection
// first keeps it in TIME_WAIT for 60 s. The choice made here:
// * the cut drops the clients' connections to the upstream with SO_LINGER 0 (a reset, as when
//   the pod's sockets vanish): no 10,000 client ports in TIME_WAIT before the storm starts;
// * a refusal said with `Connection: close` is read to EOF (bounded: 1 s) and closed second, so
//   the TIME_WAIT lands on the proxy's side, whose port is its listening port: no ephemeral port
//   is held, and the client retries as soon as the proxy has closed. That is also how a browser
//   sees it. A refusal without `Connection: close`, or whose proxy has not closed within the
//   bound, is closed with SO_LINGER 0 instead (a reset: no TIME_WAIT on either side). The JSON
//   line says which happened how often (`refusal_closes`) and the kernel's TIME_WAIT count when
//   the cap was reached (`timewait_at_done`, /proc/net/sockstat). Read-to-EOF rather than
//   SO_LINGER 0 everywhere: a reset makes the proxy take its error path (nginx logs each one),
//   which is not what a storm of well-behaved clients costs it. wsgate says `Connection: close`
//   with its 503; NGINX and HAProxy answer theirs keep-alive, so their refusals are reset. Seen
//   with `ss -s` and `ss -tan state time-wait` during 10,000-client runs (cap 5,000): wsgate's
//   5,416 refusals left exactly 5,416 sockets in TIME_WAIT, all on its listening port, and no
//   refusal left one on a client port.

/// The fixed `Sec-WebSocket-Key` of the storm's raw clients (RFC 6455's sample nonce).
const STORM_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The upgrade request of a raw client, built once: what tokio-tungstenite sends, with
/// `WSGATE_BENCH_HEADERS` added.
fn upgrade_request(url: &str) -> Vec<u8> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], ""),
        None => (rest, ""),
    };
    let path = if path.is_empty() { "/".to_string() } else { path.to_string() };
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {STORM_KEY}\r\n"
    );
    for (k, v) in extra_headers() {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A masked Close frame with this code (the client's answer to the proxy's Close).
fn masked_close(code: u16) -> Vec<u8> {
    let mut f = vec![0x88, 0x82, MASK[0], MASK[1], MASK[2], MASK[3]];
    let c = code.to_be_bytes();
    f.extend_from_slice(&[c[0] ^ MASK[0], c[1] ^ MASK[1]]);
    f
}

/// The first complete (unmasked) server frame at the start of `b`: (opcode, header length,
/// payload length).
fn server_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let l = (b[1] & 0x7f) as usize;
    let (hl, len) = match l {
        126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
        127 if b.len() >= 10 => (10, u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]) as usize),
        126 | 127 => return None,
        l => (2, l),
    };
    let hl = hl + if b[1] & 0x80 != 0 { 4 } else { 0 };
    (b.len() >= hl + len).then_some((b[0] & 0x0f, hl, len))
}

/// Closes with SO_LINGER 0: a reset, no TIME_WAIT on either side.
fn reset_close(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Reads (and drops) until the peer ends the connection, or `until`: true when it did (EOF or a
/// reset), then this side closes second; false: the caller resets.
async fn read_to_eof(s: &mut TcpStream, until: tokio::time::Instant) -> bool {
    let mut b = [0u8; 1024];
    tokio::time::timeout_at(until, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// How one storm attempt ended.
enum Attempt {
    /// 101 and the probe message echoed back: the client holds this socket.
    Admitted(TcpStream),
    /// An HTTP answer other than 101; true when the proxy ended the connection first.
    Status(u16, bool),
    /// 101, then Close 1013 (answered); true when the proxy ended the connection first.
    Close1013(bool),
    /// Anything else, by kind: `connect: ...`, `timeout (phase)`, `close 1000`, ...
    Error(String),
}

/// One raw attempt: connect, upgrade with `req`, send `probe` and await its echo, all within `to`.
/// Refusals are closed as the comment at the top of this section says.
async fn storm_attempt(addr: &str, req: &[u8], accept: &str, probe: &[u8], to: Duration) -> Attempt {
    let end = tokio::time::Instant::now() + to;
    let linger = || (tokio::time::Instant::now() + Duration::from_secs(1)).min(end);
    let mut s = match tokio::time::timeout_at(end, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Attempt::Error(format!("connect: {}", e.kind())),
        Err(_) => return Attempt::Error("timeout (connect)".into()),
    };
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let head = tokio::time::timeout_at(end, async {
        s.write_all(req).await?;
        loop {
            if let Some(e) = find_head_end(&buf) {
                return Ok(Some(e));
            }
            if buf.len() > 16384 {
                return Err(std::io::Error::other("response head over 16 KiB"));
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(4096);
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let he = match head {
        Ok(Ok(Some(e))) => e,
        Ok(Ok(None)) => return Attempt::Error("upgrade: closed before an answer".into()),
        Ok(Err(e)) => {
            reset_close(s);
            return Attempt::Error(format!("upgrade: {}", e.kind()));
        }
        Err(_) => {
            reset_close(s);
            return Attempt::Error("timeout (upgrade)".into());
        }
    };
    let (status, conn_close, accept_ok) = {
        let text = String::from_utf8_lossy(&buf[..he]);
        let mut lines = text.split("\r\n");
        let status: u16 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
        let (mut close, mut acc) = (false, false);
        for (k, v) in lines.filter_map(|l| l.split_once(':')) {
            let k = k.trim();
            if k.eq_ignore_ascii_case("connection") && v.to_ascii_lowercase().contains("close") {
                close = true;
            }
            if k.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept {
                acc = true;
            }
        }
        (status, close, acc)
    };
    if status != 101 {
        let first = conn_close && read_to_eof(&mut s, linger()).await;
        if !first {
            reset_close(s);
        }
        return Attempt::Status(status, first);
    }
    if !accept_ok {
        reset_close(s);
        return Attempt::Error("upgrade: 101 without the expected Sec-WebSocket-Accept".into());
    }
    buf.drain(..he + 4);
    enum First {
        Data(usize),
        Close(u16),
        Eof,
    }
    let first = tokio::time::timeout_at(end, async {
        s.write_all(probe).await?;
        loop {
            while let Some((op, hl, len)) = server_frame(&buf) {
                match op {
                    0x0..=0x2 => return Ok(First::Data(len)),
                    0x8 => return Ok(First::Close(if len >= 2 { u16::from_be_bytes([buf[hl], buf[hl + 1]]) } else { 1005 })),
                    // a ping or pong before the echo: skipped
                    _ => {
                        buf.drain(..hl + len);
                    }
                }
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(4096);
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(First::Eof);
            }
        }
    })
    .await;
    match first {
        Ok(Ok(First::Data(n))) if n + 6 == probe.len() => Attempt::Admitted(s),
        Ok(Ok(First::Data(n))) => {
            reset_close(s);
            Attempt::Error(format!("probe: an echo of {n} bytes"))
        }
        Ok(Ok(First::Close(code))) => {
            // answer the Close, then let the proxy close TCP first (RFC 6455 §7.1.1)
            let _ = s.write_all(&masked_close(code)).await;
            let first = read_to_eof(&mut s, linger()).await;
            if !first {
                reset_close(s);
            }
            if code == 1013 {
                Attempt::Close1013(first)
            } else {
                Attempt::Error(format!("close {code} after 101"))
            }
        }
        Ok(Ok(First::Eof)) => Attempt::Error("probe: closed after 101".into()),
        Ok(Err(e)) => {
            reset_close(s);
            Attempt::Error(format!("probe: {}", e.kind()))
        }
        Err(_) => {
            reset_close(s);
            Attempt::Error("timeout (probe)".into())
        }
    }
}

/// Resets the peak-RSS mark (`VmHWM`) of these processes: `echo 5 > /proc/PID/clear_refs`.
fn clear_hwm(pids: &[u32]) -> bool {
    pids.iter().all(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok())
}

/// The sum of `VmHWM` (peak RSS since the last reset) over these processes, KiB.
fn hwm_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .sum()
}

/// Sockets in TIME_WAIT on the whole machine (`tw` of /proc/net/sockstat).
fn timewait_now() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let l = s.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = l.split_whitespace().collect();
    f.iter().position(|w| *w == "tw").and_then(|i| f.get(i + 1)?.parse().ok())
}

/// What the storm's clients count together.
#[derive(Default)]
struct StormCounts {
    /// Set at the cap-th admission (or at --max-time): no new attempts from then on.
    done: std::sync::atomic::AtomicBool,
    cap_at: std::sync::OnceLock<Instant>,
    reached: Notify,
    attempts: AtomicU64,
    /// Admitted connections held now, and the most ever held at once.
    held: AtomicU64,
    max_held: AtomicU64,
    refused_503: AtomicU64,
    refused_1013: AtomicU64,
    other_status: AtomicU64,
    errors: AtomicU64,
    /// How refusals ended: the proxy closed first, or this side reset.
    proxy_first: AtomicU64,
    reset: AtomicU64,
    /// Clients still in their retry loop.
    retrying: AtomicU64,
    precut_failures: AtomicU64,
    kinds: std::sync::Mutex<HashMap<String, u64>>,
    statuses: std::sync::Mutex<HashMap<String, u64>>,
}

impl StormCounts {
    fn kind(&self, k: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.kinds.lock().expect("lock").entry(k).or_default() += 1;
    }
    fn closing(&self, proxy_first: bool) {
        if proxy_first { &self.proxy_first } else { &self.reset }.fetch_add(1, Ordering::Relaxed);
    }
}

async fn storm(a: StormArgs) -> bool {
    let c = &a.c;
    let start = Instant::now();
    let hard = start + Duration::from_secs_f64(c.max_time);
    let to = Duration::from_secs_f64(a.timeout);
    let (paddr, daddr) = (Arc::new(host_port(&c.url)), Arc::new(host_port(&a.direct_url)));
    let (preq, dreq) = (Arc::new(upgrade_request(&c.url)), Arc::new(upgrade_request(&a.direct_url)));
    let accept = Arc::new(tungstenite::handshake::derive_accept_key(STORM_KEY.as_bytes()));
    let probe = Arc::new(masked_frame(15, b'p'));
    let cap = a.cap.max(1) as u64;
    let sh = Arc::new(StormCounts::default());
    sh.retrying.store(a.clients as u64, Ordering::Relaxed);
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let opened = Arc::new(Barrier::new(a.clients + 1));
    let cut = Arc::new(tokio::sync::watch::channel(false).0);
    let release = Arc::new(tokio::sync::watch::channel(false).0);
    let mut tasks = Vec::with_capacity(a.clients);
    for _ in 0..a.clients {
        let (paddr, daddr, preq, dreq, accept, probe) =
            (paddr.clone(), daddr.clone(), preq.clone(), dreq.clone(), accept.clone(), probe.clone());
        let (sh, sem, opened) = (sh.clone(), sem.clone(), opened.clone());
        let (mut cut, mut rel) = (cut.subscribe(), release.subscribe());
        tasks.push(tokio::spawn(async move {
            // before the cut: a connection to the upstream itself, verified by one echo (3 tries)
            let mut pre = None;
            if let Ok(_permit) = sem.acquire().await {
                for _ in 0..3 {
                    if Instant::now() >= hard {
                        break;
                    }
                    if let Attempt::Admitted(s) = storm_attempt(&daddr, &dreq, &accept, &probe, to).await {
                        pre = Some(s);
                        break;
                    }
                }
            }
            if pre.is_none() {
                sh.precut_failures.fetch_add(1, Ordering::Relaxed);
            }
            opened.wait().await;
            let _ = cut.wait_for(|v| *v).await;
            // the cut: the upstream's connection is gone; reconnect through the proxy at once
            if let Some(s) = pre {
                reset_close(s);
            }
            while !sh.done.load(Ordering::Acquire) {
                sh.attempts.fetch_add(1, Ordering::Relaxed);
                match storm_attempt(&paddr, &preq, &accept, &probe, to).await {
                    Attempt::Admitted(mut s) => {
                        let n = sh.held.fetch_add(1, Ordering::AcqRel) + 1;
                        sh.max_held.fetch_max(n, Ordering::AcqRel);
                        sh.retrying.fetch_sub(1, Ordering::AcqRel);
                        if n >= cap && sh.cap_at.set(Instant::now()).is_ok() {
                            sh.done.store(true, Ordering::Release);
                            sh.reached.notify_one();
                        }
                        // hold it until released; one the proxy ends is an error, and the client
                        // reconnects
                        let mut b = [0u8; 256];
                        let ended = tokio::select! {
                            _ = rel.wait_for(|v| *v) => false,
                            _ = async { while let Ok(1..) = s.read(&mut b).await {} } => true,
                        };
                        if !ended {
                            return Some(s);
                        }
                        sh.held.fetch_sub(1, Ordering::AcqRel);
                        sh.retrying.fetch_add(1, Ordering::AcqRel);
                        sh.kind("admitted, then ended by the proxy".into());
                    }
                    Attempt::Status(st, first) => {
                        sh.closing(first);
                        if st == 503 {
                            sh.refused_503.fetch_add(1, Ordering::Relaxed);
                        } else {
                            sh.other_status.fetch_add(1, Ordering::Relaxed);
                            *sh.statuses.lock().expect("lock").entry(st.to_string()).or_default() += 1;
                        }
                    }
                    Attempt::Close1013(first) => {
                        sh.closing(first);
                        sh.refused_1013.fetch_add(1, Ordering::Relaxed);
                    }
                    Attempt::Error(k) => sh.kind(k),
                }
            }
            sh.retrying.fetch_sub(1, Ordering::AcqRel);
            None
        }));
    }
    opened.wait().await;
    let precut_s = start.elapsed().as_secs_f64();
    let precut_failures = sh.precut_failures.load(Ordering::Relaxed);
    // t0: the proxy's CPU and peak-RSS marks, then the cut
    let tree = proc_tree(&c.proxy_pid);
    let hwm_reset = clear_hwm(&tree);
    let p0 = snap(&c.proxy_pid);
    let g0 = self_cpu_s();
    let t0 = Instant::now();
    let _ = cut.send(true);
    let _ = tokio::time::timeout(hard.saturating_duration_since(Instant::now()), async {
        while sh.cap_at.get().is_none() {
            sh.reached.notified().await;
        }
    })
    .await;
    sh.done.store(true, Ordering::Release);
    let done_at = Instant::now();
    let at_done = sh.held.load(Ordering::Acquire);
    let p1 = snap(&c.proxy_pid);
    let peak = (!c.proxy_pid.is_empty()).then(|| hwm_kib(&proc_tree(&c.proxy_pid)));
    let gen = self_cpu_s() - g0;
    let tw = timewait_now();
    // the tail: attempts in flight at the cap finish (none starts), bounded by one attempt
    let tail_end = Instant::now() + to + Duration::from_secs(1);
    while sh.retrying.load(Ordering::Acquire) > 0 && Instant::now() < tail_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tail_s = done_at.elapsed().as_secs_f64();
    let stuck = sh.retrying.load(Ordering::Acquire);
    let admitted = sh.held.load(Ordering::Acquire);
    let max_held = sh.max_held.load(Ordering::Acquire);
    let errors = sh.errors.load(Ordering::Relaxed);
    let ttc = sh.cap_at.get().map(|t| t.duration_since(t0).as_secs_f64());
    let cpu = cpu_delta(p0, p1);
    let over_cap = max_held > cap;
    let ok = ttc.is_some() && admitted == cap && !over_cap && errors == 0 && precut_failures == 0 && stuck == 0;
    let kinds = sh.kinds.lock().expect("lock").clone();
    let statuses = sh.statuses.lock().expect("lock").clone();
    let r = emit(
        "storm",
        c,
        ok,
        json!({
            "clients": a.clients, "cap": a.cap, "concurrency": a.concurrency, "timeout_s": a.timeout,
            "precut_open_s": round3(precut_s), "precut_failures": precut_failures,
            "admitted": admitted, "admitted_at_done": at_done, "max_concurrent_admitted": max_held, "over_cap": over_cap,
            "time_to_cap_s": opt(ttc),
            "storm_s": round3(done_at.duration_since(t0).as_secs_f64()), "tail_s": round3(tail_s), "stuck": stuck,
            "attempts": sh.attempts.load(Ordering::Relaxed),
            "refused_503": sh.refused_503.load(Ordering::Relaxed),
            "refused_1013": sh.refused_1013.load(Ordering::Relaxed),
            "other_status": sh.other_status.load(Ordering::Relaxed), "other_statuses": statuses,
            "errors": errors, "failure_kinds": kinds,
            "refusal_closes": {"proxy_first": sh.proxy_first.load(Ordering::Relaxed), "reset": sh.reset.load(Ordering::Relaxed)},
            "timewait_at_done": tw,
            "proxy_cpu_s": opt(cpu),
            "proxy_cpu_us_per_admission": opt(cpu.map(|x| x * 1e6 / at_done.max(1) as f64)),
            "peak_rss_kib": peak.filter(|_| hwm_reset),
            "rss_kib": p1.map(|p| p.rss_kib), "proxy_fds": p1.map(|p| p.fds), "proxy_procs": p1.map(|p| p.procs),
            "gen_cpu_s": opt(Some(gen)),
        }),
    );
    // release the held connections (resets: the proxy is thrown away after this measurement)
    let _ = release.send(true);
    for t in tasks {
        if let Ok(Ok(Some(s))) = tokio::time::timeout(Duration::from_secs(2), t).await {
            reset_close(s);
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let cli = Cli::parse();
    let _ = raise_nofile();
    GEN_THREADS.store(cli.threads as u64, Ordering::Relaxed);
    let current = cli.threads == 0 || matches!(&cli.cmd, Cmd::Echo(a) if a.kind == EchoKind::Tungstenite);
    let rt = if current {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads).enable_all().build()
    }
    .expect("tokio runtime");
    let ok = rt.block_on(async move {
        match cli.cmd {
            Cmd::Echo(a) => match echo_main(a).await {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("echo: {e}");
                    false
                }
            },
            Cmd::Latency(a) => latency(a).await,
            Cmd::Throughput(a) => throughput(a).await,
            Cmd::Handshake(a) => handshake(a).await,
            Cmd::Idle(a) => idle(a).await,
            Cmd::Cap(a) => cap(a).await,
            Cmd::Refuse(a) => refuse(a).await,
            Cmd::Storm(a) => storm(a).await,
        }
    });
    // Do not wait for lingering tasks (held sockets) to wind down.
    rt.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(if ok { 0 } else { 1 });
}

