//! The accept loop on the client port, and what serves each connection:
//! the fast path when its first request is a WebSocket upgrade
//! (`crate::first_head`, `Proxy::upgrade_on`), hyper's HTTP/1 server for
//! anything else.
//!
//! Every connection task is spawned on the shutdown tracker. When draining
//! starts the loop returns, which drops (closes) the listener; a connection
//! that has sent nothing yet is closed, and each hyper connection is told
//! `graceful_shutdown()`: idle keep-alive connections close, a request in
//! flight finishes. Upgrades hyper answered hand their socket to a tunnel
//! task of their own, tracked too.
//!
//! Accept errors such as `EMFILE` (descriptors exhausted) are not a reason to
//! die or to spin: the loop logs once per interval and backs off, while the
//! connections already open keep working.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, Instant};

use crate::first_head::{self, First, Replayed, MAX_HEAD_BYTES};
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;
use crate::tcp;

/// How often a persisting accept error is logged.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Accepts connections until draining starts, then returns (closing the
/// listener).
pub(crate) async fn serve(listener: TcpListener, proxy: Proxy, shutdown: Shutdown) {
    // Accepted sockets inherit these; see `tcp::configure_listener`.
    let listener_keepalive = proxy.config().tcp_keepalive;
    tcp::configure_listener(&listener, listener_keepalive);
    // One HTTP/1 builder for all connections (it holds an allocated timer);
    // rebuilt only when a reload changes the head timeout.
    let mut head_timeout = proxy.config().header_read_timeout;
    let mut builder = http1_builder(head_timeout);
    // Connections the kernel completed before the listener was configured
    // lack its options; they sit at the front of the (FIFO) accept queue, so
    // once one accepted socket shows the options, every later one has them
    // too and the check (a getsockopt per connection) stops.
    let mut check_inherited = true;
    let mut backoff = BACKOFF_MIN;
    let mut errors_since_log = 0u64;
    let mut last_log: Option<Instant> = None;

    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.draining() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let config = proxy.config();
                if config.header_read_timeout != head_timeout {
                    head_timeout = config.header_read_timeout;
                    builder = http1_builder(head_timeout);
                }
                // Settings come from the configuration in force (hot reload
                // applies to new connections); socket options normally came
                // with the listener, but not when a reload changed them since.
                if config.tcp_keepalive != listener_keepalive {
                    tcp::configure_accepted(&stream, config.tcp_keepalive);
                } else if check_inherited {
                    if tcp::inherited_options(&stream) {
                        check_inherited = false;
                    } else {
                        tcp::configure_accepted(&stream, config.tcp_keepalive);
                    }
                }
                spawn_connection(stream, peer, &builder, &proxy, &shutdown);
            }
            // The peer gave up before we accepted it: nothing to do.
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                errors_since_log += 1;
                if last_log.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::error!(
                        error = %e,
                        failures = errors_since_log,
                        backoff_ms = backoff.as_millis() as u64,
                        "accept failed; backing off (existing connections are unaffected)"
                    );
                    last_log = Some(Instant::now());
                    errors_since_log = 0;
                }
                tokio::select! {
                    () = shutdown.draining() => break,
                    () = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    tracing::info!("stopped accepting connections");
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        // The read buffer must hold a full 64 KiB head to judge it; beyond
        // that, heads are refused, so no client can make us buffer more.
        .max_buf_size(2 * MAX_HEAD_BYTES);
    builder
}

fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: &http1::Builder,
    proxy: &Proxy,
    shutdown: &Shutdown,
) {
    let proxy = proxy.clone();
    let builder = builder.clone();
    let head_timeout = proxy.config().header_read_timeout;
    let shutdown_for_task = shutdown.clone();
    // Boxed where it is made: the connection's state (reading the head,
    // deciding an upgrade) is large, and spawning moves a future by value
    // several times; behind a box each move copies a pointer.
    shutdown.tracker().spawn(Box::pin(async move {
        let shutdown = shutdown_for_task;
        let mut stream = stream;
        // The first head decides: an upgrade takes wsgate's own path;
        // everything else is hyper's, from the first byte on.
        let first = tokio::select! {
            first = first_head::read(&mut stream, head_timeout, shutdown.draining()) => first,
            () = shutdown.stopped() => return,
        };
        match first {
            First::Upgrade(head) => {
                // Not needed by a tunnel: out of the task's state now.
                drop((builder, shutdown));
                proxy.upgrade_on(stream, head, peer).await;
            }
            First::Other(read) => {
                serve_http(Replayed::new(read, stream), peer, &builder, proxy, shutdown).await;
            }
            First::Gone => {}
        }
    }));
}

/// Serves a connection with hyper's HTTP/1 server until it closes or the
/// grace ends; its upgrades are handed off by hyper (`Proxy::handle`).
async fn serve_http(
    io: Replayed,
    peer: SocketAddr,
    builder: &http1::Builder,
    proxy: Proxy,
    shutdown: Shutdown,
) {
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { proxy.handle(req, peer).await }
    });
    // Boxed: the connection (hyper's state and buffers' bookkeeping, the
    // service) is large, and only connections that are not upgrades on
    // their first request get one.
    let mut conn = Box::pin(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    );
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.draining() => {
            // Finish the request in flight, close idle keep-alives now;
            // the end of the grace cuts whatever is still running.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.stopped() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        // Client-side trouble (resets, timeouts, garbage) is routine.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
