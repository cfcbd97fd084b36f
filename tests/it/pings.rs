//! Pings from wsgate and the send timeout (docs/behaviour.md#signals-clients-can-act-on):
//! a quiet client gets a Ping and its answer stays with wsgate; a client
//! that does not answer, or that stops reading, is given up, its slot given
//! back, the upstream told with Close 1001; the client's own Pings and
//! Pongs pass as before; with the keys at their defaults nothing of this
//! happens.
//!
//! The clients are a real one (tokio-tungstenite, which answers Pings by
//! itself) and raw sockets, which send exactly what a test says. The
//! tests in [`needs_cap_net_admin`] freeze or remove a client's socket with
//! `TCP_REPAIR`, as tests/it/keepalive.rs does, and are left out the same
//! way where that is refused.
#![allow(clippy::print_stdout, reason = "tests report what they measured")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::access::{access_record, start_gate};
use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::{ConfigDuration, RawConfig};

const PINGS_SENT: &str = "wsgate_pings_sent_total";

fn secs(s: f64) -> ConfigDuration {
    ConfigDuration(Duration::from_secs_f64(s))
}

/// The test configuration in front of `up` with pings every `interval`
/// seconds, `pong_timeout` seconds for the answer, TCP keepalive off (so
/// that only the pings can find a client that went quiet).
fn pinging(up: SocketAddr, interval: f64, pong_timeout: f64) -> RawConfig {
    RawConfig {
        ping_interval: secs(interval),
        pong_timeout: secs(pong_timeout),
        tcp_keepalive: secs(0.0),
        ..test_config(up)
    }
}

/// `wsgate_sessions_ended_total` for wsgate's `end`.
async fn ended_by_wsgate(admin: SocketAddr, end: &str) -> f64 {
    labelled_metric(
        admin,
        "wsgate_sessions_ended_total",
        &[("closed_by", "wsgate"), ("end", end)],
    )
    .await
}

/// Polls until the recording upstream has received a message `matching`;
/// fails after [`DEADLINE`].
async fn upstream_got(up: &Upstream, what: &str, matching: impl Fn(&Message) -> bool) {
    let start = Instant::now();
    while !up.received.lock().expect("lock").iter().any(&matching) {
        assert!(
            start.elapsed() < DEADLINE,
            "the upstream never received {what}; it got {:?}",
            up.received.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every Pong the recording upstream received.
fn pongs_at(up: &Upstream) -> Vec<Vec<u8>> {
    up.received
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|m| match m {
            Message::Pong(p) => Some(p.to_vec()),
            _ => None,
        })
        .collect()
}

/// Reads frames from a raw client until one whose first byte is not a Ping
/// from wsgate (`0x89`); returns it.
async fn next_but_pings(s: &mut TcpStream) -> (u8, bool, Vec<u8>) {
    loop {
        let frame = read_frame(s).await;
        if frame.0 != 0x89 {
            return frame;
        }
    }
}

// ---------------------------------------------------------------- a client that answers

/// tokio-tungstenite answers every Ping as it reads: the client stays, far
/// past `pong_timeout`, wsgate keeps pinging it, and the upstream never sees
/// a Pong (nor wsgate's Pings).
#[tokio::test]
async fn an_idle_client_that_answers_stays_and_its_pongs_stay_with_wsgate() {
    let up = spawn_recording_upstream().await;
    let interval = 0.3;
    let gate = spawn_sidecar(pinging(up.addr, interval, 0.5)).await;
    let mut ws = within("connect", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    let start = Instant::now();
    // The client only reads (which is when tungstenite answers Pings)
    // until three intervals have passed and two Pings were counted.
    let mut pings_seen = 0;
    let waited = async {
        tokio::time::sleep(Duration::from_secs_f64(3.0 * interval)).await;
        wait_metric_at_least(gate.admin, PINGS_SENT, 2.0).await;
    };
    tokio::pin!(waited);
    within("three intervals", async {
        loop {
            tokio::select! {
                () = &mut waited => break,
                m = ws.next() => match m {
                    Some(Ok(Message::Ping(p))) => {
                        assert_eq!(p.len(), 8, "wsgate's Ping payload");
                        pings_seen += 1;
                    }
                    other => panic!("the client got {other:?}"),
                },
            }
        }
    })
    .await;
    let stayed = start.elapsed();
    assert!(pings_seen >= 2, "the client saw {pings_seen} Pings");
    assert_eq!(metric(gate.admin, ACTIVE).await, 1.0, "still connected");
    assert_eq!(ended_by_wsgate(gate.admin, "ping_timeout").await, 0.0);
    println!(
        "stayed {stayed:.2?} with ping_interval {interval}s: {} Pings sent, {pings_seen} seen",
        metric(gate.admin, PINGS_SENT).await
    );
    // Data still flows both ways, and the upstream got no Pong, no Ping.
    within("send", ws.send(Message::text("still here")))
        .await
        .expect("send");
    loop {
        match within("echo", ws.next()).await {
            Some(Ok(Message::Ping(_))) => {}
            other => {
                assert_eq!(
                    other.expect("open").expect("a message"),
                    Message::text("still here")
                );
                break;
            }
        }
    }
    close_cleanly(ws).await;
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    let got = up.received.lock().expect("lock").clone();
    assert!(
        !got.iter()
            .any(|m| matches!(m, Message::Pong(_) | Message::Ping(_))),
        "the upstream got {got:?}"
    );
}

// ---------------------------------------------------------------- a client that does not

/// A raw client that reads but never answers: it gets wsgate's Ping, then,
/// `pong_timeout` later, Close 1001 "ping timeout"; the upstream gets a
/// masked Close 1001; the slot and every descriptor come back.
#[tokio::test]
async fn a_client_that_does_not_answer_gets_close_1001_and_its_slot_is_freed() {
    let up = spawn_recording_upstream().await;
    let (interval, pong_timeout) = (0.3, 0.3);
    let gate = spawn_sidecar(pinging(up.addr, interval, pong_timeout)).await;
    let baseline = open_fds();
    let mut client = within("upgrade", raw_tunnel(gate.addr)).await;
    let start = Instant::now();
    let (b0, masked, ping) = read_frame(&mut client).await;
    assert_eq!((b0, masked, ping.len()), (0x89, false, 8), "a Ping");
    let (b0, masked, close) = read_frame(&mut client).await;
    let took = start.elapsed();
    assert_eq!((b0, masked), (0x88, false), "an unmasked Close");
    assert_eq!(&close[..2], &1001u16.to_be_bytes());
    assert_eq!(&close[2..], b"ping timeout");
    let expected = Duration::from_secs_f64(interval + pong_timeout);
    assert!(
        took >= expected - Duration::from_millis(50) && took < expected + RELEASE_BOUND,
        "Close after {took:?}, expected {expected:?}"
    );
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    assert_eq!(ended_by_wsgate(gate.admin, "ping_timeout").await, 1.0);
    assert_eq!(metric(gate.admin, PINGS_SENT).await, 1.0);
    assert_eq!(up.closes(), vec![(1001, "ping timeout".to_owned())]);
    assert!(
        closed_within(&mut client, RELEASE_BOUND).await,
        "TCP closed"
    );
    drop(client);
    wait_fds(baseline, 0).await;
}

// ---------------------------------------------------------------- the client's own control frames

/// With pings on, a Ping of the client's own still reaches the upstream and
/// the upstream's Pong comes back; an unsolicited Pong reaches the upstream.
#[tokio::test]
async fn the_clients_own_pings_and_pongs_pass_both_ways() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(pinging(up.addr, 0.3, 10.0)).await;
    let mut client = within("upgrade", raw_tunnel(gate.addr)).await;
    client
        .write_all(&client_frame(0x9, true, b"hello"))
        .await
        .expect("ping");
    assert_eq!(
        next_but_pings(&mut client).await,
        (0x8A, false, b"hello".to_vec()),
        "the upstream's Pong came back"
    );
    upstream_got(&up, "the client's Ping", |m| {
        *m == Message::Ping(b"hello".to_vec().into())
    })
    .await;
    // A Pong of a Ping's length (8 bytes) that answers nothing of wsgate's.
    client
        .write_all(&client_frame(0xA, true, b"mine1234"))
        .await
        .expect("pong");
    upstream_got(&up, "the client's Pong", |m| {
        *m == Message::Pong(b"mine1234".to_vec().into())
    })
    .await;
    assert_eq!(metric(gate.admin, ACTIVE).await, 1.0);
}

/// The client answers wsgate's Ping with another payload first: that Pong
/// is not an answer and reaches the upstream; the answer with the right
/// payload does not.
#[tokio::test]
async fn a_pong_with_another_payload_is_forwarded_and_the_answer_is_not() {
    let up = spawn_recording_upstream().await;
    let gate = spawn_sidecar(pinging(up.addr, 0.2, 10.0)).await;
    let mut client = within("upgrade", raw_tunnel(gate.addr)).await;
    let (b0, _, ping) = read_frame(&mut client).await;
    assert_eq!(b0, 0x89);
    let mut wrong = ping.clone();
    wrong[7] ^= 0xff;
    client
        .write_all(&client_frame(0xA, true, &wrong))
        .await
        .expect("pong");
    client
        .write_all(&client_frame(0xA, true, &ping))
        .await
        .expect("pong");
    // An echo behind both: once it is back, the upstream has read them.
    client
        .write_all(&client_frame(0x1, true, b"after"))
        .await
        .expect("text");
    assert_eq!(
        next_but_pings(&mut client).await,
        (0x81, false, b"after".to_vec())
    );
    assert_eq!(
        pongs_at(&up),
        vec![wrong],
        "only the Pong that answers nothing"
    );
}

// ---------------------------------------------------------------- a client that stops reading

/// An upstream that floods each connection with 64 KiB binary frames until
/// wsgate's Close arrives; it then stops (between two frames) and answers
/// it. It notes the Close's code and reason, and how many bytes it had
/// written by then.
struct Flood {
    upstream: RawUpstream,
    close: Arc<Mutex<Option<(u16, String)>>>,
    sent_before_close: Arc<AtomicUsize>,
}

async fn spawn_flooding_upstream() -> Flood {
    let close = Arc::new(Mutex::new(None));
    let sent_before_close = Arc::new(AtomicUsize::new(0));
    let (close_for, sent_for) = (Arc::clone(&close), Arc::clone(&sent_before_close));
    let upstream = spawn_raw_upstream(move |mut s: TcpStream| {
        let (close, sent_before_close) = (Arc::clone(&close_for), Arc::clone(&sent_for));
        async move {
            let head = read_request_head(&mut s).await;
            if s.write_all(switching_response(&head).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (mut rx, mut tx) = s.into_split();
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicUsize::new(0));
            let (stop_writer, sent_by_writer) = (Arc::clone(&stop), Arc::clone(&sent));
            let writer = tokio::spawn(async move {
                let frame = server_frame(0x82, &[0x5a; 64 * 1024]);
                while !stop_writer.load(Ordering::SeqCst) {
                    if tx.write_all(&frame).await.is_err() {
                        return;
                    }
                    sent_by_writer.fetch_add(frame.len(), Ordering::SeqCst);
                }
                let _ = tx
                    .write_all(&server_frame(0x88, &1001u16.to_be_bytes()))
                    .await;
            });
            let (b0, _, payload) = read_frame(&mut rx).await;
            sent_before_close.store(sent.load(Ordering::SeqCst), Ordering::SeqCst);
            if b0 == 0x88 && payload.len() >= 2 {
                *close.lock().expect("lock") = Some((
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8_lossy(&payload[2..]).into_owned(),
                ));
            }
            stop.store(true, Ordering::SeqCst);
            let _ = writer.await;
            discard_until_eof(&mut rx).await;
        }
    })
    .await;
    Flood {
        upstream,
        close,
        sent_before_close,
    }
}

/// A client socket with a small receive buffer that completes the upgrade
/// and then never reads.
async fn non_reading_client(gate: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let s = within("connect", sock.connect(gate))
        .await
        .expect("connect");
    let (s, head) = upgrade_on(s).await;
    assert_eq!(status_of(&head), 101, "{head}");
    s
}

/// A reader that stops while the upstream floods: once its socket and
/// wsgate's send buffer are full, wsgate stops reading the upstream (one
/// buffer, no more: its RSS stays flat), and `send_timeout` later ends the
/// session: `end="send_timeout"` in the metrics and the access log, Close
/// 1001 to the upstream, the client's socket reset, the slot and the
/// descriptors back. The wsgate binary runs as a child, so its RSS is its
/// own.
#[tokio::test]
async fn a_reader_that_stops_is_ended_by_the_send_timeout_with_memory_bounded() {
    let flood = spawn_flooding_upstream().await;
    let send_timeout = Duration::from_secs(1);
    let gate = start_gate(
        flood.upstream.addr,
        &[],
        &[
            ("WSGATE_LOG_FORMAT", "json".to_owned()),
            ("WSGATE_SEND_TIMEOUT", "1s".to_owned()),
        ],
    )
    .await;
    let before = gate.process.stat();
    let mut client = non_reading_client(gate.proxy).await;
    let start = Instant::now();
    // RSS sampled while the flood pushes, until the slot is back.
    let mut peak_kib = before.rss_kib;
    loop {
        peak_kib = peak_kib.max(gate.process.stat().rss_kib);
        if try_metric(gate.admin, ACTIVE).await == Some(0.0) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = start.elapsed();
    let grown_kib = peak_kib.saturating_sub(before.rss_kib);
    let sent = flood.sent_before_close.load(Ordering::SeqCst);
    println!(
        "send timeout after {took:.2?}; wsgate RSS {} KiB -> peak {peak_kib} KiB (+{grown_kib} KiB); \
         the upstream had written {} KiB when wsgate's Close came",
        before.rss_kib,
        sent / 1024
    );
    assert!(
        took >= send_timeout && took < send_timeout + Duration::from_secs(3),
        "ended after {took:?}"
    );
    // One buffer per direction and the allocator's slack, not the flood,
    // which at loopback speed would be far past the bound within the timeout.
    assert!(grown_kib < 8 * 1024, "RSS grew by {grown_kib} KiB");
    assert!(
        sent < 32 << 20,
        "the upstream got {sent} bytes out: not pushed back"
    );
    assert_eq!(
        *flood.close.lock().expect("lock"),
        Some((1001, "send timeout".to_owned()))
    );
    assert_eq!(ended_by_wsgate(gate.admin, "send_timeout").await, 1.0);
    let (record, _) = access_record(&gate, "/").await;
    assert_eq!(record["end"], "send_timeout", "{record:?}");
    assert_eq!(record["closed_by"], "wsgate", "{record:?}");
    assert!(
        closed_within(&mut client, RELEASE_BOUND).await,
        "the client's TCP ended"
    );
    wait_child_fds(&gate.process, before.fds).await;
}

// ---------------------------------------------------------------- off by default

/// With the keys at their defaults wsgate sends no Ping: an idle client
/// hears nothing for a second (an observation window: nothing is awaited),
/// and the counter is there, at 0.
#[tokio::test]
async fn pings_are_off_by_default() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let mut client = within("upgrade", raw_tunnel(gate.addr)).await;
    let mut byte = [0u8; 1];
    let heard = tokio::time::timeout(Duration::from_secs(1), client.read(&mut byte)).await;
    assert!(heard.is_err(), "the idle client heard {heard:?}");
    assert_eq!(metric(gate.admin, PINGS_SENT).await, 0.0);
    assert_eq!(metric(gate.admin, ACTIVE).await, 1.0);
}

// ---------------------------------------------------------------- a client that vanished

/// A [`Py`] client that completes the upgrade (argv: host, port), prints
/// the status line, then freezes its socket in `TCP_REPAIR` mode and keeps
/// it: its kernel still acknowledges what arrives, but nothing reaches its
/// application and nothing leaves it, no FIN, no RST (prints "frozen", or
/// exits 3 when refused). To wsgate it is a client whose host or process
/// went silent.
const FROZEN_CLIENT: &str = r#"
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port))
send_upgrade(s, host, port, "/")
print(read_head(s).split(b"\r\n")[0].decode(), flush=True)
try:
    s.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
except OSError as e:
    print("no TCP_REPAIR: %s" % e, flush=True)
    sys.exit(3)
print("frozen", flush=True)
sys.stdin.read()  # keep the socket until the test ends
"#;

/// Tests that need `CAP_NET_ADMIN` for `TCP_REPAIR`; the module name is the
/// marker `.ci/run` filters on where it is missing (as in keepalive.rs).
mod needs_cap_net_admin {
    use super::*;

    const NEEDS: &str = "TCP_REPAIR refused: these tests need CAP_NET_ADMIN \
                         (.ci/run leaves them out where it is missing)";

    /// Starts `script` against `gate`; waits for the 101 and then for
    /// `done` (when the client went silent).
    fn client_going_silent(script: &str, gate: SocketAddr, done: &str) -> Py {
        let py = Py::start(script, &[gate.ip().to_string(), gate.port().to_string()]);
        let status = py.line();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        assert_eq!(py.line(), done, "{NEEDS}");
        py
    }

    /// Polls until no slot is held; how long that took from `since`.
    async fn released_after(admin: SocketAddr, since: Instant) -> Duration {
        loop {
            if try_metric(admin, ACTIVE).await == Some(0.0) {
                return since.elapsed();
            }
            assert!(since.elapsed() < DEADLINE, "the slot was never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client gone silent right after its upgrade (no FIN, no RST), with
    /// TCP keepalive off: nothing but the pings can find it. Its slot comes
    /// back `ping_interval + pong_timeout` after its last byte (± 0.5 s),
    /// as `end="ping_timeout"`; the upstream gets Close 1001; wsgate keeps
    /// no descriptor of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_client_is_released_at_ping_interval_plus_pong_timeout() {
        let up = spawn_recording_upstream().await;
        let (interval, pong_timeout) = (1.0, 1.0);
        let gate = spawn_sidecar(pinging(up.addr, interval, pong_timeout)).await;
        let baseline = open_fds();
        let py =
            tokio::task::block_in_place(|| client_going_silent(FROZEN_CLIENT, gate.addr, "frozen"));
        let since = Instant::now();
        let took = released_after(gate.admin, since).await;
        let expected = Duration::from_secs_f64(interval + pong_timeout);
        println!("silent client released after {took:.2?} (ping_interval {interval}s + pong_timeout {pong_timeout}s)");
        assert!(
            took + Duration::from_millis(500) >= expected
                && took <= expected + Duration::from_millis(500),
            "released after {took:?}, expected {expected:?} ± 0.5 s"
        );
        assert_eq!(ended_by_wsgate(gate.admin, "ping_timeout").await, 1.0);
        assert_eq!(up.closes(), vec![(1001, "ping timeout".to_owned())]);
        // The helper's pipes are descriptors of this process too.
        drop(py);
        wait_fds(baseline, 0).await;
    }

    /// A client whose socket vanished (closed in `TCP_REPAIR` mode: no FIN,
    /// no RST) while its host is up: wsgate's first Ping is answered by the
    /// host with a RST, so the slot comes back at `ping_interval`, well
    /// before the pong timeout, as the reset it is (`end="client_eof"`).
    /// Without pings (and keepalive off) nothing would ever find it
    /// (keepalive.rs shows that).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vanished_client_is_found_by_the_first_ping() {
        let up = spawn_echo_upstream().await;
        let (interval, pong_timeout) = (1.0, 5.0);
        let gate = spawn_sidecar(pinging(up.addr, interval, pong_timeout)).await;
        let baseline = open_fds();
        let py = tokio::task::block_in_place(|| {
            client_going_silent(VANISHING_CLIENT, gate.addr, "vanished")
        });
        let took = released_after(gate.admin, Instant::now()).await;
        println!("vanished client released after {took:.2?} (ping_interval {interval}s)");
        let expected = Duration::from_secs_f64(interval);
        assert!(
            took + Duration::from_millis(500) >= expected
                && took <= expected + Duration::from_millis(500),
            "released after {took:?}, expected {expected:?} ± 0.5 s"
        );
        assert_eq!(metric(gate.admin, PINGS_SENT).await, 1.0);
        assert_eq!(
            labelled_metric(
                gate.admin,
                "wsgate_sessions_ended_total",
                &[("closed_by", "none"), ("end", "client_eof")]
            )
            .await,
            1.0
        );
        // The helper's pipes are descriptors of this process too.
        drop(py);
        wait_fds(baseline, 0).await;
    }
}
