//! The request target, read once the way the upstream will read it: the
//! path that key rules judge and the path that is forwarded are the same
//! string (docs/security.md#paths).
//!
//! A path is normalised the way RFC 3986 §6.2.2 and most HTTP stacks
//! do: percent-encoded unreserved characters are decoded (`%61` → `a`),
//! the remaining escapes get upper-case hex, runs of `/` are merged and
//! `.` / `..` segments are resolved (§5.2.4). The normalised path is what
//! is forwarded, so an upstream that normalises again gets the same path,
//! and one that does not gets the path wsgate judged.
//!
//! What no normalisation can make unambiguous is refused: an encoded
//! `/` or `\` (one stack splits on it, another does not), a raw `\`, NUL,
//! control characters or bytes outside ASCII, and malformed escapes.
//!
//! `test_paths.rs` (tests only) generates the random paths its property
//! tests and `tests/it/hardening.rs` share.

use std::borrow::Cow;

use http::header::{self, HeaderMap};
use http::uri::{PathAndQuery, Uri};

/// Why a request target is refused (400; on an upgrade, reason
/// `bad_path`). Messages never echo the path (they may be logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadTarget {
    /// `%2F` or `%5C`: a separator some stacks decode and others do not.
    #[error("the path holds an encoded slash or backslash")]
    EncodedSeparator,
    /// A raw `\`, an (encoded) NUL or control character, or a raw byte
    /// outside visible ASCII.
    #[error("the path holds a backslash, a control character or a byte outside ASCII")]
    Character,
    /// `%` not followed by two hex digits.
    #[error("the path holds a malformed percent-encoding")]
    Escape,
    /// Not origin-form (`/path?query`): `*`, authority-form, or an
    /// absolute-form target naming another host than `Host`.
    #[error("the request target is not a path on this host")]
    Form,
}

impl BadTarget {
    /// The 400's body: one static line.
    pub(crate) fn text(self) -> &'static str {
        match self {
            BadTarget::EncodedSeparator => {
                "wsgate: bad path: an encoded slash or backslash is not accepted\n"
            }
            BadTarget::Character => {
                "wsgate: bad path: backslashes, control characters and raw non-ASCII bytes are not accepted\n"
            }
            BadTarget::Escape => "wsgate: bad path: malformed percent-encoding\n",
            BadTarget::Form => "wsgate: bad request target: send a path on this host\n",
        }
    }
}

/// The target of a WebSocket upgrade in origin-form with its path
/// normalised: what the rules judge and what goes to the upstream. An
/// absolute-form target is accepted only when it names the `Host` the
/// request carries (RFC 9112 §3.2.2: the upstream would use the target's
/// authority, wsgate forwards `Host`).
///
/// # Errors
/// A target that is not a path on this host, or a path that cannot be
/// read unambiguously.
pub(crate) fn upgrade_target(uri: &Uri, headers: &HeaderMap) -> Result<Uri, BadTarget> {
    if let Some(authority) = uri.authority() {
        let host = headers.get(header::HOST).map(http::HeaderValue::as_bytes);
        let same_host = uri.scheme().is_some()
            && host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str().as_bytes()));
        if !same_host {
            return Err(BadTarget::Form);
        }
    }
    if !uri.path().starts_with('/') {
        return Err(BadTarget::Form);
    }
    match normalise_path(uri.path())? {
        Cow::Borrowed(_) if uri.authority().is_none() => Ok(uri.clone()),
        path => with_path(uri, &path).map(Uri::from),
    }
}

/// The path-and-query a plain request is forwarded with: the path
/// normalised; `*` (as in `OPTIONS *`) as it is.
///
/// # Errors
/// A path that cannot be read unambiguously.
pub(crate) fn plain_target(uri: &Uri) -> Result<Option<PathAndQuery>, BadTarget> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(None);
    };
    if !pq.path().starts_with('/') {
        return Ok(Some(pq.clone()));
    }
    match normalise_path(pq.path())? {
        Cow::Borrowed(_) => Ok(Some(pq.clone())),
        path => with_path(uri, &path).map(Some),
    }
}

/// `path` with `uri`'s query.
fn with_path(uri: &Uri, path: &str) -> Result<PathAndQuery, BadTarget> {
    let joined = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    // Built from a path of visible ASCII and a query that parsed before.
    PathAndQuery::try_from(joined).map_err(|_| BadTarget::Character)
}

/// `path` (starting with `/`) in normal form; borrowed when it already
/// is, which is the case of every request a well-behaved client sends.
///
/// # Errors
/// What cannot be normalised unambiguously (see [`BadTarget`]).
pub(crate) fn normalise_path(path: &str) -> Result<Cow<'_, str>, BadTarget> {
    if is_normal(path)? {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    let mut segments = path.get(1..).unwrap_or("").split('/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let segment = decode_unreserved(raw)?;
        match segment.as_ref() {
            "" | "." => trailing_slash = last,
            ".." => {
                out.truncate(out.rfind('/').unwrap_or(0));
                trailing_slash = last;
            }
            s => {
                out.push('/');
                out.push_str(s);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Whether `path` is already normal, without allocating; refuses what
/// [`normalise_path`] would refuse.
fn is_normal(path: &str) -> Result<bool, BadTarget> {
    let bytes = path.as_bytes();
    let mut normal = true;
    let mut segment_start = 1;
    let mut i = 1;
    while i <= bytes.len() {
        let b = bytes.get(i).copied();
        if b.is_none() || b == Some(b'/') {
            let segment = &bytes[segment_start..i];
            let last = b.is_none();
            if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
                normal = false;
            }
            segment_start = i + 1;
            i += 1;
            continue;
        }
        match b {
            Some(b'%') => {
                let value = escape_at(bytes, i)?;
                if is_unreserved(value) || bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
                    normal = false;
                }
                i += 3;
            }
            Some(c) => {
                check_raw(c)?;
                i += 1;
            }
            None => unreachable!("handled above"),
        }
    }
    Ok(normal)
}

/// One segment with its unreserved escapes decoded and the others in
/// upper case.
fn decode_unreserved(segment: &str) -> Result<Cow<'_, str>, BadTarget> {
    let bytes = segment.as_bytes();
    if !bytes.contains(&b'%') {
        for &c in bytes {
            check_raw(c)?;
        }
        return Ok(Cow::Borrowed(segment));
    }
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        if c == b'%' {
            let value = escape_at(bytes, i)?;
            if is_unreserved(value) {
                out.push(char::from(value));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
        } else {
            check_raw(c)?;
            out.push(char::from(c));
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

/// The byte an escape at `i` (a `%`) stands for, if it may stand in a path.
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, BadTarget> {
    let hex = |d: Option<&u8>| d.and_then(|d| char::from(*d).to_digit(16));
    let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
        return Err(BadTarget::Escape);
    };
    let value = u8::try_from(hi * 16 + lo).map_err(|_| BadTarget::Escape)?;
    match value {
        b'/' | b'\\' => Err(BadTarget::EncodedSeparator),
        v if v < 0x20 || v == 0x7f => Err(BadTarget::Character),
        v => Ok(v),
    }
}

/// A raw path byte: visible ASCII other than `\`.
fn check_raw(c: u8) -> Result<(), BadTarget> {
    if c == b'\\' || !c.is_ascii_graphic() {
        return Err(BadTarget::Character);
    }
    Ok(())
}

/// RFC 3986 §2.3.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod test_paths;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(p: &str) -> Result<String, BadTarget> {
        normalise_path(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/api",
            "/api/",
            "/a/b.c/d",
            "/caf%C3%A9",
            "/a%20b",
            "/x/%3F",
            "/..a/b..",
        ] {
            assert!(
                matches!(normalise_path(p), Ok(Cow::Borrowed(_))),
                "{p} is already normal"
            );
        }
    }

    #[test]
    fn what_the_attacks_of_the_issue_become() {
        let cases = [
            ("/%61pi", "/api"),
            ("//api", "/api"),
            ("/./api", "/api"),
            ("/x/../api", "/api"),
            ("/%6a", "/j"),
            ("/room/b/../a", "/room/a"),
            ("/room/./a", "/room/a"),
            ("/room/%2e/a", "/room/a"),
            ("/room/%2E%2e/a", "/a"),
            ("/../../a", "/a"),
            ("/a/..", "/"),
            ("/a/b/.", "/a/b/"),
            ("/a//", "/a/"),
            ("/a%3f", "/a%3F"),
            ("/%7e%41", "/~A"),
        ];
        for (raw, normal) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(normal), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("/a%2Fb", BadTarget::EncodedSeparator),
            ("/a%2fb", BadTarget::EncodedSeparator),
            ("/a%5Cb", BadTarget::EncodedSeparator),
            ("/a\\b", BadTarget::Character),
            ("/a%00", BadTarget::Character),
            ("/a%0A", BadTarget::Character),
            ("/a%7F", BadTarget::Character),
            ("/a%", BadTarget::Escape),
            ("/a%4", BadTarget::Escape),
            ("/a%zz", BadTarget::Escape),
        ];
        for (raw, why) in cases {
            assert_eq!(norm(raw), Err(why), "{raw}");
        }
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().expect("host"));
        m
    }

    #[test]
    fn upgrade_targets_are_origin_form_on_this_host() {
        let h = host("Example.com:80");
        assert_eq!(upgrade_target(&uri("/a/./b?x=1"), &h), Ok(uri("/a/b?x=1")));
        assert_eq!(
            upgrade_target(&uri("http://example.com:80/%61?q"), &h),
            Ok(uri("/a?q"))
        );
        assert_eq!(
            upgrade_target(&uri("http://other.example/a"), &h),
            Err(BadTarget::Form)
        );
        assert_eq!(upgrade_target(&uri("*"), &h), Err(BadTarget::Form));
        assert_eq!(
            upgrade_target(&uri("example.com:80"), &h),
            Err(BadTarget::Form)
        );
        assert_eq!(
            upgrade_target(&uri("http://example.com:80/a"), &HeaderMap::new()),
            Err(BadTarget::Form)
        );
    }

    #[test]
    fn plain_targets_keep_star_and_the_query() {
        assert_eq!(
            plain_target(&uri("*")).map(|p| p.map(|p| p.to_string())),
            Ok(Some("*".into()))
        );
        assert_eq!(
            plain_target(&uri("//a/../b?x=%2F")).map(|p| p.map(|p| p.to_string())),
            Ok(Some("/b?x=%2F".into())),
            "the query is not a path: %2F is fine there"
        );
        assert_eq!(
            plain_target(&uri("/a%2Fb")),
            Err(BadTarget::EncodedSeparator)
        );
    }

    proptest! {
        /// The fast check agrees with the normalisation, and normalising
        /// twice changes nothing.
        #[test]
        fn is_normal_agrees_and_normal_form_is_a_fixed_point(path in test_paths::path(7)) {
            match normalise_path(&path) {
                Ok(n) => {
                    prop_assert_eq!(is_normal(&path), Ok(n == path.as_str()));
                    prop_assert_eq!(normalise_path(&n).map(Cow::into_owned), Ok(n.clone().into_owned()));
                    prop_assert!(n.starts_with('/'));
                    prop_assert!(!n.contains("//"));
                    prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
                }
                Err(e) => prop_assert_eq!(is_normal(&path), Err(e)),
            }
        }
    }
}
