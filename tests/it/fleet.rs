//! Fleet-wide limits through Redis (docs/operations.md#fleet-wide-limits), black-box: real wsgate
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

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// While Redis is down, slow or paused an admission may take `fleet_timeout`
/// (docs/operations.md#fleet-wide-limits) plus this: the handshake, the upstream's 101, a loaded machine.
const ADMISSION_MARGIN: Duration = Duration::from_millis(400);

/// The recovery promises are "within one renewal interval (plus the client's
/// reconnect, at most 2 s)"; a probe (one `redis-cli`, one scrape) costs some
/// tens of milliseconds on a loaded CI machine, which this allows for.
const PROBE_SLACK: Duration = Duration::from_millis(500);

/// The reconnect part of the recovery promises (docs/operations.md#fleet-wide-limits).
const RECONNECT: Duration = Duration::from_secs(2);

/// Polls `check` (an expression of type `Result<(), String>`, which may
/// `.await`) every 25 ms until it is `Ok`, failing with the last `Err` once
/// `limit` has passed; evaluates to the time it took.
macro_rules! eventually {
    ($what:expr, $limit:expr, $check:expr) => {{
        let start = Instant::now();
        let limit: Duration = $limit;
        loop {
            let result: Result<(), String> = $check;
            match result {
                Ok(()) => break start.elapsed(),
                Err(last) => assert!(
                    start.elapsed() < limit,
                    "{}: not within {limit:?}; last seen: {last}",
                    $what
                ),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }};
}
// The cluster and sentinel modules poll the same way.
pub(crate) use eventually;

// ---------------------------------------------------------------- fleet configuration

/// The docs/operations.md#fleet-wide-limits keys of one fleet, written into the TOML file each
/// instance is started with (`[[key_limits]]` exist only in a file).
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    url: String,
    pub(crate) namespace: String,
    max_clients: u64,
    pub(crate) lease_ttl: Duration,
    pub(crate) timeout: Duration,
    fail_mode: &'static str,
    /// `[[key_limits]]` tables, each with `fleet = true`.
    rules: Vec<toml::Table>,
    /// Other top-level keys (`max_clients`, `enforce`, …).
    extra: toml::Table,
}

impl Fleet {
    /// docs/operations.md#fleet-wide-limits's defaults (lease 30 s, timeout 100 ms, `open`, no cap) on `url`.
    pub(crate) fn new(url: &str, namespace: &str) -> Fleet {
        Fleet {
            url: url.to_owned(),
            namespace: namespace.to_owned(),
            max_clients: 0,
            lease_ttl: Duration::from_secs(30),
            timeout: Duration::from_millis(100),
            fail_mode: "open",
            rules: Vec::new(),
            extra: toml::Table::new(),
        }
    }

    /// Another top-level key of the file.
    pub(crate) fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Fleet {
        self.extra.insert(key.into(), value.into());
        self
    }

    pub(crate) fn max(mut self, n: u64) -> Fleet {
        self.max_clients = n;
        self
    }

    pub(crate) fn lease(mut self, d: Duration) -> Fleet {
        self.lease_ttl = d;
        self
    }

    pub(crate) fn timeout(mut self, d: Duration) -> Fleet {
        self.timeout = d;
        self
    }

    pub(crate) fn mode(mut self, m: &'static str) -> Fleet {
        self.fail_mode = m;
        self
    }

    /// A `fleet = true` rule keyed on `key` with `max_per_key`.
    pub(crate) fn rule(mut self, name: &str, key: &str, max_per_key: i64) -> Fleet {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.into());
        t.insert("key".into(), key.into());
        t.insert("max_per_key".into(), max_per_key.into());
        t.insert("fleet".into(), true.into());
        self.rules.push(t);
        self
    }

    /// Renewals run every `fleet_lease_ttl / 3` (docs/operations.md#fleet-wide-limits).
    pub(crate) fn renewal(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// The TOML file of one instance; `instance` sets `fleet_instance_id`
    /// (`None`: the default, `$HOSTNAME` plus a random suffix).
    pub(crate) fn toml(&self, instance: Option<&str>) -> String {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut t = self.extra.clone();
        t.insert("fleet_redis_url".into(), self.url.clone().into());
        t.insert("fleet_namespace".into(), self.namespace.clone().into());
        t.insert(
            "fleet_max_clients".into(),
            i64::try_from(self.max_clients).expect("small").into(),
        );
        t.insert("fleet_lease_ttl".into(), ms(self.lease_ttl).into());
        t.insert("fleet_timeout".into(), ms(self.timeout).into());
        t.insert("fleet_fail_mode".into(), self.fail_mode.into());
        if let Some(id) = instance {
            t.insert("fleet_instance_id".into(), id.into());
        }
        if !self.rules.is_empty() {
            t.insert(
                "key_limits".into(),
                toml::Value::Array(self.rules.iter().cloned().map(Into::into).collect()),
            );
        }
        toml::to_string(&t).expect("render the TOML")
    }

    /// `{NS}:all`: the holds counted against `fleet_max_clients`.
    fn all_key(&self) -> String {
        format!("{{{}}}:all", self.namespace)
    }

    /// `{NS}:key:RULE:VALUE`: the holds of one key value of a fleet rule.
    fn key_key(&self, rule: &str, value: &str) -> String {
        format!("{{{}}}:key:{rule}:{value}", self.namespace)
    }

    /// Every key of the namespace (`--scan --pattern '{NS}*'`).
    fn keys(&self, redis: &RedisServer) -> Vec<String> {
        redis.keys(&format!("{{{}}}*", self.namespace))
    }

    /// `Ok` when Redis holds nothing for the namespace.
    fn redis_empty(&self, redis: &RedisServer) -> Result<(), String> {
        let keys = self.keys(redis);
        if keys.is_empty() {
            Ok(())
        } else {
            let all = redis.zrange_with_scores(&self.all_key());
            Err(format!(
                "Redis still holds {keys:?} ({} all: {all:?})",
                self.all_key()
            ))
        }
    }

    /// `Ok` when `{NS}:all` has exactly `n` members, none of them expired.
    fn all_is(&self, redis: &RedisServer, n: u64) -> Result<(), String> {
        holds_are(redis, &self.all_key(), n)
    }
}

/// `Ok` when sorted set `key` has exactly `n` members and none has expired
/// (an expired member lingers until a script drops it, so ZCARD alone could
/// count a hold whose renewal was lost).
fn holds_are(redis: &RedisServer, key: &str, n: u64) -> Result<(), String> {
    match (redis.zcard(key), redis.zcount_unexpired(key)) {
        (all, live) if all == n && live == n => Ok(()),
        (all, live) => Err(format!(
            "{key}: ZCARD {all}, unexpired {live}, want {n}; {:?}",
            redis.zrange_with_scores(key)
        )),
    }
}

// ---------------------------------------------------------------- instances

/// One wsgate process of the fleet: `wsgate --config FILE`, with the
/// listen addresses (port 0) and the upstream in the environment.
pub(crate) struct Gate {
    process: GateProcess,
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gate {
    pub(crate) fn start(upstream: SocketAddr, fleet: &Fleet, instance: Option<&str>) -> Gate {
        Gate::start_with_env(upstream, fleet, instance, &[])
    }

    fn start_with_env(
        upstream: SocketAddr,
        fleet: &Fleet,
        instance: Option<&str>,
        env: &[(&str, String)],
    ) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir for the config file");
        let file = dir.path().join("wsgate.toml");
        std::fs::write(&file, fleet.toml(instance)).expect("write the config file");
        let path = file.to_str().expect("utf-8 path").to_owned();
        let (process, proxy, admin) =
            GateProcess::proxy_with_args(upstream, &["--config", &path], env, None);
        Gate {
            process,
            proxy,
            admin,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/", self.proxy)
    }

    /// An upgrade with `headers`: the client, or the refusal (status, `Retry-After`).
    pub(crate) async fn upgrade(
        &self,
        headers: &[(&str, &str)],
    ) -> Result<Ws, (u16, Option<String>)> {
        try_upgrade(&self.url(), headers).await
    }

    /// An upgrade that must be admitted; echoes once to prove it.
    pub(crate) async fn admit(&self, headers: &[(&str, &str)]) -> Ws {
        let mut ws = self.upgrade(headers).await.unwrap_or_else(|e| {
            panic!(
                "{}: upgrade refused: {e:?}
{}",
                self.proxy,
                self.log()
            )
        });
        echo_text(&mut ws, "admitted").await;
        ws
    }

    /// An upgrade that must be admitted, without a message (for upstreams
    /// that do not echo).
    async fn admit_without_echo(&self) -> Ws {
        self.upgrade(&[])
            .await
            .unwrap_or_else(|e| panic!("{}: upgrade refused: {e:?}\n{}", self.proxy, self.log()))
    }

    pub(crate) async fn metric(&self, series: &str) -> f64 {
        metric(self.admin, series).await
    }

    pub(crate) async fn rejected(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "wsgate_connections_rejected_total{{reason=\"{reason}\"}}"
        ))
        .await
    }

    /// `wsgate_fleet_requests_total{op, result}`.
    pub(crate) async fn fleet_requests(&self, op: &str, result: &str) -> f64 {
        labelled_metric(
            self.admin,
            "wsgate_fleet_requests_total",
            &[("op", op), ("result", result)],
        )
        .await
    }

    /// Open descriptors of the wsgate process.
    fn fds(&self) -> usize {
        self.process.stat().fds
    }

    pub(crate) fn log(&self) -> String {
        self.process.stderr_text()
    }
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to at least `n` (the
/// clients and the in-process upstream of a thousand connections).
pub(crate) fn raise_nofile(n: u64) {
    let got = rlimit::increase_nofile_limit(n).expect("raise RLIMIT_NOFILE");
    assert!(got >= n, "RLIMIT_NOFILE is {got}, this test needs {n}");
}

/// The first admission of a new instance (retried: the instance may still
/// be connecting to Redis), an echo, a clean close; then waits until the
/// instance is idle, Redis holds nothing for the namespace and
/// `wsgate_fleet_up` is 1. Leaves lazily made state in every baseline.
async fn warm_up(gate: &Gate, fleet: &Fleet, redis: &RedisServer) {
    warm_up_until(gate, || fleet.redis_empty(redis)).await;
}

/// [`warm_up`] on any deployment: `empty` says whether the store holds
/// nothing of the namespace (one server, a Cluster's primaries, …).
pub(crate) async fn warm_up_until(gate: &Gate, empty: impl Fn() -> Result<(), String>) {
    let start = Instant::now();
    let mut ws = loop {
        match gate.upgrade(&[]).await {
            Ok(ws) => break ws,
            Err(e) => assert!(
                start.elapsed() < DEADLINE,
                "a new instance never admitted: {e:?}; its log:\n{}",
                gate.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    echo_text(&mut ws, "warm-up").await;
    close_cleanly(ws).await;
    settle_until(&[gate], empty).await;
    wait_metric(gate.admin, "wsgate_fleet_up", 1.0).await;
}

/// Two instances of `fleet` in front of `upstream`, each warmed up
/// ([`warm_up_until`] with `empty`).
pub(crate) async fn two_warm_gates(
    upstream: SocketAddr,
    fleet: &Fleet,
    empty: impl Fn() -> Result<(), String>,
) -> [Gate; 2] {
    let gates = [
        Gate::start(upstream, fleet, None),
        Gate::start(upstream, fleet, None),
    ];
    for g in &gates {
        warm_up_until(g, &empty).await;
    }
    gates
}

/// Waits (bounded) until every one of `gates` is idle and Redis holds
/// nothing for the namespace.
async fn settle(gates: &[&Gate], fleet: &Fleet, redis: &RedisServer) {
    settle_until(gates, || fleet.redis_empty(redis)).await;
}

/// [`settle`] on any deployment: until every one of `gates` is idle and
/// `empty` is `Ok`.
pub(crate) async fn settle_until(gates: &[&Gate], empty: impl Fn() -> Result<(), String>) {
    eventually!("every instance idle and Redis empty", DEADLINE, {
        let mut active = Vec::new();
        for g in gates {
            active.push(g.metric(ACTIVE).await);
        }
        if active.iter().any(|&a| a != 0.0) {
            Err(format!("{ACTIVE} = {active:?}"))
        } else {
            empty()
        }
    });
}

/// Every one of `gates` admits again within `bound` of `since` (after a
/// failover): one new connection each, kept in `live`.
pub(crate) async fn admissions_resume(
    gates: &[Gate],
    since: Instant,
    bound: Duration,
    live: &mut Vec<Ws>,
) {
    for g in gates {
        let mut ws = None;
        eventually!(
            "admissions resume after the failover",
            bound.saturating_sub(since.elapsed()) + PROBE_SLACK,
            match g.upgrade(&[]).await {
                Ok(w) => {
                    ws = Some(w);
                    Ok(())
                }
                Err(e) => Err(format!("{e:?}")),
            }
        );
        println!(
            "{}: admitting {:?} after the promotion",
            g.proxy,
            since.elapsed()
        );
        live.push(ws.expect("admitted"));
    }
}

/// Sums `series` over `gates`.
pub(crate) async fn sum(gates: &[Gate], series: &str) -> f64 {
    let mut total = 0.0;
    for g in gates {
        total += g.metric(series).await;
    }
    total
}

/// Closes every client cleanly, all at once.
pub(crate) async fn close_all(clients: Vec<Ws>) {
    futures_util::future::join_all(clients.into_iter().map(close_cleanly)).await;
}

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

// ---------------------------------------------------------------- the cap under concurrency

/// Three instances share `fleet_max_clients = 100`; 1,000 upgrades at once,
/// spread over the three: exactly 100 are admitted, 900 get 503 with
/// `Retry-After` and are counted as `reason="fleet"` by the instance that
/// refused them; `{NS}:all` holds 100 members scored by their expiry (Redis
/// time, within `fleet_lease_ttl`); afterwards every instance is idle and
/// Redis holds nothing. `closed` with a 5 s timeout: the promise is about a
/// healthy Redis, and any Redis trouble shows up as `fleet_unavailable`
/// (asserted 0) instead of as an overshoot. The three instances keep the
/// default `fleet_instance_id`: on one host their holds must not collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_admit_exactly_the_fleet_cap_of_1000_concurrent_upgrades() {
    raise_nofile(4096);
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "cap")
        .max(100)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates: Vec<Gate> = (0..3).map(|_| Gate::start(up.addr, &fleet, None)).collect();
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
        assert_eq!(g.metric("wsgate_fleet_max").await, 100.0);
    }

    let start = Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let url = gates[i % 3].url();
            tokio::spawn(async move { (i % 3, upgrade_outcome(&url, &[]).await) })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = [0usize; 3];
    let mut odd = Vec::new();
    for t in tasks {
        let (g, outcome) = within("one of the 1,000 upgrades", t).await.expect("join");
        match outcome {
            Upgrade::Admitted(ws) => admitted.push(*ws),
            Upgrade::Refused(503, Some(_)) => refused[g] += 1,
            other => odd.push(format!("{other:?}")),
        }
    }
    let took = start.elapsed();
    println!(
        "1,000 concurrent upgrades over 3 instances: {} admitted, refused per instance {refused:?}, in {took:?}",
        admitted.len()
    );
    assert!(odd.is_empty(), "neither 101 nor 503 + Retry-After: {odd:?}");
    assert_eq!(
        admitted.len(),
        100,
        "the fleet admitted more or less than its cap"
    );
    for (g, gate) in gates.iter().enumerate() {
        assert_eq!(
            gate.rejected("fleet").await,
            refused[g] as f64,
            "instance {g} counts the refusals its clients saw"
        );
        assert_eq!(gate.rejected("fleet_unavailable").await, 0.0);
    }
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet\"}"
        )
        .await,
        900.0
    );
    assert_eq!(sum(&gates, ACTIVE).await, 100.0);
    for g in &gates {
        let seen = g.metric("wsgate_fleet_active").await;
        assert!(seen <= 100.0, "wsgate_fleet_active {seen} over the cap");
    }
    fleet
        .all_is(&redis, 100)
        .expect("one hold per admitted connection");
    let now = redis.time_ms() as f64;
    let lease_ms = fleet.lease_ttl.as_millis() as f64;
    for (member, expiry) in redis.zrange_with_scores(&fleet.all_key()) {
        assert!(
            expiry > now && expiry <= now + lease_ms + 1000.0,
            "hold {member} expires at {expiry}, Redis time {now}, lease {lease_ms} ms"
        );
    }
    let stray: Vec<String> = redis
        .keys("*")
        .into_iter()
        .filter(|k| !k.starts_with("{cap}:"))
        .collect();
    assert!(stray.is_empty(), "keys outside the namespace: {stray:?}");
    for ws in &mut admitted {
        echo_text(ws, "one of the hundred").await;
    }

    close_all(admitted).await;
    let refs: Vec<&Gate> = gates.iter().collect();
    settle(&refs, &fleet, &redis).await;
}

// ---------------------------------------------------------------- a fleet key rule

/// A `fleet = true` rule (`header:X-Tenant`, 5 per tenant) across two
/// instances: tenant a's five connections, spread over both, fill its
/// share; the sixth is refused with 429 and `Retry-After` (reason `key`) on
/// either instance; tenant b still connects; when one of a's connections on
/// the first instance closes, a new one is admitted on the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_key_rule_counts_a_tenant_across_instances() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "tenants")
        .rule("tenant", "header:X-Tenant", 5)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates = [
        Gate::start(up.addr, &fleet, Some("gate-a")),
        Gate::start(up.addr, &fleet, Some("gate-b")),
    ];
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
    }
    let a = [("x-tenant", "a")];
    let mut tenant_a = Vec::new();
    for i in 0..5 {
        tenant_a.push(gates[i % 2].admit(&a).await);
    }
    let a_key = fleet.key_key("tenant", "a");
    holds_are(&redis, &a_key, 5).expect("tenant a's five holds");
    for g in &gates {
        assert_eq!(
            g.upgrade(&a).await.err(),
            Some((429, Some("1".into()))),
            "the sixth of tenant a on {}",
            g.proxy
        );
        assert_eq!(g.rejected("key").await, 1.0);
        assert_eq!(
            g.metric("wsgate_key_rejected_total{rule=\"tenant\"}").await,
            1.0
        );
        assert_eq!(g.rejected("fleet_unavailable").await, 0.0);
    }
    let b = [("x-tenant", "b")];
    let tenant_b = vec![gates[0].admit(&b).await, gates[1].admit(&b).await];
    holds_are(&redis, &fleet.key_key("tenant", "b"), 2).expect("tenant b's two holds");
    holds_are(&redis, &a_key, 5).expect("tenant a's five holds");

    // One of a's connections on the first instance closes (tenant_a[0] is on gates[0]).
    close_cleanly(tenant_a.remove(0)).await;
    let mut again = None;
    let took = eventually!(
        "tenant a's share back on the other instance",
        RELEASE_BOUND,
        match gates[1].upgrade(&a).await {
            Ok(ws) => {
                again = Some(ws);
                Ok(())
            }
            Err(e) => Err(format!("{e:?}")),
        }
    );
    println!("tenant a's share was free on the other instance {took:?} after the close");
    let mut again = again.expect("admitted");
    echo_text(&mut again, "back").await;
    tenant_a.push(again);
    holds_are(&redis, &a_key, 5).expect("tenant a's five holds again");
    assert_eq!(gates[0].upgrade(&a).await.err().map(|e| e.0), Some(429));

    close_all(tenant_a).await;
    close_all(tenant_b).await;
    settle(&[&gates[0], &gates[1]], &fleet, &redis).await;
}

// ---------------------------------------------------------------- an instance killed

/// An instance holding 30 of `fleet_max_clients = 40` is killed with
/// SIGKILL (it releases nothing). At once, the other instance can admit
/// only 10; the dead instance's holds expire within `fleet_lease_ttl` (3 s)
/// of its last renewal, so within 3 s (+2 s of margin) of the kill the other
/// instance has all 40; once those close Redis is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_frees_its_fleet_slots_within_the_lease_ttl() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "killed")
        .max(40)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(500))
        .mode("closed");
    let mut doomed = Gate::start(up.addr, &fleet, Some("doomed"));
    let survivor = Gate::start(up.addr, &fleet, Some("survivor"));
    warm_up(&doomed, &fleet, &redis).await;
    warm_up(&survivor, &fleet, &redis).await;
    let mut held_by_doomed = Vec::new();
    for _ in 0..30 {
        held_by_doomed.push(doomed.admit(&[]).await);
    }
    fleet.all_is(&redis, 30).expect("30 holds");

    doomed.process.signal("KILL");
    doomed.process.wait_exit();
    let killed = Instant::now();
    let mut on_survivor = Vec::new();
    for _ in 0..10 {
        on_survivor.push(survivor.admit(&[]).await);
    }
    assert_eq!(
        survivor.upgrade(&[]).await.err().map(|e| e.0),
        Some(503),
        "the dead instance's 30 holds still count"
    );
    let checked = killed.elapsed();
    assert!(
        checked < Duration::from_secs(2),
        "too slow to check 'at once' ({checked:?}): the holds may have expired meanwhile"
    );
    assert_eq!(survivor.rejected("fleet").await, 1.0);

    let limit = fleet.lease_ttl + Duration::from_secs(2);
    let mut first_free = None;
    while on_survivor.len() < 40 {
        match survivor.upgrade(&[]).await {
            Ok(mut ws) => {
                echo_text(&mut ws, "a slot of the dead instance").await;
                first_free.get_or_insert(killed.elapsed());
                on_survivor.push(ws);
            }
            Err((503, _)) => {
                assert!(
                    killed.elapsed() < limit,
                    "{} of the dead instance's 30 slots still held {:?} after the kill \
                     (lease_ttl {:?}); Redis: {:?}",
                    40 - on_survivor.len(),
                    killed.elapsed(),
                    fleet.lease_ttl,
                    redis.zrange_with_scores(&fleet.all_key())
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("wanted 101 or 503, got {other:?}"),
        }
    }
    let all_free = killed.elapsed();
    println!(
        "kill -9 with 30 holds (lease_ttl 3 s): first slot free after {:?}, all 30 after {all_free:?}",
        first_free.expect("some")
    );
    assert!(all_free <= limit, "all 30 free after {all_free:?}");
    assert_eq!(
        survivor.upgrade(&[]).await.err().map(|e| e.0),
        Some(503),
        "the 41st"
    );
    fleet
        .all_is(&redis, 40)
        .expect("the survivor's 40 holds, the dead instance's gone");

    drop(held_by_doomed);
    close_all(on_survivor).await;
    settle(&[&survivor], &fleet, &redis).await;
}

// ---------------------------------------------------------------- Redis killed

/// Redis killed with SIGKILL under an instance with 5 connections: new
/// upgrades are answered within `fleet_timeout` (+ margin), admitted on the
/// local limits with `open`, refused 503 `fleet_unavailable` with `closed`;
/// `wsgate_fleet_up` is 0; every existing connection keeps echoing for a
/// whole lease. Redis started again (empty) on the same port: within one
/// renewal interval (+2 s) `wsgate_fleet_up` is 1 and `{NS}:all` counts
/// exactly the live connections.
async fn redis_killed(mode: &'static str) {
    let mut redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "down")
        .max(100)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(100))
        .mode(mode);
    let gate = Gate::start(up.addr, &fleet, Some("only"));
    warm_up(&gate, &fleet, &redis).await;
    let mut live = Vec::new();
    for _ in 0..5 {
        live.push(gate.admit(&[]).await);
    }
    fleet.all_is(&redis, 5).expect("5 holds");

    redis.kill9();
    let killed = Instant::now();
    let bound = fleet.timeout + ADMISSION_MARGIN;
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let start = Instant::now();
        let outcome = gate.upgrade(&[]).await;
        let took = start.elapsed();
        slowest = slowest.max(took);
        assert!(
            took <= bound,
            "upgrade {i} with Redis down took {took:?} (bound {bound:?})"
        );
        match (mode, outcome) {
            ("open", Ok(mut ws)) => {
                echo_text(&mut ws, "admitted on local limits").await;
                live.push(ws);
            }
            ("closed", Err((503, Some(_)))) => {}
            (_, other) => panic!("{mode}: upgrade {i} with Redis down: {other:?}"),
        }
    }
    println!("{mode}: slowest upgrade with Redis down: {slowest:?}");
    let unavailable = if mode == "closed" { 5.0 } else { 0.0 };
    assert_eq!(gate.rejected("fleet_unavailable").await, unavailable);
    assert_eq!(gate.rejected("fleet").await, 0.0);
    eventually!("wsgate_fleet_up 0 with Redis down", DEADLINE, {
        match gate.metric("wsgate_fleet_up").await {
            0.0 => Ok(()),
            v => Err(format!("wsgate_fleet_up {v}")),
        }
    });
    // A measurement window, not a synchronisation: the connections live
    // through a whole lease (failed renewals included) without Redis.
    while killed.elapsed() < fleet.lease_ttl + Duration::from_secs(1) {
        for ws in &mut live {
            echo_text(ws, "still here without Redis").await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(gate.metric(ACTIVE).await, live.len() as f64);

    redis.start_again();
    let want = live.len() as u64;
    let took = eventually!(
        "holds back after Redis came back",
        fleet.renewal() + RECONNECT + PROBE_SLACK,
        match gate.metric("wsgate_fleet_up").await {
            1.0 => fleet.all_is(&redis, want),
            v => Err(format!("wsgate_fleet_up {v}")),
        }
    );
    println!("{mode}: {want} holds back {took:?} after Redis restarted");
    for ws in &mut live {
        echo_text(ws, "after Redis came back").await;
    }
    live.push(gate.admit(&[]).await);
    fleet
        .all_is(&redis, want + 1)
        .expect("a new admission is counted");

    close_all(live).await;
    settle(&[&gate], &fleet, &redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_with_fail_open_admits_on_local_limits() {
    redis_killed("open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_with_fail_closed_refuses_as_fleet_unavailable() {
    redis_killed("closed").await;
}

// ---------------------------------------------------------------- Redis restarted empty

/// Redis restarted empty under 40 live connections (two instances, 20
/// each, all of one tenant of a `fleet = true` rule; `fleet_lease_ttl` 3 s,
/// so renewals every second). Before: within one interval every hold's
/// expiry moves a lease ahead, in one batched call per instance and
/// interval. After the restart: within one renewal interval (+2 s)
/// `{NS}:all` and the tenant's set count 40 again, with
/// `fleet_max_clients = 45` only 5 more are admitted, and after the next
/// renewal both instances' `wsgate_fleet_active` read 45.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_gets_the_live_holds_back_within_a_renewal() {
    let mut redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "restart")
        .max(45)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(500))
        .mode("closed")
        .rule("tenant", "header:X-Tenant", 100);
    let gates = [
        Gate::start(up.addr, &fleet, Some("one")),
        Gate::start(up.addr, &fleet, Some("two")),
    ];
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
    }
    let t = [("x-tenant", "t")];
    let tenant_key = fleet.key_key("tenant", "t");
    let mut live = Vec::new();
    for i in 0..40 {
        live.push(gates[i % 2].admit(&t).await);
    }
    fleet.all_is(&redis, 40).expect("40 holds");
    holds_are(&redis, &tenant_key, 40).expect("40 holds of the fleet rule");

    // Renewals: within one interval every hold's expiry moves past what an
    // admission now would give it, and each instance renews its 20 holds in
    // one batched call per interval (about 3 calls in 3 s, not 60).
    let lease_ms = fleet.lease_ttl.as_millis() as f64;
    let now = redis.time_ms() as f64;
    eventually!(
        "every hold renewed",
        fleet.renewal() + PROBE_SLACK,
        match redis
            .zrange_with_scores(&fleet.all_key())
            .into_iter()
            .find(|(_, expiry)| *expiry <= now + lease_ms)
        {
            None => Ok(()),
            Some(stale) => Err(format!("not renewed yet: {stale:?}")),
        }
    );
    let mut renewals = Vec::new();
    for g in &gates {
        renewals.push(g.fleet_requests("renew", "ok").await);
    }
    // A measurement window, not a synchronisation.
    tokio::time::sleep(fleet.lease_ttl).await;
    for (g, before) in gates.iter().zip(renewals) {
        let calls = g.fleet_requests("renew", "ok").await - before;
        assert!(
            (2.0..=5.0).contains(&calls),
            "{} renewal calls in {:?} for 20 holds, renewal every {:?}",
            calls,
            fleet.lease_ttl,
            fleet.renewal()
        );
    }

    redis.restart();
    let took = eventually!(
        "40 holds back after an empty restart",
        fleet.renewal() + RECONNECT + PROBE_SLACK,
        fleet
            .all_is(&redis, 40)
            .and_then(|()| holds_are(&redis, &tenant_key, 40))
    );
    println!("40 holds back {took:?} after Redis restarted empty (renewal every 1 s)");
    for i in 0..5 {
        live.push(gates[i % 2].admit(&t).await);
    }
    holds_are(&redis, &tenant_key, 45).expect("45 holds of the fleet rule");
    for g in &gates {
        assert_eq!(
            g.upgrade(&[]).await.err().map(|e| e.0),
            Some(503),
            "the 46th on {}",
            g.proxy
        );
    }
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet\"}"
        )
        .await,
        2.0
    );
    fleet.all_is(&redis, 45).expect("45 holds");
    // wsgate_fleet_active: the fleet-wide count seen at the last admission
    // or renewal; after the next renewal both instances see 45.
    eventually!(
        "wsgate_fleet_active 45 on both instances",
        fleet.renewal() + PROBE_SLACK,
        {
            let seen = [
                gates[0].metric("wsgate_fleet_active").await,
                gates[1].metric("wsgate_fleet_active").await,
            ];
            if seen == [45.0, 45.0] {
                Ok(())
            } else {
                Err(format!("wsgate_fleet_active {seen:?}"))
            }
        }
    );
    for ws in &mut live {
        echo_text(ws, "all 45").await;
    }
    close_all(live).await;
    settle(&[&gates[0], &gates[1]], &fleet, &redis).await;
}

// ---------------------------------------------------------------- Redis paused

/// Redis paused (SIGSTOP) for 5 s while a client makes upgrades one after
/// another (`fleet_timeout` 100 ms): no upgrade takes longer than the
/// timeout + 400 ms, whatever the mode; `wsgate_fleet_up` is 0 by the end of
/// the pause. After SIGCONT, within one renewal (+2 s), `wsgate_fleet_up` is
/// 1 and `{NS}:all` counts exactly the live connections; after they close,
/// the wsgate process has the descriptors it had before.
///
/// `open`: every upgrade is admitted (every other one closes at once, its
/// release meeting the pause too); lease 3 s. `closed`: every upgrade is
/// refused (503 `fleet_unavailable`), and an admission script that Redis
/// runs late, after SIGCONT, must not leave a hold behind for a refused
/// client: the lease (9 s) outlasts the bound, so expiry cannot hide one.
async fn redis_paused(mode: &'static str, lease: Duration) {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "paused")
        .max(1000)
        .lease(lease)
        .timeout(Duration::from_millis(100))
        .mode(mode);
    raise_nofile(4096);
    let gate = Gate::start(up.addr, &fleet, Some("only"));
    warm_up(&gate, &fleet, &redis).await;
    let baseline = gate.fds();
    let mut live = Vec::new();
    for _ in 0..5 {
        live.push(gate.admit(&[]).await);
    }

    redis.pause();
    let paused = Instant::now();
    let mut times = Vec::new();
    let mut i = 0;
    while paused.elapsed() < Duration::from_secs(5) {
        let start = Instant::now();
        let outcome = gate.upgrade(&[]).await;
        times.push(start.elapsed());
        match (mode, outcome) {
            ("open", Ok(mut ws)) => {
                echo_text(&mut ws, "during the pause").await;
                // Every other one closes at once: its release meets the pause too.
                if i % 2 == 0 {
                    live.push(ws);
                } else {
                    close_cleanly(ws).await;
                }
            }
            ("closed", Err((503, Some(_)))) => {}
            (_, other) => panic!("{mode}: upgrade {i} while Redis is paused: {other:?}"),
        }
        i += 1;
        // Pacing, not a synchronisation: an instance that skips a Redis it
        // knows is down answers in milliseconds; this keeps the connections
        // of 5 s to a few hundred.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up_during = gate.metric("wsgate_fleet_up").await;
    redis.resume();
    let slowest = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{mode}: Redis paused 5 s: {} upgrades one after another, slowest {slowest:?}, median {:?} (fleet_timeout {:?})",
        times.len(),
        {
            let mut t = times.clone();
            t.sort();
            t.get(t.len() / 2).copied().unwrap_or_default()
        },
        fleet.timeout
    );
    let bound = fleet.timeout + ADMISSION_MARGIN;
    assert!(
        slowest <= bound,
        "an upgrade took {slowest:?} while Redis was paused (bound {bound:?})"
    );
    assert_eq!(up_during, 0.0, "wsgate_fleet_up at the end of a 5 s pause");

    let want = live.len() as u64;
    let took = eventually!(
        "counts right after SIGCONT",
        fleet.renewal() + RECONNECT + PROBE_SLACK,
        match gate.metric("wsgate_fleet_up").await {
            1.0 => fleet.all_is(&redis, want),
            v => Err(format!("wsgate_fleet_up {v}")),
        }
    );
    eprintln!("{mode}: after SIGCONT: fleet_up 1 and {want} holds after {took:?}");
    // And it stays right: a late script or a queued release seen after the
    // first good reading would show within one more renewal interval.
    tokio::time::sleep(fleet.renewal()).await;
    fleet
        .all_is(&redis, want)
        .expect("the count one renewal later");
    if mode == "closed" {
        assert_eq!(gate.rejected("fleet_unavailable").await, times.len() as f64);
    }
    for ws in &mut live {
        echo_text(ws, "after the pause").await;
    }
    close_all(live).await;
    settle(&[&gate], &fleet, &redis).await;
    eventually!("wsgate's descriptors back to the baseline", DEADLINE, {
        match gate.fds() {
            n if n <= baseline => Ok(()),
            n => Err(format!("{n} descriptors, baseline {baseline}")),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_never_holds_an_admission_longer_than_fleet_timeout() {
    redis_paused("open", Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_with_fail_closed_refuses_in_time_and_leaves_no_hold() {
    redis_paused("closed", Duration::from_secs(9)).await;
}

// ---------------------------------------------------------------- transports

/// One admission and its release through `url`: the hold appears in
/// `{NS}:all` and goes again; `wsgate_fleet_up` 1; one admit and one
/// release counted as ok.
async fn round_trip(redis: &RedisServer, url: &str, env: &[(&str, String)]) {
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(url, "transport")
        .max(10)
        .timeout(Duration::from_secs(2))
        .mode("closed");
    let gate = Gate::start_with_env(up.addr, &fleet, Some("t"), env);
    warm_up(&gate, &fleet, redis).await;
    eventually!("the warm-up's release counted", DEADLINE, {
        match gate.fleet_requests("release", "ok").await {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("release ok {n}")),
        }
    });
    let (admits, releases) = (
        gate.fleet_requests("admit", "ok").await,
        gate.fleet_requests("release", "ok").await,
    );
    assert!(admits >= 1.0, "the warm-up's admission: {admits}");
    let ws = gate.admit(&[]).await;
    fleet.all_is(redis, 1).expect("the hold is in Redis");
    assert_eq!(gate.metric("wsgate_fleet_up").await, 1.0);
    assert_eq!(gate.fleet_requests("admit", "ok").await, admits + 1.0);
    close_cleanly(ws).await;
    settle(&[&gate], &fleet, redis).await;
    eventually!("the release counted", DEADLINE, {
        match gate.fleet_requests("release", "ok").await {
            n if n == releases + 1.0 => Ok(()),
            n => Err(format!("release ok {n}, before {releases}")),
        }
    });
    assert_eq!(gate.rejected("fleet_unavailable").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_over_tcp() {
    let redis = RedisServer::start();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    round_trip(&redis, &redis.url(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_over_a_unix_socket() {
    let redis = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Unix,
        password: None,
    });
    assert!(redis.url().starts_with("unix:///"));
    round_trip(&redis, &redis.url(), &[]).await;
}

/// `redis://:secret@host:port/0` and `unix:///path?pass=secret`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_with_a_password_over_tcp_and_a_unix_socket() {
    for transport in [RedisTransport::Tcp, RedisTransport::Unix] {
        let redis = RedisServer::start_with(RedisOptions {
            transport,
            password: Some("secret".into()),
        });
        let url = redis.url();
        assert!(
            url.contains(":secret@") || url.ends_with("?pass=secret"),
            "{url}"
        );
        round_trip(&redis, &url, &[]).await;
    }
}

/// A wrong password: `wsgate_fleet_up` stays 0, and with `closed` every
/// upgrade gets 503 `fleet_unavailable`; nothing reaches Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_with_a_wrong_password_is_down_and_closed_refuses() {
    let redis = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tcp,
        password: Some("secret".into()),
    });
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url_with_password(Some("wrong")), "wrongpass")
        .max(10)
        .mode("closed");
    let gate = Gate::start(up.addr, &fleet, Some("t"));
    for i in 0..3 {
        let start = Instant::now();
        let refused = gate.upgrade(&[]).await.err();
        let took = start.elapsed();
        assert_eq!(refused.as_ref().map(|e| e.0), Some(503), "upgrade {i}");
        assert!(refused.and_then(|e| e.1).is_some(), "Retry-After");
        assert!(
            took <= fleet.timeout + ADMISSION_MARGIN,
            "upgrade {i} took {took:?}"
        );
    }
    assert_eq!(gate.rejected("fleet_unavailable").await, 3.0);
    assert_eq!(gate.metric("wsgate_fleet_up").await, 0.0);
    assert_eq!(gate.metric(ACTIVE).await, 0.0);
    assert_eq!(redis.dbsize(), 0, "nothing written with a wrong password");
}

/// `rediss://127.0.0.1:PORT` to a TLS-only Redis, the test CA as wsgate's
/// only root (`SSL_CERT_FILE`, read by rustls-native-certs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_over_tls() {
    let redis = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tls,
        password: None,
    });
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    round_trip(&redis, &redis.url(), &[("SSL_CERT_FILE", redis_tls_ca())]).await;
}

// ---------------------------------------------------------------- churn

/// One churn connection: upgrade, one echo, a clean close. `Ok(true)`
/// admitted, `Ok(false)` a clean 503 with `Retry-After`, `Err` anything else.
async fn churn_one(url: &str, n: usize) -> Result<bool, String> {
    match upgrade_outcome(url, &[]).await {
        Upgrade::Admitted(ws) => {
            let mut ws = *ws;
            let text = format!("churn {n}");
            ws.send(Message::text(text.clone()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            match ws.next().await {
                Some(Ok(m)) if m == Message::text(text) => {}
                other => return Err(format!("echo: {other:?}")),
            }
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            while ws.next().await.is_some() {}
            Ok(true)
        }
        Upgrade::Refused(503, Some(_)) => Ok(false),
        other => Err(format!("{other:?}")),
    }
}

/// 20,000 connections (upgrade, one echo, close; 64 at a time) through two
/// instances sharing `fleet_max_clients = 200`: every one is admitted or
/// cleanly refused with 503 `fleet`, each costs exactly one admit round
/// trip; afterwards both are idle, Redis is empty for the namespace and
/// both processes are back to their descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_20000_connections_through_two_instances_leaves_nothing_behind() {
    const TOTAL: usize = 20_000;
    const WORKERS: usize = 64;
    raise_nofile(4096);
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "churn")
        .max(200)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates = [
        Gate::start(up.addr, &fleet, Some("one")),
        Gate::start(up.addr, &fleet, Some("two")),
    ];
    let mut baseline = Vec::new();
    let mut admits_before = 0.0;
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
        baseline.push(g.fds());
        for result in ["ok", "error", "timeout"] {
            admits_before += g.fleet_requests("admit", result).await;
        }
    }
    let urls = std::sync::Arc::new([gates[0].url(), gates[1].url()]);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (urls, next) = (std::sync::Arc::clone(&urls), std::sync::Arc::clone(&next));
            tokio::spawn(async move {
                let (mut admitted, mut refused, mut errors) = (0usize, 0usize, Vec::new());
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= TOTAL {
                        return (admitted, refused, errors);
                    }
                    match tokio::time::timeout(DEADLINE, churn_one(&urls[n % 2], n)).await {
                        Ok(Ok(true)) => admitted += 1,
                        Ok(Ok(false)) => refused += 1,
                        Ok(Err(e)) => errors.push(format!("#{n}: {e}")),
                        Err(_) => errors.push(format!("#{n}: no end within {DEADLINE:?}")),
                    }
                }
            })
        })
        .collect();
    let (mut admitted, mut refused, mut errors) = (0, 0, Vec::new());
    for w in workers {
        let (a, r, e) = w.await.expect("worker");
        admitted += a;
        refused += r;
        errors.extend(e);
    }
    let took = start.elapsed();
    println!(
        "churn: {TOTAL} connections ({WORKERS} at a time) through 2 instances in {took:?} \
         ({:.0}/s): {admitted} admitted, {refused} refused",
        TOTAL as f64 / took.as_secs_f64()
    );
    assert!(
        errors.is_empty(),
        "{} errors, the first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(admitted + refused, TOTAL);
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet\"}"
        )
        .await,
        refused as f64
    );
    assert_eq!(
        sum(
            &gates,
            "wsgate_connections_rejected_total{reason=\"fleet_unavailable\"}"
        )
        .await,
        0.0
    );
    let mut admits_after = 0.0;
    for g in &gates {
        for result in ["ok", "error", "timeout"] {
            admits_after += g.fleet_requests("admit", result).await;
        }
    }
    assert_eq!(
        admits_after - admits_before,
        TOTAL as f64,
        "one admit round trip per upgrade"
    );
    settle(&[&gates[0], &gates[1]], &fleet, &redis).await;
    for (g, base) in gates.iter().zip(baseline) {
        eventually!("wsgate's descriptors back to the baseline", DEADLINE, {
            match g.fds() {
                n if n <= base => Ok(()),
                n => Err(format!("{}: {n} descriptors, baseline {base}", g.proxy)),
            }
        });
    }
}

// ---------------------------------------------------------------- configuration, metrics, check order

/// The §10 keys through `WSGATE_*`: a lease under 3 s, a timeout not under
/// a third of the lease, an unknown fail mode and a URL that is not Redis
/// exit 2 naming the key; a valid set exits 0, and `check-config` shows the
/// URL without its password.
#[test]
fn fleet_configuration_is_validated_and_hides_the_password() {
    let base = |extra: &[(&'static str, &'static str)]| {
        let mut env = vec![
            ("WSGATE_UPSTREAM", "127.0.0.1:3000".to_owned()),
            (
                "WSGATE_FLEET_REDIS_URL",
                "redis://:hunter2@127.0.0.1:6379/0".to_owned(),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    };
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("WSGATE_FLEET_LEASE_TTL", "2s")], "fleet_lease_ttl"),
        (
            &[
                ("WSGATE_FLEET_LEASE_TTL", "3s"),
                ("WSGATE_FLEET_TIMEOUT", "1s"),
            ],
            "fleet_timeout",
        ),
        (&[("WSGATE_FLEET_FAIL_MODE", "maybe")], "fleet_fail_mode"),
        (
            &[("WSGATE_FLEET_REDIS_URL", "http://127.0.0.1:6379")],
            "fleet_redis_url",
        ),
        (&[("WSGATE_FLEET_MAX_CLIENTS", "many")], "fleet_max_clients"),
    ];
    for (extra, key) in cases {
        let (code, stderr) = run_to_exit(&["check-config"], &base(extra));
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{extra:?}: the message names {key}: {stderr}"
        );
    }
    let mut ok = GateProcess::start(
        &["check-config"],
        &base(&[
            ("WSGATE_FLEET_LEASE_TTL", "3s"),
            ("WSGATE_FLEET_TIMEOUT", "999ms"),
            ("WSGATE_FLEET_FAIL_MODE", "closed"),
            ("WSGATE_FLEET_MAX_CLIENTS", "500"),
            ("WSGATE_FLEET_NAMESPACE", "prod-eu"),
        ]),
        None,
    );
    let status = ok.wait_exit();
    let out = ok.wait_for(&ok.stdout, "fleet_namespace");
    assert_eq!(status.code(), Some(0), "{}", ok.stderr_text());
    assert!(out.contains("prod-eu") && out.contains("500"), "{out}");
    assert!(
        !out.contains("hunter2") && !ok.stderr_text().contains("hunter2"),
        "check-config printed the Redis password:\n{out}"
    );
}

/// The `wsgate_fleet_*` series exist only with `fleet_redis_url` set, and
/// then every labelled one from start-up (docs/metrics.md: no "no data").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_metrics_exist_from_start_up_and_only_with_a_redis_url() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let (_plain, _, plain_admin) = GateProcess::proxy(up.addr, &[], None);
    let text = scrape(plain_admin).await;
    assert!(
        !text.contains("wsgate_fleet_"),
        "fleet series without fleet_redis_url:\n{text}"
    );
    let fleet = Fleet::new(&redis.url(), "metrics").max(7);
    let gate = Gate::start(up.addr, &fleet, Some("m"));
    let text = scrape(gate.admin).await;
    for op in ["admit", "release", "renew"] {
        for result in ["ok", "error", "timeout"] {
            assert!(
                labelled_value(
                    &text,
                    "wsgate_fleet_requests_total",
                    &[("op", op), ("result", result)]
                )
                .is_some(),
                "wsgate_fleet_requests_total{{op={op},result={result}}} missing:\n{text}"
            );
        }
        assert!(
            text.contains(&format!(
                "wsgate_fleet_request_duration_seconds_count{{op=\"{op}\"}}"
            )),
            "duration histogram for {op} missing:\n{text}"
        );
    }
    for series in ["wsgate_fleet_up", "wsgate_fleet_active"] {
        assert!(
            metric_value(&text, series).is_some(),
            "{series} missing:\n{text}"
        );
    }
    assert_eq!(metric_value(&text, "wsgate_fleet_max"), Some(7.0));
    for reason in ["fleet", "fleet_unavailable"] {
        assert_eq!(
            metric_value(
                &text,
                &format!("wsgate_connections_rejected_total{{reason=\"{reason}\"}}")
            ),
            Some(0.0),
            "{reason}"
        );
    }
}

/// Fleets with different namespaces on one Redis do not share: each has
/// its own cap of 1 and its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_with_different_namespaces_do_not_share() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let blue = Fleet::new(&redis.url(), "blue")
        .max(1)
        .timeout(Duration::from_secs(2))
        .mode("closed");
    let green = Fleet::new(&redis.url(), "green")
        .max(1)
        .timeout(Duration::from_secs(2))
        .mode("closed");
    let b = Gate::start(up.addr, &blue, Some("b"));
    let g = Gate::start(up.addr, &green, Some("g"));
    warm_up(&b, &blue, &redis).await;
    warm_up(&g, &green, &redis).await;
    let wb = b.admit(&[]).await;
    let wg = g.admit(&[]).await;
    assert_eq!(b.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    assert_eq!(g.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    blue.all_is(&redis, 1).expect("blue");
    green.all_is(&redis, 1).expect("green");
    close_cleanly(wb).await;
    settle(&[&b], &blue, &redis).await;
    green
        .all_is(&redis, 1)
        .expect("green untouched by blue's release");
    close_cleanly(wg).await;
    settle(&[&g], &green, &redis).await;
}

/// Check order (docs/operations.md#limits-per-key): capacity before fleet, rate after it. A capacity
/// refusal takes no fleet hold; a rate refusal gives the hold it took back;
/// a fleet refusal holds no local slot. Dry run (`enforce = false`) admits
/// over the fleet cap and counts it as `would_reject{reason="fleet"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_around_the_fleet_check_give_back_what_they_took() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    // Capacity: local cap 1, fleet cap 5.
    let fleet = Fleet::new(&redis.url(), "order")
        .max(5)
        .timeout(Duration::from_secs(2))
        .mode("closed")
        .set("max_clients", 1);
    let capped = Gate::start(up.addr, &fleet, Some("capped"));
    warm_up(&capped, &fleet, &redis).await;
    let one = capped.admit(&[]).await;
    assert_eq!(capped.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    assert_eq!(capped.rejected("capacity").await, 1.0);
    fleet
        .all_is(&redis, 1)
        .expect("the capacity refusal took no hold");
    close_cleanly(one).await;
    settle(&[&capped], &fleet, &redis).await;
    drop(capped);

    // Rate after fleet: a burst of 2 (the warm-up takes one), then refusals.
    let fleet = fleet
        .set("max_clients", 0)
        .set("admission_rate", 0.001)
        .set("admission_burst", 2);
    let rated = Gate::start(up.addr, &fleet, Some("rated"));
    warm_up(&rated, &fleet, &redis).await;
    let one = rated.admit(&[]).await;
    for _ in 0..3 {
        assert_eq!(rated.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    }
    assert_eq!(rated.rejected("rate").await, 3.0);
    eventually!("the rate refusals' holds given back", RELEASE_BOUND, {
        fleet.all_is(&redis, 1)
    });
    close_cleanly(one).await;
    settle(&[&rated], &fleet, &redis).await;
    drop(rated);

    // Fleet refusals hold no local slot; dry run admits and counts.
    let fleet = Fleet::new(&redis.url(), "order")
        .max(1)
        .timeout(Duration::from_secs(2))
        .mode("closed");
    let full = Gate::start(up.addr, &fleet, Some("full"));
    warm_up(&full, &fleet, &redis).await;
    let one = full.admit(&[]).await;
    assert_eq!(full.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    assert_eq!(
        full.metric(ACTIVE).await,
        1.0,
        "a fleet refusal holds no slot"
    );
    let dry = Gate::start(up.addr, &fleet.clone().set("enforce", false), Some("dry"));
    let mut over = dry.admit(&[]).await;
    echo_text(&mut over, "over the fleet cap, dry run").await;
    assert_eq!(
        dry.metric("wsgate_connections_would_reject_total{reason=\"fleet\"}")
            .await,
        1.0
    );
    assert_eq!(dry.rejected("fleet").await, 0.0);
    close_cleanly(over).await;
    close_cleanly(one).await;
    settle(&[&full, &dry], &fleet, &redis).await;
}

/// 300 upgrades of one tenant at once over three instances, with a
/// `fleet = true` rule of 10 per tenant: exactly 10 are admitted, the
/// other 290 get 429 (reason `key`), and Redis holds 10 for the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_key_rule_holds_under_concurrent_upgrades() {
    raise_nofile(4096);
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "hot")
        .rule("tenant", "header:X-Tenant", 10)
        .timeout(Duration::from_secs(5))
        .mode("closed");
    let gates: Vec<Gate> = ["x", "y", "z"]
        .iter()
        .map(|id| Gate::start(up.addr, &fleet, Some(id)))
        .collect();
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
    }
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let url = gates[i % 3].url();
            tokio::spawn(async move { upgrade_outcome(&url, &[("x-tenant", "hot")]).await })
        })
        .collect();
    let (mut admitted, mut refused, mut odd) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        match within("one of the 300 upgrades", t).await.expect("join") {
            Upgrade::Admitted(ws) => admitted.push(*ws),
            Upgrade::Refused(429, Some(_)) => refused += 1,
            other => odd.push(format!("{other:?}")),
        }
    }
    assert!(odd.is_empty(), "neither 101 nor 429 + Retry-After: {odd:?}");
    assert_eq!(
        admitted.len(),
        10,
        "the tenant got more or less than its share"
    );
    assert_eq!(refused, 290);
    assert_eq!(
        sum(&gates, "wsgate_connections_rejected_total{reason=\"key\"}").await,
        290.0
    );
    holds_are(&redis, &fleet.key_key("tenant", "hot"), 10).expect("ten holds");
    close_all(admitted).await;
    let refs: Vec<&Gate> = gates.iter().collect();
    settle(&refs, &fleet, &redis).await;
}

/// Every way a connection ends gives its hold back at once (the lease is
/// the default 30 s, so an expiry cannot stand in for a release): client
/// FIN, client RST, the upstream closing, the upstream refusing the
/// upgrade (403), the upstream unreachable (502), and shutdown (SIGTERM,
/// the connection closed at the end of `shutdown_grace`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_path_gives_the_hold_back() {
    let redis = RedisServer::start();
    let echo = spawn_echo_upstream().await;
    let closing = spawn_upstream(Behaviour::CloseAfterUpgrade).await;
    let refusing = spawn_upstream(Behaviour::Refuse).await;
    let down = closed_port();
    let fleet = Fleet::new(&redis.url(), "paths")
        .max(10)
        .timeout(Duration::from_secs(2))
        .mode("closed")
        .set("shutdown_grace", "1s");
    let gate = Gate::start(echo.addr, &fleet, Some("echo"));
    warm_up(&gate, &fleet, &redis).await;
    // The hold is back in Redis within the release bound; the error names
    // the instance's own count too (a slot still held vs a lost release).
    let released = |what: &'static str, gate: &'static str, admin: SocketAddr| {
        let (fleet, redis) = (&fleet, &redis);
        async move {
            let took = eventually!(what, RELEASE_BOUND, {
                match fleet.redis_empty(redis) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!(
                        "{e}; {gate}'s {ACTIVE} = {:?}",
                        try_metric(admin, ACTIVE).await
                    )),
                }
            });
            println!("{what}: hold released after {took:?}");
        }
    };

    let mut fin = raw_tunnel(gate.proxy).await;
    fleet.all_is(&redis, 1).expect("the FIN connection's hold");
    tokio::io::AsyncWriteExt::shutdown(&mut fin)
        .await
        .expect("FIN");
    read_to_eof(&mut fin).await;
    released("client FIN", "echo", gate.admin).await;

    let rst = raw_tunnel(gate.proxy).await;
    fleet.all_is(&redis, 1).expect("the RST connection's hold");
    set_reset_on_close(&rst);
    drop(rst);
    released("client RST", "echo", gate.admin).await;

    let gate_closing = Gate::start(closing.addr, &fleet, Some("closing"));
    let mut ws = gate_closing.admit_without_echo().await;
    within("upstream close", async {
        while ws.next().await.is_some() {}
    })
    .await;
    // The closing handshake is complete; the client's FIN ends the
    // connection (until then wsgate waits up to `half_close_timeout`).
    drop(ws);
    released("upstream close", "closing", gate_closing.admin).await;

    let gate_refusing = Gate::start(refusing.addr, &fleet, Some("refusing"));
    assert_eq!(
        gate_refusing.upgrade(&[]).await.err().map(|e| e.0),
        Some(403)
    );
    released(
        "upstream refused the upgrade",
        "refusing",
        gate_refusing.admin,
    )
    .await;

    let gate_down = Gate::start(down.addr, &fleet, Some("down"));
    assert_eq!(gate_down.upgrade(&[]).await.err().map(|e| e.0), Some(502));
    released("upstream unreachable", "down", gate_down.admin).await;
    for g in [&gate_closing, &gate_refusing, &gate_down] {
        assert!(
            g.fleet_requests("admit", "ok").await >= 1.0,
            "{}: the hold was taken before the upstream was tried",
            g.proxy
        );
    }

    let mut shut = Gate::start(echo.addr, &fleet, Some("shut"));
    let mut ws = shut.admit(&[]).await;
    fleet
        .all_is(&redis, 1)
        .expect("the shutdown connection's hold");
    shut.process.signal("TERM");
    within("closed by the shutdown", async {
        while ws.next().await.is_some() {}
    })
    .await;
    let status = shut.process.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", shut.log());
    released("shutdown (SIGTERM)", "shut", shut.admin).await;
    settle(&[&gate], &fleet, &redis).await;
}

/// A `fleet = true` rule's `overrides` and `status` apply fleet-wide:
/// limit 1 per tenant, `big` 3, `vip` unlimited (0, never counted in
/// Redis), `status = 503`; across two instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rule_keeps_its_overrides_and_status() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let mut fleet = Fleet::new(&redis.url(), "over")
        .rule("tenant", "header:X-Tenant", 1)
        .timeout(Duration::from_secs(2))
        .mode("closed");
    let mut overrides = toml::Table::new();
    overrides.insert("big".into(), 3.into());
    overrides.insert("vip".into(), 0.into());
    fleet.rules[0].insert("overrides".into(), overrides.into());
    fleet.rules[0].insert("status".into(), 503.into());
    let gates = [
        Gate::start(up.addr, &fleet, Some("p")),
        Gate::start(up.addr, &fleet, Some("q")),
    ];
    for g in &gates {
        warm_up(g, &fleet, &redis).await;
    }
    let tenant = |t: &'static str| [("x-tenant", t)];
    let mut held = vec![gates[0].admit(&tenant("small")).await];
    assert_eq!(
        gates[1].upgrade(&tenant("small")).await.err(),
        Some((503, Some("1".into()))),
        "small's one slot is taken on the other instance"
    );
    for i in 0..3 {
        held.push(gates[i % 2].admit(&tenant("big")).await);
    }
    assert_eq!(
        gates[0].upgrade(&tenant("big")).await.err().map(|e| e.0),
        Some(503)
    );
    for i in 0..6 {
        held.push(gates[i % 2].admit(&tenant("vip")).await);
    }
    assert_eq!(
        sum(&gates, "wsgate_connections_rejected_total{reason=\"key\"}").await,
        2.0
    );
    holds_are(&redis, &fleet.key_key("tenant", "big"), 3).expect("big");
    assert!(
        !fleet.keys(&redis).iter().any(|k| k.ends_with(":vip")),
        "an unlimited value is not counted in Redis: {:?}",
        fleet.keys(&redis)
    );
    close_all(held).await;
    settle(&[&gates[0], &gates[1]], &fleet, &redis).await;
}

/// An instance started while Redis is down starts anyway (within the 2 s it
/// may wait for Redis), is ready, and follows its fail mode (`closed`: 503
/// `fleet_unavailable`, at once); once Redis is up it connects within the
/// reconnect bound (2 s) and then judges by Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_while_redis_is_down_connects_when_it_comes_up() {
    let mut redis = RedisServer::start();
    redis.kill9();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "late")
        .max(1)
        .lease(Duration::from_secs(3))
        .timeout(Duration::from_millis(100))
        .mode("closed");
    let started = Instant::now();
    let gate = Gate::start(up.addr, &fleet, Some("early"));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "start-up waited {took:?} for a Redis that is down"
    );
    assert_eq!(
        http_get(gate.admin, "/readyz").await.0,
        200,
        "ready without Redis"
    );
    let start = Instant::now();
    assert_eq!(gate.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    assert!(start.elapsed() <= fleet.timeout + ADMISSION_MARGIN);
    assert_eq!(gate.rejected("fleet_unavailable").await, 1.0);
    assert_eq!(gate.metric("wsgate_fleet_up").await, 0.0);

    redis.start_again();
    let took = eventually!(
        "connected once Redis is up",
        RECONNECT + PROBE_SLACK,
        match gate.metric("wsgate_fleet_up").await {
            1.0 => Ok(()),
            v => Err(format!("wsgate_fleet_up {v}")),
        }
    );
    println!("connected {took:?} after Redis came up");
    let ws = gate.admit(&[]).await;
    fleet.all_is(&redis, 1).expect("judged by Redis now");
    assert_eq!(gate.upgrade(&[]).await.err().map(|e| e.0), Some(503));
    assert_eq!(gate.rejected("fleet").await, 1.0);
    close_cleanly(ws).await;
    settle(&[&gate], &fleet, &redis).await;
}

/// `wsgate_fleet_up` is "1 while the last Redis round trip succeeded"
/// (docs/operations.md#fleet-wide-limits): after one admission that timed out (Redis paused for a
/// moment, `open`), it reads 0 until a round trip succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_up_reads_0_after_a_round_trip_timed_out() {
    let redis = RedisServer::start();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&redis.url(), "blip")
        .max(10)
        .lease(Duration::from_secs(30))
        .timeout(Duration::from_millis(100))
        .mode("open");
    let gate = Gate::start(up.addr, &fleet, Some("b"));
    warm_up(&gate, &fleet, &redis).await;
    redis.pause();
    let outcome = gate.upgrade(&[]).await;
    let up_after = gate.metric("wsgate_fleet_up").await;
    let timeouts = gate.fleet_requests("admit", "timeout").await;
    redis.resume();
    let ws = outcome.expect("open: admitted on local limits");
    assert_eq!(timeouts, 1.0, "the admission's round trip timed out");
    assert_eq!(
        up_after, 0.0,
        "wsgate_fleet_up after a round trip that timed out"
    );
    drop(ws);
}

// ---------------------------------------------------------------- an unreachable Redis in the log

/// The lines of `log` that contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// docs/operations.md#fleet-wide-limits: a Redis that is not there when
/// wsgate starts is a WARN naming the cause and the URL at once (the worker
/// starts "down", so no "lost Redis" would ever say it), not repeated on
/// every retry (the repeat is once a minute: `fleet::outage`'s unit test),
/// and its return is one INFO line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_unreachable_at_start_up_is_warned_with_its_cause_and_its_return_said_once() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill9();
    let up = spawn_echo_upstream().await;
    let fleet = Fleet::new(&url, "unreachable").max(10);
    let gate = Gate::start_with_env(
        up.addr,
        &fleet,
        Some("t"),
        &[("RUST_LOG", "info,wsgate::fleet=debug".into())],
    );
    let warning = format!("cannot reach Redis at {url}: connection refused");
    // Three retries seen at DEBUG, and still the one warning.
    eventually!("three failed attempts", DEADLINE, {
        match lines_with(&gate.log(), "fleet: Redis unreachable") {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} attempts\n{}", gate.log())),
        }
    });
    let log = gate.log();
    assert_eq!(lines_with(&log, &warning), 1, "{log}");
    let fleet_warnings = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("fleet"))
        .count();
    assert_eq!(fleet_warnings, 1, "{log}");
    assert!(log.contains("cause=\"connection refused\""), "{log}");
    assert!(!log.contains("lost Redis"), "{log}");
    // Redis comes: one INFO line, and admissions use it.
    redis.start_again();
    eventually!("the return logged", DEADLINE, {
        match lines_with(&gate.log(), "fleet: Redis is reachable again after") {
            1 => Ok(()),
            n => Err(format!("{n} lines\n{}", gate.log())),
        }
    });
    let ws = gate.admit(&[]).await;
    fleet.all_is(&redis, 1).expect("the hold is in Redis");
    close_cleanly(ws).await;
    let log = gate.log();
    assert_eq!(lines_with(&log, "reachable again"), 1, "{log}");
    assert_eq!(lines_with(&log, &warning), 1, "{log}");
    assert!(
        !log.contains("fleet: connected to Redis"),
        "a return, not a first connection: {log}"
    );
}

/// Each class of cause is named: DNS, a port that never answers, TLS
/// (a certificate wsgate does not trust), a wrong password (hidden in the
/// URL as `***`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cause_of_an_unreachable_redis_is_named() {
    let up = spawn_echo_upstream().await;
    // Accepts and never answers: the attempt times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let tls = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tls,
        password: None,
    });
    let locked = RedisServer::start_with(RedisOptions {
        transport: RedisTransport::Tcp,
        password: Some("right".into()),
    });
    let password = "n0t-the-Pa55word";
    let cases = [
        (
            "redis://no-such-host.invalid:6379/0".to_owned(),
            "DNS resolution failed",
            "redis://no-such-host.invalid:6379/0".to_owned(),
        ),
        (
            format!("redis://{silent_addr}/0"),
            "timed out",
            format!("redis://{silent_addr}/0"),
        ),
        (tls.url(), "TLS handshake failed", tls.url()),
        (
            locked.url_with_password(Some(password)),
            "authentication failed",
            locked.url_with_password(Some("***")),
        ),
    ];
    let gates: Vec<Gate> = cases
        .iter()
        .enumerate()
        .map(|(i, (url, _, _))| {
            // No SSL_CERT_FILE: the test CA is not among the roots.
            Gate::start(
                up.addr,
                &Fleet::new(url, &format!("cause{i}")).max(10),
                Some("t"),
            )
        })
        .collect();
    for (gate, (url, cause, shown)) in gates.iter().zip(&cases) {
        let text = format!("cannot reach Redis at {shown}: {cause}");
        eventually!(format!("{url}: {cause}"), DEADLINE, {
            match gate.log() {
                log if log.contains(&text) => Ok(()),
                log => Err(log),
            }
        });
        assert!(!gate.log().contains(password), "{}", gate.log());
        assert_eq!(gate.metric("wsgate_fleet_up").await, 0.0);
    }
    held.abort();
}
