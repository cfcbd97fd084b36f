//! Message guards (docs/operations.md#message-guards): what a client may send inside an admitted
//! connection — message size, frames per message, messages per second,
//! payload bytes per second — checked on the client → upstream direction as
//! frame headers pass, without buffering a message.
//!
//! How it stays exact without buffering:
//! - A frame header is only ever forwarded whole. When a read ends inside a
//!   header, those few bytes (at most 14) are held back and put in front of
//!   the next read, so a frame that is then refused has not had a single
//!   byte forwarded.
//! - The decision for a frame is taken on its header, before anything of
//!   the frame goes on: too big (its announced length takes the message
//!   past `max_message_size`) → refused; no message token → held back
//!   (throttle) or refused (close).
//! - Held back means *not read*: the unforwarded rest of the read (at most
//!   one 32 KiB buffer) waits here for its tokens, and the socket is not
//!   read again until it has gone, so TCP pushes back on the client and
//!   nothing is dropped or grows.
//! - Payload bytes take tokens from the byte bucket as they go; a frame may
//!   be forwarded in pieces.
//! - Guards count frames, not only messages and bytes: an empty
//!   continuation frame carries no payload and is not a new message, yet
//!   the upstream pays for each one. So a message may have at most
//!   `max_fragments` frames, and past its first [`FREE_FRAGMENTS`] frames
//!   each frame takes a message token of its own. Both are two counters
//!   here; nothing is allocated per frame.
//!
//! A client's Close frame is never held back or refused by the rate guard:
//! it ends the connection, which is what a guard wants anyway.
//!
//! With pings on (docs/behaviour.md#pings-from-wsgate) the same scan also
//! takes out the client's Pongs that answer wsgate's own Pings: it already
//! sees every frame header whole, and a Pong that may be one (a Pong of a
//! Ping's length) is held back like a cut-short header until all of it is
//! there, so an answer is never forwarded in part. Such a connection gets
//! this scan even with every guard off; an answer takes no token.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::{sleep_until, Instant, Sleep};

use super::buffers::take_buffer;
use super::pings::{PingFrame, PongMatcher};
use crate::config::{MessageGuards, RateAction, RateLimit};
use crate::frames::{FrameTracker, Header};
use crate::metrics::{labels, Label, Registrar};

labels! {
    /// Which guard acted (`guard` label).
    pub(crate) enum Guard {
        /// `max_message_size`.
        Size => "size",
        /// `max_fragments`. Counted as `size`: to the client it is the same
        /// refusal (a message too big, Close 1009), and the Close reasons
        /// tell the two limits apart.
        Fragments => "size",
        /// `message_rate`.
        Rate => "rate",
        /// `byte_rate`.
        Bytes => "bytes",
    }
}

labels! {
    /// What a guard did (`action` label).
    pub(crate) enum GuardAction {
        /// Ended the connection.
        Close => "close",
        /// Began holding the client back.
        Throttle => "throttle",
    }
}

/// The Close code the upstream gets when a guard ends a session: 1001
/// "Going Away" (the client, not the upstream, broke the rule).
pub(crate) const UPSTREAM_GUARD_CODE: u16 = 1001;

/// `wsgate_message_guard_total{guard,action}`: one handle per pair that can
/// happen (the size guard only closes, the byte guard only throttles).
#[derive(Debug, Clone)]
pub(crate) struct GuardMetrics {
    size_close: IntCounter,
    rate_close: IntCounter,
    rate_throttle: IntCounter,
    bytes_throttle: IntCounter,
}

impl GuardMetrics {
    /// Registers `wsgate_message_guard_total`, every pair at 0.
    ///
    /// # Errors
    /// The name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        let vec = r.counter_vec(
            "wsgate_message_guard_total",
            "Message guard actions: connections closed, throttle episodes begun",
            &["guard", "action"],
        )?;
        Ok(Self::of(&vec))
    }

    /// Handles that count into no registry (tests of the splice).
    #[cfg(test)]
    pub(crate) fn unregistered() -> Self {
        let vec =
            prometheus::IntCounterVec::new(prometheus::Opts::new("g", "g"), &["guard", "action"])
                .expect("a valid metric");
        Self::of(&vec)
    }

    fn of(vec: &prometheus::IntCounterVec) -> Self {
        let pair = |g: Guard, a: GuardAction| vec.with_label_values(&[g.label(), a.label()]);
        GuardMetrics {
            size_close: pair(Guard::Size, GuardAction::Close),
            rate_close: pair(Guard::Rate, GuardAction::Close),
            rate_throttle: pair(Guard::Rate, GuardAction::Throttle),
            bytes_throttle: pair(Guard::Bytes, GuardAction::Throttle),
        }
    }

    /// Counts one action of `guard` (a throttle once per episode).
    pub(crate) fn count(&self, guard: Guard, action: GuardAction) {
        let counter = match (guard, action) {
            (Guard::Size | Guard::Fragments, _) => &self.size_close,
            (Guard::Rate, GuardAction::Close) => &self.rate_close,
            (Guard::Rate, GuardAction::Throttle) => &self.rate_throttle,
            (Guard::Bytes, _) => &self.bytes_throttle,
        };
        counter.inc();
    }
}

impl Guard {
    /// The Close code sent to the client: 1009 "Message Too Big", 1008
    /// "Policy Violation" (RFC 6455 §7.4.1).
    pub(crate) fn client_code(self) -> u16 {
        match self {
            Guard::Size | Guard::Fragments => 1009,
            Guard::Rate | Guard::Bytes => 1008,
        }
    }

    /// The reason text of the client's Close.
    pub(crate) fn client_reason(self) -> &'static str {
        match self {
            Guard::Size => "message too big",
            Guard::Fragments => "message has too many fragments",
            Guard::Rate | Guard::Bytes => "message rate exceeded",
        }
    }

    /// The reason text of the upstream's Close ([`UPSTREAM_GUARD_CODE`]).
    pub(crate) fn upstream_reason(self) -> &'static str {
        match self {
            Guard::Size => "client message too big",
            Guard::Fragments => "client message has too many fragments",
            Guard::Rate | Guard::Bytes => "client exceeded message rate",
        }
    }
}

/// Where the scan of a read stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// All of it may go on.
    Pass,
    /// `data[..at]` may go on; `data[at..]` is the start of a header (or
    /// of a Pong that may answer wsgate), held back until the rest of it is
    /// read.
    Partial(usize),
    /// `data[..at]` may go on; the rest waits for tokens until `until`.
    Wait {
        /// Where the held-back part starts.
        at: usize,
        /// When the missing tokens will be there.
        until: Instant,
        /// The guard that holds it back.
        guard: Guard,
    },
    /// `data[..at]` may go on; the frame at `at` is refused and the
    /// connection ends.
    Refuse {
        /// Where the refused frame starts.
        at: usize,
        /// The guard that refused it.
        guard: Guard,
    },
    /// `data[..at]` may go on and ends at a message boundary (asked for by
    /// a closing direction that waits for one).
    Boundary(usize),
    /// `data[at..at + len]` is a Pong answering wsgate's Ping (the scan
    /// takes it out and goes on; never returned by [`Guards::scan`]).
    Answer {
        /// Where the Pong starts.
        at: usize,
        /// Its length.
        len: usize,
    },
}

/// Whether the frame of `header` takes a message token: a message's first
/// frame and each control frame but a Close (which always passes), and a
/// continuation once its message has more than [`FREE_FRAGMENTS`] frames
/// (`fragments` counts them, this one included).
fn takes_message_token(header: &Header, fragments: u64) -> bool {
    if header.is_continuation() {
        fragments > FREE_FRAGMENTS
    } else {
        !header.is_close()
    }
}

/// Takes the `len` bytes at `at` out of `data` (an answer to wsgate's
/// Ping). Moving the rest of the read down is cheaper than keeping offsets:
/// there is one answer per ping interval at most.
#[cold]
#[inline(never)]
fn take_out(data: &mut Vec<u8>, at: usize, len: usize) {
    data.drain(at..at + len);
}

/// What the scan does with a Pong whose header is at `rest[0]` (`at` in
/// the read): `Partial` while it may be an answer to wsgate's Ping but is
/// not all there, `Answer` when it is one, `None` to judge it as any frame.
/// Out of line: Pongs are rare, and the scan is on every read's path.
#[cold]
#[inline(never)]
fn answer_verdict(pongs: &PongMatcher, header: &Header, rest: &[u8], at: usize) -> Option<Verdict> {
    let len = PongMatcher::candidate_len(header)?;
    let Some(frame) = rest.get(..len) else {
        return Some(Verdict::Partial(at));
    };
    pongs.answers(frame).then_some(Verdict::Answer { at, len })
}

/// A token bucket on tokio's clock.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    size: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    fn new(b: RateLimit, now: Instant) -> Self {
        TokenBucket {
            per_second: b.per_second,
            size: b.burst,
            tokens: b.burst,
            at: now,
        }
    }

    /// Adds the tokens earned since the last refill.
    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.size);
        self.at = now;
    }

    /// When the bucket will hold `n` tokens (`n` ≤ size).
    fn ready_at(&self, n: f64) -> Instant {
        let missing = (n - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.per_second)
    }
}

/// The frames of one message covered by the message token its first frame
/// took: a message fragmented the way clients and libraries do it costs one
/// token, while a flood of continuation frames pays per frame like a flood
/// of messages (docs/operations.md#message-guards).
pub(crate) const FREE_FRAGMENTS: u64 = 16;

/// A throttled byte stream wakes at most this often: each wake-up lets
/// through at least 1/50 s worth of bytes.
const BYTE_WAKEUPS_PER_SECOND: f64 = 50.0;

/// The guards of one connection's client → upstream direction.
#[derive(Debug)]
pub(crate) struct Guards {
    max_message_size: Option<u64>,
    /// Payload bytes of the message in progress, forwarded so far.
    message_len: u64,
    max_fragments: Option<u64>,
    /// Frames of the message in progress (its first one included),
    /// forwarded so far; control frames between them are not counted.
    fragments: u64,
    messages: Option<TokenBucket>,
    close_over_rate: bool,
    bytes: Option<TokenBucket>,
    /// The start of a header the last read cut short (see the module docs).
    carry: Vec<u8>,
    /// Read but held back for tokens.
    held: Option<Vec<u8>>,
    /// Fires when the held bytes may be tried again.
    timer: Option<Pin<Box<Sleep>>>,
    /// A throttle episode is under way (counted once, when it began).
    throttling: bool,
    /// wsgate's Pings, with pings on: their answers are taken out.
    pongs: Option<PongMatcher>,
    metrics: GuardMetrics,
}

impl Guards {
    /// Guards with full buckets, taking out the answers to wsgate's Pings
    /// if `pongs`; `None` when every guard is off and `pongs` is not asked for.
    pub(crate) fn new(
        settings: &MessageGuards,
        pongs: bool,
        metrics: &GuardMetrics,
    ) -> Option<Box<Self>> {
        if !settings.any() && !pongs {
            return None;
        }
        let now = Instant::now();
        Some(Box::new(Guards {
            max_message_size: settings.max_message_size,
            message_len: 0,
            max_fragments: settings.max_fragments,
            fragments: 0,
            messages: settings.message_rate.map(|b| TokenBucket::new(b, now)),
            close_over_rate: settings.message_rate_action == RateAction::Close,
            bytes: settings.byte_rate.map(|b| TokenBucket::new(b, now)),
            carry: Vec::new(),
            held: None,
            timer: None,
            throttling: false,
            pongs: pongs.then(PongMatcher::new),
            metrics: metrics.clone(),
        }))
    }

    /// The next Ping to send the client, if this connection watches for
    /// their answers.
    pub(crate) fn next_ping(&mut self) -> Option<PingFrame> {
        self.pongs.as_mut().map(PongMatcher::next_ping)
    }

    /// Decides how much of `data` may go on. `tracker` must sit at the
    /// start of `data` and not inside a header; it is advanced over exactly
    /// what may go on. With `to_message_boundary`, the scan stops at the
    /// first message boundary. The answers to wsgate's Pings are taken out
    /// of `data` as they are met: the verdict's offsets are in what is left.
    pub(crate) fn scan(
        &mut self,
        tracker: &mut FrameTracker,
        data: &mut Vec<u8>,
        to_message_boundary: bool,
    ) -> Verdict {
        // The clock is read once per scan, and only by the rate guards.
        let mut clock: Option<Instant> = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let mut at = 0;
        loop {
            if to_message_boundary && tracker.at_message_boundary() {
                return Verdict::Boundary(at);
            }
            let rest = &data[at..];
            if rest.is_empty() {
                return Verdict::Pass;
            }
            if let Some(remaining) = tracker.payload_remaining() {
                let mut n = remaining.min(rest.len() as u64);
                if let Some(bucket) = &mut self.bytes {
                    bucket.refill(now());
                    let tokens = bucket.tokens.floor() as u64;
                    if tokens == 0 {
                        // Wait for a useful amount, not for one byte.
                        let want = (n as f64)
                            .min(bucket.size)
                            .min((bucket.per_second / BYTE_WAKEUPS_PER_SECOND).max(1.0));
                        return Verdict::Wait {
                            at,
                            until: bucket.ready_at(want),
                            guard: Guard::Bytes,
                        };
                    }
                    n = n.min(tokens);
                    bucket.tokens -= n as f64;
                }
                let n = n as usize;
                tracker.advance(&rest[..n]);
                at += n;
                continue;
            }
            let Some(header) = Header::parse(rest) else {
                return Verdict::Partial(at);
            };
            // The message's counts with this frame in; kept only once the
            // frame may go on, so a frame held back is judged afresh.
            let (message_len, fragments) = if header.is_control() {
                // An answer to wsgate's Ping is judged whole, before any
                // guard: it is not forwarded, so it costs the upstream
                // nothing. (Checked among control frames only: data frames,
                // the common case, pay nothing for it.)
                if let (true, Some(pongs)) = (header.is_pong(), &self.pongs) {
                    match answer_verdict(pongs, &header, rest, at) {
                        Some(Verdict::Answer { at, len }) => {
                            take_out(data, at, len);
                            continue;
                        }
                        Some(verdict) => return verdict,
                        None => {}
                    }
                }
                (self.message_len, self.fragments)
            } else {
                let (len, frames) = if header.is_continuation() {
                    (self.message_len, self.fragments)
                } else {
                    (0, 0)
                };
                let total = len.saturating_add(header.payload_len);
                if self.max_message_size.is_some_and(|max| total > max) {
                    return Verdict::Refuse {
                        at,
                        guard: Guard::Size,
                    };
                }
                let frames = frames.saturating_add(1);
                if self.max_fragments.is_some_and(|max| frames > max) {
                    return Verdict::Refuse {
                        at,
                        guard: Guard::Fragments,
                    };
                }
                (total, frames)
            };
            if takes_message_token(&header, fragments) {
                if let Some(bucket) = &mut self.messages {
                    bucket.refill(now());
                    if bucket.tokens < 1.0 {
                        return if self.close_over_rate {
                            Verdict::Refuse {
                                at,
                                guard: Guard::Rate,
                            }
                        } else {
                            Verdict::Wait {
                                at,
                                until: bucket.ready_at(1.0),
                                guard: Guard::Rate,
                            }
                        };
                    }
                    bucket.tokens -= 1.0;
                }
            }
            self.message_len = message_len;
            self.fragments = fragments;
            tracker.advance(&rest[..header.len]);
            at += header.len;
        }
    }

    /// Holds back `buf[at..]` until `until` (`buf` keeps what may go on),
    /// counting the start of a throttle episode.
    pub(crate) fn hold(&mut self, buf: &mut Vec<u8>, at: usize, until: Instant, guard: Guard) {
        let held = if at == 0 {
            std::mem::take(buf)
        } else {
            let mut held = take_buffer();
            held.extend_from_slice(&buf[at..]);
            buf.truncate(at);
            held
        };
        self.held = Some(held);
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(until),
            None => self.timer = Some(Box::pin(sleep_until(until))),
        }
        if !self.throttling {
            self.throttling = true;
            self.metrics.count(guard, GuardAction::Throttle);
        }
    }

    /// Counts a connection a guard ended.
    pub(crate) fn count_close(&self, guard: Guard) {
        self.metrics.count(guard, GuardAction::Close);
    }

    /// The held-back bytes once they may be tried again (at once unless
    /// `wait`); `Ready(None)` when nothing is held.
    pub(crate) fn poll_held(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Option<Vec<u8>>> {
        if self.held.is_none() {
            return Poll::Ready(None);
        }
        if wait {
            if let Some(timer) = &mut self.timer {
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(self.held.take())
    }

    /// Bytes read earlier to go in front of the next read (see the module
    /// docs); cleared with [`Guards::carried`] once that read succeeded.
    pub(crate) fn carry(&self) -> &[u8] {
        &self.carry
    }

    /// The carried bytes are in a successful read now.
    pub(crate) fn carried(&mut self) {
        self.carry.clear();
    }

    /// Keeps `bytes` (a cut-short header) for the next read.
    pub(crate) fn keep_for_next_read(&mut self, bytes: &[u8]) {
        self.carry.extend_from_slice(bytes);
    }

    /// The client had nothing more to send: a throttle episode is over.
    pub(crate) fn caught_up(&mut self) {
        self.throttling = false;
    }

    /// Leftover bytes read with the handshake: scanned like any read, on
    /// the first poll.
    pub(crate) fn hold_leftover(&mut self, leftover: Vec<u8>) {
        if !leftover.is_empty() {
            self.held = Some(leftover);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MessageGuards;
    use crate::frames::encode_frame;

    /// A masked client frame of `len` bytes.
    fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
        encode_frame(opcode, fin, &vec![0x33; len], Some([1, 2, 3, 4]))
    }

    /// [`Guards::scan`] over a copy of `data`.
    fn scan(g: &mut Guards, t: &mut FrameTracker, data: &[u8], to_boundary: bool) -> Verdict {
        g.scan(t, &mut data.to_vec(), to_boundary)
    }

    fn guards(edit: impl FnOnce(&mut MessageGuards)) -> Box<Guards> {
        let mut settings = MessageGuards::OFF;
        edit(&mut settings);
        Guards::new(&settings, false, &GuardMetrics::unregistered()).expect("a guard is on")
    }

    fn rate(per_second: f64, burst: f64) -> Option<RateLimit> {
        Some(RateLimit { per_second, burst })
    }

    /// What the pipe forwards of `stream` cut into reads at `cuts`: each
    /// read goes behind the carried bytes, as `Pipe::poll` does it.
    fn forwarded(g: &mut Guards, stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut t = FrameTracker::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&stream.len()]) {
            let mut buf = g.carry().to_vec();
            g.carried();
            buf.extend_from_slice(&stream[from..to]);
            from = to;
            match g.scan(&mut t, &mut buf, false) {
                Verdict::Pass => {}
                Verdict::Partial(at) => {
                    g.keep_for_next_read(&buf[at..]);
                    buf.truncate(at);
                }
                other => panic!("{other:?}"),
            }
            out.extend(buf);
        }
        out
    }

    /// The client's answer to `ping`, masked.
    fn answer(ping: &[u8]) -> Vec<u8> {
        let key = [0x5a, 0x01, 0x77, 0xc3];
        let mut payload = ping[2..].to_vec();
        crate::frames::apply_mask(&mut payload, key);
        encode_frame(0xA, true, &payload, Some(key))
    }

    /// With pings on, the answer to wsgate's Ping is taken out wherever the
    /// reads cut it, and costs no message token; the client's own Pong (a
    /// Ping's length, another payload) and everything else go on.
    #[test]
    fn answers_to_wsgates_pings_are_taken_out_wherever_reads_cut_them() {
        let own_pong = frame(0xA, true, 8);
        let text = frame(0x1, true, 3);
        let binary = frame(0x2, true, 5);
        for rate in [None, rate(0.001, 3.0)] {
            for cut in 0..60 {
                let settings = MessageGuards {
                    message_rate: rate,
                    ..MessageGuards::OFF
                };
                let mut g =
                    Guards::new(&settings, true, &GuardMetrics::unregistered()).expect("pongs on");
                let ping = g.next_ping().expect("a Ping");
                let mut stream = text.clone();
                stream.extend(answer(&ping));
                stream.extend(&own_pong);
                stream.extend(answer(&ping));
                stream.extend(&binary);
                let cut = cut.min(stream.len());
                let mut expected = text.clone();
                expected.extend(&own_pong);
                expected.extend(&binary);
                let got = forwarded(&mut g, &stream, &[cut]);
                assert_eq!(got, expected, "cut at {cut}, rate {rate:?}");
            }
        }
    }

    #[test]
    fn pings_alone_make_a_scan_and_without_them_there_is_no_ping() {
        let mut g = Guards::new(&MessageGuards::OFF, true, &GuardMetrics::unregistered())
            .expect("pongs on");
        assert!(g.next_ping().is_some());
        let mut g = guards(|s| s.max_message_size = Some(10));
        assert!(
            g.next_ping().is_none(),
            "guards alone do not watch for answers"
        );
    }

    #[test]
    fn all_off_is_no_guards() {
        assert!(Guards::new(&MessageGuards::OFF, false, &GuardMetrics::unregistered()).is_none());
    }

    #[test]
    fn size_counts_every_fragment_and_refuses_at_the_crossing_header() {
        let mut g = guards(|s| s.max_message_size = Some(100));
        let mut t = FrameTracker::new();
        let mut stream = frame(0x2, false, 60);
        stream.extend(frame(0x9, true, 4)); // a ping between fragments
        let crossing = stream.len() + frame(0x0, false, 40).len();
        stream.extend(frame(0x0, false, 40)); // 100: still fine
        stream.extend(frame(0x0, true, 1)); // 101: refused
        assert_eq!(
            scan(&mut g, &mut t, &stream, false),
            Verdict::Refuse {
                at: crossing,
                guard: Guard::Size
            }
        );
        // A new message starts from zero.
        let mut g = guards(|s| s.max_message_size = Some(100));
        let mut t = FrameTracker::new();
        let mut stream = frame(0x1, true, 100);
        stream.extend(frame(0x2, true, 100));
        assert_eq!(scan(&mut g, &mut t, &stream, false), Verdict::Pass);
        assert!(t.at_message_boundary());
    }

    /// One unfinished text frame, then `continuations` empty ones.
    fn fragment_flood(continuations: usize) -> Vec<u8> {
        let mut stream = frame(0x1, false, 1);
        for _ in 0..continuations {
            stream.extend(frame(0x0, false, 0));
        }
        stream
    }

    #[test]
    fn a_message_may_have_max_fragments_frames_and_the_next_is_refused() {
        let mut g = guards(|s| s.max_fragments = Some(4));
        let mut t = FrameTracker::new();
        // Four frames, a ping between them (not a fragment), the last one final.
        let mut stream = frame(0x1, false, 3);
        stream.extend(frame(0x0, false, 0));
        stream.extend(frame(0x9, true, 2));
        stream.extend(frame(0x0, false, 0));
        stream.extend(frame(0x0, true, 5));
        assert_eq!(scan(&mut g, &mut t, &stream, false), Verdict::Pass);
        // A new message counts from one again; its fifth frame is refused.
        let five = fragment_flood(4);
        let fifth = fragment_flood(3).len();
        assert_eq!(
            scan(&mut g, &mut t, &five, false),
            Verdict::Refuse {
                at: fifth,
                guard: Guard::Fragments
            }
        );
    }

    #[test]
    fn the_fragment_cap_counts_across_reads_and_off_counts_nothing() {
        let mut g = guards(|s| s.max_fragments = Some(1024));
        let mut t = FrameTracker::new();
        let stream = fragment_flood(3000);
        let one = frame(0x0, false, 0).len();
        let first = frame(0x1, false, 1).len();
        // Cut into reads, some of them inside a header (held for the next).
        let mut at = 0;
        let refused = loop {
            let end = (at + 100 * one).min(stream.len());
            match scan(&mut g, &mut t, &stream[at..end], false) {
                Verdict::Pass => at = end,
                Verdict::Partial(r) => at += r,
                Verdict::Refuse { at: r, guard } => break (at + r, guard),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(refused, (first + 1023 * one, Guard::Fragments));

        let mut g = guards(|s| s.max_message_size = Some(1 << 20));
        let mut t = FrameTracker::new();
        assert_eq!(scan(&mut g, &mut t, &stream, false), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_past_the_free_ones_take_message_tokens() {
        let mut g = guards(|s| {
            s.message_rate = rate(1.0, 3.0);
            s.message_rate_action = RateAction::Close;
        });
        let mut t = FrameTracker::new();
        let one = frame(0x0, false, 0).len();
        let first = frame(0x1, false, 1).len();
        // The first frame takes a token; the next free ones take none; each
        // later continuation takes one: two more tokens in the bucket, so
        // the third continuation past the free ones is refused.
        let stream = fragment_flood(FREE_FRAGMENTS as usize + 2);
        assert_eq!(
            scan(&mut g, &mut t, &stream, false),
            Verdict::Refuse {
                at: first + (FREE_FRAGMENTS as usize + 1) * one,
                guard: Guard::Rate
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_continuation_flood_is_throttled_like_a_message_flood() {
        let mut g = guards(|s| s.message_rate = rate(5.0, 5.0));
        let mut t = FrameTracker::new();
        let stream = fragment_flood(3000);
        let one = frame(0x0, false, 0).len();
        let first = frame(0x1, false, 1).len();
        let Verdict::Wait { at, until, guard } = scan(&mut g, &mut t, &stream, false) else {
            panic!("the flood must wait for tokens")
        };
        // One token for the first frame, four for the frames past the free ones.
        assert_eq!(
            (at, guard),
            (first + (FREE_FRAGMENTS as usize + 3) * one, Guard::Rate)
        );
        assert_eq!(until - Instant::now(), Duration::from_millis(200));
        // A second later, five more frames: one per token.
        tokio::time::advance(Duration::from_secs(1)).await;
        let Verdict::Wait { at: next, .. } = scan(&mut g, &mut t, &stream[at..], false) else {
            panic!("still waiting")
        };
        assert_eq!(next, 5 * one);
    }

    #[tokio::test(start_paused = true)]
    async fn control_frames_between_fragments_are_not_fragments() {
        let mut g = guards(|s| {
            s.max_fragments = Some(FREE_FRAGMENTS + 1);
            s.message_rate = rate(1.0, 40.0);
        });
        let mut t = FrameTracker::new();
        // FREE_FRAGMENTS + 1 frames with a ping after each: the pings take
        // their own tokens, none of them counts as a fragment, and only the
        // last frame takes a token as a fragment.
        let mut stream = Vec::new();
        for i in 0..=FREE_FRAGMENTS {
            let opcode = if i == 0 { 0x1 } else { 0x0 };
            stream.extend(frame(opcode, i == FREE_FRAGMENTS, 1));
            stream.extend(frame(0x9, true, 0));
        }
        assert_eq!(scan(&mut g, &mut t, &stream, false), Verdict::Pass);
        let used = 40.0 - g.messages.as_ref().map_or(0.0, |b| b.tokens);
        assert_eq!(used, (FREE_FRAGMENTS + 1 + 1 + 1) as f64);
    }

    #[test]
    fn a_header_cut_short_is_held_back() {
        let mut g = guards(|s| s.max_message_size = Some(1 << 20));
        let mut t = FrameTracker::new();
        let f = frame(0x2, true, 70_000); // a 14-byte header
        let mut data = frame(0x1, true, 3);
        let first = data.len();
        data.extend_from_slice(&f[..5]);
        assert_eq!(scan(&mut g, &mut t, &data, false), Verdict::Partial(first));
        assert!(
            t.at_boundary(),
            "the tracker did not take the partial header"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn message_rate_throttles_after_the_burst_and_refills() {
        let mut g = guards(|s| s.message_rate = rate(10.0, 2.0));
        let mut t = FrameTracker::new();
        let one = frame(0x1, true, 5);
        let stream: Vec<u8> = one.iter().copied().cycle().take(one.len() * 3).collect();
        let Verdict::Wait { at, until, guard } = scan(&mut g, &mut t, &stream, false) else {
            panic!("the third message must wait")
        };
        assert_eq!((at, guard), (2 * one.len(), Guard::Rate));
        assert_eq!(until - Instant::now(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(scan(&mut g, &mut t, &stream[at..], false), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn control_frames_count_but_a_close_always_passes() {
        let mut g = guards(|s| {
            s.message_rate = rate(1.0, 1.0);
            s.message_rate_action = RateAction::Close;
        });
        let mut t = FrameTracker::new();
        let mut stream = frame(0x9, true, 0); // a ping takes the only token
        let second = stream.len();
        stream.extend(frame(0xA, true, 0));
        assert_eq!(
            scan(&mut g, &mut t, &stream, false),
            Verdict::Refuse {
                at: second,
                guard: Guard::Rate
            }
        );
        let mut t = FrameTracker::new();
        let mut stream = frame(0x1, true, 1);
        stream.extend(frame(0x8, true, 2));
        let mut g = guards(|s| s.message_rate = rate(1.0, 1.0));
        assert_eq!(scan(&mut g, &mut t, &stream, false), Verdict::Pass);
        assert_eq!(t.closes_seen(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn byte_rate_forwards_a_payload_in_pieces() {
        let mut g = guards(|s| s.byte_rate = rate(1000.0, 100.0));
        let mut t = FrameTracker::new();
        let f = frame(0x2, true, 250);
        let header = f.len() - 250;
        let Verdict::Wait { at, until, guard } = scan(&mut g, &mut t, &f, false) else {
            panic!("250 bytes exceed a 100-byte bucket")
        };
        assert_eq!((at, guard), (header + 100, Guard::Bytes));
        // 1000 B/s woken at most 50 times a second: 20 bytes a wake-up.
        assert_eq!(until - Instant::now(), Duration::from_millis(20));
        tokio::time::advance(Duration::from_millis(150)).await;
        let Verdict::Wait { at: next, .. } = scan(&mut g, &mut t, &f[at..], false) else {
            panic!("150 ms earn 150 bytes, but the bucket holds 100")
        };
        assert_eq!(next, 100);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(scan(&mut g, &mut t, &f[at + next..], false), Verdict::Pass);
        assert!(t.at_boundary());
    }

    #[test]
    fn a_closing_direction_stops_at_the_message_boundary() {
        let mut g = guards(|s| s.max_message_size = Some(1000));
        let mut t = FrameTracker::new();
        assert_eq!(
            scan(&mut g, &mut t, b"", true),
            Verdict::Boundary(0),
            "already at one"
        );
        t.advance(&frame(0x1, false, 10));
        let mut rest = frame(0x9, true, 0);
        rest.extend(frame(0x0, true, 10));
        let end = rest.len();
        rest.extend(frame(0x1, true, 10));
        assert_eq!(scan(&mut g, &mut t, &rest, true), Verdict::Boundary(end));
    }
}
