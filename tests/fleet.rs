//! Fleet-wide limits through Redis (SPEC §10), black-box: real wsgate
//! processes started the way a user starts them (a TOML file through
//! `--config`, the listen addresses through the environment), a real echo
//! upstream, real WebSocket clients and a real `redis-server` started by the
//! test (`tests/support/redis.rs`; `bash .ci/run` installs it). The tests
//! read Redis directly with `redis-cli`: every key of a namespace starts with
//! `{NS}:`, `{NS}:all` holds one member per connection counted against
//! `fleet_max_clients`, `{NS}:key:RULE:VALUE` one per connection of a
//! `fleet = true` rule's key value, and a namespace with nothing held has no
//! key at all.
#![allow(clippy::print_stdout, reason = "tests report what they measured")]

mod support;

use std::time::Duration;

use support::*;

/// The harness on its own: start, commands, pause (SIGSTOP: no answer, the
/// socket stays), resume, restart (same port, empty), SIGKILL, drop (the
/// process is gone); a Unix socket with a password; TLS.
#[test]
fn redis_harness_starts_pauses_restarts_and_kills() {
    let mut r = RedisServer::start();
    assert!(r.url().starts_with("redis://127.0.0.1:"), "{}", r.url());
    assert_eq!(r.cli(&["ZADD", "{t}:all", "1", "a", "2", "b"]), "2");
    assert_eq!(r.zcard("{t}:all"), 2);
    assert_eq!(r.zcard("{t}:nothing"), 0);
    assert_eq!(
        r.zrange_with_scores("{t}:all"),
        vec![("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]
    );
    assert_eq!(r.keys("{t}*"), vec!["{t}:all".to_owned()]);
    let now = r.time_ms();
    assert!(now > 1_600_000_000_000, "TIME in ms: {now}");

    r.pause();
    let paused = r.raw_ping(Duration::from_millis(300));
    assert!(
        paused.is_err(),
        "a paused server must not answer: {paused:?}"
    );
    r.resume();
    assert_eq!(r.raw_ping(Duration::from_secs(2)).expect("ping"), "+PONG");
    assert_eq!(r.zcard("{t}:all"), 2, "a pause keeps the data");

    let (port, pid) = (r.port, r.pid);
    r.restart();
    assert_eq!(r.port, port, "restarted on the same port");
    assert_ne!(r.pid, pid, "a new process");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the old process is gone"
    );
    assert_eq!(r.dbsize(), 0, "a restart is empty");
    assert!(r.keys("{t}*").is_empty());

    r.kill9();
    assert!(!r.is_running());
    let refused = r.raw_ping(Duration::from_secs(1));
    assert!(refused.is_err(), "killed, yet it answered: {refused:?}");
    r.start_again();
    assert_eq!(r.cli(&["PING"]), "PONG");
    let pid = r.pid;
    drop(r);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "dropping the server kills and reaps it"
    );

    let unix = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Unix,
        password: Some("secret".into()),
    });
    let url = unix.url();
    assert!(
        url.starts_with("unix:///") && url.ends_with("/redis.sock?pass=secret"),
        "{url}"
    );
    assert_eq!(unix.port, 0);
    assert_eq!(unix.cli(&["SET", "{t}:k", "v"]), "OK");
    assert!(
        unix.raw_ping(Duration::from_secs(2))
            .expect("ping")
            .starts_with("-NOAUTH"),
        "the password is required"
    );
    assert_eq!(
        unix.url_with_password(Some("wrong")),
        url.replace("secret", "wrong")
    );

    let tcp_pass = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tcp,
        password: Some("secret".into()),
    });
    assert!(
        tcp_pass.url().starts_with("redis://:secret@127.0.0.1:"),
        "{}",
        tcp_pass.url()
    );
    assert_eq!(tcp_pass.cli(&["PING"]), "PONG");

    let tls = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tls,
        password: None,
    });
    assert!(
        tls.url().starts_with("rediss://127.0.0.1:"),
        "{}",
        tls.url()
    );
    assert_eq!(tls.cli(&["PING"]), "PONG", "TLS with the test CA");
    // Plain RESP to the TLS port gets no PONG.
    let plain = std::net::TcpStream::connect(("127.0.0.1", tls.port)).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = std::io::Write::write_all(&mut &plain, b"PING\r\n");
    let _ = std::io::Read::read_to_string(&mut &plain, &mut answer);
    assert!(!answer.contains("PONG"), "TLS port answered plain text");
}
