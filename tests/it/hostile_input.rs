//! Hostile input on the client port (issue 3): slowloris heads, oversized
//! heads, random bytes, truncated requests, HTTP/1.0 upgrades, duplicate or
//! conflicting upgrade headers, request smuggling, control characters.
//!
//! Each test counts what it tried and prints the outcomes, asserts the
//! answer (400/431 or a closed connection, never a crash), asserts that the
//! upstream saw exactly what it should (a counting upstream records every
//! request), and then proves the gate is unharmed: a normal client is
//! admitted and echoed, and `wsgate_connections_active` is back to 0.
#![allow(clippy::print_stdout, reason = "tests report what they tried")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wsgate::config::{ConfigDuration, RawConfig};

/// What came back for one hostile exchange.
#[derive(Debug, Clone)]
struct Outcome {
    /// Status codes of every response read, in order.
    statuses: Vec<u16>,
    /// How many of those came from the upstream (`x-upstream: yes`).
    from_upstream: usize,
    /// wsgate closed (or reset) the connection.
    closed: bool,
}

impl Outcome {
    fn label(&self) -> String {
        let s: Vec<String> = self.statuses.iter().map(u16::to_string).collect();
        let s = if s.is_empty() {
            "no response".to_owned()
        } else {
            s.join("+")
        };
        if self.closed {
            format!("{s}, closed")
        } else {
            format!("{s}, open")
        }
    }
}

/// Sends `payload` (then FIN if `fin`), reading concurrently until wsgate
/// closes, or nothing more arrives for `quiet`, or 5 s pass.
async fn exchange(addr: SocketAddr, payload: Vec<u8>, fin: bool, quiet: Duration) -> Outcome {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        // wsgate may close before reading everything: a failed write is fine.
        if wr.write_all(&payload).await.is_ok() && fin {
            let _ = wr.shutdown().await;
        }
        wr
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let start = Instant::now();
    let closed = loop {
        match tokio::time::timeout(quiet, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
        if start.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    writer.abort();
    let text = String::from_utf8_lossy(&got);
    let mut statuses = Vec::new();
    let mut from_upstream = 0;
    for (i, _) in text.match_indices("HTTP/1.") {
        // A status line: "HTTP/1.1 NNN" (or 1.0, echoing an HTTP/1.0 request).
        if (i == 0 || text[..i].ends_with('\n')) && text[i + 8..].starts_with(' ') {
            statuses.push(
                text[i + 9..]
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
            );
            let head_end = text[i..].find("\r\n\r\n").map_or(text.len(), |e| i + e);
            if text[i..head_end]
                .to_ascii_lowercase()
                .contains("x-upstream: yes")
            {
                from_upstream += 1;
            }
        }
    }
    Outcome {
        statuses,
        from_upstream,
        closed,
    }
}

async fn gate_for(up: &CountingUpstream, header_read_timeout: f64) -> Sidecar {
    spawn_sidecar(RawConfig {
        header_read_timeout: ConfigDuration(Duration::from_secs_f64(header_read_timeout)),
        ..test_config(up.addr)
    })
    .await
}

/// A WebSocket connection opened before the abuse, to be checked after it.
async fn bystander(gate: &Sidecar) -> Ws {
    let mut ws = within(
        "bystander",
        connect(&format!("ws://{}{BYSTANDER_PATH}", gate.addr)),
    )
    .await
    .expect("the bystander is admitted");
    echo_text(&mut ws, "before").await;
    ws
}

/// A new client is admitted and echoed.
async fn new_client_served(gate: &Sidecar) {
    let mut ws = within("normal client after hostile input", connect(&gate.ws_url()))
        .await
        .expect("a normal client is admitted");
    echo_text(&mut ws, "still here").await;
    close_cleanly(ws).await;
}

/// After the abuse: the bystander opened before it still echoes, a new
/// client is admitted and echoed, and every slot is back.
async fn still_serves(gate: &Sidecar, mut bystander: Ws) {
    echo_text(&mut bystander, "the bystander is unaffected").await;
    close_cleanly(bystander).await;
    new_client_served(gate).await;
    wait_metric(gate.admin, ACTIVE, 0.0).await;
}

/// Prints a table of outcomes and returns it.
fn tally(what: &str, outcomes: &[(String, Outcome)]) -> BTreeMap<String, usize> {
    let mut by_label = BTreeMap::new();
    for (_, o) in outcomes {
        *by_label.entry(o.label()).or_insert(0) += 1;
    }
    println!("{what}: {} tried", outcomes.len());
    for (label, n) in &by_label {
        println!("  {n:>5} × {label}");
    }
    by_label
}

fn upgrade_with(addr: SocketAddr, extra: &str) -> String {
    upgrade_request(addr).replacen("\r\n\r\n", &format!("\r\n{extra}\r\n\r\n"), 1)
}

// ---------------------------------------------------------------- slowloris

/// Clients that trickle a request head one byte at a time are cut at
/// `header_read_timeout`, however long they keep trickling, and meanwhile a
/// normal client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_at_header_read_timeout() {
    const N: usize = 50;
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let addr = gate.addr;
    let lorises: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                // A head that never ends: an upgrade followed by endless headers.
                let mut head = upgrade_request(addr)
                    .replace("\r\n\r\n", "\r\n")
                    .into_bytes();
                head.extend(format!("X-Loris-{i}: ").bytes());
                let start = Instant::now();
                let mut buf = [0u8; 1024];
                for k in 0.. {
                    let byte = head.get(k).copied().unwrap_or(b'a');
                    if s.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) | Err(_) => {}
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(8),
                        "slowloris {i} never cut"
                    );
                }
                start.elapsed()
            })
        })
        .collect();
    // Served while the lorises trickle.
    new_client_served(&gate).await;
    let mut cut_after = Vec::new();
    for l in lorises {
        cut_after.push(within("loris", l).await.expect("join"));
    }
    let max = cut_after.iter().max().copied().unwrap_or_default();
    let min = cut_after.iter().min().copied().unwrap_or_default();
    println!("slowloris: {N} tried, all cut after {min:.2?}..{max:.2?} (header_read_timeout 1s)");
    assert!(
        min >= Duration::from_millis(900),
        "cut before the timeout: {min:?}"
    );
    assert!(max <= Duration::from_secs(3), "cut late: {max:?}");
    assert_eq!(
        up.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/")
            .count(),
        1,
        "only the normal client reached the upstream"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- oversized heads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_64k_get_431_and_never_reach_upstream() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 2.0).await;
    let by = bystander(&gate).await;
    let mut outcomes = Vec::new();
    // (name, head size target, one big header or many small ones, websocket?)
    let cases = [
        ("one 70 KiB header, plain GET", 70 << 10, true, false),
        ("one 70 KiB header, upgrade", 70 << 10, true, true),
        (
            "2000 small headers (~80 KiB), plain GET",
            80 << 10,
            false,
            false,
        ),
        (
            "2000 small headers (~80 KiB), upgrade",
            80 << 10,
            false,
            true,
        ),
        ("one 100 KiB header, upgrade", 100 << 10, true, true),
        ("a 70 KiB request target", 0, true, false),
    ];
    for (name, size, big, ws) in cases {
        let mut head = if ws {
            upgrade_request(gate.addr).replace("\r\n\r\n", "\r\n")
        } else {
            format!("GET /big HTTP/1.1\r\nHost: {}\r\n", gate.addr)
        };
        if size == 0 {
            head = format!("GET /{} HTTP/1.1\r\nHost: x\r\n", "a".repeat(70 << 10));
        } else if big {
            head.push_str(&format!("X-Big: {}\r\n", "b".repeat(size)));
        } else {
            let mut i = 0;
            while head.len() < size {
                head.push_str(&format!("X-H{i}: {}\r\n", "c".repeat(30)));
                i += 1;
            }
        }
        head.push_str("\r\n");
        let o = exchange(gate.addr, head.into_bytes(), false, Duration::from_secs(2)).await;
        assert_eq!(o.statuses, vec![431], "{name}: {o:?}");
        outcomes.push((name.to_owned(), o));
    }
    // Just under the limit still passes: the boundary is the limit, not a guess.
    let head = format!(
        "GET /under HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "u".repeat(60 << 10)
    );
    let o = exchange(gate.addr, head.into_bytes(), false, Duration::from_secs(2)).await;
    assert_eq!(o.statuses, vec![200], "a 60 KiB head is served: {o:?}");
    outcomes.push(("60 KiB head (control)".into(), o));
    // 1 MiB: wsgate stops reading at its buffer limit; the 431 may be lost to
    // the reset that closing with unread data causes, but nothing else.
    let mut giant = 0;
    for _ in 0..5 {
        let head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Giant: {}\r\n\r\n",
            "g".repeat(1 << 20)
        );
        let o = exchange(gate.addr, head.into_bytes(), false, Duration::from_secs(2)).await;
        assert!(
            o.closed && (o.statuses == vec![431] || o.statuses.is_empty()),
            "1 MiB head: {o:?}"
        );
        giant += 1;
        outcomes.push(("1 MiB head".into(), o));
    }
    tally("oversized heads", &outcomes);
    assert_eq!(giant, 5);
    assert_eq!(
        up.requests().iter().filter(|r| r.path != "/under").count(),
        0,
        "no oversized head reached the upstream"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- random bytes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_get_400_or_close_and_never_reach_upstream() {
    const N: usize = 300;
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut payloads: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let len = rng.random_range(1..4096);
            let mut p = vec![0u8; len];
            rng.fill(&mut p[..]);
            (format!("random #{i}"), p)
        })
        .collect();
    // Structured garbage that random bytes would rarely produce.
    let named: [(&str, &[u8]); 8] = [
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("NUL bytes", &[0u8; 64]),
        ("blank lines only", b"\r\n\r\n\r\n\r\n"),
        ("SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("bad method token", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("no version", b"GET /\r\nHost: x\r\n\r\n"),
        ("HTTP/9.9", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
    ];
    payloads.extend(named.iter().map(|(n, p)| ((*n).to_owned(), p.to_vec())));
    let tasks: Vec<_> = payloads
        .into_iter()
        .map(|(name, p)| {
            let addr = gate.addr;
            tokio::spawn(
                async move { (name, exchange(addr, p, true, Duration::from_secs(3)).await) },
            )
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(within("exchange", t).await.expect("join"));
    }
    for (name, o) in &outcomes {
        assert!(o.closed, "{name}: connection left open: {o:?}");
        assert!(
            o.statuses
                .iter()
                .all(|s| (400..500).contains(s) || *s == 505),
            "{name}: {o:?}"
        );
        assert_eq!(o.from_upstream, 0, "{name}");
    }
    tally("random bytes and garbage", &outcomes);
    assert_eq!(up.count(), 0, "garbage never reached the upstream");
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- truncated requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_requests_get_400_or_close_and_never_reach_upstream() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let upgrade = upgrade_request(gate.addr);
    let plain = format!(
        "GET /plain HTTP/1.1\r\nHost: {}\r\nX-A: b\r\n\r\n",
        gate.addr
    );
    let mut payloads = Vec::new();
    for (what, full) in [("upgrade", &upgrade), ("plain GET", &plain)] {
        // Every cut short of the final blank line leaves an incomplete head.
        for cut in 0..full.len() - 1 {
            payloads.push((
                format!("{what} cut at {cut}/{}", full.len()),
                full.as_bytes()[..cut].to_vec(),
            ));
        }
    }
    let total = payloads.len();
    let mut outcomes = Vec::new();
    for chunk in payloads.chunks(64) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(name, p)| {
                let addr = gate.addr;
                tokio::spawn(async move {
                    (name, exchange(addr, p, true, Duration::from_secs(3)).await)
                })
            })
            .collect();
        for t in tasks {
            outcomes.push(within("exchange", t).await.expect("join"));
        }
    }
    for (name, o) in &outcomes {
        assert!(o.closed, "{name}: {o:?}");
        assert!(o.statuses.iter().all(|s| *s == 400), "{name}: {o:?}");
    }
    tally("truncated requests", &outcomes);
    assert_eq!(outcomes.len(), total);
    assert_eq!(up.count(), 0, "no truncated request reached the upstream");
    assert_eq!(
        metric(gate.admin, "wsgate_connections_admitted_total").await,
        1.0,
        "no slot taken but the bystander's"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- HTTP/1.0 and header conflicts

/// One handshake variant: (name, request, the status wsgate must answer,
/// whether the upstream may see it).
fn handshake_cases(addr: SocketAddr) -> Vec<(&'static str, String, u16, bool)> {
    let ws = upgrade_request(addr);
    let h10 = ws.replacen("HTTP/1.1", "HTTP/1.0", 1);
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    vec![
        ("HTTP/1.0 upgrade", h10.clone(), 400, false),
        (
            "HTTP/1.0 upgrade with keep-alive",
            h10.replacen("Connection: Upgrade", "Connection: keep-alive, Upgrade", 1),
            400,
            false,
        ),
        (
            "POST upgrade",
            ws.replacen("GET", "POST", 1)
                .replacen("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n", 1),
            400,
            false,
        ),
        (
            "two Upgrade: websocket lines",
            upgrade_with(addr, "Upgrade: websocket"),
            400,
            false,
        ),
        (
            "Upgrade: websocket + Upgrade: h2c",
            upgrade_with(addr, "Upgrade: h2c"),
            400,
            false,
        ),
        (
            "Connection without upgrade",
            ws.replacen("Connection: Upgrade", "Connection: keep-alive", 1),
            400,
            false,
        ),
        (
            "Connection: close, no upgrade",
            ws.replacen("Connection: Upgrade", "Connection: close", 1),
            400,
            false,
        ),
        (
            "two Sec-WebSocket-Key lines",
            upgrade_with(addr, key),
            400,
            false,
        ),
        (
            "Sec-WebSocket-Version 13 and 8",
            upgrade_with(addr, "Sec-WebSocket-Version: 8"),
            400,
            false,
        ),
        (
            "Sec-WebSocket-Version: 13, 8",
            ws.replacen(
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Version: 13, 8",
                1,
            ),
            400,
            false,
        ),
        (
            "Sec-WebSocket-Version missing",
            ws.replacen("Sec-WebSocket-Version: 13\r\n", "", 1),
            400,
            false,
        ),
        (
            "Sec-WebSocket-Key of 15 bytes",
            ws.replacen("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ", 1),
            400,
            false,
        ),
        (
            "upgrade with a body (Content-Length)",
            upgrade_with(addr, "Content-Length: 5") + "hello",
            400,
            false,
        ),
        (
            "upgrade with Transfer-Encoding",
            upgrade_with(addr, "Transfer-Encoding: chunked") + "0\r\n\r\n",
            400,
            false,
        ),
        // Not a websocket attempt: forwarded as plain HTTP with Upgrade stripped.
        (
            "Upgrade: h2c only",
            ws.replacen("Upgrade: websocket", "Upgrade: h2c", 1)
                .replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1),
            200,
            true,
        ),
        // Valid, with extra noise that must not confuse it.
        (
            "Connection: keep-alive, Upgrade + Upgrade: WebSocket",
            ws.replacen("Connection: Upgrade", "Connection: keep-alive, Upgrade", 1)
                .replacen("Upgrade: websocket", "Upgrade: WebSocket", 1),
            101,
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_and_conflicting_upgrade_headers_are_refused_before_the_upstream() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let mut outcomes = Vec::new();
    let mut expected_upstream = 0;
    for (name, req, want, reaches) in handshake_cases(gate.addr) {
        let before = up.count();
        let o = exchange(
            gate.addr,
            req.into_bytes(),
            false,
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(o.statuses.first().copied(), Some(want), "{name}: {o:?}");
        let seen = up.count() - before;
        assert_eq!(seen, usize::from(reaches), "{name}: upstream saw {seen}");
        if want == 101 {
            // The upgraded connection ends with the exchange: its slot returns (the bystander keeps one).
            wait_metric(gate.admin, ACTIVE, 1.0).await;
        }
        if name == "Upgrade: h2c only" {
            let last = up.requests().pop().expect("seen");
            assert!(
                !last.headers.iter().any(|(k, _)| k == "upgrade"),
                "Upgrade is hop-by-hop: {last:?}"
            );
        }
        expected_upstream += usize::from(reaches);
        outcomes.push((name.to_owned(), o));
    }
    tally("HTTP/1.0 and conflicting upgrade headers", &outcomes);
    assert_eq!(up.count(), expected_upstream);
    assert_eq!(
        metric(gate.admin, "wsgate_connections_admitted_total").await,
        2.0,
        "only the valid one (and the bystander) took a slot"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- smuggling

/// Request-smuggling attempts on a keep-alive connection. wsgate parses each
/// request with hyper and re-frames it for the upstream, so the upstream can
/// only ever see requests wsgate itself parsed and answered: for every
/// payload, the requests the upstream saw equal the upstream responses the
/// client got back, and the upstream never sees both `Content-Length` and
/// `Transfer-Encoding`. Upgrade requests with a body are refused outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_never_give_the_upstream_an_extra_request() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let smuggled = |i: usize| format!("GET /p{i}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    let post = |i: usize, headers: &str, body: &str| {
        format!("POST /p{i}/first HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n{body}")
    };
    let payloads: Vec<(&str, String)> = vec![
        ("CL.TE", {
            let s = smuggled(0);
            post(0, &format!("Content-Length: {}\r\nTransfer-Encoding: chunked", 5 + s.len()), &format!("0\r\n\r\n{s}"))
        }),
        ("TE.CL", {
            let s = smuggled(1);
            post(1, "Content-Length: 4\r\nTransfer-Encoding: chunked", &format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len()))
        }),
        ("TE.TE (second TE: x)", post(2, "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4", &format!("0\r\n\r\n{}", smuggled(2)))),
        ("TE: xchunked + CL", post(3, "Transfer-Encoding: xchunked\r\nContent-Length: 4", &format!("0\r\n\r\n{}", smuggled(3)))),
        ("space before colon in TE", post(4, "Transfer-Encoding : chunked\r\nContent-Length: 4", &format!("0\r\n\r\n{}", smuggled(4)))),
        ("TE: chunked, identity", post(5, "Transfer-Encoding: chunked, identity\r\nContent-Length: 4", &format!("0\r\n\r\n{}", smuggled(5)))),
        ("two different Content-Lengths", post(6, "Content-Length: 4\r\nContent-Length: 40", &format!("abcd{}", smuggled(6)))),
        ("Content-Length: +4", post(7, "Content-Length: +4", &format!("abcd{}", smuggled(7)))),
        ("Content-Length: 4, 40", post(8, "Content-Length: 4, 40", &format!("abcd{}", smuggled(8)))),
        ("chunk size overflow", post(9, "Transfer-Encoding: chunked", &format!("fffffffffffffffffff\r\n{}", smuggled(9)))),
        ("TE with tab", post(10, "Transfer-Encoding:\tchunked\r\nContent-Length: 4", &format!("0\r\n\r\n{}", smuggled(10)))),
        ("bare LF line endings", format!("POST /p11/first HTTP/1.1\nHost: x\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\n\n{}", smuggled(11))),
        ("upgrade with CL body hiding a request", upgrade_with(gate.addr, &format!("Content-Length: {}", smuggled(12).len())).replacen("GET /", "GET /p12/first", 1) + &smuggled(12)),
        ("upgrade with chunked body hiding a request", upgrade_with(gate.addr, "Transfer-Encoding: chunked").replacen("GET /", "GET /p13/first", 1) + &format!("{:x}\r\n{}\r\n0\r\n\r\n", smuggled(13).len(), smuggled(13))),
        ("plain pipelining (control)", format!("GET /p14/first HTTP/1.1\r\nHost: x\r\n\r\n{}", smuggled(14))),
    ];
    let tasks: Vec<_> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, (name, p))| {
            let addr = gate.addr;
            tokio::spawn(async move {
                (
                    i,
                    name,
                    exchange(addr, p.into_bytes(), false, Duration::from_millis(700)).await,
                )
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    let mut rows = Vec::new();
    for t in tasks {
        let (i, name, o) = within("exchange", t).await.expect("join");
        rows.push((i, name, o));
    }
    let seen = up.requests();
    for (i, name, o) in &rows {
        let prefix = format!("/p{i}/");
        let mine: Vec<_> = seen
            .iter()
            .filter(|r| r.path.starts_with(&prefix))
            .collect();
        let paths: Vec<&str> = mine.iter().map(|r| r.path.as_str()).collect();
        println!(
            "  {name:<40} -> client got {:<16} upstream saw {paths:?}",
            o.label()
        );
        assert_eq!(
            mine.len(),
            o.from_upstream,
            "{name}: the upstream saw a request the client got no answer for: {paths:?}"
        );
        for r in &mine {
            let has = |h: &str| r.headers.iter().any(|(k, _)| k == h);
            assert!(
                !(has("content-length") && has("transfer-encoding")),
                "{name}: CL and TE both reached the upstream"
            );
            // A request's text may legitimately arrive as *body* bytes (TE.CL
            // with chunked winning): framed unambiguously, it is data, not a
            // request, and the count above shows the upstream read it so.
            assert!(
                r.path.ends_with("/first") || o.from_upstream >= 2,
                "{name}: {} reached the upstream without its own answer",
                r.path
            );
        }
        assert!(
            o.statuses.iter().all(|s| *s < 500),
            "{name}: client garbage answered as an upstream failure: {o:?}"
        );
        if name.starts_with("upgrade with") {
            assert_eq!(o.statuses, vec![400], "{name}");
            assert!(mine.is_empty(), "{name}");
        }
        if *name == "plain pipelining (control)" {
            assert_eq!(
                mine.len(),
                2,
                "the control case shows pipelined requests do reach the upstream"
            );
        }
        outcomes.push(((*name).to_owned(), o.clone()));
    }
    tally("smuggling attempts", &outcomes);
    assert_eq!(
        metric(gate.admin, "wsgate_http_requests_total{class=\"5xx\"}").await,
        0.0,
        "no client garbage shows as a 5xx on the dashboard"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- control characters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_header_names_and_values_never_reach_upstream() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
    for c in (0u8..0x20).chain([0x7f]) {
        if c == b'\t' {
            continue; // HTAB is legal whitespace in a value
        }
        bad.push((
            format!("name with 0x{c:02x}"),
            [b"X-Ab".as_slice(), &[c], b"c: v"].concat(),
        ));
        bad.push((
            format!("value with 0x{c:02x}"),
            [b"X-Ab: v".as_slice(), &[c], b"w"].concat(),
        ));
    }
    bad.push(("obs-fold continuation".into(), b"X-Fold: a\r\n  b".to_vec()));
    bad.push(("space in name".into(), b"X Ab: v".to_vec()));
    bad.push(("empty name".into(), b": v".to_vec()));
    bad.push(("no colon".into(), b"X-NoColon".to_vec()));
    let mut outcomes = Vec::new();
    for (name, line) in &bad {
        for ws in [false, true] {
            let head = if ws {
                upgrade_request(gate.addr).replace("\r\n\r\n", "\r\n")
            } else {
                format!(
                    "GET /ctl HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                    gate.addr
                )
            };
            let payload = [head.as_bytes(), line, b"\r\n\r\n"].concat();
            let o = exchange(gate.addr, payload, false, Duration::from_millis(500)).await;
            let what = format!("{name} ({})", if ws { "upgrade" } else { "plain" });
            assert!(
                o.statuses.iter().all(|s| [400, 101, 200].contains(s)),
                "{what}: {o:?}"
            );
            outcomes.push((what, o));
        }
    }
    wait_metric(gate.admin, ACTIVE, 1.0).await;
    for r in up.requests() {
        for (k, v) in &r.headers {
            let ctl = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f;
            assert!(
                !k.bytes().any(|b| ctl(&b)) && !v.iter().any(ctl),
                "control character reached the upstream: {k}: {v:?}"
            );
        }
    }
    let by_label = tally("control characters in headers", &outcomes);
    println!("  (upstream saw {} of them, each clean)", up.count());
    assert!(
        by_label.keys().any(|k| k.starts_with("400")),
        "most are refused"
    );
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- Connection with obs-text

/// A `Connection` header whose value also carries a token of obs-text
/// (bytes ≥ 0x80, which HTTP parsers accept in values) still nominates the
/// other names in it: the nominated headers never reach the upstream, on the
/// plain path and on the upgrade path. (Found by `tests/it/props.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_with_an_obs_text_token_still_removes_what_it_names() {
    let up = spawn_counting_upstream().await;
    let gate = gate_for(&up, 1.0).await;
    let by = bystander(&gate).await;
    let plain = [
        format!(
            "GET /obs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            gate.addr
        )
        .as_bytes(),
        b"Connection: x-secret, \x80\xff\r\nX-Secret: leaked\r\n\r\n",
    ]
    .concat();
    let o = exchange(gate.addr, plain, false, Duration::from_millis(500)).await;
    assert_eq!(o.statuses, vec![200], "{o:?}");
    let upgrade = [
        upgrade_request(gate.addr)
            .replace("\r\n\r\n", "\r\n")
            .as_bytes(),
        b"Connection: x-secret, \x80\r\nX-Secret: leaked\r\n\r\n",
    ]
    .concat();
    let o = exchange(gate.addr, upgrade, false, Duration::from_millis(300)).await;
    assert_eq!(o.statuses, vec![101], "{o:?}");
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert!(
            !r.headers.iter().any(|(k, _)| k == "x-secret"),
            "{} {}: a header named in Connection reached the upstream: {:?}",
            r.method,
            r.path,
            r.headers
        );
    }
    still_serves(&gate, by).await;
}

// ---------------------------------------------------------------- hostile frames after the upgrade

/// After the upgrade wsgate tracks frame boundaries so that it can end a
/// connection with a Close frame between frames. A client that sends a frame
/// header announcing 2^63 bytes, half a header, a fragmented message that
/// never ends, or plain garbage, and then freezes, must not hold its slot:
/// `idle_timeout` fires, no boundary ever comes, and `close_timeout` ends
/// it at the TCP level. The upstream here reads and discards, so only
/// wsgate's own deadlines can free the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_after_the_upgrade_cannot_hold_a_slot() {
    let up = spawn_sink_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        idle_timeout: ConfigDuration(Duration::from_millis(500)),
        close_timeout: ConfigDuration(Duration::from_millis(500)),
        ..test_config(up.addr)
    })
    .await;
    let mut huge = vec![0x82u8, 0xFF];
    huge.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4, 0xAA, 0xBB]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut garbage = vec![0u8; 1000];
    rng.fill(&mut garbage[..]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a 2^63-byte frame, 2 bytes of it sent", huge),
        ("half a frame header", vec![0x81]),
        ("a masked 16-bit-length header, cut", vec![0x82, 0xFE, 0x10]),
        (
            "a fragmented message that never ends",
            vec![0x01, 0x81, 0, 0, 0, 0, b'a', 0x00, 0x81, 0, 0, 0, 0, b'b'],
        ),
        ("1000 random bytes", garbage),
        ("reserved opcode and RSV bits", vec![0xFB, 0x80, 0, 0, 0, 0]),
    ];
    let start = Instant::now();
    let mut clients = Vec::new();
    for (name, bytes) in &cases {
        let (mut s, head) = raw_upgrade(gate.addr).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{name}: {head}");
        s.write_all(bytes).await.expect("send");
        clients.push(s); // then frozen: never reads, never writes
    }
    wait_metric(gate.admin, ACTIVE, cases.len() as f64).await;
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    let took = start.elapsed();
    println!(
        "hostile frames after the upgrade: {} tried, all released after {took:.2?} (idle 0.5 s + close_timeout 0.5 s)",
        cases.len()
    );
    for (name, _) in &cases {
        println!("  released: {name}");
    }
    assert!(took < Duration::from_secs(4), "released after {took:?}");
    assert_eq!(
        metric(gate.admin, "wsgate_connection_duration_seconds_count").await,
        cases.len() as f64
    );
    drop(clients);
    // The gate still serves (the sink upstream answers 101; a raw upgrade shows it).
    let (_s, head) = raw_upgrade(gate.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}
