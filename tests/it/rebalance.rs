//! Automatic rebalancing (docs/operations.md#automatic-rebalancing), black-box: real wsgate
//! processes sharing a real `redis-server` started by the test, a real echo
//! upstream, real WebSocket clients. Short settings (a heartbeat a second)
//! keep each test to a few seconds; the rebalancing run behind HAProxy with
//! a thousand clients is `benches/rebalance.py --auto` (docs/benchmarks.md).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::watched::{open_in_order, outcomes, wait_closes, watch_all};
use crate::support::*;
use tokio::time::Instant;

const SHED: &str = "wsgate_rebalance_shed_total";
const INSTANCES: &str = "wsgate_fleet_instances";
const REASON: &str = "server rebalancing, please reconnect";

/// One instance of a fleet on `redis` in `namespace`, rebalancing with a
/// heartbeat a second (lease 3 s) and `extra` settings.
fn instance(
    upstream: SocketAddr,
    redis: &RedisServer,
    namespace: &str,
    id: &str,
    extra: &[(&str, &str)],
) -> (GateProcess, SocketAddr, SocketAddr) {
    let mut env = vec![
        ("WSGATE_FLEET_REDIS_URL", redis.url()),
        ("WSGATE_FLEET_NAMESPACE", namespace.to_owned()),
        ("WSGATE_FLEET_INSTANCE_ID", id.to_owned()),
        ("WSGATE_FLEET_LEASE_TTL", "3s".to_owned()),
        ("WSGATE_REBALANCE", "true".to_owned()),
        ("WSGATE_REBALANCE_AFTER", "1s".to_owned()),
        ("WSGATE_REBALANCE_PERIOD", "2s".to_owned()),
        ("WSGATE_REBALANCE_COOLDOWN", "30s".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    tokio::task::block_in_place(|| GateProcess::proxy(upstream, &env, None))
}

/// Polls `/readyz` until its body is `body`; fails after [`DEADLINE`].
async fn wait_readyz(admin: SocketAddr, status: u16, body: &str) {
    let start = Instant::now();
    loop {
        let (got, text) = http_get(admin, "/readyz").await;
        if got == status && text.trim_end().ends_with(body) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "/readyz never said {status} {body}; last {got} {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holds for `span` that the shed counters of `admins` stay at `want`.
async fn sheds_stay(admins: &[SocketAddr], want: &[f64], span: Duration) {
    let start = Instant::now();
    while start.elapsed() < span {
        for (admin, want) in admins.iter().zip(want) {
            assert_eq!(metric(*admin, SHED).await, *want, "{admin}: a shed moved");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a scale-out, the full instance turns unready, sheds its excess over
/// the mean — the oldest sessions, with 1012 — and is ready again; the new
/// instance, below the mean, never sheds; once even, nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_instance_sheds_its_excess_oldest_first_after_a_scale_out() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let (gate_a, proxy_a, admin_a) = instance(up.addr, &redis, "scale", "a", &[]);
    let held = open_in_order(proxy_a, 30).await;
    // Alone, it is balanced whatever it holds.
    wait_metric(admin_a, "wsgate_fleet_mean", 30.0).await;
    assert_eq!(metric(admin_a, INSTANCES).await, 1.0);
    sheds_stay(&[admin_a], &[0.0], Duration::from_millis(2500)).await;

    let start = Instant::now();
    let closes = Arc::new(AtomicUsize::new(0));
    let watched = watch_all(held, start, &closes);
    let (gate_b, proxy_b, admin_b) = instance(up.addr, &redis, "scale", "b", &[]);
    wait_metric(admin_a, INSTANCES, 2.0).await;
    wait_readyz(admin_a, 503, "rebalancing").await;
    wait_closes(&closes, 15).await;
    wait_readyz(admin_a, 200, "ready").await;
    let (closed, mut open_left) = outcomes(watched, 1012, REASON).await;
    assert_eq!(
        closed.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..15).collect::<Vec<_>>(),
        "the 15 oldest"
    );
    // Paced over the 2 s period, not all at once.
    let first = closed.iter().map(|(_, at)| *at).min().expect("closes");
    let last = closed.iter().map(|(_, at)| *at).max().expect("closes");
    assert!(
        last - first >= Duration::from_millis(1500),
        "{first:?}..{last:?}"
    );
    assert_eq!(metric(admin_a, SHED).await, 15.0);
    assert_eq!(
        labelled_metric(
            admin_a,
            "wsgate_sessions_ended_total",
            &[("end", "rebalance"), ("closed_by", "wsgate")]
        )
        .await,
        15.0
    );
    wait_metric(admin_a, "wsgate_connections_active", 15.0).await;
    // The shed clients reconnect elsewhere; then the fleet is even and stays so.
    let moved = open_in_order(proxy_b, 15).await;
    for (_, ws) in open_left.iter_mut().take(3) {
        echo_text(ws, "still here").await;
    }
    wait_metric(admin_a, "wsgate_fleet_mean", 15.0).await;
    sheds_stay(&[admin_a, admin_b], &[15.0, 0.0], Duration::from_secs(4)).await;
    drop((moved, open_left));
    drop((gate_a, gate_b));
}

/// A spike above the mean shorter than `rebalance_after` sheds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spike_shorter_than_rebalance_after_sheds_nothing() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let wait = [("WSGATE_REBALANCE_AFTER", "4s")];
    let (_a, proxy_a, admin_a) = instance(up.addr, &redis, "spike", "a", &wait);
    let (_b, proxy_b, admin_b) = instance(up.addr, &redis, "spike", "b", &wait);
    let base_a = open_in_order(proxy_a, 10).await;
    let base_b = open_in_order(proxy_b, 10).await;
    wait_metric(admin_a, INSTANCES, 2.0).await;
    wait_metric(admin_a, "wsgate_fleet_mean", 10.0).await;
    // 20 against 10 for 2 s: far above the tolerance, but not for long.
    let spike = open_in_order(proxy_a, 10).await;
    wait_metric(admin_b, "wsgate_fleet_mean", 15.0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(spike);
    wait_metric(admin_a, "wsgate_connections_active", 10.0).await;
    sheds_stay(&[admin_a, admin_b], &[0.0, 0.0], Duration::from_secs(5)).await;
    drop((base_a, base_b));
}

/// Redis killed while a shed runs: the shed stops at the next heartbeat, the
/// instance is ready again, its remaining sessions carry on and new ones
/// are admitted (`fleet_fail_mode = open`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_shed_stops_the_shed_and_nothing_else_breaks() {
    let mut redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let slow = [("WSGATE_REBALANCE_PERIOD", "20s")];
    let (_a, proxy_a, admin_a) = instance(up.addr, &redis, "outage", "a", &slow);
    let held = open_in_order(proxy_a, 40).await;
    let closes = Arc::new(AtomicUsize::new(0));
    let watched = watch_all(held, Instant::now(), &closes);
    let (_b, _proxy_b, admin_b) = instance(up.addr, &redis, "outage", "b", &slow);
    wait_readyz(admin_a, 503, "rebalancing").await;
    wait_closes(&closes, 2).await;
    redis.kill9();
    wait_readyz(admin_a, 200, "ready").await;
    let shed = metric(admin_a, SHED).await;
    assert!((2.0..20.0).contains(&shed), "{shed} of 20 planned");
    // Nothing more is shed without Redis.
    sheds_stay(&[admin_a, admin_b], &[shed, 0.0], Duration::from_secs(3)).await;
    let (closed, open_left) = outcomes(watched, 1012, REASON).await;
    assert_eq!(closed.len() as f64, shed);
    for (_, mut ws) in open_left {
        echo_text(&mut ws, "unaffected").await;
    }
    let mut newcomer = within("connect", connect(&format!("ws://{proxy_a}/")))
        .await
        .expect("admitted without Redis (open mode)");
    echo_text(&mut newcomer, "hello").await;
}

/// Where [`reconnecting`] clients connect: the next of these in turn.
type Targets = Arc<std::sync::Mutex<Vec<SocketAddr>>>;

/// `clients` clients that reconnect at once after every Close, each time to
/// the next of `targets` in turn, like a front that ignores readiness (the
/// worst case for rebalancing). They end when `stop` says so; the count is
/// of reconnects (first connections not included).
fn reconnecting(
    targets: &Targets,
    clients: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Arc<AtomicUsize> {
    use futures_util::StreamExt;
    let next = Arc::new(AtomicUsize::new(0));
    let reconnects = Arc::new(AtomicUsize::new(0));
    for _ in 0..clients {
        let (targets, next) = (Arc::clone(targets), Arc::clone(&next));
        let reconnects = Arc::clone(&reconnects);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut first = true;
            while !*stop.borrow() {
                let target = {
                    let t = targets.lock().expect("targets");
                    t[next.fetch_add(1, Ordering::Relaxed) % t.len()]
                };
                let Ok(mut ws) = connect(&format!("ws://{target}/")).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if !first {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                tokio::select! {
                    _ = stop.changed() => return,
                    () = async { while let Some(Ok(_)) = ws.next().await {} } => {}
                }
            }
        });
    }
    reconnects
}

/// Whether the instance behind `admin` is shedding now.
async fn shedding(admin: SocketAddr) -> bool {
    http_get(admin, "/readyz").await.1.contains("rebalancing")
}

/// Two instances that see each other's beats, behind a front that ignores
/// readiness (half of every shed comes straight back): the one above the
/// mean sheds, again after each cooldown, until both are within the
/// tolerance; the one below never sheds, the two never shed at the same
/// time, and once within the tolerance nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_never_shed_into_each_other_and_settle() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let quick = [
        ("WSGATE_REBALANCE_PERIOD", "1s"),
        ("WSGATE_REBALANCE_COOLDOWN", "1s"),
    ];
    let (_a, proxy_a, admin_a) = instance(up.addr, &redis, "pingpong", "a", &quick);
    let targets: Targets = Arc::new(std::sync::Mutex::new(vec![proxy_a]));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reconnects = reconnecting(&targets, 40, &stopped);
    wait_metric(admin_a, "wsgate_connections_active", 40.0).await;
    // B joins; from now on a shed client goes to A and B in turn.
    let (_b, proxy_b, admin_b) = instance(up.addr, &redis, "pingpong", "b", &quick);
    targets.lock().expect("targets").push(proxy_b);
    let start = Instant::now();
    let mut both = 0;
    let mut settled_at: Option<Instant> = None;
    while start.elapsed() < Duration::from_secs(40) {
        let (sa, sb) = (shedding(admin_a).await, shedding(admin_b).await);
        if sa && sb {
            both += 1;
        }
        let a = metric(admin_a, "wsgate_connections_active").await;
        let b = metric(admin_b, "wsgate_connections_active").await;
        if a + b == 40.0 && (a - 20.0).abs() <= 2.0 && !sa && !sb {
            settled_at.get_or_insert_with(Instant::now);
        } else if a + b == 40.0 {
            settled_at = None;
        }
        if settled_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (shed_a, shed_b) = (metric(admin_a, SHED).await, metric(admin_b, SHED).await);
    println!(
        "settled after {:?}: A shed {shed_a}, B shed {shed_b}, {} reconnects",
        start.elapsed(),
        reconnects.load(Ordering::Relaxed)
    );
    assert!(settled_at.is_some(), "never settled within the tolerance");
    assert_eq!(both, 0, "both instances shed at the same time");
    assert_eq!(shed_b, 0.0, "the instance below the mean shed");
    assert!(shed_a >= 20.0, "A shed its excess, in rounds: {shed_a}");
    // Settled: nothing moves any more.
    sheds_stay(&[admin_a, admin_b], &[shed_a, 0.0], Duration::from_secs(3)).await;
    let _ = stop.send(true);
}
