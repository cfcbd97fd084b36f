//! The access log (docs/operations.md#access-log, issue 14) seen from outside: the wsgate binary
//! with its stderr read for the `wsgate::access` "session" record, an
//! upstream that hands each upgraded connection to the test (so the test
//! writes and counts every byte the upstream sends), frames and a tally of
//! what each side sent, the record checked field by field against what the
//! test did, and the two session metrics compared before and after.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::support::client::{read_frame, read_head, status_of, KEY};
use crate::support::metrics::scrape;
use crate::support::process::GateProcess;
use crate::support::upstream::{accept_for, read_request_head, spawn_raw_upstream, RawUpstream};
use crate::support::{within, DEADLINE};

/// The access-log target and message (the contract's fixed names).
pub const ACCESS_TARGET: &str = "wsgate::access";
pub const SESSION_MESSAGE: &str = "session";
/// The session metrics.
pub const SESSIONS_ENDED: &str = "wsgate_sessions_ended_total";
pub const CLOSE_CODES: &str = "wsgate_close_codes_total";

// ---------------------------------------------------------------- the binary

/// The wsgate binary in front of an upstream, with its two addresses.
pub struct Gate {
    pub process: GateProcess,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Gate {
    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr_text()
    }
}

/// Starts `wsgate ARGS` in front of `upstream` on port 0 with `env` on top
/// (`WSGATE_LOG_FORMAT` is `text` unless `env` says otherwise) and reads
/// both addresses from its start-up log, text or JSON, polling without
/// blocking the runtime.
pub async fn start_gate(upstream: SocketAddr, args: &[&str], env: &[(&str, String)]) -> Gate {
    let mut all = vec![
        ("WSGATE_LISTEN", "127.0.0.1:0".to_owned()),
        ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("WSGATE_UPSTREAM", upstream.to_string()),
    ];
    all.extend(env.iter().cloned());
    let process = GateProcess::start(args, &all, None);
    let start = Instant::now();
    loop {
        let text = process.stderr_text();
        if let (Some(proxy), Some(admin)) = (
            listening_addr(&text, "proxy"),
            listening_addr(&text, "admin"),
        ) {
            return Gate {
                process,
                proxy,
                admin,
            };
        }
        assert!(
            start.elapsed() < DEADLINE,
            "wsgate never said where it listens; stderr:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The address of the `{what} listening` start-up line, as text
/// (`… addr=127.0.0.1:1234`) or as JSON (an `addr` field, flattened or
/// under `fields`).
pub fn listening_addr(text: &str, what: &str) -> Option<SocketAddr> {
    let message = format!("{what} listening");
    text.lines().find_map(|line| {
        if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) {
            let fields = obj.get("fields").and_then(Value::as_object);
            let field = |k: &str| obj.get(k).or_else(|| fields.and_then(|f| f.get(k)));
            if field("message").and_then(Value::as_str) != Some(message.as_str()) {
                return None;
            }
            return field("addr")?.as_str()?.parse().ok();
        }
        let prefix = format!("{message} addr=");
        let rest = &line[line.find(&prefix)? + prefix.len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse().ok()
    })
}

/// Polls (without blocking the runtime) until stderr contains `needle`;
/// returns the whole text.
pub async fn wait_stderr(gate: &Gate, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = gate.stderr();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "wsgate never logged {needle:?}; stderr:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- the record

/// Every JSON object on `text`'s lines logged with target `wsgate::access`.
pub fn access_lines(text: &str) -> Vec<Map<String, Value>> {
    text.lines()
        .filter(|l| l.contains(ACCESS_TARGET))
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(obj)) => Some(obj),
            _ => None,
        })
        .filter(|obj| obj.get("target").and_then(Value::as_str) == Some(ACCESS_TARGET))
        .collect()
}

/// The `session` records in `text` (JSON lines of the access target whose
/// top-level `message` is `session`).
pub fn session_records(text: &str) -> Vec<Map<String, Value>> {
    access_lines(text)
        .into_iter()
        .filter(|obj| obj.get("message").and_then(Value::as_str) == Some(SESSION_MESSAGE))
        .collect()
}

/// Polls stderr until the session record of `path` appears; returns it
/// and when it was seen. Fails, quoting stderr, after [`DEADLINE`]; fails at
/// once if the record is there but its fields are not flattened to the top
/// level (the contract's `flatten_event(true)`).
pub async fn access_record(gate: &Gate, path: &str) -> (Map<String, Value>, Instant) {
    let start = Instant::now();
    loop {
        let text = gate.stderr();
        if let Some(rec) = session_records(&text)
            .into_iter()
            .find(|r| r.get("path").and_then(Value::as_str) == Some(path))
        {
            return (rec, Instant::now());
        }
        if let Some(nested) = access_lines(&text).into_iter().find(|obj| {
            obj.get("fields")
                .and_then(|f| f.get("message"))
                .and_then(Value::as_str)
                == Some(SESSION_MESSAGE)
        }) {
            panic!(
                "a session record whose fields are not flattened to the top level: {}",
                Value::Object(nested)
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no {ACCESS_TARGET} session record for path {path:?}; stderr:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a session record must say. `duration_ms` is the window the test
/// measured around the session.
#[derive(Debug, Clone)]
pub struct Expected {
    pub client: String,
    pub path: String,
    pub subprotocol: String,
    pub keys: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub close_code: u64,
    pub close_reason: String,
    pub closed_by: String,
    pub end: String,
    pub duration_ms: RangeInclusive<u64>,
}

impl Expected {
    /// A session from 127.0.0.1 on `path`, no subprotocol, no keys, the
    /// counts of `client` and `upstream`, ending with (`closed_by`, `end`,
    /// `close_code`, `close_reason`) within `duration_ms`.
    pub fn new(
        path: &str,
        client: &Tally,
        upstream: &Tally,
        (closed_by, end): (&str, &str),
        (close_code, close_reason): (u16, &str),
        duration_ms: RangeInclusive<u64>,
    ) -> Expected {
        Expected {
            client: "127.0.0.1".into(),
            path: path.into(),
            subprotocol: String::new(),
            keys: String::new(),
            bytes_in: client.bytes,
            bytes_out: upstream.bytes,
            msgs_in: client.msgs,
            msgs_out: upstream.msgs,
            close_code: u64::from(close_code),
            close_reason: close_reason.into(),
            closed_by: closed_by.into(),
            end: end.into(),
            duration_ms,
        }
    }
}

/// Checks every field of `rec` against `want` (presence, JSON type and
/// value) and fails with every mismatch at once and the whole record.
pub fn assert_record(rec: &Map<String, Value>, want: &Expected) {
    let mut wrong = Vec::new();
    let mut string = |name: &str, ok: &dyn Fn(&str) -> bool, expected: &str| match rec.get(name) {
        Some(Value::String(s)) if ok(s) => {}
        Some(Value::String(s)) => wrong.push(format!("{name}: want {expected}, got {s:?}")),
        Some(other) => wrong.push(format!("{name}: want a string, got {other}")),
        None => wrong.push(format!("{name}: missing")),
    };
    string(
        "session",
        &|s| {
            s.len() == 16
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        },
        "16 lowercase hex digits",
    );
    for (name, value) in [
        ("client", &want.client),
        ("path", &want.path),
        ("subprotocol", &want.subprotocol),
        ("keys", &want.keys),
        ("close_reason", &want.close_reason),
        ("closed_by", &want.closed_by),
        ("end", &want.end),
    ] {
        string(name, &|s| s == value.as_str(), &format!("{value:?}"));
    }
    let mut integer = |name: &str, ok: &dyn Fn(u64) -> bool, expected: String| match rec.get(name) {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if ok(v) => {}
            Some(v) => wrong.push(format!("{name}: want {expected}, got {v}")),
            None => wrong.push(format!("{name}: want a non-negative integer, got {n}")),
        },
        Some(other) => wrong.push(format!("{name}: want an integer, got {other}")),
        None => wrong.push(format!("{name}: missing")),
    };
    for (name, value) in [
        ("bytes_in", want.bytes_in),
        ("bytes_out", want.bytes_out),
        ("msgs_in", want.msgs_in),
        ("msgs_out", want.msgs_out),
        ("close_code", want.close_code),
    ] {
        integer(name, &|v| v == value, value.to_string());
    }
    integer(
        "duration_ms",
        &|v| want.duration_ms.contains(&v),
        format!("{:?} (measured around the session)", want.duration_ms),
    );
    for (name, value) in [
        ("target", ACCESS_TARGET),
        ("message", SESSION_MESSAGE),
        ("level", "INFO"),
    ] {
        if rec.get(name).and_then(Value::as_str) != Some(value) {
            wrong.push(format!("{name}: want {value:?}, got {:?}", rec.get(name)));
        }
    }
    assert!(
        wrong.is_empty(),
        "the access record disagrees with the session:\n  {}\nrecord: {}",
        wrong.join("\n  "),
        Value::Object(rec.clone())
    );
}

/// Whole milliseconds from `from` to `to`, rounded down: a lower bound.
pub fn ms_floor(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_millis() as u64
}

/// Whole milliseconds from `from` to `to`, rounded up: an upper bound.
pub fn ms_ceil(from: Instant, to: Instant) -> u64 {
    let d = to.saturating_duration_since(from);
    d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000))
}

// ---------------------------------------------------------------- metrics

/// Every series of metric `name` in an exposition: sorted labels → value.
pub fn series(text: &str, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let labels = match rest {
                "" => Vec::new(),
                r => {
                    let mut v: Vec<(String, String)> = r
                        .strip_prefix('{')?
                        .strip_suffix('}')?
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=')?;
                            Some((k.to_owned(), v.trim_matches('"').to_owned()))
                        })
                        .collect::<Option<_>>()?;
                    v.sort();
                    v
                }
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn label_key(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

/// Both session metrics at one scrape.
#[derive(Debug, Clone)]
pub struct SessionMetrics {
    pub ended: BTreeMap<Vec<(String, String)>, f64>,
    pub codes: BTreeMap<Vec<(String, String)>, f64>,
}

pub async fn session_metrics(admin: SocketAddr) -> SessionMetrics {
    let text = scrape(admin).await;
    SessionMetrics {
        ended: series(&text, SESSIONS_ENDED),
        codes: series(&text, CLOSE_CODES),
    }
}

/// Fails unless `metric`'s series moved from `before` to `after` by exactly
/// +1 on `labels` (which existed before, at start-up) and nowhere else.
fn assert_moved_once(
    metric: &str,
    before: &BTreeMap<Vec<(String, String)>, f64>,
    after: &BTreeMap<Vec<(String, String)>, f64>,
    labels: &[(&str, &str)],
) {
    let key = label_key(labels);
    let was = before.get(&key).copied().unwrap_or_else(|| {
        panic!("{metric}{labels:?} did not exist before the session (series at 0 from start-up); had {before:?}")
    });
    let mut moved = Vec::new();
    for (k, v) in after {
        let old = before.get(k).copied().unwrap_or(0.0);
        if *v != old {
            moved.push(format!("{k:?}: {old} -> {v}"));
        }
    }
    assert_eq!(
        after.get(&key).copied(),
        Some(was + 1.0),
        "{metric}{labels:?} did not move by exactly 1; moved: {moved:?}"
    );
    assert_eq!(
        moved.len(),
        1,
        "{metric}: only {labels:?} may move; moved: {moved:?}"
    );
}

/// Polls until `wsgate_sessions_ended_total{closed_by, end}` and
/// `wsgate_close_codes_total{closed_by, code}` are one above `before`,
/// then checks that no other series of the two moved.
pub async fn assert_counted_once(
    admin: SocketAddr,
    before: &SessionMetrics,
    (closed_by, end): (&str, &str),
    (code_by, code): (&str, &str),
) {
    let ended = label_key(&[("closed_by", closed_by), ("end", end)]);
    let coded = label_key(&[("closed_by", code_by), ("code", code)]);
    let start = Instant::now();
    let after = loop {
        let now = session_metrics(admin).await;
        let up = |m: &BTreeMap<_, f64>, b: &BTreeMap<_, f64>, k| {
            m.get(k).copied().unwrap_or(0.0) > b.get(k).copied().unwrap_or(0.0)
        };
        if up(&now.ended, &before.ended, &ended) && up(&now.codes, &before.codes, &coded) {
            break now;
        }
        if start.elapsed() > DEADLINE {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_moved_once(
        SESSIONS_ENDED,
        &before.ended,
        &after.ended,
        &[("closed_by", closed_by), ("end", end)],
    );
    assert_moved_once(
        CLOSE_CODES,
        &before.codes,
        &after.codes,
        &[("closed_by", code_by), ("code", code)],
    );
}

// ---------------------------------------------------------------- frames

/// A Close payload: status code, then the reason's bytes.
pub fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// What one side sent: bytes written after the upgrade (frame headers,
/// masks and Close frames included) and data messages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub bytes: u64,
    pub msgs: u64,
}

/// Writes `bytes` to `s` and adds them to `tally` with `msgs` data messages
/// (1 for a whole data message or for the first fragment of one, 0 for
/// control frames and continuations).
pub async fn send(s: &mut TcpStream, tally: &mut Tally, bytes: &[u8], msgs: u64) {
    within("write", s.write_all(bytes))
        .await
        .expect("write a frame");
    tally.bytes += bytes.len() as u64;
    tally.msgs += msgs;
}

/// Reads one frame and checks its first byte, masking and payload.
pub async fn expect_frame(s: &mut TcpStream, b0: u8, masked: bool, payload: &[u8], what: &str) {
    let (got_b0, got_masked, got) = read_frame(s).await;
    assert_eq!(
        (got_b0, got_masked, got.as_slice()),
        (b0, masked, payload),
        "{what}"
    );
}

/// Reads one Close frame; returns (code, reason bytes).
pub async fn expect_close(s: &mut TcpStream, masked: bool, what: &str) -> (u16, Vec<u8>) {
    let (b0, got_masked, p) = read_frame(s).await;
    assert_eq!((b0, got_masked), (0x88, masked), "{what}: a Close frame");
    assert!(p.len() >= 2, "{what}: a Close without a status: {p:?}");
    (u16::from_be_bytes([p[0], p[1]]), p[2..].to_vec())
}

/// Reads until EOF or a reset; returns the bytes that came (within
/// [`DEADLINE`]).
pub async fn read_rest(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    within("EOF", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

// ---------------------------------------------------------------- clients

/// A raw WebSocket upgrade of `path` with extra header lines `headers`
/// (`"Name: value"`), and `early` bytes written in the same write as the
/// request head (frames sent with the handshake). Returns the socket once
/// the 101 is read (nothing after it consumed), the 101's head, and the
/// instant it was read (after the admission: a lower bound's start).
pub async fn upgrade_path(
    addr: SocketAddr,
    path: &str,
    headers: &[&str],
    early: &[u8],
) -> (TcpStream, String, Instant) {
    let (s, head) = upgrade_answer(addr, path, headers, early).await;
    assert_eq!(status_of(&head), 101, "upgrade refused: {head}");
    let admitted = Instant::now();
    (s, head, admitted)
}

/// The same request as [`upgrade_path`], whatever the answer: the socket
/// and the answer's head (a refusal's body is left unread).
pub async fn upgrade_answer(
    addr: SocketAddr,
    path: &str,
    headers: &[&str],
    early: &[u8],
) -> (TcpStream, String) {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(early);
    within("write the upgrade", s.write_all(&bytes))
        .await
        .expect("write the upgrade");
    let head = read_head(&mut s).await;
    (s, head)
}

/// A minimal HTTP/1.1 request with `headers` and `body`; (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    within("write", s.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = within("response", s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status_of(&text), body)
}

// ---------------------------------------------------------------- upstream

/// One upgraded upstream connection, handed to the test after the 101.
pub struct UpConn {
    pub s: TcpStream,
    /// The request head wsgate forwarded.
    pub head: String,
}

/// An upstream that answers every upgrade with 101 (choosing the *last*
/// subprotocol offered, if any, so a record naming the first one or the
/// whole list is caught), writes `greeting` in the same write as the 101,
/// and hands the connection to the test, which then speaks for it frame by
/// frame.
pub struct HandoffUpstream {
    pub addr: SocketAddr,
    conns: tokio::sync::Mutex<mpsc::UnboundedReceiver<UpConn>>,
    _raw: RawUpstream,
}

impl HandoffUpstream {
    pub async fn spawn(greeting: Vec<u8>) -> HandoffUpstream {
        let (tx, rx) = mpsc::unbounded_channel();
        let raw = spawn_raw_upstream(move |mut s: TcpStream| {
            let tx = tx.clone();
            let greeting = greeting.clone();
            async move {
                let head = read_request_head(&mut s).await;
                if !head.ends_with("\r\n\r\n") {
                    return;
                }
                let protocol = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("sec-websocket-protocol")
                        .then(|| v.split(',').next_back().unwrap_or("").trim().to_owned())
                });
                let mut answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Accept: {}\r\n",
                    accept_for(&head)
                );
                if let Some(p) = protocol {
                    answer.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
                }
                answer.push_str("\r\n");
                let mut bytes = answer.into_bytes();
                bytes.extend_from_slice(&greeting);
                if s.write_all(&bytes).await.is_ok() {
                    let _ = tx.send(UpConn { s, head });
                }
            }
        })
        .await;
        HandoffUpstream {
            addr: raw.addr,
            conns: tokio::sync::Mutex::new(rx),
            _raw: raw,
        }
    }

    /// The next upgraded connection, within [`DEADLINE`].
    pub async fn next(&self) -> UpConn {
        within("an upstream connection", async {
            self.conns.lock().await.recv().await
        })
        .await
        .expect("the upstream's accept loop runs")
    }
}
