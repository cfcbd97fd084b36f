//! `wsgate demo`: a built-in upstream on loopback, with the proxy in front of
//! it, so a newcomer sees admission work in one command.
//!
//! The upstream answers on one port what a real app behind wsgate would:
//! `GET /` is a small page (`demo/page.html`) whose script opens WebSockets
//! back through wsgate and shows which are admitted and which refused, so a
//! browser shows the cap; every WebSocket upgrade is echoed; anything else is
//! 404. Plain HTTP matters because wsgate forwards it (docs/behaviour.md#the-client-port): a `curl` of
//! the proxy must get an answer, not a 502.
//!
//! The demo's defaults differ from the binary's: loopback addresses
//! (127.0.0.1:8080 and :9090) and a cap of 2, so the third concurrent client
//! is refused. `WSGATE_*` variables and `--config` still apply on top.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::config::RawConfig;
use crate::headers::{classify, RequestKind};

/// The page served at `/`: self-contained (no external resources), because
/// the demo must work on a machine without a network.
const PAGE: &str = include_str!("demo/page.html");

/// The demo's defaults: loopback only, cap 2. The upstream is a placeholder,
/// replaced by the demo upstream's real address once it is bound.
pub fn defaults() -> RawConfig {
    RawConfig {
        listen: "127.0.0.1:8080".into(),
        admin_listen: "127.0.0.1:9090".into(),
        upstream: Some("127.0.0.1:1".into()),
        max_clients: 2,
        ..RawConfig::default()
    }
}

/// Serves the demo upstream (page at `/`, WebSocket echo on any path) on
/// `listener` until the future is dropped, which drops every connection too:
/// each one, WebSocket included, lives in one task of the `JoinSet`.
pub async fn echo_upstream(listener: TcpListener) {
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections, so a long demo does not accumulate them.
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(connection(stream));
            }
            Err(e) => {
                tracing::debug!(error = %e, "demo upstream accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One TCP connection: HTTP/1 requests until one of them is upgraded, then
/// the WebSocket echo on the same task.
async fn connection(stream: TcpStream) {
    // hyper hands the upgraded IO to the request's `OnUpgrade`; the handler
    // parks it here so the echo runs in this task rather than a detached
    // one that would outlive the demo.
    let upgrade: Arc<Mutex<Option<OnUpgrade>>> = Arc::default();
    let slot = Arc::clone(&upgrade);
    let service = service_fn(move |req| {
        let slot = Arc::clone(&slot);
        async move { Ok::<_, Infallible>(respond(req, &slot)) }
    });
    let served = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "demo upstream connection ended with an error");
        return;
    }
    let pending = upgrade
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(pending) = pending {
        match pending.await {
            Ok(upgraded) => echo(TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!(error = %e, "demo upstream upgrade failed"),
        }
    }
}

/// Answers one request: the page, a 101 for a valid WebSocket handshake
/// (leaving its `OnUpgrade` in `slot`), or a short text refusal.
fn respond(mut req: Request<Incoming>, slot: &Mutex<Option<OnUpgrade>>) -> Response<Full<Bytes>> {
    // The same rules as wsgate's own front door, so the demo upstream never
    // accepts a handshake wsgate would refuse (or the other way round).
    match classify(req.method(), req.version(), req.headers()) {
        Ok(RequestKind::WebSocket) => {
            // classify() has checked that exactly one valid key is present.
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
                return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
            };
            let accept = derive_accept_key(key.as_bytes().trim_ascii());
            let Ok(accept) = HeaderValue::from_str(&accept) else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key\n");
            };
            *slot.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(hyper::upgrade::on(&mut req));
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            resp
        }
        Ok(RequestKind::Plain) => page_or_not_found(req.method(), req.uri().path()),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// `/` is the page; any other path is 404.
fn page_or_not_found(method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path != "/" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the wsgate demo serves a page at / and a WebSocket echo\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served at /\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page is compiled in: a browser should not keep an old build's copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Echoes data messages back as they came; tungstenite answers pings and
/// close frames by itself.
async fn echo(io: TokioIo<hyper::upgrade::Upgraded>) {
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}
