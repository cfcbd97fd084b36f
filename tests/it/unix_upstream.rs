//! An upstream on a Unix domain socket (docs/operations.md#unix-socket-upstream), through the wsgate binary
//! started the way a user starts it (`WSGATE_UPSTREAM=unix:/path`): real
//! upstreams listening on a socket file in a temp dir, real clients on
//! loopback. Everything but the connect is the same as over TCP: the echo,
//! the `Host` header, 502/504 and their metrics, the slot on every way a
//! session ends, non-101 answers, plain HTTP with a pooled connection; and
//! the configuration values that are refused.
//!
//! The descriptor checks read the wsgate child's `/proc/PID/fd`: the test
//! process hosts the upstreams and clients, the child only wsgate.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The connect errors counted so far.
const CONNECT_ERRORS: &str = "wsgate_upstream_errors_total{kind=\"connect\"}";

/// The wsgate binary in front of `upstream` (`unix:/path`) with `env` on
/// top; (process, proxy, admin).
fn gate(upstream: &str, env: &[(&str, &str)]) -> (GateProcess, SocketAddr, SocketAddr) {
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    tokio::task::block_in_place(|| GateProcess::proxy_to(upstream, &[], &env, None))
}

/// The child's open descriptors once its listeners exist and one scrape
/// has been served (so its lazily opened ones are in the count).
async fn baseline_fds(gate: &GateProcess, admin: SocketAddr) -> usize {
    wait_metric(admin, ACTIVE, 0.0).await;
    gate.stat().fds
}

/// The slot comes back within [`RELEASE_BOUND`].
async fn released_in_time(admin: SocketAddr) {
    let took = time_until_metric(admin, ACTIVE, 0.0).await;
    assert!(took < RELEASE_BOUND, "released after {took:?}");
}

/// `wsgate_sessions_ended_total` for one `closed_by` and `end`.
async fn sessions_ended(admin: SocketAddr, closed_by: &str, end: &str) -> f64 {
    labelled_metric(
        admin,
        "wsgate_sessions_ended_total",
        &[("closed_by", closed_by), ("end", end)],
    )
    .await
}

/// Sends `msg` and expects it back.
async fn echo(ws: &mut Ws, msg: Message) {
    within("send", ws.send(msg.clone())).await.expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("stream open")
        .expect("message");
    assert!(got == msg, "the echo differs ({} bytes sent)", msg.len());
}

/// A raw upgrade request; `host` = `None` sends no `Host` header at all.
fn upgrade_head(path: &str, host: Option<&str>) -> String {
    let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
    format!(
        "GET {path} HTTP/1.1\r\n{host}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// A raw plain GET with `Connection: close`; `host` as for [`upgrade_head`].
fn get_head(path: &str, host: Option<&str>) -> String {
    let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
    format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n")
}

/// The `Host` the upstream saw on the request for `path`.
fn host_seen(up: &UnixUpstream, path: &str) -> String {
    let seen = up.seen.lock().expect("lock");
    let req = seen
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the upstream never saw {path}"));
    req.headers
        .iter()
        .filter(|(k, _)| k == "host")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An upgraded upstream that reads until its socket ends, then says so
/// on the channel (one message per connection).
fn upstream_reporting_eof() -> (UnixUpstream, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (eof_tx, eof_rx) = tokio::sync::mpsc::unbounded_channel();
    let up = upgraded_upstream(move |mut s: UnixStream| {
        let eof_tx = eof_tx.clone();
        async move {
            discard_until_eof(&mut s).await;
            let _ = eof_tx.send(());
        }
    });
    (up, eof_rx)
}

/// An upstream that answers the upgrade with a valid 101 and hands the
/// socket to `then`.
fn upgraded_upstream<F, Fut>(then: F) -> UnixUpstream
where
    F: Fn(UnixStream) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    spawn_unix_raw_upstream(move |mut s: UnixStream| {
        let then = then.clone();
        async move {
            let head = read_request_head(&mut s).await;
            if s.write_all(switching_response(&head).as_bytes())
                .await
                .is_ok()
            {
                then(s).await;
            }
        }
    })
}

// ---------------------------------------------------------------- a session

/// Text, binary and a 1 MiB message echo through a Unix upstream; the
/// client's Close 1000 is answered with 1000; then the slot, the active
/// gauge and wsgate's descriptors are back, and the byte and message
/// metrics moved both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_text_binary_and_1_mib_and_gives_everything_back_after_close_1000() {
    let up = spawn_unix_upstream(Behaviour::Echo);
    let (gate, proxy, admin) = gate(&up.upstream(), &[("WSGATE_MAX_CLIENTS", "1")]);
    let fds = baseline_fds(&gate, admin).await;
    let url = format!("ws://{proxy}/");

    let mut ws = within("connect", connect(&url)).await.expect("admitted");
    assert_eq!(metric(admin, ACTIVE).await, 1.0);
    echo(&mut ws, Message::text("over a unix socket")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await;
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    echo(&mut ws, Message::binary(big)).await;

    within(
        "close",
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))),
    )
    .await
    .expect("close");
    let reply = within("the Close reply", ws.next())
        .await
        .expect("stream open")
        .expect("a frame");
    match reply {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected Close 1000, got {other:?}"),
    }
    within("EOF after the close", async {
        while ws.next().await.is_some() {}
    })
    .await;
    drop(ws);

    released_in_time(admin).await;
    assert_eq!(sessions_ended(admin, "client", "client_close").await, 1.0);
    let text = scrape(admin).await;
    for direction in ["client_to_upstream", "upstream_to_client"] {
        let bytes = labelled_value(
            &text,
            "wsgate_transferred_bytes_total",
            &[("direction", direction)],
        )
        .expect("bytes series");
        assert!(bytes > f64::from(1 << 20), "{direction}: {bytes} bytes");
        let msgs = labelled_value(&text, "wsgate_messages_total", &[("direction", direction)])
            .expect("messages series");
        assert!(msgs >= 3.0, "{direction}: {msgs} messages");
    }
    wait_child_fds(&gate, fds).await;
    // The cap is 1: the slot is free again.
    let mut again = within("connect again", connect(&url))
        .await
        .expect("the slot came back");
    echo(&mut again, Message::text("again")).await;
    close_cleanly(again).await;
    released_in_time(admin).await;
}

// ---------------------------------------------------------------- Host

/// With no `Host` from the client the upstream sees `Host: localhost`
/// (the socket has no host name); with one, the client's. On the upgrade
/// and on plain requests alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_host_localhost_unless_the_client_sent_one() {
    let up = spawn_unix_counting_upstream();
    let (_gate, proxy, admin) = gate(&up.upstream(), &[]);

    for (path, host) in [("/ws-bare", None), ("/ws-named", Some("chat.example:8443"))] {
        let mut s = within("connect", TcpStream::connect(proxy))
            .await
            .expect("connect");
        s.write_all(upgrade_head(path, host).as_bytes())
            .await
            .expect("write");
        let head = read_head(&mut s).await;
        assert_eq!(status_of(&head), 101, "{path}: {head}");
        drop(s);
    }
    for (path, host) in [("/plain-bare", None), ("/plain-named", Some("api.example"))] {
        let answer = raw_exchange(proxy, get_head(path, host).as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{path}: {answer}");
    }
    assert_eq!(host_seen(&up, "/ws-bare"), "localhost");
    assert_eq!(host_seen(&up, "/ws-named"), "chat.example:8443");
    assert_eq!(host_seen(&up, "/plain-bare"), "localhost");
    assert_eq!(host_seen(&up, "/plain-named"), "api.example");
    wait_metric(admin, ACTIVE, 0.0).await;
}

// ---------------------------------------------------------------- 502, 504

/// No socket file: 502, `kind="connect"` +1, no slot taken. Once the app
/// creates its socket at that path, the same (single) slot admits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_file_is_502_counted_as_connect_and_takes_no_slot() {
    let (_dir, path) = unix_socket_path();
    let upstream = format!("unix:{}", path.display());
    let (gate, proxy, admin) = gate(&upstream, &[("WSGATE_MAX_CLIENTS", "1")]);
    let fds = baseline_fds(&gate, admin).await;
    let url = format!("ws://{proxy}/");
    assert_eq!(metric(admin, CONNECT_ERRORS).await, 0.0);
    for n in 1..=2 {
        assert_eq!(connect_refused(&url).await.status(), 502);
        assert_eq!(metric(admin, CONNECT_ERRORS).await, f64::from(n));
        assert_eq!(metric(admin, ACTIVE).await, 0.0);
    }
    wait_child_fds(&gate, fds).await;

    let _up = spawn_unix_upstream_at(&path, Behaviour::Echo);
    let mut ws = within("connect", connect(&url))
        .await
        .expect("admitted: no slot was kept by the 502s");
    echo_text(&mut ws, "the app is up").await;
    close_cleanly(ws).await;
    released_in_time(admin).await;
}

/// A socket file whose listener never accepts: the connect completes (the
/// kernel queues it), the answer never comes: 504 after
/// `upstream_connect_timeout`, `kind="timeout"`, the slot and wsgate's
/// socket given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_answers_is_504_after_the_connect_timeout() {
    let (_dir, path) = unix_socket_path();
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let upstream = format!("unix:{}", path.display());
    let (gate, proxy, admin) = gate(&upstream, &[("WSGATE_UPSTREAM_CONNECT_TIMEOUT", "300ms")]);
    let fds = baseline_fds(&gate, admin).await;
    let started = Instant::now();
    assert_eq!(
        connect_refused(&format!("ws://{proxy}/")).await.status(),
        504
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        metric(admin, "wsgate_upstream_errors_total{kind=\"timeout\"}").await,
        1.0
    );
    assert_eq!(metric(admin, CONNECT_ERRORS).await, 0.0);
    assert_eq!(metric(admin, ACTIVE).await, 0.0);
    wait_child_fds(&gate, fds).await;
}

// ---------------------------------------------------------------- the ends of a session

/// The upstream closes (FIN) in the middle of a session: the client's leg
/// is closed, `upstream_eof`, the slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fin_mid_session_gives_the_slot_back() {
    let up = upgraded_upstream(|mut s: UnixStream| async move {
        // One frame's worth, then FIN.
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        let _ = s.shutdown().await;
        discard_until_eof(&mut s).await;
    });
    the_client_leg_closes_and_the_slot_comes_back(
        &up,
        &client_frame(0x1, true, b"hello"),
        "the upstream's FIN reached the client",
    )
    .await;
}

/// The upstream goes away with bytes it never read (a crash): on a Unix
/// socket that is a reset (`ECONNRESET` at wsgate). The client's leg is
/// closed, `upstream_eof`, the slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_session_gives_the_slot_back() {
    let up = upgraded_upstream(|s: UnixStream| async move {
        // Wait until the client's bytes are in the receive queue, then
        // close without reading them.
        let _ = s.readable().await;
        drop(s);
    });
    the_client_leg_closes_and_the_slot_comes_back(
        &up,
        &client_frame(0x2, true, &[7; 100]),
        "the client's leg was closed",
    )
    .await;
}

/// A session through `up` in which the client sends `frame` and the
/// upstream then ends it: the client's leg is closed (`what`), the
/// session counts as `upstream_eof`, the slot and every descriptor of
/// wsgate come back.
async fn the_client_leg_closes_and_the_slot_comes_back(
    up: &UnixUpstream,
    frame: &[u8],
    what: &str,
) {
    let (gate, proxy, admin) = gate(&up.upstream(), &[]);
    let fds = baseline_fds(&gate, admin).await;
    let mut s = within("upgrade", raw_tunnel(proxy)).await;
    wait_metric(admin, ACTIVE, 1.0).await;
    s.write_all(frame).await.expect("send");
    assert!(closed_within(&mut s, DEADLINE).await, "{what}");
    drop(s);
    released_in_time(admin).await;
    assert_eq!(sessions_ended(admin, "none", "upstream_eof").await, 1.0);
    wait_child_fds(&gate, fds).await;
}

/// The client goes away (RST) while the Unix upstream is quiet: the slot
/// comes back and the upstream's socket is closed (it reads EOF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_gives_the_slot_back_and_closes_the_unix_leg() {
    let (up, mut eof_rx) = upstream_reporting_eof();
    let (gate, proxy, admin) = gate(&up.upstream(), &[]);
    let fds = baseline_fds(&gate, admin).await;
    let s = within("upgrade", raw_tunnel(proxy)).await;
    wait_metric(admin, ACTIVE, 1.0).await;
    set_reset_on_close(&s);
    drop(s);
    released_in_time(admin).await;
    within("the upstream's EOF", eof_rx.recv())
        .await
        .expect("the upstream task reports");
    assert_eq!(sessions_ended(admin, "none", "client_eof").await, 1.0);
    wait_child_fds(&gate, fds).await;
}

// ---------------------------------------------------------------- non-101, plain HTTP

/// A refused upgrade (403 with a body) reaches the client as it is, read
/// again from the Unix socket; no slot kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_with_403_passes_status_and_body() {
    let up = spawn_unix_upstream(Behaviour::Refuse);
    let (gate, proxy, admin) = gate(&up.upstream(), &[]);
    let fds = baseline_fds(&gate, admin).await;
    let resp = connect_refused(&format!("ws://{proxy}/")).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.body().as_deref(), Some(&b"go away"[..]));
    assert_eq!(metric(admin, REFUSED_UPGRADE).await, 1.0);
    assert_eq!(metric(admin, ACTIVE).await, 0.0);
    wait_child_fds(&gate, fds).await;
}

/// Plain GETs go through to the Unix upstream, and two in a row share one
/// pooled keep-alive connection to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_goes_through_and_two_requests_share_a_pooled_connection() {
    let up = spawn_unix_upstream(Behaviour::Echo);
    let (_gate, proxy, admin) = gate(&up.upstream(), &[]);
    for n in 1..=2 {
        let (status, body) = http_get(proxy, &format!("/health/{n}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&format!("GET /health/{n}")), "{body}");
    }
    assert_eq!(
        up.accepts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the second request reused the pooled connection"
    );
    assert_eq!(
        metric(admin, "wsgate_http_requests_total{class=\"2xx\"}").await,
        2.0
    );
}

// ---------------------------------------------------------------- configuration

/// A `unix:` upstream that cannot be a socket path stops wsgate with exit
/// code 2 before it binds anything, naming `upstream`, the value and what
/// is accepted.
#[test]
fn bad_unix_upstreams_exit_2_naming_the_key_and_the_value() {
    let too_long = format!("unix:/{}", "s".repeat(107));
    for value in ["unix:run/app/ws.sock", "unix:", "unix:./ws.sock", &too_long] {
        let (code, stderr) = run_to_exit(&["check-config"], &[("WSGATE_UPSTREAM", value.into())]);
        assert_eq!(code, Some(2), "{value}: {stderr}");
        assert!(
            stderr.contains("upstream")
                && stderr.contains(value)
                && stderr.contains("unix:/absolute/path"),
            "{value}: {stderr}"
        );
    }
}

/// `check-config` prints a Unix upstream as it was given, and the longest
/// path a socket takes (107 bytes) is accepted.
#[test]
fn check_config_prints_a_unix_upstream_as_given() {
    let longest = format!("unix:/{}", "s".repeat(106));
    for value in ["unix:/run/app/ws.sock", &longest] {
        let mut gate = GateProcess::start(
            &["check-config"],
            &[("WSGATE_UPSTREAM", value.into())],
            None,
        );
        let status = gate.wait_exit();
        assert_eq!(status.code(), Some(0), "{value}: {}", gate.stderr_text());
        let line = format!("upstream = \"{value}\"");
        gate.wait_for(&gate.stdout, &line);
    }
}

// ---------------------------------------------------------------- keepalive, client leg

/// Tests that make a socket vanish with `TCP_REPAIR` and so need
/// `CAP_NET_ADMIN`. The module name is the marker `.ci/run` filters on
/// (`test(/needs_cap_net_admin::/)`) where the capability is missing; where
/// they run, they must pass.
mod needs_cap_net_admin {
    use super::*;

    /// docs/operations.md#unix-socket-upstream: `tcp_keepalive` still applies to the client leg with a
    /// Unix upstream: a client that vanished is found by the keepalive
    /// probe (answered with RST) and its slot released, and the upstream's
    /// socket closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vanished_client_is_found_by_keepalive_on_the_client_leg() {
        let (up, mut eof_rx) = upstream_reporting_eof();
        let (_gate, proxy, admin) = gate(&up.upstream(), &[("WSGATE_TCP_KEEPALIVE", "1s")]);
        let py = Py::start(
            VANISHING_CLIENT,
            &[proxy.ip().to_string(), proxy.port().to_string()],
        );
        let status = tokio::task::block_in_place(|| py.line());
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        assert_eq!(
            tokio::task::block_in_place(|| py.line()),
            "vanished",
            "TCP_REPAIR refused: this test needs CAP_NET_ADMIN \
             (.ci/run leaves it out where it is missing)"
        );
        let start = Instant::now();
        wait_metric(admin, ACTIVE, 0.0).await;
        let took = start.elapsed();
        assert!(took < Duration::from_secs(5), "released after {took:?}");
        within("the upstream's EOF", eof_rx.recv())
            .await
            .expect("the upstream task reports");
    }
}
