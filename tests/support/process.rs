//! The wsgate binary run as a child process, python3 helper processes
//! ([`Py`]), and /proc readings of a process (descriptors, RSS, CPU time)
//! and of the runtime (live tasks).
//!
//! Why a child process: descriptor limits, CPU time, RSS and SIGKILL are
//! properties of a process; measuring them on the test process would mix in
//! the clients and upstreams the test runs itself. Whole-process readings of
//! the test process itself ([`open_fds`], [`ProcStat::own`]) are sound
//! because nextest runs each test in a process of its own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

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
        GateProcess::proxy_with_args(upstream, &[], env, nofile)
    }

    /// [`GateProcess::proxy`] with command-line arguments, e.g.
    /// `["--config", FILE]` for what only a TOML file can say (`[[key_limits]]`).
    pub fn proxy_with_args(
        upstream: SocketAddr,
        args: &[&str],
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> (GateProcess, SocketAddr, SocketAddr) {
        GateProcess::proxy_to(&upstream.to_string(), args, env, nofile)
    }

    /// [`GateProcess::proxy_with_args`] with `WSGATE_UPSTREAM` as written,
    /// e.g. `unix:/path` (docs/operations.md#unix-socket-upstream).
    pub fn proxy_to(
        upstream: &str,
        args: &[&str],
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> (GateProcess, SocketAddr, SocketAddr) {
        let mut all = vec![
            ("WSGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("WSGATE_UPSTREAM", upstream.to_owned()),
        ];
        all.extend(env.iter().cloned());
        let gate = GateProcess::start(args, &all, nofile);
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

/// The lines of a child's pipe, read on a thread of their own so that a
/// wait for the next one has a deadline. The thread reads to EOF even when
/// nobody takes the lines any more, so the child never blocks on a full pipe.
pub struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    pub fn new(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Lines(rx)
    }

    /// The next line; fails, naming `what` was awaited, when none comes
    /// within [`CHILD_DEADLINE`] or the pipe closed first.
    pub fn next(&self, what: &str) -> String {
        self.0
            .recv_timeout(CHILD_DEADLINE)
            .unwrap_or_else(|e| panic!("no line ({e}) while waiting for {what}"))
    }
}

// ---------------------------------------------------------------- python helpers

/// What every [`Py`] script starts with: `socket` and `sys` imported,
/// `send_upgrade(s, host, port, path)` (a WebSocket upgrade request for
/// `path`, with RFC 6455's sample key) and `read_head(s)` (an HTTP head read
/// one byte at a time up to its blank line, or to EOF).
pub const PY_PRELUDE: &str = r#"
import socket, sys

def send_upgrade(s, host, port, path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % (path, host, port)).encode())

def read_head(s):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            break
        head += b
    return head

def vanish(s):
    try:
        s.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
    except OSError as e:
        print("no TCP_REPAIR: %s" % e, flush=True)
        sys.exit(3)
    s.close()
    print("vanished", flush=True)
"#;

/// A [`Py`] client that completes the upgrade (argv: host, port), prints
/// the status line, then vanishes without FIN or RST: `vanish` puts the
/// socket in `TCP_REPAIR` mode and closes it, which the kernel does
/// silently (that needs `CAP_NET_ADMIN`; it prints "vanished", or exits 3
/// when refused). From then on nothing comes from that port unless
/// something is sent to it, and that is answered with RST.
pub const VANISHING_CLIENT: &str = r#"
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port))
send_upgrade(s, host, port, "/")
print(read_head(s).split(b"\r\n")[0].decode(), flush=True)
vanish(s)
"#;

/// A python3 helper process (for what a test cannot do from Rust, such as
/// `TCP_REPAIR`), its stdin and stdout piped; killed and reaped on drop.
pub struct Py {
    child: Child,
    lines: Lines,
}

impl Py {
    /// Runs `script`, after [`PY_PRELUDE`], with `args` as `sys.argv[1:]`.
    pub fn start(script: &str, args: &[String]) -> Py {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(format!("{PY_PRELUDE}{script}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (on every machine of this kind)");
        let lines = Lines::new(child.stdout.take().expect("stdout"));
        Py { child, lines }
    }

    /// The next line it prints, within [`CHILD_DEADLINE`]. It blocks the
    /// thread: async tests call it inside `tokio::task::block_in_place`.
    pub fn line(&self) -> String {
        self.lines.next("a line from the python helper")
    }

    /// Writes `go` and a newline to its stdin: the cue for a script that
    /// waits with `sys.stdin.readline()` to go on to its next step.
    pub fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        std::io::Write::write_all(stdin, b"go\n").expect("write to the helper");
        std::io::Write::flush(stdin).expect("flush");
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the wsgate binary to completion (bounded) with `env`; (exit code, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, String)]) -> (Option<i32>, String) {
    let mut gate = GateProcess::start(args, env, None);
    let status = gate.wait_exit();
    // The collector threads finish at EOF, which follows the exit closely.
    // Wait for the line the binary prints on its way out (`wsgate: …` at
    // the start of a line): a log line's `INFO wsgate: …` may come first,
    // and under load the collector may not have read the rest yet.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2)
        && !gate.stderr_text().lines().any(|l| l.starts_with("wsgate:"))
    {
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

// ---------------------------------------------------------------- this process

/// Polls until the child's open descriptors are back to `baseline` (or
/// fewer), or fails after [`crate::support::DEADLINE`].
pub async fn wait_child_fds(child: &GateProcess, baseline: usize) {
    let start = Instant::now();
    loop {
        let now = child.stat().fds;
        if now <= baseline {
            return;
        }
        assert!(
            start.elapsed() < crate::support::DEADLINE,
            "wsgate's descriptors: baseline {baseline}, still {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open descriptors of this (test) process, which hosts upstream, sidecar
/// and clients alike: every leak shows up here.
pub fn open_fds() -> usize {
    fd_count("/proc/self/fd")
}

/// Polls until the descriptor count is back to `baseline` (± `slack`), or
/// fails after [`crate::support::DEADLINE`].
pub async fn wait_fds(baseline: usize, slack: usize) {
    let start = Instant::now();
    loop {
        let now = open_fds();
        if now <= baseline + slack {
            return;
        }
        assert!(
            start.elapsed() < crate::support::DEADLINE,
            "descriptors: baseline {baseline}, still {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
