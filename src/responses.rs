//! Every answer wsgate writes itself rather than passing on from the
//! upstream: a status, a static text body, and the headers that status needs;
//! and its own 101, for a refusal said with a Close frame.
//!
//! A leaf module: it knows nothing of why a request failed (that is
//! the `error` module's job), only how each kind of refusal is said on the
//! wire, so every 4xx and 5xx wsgate makes up is built here and nowhere else
//! (the one exception is hyper's own 431 for a request head over 64 KiB).
//! Bodies are `&'static str`: a refusal under a reconnect
//! storm allocates nothing but the response head.
//!
//! On the fast path (`crate::first_head`) there is no hyper server to write
//! them, so [`Synthetic::encode`] and [`encode_switching`] put them on the
//! wire as hyper would: lowercase names, `content-length`, and `date`
//! (cached per second).

use std::convert::Infallible;

use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// The response body type on the client port: upstream bodies stream
/// through; wsgate's own answers are short static texts.
pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A body holding `bytes` as they are.
pub(crate) fn body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An answer wsgate makes up itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Synthetic {
    /// The status sent.
    pub(crate) status: StatusCode,
    /// The whole body, one line ending in a newline.
    pub(crate) text: &'static str,
    /// `Retry-After` in whole seconds: a shed client should come back
    /// later, not queue here. Set on every 503 and 429.
    pub(crate) retry_after: Option<u64>,
    /// `Connection: close`: on the upgrade path the client may already be
    /// sending frames after its request, which must never be parsed as a
    /// next request.
    pub(crate) close: bool,
    /// `Sec-WebSocket-Version: 13`, which RFC 6455 §4.4 asks for when a
    /// client offered a version the server does not speak.
    pub(crate) websocket_version: bool,
    /// `Allow`, which a 405 must carry (RFC 9110 §15.5.6).
    pub(crate) allow: Option<&'static str>,
}

impl Synthetic {
    /// A plain answer: only a status and a text.
    pub(crate) const fn new(status: StatusCode, text: &'static str) -> Self {
        Synthetic {
            status,
            text,
            retry_after: None,
            close: false,
            websocket_version: false,
            allow: None,
        }
    }

    /// The response as it goes to the client.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(body(Bytes::from_static(self.text.as_bytes())));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(methods) = self.allow {
            h.insert(header::ALLOW, HeaderValue::from_static(methods));
        }
        if self.websocket_version {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        resp
    }
}

impl Synthetic {
    /// The whole answer as bytes on the wire, head and body, as hyper writes
    /// [`Synthetic::into_response`].
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.text.len());
        status_line(&mut out, self.status);
        line(&mut out, "content-type", b"text/plain; charset=utf-8");
        if self.close {
            line(&mut out, "connection", b"close");
        }
        if let Some(secs) = self.retry_after {
            line(
                &mut out,
                "retry-after",
                itoa::Buffer::new().format(secs).as_bytes(),
            );
        }
        if let Some(methods) = self.allow {
            line(&mut out, "allow", methods.as_bytes());
        }
        if self.websocket_version {
            line(&mut out, "sec-websocket-version", b"13");
        }
        line(
            &mut out,
            "content-length",
            itoa::Buffer::new().format(self.text.len()).as_bytes(),
        );
        date_line(&mut out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.text.as_bytes());
        out
    }
}

/// wsgate's own 101 ([`switching`]) as bytes on the wire.
pub(crate) fn encode_switching(accept: &HeaderValue, protocol: Option<&HeaderValue>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    status_line(&mut out, StatusCode::SWITCHING_PROTOCOLS);
    line(&mut out, "connection", b"upgrade");
    line(&mut out, "upgrade", b"websocket");
    line(&mut out, "sec-websocket-accept", accept.as_bytes());
    if let Some(p) = protocol {
        line(&mut out, "sec-websocket-protocol", p.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One header line. Values are `HeaderValue`s or static text: neither can
/// hold CR or LF.
fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `date: <IMF-fixdate>`, formatted once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        line(out, "date", text.as_bytes());
    });
}

/// wsgate's own `101 Switching Protocols` to a WebSocket upgrade (a
/// close-mode refusal, which only sends a Close), with the client key's
/// `accept` value and `protocol`, one of the client's own offers: a browser
/// fails a 101 that selects none of them. No extension is selected.
pub(crate) fn switching(accept: HeaderValue, protocol: Option<HeaderValue>) -> Response<ProxyBody> {
    let mut resp = Response::new(body(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_writes_what_the_responses_say() {
        let accept = HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let protocol = HeaderValue::from_static("chat");
        let wire = encode_switching(&accept, Some(&protocol));
        let ours = switching(accept, Some(protocol));
        let mut expected = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        for (name, value) in ours.headers() {
            line(&mut expected, name.as_str(), value.as_bytes());
        }
        expected.extend_from_slice(b"\r\n");
        assert_eq!(wire, expected);
        let shed = Synthetic {
            retry_after: Some(3),
            close: true,
            ..Synthetic::new(StatusCode::SERVICE_UNAVAILABLE, "busy\n")
        };
        let wire = shed.encode();
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut slots);
        let len = match parsed.parse(&wire) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("{other:?}"),
        };
        assert_eq!(parsed.code, Some(503));
        assert_eq!(&wire[len..], b"busy\n");
        let resp = shed.into_response();
        for h in parsed.headers.iter() {
            match resp.headers().get(h.name) {
                Some(v) => assert_eq!(v.as_bytes(), h.value, "{}", h.name),
                None => assert!(["content-length", "date"].contains(&h.name), "{}", h.name),
            }
        }
        assert_eq!(parsed.headers.len(), resp.headers().len() + 2);
    }

    #[test]
    fn headers_follow_the_flags() {
        let plain = Synthetic::new(StatusCode::BAD_GATEWAY, "x\n").into_response();
        assert_eq!(plain.status(), StatusCode::BAD_GATEWAY);
        assert!(!plain.headers().contains_key(header::CONNECTION));
        assert!(!plain.headers().contains_key(header::RETRY_AFTER));
        let shed = Synthetic {
            retry_after: Some(3),
            close: true,
            websocket_version: true,
            ..Synthetic::new(StatusCode::SERVICE_UNAVAILABLE, "busy\n")
        }
        .into_response();
        assert_eq!(shed.headers()[header::RETRY_AFTER], "3");
        assert_eq!(shed.headers()[header::CONNECTION], "close");
        assert_eq!(shed.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }
}
