//! The handshake-policy keys (docs/security.md#handshake-policy):
//! `allowed_origins`, `require_origin`, `subprotocols`,
//! `require_subprotocol`, and `jwt_subprotocol_prefix` (the token's place
//! when `jwt_from = "subprotocol"`), with their typed form.
//!
//! The two lists are TOML arrays in the file; in the environment, where a
//! list is awkward to write, a comma-separated string is taken too
//! (`WSGATE_ALLOWED_ORIGINS=https://a.example.com,https://*.example.com`).
//! Neither an origin nor a subprotocol name can contain a comma.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};

use super::{ConfigError, RawConfig};
use crate::origin::OriginPattern;

/// What `allowed_origins` takes, as errors say it.
const ORIGINS_EXPECTED: &str =
    "a list of origins: scheme://host[:port] (https://app.example.com), \
     scheme://*.domain[:port] for any subdomain, or null for opaque origins; \
     empty = any origin";

/// What `subprotocols` takes, as errors say it.
const SUBPROTOCOLS_EXPECTED: &str =
    "a list of subprotocol names (HTTP tokens: letters, digits and !#$%&'*+-.^_`|~); empty = any";

/// What `jwt_subprotocol_prefix` takes.
const PREFIX_EXPECTED: &str =
    "the start of the offered subprotocol entry that carries the JWT: one or more token characters";

/// The handshake checks of one configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakePolicy {
    /// Origins allowed to open a WebSocket; empty = any.
    pub(crate) allowed_origins: Vec<OriginPattern>,
    /// Refuse an upgrade without `Origin`.
    pub require_origin: bool,
    /// Subprotocol names a client may offer; empty = any.
    pub subprotocols: Vec<String>,
    /// Refuse an upgrade that offers none of `subprotocols`.
    pub require_subprotocol: bool,
}

/// For `#[serde(deserialize_with)]`: a list of strings, or one string of
/// comma-separated entries (the environment's form).
pub(super) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    /// Reads either form.
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, or one string of comma-separated entries")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(split_list(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = seq.next_element::<String>()? {
                out.push(entry.trim().to_owned());
            }
            Ok(out)
        }
    }
    d.deserialize_any(ListVisitor)
}

/// `a, b,,c` → `["a", "b", "c"]`.
fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The policy from its four keys.
///
/// # Errors
/// The first entry that is not acceptable, by key and entry;
/// `require_subprotocol` without `subprotocols`.
pub(super) fn policy(raw: &RawConfig) -> Result<HandshakePolicy, ConfigError> {
    let mut allowed_origins = Vec::with_capacity(raw.allowed_origins.len());
    for entry in &raw.allowed_origins {
        let pattern = OriginPattern::parse(entry).map_err(|why| {
            ConfigError::invalid(
                "allowed_origins",
                format!("{entry:?} (it has {why})"),
                ORIGINS_EXPECTED,
            )
        })?;
        allowed_origins.push(pattern);
    }
    for entry in &raw.subprotocols {
        if !is_token(entry) {
            return Err(ConfigError::invalid(
                "subprotocols",
                format!("{entry:?}"),
                SUBPROTOCOLS_EXPECTED,
            ));
        }
    }
    if raw.require_subprotocol && raw.subprotocols.is_empty() {
        return Err(ConfigError::invalid(
            "require_subprotocol",
            "true".into(),
            "false while subprotocols is empty: list the names a client must offer one of",
        ));
    }
    Ok(HandshakePolicy {
        allowed_origins,
        require_origin: raw.require_origin,
        subprotocols: raw.subprotocols.clone(),
        require_subprotocol: raw.require_subprotocol,
    })
}

/// `jwt_subprotocol_prefix`, checked.
///
/// # Errors
/// Empty, or a character a subprotocol name cannot hold.
pub(super) fn token_prefix(prefix: &str) -> Result<String, ConfigError> {
    if is_token(prefix) {
        Ok(prefix.to_owned())
    } else {
        Err(ConfigError::invalid(
            "jwt_subprotocol_prefix",
            format!("{prefix:?}"),
            PREFIX_EXPECTED,
        ))
    }
}

/// RFC 9110 `token`, which a subprotocol name is (RFC 6455 §4.1).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `check-config` prints the four keys with the values in force (origins
/// normalised).
pub(super) fn written<S: Serializer>(p: &HandshakePolicy, s: S) -> Result<S::Ok, S::Error> {
    let origins: Vec<String> = p.allowed_origins.iter().map(ToString::to_string).collect();
    let mut map = s.serialize_map(Some(4))?;
    map.serialize_entry("allowed_origins", &origins)?;
    map.serialize_entry("require_origin", &p.require_origin)?;
    map.serialize_entry("subprotocols", &p.subprotocols)?;
    map.serialize_entry("require_subprotocol", &p.require_subprotocol)?;
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::raw_with as raw;

    #[test]
    fn off_by_default() {
        assert_eq!(
            policy(&RawConfig::default()).expect("defaults"),
            HandshakePolicy::default()
        );
    }

    #[test]
    fn the_environment_form_is_split_on_commas() {
        assert_eq!(
            split_list(" https://a.example.com, https://*.b.example.com ,,null"),
            ["https://a.example.com", "https://*.b.example.com", "null"]
        );
        assert!(split_list("").is_empty());
    }

    #[test]
    fn bad_entries_name_the_key_and_the_entry() {
        let e = policy(&raw(|r| {
            r.allowed_origins = vec!["https://ok.example.com".into(), "app.example.com".into()];
        }))
        .expect_err("no scheme")
        .to_string();
        assert!(
            e.contains("allowed_origins")
                && e.contains("\"app.example.com\"")
                && e.contains("scheme"),
            "{e}"
        );
        let e = policy(&raw(|r| r.subprotocols = vec!["chat v2".into()]))
            .expect_err("space")
            .to_string();
        assert!(e.contains("subprotocols") && e.contains("chat v2"), "{e}");
        let e = policy(&raw(|r| r.require_subprotocol = true))
            .expect_err("nothing to require")
            .to_string();
        assert!(e.contains("require_subprotocol"), "{e}");
        let e = token_prefix("bearer, ").expect_err("comma").to_string();
        assert!(e.contains("jwt_subprotocol_prefix"), "{e}");
        assert_eq!(token_prefix("jwt.").expect("token"), "jwt.");
    }
}
