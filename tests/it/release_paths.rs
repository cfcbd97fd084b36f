//! The slot comes back on every way a connection can end (docs/behaviour.md#the-client-port.6), the
//! metrics say so, and no descriptor stays open (the test process hosts the
//! upstream, wsgate and the client, so a leak anywhere shows).

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::config::{ConfigDuration, RawConfig};

async fn gate_for(up: std::net::SocketAddr, tweak: impl FnOnce(&mut RawConfig)) -> Sidecar {
    let mut raw = test_config(up).cap(4);
    tweak(&mut raw);
    spawn_sidecar(raw).await
}

/// Baseline descriptors once the sidecar, upstream and one admin scrape exist.
async fn baseline(gate: &Sidecar) -> usize {
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    open_fds()
}

/// The slot comes back within [`RELEASE_BOUND`] of the close.
async fn released_in_time(gate: &Sidecar) {
    let took = time_until_metric(gate.admin, ACTIVE, 0.0).await;
    assert!(took < RELEASE_BOUND, "released after {took:?}");
}

#[tokio::test]
async fn slot_freed_on_client_close_frame() {
    let up = spawn_echo_upstream().await;
    let gate = gate_for(up.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    echo_text(&mut ws, "x").await;
    assert_eq!(metric(gate.admin, ACTIVE).await, 1.0);
    close_cleanly(ws).await;
    released_in_time(&gate).await;
    assert_eq!(
        metric(gate.admin, "wsgate_connection_duration_seconds_count").await,
        1.0
    );
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn slot_freed_on_client_fin_with_no_traffic_ever() {
    let up = spawn_echo_upstream().await;
    let gate = gate_for(up.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    let (mut s, head) = raw_upgrade(gate.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_metric(gate.admin, ACTIVE, 1.0).await;
    s.shutdown().await.expect("FIN");
    // The upstream answers the passed-on FIN by closing; wsgate's close of
    // the client leg must be a FIN (clean EOF here), never a reset.
    let eof = within("EOF", s.read(&mut [0u8; 64])).await;
    assert!(matches!(eof, Ok(0)), "want a clean EOF, got {eof:?}");
    drop(s);
    released_in_time(&gate).await;
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn slot_freed_on_client_rst() {
    let up = spawn_echo_upstream().await;
    let gate = gate_for(up.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    let (s, head) = raw_upgrade(gate.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_metric(gate.admin, ACTIVE, 1.0).await;
    set_reset_on_close(&s);
    drop(s);
    released_in_time(&gate).await;
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn slot_freed_when_upstream_closes() {
    let up = spawn_upstream(Behaviour::CloseAfterUpgrade).await;
    let gate = gate_for(up.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    // The upstream's Close arrives; tungstenite answers it; the upstream then
    // closes TCP and wsgate passes the close on.
    within("upstream close", async { while ws.next_message().await {} }).await;
    drop(ws);
    released_in_time(&gate).await;
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn upstream_refusing_the_upgrade_is_passed_through_and_frees_slot() {
    let up = spawn_upstream(Behaviour::Refuse).await;
    let gate = gate_for(up.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    let resp = connect_refused(&gate.ws_url()).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.body().as_deref(), Some(&b"go away"[..]));
    assert_eq!(metric(gate.admin, ACTIVE).await, 0.0);
    assert_eq!(metric(gate.admin, REFUSED_UPGRADE).await, 1.0);
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn upstream_down_is_502_and_frees_slot() {
    let down = closed_port();
    let gate = gate_for(down.addr, |_| {}).await;
    let fds = baseline(&gate).await;
    assert_eq!(connect_refused(&gate.ws_url()).await.status(), 502);
    assert_eq!(metric(gate.admin, ACTIVE).await, 0.0);
    assert_eq!(
        metric(gate.admin, "wsgate_upstream_errors_total{kind=\"connect\"}").await,
        1.0
    );
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn upstream_silent_is_504_after_connect_timeout_and_frees_slot() {
    let up = spawn_upstream(Behaviour::Silent).await;
    let gate = gate_for(up.addr, |r| {
        r.upstream_connect_timeout = ConfigDuration(Duration::from_millis(300));
    })
    .await;
    let fds = baseline(&gate).await;
    let started = tokio::time::Instant::now();
    assert_eq!(connect_refused(&gate.ws_url()).await.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(metric(gate.admin, ACTIVE).await, 0.0);
    assert_eq!(
        metric(gate.admin, "wsgate_upstream_errors_total{kind=\"timeout\"}").await,
        1.0
    );
    // wsgate dropped its upstream socket; the silent upstream sees EOF and closes too.
    wait_fds(fds, 0).await;
}

#[tokio::test]
async fn upstream_bad_accept_is_502_and_frees_slot() {
    let up = spawn_upstream(Behaviour::BadAccept).await;
    let gate = gate_for(up.addr, |_| {}).await;
    assert_eq!(connect_refused(&gate.ws_url()).await.status(), 502);
    assert_eq!(metric(gate.admin, ACTIVE).await, 0.0);
    assert_eq!(metric(gate.admin, REFUSED_UPGRADE).await, 1.0);
}

#[tokio::test]
async fn half_close_held_open_by_upstream_is_released_after_half_close_timeout() {
    let up = spawn_upstream(Behaviour::HoldOpen).await;
    let gate = gate_for(up.addr, |r| {
        r.half_close_timeout = ConfigDuration(Duration::from_millis(500));
    })
    .await;
    let fds = baseline(&gate).await;
    let (mut s, head) = raw_upgrade(gate.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_metric(gate.admin, ACTIVE, 1.0).await;
    let started = tokio::time::Instant::now();
    s.shutdown().await.expect("FIN");
    // The upstream keeps sending after our FIN: those bytes still arrive,
    // until wsgate closes both legs at the half-close deadline.
    let received = read_to_eof(&mut s).await;
    let held = started.elapsed();
    assert!(
        received >= 3,
        "data after the half-close still flowed ({received} bytes)"
    );
    assert!(
        held >= Duration::from_millis(450),
        "closed too early: {held:?}"
    );
    assert!(
        held < Duration::from_millis(1500),
        "closed too late: {held:?}"
    );
    drop(s);
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    // The upstream's next write fails and it closes too.
    wait_fds(fds, 0).await;
}
