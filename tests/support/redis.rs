//! A real Redis server for the fleet tests (docs/operations.md#fleet-wide-limits): Debian's
//! `redis-server`, started by the test as a child process on `127.0.0.1`
//! (a free port), on a Unix socket in a tempdir, optionally with a password
//! and optionally over TLS (the certificates of `tests/fixtures/redis-tls`).
//! Never persisted (`--save '' --appendonly no`, `--dir` in its tempdir), so
//! a [`RedisServer::restart`] comes back empty. It can be killed with
//! SIGKILL, paused with SIGSTOP and resumed, restarted on the same address;
//! `redis-cli` reads it. The child is SIGKILLed and reaped on drop, by its
//! own handle: nothing else is ever signalled.
//!
//! A machine without `redis-server` fails these tests with a message that
//! `bash .ci/run` installs it: a fleet test must never pass by not running.
//!
//! [`RedisServer::start_with_args`] starts a server with arguments of the
//! test's own (a cluster node, a replica): `redis_cluster.rs` and
//! `redis_sentinel.rs` build their deployments from it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every wait on the server (start, PING, a `redis-cli` call) is bounded by this.
pub const REDIS_DEADLINE: Duration = Duration::from_secs(10);

/// The folder of the test CA and server certificate (`generate.sh` makes them).
pub const REDIS_TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/redis-tls");

/// The test CA's certificate: what wsgate's `SSL_CERT_FILE` names for `rediss://`.
pub fn redis_tls_ca() -> String {
    format!("{REDIS_TLS_DIR}/ca.crt")
}

/// How clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTransport {
    /// Plain TCP on `127.0.0.1:PORT`.
    Tcp,
    /// A Unix socket in the server's tempdir; no TCP port at all.
    Unix,
    /// TLS on `127.0.0.1:PORT` (`--tls-port`, no plain port), no client certificates.
    Tls,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub transport: RedisTransport,
    /// `--requirepass`.
    pub password: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            transport: RedisTransport::Tcp,
            password: None,
        }
    }
}

/// A running (or killed, or paused) `redis-server` child.
pub struct RedisServer {
    child: Option<Child>,
    /// The current process id (a restart makes a new one).
    pub pid: u32,
    /// TCP or TLS port; 0 on a Unix socket.
    pub port: u16,
    opts: RedisOptions,
    dir: tempfile::TempDir,
    /// How many times it was started (the log file of each start is kept).
    starts: usize,
    /// More arguments of `redis-server` (cluster mode, `--replicaof`).
    extra: Vec<String>,
    /// A cluster node: its bus port (`port + 10000`) must be free too, and
    /// `redis-cli` follows `MOVED`/`ASK` (`-c`).
    cluster: bool,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("pid", &self.pid)
            .field("url", &self.url())
            .finish()
    }
}

/// `name` on `PATH`, or a failure that says how to get it.
fn required_binary(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: the fleet tests (docs/operations.md#fleet-wide-limits) run against a real Redis; \
             `bash .ci/run` installs Debian's redis-server (or: apt-get install redis-server)"
        )
    })
}

/// A port that was free a moment ago on 127.0.0.1 (bound to 0, then closed).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a port");
    l.local_addr().expect("local addr").port()
}

/// A free port whose cluster bus port (`+ 10000`) was free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

/// `name` on `PATH`, or a failure that says `bash .ci/run` installs it
/// (`redis-sentinel`, `redis-cli` for the cluster and sentinel tests).
pub fn require_binary(name: &str) -> PathBuf {
    required_binary(name)
}

impl RedisServer {
    /// Plain TCP, no password.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default())
    }

    pub fn start_with(opts: RedisOptions) -> RedisServer {
        RedisServer::start_inner(opts, Vec::new(), false)
    }

    /// Plain TCP with `args` added to `redis-server`'s (run in its own
    /// tempdir, so a `cluster-config-file` is its own); `cluster`: a
    /// cluster node (bus port free too, `redis-cli -c`).
    pub fn start_with_args(opts: RedisOptions, args: &[String], cluster: bool) -> RedisServer {
        RedisServer::start_inner(opts, args.to_vec(), cluster)
    }

    /// A new plain-TCP server with `args` on `port` (one a killed server
    /// used: a node coming back with another role), retried while the
    /// port is still held.
    pub fn start_on_port_with_args(opts: RedisOptions, port: u16, args: &[String]) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            pid: 0,
            port,
            opts,
            dir: tempfile::Builder::new()
                .prefix("wsgate-redis-")
                .tempdir()
                .expect("tempdir for redis"),
            starts: 0,
            extra: args.to_vec(),
            cluster: false,
        };
        server.start_again();
        server
    }

    fn start_inner(opts: RedisOptions, extra: Vec<String>, cluster: bool) -> RedisServer {
        required_binary("redis-server");
        required_binary("redis-cli");
        let dir = tempfile::Builder::new()
            .prefix("wsgate-redis-")
            .tempdir()
            .expect("tempdir for redis");
        let mut server = RedisServer {
            child: None,
            pid: 0,
            port: 0,
            opts,
            dir,
            starts: 0,
            extra,
            cluster,
        };
        // A port picked this way can be taken by someone else before Redis
        // binds it: then Redis exits at once, and another port is tried.
        for attempt in 1..=5 {
            if server.cluster {
                server.port = free_cluster_port();
            } else if server.opts.transport != RedisTransport::Unix {
                server.port = free_port();
            }
            match server.launch() {
                Ok(()) => return server,
                Err(log) if attempt < 5 && log.contains("already in use") => continue,
                Err(log) => panic!("redis-server did not start ({server:?}); its log:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// The Unix socket's path (on [`RedisTransport::Unix`]).
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.starts))
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server on the current address and waits until it answers
    /// PING; on failure kills it and returns its log.
    fn launch(&mut self) -> Result<(), String> {
        self.starts += 1;
        let mut cmd = Command::new(required_binary("redis-server"));
        // A config file from stdin would do too; arguments show in `ps`.
        cmd.args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--bind", "127.0.0.1", "--loglevel", "notice"]);
        let port = self.port.to_string();
        match self.opts.transport {
            RedisTransport::Tcp => {
                cmd.args(["--port", &port]);
            }
            RedisTransport::Unix => {
                cmd.args(["--port", "0", "--unixsocketperm", "700"])
                    .arg("--unixsocket")
                    .arg(self.socket_path());
            }
            RedisTransport::Tls => {
                cmd.args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cert-file", &format!("{REDIS_TLS_DIR}/server.crt")])
                    .args(["--tls-key-file", &format!("{REDIS_TLS_DIR}/server.key")])
                    .args(["--tls-ca-cert-file", &redis_tls_ca()])
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        if let Some(p) = &self.opts.password {
            cmd.args(["--requirepass", p]);
        }
        cmd.args(&self.extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn redis-server");
        self.pid = child.id();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait redis-server"));
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            if self.try_cli(&["PING"]).as_deref() == Ok("PONG") {
                return Ok(());
            }
            if start.elapsed() > REDIS_DEADLINE {
                self.kill9();
                return Err(format!(
                    "(no PONG within {REDIS_DEADLINE:?})\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL wsgate's `fleet_redis_url` takes, with the server's password.
    pub fn url(&self) -> String {
        self.url_with_password(self.opts.password.as_deref())
    }

    /// The URL with `password` instead of the server's (a wrong one, or none).
    pub fn url_with_password(&self, password: Option<&str>) -> String {
        let auth = password.map_or(String::new(), |p| format!(":{p}@"));
        match self.opts.transport {
            RedisTransport::Tcp => format!("redis://{auth}127.0.0.1:{}/0", self.port),
            RedisTransport::Tls => format!("rediss://{auth}127.0.0.1:{}/0", self.port),
            RedisTransport::Unix => {
                let query = password.map_or(String::new(), |p| format!("?pass={p}"));
                format!("unix://{}{query}", self.socket_path().display())
            }
        }
    }

    /// True while the child runs (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, then reaps it. Nothing is saved: a restart is empty.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        assert!(self.child.is_some(), "redis-server is not running");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {}", self.pid);
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause); waits until it answers PING again.
    pub fn resume(&self) {
        self.signal("CONT");
        self.wait_ping();
    }

    /// Kills it (SIGKILL) and starts it again on the same port or socket,
    /// empty; returns once it answers PING.
    pub fn restart(&mut self) {
        self.kill9();
        self.start_again();
    }

    /// Starts it again on the same address after [`kill9`](Self::kill9).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server still runs");
        // The port is ours to reuse (Redis binds with SO_REUSEADDR); should
        // another process have taken it meanwhile, retry until the deadline.
        let start = Instant::now();
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(log) if start.elapsed() < REDIS_DEADLINE && log.contains("already in use") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("redis-server did not start again ({self:?}): {log}"),
            }
        }
    }

    /// Polls PING until PONG, or fails after [`REDIS_DEADLINE`].
    pub fn wait_ping(&self) {
        let start = Instant::now();
        loop {
            match self.try_cli(&["PING"]) {
                Ok(s) if s == "PONG" => return,
                other => assert!(
                    start.elapsed() < REDIS_DEADLINE,
                    "redis never answered PING: {other:?}\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cli_command(&self) -> Command {
        let mut cmd = Command::new("timeout");
        // `timeout` ends only the redis-cli it started, should the server hang.
        cmd.args(["-s", "KILL", &REDIS_DEADLINE.as_secs().to_string()])
            .arg(required_binary("redis-cli"));
        match self.opts.transport {
            RedisTransport::Unix => {
                cmd.arg("-s").arg(self.socket_path());
            }
            RedisTransport::Tcp => {
                cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
            }
            RedisTransport::Tls => {
                cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .args(["--tls", "--cacert", &redis_tls_ca()]);
            }
        }
        if let Some(p) = &self.opts.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        if self.cluster {
            cmd.arg("-c");
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `redis-cli ARGS` against this server: its trimmed output, or what
    /// went wrong (exit status, stderr, or a Redis error reply).
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .cli_command()
            .args(args)
            .output()
            .expect("run redis-cli");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // redis-cli exits 0 on an error reply when its output is not a tty,
        // printing "ERR ..." (or "NOAUTH ...", "WRONGTYPE ..."), so look.
        let error_reply = [
            "ERR",
            "NOAUTH",
            "WRONGPASS",
            "WRONGTYPE",
            "LOADING",
            "READONLY",
            "CLUSTERDOWN",
            "MOVED",
            "Could not connect",
        ]
        .iter()
        .any(|p| stdout.starts_with(p));
        if out.status.success() && !error_reply && stderr.is_empty() {
            Ok(stdout)
        } else {
            Err(format!(
                "redis-cli {args:?}: {} stdout {stdout:?} stderr {stderr:?}",
                out.status
            ))
        }
    }

    /// One `PING` over a fresh plain connection (TCP or Unix socket, not TLS;
    /// no AUTH), waiting at most `limit` for the reply: its first line
    /// (`+PONG`, `-NOAUTH …`), or the I/O error (refused, timed out).
    pub fn raw_ping(&self, limit: Duration) -> std::io::Result<String> {
        use std::io::{BufRead, BufReader, Write};
        fn exchange<S: std::io::Read + Write>(mut s: S) -> std::io::Result<String> {
            s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim_end().to_owned())
        }
        match self.opts.transport {
            RedisTransport::Unix => {
                let s = std::os::unix::net::UnixStream::connect(self.socket_path())?;
                s.set_read_timeout(Some(limit))?;
                exchange(s)
            }
            RedisTransport::Tcp => {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
                let s = std::net::TcpStream::connect_timeout(&addr, limit)?;
                s.set_read_timeout(Some(limit))?;
                exchange(s)
            }
            RedisTransport::Tls => panic!("raw_ping speaks plain RESP; this server wants TLS"),
        }
    }

    /// `redis-cli ARGS`; fails the test on an error.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// ZCARD of `key` (0 when it does not exist).
    pub fn zcard(&self, key: &str) -> u64 {
        let out = self.cli(&["ZCARD", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("ZCARD {key}: not a number: {out:?}"))
    }

    /// The members of sorted set `key` with their scores, lowest first.
    pub fn zrange_with_scores(&self, key: &str) -> Vec<(String, f64)> {
        let out = self.cli(&["ZRANGE", key, "0", "-1", "WITHSCORES"]);
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        lines
            .chunks(2)
            .map(|pair| {
                let score = pair
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("ZRANGE {key} WITHSCORES: odd reply {out:?}"));
                (pair[0].to_owned(), score)
            })
            .collect()
    }

    /// Members of sorted set `key` scored above the server's clock (TIME,
    /// in ms): the holds not expired yet, read atomically in one script.
    pub fn zcount_unexpired(&self, key: &str) -> u64 {
        let script = "local t = redis.call('TIME') \
            local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
            return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')";
        let out = self.cli(&["EVAL", script, "1", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("ZCOUNT unexpired {key}: not a number: {out:?}"))
    }

    /// The server's clock (TIME), in milliseconds since the epoch.
    pub fn time_ms(&self) -> u64 {
        let out = self.cli(&["TIME"]);
        let mut it = out.lines().map(|l| l.trim().parse::<u64>());
        match (it.next(), it.next()) {
            (Some(Ok(s)), Some(Ok(us))) => s * 1000 + us / 1000,
            _ => panic!("TIME: unexpected reply {out:?}"),
        }
    }

    /// Every key matching `pattern` (SCAN, not KEYS), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let out = self.cli(&["--scan", "--pattern", pattern]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// DBSIZE of database 0.
    pub fn dbsize(&self) -> u64 {
        let out = self.cli(&["DBSIZE"]);
        out.parse()
            .unwrap_or_else(|_| panic!("DBSIZE: not a number: {out:?}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL works on a stopped (SIGSTOP) process too.
        self.kill9();
    }
}
