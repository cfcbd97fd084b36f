//! What wsgate's Pings to a client say, and which of the client's Pongs
//! answer them (docs/behaviour.md#pings-from-wsgate).
//!
//! Why a payload of our own: the client's Pongs share one stream with the
//! Pongs it sends on its own (unsolicited, or answering the upstream's
//! Pings), which must reach the upstream as before. Each Ping carries a key
//! drawn once per session and a counter; a Pong that echoes the key and a
//! counter wsgate has sent answers wsgate, and is taken out of the stream.
//! A client's own Pong matches only if it guesses the session's key.

use crate::frames::{apply_mask, Header};

/// Bytes of a Ping's payload: the session's key, then the Ping's number.
pub(crate) const PING_PAYLOAD_LEN: usize = 8;

/// A Ping frame from wsgate: unmasked (towards the client), two header
/// bytes and the payload.
pub(crate) type PingFrame = [u8; 2 + PING_PAYLOAD_LEN];

/// The first byte of a final Pong frame without extension bits.
const PONG_FIN: u8 = 0x8A;

/// The Pings one session sent, to tell their answers from other Pongs.
#[derive(Debug)]
pub(crate) struct PongMatcher {
    /// Drawn once per session.
    key: [u8; 4],
    /// Pings sent so far; the last one carries this number.
    sent: u32,
}

impl PongMatcher {
    /// A matcher with a fresh key and no Ping sent.
    pub(crate) fn new() -> Self {
        PongMatcher {
            key: rand::random(),
            sent: 0,
        }
    }

    /// The next Ping, as it goes to the client.
    pub(crate) fn next_ping(&mut self) -> PingFrame {
        self.sent = self.sent.wrapping_add(1);
        let mut frame = [0u8; 2 + PING_PAYLOAD_LEN];
        frame[0] = 0x89;
        frame[1] = PING_PAYLOAD_LEN as u8;
        frame[2..6].copy_from_slice(&self.key);
        frame[6..].copy_from_slice(&self.sent.to_be_bytes());
        frame
    }

    /// How long a frame with `header` is if it may be an answer: a Pong
    /// whose payload has a Ping's length. The caller needs that many bytes
    /// before [`PongMatcher::answers`] can say; other frames are never
    /// answers.
    pub(crate) fn candidate_len(header: &Header) -> Option<usize> {
        (header.is_pong() && header.payload_len == PING_PAYLOAD_LEN as u64)
            .then_some(header.len + PING_PAYLOAD_LEN)
    }

    /// Whether `frame`, a whole frame from the client, is a Pong answering
    /// one of this session's Pings: final, masked as a client's frames
    /// are, its payload our key and the number of a Ping already sent.
    pub(crate) fn answers(&self, frame: &[u8]) -> bool {
        let Some(header) = Header::parse(frame) else {
            return false;
        };
        let masked = frame[1] & 0x80 != 0;
        if frame[0] != PONG_FIN || !masked || Self::candidate_len(&header) != Some(frame.len()) {
            return false;
        }
        let key: [u8; 4] = [
            frame[header.len - 4],
            frame[header.len - 3],
            frame[header.len - 2],
            frame[header.len - 1],
        ];
        let mut payload = [0u8; PING_PAYLOAD_LEN];
        payload.copy_from_slice(&frame[header.len..]);
        apply_mask(&mut payload, key);
        let number = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        payload[..4] == self.key && number != 0 && number <= self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::encode_frame;

    /// The client's answer to `ping`: a Pong with its payload, masked with
    /// `key`.
    fn answer(ping: &PingFrame, key: [u8; 4]) -> Vec<u8> {
        let mut payload = ping[2..].to_vec();
        apply_mask(&mut payload, key);
        encode_frame(0xA, true, &payload, Some(key))
    }

    #[test]
    fn a_ping_is_an_unmasked_ping_frame_with_the_key_and_its_number() {
        let mut m = PongMatcher::new();
        let one = m.next_ping();
        let two = m.next_ping();
        assert_eq!(&one[..2], &[0x89, 8], "final Ping, unmasked, 8 bytes");
        assert_eq!(one[2..6], two[2..6], "one key per session");
        assert_eq!(
            (&one[6..], &two[6..]),
            (&[0, 0, 0, 1][..], &[0, 0, 0, 2][..])
        );
        let h = Header::parse(&one).expect("whole");
        assert_eq!((h.opcode, h.payload_len, h.len), (0x9, 8, 2));
    }

    #[test]
    fn the_answer_to_any_ping_sent_matches_whatever_its_mask() {
        let mut m = PongMatcher::new();
        let one = m.next_ping();
        let two = m.next_ping();
        for key in [[0, 0, 0, 0], [1, 2, 3, 4], [0xff, 0x10, 0x7e, 0x81]] {
            assert!(m.answers(&answer(&two, key)), "{key:?}");
            assert!(
                m.answers(&answer(&one, key)),
                "a late answer to an earlier Ping"
            );
        }
        let h = Header::parse(&answer(&one, [1, 2, 3, 4])).expect("whole");
        assert_eq!(PongMatcher::candidate_len(&h), Some(2 + 4 + 8));
    }

    #[test]
    fn other_pongs_do_not_match() {
        let mut m = PongMatcher::new();
        let ping = m.next_ping();
        let key = [9, 8, 7, 6];
        // Another session's key, or a number not sent yet.
        let mut other = ping;
        other[2] ^= 1;
        assert!(!m.answers(&answer(&other, key)));
        let mut ahead = ping;
        ahead[9] = 2;
        assert!(!m.answers(&answer(&ahead, key)));
        let mut zero = ping;
        zero[6..].copy_from_slice(&[0; 4]);
        assert!(!m.answers(&answer(&zero, key)));
        // The right payload, but not masked, not final, with an extension
        // bit, a Ping rather than a Pong, or another length.
        assert!(!m.answers(&encode_frame(0xA, true, &ping[2..], None)));
        let mut not_final = answer(&ping, key);
        not_final[0] = 0x0A;
        assert!(!m.answers(&not_final));
        let mut rsv = answer(&ping, key);
        rsv[0] |= 0x40;
        assert!(!m.answers(&rsv));
        let mut as_ping = answer(&ping, key);
        as_ping[0] = 0x89;
        assert!(!m.answers(&as_ping));
        let mut longer = ping[2..].to_vec();
        longer.push(0);
        assert!(!m.answers(&encode_frame(0xA, true, &longer, Some([0; 4]))));
        assert!(!m.answers(&answer(&ping, key)[..13]), "cut short");
        // A fresh matcher has sent nothing: nothing answers it.
        assert!(!PongMatcher::new().answers(&answer(&ping, key)));
    }

    #[test]
    fn only_pongs_of_a_pings_length_are_candidates() {
        let pong = |len: usize| encode_frame(0xA, true, &vec![0; len], Some([1, 2, 3, 4]));
        let len = |f: &[u8]| PongMatcher::candidate_len(&Header::parse(f).expect("whole"));
        assert_eq!(len(&pong(8)), Some(14));
        assert_eq!(len(&pong(7)), None);
        assert_eq!(len(&pong(0)), None);
        assert_eq!(len(&encode_frame(0x9, true, &[0; 8], Some([0; 4]))), None);
        assert_eq!(len(&encode_frame(0x2, true, &[0; 8], Some([0; 4]))), None);
    }
}
