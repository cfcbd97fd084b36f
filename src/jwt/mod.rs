//! The JWT verifier behind every `jwt_claim:` key rule (docs/operations.md#limits-per-key): a token
//! in, its verified claims out, with the keys read from a JWKS file that is
//! re-read when it changes.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | [`Verifier`]: load, verify, reconfigure, reload; [`Claims`], [`Expect`], [`JwtError`] |
//! | `jwks.rs` | reading a JWKS document and checking each key; [`check_jwks`] for config validation |
//! | `watch.rs` | the task that polls the JWKS file and reloads the keys |
//! | `test_tokens.rs` | (tests only) tokens signed with the fixture keys, shared with `tests/` |
//!
//! It is a top-level part below `config` and `keys`: config validation
//! checks a JWKS file with [`check_jwks`] and `keys` runs the verifier, so
//! this names neither (nor `reload`); of the crate it uses `file_watch` only.
//!
//! Why it is shaped this way:
//! - **Each key verifies one algorithm, fixed by the key.** RS256 for `RSA`,
//!   ES256 for `EC` P-256, EdDSA for `OKP` Ed25519, HS256 for `oct`; a JWK
//!   whose own `alg` says otherwise is refused when the file is read. The
//!   token's `alg` only picks among the keys, it never decides how a key is
//!   used: that is what refuses `alg: none` and the algorithm confusion where
//!   an HS256 token is "signed" with an RSA public key as the HMAC secret.
//! - **Keys are picked by `kid`** when the token names one (an unknown `kid`
//!   is refused, not tried against every key); without a `kid`, every key of
//!   the token's algorithm is tried.
//! - **Claims come out only after the signature and the time, issuer and
//!   audience checks passed**: an unverified claim is never used as a key.
//! - **Keys are swapped whole.** A reload builds a new key set and swaps an
//!   `Arc`; `verify` takes a read lock only long enough to clone that `Arc`,
//!   so verifications never wait for one another or for a reload, and a
//!   verification never sees half a key set. A file that does not parse
//!   keeps the old keys (a half-rotated Secret must not lock everyone out).
//! - **The file is polled, not watched** (as the configuration file is, see
//!   `reload` and `file_watch`): a Kubernetes Secret is updated by swapping a
//!   symlink.
//!
//! The checking itself (signatures, `exp`/`nbf`/`iss`/`aud`, the `crit`
//! header) is jsonwebtoken's; this module chooses the keys and the rules.

mod jwks;
#[cfg(test)]
#[allow(
    dead_code,
    unreachable_pub,
    reason = "shared with tests/; not all of it is used here"
)]
mod test_tokens;
mod watch;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::file_watch::FileVersion;

pub(crate) use self::jwks::{check_jwks, JwksError};
use self::jwks::{read_keys, Alg, Key};
pub(crate) use self::watch::watch;

/// Clock skew allowed on `exp` and `nbf`, in seconds. Pods keep NTP time,
/// but an identity provider's clock may not agree to the second, and a token
/// minted "now" there must not be refused here as not yet valid. 30 s covers
/// that skew while keeping an expired token usable for at most half a minute
/// longer (jsonwebtoken's default, 60 s, is twice that for no gain: a token
/// is checked once, at the upgrade).
const LEEWAY_SECS: u64 = 30;

/// Longer tokens are refused before any decoding: real ones are well under
/// a kilobyte, and 8 KiB is the header line most proxies accept anyway. It
/// bounds the base64 and JSON work an unauthenticated client can ask for.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Expectations besides the signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Expect {
    /// `jwt_issuer`: when set, a token's `iss` must be present and equal.
    pub(crate) issuer: Option<String>,
    /// `jwt_audience`: when set, a token's `aud` must be present and be (or
    /// contain) it. When unset, `aud` is not looked at.
    pub(crate) audience: Option<String>,
    /// `jwt_require_exp`: a token without `exp` is refused.
    pub(crate) require_exp: bool,
}

/// Why a token was refused. Messages are short and never include the token
/// (they are logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtError {
    /// Not three base64url parts of JSON, too long, or a claim of the wrong
    /// type (`exp` as a string).
    #[error("malformed token")]
    Malformed,
    /// `exp` is past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// No `exp`, and `jwt_require_exp` is on.
    #[error("token has no exp")]
    NoExpiry,
    /// `nbf` is ahead, beyond the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is missing or not `jwt_issuer`.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` is missing or does not hold `jwt_audience`.
    #[error("wrong audience")]
    Audience,
    /// No key of the token's `kid` and algorithm verifies its signature.
    #[error("bad signature")]
    Signature,
    /// The token names a `kid` the key set does not have.
    #[error("unknown key id")]
    UnknownKid,
    /// `alg` is `none`, not one of RS256, ES256, EdDSA and HS256, or not
    /// the algorithm of the key the token names.
    #[error("algorithm refused")]
    AlgorithmRefused,
}

/// A key claim that is neither a string nor an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the key claim is neither a string nor an integer")]
pub(crate) struct ClaimTypeError;

/// The verified claims of a token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claims(Map<String, Value>);

impl Claims {
    /// The key value of claim `name`: a string as is, an integer as its
    /// decimal text (so `7` and `"7"` are one key); `None` when the claim
    /// is absent (an empty string is then judged missing by the caller).
    ///
    /// # Errors
    /// Any other type (null, a bool, a fraction, an object, an array): the
    /// issuer meant something else than a key by it, and writing it out
    /// would make up one (`true`, `1.0`).
    pub(crate) fn key(&self, name: &str) -> Result<Option<String>, ClaimTypeError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
            Some(_) => Err(ClaimTypeError),
        }
    }
}

/// Everything one verification reads, swapped whole: the keys, and the
/// rules built from the expectations (one per algorithm, built once here
/// rather than per token).
#[derive(Clone)]
struct Snapshot {
    path: PathBuf,
    expect: Expect,
    keys: Arc<[Key]>,
    validations: [Validation; 4],
}

/// The one verifier for every `jwt_claim` rule. Cheap to call from many
/// tasks at once; reloads and reconfigurations swap its state whole.
pub(crate) struct Verifier {
    /// What `verify` reads. The lock is held only to clone or swap the `Arc`.
    current: RwLock<Arc<Snapshot>>,
    /// The file version the keys were read from (`None` when unknown), for
    /// the watch to see a change; the lock also makes reloads and
    /// reconfigurations take turns.
    applied: Mutex<Option<FileVersion>>,
    /// Wakes the watch when `reconfigure` names a new file, to read it at
    /// once rather than after two polls.
    path_changed: Notify,
}

/// The path, the expectations and the keys (`kid` and algorithm): no key
/// material.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("Verifier")
            .field("path", &snapshot.path)
            .field("expect", &snapshot.expect)
            .field("keys", &snapshot.keys)
            .finish()
    }
}

impl Verifier {
    /// Reads and parses the JWKS at `path`.
    ///
    /// # Errors
    /// The file is unreadable, not JSON, not a JWKS, has a bad key or no
    /// usable key; the message says which in one line.
    pub(crate) fn load(path: &Path, expect: Expect) -> Result<Verifier, JwksError> {
        // The version before the read: if the file changes during it, the
        // watch sees a newer version and reads it again.
        let version = FileVersion::of(path);
        let keys = read_keys(path)?;
        Ok(Verifier {
            current: RwLock::new(Arc::new(Snapshot {
                path: path.to_owned(),
                validations: validations(&expect),
                expect,
                keys: keys.into(),
            })),
            applied: Mutex::new(version),
            path_changed: Notify::new(),
        })
    }

    /// Verifies `token` now: the claims, once the signature, `exp`, `nbf`,
    /// `iss` and `aud` have passed. `exp` is required unless
    /// `jwt_require_exp = false`; `nbf` is checked when present.
    ///
    /// # Errors
    /// Why the token is refused (see [`JwtError`]).
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_refusal(token))?;
        let alg = Alg::of(header.alg).ok_or(JwtError::AlgorithmRefused)?;
        let snapshot = self.snapshot();
        let validation = &snapshot.validations[alg.index()];
        let (mut kid_known, mut tried) = (false, false);
        for key in snapshot.keys.iter() {
            if let Some(kid) = &header.kid {
                if key.kid.as_ref() != Some(kid) {
                    continue;
                }
                kid_known = true;
            }
            if key.alg != alg {
                continue;
            }
            tried = true;
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation) {
                Ok(data) => return Ok(Claims(data.claims)),
                // Without a `kid` (or with one shared by several keys) the
                // next key of this algorithm may be the signer.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(if tried {
            JwtError::Signature
        } else if header.kid.is_some() && !kid_known {
            JwtError::UnknownKid
        } else {
            JwtError::AlgorithmRefused
        })
    }

    /// Applies a reloaded configuration (path and expectations) in place.
    /// New expectations apply to the next token. A new path is read by
    /// [`watch()`] at once, on the blocking pool (this runs on a runtime
    /// thread and does no IO); until then the keys already read stay.
    /// Without a watch running, call [`Verifier::reload_keys`].
    pub(crate) fn reconfigure(&self, path: &Path, expect: Expect) {
        let mut applied = self.lock_applied();
        let current = self.snapshot();
        let path_changed = current.path != path;
        if !path_changed && current.expect == expect {
            return;
        }
        self.install(Snapshot {
            path: path.to_owned(),
            validations: validations(&expect),
            expect,
            keys: Arc::clone(&current.keys),
        });
        if path_changed {
            // Unknown: whatever version the new file has is a change.
            *applied = None;
            self.path_changed.notify_one();
        }
    }

    /// Re-reads the JWKS file (blocking IO: call it off the runtime). On a
    /// bad file the old keys stay. The version read is remembered either way,
    /// so the watch reports a bad file once, not at every poll.
    ///
    /// # Errors
    /// Why the file cannot be used; the keys are unchanged.
    pub(crate) fn reload_keys(&self) -> Result<usize, JwksError> {
        loop {
            let path = self.snapshot().path.clone();
            let version = FileVersion::of(&path);
            let read = read_keys(&path);
            let mut applied = self.lock_applied();
            let current = self.snapshot();
            if current.path != path {
                // Reconfigured to another file during the read: read that.
                continue;
            }
            *applied = version;
            let keys = read?;
            let count = keys.len();
            self.install(Snapshot {
                keys: keys.into(),
                ..Snapshot::clone(&current)
            });
            return Ok(count);
        }
    }

    /// The state now; the lock is held only for the clone.
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Swaps in a new state (the caller holds `applied`, so writers take
    /// turns and none undoes another).
    fn install(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    fn lock_applied(&self) -> MutexGuard<'_, Option<FileVersion>> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The version of the configured file now (a `stat`: blocking).
    fn version_now(&self) -> Option<FileVersion> {
        FileVersion::of(&self.snapshot().path)
    }
}

/// The rules for tokens of each algorithm, from the expectations.
fn validations(expect: &Expect) -> [Validation; 4] {
    Alg::ALL.map(|alg| {
        let mut v = Validation::new(alg.algorithm());
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        // Only what the configuration asks for is required: `exp` with
        // `jwt_require_exp`, a configured issuer or audience.
        v.required_spec_claims.clear();
        if expect.require_exp {
            v.required_spec_claims.insert("exp".to_owned());
        }
        if let Some(issuer) = &expect.issuer {
            v.set_issuer(&[issuer]);
            v.required_spec_claims.insert("iss".to_owned());
        }
        match &expect.audience {
            Some(audience) => {
                v.set_audience(&[audience]);
                v.required_spec_claims.insert("aud".to_owned());
            }
            // jsonwebtoken refuses any token with an `aud` when none is
            // expected; docs/operations.md#limits-per-key checks the audience only when one is set.
            None => v.validate_aud = false,
        }
        v
    })
}

/// The refusal for a jsonwebtoken error. Key errors cannot happen with keys
/// checked at load; should one, the token is simply not verified.
fn refusal(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::Signature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::Issuer,
        ErrorKind::InvalidAudience => JwtError::Audience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => JwtError::NoExpiry,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim)
            if claim == "iss" =>
        {
            JwtError::Issuer
        }
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim)
            if claim == "aud" =>
        {
            JwtError::Audience
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => JwtError::AlgorithmRefused,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::MissingRequiredClaim(_) => JwtError::Malformed,
        _ => JwtError::Signature,
    }
}

/// Why a header did not parse: an `alg` jsonwebtoken does not know at all
/// (`none` above all) is refused as an algorithm, anything else is
/// malformed. Runs only for refused tokens.
fn header_refusal(token: &str) -> JwtError {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let Some((header, _)) = token.split_once('.') else {
        return JwtError::Malformed;
    };
    let Ok(json) = URL_SAFE_NO_PAD.decode(header) else {
        return JwtError::Malformed;
    };
    match serde_json::from_slice::<AlgOnly>(&json) {
        Ok(h) if h.alg.parse::<Algorithm>().is_err() => JwtError::AlgorithmRefused,
        _ => JwtError::Malformed,
    }
}

// The tokens the tests verify are minted by `test_tokens`, which the
// integration tests include too, so both mint them one way.
#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    use super::test_tokens::{fixtures_dir, hs256_token, token, token_without_kid, unix_now};

    const ALGS: [&str; 4] = ["RS256", "ES256", "EdDSA", "HS256"];

    pub(super) fn verifier(expect: Expect) -> Verifier {
        Verifier::load(&fixtures_dir().join("jwks.json"), expect).expect("the fixture JWKS loads")
    }

    pub(super) fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": unix_now() + 600 })
    }

    /// A copy of a fixture JWKS in a temporary folder, to replace.
    pub(super) fn jwks_copy(fixture: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        std::fs::copy(fixtures_dir().join(fixture), &path).expect("copy");
        (dir, path)
    }

    /// Replaces `path` whole, as a Secret update does.
    pub(super) fn replace(path: &Path, bytes: &[u8]) {
        let next = path.with_extension("next");
        std::fs::write(&next, bytes).expect("write");
        std::fs::rename(&next, path).expect("rename");
    }

    #[test]
    fn every_algorithm_verifies_and_yields_the_subject() {
        let v = verifier(Expect::default());
        for alg in ALGS {
            let verified = v.verify(&token(alg, claims(alg)));
            assert_eq!(
                verified.map(|c| c.key("sub").ok().flatten()),
                Ok(Some(alg.to_owned())),
                "{alg}"
            );
        }
    }

    #[test]
    fn a_token_without_kid_is_tried_against_the_keys_of_its_algorithm() {
        let v = verifier(Expect::default());
        for alg in ALGS {
            let verified = v.verify(&token_without_kid(alg, claims("no-kid")));
            assert_eq!(
                verified.map(|c| c.key("sub").ok().flatten()),
                Ok(Some("no-kid".into())),
                "{alg}"
            );
        }
    }

    #[test]
    fn expired_is_refused_past_the_leeway_only() {
        let v = verifier(Expect::default());
        let now = unix_now();
        let expired = token("ES256", json!({ "sub": "a", "exp": now - 3600 }));
        assert_eq!(v.verify(&expired), Err(JwtError::Expired));
        let within_leeway = token("ES256", json!({ "sub": "a", "exp": now - LEEWAY_SECS / 3 }));
        assert!(v.verify(&within_leeway).is_ok());
    }

    #[test]
    fn not_yet_valid_is_refused_past_the_leeway_only() {
        let v = verifier(Expect::default());
        let now = unix_now();
        let early = token("RS256", json!({ "sub": "a", "nbf": now + 600 }));
        assert_eq!(v.verify(&early), Err(JwtError::NotYetValid));
        let skewed = token("RS256", json!({ "sub": "a", "nbf": now + LEEWAY_SECS / 3 }));
        assert!(v.verify(&skewed).is_ok());
    }

    #[test]
    fn exp_is_required_unless_configured_off_and_must_be_a_number() {
        let without_exp = token("EdDSA", json!({ "sub": "a" }));
        let required = verifier(Expect {
            require_exp: true,
            ..Expect::default()
        });
        assert_eq!(required.verify(&without_exp), Err(JwtError::NoExpiry));
        let with_exp = token("EdDSA", json!({ "sub": "a", "exp": unix_now() + 60 }));
        assert!(required.verify(&with_exp).is_ok());
        let v = verifier(Expect::default());
        assert!(v.verify(&without_exp).is_ok());
        let string_exp = token("EdDSA", json!({ "sub": "a", "exp": "never" }));
        assert_eq!(v.verify(&string_exp), Err(JwtError::Malformed));
    }

    #[test]
    fn issuer_is_checked_when_set() {
        let expect = Expect {
            issuer: Some("https://idp.example".into()),
            ..Expect::default()
        };
        let v = verifier(expect);
        let with = |iss: Value| token("HS256", json!({ "sub": "a", "iss": iss }));
        assert!(v.verify(&with(json!("https://idp.example"))).is_ok());
        assert_eq!(
            v.verify(&with(json!("https://evil.example"))),
            Err(JwtError::Issuer)
        );
        assert_eq!(v.verify(&with(json!(42))), Err(JwtError::Issuer));
        let without = token("HS256", json!({ "sub": "a" }));
        assert_eq!(v.verify(&without), Err(JwtError::Issuer));
    }

    #[test]
    fn audience_is_checked_when_set_and_ignored_otherwise() {
        let expect = Expect {
            audience: Some("wsgate".into()),
            ..Expect::default()
        };
        let v = verifier(expect);
        let with = |aud: Value| token("RS256", json!({ "sub": "a", "aud": aud }));
        assert!(v.verify(&with(json!("wsgate"))).is_ok());
        assert!(v.verify(&with(json!(["other", "wsgate"]))).is_ok());
        assert_eq!(v.verify(&with(json!("other"))), Err(JwtError::Audience));
        assert_eq!(
            v.verify(&token("RS256", json!({ "sub": "a" }))),
            Err(JwtError::Audience)
        );

        let unset = verifier(Expect::default());
        assert!(unset.verify(&with(json!("anyone"))).is_ok());
    }

    #[test]
    fn a_tampered_payload_fails_the_signature() {
        let v = verifier(Expect::default());
        for alg in ALGS {
            let genuine = token(alg, claims("alice"));
            let forged_payload = URL_SAFE_NO_PAD.encode(json!({ "sub": "admin" }).to_string());
            let parts: Vec<&str> = genuine.split('.').collect();
            let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
            assert_eq!(v.verify(&forged), Err(JwtError::Signature), "{alg}");
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let v = verifier(Expect::default());
        let part = |j: Value| URL_SAFE_NO_PAD.encode(j.to_string());
        let payload = part(claims("admin"));
        for header in [
            json!({ "alg": "none" }),
            json!({ "alg": "none", "kid": "rsa-1" }),
        ] {
            let unsigned = format!("{}.{payload}.", part(header));
            assert_eq!(v.verify(&unsigned), Err(JwtError::AlgorithmRefused));
        }
    }

    #[test]
    fn algorithms_other_than_the_four_are_refused() {
        let v = verifier(Expect::default());
        let part = |j: Value| URL_SAFE_NO_PAD.encode(j.to_string());
        let payload = part(claims("a"));
        for alg in ["RS384", "PS256", "HS512", "ES384"] {
            let t = format!("{}.{payload}.c2ln", part(json!({ "alg": alg })));
            assert_eq!(v.verify(&t), Err(JwtError::AlgorithmRefused), "{alg}");
        }
    }

    /// The classic confusion: an HS256 token whose HMAC secret is the RSA
    /// public key, which an attacker can read. The RSA key verifies RS256
    /// only, so the token's `alg` cannot make it an HMAC secret.
    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        let public_pem = std::fs::read(fixtures_dir().join("rsa.pub.pem")).expect("pem");
        let v = verifier(Expect::default());
        let naming_rsa = hs256_token(&public_pem, Some("rsa-1"), claims("admin"));
        assert_eq!(v.verify(&naming_rsa), Err(JwtError::AlgorithmRefused));
        // Without a kid it is tried against the HS256 key only, whose secret
        // it was not signed with.
        let no_kid = hs256_token(&public_pem, None, claims("admin"));
        assert_eq!(v.verify(&no_kid), Err(JwtError::Signature));

        // A key set of the RSA key alone has nothing to check HS256 with.
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(fixtures_dir().join("jwks.json")).expect("jwks"))
                .expect("json");
        let rsa_only = json!({ "keys": [jwks["keys"][0]] });
        let (_dir, path) = jwks_copy("jwks.json");
        replace(&path, rsa_only.to_string().as_bytes());
        let v = Verifier::load(&path, Expect::default()).expect("rsa only");
        assert_eq!(v.verify(&no_kid), Err(JwtError::AlgorithmRefused));
        assert_eq!(v.verify(&naming_rsa), Err(JwtError::AlgorithmRefused));
    }

    #[test]
    fn a_kid_of_another_algorithm_is_refused() {
        let v = verifier(Expect::default());
        // An ES256 token naming the Ed25519 key.
        let part = |j: Value| URL_SAFE_NO_PAD.encode(j.to_string());
        let genuine = token("ES256", claims("a"));
        let signature = genuine.rsplit('.').next().expect("three parts");
        let t = format!(
            "{}.{}.{signature}",
            part(json!({ "alg": "ES256", "kid": "ed-1" })),
            part(claims("a"))
        );
        assert_eq!(v.verify(&t), Err(JwtError::AlgorithmRefused));
    }

    #[test]
    fn an_unknown_kid_is_refused() {
        let v = verifier(Expect::default());
        let rotated = token("RS256-rotated", claims("a"));
        assert_eq!(v.verify(&rotated), Err(JwtError::UnknownKid));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let v = verifier(Expect::default());
        let too_long = format!("{}.e30.c2ln", "e".repeat(MAX_TOKEN_LEN));
        for t in [
            "",
            "abc",
            "a.b.c",
            "e30.e30.",
            "!!.??.##",
            too_long.as_str(),
        ] {
            assert_eq!(v.verify(t), Err(JwtError::Malformed), "{t:.20}");
        }
        // A signed payload that is not an object.
        let array = token("HS256", json!(["sub", "a"]));
        assert_eq!(v.verify(&array), Err(JwtError::Malformed));
    }

    #[test]
    fn a_replaced_jwks_is_applied_by_reload_keys() {
        let (_dir, path) = jwks_copy("jwks.json");
        let v = Verifier::load(&path, Expect::default()).expect("load");
        let (old, new) = (
            token("RS256", claims("old")),
            token("RS256-rotated", claims("new")),
        );
        assert!(v.verify(&old).is_ok());
        assert_eq!(v.verify(&new), Err(JwtError::UnknownKid));

        let rotated = std::fs::read(fixtures_dir().join("jwks-rotated.json")).expect("read");
        replace(&path, &rotated);
        assert_eq!(v.reload_keys().expect("the rotated JWKS is valid"), 4);
        assert_eq!(
            v.verify(&new).map(|c| c.key("sub").ok().flatten()),
            Ok(Some("new".into()))
        );
        assert_eq!(v.verify(&old), Err(JwtError::UnknownKid));
    }

    #[test]
    fn a_corrupt_replacement_keeps_the_old_keys() {
        let (_dir, path) = jwks_copy("jwks.json");
        let v = Verifier::load(&path, Expect::default()).expect("load");
        let t = token("EdDSA", claims("a"));
        for corrupt in [&b"{\"keys\": [{\"kty\""[..], b"", b"{\"keys\": []}"] {
            replace(&path, corrupt);
            assert!(v.reload_keys().is_err());
            assert!(v.verify(&t).is_ok(), "the old keys stay");
        }
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(v.reload_keys(), Err(JwksError::Unreadable { .. })));
        assert!(v.verify(&t).is_ok(), "the old keys stay");
    }

    #[test]
    fn reconfigure_applies_expectations_at_once_and_a_new_path_on_reload() {
        let v = verifier(Expect::default());
        let t = token("ES256", json!({ "sub": "a", "iss": "one" }));
        assert!(v.verify(&t).is_ok());
        let expect_two = Expect {
            issuer: Some("two".into()),
            ..Expect::default()
        };
        v.reconfigure(&fixtures_dir().join("jwks.json"), expect_two.clone());
        assert_eq!(v.verify(&t), Err(JwtError::Issuer));

        let rotated = token("RS256-rotated", json!({ "sub": "a", "iss": "two" }));
        v.reconfigure(&fixtures_dir().join("jwks-rotated.json"), expect_two);
        assert_eq!(v.verify(&rotated), Err(JwtError::UnknownKid), "no IO yet");
        v.reload_keys().expect("reload");
        assert!(v.verify(&rotated).is_ok());
    }

    #[test]
    fn load_errors_say_why() {
        let missing = fixtures_dir().join("no-such.json");
        let error = Verifier::load(&missing, Expect::default()).expect_err("missing");
        assert!(error.to_string().starts_with("cannot read "), "{error}");
        assert!(error.to_string().contains("no-such.json"), "{error}");
    }

    #[test]
    fn claim_keys_are_strings_and_integers_only() {
        let c = Claims(
            json!({
                "s": "tenant-1", "i": 42, "neg": -7, "b": true, "f": 1.5,
                "nil": null, "o": {}, "a": ["x"]
            })
            .as_object()
            .cloned()
            .expect("object"),
        );
        assert_eq!(c.key("s"), Ok(Some("tenant-1".into())));
        assert_eq!(c.key("i"), Ok(Some("42".into())));
        assert_eq!(c.key("neg"), Ok(Some("-7".into())));
        assert_eq!(c.key("absent"), Ok(None));
        for other in ["b", "f", "nil", "o", "a"] {
            assert_eq!(c.key(other), Err(ClaimTypeError), "{other}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let v = verifier(Expect::default());
        let shown = format!("{v:?}");
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(fixtures_dir().join("jwks.json")).expect("jwks"))
                .expect("json");
        assert!(
            shown.contains("rsa-1") && shown.contains("EdDSA"),
            "{shown}"
        );
        for key in jwks["keys"].as_array().expect("keys") {
            for member in ["n", "x", "y", "k"] {
                if let Some(material) = key[member].as_str() {
                    assert!(!shown.contains(&material[..16]), "{member} shown: {shown}");
                }
            }
        }
        let secret = std::fs::read_to_string(fixtures_dir().join("hs256.secret")).expect("secret");
        assert!(!shown.contains(&secret[..16]));
    }
}
