//! The handshake policy (docs/security.md#handshake-policy), black-box:
//! `allowed_origins` / `require_origin` (403 `origin`), `subprotocols` /
//! `require_subprotocol` (400 `subprotocol`, the rest of the offer
//! forwarded), the upstream's unoffered selection (502 `bad_subprotocol`),
//! and the JWT carried in an offered subprotocol entry. A refusal must
//! reach nothing upstream and take no slot.

use crate::support::access::start_gate;
use crate::support::jwt::{fixtures_dir, token, unix_now};
use crate::support::*;
use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::config::{RawConfig, RawKeyRule};

/// A gate in front of a counting upstream, configured by `tweak`.
async fn gate(up: &CountingUpstream, tweak: impl FnOnce(&mut RawConfig)) -> Sidecar {
    let mut raw = test_config(up.addr);
    tweak(&mut raw);
    spawn_sidecar(raw).await
}

/// The status of an upgrade carrying `headers` (101 when admitted; the
/// client is closed at once), and the subprotocol the client was given.
async fn status_with(gate: &Sidecar, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    let mut head = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        gate.addr
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut s = within("connect", tokio::net::TcpStream::connect(gate.addr))
        .await
        .expect("connect");
    within("write", s.write_all(head.as_bytes()))
        .await
        .expect("write");
    let answer = within("answer", read_head(&mut s)).await;
    let protocol = answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("sec-websocket-protocol")
            .then(|| v.trim().to_owned())
    });
    (status_of(&answer), protocol)
}

fn origins(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The header values the upstream saw for `name` on its `i`-th request.
fn seen_header(up: &CountingUpstream, i: usize, name: &str) -> Vec<String> {
    up.requests()[i]
        .headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[tokio::test]
async fn origins_are_compared_normalised_and_refusals_reach_nothing() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.allowed_origins = origins(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:8080",
        ]);
    })
    .await;
    type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);
    let cases: &[Case<'_>] = &[
        (&[("Origin", "https://app.example.com")], 101, "exact"),
        (
            &[("Origin", "HTTPS://APP.Example.com:443")],
            101,
            "case and the default port",
        ),
        (
            &[("Origin", "https://a.b.example.org")],
            101,
            "wildcard depth",
        ),
        (&[("Origin", "http://localhost:8080")], 101, "with its port"),
        (&[], 101, "no Origin: not a browser, allowed"),
        (
            &[("Origin", "https://example.org")],
            403,
            "the apex of a wildcard",
        ),
        (&[("Origin", "https://evil.example")], 403, "another site"),
        (
            &[("Origin", "http://app.example.com")],
            403,
            "another scheme",
        ),
        (&[("Origin", "http://localhost:8081")], 403, "another port"),
        (&[("Origin", "null")], 403, "opaque, not listed"),
        (
            &[("Origin", "https://app.example.com.evil.example")],
            403,
            "a suffix trick",
        ),
        (
            &[
                ("Origin", "https://app.example.com"),
                ("Origin", "https://evil.example"),
            ],
            403,
            "two Origin headers",
        ),
    ];
    let mut admitted = 0;
    for (headers, want, what) in cases {
        let (status, _) = status_with(&gate, headers).await;
        assert_eq!(status, *want, "{what}");
        if *want == 101 {
            admitted += 1;
        }
    }
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert_eq!(
        up.count(),
        admitted,
        "refused upgrades never reach the upstream"
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"origin\"}"
        )
        .await,
        7.0
    );
}

#[tokio::test]
async fn null_and_require_origin() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.allowed_origins = origins(&["null"]);
        raw.require_origin = true;
    })
    .await;
    assert_eq!(status_with(&gate, &[("Origin", "null")]).await.0, 101);
    assert_eq!(status_with(&gate, &[]).await.0, 403, "required");
    let only_required = {
        let up2 = spawn_counting_upstream().await;
        let g = gate_for_any_origin(&up2).await;
        (
            status_with(&g, &[]).await.0,
            status_with(&g, &[("Origin", "https://x.example")]).await.0,
        )
    };
    assert_eq!(
        only_required,
        (403, 101),
        "require_origin alone: any origin, but one must be sent"
    );
    assert_eq!(up.count(), 1);
}

async fn gate_for_any_origin(up: &CountingUpstream) -> Sidecar {
    gate(up, |raw| raw.require_origin = true).await
}

/// Origin is checked before anything is taken: with the cap full, a
/// foreign page gets 403 (not 503), and dry run does not let it through.
#[tokio::test]
async fn origin_is_checked_first_and_always_enforced() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.allowed_origins = origins(&["https://app.example.com"]);
        raw.max_clients = 1;
    })
    .await;
    let held = try_upgrade(&gate.ws_url(), &[("Origin", "https://app.example.com")])
        .await
        .expect("admitted");
    assert_eq!(
        status_with(&gate, &[("Origin", "https://evil.example")])
            .await
            .0,
        403
    );
    assert_eq!(
        status_with(&gate, &[("Origin", "https://app.example.com")])
            .await
            .0,
        503
    );
    drop(held);
    let dry = gate_dry(&up).await;
    assert_eq!(
        status_with(&dry, &[("Origin", "https://evil.example")])
            .await
            .0,
        403,
        "dry run covers limits, not the origin policy"
    );
}

async fn gate_dry(up: &CountingUpstream) -> Sidecar {
    gate(up, |raw| {
        raw.allowed_origins = origins(&["https://app.example.com"]);
        raw.enforce = false;
    })
    .await
}

#[tokio::test]
async fn offered_subprotocols_outside_the_list_are_removed() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.subprotocols = origins(&["chat.v2", "chat.v1"]);
    })
    .await;
    let (status, selected) = status_with(
        &gate,
        &[("Sec-WebSocket-Protocol", "evil, chat.v1, x, chat.v2")],
    )
    .await;
    assert_eq!((status, selected.as_deref()), (101, Some("chat.v1")));
    assert_eq!(
        seen_header(&up, 0, "sec-websocket-protocol"),
        ["chat.v1, chat.v2"]
    );
    let (status, selected) = status_with(&gate, &[("Sec-WebSocket-Protocol", "evil")]).await;
    assert_eq!(
        (status, selected),
        (101, None),
        "nothing listed offered, not required: forwarded without a subprotocol"
    );
    assert!(seen_header(&up, 1, "sec-websocket-protocol").is_empty());
}

#[tokio::test]
async fn require_subprotocol_refuses_offers_without_a_listed_name() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.subprotocols = origins(&["chat"]);
        raw.require_subprotocol = true;
    })
    .await;
    for (offer, want) in [
        (Some("chat"), 101),
        (Some("other, chat"), 101),
        (Some("other"), 400),
        (None, 400),
        (Some("chat, not a token"), 400),
    ] {
        let headers: Vec<(&str, &str)> = offer
            .map(|o| vec![("Sec-WebSocket-Protocol", o)])
            .unwrap_or_default();
        assert_eq!(status_with(&gate, &headers).await.0, want, "{offer:?}");
    }
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert_eq!(up.count(), 2);
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"subprotocol\"}"
        )
        .await,
        3.0
    );
}

/// An upstream that answers 101 selecting `selected`, whatever it was
/// offered, then waits for wsgate to close; counts the closes it saw.
async fn selecting_upstream(
    selected: &'static str,
) -> (RawUpstream, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let up = spawn_raw_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let head = read_request_head(&mut s).await;
            let answer = switching_response(&head).replace(
                "\r\n\r\n",
                &format!("\r\nSec-WebSocket-Protocol: {selected}\r\n\r\n"),
            );
            let _ = s.write_all(answer.as_bytes()).await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            let _ = tx.send(());
        }
    })
    .await;
    (up, rx)
}

#[tokio::test]
async fn an_upstream_selecting_an_unoffered_subprotocol_is_502() {
    for (offer, selected) in [
        (Some("chat"), "superchat"),
        (None, "chat"),
        (Some("a, b"), "a, b"),
    ] {
        let (up, mut closed) = selecting_upstream(selected).await;
        let gate = spawn_sidecar(test_config(up.addr)).await;
        let headers: Vec<(&str, &str)> = offer
            .map(|o| vec![("Sec-WebSocket-Protocol", o)])
            .unwrap_or_default();
        assert_eq!(
            status_with(&gate, &headers).await.0,
            502,
            "offered {offer:?}, selected {selected:?}"
        );
        within("the upstream connection closed", closed.recv()).await;
        assert_eq!(
            metric(
                gate.admin,
                "wsgate_upstream_errors_total{kind=\"bad_subprotocol\"}"
            )
            .await,
            1.0
        );
        wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    }
    let (up, _closed) = selecting_upstream("chat").await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    assert_eq!(
        status_with(&gate, &[("Sec-WebSocket-Protocol", "x, chat")]).await,
        (101, Some("chat".into())),
        "a selection that was offered passes"
    );
}

const BEARER: &str = "base64url.bearer.authorization.k8s.io.";

fn user_rule() -> RawKeyRule {
    RawKeyRule {
        name: Some("user".into()),
        key: Some("jwt_claim:sub".into()),
        max_per_key: Some(1),
        ..RawKeyRule::default()
    }
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": unix_now() + 600})
}

#[tokio::test]
async fn a_jwt_in_the_subprotocol_is_verified_counted_and_stripped() {
    let up = spawn_counting_upstream().await;
    let gate = gate(&up, |raw| {
        raw.jwt_jwks_file = Some(fixtures_dir().join("jwks.json").display().to_string());
        raw.jwt_from = "subprotocol".into();
        raw.key_limits = vec![user_rule()];
    })
    .await;
    let alice = token("RS256", claims("alice"));
    let offer = format!("chat, {BEARER}{alice}");
    let mut ws = try_upgrade(&gate.ws_url(), &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .expect("admitted");
    echo_text(&mut ws, "hello").await;
    assert_eq!(seen_header(&up, 0, "sec-websocket-protocol"), ["chat"]);
    for (_, v) in &up.requests()[0].headers {
        assert!(
            !String::from_utf8_lossy(v).contains(&alice),
            "the token never reaches the upstream"
        );
    }
    assert_eq!(
        status_with(&gate, &[("Sec-WebSocket-Protocol", &offer)])
            .await
            .0,
        429,
        "counted under alice's sub (limit 1)"
    );
    // The Kubernetes form: the token base64url-encoded.
    let bob =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token("ES256", claims("bob")));
    let (status, selected) = status_with(
        &gate,
        &[("Sec-WebSocket-Protocol", &format!("chat, {BEARER}{bob}"))],
    )
    .await;
    assert_eq!((status, selected.as_deref()), (101, Some("chat")));
    let bad = format!("chat, {BEARER}{}x", token("RS256", claims("carol")));
    assert_eq!(
        status_with(&gate, &[("Sec-WebSocket-Protocol", &bad)])
            .await
            .0,
        401
    );
    let alone = format!("{BEARER}{}", token("RS256", claims("dave")));
    assert_eq!(
        status_with(&gate, &[("Sec-WebSocket-Protocol", &alone)])
            .await
            .0,
        400,
        "nothing left to select: a browser would fail the handshake"
    );
    let twice = format!(
        "chat, {BEARER}{}, {BEARER}{}",
        token("RS256", claims("erin")),
        token("RS256", claims("frank"))
    );
    assert_eq!(
        status_with(&gate, &[("Sec-WebSocket-Protocol", &twice)])
            .await
            .0,
        400
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"jwt\"}"
        )
        .await,
        1.0
    );
    drop(ws);
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert_eq!(
        up.count(),
        2,
        "only alice's first and bob's reached the upstream"
    );
}

/// The token is never written anywhere wsgate writes: not in the access
/// log, not at debug level.
#[tokio::test]
async fn a_subprotocol_token_is_never_logged() {
    let up = spawn_counting_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wsgate.toml");
    std::fs::write(
        &file,
        format!(
            "jwt_jwks_file = {:?}\njwt_from = \"subprotocol\"\n\
             [[key_limits]]\nname = \"user\"\nkey = \"jwt_claim:sub\"\nmax_per_key = 5\n",
            fixtures_dir().join("jwks.json").display().to_string()
        ),
    )
    .expect("config file");
    let config = file.display().to_string();
    let gate = start_gate(
        up.addr,
        &["--config", &config],
        &[
            ("RUST_LOG", "debug".into()),
            ("WSGATE_SUBPROTOCOLS", "chat,other".into()),
        ],
    )
    .await;
    let url = format!("ws://{}/", gate.proxy);
    let good = token("RS256", claims("alice"));
    let offer = format!("chat, {BEARER}{good}");
    let ws = try_upgrade(&url, &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .expect("admitted");
    close_cleanly(ws).await;
    let expired = token("RS256", json!({"sub": "bob", "exp": unix_now() - 600}));
    let refused = format!("chat, {BEARER}{expired}");
    assert!(try_upgrade(&url, &[("Sec-WebSocket-Protocol", &refused)])
        .await
        .is_err());
    let record = crate::support::access::wait_stderr(&gate, "subprotocol=\"chat\"").await;
    assert!(record.contains("keys=\"user=alice\""), "{record}");
    // The refusal summary is written at exit, if not before.
    let mut gate = gate;
    gate.process.signal("TERM");
    gate.process.wait_exit();
    // The pipe's reader may still be behind the exit: poll, bounded.
    let log = crate::support::access::wait_stderr(&gate, "jwt=1").await;
    for secret in [&good, &expired] {
        let signature = secret.rsplit('.').next().unwrap_or(secret);
        assert!(!log.contains(signature), "a token in the log:\n{log}");
    }
}
