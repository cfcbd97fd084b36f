//! Fleet-wide limits on a real Redis Cluster (docs/operations.md#redis-cluster-and-sentinel),
//! black-box: wsgate processes started as in `fleet.rs`, with
//! `fleet_redis_url = redis+cluster://…` naming three of the six nodes of a
//! 3-primary + 3-replica cluster the test creates (`tests/support/redis_cluster.rs`).
//! The fleet-wide set is `{NS}:all`; each key value's set is
//! `{NS:key:RULE:VALUE}`, a hash tag of its own, so values spread over the
//! primaries. Redis is read with `redis-cli -c` (it follows `MOVED`), and
//! each primary alone for the keys it holds.
#![allow(clippy::print_stdout, reason = "tests report what they measured")]

use std::time::Duration;

use crate::fleet::{
    admissions_resume, close_all, eventually, raise_nofile, settle_until, sum, two_warm_gates,
    warm_up_until, Fleet, Gate,
};
use crate::support::*;
use tokio::time::Instant;

/// A probe (one `redis-cli`, one scrape) on a loaded machine.
const PROBE_SLACK: Duration = Duration::from_millis(500);

/// The reconnect part of the recovery promise: after a failover admissions
/// resume within `fleet_timeout` plus this.
const RECONNECT: Duration = Duration::from_secs(2);

/// `{NS}:all`.
pub(crate) fn all_key(fleet: &Fleet) -> String {
    format!("{{{}}}:all", fleet.namespace)
}

/// `{NS:key:RULE:VALUE}`: a key value's set on a Cluster.
fn cluster_key(fleet: &Fleet, rule: &str, value: &str) -> String {
    format!("{{{}:key:{rule}:{value}}}", fleet.namespace)
}

/// `Ok` when sorted set `key` has exactly `n` members, none expired, read
/// through `reader` (a cluster node with `-c`, or a primary).
pub(crate) fn holds_are(reader: &RedisServer, key: &str, n: u64) -> Result<(), String> {
    match (
        reader.try_cli(&["ZCARD", key]),
        reader.zcount_unexpired(key),
    ) {
        (Ok(all), live) if all == n.to_string() && live == n => Ok(()),
        (all, live) => Err(format!("{key}: ZCARD {all:?}, unexpired {live}, want {n}")),
    }
}

/// `Ok` when no primary of the cluster holds a key of the namespace.
fn cluster_empty(cluster: &RedisCluster, fleet: &Fleet) -> Result<(), String> {
    let pattern = format!("{{{}*", fleet.namespace);
    let held: Vec<String> = cluster
        .primaries()
        .into_iter()
        .flat_map(|p| RedisCluster::keys_on(p, &pattern))
        .collect();
    if held.is_empty() {
        Ok(())
    } else {
        Err(format!("the cluster still holds {held:?}"))
    }
}

/// Opens `n` connections through `gates` in turn, every one admitted.
async fn open(gates: &[Gate], n: usize, headers: &[(&str, &str)]) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(gates[i % gates.len()].admit(headers).await);
    }
    out
}

/// [`churn`] while the fleet store fails over or migrates: an upgrade may be
/// refused 503 (`fleet_fail_mode = closed` while a call fails), but each
/// client is admitted again within `fleet_timeout` + 2 s of its first try
/// (docs/operations.md#redis-cluster-and-sentinel). Returns the refusals seen.
async fn churn_resuming(gates: &[Gate], live: &mut Vec<Ws>, n: usize, timeout: Duration) -> usize {
    close_all(live.drain(..n).collect()).await;
    let mut refusals = 0;
    for i in 0..n {
        let gate = &gates[i % gates.len()];
        let first = Instant::now();
        loop {
            match gate.upgrade(&[]).await {
                Ok(ws) => {
                    live.push(ws);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.0, 503, "only the fail mode's refusal: {e:?}");
                    refusals += 1;
                    assert!(
                        first.elapsed() < timeout + Duration::from_secs(2),
                        "not admitted again within fleet_timeout + 2 s: {e:?}\n{}",
                        gate.log()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    refusals
}

/// Upgrades one at a time through `gates` in turn until one is refused;
/// returns the admitted ones and the refusal.
async fn fill(gates: &[Gate], tries: usize) -> (Vec<Ws>, Vec<(u16, Option<String>)>) {
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for i in 0..tries {
        match gates[i % gates.len()].upgrade(&[]).await {
            Ok(ws) => admitted.push(ws),
            Err(e) => refused.push(e),
        }
    }
    (admitted, refused)
}

/// (a) Three instances share `fleet_max_clients = 100` on a cluster; 1,000
/// upgrades at once over the three: exactly 100 admitted, 900 refused 503
/// (`reason="fleet"`), `{NS}:all` holds 100 live members; afterwards no
/// primary holds a key of the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_admits_exactly_the_fleet_cap_of_1000_concurrent_upgrades() {
    raise_nofile(4096);
    let cluster = RedisCluster::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&cluster.url(), "ccap")
        .max(100)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates: Vec<Gate> = (0..3).map(|_| Gate::start(up.addr, &fleet, None)).collect();
    for g in &gates {
        warm_up_until(g, || cluster_empty(&cluster, &fleet)).await;
    }

    let start = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let url = gates[i % 3].url();
            tokio::spawn(async move { upgrade_outcome(&url, &[]).await })
        })
        .collect();
    let (mut admitted, mut refused, mut odd) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        match within("one of the 1,000 upgrades", t).await.expect("join") {
            Upgrade::Admitted(ws) => admitted.push(*ws),
            Upgrade::Refused(503, Some(_)) => refused += 1,
            other => odd.push(format!("{other:?}")),
        }
    }
    println!(
        "cluster: 1,000 concurrent upgrades over 3 instances: {} admitted, {refused} refused, in {:?}",
        admitted.len(),
        start.elapsed()
    );
    assert!(odd.is_empty(), "neither 101 nor 503 + Retry-After: {odd:?}");
    assert_eq!(
        admitted.len(),
        100,
        "the fleet admitted more or less than its cap"
    );
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet\"}"
        )
        .await,
        900.0
    );
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet_unavailable\"}"
        )
        .await,
        0.0
    );
    holds_are(cluster.any(), &all_key(&fleet), 100).expect("one hold per admitted connection");
    for ws in &mut admitted {
        echo_text(ws, "one of the hundred").await;
    }
    close_all(admitted).await;
    let refs: Vec<&Gate> = gates.iter().collect();
    settle_until(&refs, || cluster_empty(&cluster, &fleet)).await;
}

/// (b) A `fleet = true` rule (`header:X-Tenant`, 2 per tenant) with a
/// fleet-wide cap too, over two instances: 30 tenants' holds land on more
/// than one primary (each primary is asked for its keys); a third
/// connection of a full tenant is refused 429 on either instance, and the
/// hold its admission took in `{NS}:all` (an earlier slot group) is taken
/// back out: `{NS}:all` counts exactly the live connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_key_values_spread_over_the_primaries_and_a_refusal_leaves_no_hold() {
    let cluster = RedisCluster::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&cluster.url(), "ckeys")
        .max(1000)
        .rule("tenant", "header:X-Tenant", 2)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates = [
        Gate::start(up.addr, &fleet, Some("gate-a")),
        Gate::start(up.addr, &fleet, Some("gate-b")),
    ];
    for g in &gates {
        warm_up_until(g, || cluster_empty(&cluster, &fleet)).await;
    }
    let tenants: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    let mut live = Vec::new();
    for t in &tenants {
        for g in &gates {
            live.push(g.admit(&[("x-tenant", t)]).await);
        }
    }
    for t in &tenants {
        holds_are(cluster.any(), &cluster_key(&fleet, "tenant", t), 2)
            .expect("two holds per tenant");
    }
    let pattern = format!("{{{}:key:*", fleet.namespace);
    let per_primary: Vec<usize> = cluster
        .primaries()
        .into_iter()
        .map(|p| RedisCluster::keys_on(p, &pattern).len())
        .collect();
    println!("key value sets per primary: {per_primary:?}");
    assert_eq!(per_primary.iter().sum::<usize>(), 30, "{per_primary:?}");
    assert!(
        per_primary.iter().filter(|&&n| n > 0).count() > 1,
        "every key value on one primary: {per_primary:?}"
    );

    for (i, t) in tenants.iter().take(10).enumerate() {
        let refusal = gates[i % 2].upgrade(&[("x-tenant", t)]).await.err();
        assert_eq!(refusal.map(|e| e.0), Some(429), "the third of {t}");
    }
    assert_eq!(sum_rejected(&gates, "key").await, 10.0);
    // The ten refusals took a hold in {NS}:all first, then gave it back.
    holds_are(cluster.any(), &all_key(&fleet), 60).expect("only the live connections counted");
    close_all(live).await;
    settle_until(&[&gates[0], &gates[1]], || cluster_empty(&cluster, &fleet)).await;
}

async fn sum_rejected(gates: &[Gate], reason: &str) -> f64 {
    let mut total = 0.0;
    for g in gates {
        total += g.rejected(reason).await;
    }
    total
}

/// (c) The slot of `{NS}:all` moves to another primary while connections
/// come and go (IMPORTING/MIGRATING, `MIGRATE`, `SETSLOT … NODE`: clients
/// meet `ASK`, then `MOVED`): every upgrade below the cap is admitted,
/// at worst on a retry within `fleet_timeout` + 2 s (closed mode may refuse
/// one whose script call met the slot mid-move: counted as
/// `fleet_unavailable`, never more after the move), and afterwards the cap
/// is exact and `{NS}:all`, now on the new primary, counts the live
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_load_admissions_resume_and_the_count_is_exact() {
    let cluster = RedisCluster::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&cluster.url(), "cmig")
        .max(40)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(900))
        .mode("closed");
    let gates = two_warm_gates(up.addr, &fleet, || cluster_empty(&cluster, &fleet)).await;
    let all = all_key(&fleet);
    let mut live = open(&gates, 20, &[]).await;
    let slot = cluster.slot(&all);
    let from = cluster.primary_of(&all);
    let to = cluster
        .primaries()
        .into_iter()
        .find(|p| p.port != from.port)
        .expect("another primary");

    let start = Instant::now();
    let timeout = Duration::from_millis(900);
    cluster.begin_migration(slot, from, to);
    let mut refused = churn_resuming(&gates, &mut live, 5, timeout).await;
    // One renewal while the slot is MIGRATING.
    tokio::time::sleep(fleet.renewal()).await;
    cluster.move_keys(slot, from, to);
    // ASK: the key is on the target now.
    refused += churn_resuming(&gates, &mut live, 5, timeout).await;
    cluster.finish_migration(slot, from, to);
    refused += churn_resuming(&gates, &mut live, 5, timeout).await; // MOVED
    println!(
        "slot {slot} moved {} → {} under load in {:?}; {refused} upgrades refused meanwhile \
         (closed mode), each admitted on a retry",
        from.port,
        to.port,
        start.elapsed()
    );
    assert_eq!(
        cluster.primary_of(&all).port,
        to.port,
        "the slot is served by the target"
    );
    let unavailable = sum_rejected(&gates, "fleet_unavailable").await;
    assert_eq!(unavailable, refused as f64);

    // One renewal interval later the count is exact, and so is the cap.
    tokio::time::sleep(fleet.renewal() + PROBE_SLACK).await;
    holds_are(to, &all, 20).expect("the live connections, on the new primary");
    let (admitted, refused) = fill(&gates, 25).await;
    assert_eq!(admitted.len(), 20, "up to the cap of 40: {refused:?}");
    assert!(refused.iter().all(|e| e.0 == 503), "{refused:?}");
    assert_eq!(sum_rejected(&gates, "fleet").await, 5.0);
    assert_eq!(
        sum_rejected(&gates, "fleet_unavailable").await,
        unavailable,
        "none once the slot has moved"
    );
    live.extend(admitted);
    holds_are(cluster.any(), &all, 40).expect("the cap");
    close_all(live).await;
    settle_until(&[&gates[0], &gates[1]], || cluster_empty(&cluster, &fleet)).await;
}

/// (d) The primary serving `{NS}:all` is SIGKILLed; its replica is
/// promoted by the cluster. Existing connections stay; admissions (closed
/// mode: refused as `fleet_unavailable` meanwhile) resume on both
/// instances within `fleet_timeout` + 2 s of the promotion, without a
/// restart; one renewal interval later `{NS}:all` counts exactly the live
/// connections and the cap is exact again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_and_its_replica_promoted_admissions_resume_and_counts_are_exact() {
    let mut cluster = RedisCluster::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&cluster.url(), "cfail")
        .max(30)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(500))
        .mode("closed");
    let gates = two_warm_gates(up.addr, &fleet, || cluster_empty(&cluster, &fleet)).await;
    let all = all_key(&fleet);
    let mut live = open(&gates, 10, &[]).await;
    holds_are(cluster.any(), &all, 10).expect("ten holds");

    let victim_port = cluster.primary_of(&all).port;
    let replica_port = cluster
        .running()
        .find(|n| {
            n.try_cli(&["ROLE"]).is_ok_and(|r| {
                r.starts_with("slave")
                    && r.lines().nth(2).map(str::trim) == Some(&victim_port.to_string())
            })
        })
        .map(|n| n.port)
        .expect("the victim's replica");
    let killed = Instant::now();
    let victim = cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == victim_port)
        .expect("victim");
    victim.kill9();
    let replica = cluster
        .nodes
        .iter()
        .find(|n| n.port == replica_port)
        .expect("replica");
    eventually!("the replica promoted", CLUSTER_DEADLINE, {
        match replica.try_cli(&["ROLE"]) {
            Ok(r) if r.starts_with("master") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let promoted = Instant::now();
    println!("replica promoted {:?} after the kill", promoted - killed);

    for ws in &mut live {
        echo_text(ws, "still here").await;
    }
    admissions_resume(&gates, promoted, fleet.timeout + RECONNECT, &mut live).await;

    tokio::time::sleep(fleet.renewal() + PROBE_SLACK).await;
    cluster.wait_state_ok(CLUSTER_DEADLINE);
    holds_are(cluster.any(), &all, live.len() as u64).expect("the live connections, re-asserted");
    let (admitted, refused) = fill(&gates, 20).await;
    assert_eq!(
        admitted.len(),
        30 - live.len(),
        "up to the cap: {refused:?}"
    );
    assert!(refused.iter().all(|e| e.0 == 503), "{refused:?}");
    live.extend(admitted);
    holds_are(cluster.any(), &all, 30).expect("the cap");
    close_all(live).await;
    settle_until(&[&gates[0], &gates[1]], || cluster_empty(&cluster, &fleet)).await;
}
