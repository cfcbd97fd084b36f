//! Property tests over `src/frames.rs`, the frame tracker that now sits in
//! the splice's data path (hostile input reaches it byte for byte): for any
//! byte stream cut into any chunks it never panics and ends in the same
//! state as when fed whole; for any sequence of well-formed frames (every
//! header form, masked or not, fragmented or not) it counts frames and Close
//! frames exactly and knows where the message boundaries are; every Close
//! frame wsgate encodes is one well-formed control frame with a UTF-8 reason.
//!
//! CI runs 512 cases each. On demand, more: the same properties at
//! `WSGATE_FUZZ_CASES` cases each (default 100,000):
//! `cargo test --release --test it frames_props:: -- --ignored --nocapture`.
#![allow(clippy::print_stdout, reason = "the fuzz run reports its size")]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The module under test, compiled into this test crate (as
/// `tests/loom_admission.rs` does with admission): the tracker is not part
/// of wsgate's public surface.
#[allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "the library's module, included by path"
)]
#[path = "../../src/frames.rs"]
mod frames;

use frames::{close_frame, FrameTracker};

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Feeds `data` in the chunks `cuts` (offsets, any order, any value) picks.
fn feed_in_chunks(data: &[u8], cuts: &[usize]) -> FrameTracker {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut t = FrameTracker::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        t.advance(&data[from..c]);
        from = c;
    }
    t
}

fn prop_chunking(data: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let mut whole = FrameTracker::new();
    whole.advance(data);
    prop_assert_eq!(feed_in_chunks(data, cuts), whole);
    // advance_to_message_boundary stops exactly at a message boundary and
    // agrees with feeding the same prefix.
    let mut t = FrameTracker::new();
    t.advance(&data[..data.len() / 3]);
    let rest = &data[data.len() / 3..];
    let mut probe = t.clone();
    match probe.advance_to_message_boundary(rest) {
        Some(off) => {
            prop_assert!(off <= rest.len());
            prop_assert!(probe.at_message_boundary());
            let mut same = t.clone();
            same.advance(&rest[..off]);
            prop_assert_eq!(same, probe);
        }
        None => {
            let mut same = t.clone();
            same.advance(rest);
            prop_assert_eq!(same, probe);
        }
    }
    Ok(())
}

/// One frame: opcode, FIN, mask, payload length, and which length encoding
/// (7-bit, 16-bit or 64-bit, not necessarily the shortest: the tracker must
/// not rely on canonical lengths).
#[derive(Debug, Clone)]
struct Frame {
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    len: usize,
    encoding: u8,
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        prop::sample::select(vec![0x0u8, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB]),
        any::<bool>(),
        prop::option::of(any::<[u8; 4]>()),
        prop_oneof![3 => 0usize..126, 1 => 126usize..3000],
        0u8..3,
    )
        .prop_map(|(opcode, fin, mask, len, encoding)| Frame {
            opcode,
            fin,
            mask,
            len,
            encoding,
        })
}

fn encode(f: &Frame, out: &mut Vec<u8>) {
    out.push(if f.fin { 0x80 } else { 0 } | f.opcode);
    let m = if f.mask.is_some() { 0x80 } else { 0 };
    let encoding = if f.len >= 126 {
        f.encoding.max(1)
    } else {
        f.encoding
    };
    match encoding {
        0 => out.push(m | f.len as u8),
        1 => {
            out.push(m | 126);
            out.extend_from_slice(&(f.len as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&(f.len as u64).to_be_bytes());
        }
    }
    if let Some(key) = f.mask {
        out.extend_from_slice(&key);
    }
    // Payload bytes that look like headers, to catch any peeking.
    out.extend((0..f.len).map(|i| [0x88u8, 0xFF, 0x7F, 0x81][i % 4]));
}

fn prop_frames(frames: &[Frame], cuts: &[usize]) -> Result<(), TestCaseError> {
    let mut bytes = Vec::new();
    let mut boundaries = vec![0];
    for f in frames {
        encode(f, &mut bytes);
        boundaries.push(bytes.len());
    }
    let t = feed_in_chunks(&bytes, cuts);
    prop_assert_eq!(t.frames_seen(), frames.len() as u64);
    prop_assert_eq!(
        t.closes_seen() as usize,
        frames.iter().filter(|f| f.opcode == 0x8).count()
    );
    prop_assert!(t.at_boundary());
    // A message is open after the last data frame without FIN.
    let open = frames
        .iter()
        .rev()
        .find(|f| f.opcode & 0x8 == 0)
        .is_some_and(|f| !f.fin);
    prop_assert_eq!(t.at_message_boundary(), !open);
    // Every byte offset: at a frame boundary exactly at the frame edges.
    let mut t = FrameTracker::new();
    for (i, b) in bytes.iter().enumerate() {
        prop_assert_eq!(t.at_boundary(), boundaries.contains(&i), "offset {}", i);
        t.advance(std::slice::from_ref(b));
    }
    Ok(())
}

fn prop_close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Result<(), TestCaseError> {
    let f = close_frame(code, reason, mask);
    let mut t = FrameTracker::new();
    t.advance(&f);
    prop_assert_eq!(t.frames_seen(), 1);
    prop_assert_eq!(t.closes_seen(), 1);
    prop_assert!(t.at_message_boundary());
    prop_assert_eq!(f[0], 0x88, "FIN + Close");
    let len = usize::from(f[1] & 0x7f);
    prop_assert!(len <= 125, "control frames carry at most 125 bytes");
    prop_assert_eq!(f[1] & 0x80 != 0, mask.is_some());
    let start = if mask.is_some() { 6 } else { 2 };
    prop_assert_eq!(f.len(), start + len);
    let payload: Vec<u8> = f[start..]
        .iter()
        .enumerate()
        .map(|(i, b)| mask.map_or(*b, |k| b ^ k[i % 4]))
        .collect();
    prop_assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
    let text = std::str::from_utf8(&payload[2..]);
    prop_assert!(text.is_ok(), "reason cut inside a character");
    prop_assert!(reason.starts_with(text.unwrap_or_default()));
    Ok(())
}

fn chunking_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::collection::vec(any::<usize>(), 0..16),
    )
}

fn frames_strategy() -> impl Strategy<Value = (Vec<Frame>, Vec<usize>)> {
    (
        prop::collection::vec(frame(), 0..24),
        prop::collection::vec(any::<usize>(), 0..16),
    )
}

fn close_strategy() -> impl Strategy<Value = (u16, String, Option<[u8; 4]>)> {
    (
        any::<u16>(),
        prop_oneof![".{0,80}", "[é€😀a]{30,70}"],
        prop::option::of(any::<[u8; 4]>()),
    )
}

#[test]
fn any_bytes_in_any_chunks_never_panic_and_track_the_same() {
    runner(512)
        .run(&chunking_strategy(), |(d, c)| prop_chunking(&d, &c))
        .unwrap();
}

#[test]
fn well_formed_frames_are_counted_exactly_with_their_boundaries() {
    runner(512)
        .run(&frames_strategy(), |(f, c)| prop_frames(&f, &c))
        .unwrap();
}

#[test]
fn encoded_close_frames_are_well_formed() {
    runner(512)
        .run(&close_strategy(), |(code, reason, mask)| {
            prop_close_frame(code, &reason, mask)
        })
        .unwrap();
}

#[test]
#[ignore = "on demand: the bounded fuzz run, see the module docs"]
fn fuzz_frames_at_scale() {
    let cases: u32 = std::env::var("WSGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let start = std::time::Instant::now();
    runner(cases)
        .run(&chunking_strategy(), |(d, c)| prop_chunking(&d, &c))
        .unwrap();
    runner(cases)
        .run(&frames_strategy(), |(f, c)| prop_frames(&f, &c))
        .unwrap();
    runner(cases)
        .run(&close_strategy(), |(code, reason, mask)| {
            prop_close_frame(code, &reason, mask)
        })
        .unwrap();
    println!(
        "fuzz: frames: 3 properties × {cases} cases, no failure, {:.1?}",
        start.elapsed()
    );
}
