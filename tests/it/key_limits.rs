//! Limits per key (docs/operations.md#limits-per-key), black-box: wsgate through its real entry point
//! on port 0, a real echo upstream, real clients (tokio-tungstenite and raw
//! sockets). Every test would fail without the feature it names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsgate::config::{Config, RawConfig, RawKeyRule};
use wsgate::Control;

fn rule(name: &str, key: &str, max: i64) -> RawKeyRule {
    RawKeyRule {
        name: Some(name.into()),
        key: Some(key.into()),
        max_per_key: Some(max),
        ..RawKeyRule::default()
    }
}

fn with_rules(raw: RawConfig, rules: Vec<RawKeyRule>) -> RawConfig {
    RawConfig {
        key_limits: rules,
        ..raw
    }
}

/// Connects to `path` with `headers`; the client, or the refusal's status
/// and `Retry-After`.
async fn try_connect(
    gate: &Sidecar,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, Option<String>)> {
    let mut req = format!("ws://{}{path}", gate.addr)
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    match within("upgrade", tokio_tungstenite::connect_async(req)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        )),
        Err(e) => panic!("expected an upgrade or an HTTP refusal, got {e}"),
    }
}

async fn tenant(gate: &Sidecar, t: &str) -> Result<Ws, (u16, Option<String>)> {
    try_connect(gate, "/", &[("x-tenant", t)]).await
}

fn rejected(reason: &str) -> String {
    format!("wsgate_connections_rejected_total{{reason=\"{reason}\"}}")
}

fn by_rule(metric: &str, rule: &str) -> String {
    format!("{metric}{{rule=\"{rule}\"}}")
}

/// A raw upgrade carrying `x-tenant: t`; the stream after its 101.
async fn raw_tenant(addr: SocketAddr, t: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = upgrade_request(addr).replace("\r\n\r\n", &format!("\r\nx-tenant: {t}\r\n\r\n"));
    s.write_all(req.as_bytes()).await.expect("write");
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "{head}");
    s
}

/// The header rule of the issue: limit 2 per tenant. The third of tenant A
/// is refused with 429 and `Retry-After` without reaching the upstream;
/// tenant B still connects; A's share comes back however one of its
/// connections ends (Close frame, FIN, RST), within the release bound.
#[tokio::test]
async fn header_rule_refuses_the_third_of_a_tenant_and_frees_on_every_close() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:X-Tenant", 2)],
    ))
    .await;
    let tracked = by_rule("wsgate_keys_tracked", "tenant");
    assert_eq!(metric(gate.admin, &tracked).await, 0.0, "series exist at 0");
    assert_eq!(metric(gate.admin, &rejected("key")).await, 0.0);

    let mut a1 = tenant(&gate, "a").await.expect("a1");
    let _a2 = tenant(&gate, "a").await.expect("a2");
    let accepts = up.accepts.load(Ordering::SeqCst);
    assert_eq!(
        tenant(&gate, "a").await.err(),
        Some((429, Some("1".into())))
    );
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        accepts,
        "upstream untouched"
    );
    let mut b = tenant(&gate, "b")
        .await
        .expect("another tenant is not affected");
    echo_text(&mut b, "b").await;
    echo_text(&mut a1, "a").await;
    assert_eq!(metric(gate.admin, &rejected("key")).await, 1.0);
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_rejected_total", "tenant")).await,
        1.0
    );
    assert_eq!(metric(gate.admin, &tracked).await, 2.0);
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_busiest_ratio", "tenant")).await,
        1.0
    );

    // Close frame.
    close_cleanly(a1).await;
    let mut a3 = within("a3", async {
        loop {
            match tenant(&gate, "a").await {
                Ok(ws) => break ws,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    echo_text(&mut a3, "a3").await;
    drop(a3);
    wait_metric(gate.admin, ACTIVE, 2.0).await;

    // FIN, then RST, on raw tunnels holding A's shares.
    let fin = raw_tenant(gate.addr, "a").await;
    assert_eq!(tenant(&gate, "a").await.err().map(|e| e.0), Some(429));
    drop(fin);
    let took = time_until_metric(gate.admin, ACTIVE, 2.0).await;
    assert!(took <= RELEASE_BOUND, "FIN: share back after {took:?}");
    let rst = raw_tenant(gate.addr, "a").await;
    assert_eq!(tenant(&gate, "a").await.err().map(|e| e.0), Some(429));
    set_reset_on_close(&rst);
    drop(rst);
    let took = time_until_metric(gate.admin, ACTIVE, 2.0).await;
    assert!(took <= RELEASE_BOUND, "RST: share back after {took:?}");
    let _a4 = tenant(&gate, "a").await.expect("a's share is back");

    drop((b, _a2, _a4));
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    wait_metric(gate.admin, &tracked, 0.0).await;
}

/// Query, cookie and path-segment keys, each limited to 1 per value.
#[tokio::test]
async fn every_key_source_limits_its_own_values() {
    let up = spawn_echo_upstream().await;
    let mut room = rule("room", "path_segment:2", 1);
    room.path_prefix = Some("/rooms/".into());
    let gate = spawn_sidecar(with_rules(
        test_config(up.addr),
        vec![
            rule("by_query", "query:tenant", 1),
            rule("by_cookie", "cookie:team", 1),
            room,
        ],
    ))
    .await;
    // Each source on its own path prefix would need more rules; instead each
    // request carries a distinct value for the sources it does not test.
    let q1 = try_connect(&gate, "/?tenant=t%41", &[("cookie", "team=c1")])
        .await
        .expect("q1");
    assert_eq!(
        try_connect(&gate, "/?tenant=tA", &[("cookie", "team=c2")])
            .await
            .err()
            .map(|e| e.0),
        Some(429),
        "percent-decoded: t%41 and tA are one key"
    );
    let c1 = try_connect(&gate, "/?tenant=q2", &[("cookie", "a=1; team=blue")])
        .await
        .expect("c1");
    assert_eq!(
        try_connect(&gate, "/?tenant=q3", &[("cookie", "team=blue")])
            .await
            .err()
            .map(|e| e.0),
        Some(429)
    );
    let r1 = try_connect(&gate, "/rooms/lobby/ws?tenant=q4", &[("cookie", "team=c4")])
        .await
        .expect("r1");
    assert_eq!(
        try_connect(
            &gate,
            "/rooms/lobby/other?tenant=q5",
            &[("cookie", "team=c5")]
        )
        .await
        .err()
        .map(|e| e.0),
        Some(429)
    );
    let _r2 = try_connect(&gate, "/rooms/kitchen?tenant=q6", &[("cookie", "team=c6")])
        .await
        .expect("another room");
    assert_eq!(
        metric(
            gate.admin,
            &by_rule("wsgate_key_rejected_total", "by_query")
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            gate.admin,
            &by_rule("wsgate_key_rejected_total", "by_cookie")
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_rejected_total", "room")).await,
        1.0
    );
    drop((q1, c1, r1));
}

/// Overrides: a larger tenant, an unlimited one; `path_prefix` leaves other
/// paths alone; `status = 503` answers 503 with `Retry-After`.
#[tokio::test]
async fn overrides_path_prefix_and_status() {
    let up = spawn_echo_upstream().await;
    let mut r = rule("tenant", "header:x-tenant", 1);
    r.overrides = BTreeMap::from([("big".into(), 3), ("vip".into(), 0)]);
    r.path_prefix = Some("/chat".into());
    r.status = Some(503);
    let gate = spawn_sidecar(with_rules(test_config(up.addr), vec![r])).await;
    let chat = |t: &'static str| {
        let gate = &gate;
        async move { try_connect(gate, "/chat", &[("x-tenant", t)]).await }
    };
    let mut held = vec![chat("small").await.expect("small")];
    assert_eq!(chat("small").await.err(), Some((503, Some("1".into()))));
    for _ in 0..3 {
        held.push(chat("big").await.expect("big has 3"));
    }
    assert_eq!(chat("big").await.err().map(|e| e.0), Some(503));
    for _ in 0..10 {
        held.push(chat("vip").await.expect("vip is unlimited"));
    }
    for _ in 0..3 {
        held.push(
            try_connect(&gate, "/other", &[("x-tenant", "small")])
                .await
                .expect("outside the prefix the rule does not apply"),
        );
    }
    // The busiest ratio leaves the unlimited tenant out: small and big are full.
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_busiest_ratio", "tenant")).await,
        1.0
    );
    drop(held);
    wait_metric(gate.admin, ACTIVE, 0.0).await;
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_busiest_ratio", "tenant")).await,
        0.0
    );
}

/// `missing`: shared (one bucket for all without the key), allow (the rule
/// does not apply), reject (400 `key_missing`); an unusable value is 400 in
/// every mode.
#[tokio::test]
async fn each_missing_mode() {
    let up = spawn_echo_upstream().await;
    let mut shared = rule("shared", "header:x-a", 1);
    shared.path_prefix = Some("/shared".into());
    let mut allow = rule("allow", "header:x-b", 1);
    allow.path_prefix = Some("/allow".into());
    allow.missing = Some("allow".into());
    let mut reject = rule("reject", "header:x-c", 1);
    reject.path_prefix = Some("/reject".into());
    reject.missing = Some("reject".into());
    let gate = spawn_sidecar(with_rules(
        test_config(up.addr),
        vec![shared, allow, reject],
    ))
    .await;

    let s1 = try_connect(&gate, "/shared", &[])
        .await
        .expect("first without the key");
    assert_eq!(
        try_connect(&gate, "/shared", &[]).await.err().map(|e| e.0),
        Some(429),
        "requests without the key share one bucket"
    );
    let _s2 = try_connect(&gate, "/shared", &[("x-a", "k")])
        .await
        .expect("with a key");
    let a: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| try_connect(&gate, "/allow", &[])))
            .await
            .into_iter()
            .map(|r| r.expect("allow: the rule does not apply"))
            .collect();
    assert_eq!(
        try_connect(&gate, "/reject", &[]).await.err(),
        Some((400, None))
    );
    assert_eq!(metric(gate.admin, &rejected("key_missing")).await, 1.0);
    let long = "x".repeat(257);
    for bad in ["two words", long.as_str()] {
        assert_eq!(
            try_connect(&gate, "/allow", &[("x-b", bad)])
                .await
                .err()
                .map(|e| e.0),
            Some(400),
            "{bad:?} cannot be a key"
        );
    }
    assert_eq!(
        try_connect(&gate, "/allow", &[("x-b", "one"), ("x-b", "two")])
            .await
            .err()
            .map(|e| e.0),
        Some(400),
        "a key header sent twice is ambiguous"
    );
    drop((s1, a));
}

/// Check order and give-back: a key refusal takes no pod slot and no rate
/// token; a capacity refusal takes no key share; a rate refusal gives its
/// key share back.
#[tokio::test]
async fn refusals_give_back_what_earlier_checks_took() {
    let up = spawn_echo_upstream().await;
    let mut raw = with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:x-tenant", 1)],
    );
    raw.max_clients = 3;
    raw.admission_rate = 0.001;
    raw.admission_burst = 2;
    let gate = spawn_sidecar(raw).await;
    let _a = tenant(&gate, "a").await.expect("a: first token");
    assert_eq!(tenant(&gate, "a").await.err().map(|e| e.0), Some(429));
    assert_eq!(
        metric(gate.admin, ACTIVE).await,
        1.0,
        "the key refusal holds no slot"
    );
    let _b = tenant(&gate, "b")
        .await
        .expect("b: the key refusal spent no token");
    // The bucket is empty now: c passes its key rule, then the rate refuses.
    assert_eq!(tenant(&gate, "c").await.err().map(|e| e.0), Some(503));
    assert_eq!(metric(gate.admin, &rejected("rate")).await, 1.0);
    let keys = admin_keys(&gate, None).await;
    assert_eq!(keys.0, 404, "no token file: /keys does not exist");
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_keys_tracked", "tenant")).await,
        2.0,
        "c's key share went back with the rate refusal"
    );
}

/// Capacity is checked before the key rules: over the cap, no share is taken.
#[tokio::test]
async fn a_capacity_refusal_takes_no_key_share() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(with_rules(
        test_config(up.addr).cap(1),
        vec![rule("tenant", "header:x-tenant", 5)],
    ))
    .await;
    let _a = tenant(&gate, "a").await.expect("a");
    assert_eq!(tenant(&gate, "b").await.err().map(|e| e.0), Some(503));
    assert_eq!(metric(gate.admin, &rejected("capacity")).await, 1.0);
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_keys_tracked", "tenant")).await,
        1.0
    );
}

/// 200 upgrades for one key at once, limit 10: exactly 10 get in.
#[tokio::test]
async fn concurrent_upgrades_for_one_key_never_pass_its_limit() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:x-tenant", 10)],
    ))
    .await;
    let results = futures_util::future::join_all((0..200).map(|_| tenant(&gate, "hot"))).await;
    let (admitted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(admitted.len(), 10);
    assert!(refused.iter().all(|r| matches!(r, Err((429, _)))));
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_rejected_total", "tenant")).await,
        190.0
    );
    assert_eq!(metric(gate.admin, ACTIVE).await, 10.0);
}

/// Reload: a limit lowered from 5 to 2 with 4 connected drops none of them
/// and refuses the next; a removed rule releases nothing and its series go;
/// a new rule counts only what it admits.
#[tokio::test]
async fn reload_changes_rules_in_place() {
    let up = spawn_echo_upstream().await;
    let raw = with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:x-tenant", 5)],
    );
    let (config, proxy, admin) = bind_sidecar(raw.clone()).await;
    let gate = start_sidecar(config, proxy, admin);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tenant(&gate, "a").await.expect("a"));
    }
    let reload = |raw: RawConfig| {
        let _ = gate
            .control
            .send(Control::Reload(Box::new(Config::validate(raw))));
    };
    reload(with_rules(
        raw.clone(),
        vec![rule("tenant", "header:x-tenant", 2)],
    ));
    wait_metric(
        gate.admin,
        "wsgate_config_reloads_total{result=\"success\"}",
        1.0,
    )
    .await;
    for ws in &mut held {
        echo_text(ws, "still here").await;
    }
    assert_eq!(tenant(&gate, "a").await.err().map(|e| e.0), Some(429));
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_keys_tracked", "tenant")).await,
        1.0
    );

    // Removed, and a new rule on another header.
    reload(with_rules(raw, vec![rule("team", "header:x-team", 1)]));
    wait_metric(
        gate.admin,
        "wsgate_config_reloads_total{result=\"success\"}",
        2.0,
    )
    .await;
    let text = scrape(gate.admin).await;
    assert!(
        !text.contains("rule=\"tenant\""),
        "a removed rule's series go:\n{text}"
    );
    for ws in &mut held {
        echo_text(ws, "removed rule, still here").await;
    }
    let _t = try_connect(&gate, "/", &[("x-tenant", "a"), ("x-team", "red")])
        .await
        .expect("the old rule no longer refuses, and red is new to the team rule");
    assert_eq!(
        try_connect(&gate, "/", &[("x-team", "red")])
            .await
            .err()
            .map(|e| e.0),
        Some(429)
    );
    drop(held);
    wait_metric(gate.admin, ACTIVE, 1.0).await;
}

/// Dry run counts what a key rule would have refused, and admits it.
#[tokio::test]
async fn dry_run_covers_key_rules() {
    let up = spawn_echo_upstream().await;
    let mut raw = with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:x-tenant", 1)],
    );
    raw.enforce = false;
    let gate = spawn_sidecar(raw).await;
    let _a1 = tenant(&gate, "a").await.expect("a1");
    let _a2 = tenant(&gate, "a").await.expect("dry run admits");
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_would_reject_total{reason=\"key\"}"
        )
        .await,
        1.0
    );
    assert_eq!(metric(gate.admin, &rejected("key")).await, 0.0);
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_key_busiest_ratio", "tenant")).await,
        2.0,
        "the count shows the truth, past the limit"
    );
}

/// `GET /keys` with the admin token: the busiest values first; 401 without
/// the right token; 404 for an unknown rule; 400 for a bad `top`.
async fn admin_keys(gate: &Sidecar, token: Option<&str>) -> (u16, String) {
    admin_get(gate, "/keys?rule=tenant&top=2", token).await
}

async fn admin_get(gate: &Sidecar, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
        gate.admin
    );
    let text = raw_exchange(gate.admin, req.as_bytes()).await;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status_of(&text), body)
}

#[tokio::test]
async fn keys_endpoint_lists_the_busiest_values_behind_the_token() {
    let up = spawn_echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "let-me-in\n").expect("write");
    let mut raw = with_rules(
        test_config(up.addr),
        vec![rule("tenant", "header:x-tenant", 3)],
    );
    raw.admin_token_file = Some(token_file.display().to_string());
    raw.key_limits[0].overrides = BTreeMap::from([("c".into(), 0)]);
    let gate = spawn_sidecar(raw).await;
    let mut held = Vec::new();
    for (t, n) in [("a", 1), ("b", 3), ("c", 2)] {
        for _ in 0..n {
            held.push(tenant(&gate, t).await.expect(t));
        }
    }
    assert_eq!(admin_keys(&gate, None).await.0, 401);
    assert_eq!(admin_keys(&gate, Some("let-me-out")).await.0, 401);
    let (status, body) = admin_keys(&gate, Some("let-me-in")).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"rule": "tenant", "keys": [
            {"key": "b", "active": 3, "limit": 3},
            {"key": "c", "active": 2, "limit": 0},
        ]})
    );
    assert_eq!(
        admin_get(&gate, "/keys?rule=nope", Some("let-me-in"))
            .await
            .0,
        404
    );
    assert_eq!(
        admin_get(&gate, "/keys?rule=tenant&top=x", Some("let-me-in"))
            .await
            .0,
        400
    );
    assert_eq!(admin_get(&gate, "/keys", Some("let-me-in")).await.0, 400);
    let (status, body) = admin_get(&gate, "/keys?rule=tenant", Some("let-me-in")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"key\":\"a\""), "top defaults to 20: {body}");
    drop(held);
}

/// `max_keys` 100 and 10,000 distinct values: the table stays at 100
/// values, the rest are refused as `key_table_full` (503 with
/// `Retry-After`), and a tenant already tracked still connects.
#[tokio::test]
async fn a_full_key_table_refuses_new_values_and_stays_bounded() {
    let up = spawn_echo_upstream().await;
    let mut r = rule("tenant", "header:x-tenant", 2);
    r.max_keys = Some(100);
    let gate = spawn_sidecar(with_rules(test_config(up.addr), vec![r])).await;
    let mut held = Vec::new();
    for i in 0..100 {
        held.push(raw_tenant(gate.addr, &format!("held-{i}")).await);
    }
    let rss_before = metric(gate.admin, "process_resident_memory_bytes").await;
    let addr = gate.addr;
    let refused = futures_util::future::join_all((0..16).map(|w| {
        tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..625 {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let req = upgrade_request(addr).replace(
                    "\r\n\r\n",
                    &format!("\r\nx-tenant: r{w}-{i}-{}\r\n\r\n", rand_hex()),
                );
                s.write_all(req.as_bytes()).await.expect("write");
                let head = read_head(&mut s).await;
                if status_of(&head) == 503 && head.to_ascii_lowercase().contains("retry-after: 1") {
                    refused += 1;
                }
            }
            refused
        })
    }))
    .await
    .into_iter()
    .map(|r| r.expect("worker"))
    .sum::<usize>();
    assert_eq!(refused, 10_000);
    assert_eq!(
        metric(gate.admin, &rejected("key_table_full")).await,
        10_000.0
    );
    assert_eq!(
        metric(gate.admin, &by_rule("wsgate_keys_tracked", "tenant")).await,
        100.0
    );
    let rss_after = metric(gate.admin, "process_resident_memory_bytes").await;
    println!(
        "RSS of the test process (wsgate in-process) before / after 10,000 refused values: {:.1} / {:.1} MiB",
        rss_before / 1048576.0,
        rss_after / 1048576.0
    );
    let again = tenant(&gate, "held-7")
        .await
        .expect("a tracked value still counts");
    drop((held, again));
    wait_metric(gate.admin, &by_rule("wsgate_keys_tracked", "tenant"), 0.0).await;
}

fn rand_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}
