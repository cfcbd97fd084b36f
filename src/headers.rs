//! Pure header logic: classifying a request, validating a WebSocket
//! handshake, and rewriting headers for the hop to the upstream and back.
//!
//! Nothing here does IO, so all of it is unit- and property-tested. The rules:
//! - An upgrade is a WebSocket attempt when `Upgrade` names `websocket`; it is
//!   then validated fully (RFC 6455 §4.2.1) before any slot or upstream is
//!   touched, and anything malformed or ambiguous is a 400.
//! - Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in
//!   `Connection` are removed on each hop, except the ones the WebSocket
//!   handshake itself needs, which a client cannot get us to drop.
//! - `X-Forwarded-For` is appended to with the socket peer, never replaced by
//!   or trusted from what the client sent.

use std::net::IpAddr;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

/// Standard hop-by-hop headers, always removed when forwarding.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `X-Forwarded-For`.
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What kind of request the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// A valid WebSocket upgrade handshake.
    WebSocket,
    /// Anything else: reverse-proxied as plain HTTP.
    Plain,
}

/// Why a WebSocket handshake is malformed (each becomes a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeError {
    /// Not `GET`.
    Method,
    /// Not HTTP/1.1.
    Version,
    /// `Connection` does not carry `upgrade`.
    Connection,
    /// More than one `Upgrade` header line, or a value that is not a token list.
    Upgrade,
    /// `Sec-WebSocket-Version` missing or not exactly `13`.
    WebSocketVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes of base64.
    Key,
    /// A body on an upgrade request: its bytes would be read as frames.
    Body,
}

impl HandshakeError {
    /// The 400's body: one static line per cause, so a refusal allocates
    /// nothing. The error's `Display` is the same line without its newline.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            HandshakeError::Method => "bad websocket handshake: a websocket upgrade must use GET\n",
            HandshakeError::Version => {
                "bad websocket handshake: a websocket upgrade needs HTTP/1.1\n"
            }
            HandshakeError::Connection => {
                "bad websocket handshake: Connection header must include upgrade\n"
            }
            HandshakeError::Upgrade => {
                "bad websocket handshake: Upgrade header must appear once and name websocket\n"
            }
            HandshakeError::WebSocketVersion => {
                "bad websocket handshake: Sec-WebSocket-Version must be 13\n"
            }
            HandshakeError::Key => {
                "bad websocket handshake: Sec-WebSocket-Key must be one base64 value of 16 bytes\n"
            }
            HandshakeError::Body => {
                "bad websocket handshake: a websocket upgrade must not carry a body\n"
            }
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason().trim_end())
    }
}

impl std::error::Error for HandshakeError {}

/// Why wsgate answers a request itself, whatever kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// `CONNECT` or `TRACE` (405): a sidecar in front of one service has
    /// no tunnel to open, and `TRACE` would echo headers an ingress added.
    #[error("method not allowed")]
    Method,
    /// More than one `Host` (400, RFC 9112 §3.2): which one the upstream
    /// routes by is anybody's guess.
    #[error("more than one Host header")]
    Host,
}

impl RequestError {
    /// The answer's body: one static line.
    pub(crate) fn text(self) -> &'static str {
        match self {
            RequestError::Method => "wsgate: CONNECT and TRACE are not accepted\n",
            RequestError::Host => "wsgate: bad request: more than one Host header\n",
        }
    }

    /// The methods a 405 says are allowed.
    pub(crate) const ALLOWED: &'static str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
}

/// What every request must pass before it is classified: not `CONNECT`
/// or `TRACE`, at most one `Host`.
///
/// # Errors
/// Which rule the request breaks.
pub(crate) fn screen_request(method: &Method, headers: &HeaderMap) -> Result<(), RequestError> {
    if *method == Method::CONNECT || *method == Method::TRACE {
        return Err(RequestError::Method);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(RequestError::Host);
    }
    Ok(())
}

/// Iterates the comma-separated tokens of every value of `name`, trimmed.
/// A token that is not UTF-8 (obs-text) is skipped on its own: it must not
/// hide the other tokens of its value (`Connection: x-secret, \x80` still
/// nominates `x-secret`).
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| std::str::from_utf8(t.trim_ascii()).ok())
        .filter(|t| !t.is_empty())
}

/// Decides whether a request is a WebSocket upgrade, and validates it if so.
///
/// # Errors
/// A request that asks for `Upgrade: websocket` but is malformed.
pub(crate) fn classify(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<RequestKind, HandshakeError> {
    // One pass over the lines (this runs for every request): what each rule
    // below needs, then the rules in their order.
    let mut upgrades = 0usize;
    let mut websocket = false;
    let mut connection_upgrade = false;
    let mut body = false;
    let (mut versions, mut version_13) = (0usize, false);
    let (mut keys, mut key_valid) = (0usize, false);
    for (name, value) in headers {
        let v = value.as_bytes();
        if name == header::UPGRADE {
            upgrades += 1;
            websocket |= names_token(v, "websocket");
        } else if name == header::CONNECTION {
            connection_upgrade |= names_token(v, "upgrade");
        } else if name == header::TRANSFER_ENCODING {
            body = true;
        } else if name == header::CONTENT_LENGTH {
            body |= v != b"0";
        } else if name == header::SEC_WEBSOCKET_VERSION {
            versions += 1;
            version_13 = v.trim_ascii() == b"13";
        } else if name == header::SEC_WEBSOCKET_KEY {
            keys += 1;
            key_valid = is_valid_key(v);
        }
    }
    if !websocket {
        return Ok(RequestKind::Plain);
    }
    if upgrades != 1 {
        return Err(HandshakeError::Upgrade);
    }
    if version != Version::HTTP_11 {
        return Err(HandshakeError::Version);
    }
    if method != Method::GET {
        return Err(HandshakeError::Method);
    }
    if !connection_upgrade {
        return Err(HandshakeError::Connection);
    }
    if body {
        return Err(HandshakeError::Body);
    }
    if versions != 1 || !version_13 {
        return Err(HandshakeError::WebSocketVersion);
    }
    if keys != 1 || !key_valid {
        return Err(HandshakeError::Key);
    }
    Ok(RequestKind::WebSocket)
}

fn is_valid_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    // Decoded on the stack: this runs for every upgrade attempt.
    let mut decoded = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut decoded)
            .is_ok_and(|n| n == 16)
}

/// Names a header that no client can get removed through `Connection`:
/// the WebSocket handshake and the request's target depend on them.
fn is_protected(name: &str) -> bool {
    name.eq_ignore_ascii_case("host")
        || name
            .as_bytes()
            .get(..14)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"sec-websocket-"))
}

fn is_usual_connection_token(token: &str) -> bool {
    token.eq_ignore_ascii_case("upgrade") || token.eq_ignore_ascii_case("keep-alive")
}

/// Removes hop-by-hop headers, those named in `Connection` (except protected
/// ones) and `Upgrade`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `upgrade` and `keep-alive` name headers that go below anyway:
    // skipping them keeps this allocation-free for an ordinary upgrade.
    let named: Vec<HeaderName> = connection_nominated(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Sets the `X-Forwarded-*` headers for a request going upstream:
/// `X-Forwarded-For` gets the socket peer appended to what the client sent;
/// `X-Forwarded-Proto` and `X-Forwarded-Host` are set from this hop.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        // The common case for a sidecar: the peer is the only entry.
        let value = HeaderValue::from_str(&peer.to_string())
            .expect("an IP address is a valid header value");
        headers.insert(X_FORWARDED_FOR, value);
        set_proto_and_host(headers);
        return;
    }
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let mut value = previous.join(", ");
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer.to_string());
    // Visible-ASCII values joined with ", " plus an IP address: always a
    // valid header value; the fallback keeps at least the peer.
    let value = HeaderValue::from_str(&value).unwrap_or_else(|_| {
        HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
    });
    headers.insert(X_FORWARDED_FOR, value);
    set_proto_and_host(headers);
}

fn set_proto_and_host(headers: &mut HeaderMap) {
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    } else {
        headers.remove(X_FORWARDED_HOST);
    }
}

/// An `X-Forwarded-For` entry at the trusted position that is not an
/// address: a trusted proxy that writes something else, or fewer proxies
/// in front than `trusted_hops` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnreadableForwardedFor;

/// The client's address for per-IP limits (docs/operations.md#rollouts `trusted_hops`): with 0
/// trusted hops the socket peer; with N ≥ 1 the N-th `X-Forwarded-For` entry
/// counted from the right (the socket peer being the N-th trusted proxy);
/// with fewer entries the socket peer (the request did not come through
/// the proxies).
///
/// # Errors
/// The entry at that position is not an address; the caller falls back
/// to the socket peer and says so.
pub(crate) fn client_address(
    headers: &HeaderMap,
    peer: IpAddr,
    trusted_hops: usize,
) -> Result<IpAddr, UnreadableForwardedFor> {
    if trusted_hops == 0 {
        return Ok(peer);
    }
    let entries: Vec<&str> = tokens(headers, &X_FORWARDED_FOR).collect();
    let Some(index) = entries.len().checked_sub(trusted_hops) else {
        return Ok(peer);
    };
    parse_forwarded_address(entries[index]).ok_or(UnreadableForwardedFor)
}

/// `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]` or `[::1]:80`.
fn parse_forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// Writes the header lines of an admitted upgrade as they go to the
/// upstream, straight from the client's `headers` (nothing is copied into
/// a new map): hop-by-hop headers, those `Connection` names (except
/// protected ones) and `Upgrade` are left out; then the upgrade pair, a
/// `Host` (`upstream_authority`) if the client sent none, `X-Forwarded-*`
/// for this hop (see [`set_forwarded`]), `protocols` as the one
/// `Sec-WebSocket-Protocol` when the policy rewrote the offer (`Some`), and
/// `via` after any `Via` lines the client sent.
pub(crate) fn write_upstream_upgrade(
    out: &mut Vec<u8>,
    headers: &HeaderMap,
    peer: IpAddr,
    upstream_authority: &str,
    protocols: Option<&[String]>,
    via: &HeaderValue,
) {
    let nominated: Vec<&str> = connection_nominated(headers).collect();
    for (name, value) in headers {
        let dropped = HOP_BY_HOP.contains(name)
            || name == header::UPGRADE
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || (protocols.is_some() && name == header::SEC_WEBSOCKET_PROTOCOL)
            || nominated
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_str()));
        if !dropped {
            line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    line(out, b"connection", b"upgrade");
    line(out, b"upgrade", b"websocket");
    let host = match headers.get(header::HOST) {
        Some(host) => Some(host.as_bytes()),
        None => HeaderValue::from_str(upstream_authority).ok().map(|_| {
            line(out, b"host", upstream_authority.as_bytes());
            upstream_authority.as_bytes()
        }),
    };
    // X-Forwarded-For: what the client sent (entries that are text), then the peer.
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(text) = v.to_str() {
            let text = text.trim();
            if !text.is_empty() {
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
    }
    push_ip(out, peer);
    out.extend_from_slice(b"\r\n");
    line(out, b"x-forwarded-proto", b"http");
    if let Some(host) = host {
        line(out, b"x-forwarded-host", host);
    }
    if let Some(kept) = protocols.filter(|k| !k.is_empty()) {
        out.extend_from_slice(b"sec-websocket-protocol: ");
        for (i, p) in kept.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(p.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    line(out, b"via", via.as_bytes());
}

/// One header line. Header values cannot hold CR or LF (`HeaderValue`
/// refuses them), so nothing a client sent can split the head.
fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// An address as text: IPv4 without `core::fmt` (every upgrade writes one).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            let _ = write!(out, "{ip}");
        }
    }
}

/// The header names a request's `Connection` nominates for removal, but
/// neither protected ones nor the usual `upgrade` and `keep-alive` (which
/// name headers removed anyway).
fn connection_nominated(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    tokens(headers, &header::CONNECTION)
        .filter(|t| !is_protected(t) && !is_usual_connection_token(t))
}

/// Writes the upstream's 101 header lines (`raw`, as read) for the client:
/// hop-by-hop headers, those its `Connection` names (except protected ones)
/// and `Upgrade` left out, then the upgrade pair; `Sec-WebSocket-Accept`,
/// `-Protocol` and `-Extensions` pass through untouched.
pub(crate) fn write_client_switching(out: &mut Vec<u8>, raw: &[httparse::Header<'_>]) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    let is =
        |h: &httparse::Header<'_>, name: &HeaderName| h.name.eq_ignore_ascii_case(name.as_str());
    let nominated = |name: &str| {
        raw.iter()
            .filter(|h| is(h, &header::CONNECTION))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .filter_map(|t| std::str::from_utf8(t.trim_ascii()).ok())
            .filter(|t| !t.is_empty() && !is_protected(t) && !is_usual_connection_token(t))
            .any(|t| t.eq_ignore_ascii_case(name))
    };
    for h in raw {
        let dropped =
            HOP_BY_HOP.iter().any(|n| is(h, n)) || is(h, &header::UPGRADE) || nominated(h.name);
        if !dropped {
            line(out, h.name.as_bytes(), h.value);
        }
    }
    line(out, b"connection", b"upgrade");
    line(out, b"upgrade", b"websocket");
    out.extend_from_slice(b"\r\n");
}

/// Whether a header value (a comma-separated list) has `token`, ignoring case.
pub(crate) fn names_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The GUID RFC 6455 §1.3 appends to the key before hashing it.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`
/// (RFC 6455 §4.2.2): base64 of the SHA-1 of the key and the GUID. Computed
/// on the stack: wsgate's own 101s (close-mode refusals) come in storms.
fn accept_for(key: &[u8]) -> [u8; 28] {
    use sha1::Digest as _;
    let digest = sha1::Sha1::new()
        .chain_update(key.trim_ascii())
        .chain_update(WEBSOCKET_GUID)
        .finalize();
    let mut out = [0u8; 28];
    // 20 bytes are always 28 characters of padded base64.
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut out);
    out
}

/// The `Sec-WebSocket-Accept` header for a client's key, for a 101 wsgate
/// writes itself.
pub(crate) fn accept_header(key: &HeaderValue) -> HeaderValue {
    let accept = accept_for(key.as_bytes());
    HeaderValue::from_bytes(&accept).expect("base64 characters are a valid header value")
}

/// Whether the upstream's 101 carries the accept value derived from our
/// key (`accept`: its one `Sec-WebSocket-Accept` value) and names
/// `websocket` in its `Upgrade`.
pub(crate) fn accept_matches(
    accept: Option<&[u8]>,
    upgrades_to_websocket: bool,
    key: &HeaderValue,
) -> bool {
    upgrades_to_websocket && accept.is_some_and(|a| a.trim_ascii() == accept_for(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn ws_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static(KEY));
        h
    }

    fn classify_h(h: &HeaderMap) -> Result<RequestKind, HandshakeError> {
        classify(&Method::GET, Version::HTTP_11, h)
    }

    #[test]
    fn valid_handshake_is_websocket() {
        assert_eq!(classify_h(&ws_headers()), Ok(RequestKind::WebSocket));
    }

    #[test]
    fn no_upgrade_is_plain() {
        let mut h = ws_headers();
        h.remove(header::UPGRADE);
        assert_eq!(classify_h(&h), Ok(RequestKind::Plain));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(classify_h(&h), Ok(RequestKind::Plain));
    }

    #[test]
    fn malformed_handshakes_are_refused() {
        assert_eq!(
            classify(&Method::POST, Version::HTTP_11, &ws_headers()),
            Err(HandshakeError::Method)
        );
        assert_eq!(
            classify(&Method::GET, Version::HTTP_10, &ws_headers()),
            Err(HandshakeError::Version)
        );
        let cases: [(&str, Option<&str>, HandshakeError); 6] = [
            ("sec-websocket-key", None, HandshakeError::Key),
            ("sec-websocket-key", Some("short"), HandshakeError::Key),
            (
                "sec-websocket-version",
                None,
                HandshakeError::WebSocketVersion,
            ),
            (
                "sec-websocket-version",
                Some("8"),
                HandshakeError::WebSocketVersion,
            ),
            ("connection", Some("keep-alive"), HandshakeError::Connection),
            ("transfer-encoding", Some("chunked"), HandshakeError::Body),
        ];
        for (name, value, err) in cases {
            let mut h = ws_headers();
            match value {
                Some(v) => {
                    h.insert(
                        HeaderName::from_static(name),
                        HeaderValue::from_str(v).expect("valid value"),
                    );
                }
                None => {
                    h.remove(name);
                }
            }
            assert_eq!(classify_h(&h), Err(err), "{name}: {value:?}");
        }
    }

    #[test]
    fn duplicate_upgrade_or_key_headers_are_refused() {
        let mut h = ws_headers();
        h.append(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(classify_h(&h), Err(HandshakeError::Upgrade));
        let mut h = ws_headers();
        h.append(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static(KEY));
        assert_eq!(classify_h(&h), Err(HandshakeError::Key));
    }

    #[test]
    fn content_length_on_upgrade_is_refused_unless_zero() {
        let mut h = ws_headers();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert_eq!(classify_h(&h), Ok(RequestKind::WebSocket));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("40"));
        assert_eq!(classify_h(&h), Err(HandshakeError::Body));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = ws_headers();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-secret, sec-websocket-key, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        let h = upstream_view(&h, "10.0.0.9", None);
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::TE));
        assert!(!h.contains_key(header::PROXY_AUTHORIZATION));
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(
            h[header::SEC_WEBSOCKET_KEY],
            KEY,
            "protected from Connection"
        );
        assert_eq!(h[header::HOST], "example.com", "protected from Connection");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    /// The header lines `write_upstream_upgrade` writes, read back.
    fn upstream_view(h: &HeaderMap, peer: &str, protocols: Option<&[String]>) -> HeaderMap {
        let mut out = b"GET / HTTP/1.1\r\n".to_vec();
        let via = HeaderValue::from_static("1.1 wsgate-test");
        write_upstream_upgrade(
            &mut out,
            h,
            peer.parse().expect("ip"),
            "up:1",
            protocols,
            &via,
        );
        out.extend_from_slice(b"\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&out).expect("parses").is_complete());
        let mut back = HeaderMap::new();
        for l in req.headers.iter() {
            back.append(
                HeaderName::from_bytes(l.name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(l.value).expect("value"),
            );
        }
        back
    }

    #[test]
    fn the_upstream_gets_host_forwarded_headers_one_offer_and_via_last() {
        let mut h = ws_headers();
        h.remove(header::HOST);
        h.append(header::VIA, HeaderValue::from_static("1.1 front"));
        h.append(&X_FORWARDED_HOST, HeaderValue::from_static("spoofed"));
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("a, b"),
        );
        let kept = ["b".to_owned(), "c".to_owned()];
        let up = upstream_view(&h, "::1", Some(&kept));
        assert_eq!(up[header::HOST], "up:1", "the upstream's authority");
        assert_eq!(up[&X_FORWARDED_HOST], "up:1");
        assert_eq!(up[&X_FORWARDED_FOR], "::1");
        let protocols: Vec<_> = up.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().collect();
        assert_eq!(protocols, ["b, c"]);
        let via: Vec<_> = up.get_all(header::VIA).iter().collect();
        assert_eq!(
            via,
            ["1.1 front", "1.1 wsgate-test"],
            "ours after the client's"
        );
        // The offer as the client made it, when the policy left it alone.
        let up = upstream_view(&h, "10.1.2.3", None);
        assert_eq!(up[header::SEC_WEBSOCKET_PROTOCOL], "a, b");
        assert_eq!(up[&X_FORWARDED_FOR], "10.1.2.3");
    }

    #[test]
    fn forwarded_for_is_appended_not_trusted() {
        let mut h = ws_headers();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("5.6.7.8"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
        let up = upstream_view(&h, "::1", None);
        set_forwarded(&mut h, "::1".parse().expect("ip"));
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, ::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        for name in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST] {
            assert_eq!(up.get_all(name).iter().count(), 1, "{name}");
            assert_eq!(up[name], h[name], "the upgrade path says the same: {name}");
        }
    }

    #[test]
    fn client_address_follows_trusted_hops() {
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut h = HeaderMap::new();
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("198.51.100.1, 203.0.113.9:4000"),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("[2001:db8::7]"));
        assert_eq!(
            client_address(&h, peer, 0),
            Ok(peer),
            "0 hops: the socket peer"
        );
        assert_eq!(
            client_address(&h, peer, 1),
            "2001:db8::7".parse().map_err(|_| UnreadableForwardedFor)
        );
        assert_eq!(
            client_address(&h, peer, 2),
            "203.0.113.9".parse().map_err(|_| UnreadableForwardedFor)
        );
        assert_eq!(
            client_address(&h, peer, 3),
            "198.51.100.1".parse().map_err(|_| UnreadableForwardedFor)
        );
        assert_eq!(
            client_address(&h, peer, 4),
            Ok(peer),
            "fewer entries: the socket peer"
        );
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("not-an-ip"));
        assert_eq!(
            client_address(&h, peer, 1),
            Err(UnreadableForwardedFor),
            "said, not silently the peer"
        );
    }

    #[test]
    fn accept_is_checked_against_our_key() {
        let key = HeaderValue::from_static(KEY);
        let right = Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..]);
        assert!(accept_matches(right, true, &key));
        assert!(!accept_matches(right, false, &key), "no Upgrade: websocket");
        assert!(!accept_matches(Some(b"bogus"), true, &key));
        assert!(!accept_matches(None, true, &key), "none, or several");
    }

    #[test]
    fn our_accept_value_is_the_rfc_one() {
        // RFC 6455 §1.3's example, then tungstenite's derivation for others.
        let key = HeaderValue::from_static(KEY);
        assert_eq!(accept_header(&key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        for k in ["AQIDBAUGBwgJCgsMDQ4PEA==", " x3JJHMbDL1EzLkh9GBhXDw== "] {
            let want =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.trim().as_bytes());
            assert_eq!(accept_header(&HeaderValue::from_static(k)), want.as_str());
        }
    }
}
