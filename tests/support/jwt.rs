//! Test tokens: JWTs signed with the test-only keys in `tests/fixtures/jwt`
//! (README there), so tests of `jwt_claim:` rules send real signed tokens.
//!
//! Self-contained (jsonwebtoken, serde_json and std only): `src/keys/jwt.rs`
//! includes this file in its unit tests too, so both mint tokens one way.
//!
//! `jwks.json` there holds the public side of every key below except
//! `RS256-rotated`; `jwks-rotated.json` holds the same keys with the first
//! RSA key swapped for the rotated one.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// The folder of the test-only keys and JWKS documents.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

/// A token over `claims` signed with the fixture key for `alg`, whose `kid`
/// it names: `"RS256"`, `"ES256"`, `"EdDSA"`, `"HS256"` (the keys of
/// `jwks.json`) or `"RS256-rotated"` (the new RSA key of `jwks-rotated.json`).
pub fn token(alg: &str, claims: Value) -> String {
    let (_, kid) = fixture(alg);
    mint(alg, Some(kid), &claims)
}

/// Like [`token`], without a `kid` header: the verifier must pick the key by
/// its type.
#[allow(
    dead_code,
    reason = "used by src/keys/jwt.rs's unit tests, which include this file; not by tests/it"
)]
pub fn token_without_kid(alg: &str, claims: Value) -> String {
    mint(alg, None, &claims)
}

/// An HS256 token over `claims` with any `secret` and `kid`: forgeries,
/// e.g. a token "signed" with an RSA public key used as the HMAC secret.
pub fn hs256_token(secret: &[u8], kid: Option<&str>, claims: Value) -> String {
    let key = EncodingKey::from_secret(secret).expect("a non-empty HMAC secret");
    sign(Algorithm::HS256, kid, &claims, &key)
}

/// Seconds since the Unix epoch, for `exp` and `nbf`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// The key file and `kid` of a fixture algorithm name.
fn fixture(alg: &str) -> (&'static str, &'static str) {
    match alg {
        "RS256" => ("rsa.pem", "rsa-1"),
        "RS256-rotated" => ("rsa-rotated.pem", "rsa-2"),
        "ES256" => ("ec.pem", "ec-1"),
        "EdDSA" => ("ed25519.pem", "ed-1"),
        "HS256" => ("hs256.secret", "hs-1"),
        other => panic!("no fixture key for {other:?}"),
    }
}

fn mint(alg: &str, kid: Option<&str>, claims: &Value) -> String {
    let (file, _) = fixture(alg);
    let path = fixtures_dir().join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (algorithm, key) = match alg {
        "RS256" | "RS256-rotated" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&bytes)),
        "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(&bytes)),
        "EdDSA" => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&bytes)),
        _ => (Algorithm::HS256, EncodingKey::from_secret(&bytes)),
    };
    let key = key.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sign(algorithm, kid, claims, &key)
}

fn sign(algorithm: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("signing a test token")
}
