//! One direction of the splice: reads from one socket, writes to the
//! other, and knows which phase of its life it is in.
//!
//! Why a module: the phases (forwarding, slipping wsgate's Ping in at the
//! next frame boundary, injecting a Close at the next message boundary,
//! waiting for the peer's reply, finished) are the part
//! of the splice that later features grow (message guards inject their own
//! Close frames, throttling pauses reads). Kept as one [`Phase`] value, an
//! impossible combination — a reply awaited while no Close was sent, a
//! Close queued behind a FIN — cannot be written, and each transition is
//! one assignment in this file.

use std::io;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use prometheus::IntCounter;

use super::buffers::{return_buffer, take_buffer};
use super::guards::{Guard, Guards, Verdict, UPSTREAM_GUARD_CODE};
use super::pings::PingFrame;
use super::socket::Socket;
use super::{Ended, Leg};
use crate::frames::{close_frame, CloseSeen, FrameTracker};

/// Where a direction is in its life.
///
/// ```text
/// Open ─begin_close, at a message boundary──────────▶ CloseQueued ─written─▶ AwaitingReply ─Close read─▶ Replied
/// Open ─begin_close, mid-message─▶ InjectAtBoundary ─boundary read─▶ CloseQueued{replied if the rest held it}
/// CloseQueued{replied: true} ─written─▶ Replied
/// Open ─send_ping, mid-frame─▶ PingAtBoundary ─frame boundary read─▶ Open (at a boundary: queued at once)
/// PingAtBoundary ─begin_close─▶ as from Open (the Ping is dropped: the Close says more)
/// Open, PingAtBoundary ─abandon─▶ AwaitingReply (what waited for `dst` dropped, no Close to it)
/// any phase ─EOF read─▶ Done (the FIN passed on); begin_close leaves Done as it is
/// ```
///
/// EOF is only read once nothing is pending, so it leads to `Done` at once:
/// there is no phase in which a FIN waits to be passed on.
enum Phase {
    /// Forwarding everything `src` sends.
    Open,
    /// Forwarding, and `src` is inside a frame: wsgate's Ping goes to
    /// `dst` at the next frame boundary (a control frame may sit between
    /// the fragments of a message, so the message need not end first).
    PingAtBoundary(PingFrame),
    /// wsgate is closing the connection and `src` is inside a message:
    /// forward up to the next message boundary, then this Close frame.
    InjectAtBoundary(Vec<u8>),
    /// Our Close frame ends `pending`: what `src` sends from now on is
    /// dropped, but watched for its Close reply. `replied`: the reply came
    /// already, in the read that reached the boundary.
    CloseQueued {
        /// `src` answered our Close before it was written.
        replied: bool,
    },
    /// Our Close frame reached `dst`; dropping what `src` sends until its
    /// Close reply.
    AwaitingReply,
    /// `src` answered our Close: this direction's part of the closing
    /// handshake is over. What it still sends is dropped.
    Replied,
    /// `src` ended and its EOF was passed on as a FIN: nothing moves any
    /// more. A closing handshake counts it as finished (nothing can follow
    /// a FIN, and no reply will come).
    Done,
}

/// One direction: reads from `src`, writes to `dst` (both passed to
/// [`Pipe::poll`], so the splice future holds each socket once).
pub(crate) struct Pipe {
    /// Bytes read but not yet written, and how far writing got.
    pending: Option<(Vec<u8>, usize)>,
    /// Bytes written to `dst` so far.
    bytes: u64,
    /// Bytes read from `src` so far, with those that came with the
    /// handshake (the access log's `bytes_in` / `bytes_out`).
    received: u64,
    /// Frame boundaries of what `src` sent.
    tracker: FrameTracker,
    /// Where this direction is.
    phase: Phase,
    /// Messages forwarded (the tracker's count where forwarding last
    /// stopped), and how many of them the metric has.
    messages: u64,
    messages_counted: u64,
    /// The message guards (client → upstream only); `None` = off, and the
    /// plain path.
    guards: Option<Box<Guards>>,
    /// A guard refused a frame and this direction sent the upstream its
    /// Close: the splice closes the other direction.
    tripped: Option<Guard>,
}

/// The metrics a direction moves as it forwards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    /// Bytes written.
    pub(crate) bytes: &'a IntCounter,
    /// Messages forwarded.
    pub(crate) messages: &'a IntCounter,
}

/// A direction failed; which side depends on the call.
pub(crate) enum PipeError {
    /// Reading from `src` failed.
    Read(io::Error),
    /// Writing to `dst` failed.
    Write(io::Error),
}

impl PipeError {
    /// How the splice ended, for a direction that reads from `src` and
    /// writes to the other leg.
    pub(crate) fn ended(self, src: Leg) -> Ended {
        match self {
            PipeError::Read(e) => Ended::Error(src, e),
            PipeError::Write(e) => Ended::Error(src.other(), e),
        }
    }
}

impl Pipe {
    /// A direction that writes `leftover` (bytes read past the handshake)
    /// first; with `guards`, those bytes are checked like any read.
    pub(crate) fn new(leftover: Bytes, mut guards: Option<Box<Guards>>) -> Self {
        let mut tracker = FrameTracker::new();
        let mut pending = None;
        let received = leftover.len() as u64;
        match &mut guards {
            Some(g) => g.hold_leftover(Vec::from(leftover)),
            None if leftover.is_empty() => {}
            None => {
                tracker.advance(&leftover);
                pending = Some((Vec::from(leftover), 0));
            }
        }
        Pipe {
            pending,
            bytes: 0,
            received,
            messages: tracker.messages_seen(),
            messages_counted: 0,
            tracker,
            phase: Phase::Open,
            guards,
            tripped: None,
        }
    }

    /// The guard that refused a frame, once: the splice then closes the
    /// other direction with that guard's Close.
    pub(crate) fn take_tripped(&mut self) -> Option<Guard> {
        self.tripped.take()
    }

    /// Bytes written to `dst` so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes read from `src` so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// Data messages `src` sent (control frames not counted).
    pub(crate) fn data_messages(&self) -> u64 {
        self.tracker.data_messages_seen()
    }

    /// The first Close frame `src` sent, if it sent one (taken: called
    /// once, when the splice ends).
    pub(crate) fn take_first_close(&mut self) -> Option<Box<CloseSeen>> {
        self.tracker.take_first_close()
    }

    /// Whether `src` has sent a Close frame (a closing handshake of the
    /// peers' own is under way).
    pub(crate) fn saw_close(&self) -> bool {
        self.tracker.closes_seen() > 0
    }

    /// `src` ended and the FIN was passed on.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether this direction's part of the closing handshake is over: our
    /// Close was written and answered, or `src` ended.
    pub(crate) fn close_finished(&self) -> bool {
        matches!(self.phase, Phase::Replied | Phase::Done)
    }

    /// Whether our Close has reached `dst` (answered or not), or `src`
    /// ended, so that none will be sent.
    pub(crate) fn close_sent(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitingReply | Phase::Replied | Phase::Done
        )
    }

    /// Whether read bytes wait for `dst` to take them (its socket is full:
    /// while they wait, `src` is not read).
    pub(crate) fn waiting_to_write(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether this direction forwards and no Close is under way in it.
    fn open(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::PingAtBoundary(_))
    }

    /// The next Ping for the client, if this direction (client → upstream)
    /// watches for the answers to wsgate's Pings.
    pub(crate) fn next_ping(&mut self) -> Option<PingFrame> {
        self.guards.as_deref_mut()?.next_ping()
    }

    /// Sends `dst` wsgate's Ping: after what is read already if that ends
    /// at a frame boundary, else at the next one. False when this direction
    /// no longer forwards (closing, or finished) and no Ping will go.
    pub(crate) fn send_ping(&mut self, frame: PingFrame) -> bool {
        if !matches!(self.phase, Phase::Open) {
            return false;
        }
        if !self.tracker.at_boundary() {
            self.phase = Phase::PingAtBoundary(frame);
            return true;
        }
        match &mut self.pending {
            Some((buf, _)) => buf.extend_from_slice(&frame),
            None => self.pending = Some((frame.to_vec(), 0)),
        }
        true
    }

    /// Gives `dst` up (a client that stopped answering or reading): what
    /// waits for it is dropped and nothing more goes to it, not even a
    /// Close; what `src` sends is dropped too, watched only for its Close
    /// (the answer to the one the other direction sent it).
    pub(crate) fn abandon(&mut self) {
        if !self.open() {
            return;
        }
        if let Some((buf, _)) = self.pending.take() {
            return_buffer(buf);
        }
        self.phase = Phase::AwaitingReply;
    }

    /// Starts closing this direction with `frame`: at once if the stream is
    /// at a message boundary, else when the current message is through.
    pub(crate) fn begin_close(&mut self, frame: Vec<u8>) {
        // Done: the source is gone and its FIN passed on, nothing can follow
        // it. Any other phase but Open (or a Ping waiting, which the Close
        // replaces): closing began already (it begins once per splice).
        if !self.open() {
            return;
        }
        if !self.tracker.at_message_boundary() {
            self.phase = Phase::InjectAtBoundary(frame);
            return;
        }
        match &mut self.pending {
            Some((buf, _)) => buf.extend_from_slice(&frame),
            None => self.pending = Some((frame, 0)),
        }
        self.phase = Phase::CloseQueued { replied: false };
    }

    /// Feeds freshly read bytes to the tracker and applies the phase: what
    /// stays in `buf` is what will be written.
    fn process(&mut self, buf: &mut Vec<u8>) {
        if self.guards.is_some() && self.forwarding() {
            return self.process_guarded(buf);
        }
        match self.phase {
            Phase::Open => {
                self.tracker.advance(buf);
                self.messages = self.tracker.messages_seen();
            }
            Phase::PingAtBoundary(frame) => self.ping_at_boundary(buf, frame),
            Phase::InjectAtBoundary(ref frame) => {
                let boundary = self.tracker.advance_to_message_boundary(buf);
                self.messages = self.tracker.messages_seen();
                if let Some(offset) = boundary {
                    let replied = feed_watching_for_close(&mut self.tracker, &buf[offset..]);
                    buf.truncate(offset);
                    buf.extend_from_slice(frame);
                    self.phase = Phase::CloseQueued { replied };
                }
            }
            Phase::AwaitingReply => {
                if feed_watching_for_close(&mut self.tracker, buf) {
                    self.phase = Phase::Replied;
                }
                buf.clear();
            }
            // Not reached: reads (and held-back bytes) wait until `pending`,
            // which holds the queued Close, is written. Watching for the
            // reply keeps the tracker right all the same.
            Phase::CloseQueued { ref mut replied } => {
                *replied |= feed_watching_for_close(&mut self.tracker, buf);
                buf.clear();
            }
            // Replied: nothing to watch for any more. Done is not reached: a
            // finished direction is not polled.
            Phase::Replied | Phase::Done => buf.clear(),
        }
    }

    /// [`Pipe::process`] with a Ping waiting for a frame boundary: it goes
    /// in at the first one in `buf`. Out of line, so that the forwarding
    /// path's code stays as it is without pings.
    #[cold]
    #[inline(never)]
    fn ping_at_boundary(&mut self, buf: &mut Vec<u8>, frame: PingFrame) {
        if let Some(offset) = self.tracker.advance_to_frame_boundary(buf) {
            self.tracker.advance(&buf[offset..]);
            buf.splice(offset..offset, frame);
            self.phase = Phase::Open;
        }
        self.messages = self.tracker.messages_seen();
    }

    /// [`Pipe::process`] while forwarding with guards on: the guards say
    /// how much of `buf` goes on; the rest is a cut-short header kept for
    /// the next read, bytes held back for tokens, or a refused frame, which
    /// ends this direction with a Close to the upstream (or with the Close
    /// a closing direction already waits to send).
    fn process_guarded(&mut self, buf: &mut Vec<u8>) {
        let Some(guards) = self.guards.as_deref_mut() else {
            return;
        };
        let closing = matches!(self.phase, Phase::InjectAtBoundary(_));
        let verdict = guards.scan(&mut self.tracker, buf, closing);
        self.messages = self.tracker.messages_seen();
        let (at, refused) = match verdict {
            // `scan` took the answers out and went on.
            Verdict::Pass | Verdict::Answer { .. } => return,
            Verdict::Partial(at) => {
                guards.keep_for_next_read(&buf[at..]);
                buf.truncate(at);
                return;
            }
            Verdict::Wait { at, until, guard } => {
                guards.hold(buf, at, until, guard);
                return;
            }
            Verdict::Boundary(at) => (at, None),
            Verdict::Refuse { at, guard } => {
                guards.count_close(guard);
                (at, Some(guard))
            }
        };
        let frame = match std::mem::replace(&mut self.phase, Phase::Open) {
            Phase::InjectAtBoundary(frame) => frame,
            // Open: only a refusal stops a scan that does not look for a
            // boundary. Towards the upstream wsgate speaks as the client: masked.
            _ => {
                let guard = refused.unwrap_or(Guard::Size);
                self.tripped = Some(guard);
                close_frame(
                    UPSTREAM_GUARD_CODE,
                    guard.upstream_reason(),
                    Some(rand::random()),
                )
            }
        };
        let replied = feed_watching_for_close(&mut self.tracker, &buf[at..]);
        buf.truncate(at);
        buf.extend_from_slice(&frame);
        self.phase = Phase::CloseQueued { replied };
    }

    /// Counts the messages forwarded since the last call.
    fn count_messages(&mut self, counter: &IntCounter) {
        if self.messages != self.messages_counted {
            counter.inc_by(self.messages - self.messages_counted);
            self.messages_counted = self.messages;
        }
    }

    /// Whether this direction still forwards what `src` sends (so the
    /// guards' waits apply); later phases only watch for a Close reply.
    fn forwarding(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::PingAtBoundary(_) | Phase::InjectAtBoundary(_)
        )
    }

    /// `pending` is all written: its buffer goes back to the pool, and a
    /// Close queued at its end is now sent.
    fn pending_written(&mut self) {
        if let Some((buf, _)) = self.pending.take() {
            return_buffer(buf);
        }
        if let Phase::CloseQueued { replied } = self.phase {
            self.phase = if replied {
                Phase::Replied
            } else {
                Phase::AwaitingReply
            };
        }
    }

    /// `src` ended: passes the EOF on and finishes this direction.
    fn finish(&mut self, dst: &impl Socket, other_done: bool) {
        // A peer that already reset makes the shutdown fail; the direction
        // is finished either way. When the other direction is finished too,
        // the splice ends now and the caller's close sends this FIN (`dst`
        // has nothing unread after its own EOF, so close cannot turn into a
        // RST): one system call fewer per connection.
        if !other_done {
            if let Err(e) = dst.shutdown_write() {
                tracing::trace!(error = %e, "passing on FIN");
            }
        }
        self.phase = Phase::Done;
    }

    /// Drives this direction as far as it can go without blocking. Returns
    /// `Ready(Ok)` once finished; `Pending` with wakers registered otherwise.
    /// `counters` count what is forwarded; `moved` is set when a byte moved.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &impl Socket,
        dst: &impl Socket,
        counters: Counters<'_>,
        moved: &mut bool,
        other_done: bool,
    ) -> Poll<Result<(), PipeError>> {
        let counter = counters.bytes;
        loop {
            if let Some((buf, pos)) = &mut self.pending {
                while *pos < buf.len() {
                    ready!(dst.poll_write_ready(cx)).map_err(PipeError::Write)?;
                    match write_some(dst, &buf[*pos..]) {
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
                self.pending_written();
            }
            // Bytes the guards held back go before anything new is read:
            // not reading is what pushes back on the client.
            let wait = self.forwarding();
            if let Some(guards) = self.guards.as_deref_mut() {
                if let Some(mut buf) = ready!(guards.poll_held(cx, wait)) {
                    self.process(&mut buf);
                    self.count_messages(counters.messages);
                    self.queue(buf);
                    continue;
                }
            }
            // Wait for readability *before* taking a buffer: idle costs nothing.
            ready!(src.poll_read_ready(cx)).map_err(PipeError::Read)?;
            let mut buf = take_buffer();
            if let Some(guards) = &self.guards {
                buf.extend_from_slice(guards.carry());
            }
            match read_some(src, &mut buf) {
                Ok(0) => {
                    // A header cut short by the EOF is a broken frame: dropped.
                    return_buffer(buf);
                    self.finish(dst, other_done);
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    *moved = true;
                    self.received += n as u64;
                    if let Some(guards) = self.guards.as_deref_mut() {
                        guards.carried();
                    }
                    self.process(&mut buf);
                    self.count_messages(counters.messages);
                    self.queue(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(guards) = self.guards.as_deref_mut() {
                        guards.caught_up();
                    }
                    return_buffer(buf);
                }
                Err(e) => {
                    return_buffer(buf);
                    return Poll::Ready(Err(PipeError::Read(e)));
                }
            }
        }
    }
}

impl Pipe {
    /// What [`Pipe::process`] left in `buf` is written next.
    fn queue(&mut self, buf: Vec<u8>) {
        if buf.is_empty() {
            return_buffer(buf);
        } else {
            self.pending = Some((buf, 0));
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

/// Feeds `bytes` to `tracker`; whether a Close frame began among them (the
/// peer's reply to ours).
fn feed_watching_for_close(tracker: &mut FrameTracker, bytes: &[u8]) -> bool {
    let before = tracker.closes_seen();
    tracker.advance(bytes);
    tracker.closes_seen() > before
}

/// Reads into `buf`'s spare capacity. After a short read the socket is
/// almost surely drained, so read readiness is cleared right away (as
/// tokio's own `AsyncRead` does); otherwise the next loop would pay one
/// more `read` syscall just to learn `EAGAIN` — per message, per direction.
/// Clearing is safe: data that arrives later raises a new edge-triggered
/// event with a newer tick, which this clear does not erase.
fn read_some(src: &impl Socket, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    clearing_when_short(src, tokio::io::Interest::READABLE, spare, || {
        src.try_read_buf(buf)
    })
}

/// Writes what the socket takes; after a short write the send buffer is
/// full, so write readiness is cleared at once (see [`read_some`]).
fn write_some(dst: &impl Socket, data: &[u8]) -> io::Result<usize> {
    clearing_when_short(dst, tokio::io::Interest::WRITABLE, data.len(), || {
        dst.try_write(data)
    })
}

/// Runs `op` (an IO of at most `full` bytes) under `try_io`, and clears the
/// `interest` readiness when it moved fewer than `full` bytes.
fn clearing_when_short(
    stream: &impl Socket,
    interest: tokio::io::Interest,
    full: usize,
    op: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let result = stream.try_io(interest, || {
        let n = op()?;
        if n > 0 && n < full {
            short = Some(n);
            // Makes `try_io` clear the readiness; `short` keeps the count.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::close_frame;

    /// An unmasked binary frame of `len` bytes of 7.
    fn binary(len: u8) -> Vec<u8> {
        let mut f = vec![0x82, len];
        f.extend(std::iter::repeat_n(7, usize::from(len)));
        f
    }

    #[test]
    fn a_close_begun_mid_message_waits_for_the_boundary_and_notices_a_reply_behind_it() {
        let ours = close_frame(1001, "bye", None);
        let frame = binary(10);
        let mut pipe = Pipe::new(Bytes::copy_from_slice(&frame[..4]), None);
        pipe.begin_close(ours.clone());
        assert!(matches!(pipe.phase, Phase::InjectAtBoundary(_)));
        pipe.pending_written();
        assert!(
            matches!(pipe.phase, Phase::InjectAtBoundary(_)),
            "still mid-message"
        );
        // The rest of the frame, then the peer's own Close, in one read.
        let mut buf = frame[4..].to_vec();
        buf.extend_from_slice(&close_frame(1000, "", Some([1, 2, 3, 4])));
        pipe.process(&mut buf);
        let mut expected = frame[4..].to_vec();
        expected.extend_from_slice(&ours);
        assert_eq!(
            buf, expected,
            "the frame's rest, then our Close; the reply is dropped"
        );
        assert!(matches!(pipe.phase, Phase::CloseQueued { replied: true }));
        assert!(!pipe.close_finished(), "not before our Close is written");
        pipe.pending_written();
        assert!(matches!(pipe.phase, Phase::Replied) && pipe.close_finished());
    }

    #[test]
    fn a_close_at_a_boundary_is_queued_and_replies_are_dropped() {
        let ours = close_frame(1001, "bye", None);
        let mut pipe = Pipe::new(Bytes::new(), None);
        pipe.begin_close(ours.clone());
        assert!(matches!(pipe.phase, Phase::CloseQueued { replied: false }));
        assert_eq!(pipe.pending.as_ref().map(|(b, _)| b.clone()), Some(ours));
        pipe.pending_written();
        assert!(matches!(pipe.phase, Phase::AwaitingReply));
        let mut buf = binary(3);
        pipe.process(&mut buf);
        assert!(
            buf.is_empty() && !pipe.close_finished(),
            "data dropped, still waiting"
        );
        let mut buf = close_frame(1001, "", Some([9, 9, 9, 9]));
        pipe.process(&mut buf);
        assert!(
            buf.is_empty() && pipe.close_finished(),
            "the reply ends it, dropped too"
        );
    }

    /// A drain that waits for the end of a message still holds the client
    /// to its size limit: the oversized fragment is not forwarded, the
    /// drain's own Close goes in its place, and the splice is not asked for
    /// a second, guard Close (it is closing already).
    #[test]
    fn a_closing_direction_still_refuses_an_oversized_fragment() {
        use crate::config::MessageGuards;
        use crate::frames::encode_frame;
        use crate::splice::guards::GuardMetrics;

        let settings = MessageGuards {
            max_message_size: Some(100),
            ..MessageGuards::OFF
        };
        let guards = Guards::new(&settings, false, &GuardMetrics::unregistered());
        let mut pipe = Pipe::new(Bytes::new(), guards);
        let key = Some([1, 2, 3, 4]);
        let first = encode_frame(0x2, false, &[7; 60], key);
        let mut buf = first.clone();
        pipe.process(&mut buf);
        assert_eq!(buf, first, "within the limit: forwarded");
        let drain = close_frame(1001, "draining", Some([5, 6, 7, 8]));
        pipe.begin_close(drain.clone());
        assert!(
            matches!(pipe.phase, Phase::InjectAtBoundary(_)),
            "mid-message"
        );
        let mut buf = encode_frame(0x0, true, &[7; 41], key);
        pipe.process(&mut buf);
        assert_eq!(
            buf, drain,
            "the 101st byte's fragment is dropped, the drain's Close sent"
        );
        assert!(matches!(pipe.phase, Phase::CloseQueued { replied: false }));
        assert_eq!(pipe.take_tripped(), None);
    }

    /// Bytes held back for tokens when a drain begins at a message boundary
    /// are not forwarded after the drain's Close: they are watched for the
    /// client's reply like anything it sends from then on.
    #[tokio::test(start_paused = true)]
    async fn bytes_held_for_tokens_are_not_forwarded_after_a_close() {
        use crate::config::{MessageGuards, RateLimit};
        use crate::frames::encode_frame;
        use crate::splice::guards::GuardMetrics;

        let settings = MessageGuards {
            message_rate: Some(RateLimit {
                per_second: 1.0,
                burst: 1.0,
            }),
            ..MessageGuards::OFF
        };
        let guards = Guards::new(&settings, false, &GuardMetrics::unregistered());
        let mut pipe = Pipe::new(Bytes::new(), guards);
        let key = Some([1, 2, 3, 4]);
        let one = encode_frame(0x1, true, b"one", key);
        let mut buf = one.clone();
        buf.extend(encode_frame(0x1, true, b"two", key));
        pipe.process(&mut buf);
        assert_eq!(buf, one, "the second message waits for a token");
        pipe.begin_close(close_frame(1001, "draining", Some([5, 6, 7, 8])));
        assert!(matches!(pipe.phase, Phase::CloseQueued { .. }));
        pipe.pending_written();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Some(Poll::Ready(Some(held))) = pipe
            .guards
            .as_deref_mut()
            .map(|g| g.poll_held(&mut cx, false))
        else {
            panic!("held bytes")
        };
        let mut buf = held;
        buf.extend(close_frame(1000, "", Some([9, 9, 9, 9])));
        pipe.process(&mut buf);
        assert!(buf.is_empty(), "dropped, not forwarded");
        assert!(
            pipe.close_finished(),
            "the client's reply behind them was seen"
        );
    }

    /// An unmasked frame as the upstream sends it.
    fn server(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        crate::frames::encode_frame(opcode, fin, payload, None)
    }

    const PING: PingFrame = [0x89, 8, 1, 2, 3, 4, 0, 0, 0, 1];

    #[test]
    fn a_ping_at_a_frame_boundary_follows_what_was_read() {
        let frame = server(0x2, true, b"data");
        let mut pipe = Pipe::new(Bytes::copy_from_slice(&frame), None);
        assert!(pipe.send_ping(PING));
        let mut expected = frame;
        expected.extend_from_slice(&PING);
        assert_eq!(
            pipe.pending.as_ref().map(|(b, _)| b.clone()),
            Some(expected)
        );
        assert!(matches!(pipe.phase, Phase::Open));
        // Nothing pending: the Ping alone.
        pipe.pending_written();
        assert!(pipe.send_ping(PING));
        assert_eq!(
            pipe.pending.as_ref().map(|(b, _)| b.clone()),
            Some(PING.to_vec())
        );
    }

    /// Mid-frame, the Ping waits for the frame's end, and goes between two
    /// fragments of a message: it does not wait for the message's end.
    #[test]
    fn a_ping_mid_frame_goes_in_at_the_next_frame_boundary() {
        let first = server(0x1, false, b"one");
        let second = server(0x0, false, b"two");
        let last = server(0x0, true, b"three");
        let mut pipe = Pipe::new(Bytes::copy_from_slice(&first[..3]), None);
        assert!(pipe.send_ping(PING));
        assert!(matches!(pipe.phase, Phase::PingAtBoundary(_)));
        pipe.pending_written();
        let mut buf = first[3..].to_vec();
        buf.extend_from_slice(&second);
        buf.extend_from_slice(&last);
        pipe.process(&mut buf);
        let mut expected = first[3..].to_vec();
        expected.extend_from_slice(&PING);
        expected.extend_from_slice(&second);
        expected.extend_from_slice(&last);
        assert_eq!(buf, expected, "in right after the frame in flight");
        assert!(matches!(pipe.phase, Phase::Open));
        assert!(
            pipe.tracker.at_message_boundary(),
            "the tracker followed the rest"
        );
        assert_eq!(pipe.data_messages(), 1, "the Ping is not the upstream's");
    }

    #[test]
    fn no_ping_while_closing_and_a_close_replaces_a_waiting_ping() {
        let frame = server(0x2, true, &[7; 20]);
        let mut pipe = Pipe::new(Bytes::copy_from_slice(&frame[..5]), None);
        assert!(pipe.send_ping(PING));
        assert!(!pipe.send_ping(PING), "one at a time");
        let ours = close_frame(1001, "bye", None);
        pipe.begin_close(ours.clone());
        assert!(matches!(pipe.phase, Phase::InjectAtBoundary(_)));
        assert!(!pipe.send_ping(PING), "closing");
        pipe.pending_written();
        let mut buf = frame[5..].to_vec();
        pipe.process(&mut buf);
        let mut expected = frame[5..].to_vec();
        expected.extend_from_slice(&ours);
        assert_eq!(buf, expected, "the Close, no Ping");
    }

    #[test]
    fn an_abandoned_direction_drops_what_waits_and_watches_for_the_reply() {
        let mut pipe = Pipe::new(Bytes::from_static(&[0x82, 3, 1, 2, 3]), None);
        assert!(pipe.waiting_to_write());
        pipe.abandon();
        assert!(!pipe.waiting_to_write(), "dropped");
        assert!(pipe.close_sent() && !pipe.close_finished());
        let mut buf = server(0x2, true, b"more");
        buf.extend(close_frame(1001, "", None));
        pipe.process(&mut buf);
        assert!(buf.is_empty() && pipe.close_finished(), "the reply ends it");
    }

    #[test]
    fn a_finished_direction_stays_finished() {
        let mut pipe = Pipe::new(Bytes::new(), None);
        pipe.phase = Phase::Done;
        pipe.begin_close(close_frame(1001, "", None));
        assert!(pipe.is_done() && pipe.close_finished() && pipe.pending.is_none());
    }
}

/// The size guard against a reference: random messages (fragmented, with
/// pings between fragments) cut into random reads. The pipe must forward
/// the stream byte-identical up to the header of the first frame that takes
/// its message past the limit, then exactly one masked Close 1001, and
/// nothing of the refused frame.
#[cfg(test)]
mod size_guard_props {
    use proptest::prelude::*;

    use super::*;
    use crate::config::MessageGuards;
    use crate::frames::{apply_mask, encode_frame, Header};
    use crate::splice::guards::GuardMetrics;

    /// What the pipe forwards of one read, as `poll` does it: carried bytes
    /// first; what it leaves in the buffer counts as written.
    fn read(pipe: &mut Pipe, bytes: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Some(g) = pipe.guards.as_deref_mut() {
            buf.extend_from_slice(g.carry());
            g.carried();
        }
        buf.extend_from_slice(bytes);
        pipe.process(&mut buf);
        pipe.pending_written();
        buf
    }

    /// A masked client frame; `key` varies so payloads differ on the wire.
    fn frame(out: &mut Vec<u8>, opcode: u8, fin: bool, len: usize, key: u8) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ key).collect();
        out.extend(encode_frame(
            opcode,
            fin,
            &payload,
            Some([key, key ^ 0x5a, 3, 4]),
        ));
    }

    /// (fragment payload lengths, a ping after each fragment?) per message.
    fn messages() -> impl Strategy<Value = Vec<Vec<(usize, bool)>>> {
        let fragment = (
            prop_oneof![0usize..200, 200usize..1200, 65_530usize..65_540],
            any::<bool>(),
        );
        prop::collection::vec(prop::collection::vec(fragment, 1..5), 1..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn refuses_exactly_the_first_message_over_the_limit(
            msgs in messages(),
            limit in 1u64..3_000,
            exact in any::<Option<prop::sample::Index>>(),
            cuts in prop::collection::vec(1usize..3_000, 1..64),
        ) {
            // Often the limit is exactly one message's size: the boundary case.
            let limit = exact.map_or(limit, |pick| {
                let m = &msgs[pick.index(msgs.len())];
                m.iter().map(|&(len, _)| len as u64).sum::<u64>().max(1)
            });
            let mut stream = Vec::new();
            let mut refused_at = None;
            for (m, fragments) in msgs.iter().enumerate() {
                let mut total = 0u64;
                for (i, &(len, ping)) in fragments.iter().enumerate() {
                    total += len as u64;
                    if total > limit && refused_at.is_none() {
                        refused_at = Some(stream.len());
                    }
                    let opcode = if i == 0 { 0x2 } else { 0x0 };
                    frame(&mut stream, opcode, i + 1 == fragments.len(), len, (m * 7 + i) as u8);
                    if ping {
                        frame(&mut stream, 0x9, true, 4, 0xee);
                    }
                }
            }
            let settings = MessageGuards { max_message_size: Some(limit), ..MessageGuards::OFF };
            let guards = Guards::new(&settings, false, &GuardMetrics::unregistered());
            let mut pipe = Pipe::new(Bytes::new(), guards);
            let mut out = Vec::new();
            let (mut offset, mut i) = (0, 0);
            while offset < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - offset);
                out.extend(read(&mut pipe, &stream[offset..offset + n]));
                offset += n;
                i += 1;
            }
            match refused_at {
                None => {
                    prop_assert!(out == stream, "everything within the limit goes on byte-identical");
                    prop_assert!(pipe.take_tripped().is_none());
                }
                Some(at) => {
                    prop_assert!(out.len() > at && out[..at] == stream[..at], "forwarded up to the refused frame");
                    let close = &out[at..];
                    let header = Header::parse(close).expect("a whole Close header");
                    prop_assert!(header.is_close() && close[1] & 0x80 != 0, "a masked Close");
                    prop_assert_eq!(close.len() as u64, header.len as u64 + header.payload_len, "and nothing after it");
                    let key: [u8; 4] = close[header.len - 4..header.len].try_into().expect("key");
                    let mut payload = close[header.len..].to_vec();
                    apply_mask(&mut payload, key);
                    prop_assert_eq!(&payload[..2], &1001u16.to_be_bytes());
                    prop_assert_eq!(pipe.take_tripped(), Some(Guard::Size));
                }
            }
        }
    }
}
