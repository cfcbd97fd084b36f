//! The access log (docs/operations.md#access-log, issue 14), black-box: the real wsgate binary
//! with `log_format = json`, an upstream on port 0 that hands each upgraded
//! connection to the test ([`HandoffUpstream`]), and raw clients. Every way
//! a session can end is driven on the wire, and its one `wsgate::access`
//! `session` record is parsed from stderr and checked field by field
//! ([`assert_record`]): a 16-hex session id, the client address, the path
//! without its query, the chosen subprotocol, the key values, the exact
//! bytes and data messages each side wrote (counted as the test writes
//! them, Close frames and control frames included in the bytes, control
//! frames never in the messages), the close code and reason, who sent the
//! first Close and why the session ended, and a duration inside the window
//! the test measured around it. The two session metrics move by exactly one
//! on the right labels and nowhere else, and the slot comes back. Each
//! test is its scenario on a [`Rig`] (the binary, the upstream, the metrics
//! before) and one call that checks all three, [`Rig::assert_ended`], for
//! the way it ended ([`Ended`]).
//!
//! A vanished client (TCP keepalive) needs `CAP_NET_ADMIN`: that test is in
//! [`needs_cap_net_admin`], which `.ci/run` leaves out where it is missing.
#![allow(
    clippy::print_stdout,
    reason = "each test prints the record it checked (nextest shows it on failure)"
)]

use std::time::Duration;

use crate::support::access::*;
use crate::support::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// How long a test holds a session open before it ends it, so that the
/// duration's lower bound is not trivially 0.
const HOLD: Duration = Duration::from_millis(200);

/// The path every test sends (the record must drop the query) and the path
/// the record must show.
const PATH_SENT: &str = "/chat?x=1";
const PATH: &str = "/chat";

/// The reasons wsgate sends the client when it ends a session (contract).
const DRAIN_REASON: &str = "server draining, please reconnect";
const ADMIN_DRAIN_REASON: &str = "server rebalancing, please reconnect";
const LIFETIME_REASON: &str = "connection lifetime reached, please reconnect";
const IDLE_REASON: &str = "idle timeout";
const SIZE_REASON: &str = "message too big";
const RATE_REASON: &str = "message rate exceeded";
const SHUTDOWN_REASON: &str = "server shutting down";

/// `WSGATE_LOG_FORMAT=json` and `extra`.
fn json_env(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![("WSGATE_LOG_FORMAT", "json".to_owned())];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    env
}

/// A client Close frame with `code` and `reason`.
fn client_close(code: u16, reason: &[u8]) -> Vec<u8> {
    client_frame(0x8, true, &close_body(code, reason))
}

/// An upstream Close frame with `code` and `reason`.
fn upstream_close(code: u16, reason: &[u8]) -> Vec<u8> {
    server_frame(0x88, &close_body(code, reason))
}

/// The admin token of the drain tests.
const TOKEN: &str = "access-log-test-token";

/// A file holding [`TOKEN`] (removed when the file is dropped) and its path.
fn token_file() -> (tempfile::NamedTempFile, String) {
    let mut file = tempfile::NamedTempFile::new().expect("token file");
    std::io::Write::write_all(&mut file, TOKEN.as_bytes()).expect("write the token");
    let path = file.path().to_str().expect("utf-8 path").to_owned();
    (file, path)
}

/// What the test saw of one session: the path its record must show, when
/// the test started connecting (the duration's upper bound starts there),
/// when the 101 was read (a lower bound's start), and what the client /
/// the upstream wrote after the upgrade.
#[derive(Debug, Clone, Copy)]
struct Seen {
    path: &'static str,
    t0: Instant,
    admitted: Instant,
    cin: Tally,
    cout: Tally,
}

impl Seen {
    /// Nothing written yet.
    fn new(path: &'static str, t0: Instant, admitted: Instant) -> Seen {
        Seen {
            path,
            t0,
            admitted,
            cin: Tally::default(),
            cout: Tally::default(),
        }
    }
}

/// One session through the gate on [`PATH_SENT`]: the client socket, the
/// upstream's side of it, and what the test saw of it (a field of its own,
/// so that it can still be read once the test has dropped the sockets).
struct Session {
    c: tokio::net::TcpStream,
    u: UpConn,
    seen: Seen,
}

impl Session {
    /// The client writes `bytes`, counted with `msgs` data messages.
    async fn client_sends(&mut self, bytes: &[u8], msgs: u64) {
        send(&mut self.c, &mut self.seen.cin, bytes, msgs).await;
    }

    /// The upstream writes `bytes`, counted with `msgs` data messages.
    async fn upstream_sends(&mut self, bytes: &[u8], msgs: u64) {
        send(&mut self.u.s, &mut self.seen.cout, bytes, msgs).await;
    }
}

/// How a session ended, as its record and the two session metrics say.
#[derive(Debug, Clone, Copy)]
struct Ended<'a> {
    /// `closed_by` and `end`: fields of the record, and the labels of
    /// `wsgate_sessions_ended_total`.
    by: (&'a str, &'a str),
    /// The record's `close_code` and `close_reason`.
    close: (u16, &'a str),
    /// The `code` label of `wsgate_close_codes_total` (whose `closed_by` is
    /// `by`'s).
    code: &'a str,
}

impl<'a> Ended<'a> {
    /// With a closing handshake that `closed_by` began.
    fn closed(closed_by: &'a str, end: &'a str, close: (u16, &'a str), code: &'a str) -> Self {
        Ended {
            by: (closed_by, end),
            close,
            code,
        }
    }

    /// Without a Close frame: `closed_by` none, close code 1006 with no
    /// reason, and the `code` label none.
    fn without_close(end: &'a str) -> Self {
        Ended::closed("none", end, (1006, ""), "none")
    }
}

/// The wsgate binary in front of a [`HandoffUpstream`], and both session
/// metrics as they stood before any session: what every test here starts
/// from.
struct Rig {
    up: HandoffUpstream,
    gate: Gate,
    before: SessionMetrics,
}

impl Rig {
    /// JSON logs with `extra` settings ([`json_env`]); an upstream that
    /// sends nothing with its 101.
    async fn start(extra: &[(&'static str, &str)]) -> Rig {
        Rig::start_with(Vec::new(), &[], &json_env(extra)).await
    }

    /// An upstream that sends `greeting` with each 101, and `wsgate ARGS`
    /// with the environment `env` ([`start_gate`]).
    async fn start_with(greeting: Vec<u8>, args: &[&str], env: &[(&str, String)]) -> Rig {
        let up = HandoffUpstream::spawn(greeting).await;
        let gate = start_gate(up.addr, args, env).await;
        let before = session_metrics(gate.admin).await;
        Rig { up, gate, before }
    }

    /// Opens a session on [`PATH_SENT`] with `headers` and runs the usual
    /// exchange, counting every byte: the client sends a text message, the
    /// upstream reads it and answers with a text message of 130 bytes (a
    /// 16-bit length), which the client reads.
    async fn open(&self, headers: &[&str]) -> Session {
        let t0 = Instant::now();
        let (c, _, admitted) = upgrade_path(self.gate.proxy, PATH_SENT, headers, &[]).await;
        let u = self.up.next().await;
        assert!(
            u.head.starts_with(&format!("GET {PATH_SENT} HTTP/1.1\r\n")),
            "the upstream got {:?}",
            u.head
        );
        let mut s = Session {
            c,
            u,
            seen: Seen::new(PATH, t0, admitted),
        };
        s.client_sends(&client_frame(0x1, true, b"hello"), 1).await;
        expect_frame(
            &mut s.u.s,
            0x81,
            true,
            b"hello",
            "the client's text upstream",
        )
        .await;
        let answer = [b'a'; 130];
        s.upstream_sends(&server_frame(0x81, &answer), 1).await;
        expect_frame(
            &mut s.c,
            0x81,
            false,
            &answer,
            "the upstream's text at the client",
        )
        .await;
        s
    }

    /// The record of `seen`'s session says it ended as `ended`: checked
    /// ([`assert_record`]) against [`Expected::new`] of `seen` and `ended`,
    /// changed by `adjust`, with a duration from `lower_ms` up to the time
    /// from `seen.t0` to when the record appeared. Prints the record and
    /// returns it.
    async fn record_says(
        &self,
        seen: &Seen,
        lower_ms: u64,
        ended: Ended<'_>,
        adjust: impl FnOnce(Expected) -> Expected,
    ) -> serde_json::Map<String, Value> {
        let (rec, at) = access_record(&self.gate, seen.path).await;
        let window = lower_ms..=ms_ceil(seen.t0, at);
        assert!(
            window.start() <= window.end(),
            "bad window {window:?}: the record came before the session could end"
        );
        println!("record of {}: {}", seen.path, Value::Object(rec.clone()));
        let want = Expected::new(
            seen.path,
            &seen.cin,
            &seen.cout,
            ended.by,
            ended.close,
            window,
        );
        assert_record(&rec, &adjust(want));
        rec
    }

    /// Both session metrics counted one session that ended as `ended`, and
    /// nothing else, since the rig started ([`assert_counted_once`]).
    async fn assert_counted(&self, ended: Ended<'_>) {
        let code = (ended.by.0, ended.code);
        assert_counted_once(self.gate.admin, &self.before, ended.by, code).await;
    }

    /// Everything a session that ended as `ended` leaves behind: its record
    /// ([`Rig::record_says`]), both metrics counting it once
    /// ([`Rig::assert_counted`]), and its slot given back, `active`
    /// sessions left.
    async fn assert_ended_as(
        &self,
        seen: &Seen,
        lower_ms: u64,
        ended: Ended<'_>,
        adjust: impl FnOnce(Expected) -> Expected,
        active: f64,
    ) {
        self.record_says(seen, lower_ms, ended, adjust).await;
        self.assert_counted(ended).await;
        wait_metric(self.gate.admin, ACTIVE, active).await;
    }

    /// [`Rig::assert_ended_as`] with the record as [`Expected::new`] makes
    /// it, and no session left.
    async fn assert_ended(&self, seen: &Seen, lower_ms: u64, ended: Ended<'_>) {
        self.assert_ended_as(seen, lower_ms, ended, |e| e, 0.0)
            .await;
    }
}

/// wsgate ended the session with `code`: the client reads an unmasked
/// Close with `reason`, the upstream a masked Close with `code`; each
/// replies with the same code (counted), and wsgate closes both
/// connections (nothing else comes on either).
async fn answer_wsgate_close(s: &mut Session, code: u16, reason: &str) {
    let (got, why) = expect_close(&mut s.c, false, "wsgate's Close to the client").await;
    assert_eq!(
        (got, String::from_utf8_lossy(&why).as_ref()),
        (code, reason),
        "wsgate's Close to the client"
    );
    let (up_code, _) = expect_close(&mut s.u.s, true, "wsgate's Close to the upstream").await;
    assert!(
        up_code == code || up_code == 1001,
        "wsgate's Close to the upstream: {up_code}"
    );
    s.client_sends(&client_close(code, b""), 0).await;
    s.upstream_sends(&upstream_close(up_code, b""), 0).await;
    assert_eq!(
        read_rest(&mut s.c).await,
        b"",
        "after the closing handshake"
    );
    assert_eq!(
        read_rest(&mut s.u.s).await,
        b"",
        "after the closing handshake"
    );
}

// ---------------------------------------------------------------- peers end it

/// Client Close 1000 with a reason; data both ways, a frame the client sent
/// with its handshake and one the upstream sent with its 101 (both
/// counted), a fragmented message (counted once) with a ping inside it, the
/// upstream's pong (bytes, not messages); two key rules that apply, one
/// that does not (its prefix), in file order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_1000_with_a_reason() {
    let greeting = server_frame(0x81, b"welcome");
    let mut config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(
        &mut config,
        br#"
[[key_limits]]
name = "tenant"
key = "header:X-Tenant"
max_per_key = 10

[[key_limits]]
name = "admin"
key = "header:X-Tenant"
max_per_key = 10
path_prefix = "/admin"

[[key_limits]]
name = "room"
key = "path_segment:2"
max_per_key = 10

[[key_limits]]
name = "q"
key = "query:x"
max_per_key = 10
"#,
    )
    .expect("write the config");
    let config_path = config.path().to_str().expect("utf-8 path").to_owned();
    let rig = Rig::start_with(
        greeting.clone(),
        &["--config", &config_path],
        &json_env(&[]),
    )
    .await;

    let (mut cin, mut cout) = (Tally::default(), Tally::default());
    cout.bytes += greeting.len() as u64;
    cout.msgs += 1;
    let early = client_frame(0x1, true, b"sent with the handshake");
    let t0 = Instant::now();
    let (mut c, _, admitted) = upgrade_path(
        rig.gate.proxy,
        "/chat/room1?x=1",
        &["X-Tenant: acme"],
        &early,
    )
    .await;
    cin.bytes += early.len() as u64;
    cin.msgs += 1;
    let mut u = rig.up.next().await;
    assert!(
        u.head.starts_with("GET /chat/room1?x=1 HTTP/1.1\r\n"),
        "{}",
        u.head
    );
    expect_frame(&mut c, 0x81, false, b"welcome", "the greeting").await;
    expect_frame(
        &mut u.s,
        0x81,
        true,
        b"sent with the handshake",
        "early frame",
    )
    .await;

    send(&mut c, &mut cin, &client_frame(0x1, true, b"hello"), 1).await;
    send(&mut c, &mut cin, &client_frame(0x2, false, &[1, 2, 3]), 1).await;
    send(&mut c, &mut cin, &client_frame(0x9, true, b"ping?"), 0).await;
    send(&mut c, &mut cin, &client_frame(0x0, true, &[4, 5]), 0).await;
    expect_frame(&mut u.s, 0x81, true, b"hello", "text").await;
    expect_frame(&mut u.s, 0x02, true, &[1, 2, 3], "first fragment").await;
    expect_frame(&mut u.s, 0x89, true, b"ping?", "ping").await;
    expect_frame(&mut u.s, 0x80, true, &[4, 5], "last fragment").await;
    let big = [7u8; 300];
    send(&mut u.s, &mut cout, &server_frame(0x8a, b"ping?"), 0).await;
    send(&mut u.s, &mut cout, &server_frame(0x82, &big), 1).await;
    expect_frame(&mut c, 0x8a, false, b"ping?", "pong").await;
    expect_frame(&mut c, 0x82, false, &big, "binary").await;

    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    send(&mut c, &mut cin, &client_close(1000, b"bye"), 0).await;
    let (code, reason) = expect_close(&mut u.s, true, "the client's Close, forwarded").await;
    assert_eq!((code, reason.as_slice()), (1000, &b"bye"[..]));
    send(&mut u.s, &mut cout, &upstream_close(1000, b"bye"), 0).await;
    u.s.shutdown().await.expect("upstream FIN");
    let (code, _) = expect_close(&mut c, false, "the upstream's reply").await;
    assert_eq!(code, 1000);
    assert_eq!(read_rest(&mut c).await, b"");
    drop(c);
    assert_eq!(read_rest(&mut u.s).await, b"");

    assert_eq!((cin.msgs, cout.msgs), (3, 2), "what the test sent");
    let seen = Seen {
        cin,
        cout,
        ..Seen::new("/chat/room1", t0, admitted)
    };
    rig.assert_ended_as(
        &seen,
        ms_floor(admitted, closing),
        Ended::closed("client", "client_close", (1000, "bye"), "1000"),
        |e| Expected {
            keys: "tenant=acme room=room1 q=1".into(),
            ..e
        },
        0.0,
    )
    .await;
}

/// The upstream's Close 4000 with a reason comes first; the client answers
/// it; the upstream chose a subprotocol (the last of the two offered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_close_4000_with_a_reason_and_a_subprotocol() {
    let rig = Rig::start(&[]).await;
    let t0 = Instant::now();
    let (c, head, admitted) = upgrade_path(
        rig.gate.proxy,
        PATH_SENT,
        &["Sec-WebSocket-Protocol: chat.v1, chat.v2"],
        &[],
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: chat.v2\r\n"),
        "the client got the upstream's choice: {head}"
    );
    let u = rig.up.next().await;
    let mut s = Session {
        c,
        u,
        seen: Seen::new(PATH, t0, admitted),
    };
    s.client_sends(&client_frame(0x2, true, &[0u8; 10]), 1)
        .await;
    expect_frame(&mut s.u.s, 0x82, true, &[0u8; 10], "binary upstream").await;
    s.upstream_sends(&server_frame(0x81, b"one"), 1).await;
    s.upstream_sends(&server_frame(0x81, b"two"), 1).await;
    expect_frame(&mut s.c, 0x81, false, b"one", "first").await;
    expect_frame(&mut s.c, 0x81, false, b"two", "second").await;

    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    let reason = "upstream going away";
    s.upstream_sends(&upstream_close(4000, reason.as_bytes()), 0)
        .await;
    let (code, why) = expect_close(&mut s.c, false, "the upstream's Close").await;
    assert_eq!((code, why.as_slice()), (4000, reason.as_bytes()));
    s.client_sends(&client_close(4000, b""), 0).await;
    let (code, _) = expect_close(&mut s.u.s, true, "the client's reply").await;
    assert_eq!(code, 4000);
    drop(s.u.s);
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);

    rig.assert_ended_as(
        &s.seen,
        ms_floor(admitted, closing),
        Ended::closed("upstream", "upstream_close", (4000, reason), "4xxx"),
        |e| Expected {
            subprotocol: "chat.v2".into(),
            ..e
        },
        0.0,
    )
    .await;
}

/// The client sends FIN without a Close; the upstream then ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_without_a_close_is_client_eof() {
    let rig = Rig::start(&[]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.c.shutdown().await.expect("client FIN");
    assert_eq!(
        read_rest(&mut s.u.s).await,
        b"",
        "the FIN reaches the upstream"
    );
    drop(s.u.s);
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);

    let lower = ms_floor(s.seen.admitted, closing);
    rig.assert_ended(&s.seen, lower, Ended::without_close("client_eof"))
        .await;
}

/// The client resets the connection (SO_LINGER 0) without a Close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rst_without_a_close_is_client_eof() {
    let rig = Rig::start(&[]).await;
    let mut s = rig.open(&[]).await;
    set_reset_on_close(&s.c);
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    drop(s.c);
    assert_eq!(
        read_rest(&mut s.u.s).await,
        b"",
        "the upstream leg ends, without a Close"
    );

    let lower = ms_floor(s.seen.admitted, closing);
    rig.assert_ended(&s.seen, lower, Ended::without_close("client_eof"))
        .await;
}

/// The upstream sends FIN without a Close; the client then ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fin_without_a_close_is_upstream_eof() {
    let rig = Rig::start(&[]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.u.s.shutdown().await.expect("upstream FIN");
    assert_eq!(read_rest(&mut s.c).await, b"", "the FIN reaches the client");
    drop(s.c);
    assert_eq!(read_rest(&mut s.u.s).await, b"");

    let lower = ms_floor(s.seen.admitted, closing);
    rig.assert_ended(&s.seen, lower, Ended::without_close("upstream_eof"))
        .await;
}

/// The client sends FIN; the upstream keeps its side open (and sends one
/// more message, which is counted) past `half_close_timeout`: wsgate ends
/// both, without a Close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_timeout_after_a_client_fin() {
    let rig = Rig::start(&[("WSGATE_HALF_CLOSE_TIMEOUT", "1s")]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let fin_at = Instant::now();
    s.c.shutdown().await.expect("client FIN");
    // The upstream sees the FIN, writes on, and never ends by itself.
    let mut byte = [0u8; 1];
    let n = within(
        "the FIN at the upstream",
        tokio::io::AsyncReadExt::read(&mut s.u.s, &mut byte),
    )
    .await
    .expect("read");
    assert_eq!(n, 0, "EOF at the upstream");
    s.upstream_sends(&server_frame(0x81, b"still here"), 1)
        .await;
    expect_frame(&mut s.c, 0x81, false, b"still here", "after the FIN").await;
    assert_eq!(read_rest(&mut s.c).await, b"", "wsgate ends the client leg");

    let lower = ms_floor(s.seen.admitted, fin_at) + 1000;
    rig.assert_ended(&s.seen, lower, Ended::without_close("half_close_timeout"))
        .await;
    drop(s.u.s);
}

/// A client Close without a status code: `close_code` 1005 (RFC 6455
/// §7.1.5), no reason, `code="1005"` in the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_without_a_status_is_1005() {
    let rig = Rig::start(&[]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.client_sends(&client_frame(0x8, true, b""), 0).await;
    expect_frame(&mut s.u.s, 0x88, true, b"", "the client's empty Close").await;
    s.upstream_sends(&server_frame(0x88, b""), 0).await;
    drop(s.u.s);
    expect_frame(&mut s.c, 0x88, false, b"", "the upstream's empty Close").await;
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);

    let lower = ms_floor(s.seen.admitted, closing);
    let ended = Ended::closed("client", "client_close", (1005, ""), "1005");
    rig.assert_ended(&s.seen, lower, ended).await;
}

/// The client's Close is on its way (the upstream has it, and has not
/// answered) when an admin drain picks the session: wsgate sends nothing of
/// its own and lets the client's handshake finish, so the session ends as
/// `client_close` with the client's code, not as `admin_drain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_after_the_clients_close_leaves_it_client_close() {
    let (_token, token_path) = token_file();
    let rig = Rig::start(&[("WSGATE_ADMIN_TOKEN_FILE", &token_path)]).await;
    let mut s = rig.open(&[]).await;
    let closing = Instant::now();
    s.client_sends(&client_close(4001, b"leaving"), 0).await;
    let (code, _) = expect_close(&mut s.u.s, true, "the client's Close, forwarded").await;
    assert_eq!(code, 4001);

    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (status, body) = http_request(
        rig.gate.admin,
        "POST",
        "/drain",
        &auth,
        r#"{"count": 1, "period": "100ms"}"#,
    )
    .await;
    assert_eq!(status, 202, "POST /drain: {body}");
    // Until the drain has run its course (a condition, polled).
    let start = Instant::now();
    loop {
        let (status, body) = http_request(rig.gate.admin, "GET", "/drain", &auth, "").await;
        assert_eq!(status, 200, "GET /drain: {body}");
        let state: Value = serde_json::from_str(&body).expect("a JSON answer");
        if state["running"] == false {
            println!("GET /drain after the drain: {body}");
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the admin drain never ended: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.upstream_sends(&upstream_close(4001, b"ok"), 0).await;
    drop(s.u.s);
    let (code, reason) = expect_close(&mut s.c, false, "the only Close the client gets").await;
    assert_eq!(
        (code, String::from_utf8_lossy(&reason).as_ref()),
        (4001, "ok"),
        "the upstream's reply, not a Close of wsgate's"
    );
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);

    let lower = ms_floor(s.seen.admitted, closing);
    let ended = Ended::closed("client", "client_close", (4001, "leaving"), "4xxx");
    rig.assert_ended(&s.seen, lower, ended).await;
}

// ---------------------------------------------------------------- wsgate ends it

/// SIGTERM with `env`, and two sessions: the one [`Rig::open`] makes, and
/// a younger one on `/keeper` that never answers wsgate's Close (it keeps
/// the process up, long enough to read the metrics). wsgate ends both as
/// `ended`, with its close code and reason to the client, no earlier than
/// `after_ms` past the signal: the first is answered, its record checked,
/// counted once, and one session is left; the keeper gets the same code, the
/// process exits 0, and the keeper's record says the same.
async fn shutdown_with_a_keeper(env: &[(&'static str, &str)], ended: Ended<'_>, after_ms: u64) {
    let mut rig = Rig::start(env).await;
    let mut s = rig.open(&[]).await;
    let (mut keeper, _, keeper_admitted) = upgrade_path(rig.gate.proxy, "/keeper", &[], &[]).await;
    let keeper_up = rig.up.next().await;
    wait_metric(rig.gate.admin, ACTIVE, 2.0).await;
    tokio::time::sleep(HOLD).await;
    let signalled = Instant::now();
    rig.gate.process.signal("TERM");
    let (code, reason) = ended.close;
    answer_wsgate_close(&mut s, code, reason).await;

    let lower = ms_floor(s.seen.admitted, signalled) + after_ms;
    rig.assert_ended_as(&s.seen, lower, ended, |e| e, 1.0).await;

    // The keeper is closed too; it never answers.
    let (keeper_code, _) = expect_close(&mut keeper, false, "the keeper's Close").await;
    assert_eq!(keeper_code, code);
    let status = tokio::task::block_in_place(|| rig.gate.process.wait_exit());
    assert!(status.success(), "exit {status:?}");
    let keeper_seen = Seen::new("/keeper", s.seen.t0, keeper_admitted);
    let lower = ms_floor(keeper_admitted, signalled) + after_ms;
    rig.record_says(&keeper_seen, lower, ended, |e| e).await;
    drop(keeper_up);
}

/// SIGTERM with `drain_period`: the oldest session is drained with
/// `close_code_drain` and its reason. A younger one that never answers
/// wsgate's Close keeps the process up for `close_timeout`, long enough to
/// read the metrics; it is drained too, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drain_closes_with_1001() {
    let env = [
        ("WSGATE_DRAIN_PERIOD", "1s"),
        ("WSGATE_SHUTDOWN_GRACE", "6s"),
        ("WSGATE_CLOSE_TIMEOUT", "4s"),
    ];
    let drained = Ended::closed("wsgate", "drain", (1001, DRAIN_REASON), "1001");
    shutdown_with_a_keeper(&env, drained, 0).await;
}

/// The end of `shutdown_grace`: wsgate closes what is left with
/// `close_code_drain` (here 1012) and "server shutting down", starting
/// `close_timeout` before the grace ends. A second session that never
/// answers keeps the process up until the grace ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_grace_closes_with_close_code_drain() {
    let env = [
        ("WSGATE_SHUTDOWN_GRACE", "5s"),
        ("WSGATE_CLOSE_TIMEOUT", "4s"),
        ("WSGATE_CLOSE_CODE_DRAIN", "1012"),
    ];
    let shut = Ended::closed("wsgate", "shutdown", (1012, SHUTDOWN_REASON), "1012");
    // The closing handshakes start at grace − close_timeout = 1 s.
    shutdown_with_a_keeper(&env, shut, 1000).await;
}

/// A second signal before any Close frame cuts TCP: `shutdown`, but
/// `closed_by` none and 1006. (The process is gone at once, so there are no
/// metrics to read; the record must still be written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_without_a_close() {
    let mut rig = Rig::start(&[("WSGATE_SHUTDOWN_GRACE", "30s")]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let signalled = Instant::now();
    rig.gate.process.signal("TERM");
    wait_stderr(&rig.gate, "shutdown: draining").await;
    rig.gate.process.signal("TERM");
    let at_client = read_rest(&mut s.c).await;
    let status = tokio::task::block_in_place(|| rig.gate.process.wait_exit());
    assert!(status.success(), "exit {status:?}");
    println!("after the second signal the client read {at_client:?}");
    let lower = ms_floor(s.seen.admitted, signalled);
    rig.record_says(&s.seen, lower, Ended::without_close("shutdown"), |e| e)
        .await;
    assert_eq!(
        String::from_utf8_lossy(&at_client),
        "",
        "cut without a Close frame"
    );
}

/// `POST /drain {"count": 1}` with the admin token: the session gets
/// `close_code_drain` and the rebalancing reason; the instance stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_closes_with_1001() {
    let (_token, token_path) = token_file();
    let rig = Rig::start(&[("WSGATE_ADMIN_TOKEN_FILE", &token_path)]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let requested = Instant::now();
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http_request(
        rig.gate.admin,
        "POST",
        "/drain",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        r#"{"count": 1, "period": "100ms"}"#,
    )
    .await;
    assert_eq!(status, 202, "POST /drain: {body}");
    let answer: Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(answer["planned"], 1, "{body}");
    answer_wsgate_close(&mut s, 1001, ADMIN_DRAIN_REASON).await;

    let lower = ms_floor(s.seen.admitted, requested);
    let ended = Ended::closed("wsgate", "admin_drain", (1001, ADMIN_DRAIN_REASON), "1001");
    rig.assert_ended(&s.seen, lower, ended).await;
    wait_metric(rig.gate.admin, "wsgate_admin_drained_total", 1.0).await;
}

/// `max_connection_lifetime` (no jitter) with `close_code_lifetime` 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_closes_with_close_code_lifetime() {
    let rig = Rig::start(&[
        ("WSGATE_MAX_CONNECTION_LIFETIME", "1500ms"),
        ("WSGATE_LIFETIME_JITTER", "0"),
        ("WSGATE_CLOSE_CODE_LIFETIME", "1012"),
    ])
    .await;
    let mut s = rig.open(&[]).await;
    answer_wsgate_close(&mut s, 1012, LIFETIME_REASON).await;

    let ended = Ended::closed("wsgate", "lifetime", (1012, LIFETIME_REASON), "1012");
    rig.assert_ended(&s.seen, 1500, ended).await;
}

/// `idle_timeout` after the last byte; behind one trusted proxy, the
/// client is the address that proxy put in `X-Forwarded-For`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_with_close_code_idle() {
    let rig = Rig::start(&[("WSGATE_IDLE_TIMEOUT", "1s"), ("WSGATE_TRUSTED_HOPS", "1")]).await;
    let mut s = rig.open(&["X-Forwarded-For: 203.0.113.7"]).await;
    // The last byte: the upstream's, written after this instant.
    let last = Instant::now();
    s.upstream_sends(&server_frame(0x82, &[9; 20]), 1).await;
    expect_frame(&mut s.c, 0x82, false, &[9; 20], "the last message").await;
    answer_wsgate_close(&mut s, 1001, IDLE_REASON).await;

    rig.assert_ended_as(
        &s.seen,
        ms_floor(s.seen.admitted, last) + 1000,
        Ended::closed("wsgate", "idle", (1001, IDLE_REASON), "1001"),
        |e| Expected {
            client: "203.0.113.7".into(),
            ..e
        },
        0.0,
    )
    .await;
}

/// `max_message_size`: two messages within it pass; a frame that would
/// take a message past it gets Close 1009 (the upstream a Close 1001). The
/// client sent that frame whole and wsgate reads it (dropping it) before
/// the client's reply, so its bytes count; and the refused message counts
/// in `msgs_in` too: `msgs_in` is the data messages the client *sent*
/// (the contract's words), forwarded or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_guard_closes_with_1009() {
    let rig = Rig::start(&[("WSGATE_MAX_MESSAGE_SIZE", "1024")]).await;
    let mut s = rig.open(&[]).await;
    let limit = [5u8; 1024];
    s.client_sends(&client_frame(0x2, true, &limit), 1).await;
    expect_frame(&mut s.u.s, 0x82, true, &limit, "a message at the limit").await;
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.client_sends(&client_frame(0x2, true, &[6u8; 2000]), 1)
        .await;
    answer_wsgate_close(&mut s, 1009, SIZE_REASON).await;

    assert_eq!(s.seen.cin.msgs, 3, "two forwarded, one refused");
    let lower = ms_floor(s.seen.admitted, closing);
    let ended = Ended::closed("wsgate", "size", (1009, SIZE_REASON), "1009");
    rig.assert_ended(&s.seen, lower, ended).await;
}

/// `message_rate` with `close`: a bucket of 3 refilling every 10 s; three
/// text messages pass, and a ping (control frames count for the rate, not
/// as messages) is the one over the bucket: Close 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_guard_closes_with_1008() {
    let rig = Rig::start(&[
        ("WSGATE_MESSAGE_RATE", "0.1"),
        ("WSGATE_MESSAGE_BURST", "3"),
        ("WSGATE_MESSAGE_RATE_ACTION", "close"),
    ])
    .await;
    // `open` sends the first of the three.
    let mut s = rig.open(&[]).await;
    for text in [&b"two"[..], b"three"] {
        s.client_sends(&client_frame(0x1, true, text), 1).await;
        expect_frame(&mut s.u.s, 0x81, true, text, "a message within the bucket").await;
    }
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.client_sends(&client_frame(0x9, true, b"one too many"), 0)
        .await;
    answer_wsgate_close(&mut s, 1008, RATE_REASON).await;

    let lower = ms_floor(s.seen.admitted, closing);
    let ended = Ended::closed("wsgate", "rate", (1008, RATE_REASON), "1008");
    rig.assert_ended(&s.seen, lower, ended).await;
}

// ---------------------------------------------------------------- the record itself

/// Close reasons with control characters, 123 bytes long (the most a Close
/// frame carries): each control character is written `\xNN`, the result is
/// at most 123 bytes, cut at a character boundary and never inside an
/// escape; invalid UTF-8 becomes U+FFFD; the JSON line parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_a_close_reason_are_escaped_and_bounded() {
    let mut cut_at_escape = b"\x1b[31m\n".to_vec();
    cut_at_escape.extend("é".repeat(54).as_bytes());
    cut_at_escape.extend(b"z\x070123456");
    let mut cut_in_char = b"\n".to_vec();
    cut_in_char.extend("é".repeat(61).as_bytes());
    let cases: [(&str, Vec<u8>, String); 3] = [
        (
            "/r1",
            cut_at_escape,
            format!("\\x1b[31m\\x0a{}z", "é".repeat(54)),
        ),
        ("/r2", cut_in_char, format!("\\x0a{}", "é".repeat(59))),
        (
            "/r3",
            b"bad\xffbyte\x7fend".to_vec(),
            "bad\u{fffd}byte\\x7fend".to_owned(),
        ),
    ];
    assert_eq!(cases[0].1.len(), 123);
    assert_eq!(cases[1].1.len(), 123);

    let rig = Rig::start(&[]).await;
    for (path, raw, escaped) in &cases {
        let t0 = Instant::now();
        let (mut c, _, admitted) = upgrade_path(rig.gate.proxy, path, &[], &[]).await;
        let mut u = rig.up.next().await;
        let mut seen = Seen::new(path, t0, admitted);
        let closing = Instant::now();
        send(&mut c, &mut seen.cin, &client_close(1000, raw), 0).await;
        let (code, got) = expect_close(&mut u.s, true, "the client's Close, forwarded").await;
        assert_eq!((code, &got), (1000, raw), "forwarded unchanged");
        send(&mut u.s, &mut seen.cout, &upstream_close(1000, b""), 0).await;
        u.s.shutdown().await.expect("upstream FIN");
        expect_close(&mut c, false, "the reply").await;
        assert_eq!(read_rest(&mut c).await, b"");
        drop(c);

        let ended = Ended::closed("client", "client_close", (1000, escaped.as_str()), "1000");
        let rec = rig
            .record_says(&seen, ms_floor(admitted, closing), ended, |e| e)
            .await;
        let reason = rec["close_reason"].as_str().expect("a string");
        assert!(reason.len() <= 123, "{} bytes: {reason:?}", reason.len());
        assert!(
            !reason.chars().any(|ch| ch.is_control()),
            "a raw control character in {reason:?}"
        );
    }
}

/// `access_log = false`: no record (nor any other `wsgate::access` line)
/// up to the process's last line, but the metrics still move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_false_writes_no_record_but_counts() {
    let mut rig = Rig::start(&[("WSGATE_ACCESS_LOG", "false")]).await;
    let mut s = rig.open(&[]).await;
    s.client_sends(&client_close(1000, b"bye"), 0).await;
    expect_close(&mut s.u.s, true, "the client's Close").await;
    s.upstream_sends(&upstream_close(1000, b""), 0).await;
    drop(s.u.s);
    expect_close(&mut s.c, false, "the reply").await;
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);
    rig.assert_counted(Ended::closed(
        "client",
        "client_close",
        (1000, "bye"),
        "1000",
    ))
    .await;
    wait_metric(rig.gate.admin, ACTIVE, 0.0).await;

    rig.gate.process.signal("TERM");
    let status = tokio::task::block_in_place(|| rig.gate.process.wait_exit());
    assert!(status.success(), "exit {status:?}");
    let text = wait_stderr(&rig.gate, "shutdown complete").await;
    assert!(
        !text.contains(ACCESS_TARGET),
        "access_log = false, yet:\n{text}"
    );
}

/// The default text format: the record is one line of `wsgate::access`,
/// message `session`, with every field as `name=value` (strings may be
/// quoted); parsed into the same fields, it says what the JSON one would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_format_record_has_every_field() {
    let rig = Rig::start_with(Vec::new(), &[], &[]).await;
    let mut s = rig.open(&[]).await;
    tokio::time::sleep(HOLD).await;
    let closing = Instant::now();
    s.client_sends(&client_close(1000, b"bye"), 0).await;
    expect_close(&mut s.u.s, true, "the client's Close").await;
    s.upstream_sends(&upstream_close(1000, b"bye"), 0).await;
    drop(s.u.s);
    expect_close(&mut s.c, false, "the reply").await;
    assert_eq!(read_rest(&mut s.c).await, b"");
    drop(s.c);

    let start = Instant::now();
    let line = loop {
        let text = rig.gate.stderr();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains(&format!(" {ACCESS_TARGET}: {SESSION_MESSAGE} ")))
        {
            break l.to_owned();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no text session record; stderr:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let logged = Instant::now();
    println!("text record: {line}");
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("end=\"client_close\"") || line.contains("end=client_close"),
        "{line}"
    );
    assert!(!line.contains(PATH_SENT), "the query string leaked: {line}");
    let rec = text_fields(&line);
    let ended = Ended::closed("client", "client_close", (1000, "bye"), "1000");
    assert_record(
        &rec,
        &Expected::new(
            PATH,
            &s.seen.cin,
            &s.seen.cout,
            ended.by,
            ended.close,
            ms_floor(s.seen.admitted, closing)..=ms_ceil(s.seen.t0, logged),
        ),
    );
    rig.assert_counted(ended).await;
}

/// The fields of a text-format record (`… INFO wsgate::access: session
/// name=value …`) as the JSON record would have them: the numeric fields
/// as numbers, every other value as a string (unquoted, or quoted with
/// `\"` and `\\` escapes), plus `level`, `target` and `message`.
fn text_fields(line: &str) -> serde_json::Map<String, Value> {
    const NUMBERS: [&str; 6] = [
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "msgs_in",
        "msgs_out",
        "close_code",
    ];
    let marker = format!(" {ACCESS_TARGET}: {SESSION_MESSAGE} ");
    let rest = &line[line.find(&marker).expect("the record") + marker.len()..];
    let mut rec = serde_json::Map::new();
    rec.insert("level".into(), "INFO".into());
    rec.insert("target".into(), ACCESS_TARGET.into());
    rec.insert("message".into(), SESSION_MESSAGE.into());
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|&ch| ch != '=').collect();
        if name.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(ch) = chars.next() {
                match ch {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    other => value.push(other),
                }
            }
        } else {
            value = chars.by_ref().take_while(|&ch| ch != ' ').collect();
        }
        let v = if NUMBERS.contains(&name.as_str()) {
            value
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(value))
        } else {
            Value::String(value)
        };
        rec.insert(name, v);
    }
    rec
}

// ---------------------------------------------------------------- keepalive

/// A client that vanishes without FIN or RST while its port stays taken by
/// a socket that no longer answers in sequence: wsgate's keepalive probes go
/// unanswered and `TCP_USER_TIMEOUT` ends the client leg with `ETIMEDOUT`.
///
/// Closing a socket in `TCP_REPAIR` mode is silent, but the next probe
/// would then be answered with RST (`ECONNRESET`, a `client_eof`): so the
/// helper puts, in repair mode, a socket on the same four-tuple whose
/// sequence numbers are half the sequence space away. Its answers to the
/// probes are out of window for wsgate and dropped, as a host gone silent
/// would be. Needs `CAP_NET_ADMIN`. (A [`Py`] script: `read_head` and
/// `send_upgrade` are [`PY_PRELUDE`]'s.)
const VANISHING_CLIENT: &str = r#"
import struct
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
host, port, path, frames, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4]), int(sys.argv[5])
# Bound explicitly (SO_REUSEADDR): a port that connect() picks may be shared
# with other connections, and the replacement below could not bind it.
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, 0))
s.connect((host, port))
send_upgrade(s, host, port, path)
print(read_head(s).split(b"\r\n")[0].decode(), flush=True)
sys.stdin.readline()
s.sendall(frames)
got = b""
while len(got) < expect:
    b = s.recv(expect - len(got))
    if not b:
        break
    got += b
print("sent, read %d" % len(got), flush=True)
sys.stdin.readline()
local, peer = s.getsockname(), s.getpeername()
try:
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
except OSError as e:
    print("no TCP_REPAIR: %s" % e, flush=True)
    sys.exit(3)
seqs = {}
for q in (1, 2):
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, q)
    seqs[q] = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
s.close()
ghost = socket.socket()
ghost.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
ghost.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ghost.bind(local)
for q in (1, 2):
    ghost.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, q)
    ghost.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", (seqs[q] + (1 << 31)) % (1 << 32)))
ghost.connect(peer)
print("vanished", flush=True)
sys.stdin.read()
"#;

/// Tests that make a socket vanish with `TCP_REPAIR` and so need
/// `CAP_NET_ADMIN`. The module name is the marker `.ci/run` filters on
/// (`test(/needs_cap_net_admin::/)`) where the capability is missing; where
/// they run, they must pass: there is no skipping branch inside.
mod needs_cap_net_admin {
    use super::*;

    /// The client vanishes after an exchange; `tcp_keepalive = 1s` (probes
    /// after 1 s of silence, `TCP_USER_TIMEOUT` 1 s) ends its leg with
    /// `ETIMEDOUT`: `keepalive`, no Close frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keepalive_ends_a_vanished_client() {
        let rig = Rig::start(&[("WSGATE_TCP_KEEPALIVE", "1s")]).await;
        let (mut cin, mut cout) = (Tally::default(), Tally::default());
        let frames = [
            client_frame(0x1, true, b"hello"),
            client_frame(0x9, true, b"ping"),
            client_frame(0x2, true, &[1; 200]),
        ];
        let hex: String = frames.concat().iter().map(|b| format!("{b:02x}")).collect();
        let down = server_frame(0x81, b"from the upstream");

        let t0 = Instant::now();
        let mut py = Py::start(
            VANISHING_CLIENT,
            &[
                rig.gate.proxy.ip().to_string(),
                rig.gate.proxy.port().to_string(),
                PATH_SENT.to_owned(),
                hex,
                down.len().to_string(),
            ],
        );
        let status = tokio::task::block_in_place(|| py.line());
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        let admitted = Instant::now();
        let mut u = rig.up.next().await;
        send(&mut u.s, &mut cout, &down, 1).await;
        let sending = Instant::now();
        py.go();
        assert_eq!(
            tokio::task::block_in_place(|| py.line()),
            format!("sent, read {}", down.len()),
            "the helper's exchange"
        );
        for (f, msgs) in frames.iter().zip([1, 0, 1]) {
            cin.bytes += f.len() as u64;
            cin.msgs += msgs;
        }
        expect_frame(&mut u.s, 0x81, true, b"hello", "text").await;
        expect_frame(&mut u.s, 0x89, true, b"ping", "ping").await;
        expect_frame(&mut u.s, 0x82, true, &[1; 200], "binary").await;
        py.go();
        assert_eq!(
            tokio::task::block_in_place(|| py.line()),
            "vanished",
            "TCP_REPAIR refused: this test needs CAP_NET_ADMIN \
             (.ci/run leaves it out where it is missing)"
        );

        let seen = Seen {
            cin,
            cout,
            ..Seen::new(PATH, t0, admitted)
        };
        let lower = ms_floor(admitted, sending) + 1000;
        rig.assert_ended(&seen, lower, Ended::without_close("keepalive"))
            .await;
        drop(u);
    }
}
