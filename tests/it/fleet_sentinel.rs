//! Fleet-wide limits on a Sentinel-managed primary (docs/operations.md#redis-cluster-and-sentinel),
//! black-box: wsgate processes started as in `fleet.rs`, with
//! `fleet_redis_url = redis+sentinel://:PASSWORD@SENTINEL/fleet/0` (the
//! password is the data nodes'), against a primary, a replica and one
//! `redis-sentinel` the test starts (`tests/support/redis_sentinel.rs`). Keys
//! keep their one-server names (`{NS}:all`), read on whichever node the
//! sentinel names primary.
#![allow(clippy::print_stdout, reason = "tests report what they measured")]

use std::time::Duration;

use crate::fleet::{admissions_resume, close_all, settle_until, two_warm_gates, Fleet};
use crate::fleet_cluster::{all_key, holds_are};
use crate::support::*;
use tokio::time::Instant;

/// A probe (one `redis-cli`, one scrape) on a loaded machine.
const PROBE_SLACK: Duration = Duration::from_millis(500);

/// The reconnect part of the recovery promise.
const RECONNECT: Duration = Duration::from_secs(2);

/// The data node the sentinel names primary now.
fn primary(s: &RedisSentinel) -> &RedisServer {
    s.node(s.primary_port().expect("the sentinel names a primary"))
}

/// `Ok` when the primary holds no key of the namespace.
fn empty(s: &RedisSentinel, fleet: &Fleet) -> Result<(), String> {
    let keys = primary(s).keys(&format!("{{{}}}*", fleet.namespace));
    if keys.is_empty() {
        Ok(())
    } else {
        Err(format!("the primary still holds {keys:?}"))
    }
}

/// Waits until the sentinel names the data node on `port` primary and that
/// node answers `ROLE` as one.
fn wait_primary(s: &RedisSentinel, port: u16) {
    s.wait_until("the sentinel names the new primary", || {
        match (s.primary_port(), s.node(port).try_cli(&["ROLE"])) {
            (Ok(p), Ok(role)) if p == port && role.starts_with("master") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// The primary is SIGKILLed; the sentinel promotes the replica; both
/// instances follow without a restart (admissions resume within
/// `fleet_timeout` + 2 s of the promotion; existing connections stay) and
/// the holds are back on the new primary one renewal later. The old
/// primary comes back as a replica; then the sentinel is asked to fail over
/// back to it, demoting the primary the instances are connected to: they
/// follow again (a demoted primary answers writes with `READONLY`; that
/// must never stick), the count is exact on the primary of the moment, and
/// the cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_and_readonly_never_sticks() {
    let mut s = RedisSentinel::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&s.url(), "sentinel")
        .max(30)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(500))
        .mode("closed");
    let gates = two_warm_gates(up.addr, &fleet, || empty(&s, &fleet)).await;
    let all = all_key(&fleet);
    let mut live = Vec::new();
    for i in 0..10 {
        live.push(gates[i % 2].admit(&[]).await);
    }
    holds_are(&s.nodes[0], &all, 10).expect("ten holds on the primary");
    let (first, second) = (s.nodes[0].port, s.nodes[1].port);

    // 1. SIGKILL the primary: the sentinel promotes the replica.
    let killed = Instant::now();
    s.nodes[0].kill9();
    wait_primary(&s, second);
    let promoted = Instant::now();
    println!("replica promoted {:?} after the kill", promoted - killed);
    for ws in &mut live {
        echo_text(ws, "still here").await;
    }
    admissions_resume(&gates, promoted, fleet.timeout + RECONNECT, &mut live).await;
    tokio::time::sleep(fleet.renewal() + PROBE_SLACK).await;
    holds_are(primary(&s), &all, live.len() as u64)
        .expect("the holds re-asserted on the new primary");

    // 2. The old primary comes back as a replica of the new one.
    s.restart_as_replica(0, second);
    s.wait_until("the old primary in sync as a replica", || {
        let info = s.nodes[0].cli(&["INFO", "replication"]);
        info.contains("master_link_status:up")
            .then_some(())
            .ok_or(info)
    });

    // 3. Fail over back to it: the primary the instances use is demoted.
    s.wait_until("the sentinel sees the new replica", || {
        let replicas = s.sentinel_cli(&["SENTINEL", "REPLICAS", MASTER_NAME])?;
        let port = first.to_string();
        replicas
            .lines()
            .skip_while(|l| l.trim() != port)
            .take(10)
            .any(|l| l.trim() == "slave")
            .then_some(())
            .ok_or(replicas)
    });
    let demoted = Instant::now();
    s.wait_until("SENTINEL FAILOVER accepted", || {
        match s.sentinel_cli(&["SENTINEL", "FAILOVER", MASTER_NAME])? {
            ok if ok == "OK" => Ok(()),
            other => Err(other),
        }
    });
    wait_primary(&s, first);
    // The sentinel names the new primary before it turns the old one into
    // a replica (for a moment both take writes): wait for that too.
    s.wait_until("the old primary demoted", || {
        let role = s.nodes[1].cli(&["ROLE"]);
        role.starts_with("slave").then_some(()).ok_or(role)
    });
    let switched = Instant::now();
    println!("sentinel failover back took {:?}", switched - demoted);
    admissions_resume(&gates, switched, fleet.timeout + RECONNECT, &mut live).await;
    tokio::time::sleep(fleet.renewal() + PROBE_SLACK).await;
    holds_are(primary(&s), &all, live.len() as u64)
        .expect("the holds on the primary of the moment");
    for g in &gates {
        assert_eq!(g.metric("wsgate_fleet_up").await, 1.0, "{}", g.log());
    }

    // The cap is exact on the new primary.
    let mut refused = Vec::new();
    for i in 0..25 {
        match gates[i % 2].upgrade(&[]).await {
            Ok(ws) => live.push(ws),
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(live.len(), 30, "up to the cap: {refused:?}");
    assert!(refused.iter().all(|e| e.0 == 503), "{refused:?}");
    holds_are(primary(&s), &all, 30).expect("the cap");
    close_all(live).await;
    settle_until(&[&gates[0], &gates[1]], || empty(&s, &fleet)).await;
}
