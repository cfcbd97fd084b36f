//! Property tests over `src/headers.rs` (issue 3): arbitrary header sets
//! never panic `classify` or the rewriters; hop-by-hop headers and every
//! header named in `Connection` never survive a hop (except `Host` and
//! `Sec-WebSocket-*`, protected on purpose: the handshake needs them);
//! `X-Forwarded-For` is appended to, with the socket peer last; whatever
//! `classify` accepts as a WebSocket handshake really is one.
//!
//! CI runs each property on 512 generated cases. The bounded fuzz run is the
//! same properties at scale, on demand:
//!
//! ```text
//! WSGATE_FUZZ_CASES=1000000 cargo test --release --test it props::fuzz_headers_at_scale -- --ignored --nocapture
//! ```
//!
//! (default 200,000 cases per property, about 2 minutes in all on 2 cores;
//! it prints cases and time per property; raise `WSGATE_FUZZ_CASES` to run
//! longer; `cargo test`, not nextest, whose slow-timeout would cut it).
#![allow(clippy::print_stdout, reason = "the fuzz run reports its size")]

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The module under test, compiled into this test crate (as
/// `tests/loom_admission.rs` does with admission): its functions are not
/// part of wsgate's public surface.
#[allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    reason = "the library's module, included by path"
)]
#[path = "../../src/headers.rs"]
mod headers;

use headers::{
    classify, set_forwarded, strip_hop_by_hop, write_upstream_upgrade, RequestKind,
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names a generated header set draws from: the interesting ones often,
/// arbitrary tokens too.
fn name() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "connection",
        "Connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "Sec-WebSocket-Extensions",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-secret",
        "X-Other",
        "cookie",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        3 => known,
        1 => "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,24}",
    ]
}

/// A header value: token lists (so `Connection` names things), addresses,
/// or arbitrary bytes that `HeaderValue` accepts (visible ASCII, SP, HTAB,
/// obs-text).
fn value(names: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    let list = prop::collection::vec(
        (
            prop::sample::select(if names.is_empty() {
                vec!["x".to_owned()]
            } else {
                names
            }),
            "[ \t]{0,2}",
            any::<bool>(),
        ),
        0..5,
    )
    .prop_map(|items| {
        items
            .into_iter()
            .map(|(n, ws, upper)| {
                let n = if upper { n.to_ascii_uppercase() } else { n };
                format!("{ws}{n}{ws}")
            })
            .collect::<Vec<_>>()
            .join(",")
            .into_bytes()
    });
    // Sometimes a token list carries one token of obs-text (bytes ≥ 0x80),
    // which hyper accepts in a value: the names beside it still count.
    let list = (
        list,
        prop::option::weighted(0.2, prop::collection::vec(0x80u8..=0xff, 1..4)),
    )
        .prop_map(|(mut l, junk)| {
            if let Some(junk) = junk {
                l.extend_from_slice(b", ");
                l.extend_from_slice(&junk);
            }
            l
        });
    let bytes = prop::collection::vec(
        prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
        0..40,
    );
    prop_oneof![
        2 => list,
        1 => "(upgrade|Upgrade|websocket|WebSocket|keep-alive|close)(, ?(upgrade|websocket|h2c))?".prop_map(String::into_bytes),
        1 => "([0-9]{1,3}\\.){3}[0-9]{1,3}(, ?([0-9]{1,3}\\.){3}[0-9]{1,3})?".prop_map(String::into_bytes),
        1 => Just(b"dGhlIHNhbXBsZSBub25jZQ==".to_vec()),
        1 => Just(b"13".to_vec()),
        3 => bytes,
    ]
}

/// An arbitrary header set, as (name, value) lines in order.
fn header_lines() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(name(), 0..16).prop_flat_map(|names| {
        let n = names.len();
        let values = prop::collection::vec(value(names.clone()), n);
        (Just(names), values).prop_map(|(names, values)| names.into_iter().zip(values).collect())
    })
}

fn to_map(lines: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in lines {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(n, v);
        }
    }
    h
}

fn peer() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::HEAD,
        Method::CONNECT,
        Method::OPTIONS,
    ])
}

fn version() -> impl Strategy<Value = Version> {
    prop::sample::select(vec![
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
    ])
}

/// Every name the request's `Connection` headers nominate, lower-cased,
/// read from the raw bytes (whatever else the value contains).
fn nominated(h: &HeaderMap) -> Vec<String> {
    h.get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| std::str::from_utf8(t.trim_ascii()).ok())
        .filter(|t| !t.is_empty() && HeaderName::from_bytes(t.as_bytes()).is_ok())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn is_protected(name: &str) -> bool {
    name == "host" || name.starts_with("sec-websocket-")
}

// ---------------------------------------------------------------- properties

fn prop_classify(m: &Method, v: Version, lines: &[(String, Vec<u8>)]) -> Result<(), TestCaseError> {
    let h = to_map(lines);
    if classify(m, v, &h) == Ok(RequestKind::WebSocket) {
        // What passes as a WebSocket handshake really is one (RFC 6455 §4.2.1).
        prop_assert_eq!(m, &Method::GET);
        prop_assert_eq!(v, Version::HTTP_11);
        prop_assert_eq!(h.get_all("upgrade").iter().count(), 1);
        prop_assert_eq!(h.get_all("sec-websocket-key").iter().count(), 1);
        prop_assert_eq!(h.get_all("sec-websocket-version").iter().count(), 1);
        prop_assert!(!h.contains_key("transfer-encoding"));
        prop_assert!(h.get_all("content-length").iter().all(|v| v == "0"));
        let key = h["sec-websocket-key"].as_bytes().trim_ascii();
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD.decode(key);
        prop_assert!(decoded.is_ok_and(|k| k.len() == 16));
    }
    Ok(())
}

fn prop_strip(lines: &[(String, Vec<u8>)]) -> Result<(), TestCaseError> {
    let before = to_map(lines);
    let named = nominated(&before);
    let mut h = before.clone();
    strip_hop_by_hop(&mut h);
    for hop in HOP_BY_HOP {
        prop_assert!(!h.contains_key(hop), "{} survived", hop);
    }
    for n in &named {
        if !is_protected(n) {
            prop_assert!(
                !h.contains_key(n.as_str()),
                "{} named in Connection survived",
                n
            );
        }
    }
    // Nothing else is touched.
    for (k, _) in &before {
        let k = k.as_str();
        if !HOP_BY_HOP.contains(&k) && (!named.iter().any(|n| n == k) || is_protected(k)) {
            let a: Vec<_> = before.get_all(k).iter().collect();
            let b: Vec<_> = h.get_all(k).iter().collect();
            prop_assert_eq!(a, b, "{} was changed", k);
        }
    }
    Ok(())
}

fn prop_forwarded(lines: &[(String, Vec<u8>)], peer: IpAddr) -> Result<(), TestCaseError> {
    let before = to_map(lines);
    let mut h = before.clone();
    set_forwarded(&mut h, peer);
    let xff: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
    prop_assert_eq!(xff.len(), 1, "one X-Forwarded-For line");
    let xff = xff[0].to_str().expect("visible ASCII");
    let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
    prop_assert_eq!(
        *entries.last().expect("an entry"),
        peer.to_string(),
        "the peer is the last entry"
    );
    // What the client sent comes first, in order: appended to, not replaced.
    let sent: Vec<String> = before
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    let expected_prefix = sent.join(", ");
    if !expected_prefix.is_empty() {
        prop_assert_eq!(xff, format!("{expected_prefix}, {peer}"));
    } else {
        prop_assert_eq!(xff, peer.to_string());
    }
    prop_assert_eq!(h.get_all(&X_FORWARDED_PROTO).iter().count(), 1);
    prop_assert_eq!(&h[&X_FORWARDED_PROTO], "http");
    match before.get("host") {
        Some(host) => prop_assert_eq!(h.get(&X_FORWARDED_HOST), Some(host)),
        None => prop_assert!(!h.contains_key(&X_FORWARDED_HOST)),
    }
    Ok(())
}

fn prop_upgrade_headers(lines: &[(String, Vec<u8>)], peer: IpAddr) -> Result<(), TestCaseError> {
    let before = to_map(lines);
    let named = nominated(&before);
    // The head as it goes on the wire, read back as the upstream reads it.
    let mut wire = b"GET / HTTP/1.1\r\n".to_vec();
    let via = http::HeaderValue::from_static("1.1 wsgate-test");
    write_upstream_upgrade(&mut wire, &before, peer, "up.internal:8080", None, &via);
    wire.extend_from_slice(b"\r\n");
    let mut slots = vec![httparse::EMPTY_HEADER; lines.len() + 16];
    let mut req = httparse::Request::new(&mut slots);
    prop_assert!(
        matches!(req.parse(&wire), Ok(httparse::Status::Complete(n)) if n == wire.len()),
        "the head does not parse whole: {:?}",
        String::from_utf8_lossy(&wire)
    );
    let mut h = http::HeaderMap::new();
    for l in req.headers.iter() {
        h.append(
            http::HeaderName::from_bytes(l.name.as_bytes()).expect("a name we wrote"),
            http::HeaderValue::from_bytes(l.value).expect("a value we wrote"),
        );
    }
    prop_assert_eq!(h.get_all("via").iter().next_back(), Some(&via), "ours last");
    let protected_hops = ["connection", "upgrade"];
    for hop in HOP_BY_HOP.iter().filter(|n| !protected_hops.contains(n)) {
        prop_assert!(!h.contains_key(*hop), "{} survived", hop);
    }
    for n in &named {
        if !is_protected(n)
            && !protected_hops.contains(&n.as_str())
            && !n.starts_with("x-forwarded-")
        {
            prop_assert!(
                !h.contains_key(n.as_str()),
                "{} named in Connection survived",
                n
            );
        }
    }
    prop_assert_eq!(h.get_all("connection").iter().count(), 1);
    prop_assert_eq!(&h["connection"], "upgrade");
    prop_assert_eq!(h.get_all("upgrade").iter().count(), 1);
    prop_assert_eq!(&h["upgrade"], "websocket");
    // The handshake survives whatever Connection named.
    for k in [
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
    ] {
        // Compared as the wire carries them: a field value has no leading
        // or trailing whitespace (a parsed client's never has).
        let a: Vec<_> = before
            .get_all(k)
            .iter()
            .map(|v| v.as_bytes().trim_ascii())
            .collect();
        let b: Vec<_> = h.get_all(k).iter().map(|v| v.as_bytes()).collect();
        prop_assert_eq!(a, b, "{} changed", k);
    }
    match before.get("host") {
        Some(host) => prop_assert_eq!(
            h.get_all("host").iter().next().map(|v| v.as_bytes()),
            Some(host.as_bytes().trim_ascii())
        ),
        None => prop_assert_eq!(&h["host"], "up.internal:8080"),
    }
    let xff = h[&X_FORWARDED_FOR].to_str().expect("ascii");
    let last = xff.rsplit(',').next().unwrap_or_default().trim().to_owned();
    prop_assert_eq!(last, peer.to_string());
    Ok(())
}

// ---------------------------------------------------------------- runners

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs all four properties on `cases` generated inputs each; returns the
/// time each took.
fn run_all(cases: u32) -> Vec<(&'static str, std::time::Duration)> {
    let mut took = Vec::new();
    let timed = |name: &'static str, f: &mut dyn FnMut(), took: &mut Vec<_>| {
        let start = std::time::Instant::now();
        f();
        took.push((name, start.elapsed()));
    };
    timed(
        "classify",
        &mut || {
            runner(cases)
                .run(&(method(), version(), header_lines()), |(m, v, l)| {
                    prop_classify(&m, v, &l)
                })
                .unwrap_or_else(|e| panic!("classify: {e}"));
        },
        &mut took,
    );
    timed(
        "strip_hop_by_hop",
        &mut || {
            runner(cases)
                .run(&header_lines(), |l| prop_strip(&l))
                .unwrap_or_else(|e| panic!("strip_hop_by_hop: {e}"));
        },
        &mut took,
    );
    timed(
        "set_forwarded",
        &mut || {
            runner(cases)
                .run(&(header_lines(), peer()), |(l, p)| prop_forwarded(&l, p))
                .unwrap_or_else(|e| panic!("set_forwarded: {e}"));
        },
        &mut took,
    );
    timed(
        "write_upstream_upgrade",
        &mut || {
            runner(cases)
                .run(&(header_lines(), peer()), |(l, p)| {
                    prop_upgrade_headers(&l, p)
                })
                .unwrap_or_else(|e| panic!("write_upstream_upgrade: {e}"));
        },
        &mut took,
    );
    took
}

#[test]
fn classify_accepts_only_real_handshakes_and_never_panics() {
    runner(512)
        .run(&(method(), version(), header_lines()), |(m, v, l)| {
            prop_classify(&m, v, &l)
        })
        .unwrap();
}

#[test]
fn hop_by_hop_and_connection_named_headers_never_survive() {
    runner(512)
        .run(&header_lines(), |l| prop_strip(&l))
        .unwrap();
}

#[test]
fn forwarded_for_is_appended_with_the_peer_last() {
    runner(512)
        .run(&(header_lines(), peer()), |(l, p)| prop_forwarded(&l, p))
        .unwrap();
}

#[test]
fn upgrade_headers_for_the_upstream_keep_the_handshake_and_drop_the_rest() {
    runner(512)
        .run(&(header_lines(), peer()), |(l, p)| {
            prop_upgrade_headers(&l, p)
        })
        .unwrap();
}

/// A valid handshake with noise around it is still classified WebSocket:
/// the properties above are not vacuous (the generator does reach the
/// accepting branch).
#[test]
fn generated_noise_does_not_hide_a_valid_handshake() {
    let accepted = std::cell::Cell::new(0);
    runner(512)
        .run(&header_lines(), |mut l| {
            l.retain(|(n, _)| {
                let n = n.to_ascii_lowercase();
                !matches!(
                    n.as_str(),
                    "upgrade"
                        | "connection"
                        | "sec-websocket-key"
                        | "sec-websocket-version"
                        | "transfer-encoding"
                        | "content-length"
                )
            });
            l.push(("Connection".into(), b"keep-alive, Upgrade".to_vec()));
            l.push(("Upgrade".into(), b"websocket".to_vec()));
            l.push(("Sec-WebSocket-Version".into(), b"13".to_vec()));
            l.push((
                "Sec-WebSocket-Key".into(),
                b"dGhlIHNhbXBsZSBub25jZQ==".to_vec(),
            ));
            let h = to_map(&l);
            prop_assert_eq!(
                classify(&Method::GET, Version::HTTP_11, &h),
                Ok(RequestKind::WebSocket)
            );
            accepted.set(accepted.get() + 1);
            prop_classify(&Method::GET, Version::HTTP_11, &l)
        })
        .unwrap();
    assert!(accepted.get() >= 512);
}

#[test]
#[ignore = "on demand: the bounded fuzz run, see the module docs"]
fn fuzz_headers_at_scale() {
    let cases: u32 = std::env::var("WSGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    for (name, took) in run_all(cases) {
        println!("fuzz: {name}: {cases} cases, no failure, {took:.1?}");
    }
}
