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
//! Signals to the client (docs/behaviour.md#signals-clients-can-act-on): with `ping_interval` set,
//! wsgate sends a client that has been quiet that long a Ping, at the next
//! *frame* boundary of the upstream → client direction (a control frame may
//! sit between the fragments of a message), and takes the client's answer
//! out of the client → upstream direction (the message guards' scan does
//! it). When nothing comes within `pong_timeout`, or when bytes for the
//! client wait `send_timeout` for its socket, wsgate gives the client up:
//! the upstream gets Close 1001 as for any end wsgate decides, and only the
//! upstream's reply is waited for. A quiet client is sent a Close 1001 too
//! (it may still read); a client that stopped reading is sent nothing more,
//! what waited for it is dropped, and its socket is reset when closed.
//!
//! Message guards (docs/operations.md#message-guards): the client → upstream direction may carry
//! [`Guards`] that decide, frame header by frame header, what goes on, what
//! waits for tokens, and what is refused. A refusal sends the upstream a
//! Close 1001 at once, and the client the guard's Close (1009, 1008) at its
//! next message boundary; then the closing handshake runs as above.
//!
//! Layout: this file holds the splice's own loop (both directions, the
//! deadlines, the stop and abort); `pipe` is one direction and the phases
//! of its life; `guards` the message guards; `pings` what wsgate's Pings
//! say and which Pongs answer them; `watch` the pings' and the send
//! timeout's timers; `buffers` the per-thread buffer pool; `gate` the waker
//! gate that keeps the stop and abort futures off the per-message path;
//! `socket` the operations a leg's socket offers.

mod buffers;
mod gate;
mod guards;
mod metrics;
mod pings;
mod pipe;
mod socket;
mod watch;

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
use watch::{ClientWatch, Due};
pub(crate) use watch::{PingSettings, Unresponsive, UNRESPONSIVE_CODE};

/// Deadlines that end a splice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// After one direction finished, how long the other may continue.
    pub(crate) half_close: Duration,
    /// End the splice after this long without a byte either way.
    pub(crate) idle: Option<Duration>,
    /// Close frames for connections wsgate ends; `None` = cut TCP at once.
    pub(crate) close: Option<CloseSettings>,
    /// `ping_interval` and `pong_timeout`; `None` = no Pings.
    pub(crate) pings: Option<PingSettings>,
    /// `send_timeout`; `None` = bytes for the client may wait forever.
    pub(crate) send_timeout: Option<Duration>,
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
    /// wsgate gave the client up: no answer to its Ping, or its socket
    /// took nothing for `send_timeout`.
    Unresponsive(Unresponsive),
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
        /// Automatic rebalancing shed it.
        Rebalance => "drain",
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
            StopReason::AdminDrain | StopReason::Rebalance => {
                "server rebalancing, please reconnect"
            }
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
            StopReason::Rebalance => close.rebalance,
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
    /// The client stopped answering or reading.
    Unresponsive(Unresponsive),
}

impl Cause {
    /// How the splice ends for this cause.
    pub(crate) fn ended(self) -> Ended {
        match self {
            Cause::Stop(reason) => Ended::Stopped(reason),
            Cause::Guard(guard) => Ended::Guard(guard),
            Cause::Unresponsive(why) => Ended::Unresponsive(why),
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
        /// The pings and the send timeout; `None` with both off.
        watch: Option<Box<ClientWatch>>,
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
    /// The client was given up: only the upstream's part is waited for.
    client_gone: bool,
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
                client_gone: false,
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
            client_gone: false,
        }
    }

    /// Gives the client up for `why`: the upstream gets Close 1001 at the
    /// client's next message boundary, as for any end wsgate decides. A
    /// quiet client is sent Close 1001 too, in case it still reads; a
    /// client that stopped reading (bytes for it wait) is sent nothing
    /// more. Either way its reply is not waited for, only the upstream's.
    fn begin_unresponsive(
        why: Unresponsive,
        close: &CloseSettings,
        up: &mut Pipe,
        down: &mut Pipe,
    ) -> Self {
        let deadline = Box::pin(sleep(close.timeout));
        if up.saw_close() || down.saw_close() {
            // As in `begin`: the peers' own closing handshake is let finish.
            return Closing {
                cause: Cause::Unresponsive(why),
                deadline,
                injected: false,
                client_gone: false,
            };
        }
        let text = why.close_text();
        up.begin_close(close_frame(UNRESPONSIVE_CODE, text, Some(rand::random())));
        // A quiet client may still read: it gets its Close. One whose socket
        // is full (not reading either) would never take it, and waiting to
        // write it would keep the upstream's reply unread.
        if why == Unresponsive::Ping && !down.waiting_to_write() {
            down.begin_close(close_frame(UNRESPONSIVE_CODE, text, None));
        } else {
            down.abandon();
        }
        Closing {
            cause: Cause::Unresponsive(why),
            deadline,
            injected: true,
            client_gone: true,
        }
    }

    /// Whether the closing handshake is over: each direction's Close
    /// answered (or its source ended); for a client given up, the
    /// upstream's Close sent and answered; for the peers' own handshake,
    /// both sides ended.
    fn finished(&self, up: &Pipe, down: &Pipe) -> bool {
        if !self.injected {
            up.is_done() && down.is_done()
        } else if self.client_gone {
            up.close_sent() && down.close_finished()
        } else {
            up.close_finished() && down.close_finished()
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
            client_gone: false,
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
/// `pings_sent` counts wsgate's Pings (`wsgate_pings_sent_total`), with
/// `limits.pings` set; `guards` must then be made to take out their
/// answers (`Guards::new(.., pongs: true, ..)`): without that no Ping is
/// sent.
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
    pings_sent: &'a IntCounter,
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
    let up = Pipe::new(client_leftover, guards);
    let watch = ClientWatch::new(limits.pings, limits.send_timeout, up.received());
    let mut splice = Splice {
        client,
        upstream,
        up,
        down: Pipe::new(upstream_leftover, None),
        client_to_upstream,
        upstream_to_client,
        limits,
        phase: Phase::Open {
            half_close: None,
            idle: limits.idle.map(|d| Box::pin(sleep(d))),
            last_activity: Instant::now(),
            watch,
        },
        firsts: Firsts::default(),
        pings_sent,
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
    /// `wsgate_pings_sent_total`.
    pings_sent: &'a IntCounter,
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
    /// both directions done, the half-close timeout, the idle timeout, and
    /// the client watch (pings, send timeout).
    fn poll_deadlines(&mut self, cx: &mut Context<'_>, moved: bool) -> Step {
        let (up, down) = (&self.up, &self.down);
        let (half_close, idle, last_activity, watch) = match &mut self.phase {
            Phase::Closing(c) => {
                if c.finished(up, down) || c.deadline.as_mut().poll(cx).is_ready() {
                    return Step::Ended(c.cause.ended());
                }
                return Step::Pending;
            }
            Phase::Open {
                half_close,
                idle,
                last_activity,
                watch,
            } => (half_close, idle, last_activity, watch),
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
        if watch.is_none() {
            return Step::Pending;
        }
        self.poll_watch(cx)
    }

    /// The client watch's step (pings, send timeout): a Ping to send, or
    /// the client to give up. Out of line, so that a connection without
    /// the watch runs the same code as before it existed.
    #[inline(never)]
    fn poll_watch(&mut self, cx: &mut Context<'_>) -> Step {
        let Phase::Open {
            watch: Some(watch), ..
        } = &mut self.phase
        else {
            return Step::Pending;
        };
        let (up, down) = (&self.up, &self.down);
        let received = (!up.is_done()).then(|| up.received());
        let due = watch.poll(cx, received, down.waiting_to_write(), down.bytes());
        match due {
            Poll::Pending => Step::Pending,
            Poll::Ready(Due::Ping) => {
                let sent = match self.up.next_ping() {
                    Some(ping) => self.down.send_ping(ping),
                    None => false,
                };
                if sent {
                    self.pings_sent.inc();
                }
                watch.ping_sent(sent);
                // Poll again so the Ping is written now.
                Step::Again
            }
            Poll::Ready(Due::End(why)) => match self.give_up(why) {
                Poll::Ready(ended) => Step::Ended(ended),
                Poll::Pending => Step::Again,
            },
        }
    }

    /// wsgate gives the client up for `why` (see
    /// [`Closing::begin_unresponsive`]), or ends at once without close
    /// settings.
    fn give_up(&mut self, why: Unresponsive) -> Poll<Ended> {
        let Some(close) = &self.limits.close else {
            return Poll::Ready(Ended::Unresponsive(why));
        };
        let closing = Closing::begin_unresponsive(why, close, &mut self.up, &mut self.down);
        self.phase = Phase::Closing(closing);
        self.observe();
        Poll::Pending
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
                Cause::Guard(_) | Cause::Unresponsive(_) => None,
            }),
            close_completed: matches!(
                ended,
                Ended::Stopped(_) | Ended::Guard(_) | Ended::Unresponsive(_)
            ) && closing.is_some_and(|c| c.injected && c.finished(up, down)),
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
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
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
        let pings = IntCounter::new("p", "p").expect("metric");
        splice(
            client,
            upstream,
            limits,
            None,
            &pings,
            Box::pin(stop),
            Box::pin(std::future::pending()),
        )
        .await
    }

    const LIMITS: Limits = Limits {
        half_close: Duration::from_secs(5),
        idle: None,
        close: None,
        pings: None,
        send_timeout: None,
    };

    const CLOSE: CloseSettings = CloseSettings {
        drain: 1001,
        lifetime: 1012,
        idle: 4000,
        rebalance: 1012,
        timeout: Duration::from_secs(2),
    };

    /// Reads one whole frame from `s`: (first byte, masked?, payload
    /// unmasked), parsed with the tracker's own header helpers.
    async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> (u8, bool, Vec<u8>) {
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
            let pings = IntCounter::new("p", "p").expect("metric");
            let limits = Limits {
                close: Some(CLOSE),
                ..LIMITS
            };
            splice(
                side(&p_client, &c2u),
                side(&p_up, &u2c),
                limits,
                None,
                &pings,
                Box::pin(stop),
                Box::pin(abort),
            )
            .await
        })
    }

    /// A splice with close frames on, wsgate's Pings (their answers taken
    /// out) and `send_timeout` as given, in its own task; with the Pings
    /// counter it counts into.
    fn spawn_watching_splice(
        p_client: TcpStream,
        p_up: TcpStream,
        pings: Option<PingSettings>,
        send_timeout: Option<Duration>,
    ) -> (IntCounter, tokio::task::JoinHandle<Outcome>) {
        let counter = IntCounter::new("p", "p").expect("metric");
        let pings_sent = counter.clone();
        let task = tokio::spawn(async move {
            let (c2u, u2c) = counters();
            let limits = Limits {
                close: Some(CLOSE),
                pings,
                send_timeout,
                ..LIMITS
            };
            let guards = Guards::new(
                &crate::config::MessageGuards::OFF,
                pings.is_some(),
                &guards::GuardMetrics::unregistered(),
            );
            splice(
                side(&p_client, &c2u),
                side(&p_up, &u2c),
                limits,
                guards,
                &pings_sent,
                Box::pin(std::future::pending()),
                Box::pin(std::future::pending()),
            )
            .await
        });
        (counter, task)
    }

    const FAST_PINGS: PingSettings = PingSettings {
        interval: Duration::from_millis(100),
        pong_timeout: Duration::from_secs(5),
    };

    /// A masked client frame.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut masked = payload.to_vec();
        frames::apply_mask(&mut masked, key);
        frames::encode_frame(opcode, true, &masked, Some(key))
    }

    /// Polls `counter` until it reaches `n`, within a second.
    async fn counted(counter: &IntCounter, n: u64) {
        let start = Instant::now();
        while counter.get() < n {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{} of {n}",
                counter.get()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_quiet_client_is_pinged_and_its_answer_stays_with_wsgate() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (pings, task) = spawn_watching_splice(p_client, p_up, Some(FAST_PINGS), None);
        let (b0, masked, ping) = read_frame(&mut client).await;
        assert_eq!(
            (b0, masked, ping.len()),
            (0x89, false, 8),
            "an unmasked Ping"
        );
        assert_eq!(pings.get(), 1);
        // The answer, the client's own Pong and a message, in one write.
        let mut bytes = client_frame(0xA, &ping);
        bytes.extend(client_frame(0xA, b"mine"));
        bytes.extend(client_frame(0x1, b"after"));
        client.write_all(&bytes).await.expect("write");
        assert_eq!(
            read_frame(&mut upstream).await,
            (0x8A, true, b"mine".to_vec())
        );
        assert_eq!(
            read_frame(&mut upstream).await,
            (0x81, true, b"after".to_vec())
        );
        // Quiet again: another Ping an interval later, with another number.
        let (b0, _, next) = read_frame(&mut client).await;
        assert_eq!(b0, 0x89);
        assert_ne!(next, ping);
        drop((client, upstream));
        let out = outcome_within(Duration::from_secs(2), task, "ends").await;
        assert!(
            matches!(out.ended, Ended::Closed | Ended::Error(..)),
            "{:?}",
            out.ended
        );
        assert_eq!(
            out.totals.client_to_upstream as usize,
            bytes.len() - 14,
            "the answer not forwarded"
        );
    }

    #[tokio::test]
    async fn a_ping_waits_for_the_frame_in_flight_but_not_for_the_message() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let (pings, task) = spawn_watching_splice(p_client, p_up, Some(FAST_PINGS), None);
        let first = frames::encode_frame(0x2, false, &[1; 10], None);
        let second = frames::encode_frame(0x0, false, &[2; 10], None);
        let last = frames::encode_frame(0x0, true, &[3; 10], None);
        let mut head = first.clone();
        head.extend_from_slice(&second[..5]);
        upstream.write_all(&head).await.expect("write");
        let mut got = vec![0u8; head.len()];
        client.read_exact(&mut got).await.expect("through");
        // The Ping is due while the second fragment is cut: it waits.
        counted(&pings, 1).await;
        let mut rest = second[5..].to_vec();
        rest.extend_from_slice(&last);
        upstream.write_all(&rest).await.expect("write");
        let mut got = vec![0u8; second.len() - 5];
        client
            .read_exact(&mut got)
            .await
            .expect("the rest of the fragment");
        assert_eq!(got, second[5..]);
        let (b0, _, _) = read_frame(&mut client).await;
        assert_eq!(b0, 0x89, "the Ping between the fragments");
        let (b0, _, payload) = read_frame(&mut client).await;
        assert_eq!((b0, payload), (0x80, vec![3; 10]), "then the last fragment");
        drop((client, upstream));
        let _ = outcome_within(Duration::from_secs(2), task, "ends").await;
    }

    #[tokio::test]
    async fn a_client_that_never_answers_is_given_up_at_the_pong_timeout() {
        let ((mut client, p_client), (p_up, mut upstream)) = pairs().await;
        let settings = PingSettings {
            interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(200),
        };
        let start = Instant::now();
        let (_, task) = spawn_watching_splice(p_client, p_up, Some(settings), None);
        // The upstream: Close 1001, masked; it answers at once.
        let (b0, masked, payload) = read_frame(&mut upstream).await;
        assert_eq!((b0, masked), (0x88, true));
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"ping timeout");
        let took = start.elapsed();
        assert!(
            took >= settings.interval + settings.pong_timeout,
            "{took:?}"
        );
        upstream
            .write_all(&close_frame(1001, "", None))
            .await
            .expect("reply");
        // Ends on the upstream's reply alone, well before close_timeout.
        let out =
            outcome_within(Duration::from_secs(1), task, "ends on the upstream's reply").await;
        assert!(
            matches!(out.ended, Ended::Unresponsive(Unresponsive::Ping)),
            "{:?}",
            out.ended
        );
        assert!(out.close_completed && out.close_frames_sent.is_none());
        assert!(matches!(
            out.first_close,
            Some(FirstClose::Wsgate(Cause::Unresponsive(Unresponsive::Ping)))
        ));
        // The client got the Ping, then Close 1001, in case it still reads.
        let (b0, _, _) = read_frame(&mut client).await;
        assert_eq!(b0, 0x89);
        let (b0, masked, payload) = read_frame(&mut client).await;
        assert_eq!(
            (b0, masked, &payload[..2]),
            (0x88, false, &1001u16.to_be_bytes()[..])
        );
    }

    /// A client that neither reads (a 4 KiB receive buffer) nor sends, an
    /// upstream that floods (whole frames) until wsgate's Close comes, then
    /// answers it; the splice with `pings` and `send_timeout`. Returns the
    /// outcome, the Close the upstream got, and how much it had sent by then.
    async fn flood_a_stuck_client(
        pings: Option<PingSettings>,
        send_timeout: Option<Duration>,
    ) -> (Outcome, (u8, bool, Vec<u8>), usize) {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let client = sock
            .connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (p_client, _) = l.accept().await.expect("accept");
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let p_up = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (upstream, _) = l.accept().await.expect("accept");
        let (_, task) = spawn_watching_splice(p_client, p_up, pings, send_timeout);
        let (mut up_read, mut up_write) = upstream.into_split();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (stop_flood, sent_by_flood) = (stop.clone(), sent.clone());
        let flood = tokio::spawn(async move {
            let frame = frames::encode_frame(0x2, true, &[9; 16 * 1024], None);
            while !stop_flood.load(Ordering::SeqCst) {
                up_write.write_all(&frame).await.expect("flood");
                sent_by_flood.fetch_add(frame.len(), Ordering::SeqCst);
            }
            up_write
                .write_all(&close_frame(1001, "", None))
                .await
                .expect("reply");
        });
        let close = read_frame(&mut up_read).await;
        let sent_by_then = sent.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        flood.await.expect("flood");
        // Ends on the upstream's reply, well before close_timeout.
        let out =
            outcome_within(Duration::from_secs(1), task, "ends on the upstream's reply").await;
        drop(client);
        (out, close, sent_by_then)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_given_up_at_the_send_timeout() {
        let (out, close, sent) = flood_a_stuck_client(None, Some(Duration::from_millis(300))).await;
        assert_eq!(close, (0x88, true, close_frame_payload("send timeout")));
        assert!(
            matches!(out.ended, Ended::Unresponsive(Unresponsive::Send)),
            "{:?}",
            out.ended
        );
        assert!(out.close_completed);
        // wsgate stopped reading the upstream while the client's socket was
        // full: what the upstream got out before it blocked is what the
        // sockets' buffers hold, not a send timeout's worth of flood.
        assert!(sent < 16 << 20, "{sent} bytes");
    }

    /// A client quiet and not reading, pings on, no send timeout: the pong
    /// timeout gives it up, and with its socket full nothing more is queued
    /// for it, so the upstream's reply is read at once.
    #[tokio::test]
    async fn a_quiet_client_that_does_not_read_either_is_given_up_at_the_pong_timeout() {
        let pings = PingSettings {
            interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(200),
        };
        let (out, close, _) = flood_a_stuck_client(Some(pings), None).await;
        assert_eq!(close, (0x88, true, close_frame_payload("ping timeout")));
        assert!(
            matches!(out.ended, Ended::Unresponsive(Unresponsive::Ping)),
            "{:?}",
            out.ended
        );
        assert!(out.close_completed);
    }

    /// A Close payload: 1001 and `reason`.
    fn close_frame_payload(reason: &str) -> Vec<u8> {
        let mut p = 1001u16.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
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
