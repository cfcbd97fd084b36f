//! Close frames (docs/behaviour.md#close-frames): when wsgate ends a connection itself it says so
//! in WebSocket terms. A real client (tokio-tungstenite) sees the configured
//! code and reason; the upstream (tungstenite, which refuses unmasked client
//! frames) receives a masked Close with the same code; what was sent before
//! arrives complete; a frame in flight finishes first, or is cut at
//! `close_timeout` when its sender stalls.

use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::{ConfigDuration, RawConfig};

fn secs(s: f64) -> ConfigDuration {
    ConfigDuration(Duration::from_secs_f64(s))
}

/// Reads until the Close from wsgate; returns (code, reason) and the data
/// messages that came before it.
async fn until_close(ws: &mut Ws) -> ((u16, String), Vec<Message>) {
    let mut before = Vec::new();
    loop {
        match within("close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => {
                return ((u16::from(f.code), f.reason.to_string()), before)
            }
            Some(Ok(m)) => before.push(m),
            other => panic!("connection ended without a Close frame: {other:?}"),
        }
    }
}

/// Waits until the upstream has recorded a Close.
async fn upstream_close(up: &Upstream) -> (u16, String) {
    let start = Instant::now();
    loop {
        if let Some(c) = up.closes().into_iter().next() {
            return c;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the upstream never received a Close"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn drained_client_sees_1001_with_reason_and_upstream_a_masked_close() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        drain_period: secs(0.2),
        shutdown_grace: secs(5.0),
        ..test_config(up.addr)
    })
    .await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    echo_text(&mut ws, "before the drain").await;
    gate.signal();
    let ((code, reason), _) = until_close(&mut ws).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("draining"), "{reason}");
    let (code, reason) = upstream_close(&up).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("draining"), "{reason}");
    // tungstenite replied; the stream ends cleanly and the process exits.
    within("clean end", async { while ws.next().await.is_some() {} }).await;
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
}

#[tokio::test]
async fn lifetime_expiry_closes_with_the_configured_code() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        max_connection_lifetime: secs(0.3),
        lifetime_jitter: 0.0,
        close_code_lifetime: 1012,
        ..test_config(up.addr)
    })
    .await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    let ((code, reason), _) = until_close(&mut ws).await;
    assert_eq!(code, 1012);
    assert!(reason.contains("lifetime"), "{reason}");
    assert_eq!(upstream_close(&up).await.0, 1012);
    within("clean end", async { while ws.next().await.is_some() {} }).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_close_frames_sent_total{reason=\"lifetime\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(gate.admin, "wsgate_connections_expired_total").await,
        1.0
    );
}

#[tokio::test]
async fn idle_timeout_closes_with_the_configured_code() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        idle_timeout: secs(0.3),
        close_code_idle: 4000,
        ..test_config(up.addr)
    })
    .await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    let ((code, reason), _) = until_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4000, "idle timeout"));
    assert_eq!(upstream_close(&up).await, (4000, "idle timeout".to_owned()));
    within("clean end", async { while ws.next().await.is_some() {} }).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_close_frames_sent_total{reason=\"idle\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_before_the_close_arrive_complete_both_ways() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        max_connection_lifetime: secs(0.5),
        lifetime_jitter: 0.0,
        ..test_config(up.addr)
    })
    .await;
    let ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    let (mut sink, mut stream) = ws.split();
    let msg = |i: usize| format!("message {i} {}", "x".repeat(i % 700));
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        // Keep sending until the connection refuses: the Close is injected
        // between two of these frames, wherever the stream happens to be.
        while sent < 200_000 && sink.send(Message::text(msg(sent))).await.is_ok() {
            sent += 1;
            if sent % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        sent
    });
    let mut echoed = Vec::new();
    let close = loop {
        match within("echo or close", stream.next()).await {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(m)) => echoed.push(m),
            other => panic!("ended without a Close: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    let sent = within("sender stops", sender).await.expect("join");
    // Echoes: exactly the first k messages, in order, each intact.
    for (i, m) in echoed.iter().enumerate() {
        assert_eq!(m, &Message::text(msg(i)), "echo {i} altered");
    }
    // The upstream: exactly the first m messages, each intact, then a Close.
    upstream_close(&up).await;
    let at_upstream = up.data_messages();
    for (i, m) in at_upstream.iter().enumerate() {
        assert_eq!(
            m,
            &Message::text(msg(i)),
            "message {i} altered on its way up"
        );
    }
    assert!(at_upstream.len() >= echoed.len());
    assert!(!echoed.is_empty(), "nothing flowed before the close");
    println!(
        "sent {sent}, upstream got {} complete, {} echoes back before the Close",
        at_upstream.len(),
        echoed.len()
    );
}

#[tokio::test]
async fn a_fragmented_message_in_flight_finishes_before_the_close() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        max_connection_lifetime: secs(0.2),
        lifetime_jitter: 0.0,
        ..test_config(up.addr)
    })
    .await;
    let (mut s, head) = raw_upgrade(gate.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(&client_frame(0x1, false, b"hello, "))
        .await
        .expect("first fragment");
    s.write_all(&client_frame(0x9, true, b"ping between fragments"))
        .await
        .expect("ping");
    // The client-bound direction is idle, so wsgate's Close to us comes at
    // the lifetime; the upstream-bound one is inside a message.
    // The upstream's pong to our ping may come first; then wsgate's Close.
    let (b0, _, payload) = loop {
        let f = read_frame(&mut s).await;
        if f.0 != 0x8a {
            break f;
        }
    };
    assert_eq!(b0, 0x88, "a Close from wsgate");
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    s.write_all(&client_frame(0x0, true, b"world"))
        .await
        .expect("last fragment");
    let (code, _) = upstream_close(&up).await;
    assert_eq!(code, 1001);
    assert_eq!(
        up.data_messages(),
        vec![Message::text("hello, world")],
        "the message completed before the Close"
    );
    s.write_all(&client_frame(0x8, true, &1001u16.to_be_bytes()))
        .await
        .expect("close reply");
    read_to_eof(&mut s).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_frame_in_flight_finishes_before_the_close() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        max_connection_lifetime: secs(0.3),
        lifetime_jitter: 0.0,
        close_timeout: secs(5.0),
        ..test_config(up.addr)
    })
    .await;
    // Built before connecting: masking 16 MiB in a debug build takes longer
    // than the lifetime, and the frame must be in flight when it expires.
    let payload = pattern(16 << 20);
    let frame = client_frame(0x2, true, &payload);
    let (mut s, _) = raw_upgrade(gate.addr).await;
    s.write_all(&frame[..1 << 20]).await.expect("first MiB");
    let (b0, _, _) = read_frame(&mut s).await;
    assert_eq!(
        b0, 0x88,
        "the lifetime expired while the frame was in flight"
    );
    s.write_all(&frame[1 << 20..])
        .await
        .expect("the other 15 MiB");
    assert_eq!(upstream_close(&up).await.0, 1001);
    let got = up.data_messages();
    assert_eq!(got.len(), 1, "the whole frame arrived, then the Close");
    assert!(
        got[0].clone().into_data().as_ref() == payload.as_slice(),
        "the 16 MiB payload changed"
    );
    s.write_all(&client_frame(0x8, true, &1001u16.to_be_bytes()))
        .await
        .expect("close reply");
    read_to_eof(&mut s).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
}

#[tokio::test]
async fn a_stalled_frame_is_cut_at_close_timeout() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(RawConfig {
        max_connection_lifetime: secs(0.2),
        lifetime_jitter: 0.0,
        close_timeout: secs(0.5),
        ..test_config(up.addr)
    })
    .await;
    let fds = open_fds();
    let (mut s, _) = raw_upgrade(gate.addr).await;
    let frame = client_frame(0x2, true, &pattern(1 << 20));
    s.write_all(&frame[..4096])
        .await
        .expect("a start, then the sender stalls");
    let (b0, _, _) = read_frame(&mut s).await;
    assert_eq!(b0, 0x88);
    let closed_at = Instant::now();
    read_to_eof(&mut s).await;
    let waited = closed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "cut before close_timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "not cut at close_timeout: {waited:?}"
    );
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert!(
        up.data_messages().is_empty(),
        "a truncated frame must not reach the upstream as a message"
    );
    assert!(
        up.closes().is_empty(),
        "no Close can follow a frame cut in the middle"
    );
    drop(s);
    wait_fds(fds, 1).await;
}
