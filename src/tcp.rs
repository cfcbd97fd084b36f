//! TCP socket options applied to both legs of every connection.
//!
//! `TCP_NODELAY`: WebSocket messages are small and latency-bound; Nagle would
//! hold them back. Keepalive (idle `tcp_keepalive`, probes every 10 s, 3
//! probes) plus `TCP_USER_TIMEOUT` of the same length: a peer that vanished
//! without FIN or RST (power loss, a dropped NAT entry) is detected by the
//! kernel, the read fails, and the tunnel ends and releases its slot.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Interval between keepalive probes (SPEC §2).
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel gives up (SPEC §2).
const PROBE_COUNT: u32 = 3;

/// Applies `TCP_NODELAY` and, if `keepalive` is set, keepalive and
/// `TCP_USER_TIMEOUT`. Failures are logged, not fatal: the connection still
/// works, only less protected.
pub fn configure(stream: &TcpStream, keepalive: Option<Duration>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY");
    }
    let Some(idle) = keepalive else { return };
    let sock = SockRef::from(stream);
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
