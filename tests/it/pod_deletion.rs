//! Pod deletion in the native-sidecar layout (docs/operations.md#pod-deletion):
//! `wsgate prestop`, signalled like the app at the start of the deletion,
//! makes wsgate drain through `POST /shutdown` on its admin port; wsgate then
//! stays up, not ready, until its own SIGTERM. Both are the real binary.
//! The whole pod, rendered by the chart and run in the kubelet's order, is
//! deploy/tests/test_pod_lifecycle.py.

use std::time::Duration;

use crate::support::access::{start_gate, wait_stderr};
use crate::support::admin::{self, TokenFile};
use crate::support::*;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Reads `ws` to its end: the Close code received (None without a Close
/// frame) and when, from `start`.
fn watch_close(mut ws: Ws, start: Instant) -> tokio::task::JoinHandle<(Option<u16>, Duration)> {
    tokio::spawn(async move {
        let mut code = None;
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(frame) = message {
                code = frame.map(|f| u16::from(f.code));
            }
        }
        (code, start.elapsed())
    })
}

/// Waits (off the runtime) for a child to exit.
async fn exit_of(mut child: GateProcess) -> (std::process::ExitStatus, GateProcess) {
    tokio::task::spawn_blocking(move || (child.wait_exit(), child))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prestop_hook_drains_wsgate_before_its_own_sigterm() {
    let up = spawn_echo_upstream().await;
    let gate = start_gate(
        up.addr,
        &[],
        &[
            ("WSGATE_SHUTDOWN_DELAY", "500ms".to_owned()),
            ("WSGATE_DRAIN_PERIOD", "2s".to_owned()),
            ("WSGATE_SHUTDOWN_GRACE", "10s".to_owned()),
        ],
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = within("connect", connect(&format!("ws://{}/", gate.proxy)))
            .await
            .expect("admitted");
        echo_text(&mut ws, "hello").await;
        clients.push(ws);
    }
    wait_metric(gate.admin, "wsgate_connections_active", 20.0).await;
    let hook = GateProcess::start(&["prestop", "--admin", &gate.admin.to_string()], &[], None);
    hook.wait_for(&hook.stderr, "waiting for the pod's deletion");
    assert_eq!(
        http_get(gate.admin, "/readyz").await.0,
        200,
        "the hook alone changes nothing before its SIGTERM"
    );

    let start = Instant::now();
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|ws| watch_close(ws, start))
        .collect();
    hook.signal("TERM");
    wait_stderr(&gate, "POST /shutdown").await;
    assert_eq!(
        http_get(gate.admin, "/readyz").await,
        (503, "draining\n".to_owned())
    );
    let (status, hook) = within("the hook returns", exit_of(hook)).await;
    let hook_done = start.elapsed();
    assert!(
        status.success(),
        "prestop: {status}; {}",
        hook.stderr_text()
    );
    // The pipe's reader may still be behind the exit: poll, bounded.
    hook.wait_for(&hook.stderr, "wsgate has drained");

    let mut closes = Vec::new();
    for w in watchers {
        closes.push(within("client closed", w).await.expect("join"));
    }
    let codes: Vec<_> = closes.iter().map(|(code, _)| *code).collect();
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "every client gets close_code_drain from wsgate: {codes:?}"
    );
    let mut times: Vec<_> = closes.iter().map(|(_, at)| *at).collect();
    times.sort();
    assert!(
        times[0] >= Duration::from_millis(450),
        "the shutdown delay kept admitting: first close at {:?}",
        times[0]
    );
    assert!(
        *times.last().expect("20") <= hook_done,
        "the hook returned at {hook_done:?}, before the last close at {:?}",
        times.last()
    );
    let spread = *times.last().expect("20") - times[0];
    assert!(
        spread >= Duration::from_millis(1200),
        "the closes are paced over the 2 s drain, not at once: {spread:?}"
    );
    wait_metric(gate.admin, "wsgate_connections_drained_total", 20.0).await;
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;

    // Drained, still up and not ready, until its own SIGTERM; then it ends
    // at once: there is nothing left to drain.
    assert_eq!(http_get(gate.admin, "/readyz").await.0, 503);
    assert!(gate.stderr().contains("exiting at SIGTERM"));
    gate.process.signal("TERM");
    let signalled = Instant::now();
    let (status, _) = within("wsgate exits", exit_of(gate.process)).await;
    assert!(status.success(), "wsgate: {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn shutdown_is_post_only_and_loopback_needs_no_token() {
    let up = spawn_echo_upstream().await;
    let token = TokenFile::new("s3cret-admin-token");
    let gate = start_gate(
        up.addr,
        &[],
        &[
            ("WSGATE_ADMIN_TOKEN_FILE", token.env()),
            ("WSGATE_SHUTDOWN_DELAY", "0s".to_owned()),
            ("WSGATE_DRAIN_PERIOD", "0s".to_owned()),
        ],
    )
    .await;
    let get = admin::request(gate.admin, "GET", "/shutdown", &[], None).await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    assert_eq!(
        http_get(gate.admin, "/readyz").await.0,
        200,
        "a GET starts nothing"
    );
    // From the pod's own loopback, without the token a /drain would need.
    let post = admin::request(gate.admin, "POST", "/shutdown", &[], None).await;
    assert_eq!((post.status, post.body.as_str()), (200, "drained\n"));
    assert_eq!(http_get(gate.admin, "/readyz").await.0, 503);
    // A second request (a retried hook) finds it over and answers at once.
    let again = admin::request(gate.admin, "POST", "/shutdown", &[], None).await;
    assert_eq!(again.status, 200);
    // The client port is closed: the drain has ended.
    assert!(tokio::net::TcpStream::connect(gate.proxy).await.is_err());
}
