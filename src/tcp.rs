//! TCP socket options applied to both legs of every connection (the client
//! leg only when the upstream is a Unix socket, docs/operations.md#unix-socket-upstream: its leg has no
//! such options, and a peer on the same host cannot vanish unseen).
//!
//! `TCP_NODELAY`: WebSocket messages are small and latency-bound; Nagle would
//! hold them back.
//!
//! Keepalive (first probe after `tcp_keepalive` of silence, then one every
//! `min(10 s, tcp_keepalive)`) plus `TCP_USER_TIMEOUT` = `tcp_keepalive`: a
//! peer that vanished without FIN or RST is detected by the kernel, the read
//! or write fails, and the tunnel ends and releases its slot. What ends the
//! connection, and when, as measured on Linux 6.18 on both legs
//! (`tests/it/keepalive.rs`, `vanished_peer_detection_times`, four runs; the
//! kernel's timers may fire up to about 2 s late):
//!
//! - peer's socket gone, its host up (crashed and rebooted): the first probe
//!   is answered with RST, after `tcp_keepalive` (30.1–31.9 s at the
//!   default; 2.0–2.1 s at `2s`);
//! - peer's host silent (power loss, a dropped NAT entry), connection idle:
//!   the first probe goes unanswered, and when the second is due the user
//!   timeout has passed and the kernel aborts, after `tcp_keepalive +
//!   min(10 s, tcp_keepalive)` (40.3–42.1 s at the default; 4.0–4.1 s at
//!   `2s`).
//!   The third probe is never sent: on Linux the user timeout, not
//!   `PROBE_COUNT`, decides;
//! - peer's host silent while wsgate has bytes to send it: the user timeout
//!   ends it `tcp_keepalive` after the first unacknowledged byte (30.4–30.6 s
//!   at the default; 2.2–2.5 s at `2s`).

use std::time::Duration;

use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Interval between keepalive probes (docs/configuration.md), or the idle time if shorter.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel gives up (docs/configuration.md) where there is no
/// `TCP_USER_TIMEOUT` (not Linux). On Linux the user timeout ends the
/// connection first, when the second probe is due (see the module docs).
const PROBE_COUNT: u32 = 3;

/// Listen backlog: a reconnect storm arrives as one burst of SYNs, and a
/// full accept queue drops them (the client retries only after a second).
/// The kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 65_535;

/// Binds a listener with `SO_REUSEADDR` and a deep accept queue (tokio's
/// `TcpListener::bind` uses 1024, which a burst of reconnects overflows).
///
/// # Errors
/// The address is taken, not local, or not permitted.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Applies `TCP_NODELAY` and, if `keepalive` is set, keepalive and
/// `TCP_USER_TIMEOUT` to a connected socket (the upstream leg). Failures are
/// logged, not fatal: the connection still works, only less protected.
pub(crate) fn configure(stream: &TcpStream, keepalive: Option<Duration>) {
    apply(SockRef::from(stream), keepalive, false);
}

/// Applies the same options to a listener: Linux copies them into every
/// socket `accept` returns, which saves six `setsockopt` calls per client
/// connection. The accept loop calls [`configure_accepted`] only when a
/// reload has changed `tcp_keepalive` since.
pub(crate) fn configure_listener(listener: &TcpListener, keepalive: Option<Duration>) {
    apply(SockRef::from(listener), keepalive, true);
}

/// Whether an accepted socket came with the listener's options
/// (`TCP_NODELAY` is always among them, and set on the listener last).
pub(crate) fn inherited_options(stream: &TcpStream) -> bool {
    stream.nodelay().unwrap_or(false)
}

/// Sets the options on an accepted socket whose listener carries other ones
/// (after a reload), including turning keepalive off.
pub(crate) fn configure_accepted(stream: &TcpStream, keepalive: Option<Duration>) {
    apply(SockRef::from(stream), keepalive, true);
}

fn apply(sock: SockRef<'_>, keepalive: Option<Duration>, turn_off: bool) {
    set_keepalive(&sock, keepalive, turn_off);
    // Last, because `inherited_options` takes `TCP_NODELAY` as the sign that
    // an accepted socket got every option: a connection the kernel completes
    // while the listener is being configured copies whatever is set so far.
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY");
    }
}

fn set_keepalive(sock: &SockRef<'_>, keepalive: Option<Duration>, turn_off: bool) {
    let Some(idle) = keepalive else {
        if turn_off {
            if let Err(e) = sock.set_keepalive(false) {
                tracing::debug!(error = %e, "turning TCP keepalive off");
            }
            #[cfg(any(target_os = "linux", target_os = "android"))]
            if let Err(e) = sock.set_tcp_user_timeout(None) {
                tracing::debug!(error = %e, "turning TCP_USER_TIMEOUT off");
            }
        }
        return;
    };
    let params = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(PROBE_INTERVAL.min(idle))
        .with_retries(PROBE_COUNT);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "setting TCP keepalive");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(idle)) {
        tracing::debug!(error = %e, "setting TCP_USER_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_binds_port_zero_and_refuses_a_taken_address() {
        let l = listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_ne!(addr.port(), 0);
        assert!(
            listen(addr).is_err(),
            "a second listener on the same address"
        );
        let _c = TcpStream::connect(addr).await.expect("accepting");
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        let l = listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
        configure_listener(&l, Some(Duration::from_secs(45)));
        let _c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (a, _) = l.accept().await.expect("accept");
        let sock = SockRef::from(&a);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("time"),
            Duration::from_secs(45)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), PROBE_COUNT);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(45))
        );
        // After a reload that turned keepalive off, an accepted socket is reset.
        configure_accepted(&a, None);
        assert!(!sock.keepalive().expect("keepalive"));
        assert_eq!(sock.tcp_user_timeout().expect("user timeout"), None);
    }

    #[tokio::test]
    async fn options_are_applied() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        configure(&s, Some(Duration::from_secs(30)));
        let sock = SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("time"),
            Duration::from_secs(30)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            PROBE_INTERVAL
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), PROBE_COUNT);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(30))
        );
    }
}
