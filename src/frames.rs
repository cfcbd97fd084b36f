//! A streaming RFC 6455 frame tracker, and Close frame encoding.
//!
//! The splice feeds every chunk it forwards through a [`FrameTracker`], one
//! per direction. The tracker parses only frame *headers* (2–14 bytes,
//! possibly split across reads) and counts payload bytes down without looking
//! at them, so at every byte it knows whether the stream sits at a frame
//! boundary. That is what lets wsgate end a connection in WebSocket terms:
//! a Close frame can only be injected between two frames, never inside one.
//! The tracker also follows whether a fragmented data message is open (a
//! data frame without FIN until its final continuation), so wsgate can wait
//! for a *message* boundary: a message in flight finishes before the Close.
//! Payload is never copied or unmasked, and extensions such as
//! permessage-deflate are untouched (control frames are never compressed,
//! and may sit between the fragments of a message, so any boundary will do).

use std::fmt;

/// The Close opcode.
const OPCODE_CLOSE: u8 = 0x8;
/// The Pong opcode.
const OPCODE_PONG: u8 = 0xA;
/// The largest header: 2 + 8 (64-bit length) + 4 (mask).
const MAX_HEADER: usize = 14;

/// Where a stream is, frame-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a header; `have` bytes of it so far (0 = at a boundary).
    Header { buf: [u8; MAX_HEADER], have: u8 },
    /// Inside a payload, with this many bytes left.
    Payload { remaining: u64 },
}

/// Tracks frame boundaries in one direction of a WebSocket byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameTracker {
    state: State,
    /// Close frames whose header has been seen.
    closes: u32,
    /// The first Close frame's status and reason, read as its payload
    /// passes (the access log, docs/operations.md#access-log). Boxed and only allocated once a
    /// Close is seen: every connection carries two trackers for its whole
    /// life, and most never see a Close until their last moment.
    first_close: Option<Box<CloseSeen>>,
    /// Data messages seen (text, binary; a fragmented one once), without
    /// the control frames that `messages` also counts.
    data_messages: u64,
    /// Frames whose header has been seen: for the tests only, so that the
    /// tracker in every connection's data path carries no counter nobody reads.
    #[cfg(test)]
    frames: u64,
    /// A fragmented data message is open (its final frame not seen yet).
    in_message: bool,
    /// Messages seen: each data message once (at its first frame) and each
    /// control frame (`wsgate_messages_total`).
    messages: u64,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            state: State::Header {
                buf: [0; MAX_HEADER],
                have: 0,
            },
            closes: 0,
            first_close: None,
            data_messages: 0,
            #[cfg(test)]
            frames: 0,
            in_message: false,
            messages: 0,
        }
    }
}

/// The header length implied by its first two bytes (`second` is the
/// second).
pub(crate) fn header_len(second: u8) -> usize {
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + mask
        + match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        }
}

/// The payload length a whole header announces.
pub(crate) fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    }
}

/// What one frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The opcode (low 4 bits of the first byte).
    pub(crate) opcode: u8,
    /// Payload bytes that follow the header.
    pub(crate) payload_len: u64,
    /// Bytes of the header itself (2–14).
    pub(crate) len: usize,
}

impl Header {
    /// A control frame (Close, Ping, Pong, or a reserved control opcode).
    pub(crate) fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// A continuation frame (the rest of a fragmented message).
    pub(crate) fn is_continuation(&self) -> bool {
        self.opcode == 0
    }

    /// A Close frame.
    pub(crate) fn is_close(&self) -> bool {
        self.opcode == OPCODE_CLOSE
    }

    /// A Pong frame.
    pub(crate) fn is_pong(&self) -> bool {
        self.opcode == OPCODE_PONG
    }

    /// The header at the start of `data`, if all of it is there.
    pub(crate) fn parse(data: &[u8]) -> Option<Header> {
        let second = *data.get(1)?;
        let len = header_len(second);
        let bytes = data.get(..len)?;
        Some(Header {
            opcode: bytes[0] & 0x0f,
            payload_len: payload_len(bytes),
            len,
        })
    }
}

/// The largest payload a Close frame may carry (RFC 6455 §5.5: 125, a
/// 2-byte status and up to 123 bytes of reason). A longer one, which a
/// peer may announce but may not send, is read no further than this.
const MAX_CLOSE_PAYLOAD: usize = 125;

/// The payload of a Close frame, as far as it has passed, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseSeen {
    /// The masking key of the frame, if it was masked.
    mask: Option<[u8; 4]>,
    /// Payload bytes not yet passed (the announced length, bounded).
    left: usize,
    /// What passed so far, unmasked.
    payload: Vec<u8>,
}

impl CloseSeen {
    fn new(header: &[u8], len: u64) -> Self {
        let mask = (header[1] & 0x80 != 0).then(|| {
            let n = header.len();
            [header[n - 4], header[n - 3], header[n - 2], header[n - 1]]
        });
        let left = usize::try_from(len).map_or(MAX_CLOSE_PAYLOAD, |l| l.min(MAX_CLOSE_PAYLOAD));
        CloseSeen {
            mask,
            left,
            payload: Vec::with_capacity(left),
        }
    }

    /// Takes the next payload bytes of the frame (at most what is left).
    fn take(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.left);
        let start = self.payload.len();
        self.payload.extend_from_slice(&bytes[..n]);
        if let Some(key) = self.mask {
            for (i, b) in self.payload[start..].iter_mut().enumerate() {
                *b ^= key[(start + i) % 4];
            }
        }
        self.left -= n;
    }

    /// The status code, if the payload carried one (RFC 6455 §5.5.1).
    pub(crate) fn code(&self) -> Option<u16> {
        match self.payload.as_slice() {
            [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }

    /// The reason bytes (after the status code), as sent: not yet checked
    /// for UTF-8 nor escaped.
    pub(crate) fn reason(&self) -> &[u8] {
        self.payload.get(2..).unwrap_or_default()
    }
}

impl FrameTracker {
    /// A tracker at the start of a stream (a boundary).
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether the bytes fed so far end exactly at a frame boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Whether the stream is at a frame boundary outside any fragmented
    /// message: where a Close can go without cutting a message in two.
    pub(crate) fn at_message_boundary(&self) -> bool {
        self.at_boundary() && !self.in_message
    }

    /// Close frames seen so far (counted when their header completes).
    pub(crate) fn closes_seen(&self) -> u32 {
        self.closes
    }

    /// Messages seen so far: data messages (counted at their first frame)
    /// and control frames, each once its header completes.
    pub(crate) fn messages_seen(&self) -> u64 {
        self.messages
    }

    /// Data messages seen so far (control frames not counted).
    pub(crate) fn data_messages_seen(&self) -> u64 {
        self.data_messages
    }

    /// The first Close frame seen, as much of its payload as has passed.
    #[cfg(test)]
    pub(crate) fn first_close(&self) -> Option<&CloseSeen> {
        self.first_close.as_deref()
    }

    /// Takes the first Close frame seen out of the tracker (at the end of
    /// the splice, for the access log).
    pub(crate) fn take_first_close(&mut self) -> Option<Box<CloseSeen>> {
        self.first_close.take()
    }

    /// Payload bytes left in the current frame; `None` between frames or
    /// inside a header.
    pub(crate) fn payload_remaining(&self) -> Option<u64> {
        match self.state {
            State::Payload { remaining } => Some(remaining),
            State::Header { .. } => None,
        }
    }

    /// Frames seen so far (counted when their header completes).
    #[cfg(test)]
    pub(crate) fn frames_seen(&self) -> u64 {
        self.frames
    }

    /// Consumes bytes up to the end of the current header or payload, or
    /// the end of `data`. Returns how many bytes it took (at least 1 if
    /// `data` is not empty).
    fn step(&mut self, data: &[u8]) -> usize {
        match &mut self.state {
            State::Payload { remaining } => {
                let n = (*remaining).min(data.len() as u64);
                if let Some(close) = self.first_close.as_deref_mut() {
                    // Only the first Close is read; `left` is 0 past it.
                    if close.left > 0 {
                        close.take(&data[..n as usize]);
                    }
                }
                *remaining -= n;
                if *remaining == 0 {
                    self.state = State::default_header();
                }
                n as usize
            }
            State::Header { buf, have } => {
                let have_now = usize::from(*have);
                // Until the second byte is in, the length is unknown: take one byte.
                let want = if have_now < 2 { 2 } else { header_len(buf[1]) };
                let take = (want - have_now).min(data.len());
                buf[have_now..have_now + take].copy_from_slice(&data[..take]);
                let have_now = have_now + take;
                *have = have_now as u8;
                if have_now >= 2 && have_now == header_len(buf[1]) {
                    let opcode = buf[0] & 0x0f;
                    let fin = buf[0] & 0x80 != 0;
                    let len = payload_len(&buf[..have_now]);
                    #[cfg(test)]
                    {
                        self.frames += 1;
                    }
                    if opcode == OPCODE_CLOSE {
                        self.closes += 1;
                        if self.first_close.is_none() {
                            self.first_close =
                                Some(Box::new(CloseSeen::new(&buf[..have_now], len)));
                        }
                    }
                    // Every opcode but a continuation starts a message.
                    self.messages += u64::from(opcode != 0);
                    self.data_messages += u64::from(opcode != 0 && opcode & 0x8 == 0);
                    // Data frames (opcodes 0x0–0x7) open or close a message;
                    // control frames (0x8–0xF) may sit between fragments.
                    if opcode & 0x8 == 0 {
                        self.in_message = !fin;
                    }
                    self.state = if len == 0 {
                        State::default_header()
                    } else {
                        State::Payload { remaining: len }
                    };
                }
                take
            }
        }
    }

    /// Feeds all of `data`.
    pub(crate) fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.step(data);
            data = &data[n..];
        }
    }

    /// Feeds `data` up to the first frame boundary and returns its offset
    /// (0 if the stream is at one already), or `None` if `data` ends before
    /// one (then all of it was fed). A control frame may go there, even
    /// between the fragments of a message (RFC 6455 §5.4).
    pub(crate) fn advance_to_frame_boundary(&mut self, data: &[u8]) -> Option<usize> {
        self.advance_until(data, Self::at_boundary)
    }

    /// Feeds `data` up to the first message boundary (see
    /// [`FrameTracker::at_message_boundary`]) and returns its offset (0 if
    /// the stream is at one already), or `None` if `data` ends before one
    /// (then all of it was fed).
    pub(crate) fn advance_to_message_boundary(&mut self, data: &[u8]) -> Option<usize> {
        self.advance_until(data, Self::at_message_boundary)
    }

    /// Feeds `data` until `reached` holds; its offset then, or `None` once
    /// all of `data` was fed without reaching it.
    fn advance_until(&mut self, mut data: &[u8], reached: fn(&Self) -> bool) -> Option<usize> {
        let mut offset = 0;
        loop {
            if reached(self) {
                return Some(offset);
            }
            if data.is_empty() {
                return None;
            }
            let n = self.step(data);
            offset += n;
            data = &data[n..];
        }
    }
}

impl State {
    fn default_header() -> Self {
        State::Header {
            buf: [0; MAX_HEADER],
            have: 0,
        }
    }
}

/// Encodes a Close frame with `code` and `reason` (truncated to fit the
/// 125-byte control-frame limit at a character boundary). With `mask`, the
/// frame is masked, as frames towards a server must be.
pub(crate) fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OPCODE_CLOSE);
    let len = payload.len() as u8; // ≤ 125
    match mask {
        Some(key) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&key);
            apply_mask(&mut payload, key);
        }
        None => frame.push(len),
    }
    frame.extend_from_slice(&payload);
    frame
}

/// An unmasked Close frame (server to client) built in place, without an
/// allocation: for the answers wsgate writes under a reconnect storm.
#[derive(Clone, Copy)]
pub(crate) struct CloseFrame {
    bytes: [u8; 2 + MAX_CLOSE_PAYLOAD],
    len: usize,
}

impl CloseFrame {
    /// A Close frame with `code` and the text `reason` formats to,
    /// truncated to the 123 bytes a control frame leaves for it (at a
    /// character boundary).
    pub(crate) fn unmasked(code: u16, reason: fmt::Arguments<'_>) -> Self {
        let mut frame = CloseFrame {
            bytes: [0; 2 + MAX_CLOSE_PAYLOAD],
            len: 4,
        };
        frame.bytes[0] = 0x80 | OPCODE_CLOSE;
        frame.bytes[2..4].copy_from_slice(&code.to_be_bytes());
        // `write_str` below never fails; a reason too long is cut, not refused.
        let _ = fmt::write(&mut frame, reason);
        frame.bytes[1] = (frame.len - 2) as u8; // ≤ 125
        frame
    }

    /// The frame as it goes on the wire.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for CloseFrame {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut n = s.len().min(self.bytes.len() - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Debug for CloseFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CloseFrame").field(&self.as_bytes()).finish()
    }
}

/// Finds the end of a peer's Close frame in what it sends, by frame
/// headers alone: what comes before it is skipped unread, so waiting for a
/// Close reply needs no buffer and no allocation (unlike [`FrameTracker`],
/// which keeps the Close payload for the access log).
#[derive(Debug, Default)]
pub(crate) struct CloseWatch {
    /// The header being read, `have` bytes of it so far.
    header: [u8; MAX_HEADER],
    have: u8,
    /// Payload bytes of the current frame not yet passed.
    remaining: u64,
    /// The current frame is a Close.
    closing: bool,
}

impl CloseWatch {
    /// Feeds the next bytes the peer sent; true once its first Close frame
    /// has passed whole (anything after it in `data` is not looked at).
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64);
                self.remaining -= n;
                data = &data[n as usize..];
                if self.remaining == 0 && self.closing {
                    return true;
                }
                continue;
            }
            let have = usize::from(self.have);
            // Until the second byte is in, the length is unknown: take two.
            let want = if have < 2 {
                2
            } else {
                header_len(self.header[1])
            };
            let take = (want - have).min(data.len());
            self.header[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            let have = have + take;
            self.have = have as u8;
            if have >= 2 && have == header_len(self.header[1]) {
                self.have = 0;
                self.closing = self.header[0] & 0x0f == OPCODE_CLOSE;
                self.remaining = payload_len(&self.header[..have]);
                if self.closing && self.remaining == 0 {
                    return true;
                }
            }
        }
        false
    }
}

/// Masks `data` with `key` in place (RFC 6455 §5.3); unmasking is the same
/// operation.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Whether `code` may be sent in a Close frame (RFC 6455 §7.4): 1000–1014
/// except the reserved 1004–1006, or 3000–4999.
pub(crate) fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A frame with `payload` as it is (the tracker never looks at payload, so
/// it is not masked even when `mask` puts a key in the header).
#[cfg(test)]
pub(crate) fn encode_frame(
    opcode: u8,
    fin: bool,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        f.extend_from_slice(&key);
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client would send it (masked) or a server (unmasked).
    fn frame(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
        encode_frame(opcode, fin, payload, masked.then_some([1, 2, 3, 4]))
    }

    /// The first Close is read as it passes, unmasked, across reads cut
    /// anywhere; later Closes and other payloads are not kept.
    #[test]
    fn the_first_close_is_captured_whatever_the_reads() {
        let mut stream = frame(0x1, true, b"hello", true);
        stream.extend(frame(0x9, true, b"ping", true));
        stream.extend(close_frame(
            4000,
            "gone \u{e9}",
            Some([0xde, 0xad, 0xbe, 0xef]),
        ));
        stream.extend(close_frame(1000, "second", Some([1, 1, 1, 1])));
        for cut in 0..stream.len() {
            let mut t = FrameTracker::new();
            t.advance(&stream[..cut]);
            t.advance(&stream[cut..]);
            let close = t.first_close().expect("a close");
            assert_eq!(close.code(), Some(4000), "cut at {cut}");
            assert_eq!(close.reason(), "gone \u{e9}".as_bytes(), "cut at {cut}");
            assert_eq!((t.data_messages_seen(), t.messages_seen()), (1, 4));
        }
        // Unmasked (from a server), and a Close with no status at all.
        let mut t = FrameTracker::new();
        t.advance(&close_frame(1001, "bye", None));
        assert_eq!(t.first_close().map(CloseSeen::code), Some(Some(1001)));
        let mut t = FrameTracker::new();
        t.advance(&[0x88, 0x00]);
        let close = t.first_close().expect("a close");
        assert_eq!((close.code(), close.reason()), (None, &b""[..]));
        // A Close that announces more than 125 bytes keeps only 125.
        let mut t = FrameTracker::new();
        t.advance(&frame(0x8, true, &[b'x'; 300], false));
        assert_eq!(t.take_first_close().map(|c| c.payload.len()), Some(125));
        assert!(t.first_close().is_none(), "taken");
    }

    #[test]
    fn boundaries_of_whole_frames() {
        let mut t = FrameTracker::new();
        assert!(t.at_boundary());
        t.advance(&frame(0x1, true, b"hello", true));
        assert!(t.at_boundary());
        t.advance(&frame(0x2, true, &[7; 300], false));
        assert!(t.at_boundary());
        t.advance(&frame(0x2, true, &[7; 70_000], true));
        assert!(t.at_boundary());
        assert_eq!(t.frames_seen(), 3);
    }

    #[test]
    fn header_split_byte_by_byte() {
        let f = frame(0x2, true, &[1; 70_000], true);
        let mut t = FrameTracker::new();
        for (i, b) in f.iter().enumerate() {
            t.advance(std::slice::from_ref(b));
            assert_eq!(t.at_boundary(), i == f.len() - 1, "byte {i}");
        }
    }

    #[test]
    fn advance_to_boundary_finds_the_end_of_the_current_frame() {
        let a = frame(0x1, true, b"abc", false);
        let b = frame(0x1, true, b"defgh", false);
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        let mut t = FrameTracker::new();
        t.advance(&stream[..2]);
        assert_eq!(
            t.advance_to_message_boundary(&stream[2..]),
            Some(a.len() - 2)
        );
        let mut t = FrameTracker::new();
        assert_eq!(
            t.advance_to_message_boundary(&stream),
            Some(0),
            "already at a boundary"
        );
        t.advance(&stream[..1]);
        assert_eq!(
            t.advance_to_message_boundary(&stream[1..3]),
            None,
            "ends inside the frame"
        );
        assert!(!t.at_boundary());
    }

    #[test]
    fn fragments_are_frame_boundaries_but_not_message_boundaries() {
        let mut t = FrameTracker::new();
        t.advance(&frame(0x1, false, b"part one", true));
        assert!(t.at_boundary() && !t.at_message_boundary());
        t.advance(&frame(0x9, true, b"ping", true));
        assert!(
            t.at_boundary() && !t.at_message_boundary(),
            "a control frame between fragments"
        );
        t.advance(&frame(0x0, false, b"part two", true));
        assert!(!t.at_message_boundary());
        let last = frame(0x0, true, b"part three", true);
        let mut u = t.clone();
        assert_eq!(u.advance_to_message_boundary(&last), Some(last.len()));
        t.advance(&last);
        assert!(t.at_message_boundary());
    }

    /// A Ping may go between two fragments: the frame boundary comes at
    /// the end of the first one, long before the message boundary.
    #[test]
    fn a_frame_boundary_comes_before_the_message_boundary() {
        let first = frame(0x2, false, &[1; 300], false);
        let mut stream = first.clone();
        stream.extend(frame(0x0, true, b"last", false));
        let mut t = FrameTracker::new();
        t.advance(&stream[..10]);
        assert_eq!(
            t.advance_to_frame_boundary(&stream[10..]),
            Some(first.len() - 10)
        );
        assert!(t.at_boundary() && !t.at_message_boundary());
        assert_eq!(t.advance_to_frame_boundary(&[]), Some(0), "already at one");
        let mut t = FrameTracker::new();
        t.advance(&stream[..1]);
        assert_eq!(t.advance_to_frame_boundary(&stream[1..5]), None);
        assert!(!t.at_boundary(), "all of it fed");
    }

    #[test]
    fn counts_messages_once_and_control_frames_each() {
        let mut t = FrameTracker::new();
        t.advance(&frame(0x1, false, b"one", true));
        t.advance(&frame(0x9, true, b"", true));
        t.advance(&frame(0x0, false, b"two", true));
        t.advance(&frame(0x0, true, b"three", true));
        t.advance(&frame(0x2, true, &[0; 200], true));
        assert_eq!(t.messages_seen(), 3, "two data messages and a ping");
    }

    #[test]
    fn header_parse_needs_the_whole_header() {
        let f = frame(0x2, false, &[0; 300], true);
        assert_eq!(Header::parse(&f[..1]), None);
        assert_eq!(Header::parse(&f[..7]), None, "2 + 2 + 4 bytes");
        let h = Header::parse(&f).expect("whole");
        assert_eq!(
            h,
            Header {
                opcode: 0x2,
                payload_len: 300,
                len: 8
            }
        );
        assert!(!h.is_control() && !h.is_continuation() && !h.is_close());
    }

    #[test]
    fn counts_close_frames() {
        let mut t = FrameTracker::new();
        t.advance(&frame(0x1, true, b"x", true));
        assert_eq!(t.closes_seen(), 0);
        let close = close_frame(1001, "bye", Some([9, 8, 7, 6]));
        t.advance(&close[..3]);
        assert_eq!(t.closes_seen(), 0, "header not complete yet");
        t.advance(&close[3..]);
        assert_eq!(t.closes_seen(), 1);
        assert!(t.at_boundary());
    }

    #[test]
    fn close_frames_encode_code_and_reason() {
        let f = close_frame(1001, "going away", None);
        assert_eq!(&f[..4], &[0x88, 12, 0x03, 0xe9]);
        assert_eq!(&f[4..], b"going away");
        let key = [0xa1, 0xb2, 0xc3, 0xd4];
        let m = close_frame(4000, "x", Some(key));
        assert_eq!(m[1], 0x80 | 3);
        assert_eq!(&m[2..6], &key);
        let unmasked: Vec<u8> = m[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, [0x0f, 0xa0, b'x']);
        let long = close_frame(1000, &"é".repeat(100), None);
        assert!(
            long.len() <= 2 + 125,
            "control frames carry at most 125 bytes"
        );
        assert!(
            std::str::from_utf8(&long[4..]).is_ok(),
            "cut at a character boundary"
        );
    }

    #[test]
    fn close_code_rules() {
        for ok in [1000, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4999] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
    }

    #[test]
    fn a_close_frame_built_in_place_is_the_one_close_frame_builds() {
        let f = CloseFrame::unmasked(1013, format_args!("retry after {} s", 12));
        assert_eq!(f.as_bytes(), close_frame(1013, "retry after 12 s", None));
        // A reason longer than a control frame allows is cut at a character
        // boundary, as `close_frame` cuts it.
        let long = "é".repeat(100);
        let f = CloseFrame::unmasked(1001, format_args!("{long}"));
        assert_eq!(f.as_bytes(), close_frame(1001, &long, None));
        assert_eq!(f.as_bytes().len(), 2 + 2 + 122);
    }

    #[test]
    fn the_close_watch_finds_the_end_of_the_first_close_whatever_the_reads() {
        let mut stream = frame(0x1, true, b"hello", true);
        stream.extend(frame(0x2, true, &[7; 300], true));
        stream.extend(frame(0x9, true, b"ping", true));
        let close_at = stream.len();
        stream.extend(frame(0x8, true, &[0x03, 0xe8, b'b', b'y', b'e'], true));
        let end = stream.len();
        stream.extend(frame(0x1, true, b"after", true));
        for cut in 1..=stream.len() {
            let mut w = CloseWatch::default();
            let mut offset = 0;
            let mut done_at = None;
            while offset < stream.len() {
                let n = cut.min(stream.len() - offset);
                if w.feed(&stream[offset..offset + n]) {
                    done_at = Some(offset + n);
                    break;
                }
                offset += n;
            }
            let done_at = done_at.expect("the Close was found");
            // Found in the read that carried the Close's last byte.
            assert!(
                done_at >= end && done_at < end + cut,
                "cut {cut}: {done_at}"
            );
            assert!(done_at > close_at);
        }
        // A Close without payload ends at its header.
        let mut w = CloseWatch::default();
        assert!(w.feed(&frame(0x8, true, b"", true)));
        // A stream without a Close never says it saw one.
        let mut w = CloseWatch::default();
        assert!(!w.feed(&frame(0x1, true, &[1; 70_000], false)));
    }
}

/// The tracker against a reference parser: tungstenite's own frame header
/// code formats and parses every frame; any cut of the stream into reads
/// must give the same boundaries and the same Close count.
#[cfg(test)]
mod props {
    use std::io::Cursor;

    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    use super::*;

    /// (opcode byte, fin, payload length, masked, rsv1 as permessage-deflate sets it)
    fn frame_spec() -> impl Strategy<Value = (u8, bool, usize, bool, bool)> {
        (
            prop::sample::select(vec![0x0u8, 0x1, 0x2, 0x8, 0x9, 0xA]),
            any::<bool>(),
            prop_oneof![
                0usize..126,
                126usize..300,
                65_530usize..65_540,
                70_000usize..140_000
            ],
            any::<bool>(),
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn boundaries_match_tungstenite(
            specs in prop::collection::vec(frame_spec(), 1..12),
            cuts in prop::collection::vec(1usize..5_000, 1..64),
        ) {
            let mut stream = Vec::new();
            for (op, fin, len, masked, rsv1) in &specs {
                let header = FrameHeader {
                    is_final: *fin,
                    rsv1: *rsv1,
                    opcode: OpCode::from(*op),
                    mask: masked.then_some([1, 2, 3, 4]),
                    ..FrameHeader::default()
                };
                header.format(*len as u64, &mut stream).expect("format");
                stream.extend(std::iter::repeat_n(0x5a, *len));
            }
            // Reference boundaries and Close count from tungstenite's parser.
            let mut boundaries = std::collections::BTreeSet::from([0usize]);
            let mut closes = 0;
            let mut cursor = Cursor::new(&stream[..]);
            while (cursor.position() as usize) < stream.len() {
                let (header, len) = FrameHeader::parse(&mut cursor).expect("parse").expect("complete header");
                if header.opcode == OpCode::from(0x8) {
                    closes += 1;
                }
                let end = cursor.position() + len;
                cursor.set_position(end);
                boundaries.insert(end as usize);
            }
            // The tracker, fed in reads of the generated sizes.
            let mut t = FrameTracker::new();
            let mut offset = 0;
            let mut i = 0;
            while offset < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - offset);
                t.advance(&stream[offset..offset + n]);
                offset += n;
                i += 1;
                prop_assert_eq!(t.at_boundary(), boundaries.contains(&offset), "at offset {}", offset);
            }
            prop_assert_eq!(t.closes_seen(), closes);
            prop_assert_eq!(t.frames_seen(), specs.len() as u64);
        }
    }
}
