//! The configuration of limits per key (docs/operations.md#limits-per-key): the `[[key_limits]]`
//! rules, the JWT verifier's keys (`jwt_*`) and their checks.
//!
//! Rules are written as TOML tables; each field is read as it was written
//! ([`RawKeyRule`]) and checked here into a [`KeyRule`], so an error names
//! the rule and the field (`key_limits[tenant].max_per_key = 0: expected …`)
//! and exits 2 like every other key. What a rule *does* lives in
//! `crate::keys`; this file only says what is acceptable.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use http::HeaderName;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::ConfigError;

/// The longest key value wsgate tracks (docs/operations.md#limits-per-key); longer ones are refused.
pub const MAX_KEY_LEN: usize = 256;
/// `max_keys` when a rule does not say.
const DEFAULT_MAX_KEYS: i64 = 100_000;

/// One `[[key_limits]]` table as written. Every field is optional here so
/// that a missing one is reported like a bad one: naming the rule and field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawKeyRule {
    /// `[a-z0-9_]{1,32}`, unique; the `rule` label.
    pub name: Option<String>,
    /// Where the key comes from: `header:NAME`, `query:PARAM`,
    /// `cookie:NAME`, `path_segment:N`, `jwt_claim:CLAIM`.
    pub key: Option<String>,
    /// Concurrent connections per distinct key value (≥ 1).
    pub max_per_key: Option<i64>,
    /// The rule applies to upgrades whose path starts with this.
    pub path_prefix: Option<String>,
    /// `shared`, `allow` or `reject`.
    pub missing: Option<String>,
    /// `429` or `503`.
    pub status: Option<i64>,
    /// Distinct values tracked at once.
    pub max_keys: Option<i64>,
    /// Count fleet-wide (docs/operations.md#fleet-wide-limits).
    pub fleet: Option<bool>,
    /// Key value → limit for that value (`0` = unlimited).
    pub overrides: BTreeMap<String, i64>,
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRule {
    /// The `rule` label.
    pub name: String,
    /// Where the key comes from.
    #[serde(serialize_with = "written")]
    pub key: KeySource,
    /// Concurrent connections per key value.
    pub max_per_key: u32,
    /// Applies to paths starting with this.
    pub path_prefix: String,
    /// What a request without the key gets.
    #[serde(serialize_with = "written")]
    pub missing: MissingKey,
    /// 429 or 503 when over the limit.
    pub status: u16,
    /// Distinct values tracked at once.
    pub max_keys: usize,
    /// Counted fleet-wide.
    pub fleet: bool,
    /// Per-value limits (0 = unlimited). Last: TOML writes tables after values.
    pub overrides: BTreeMap<String, u32>,
}

impl KeyRule {
    /// The limit for `value`: its override, else `max_per_key`; 0 = unlimited.
    pub fn limit_for(&self, value: &str) -> u32 {
        self.overrides
            .get(value)
            .copied()
            .unwrap_or(self.max_per_key)
    }
}

/// Where a rule's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A request header (one value; several are refused as ambiguous).
    Header(HeaderName),
    /// A query parameter, percent-decoded.
    Query(String),
    /// A cookie.
    Cookie(String),
    /// The N-th path segment (1-based), percent-decoded.
    PathSegment(usize),
    /// A claim of the verified JWT.
    JwtClaim(String),
}

impl KeySource {
    /// What `key` accepts.
    const EXPECTED: &'static str =
        "header:NAME, query:PARAM, cookie:NAME, path_segment:N (N >= 1) or jwt_claim:CLAIM";

    fn parse(text: &str) -> Option<Self> {
        let (kind, arg) = text.split_once(':')?;
        if arg.is_empty() {
            return None;
        }
        Some(match kind {
            "header" => KeySource::Header(HeaderName::try_from(arg).ok()?),
            "query" => KeySource::Query(arg.to_owned()),
            "cookie" if arg.bytes().all(is_token_byte) => KeySource::Cookie(arg.to_owned()),
            "path_segment" => KeySource::PathSegment(arg.parse().ok().filter(|n| *n >= 1)?),
            "jwt_claim" => KeySource::JwtClaim(arg.to_owned()),
            _ => return None,
        })
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header:{h}"),
            KeySource::Query(p) => write!(f, "query:{p}"),
            KeySource::Cookie(c) => write!(f, "cookie:{c}"),
            KeySource::PathSegment(n) => write!(f, "path_segment:{n}"),
            KeySource::JwtClaim(c) => write!(f, "jwt_claim:{c}"),
        }
    }
}

/// What a request without the rule's key gets (docs/operations.md#limits-per-key `missing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// All such requests share one bucket, keyed by the empty string.
    Shared,
    /// The rule does not apply.
    Allow,
    /// 400 `key_missing` (401 for a `jwt_claim` rule).
    Reject,
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MissingKey::Shared => "shared",
            MissingKey::Allow => "allow",
            MissingKey::Reject => "reject",
        })
    }
}

/// The JWT verifier's settings, one for every `jwt_claim` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtSettings {
    /// The JWKS document (re-read when it changes).
    #[serde(rename = "jwt_jwks_file")]
    pub jwks_file: PathBuf,
    /// Required `iss`, when set.
    #[serde(rename = "jwt_issuer", skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` member, when set.
    #[serde(rename = "jwt_audience", skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// Where the JWT comes from (`jwt_from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A header; `Bearer ` is stripped when present (`header:Authorization`).
    Header(HeaderName),
    /// A query parameter (browsers cannot set headers on a WebSocket).
    Query(String),
    /// A cookie.
    Cookie(String),
    /// The offered subprotocol entry that starts with this prefix
    /// (`jwt_subprotocol_prefix`); the rest of the entry is the token.
    Subprotocol(String),
}

impl TokenSource {
    const EXPECTED: &'static str = "header:NAME (header:Authorization takes a Bearer token), \
         query:PARAM, cookie:NAME or subprotocol (an offered Sec-WebSocket-Protocol entry that \
         starts with jwt_subprotocol_prefix)";

    fn parse(text: &str) -> Option<Self> {
        match KeySource::parse(text)? {
            KeySource::Header(h) => Some(TokenSource::Header(h)),
            KeySource::Query(p) => Some(TokenSource::Query(p)),
            KeySource::Cookie(c) => Some(TokenSource::Cookie(c)),
            KeySource::PathSegment(_) | KeySource::JwtClaim(_) => None,
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Header(h) => write!(f, "header:{h}"),
            TokenSource::Query(p) => write!(f, "query:{p}"),
            TokenSource::Cookie(c) => write!(f, "cookie:{c}"),
            TokenSource::Subprotocol(_) => f.write_str("subprotocol"),
        }
    }
}

/// `jwt_from`: where the token is read from; `prefix` is
/// `jwt_subprotocol_prefix`, used by `subprotocol`.
pub(super) fn token_source(from: &str, prefix: String) -> Result<TokenSource, ConfigError> {
    if from == "subprotocol" {
        return Ok(TokenSource::Subprotocol(prefix));
    }
    TokenSource::parse(from)
        .ok_or_else(|| ConfigError::invalid("jwt_from", format!("{from:?}"), TokenSource::EXPECTED))
}

/// `check-config` prints `jwt_from` and `jwt_subprotocol_prefix` (the
/// prefix only means something with `jwt_from = "subprotocol"`, and is
/// shown at its default otherwise).
pub(super) fn written_source<S: Serializer>(from: &TokenSource, s: S) -> Result<S::Ok, S::Error> {
    let prefix = match from {
        TokenSource::Subprotocol(p) => p.as_str(),
        _ => DEFAULT_SUBPROTOCOL_PREFIX,
    };
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("jwt_from", &from.to_string())?;
    map.serialize_entry("jwt_subprotocol_prefix", prefix)?;
    map.end()
}

/// `jwt_subprotocol_prefix` by default: the form Kubernetes' API server
/// reads a bearer token from (`base64url.bearer.authorization.k8s.io.<token>`).
pub(super) const DEFAULT_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// Serialises a value in its written form.
pub(super) fn written<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// RFC 7230 `tchar`: what a cookie name may hold.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `value` can be a key: at most [`MAX_KEY_LEN`] bytes of visible
/// ASCII (docs/operations.md#limits-per-key). Anything else could not be told apart safely in logs
/// and the `/keys` answer.
pub fn is_usable_key(value: &str) -> bool {
    value.len() <= MAX_KEY_LEN && value.bytes().all(|b| b.is_ascii_graphic())
}

/// Names the field of the `index`-th rule in errors: by its name once that
/// is known to be good, else by position (1-based).
struct Field<'a> {
    rule: &'a str,
}

impl Field<'_> {
    fn err(&self, field: &str, value: String, expected: impl Into<String>) -> ConfigError {
        ConfigError::invalid(
            &format!("key_limits[{}].{field}", self.rule),
            value,
            expected,
        )
    }
}

/// Checks every rule, in order. `jwt` is the verifier's settings, if any;
/// `fleet_on` says whether `fleet_redis_url` is set (`fleet = true` needs it).
pub(super) fn rules(
    raw: &[RawKeyRule],
    jwt: Option<&JwtSettings>,
    fleet_on: bool,
) -> Result<Vec<KeyRule>, ConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let position = format!("#{}", i + 1);
        let at = Field { rule: &position };
        let name = r
            .name
            .clone()
            .ok_or_else(|| at.err("name", "(not set)".into(), NAME_EXPECTED))?;
        if !is_rule_name(&name) {
            return Err(at.err("name", format!("{name:?}"), NAME_EXPECTED));
        }
        if !seen.insert(name.clone()) {
            return Err(at.err(
                "name",
                format!("{name:?}"),
                "a name no other rule has (it is the rule label in metrics)",
            ));
        }
        let at = Field { rule: &name };
        let key_text = r
            .key
            .as_deref()
            .ok_or_else(|| at.err("key", "(not set)".into(), KeySource::EXPECTED))?;
        let key = KeySource::parse(key_text)
            .ok_or_else(|| at.err("key", format!("{key_text:?}"), KeySource::EXPECTED))?;
        if matches!(key, KeySource::JwtClaim(_)) && jwt.is_none() {
            return Err(ConfigError::invalid(
                "jwt_jwks_file",
                "(not set)".into(),
                format!("the path of a JWKS file: rule {name} takes its key from {key}"),
            ));
        }
        let max_per_key = r
            .max_per_key
            .ok_or_else(|| at.err("max_per_key", "(not set)".into(), LIMIT_EXPECTED))?;
        let max_per_key = u32::try_from(max_per_key)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| at.err("max_per_key", max_per_key.to_string(), LIMIT_EXPECTED))?;
        let path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".into());
        // Rules see normalised paths (docs/security.md#paths): a prefix
        // that is not in normal form would never match anything.
        let normal = path_prefix.starts_with('/')
            && crate::target::normalise_path(&path_prefix).is_ok_and(|n| n == path_prefix.as_str());
        if !normal {
            return Err(at.err(
                "path_prefix",
                format!("{path_prefix:?}"),
                "a path starting with / in normal form (no //, . or .. segments, \
                 no escaped letters or digits, no %2F)",
            ));
        }
        let missing = match r.missing.as_deref().unwrap_or("shared") {
            "shared" => MissingKey::Shared,
            "allow" => MissingKey::Allow,
            "reject" => MissingKey::Reject,
            other => {
                return Err(at.err("missing", format!("{other:?}"), "shared, allow or reject"))
            }
        };
        let status = match r.status.unwrap_or(429) {
            s @ (429 | 503) => s as u16,
            other => return Err(at.err("status", other.to_string(), "429 or 503")),
        };
        let max_keys = r.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        let max_keys = usize::try_from(max_keys)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| at.err("max_keys", max_keys.to_string(), "a whole number >= 1"))?;
        let fleet = r.fleet.unwrap_or(false);
        if fleet && !fleet_on {
            return Err(at.err(
                "fleet",
                "true".into(),
                "false while fleet_redis_url is empty: fleet-wide counting needs fleet_redis_url (docs/operations.md#fleet-wide-limits)",
            ));
        }
        let mut overrides = BTreeMap::new();
        for (value, limit) in &r.overrides {
            if !is_usable_key(value) {
                return Err(at.err(
                    "overrides",
                    format!("{value:?}"),
                    format!(
                        "key values of at most {MAX_KEY_LEN} bytes of visible ASCII (no other value can match)"
                    ),
                ));
            }
            let limit = u32::try_from(*limit).map_err(|_| {
                at.err(
                    &format!("overrides.{value}"),
                    limit.to_string(),
                    "a whole number >= 0 (0 = unlimited)",
                )
            })?;
            overrides.insert(value.clone(), limit);
        }
        out.push(KeyRule {
            name,
            key,
            max_per_key,
            path_prefix,
            missing,
            status,
            max_keys,
            fleet,
            overrides,
        });
    }
    Ok(out)
}

const NAME_EXPECTED: &str = "1 to 32 of a-z, 0-9 and _";
const LIMIT_EXPECTED: &str = "a whole number >= 1";

fn is_rule_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The verifier's settings: `None` without a JWKS file. The file must hold
/// a usable key set now, so a typo fails at start-up (exit 2), not at the
/// first upgrade.
pub(super) fn jwt(
    jwks_file: Option<&str>,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<Option<JwtSettings>, ConfigError> {
    let Some(path) = jwks_file.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let bad = |why: String| ConfigError::invalid("jwt_jwks_file", format!("{path:?}"), why);
    let bytes = std::fs::read(path).map_err(|e| bad(format!("a readable JWKS file ({e})")))?;
    crate::jwt::check_jwks(&bytes).map_err(|e| {
        bad(format!(
            "a JWKS document with at least one usable key ({e})"
        ))
    })?;
    let nonempty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(Some(JwtSettings {
        jwks_file: path.into(),
        issuer: nonempty(issuer),
        audience: nonempty(audience),
    }))
}

/// `admin_token_file`: must hold a token now (a non-empty first line), so
/// a wrong Secret mount fails at start-up rather than locking operators out.
pub(super) fn admin_token_file(path: Option<&str>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let bad = |why: String| ConfigError::invalid("admin_token_file", format!("{path:?}"), why);
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("a readable file holding the admin token ({e})")))?;
    if text.trim().is_empty() {
        return Err(bad("a file holding the admin token (it is empty)".into()));
    }
    Ok(Some(path.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, key: &str, max: i64) -> RawKeyRule {
        RawKeyRule {
            name: Some(name.into()),
            key: Some(key.into()),
            max_per_key: Some(max),
            ..RawKeyRule::default()
        }
    }

    #[test]
    fn every_key_source_parses_and_prints_as_written() {
        for text in [
            "header:x-tenant-id",
            "query:tenant",
            "cookie:session",
            "path_segment:2",
            "jwt_claim:sub",
        ] {
            let parsed = KeySource::parse(text).expect(text);
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            KeySource::parse("header:X-Tenant-Id"),
            Some(KeySource::Header(HeaderName::from_static("x-tenant-id")))
        );
        for bad in [
            "",
            "header:",
            "header:bad header",
            "path_segment:0",
            "path_segment:x",
            "ip:1",
            "cookie:a;b",
            "tenant",
        ] {
            assert_eq!(KeySource::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_fill_a_minimal_rule() {
        let rules = rules(&[rule("tenant", "header:x-tenant", 2)], None, false).expect("valid");
        let r = &rules[0];
        assert_eq!(r.path_prefix, "/");
        assert_eq!(r.missing, MissingKey::Shared);
        assert_eq!(r.status, 429);
        assert_eq!(r.max_keys, 100_000);
        assert!(!r.fleet);
        assert_eq!(r.limit_for("anyone"), 2);
    }

    #[test]
    fn overrides_set_per_value_limits() {
        let mut r = rule("tenant", "header:x-tenant", 2);
        r.overrides.insert("big".into(), 10);
        r.overrides.insert("internal".into(), 0);
        let rules = rules(&[r], None, false).expect("valid");
        assert_eq!(rules[0].limit_for("big"), 10);
        assert_eq!(rules[0].limit_for("internal"), 0);
        assert_eq!(rules[0].limit_for("small"), 2);
    }

    /// Each bad field is named with its rule and value.
    #[test]
    fn errors_name_the_rule_and_field() {
        let ok = rule("tenant", "header:x-tenant", 2);
        let with = |f: &dyn Fn(&mut RawKeyRule)| {
            let mut r = ok.clone();
            f(&mut r);
            r
        };
        let cases: Vec<(Vec<RawKeyRule>, &str)> = vec![
            (
                vec![with(&|r| r.name = None)],
                "key_limits[#1].name = (not set)",
            ),
            (
                vec![with(&|r| r.name = Some("Tenant".into()))],
                "key_limits[#1].name = \"Tenant\"",
            ),
            (
                vec![ok.clone(), ok.clone()],
                "key_limits[#2].name = \"tenant\"",
            ),
            (
                vec![with(&|r| r.key = Some("ip:x".into()))],
                "key_limits[tenant].key = \"ip:x\"",
            ),
            (
                vec![with(&|r| r.max_per_key = Some(0))],
                "key_limits[tenant].max_per_key = 0",
            ),
            (
                vec![with(&|r| r.max_per_key = None)],
                "key_limits[tenant].max_per_key = (not set)",
            ),
            (
                vec![with(&|r| r.status = Some(404))],
                "key_limits[tenant].status = 404",
            ),
            (
                vec![with(&|r| r.missing = Some("maybe".into()))],
                "key_limits[tenant].missing = \"maybe\"",
            ),
            (
                vec![with(&|r| r.path_prefix = Some("chat".into()))],
                "key_limits[tenant].path_prefix = \"chat\"",
            ),
            (
                vec![with(&|r| r.path_prefix = Some("/a/../chat".into()))],
                "key_limits[tenant].path_prefix = \"/a/../chat\"",
            ),
            (
                vec![with(&|r| r.path_prefix = Some("/%63hat".into()))],
                "key_limits[tenant].path_prefix = \"/%63hat\"",
            ),
            (
                vec![with(&|r| r.max_keys = Some(0))],
                "key_limits[tenant].max_keys = 0",
            ),
            (
                vec![with(&|r| r.fleet = Some(true))],
                "key_limits[tenant].fleet = true",
            ),
            (
                vec![with(&|r| {
                    r.overrides.insert("big".into(), -1);
                })],
                "key_limits[tenant].overrides.big = -1",
            ),
            (
                vec![with(&|r| {
                    r.overrides.insert("has space".into(), 1);
                })],
                "key_limits[tenant].overrides = \"has space\"",
            ),
            (
                vec![with(&|r| r.key = Some("jwt_claim:sub".into()))],
                "jwt_jwks_file = (not set)",
            ),
        ];
        for (raw, want) in cases {
            let e = rules(&raw, None, false).expect_err(want).to_string();
            assert!(e.contains(want) && e.contains("expected"), "{want}: {e}");
        }
    }

    #[test]
    fn fleet_rules_need_a_redis_url() {
        let mut r = rule("tenant", "header:x-tenant", 2);
        r.fleet = Some(true);
        let e = rules(&[r.clone()], None, false)
            .expect_err("no fleet_redis_url")
            .to_string();
        assert!(
            e.contains("key_limits[tenant].fleet = true") && e.contains("needs fleet_redis_url"),
            "{e}"
        );
        assert!(rules(&[r], None, true).expect("with a URL")[0].fleet);
    }

    #[test]
    fn usable_keys_are_short_visible_ascii() {
        assert!(is_usable_key("tenant-42"));
        assert!(is_usable_key(&"a".repeat(256)));
        assert!(!is_usable_key(&"a".repeat(257)));
        assert!(!is_usable_key("has space"));
        assert!(!is_usable_key("tab\t"));
        assert!(!is_usable_key("é"));
    }

    #[test]
    fn token_sources() {
        assert_eq!(
            TokenSource::parse("header:Authorization"),
            Some(TokenSource::Header(http::header::AUTHORIZATION))
        );
        assert_eq!(
            TokenSource::parse("query:access_token"),
            Some(TokenSource::Query("access_token".into()))
        );
        assert_eq!(TokenSource::parse("path_segment:1"), None);
        assert!(token_source("body:x", "p.".into()).is_err());
        assert_eq!(
            token_source("subprotocol", "jwt.".into()).ok(),
            Some(TokenSource::Subprotocol("jwt.".into()))
        );
        assert_eq!(
            TokenSource::Subprotocol("jwt.".into()).to_string(),
            "subprotocol"
        );
        assert_eq!(jwt(None, None, None).ok(), Some(None));
    }

    #[test]
    fn admin_token_file_must_hold_a_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let good = dir.path().join("token");
        std::fs::write(&good, "s3cret\n").expect("write");
        let e = admin_token_file(empty.to_str())
            .expect_err("empty")
            .to_string();
        assert!(e.contains("admin_token_file") && e.contains("empty"), "{e}");
        assert!(admin_token_file(dir.path().join("nope").to_str()).is_err());
        assert_eq!(
            admin_token_file(good.to_str()).expect("good"),
            Some(good.clone())
        );
        assert_eq!(admin_token_file(None).expect("off"), None);
    }
}
