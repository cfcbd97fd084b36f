//! `wsgate demo`: a built-in WebSocket echo upstream on loopback, with the
//! proxy in front of it, so a newcomer sees admission work in one command.
//!
//! The demo's defaults differ from the binary's: loopback addresses
//! (127.0.0.1:8080 and :9090) and a cap of 2, so the third concurrent client
//! is refused. `WSGATE_*` variables and `--config` still apply on top.

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::config::RawConfig;

/// The demo's defaults: loopback only, cap 2. The upstream is a placeholder,
/// replaced by the echo server's real address once it is bound.
pub fn defaults() -> RawConfig {
    RawConfig {
        listen: "127.0.0.1:8080".into(),
        admin_listen: "127.0.0.1:9090".into(),
        upstream: Some("127.0.0.1:1".into()),
        max_clients: 2,
        ..RawConfig::default()
    }
}

/// Serves WebSocket echo on `listener` until the future is dropped (which
/// aborts every echo connection too).
pub async fn echo_upstream(listener: TcpListener) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(echo(stream));
            }
            Err(e) => {
                tracing::debug!(error = %e, "echo accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    // Data messages go back as they came; tungstenite answers pings and
    // close frames by itself.
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}
