//! Reading every request the way the upstream will (docs/security.md),
//! black-box: wsgate on port 0 in front of an upstream that records every
//! request line and header it receives, raw clients that send exactly the
//! bytes an attacker would. Each test names the finding it covers; each
//! asserts both what the client got and what reached the upstream.

use std::net::SocketAddr;

use crate::support::access::{start_gate, upgrade_answer, wait_stderr};
use crate::support::jwt::{fixtures_dir, token, unix_now};
use crate::support::*;
use base64::Engine;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use wsgate::config::{RawConfig, RawKeyRule};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A raw upgrade of `target` with extra header lines; the status and the
/// socket (open on a 101).
async fn upgrade(addr: SocketAddr, target: &str, extra: &[&str]) -> (u16, TcpStream) {
    let (s, head) = upgrade_answer(addr, target, extra, b"").await;
    (status_of(&head), s)
}

fn rule(name: &str, key: &str, max: i64, prefix: &str, missing: &str) -> RawKeyRule {
    RawKeyRule {
        name: Some(name.into()),
        key: Some(key.into()),
        max_per_key: Some(max),
        path_prefix: Some(prefix.into()),
        missing: Some(missing.into()),
        ..RawKeyRule::default()
    }
}

async fn gate(up: &CountingUpstream, tweak: impl FnOnce(&mut RawConfig)) -> Sidecar {
    let mut raw = test_config(up.addr);
    tweak(&mut raw);
    spawn_sidecar(raw).await
}

async fn rejected(gate: &Sidecar, reason: &str) -> f64 {
    labelled_metric(
        gate.admin,
        "wsgate_connections_rejected_total",
        &[("reason", reason)],
    )
    .await
}

/// What reached the upstream: the request targets, in order.
fn targets(up: &CountingUpstream) -> Vec<String> {
    up.requests().into_iter().map(|r| r.target).collect()
}

/// Finding 1: a key rule on `/api` cannot be walked around through
/// another spelling of `/api`; what the upstream gets is the spelling the
/// rule judged.
#[tokio::test]
async fn other_spellings_of_a_ruled_path_meet_the_rule() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.key_limits = vec![rule("tenant", "header:X-Tenant", 5, "/api", "reject")];
    })
    .await;
    for target in [
        "/api",
        "/%61pi",
        "//api",
        "/./api",
        "/x/../api",
        "/API/../api/.",
    ] {
        let (status, _) = upgrade(gate.addr, target, &[]).await;
        assert_eq!(status, 400, "{target} without the key");
    }
    assert_eq!(rejected(&gate, "key_missing").await, 6.0);
    assert!(targets(&up).is_empty(), "nothing reached the upstream");

    let (status, _ws) = upgrade(gate.addr, "/%61pi/./x?q=%2F", &["X-Tenant: acme"]).await;
    assert_eq!(status, 101);
    assert_eq!(
        targets(&up),
        ["/api/x?q=%2F"],
        "forwarded as judged, the query untouched"
    );
}

/// Finding 1 with a token: an unsigned token refused on `/j` is refused
/// on every other spelling of `/j`, and never reaches the upstream.
#[tokio::test]
async fn an_invalid_token_is_refused_on_every_spelling_of_its_path() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.jwt_jwks_file = Some(fixtures_dir().join("jwks.json").display().to_string());
        raw.key_limits = vec![rule("user", "jwt_claim:sub", 5, "/j", "reject")];
    })
    .await;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "mallory", "exp": unix_now() + 600}))
    );
    let auth = format!("Authorization: Bearer {unsigned}");
    for target in ["/j", "/%6a", "/x/../j", "//j/room"] {
        let (status, _) = upgrade(gate.addr, target, &[&auth]).await;
        assert_eq!(status, 401, "{target}");
    }
    assert!(
        targets(&up).is_empty(),
        "the token never reached the upstream"
    );
}

/// Finding 2: dot segments are not keys: with room `a` full, `b/../a`,
/// `./a` and `%2e/a` are room `a`.
#[tokio::test]
async fn dot_segments_resolve_before_a_path_segment_is_a_key() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.key_limits = vec![rule("room", "path_segment:2", 1, "/room/", "reject")];
    })
    .await;
    let (status, _held) = upgrade(gate.addr, "/room/a", &[]).await;
    assert_eq!(status, 101);
    for target in [
        "/room/b/../a",
        "/room/./a",
        "/room/%2e/a",
        "/room//a",
        "/room/%61",
    ] {
        let (status, _) = upgrade(gate.addr, target, &[]).await;
        assert_eq!(status, 429, "{target} is room a, which is full");
    }
    assert_eq!(rejected(&gate, "key").await, 5.0);
    assert_eq!(targets(&up), ["/room/a"]);
}

/// Finding 3: a parameter or cookie a rule reads, or the token
/// `jwt_from` reads, given twice is refused (`key_ambiguous`), whichever
/// copy comes first; and so are two `Host` headers.
#[tokio::test]
async fn repeated_inputs_a_rule_reads_are_refused() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.jwt_jwks_file = Some(fixtures_dir().join("jwks.json").display().to_string());
        raw.jwt_from = "query:access_token".into();
        raw.key_limits = vec![
            rule("tenant", "query:tenant", 1, "/q", "allow"),
            rule("team", "cookie:team", 1, "/c", "allow"),
            rule("user", "jwt_claim:sub", 1, "/j", "allow"),
        ];
    })
    .await;
    let bob = token("RS256", json!({"sub": "bob", "exp": unix_now() + 600}));
    let alice = token("RS256", json!({"sub": "alice", "exp": unix_now() + 600}));
    let cases = [
        ("/q?tenant=b&tenant=a".to_owned(), vec![]),
        ("/q?tenant=b&t%65nant=a".to_owned(), vec![]),
        ("/c".to_owned(), vec!["Cookie: team=b; team=a"]),
        ("/c".to_owned(), vec!["Cookie: team=b", "Cookie: team=a"]),
        (
            format!("/j?access_token={bob}&access_token={alice}"),
            vec![],
        ),
    ];
    for (target, headers) in &cases {
        let (status, _) = upgrade(gate.addr, target, headers).await;
        assert_eq!(status, 400, "{target} {headers:?}");
    }
    assert_eq!(rejected(&gate, "key_ambiguous").await, 5.0);

    let two_hosts = format!(
        "GET /q HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let answer = raw_exchange(gate.addr, two_hosts.as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    let plain = "GET /health HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n";
    let answer = raw_exchange(gate.addr, plain.as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(targets(&up).is_empty(), "nothing reached the upstream");

    // One copy of each is fine.
    let (status, _a) = upgrade(gate.addr, &format!("/j?access_token={alice}"), &[]).await;
    assert_eq!(status, 101);
    assert_eq!(targets(&up).len(), 1);
}

/// Finding 6: `path_prefix` matches whole segments.
#[tokio::test]
async fn a_prefix_covers_whole_segments_only() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.key_limits = vec![rule("k", "header:X-K", 1, "/k", "shared")];
    })
    .await;
    let (status, _held) = upgrade(gate.addr, "/k", &[]).await;
    assert_eq!(status, 101);
    let (status, _k2) = upgrade(gate.addr, "/k2", &[]).await;
    assert_eq!(status, 101, "/k2 is not under /k");
    let (status, _) = upgrade(gate.addr, "/k/x", &[]).await;
    assert_eq!(status, 429, "/k/x is, and the shared bucket is full");
    assert_eq!(targets(&up), ["/k", "/k2"]);
}

/// What no normalisation makes unambiguous is refused with 400
/// `bad_path`, on the upgrade path and on plain requests alike; a target
/// that is not a path on this host too.
#[tokio::test]
async fn ambiguous_paths_and_foreign_targets_are_refused() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |_| {}).await;
    let refused = [
        "/a%2Fb", "/a%2fb", "/a%5Cb", "/a%00", "/a%0d%0a", "/a%", "/a%zz", "*",
    ];
    for target in refused {
        let (status, _) = upgrade(gate.addr, target, &[]).await;
        assert_eq!(status, 400, "{target}");
    }
    let (status, _) = upgrade(gate.addr, "http://elsewhere.example/x", &[]).await;
    assert_eq!(status, 400, "absolute-form naming another host");
    assert_eq!(rejected(&gate, "bad_path").await, 9.0);
    for target in ["/a%2Fb", "/a%5C", "/x/%00"] {
        let (status, _) = http_get(gate.addr, target).await;
        assert_eq!(status, 400, "plain {target}");
    }
    assert!(targets(&up).is_empty(), "nothing reached the upstream");

    let (status, _ws) = upgrade(gate.addr, &format!("http://{}/%7euser", gate.addr), &[]).await;
    assert_eq!(status, 101, "absolute-form naming this host");
    let (status, _) = http_get(gate.addr, "/x/../health/./").await;
    assert_eq!(status, 200);
    assert_eq!(targets(&up), ["/~user", "/health/"]);
}

/// Finding 8: CONNECT and TRACE get 405 without reaching the upstream;
/// an upstream that switches protocols on a plain request gets the
/// client a 502, not a bare 101.
#[tokio::test]
async fn connect_trace_and_an_unrequested_switch() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |_| {}).await;
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", up.addr);
    let answer = raw_exchange(gate.addr, connect.as_bytes()).await;
    assert_eq!(status_of(&answer), 405, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nallow: "),
        "{answer}"
    );
    let trace = "TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(
        status_of(&raw_exchange(gate.addr, trace.as_bytes()).await),
        405
    );
    assert!(targets(&up).is_empty());

    let switching = spawn_raw_upstream(|mut s| async move {
        let head = read_request_head(&mut s).await;
        assert!(head.starts_with("GET /plain "), "{head}");
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
            )
            .await;
        discard_until_eof(&mut s).await;
    })
    .await;
    let gate = spawn_sidecar(test_config(switching.addr)).await;
    let (status, _) = http_get(gate.addr, "/plain").await;
    assert_eq!(status, 502);
}

/// Finding 7: a key claim is a non-empty string or an integer (`7` and
/// `"7"` are one key); any other type is a bad token; a token without
/// `exp` is refused unless `jwt_require_exp = false`.
#[tokio::test]
async fn claims_are_strings_or_integers_and_tokens_expire() {
    let up = spawn_counting_upstream().await;
    let jwks = fixtures_dir().join("jwks.json").display().to_string();
    let gate = gate(&up, |raw| {
        raw.jwt_jwks_file = Some(jwks.clone());
        raw.key_limits = vec![rule("user", "jwt_claim:sub", 1, "/", "reject")];
    })
    .await;
    let exp = unix_now() + 600;
    let bearer = |claims| format!("Authorization: Bearer {}", token("ES256", claims));
    for claims in [
        json!({"sub": true, "exp": exp}),
        json!({"sub": 1.5, "exp": exp}),
        json!({"sub": null, "exp": exp}),
        json!({"sub": ["a"], "exp": exp}),
        json!({"sub": "no-exp"}),
    ] {
        let (status, _) = upgrade(gate.addr, "/", &[&bearer(claims.clone())]).await;
        assert_eq!(status, 401, "{claims}");
    }
    assert_eq!(rejected(&gate, "jwt").await, 5.0);
    let (status, _seven) = upgrade(gate.addr, "/", &[&bearer(json!({"sub": 7, "exp": exp}))]).await;
    assert_eq!(status, 101);
    let (status, _) = upgrade(gate.addr, "/", &[&bearer(json!({"sub": "7", "exp": exp}))]).await;
    assert_eq!(status, 429, "7 and \"7\" are one key");
    assert_eq!(targets(&up).len(), 1);

    let lenient = spawn_sidecar({
        let mut raw = test_config(up.addr);
        raw.jwt_jwks_file = Some(jwks);
        raw.jwt_require_exp = false;
        raw.key_limits = vec![rule("user", "jwt_claim:sub", 1, "/", "reject")];
        raw
    })
    .await;
    let (status, _) = upgrade(lenient.addr, "/", &[&bearer(json!({"sub": "no-exp"}))]).await;
    assert_eq!(status, 101, "jwt_require_exp = false");
}

/// Finding 7: a JWKS file that disappears keeps the last good keys, and
/// says so at once rather than silently.
#[tokio::test]
async fn a_missing_jwks_file_keeps_the_keys_and_says_so() {
    let up = spawn_counting_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(fixtures_dir().join("jwks.json"), &jwks).expect("copy");
    let config = dir.path().join("wsgate.toml");
    std::fs::write(
        &config,
        format!(
            "jwt_jwks_file = {:?}\n[[key_limits]]\nname = \"user\"\nkey = \"jwt_claim:sub\"\n\
             max_per_key = 5\nmissing = \"reject\"\n",
            jwks.display().to_string()
        ),
    )
    .expect("write config");
    let gate = start_gate(up.addr, &["--config", config.to_str().expect("utf8")], &[]).await;
    let auth = format!(
        "Authorization: Bearer {}",
        token("RS256", json!({"sub": "a", "exp": unix_now() + 600}))
    );
    // A token that verifies: the keys are loaded (they are read after the
    // listeners are up).
    let (status, _first) = upgrade(gate.proxy, "/", &[&auth]).await;
    assert_eq!(status, 101);
    std::fs::remove_file(&jwks).expect("remove");
    wait_stderr(&gate, "the jwks file is missing").await;
    let (status, _second) = upgrade(gate.proxy, "/", &[&auth]).await;
    assert_eq!(status, 101, "the last good keys still verify");
    let warned = gate
        .stderr()
        .lines()
        .filter(|l| l.contains("the jwks file is missing"))
        .count();
    assert_eq!(warned, 1, "once, not at every poll");
}

/// Finding 10: an `X-Forwarded-For` entry at the trusted position that is
/// not an address is said (once a minute at most), not silently replaced
/// by the socket peer.
#[tokio::test]
async fn an_unreadable_forwarded_for_entry_is_reported_once() {
    let up = spawn_counting_upstream().await;
    let gate = start_gate(up.addr, &[], &[("WSGATE_TRUSTED_HOPS", "1".into())]).await;
    for _ in 0..5 {
        let (status, _ws) = upgrade(gate.proxy, "/", &["X-Forwarded-For: not-an-address"]).await;
        assert_eq!(status, 101);
    }
    wait_stderr(&gate, "X-Forwarded-For entry at the trusted position").await;
    let lines = gate
        .stderr()
        .lines()
        .filter(|l| l.contains("X-Forwarded-For entry"))
        .count();
    assert_eq!(lines, 1);
}

// ---------------------------------------------------------------- property

/// RFC 3986 normalisation written independently of wsgate's: decode
/// unreserved escapes (upper-case the rest), merge runs of `/`, then the
/// remove_dot_segments algorithm of §5.2.4 step by step. `None` for what
/// wsgate must refuse (an encoded `/` or `\`, a control character, a
/// malformed escape).
fn reference_normal_form(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut decoded = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                return None;
            }
            if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                decoded.push(char::from(v));
            } else {
                decoded.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else {
            decoded.push(char::from(bytes[i]));
            i += 1;
        }
    }
    let mut merged = String::new();
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    let mut input = merged;
    let mut output = String::new();
    let pop = |output: &mut String| {
        let cut = output.rfind('/').unwrap_or(0);
        output.truncate(cut);
    };
    while !input.is_empty() {
        if input.starts_with("../") {
            input.replace_range(..3, "");
        } else if input.starts_with("./") {
            input.replace_range(..2, "");
        } else if input.starts_with("/./") {
            input.replace_range(..3, "/");
        } else if input == "/." {
            input = "/".into();
        } else if input.starts_with("/../") {
            input.replace_range(..4, "/");
            pop(&mut output);
        } else if input == "/.." {
            input = "/".into();
            pop(&mut output);
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |e| e + start);
            output.push_str(&input[..end]);
            input.replace_range(..end, "");
        }
    }
    Some(output)
}

/// The path generator of `src/target`'s own property tests.
#[path = "../../src/target/test_paths.rs"]
mod test_paths;

/// For random paths built from segments, `.`, `..`, empty segments and
/// escapes of unreserved and reserved characters: either wsgate refuses
/// the request, or the path a key rule judged (whether the `/a` rule
/// applied) and the path the upstream received are both the RFC 3986
/// normal form.
#[tokio::test]
async fn rules_and_upstream_read_every_path_alike() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.key_limits = vec![rule("a", "header:X-K", 1000, "/a", "reject")];
    })
    .await;
    let mut runner = TestRunner::new(PropConfig {
        cases: 200,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let strategy = test_paths::path(5);
    let mut cases = Vec::new();
    for _ in 0..200 {
        cases.push(strategy.new_tree(&mut runner).expect("case").current());
    }
    let mut admitted = 0;
    for path in cases {
        let before = up.count();
        let (status, _ws) = upgrade(gate.addr, &path, &[]).await;
        match reference_normal_form(&path) {
            None => assert_eq!(status, 400, "{path} must be refused"),
            Some(normal) if normal == "/a" || normal.starts_with("/a/") => {
                assert_eq!(status, 400, "{path} is {normal}: the /a rule applies");
                assert_eq!(up.count(), before, "{path} never reached the upstream");
            }
            Some(normal) => {
                assert_eq!(status, 101, "{path} is {normal}");
                let seen = up.requests().last().map(|r| r.target.clone());
                assert_eq!(seen.as_deref(), Some(normal.as_str()), "{path}");
                admitted += 1;
            }
        }
    }
    assert!(admitted > 20, "the cases exercise forwarding: {admitted}");
}
