//! The splice: moves bytes both ways between two stream sockets (TCP, or a
//! Unix socket on the upstream leg) until both are done, one fails, a
//! timeout fires or wsgate stops it.
//!
//! Why not `tokio::io::copy_bidirectional`: it allocates two 8 KiB buffers
//! per connection up front and keeps them for the connection's whole life,
//! it reports byte counts only at the end, and it has no notion of idle or
//! half-close deadlines. Here each direction waits for *readiness* first and
//! takes a buffer from a per-thread pool only once the socket is readable;
//! the buffer goes back as soon as its bytes are written. An idle connection
//! therefore holds no buffer at all (docs/operations.md#sizing), and a busy one holds at most one per direction, only while
//! the destination is backpressured.
//!
//! Semantics (docs/configuration.md and docs/behaviour.md):
//! - EOF from one side is passed on as a FIN (`shutdown(Write)`) to the
//!   other; the other side may keep sending for `half_close_timeout`.
//! - A read or write error on either side ends both directions at once.
//! - `idle_timeout` (if set) ends the splice when no byte moved either way.
//! - Bytes are counted as they are written, so metrics move live.
//!
//! Ending in WebSocket terms (docs/behaviour.md#close-frames): each direction runs a
//! [`FrameTracker`](crate::frames::FrameTracker) over what it forwards. When wsgate itself ends a
//! connection (drain, lifetime, idle timeout, end of grace), each direction
//! injects a Close frame at its next message boundary (a frame boundary
//! outside any fragmented message, so a message in flight finishes first;
//! one whose sender stalls is cut at `close_timeout`) — unmasked towards the
//! client, masked with a random key towards the upstream — and from then on
//! drops what its source sends, watching only for that peer's Close reply.
//! TCP is closed once both peers replied (or ended), or at `close_timeout`.
//! A peer's reply is not passed on: the other peer already received a Close
//! from wsgate, and a second one would arrive after its closing handshake
//! completed. If a peer had already started a closing handshake of its own,
//! wsgate injects nothing and lets it finish within `close_timeout`.
//!
//! Message guards (docs/operations.md#message-guards): the client → upstream direction may carry
//! [`Guards`] that decide, frame header by frame header, what goes on, what
//! waits for tokens, and what is refused. A refusal sends the upstream a
//! Close 1001 at once, and the client the guard's Close (1009, 1008) at its
//! next message boundary; then the closing handshake runs as above.
//!
//! Layout: this file holds the splice's own loop (both directions, the
//! deadlines, the stop and abort); `pipe` is one direction and the phases
//! of its life; `guards` the message guards; `buffers` the per-thread
//! buffer pool; `gate` the waker gate that keeps the stop and abort futures
//! off the per-message path; `socket` the operations a leg's socket offers.

mod buffers;
mod gate;
mod guards;
mod metrics;
mod pipe;
mod socket;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::{sleep, Instant, Sleep};

use crate::config::CloseSettings;
use crate::frames::{close_frame, CloseSeen};
use crate::metrics::labels;
use gate::Gated;
pub(crate) use guards::{Guard, Guards, UPSTREAM_GUARD_CODE};
pub(crate) use metrics::SpliceMetrics;
use pipe::{Counters, Pipe};
pub(crate) use socket::Socket;

/// Deadlines that end a splice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// After one direction finished, how long the other may continue.
    pub(crate) half_close: Duration,
    /// End the splice after this long without a byte either way.
    pub(crate) idle: Option<Duration>,
    /// Close frames for connections wsgate ends; `None` = cut TCP at once.
    pub(crate) close: Option<CloseSettings>,
}

/// Which leg of the splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    /// The client's connection.
    Client,
    /// The upstream's connection.
    Upstream,
}

impl Leg {
    /// The leg on the other side of the splice.
    fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Upstream,
            Leg::Upstream => Leg::Client,
        }
    }
}

/// How a splice ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Both directions finished cleanly (EOF passed on both ways).
    Closed,
    /// One direction finished and the other did not within `half_close`.
    HalfCloseTimeout,
    /// An IO error (reset, keepalive/user timeout) on one leg.
    Error(Leg, io::Error),
    /// wsgate ended it, for this reason.
    Stopped(StopReason),
    /// A message guard refused a frame from the client and ended it (docs/operations.md#message-guards).
    Guard(Guard),
}

labels! {
    /// Why wsgate itself ended a connection. The text is the `reason` label
    /// of `wsgate_close_frames_sent_total`: the end of the grace, an
    /// operator's drain and an abort count as the drain.
    pub(crate) enum StopReason {
        /// The end of `shutdown_grace` (or a second signal).
        Grace => "drain",
        /// The gradual drain picked it.
        Drain => "drain",
        /// An operator's `POST /drain` picked it.
        AdminDrain => "drain",
        /// `max_connection_lifetime` expired.
        Lifetime => "lifetime",
        /// No byte moved either way for `idle_timeout`.
        Idle => "idle",
        /// A second shutdown signal: cut at once, no closing handshake.
        Abort => "drain",
    }
}

impl StopReason {
    /// The reason text of wsgate's Close frame.
    pub(crate) fn close_text(self) -> &'static str {
        match self {
            StopReason::Grace | StopReason::Abort => "server shutting down",
            StopReason::Drain => "server draining, please reconnect",
            StopReason::AdminDrain => "server rebalancing, please reconnect",
            StopReason::Lifetime => "connection lifetime reached, please reconnect",
            StopReason::Idle => "idle timeout",
        }
    }

    /// The Close status code for this reason, as configured.
    pub(crate) fn code(self, close: &CloseSettings) -> u16 {
        match self {
            StopReason::Grace | StopReason::Drain | StopReason::AdminDrain | StopReason::Abort => {
                close.drain
            }
            StopReason::Lifetime => close.lifetime,
            StopReason::Idle => close.idle,
        }
    }
}

/// How a splice ended, what it moved, and whether wsgate closed it in
/// WebSocket terms.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Why it ended.
    pub(crate) ended: Ended,
    /// Bytes moved each way.
    pub(crate) totals: Totals,
    /// wsgate injected Close frames, for this reason (counted once per
    /// connection, however the connection then ended). A guard's Close is
    /// not counted here but in `wsgate_message_guard_total`.
    pub(crate) close_frames_sent: Option<StopReason>,
    /// Both peers answered the Close (or ended) before `close_timeout`.
    pub(crate) close_completed: bool,
    /// Who sent the session's first Close frame, and what it said; `None`
    /// when nobody sent one.
    pub(crate) first_close: Option<FirstClose>,
    /// Whose EOF (FIN) was read first, if one was.
    pub(crate) first_eof: Option<Leg>,
    /// Bytes read and data messages seen, each way.
    pub(crate) traffic: Traffic,
}

/// The first Close frame of a session: whose, and what it said.
#[derive(Debug)]
pub(crate) enum FirstClose {
    /// A peer's, as much of it as passed.
    Peer(Leg, Option<Box<CloseSeen>>),
    /// wsgate's own, sent for this cause before any peer's.
    Wsgate(Cause),
}

/// What a session's peers sent: bytes wsgate read from each (frame headers
/// included) and the data messages among them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traffic {
    /// Bytes read from the client.
    pub(crate) bytes_in: u64,
    /// Bytes read from the upstream.
    pub(crate) bytes_out: u64,
    /// Data messages from the client.
    pub(crate) msgs_in: u64,
    /// Data messages from the upstream.
    pub(crate) msgs_out: u64,
}

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Client → upstream.
    pub(crate) client_to_upstream: u64,
    /// Upstream → client.
    pub(crate) upstream_to_client: u64,
}

/// Why wsgate is closing a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// A stop from outside the splice, or the idle timeout.
    Stop(StopReason),
    /// A message guard refused a frame.
    Guard(Guard),
}

impl Cause {
    /// How the splice ends for this cause.
    pub(crate) fn ended(self) -> Ended {
        match self {
            Cause::Stop(reason) => Ended::Stopped(reason),
            Cause::Guard(guard) => Ended::Guard(guard),
        }
    }
}

/// Where a splice is in its life. While open, the half-close and idle
/// deadlines run; once wsgate closes the session in WebSocket terms only
/// the closing handshake's deadline does (the drain, the lifetime or a
/// guard decided the end, so neither can fire any more).
enum Phase {
    /// Forwarding both ways.
    Open {
        /// Armed when the first direction finishes.
        half_close: Option<Pin<Box<Sleep>>>,
        /// `idle_timeout`'s timer, re-armed only when it fires.
        idle: Option<Pin<Box<Sleep>>>,
        /// When a byte last moved either way (read only with `idle`).
        last_activity: Instant,
    },
    /// wsgate is closing the session (Close frames injected, or a peer's
    /// own closing handshake let finish).
    Closing(Closing),
}

/// The closing handshake wsgate runs.
struct Closing {
    cause: Cause,
    deadline: Pin<Box<Sleep>>,
    /// Close frames were injected (false: a peer's own handshake is let finish).
    injected: bool,
}

impl Closing {
    /// Starts the closing handshake for `reason` in both directions.
    fn begin(reason: StopReason, close: &CloseSettings, up: &mut Pipe, down: &mut Pipe) -> Self {
        let deadline = Box::pin(sleep(close.timeout));
        if up.saw_close() || down.saw_close() {
            // The peers are already in a closing handshake: a Close from
            // wsgate would be a second one. Let theirs finish in time.
            return Closing {
                cause: Cause::Stop(reason),
                deadline,
                injected: false,
            };
        }
        let code = reason.code(close);
        let text = reason.close_text();
        // Towards the upstream wsgate speaks as the client: masked, random key.
        up.begin_close(close_frame(code, text, Some(rand::random())));
        down.begin_close(close_frame(code, text, None));
        Closing {
            cause: Cause::Stop(reason),
            deadline,
            injected: true,
        }
    }

    /// The client → upstream direction refused a frame and sent the
    /// upstream its Close: the client gets the guard's Close at its next
    /// message boundary, then both replies are awaited as for any close.
    fn begin_guard(guard: Guard, close: &CloseSettings, down: &mut Pipe) -> Self {
        down.begin_close(close_frame(
            guard.client_code(),
            guard.client_reason(),
            None,
        ));
        Closing {
            cause: Cause::Guard(guard),
            deadline: Box::pin(sleep(close.timeout)),
            injected: true,
        }
    }
}

/// Who sent a session's first Close frame (while the splice runs).
#[derive(Debug, Clone, Copy)]
enum Closer {
    Peer(Leg),
    Wsgate(Cause),
}

/// The first Close frame and the first EOF of a session, noted after each
/// step of the splice so the access log can say who ended it (docs/operations.md#access-log).
#[derive(Debug, Default)]
struct Firsts {
    close: Option<Closer>,
    eof: Option<Leg>,
}

impl Firsts {
    /// Notes what is new since the last call. wsgate's own Close counts
    /// only if it went out before any peer's: `begin_close` injects none
    /// once a peer's Close was seen, and each poll of a direction is
    /// followed by a call here, so a peer's earlier Close is noted first.
    fn observe(&mut self, closing: Option<&Closing>, up: &Pipe, down: &Pipe) {
        if self.close.is_none() {
            self.close = match closing {
                Some(c) if c.injected => Some(Closer::Wsgate(c.cause)),
                _ if up.saw_close() => Some(Closer::Peer(Leg::Client)),
                _ if down.saw_close() => Some(Closer::Peer(Leg::Upstream)),
                _ => None,
            };
        }
        if self.eof.is_none() {
            self.eof = if up.is_done() {
                Some(Leg::Client)
            } else if down.is_done() {
                Some(Leg::Upstream)
            } else {
                None
            };
        }
    }
}

/// One side of the splice, as the caller hands it over: a TCP socket
/// unless said otherwise.
#[derive(Debug)]
pub(crate) struct Side<'a, S = TcpStream> {
    /// The side's socket.
    pub(crate) stream: &'a S,
    /// Bytes already read from this side past the HTTP handshake; they are
    /// written to the other side first.
    pub(crate) leftover: Bytes,
    /// Counts the bytes from this side as they are written to the other
    /// (`wsgate_transferred_bytes_total` for that direction).
    pub(crate) forwarded: &'a IntCounter,
    /// Counts the messages from this side as they are forwarded
    /// (`wsgate_messages_total` for that direction).
    pub(crate) messages: &'a IntCounter,
}

/// Splices `client` and `upstream` until the end, see the module docs.
///
/// `guards` (message guards, docs/operations.md#message-guards) apply to what the client sends.
///
/// Generic over each leg's [`Socket`]: a Unix upstream (docs/operations.md#unix-socket-upstream) gets its
/// own copy of the loop, and the TCP one stays as it is (no dynamic
/// dispatch per read or write).
///
/// `stop` resolving makes wsgate end the connection for that reason (with
/// Close frames when `limits.close` is set); `abort` resolving cuts it at
/// once, even in the middle of a closing handshake. The caller closes both
/// sockets as soon as the future returns: after a clean double EOF the last
/// FIN is left to that close.
///
/// The future lives as long as the connection, idle or not, so its size is
/// per-connection memory. An `async fn` keeps a copy of each argument beside
/// the locals made from it (rust-lang/rust#62958); here the state is built
/// first and only then moved into the `async` block, and `stop`/`abort`
/// arrive boxed (the gate keeps them on the heap anyway).
pub(crate) fn splice<'a, C, U, S, A>(
    client: Side<'a, C>,
    upstream: Side<'a, U>,
    limits: Limits,
    guards: Option<Box<Guards>>,
    stop: Pin<Box<S>>,
    abort: Pin<Box<A>>,
) -> impl Future<Output = Outcome> + 'a
where
    C: Socket + 'a,
    U: Socket + 'a,
    S: Future<Output = StopReason> + 'a,
    A: Future<Output = ()> + 'a,
{
    let Side {
        stream: client,
        leftover: client_leftover,
        forwarded,
        messages,
    } = client;
    let client_to_upstream = Counters {
        bytes: forwarded,
        messages,
    };
    let Side {
        stream: upstream,
        leftover: upstream_leftover,
        forwarded,
        messages,
    } = upstream;
    let upstream_to_client = Counters {
        bytes: forwarded,
        messages,
    };
    let mut splice = Splice {
        client,
        upstream,
        up: Pipe::new(client_leftover, guards),
        down: Pipe::new(upstream_leftover, None),
        client_to_upstream,
        upstream_to_client,
        limits,
        phase: Phase::Open {
            half_close: None,
            idle: limits.idle.map(|d| Box::pin(sleep(d))),
            last_activity: Instant::now(),
        },
        firsts: Firsts::default(),
        stop: Gated::new(stop),
        abort: Gated::new(abort),
    };
    async move {
        let ended = poll_fn(|cx| splice.poll_end(cx)).await;
        splice.outcome(ended)
    }
}

/// One splice between polls: the two directions, the phase, and what the
/// access log will want to know.
struct Splice<'a, C, U, S: Future, A: Future> {
    client: &'a C,
    upstream: &'a U,
    /// Client → upstream.
    up: Pipe,
    /// Upstream → client.
    down: Pipe,
    client_to_upstream: Counters<'a>,
    upstream_to_client: Counters<'a>,
    limits: Limits,
    phase: Phase,
    firsts: Firsts,
    stop: Gated<S>,
    abort: Gated<A>,
}

impl<C, U, S, A> Splice<'_, C, U, S, A>
where
    C: Socket,
    U: Socket,
    S: Future<Output = StopReason>,
    A: Future<Output = ()>,
{
    /// Drives the splice until it ends. Each poll runs the steps in this
    /// order: an abort ends it at once; a stop begins the closing
    /// handshake; each direction moves what it can; then the phase's
    /// deadlines.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            if let Poll::Ready(ended) = self.poll_abort(cx) {
                return Poll::Ready(ended);
            }
            if let Poll::Ready(ended) = self.poll_stop(cx) {
                return Poll::Ready(ended);
            }
            let mut moved = false;
            if let Poll::Ready(ended) = self.poll_client_to_upstream(cx, &mut moved) {
                return Poll::Ready(ended);
            }
            if let Poll::Ready(ended) = self.poll_upstream_to_client(cx, &mut moved) {
                return Poll::Ready(ended);
            }
            match self.poll_deadlines(cx, moved) {
                Step::Ended(ended) => return Poll::Ready(ended),
                Step::Pending => return Poll::Pending,
                // The idle timeout began the closing handshake: poll again
                // so the Close frames go out at once.
                Step::Again => {}
            }
        }
    }

    /// A second shutdown signal cuts at once, even mid-handshake.
    fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        if self.abort.poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(match &self.phase {
            Phase::Closing(c) => c.cause.ended(),
            Phase::Open { .. } => Ended::Stopped(StopReason::Abort),
        })
    }

    /// A stop from outside (drain, lifetime, end of grace) begins the
    /// closing handshake, or ends the splice at once without close settings.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        if matches!(self.phase, Phase::Closing(_)) {
            return Poll::Pending;
        }
        match self.stop.poll(cx) {
            Poll::Ready(reason) => self.close(reason),
            Poll::Pending => Poll::Pending,
        }
    }

    /// wsgate ends the session for `reason`: with Close frames when close
    /// settings are there, else at once.
    fn close(&mut self, reason: StopReason) -> Poll<Ended> {
        let Some(close) = &self.limits.close else {
            return Poll::Ready(Ended::Stopped(reason));
        };
        let closing = Closing::begin(reason, close, &mut self.up, &mut self.down);
        self.phase = Phase::Closing(closing);
        self.observe();
        Poll::Pending
    }

    /// Client → upstream, through the message guards; a guard's refusal
    /// begins the closing handshake (only an open direction trips, so
    /// nothing is closing yet).
    fn poll_client_to_upstream(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Ended> {
        if self.up.is_done() {
            return Poll::Pending;
        }
        let other_done = self.down.is_done();
        let polled = self.up.poll(
            cx,
            self.client,
            self.upstream,
            self.client_to_upstream,
            moved,
            other_done,
        );
        if let Poll::Ready(Err(e)) = polled {
            return Poll::Ready(e.ended(Leg::Client));
        }
        if let Some(guard) = self.up.take_tripped() {
            let Some(close) = &self.limits.close else {
                return Poll::Ready(Ended::Guard(guard));
            };
            self.phase = Phase::Closing(Closing::begin_guard(guard, close, &mut self.down));
        }
        self.observe();
        Poll::Pending
    }

    /// Upstream → client.
    fn poll_upstream_to_client(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Ended> {
        if self.down.is_done() {
            return Poll::Pending;
        }
        let other_done = self.up.is_done();
        let polled = self.down.poll(
            cx,
            self.upstream,
            self.client,
            self.upstream_to_client,
            moved,
            other_done,
        );
        if let Poll::Ready(Err(e)) = polled {
            return Poll::Ready(e.ended(Leg::Upstream));
        }
        self.observe();
        Poll::Pending
    }

    /// The phase's deadlines: the closing handshake's end, or, while open,
    /// both directions done, the half-close timeout and the idle timeout.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>, moved: bool) -> Step {
        let (up, down) = (&self.up, &self.down);
        let (half_close, idle, last_activity) = match &mut self.phase {
            Phase::Closing(c) => {
                let finished = if c.injected {
                    up.close_finished() && down.close_finished()
                } else {
                    up.is_done() && down.is_done()
                };
                if finished || c.deadline.as_mut().poll(cx).is_ready() {
                    return Step::Ended(c.cause.ended());
                }
                return Step::Pending;
            }
            Phase::Open {
                half_close,
                idle,
                last_activity,
            } => (half_close, idle, last_activity),
        };
        if up.is_done() && down.is_done() {
            return Step::Ended(Ended::Closed);
        }
        if up.is_done() || down.is_done() {
            let limit = self.limits.half_close;
            let timer = half_close.get_or_insert_with(|| Box::pin(sleep(limit)));
            if timer.as_mut().poll(cx).is_ready() {
                return Step::Ended(Ended::HalfCloseTimeout);
            }
        }
        if let (Some(timer), Some(limit)) = (idle.as_mut(), self.limits.idle) {
            if moved {
                *last_activity = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every byte:
            // the clock is read once per poll that moved data, no more.
            let mut expired = false;
            while timer.as_mut().poll(cx).is_ready() {
                let deadline = *last_activity + limit;
                if Instant::now() >= deadline {
                    expired = true;
                    break;
                }
                timer.as_mut().reset(deadline);
            }
            if expired {
                return match self.close(StopReason::Idle) {
                    Poll::Ready(ended) => Step::Ended(ended),
                    Poll::Pending => Step::Again,
                };
            }
        }
        Step::Pending
    }

    /// Notes the first Close and the first EOF (see [`Firsts::observe`]).
    fn observe(&mut self) {
        let closing = match &self.phase {
            Phase::Closing(c) => Some(c),
            Phase::Open { .. } => None,
        };
        self.firsts.observe(closing, &self.up, &self.down);
    }

    /// What the splice moved and how it ended.
    fn outcome(mut self, ended: Ended) -> Outcome {
        // What the last poll saw before it returned early (a Close read
        // just before an error, say).
        self.observe();
        let (up, down) = (&mut self.up, &mut self.down);
        let closing = match &self.phase {
            Phase::Closing(c) => Some(c),
            Phase::Open { .. } => None,
        };
        Outcome {
            totals: Totals {
                client_to_upstream: up.bytes(),
                upstream_to_client: down.bytes(),
            },
            first_close: self.firsts.close.map(|who| match who {
                Closer::Peer(Leg::Client) => FirstClose::Peer(Leg::Client, up.take_first_close()),
                Closer::Peer(Leg::Upstream) => {
                    FirstClose::Peer(Leg::Upstream, down.take_first_close())
                }
                Closer::Wsgate(cause) => FirstClose::Wsgate(cause),
            }),
            first_eof: self.firsts.eof,
            traffic: Traffic {
                bytes_in: up.received(),
                bytes_out: down.received(),
                msgs_in: up.data_messages(),
                msgs_out: down.data_messages(),
            },
            close_frames_sent: closing.filter(|c| c.injected).and_then(|c| match c.cause {
                Cause::Stop(reason) => Some(reason),
                Cause::Guard(_) => None,
            }),
            close_completed: matches!(ended, Ended::Stopped(_) | Ended::Guard(_))
                && closing
                    .is_some_and(|c| c.injected && up.close_finished() && down.close_finished()),
            ended,
        }
    }
}

/// What the deadlines step says.
enum Step {
    /// The splice is over.
    Ended(Ended),
    /// Wait for the next wake-up.
    Pending,
    /// The phase changed: run the steps again at once.
    Again,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames;
    use socket2::SockRef;
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

    /// A side with no leftover bytes; bytes and messages count into the
    /// same counter.
    fn side<'a>(stream: &'a TcpStream, forwarded: &'a IntCounter) -> Side<'a> {
        Side {
            stream,
            leftover: Bytes::new(),
            forwarded,
            messages: forwarded,
        }
    }

    /// The splice with no leftovers, fresh counters and no abort.
    async fn splice_simple(
        client: &TcpStream,
        upstream: &TcpStream,
        limits: Limits,
        stop: impl Future<Output = StopReason>,
    ) -> Outcome {
        let (c2u, u2c) = counters();
        splice_no_abort(side(client, &c2u), side(upstream, &u2c), limits, stop).await
    }

    /// The splice with an abort that never comes.
    async fn splice_no_abort<U: Socket>(
        client: Side<'_>,
        upstream: Side<'_, U>,
        limits: Limits,
        stop: impl Future<Output = StopReason>,
    ) -> Outcome {
        splice(
            client,
            upstream,
            limits,
            None,
            Box::pin(stop),
            Box::pin(std::future::pending()),
        )
        .await
    }

    const LIMITS: Limits = Limits {
        half_close: Duration::from_secs(5),
        idle: None,
        close: None,
    };

    const CLOSE: CloseSettings = CloseSettings {
        drain: 1001,
        lifetime: 1012,
        idle: 4000,
        timeout: Duration::from_secs(2),
    };

    /// Reads one whole frame from `s`: (first byte, masked?, payload
    /// unmasked), parsed with the tracker's own header helpers.
    async fn read_frame(s: &mut TcpStream) -> (u8, bool, Vec<u8>) {
        let mut header = [0u8; 14];
        s.read_exact(&mut header[..2]).await.expect("frame header");
        let len = frames::header_len(header[1]);
        s.read_exact(&mut header[2..len])
            .await
            .expect("frame header");
        let mut payload = vec![0u8; frames::payload_len(&header[..len]) as usize];
        s.read_exact(&mut payload).await.expect("payload");
        let masked = header[1] & 0x80 != 0;
        if masked {
            let key = header[len - 4..len].try_into().expect("a 4-byte key");
            frames::apply_mask(&mut payload, key);
        }
        (header[0], masked, payload)
    }

    /// The splice task's outcome, which must come within `limit` (`what`
    /// says what ends it).
    async fn outcome_within(
        limit: Duration,
        task: tokio::task::JoinHandle<Outcome>,
        what: &str,
    ) -> Outcome {
        tokio::time::timeout(limit, task)
            .await
            .expect(what)
            .expect("join")
    }

    /// A splice with close frames on, in its own task, stopped for `reason`
    /// when the returned sender fires.
    fn spawn_closing_splice(
        p_client: TcpStream,
        p_up: TcpStream,
        reason: StopReason,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Outcome>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
            reason
        };
        let task = spawn_closing_splice_with(p_client, p_up, stop, std::future::pending());
        (tx, task)
    }

    /// A splice with close frames on, in its own task, with the given stop
    /// and abort futures.
    fn spawn_closing_splice_with(
        p_client: TcpStream,
        p_up: TcpStream,
        stop: impl Future<Output = StopReason> + Send + 'static,
        abort: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<Outcome> {
        tokio::spawn(async move {
            let (c2u, u2c) = counters();
            let limits = Limits {
                close: Some(CLOSE),
                ..LIMITS
            };
            splice(
                side(&p_client, &c2u),
                side(&p_up, &u2c),
                limits,
                None,
                Box::pin(stop),
                Box::pin(abort),
            )
            .await
        })
    }

    #[tokio::test]
    async fn stop_sends_close_frames_both_ways_and_ends_when_both_reply() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (tx, task) = spawn_closing_splice(p_client, p_up, StopReason::Lifetime);
        tx.send(()).expect("stop");
        let (b0, masked, payload) = read_frame(&mut client).await;
        assert_eq!((b0, masked), (0x88, false), "unmasked Close to the client");
        assert_eq!(&payload[..2], &1012u16.to_be_bytes());
        assert!(payload.len() > 2, "with a reason");
        let (b0, masked, payload) = read_frame(&mut upstream).await;
        assert_eq!((b0, masked), (0x88, true), "masked Close to the upstream");
        assert_eq!(&payload[..2], &1012u16.to_be_bytes());
        // Both reply; the splice then ends at once, not at close_timeout.
        client
            .write_all(&close_frame(1012, "", Some([1, 2, 3, 4])))
            .await
            .expect("reply");
        upstream
            .write_all(&close_frame(1012, "", None))
            .await
            .expect("reply");
        let out = outcome_within(Duration::from_secs(1), task, "ends on replies").await;
        assert!(
            matches!(out.ended, Ended::Stopped(StopReason::Lifetime)),
            "{:?}",
            out.ended
        );
        assert!(out.close_frames_sent == Some(StopReason::Lifetime) && out.close_completed);
    }

    #[tokio::test]
    async fn close_waits_for_the_frame_in_flight_and_drops_later_data() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (tx, task) = spawn_closing_splice(p_client, p_up, StopReason::Drain);
        // Half of a 1000-byte binary frame from the upstream reaches the client...
        let mut frame = vec![0x82, 126];
        frame.extend_from_slice(&1000u16.to_be_bytes());
        frame.extend(std::iter::repeat_n(7u8, 1000));
        upstream.write_all(&frame[..500]).await.expect("first half");
        let mut got = vec![0u8; 500];
        client
            .read_exact(&mut got)
            .await
            .expect("first half through");
        tx.send(()).expect("stop");
        // ...the Close waits for the rest of it, then follows it.
        upstream
            .write_all(&frame[500..])
            .await
            .expect("second half");
        upstream
            .write_all(&[0x81, 0x02, b'h', b'i'])
            .await
            .expect("a later frame");
        let mut rest = vec![0u8; frame.len() - 500];
        client
            .read_exact(&mut rest)
            .await
            .expect("rest of the frame");
        assert_eq!(&rest[..], &frame[500..]);
        let (b0, _, payload) = read_frame(&mut client).await;
        assert_eq!(
            b0, 0x88,
            "the Close comes right after the frame in flight, the later frame is dropped"
        );
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        let _ = read_frame(&mut upstream).await;
        drop((client, upstream));
        let out = outcome_within(Duration::from_secs(3), task, "ends").await;
        assert_eq!(out.close_frames_sent, Some(StopReason::Drain));
    }

    #[tokio::test(start_paused = true)]
    async fn close_is_cut_at_close_timeout_when_a_peer_never_replies() {
        let ((_client, p_client), (p_up, _upstream)) = pairs().await;
        let limits = Limits {
            close: Some(CLOSE),
            ..LIMITS
        };
        let start = Instant::now();
        let out = splice_simple(
            &p_client,
            &p_up,
            limits,
            std::future::ready(StopReason::Grace),
        )
        .await;
        assert!(matches!(out.ended, Ended::Stopped(StopReason::Grace)));
        assert!(out.close_frames_sent == Some(StopReason::Grace) && !out.close_completed);
        assert!(start.elapsed() >= CLOSE.timeout);
    }

    #[tokio::test]
    async fn an_abort_mid_handshake_cuts_at_once_and_still_reports_the_close() {
        let ((mut client, p_client), (p_up, _upstream)) = pairs().await;
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
        let abort = async {
            let _ = abort_rx.await;
        };
        let task =
            spawn_closing_splice_with(p_client, p_up, std::future::ready(StopReason::Grace), abort);
        let (b0, _, _) = read_frame(&mut client).await;
        assert_eq!(b0, 0x88, "the closing handshake started");
        abort_tx.send(()).expect("abort");
        // Well before close_timeout (2 s): the abort cut it.
        let out = outcome_within(Duration::from_millis(500), task, "cut at once").await;
        assert!(
            matches!(out.ended, Ended::Stopped(StopReason::Grace)),
            "{:?}",
            out.ended
        );
        assert_eq!(
            out.close_frames_sent,
            Some(StopReason::Grace),
            "counted though cut"
        );
        assert!(!out.close_completed);
    }

    #[tokio::test]
    async fn copies_both_ways_and_ends_on_double_eof() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (c2u, u2c) = counters();
        let task = tokio::spawn(async move {
            let client = Side {
                leftover: Bytes::from_static(b"early"),
                ..side(&p_client, &c2u)
            };
            splice_no_abort(client, side(&p_up, &u2c), LIMITS, std::future::pending()).await
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
        let Outcome { ended, totals, .. } = task.await.expect("join");
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(
            totals,
            Totals {
                client_to_upstream: 11,
                upstream_to_client: 4
            }
        );
    }

    /// A Unix socket on the upstream leg (docs/operations.md#unix-socket-upstream): bytes both ways, each
    /// FIN passed on, a clean end on the double EOF.
    #[tokio::test]
    async fn copies_both_ways_over_a_unix_upstream_leg() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (p_client, _) = l.accept().await.expect("accept");
        let (p_up, mut upstream) = tokio::net::UnixStream::pair().expect("unix pair");
        let (c2u, u2c) = counters();
        let task = tokio::spawn(async move {
            let up = Side {
                stream: &p_up,
                leftover: Bytes::from_static(b"101 leftover "),
                forwarded: &u2c,
                messages: &u2c,
            };
            splice_no_abort(side(&p_client, &c2u), up, LIMITS, std::future::pending()).await
        });
        client.write_all(b"up").await.expect("write");
        let mut got = [0u8; 2];
        upstream.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"up");
        upstream.write_all(b"down").await.expect("write");
        let mut got = [0u8; 17];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"101 leftover down");
        upstream.shutdown().await.expect("fin");
        assert_eq!(
            client.read(&mut [0u8; 1]).await.expect("eof"),
            0,
            "the Unix leg's FIN passed on"
        );
        client.shutdown().await.expect("fin");
        assert_eq!(
            upstream.read(&mut [0u8; 1]).await.expect("eof"),
            0,
            "the client's FIN passed on"
        );
        let Outcome { ended, totals, .. } = task.await.expect("join");
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(
            totals,
            Totals {
                client_to_upstream: 2,
                upstream_to_client: 17
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_close_is_bounded() {
        let ((mut client, p_client), (p_up, _upstream)) = pairs().await;
        client.shutdown().await.expect("fin");
        let Outcome { ended, .. } =
            splice_simple(&p_client, &p_up, LIMITS, std::future::pending()).await;
        assert!(matches!(ended, Ended::HalfCloseTimeout), "{ended:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_without_traffic() {
        let ((_client, p_client), (p_up, _upstream)) = pairs().await;
        let limits = Limits {
            idle: Some(Duration::from_secs(3)),
            ..LIMITS
        };
        let start = Instant::now();
        let Outcome { ended, .. } =
            splice_simple(&p_client, &p_up, limits, std::future::pending()).await;
        assert!(
            matches!(ended, Ended::Stopped(StopReason::Idle)),
            "{ended:?}"
        );
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn stop_ends_the_splice() {
        let ((_client, p_client), (p_up, _upstream)) = pairs().await;
        let Outcome { ended, .. } = splice_simple(
            &p_client,
            &p_up,
            LIMITS,
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
        // SO_LINGER 0 turns close into RST.
        SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(client);
        let Outcome { ended, .. } =
            splice_simple(&p_client, &p_up, LIMITS, std::future::pending()).await;
        assert!(matches!(ended, Ended::Error(Leg::Client, _)), "{ended:?}");
    }
}
