//! Leak-freedom under churn (issue 3): thousands of connections opened and
//! ended in every way (close frame, FIN, RST, upstream close, 503 over the
//! cap, 502 upstream down) with 50 at a time; afterwards every slot, every
//! descriptor and every task is back, and the RSS growth is reported.
//!
//! The soak is the same churn plus steady echo traffic for ten minutes, on
//! demand only:
//!
//! ```text
//! cargo test --release --test churn -- --ignored --nocapture
//! WSGATE_SOAK_SECS=120 WSGATE_SOAK_RATE=100 cargo test --release --test churn -- --ignored --nocapture
//! ```
//!
//! The idle keep-alive connections that plain HTTP leaves in the upstream
//! pool are closed after the pool's idle timeout (30 s, evicted on a 30 s
//! tick), so that check needs about a minute and is on demand too:
//! `cargo test --test churn plain_http -- --ignored --nocapture`.
//!
//! (`WSGATE_SOAK_SECS`, default 600; `WSGATE_SOAK_RATE`, connections per
//! second, default 100, kept modest so TIME_WAIT sockets cannot exhaust the
//! ephemeral ports). It prints a line of figures every 30 s. `cargo test`
//! rather than nextest, whose slow-timeout would end a 10-minute test.
#![allow(clippy::print_stdout, reason = "tests report their figures")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How one connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Echo, then a Close frame and the closing handshake.
    CloseFrame,
    /// Upgrade, then the client sends FIN and reads to EOF.
    Fin,
    /// Upgrade, then the client resets (SO_LINGER 0).
    Rst,
    /// The upstream closes right after the upgrade.
    UpstreamClose,
    /// Over the cap: 503.
    OverCap,
    /// Upstream down: 502.
    UpstreamDown,
}

const WAYS: [Way; 6] = [
    Way::CloseFrame,
    Way::Fin,
    Way::Rst,
    Way::UpstreamClose,
    Way::OverCap,
    Way::UpstreamDown,
];

/// Four sidecars in this process: echo (cap 200), one in front of an
/// upstream that closes at once, one with its single slot held (every
/// upgrade 503), one in front of a closed port (every upgrade 502).
struct Bench {
    echo: Sidecar,
    closing: Sidecar,
    full: Sidecar,
    down: Sidecar,
    _held: Ws,
    _upstreams: (Upstream, Upstream, Upstream, ClosedPort),
}

impl Bench {
    async fn start() -> Bench {
        let echo_up = spawn_echo_upstream().await;
        let closing_up = spawn_upstream(Behaviour::CloseAfterUpgrade).await;
        let full_up = spawn_echo_upstream().await;
        let echo = spawn_sidecar(RawConfigExt::cap(test_config(echo_up.addr), 200)).await;
        let closing = spawn_sidecar(test_config(closing_up.addr)).await;
        let full = spawn_sidecar(RawConfigExt::cap(test_config(full_up.addr), 1)).await;
        let down_up = closed_port();
        let down = spawn_sidecar(test_config(down_up.addr)).await;
        let held = within("hold the only slot", connect(&full.ws_url()))
            .await
            .expect("admitted");
        Bench {
            echo,
            closing,
            full,
            down,
            _held: held,
            _upstreams: (echo_up, closing_up, full_up, down_up),
        }
    }

    fn gates(&self) -> [&Sidecar; 4] {
        [&self.echo, &self.closing, &self.full, &self.down]
    }

    /// Waits until every gate's active count is at rest (the full gate
    /// keeps its held slot).
    async fn settle(&self) {
        for g in [&self.echo, &self.closing, &self.down] {
            wait_metric(g.admin, ACTIVE, 0.0).await;
        }
        wait_metric(self.full.admin, ACTIVE, 1.0).await;
    }

    /// One connection, ended the given way; an error says what went wrong.
    async fn one(&self, way: Way, n: usize) -> Result<(), String> {
        match way {
            Way::CloseFrame => {
                let mut ws = connect(&self.echo.ws_url())
                    .await
                    .map_err(|e| e.to_string())?;
                let text = format!("churn {n}");
                ws.send(Message::text(text.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                match ws.next().await {
                    Some(Ok(m)) if m == Message::text(text) => {}
                    other => return Err(format!("echo: {other:?}")),
                }
                ws.close(None).await.map_err(|e| e.to_string())?;
                while ws.next().await.is_some() {}
                Ok(())
            }
            Way::Fin => {
                let (mut s, head) = raw_upgrade(self.echo.addr).await;
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(head);
                }
                s.shutdown().await.map_err(|e| e.to_string())?;
                read_to_eof(&mut s).await;
                Ok(())
            }
            Way::Rst => {
                let (s, head) = raw_upgrade(self.echo.addr).await;
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(head);
                }
                set_reset_on_close(&s);
                drop(s);
                Ok(())
            }
            Way::UpstreamClose => {
                let mut ws = connect(&self.closing.ws_url())
                    .await
                    .map_err(|e| e.to_string())?;
                while ws.next().await.is_some() {}
                Ok(())
            }
            Way::OverCap | Way::UpstreamDown => {
                let (gate, want) = if way == Way::OverCap {
                    (&self.full, 503)
                } else {
                    (&self.down, 502)
                };
                match tokio_tungstenite::connect_async(gate.ws_url()).await {
                    Err(tokio_tungstenite::tungstenite::Error::Http(r))
                        if r.status().as_u16() == want =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(format!("wanted {want}, got {e}")),
                    Ok(_) => Err(format!("wanted {want}, got an upgrade")),
                }
            }
        }
    }
}

/// Figures at one moment.
#[derive(Debug, Clone, Copy)]
struct Figures {
    fds: usize,
    tasks: usize,
    rss_kib: u64,
}

fn figures() -> Figures {
    Figures {
        fds: open_fds(),
        tasks: alive_tasks(),
        rss_kib: ProcStat::own().rss_kib,
    }
}

/// Polls until descriptors and tasks are back to `base` (±2 descriptors,
/// tasks ≤ base), or fails after a deadline; returns the figures then.
async fn back_to(base: Figures) -> Figures {
    let start = Instant::now();
    loop {
        let now = figures();
        if now.fds <= base.fds + 2 && now.tasks <= base.tasks {
            return now;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "not back to baseline: {base:?} -> {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `workers` tasks that each take the next index until `stop` says so,
/// ending each connection the way `index % 6` picks; `pace` between ops.
/// Returns how many ended each way.
async fn churn(
    bench: &Arc<Bench>,
    workers: usize,
    stop: impl Fn(usize) -> bool + Send + Sync + 'static,
    pace: Duration,
) -> [usize; 6] {
    let next = Arc::new(AtomicUsize::new(0));
    let counts: Arc<[AtomicUsize; 6]> = Arc::new(Default::default());
    let stop = Arc::new(stop);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (bench, next, counts, stop) = (
                Arc::clone(bench),
                Arc::clone(&next),
                Arc::clone(&counts),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if stop(n) {
                        return;
                    }
                    let way = WAYS[n % WAYS.len()];
                    match tokio::time::timeout(DEADLINE, bench.one(way, n)).await {
                        Ok(Ok(())) => {
                            counts[n % WAYS.len()].fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Err(e)) => panic!("connection {n} ({way:?}): {e}"),
                        Err(_) => panic!("connection {n} ({way:?}) hung"),
                    }
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a churn worker failed");
    }
    std::array::from_fn(|i| counts[i].load(Ordering::SeqCst))
}

async fn report_metrics(bench: &Bench) {
    let echo = &bench.echo;
    let admitted = metric(echo.admin, "wsgate_connections_admitted_total").await;
    let lifetimes = metric(echo.admin, "wsgate_connection_duration_seconds_count").await;
    let rejected = metric(
        bench.full.admin,
        "wsgate_connections_rejected_total{reason=\"capacity\"}",
    )
    .await;
    let down = metric(
        bench.down.admin,
        "wsgate_upstream_errors_total{kind=\"connect\"}",
    )
    .await;
    println!(
        "metrics: echo gate admitted {admitted}, lifetimes recorded {lifetimes}; full gate 503s {rejected}; down gate 502s {down}"
    );
}

/// Every admitted connection ended (its lifetime recorded), is still held,
/// or failed at the upstream after taking its slot (the 502s).
async fn assert_accounted(bench: &Bench) {
    for g in bench.gates() {
        let lifetimes = metric(g.admin, "wsgate_connection_duration_seconds_count").await;
        let admitted = metric(g.admin, "wsgate_connections_admitted_total").await;
        let active = metric(g.admin, ACTIVE).await;
        let mut failed = 0.0;
        for kind in ["connect", "timeout", "refused_upgrade"] {
            failed += metric(
                g.admin,
                &format!("wsgate_upstream_errors_total{{kind=\"{kind}\"}}"),
            )
            .await;
        }
        assert_eq!(
            lifetimes + active + failed,
            admitted,
            "{}: lifetimes {lifetimes} + active {active} + upstream failures {failed} != admitted",
            g.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_thousand_connections_ended_every_way_leave_nothing_behind() {
    const TOTAL: usize = 6_000;
    const CONCURRENCY: usize = 50;
    let bench = Arc::new(Bench::start().await);
    // Warm-up: one of each way, so lazily created state (pools, timers,
    // worker threads) is in the baseline.
    for (i, way) in WAYS.iter().enumerate() {
        within("warm-up", bench.one(*way, i))
            .await
            .expect("warm-up");
    }
    bench.settle().await;
    let base = back_to(figures()).await;
    let start = Instant::now();

    let counts = churn(&bench, CONCURRENCY, |n| n >= TOTAL, Duration::ZERO).await;
    let took = start.elapsed();

    bench.settle().await;
    let after = back_to(base).await;
    let growth = after.rss_kib as i64 - base.rss_kib as i64;
    println!(
        "churn: {TOTAL} connections, {CONCURRENCY} at a time, in {took:.1?} ({:.0}/s)",
        TOTAL as f64 / took.as_secs_f64()
    );
    for (way, n) in WAYS.iter().zip(counts) {
        println!("  {n:>6} × {way:?}");
    }
    println!(
        "active: 0 on every gate (the full gate's held slot: 1); descriptors {} -> {}; tasks {} -> {}; RSS {} KiB -> {} KiB ({growth:+} KiB)",
        base.fds, after.fds, base.tasks, after.tasks, base.rss_kib, after.rss_kib
    );
    report_metrics(&bench).await;
    assert_eq!(counts.iter().sum::<usize>(), TOTAL);
    assert!(counts.iter().all(|n| *n == TOTAL / WAYS.len()));
    // Each echo-gate connection took a slot and recorded its lifetime; each
    // refusal was counted; nothing is still held.
    let per_way = (TOTAL / WAYS.len()) as f64;
    assert_eq!(
        metric(bench.echo.admin, "wsgate_connections_admitted_total").await,
        3.0 * per_way + 3.0
    );
    assert_eq!(
        metric(
            bench.full.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        per_way + 1.0
    );
    assert_eq!(
        metric(
            bench.down.admin,
            "wsgate_upstream_errors_total{kind=\"connect\"}"
        )
        .await,
        per_way + 1.0
    );
    assert_accounted(&bench).await;
    assert!(growth < 64 * 1024, "RSS grew by {growth} KiB");
}

/// Ten minutes (by default) of churn plus steady echo traffic; see the
/// module docs for the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "on demand: the soak, see the module docs"]
async fn soak_churn_and_traffic() {
    let secs: u64 = std::env::var("WSGATE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let rate: u64 = std::env::var("WSGATE_SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    const WORKERS: usize = 50;
    const TALKERS: usize = 16;
    let bench = Arc::new(Bench::start().await);
    for (i, way) in WAYS.iter().enumerate() {
        within("warm-up", bench.one(*way, i))
            .await
            .expect("warm-up");
    }
    bench.settle().await;
    let base = back_to(figures()).await;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);

    // Steady traffic: long-lived clients echoing messages of varied size.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let talkers: Vec<_> = (0..TALKERS)
        .map(|t| {
            let (url, stop, echoed) = (bench.echo.ws_url(), Arc::clone(&stop), Arc::clone(&echoed));
            tokio::spawn(async move {
                let mut ws = within("talker", connect(&url))
                    .await
                    .expect("talker admitted");
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let size = 1 + ((i * 7919 + t as u64 * 104_729) % 65_536) as usize;
                    let msg = Message::binary(vec![(i % 251) as u8; size]);
                    within("talker send", ws.send(msg.clone()))
                        .await
                        .expect("send");
                    let got = within("talker echo", ws.next())
                        .await
                        .expect("open")
                        .expect("msg");
                    assert_eq!(got, msg, "talker {t} message {i} came back changed");
                    echoed.fetch_add(size as u64, Ordering::SeqCst);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                close_cleanly(ws).await;
                i
            })
        })
        .collect();

    // Churn, paced to `rate` connections per second in all.
    let pace = Duration::from_secs_f64(WORKERS as f64 / rate as f64);
    let churner = {
        let bench = Arc::clone(&bench);
        tokio::spawn(
            async move { churn(&bench, WORKERS, move |_| Instant::now() >= end, pace).await },
        )
    };

    // A line of figures every 30 s.
    let mut samples = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(30).min(end - Instant::now())).await;
        let f = figures();
        let active = metric(bench.echo.admin, ACTIVE).await;
        let admitted = metric(bench.echo.admin, "wsgate_connections_admitted_total").await;
        println!(
            "soak t={:>4}s: echo gate active {active:>3}, admitted {admitted:>7}; fds {:>5}; tasks {:>5}; RSS {:>7} KiB; echoed {} MiB",
            start.elapsed().as_secs(),
            f.fds,
            f.tasks,
            f.rss_kib,
            echoed.load(Ordering::SeqCst) >> 20
        );
        assert!(active <= 200.0, "active {active} over the cap");
        samples.push(f);
    }
    let counts = within("churn to finish", churner).await.expect("churn");
    stop.store(true, Ordering::SeqCst);
    let mut messages = 0;
    for t in talkers {
        messages += within("talker to finish", t).await.expect("talker");
    }
    bench.settle().await;
    let after = back_to(base).await;
    let total: usize = counts.iter().sum();
    println!(
        "soak: {secs}s, {total} connections churned ({:.0}/s), {TALKERS} talkers echoed {messages} messages ({} MiB), nothing lost",
        total as f64 / secs as f64,
        echoed.load(Ordering::SeqCst) >> 20
    );
    for (way, n) in WAYS.iter().zip(counts) {
        println!("  {n:>7} × {way:?}");
    }
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    println!(
        "before/after: active 0/0; descriptors {} -> {}; tasks {} -> {}; RSS {} KiB -> {} KiB (max during {} KiB)",
        base.fds, after.fds, base.tasks, after.tasks, base.rss_kib, after.rss_kib, max_rss
    );
    report_metrics(&bench).await;
    assert_accounted(&bench).await;
}

/// A burst of plain HTTP requests leaves keep-alive connections to the
/// upstream in the pool (one per request that ran concurrently), each a
/// descriptor and a task. They must not stay forever: after the pool's idle
/// timeout (30 s, checked every 30 s) descriptors and tasks are back at the
/// baseline, even against an upstream that never closes idle connections
/// itself. On demand (about a minute), see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "on demand: waits out the upstream pool's idle timeout"]
async fn plain_http_keep_alive_connections_to_the_upstream_are_closed_when_idle() {
    const BURST: usize = 50;
    let up = spawn_counting_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    // The gate is up (its admin answers) and its tasks have settled.
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    let mut base = figures();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = figures();
        if (now.fds, now.tasks) == (base.fds, base.tasks) {
            break;
        }
        base = now;
    }
    let requests: Vec<_> = (0..BURST)
        .map(|i| {
            let addr = gate.addr;
            tokio::spawn(async move { http_get(addr, &format!("/burst/{i}")).await })
        })
        .collect();
    for r in requests {
        assert_eq!(within("plain request", r).await.expect("join").0, 200);
    }
    assert_eq!(up.count(), BURST);
    let pooled = figures();
    println!(
        "after {BURST} concurrent plain requests: descriptors {} -> {}, tasks {} -> {} (idle pooled upstream connections)",
        base.fds, pooled.fds, base.tasks, pooled.tasks
    );
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        let now = figures();
        if now.fds <= base.fds + 2 && now.tasks <= base.tasks {
            println!(
                "back to baseline after {:.0?}: descriptors {}, tasks {}",
                start.elapsed(),
                now.fds,
                now.tasks
            );
            break;
        }
        assert!(
            start.elapsed() < limit,
            "idle upstream connections never closed: {base:?} -> {now:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
