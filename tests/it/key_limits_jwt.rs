//! Limits per key from a verified JWT claim (docs/operations.md#limits-per-key), black-box: tokens
//! signed with the test keys in `tests/fixtures/jwt/`, sent the ways
//! clients send them (Bearer header, query parameter, cookie), against
//! wsgate started through its real entry point on port 0.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::jwt::{fixtures_dir, hs256_token, token, unix_now};
use crate::support::*;
use base64::Engine;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsgate::config::{RawConfig, RawKeyRule};

fn jwt_rule(max: i64) -> RawKeyRule {
    RawKeyRule {
        name: Some("user".into()),
        key: Some("jwt_claim:sub".into()),
        max_per_key: Some(max),
        ..RawKeyRule::default()
    }
}

/// A gate with one `jwt_claim:sub` rule (limit `max`) over `jwks`.
async fn gate_with(
    up: &Upstream,
    jwks: &std::path::Path,
    max: i64,
    tweak: impl FnOnce(&mut RawConfig),
) -> Sidecar {
    let mut raw = test_config(up.addr);
    raw.jwt_jwks_file = Some(jwks.display().to_string());
    raw.key_limits = vec![jwt_rule(max)];
    tweak(&mut raw);
    spawn_sidecar(raw).await
}

/// Upgrades with `Authorization: Bearer <token>` (or the given header).
async fn with_header(gate: &Sidecar, name: &str, value: &str) -> Result<Ws, u16> {
    let mut req = gate.ws_url().into_client_request().expect("request");
    req.headers_mut().insert(
        tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .expect("name"),
        HeaderValue::from_str(value).expect("value"),
    );
    match within("upgrade", tokio_tungstenite::connect_async(req)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("expected an upgrade or an HTTP refusal, got {e}"),
    }
}

async fn bearer(gate: &Sidecar, token: &str) -> Result<Ws, u16> {
    with_header(gate, "authorization", &format!("Bearer {token}")).await
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": unix_now() + 600})
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// RS256, ES256, EdDSA and HS256 tokens are admitted and counted under
/// their `sub`: the second connection of one subject is refused (limit 1)
/// whatever key signed it, another subject is not.
#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_counted_under_their_subject() {
    let up = spawn_echo_upstream().await;
    let gate = gate_with(&up, &fixtures_dir().join("jwks.json"), 1, |_| {}).await;
    let mut held = Vec::new();
    for (i, alg) in ["RS256", "ES256", "EdDSA", "HS256"].iter().enumerate() {
        let sub = format!("user-{i}");
        let mut ws = bearer(&gate, &token(alg, claims(&sub)))
            .await
            .unwrap_or_else(|s| panic!("{alg}: {s}"));
        echo_text(&mut ws, alg).await;
        held.push(ws);
        let other = ["RS256", "ES256", "EdDSA", "HS256"][(i + 1) % 4];
        assert_eq!(
            bearer(&gate, &token(other, claims(&sub))).await.err(),
            Some(429),
            "{sub} holds its limit, whichever key signs the next token"
        );
    }
    assert_eq!(
        metric(gate.admin, "wsgate_keys_tracked{rule=\"user\"}").await,
        4.0
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"key\"}"
        )
        .await,
        4.0
    );
    drop(held);
    wait_metric(gate.admin, "wsgate_keys_tracked{rule=\"user\"}", 0.0).await;
}

/// Every bad token is 401 and the upstream sees nothing of it.
#[tokio::test]
async fn bad_tokens_are_401_and_never_reach_the_upstream() {
    let up = spawn_echo_upstream().await;
    let gate = gate_with(&up, &fixtures_dir().join("jwks.json"), 5, |raw| {
        raw.jwt_issuer = Some("https://auth.example".into());
        raw.jwt_audience = Some("chat".into());
    })
    .await;
    let now = unix_now();
    let good = json!({"sub": "u", "iss": "https://auth.example", "aud": "chat", "exp": now + 600});
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    };
    let mut ok = bearer(&gate, &token("RS256", good.clone()))
        .await
        .expect("the good token");
    echo_text(&mut ok, "ok").await;
    let accepts = up.accepts.load(Ordering::SeqCst);

    let signed = token("RS256", good.clone());
    let (head, rest) = signed.split_once('.').expect("jwt");
    let (_, sig) = rest.split_once('.').expect("jwt");
    let tampered = format!("{head}.{}.{sig}", b64(&with(json!({"sub": "admin"}))));
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    let public_pem = std::fs::read(fixtures_dir().join("rsa.pub.pem")).expect("public key");
    let confused = hs256_token(&public_pem, Some("rsa-1"), good.clone());
    let cases = [
        ("expired", token("RS256", with(json!({"exp": now - 3600})))),
        (
            "not yet valid",
            token("RS256", with(json!({"nbf": now + 3600}))),
        ),
        (
            "wrong issuer",
            token("RS256", with(json!({"iss": "https://evil.example"}))),
        ),
        (
            "wrong audience",
            token("RS256", with(json!({"aud": "billing"}))),
        ),
        ("bad signature", tampered),
        ("alg none", none),
        ("HS256 signed with the RSA public key", confused),
        ("not a token", "not-a-jwt".into()),
    ];
    for (what, t) in &cases {
        assert_eq!(bearer(&gate, t).await.err(), Some(401), "{what}");
    }
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        accepts,
        "the upstream saw none of them"
    );
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"jwt\"}"
        )
        .await,
        cases.len() as f64
    );
    assert_eq!(
        metric(gate.admin, "wsgate_key_rejected_total{rule=\"user\"}").await,
        cases.len() as f64
    );
    // No token at all is a missing key: `shared` by default, so admitted.
    let _anon = with_header(&gate, "x-nothing", "1")
        .await
        .expect("no token: the missing mode applies");
}

/// No token with `missing = reject` on a `jwt_claim` rule: 401.
/// Under `missing = "reject"`: no token, and a verified token whose claim
/// is the empty string (no key either, never the key ""), are both 401
/// `key_missing`, and the upstream sees neither.
#[tokio::test]
async fn a_missing_token_or_an_empty_claim_under_reject_is_401() {
    let up = spawn_echo_upstream().await;
    let gate = gate_with(&up, &fixtures_dir().join("jwks.json"), 5, |raw| {
        raw.key_limits[0].missing = Some("reject".into());
    })
    .await;
    assert_eq!(with_header(&gate, "x-nothing", "1").await.err(), Some(401));
    let empty = token("RS256", claims(""));
    assert_eq!(bearer(&gate, &empty).await.err(), Some(401));
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"key_missing\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        0,
        "the upstream saw nothing"
    );
}

/// Browsers cannot set headers on a WebSocket: the token from a query
/// parameter, and from a cookie.
#[tokio::test]
async fn tokens_from_a_query_parameter_or_a_cookie() {
    let up = spawn_echo_upstream().await;
    let jwks = fixtures_dir().join("jwks.json");
    let gate = gate_with(&up, &jwks, 1, |raw| {
        raw.jwt_from = "query:access_token".into()
    })
    .await;
    let t = token("ES256", claims("browser"));
    let mut ws = within(
        "connect",
        connect(&format!("ws://{}/?access_token={t}", gate.addr)),
    )
    .await
    .expect("token from the query");
    echo_text(&mut ws, "q").await;
    let refused = connect_refused(&format!("ws://{}/?access_token={t}", gate.addr)).await;
    assert_eq!(refused.status().as_u16(), 429);
    let refused = connect_refused(&format!("ws://{}/?access_token=x.y.z", gate.addr)).await;
    assert_eq!(refused.status().as_u16(), 401);

    let gate = gate_with(&up, &jwks, 1, |raw| raw.jwt_from = "cookie:session".into()).await;
    let _c = with_header(
        &gate,
        "cookie",
        &format!("theme=dark; session={}", token("HS256", claims("c"))),
    )
    .await
    .expect("token from a cookie");
    assert_eq!(
        with_header(
            &gate,
            "cookie",
            &format!("session={}", token("RS256", claims("c")))
        )
        .await
        .err(),
        Some(429)
    );
}

/// A rotated JWKS (the Secret updated in place) applies without a restart:
/// the new key is accepted, the removed one refused.
#[tokio::test]
async fn a_replaced_jwks_file_applies_without_a_restart() {
    let up = spawn_echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(fixtures_dir().join("jwks.json"), &jwks).expect("copy");
    let gate = gate_with(&up, &jwks, 5, |_| {}).await;
    let old = token("RS256", claims("old"));
    let new = token("RS256-rotated", claims("new"));
    let _o = bearer(&gate, &old).await.expect("the first key");
    assert_eq!(
        bearer(&gate, &new).await.err(),
        Some(401),
        "not yet published"
    );

    // Swapped the way a Secret volume does it: a new file renamed over.
    let next = dir.path().join("jwks.json.new");
    std::fs::copy(fixtures_dir().join("jwks-rotated.json"), &next).expect("copy");
    std::fs::rename(&next, &jwks).expect("rename");
    let applied = within("the rotated key set applies", async {
        loop {
            if let Ok(ws) = bearer(&gate, &new).await {
                break ws;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    drop(applied);
    assert_eq!(
        bearer(&gate, &old).await.err(),
        Some(401),
        "the removed key is refused"
    );
}
