//! The upstream leg of a WebSocket connection: connect, forward the
//! handshake, read the answer; then the tracked task that owns the slot and
//! runs the splice until the connection ends.
//!
//! The handshake runs inline in the request's future (no spawned connection
//! driver), so when `upstream_connect_timeout` fires, dropping that future
//! drops the upstream socket too: a silent upstream cannot leak a task or a
//! descriptor. The request head is written and a 101 read by
//! [`crate::upstream_http`]; only a non-101 answer, whose body must still
//! stream to the client, gets a hyper connection, driven on the tracker.
//!
//! The upstream leg is TCP or a Unix socket (docs/operations.md#unix-socket-upstream), [`UpstreamIo`]: the
//! handshake and the splice are generic over the socket, and the tunnel
//! picks the copy once, when it starts.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::access_log::{self, SessionInfo};
use crate::admission::AdmissionGuard;
use crate::config::MessageGuards;
use crate::config::{Endpoint, Upstream};
use crate::drain::Tunnels;
use crate::error::ProxyError;
use crate::first_head::Replayed;
use crate::metrics::{Label, Registrar};
use crate::session::{SessionEnd, SessionMetrics};
use crate::shutdown::Shutdown;
use crate::splice::{
    self, Ended, Guards, Limits, Outcome, Side, Socket, SpliceMetrics, StopReason, Unresponsive,
};
use crate::tcp;
use crate::upstream_http::{self, AnswerError, Parsed, Replay, Switched};

/// The upstream's answer to the forwarded handshake.
#[derive(Debug)]
pub(crate) enum Answer {
    /// 101: the upstream leg is ready to splice.
    Switching {
        /// The 101, read and checked for what matters, its client copy written.
        head: Switched,
        /// The upstream socket.
        io: UpstreamIo,
        /// Bytes the upstream sent right after its 101.
        leftover: Bytes,
    },
    /// Anything else, passed to the client as it is.
    Other(Response<Incoming>),
}

/// The upstream leg's socket: TCP, or a Unix socket for a `unix:`
/// upstream (docs/operations.md#unix-socket-upstream).
#[derive(Debug)]
pub(crate) enum UpstreamIo {
    /// A `host:port` upstream.
    Tcp(TcpStream),
    /// A `unix:/path` upstream.
    Unix(UnixStream),
}

/// The client's side of a switched connection, as the 101 leaves it.
#[derive(Debug)]
pub(crate) enum ClientLeg {
    /// Answered by hyper's server: the socket comes once hyper has sent the
    /// 101 (`crate::first_head` hands hyper the socket as [`Replayed`]).
    Hyper(OnUpgrade),
    /// Answered by wsgate itself (the fast path).
    Own {
        /// The client's socket.
        stream: TcpStream,
        /// The 101 head, written first.
        answer: Vec<u8>,
        /// What the client sent after its request head.
        read: Bytes,
    },
}

impl ClientLeg {
    /// The socket, its 101 sent, and the bytes already read from it;
    /// `None` when the client went away before its 101 was sent.
    pub(crate) async fn ready(self) -> Option<(TcpStream, Bytes)> {
        match self {
            ClientLeg::Own {
                mut stream,
                answer,
                read,
            } => match stream.write_all(&answer).await {
                Ok(()) => Some((stream, read)),
                Err(e) => {
                    tracing::debug!(error = %e, "the client left before its 101");
                    None
                }
            },
            ClientLeg::Hyper(upgrade) => {
                match upgrade.await.map(|u| u.downcast::<TokioIo<Replayed>>()) {
                    Ok(Ok(parts)) => {
                        // What hyper read past the head, then what it never read
                        // of the replayed bytes (nothing, unless the client sent
                        // its frames with its first request).
                        let (stream, unread) = parts.io.into_inner().into_parts();
                        let read = if unread.is_empty() {
                            parts.read_buf
                        } else {
                            [parts.read_buf, unread].concat().into()
                        };
                        Some((stream, read))
                    }
                    Ok(Err(_)) => {
                        tracing::error!("upgraded client connection is not the accepted socket");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "client upgrade failed");
                        None
                    }
                }
            }
        }
    }
}

/// How much is read of the upstream's answer at first: a 101 head is a few
/// hundred bytes; the buffer doubles for larger ones, up to
/// [`upstream_http::MAX_ANSWER_HEAD`].
const ANSWER_BUFFER: usize = 1024;

/// Connects to the upstream, writes `request` (a whole request head) and
/// reads the answer head.
/// The caller bounds this with `upstream_connect_timeout`.
///
/// `keepalive` applies to a TCP upstream only: a Unix socket has no
/// keepalive or user timeout, and needs none (its peer is on the same host:
/// when the app dies, the kernel closes its end and the splice reads EOF).
///
/// # Errors
/// Connect failures (for a Unix socket also a missing file, a refused
/// connection or no permission: the upstream is unreachable either way),
/// and broken or non-HTTP answers.
pub(crate) async fn handshake(
    upstream: &Upstream,
    keepalive: Option<Duration>,
    request: &[u8],
    shutdown: &Shutdown,
) -> Result<Answer, ProxyError> {
    match &upstream.endpoint {
        Endpoint::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(ProxyError::UpstreamConnect)?;
            tcp::configure(&stream, keepalive);
            exchange(stream, request, shutdown, UpstreamIo::Tcp).await
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .map_err(ProxyError::UpstreamConnect)?;
            exchange(stream, request, shutdown, UpstreamIo::Unix).await
        }
    }
}

/// Writes the request head on a connected upstream `stream` and reads the
/// answer head; `leg` names the socket for the splice after a 101.
async fn exchange<S>(
    mut stream: S,
    request: &[u8],
    shutdown: &Shutdown,
    leg: fn(S) -> UpstreamIo,
) -> Result<Answer, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    stream.write_all(request).await.map_err(failed)?;

    let mut read = BytesMut::with_capacity(ANSWER_BUFFER);
    let (head, head_len) = loop {
        if read.len() == read.capacity() {
            read.reserve(read.len());
        }
        let scanned = read.len();
        if stream.read_buf(&mut read).await.map_err(failed)? == 0 {
            return Err(failed(AnswerError::Closed));
        }
        // Parse only once the blank line has arrived: a trickled answer
        // costs one scan of each byte, not one parse per read.
        if !upstream_http::head_ends_after(&read, scanned) {
            if read.len() >= upstream_http::MAX_ANSWER_HEAD {
                return Err(failed(AnswerError::TooLarge));
            }
            continue;
        }
        if let Some(parsed) = upstream_http::parse_answer(&read).map_err(failed)? {
            break parsed;
        }
    };
    if let Parsed::Switching(head) = head {
        // Copied out (usually nothing), so the read buffer is freed now
        // rather than held by the leftover until the splice starts.
        return Ok(Answer::Switching {
            head,
            io: leg(stream),
            leftover: Bytes::copy_from_slice(&read[head_len..]),
        });
    }
    refusal(Replay::new(read.freeze(), stream), shutdown).await
}

/// An answer other than 101, read by a hyper client connection from the
/// start again, so its body streams to the client in whatever framing the
/// upstream chose. The connection is driven on the tracker until the body
/// has been passed on, or the hard stop.
async fn refusal<S>(replay: Replay<S>, shutdown: &Shutdown) -> Result<Answer, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, mut conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(replay))
        .await
        .map_err(failed)?;
    let mut conn_done = false;
    // The request went out already; `Replay` drops what hyper writes. A GET,
    // like the upgrade request, so the answer's body is framed the same way.
    let mut send = std::pin::pin!(sender.send_request(Request::new(Empty::new())));
    let response = loop {
        tokio::select! {
            biased;
            r = &mut send => break r.map_err(failed)?,
            r = &mut conn, if !conn_done => {
                // The connection ended first; `send` now resolves with its error.
                conn_done = true;
                r.map_err(failed)?;
            }
        }
    };
    if !conn_done {
        let shutdown_for_task = shutdown.clone();
        shutdown.tracker().spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = shutdown_for_task.stopped() => {}
            }
        });
    }
    Ok(Answer::Other(response))
}

/// A failed upstream handshake, whatever failed in it.
fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ProxyError {
    ProxyError::UpstreamHandshake(e.into())
}

/// What every tunnel counts into.
#[derive(Debug, Clone)]
pub(crate) struct TunnelMetrics {
    /// Bytes, messages, guards and Close frames.
    pub(crate) splice: SpliceMetrics,
    /// How sessions ended, their Close codes and their lifetimes.
    pub(crate) sessions: SessionMetrics,
    /// `wsgate_connections_expired_total`: closed by `max_connection_lifetime`.
    pub(crate) expired: prometheus::IntCounter,
}

impl TunnelMetrics {
    /// Registers the tunnels' series, every one at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        Ok(TunnelMetrics {
            splice: SpliceMetrics::register(r)?,
            sessions: SessionMetrics::register(r)?,
            expired: r.counter(
                "wsgate_connections_expired_total",
                "Connections closed by max_connection_lifetime",
            )?,
        })
    }
}

/// What a tunnel task needs besides its two legs.
#[derive(Debug, Clone)]
pub(crate) struct TunnelContext {
    /// Deadlines for the splice.
    pub(crate) limits: Limits,
    /// Message guards on what the client sends (docs/operations.md#message-guards), as configured
    /// when the connection was admitted.
    pub(crate) guards: MessageGuards,
    /// What the tunnel counts into.
    pub(crate) metrics: std::sync::Arc<TunnelMetrics>,
    /// To stop at the end of the grace.
    pub(crate) shutdown: Shutdown,
    /// Where the drain finds this tunnel.
    pub(crate) tunnels: Tunnels,
    /// `max_connection_lifetime` and `lifetime_jitter`, if a lifetime is set.
    pub(crate) lifetime: Option<(Duration, f64)>,
    /// The client's socket address, for logs.
    pub(crate) peer: std::net::SocketAddr,
    /// What the access-log record says besides the end; `None` with
    /// `access_log = false`.
    pub(crate) session: Option<Box<SessionInfo>>,
}

/// The upstream's side of the splice, whatever its socket.
fn upstream_side<'a, S: Socket>(
    stream: &'a S,
    leftover: Bytes,
    metrics: &'a SpliceMetrics,
) -> Side<'a, S> {
    Side {
        stream,
        leftover,
        forwarded: &metrics.bytes_upstream_to_client,
        messages: &metrics.messages_upstream_to_client,
    }
}

/// A deadline drawn uniformly from [lifetime × (1 − jitter), lifetime], so
/// connections opened together do not expire together.
pub(crate) fn draw_lifetime(lifetime: Duration, jitter: f64) -> Duration {
    lifetime.mul_f64(1.0 - jitter * rand::random::<f64>())
}

/// Resolves at `deadline`, unless draining has started by then: from that
/// moment the drain owns the pace and lifetimes no longer fire.
async fn lifetime_expiry(deadline: Option<Instant>, shutdown: &Shutdown) {
    match deadline {
        Some(d) => {
            // Boxed: a `Sleep` (about 120 bytes) would otherwise be part of
            // every connection's state, with or without a lifetime set.
            Box::pin(tokio::time::sleep_until(d)).await;
            if shutdown.is_draining() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The body of a tracked tunnel task: waits for the client side of the
/// upgrade, splices, and records the outcome. `guard` lives exactly as long
/// as this future, so the slot is released however it ends, including when
/// the client vanishes before the upgrade completes.
///
/// A plain function returning an `async move` block rather than an
/// `async fn`: the latter would hold every argument twice for the life of
/// the connection (see [`splice::splice`]).
pub(crate) fn run(
    client: ClientLeg,
    upstream: UpstreamIo,
    upstream_leftover: Bytes,
    guard: AdmissionGuard,
    ctx: TunnelContext,
) -> impl Future<Output = ()> {
    let started = Instant::now();
    let registration = ctx.tunnels.register();
    let deadline = ctx.lifetime.map(|(l, j)| started + draw_lifetime(l, j));
    // Made here, not in the task: the task then holds the guards' box (or
    // nothing), not a copy of their settings for the connection's life.
    // With pings on, the client's answers are taken out by the guards' scan.
    let guards = Guards::new(
        &ctx.guards,
        ctx.limits.pings.is_some(),
        &ctx.metrics.splice.guards,
    );
    async move {
        let Some((client_io, client_leftover)) = (tokio::select! {
            c = client.ready() => c,
            // Grace is over before the client even finished its upgrade.
            () = ctx.shutdown.stopped() => return,
        }) else {
            return;
        };
        // The splice watches the abort itself (a second signal cuts at once),
        // so it always returns its outcome and the metrics below see every
        // connection, including one cut in the middle of its closing handshake.
        let stop = Box::pin(async {
            tokio::select! {
                () = ctx.shutdown.stopped() => StopReason::Grace,
                reason = registration.drained() => reason,
                () = lifetime_expiry(deadline, &ctx.shutdown) => StopReason::Lifetime,
            }
        });
        let abort = Box::pin(ctx.shutdown.aborted());
        let client_side = Side {
            stream: &client_io,
            leftover: client_leftover,
            forwarded: &ctx.metrics.splice.bytes_client_to_upstream,
            messages: &ctx.metrics.splice.messages_client_to_upstream,
        };
        let metrics = &ctx.metrics.splice;
        // One copy of the splice per kind of upstream socket, picked here
        // once (see `splice::Socket`).
        // A macro, not a generic `async fn`: a wrapper future would add its
        // own state to every connection's splice.
        macro_rules! splice_over {
            ($stream:expr) => {
                splice::splice(
                    client_side,
                    upstream_side($stream, upstream_leftover, metrics),
                    ctx.limits,
                    guards,
                    &metrics.pings_sent,
                    stop,
                    abort,
                )
                .await
            };
        }
        let outcome = match &upstream {
            UpstreamIo::Tcp(stream) => splice_over!(stream),
            UpstreamIo::Unix(stream) => splice_over!(stream),
        };
        drop(registration);
        let Outcome {
            ended,
            totals,
            close_frames_sent,
            close_completed,
            first_close,
            first_eof,
            traffic,
        } = outcome;
        if let Ended::Stopped(StopReason::Lifetime) = ended {
            ctx.metrics.expired.inc();
        }
        if let Some(reason) = close_frames_sent {
            ctx.metrics.splice.close_frames.inc(reason);
        }
        let lifetime = started.elapsed();
        let end = SessionEnd::of(
            &ended,
            first_close.as_ref(),
            first_eof,
            ctx.limits.close.as_ref(),
        );
        ctx.metrics.sessions.count(&end, lifetime);
        if let Some(info) = &ctx.session {
            access_log::session(info, &end, &traffic, lifetime);
        }
        let error = match &ended {
            Ended::Error(_, e) => Some(e.to_string()),
            _ => None,
        };
        tracing::debug!(
            peer = %ctx.peer,
            end = end.end.label(),
            closed_by = end.closed_by.label(),
            error,
            close_frames_sent = close_frames_sent.is_some(),
            close_completed,
            lifetime_ms = lifetime.as_millis() as u64,
            client_to_upstream = totals.client_to_upstream,
            upstream_to_client = totals.upstream_to_client,
            "websocket connection ended"
        );
        if let Ended::Unresponsive(Unresponsive::Send) = ended {
            // A client that stopped reading still has bytes queued in its
            // socket: reset rather than close, so the kernel drops them now
            // instead of keeping them, and probing its window, after the
            // descriptor is gone.
            if let Err(e) = socket2::SockRef::from(&client_io).set_linger(Some(Duration::ZERO)) {
                tracing::trace!(error = %e, "setting SO_LINGER 0 on a send timeout");
            }
        }
        // Close both sockets before giving the slot back, so that once the
        // active gauge has dropped, the descriptors are gone too.
        drop(client_io);
        drop(upstream);
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use http::header::{self, HeaderValue};
    use socket2::SockRef;
    use tokio::net::TcpListener;

    use super::*;

    /// An upstream's side of the handshake, over TCP or a Unix socket:
    /// reads the request head, writes `answer`, returns the head.
    async fn answer_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        answer: &[u8],
    ) -> Vec<u8> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !upstream_http::head_ends_after(&head, 0) {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "request head cut short");
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(answer).await.expect("write");
        head
    }

    /// The upstream leg as the tunnel code builds it carries every option,
    /// read back by getter: keepalive idle time, interval, probe count,
    /// `TCP_USER_TIMEOUT` and `TCP_NODELAY`.
    #[tokio::test]
    async fn the_upstream_leg_carries_every_socket_option() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // An upstream that accepts any upgrade: the accept value is not
        // checked here (`proxy` does that), only the socket.
        let upstream_task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            answer_upgrade(
                &mut s,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            )
            .await;
            s
        });
        let upstream = Upstream::parse(&addr.to_string()).expect("upstream");
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = "/".parse().expect("uri");
        let h = req.headers_mut();
        h.insert(
            header::HOST,
            HeaderValue::from_str(&addr.to_string()).expect("host"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let keepalive = Duration::from_secs(20);
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            handshake(
                &upstream,
                Some(keepalive),
                &upstream_http::encode_request(&req),
                &Shutdown::new(),
            ),
        )
        .await
        .expect("in time")
        .expect("handshake");
        let Answer::Switching {
            io: UpstreamIo::Tcp(io),
            ..
        } = answer
        else {
            panic!("expected 101 over TCP")
        };
        let sock = SockRef::from(&io);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"), keepalive);
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 3);
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(keepalive)
        );
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"));
        drop(upstream_task.await.expect("upstream"));
    }

    /// A request head with only a path and the upgrade header.
    fn upgrade_request() -> Vec<u8> {
        b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n".to_vec()
    }

    /// docs/operations.md#unix-socket-upstream: over a Unix socket the handshake is the same bytes, and a
    /// 101 hands the splice a Unix leg with what followed the head.
    #[tokio::test]
    async fn a_unix_upstream_is_reached_through_its_socket_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ws.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let upstream_task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let head = answer_upgrade(
                &mut s,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nearly",
            )
            .await;
            (s, head)
        });
        let upstream =
            Upstream::parse(&format!("unix:{}", path.display())).expect("a unix upstream");
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            handshake(
                &upstream,
                Some(Duration::from_secs(20)),
                &upgrade_request(),
                &Shutdown::new(),
            ),
        )
        .await
        .expect("in time")
        .expect("handshake");
        let Answer::Switching {
            io: UpstreamIo::Unix(_),
            leftover,
            ..
        } = answer
        else {
            panic!("expected 101 over the Unix socket")
        };
        assert_eq!(&leftover[..], b"early");
        let (_s, head) = upstream_task.await.expect("upstream");
        assert!(head.starts_with(b"GET / HTTP/1.1\r\n"));
    }

    /// A missing socket file, or one nobody listens on: the upstream is
    /// unreachable (502, `kind="connect"`), like a refused TCP connect.
    #[tokio::test]
    async fn a_missing_or_dead_socket_file_is_a_connect_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.sock");
        let dead = dir.path().join("dead.sock");
        // Bound, then closed: the file stays, nothing listens (ECONNREFUSED).
        drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
        for path in [missing, dead] {
            let upstream =
                Upstream::parse(&format!("unix:{}", path.display())).expect("a unix upstream");
            let e = handshake(&upstream, None, &upgrade_request(), &Shutdown::new())
                .await
                .expect_err("nothing to connect to");
            assert!(
                matches!(e, ProxyError::UpstreamConnect(_)),
                "{}: {e:?}",
                path.display()
            );
            assert_eq!(e.status(), http::StatusCode::BAD_GATEWAY);
        }
    }

    /// A listener whose accept queue is full refuses a Unix connect at once
    /// (`EAGAIN`; TCP would wait): 502, not a wait for the 504.
    #[tokio::test]
    async fn a_full_accept_queue_is_a_connect_error_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("full.sock");
        let listener = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .expect("socket");
        listener
            .bind(&socket2::SockAddr::unix(&path).expect("address"))
            .expect("bind");
        listener.listen(1).expect("listen");
        // Fill the queue (Linux takes backlog + 1), never accepting.
        let mut queued = Vec::new();
        while let Ok(s) = UnixStream::connect(&path).await {
            queued.push(s);
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        let upstream =
            Upstream::parse(&format!("unix:{}", path.display())).expect("a unix upstream");
        let e = tokio::time::timeout(
            Duration::from_secs(1),
            handshake(&upstream, None, &upgrade_request(), &Shutdown::new()),
        )
        .await
        .expect("at once, not after a timeout")
        .expect_err("the queue is full");
        assert!(matches!(e, ProxyError::UpstreamConnect(_)), "{e:?}");
    }
}
