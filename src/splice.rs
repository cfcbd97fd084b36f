//! The splice: moves bytes both ways between two TCP streams until both are
//! done, one fails, a timeout fires or wsgate stops it.
//!
//! Why not `tokio::io::copy_bidirectional`: it allocates two 8 KiB buffers
//! per connection up front and keeps them for the connection's whole life,
//! it reports byte counts only at the end, and it has no notion of idle or
//! half-close deadlines. Here each direction waits for *readiness* first and
//! takes a buffer from a per-thread pool only once the socket is readable;
//! the buffer goes back as soon as its bytes are written. An idle connection
//! therefore holds no buffer at all (SPEC issue 4: ≤ 4 KiB per idle
//! connection), and a busy one holds at most one per direction, only while
//! the destination is backpressured.
//!
//! Semantics (SPEC §2–§3):
//! - EOF from one side is passed on as a FIN (`shutdown(Write)`) to the
//!   other; the other side may keep sending for `half_close_timeout`.
//! - A read or write error on either side ends both directions at once.
//! - `idle_timeout` (if set) ends the splice when no byte moved either way.
//! - Bytes are counted as they are written, so metrics move live.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{sleep, Instant, Sleep};

/// Size of a pooled copy buffer: large enough that bulk transfers move in
/// few syscalls; held only while data is in flight.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread for reuse.
const POOL_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

fn return_buffer(mut buf: Vec<u8>) {
    if buf.capacity() != BUF_SIZE {
        return; // a leftover-bytes buffer of another size: let it go
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_PER_THREAD {
            p.push(buf);
        }
    });
}

/// Deadlines that end a splice.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// After one direction finished, how long the other may continue.
    pub half_close: Duration,
    /// End the splice after this long without a byte either way.
    pub idle: Option<Duration>,
}

/// Which leg of the splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The client's connection.
    Client,
    /// The upstream's connection.
    Upstream,
}

/// How a splice ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions finished cleanly (EOF passed on both ways).
    Closed,
    /// One direction finished and the other did not within `half_close`.
    HalfCloseTimeout,
    /// No byte moved for `idle`.
    Idle,
    /// An IO error (reset, keepalive/user timeout) on one leg.
    Error(Leg, io::Error),
    /// wsgate ended it, for this reason.
    Stopped(StopReason),
}

/// Why wsgate itself ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The end of `shutdown_grace` (or a second signal).
    Grace,
    /// The gradual drain picked it.
    Drain,
    /// `max_connection_lifetime` expired.
    Lifetime,
}

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client → upstream.
    pub client_to_upstream: u64,
    /// Upstream → client.
    pub upstream_to_client: u64,
}

/// One direction: reads from `src`, writes to `dst`.
struct Pipe {
    /// Bytes read but not yet written, and how far writing got.
    pending: Option<(Vec<u8>, usize)>,
    /// `src` reached EOF.
    eof: bool,
    /// EOF was passed on as a FIN; this direction is finished.
    done: bool,
    bytes: u64,
}

enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

impl Pipe {
    fn new(leftover: Bytes) -> Self {
        Pipe {
            pending: (!leftover.is_empty()).then(|| (Vec::from(leftover), 0)),
            eof: false,
            done: false,
            bytes: 0,
        }
    }

    /// Drives this direction as far as it can go without blocking. Returns
    /// `Ready(Ok)` once finished; `Pending` with wakers registered otherwise.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &IntCounter,
        moved: &mut bool,
    ) -> Poll<Result<(), PipeError>> {
        loop {
            if let Some((buf, pos)) = &mut self.pending {
                while *pos < buf.len() {
                    ready!(dst.poll_write_ready(cx)).map_err(PipeError::Write)?;
                    match dst.try_write(&buf[*pos..]) {
                        Ok(0) => {
                            return Poll::Ready(Err(PipeError::Write(
                                io::ErrorKind::WriteZero.into(),
                            )))
                        }
                        Ok(n) => {
                            *pos += n;
                            self.bytes += n as u64;
                            counter.inc_by(n as u64);
                            *moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(PipeError::Write(e))),
                    }
                }
                if let Some((buf, _)) = self.pending.take() {
                    return_buffer(buf);
                }
            }
            if self.eof {
                // Pass the EOF on. A peer that already reset makes this fail;
                // the direction is finished either way.
                if let Err(e) = SockRef::from(dst).shutdown(Shutdown::Write) {
                    tracing::trace!(error = %e, "passing on FIN");
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Wait for readability *before* taking a buffer: idle costs nothing.
            ready!(src.poll_read_ready(cx)).map_err(PipeError::Read)?;
            let mut buf = take_buffer();
            match src.try_read_buf(&mut buf) {
                Ok(0) => {
                    return_buffer(buf);
                    self.eof = true;
                }
                Ok(_) => {
                    *moved = true;
                    self.pending = Some((buf, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return_buffer(buf),
                Err(e) => {
                    return_buffer(buf);
                    return Poll::Ready(Err(PipeError::Read(e)));
                }
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some((buf, _)) = self.pending.take() {
            return_buffer(buf);
        }
    }
}

/// Splices `client` and `upstream` until the end, see the module docs.
///
/// `client_leftover` / `upstream_leftover` are bytes already read from each
/// side past the HTTP handshake; they are written to the other side first.
/// `stop` resolving ends the splice with [`Ended::Stopped`] and its reason.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
pub async fn splice(
    client: &TcpStream,
    client_leftover: Bytes,
    upstream: &TcpStream,
    upstream_leftover: Bytes,
    limits: Limits,
    client_to_upstream: &IntCounter,
    upstream_to_client: &IntCounter,
    stop: impl Future<Output = StopReason>,
) -> (Ended, Totals) {
    let mut up = Pipe::new(client_leftover);
    let mut down = Pipe::new(upstream_leftover);
    let mut idle: Option<Pin<Box<Sleep>>> = limits.idle.map(|d| Box::pin(sleep(d)));
    let mut half_close: Option<Pin<Box<Sleep>>> = None;
    let mut last_activity = Instant::now();
    let mut stop = std::pin::pin!(stop);

    let ended = poll_fn(|cx| {
        if let Poll::Ready(reason) = stop.as_mut().poll(cx) {
            return Poll::Ready(Ended::Stopped(reason));
        }
        let mut moved = false;
        if !up.done {
            match up.poll(cx, client, upstream, client_to_upstream, &mut moved) {
                Poll::Ready(Err(PipeError::Read(e))) => {
                    return Poll::Ready(Ended::Error(Leg::Client, e))
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    return Poll::Ready(Ended::Error(Leg::Upstream, e))
                }
                _ => {}
            }
        }
        if !down.done {
            match down.poll(cx, upstream, client, upstream_to_client, &mut moved) {
                Poll::Ready(Err(PipeError::Read(e))) => {
                    return Poll::Ready(Ended::Error(Leg::Upstream, e))
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    return Poll::Ready(Ended::Error(Leg::Client, e))
                }
                _ => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ended::Closed);
        }
        if up.done || down.done {
            let timer = half_close.get_or_insert_with(|| Box::pin(sleep(limits.half_close)));
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::HalfCloseTimeout);
            }
        }
        if let (Some(timer), Some(limit)) = (idle.as_mut(), limits.idle) {
            if moved {
                last_activity = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every byte:
            // the clock is read once per poll that moved data, no more.
            while timer.as_mut().poll(cx).is_ready() {
                let deadline = last_activity + limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(Ended::Idle);
                }
                timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    })
    .await;

    let totals = Totals {
        client_to_upstream: up.bytes,
        upstream_to_client: down.bytes,
    };
    (ended, totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs: (outer client end, proxy's client end) and
    /// (proxy's upstream end, outer upstream end).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let a = TcpStream::connect(l.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (b, _) = l.accept().await.expect("accept");
            (a, b)
        }
        (pair().await, pair().await)
    }

    fn counters() -> (IntCounter, IntCounter) {
        (
            IntCounter::new("a", "a").expect("metric"),
            IntCounter::new("b", "b").expect("metric"),
        )
    }

    const LIMITS: Limits = Limits {
        half_close: Duration::from_secs(5),
        idle: None,
    };

    #[tokio::test]
    async fn copies_both_ways_and_ends_on_double_eof() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        let task = tokio::spawn(async move {
            splice(
                &p_client,
                Bytes::from_static(b"early"),
                &p_up,
                Bytes::new(),
                LIMITS,
                &c2u,
                &u2c,
                std::future::pending(),
            )
            .await
        });
        client.write_all(b" hello").await.expect("write");
        let mut got = [0u8; 11];
        upstream.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"early hello");
        upstream.write_all(b"back").await.expect("write");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"back");
        client.shutdown().await.expect("fin");
        assert_eq!(
            upstream.read(&mut [0u8; 1]).await.expect("eof"),
            0,
            "FIN passed on"
        );
        upstream.shutdown().await.expect("fin");
        let (ended, totals) = task.await.expect("join");
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(
            totals,
            Totals {
                client_to_upstream: 11,
                upstream_to_client: 4
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_close_is_bounded() {
        let ((mut client, p_client), (p_up, _upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        client.shutdown().await.expect("fin");
        let (ended, _) = splice(
            &p_client,
            Bytes::new(),
            &p_up,
            Bytes::new(),
            LIMITS,
            &c2u,
            &u2c,
            std::future::pending(),
        )
        .await;
        assert!(matches!(ended, Ended::HalfCloseTimeout), "{ended:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_without_traffic() {
        let ((_client, p_client), (p_up, _upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        let limits = Limits {
            idle: Some(Duration::from_secs(3)),
            ..LIMITS
        };
        let start = Instant::now();
        let (ended, _) = splice(
            &p_client,
            Bytes::new(),
            &p_up,
            Bytes::new(),
            limits,
            &c2u,
            &u2c,
            std::future::pending(),
        )
        .await;
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn stop_ends_the_splice() {
        let ((_client, p_client), (p_up, _upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        let (ended, _) = splice(
            &p_client,
            Bytes::new(),
            &p_up,
            Bytes::new(),
            LIMITS,
            &c2u,
            &u2c,
            std::future::ready(StopReason::Drain),
        )
        .await;
        assert!(
            matches!(ended, Ended::Stopped(StopReason::Drain)),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn reset_from_client_ends_at_once() {
        let ((client, p_client), (p_up, _upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        // SO_LINGER 0 turns close into RST.
        SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(client);
        let (ended, _) = splice(
            &p_client,
            Bytes::new(),
            &p_up,
            Bytes::new(),
            LIMITS,
            &c2u,
            &u2c,
            std::future::pending(),
        )
        .await;
        assert!(matches!(ended, Ended::Error(Leg::Client, _)), "{ended:?}");
    }
}
