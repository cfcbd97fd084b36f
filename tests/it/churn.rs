//! Leak-freedom under churn (issue 3): thousands of connections opened and
//! ended in every way (close frame, FIN, RST, upstream close, 503 over the
//! cap, 502 upstream down) with 50 at a time; afterwards every slot, every
//! descriptor and every task is back, and the RSS growth is reported.
//!
//! The soak is the same churn, unpaced, to a million connections (by
//! default) with light steady echo traffic beside it, on demand only: the
//! reliability gate of a reshaping (issue 10), run before and after.
//!
//! ```text
//! cargo test --release --test it churn::soak -- --ignored --nocapture
//! WSGATE_SOAK_CONNECTIONS=100000 cargo test --release --test it churn::soak -- --ignored --nocapture
//! ```
//!
//! The soak ends connections two more ways than the churn test: by
//! `idle_timeout` (wsgate's Close frame, answered) and by
//! `upstream_connect_timeout` (504 from an upstream that never answers).
//!
//! Settings (environment): `WSGATE_SOAK_CONNECTIONS`, how many to open and
//! end, default 1,000,000, evenly over the eight ways; `WSGATE_SOAK_WORKERS`,
//! how many at a time, default 64; `WSGATE_SOAK_RATE`, a cap in connections
//! per second, default none. It prints a line of figures every 30 s and at
//! the end the connections by way, the wall time, and descriptors, tasks and
//! RSS of the process (which hosts the gates, upstreams and clients) at the
//! start and the end, with the largest RSS seen during. `cargo test` rather
//! than nextest, whose slow-timeout would end a long test.
//!
//! Ephemeral ports: each connection uses one on the client side and (when
//! it reaches the upstream) one on wsgate's side, left in TIME_WAIT for a
//! minute by whichever closes first; at a thousand connections a second that
//! is more than the port range holds unless the kernel may reuse them
//! (`net.ipv4.tcp_tw_reuse` = 1, or 2 = loopback only, the default). The
//! soak checks that setting before it starts.
//!
//! The idle keep-alive connections that plain HTTP leaves in the upstream
//! pool are closed after the pool's idle timeout (30 s, evicted on a 30 s
//! tick), so that check needs about a minute and is on demand too:
//! `cargo test --test it churn::plain_http -- --ignored --nocapture`.
#![allow(clippy::print_stdout, reason = "tests report their figures")]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
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
    /// Upgrade, then the client stays quiet until wsgate's `idle_timeout`
    /// Close frame, which it answers (the soak only).
    IdleTimeout,
    /// The upstream accepts TCP and never answers: 504 at
    /// `upstream_connect_timeout` (the soak only).
    UpstreamTimeout,
}

/// The ways of the soak: those of the churn test ([`WAYS`]) and the two
/// timeouts.
const SOAK_WAYS: [Way; 8] = [
    Way::CloseFrame,
    Way::Fin,
    Way::Rst,
    Way::UpstreamClose,
    Way::OverCap,
    Way::UpstreamDown,
    Way::IdleTimeout,
    Way::UpstreamTimeout,
];

/// The ways of the CI churn test: the soak's but the timeouts.
const WAYS: &[Way] = SOAK_WAYS.split_at(6).0;

/// `idle_timeout` of the idle gate and `upstream_connect_timeout` of the
/// slow gate: short, so that the timeout ways cost the soak little time.
const SHORT: Duration = Duration::from_millis(50);

/// Six sidecars in this process: echo (cap 200), one in front of an
/// upstream that closes at once, one with its single slot held (every
/// upgrade 503), one in front of a closed port (every upgrade 502), one
/// that closes idle tunnels after [`SHORT`], one in front of a silent
/// upstream (every upgrade 504 after [`SHORT`]).
struct Bench {
    echo: Sidecar,
    closing: Sidecar,
    full: Sidecar,
    down: Sidecar,
    idle: Sidecar,
    slow: Sidecar,
    _held: Ws,
    _upstreams: (Upstream, Upstream, Upstream, ClosedPort, Upstream),
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
        let idle = spawn_sidecar(wsgate::config::RawConfig {
            idle_timeout: wsgate::config::ConfigDuration(SHORT),
            ..RawConfigExt::cap(test_config(echo_up.addr), 200)
        })
        .await;
        let silent_up = spawn_upstream(Behaviour::Silent).await;
        let slow = spawn_sidecar(wsgate::config::RawConfig {
            upstream_connect_timeout: wsgate::config::ConfigDuration(SHORT),
            ..RawConfigExt::cap(test_config(silent_up.addr), 200)
        })
        .await;
        let held = within("hold the only slot", connect(&full.ws_url()))
            .await
            .expect("admitted");
        Bench {
            echo,
            closing,
            full,
            down,
            idle,
            slow,
            _held: held,
            _upstreams: (echo_up, closing_up, full_up, down_up, silent_up),
        }
    }

    /// Starts the gates, ends one connection each of `ways`, so that lazily
    /// created state (pools, timers, worker threads) is in the baseline,
    /// and waits for rest; returns the bench and the figures then.
    async fn warmed(ways: &[Way]) -> (Arc<Bench>, Figures) {
        let bench = Arc::new(Bench::start().await);
        for (i, way) in ways.iter().enumerate() {
            within("one of each way", bench.one(*way, i))
                .await
                .expect("one of each way");
        }
        bench.settle().await;
        let at_rest = back_to(figures()).await;
        (bench, at_rest)
    }

    fn gates(&self) -> [&Sidecar; 6] {
        [
            &self.echo,
            &self.closing,
            &self.full,
            &self.down,
            &self.idle,
            &self.slow,
        ]
    }

    /// Waits until every gate's active count is at rest (the full gate
    /// keeps its held slot).
    async fn settle(&self) {
        for g in [
            &self.echo,
            &self.closing,
            &self.down,
            &self.idle,
            &self.slow,
        ] {
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
            Way::IdleTimeout => {
                let mut ws = connect(&self.idle.ws_url())
                    .await
                    .map_err(|e| e.to_string())?;
                match ws.next().await {
                    Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1001 => {}
                    other => return Err(format!("wanted the idle Close frame, got {other:?}")),
                }
                // tungstenite has queued the Close reply; flushing it is
                // part of reading on to the end.
                while ws.next().await.is_some() {}
                Ok(())
            }
            Way::OverCap | Way::UpstreamDown | Way::UpstreamTimeout => {
                let (gate, want) = match way {
                    Way::OverCap => (&self.full, 503),
                    Way::UpstreamDown => (&self.down, 502),
                    _ => (&self.slow, 504),
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

/// How many connections ended each way so far (indexed like the ways).
type Ended = Arc<Vec<AtomicUsize>>;

fn ended(ways: &[Way]) -> Ended {
    Arc::new(ways.iter().map(|_| AtomicUsize::new(0)).collect())
}

/// Runs `workers` tasks that each take the next index until `stop` says so,
/// ending each connection the way `ways[index % ways.len()]`; `pace`
/// between ops. Counts each ended connection in `counts` (as [`ended`]
/// makes it for `ways`); returns them at the end.
async fn churn(
    bench: &Arc<Bench>,
    ways: &'static [Way],
    workers: usize,
    stop: impl Fn(usize) -> bool + Send + Sync + 'static,
    pace: Duration,
    counts: Ended,
) -> Vec<usize> {
    let next = Arc::new(AtomicUsize::new(0));
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
                    let way = ways[n % ways.len()];
                    match tokio::time::timeout(DEADLINE, bench.one(way, n)).await {
                        Ok(Ok(())) => {
                            counts[n % ways.len()].fetch_add(1, Ordering::SeqCst);
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
    counts.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

async fn report_metrics(bench: &Bench) {
    let mut line = "metrics:".to_owned();
    for (gate, what, series) in [
        (
            &bench.echo,
            "echo gate admitted",
            "wsgate_connections_admitted_total",
        ),
        (
            &bench.echo,
            "lifetimes recorded",
            "wsgate_connection_duration_seconds_count",
        ),
        (
            &bench.full,
            "full gate 503s",
            "wsgate_connections_rejected_total{reason=\"capacity\"}",
        ),
        (
            &bench.down,
            "down gate 502s",
            "wsgate_upstream_errors_total{kind=\"connect\"}",
        ),
        (
            &bench.idle,
            "idle gate idle Close frames",
            "wsgate_close_frames_sent_total{reason=\"idle\"}",
        ),
        (
            &bench.slow,
            "slow gate 504s",
            "wsgate_upstream_errors_total{kind=\"timeout\"}",
        ),
    ] {
        line.push_str(&format!(" {what} {};", metric(gate.admin, series).await));
    }
    println!("{}", line.trim_end_matches(';'));
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
    let (bench, base) = Bench::warmed(WAYS).await;
    let start = Instant::now();

    let counts = churn(
        &bench,
        WAYS,
        CONCURRENCY,
        |n| n >= TOTAL,
        Duration::ZERO,
        ended(WAYS),
    )
    .await;
    let took = start.elapsed();

    bench.settle().await;
    let after = back_to(base).await;
    let growth = after.rss_kib as i64 - base.rss_kib as i64;
    println!(
        "churn: {TOTAL} connections, {CONCURRENCY} at a time, in {took:.1?} ({:.0}/s)",
        TOTAL as f64 / took.as_secs_f64()
    );
    for (way, n) in WAYS.iter().zip(&counts) {
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

/// A setting of the soak from the environment, or its default.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a whole number"))
        })
        .unwrap_or(default)
}

/// Steady traffic beside the churn: `n` long-lived clients, each echoing a
/// message of varied size (up to 4 KiB) every 50 ms until `stop`, checking
/// every echo; each returns how many it echoed.
fn talkers(
    url: &str,
    n: usize,
    stop: &Arc<AtomicBool>,
    echoed: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|t| {
            let (url, stop, echoed) = (url.to_owned(), Arc::clone(stop), Arc::clone(echoed));
            tokio::spawn(async move {
                let mut ws = within("talker", connect(&url))
                    .await
                    .expect("talker admitted");
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let size = 1 + ((i * 7919 + t as u64 * 104_729) % 4096) as usize;
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
                    tokio::time::sleep(Duration::from_millis(50)).await; // the traffic's pace
                }
                close_cleanly(ws).await;
                i
            })
        })
        .collect()
}

/// A million connections (by default) ended every way, unpaced, beside
/// steady echo traffic; see the module docs for the command and settings.
///
/// The start figures are taken after a warm-up churn (1% of the run, at
/// least a thousand connections, every way) so that what grows once to a
/// working size (allocator arenas, per-thread buffer pools, the runtime's
/// worker state) is in them; the figures before the warm-up are printed
/// too. At the end descriptors and tasks must be back at the start's; the
/// RSS at the start and the end and the largest seen during (sampled every
/// second) are reported, and the end's may not exceed the start's by more
/// than 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "on demand: the soak, see the module docs"]
async fn soak_churn_and_traffic() {
    const TALKERS: usize = 4;
    let total = setting("WSGATE_SOAK_CONNECTIONS", 1_000_000) as usize;
    let workers = setting("WSGATE_SOAK_WORKERS", 64) as usize;
    let rate = setting("WSGATE_SOAK_RATE", 0);
    let warm_up = (total / 100).max(1000);
    // The whole run is bounded too: far above the expected time (about
    // 0.2 ms a connection on two cores), never forever.
    let limit = Duration::from_secs(600 + total as u64 / 100);
    let tw_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap_or_default();
    assert!(
        matches!(tw_reuse.trim(), "1" | "2"),
        "net.ipv4.tcp_tw_reuse is {:?}: TIME_WAIT would exhaust the ephemeral ports (see the module docs)",
        tw_reuse.trim()
    );
    let (bench, cold) = Bench::warmed(&SOAK_WAYS).await;
    let warm_up_counts = churn(
        &bench,
        &SOAK_WAYS,
        workers,
        move |n| n >= warm_up,
        Duration::ZERO,
        ended(&SOAK_WAYS),
    )
    .await;
    assert_eq!(warm_up_counts.iter().sum::<usize>(), warm_up);
    bench.settle().await;
    // Settled: the warm-up's connections are gone (nothing beyond the cold
    // figures may remain), and this is the start.
    let base = back_to(cold).await;
    println!(
        "soak: {total} connections, {workers} at a time, {}; before a warm-up of {warm_up}: descriptors {}, tasks {}, RSS {} KiB; start: descriptors {}, tasks {}, RSS {} KiB",
        if rate == 0 {
            "unpaced".to_owned()
        } else {
            format!("at most {rate}/s")
        },
        cold.fds,
        cold.tasks,
        cold.rss_kib,
        base.fds,
        base.tasks,
        base.rss_kib
    );
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let talkers = talkers(&bench.echo.ws_url(), TALKERS, &stop, &echoed);
    let pace = if rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(workers as f64 / rate as f64)
    };
    let progress = ended(&SOAK_WAYS);
    let mut churner = {
        let (bench, progress) = (Arc::clone(&bench), Arc::clone(&progress));
        tokio::spawn(async move {
            churn(
                &bench,
                &SOAK_WAYS,
                workers,
                move |n| n >= total,
                pace,
                progress,
            )
            .await
        })
    };

    // Sample every second (for the largest RSS), print every 30 s, until the
    // churn is done or the run's limit has passed.
    let mut max_rss = base.rss_kib;
    let mut last_print = Instant::now();
    let counts = loop {
        tokio::select! {
            joined = &mut churner => break joined.expect("churn"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let f = figures();
        max_rss = max_rss.max(f.rss_kib);
        assert!(
            start.elapsed() < limit,
            "the soak is still running after {limit:?}"
        );
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            let active = metric(bench.echo.admin, ACTIVE).await;
            let n: usize = progress.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            println!(
                "soak t={:>4}s: {n:>7} connections ({:.0}/s); echo gate active {active:>3}; fds {:>5}; tasks {:>5}; RSS {:>7} KiB; echoed {} MiB",
                start.elapsed().as_secs(),
                n as f64 / start.elapsed().as_secs_f64(),
                f.fds,
                f.tasks,
                f.rss_kib,
                echoed.load(Ordering::SeqCst) >> 20
            );
            assert!(active <= 200.0, "active {active} over the cap");
        }
    };
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut messages = 0;
    for t in talkers {
        messages += within("talker to finish", t).await.expect("talker");
    }
    bench.settle().await;
    let after = back_to(base).await;
    max_rss = max_rss.max(after.rss_kib);
    let all: usize = counts.iter().sum();
    println!(
        "soak: {all} connections ended in {:.0} s ({:.0}/s), {workers} at a time; {TALKERS} talkers echoed {messages} messages ({} MiB) beside them, each intact",
        took.as_secs_f64(),
        all as f64 / took.as_secs_f64(),
        echoed.load(Ordering::SeqCst) >> 20
    );
    for (way, n) in SOAK_WAYS.iter().zip(&counts) {
        println!("  {n:>7} × {way:?}");
    }
    let growth = after.rss_kib as i64 - base.rss_kib as i64;
    println!(
        "start -> end: active 0 -> 0 on every gate (the full gate's held slot: 1); descriptors {} -> {}; tasks {} -> {}; RSS {} KiB -> {} KiB ({growth:+} KiB), largest during {} KiB",
        base.fds, after.fds, base.tasks, after.tasks, base.rss_kib, after.rss_kib, max_rss
    );
    report_metrics(&bench).await;
    assert_eq!(all, total);
    assert!(
        counts
            .iter()
            .all(|n| n.abs_diff(total / SOAK_WAYS.len()) <= 1),
        "every way about as often: {counts:?}"
    );
    assert_accounted(&bench).await;
    assert!(growth < 16 * 1024, "RSS grew by {growth} KiB");
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
    let settling = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await; // the sampling interval
        let now = figures();
        if (now.fds, now.tasks) == (base.fds, base.tasks) {
            break;
        }
        assert!(
            settling.elapsed() < DEADLINE,
            "descriptors and tasks never settled: {base:?} -> {now:?}"
        );
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
