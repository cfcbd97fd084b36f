//! A real Redis Cluster for the fleet tests (docs/operations.md#redis-cluster-and-sentinel): six
//! `redis-server` children on `127.0.0.1` (free ports whose bus port, `+ 10000`, is free
//! too), `cluster-node-timeout` 1000 ms, joined by `redis-cli --cluster create
//! … --cluster-replicas 1`: three primaries, three replicas. Every process is a
//! [`RedisServer`], SIGKILLed and reaped by its own handle on drop.
//!
//! The readers ask the cluster the way an operator would: `redis-cli -c`
//! (which follows `MOVED`) for a key, each primary alone for the keys it holds.

use std::time::{Duration, Instant};

use super::redis::{require_binary, RedisOptions, RedisServer};

/// How long a cluster takes to agree on its state after a change (creation,
/// a failover) at most, in these tests.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(20);

/// A running 3 + 3 cluster.
pub struct RedisCluster {
    /// The six nodes, in creation order (the first three were created primaries).
    pub nodes: Vec<RedisServer>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        f.debug_struct("RedisCluster")
            .field("ports", &ports)
            .finish()
    }
}

impl RedisCluster {
    /// Six nodes, joined; returns once every node says `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        require_binary("redis-cli");
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "1000",
            // A primary killed in a test must not stop the others from serving.
            "--cluster-require-full-coverage",
            "no",
            // Replicas in sync at once (the default waits 5 s for more
            // replicas first): a replica that never synced is not promoted.
            "--repl-diskless-sync-delay",
            "0",
            "--cluster-allow-reads-when-down",
            "no",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| RedisServer::start_with_args(RedisOptions::default(), &args, true))
            .collect();
        let mut create = std::process::Command::new("timeout");
        create
            .args(["-s", "KILL", &CLUSTER_DEADLINE.as_secs().to_string()])
            .arg(require_binary("redis-cli"))
            .args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_state_ok(CLUSTER_DEADLINE);
        let start = Instant::now();
        loop {
            let links: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.cli(&["INFO", "replication"]))
                .filter(|i| i.contains("role:slave"))
                .collect();
            if links.len() == 3 && links.iter().all(|i| i.contains("master_link_status:up")) {
                return cluster;
            }
            assert!(
                start.elapsed() < CLUSTER_DEADLINE,
                "three replicas in sync not within {CLUSTER_DEADLINE:?}: {links:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `fleet_redis_url`: the three nodes created as primaries as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Waits until every running node says `cluster_state:ok` and sees
    /// every slot served.
    pub fn wait_state_ok(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let states: Vec<String> = self
                .running()
                .map(|n| n.try_cli(&["CLUSTER", "INFO"]).unwrap_or_else(|e| e))
                .collect();
            if states
                .iter()
                .all(|s| s.contains("cluster_state:ok") && s.contains("cluster_slots_ok:16384"))
            {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the cluster is not ok within {limit:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes whose process runs (a killed one is left out).
    pub fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.raw_ping(Duration::from_secs(1)).is_ok())
    }

    /// The running nodes that answer `ROLE` as a primary.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.running()
            .filter(|n| n.try_cli(&["ROLE"]).is_ok_and(|r| r.starts_with("master")))
            .collect()
    }

    /// The running node answering `ROLE` as a primary that serves `key`'s slot.
    pub fn primary_of(&self, key: &str) -> &RedisServer {
        let slot = self.slot(key);
        self.primaries()
            .into_iter()
            .find(|n| self.serves(n, slot))
            .unwrap_or_else(|| panic!("no running primary serves slot {slot} ({key})"))
    }

    /// The hash slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        let out = self.any().cli(&["CLUSTER", "KEYSLOT", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {out:?}"))
    }

    /// Whether `node` serves `slot`, by its own view (`CLUSTER NODES`,
    /// the `myself` line).
    fn serves(&self, node: &RedisServer, slot: u16) -> bool {
        let nodes = node.cli(&["CLUSTER", "NODES"]);
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        me.split_whitespace().skip(8).any(|range| {
            let mut ends = range.split('-').map(str::parse::<u16>);
            match (ends.next(), ends.next()) {
                (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                (Some(Ok(a)), None) => a == slot,
                _ => false, // a [slot->-id] migration marker
            }
        })
    }

    /// A running node (for the commands any node answers).
    pub fn any(&self) -> &RedisServer {
        self.running().next().expect("a running cluster node")
    }

    /// The node's cluster id.
    pub fn id(node: &RedisServer) -> String {
        node.cli(&["CLUSTER", "MYID"])
    }

    /// Starts moving `slot` from the primary `from` to the primary `to`
    /// the way `redis-cli --cluster reshard` does: IMPORTING on `to`,
    /// MIGRATING on `from`. From here a key not (or no longer) on `from`
    /// is answered with `ASK` until [`finish_migration`](Self::finish_migration).
    pub fn begin_migration(&self, slot: u16, from: &RedisServer, to: &RedisServer) {
        let slot = slot.to_string();
        to.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &Self::id(from)]);
        from.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &Self::id(to)]);
    }

    /// `MIGRATE`s every key of `slot` from `from` to `to`, ten at a time.
    pub fn move_keys(&self, slot: u16, from: &RedisServer, to: &RedisServer) {
        let slot_s = slot.to_string();
        let port = to.port.to_string();
        let start = Instant::now();
        loop {
            let keys = from.cli(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "10"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                return;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            from.cli(&args);
            assert!(
                start.elapsed() < CLUSTER_DEADLINE,
                "slot {slot} still has keys on the source"
            );
        }
    }

    /// Gives `slot` to `to` (`SETSLOT … NODE` on both, then the other
    /// primaries): clients meet `MOVED` from here.
    pub fn finish_migration(&self, slot: u16, from: &RedisServer, to: &RedisServer) {
        let slot = slot.to_string();
        let to_id = Self::id(to);
        for n in [to, from] {
            n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        for n in self.primaries() {
            let _ = n.try_cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
    }

    /// The keys matching `pattern` that `node` itself holds (SCAN there).
    pub fn keys_on(node: &RedisServer, pattern: &str) -> Vec<String> {
        node.keys(pattern)
    }
}
