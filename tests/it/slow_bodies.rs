//! Slow plain request bodies (docs/behaviour.md#slow-request-bodies), black-box: the wsgate binary
//! as a child process (its descriptors read from /proc), real upstreams on
//! port 0, raw TCP clients that declare a large body and then stall.
//!
//! Each test failed on the build before the body timeout and
//! `max_plain_requests` existed: the stalled requests stayed open (and the
//! key was refused as unknown).
#![allow(clippy::print_stdout, reason = "tests report what they measured")]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The stall limit the tests run with (`header_read_timeout`).
const STALL: &str = "300ms";

/// How long after the stall limit an answer or a close may take on a
/// loaded machine.
const MARGIN: Duration = Duration::from_secs(3);

/// A POST that declares a body of a million bytes and sends three.
fn stalling_post(addr: SocketAddr) -> Vec<u8> {
    format!("POST /upload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000000\r\n\r\nabc")
        .into_bytes()
}

/// Sends a stalling POST; its socket.
async fn stall(addr: SocketAddr) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    s.write_all(&stalling_post(addr)).await.expect("write");
    s
}

/// Everything read until wsgate closes (EOF or reset), and when it closed;
/// fails after `limit`.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(limit, read).await.is_ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(closed, "still open after {limit:?}; read so far: {text:?}");
    (text, start.elapsed())
}

fn start(upstream: SocketAddr, env: &[(&str, String)]) -> (GateProcess, SocketAddr, SocketAddr) {
    tokio::task::block_in_place(|| GateProcess::proxy(upstream, env, None))
}

/// An upstream that reads the whole body before it answers: the stalled
/// bodies get 408 with `Connection: close` and the connection closes, within
/// the stall limit and a margin; the upstream never completes one of them,
/// and wsgate's descriptors return to what they were before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_plain_body_gets_408_and_gives_its_descriptors_back() {
    const N: usize = 20;
    let up = spawn_counting_upstream().await;
    let (gate, proxy, _admin) = start(up.addr, &[("WSGATE_HEADER_READ_TIMEOUT", STALL.into())]);
    let baseline = gate.stat().fds;
    let clients: Vec<_> = (0..N)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = stall(proxy).await;
                until_closed(&mut s, Duration::from_millis(300) + MARGIN).await
            })
        })
        .collect();
    for c in clients {
        let (text, took) = c.await.expect("join");
        println!("408 after {took:?}");
        assert_eq!(status_of(&text), 408, "{text:?}");
        let head = text.to_ascii_lowercase();
        assert!(head.contains("connection: close"), "{text:?}");
        assert!(
            took >= Duration::from_millis(250),
            "cut before the limit: {took:?}"
        );
    }
    // The counting upstream records a request whose body broke off too:
    // none of them got more than the three bytes sent.
    for seen in up.requests() {
        assert!(
            seen.body.len() <= 3,
            "the upstream got {} bytes",
            seen.body.len()
        );
    }
    wait_child_fds(&gate, baseline).await;
    let (status, _) = http_get(proxy, "/after").await;
    assert_eq!(status, 200, "plain requests still pass");
}

/// An upstream that answers at once, streaming the body back as it comes:
/// the client has its 200 head before the body stalls, and when it stalls
/// the connection is closed all the same (the upstream request aborted, its
/// connection closed), and the descriptors return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_after_the_upstream_answered_still_closes_the_connection() {
    let up = spawn_echo_upstream().await;
    let (gate, proxy, _admin) = start(up.addr, &[("WSGATE_HEADER_READ_TIMEOUT", STALL.into())]);
    let baseline = gate.stat().fds;
    let mut s = stall(proxy).await;
    let (text, took) = until_closed(&mut s, Duration::from_millis(300) + MARGIN).await;
    println!("closed after {took:?}: {text:?}");
    assert_eq!(
        status_of(&text),
        200,
        "the upstream's answer came first: {text:?}"
    );
    drop(s);
    wait_child_fds(&gate, baseline).await;
}

/// `max_plain_requests` 4: four stalled requests hold every place (each is
/// at the upstream, whose answer has begun); six more get 503 with
/// `Retry-After` and `Connection: close` at once, and the upstream never
/// sees them; a WebSocket upgrade still gets 101 and echoes meanwhile; once
/// the four go, a plain request passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_over_their_cap_get_503_without_reaching_the_upstream() {
    const CAP: usize = 4;
    let up = spawn_echo_upstream().await;
    let (_gate, proxy, admin) = start(
        up.addr,
        &[
            ("WSGATE_MAX_PLAIN_REQUESTS", CAP.to_string()),
            ("WSGATE_RETRY_AFTER", "3s".into()),
        ],
    );
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = stall(proxy).await;
        let head = read_head(&mut s).await;
        assert_eq!(status_of(&head), 200, "{head:?}");
        held.push(s);
    }
    let accepts = up.accepts.load(Ordering::SeqCst);
    assert_eq!(
        accepts, CAP,
        "one upstream connection per request in flight"
    );

    for i in 0..6 {
        let mut s = stall(proxy).await;
        let (text, took) = until_closed(&mut s, MARGIN).await;
        assert_eq!(status_of(&text), 503, "request {i} over the cap: {text:?}");
        let head = text.to_ascii_lowercase();
        assert!(head.contains("retry-after: 3\r\n"), "{text:?}");
        assert!(head.contains("connection: close"), "{text:?}");
        assert!(
            took < Duration::from_secs(2),
            "refused at once, not after {took:?}"
        );
    }
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        CAP,
        "a request over the cap reached the upstream"
    );

    let mut ws = within(
        "upgrade while plain requests are capped",
        connect(&format!("ws://{proxy}/")),
    )
    .await
    .expect("a WebSocket upgrade is not held back by the plain cap");
    echo_text(&mut ws, "still admitted").await;
    close_cleanly(ws).await;
    wait_metric(admin, ACTIVE, 0.0).await;

    drop(held);
    let start = Instant::now();
    loop {
        let (status, _) = http_get(proxy, "/again").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(start.elapsed() < DEADLINE, "the places never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bad `max_plain_requests` stops the program with exit 2, naming the key
/// and the value.
#[test]
fn a_bad_max_plain_requests_exits_2_naming_key_and_value() {
    for bad in ["-1", "many", "1048577"] {
        let (code, stderr) = run_to_exit(
            &["check-config"],
            &[
                ("WSGATE_UPSTREAM", "127.0.0.1:9".into()),
                ("WSGATE_MAX_PLAIN_REQUESTS", bad.into()),
            ],
        );
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("max_plain_requests") && stderr.contains(bad),
            "{bad}: {stderr}"
        );
    }
}
