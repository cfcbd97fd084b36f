//! Reading a key value, or a JWT, out of an upgrade request: pure
//! functions of the head (headers and URI), no I/O.
//!
//! Every value is checked the same way before it can be a key: at most 256
//! bytes of visible ASCII after decoding (docs/operations.md#limits-per-key). Query parameters and path
//! segments are percent-decoded, so `t%41` and `tA` are one key.

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderName, Uri};

use base64::Engine as _;

use crate::config::{is_usable_key, KeySource, TokenSource};
use crate::subprotocols;

/// What a request holds for one key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found<'a> {
    /// A usable value.
    Value(Cow<'a, str>),
    /// Nothing (or an empty value): the rule's `missing` mode decides.
    Missing,
    /// Something that cannot be a key (too long, not visible ASCII): 400,
    /// whatever the `missing` mode.
    Unusable,
    /// Given more than once (a header, query parameter or cookie): 400,
    /// whatever the `missing` mode. Picking one would let the client choose
    /// which copy wsgate counts while the upstream reads the other.
    Ambiguous,
}

impl<'a> Found<'a> {
    pub(crate) fn checked(value: Option<Cow<'a, str>>) -> Self {
        match value {
            None => Found::Missing,
            Some(v) if v.is_empty() => Found::Missing,
            Some(v) if is_usable_key(&v) => Found::Value(v),
            Some(_) => Found::Unusable,
        }
    }
}

/// The key a request holds for `source`. `jwt_claim` sources are not read
/// here (the claim comes from a verified token): they report `Missing`.
pub(crate) fn key<'a>(source: &KeySource, headers: &'a HeaderMap, uri: &'a Uri) -> Found<'a> {
    match source {
        KeySource::Header(name) => {
            single(single_header(headers, name).map(|v| v.map(Cow::Borrowed)))
        }
        KeySource::Query(param) => single(query(uri, param)),
        KeySource::Cookie(name) => single(cookie(headers, name).map(|v| v.map(Cow::Borrowed))),
        KeySource::PathSegment(n) => match path_segment(uri, *n) {
            Ok(v) => Found::checked(v),
            Err(NotUtf8) => Found::Unusable,
        },
        KeySource::JwtClaim(_) => Found::Missing,
    }
}

fn single(value: Result<Option<Cow<'_, str>>, Ambiguous>) -> Found<'_> {
    value.map_or(Found::Ambiguous, Found::checked)
}

/// The token a request carries for `from`; `None` when it has none.
/// `Authorization` (or any header) may carry it as `Bearer <token>`.
///
/// # Errors
/// The place is given more than once: which token the upstream would
/// read is anybody's guess.
pub(crate) fn token<'a>(
    from: &TokenSource,
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Option<Cow<'a, str>>, Ambiguous> {
    let raw = match from {
        TokenSource::Header(name) => {
            let Some(v) = single_header(headers, name)? else {
                return Ok(None);
            };
            let scheme = v.get(..7);
            Cow::Borrowed(
                if scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer ")) {
                    v[7..].trim_start()
                } else if *name == header::AUTHORIZATION {
                    // Another scheme (Basic, …) is not a JWT: no token.
                    return Ok(None);
                } else {
                    v
                },
            )
        }
        TokenSource::Query(param) => match query(uri, param)? {
            Some(v) => v,
            None => return Ok(None),
        },
        TokenSource::Cookie(name) => match cookie(headers, name)? {
            Some(v) => Cow::Borrowed(v),
            None => return Ok(None),
        },
        TokenSource::Subprotocol(prefix) => match subprotocol_token(headers, prefix)? {
            Some(v) => v,
            None => return Ok(None),
        },
    };
    Ok((!raw.is_empty()).then_some(raw))
}

/// The rest of the one offered subprotocol entry that starts with
/// `prefix`. A JWT is itself made of token characters, so it is usually
/// there as it is; a rest without a `.` is taken as Kubernetes writes its
/// bearer tokens, base64url-encoded, and decoded.
fn subprotocol_token<'a>(
    headers: &'a HeaderMap,
    prefix: &str,
) -> Result<Option<Cow<'a, str>>, Ambiguous> {
    let mut found = subprotocols::offered(headers)
        .flatten()
        .filter_map(|e| e.strip_prefix(prefix));
    let Some(rest) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(Ambiguous);
    }
    if rest.contains('.') {
        return Ok(Some(Cow::Borrowed(rest)));
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(rest.trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    // Not base64url: left as written, for the verifier to refuse (401).
    Ok(Some(decoded.map_or(Cow::Borrowed(rest), Cow::Owned)))
}

/// A value that must be single but was given more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ambiguous;

/// A path segment that does not decode to UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NotUtf8;

/// The one value of header `name`, trimmed; two or more are ambiguous (an
/// ingress that sets the header would have replaced a client's copy, so a
/// second copy means the request did not come the way the operator thinks).
fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, Ambiguous> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Ambiguous);
    }
    // Not visible ASCII (obs-text): unusable, said with an empty-free value
    // that fails the usable-key check.
    Ok(Some(first.to_str().map_or("\u{7f}", str::trim)))
}

/// The one value of query parameter `param`, decoded (names are decoded
/// too: `t%65nant` is `tenant`).
fn query<'a>(uri: &'a Uri, param: &str) -> Result<Option<Cow<'a, str>>, Ambiguous> {
    let Some(q) = uri.query() else {
        return Ok(None);
    };
    only_one(
        form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| k == param)
            .map(|(_, v)| v),
    )
}

/// The one value of cookie `name` (RFC 6265: `a=1; b=2`, possibly over
/// several `Cookie` headers), without surrounding double quotes.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Ambiguous> {
    only_one(
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| k.trim() == name)
            .map(|(_, v)| {
                let v = v.trim();
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            }),
    )
}

/// The only item of `values`, if any; two or more are ambiguous.
fn only_one<T>(mut values: impl Iterator<Item = T>) -> Result<Option<T>, Ambiguous> {
    let first = values.next();
    if values.next().is_some() {
        return Err(Ambiguous);
    }
    Ok(first)
}

/// The `n`-th (1-based) segment of the (normalised) path, percent-decoded.
fn path_segment(uri: &Uri, n: usize) -> Result<Option<Cow<'_, str>>, NotUtf8> {
    let Some(segment) = uri.path().split('/').skip(1).nth(n - 1) else {
        return Ok(None);
    };
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(Some)
        .map_err(|_| NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(uri: &str, headers: &[(&str, &str)]) -> (HeaderMap, Uri) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::try_from(*k).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        (map, uri.parse().expect("uri"))
    }

    fn value(s: &str) -> Found<'_> {
        Found::Value(Cow::Borrowed(s))
    }

    #[test]
    fn header_keys() {
        let src = KeySource::Header(HeaderName::from_static("x-tenant"));
        let (h, u) = head("/", &[("x-tenant", " acme ")]);
        assert_eq!(key(&src, &h, &u), value("acme"));
        let (h, u) = head("/", &[]);
        assert_eq!(key(&src, &h, &u), Found::Missing);
        let (h, u) = head("/", &[("x-tenant", "")]);
        assert_eq!(key(&src, &h, &u), Found::Missing);
        let (h, u) = head("/", &[("x-tenant", "a"), ("x-tenant", "b")]);
        assert_eq!(key(&src, &h, &u), Found::Ambiguous, "sent twice");
        let (h, u) = head("/", &[("x-tenant", "two words")]);
        assert_eq!(key(&src, &h, &u), Found::Unusable);
        let long = "x".repeat(257);
        let (h, u) = head("/", &[("x-tenant", &long)]);
        assert_eq!(key(&src, &h, &u), Found::Unusable);
        let mut h = HeaderMap::new();
        h.insert(
            "x-tenant",
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"),
        );
        assert_eq!(key(&src, &h, &u), Found::Unusable);
    }

    #[test]
    fn query_keys_are_decoded() {
        let src = KeySource::Query("tenant".into());
        let (h, u) = head("/ws?x=1&tenant=t%41", &[]);
        assert_eq!(key(&src, &h, &u), value("tA"));
        let (h, u) = head("/ws?tenant=b&t%65nant=a", &[]);
        assert_eq!(
            key(&src, &h, &u),
            Found::Ambiguous,
            "a repeated name, however spelt"
        );
        let (h, u) = head("/ws?tenant=a+b", &[]);
        assert_eq!(key(&src, &h, &u), Found::Unusable, "+ is a space");
        let (h, u) = head("/ws", &[]);
        assert_eq!(key(&src, &h, &u), Found::Missing);
        let (h, u) = head("/ws?tenant=", &[]);
        assert_eq!(key(&src, &h, &u), Found::Missing);
    }

    #[test]
    fn cookie_keys() {
        let src = KeySource::Cookie("team".into());
        let (h, u) = head("/", &[("cookie", "a=1; team=\"blue\"")]);
        assert_eq!(key(&src, &h, &u), value("blue"));
        let (h, u) = head(
            "/",
            &[("cookie", "a=1; team=\"blue\""), ("cookie", "team=red")],
        );
        assert_eq!(key(&src, &h, &u), Found::Ambiguous, "over two headers");
        let (h, u) = head("/", &[("cookie", "team=b; team=a")]);
        assert_eq!(key(&src, &h, &u), Found::Ambiguous, "in one header");
        let (h, u) = head("/", &[("cookie", "teams=x; steam=y")]);
        assert_eq!(key(&src, &h, &u), Found::Missing, "names match exactly");
    }

    #[test]
    fn path_segment_keys() {
        let (h, u) = head("/t/acme%2Done/chat?x=1", &[]);
        assert_eq!(key(&KeySource::PathSegment(2), &h, &u), value("acme-one"));
        assert_eq!(key(&KeySource::PathSegment(1), &h, &u), value("t"));
        assert_eq!(key(&KeySource::PathSegment(4), &h, &u), Found::Missing);
        let (h, u) = head("/%ff", &[]);
        assert_eq!(key(&KeySource::PathSegment(1), &h, &u), Found::Unusable);
    }

    fn tok(from: &TokenSource, h: &HeaderMap, u: &Uri) -> Result<Option<String>, Ambiguous> {
        token(from, h, u).map(|t| t.map(Cow::into_owned))
    }

    #[test]
    fn tokens_from_each_place() {
        let bearer = TokenSource::Header(header::AUTHORIZATION);
        let query = TokenSource::Query("access_token".into());
        let some = |t: &str| Ok(Some(t.to_owned()));
        let (h, u) = head(
            "/?access_token=q.q.q",
            &[("authorization", "Bearer a.b.c"), ("cookie", "jwt=c.c.c")],
        );
        assert_eq!(tok(&bearer, &h, &u), some("a.b.c"));
        assert_eq!(tok(&query, &h, &u), some("q.q.q"));
        assert_eq!(
            tok(&TokenSource::Cookie("jwt".into()), &h, &u),
            some("c.c.c")
        );
        let (h, u) = head("/", &[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(tok(&bearer, &h, &u), Ok(None), "not a bearer token");
        let (h, u) = head("/", &[("authorization", "bearer   x.y.z")]);
        assert_eq!(tok(&bearer, &h, &u), some("x.y.z"));
        let (h, u) = head("/", &[("authorization", "Bearer ")]);
        assert_eq!(tok(&bearer, &h, &u), Ok(None));
        let other = TokenSource::Header(HeaderName::from_static("x-jwt"));
        let (h, u) = head("/", &[("x-jwt", "x.y.z")]);
        assert_eq!(tok(&other, &h, &u), some("x.y.z"));
        let (h, u) = head("/?access_token=bob&access_token=alice", &[]);
        assert_eq!(tok(&query, &h, &u), Err(Ambiguous), "two tokens");
        let (h, u) = head(
            "/",
            &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
        );
        assert_eq!(tok(&bearer, &h, &u), Err(Ambiguous));
    }
}
