//! Reading a JWKS document and checking each of its keys, once, when the
//! file is read: a key wsgate would refuse at every token (a weak RSA
//! modulus, a point off the curve, a short HMAC secret, an `alg` that does
//! not fit its type) is refused here, by place and `kid`.
//!
//! Pure but for [`read_keys`]: config validation runs [`check_jwks`] on the
//! file it names, so a typo fails at start-up, without a verifier.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

/// An HS256 secret shorter than the hash (32 bytes) is refused, as RFC 7518
/// §3.2 requires: a short secret can be brute-forced from one token.
const MIN_HMAC_SECRET_LEN: usize = 32;

/// RSA modulus sizes accepted: below 2048 bits is too weak to trust; 8192
/// is the most the RSA implementation verifies (it would refuse every token
/// of a larger key, which is better said once when the file is read).
const RSA_MODULUS_BITS: RangeInclusive<u64> = 2048..=8192;

/// The largest RSA public exponent the RSA implementation accepts (larger
/// ones make verification a denial-of-service vector).
const RSA_MAX_EXPONENT: u64 = (1 << 33) - 1;

/// Why a JWKS document cannot be used. One line each, naming the key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The `jwt_jwks_file`.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not JSON.
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an object with a `keys` array.
    #[error("not a JWKS document (an object with a \"keys\" array): {0}")]
    NotJwks(serde_json::Error),
    /// No signing key is left once keys for encryption are set aside.
    #[error("no usable key: a signing key (RSA, EC P-256, OKP Ed25519 or oct) is needed")]
    NoUsableKey,
    /// One key is unusable; `index` is its place in `keys`, from 0.
    #[error("keys[{index}]{}: {reason}", kid_note(kid))]
    BadKey {
        /// Its place in the `keys` array, from 0.
        index: usize,
        /// Its `kid`, when it has a string one.
        kid: Option<String>,
        /// What is wrong with it.
        reason: String,
    },
}

/// ` (kid "…")` after a key's place, when it has one.
fn kid_note(kid: &Option<String>) -> String {
    kid.as_deref()
        .map(|kid| format!(" (kid {kid:?})"))
        .unwrap_or_default()
}

/// The algorithms wsgate verifies: one per key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alg {
    Rs256,
    Es256,
    EdDsa,
    Hs256,
}

impl Alg {
    pub(super) const ALL: [Alg; 4] = [Alg::Rs256, Alg::Es256, Alg::EdDsa, Alg::Hs256];

    /// `None` for every algorithm jsonwebtoken knows but wsgate refuses.
    pub(super) fn of(algorithm: Algorithm) -> Option<Alg> {
        match algorithm {
            Algorithm::RS256 => Some(Alg::Rs256),
            Algorithm::ES256 => Some(Alg::Es256),
            Algorithm::EdDSA => Some(Alg::EdDsa),
            Algorithm::HS256 => Some(Alg::Hs256),
            _ => None,
        }
    }

    pub(super) fn algorithm(self) -> Algorithm {
        match self {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
            Alg::EdDsa => Algorithm::EdDSA,
            Alg::Hs256 => Algorithm::HS256,
        }
    }

    /// The JOSE name, as a JWK's `alg` writes it.
    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
        }
    }

    /// Its place in [`Alg::ALL`] and in [`super::Snapshot`]'s `validations`.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// One usable key of the JWKS.
#[derive(Clone)]
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Alg,
    pub(super) decoding: DecodingKey,
}

/// Names the key, never its material.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg.name())
            .finish_non_exhaustive()
    }
}

/// Parses a JWKS document (pure; config validation uses it too): the
/// number of usable keys. Keys marked for encryption (`"use": "enc"`, or
/// `key_ops` without `verify`) are set aside, not counted and not an
/// error: identity providers publish them beside their signing keys.
///
/// # Errors
/// Not JSON, not a JWKS, a bad key (named by place and `kid`), or no
/// usable key.
pub(crate) fn check_jwks(bytes: &[u8]) -> Result<usize, JwksError> {
    parse_jwks(bytes).map(|keys| keys.len())
}

/// Reads and parses the JWKS at `path` (blocking IO).
pub(super) fn read_keys(path: &Path) -> Result<Vec<Key>, JwksError> {
    let bytes = std::fs::read(path).map_err(|source| JwksError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    parse_jwks(&bytes)
}

/// A JWKS document: `{"keys": [...]}`. Each key is parsed on its own, so an
/// error can name the key.
#[derive(Deserialize)]
struct Document {
    keys: Vec<Value>,
}

/// The JWK members wsgate reads (RFC 7517, 7518 §6, 8037); others such as
/// `x5c` are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    k: Option<String>,
}

fn parse_jwks(bytes: &[u8]) -> Result<Vec<Key>, JwksError> {
    let document: Document = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            JwksError::NotJwks(e)
        } else {
            JwksError::NotJson(e)
        }
    })?;
    let mut keys = Vec::with_capacity(document.keys.len());
    for (index, value) in document.keys.into_iter().enumerate() {
        let bad = |reason: String, kid: Option<String>| JwksError::BadKey { index, kid, reason };
        let string_kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
        let jwk = Jwk::deserialize(value).map_err(|e| bad(e.to_string(), string_kid))?;
        match key_of(&jwk) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {}
            Err(reason) => return Err(bad(reason, jwk.kid)),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(keys)
}

/// The key a JWK describes; `None` for a key not meant for signatures.
fn key_of(jwk: &Jwk) -> Result<Option<Key>, String> {
    let for_signatures = jwk.usage.as_deref() != Some("enc")
        && jwk
            .key_ops
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|op| op == "verify"));
    if !for_signatures {
        return Ok(None);
    }
    let curve = |expected: &str| match jwk.crv.as_deref() {
        Some(crv) if crv == expected => Ok(()),
        Some(crv) => Err(format!("curve {crv:?} is not supported ({expected} is)")),
        None => Err("missing \"crv\"".to_owned()),
    };
    let alg = match jwk.kty.as_str() {
        "RSA" => Alg::Rs256,
        "EC" => {
            curve("P-256")?;
            Alg::Es256
        }
        "OKP" => {
            curve("Ed25519")?;
            Alg::EdDsa
        }
        "oct" => Alg::Hs256,
        other => {
            return Err(format!(
                "unsupported kty {other:?} (RSA, EC, OKP and oct are)"
            ))
        }
    };
    if let Some(named) = jwk.alg.as_deref() {
        if named != alg.name() {
            return Err(format!(
                "alg {named:?} is refused: a {} key verifies {} only",
                jwk.kty,
                alg.name()
            ));
        }
    }
    let decoding = match alg {
        Alg::Rs256 => {
            let (n, e) = (member(&jwk.n, "n")?, member(&jwk.e, "e")?);
            check_rsa(n, e)?;
            DecodingKey::from_rsa_components(n, e).map_err(invalid("invalid RSA key"))?
        }
        Alg::Es256 => {
            let (x, y) = (member(&jwk.x, "x")?, member(&jwk.y, "y")?);
            check_coordinate(x, "x")?;
            check_coordinate(y, "y")?;
            DecodingKey::from_ec_components(x, y).map_err(invalid("invalid P-256 key"))?
        }
        Alg::EdDsa => {
            let x = member(&jwk.x, "x")?;
            check_coordinate(x, "x")?;
            DecodingKey::from_ed_components(x).map_err(invalid("invalid Ed25519 key"))?
        }
        Alg::Hs256 => {
            let secret = URL_SAFE_NO_PAD
                .decode(member(&jwk.k, "k")?)
                .map_err(|e| format!("\"k\" is not base64url: {e}"))?;
            if secret.len() < MIN_HMAC_SECRET_LEN {
                return Err(format!(
                    "the HS256 secret has {} bytes; at least {MIN_HMAC_SECRET_LEN} are needed",
                    secret.len()
                ));
            }
            DecodingKey::from_secret(&secret).map_err(invalid("invalid HS256 secret"))?
        }
    };
    if matches!(alg, Alg::Es256 | Alg::EdDsa) {
        // Building a verifier parses the curve point, which the
        // constructors above do not: a bad point is caught here, once, not
        // as a "bad signature" on every token. The signature is empty, so
        // only whether the key parses matters.
        jsonwebtoken::crypto::verify("", b"", &decoding, alg.algorithm())
            .map_err(invalid("not a point on the curve"))?;
    }
    Ok(Some(Key {
        kid: jwk.kid.clone(),
        alg,
        decoding,
    }))
}

/// A JWK member the key type needs.
fn member<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, String> {
    value.as_deref().ok_or_else(|| format!("missing {name:?}"))
}

/// A P-256 coordinate or an Ed25519 public key is 32 bytes. jsonwebtoken
/// does not check: it takes the first 32 bytes of a longer Ed25519 key, and
/// panics on a shorter one when it builds a verifier, which would be at
/// every token.
fn check_coordinate(value: &str, name: &str) -> Result<(), String> {
    match URL_SAFE_NO_PAD.decode(value) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        Ok(bytes) => Err(format!("{name:?} has {} bytes; 32 are needed", bytes.len())),
        Err(e) => Err(format!("{name:?} is not base64url: {e}")),
    }
}

/// Says what a key failed to be, and jsonwebtoken's reason.
fn invalid(what: &'static str) -> impl Fn(jsonwebtoken::errors::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// What the RSA implementation would refuse at every verification, said
/// once at load: a modulus outside [`RSA_MODULUS_BITS`] or even, an
/// exponent that is even, below 3 or above [`RSA_MAX_EXPONENT`].
fn check_rsa(n: &str, e: &str) -> Result<(), String> {
    let decode = |value: &str, name: &str| {
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|err| format!("{name:?} is not base64url: {err}"))
    };
    let (n, e) = (decode(n, "n")?, decode(e, "e")?);
    let n = trim_leading_zeros(&n);
    let bits = match n.first() {
        Some(first) => (n.len() as u64 - 1) * 8 + u64::from(8 - first.leading_zeros()),
        None => 0,
    };
    let odd = |bytes: &[u8]| bytes.last().is_some_and(|b| b & 1 == 1);
    if !RSA_MODULUS_BITS.contains(&bits) || !odd(n) {
        return Err(format!(
            "the modulus has {bits} bits; an odd one of {} to {} bits is needed",
            RSA_MODULUS_BITS.start(),
            RSA_MODULUS_BITS.end()
        ));
    }
    let e = trim_leading_zeros(&e);
    let exponent = (e.len() <= 8).then(|| e.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)));
    match exponent {
        Some(e) if (3..=RSA_MAX_EXPONENT).contains(&e) && e % 2 == 1 => Ok(()),
        _ => Err(format!(
            "the exponent must be odd, from 3 to {RSA_MAX_EXPONENT}"
        )),
    }
}

fn trim_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    use crate::jwt::test_tokens::fixtures_dir;

    #[test]
    fn check_jwks_counts_signing_keys_and_names_a_bad_one() {
        let fixture = std::fs::read(fixtures_dir().join("jwks.json")).expect("read");
        assert_eq!(check_jwks(&fixture).expect("valid"), 4);

        assert!(matches!(
            check_jwks(b"not json"),
            Err(JwksError::NotJson(_))
        ));
        assert!(matches!(check_jwks(b"[1, 2]"), Err(JwksError::NotJwks(_))));
        assert!(matches!(check_jwks(b"{}"), Err(JwksError::NotJwks(_))));
        assert!(matches!(
            check_jwks(br#"{"keys": []}"#),
            Err(JwksError::NoUsableKey)
        ));

        let mut jwks: Value = serde_json::from_slice(&fixture).expect("json");
        let with_extra = |jwks: &Value, extra: Value| {
            let mut jwks = jwks.clone();
            jwks["keys"].as_array_mut().expect("keys").push(extra);
            check_jwks(jwks.to_string().as_bytes())
        };
        let error = with_extra(&jwks, json!({ "kty": "XYZ", "kid": "odd" })).expect_err("kty");
        assert!(
            matches!(error, JwksError::BadKey { index: 4, .. }),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "keys[4] (kid \"odd\"): unsupported kty \"XYZ\" (RSA, EC, OKP and oct are)"
        );

        // A key whose `alg` does not fit its type: the RSA key as HS256.
        let mut confused = jwks["keys"][0].clone();
        confused["alg"] = json!("HS256");
        let error = with_extra(&jwks, confused).expect_err("alg");
        assert!(error.to_string().contains("verifies RS256 only"), "{error}");

        // Keys that cannot be trusted or used, each refused for its reason.
        let refused = |key: Value, reason: &str| {
            let error = with_extra(&jwks, key).expect_err(reason).to_string();
            assert!(
                error.starts_with("keys[4]") && error.contains(reason),
                "{error}"
            );
        };
        let short = json!({ "kty": "oct", "k": URL_SAFE_NO_PAD.encode(b"short") });
        refused(short, "the HS256 secret has 5 bytes");
        let mut p384 = jwks["keys"][1].clone();
        p384["crv"] = json!("P-384");
        refused(p384, "curve \"P-384\" is not supported");
        let mut off_curve = jwks["keys"][1].clone();
        off_curve["y"] = off_curve["x"].clone();
        refused(off_curve, "not a point on the curve");
        let mut short_ed = jwks["keys"][2].clone();
        short_ed["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 31]));
        refused(short_ed, "\"x\" has 31 bytes; 32 are needed");
        let mut long_ed = jwks["keys"][2].clone();
        long_ed["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 33]));
        refused(long_ed, "\"x\" has 33 bytes; 32 are needed");
        let mut long_ec = jwks["keys"][1].clone();
        long_ec["y"] = json!(URL_SAFE_NO_PAD.encode([1u8; 33]));
        refused(long_ec, "\"y\" has 33 bytes; 32 are needed");
        let mut small_rsa = jwks["keys"][0].clone();
        small_rsa["n"] = json!(URL_SAFE_NO_PAD.encode([0xc5u8; 128]));
        refused(small_rsa, "the modulus has 1024 bits");
        let mut even_e = jwks["keys"][0].clone();
        even_e["e"] = json!("AQAA");
        refused(even_e, "the exponent must be odd");
        let mut no_n = jwks["keys"][0].clone();
        no_n.as_object_mut().expect("object").remove("n");
        refused(no_n, "missing \"n\"");
        refused(json!({ "kid": 7 }), "invalid type");

        // An encryption key beside the signing keys is set aside.
        let mut enc = jwks["keys"][0].clone();
        enc["use"] = json!("enc");
        enc["alg"] = json!("RSA-OAEP");
        assert_eq!(with_extra(&jwks, enc.clone()).expect("enc skipped"), 4);
        jwks["keys"] = json!([enc]);
        assert!(matches!(
            check_jwks(jwks.to_string().as_bytes()),
            Err(JwksError::NoUsableKey)
        ));
    }
}
