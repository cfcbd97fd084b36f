//! What flows through: WebSocket messages intact in both directions, the
//! upstream's subprotocol, plain HTTP both ways with streaming bodies, the
//! forwarding headers, and that `/metrics` is never served on the client port.

use crate::support::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed)
        .collect()
}

#[tokio::test]
async fn text_and_binary_messages_up_to_1mib_echo_intact() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    for (i, len) in [0usize, 1, 125, 126, 65_535, 65_536, 300_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let bin = pattern(len, i as u8);
        within("send", ws.send(Message::binary(bin.clone())))
            .await
            .expect("send");
        let got = within("echo", ws.next())
            .await
            .expect("open")
            .expect("message");
        assert_eq!(got.into_data().as_ref(), &bin[..], "binary of {len} bytes");
        let text: String = (0..len)
            .map(|j| char::from(b'a' + (j % 26) as u8))
            .collect();
        within("send", ws.send(Message::text(text.clone())))
            .await
            .expect("send");
        let got = within("echo", ws.next())
            .await
            .expect("open")
            .expect("message");
        assert_eq!(got, Message::text(text), "text of {len} bytes");
    }
    let c2u = metric(
        gate.admin,
        "wsgate_transferred_bytes_total{direction=\"client_to_upstream\"}",
    )
    .await;
    let u2c = metric(
        gate.admin,
        "wsgate_transferred_bytes_total{direction=\"upstream_to_client\"}",
    )
    .await;
    // Payloads of ~2.8 MiB each way plus framing (client frames are masked: +4 bytes each).
    assert!(
        c2u > 2.0 * 1_366_000.0 && u2c > 2.0 * 1_366_000.0,
        "c2u {c2u} u2c {u2c}"
    );
    assert!(c2u > u2c, "masked client frames are larger");
}

#[tokio::test]
async fn subprotocol_chosen_by_upstream_reaches_client() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let mut req = gate.ws_url().into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().expect("value"),
    );
    let (mut ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("admitted");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v2");
    echo_text(&mut ws, "with protocol").await;
}

/// One request over a fresh HTTP/1.1 connection with a hyper client.
async fn send(
    addr: std::net::SocketAddr,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = within("response", sender.send_request(req))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = within("body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    (parts.status, parts.headers, body)
}

#[tokio::test]
async fn plain_get_passes_through_with_forwarding_headers_and_no_hop_by_hop() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let req = Request::get("/api/items?x=1")
        .header("host", "app.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, headers, body) = send(gate.addr, req).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["x-upstream"], "yes",
        "the upstream's response headers come back"
    );
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.starts_with("GET /api/items?x=1\n"), "{seen}");
    assert!(seen.contains("host: app.example\n"), "{seen}");
    assert!(seen.contains("x-custom: kept\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: app.example\n"), "{seen}");
    assert!(
        !seen.contains("x-private") && !seen.contains("keep-alive: timeout"),
        "{seen}"
    );
    assert_eq!(
        metric(gate.admin, "wsgate_http_requests_total{class=\"2xx\"}").await,
        1.0
    );
    assert_eq!(
        metric(gate.admin, "wsgate_connections_active").await,
        0.0,
        "plain HTTP is not counted"
    );
}

#[tokio::test]
async fn multi_mib_post_streams_through_unchanged() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr).cap(1)).await;
    let payload = Bytes::from(pattern(6 << 20, 7));
    let req = Request::post("/upload")
        .header("host", "app")
        .body(Full::new(payload.clone()))
        .expect("request");
    let (status, _, body) = send(gate.addr, req).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), payload.len());
    assert!(body == payload, "body changed in transit");
}

#[tokio::test]
async fn metrics_are_not_served_on_the_client_port() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let (status, body) = http_get(gate.addr, "/metrics").await;
    assert_eq!(status, 200, "answered by the upstream");
    assert!(
        body.starts_with("GET /metrics"),
        "the upstream saw it: {body}"
    );
    assert!(!body.contains("wsgate_connections_active"), "{body}");
    let (status, body) = http_get(gate.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("wsgate_connections_active"));
}

#[tokio::test]
async fn plain_http_to_a_down_upstream_is_502() {
    let down = closed_port();
    let gate = spawn_sidecar(test_config(down.addr)).await;
    let (status, _) = http_get(gate.addr, "/").await;
    assert_eq!(status, 502);
    assert_eq!(
        metric(gate.admin, "wsgate_http_requests_total{class=\"5xx\"}").await,
        1.0
    );
}

#[tokio::test]
async fn malformed_handshake_is_400_without_slot_or_upstream() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr).cap(1)).await;
    let text = raw_exchange(
        gate.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let text = raw_exchange(
        gate.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(
        up.accepts.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "upstream not contacted"
    );
    assert_eq!(
        metric(gate.admin, "wsgate_connections_admitted_total").await,
        0.0
    );
    within("still admits", connect(&gate.ws_url()))
        .await
        .expect("the one slot is free");
}

#[tokio::test]
async fn head_over_64kib_is_431() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let big = "a".repeat(70 * 1024);
    let text = raw_exchange(
        gate.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "{}",
        &text[..text.len().min(200)]
    );
}

#[tokio::test]
async fn draining_keeps_sessions_refuses_new_and_flips_readiness() {
    let up = spawn_echo_upstream().await;
    let mut raw = test_config(up.addr);
    raw.shutdown_grace = wsgate::config::ConfigDuration(std::time::Duration::from_secs(30));
    let gate = spawn_sidecar(raw).await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    assert_eq!(http_get(gate.admin, "/readyz").await.0, 200);
    assert_eq!(metric(gate.admin, "wsgate_ready").await, 1.0);
    gate.signal();
    wait_metric(gate.admin, "wsgate_ready", 0.0).await;
    assert_eq!(
        http_get(gate.admin, "/readyz").await,
        (503, "draining\n".to_owned())
    );
    assert_eq!(http_get(gate.admin, "/healthz").await.0, 200);
    // The session admitted before the signal keeps working during the grace.
    for i in 0..5 {
        echo_text(&mut ws, &format!("during drain {i}")).await;
    }
    // The listener is closed: a new client cannot even connect.
    assert!(
        TcpStream::connect(gate.addr).await.is_err(),
        "listener still open while draining"
    );
    // When the last session ends, the process is done well before the grace.
    close_cleanly(ws).await;
    within("run returns", gate.task)
        .await
        .expect("join")
        .expect("clean exit");
}
