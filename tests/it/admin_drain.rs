//! Operator drains and refusal summaries (docs/operations.md#access-log, issue 14), black-box:
//! the wsgate binary as a child process, a real echo upstream on port 0,
//! real clients (tokio-tungstenite, raw sockets) and plain HTTP to the admin
//! port. Every test would fail without the feature it names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::admin::{self, event_field, Operator, TokenFile};
use crate::support::watched::{open_in_order, wait_closes, watch, watch_all, End, Watched};
use crate::support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TOKEN: &str = "op-token-4f1c9e";
const ADMIN_DRAINED: &str = "wsgate_admin_drained_total";
/// The shutdown drain's counter: an admin drain must not move it.
const SHUTDOWN_DRAINED: &str = "wsgate_connections_drained_total";
const REASON: &str = "server rebalancing, please reconnect";

/// The wsgate binary in front of `upstream`, with `env`; (process, proxy, admin).
fn start(upstream: SocketAddr, env: &[(&str, String)]) -> (GateProcess, SocketAddr, SocketAddr) {
    tokio::task::block_in_place(|| GateProcess::proxy(upstream, env, None))
}

/// [`start`] with the admin token in `token`.
fn start_with_token(
    upstream: SocketAddr,
    token: &TokenFile,
    env: &[(&str, String)],
) -> (GateProcess, SocketAddr, SocketAddr) {
    let mut all = vec![("WSGATE_ADMIN_TOKEN_FILE", token.env())];
    all.extend(env.iter().cloned());
    start(upstream, &all)
}

/// Ends every watch: the clients closed with `close_code_drain` and the
/// admin drain's reason, and those still open.
async fn outcomes(watched: Vec<Watched>) -> (Vec<(usize, Duration)>, Vec<(usize, Ws)>) {
    crate::support::watched::outcomes(watched, 1001, REASON).await
}

/// The admin port's `/readyz` status.
async fn readyz(admin: SocketAddr) -> u16 {
    http_get(admin, "/readyz").await.0
}

// ---------------------------------------------------------------- token

/// No `admin_token_file`: `/drain` does not exist, whatever the method and
/// whatever `Authorization` says; nobody is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_is_404_without_a_token_file() {
    let up = spawn_echo_upstream().await;
    let (_gate, proxy, admin) = start(up.addr, &[]);
    let held = open_in_order(proxy, 2).await;
    for token in [None, Some(TOKEN)] {
        let op = Operator::new(admin, token);
        for reply in [
            op.post_drain(r#"{"count": 2, "period": "500ms"}"#).await,
            op.delete_drain().await,
            op.get_drain().await,
        ] {
            assert_eq!(reply.status, 404, "token {token:?}: {reply:?}");
        }
    }
    assert_eq!(metric(admin, ADMIN_DRAINED).await, 0.0, "exported at 0");
    let watched = watch_all(held, Instant::now(), &Arc::default());
    // Three times the period asked for: a drain started anyway would show.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let ended = watched.iter().filter(|w| w.task.is_finished()).count();
        assert_eq!(ended, 0, "a client ended after a 404");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (drained, mut left) = outcomes(watched).await;
    assert!(drained.is_empty());
    for (_, ws) in &mut left {
        echo_text(ws, "still here").await;
    }
    assert_eq!(metric(admin, ADMIN_DRAINED).await, 0.0);
}

/// A token file: no `Authorization`, a wrong token, another scheme or a
/// token with more after it are 401 with `WWW-Authenticate: Bearer`, on
/// every method, and start nothing (all clients stay, the counter stays 0,
/// `GET /drain` shows no drain ever ran); the right token is 202 and drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_or_missing_token_is_401_and_starts_no_drain() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, proxy, admin) = start_with_token(up.addr, &token, &[]);
    let start = Instant::now();
    let closes = Arc::new(AtomicUsize::new(0));
    let watched = watch_all(open_in_order(proxy, 3).await, start, &closes);
    let body = r#"{"count": 3, "period": "500ms"}"#;
    let right = Operator::new(admin, Some(TOKEN));
    let mut refused = Vec::new();
    for op in [
        right.with_token(None),
        right.with_token(Some("op-token-4f1c9")),
        right.with_token(Some("op-token-4f1c9e0")),
        right.with_token(Some("")),
    ] {
        refused.push(op.post_drain(body).await);
        refused.push(op.get_drain().await);
        refused.push(op.delete_drain().await);
    }
    let basic = format!("Basic {TOKEN}");
    refused.push(
        admin::request(
            admin,
            "POST",
            "/drain",
            &[("Authorization", &basic)],
            Some(body.as_bytes()),
        )
        .await,
    );
    for r in &refused {
        assert_eq!(r.status, 401, "{r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "401 without WWW-Authenticate: Bearer: {r:?}"
        );
    }
    // Three times the period asked for: nobody is closed.
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(closes.load(Ordering::SeqCst), 0, "a 401 drained someone");
        assert_eq!(metric(admin, ADMIN_DRAINED).await, 0.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let never = right.get_drain().await;
    assert_eq!(never.status, 200, "{never:?}");
    assert_eq!(
        never.json(),
        json!({"running": false, "planned": 0, "drained": 0, "period_ms": 0}),
        "no drain ever ran"
    );

    let accepted = right.post_drain(body).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.json(), json!({"planned": 3, "period_ms": 500}));
    wait_closes(&closes, 3).await;
    wait_metric(admin, ADMIN_DRAINED, 3.0).await;
    let (drained, left) = outcomes(watched).await;
    assert_eq!(drained.len(), 3);
    assert!(left.is_empty());
}

/// The token file rotated as a Secret is (a new file renamed over it):
/// the new token works without a restart and the old one gets 401. The
/// accepted requests also show the defaults: no `period` = 10 s when
/// `drain_period` is 0; integer seconds; `fraction: 1`; nobody connected =
/// planned 0, and nothing runs (no 409 on the next request).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_token_file_applies_without_restart() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new("first-token");
    let (_gate, _proxy, admin) = start_with_token(up.addr, &token, &[]);
    let first = Operator::new(admin, Some("first-token"));
    let second = first.with_token(Some("second-token"));
    assert_eq!(first.get_drain().await.status, 200);
    assert_eq!(second.get_drain().await.status, 401);

    token.rotate("second-token");
    let start = Instant::now();
    while second.get_drain().await.status != 200 {
        assert!(
            start.elapsed() < DEADLINE,
            "the rotated token never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rotated token applied after {:?}", start.elapsed());
    assert_eq!(
        first.get_drain().await.status,
        401,
        "old token after rotation"
    );
    assert_eq!(first.post_drain(r#"{"count": 1}"#).await.status, 401);
    assert_eq!(first.delete_drain().await.status, 401);

    for (body, period_ms) in [
        (r#"{"count": 1}"#, 10_000),
        (r#"{"count": 5, "period": 2}"#, 2_000),
        (r#"{"fraction": 1, "period": "500ms"}"#, 500),
        (r#"{"fraction": 0.5, "period": "2m"}"#, 120_000),
        (r#"{"count": 1, "period": "1h"}"#, 3_600_000),
    ] {
        let r = second.post_drain(body).await;
        assert_eq!(r.status, 202, "{body}: {r:?}");
        assert_eq!(
            r.json(),
            json!({"planned": 0, "period_ms": period_ms}),
            "{body}"
        );
        let status = second.get_drain().await.json();
        assert_eq!(status["running"], json!(false), "{body}: {status}");
    }
    assert_eq!(
        second.delete_drain().await.json(),
        json!({"stopped": false})
    );
    assert_eq!(metric(admin, ADMIN_DRAINED).await, 0.0);
}

/// With `drain_period` set, a request without `period` drains over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_period_is_drain_period() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, _proxy, admin) =
        start_with_token(up.addr, &token, &[("WSGATE_DRAIN_PERIOD", "3s".into())]);
    let r = Operator::new(admin, Some(TOKEN))
        .post_drain(r#"{"count": 4}"#)
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json(), json!({"planned": 0, "period_ms": 3000}));
}

// ---------------------------------------------------------------- the drain

/// 30 connected, `{"count": 20, "period": "2s"}`: exactly the 20 oldest get
/// Close 1001 with the admin drain's reason, spread over the period; the 10
/// youngest stay and echo; a client connecting during the drain is admitted,
/// echoes and stays; `/readyz` is 200 throughout; a second POST is 409;
/// `GET /drain` shows it running, then done; the admin counter says 20 and
/// the shutdown drain's counter 0; the upstream got Close 1001 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn count_drain_closes_the_oldest_evenly_and_keeps_admitting() {
    const M: usize = 30;
    const N: usize = 20;
    let up = spawn_recording_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, proxy, admin) = start_with_token(up.addr, &token, &[]);
    let op = Operator::new(admin, Some(TOKEN));
    let clients = open_in_order(proxy, M).await;
    wait_metric(admin, ACTIVE, M as f64).await;
    assert_eq!(readyz(admin).await, 200);

    let closes = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let watched = watch_all(clients, start, &closes);
    let r = op
        .post_drain(&format!(r#"{{"count": {N}, "period": "2s"}}"#))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json(), json!({"planned": N, "period_ms": 2000}));

    let (mut ready_polls, mut seen_running, mut conflicts) = (0, 0, 0);
    let mut latecomer = None;
    loop {
        assert_eq!(readyz(admin).await, 200, "not ready during an admin drain");
        ready_polls += 1;
        let status = op.get_drain().await;
        assert_eq!(status.status, 200, "{status:?}");
        let s = status.json();
        assert_eq!(s["planned"], json!(N), "{s}");
        assert_eq!(s["period_ms"], json!(2000), "{s}");
        if s["running"] == json!(false) {
            break;
        }
        seen_running += 1;
        if conflicts == 0 {
            let again = op.post_drain(r#"{"count": 1, "period": "1s"}"#).await;
            assert_eq!(again.status, 409, "second POST during a drain: {again:?}");
            let j = again.json();
            assert_eq!(j["error"], json!("an admin drain is running"), "{j}");
            assert_eq!(j["planned"], json!(N), "{j}");
            assert!(j["drained"].as_u64().is_some_and(|k| k <= N as u64), "{j}");
            conflicts += 1;
        }
        if latecomer.is_none() && closes.load(Ordering::SeqCst) >= 2 {
            let mut ws = within(
                "connect during the drain",
                connect(&format!("ws://{proxy}/")),
            )
            .await
            .expect("admitted during an admin drain");
            echo_text(&mut ws, "joined mid-drain").await;
            latecomer = Some(watch(ws, start, Arc::new(AtomicUsize::new(0))));
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "the 2 s drain still runs after {:?}: {s}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finished = start.elapsed();
    assert!(seen_running > 0, "GET /drain never showed it running");
    let latecomer = latecomer.expect("no client connected during the drain");

    wait_closes(&closes, N).await;
    wait_metric(admin, ADMIN_DRAINED, N as f64).await;
    assert_eq!(
        op.get_drain().await.json(),
        json!({"running": false, "planned": N, "drained": N, "period_ms": 2000})
    );
    let (drained, open_now) = outcomes(watched).await;
    let closed_ids: Vec<usize> = drained.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        closed_ids,
        (0..N).collect::<Vec<_>>(),
        "the oldest {N} are the ones drained"
    );
    assert_eq!(open_now.len(), M - N);
    // The upstream side of each drained connection got its own Close (the
    // recording upstream's tungstenite accepts only masked frames).
    let start_up = Instant::now();
    while up.closes().len() < N && start_up.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.closes(),
        vec![(1001, REASON.to_owned()); N],
        "the upstream's Close frames"
    );

    let mut times: Vec<Duration> = drained.iter().map(|(_, t)| *t).collect();
    times.sort();
    let mut per_half_second = [0usize; 6];
    for t in &times {
        per_half_second[(t.as_millis() / 500).min(5) as usize] += 1;
    }
    println!(
        "admin drain of {N} over 2 s: closes per 500 ms {per_half_second:?}, first {:?}, last {:?}, \
         GET /drain not running after {finished:?}; /readyz polled {ready_polls} times, all 200",
        times[0],
        times[N - 1]
    );
    let mean = N / 4;
    assert!(
        per_half_second.iter().all(|&n| n <= 2 * mean),
        "closes bunched (mean {mean} per 500 ms): {per_half_second:?}"
    );
    assert!(
        per_half_second[..4].iter().all(|&n| n >= 1),
        "a half-second of the drain without a close: {per_half_second:?}"
    );
    assert!(
        times[N - 1] < Duration::from_millis(3000),
        "last close at {:?} for a 2 s period",
        times[N - 1]
    );

    let mut open_now = open_now;
    for (i, ws) in &mut open_now {
        echo_text(ws, &format!("survivor {i}")).await;
    }
    let _latecomer = match latecomer.end().await {
        End::Open(mut ws) => {
            echo_text(&mut ws, "latecomer still here").await;
            ws
        }
        other => panic!("the client admitted during the drain ended: {other:?}"),
    };
    assert_eq!(
        metric(admin, SHUTDOWN_DRAINED).await,
        0.0,
        "only the shutdown drain counts there"
    );
    let text = scrape(admin).await;
    assert_eq!(
        labelled_value(
            &text,
            "wsgate_close_frames_sent_total",
            &[("reason", "drain")]
        ),
        Some(N as f64),
        "admin-drain Close frames count as drain Close frames"
    );
    assert_eq!(
        labelled_value(
            &text,
            "wsgate_sessions_ended_total",
            &[("closed_by", "wsgate"), ("end", "admin_drain")]
        ),
        Some(N as f64)
    );
    assert_eq!(metric_value(&text, ACTIVE), Some((M - N + 1) as f64));
}

/// `{"count": 10, "period": "5s"}` with 12 connected, `DELETE /drain`
/// midway: 200 with what was closed so far, and no further Close comes for
/// the rest of the period (and beyond); the counter stays; a second DELETE
/// finds none; a new POST is accepted again and takes the oldest left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_stops_a_drain_midway() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, proxy, admin) = start_with_token(up.addr, &token, &[]);
    let op = Operator::new(admin, Some(TOKEN));
    let clients = open_in_order(proxy, 12).await;
    let closes = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let watched = watch_all(clients, start, &closes);
    let r = op.post_drain(r#"{"count": 10, "period": "5s"}"#).await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json(), json!({"planned": 10, "period_ms": 5000}));

    // About 2 s in: 4 of 10 closed at the planned pace.
    wait_metric_at_least(admin, ADMIN_DRAINED, 4.0).await;
    let stopped_at = start.elapsed();
    let stop = op.delete_drain().await;
    assert_eq!(stop.status, 200, "{stop:?}");
    let j = stop.json();
    assert_eq!(j["stopped"], json!(true), "{j}");
    assert_eq!(j["planned"], json!(10), "{j}");
    let k = j["drained"].as_u64().expect("drained") as usize;
    assert!(
        (4..10).contains(&k),
        "DELETE at {stopped_at:?} reports {k} drained"
    );
    wait_closes(&closes, k).await;

    // Until a second past the end of the original period: nothing more.
    while start.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            closes.load(Ordering::SeqCst),
            k,
            "a Close after DELETE at {stopped_at:?}"
        );
        assert_eq!(metric(admin, ADMIN_DRAINED).await, k as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("DELETE after {stopped_at:?}: {k} of 10 drained, none after");
    assert_eq!(
        op.get_drain().await.json(),
        json!({"running": false, "planned": 10, "drained": k, "period_ms": 5000})
    );
    assert_eq!(op.delete_drain().await.json(), json!({"stopped": false}));

    // Stopped for good: a new drain is accepted and takes the oldest left.
    let r = op.post_drain(r#"{"count": 1, "period": "200ms"}"#).await;
    assert_eq!(r.status, 202, "after DELETE: {r:?}");
    assert_eq!(r.json(), json!({"planned": 1, "period_ms": 200}));
    wait_closes(&closes, k + 1).await;
    wait_metric(admin, ADMIN_DRAINED, (k + 1) as f64).await;
    let (drained, open_now) = outcomes(watched).await;
    assert_eq!(
        drained.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..=k).collect::<Vec<_>>(),
        "oldest first, before and after the DELETE"
    );
    assert_eq!(open_now.len(), 12 - k - 1);
    for (i, mut ws) in open_now {
        echo_text(&mut ws, &format!("survivor {i}")).await;
    }
}

/// Bad bodies are 400 with a JSON `error` naming the field, a body over
/// 4 KiB is 413; none of them starts a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_bodies_are_400_naming_the_field_and_oversized_413() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, proxy, admin) = start_with_token(up.addr, &token, &[]);
    let op = Operator::new(admin, Some(TOKEN));
    let closes = Arc::new(AtomicUsize::new(0));
    let watched = watch_all(open_in_order(proxy, 2).await, Instant::now(), &closes);
    for (body, names) in [
        (r#"{"fraction": 0}"#, &["fraction"][..]),
        (r#"{"fraction": 1.5}"#, &["fraction"]),
        (r#"{"fraction": -0.25}"#, &["fraction"]),
        (r#"{"fraction": "0.5"}"#, &["fraction"]),
        (r#"{"count": 0}"#, &["count"]),
        (r#"{"count": -1}"#, &["count"]),
        (r#"{"count": 2.5}"#, &["count"]),
        (r#"{"count": "2"}"#, &["count"]),
        (r#"{"fraction": 0.5, "count": 1}"#, &["fraction", "count"]),
        (r#"{}"#, &["fraction", "count"]),
        (r#"{"period": "2s"}"#, &["fraction", "count"]),
        (r#"{"count": 1, "bogus": true}"#, &["bogus"]),
        (r#"{"count": 1, "period": "abc"}"#, &["period"]),
        (r#"{"count": 1, "period": "0s"}"#, &["period"]),
        (r#"{"count": 1, "period": 0}"#, &["period"]),
        (r#"{"count": 1, "period": "2h"}"#, &["period"]),
        (r#"{"count": 1, "period": true}"#, &["period"]),
        ("count=1", &[]),
        ("[1]", &[]),
        ("", &[]),
    ] {
        let r = op.post_drain(body).await;
        assert_eq!(r.status, 400, "{body:?}: {r:?}");
        let error = r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{body:?}: no error string in {}", r.body))
            .to_owned();
        for name in names {
            assert!(
                error.contains(name),
                "{body:?}: {error:?} should name {name}"
            );
        }
        println!("{body:<36} -> 400 {error}");
    }
    let mut big = String::from(r#"{"count": 1, "period": "1s""#);
    big.push_str(&" ".repeat(5000));
    big.push('}');
    let r = op.post_drain(&big).await;
    assert_eq!(r.status, 413, "a {} byte body: {r:?}", big.len());
    // Exactly 4 KiB is not over the limit: read and judged (a bad count,
    // so that nothing starts).
    let mut under = String::from(r#"{"count": 0"#);
    under.push_str(&" ".repeat(4096 - under.len() - 1));
    under.push('}');
    assert_eq!(under.len(), 4096);
    let r = op.post_drain(&under).await;
    assert_eq!(r.status, 400, "a 4096-byte body is read: {r:?}");

    assert_eq!(
        op.get_drain().await.json(),
        json!({"running": false, "planned": 0, "drained": 0, "period_ms": 0}),
        "no drain ever ran"
    );
    assert_eq!(metric(admin, ADMIN_DRAINED).await, 0.0);
    assert_eq!(closes.load(Ordering::SeqCst), 0);
    let (drained, mut left) = outcomes(watched).await;
    assert!(drained.is_empty());
    for (_, ws) in &mut left {
        echo_text(ws, "still here").await;
    }
}

// ---------------------------------------------------------------- refusal summary

/// The reason fields a summary line may carry (docs/operations.md#access-log).
const REASONS: &[&str] = &[
    "capacity",
    "draining",
    "rate",
    "per_ip",
    "key",
    "key_missing",
    "key_table_full",
    "jwt",
    "fleet",
    "fleet_unavailable",
    "bad_handshake",
    "upstream_connect",
    "upstream_timeout",
    "upstream_refused",
];

/// One raw upgrade attempt: the status of the answer (0 if none).
async fn attempt(proxy: SocketAddr, request: &[u8]) -> u16 {
    let Ok(Ok(mut s)) = tokio::time::timeout(DEADLINE, TcpStream::connect(proxy)).await else {
        return 0;
    };
    if s.write_all(request).await.is_err() {
        return 0;
    }
    let mut out = Vec::with_capacity(256);
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    status_of(&String::from_utf8_lossy(&out))
}

/// `max_clients` 1, one client held, 10,000 upgrades refused within ~10 s,
/// then SIGTERM: the `wsgate::access` "refusals" lines are at most one per
/// 10 s window plus one exit flush (so at most 2 here), their `capacity`
/// counts add up to the 503s the clients saw, `total` is the sum of the
/// line's reasons, and nothing is logged per refusal at info or above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_refusals_make_at_most_two_summary_lines() {
    const ATTEMPTS: usize = 10_000;
    const TASKS: usize = 16;
    const SPREAD: Duration = Duration::from_millis(11_000);
    let up = spawn_echo_upstream().await;
    let (mut gate, proxy, admin) = tokio::task::block_in_place(|| {
        admin::start_json(up.addr, &[("WSGATE_MAX_CLIENTS", "1".into())])
    });
    let mut held = within("connect", connect(&format!("ws://{proxy}/")))
        .await
        .expect("the one slot");
    echo_text(&mut held, "holding the only slot").await;

    // Paced over SPREAD (attempt k not before k × SPREAD / ATTEMPTS), so
    // the first 10 s window closes while refusals keep coming: one line
    // for it, and one exit flush for the window open at SIGTERM.
    let request: Arc<[u8]> = upgrade_request(proxy).into_bytes().into();
    let next = Arc::new(AtomicUsize::new(0));
    let burst_start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (next, request) = (Arc::clone(&next), Arc::clone(&request));
        tasks.push(tokio::spawn(async move {
            let mut statuses = BTreeMap::<u16, usize>::new();
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= ATTEMPTS {
                    return statuses;
                }
                tokio::time::sleep_until(burst_start + SPREAD.mul_f64(k as f64 / ATTEMPTS as f64))
                    .await;
                *statuses.entry(attempt(proxy, &request).await).or_default() += 1;
            }
        }));
    }
    let mut statuses = BTreeMap::<u16, usize>::new();
    for t in tasks {
        let part = tokio::time::timeout(Duration::from_secs(40), t)
            .await
            .expect("the burst is bounded")
            .expect("join");
        for (status, n) in part {
            *statuses.entry(status).or_default() += n;
        }
    }
    let burst = burst_start.elapsed();
    let refused = statuses.get(&503).copied().unwrap_or(0);
    println!(
        "{ATTEMPTS} upgrades in {burst:?} ({:.0}/s): {statuses:?}",
        ATTEMPTS as f64 / burst.as_secs_f64()
    );
    assert_eq!(
        refused, ATTEMPTS,
        "every attempt answered 503: {statuses:?}"
    );
    assert_eq!(
        labelled_metric(
            admin,
            "wsgate_connections_rejected_total",
            &[("reason", "capacity")]
        )
        .await,
        refused as f64
    );

    close_cleanly(held).await;
    wait_metric(admin, ACTIVE, 0.0).await;
    gate.signal("TERM");
    let status = tokio::task::block_in_place(|| gate.wait_exit());
    let lifetime = burst_start.elapsed();
    assert_eq!(status.code(), Some(0), "{}", gate.stderr_text());

    // The pipe reaches EOF just after the exit: wait until the summaries
    // account for every refusal (or fail showing what they say).
    let summaries = |text: &str| -> Vec<Value> {
        admin::json_lines(text)
            .into_iter()
            .filter(|e| {
                e.get("target") == Some(&json!("wsgate::access"))
                    && event_field(e, "message") == Some(&json!("refusals"))
            })
            .collect()
    };
    let capacity_sum = |lines: &[Value]| -> u64 {
        lines
            .iter()
            .filter_map(|l| event_field(l, "capacity")?.as_u64())
            .sum()
    };
    let wait_start = Instant::now();
    let mut text = gate.stderr_text();
    while capacity_sum(&summaries(&text)) < refused as u64 && wait_start.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = gate.stderr_text();
    }
    let lines = summaries(&text);
    for l in &lines {
        println!("{l}");
    }

    // At most one line per 10 s window since the first refusal, plus the exit flush.
    let windows = (lifetime.as_secs_f64() / 10.0).floor() as usize;
    assert!(
        lines.len() <= windows + 1,
        "{} summary lines in {lifetime:?} (at most {windows} windows + 1 flush)",
        lines.len()
    );
    if lifetime < Duration::from_secs(20) {
        assert!(lines.len() <= 2, "{} summary lines", lines.len());
    }
    assert!(!lines.is_empty(), "no refusal summary at all:\n{text}");
    let full_windows = lines
        .iter()
        .filter(|l| event_field(l, "window_s").and_then(Value::as_f64) == Some(10.0))
        .count();
    assert!(
        full_windows <= windows,
        "{full_windows} lines of 10 s windows in {lifetime:?}"
    );
    if burst > Duration::from_millis(10_500) {
        assert!(
            full_windows >= 1,
            "refusals went on for {burst:?} but no 10 s window was written before the exit"
        );
    }
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.get("level"), Some(&json!("INFO")), "{l}");
        let window = event_field(l, "window_s")
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("no window_s: {l}"));
        let last = i + 1 == lines.len();
        assert!(
            window == 10.0 || (last && window > 0.0 && window <= 10.0),
            "window_s {window} (only the last line, the exit flush, may be shorter): {l}"
        );
        let total = event_field(l, "total")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no total: {l}"));
        let mut sum = 0;
        for r in REASONS {
            if let Some(v) = event_field(l, r) {
                let n = v.as_u64().unwrap_or_else(|| panic!("{r} not a count: {l}"));
                assert!(n > 0, "a zero reason field {r}: {l}");
                sum += n;
            }
        }
        assert_eq!(total, sum, "total is the sum of the reasons: {l}");
        assert!(
            REASONS
                .iter()
                .all(|r| *r == "capacity" || event_field(l, r).is_none()),
            "only capacity refusals happened: {l}"
        );
    }
    let totals: u64 = lines
        .iter()
        .filter_map(|l| event_field(l, "total")?.as_u64())
        .sum();
    assert_eq!(
        capacity_sum(&lines),
        refused as u64,
        "the summaries' capacity counts add up to the 503s seen"
    );
    assert_eq!(totals, refused as u64);

    // Nothing per refusal at info or above: a handful of start-up, session
    // and shutdown lines, not thousands.
    let loud: Vec<&str> = text
        .lines()
        .filter(|l| {
            admin::json_lines(l).first().is_some_and(|e| {
                matches!(
                    e.get("level").and_then(Value::as_str),
                    Some("INFO" | "WARN" | "ERROR")
                ) && event_field(e, "message") != Some(&json!("refusals"))
            })
        })
        .collect();
    println!("{} other lines at info or above:", loud.len());
    for l in &loud {
        println!("  {l}");
    }
    assert!(
        loud.len() < 50,
        "{} lines at info or above for {refused} refusals, e.g.\n{}",
        loud.len(),
        loud.iter()
            .rev()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let non_json = text
        .lines()
        .filter(|l| admin::json_lines(l).is_empty())
        .count();
    assert_eq!(
        non_json, 0,
        "every stderr line is JSON under log_format json"
    );
}

// ---------------------------------------------------------------- slow bodies, quiet refusals

/// `POST /drain` with the right token whose body stalls for
/// `header_read_timeout` (docs/behaviour.md#slow-request-bodies): 408 with
/// `Connection: close`, the connection closed, and no drain started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_drain_body_gets_408_and_the_connection_closes() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (_gate, _proxy, admin) = start_with_token(
        up.addr,
        &token,
        &[("WSGATE_HEADER_READ_TIMEOUT", "300ms".into())],
    );
    let mut s = within("admin connect", TcpStream::connect(admin))
        .await
        .expect("connect");
    let head = format!(
        "POST /drain HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"cou"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let start = Instant::now();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut out))
        .await
        .is_ok();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(closed, "still open after {took:?}: {text:?}");
    println!("answered and closed after {took:?}: {text:?}");
    assert_eq!(status_of(&text), 408, "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text:?}"
    );
    let status = Operator::new(admin, Some(TOKEN)).get_drain().await.json();
    assert_eq!(status["running"], json!(false), "{status}");
}

/// The summary lines of refused admin requests in a child's JSON stderr.
fn admin_summaries(text: &str) -> Vec<Value> {
    admin::json_lines(text)
        .into_iter()
        .filter(|e| {
            e.get("target") == Some(&json!("wsgate::admin"))
                && event_field(e, "message") == Some(&json!("admin refusals"))
        })
        .collect()
}

/// The sum of a count field over summary lines.
fn field_sum(lines: &[Value], field: &str) -> u64 {
    lines
        .iter()
        .filter_map(|l| event_field(l, field)?.as_u64())
        .sum()
}

/// SIGTERM, then the whole stderr once the exit flush has accounted for
/// `refused` admin refusals (or the deadline passed).
fn stop_and_read(mut gate: GateProcess, refused: u64) -> String {
    gate.signal("TERM");
    let status = tokio::task::block_in_place(|| gate.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", gate.stderr_text());
    let start = std::time::Instant::now();
    let mut text = gate.stderr_text();
    while field_sum(&admin_summaries(&text), "total") < refused && start.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(20));
        text = gate.stderr_text();
    }
    text
}

/// Lines of a JSON stderr at info or above that are not start-up or exit
/// lines: what the admin requests caused.
fn loud_lines(text: &str) -> Vec<Value> {
    admin::json_lines(text)
        .into_iter()
        .filter(|e| {
            matches!(
                e.get("level").and_then(Value::as_str),
                Some("INFO" | "WARN" | "ERROR")
            ) && e.get("target") != Some(&json!("wsgate::access"))
                && !event_field(e, "message")
                    .and_then(Value::as_str)
                    .is_some_and(|m| {
                        m.contains("listening")
                            || m.contains("shutdown")
                            || m.contains("accepting")
                            || m.contains("wsgate ")
                    })
        })
        .collect()
}

/// 200 admin requests without the right token (100 with none, 100 with a
/// wrong one): no line each, but one summary line (the exit flush here)
/// whose counts add up to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_refused_admin_requests_make_one_summary_line() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (gate, _proxy, admin) = tokio::task::block_in_place(|| {
        admin::start_json(up.addr, &[("WSGATE_ADMIN_TOKEN_FILE", token.env())])
    });
    let before = loud_lines(&gate.stderr_text()).len();
    for i in 0..200 {
        let op = Operator::new(admin, (i % 2 == 1).then_some("not-the-token"));
        assert_eq!(op.get_drain().await.status, 401);
    }
    let text = stop_and_read(gate, 200);
    let lines = admin_summaries(&text);
    for l in &lines {
        println!("{l}");
    }
    assert!(!lines.is_empty(), "no admin refusal summary:\n{text}");
    assert!(lines.len() <= 2, "{} summary lines", lines.len());
    assert_eq!(field_sum(&lines, "total"), 200);
    assert_eq!(field_sum(&lines, "no_token"), 100);
    assert_eq!(field_sum(&lines, "wrong_token"), 100);
    let loud = loud_lines(&text);
    assert!(
        loud.len() - before <= lines.len(),
        "lines besides the summaries: {loud:#?}"
    );
}

/// A token file that cannot be read any more (removed after start-up, which
/// refuses a missing one): one ERROR line naming it, not one per request;
/// every request is refused (401) and counted in the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_token_file_is_logged_once_not_per_request() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new(TOKEN);
    let (gate, _proxy, admin) = tokio::task::block_in_place(|| {
        admin::start_json(up.addr, &[("WSGATE_ADMIN_TOKEN_FILE", token.env())])
    });
    std::fs::remove_file(&token.path).expect("remove the token file");
    for _ in 0..200 {
        assert_eq!(
            Operator::new(admin, Some(TOKEN)).get_drain().await.status,
            401
        );
    }
    let text = stop_and_read(gate, 200);
    let errors: Vec<Value> = admin::json_lines(&text)
        .into_iter()
        .filter(|e| e.get("level") == Some(&json!("ERROR")))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let message = event_field(&errors[0], "message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(message.contains("unreadable"), "{message}");
    assert_eq!(
        field_sum(&admin_summaries(&text), "bad_token_file"),
        200,
        "{text}"
    );
}

/// A token file holding `abc`, a line break and `def` (or a NUL inside):
/// one ERROR line naming the problem, and the operator paths refuse every
/// token, as they do for any unusable file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_file_with_a_line_break_or_a_nul_is_named_once() {
    let up = spawn_echo_upstream().await;
    for (content, problem) in [(&b"abc\ndef\n"[..], "line break"), (b"abc\0def\n", "NUL")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, content).expect("write the token file");
        let (gate, _proxy, admin) = tokio::task::block_in_place(|| {
            admin::start_json(
                up.addr,
                &[("WSGATE_ADMIN_TOKEN_FILE", path.display().to_string())],
            )
        });
        for token in ["abc", "def", "abc def", "abcdef"] {
            for _ in 0..5 {
                let r = Operator::new(admin, Some(token)).get_drain().await;
                assert_eq!(r.status, 401, "{problem}, token {token:?}: {r:?}");
            }
        }
        let text = stop_and_read(gate, 20);
        let errors: Vec<Value> = admin::json_lines(&text)
            .into_iter()
            .filter(|e| {
                matches!(
                    e.get("level").and_then(Value::as_str),
                    Some("ERROR" | "WARN")
                )
            })
            .collect();
        assert_eq!(errors.len(), 1, "{problem}: {errors:#?}");
        let message = event_field(&errors[0], "message")
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(message.contains(problem), "{message}");
    }
}
