//! Refusals a browser can see (docs/behaviour.md#refusals-a-browser-can-see): with
//! `refusal_mode = "close"`, an upgrade refused for load gets wsgate's own
//! 101 and Close 1013 `retry after N s`, never reaches the upstream, holds
//! no slot and is not a session; other refusals stay HTTP; past
//! `max_close_refusals` the refusal is the HTTP status again; each lasts at
//! most `close_timeout`. Real clients (tokio-tungstenite) and raw sockets
//! for exact timings, and a storm of 10,000 against the binary.
#![allow(clippy::print_stdout, reason = "the storm reports its figures")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::{ConfigDuration, RawConfig};

use crate::support::admin::{event_field, json_lines, start_json};
use crate::support::*;

fn secs(s: f64) -> ConfigDuration {
    ConfigDuration(Duration::from_secs_f64(s))
}

/// Close mode, cap 1.
fn close_mode(upstream: SocketAddr) -> RawConfig {
    RawConfig {
        refusal_mode: "close".into(),
        ..test_config(upstream)
    }
    .cap(1)
}

/// The `N` of a `retry after N s` reason; fails on any other text.
fn retry_after_of(reason: &str) -> u64 {
    reason
        .strip_prefix("retry after ")
        .and_then(|r| r.strip_suffix(" s"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("reason {reason:?} is not `retry after N s`"))
}

/// The sum of every series of the metric `name` in a scrape.
fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            rest.rsplit_once(' ')?.1.trim().parse::<f64>().ok()
        })
        .sum()
}

/// A WebSocket upgrade on a new raw socket with `extra` header lines; the
/// socket and the answer's head.
async fn raw_upgrade_with(addr: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = upgrade_request(addr);
    let request = format!("{}\r\n{extra}\r\n\r\n", request.trim_end_matches("\r\n"));
    s.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut s).await;
    (s, head)
}

/// What a raw client read after wsgate's own 101: a Close 1013 frame,
/// unmasked, with `retry after N s`; returns N.
async fn read_1013(s: &mut TcpStream) -> u64 {
    let (b0, masked, payload) = read_frame(s).await;
    assert_eq!(b0, 0x88, "a final Close frame");
    assert!(!masked, "frames to a client are not masked");
    assert!(payload.len() >= 2, "{payload:?}");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1013);
    retry_after_of(std::str::from_utf8(&payload[2..]).expect("a UTF-8 reason"))
}

/// A client's Close reply, masked as clients must.
fn close_reply() -> Vec<u8> {
    client_frame(0x8, true, &1013u16.to_be_bytes())
}

/// Reads to the end: `Ok(())` for a clean EOF, the error for a reset.
async fn read_clean_eof(s: &mut TcpStream, limit: Duration) -> std::io::Result<()> {
    let mut buf = [0u8; 512];
    tokio::time::timeout(limit, async {
        match s.read(&mut buf).await {
            Ok(0) => Ok(()),
            Ok(n) => panic!("{n} more bytes after the Close: {:?}", &buf[..n]),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("wsgate closed the connection in time")
}

/// A capacity refusal seen by tokio-tungstenite: the handshake completes
/// (wsgate's 101, with the accept value tungstenite checks, no subprotocol
/// and no extension), then Close 1013 with `retry after N s`, N in
/// [`retry_after`, 2 × `retry_after`] and not always the same; the
/// upstream never hears of it, the slot stays the held client's, and no
/// session is counted.
#[tokio::test]
async fn a_capacity_refusal_is_a_101_then_close_1013_with_a_jittered_retry_after() {
    const REFUSALS: usize = 20;
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        retry_after: secs(3.0),
        ..close_mode(up.addr)
    })
    .await;
    let mut held = within("connect", connect(&gate.ws_url()))
        .await
        .expect("the one slot");
    echo_text(&mut held, "holding the slot").await;

    let mut seen = Vec::new();
    for _ in 0..REFUSALS {
        let (mut ws, resp) = within(
            "close-mode refusal",
            tokio_tungstenite::connect_async(gate.ws_url()),
        )
        .await
        .expect("wsgate's own 101");
        assert_eq!(resp.status(), 101);
        assert!(resp.headers().get("sec-websocket-protocol").is_none());
        assert!(resp.headers().get("sec-websocket-extensions").is_none());
        match within("the Close", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1013, "{f:?}");
                seen.push(retry_after_of(&f.reason));
            }
            other => panic!("expected Close 1013, got {other:?}"),
        }
        // tungstenite answers the Close; wsgate then ends the connection.
        within("the end", async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
    assert!(
        seen.iter().all(|n| (3..=6).contains(n)),
        "N outside [3, 6]: {seen:?}"
    );
    assert!(
        seen.iter().any(|n| *n != seen[0]),
        "the same N every time: {seen:?}"
    );

    echo_text(&mut held, "the held session is untouched").await;
    let text = scrape(gate.admin).await;
    assert_eq!(
        metric_value(
            &text,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        ),
        Some(REFUSALS as f64)
    );
    assert_eq!(metric_value(&text, ACTIVE), Some(1.0));
    assert_eq!(
        metric_value(&text, "wsgate_connections_admitted_total"),
        Some(1.0)
    );
    assert_eq!(
        sum_of(&text, "wsgate_sessions_ended_total"),
        0.0,
        "a refusal is not a session"
    );
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        1,
        "only the held client reached the upstream"
    );
}

/// While draining, an upgrade whose head was on its way when draining
/// began (the listener is closed by then) is refused `draining`: in close
/// mode with 1013 too.
#[tokio::test]
async fn a_draining_refusal_is_close_1013_too() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        refusal_mode: "close".into(),
        shutdown_grace: secs(10.0),
        ..test_config(up.addr)
    })
    .await;
    // Half a head before the signal: a connection that has sent nothing
    // is closed at once when draining starts, one with a request under way
    // is let finish it. The session opened after it keeps the process up
    // and, accepted after it, shows it was accepted before the listener
    // closed.
    let request = upgrade_request(gate.addr);
    let (first, rest) = request.split_at(request.len() / 2);
    let mut early = within("connect", TcpStream::connect(gate.addr))
        .await
        .expect("connect");
    early.write_all(first.as_bytes()).await.expect("write");
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    echo_text(&mut ws, "admitted before the signal").await;
    gate.signal();
    within("the listener closes", async {
        while TcpStream::connect(gate.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    early.write_all(rest.as_bytes()).await.expect("write");
    let head = read_head(&mut early).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let n = read_1013(&mut early).await;
    assert!((1..=2).contains(&n), "retry_after 1 s: N = {n}");
    early.write_all(&close_reply()).await.expect("reply");
    read_clean_eof(&mut early, DEADLINE)
        .await
        .expect("a clean close");
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"draining\"}"
        )
        .await,
        1.0
    );
    close_cleanly(ws).await;
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
}

/// Refusals that retrying cannot cure stay HTTP in close mode: a
/// forbidden origin (403) and no acceptable subprotocol (400), even with
/// the cap full; an allowed one over the cap is the 101 and its Close.
#[tokio::test]
async fn refusals_not_for_load_stay_http_answers() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        allowed_origins: vec!["https://app.example".into()],
        subprotocols: vec!["chat".into()],
        require_subprotocol: true,
        ..close_mode(up.addr)
    })
    .await;
    let _held = match within(
        "the held client",
        upgrade_outcome(&gate.ws_url(), &[("Sec-WebSocket-Protocol", "chat")]),
    )
    .await
    {
        Upgrade::Admitted(ws) => ws,
        other => panic!("the held client: {other:?}"),
    };

    let (_s, head) = raw_upgrade_with(
        gate.addr,
        "Origin: https://evil.example\r\nSec-WebSocket-Protocol: chat",
    )
    .await;
    assert_eq!(status_of(&head), 403, "{head}");
    let (_s, head) = raw_upgrade_with(
        gate.addr,
        "Origin: https://app.example\r\nSec-WebSocket-Protocol: other",
    )
    .await;
    assert_eq!(status_of(&head), 400, "{head}");
    let (mut s, head) = raw_upgrade_with(
        gate.addr,
        "Origin: https://app.example\r\nSec-WebSocket-Protocol: chat",
    )
    .await;
    assert_eq!(status_of(&head), 101, "over the cap: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: chat\r\n"),
        "the client's own offer selected, or a browser fails the handshake: {head}"
    );
    read_1013(&mut s).await;

    let text = scrape(gate.admin).await;
    for (reason, n) in [("origin", 1.0), ("subprotocol", 1.0), ("capacity", 1.0)] {
        assert_eq!(
            metric_value(
                &text,
                &format!("wsgate_connections_rejected_total{{reason=\"{reason}\"}}")
            ),
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

/// The 101 of a close-mode refusal selects the first name the upstream
/// would have been offered: after `subprotocols`, and never the JWT entry
/// of `jwt_from = "subprotocol"` (browsers fail a 101 that selects none of
/// their offers, and must never see their token selected).
#[tokio::test]
async fn a_close_refusal_selects_one_of_the_clients_offers_never_the_token() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        jwt_from: "subprotocol".into(),
        subprotocols: vec!["chat".into(), "superchat".into()],
        ..close_mode(up.addr)
    })
    .await;
    let _held = match within("the held client", upgrade_outcome(&gate.ws_url(), &[])).await {
        Upgrade::Admitted(ws) => ws,
        other => panic!("the held client: {other:?}"),
    };
    for (offer, selected) in [
        ("other, superchat, chat", Some("superchat")),
        (
            "base64url.bearer.authorization.k8s.io.e30.e30.x, chat",
            Some("chat"),
        ),
        ("other", None),
    ] {
        let (mut s, head) =
            raw_upgrade_with(gate.addr, &format!("Sec-WebSocket-Protocol: {offer}")).await;
        assert_eq!(status_of(&head), 101, "{offer}: {head}");
        let got = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-protocol")
                .then(|| v.trim().to_owned())
        });
        assert_eq!(got.as_deref(), selected, "{offer}: {head}");
        read_1013(&mut s).await;
    }
}

/// `max_close_refusals = 2` and clients that never answer the Close: the
/// third refusal is the 503; at `close_timeout` wsgate closes the first
/// two (they read EOF), and the next refusal is a 101 again.
#[tokio::test]
async fn past_max_close_refusals_the_refusal_is_its_status_until_places_free() {
    let up = spawn_echo_upstream().await;
    let close_timeout = Duration::from_secs(1);
    let gate = spawn_sidecar(RawConfig {
        max_close_refusals: 2,
        close_timeout: ConfigDuration(close_timeout),
        ..close_mode(up.addr)
    })
    .await;
    let _held = within("connect", connect(&gate.ws_url()))
        .await
        .expect("the one slot");

    let started = Instant::now();
    let (mut a, head_a) = raw_upgrade(gate.addr).await;
    let (mut b, head_b) = raw_upgrade(gate.addr).await;
    assert_eq!((status_of(&head_a), status_of(&head_b)), (101, 101));
    let (mut c, head_c) = raw_upgrade(gate.addr).await;
    assert_eq!(
        status_of(&head_c),
        503,
        "the third is over the cap: {head_c}"
    );
    assert!(
        head_c.to_ascii_lowercase().contains("retry-after: 1"),
        "{head_c}"
    );
    assert!(closed_within(&mut c, DEADLINE).await);

    // They read nothing until now: the Close is waiting, then the end.
    for s in [&mut a, &mut b] {
        read_1013(s).await;
        read_clean_eof(s, DEADLINE)
            .await
            .expect("closed by wsgate, not reset");
    }
    let took = started.elapsed();
    assert!(
        took >= close_timeout.mul_f64(0.9) && took < close_timeout + RELEASE_BOUND,
        "closed after {took:?}, close_timeout {close_timeout:?}"
    );
    let (mut d, head_d) = raw_upgrade(gate.addr).await;
    assert_eq!(status_of(&head_d), 101, "a place is free again: {head_d}");
    read_1013(&mut d).await;
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        4.0
    );
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

/// A client that sends data (skipped unread, whatever its size) and then
/// answers the Close is closed right after its reply, cleanly, long before
/// `close_timeout`.
#[tokio::test]
async fn a_client_that_answers_is_closed_right_after_its_reply() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        close_timeout: secs(10.0),
        ..close_mode(up.addr)
    })
    .await;
    let _held = within("connect", connect(&gate.ws_url()))
        .await
        .expect("the one slot");
    let (mut s, head) = raw_upgrade(gate.addr).await;
    assert_eq!(status_of(&head), 101, "{head}");
    read_1013(&mut s).await;
    let mut reply = client_frame(0x1, true, b"sent before reading the Close");
    reply.extend(client_frame(0x2, true, &[0x5a; 70_000]));
    reply.extend(client_frame(0x9, true, b"ping"));
    reply.extend(close_reply());
    let replied = Instant::now();
    s.write_all(&reply).await.expect("reply");
    read_clean_eof(&mut s, DEADLINE)
        .await
        .expect("closed by wsgate, not reset");
    let took = replied.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "closed {took:?} after the reply"
    );
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to at least `n`.
fn raise_nofile(n: u64) {
    let got = rlimit::increase_nofile_limit(n).expect("raise RLIMIT_NOFILE");
    assert!(got >= n, "RLIMIT_NOFILE is {got}, this test needs {n}");
}

/// What one client of the storm saw.
#[derive(Debug)]
enum Seen {
    /// 101, then Close 1013 with this N.
    Closed(u64),
    /// The HTTP refusal.
    Status503,
    /// Anything else.
    Other(String),
}

/// What the storm's clients share.
struct Storm {
    proxy: SocketAddr,
    /// Close-mode refusals open as the clients can prove it: from their
    /// 101 until they answer or hang up (wsgate's place is taken before the
    /// 101 and given back after that), so never more than wsgate holds.
    open: AtomicUsize,
    peak: AtomicUsize,
    /// Set at the first 503: until then the 101s are held, so the cap
    /// is reached whatever the machine's speed.
    saw_503: AtomicBool,
}

/// One client: the upgrade, then for a 101 the Close, and one of three
/// ends: a Close reply (most), FIN without a reply, or nothing at all
/// (wsgate's `close_timeout` ends those).
async fn storm_client(storm: &Storm, k: usize) -> Seen {
    let Ok(mut s) = TcpStream::connect(storm.proxy).await else {
        return Seen::Other("connect failed".into());
    };
    if s.write_all(upgrade_request(storm.proxy).as_bytes())
        .await
        .is_err()
    {
        return Seen::Other("write failed".into());
    }
    let head = read_head_unbounded(&mut s).await;
    match status_of(&head) {
        503 if head.to_ascii_lowercase().contains("retry-after:") => {
            storm.saw_503.store(true, Ordering::SeqCst);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            return Seen::Status503;
        }
        101 => {}
        _ => return Seen::Other(head),
    }
    let silent = k.is_multiple_of(20);
    if !silent {
        let now = storm.open.fetch_add(1, Ordering::SeqCst) + 1;
        storm.peak.fetch_max(now, Ordering::SeqCst);
    }
    let (b0, _, payload) = read_frame(&mut s).await;
    let n = match (
        b0,
        payload.get(..2),
        std::str::from_utf8(payload.get(2..).unwrap_or(&[])),
    ) {
        (0x88, Some(&[0x03, 0xf5]), Ok(reason)) => retry_after_of(reason),
        _ => return Seen::Other(format!("not Close 1013: {b0:#x} {payload:?}")),
    };
    if !silent {
        // Held until a 503 shows the places are full, but well within
        // `close_timeout` (3 s) even on a loaded machine: past it wsgate
        // closes first, and the reply below would meet a closed socket (a
        // reset, not what is tested here).
        let hold_start = Instant::now();
        while !storm.saw_503.load(Ordering::SeqCst)
            && hold_start.elapsed() < Duration::from_millis(700)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis((k % 7) as u64 * 10)).await;
        storm.open.fetch_sub(1, Ordering::SeqCst);
        let end = if k % 20 == 1 {
            s.shutdown().await
        } else {
            s.write_all(&close_reply()).await
        };
        if let Err(e) = end {
            return Seen::Other(format!("the end failed: {e}"));
        }
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest).await {
        Ok(_) if rest.is_empty() => Seen::Closed(n),
        Ok(_) => Seen::Other(format!("bytes after the Close: {rest:?}")),
        Err(e) => Seen::Other(format!("not a clean end: {e}")),
    }
}

/// The stress test: the cap full, 10,000 upgrades against the
/// binary, 2,000 at a time (this process's descriptor budget). Each client
/// sees Close 1013 or, past `max_close_refusals`, the 503; no slot is
/// taken meanwhile (sampled), never more than `max_close_refusals` are open
/// (counted by the clients), nothing reaches the upstream; afterwards
/// wsgate's descriptors are back, the refusals are in the access log's
/// summaries and no session record was written for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_close_refusals_at_once() {
    const CLIENTS: usize = 10_000;
    const AT_ONCE: usize = 2_000;
    const MAX_OPEN: usize = 1024;
    raise_nofile(AT_ONCE as u64 + 1024);
    let up = spawn_echo_upstream().await;
    let (mut gate, proxy, admin) = tokio::task::block_in_place(|| {
        start_json(
            up.addr,
            &[
                ("WSGATE_MAX_CLIENTS", "1".into()),
                ("WSGATE_REFUSAL_MODE", "close".into()),
                ("WSGATE_MAX_CLOSE_REFUSALS", MAX_OPEN.to_string()),
                ("WSGATE_CLOSE_TIMEOUT", "3s".into()),
            ],
        )
    });
    let mut held = within("connect", connect(&format!("ws://{proxy}/")))
        .await
        .expect("the one slot");
    echo_text(&mut held, "holding the only slot").await;
    let baseline = gate.stat().fds;

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = Arc::clone(&sampling);
        async move {
            let mut highest = 0.0f64;
            while sampling.load(Ordering::SeqCst) {
                if let Some(active) = try_metric(admin, ACTIVE).await {
                    highest = highest.max(active);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            highest
        }
    });

    let storm = Arc::new(Storm {
        proxy,
        open: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        saw_503: AtomicBool::new(false),
    });
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            let (storm, next) = (Arc::clone(&storm), Arc::clone(&next));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= CLIENTS {
                        return seen;
                    }
                    seen.push(
                        tokio::time::timeout(DEADLINE, storm_client(&storm, k))
                            .await
                            .unwrap_or_else(|_| Seen::Other(format!("client {k} timed out"))),
                    );
                }
            })
        })
        .collect();
    let (mut closed, mut refused, mut other, mut ns) = (0, 0, Vec::new(), Vec::new());
    for w in workers {
        for seen in within("the storm", w).await.expect("join") {
            match seen {
                Seen::Closed(n) => {
                    closed += 1;
                    ns.push(n);
                }
                Seen::Status503 => refused += 1,
                Seen::Other(e) => other.push(e),
            }
        }
    }
    let took = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let highest_active = within("the sampler", sampler).await.expect("join");
    let peak = storm.peak.load(Ordering::SeqCst);
    println!(
        "{CLIENTS} refusals in {took:?}: {closed} closed with 1013, {refused} answered 503, \
         {} other; at most {peak} close-mode refusals open at once (client side), \
         max_close_refusals {MAX_OPEN}",
        other.len()
    );
    assert!(
        other.is_empty(),
        "{} unexpected: {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );
    assert_eq!(closed + refused, CLIENTS);
    assert!(
        closed > 0 && refused > 0,
        "both answers: {closed} 1013, {refused} 503"
    );
    assert!(peak <= MAX_OPEN, "{peak} open at once, cap {MAX_OPEN}");
    assert!(ns.iter().all(|n| (1..=2).contains(n)), "N outside [1, 2]");
    assert!(highest_active <= 1.0, "active reached {highest_active}");
    assert!(took < Duration::from_secs(40), "the storm took {took:?}");

    let text = scrape(admin).await;
    assert_eq!(
        metric_value(
            &text,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        ),
        Some(CLIENTS as f64)
    );
    assert_eq!(metric_value(&text, ACTIVE), Some(1.0));
    assert_eq!(sum_of(&text, "wsgate_sessions_ended_total"), 0.0);
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    wait_child_fds(&gate, baseline).await;

    // The one session ends; at exit the summaries account for every
    // refusal, and the only session record is the held one's.
    close_cleanly(held).await;
    wait_metric(admin, ACTIVE, 0.0).await;
    gate.signal("TERM");
    let status = tokio::task::block_in_place(|| gate.wait_exit());
    assert_eq!(status.code(), Some(0), "{}", gate.stderr_text());
    let access = |text: &str, message: &str| -> Vec<Value> {
        json_lines(text)
            .into_iter()
            .filter(|e| {
                e.get("target") == Some(&json!("wsgate::access"))
                    && event_field(e, "message") == Some(&json!(message))
            })
            .collect()
    };
    let summarised = |text: &str| -> u64 {
        access(text, "refusals")
            .iter()
            .filter_map(|l| event_field(l, "capacity")?.as_u64())
            .sum()
    };
    let wait_start = Instant::now();
    let mut text = gate.stderr_text();
    while summarised(&text) < CLIENTS as u64 && wait_start.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = gate.stderr_text();
    }
    assert_eq!(summarised(&text), CLIENTS as u64, "the refusal summaries");
    assert_eq!(
        access(&text, "session").len(),
        1,
        "only the held session has a record"
    );
}

/// A close-mode refusal is tracked by the shutdown but never holds it past
/// the grace: a client that never answers, a `close_timeout` longer than
/// the grace, and the process is still done within the grace.
#[tokio::test]
async fn a_close_refusal_never_holds_the_shutdown_past_the_grace() {
    let up = spawn_echo_upstream().await;
    let grace = Duration::from_secs(1);
    let gate = spawn_sidecar(RawConfig {
        close_timeout: secs(30.0),
        shutdown_grace: ConfigDuration(grace),
        ..close_mode(up.addr)
    })
    .await;
    let held = within("connect", connect(&gate.ws_url()))
        .await
        .expect("the one slot");
    let (mut silent, head) = raw_upgrade(gate.addr).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let signalled = Instant::now();
    gate.signal();
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
    let took = signalled.elapsed();
    assert!(took < grace + RELEASE_BOUND, "the shutdown took {took:?}");
    read_1013(&mut silent).await;
    assert!(closed_within(&mut silent, RELEASE_BOUND).await);
    drop(held);
}
