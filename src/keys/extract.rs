//! Reading a key value, or a JWT, out of an upgrade request: pure
//! functions of the head (headers and URI), no I/O.
//!
//! Every value is checked the same way before it can be a key: at most 256
//! bytes of visible ASCII after decoding (docs/operations.md#limits-per-key). Query parameters and path
//! segments are percent-decoded, so `t%41` and `tA` are one key.

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderName, Uri};

use crate::config::{is_usable_key, KeySource, TokenSource};

/// What a request holds for one key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found<'a> {
    /// A usable value.
    Value(Cow<'a, str>),
    /// Nothing (or an empty value): the rule's `missing` mode decides.
    Missing,
    /// Something that cannot be a key (too long, not visible ASCII, a header
    /// sent twice): 400, whatever the `missing` mode.
    Unusable,
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
        KeySource::Header(name) => match single_header(headers, name) {
            Ok(v) => Found::checked(v.map(Cow::Borrowed)),
            Err(Ambiguous) => Found::Unusable,
        },
        KeySource::Query(param) => Found::checked(query(uri, param)),
        KeySource::Cookie(name) => Found::checked(cookie(headers, name).map(Cow::Borrowed)),
        KeySource::PathSegment(n) => match path_segment(uri, *n) {
            Ok(v) => Found::checked(v),
            Err(Ambiguous) => Found::Unusable,
        },
        KeySource::JwtClaim(_) => Found::Missing,
    }
}

/// The token a request carries for `from`; `None` when it has none.
/// `Authorization` (or any header) may carry it as `Bearer <token>`.
pub(crate) fn token<'a>(
    from: &TokenSource,
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Option<Cow<'a, str>> {
    let raw = match from {
        TokenSource::Header(name) => {
            let v = single_header(headers, name).ok().flatten()?;
            let scheme = v.get(..7);
            Cow::Borrowed(
                if scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer ")) {
                    v[7..].trim_start()
                } else if *name == header::AUTHORIZATION {
                    // Another scheme (Basic, …) is not a JWT: no token.
                    return None;
                } else {
                    v
                },
            )
        }
        TokenSource::Query(param) => query(uri, param)?,
        TokenSource::Cookie(name) => Cow::Borrowed(cookie(headers, name)?),
    };
    (!raw.is_empty()).then_some(raw)
}

/// A value that must be single but was given more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ambiguous;

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

/// The first value of query parameter `param`, decoded.
fn query<'a>(uri: &'a Uri, param: &str) -> Option<Cow<'a, str>> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == param)
        .map(|(_, v)| v)
}

/// The value of cookie `name` (RFC 6265: `a=1; b=2`, possibly over several
/// `Cookie` headers), without surrounding double quotes.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// The `n`-th (1-based) segment of the path, percent-decoded. A segment
/// that does not decode to UTF-8 is unusable.
fn path_segment(uri: &Uri, n: usize) -> Result<Option<Cow<'_, str>>, Ambiguous> {
    let Some(segment) = uri.path().split('/').skip(1).nth(n - 1) else {
        return Ok(None);
    };
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(Some)
        .map_err(|_| Ambiguous)
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
        assert_eq!(key(&src, &h, &u), Found::Unusable, "sent twice");
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
        let (h, u) = head("/ws?x=1&tenant=t%41&tenant=other", &[]);
        assert_eq!(key(&src, &h, &u), value("tA"));
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
        let (h, u) = head(
            "/",
            &[("cookie", "a=1; team=\"blue\""), ("cookie", "team=red")],
        );
        assert_eq!(key(&src, &h, &u), value("blue"), "the first one");
        let (h, u) = head("/", &[("cookie", "teams=x; steam=y")]);
        assert_eq!(key(&src, &h, &u), Found::Missing, "names match exactly");
    }

    #[test]
    fn path_segment_keys() {
        let (h, u) = head("/t/acme%2Done/chat?x=1", &[]);
        assert_eq!(key(&KeySource::PathSegment(2), &h, &u), value("acme-one"));
        assert_eq!(key(&KeySource::PathSegment(1), &h, &u), value("t"));
        assert_eq!(key(&KeySource::PathSegment(4), &h, &u), Found::Missing);
        let (h, u) = head("/t//chat", &[]);
        assert_eq!(key(&KeySource::PathSegment(2), &h, &u), Found::Missing);
        let (h, u) = head("/%ff", &[]);
        assert_eq!(key(&KeySource::PathSegment(1), &h, &u), Found::Unusable);
    }

    #[test]
    fn tokens_from_each_place() {
        let bearer = TokenSource::Header(header::AUTHORIZATION);
        let (h, u) = head(
            "/?access_token=q.q.q",
            &[("authorization", "Bearer a.b.c"), ("cookie", "jwt=c.c.c")],
        );
        assert_eq!(token(&bearer, &h, &u).as_deref(), Some("a.b.c"));
        assert_eq!(
            token(&TokenSource::Query("access_token".into()), &h, &u).as_deref(),
            Some("q.q.q")
        );
        assert_eq!(
            token(&TokenSource::Cookie("jwt".into()), &h, &u).as_deref(),
            Some("c.c.c")
        );
        let (h, u) = head("/", &[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(token(&bearer, &h, &u), None, "not a bearer token");
        let (h, u) = head("/", &[("authorization", "bearer   x.y.z")]);
        assert_eq!(token(&bearer, &h, &u).as_deref(), Some("x.y.z"));
        let (h, u) = head("/", &[("authorization", "Bearer ")]);
        assert_eq!(token(&bearer, &h, &u), None);
        let other = TokenSource::Header(HeaderName::from_static("x-jwt"));
        let (h, u) = head("/", &[("x-jwt", "x.y.z")]);
        assert_eq!(token(&other, &h, &u).as_deref(), Some("x.y.z"));
    }
}
