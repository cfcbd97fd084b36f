//! Rollout safety (docs/operations.md#rollouts): saturation-aware readiness, shutdown delay and
//! gradual drain, admission rate limit, per-client cap, dry run, hot reload
//! and connection lifetimes. Every test would fail without its feature.

use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::config::{Config, ConfigDuration, RawConfig};
use wsgate::Control;

fn secs(s: f64) -> ConfigDuration {
    ConfigDuration(Duration::from_secs_f64(s))
}

async fn open(gate: &Sidecar, n: usize) -> Vec<Ws> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            within("connect", connect(&gate.ws_url()))
                .await
                .expect("admitted"),
        );
    }
    v
}

/// For each client, a task that reads until the connection ends and
/// returns when that was, counted from `start`.
fn watch_closes(clients: Vec<Ws>, start: Instant) -> Vec<tokio::task::JoinHandle<Duration>> {
    clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                while let Some(Ok(_)) = ws.next().await {}
                start.elapsed()
            })
        })
        .collect()
}

async fn readyz(gate: &Sidecar) -> (u16, String) {
    http_get(gate.admin, "/readyz").await
}

#[tokio::test]
async fn readiness_turns_503_at_high_watermark_and_back_only_at_low() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr).cap(10);
    raw.ready_high_watermark = 0.8;
    raw.ready_low_watermark = Some(0.5);
    let gate = spawn_sidecar(raw).await;
    let mut held = open(&gate, 7).await;
    assert_eq!(readyz(&gate).await.0, 200);
    held.extend(open(&gate, 1).await);
    assert_eq!(readyz(&gate).await, (503, "saturated\n".to_owned()));
    assert_eq!(metric(gate.admin, "wsgate_ready").await, 0.0);
    // Not ready never refuses an upgrade by itself.
    held.extend(open(&gate, 1).await);
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 9.0);
    // Down to 6 (above low): still not ready; 5 (= low): ready again.
    held.truncate(6);
    wait_metric(gate.admin, "wsgate_connections_active", 6.0).await;
    assert_eq!(
        readyz(&gate).await.0,
        503,
        "hysteresis: 6/10 is above the low mark"
    );
    held.truncate(5);
    wait_metric(gate.admin, "wsgate_connections_active", 5.0).await;
    assert_eq!(readyz(&gate).await.0, 200);
    assert_eq!(metric(gate.admin, "wsgate_ready").await, 1.0);
}

#[tokio::test]
async fn shutdown_delay_keeps_admitting_while_not_ready() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.shutdown_delay = secs(1.0);
    raw.shutdown_grace = secs(5.0);
    let gate = spawn_sidecar(raw).await;
    gate.signal();
    wait_metric(gate.admin, "wsgate_ready", 0.0).await;
    assert_eq!(readyz(&gate).await, (503, "draining\n".to_owned()));
    let mut late = within("connect during the delay", connect(&gate.ws_url()))
        .await
        .expect("still admitted");
    echo_text(
        &mut late,
        "routed here before the endpoint removal propagated",
    )
    .await;
    // After the delay the listener closes.
    let start = Instant::now();
    while tokio::net::TcpStream::connect(gate.addr).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "listener never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close_cleanly(late).await;
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_a_hundred_connections_evenly_over_the_period() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.drain_period = secs(5.0);
    raw.shutdown_grace = secs(10.0);
    let gate = spawn_sidecar(raw).await;
    let clients = open(&gate, 100).await;
    wait_metric(gate.admin, "wsgate_connections_active", 100.0).await;
    let start = Instant::now();
    let waiters = watch_closes(clients, start);
    gate.signal();
    // Sample the drained counter while the admin port still answers: the
    // process exits as soon as the last tunnel is gone, so a scrape may
    // find the port closed at the end.
    let mut last_drained = 0.0;
    while !waiters.iter().all(|w| w.is_finished()) && start.elapsed() < Duration::from_secs(8) {
        if let Some(v) = try_metric(gate.admin, "wsgate_connections_drained_total").await {
            assert!(v >= last_drained, "drained_total went backwards");
            last_drained = v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closes = Vec::new();
    for w in waiters {
        closes.push(within("client closed", w).await.expect("join"));
    }
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
    closes.sort();
    let last = *closes.last().expect("closes");
    assert!(
        last < Duration::from_secs(6),
        "drain took {last:?} for a 5 s period"
    );
    assert!(
        closes[0] > Duration::from_millis(20),
        "first close at once: {:?}",
        closes[0]
    );
    // No one-second window holds more than ~2x its share (100 / 5 s = 20).
    let mut per_second = [0usize; 7];
    for c in &closes {
        per_second[(c.as_secs() as usize).min(6)] += 1;
    }
    println!("closes per second of the drain: {per_second:?} (drained_total seen: {last_drained})");
    assert!(
        per_second.iter().all(|&n| n <= 40),
        "closes bunched: {per_second:?}"
    );
    assert!(
        per_second[..5].iter().all(|&n| n >= 8),
        "a second of the drain idle: {per_second:?}"
    );
    assert!(
        last_drained >= 50.0,
        "drained_total only reached {last_drained}"
    );
}

#[tokio::test]
async fn rate_limit_admits_the_burst_then_refuses_with_jittered_retry_after() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.admission_rate = 2.0;
    raw.admission_burst = 5;
    raw.retry_after = secs(1.0);
    let gate = spawn_sidecar(raw).await;
    let _held = open(&gate, 5).await;
    let mut retry_afters = Vec::new();
    for _ in 0..20 {
        let r = connect_refused(&gate.ws_url()).await;
        assert_eq!(r.status(), 503);
        retry_afters.push(
            r.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse::<u64>()
                .expect("seconds"),
        );
    }
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"rate\"}"
        )
        .await,
        20.0
    );
    assert!(
        retry_afters.iter().all(|&s| (1..=4).contains(&s)),
        "{retry_afters:?}"
    );
    retry_afters.sort();
    retry_afters.dedup();
    assert!(
        retry_afters.len() > 1,
        "Retry-After carries no jitter: {retry_afters:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_a_reconnect_storm_to_the_configured_rate() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.admission_rate = 20.0;
    raw.admission_burst = 10;
    let gate = spawn_sidecar(raw).await;
    let url = gate.ws_url();
    // 400 clients retrying as fast as they can for 2 s.
    let start = Instant::now();
    let window = Duration::from_secs(2);
    let storm: Vec<_> = (0..40)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut admitted = Vec::new();
                while start.elapsed() < window {
                    if let Ok(Ok((ws, _))) = tokio::time::timeout(
                        DEADLINE,
                        tokio_tungstenite::connect_async(url.as_str()),
                    )
                    .await
                    {
                        admitted.push(ws);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for s in storm {
        admitted += s.await.expect("join").len();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rejected = metric(
        gate.admin,
        "wsgate_connections_rejected_total{reason=\"rate\"}",
    )
    .await;
    println!("storm: {admitted} admitted in {elapsed:.2}s at rate 20/s burst 10; {rejected} refused by rate");
    // burst + rate x time, within a token or two of scheduling noise.
    let most = 10.0 + 20.0 * elapsed + 2.0;
    assert!((admitted as f64) <= most, "admitted {admitted} > {most}");
    assert!(admitted >= 30, "admitted only {admitted}");
    assert!(rejected > 100.0, "the storm was not refused: {rejected}");
}

#[tokio::test]
async fn per_ip_cap_uses_socket_peer_or_trusted_forwarded_for() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.max_clients_per_ip = 2;
    let gate = spawn_sidecar(raw).await;
    let _held = open(&gate, 2).await;
    let r = connect_refused(&gate.ws_url()).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"per_ip\"}"
        )
        .await,
        1.0
    );
    // Without trusted hops a client cannot escape the cap by forging XFF.
    let mut req = gate.ws_url().into_client_request().expect("request");
    req.headers_mut()
        .insert("x-forwarded-for", "198.51.100.77".parse().expect("value"));
    assert!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "forged XFF escaped the per-IP cap"
    );

    let up2 = spawn_echo_upstream().await;
    let mut raw = test_config(up2.addr);
    raw.max_clients_per_ip = 1;
    raw.trusted_hops = 1;
    let gate = spawn_sidecar(raw).await;
    let with_xff = |ip: &str| {
        let mut req = gate.ws_url().into_client_request().expect("request");
        req.headers_mut().insert(
            "x-forwarded-for",
            format!("203.0.113.50, {ip}").parse().expect("value"),
        );
        req
    };
    let _a = within(
        "a",
        tokio_tungstenite::connect_async(with_xff("198.51.100.1")),
    )
    .await
    .expect("first address");
    let _b = within(
        "b",
        tokio_tungstenite::connect_async(with_xff("198.51.100.2")),
    )
    .await
    .expect("second address");
    match within(
        "c",
        tokio_tungstenite::connect_async(with_xff("198.51.100.1")),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!(
            "same forwarded address admitted twice: {:?}",
            other.map(|_| ())
        ),
    }
}

#[tokio::test]
async fn dry_run_admits_over_the_cap_and_counts_what_it_would_refuse() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr).cap(2);
    raw.enforce = false;
    let gate = spawn_sidecar(raw).await;
    let mut held = open(&gate, 4).await;
    for ws in &mut held {
        echo_text(ws, "dry run").await;
    }
    assert_eq!(
        metric(gate.admin, "wsgate_connections_active").await,
        4.0,
        "the real count, over the cap"
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_would_reject_total{reason=\"capacity\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        0.0
    );
}

fn reloaded(raw: RawConfig) -> Control {
    Control::Reload(Box::new(Config::validate(raw)))
}

#[tokio::test]
async fn reload_lowers_the_cap_without_dropping_anyone_and_refuses_bad_config() {
    let up = spawn_echo_upstream().await;
    let raw = test_config(up.addr).cap(5);
    let gate = spawn_sidecar(raw.clone()).await;
    let mut held = open(&gate, 4).await;
    gate.control
        .send(reloaded(raw.clone().cap(2)))
        .expect("send");
    wait_metric(gate.admin, "wsgate_connections_max", 2.0).await;
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_config_reloads_total{result=\"success\"}"
        )
        .await,
        1.0
    );
    for ws in &mut held {
        echo_text(ws, "still here").await;
    }
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 4.0);
    assert_eq!(connect_refused(&gate.ws_url()).await.status(), 503);
    // An invalid configuration is refused and the old one stays.
    let mut bad = raw.clone();
    bad.listen = "nowhere".into();
    gate.control.send(reloaded(bad)).expect("send");
    wait_metric(
        gate.admin,
        "wsgate_config_reloads_total{result=\"failure\"}",
        1.0,
    )
    .await;
    assert_eq!(metric(gate.admin, "wsgate_connections_max").await, 2.0);
    // Raising it again admits.
    gate.control.send(reloaded(raw.cap(10))).expect("send");
    wait_metric(gate.admin, "wsgate_connections_max", 10.0).await;
    held.extend(open(&gate, 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_closes_connections_spread_over_the_jitter_window() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.max_connection_lifetime = secs(2.0);
    raw.lifetime_jitter = 0.5;
    let gate = spawn_sidecar(raw).await;
    let start = Instant::now();
    let clients = open(&gate, 20).await;
    let waiters = watch_closes(clients, start);
    let mut ends = Vec::new();
    for w in waiters {
        ends.push(within("expired", w).await.expect("join"));
    }
    ends.sort();
    println!(
        "lifetime ends: first {:?}, last {:?}",
        ends[0],
        ends[ends.len() - 1]
    );
    assert!(
        ends[0] >= Duration::from_millis(950),
        "expired before lifetime x (1 - jitter): {:?}",
        ends[0]
    );
    assert!(
        ends[ends.len() - 1] <= Duration::from_millis(2600),
        "expired after the lifetime: {:?}",
        ends[ends.len() - 1]
    );
    assert!(
        ends[ends.len() - 1] - ends[0] > Duration::from_millis(300),
        "not spread: {ends:?}"
    );
    wait_metric(gate.admin, "wsgate_connections_expired_total", 20.0).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_before_the_end_of_grace_handshakes() {
    // SPEC allows delay + drain = grace; the end-of-grace handshakes start
    // close_timeout before the grace ends, so the drain is fitted before them
    // instead of being cut short into one burst.
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.drain_period = secs(2.0);
    raw.shutdown_grace = secs(2.0);
    raw.close_timeout = secs(1.0);
    let gate = spawn_sidecar(raw).await;
    let clients = open(&gate, 10).await;
    let start = Instant::now();
    let waiters = watch_closes(clients, start);
    gate.signal();
    let mut closes = Vec::new();
    for w in waiters {
        closes.push(within("closed", w).await.expect("join"));
    }
    closes.sort();
    println!(
        "drain fitted before the grace's handshakes: closes from {:?} to {:?}",
        closes[0], closes[9]
    );
    assert!(
        closes[9] < Duration::from_millis(1500),
        "drain not fitted: last close at {:?}",
        closes[9]
    );
    assert!(
        closes[9] - closes[0] > Duration::from_millis(500),
        "one burst: {closes:?}"
    );
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
}
