//! A real Sentinel-managed Redis for the fleet tests (docs/operations.md#redis-cluster-and-sentinel):
//! a primary and a replica ([`RedisServer`]s, both with the same password, the
//! replica with `--replicaof` and `--masterauth`) and one `redis-sentinel` child
//! watching them (quorum 1, `down-after-milliseconds` 1000, `failover-timeout`
//! 3000), all on `127.0.0.1` ports that were free. The sentinel runs from a
//! config file in its tempdir (it rewrites it) and is SIGKILLed and reaped by
//! its own handle on drop, like the servers.
//!
//! `redis-sentinel` missing fails the test with how to get it: `bash .ci/run`
//! installs it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{free_port, require_binary, RedisOptions, RedisServer, REDIS_DEADLINE};

/// The name the sentinel knows the primary by.
pub const MASTER_NAME: &str = "fleet";

/// The data nodes' password (the sentinel has none: the common deployment).
pub const DATA_PASSWORD: &str = "data-s3cret";

/// A primary, its replica and a sentinel.
pub struct RedisSentinel {
    /// The two data nodes: `nodes[0]` started as the primary.
    pub nodes: Vec<RedisServer>,
    sentinel: Option<Child>,
    /// The sentinel's port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisSentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        f.debug_struct("RedisSentinel")
            .field("sentinel", &self.port)
            .field("nodes", &ports)
            .finish()
    }
}

fn opts() -> RedisOptions {
    RedisOptions {
        password: Some(DATA_PASSWORD.into()),
        ..RedisOptions::default()
    }
}

/// What a data node needs on top of the harness's arguments: the password
/// to its primary (both may become a replica).
fn data_args(replica_of: Option<u16>) -> Vec<String> {
    // In sync at once: the default waits 5 s for more replicas first.
    let mut args = vec![
        "--masterauth".to_owned(),
        DATA_PASSWORD.to_owned(),
        "--repl-diskless-sync-delay".to_owned(),
        "0".to_owned(),
    ];
    if let Some(port) = replica_of {
        args.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            port.to_string(),
        ]);
    }
    args
}

impl RedisSentinel {
    /// Starts the primary, the replica (waits until it is in sync) and the
    /// sentinel (waits until it sees both).
    pub fn start() -> RedisSentinel {
        let binary = require_binary("redis-sentinel");
        let primary = RedisServer::start_with_args(opts(), &data_args(None), false);
        let replica = RedisServer::start_with_args(opts(), &data_args(Some(primary.port)), false);
        let dir = tempfile::Builder::new()
            .prefix("wsgate-sentinel-")
            .tempdir()
            .expect("tempdir for the sentinel");
        let mut s = RedisSentinel {
            nodes: vec![primary, replica],
            sentinel: None,
            port: 0,
            dir,
        };
        s.wait_until("the replica in sync", || {
            let info = s.nodes[1].cli(&["INFO", "replication"]);
            info.contains("master_link_status:up")
                .then_some(())
                .ok_or(info)
        });
        for attempt in 1..=5 {
            s.port = free_port();
            let conf = s.dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 1\n\
                     sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    port = s.port,
                    dir = s.dir.path().display(),
                    primary = s.nodes[0].port,
                ),
            )
            .expect("write sentinel.conf");
            let child = Command::new(&binary)
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-sentinel");
            s.sentinel = Some(child);
            let start = Instant::now();
            let up = loop {
                if s.sentinel_cli(&["PING"]).as_deref() == Ok("PONG") {
                    break true;
                }
                let exited = s
                    .sentinel
                    .as_mut()
                    .and_then(|c| c.try_wait().expect("try_wait redis-sentinel"));
                if exited.is_some() || start.elapsed() > REDIS_DEADLINE {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                break;
            }
            s.kill_sentinel();
            assert!(attempt < 5, "redis-sentinel did not start: {}", s.log());
        }
        s.wait_until("the sentinel sees the replica", || {
            let replicas = s.sentinel_cli(&["SENTINEL", "REPLICAS", MASTER_NAME])?;
            replicas
                .contains(&s.nodes[1].port.to_string())
                .then_some(())
                .ok_or(replicas)
        });
        s
    }

    /// `fleet_redis_url`: the sentinel, the master name, the data nodes' password.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://:{DATA_PASSWORD}@127.0.0.1:{}/{MASTER_NAME}/0",
            self.port
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }

    /// The sentinel's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `redis-cli ARGS` against the sentinel.
    pub fn sentinel_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["-s", "KILL", &REDIS_DEADLINE.as_secs().to_string()])
            .arg(require_binary("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("Could not") {
            Ok(stdout)
        } else {
            Err(format!("redis-cli {args:?}: {} {stdout:?}", out.status))
        }
    }

    /// The port of the primary the sentinel names now.
    pub fn primary_port(&self) -> Result<u16, String> {
        let out = self.sentinel_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])?;
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .ok_or(out)
    }

    /// The data node with `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// Polls `check` every 50 ms until `Ok`, failing after [`REDIS_DEADLINE`] × 2.
    pub fn wait_until(&self, what: &str, check: impl Fn() -> Result<(), String>) {
        let start = Instant::now();
        loop {
            match check() {
                Ok(()) => return,
                Err(last) => assert!(
                    start.elapsed() < REDIS_DEADLINE * 2,
                    "{what}: not within {:?}; last: {last}\nsentinel log:\n{}",
                    REDIS_DEADLINE * 2,
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the killed data node `i` again on its port as a replica of
    /// the primary on `primary` (the sentinel would make it one anyway).
    pub fn restart_as_replica(&mut self, i: usize, primary: u16) {
        let port = self.nodes[i].port;
        let node = RedisServer::start_on_port_with_args(opts(), port, &data_args(Some(primary)));
        self.nodes[i] = node;
    }

    fn kill_sentinel(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.kill_sentinel();
    }
}
