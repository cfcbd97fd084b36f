//! The loop marker (docs/behaviour.md#loop-detection): the `Via` entry
//! `1.1 wsgate-<16 hex digits>` that wsgate appends to every request it
//! forwards, upgrades and plain requests alike, naming this process; a
//! request that arrives already carrying it has gone round a loop and is
//! answered 508 instead of being forwarded again.
//!
//! Why `Via` and not a header of wsgate's own: RFC 9110 §7.6.3 defines
//! `Via` for exactly this ("avoiding request forwarding loops"), proxies
//! and tools already keep and show it, and appending to it keeps the
//! entries of proxies in front. A start-up check already refuses an
//! upstream on wsgate's own port; this catches the loops it cannot see
//! (a host name that leads back to the pod, two wsgates pointing at each
//! other, a forwarder in between).
//!
//! The values are built once per process, so marking a request costs one
//! header entry pointing at static bytes, and the check reads the `Via`
//! lines in place: neither allocates.

use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderValue};
use http::Version;

/// This process's marker.
#[derive(Debug)]
pub(crate) struct LoopMarker {
    /// The received-by name: `wsgate-<16 hex digits>`.
    name: &'static str,
    /// `1.1 <name>`, for requests received as HTTP/1.1.
    http11: HeaderValue,
    /// `1.0 <name>`, for requests received as HTTP/1.0.
    http10: HeaderValue,
}

impl LoopMarker {
    /// The marker of this process: a random name drawn once, so two
    /// wsgates (or two restarts of one) never share it.
    pub(crate) fn of_this_process() -> &'static LoopMarker {
        static MARKER: OnceLock<LoopMarker> = OnceLock::new();
        MARKER.get_or_init(|| LoopMarker::new(rand::random()))
    }

    /// The marker named after `id`. Its three strings live as long as the
    /// process (one marker per process), so the header values are static
    /// bytes that cost nothing to copy.
    fn new(id: u64) -> LoopMarker {
        let name: &'static str = Box::leak(format!("wsgate-{id:016x}").into_boxed_str());
        let value = |protocol: &str| {
            HeaderValue::from_static(Box::leak(format!("{protocol} {name}").into_boxed_str()))
        };
        LoopMarker {
            name,
            http11: value("1.1"),
            http10: value("1.0"),
        }
    }

    /// The received-by name this process writes into `Via`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// Appends this process's entry to `Via`, after any entries already
    /// there (a field line of its own, which RFC 9110 §5.3 reads as the
    /// same list). `version` is the protocol the request was received with.
    pub(crate) fn add(&self, headers: &mut HeaderMap, version: Version) {
        headers.append(header::VIA, self.value(version).clone());
    }

    /// This process's `Via` entry for a request received with `version`.
    pub(crate) fn value(&self, version: Version) -> &HeaderValue {
        if version == Version::HTTP_10 {
            &self.http10
        } else {
            &self.http11
        }
    }

    /// Whether a `Via` entry of `headers` names this process.
    pub(crate) fn is_in(&self, headers: &HeaderMap) -> bool {
        headers.get_all(header::VIA).iter().any(|line| {
            line.as_bytes().split(|b| *b == b',').any(|entry| {
                // `received-protocol received-by [comment]`.
                let mut words = entry
                    .split(u8::is_ascii_whitespace)
                    .filter(|w| !w.is_empty());
                words.next();
                words.next() == Some(self.name.as_bytes())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header::VIA, HeaderValue::from_str(l).expect("value"));
        }
        h
    }

    #[test]
    fn the_marker_is_appended_after_what_was_there() {
        let m = LoopMarker::new(0xabc);
        assert_eq!(m.name(), "wsgate-0000000000000abc");
        let mut h = via(&["1.1 ingress"]);
        m.add(&mut h, Version::HTTP_11);
        let lines: Vec<&str> = h
            .get_all(header::VIA)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect();
        assert_eq!(lines, ["1.1 ingress", "1.1 wsgate-0000000000000abc"]);
        let mut h = HeaderMap::new();
        m.add(&mut h, Version::HTTP_10);
        assert_eq!(h[header::VIA], "1.0 wsgate-0000000000000abc");
        assert!(m.is_in(&h));
    }

    #[test]
    fn only_this_process_entry_is_a_loop() {
        let m = LoopMarker::new(0xabc);
        for looped in [
            vec!["1.1 wsgate-0000000000000abc"],
            vec!["1.0 fred, 1.1 wsgate-0000000000000abc (wsgate)"],
            vec!["1.1 a", "HTTP/1.1   wsgate-0000000000000abc"],
        ] {
            assert!(m.is_in(&via(&looped)), "{looped:?}");
        }
        let other = LoopMarker::new(0xabd);
        for not_looped in [
            vec![],
            vec!["1.1 wsgate-0000000000000abd"],
            vec!["1.1 wsgate-0000000000000abcd"],
            vec!["wsgate-0000000000000abc"],
            vec!["1.1 proxy (via wsgate-0000000000000abc)"],
        ] {
            assert!(!m.is_in(&via(&not_looped)), "{not_looped:?}");
        }
        let mut h = HeaderMap::new();
        other.add(&mut h, Version::HTTP_11);
        assert!(other.is_in(&h) && !m.is_in(&h));
        assert_eq!(
            LoopMarker::of_this_process().name(),
            LoopMarker::of_this_process().name(),
            "drawn once"
        );
    }
}
