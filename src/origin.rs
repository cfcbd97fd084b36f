//! Web origins (`Origin: https://app.example.com`) and the patterns of
//! `allowed_origins` (docs/security.md#cross-site-websocket-hijacking):
//! parsing, normalising and matching. Pure functions, no I/O (leaf).
//!
//! Both sides are normalised the same way before they are compared: the
//! scheme and host to lower case, a default port (80 for `http`/`ws`, 443
//! for `https`/`wss`) dropped. A pattern `https://*.example.com` matches a
//! host that ends in `.example.com` at a label boundary, at any depth, and
//! not `example.com` itself. `null` is the opaque origin (a sandboxed
//! frame, a `file:` page, a redirect across origins) and matches only an
//! entry `null`.

use std::fmt;

/// One origin, normalised (scheme and host lower case, default port gone),
/// or the opaque origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `null`.
    Opaque,
    /// `scheme://host[:port]`.
    Tuple {
        /// Lower case.
        scheme: String,
        /// Lower case; an IPv6 address keeps its brackets.
        host: String,
        /// `None` when absent or the scheme's default.
        port: Option<u16>,
    },
}

/// Why a text is not an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAnOrigin {
    /// No `scheme://`.
    Scheme,
    /// An empty host, or one with characters a host cannot have.
    Host,
    /// A port that is not a number from 1 to 65535.
    Port,
    /// A path, query or fragment after the authority (an origin has none).
    Path,
    /// User information (`user@host`), which an origin never has.
    UserInfo,
}

impl fmt::Display for NotAnOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotAnOrigin::Scheme => "no scheme:// at its start",
            NotAnOrigin::Host => "no usable host",
            NotAnOrigin::Port => "a port that is not 1 to 65535",
            NotAnOrigin::Path => "a path after the host (an origin is scheme://host[:port] only)",
            NotAnOrigin::UserInfo => "user information (user@) before the host",
        })
    }
}

impl Origin {
    /// Parses an `Origin` header value (or a list entry without a `*.`).
    ///
    /// # Errors
    /// Anything but `null` or `scheme://host[:port]`.
    pub(crate) fn parse(text: &str) -> Result<Origin, NotAnOrigin> {
        if text.eq_ignore_ascii_case("null") {
            return Ok(Origin::Opaque);
        }
        let (scheme, rest) = text.split_once("://").ok_or(NotAnOrigin::Scheme)?;
        if !is_scheme(scheme) {
            return Err(NotAnOrigin::Scheme);
        }
        if rest.contains(['/', '?', '#']) {
            return Err(NotAnOrigin::Path);
        }
        if rest.contains('@') {
            return Err(NotAnOrigin::UserInfo);
        }
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = split_port(rest)?;
        if !is_host(host) {
            return Err(NotAnOrigin::Host);
        }
        let port = port.filter(|p| Some(*p) != default_port(&scheme));
        Ok(Origin::Tuple {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Opaque => f.write_str("null"),
            Origin::Tuple { scheme, host, port } => {
                write!(f, "{scheme}://{host}")?;
                match port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OriginPattern {
    /// Exactly this origin (or `null`).
    Exact(Origin),
    /// `scheme://*.suffix[:port]`: any host under `suffix`, at any depth.
    Subdomains {
        /// Lower case.
        scheme: String,
        /// Lower case, without the leading `*.`.
        suffix: String,
        /// `None` when absent or the scheme's default.
        port: Option<u16>,
    },
}

impl OriginPattern {
    /// Parses an entry of `allowed_origins`.
    ///
    /// # Errors
    /// An entry that is neither an origin nor `scheme://*.host[:port]`.
    pub(crate) fn parse(text: &str) -> Result<OriginPattern, NotAnOrigin> {
        let wildcard = text
            .split_once("://")
            .and_then(|(scheme, rest)| Some((scheme, rest.strip_prefix("*.")?)));
        let Some((scheme, rest)) = wildcard else {
            return Origin::parse(text).map(OriginPattern::Exact);
        };
        match Origin::parse(&format!("{scheme}://{rest}"))? {
            Origin::Tuple { scheme, host, port } if !host.starts_with('[') => {
                Ok(OriginPattern::Subdomains {
                    scheme,
                    suffix: host,
                    port,
                })
            }
            _ => Err(NotAnOrigin::Host),
        }
    }

    /// Whether `origin` is one this entry allows.
    pub(crate) fn allows(&self, origin: &Origin) -> bool {
        match (self, origin) {
            (OriginPattern::Exact(o), _) => o == origin,
            (
                OriginPattern::Subdomains {
                    scheme,
                    suffix,
                    port,
                },
                Origin::Tuple {
                    scheme: s,
                    host,
                    port: p,
                },
            ) => {
                scheme == s
                    && port == p
                    && host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            (OriginPattern::Subdomains { .. }, Origin::Opaque) => false,
        }
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginPattern::Exact(o) => o.fmt(f),
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                write!(f, "{scheme}://*.{suffix}")?;
                match port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// What `allowed_origins` and `require_origin` make of a request's
/// `Origin` headers.
///
/// `values` are every `Origin` header of the request. Two headers, or one
/// that is not a single origin, are refused whenever a list is set: the
/// upstream might read another one than wsgate did.
pub(crate) fn admits<'a>(
    allowed: &[OriginPattern],
    require: bool,
    mut values: impl Iterator<Item = &'a [u8]>,
) -> bool {
    let Some(first) = values.next() else {
        return !require;
    };
    if allowed.is_empty() {
        return true;
    }
    if values.next().is_some() {
        return false;
    }
    let Ok(origin) = std::str::from_utf8(first).map(str::trim).map(Origin::parse) else {
        return false;
    };
    origin.is_ok_and(|o| allowed.iter().any(|p| p.allows(&o)))
}

/// RFC 3986 `scheme`.
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

/// The host and the port, if any; an IPv6 literal keeps its brackets.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), NotAnOrigin> {
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => {
                let (host, after) = authority.split_at(end + 1);
                match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None if after.is_empty() => (host, None),
                    None => return Err(NotAnOrigin::Host),
                }
            }
            None => return Err(NotAnOrigin::Host),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(NotAnOrigin::Port)?,
        ),
    };
    Ok((host, port))
}

/// A registered name (letters, digits, `-`, `_`, `.`) or a bracketed IPv6
/// literal; percent-encoding and other characters are not taken: browsers
/// send hosts already in their ASCII (punycode) form.
fn is_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && !h.starts_with('.')
        && !h.contains("..")
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The port a scheme implies.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<OriginPattern> {
        entries
            .iter()
            .map(|e| OriginPattern::parse(e).expect(e))
            .collect()
    }

    fn admitted(allowed: &[&str], require: bool, headers: &[&str]) -> bool {
        admits(
            &list(allowed),
            require,
            headers.iter().map(|h| h.as_bytes()),
        )
    }

    #[test]
    fn scheme_host_and_default_port_are_normalised() {
        let list = ["https://app.example.com"];
        assert!(admitted(&list, false, &["https://app.example.com"]));
        assert!(admitted(&list, false, &["HTTPS://App.Example.COM"]));
        assert!(admitted(&list, false, &["https://app.example.com:443"]));
        assert!(!admitted(&list, false, &["https://app.example.com:8443"]));
        assert!(!admitted(&list, false, &["http://app.example.com"]));
        assert!(!admitted(
            &list,
            false,
            &["https://app.example.com.evil.io"]
        ));
        let with_port = ["http://localhost:8080"];
        assert!(admitted(&with_port, false, &["http://LOCALHOST:8080"]));
        assert!(!admitted(&with_port, false, &["http://localhost"]));
        assert!(admitted(&["http://app:80"], false, &["http://app"]));
    }

    #[test]
    fn a_wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let list = ["https://*.example.com"];
        assert!(admitted(&list, false, &["https://a.example.com"]));
        assert!(admitted(&list, false, &["https://a.b.example.com"]));
        assert!(!admitted(&list, false, &["https://example.com"]));
        assert!(!admitted(&list, false, &["https://evilexample.com"]));
        assert!(!admitted(&list, false, &["https://a.example.com.evil.io"]));
        assert!(!admitted(&list, false, &["http://a.example.com"]));
        assert!(!admitted(&list, false, &["https://a.example.com:8443"]));
        assert!(!admitted(&list, false, &["null"]));
    }

    #[test]
    fn null_matches_only_a_null_entry() {
        assert!(!admitted(&["https://a.example.com"], false, &["null"]));
        assert!(admitted(&["null"], false, &["null"]));
        assert!(admitted(&["null"], false, &["NULL"]));
        assert!(!admitted(&["null"], false, &["https://a.example.com"]));
    }

    #[test]
    fn a_missing_origin_passes_unless_required() {
        assert!(admitted(&["https://a.example.com"], false, &[]));
        assert!(!admitted(&["https://a.example.com"], true, &[]));
        assert!(!admitted(&[], true, &[]));
        assert!(admitted(&[], true, &["https://anything.example"]));
        assert!(admitted(&[], false, &[]));
    }

    #[test]
    fn repeated_or_unreadable_origins_are_refused_when_a_list_is_set() {
        let list = ["https://a.example.com"];
        assert!(!admitted(
            &list,
            false,
            &["https://a.example.com", "https://a.example.com"]
        ));
        assert!(!admitted(
            &list,
            false,
            &["https://a.example.com https://b.example.com"]
        ));
        assert!(!admitted(&list, false, &["https://a.example.com/"]));
        assert!(!admitted(&list, false, &["https://user@a.example.com"]));
        assert!(!admitted(&list, false, &["a.example.com"]));
        assert!(!admits(
            &self::list(&list),
            false,
            [&b"https://a.example.com\xff"[..]].into_iter()
        ));
    }

    #[test]
    fn ipv6_hosts_keep_their_brackets() {
        let list = ["http://[::1]:8080"];
        assert!(admitted(&list, false, &["http://[::1]:8080"]));
        assert!(!admitted(&list, false, &["http://[0:0::1]:8080"]));
        assert_eq!(
            Origin::parse("http://[::1]").map(|o| o.to_string()),
            Ok("http://[::1]".into())
        );
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        assert_eq!(
            OriginPattern::parse("app.example.com"),
            Err(NotAnOrigin::Scheme)
        );
        assert_eq!(
            OriginPattern::parse("https://app.example.com/"),
            Err(NotAnOrigin::Path)
        );
        assert_eq!(
            OriginPattern::parse("https://app.example.com:0"),
            Err(NotAnOrigin::Port)
        );
        assert_eq!(
            OriginPattern::parse("https://app.example.com:99999"),
            Err(NotAnOrigin::Port)
        );
        assert_eq!(OriginPattern::parse("https://*"), Err(NotAnOrigin::Host));
        assert_eq!(OriginPattern::parse("*"), Err(NotAnOrigin::Scheme));
        assert_eq!(
            OriginPattern::parse("https://a.*.example.com"),
            Err(NotAnOrigin::Host)
        );
        assert_eq!(
            OriginPattern::parse("HTTPS://*.Example.com:443").map(|p| p.to_string()),
            Ok("https://*.example.com".into())
        );
    }
}
