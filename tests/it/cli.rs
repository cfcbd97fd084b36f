//! The binary as an operator runs it: configuration errors exit 2 naming the
//! key, value and what is accepted; `check-config`; a taken address exits 1
//! naming it; SIGTERM drains and exits 0 within the grace.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::support::*;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// A command with a clean WSGATE_* environment.
fn wsgate(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("WS_MAX_CLIENTS")
        .env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("WSGATE_") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null());
    c
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    wsgate(args, env).output().expect("run wsgate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn invalid_values_exit_2_naming_key_value_and_accepted() {
    let cases = [
        ("WSGATE_MAX_CLIENTS", "abc", "max_clients"),
        ("WSGATE_LISTEN", "nowhere", "listen"),
        ("WSGATE_RETRY_AFTER", "-3s", "retry_after"),
        ("WSGATE_LOG_FORMAT", "xml", "log_format"),
        ("WSGATE_UPSTREAM", "https://app:443", "upstream"),
        ("WS_MAX_CLIENTS", "many", "max_clients"),
        ("WSGATE_FLEET_NAMESPACE", "a b", "fleet_namespace"),
        ("WSGATE_WORKERS", "-1", "workers"),
        ("WSGATE_WORKERS", "257", "workers"),
        ("WSGATE_WORKERS", "two", "workers"),
    ];
    for (var, value, key) in cases {
        let o = run(
            &["check-config"],
            &[("WSGATE_UPSTREAM", "127.0.0.1:3000"), (var, value)],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{var}={value}: {err}");
        assert!(
            err.contains(key) && err.contains(value) && err.contains("expected"),
            "{var}={value}: {err}"
        );
    }
}

#[test]
fn invalid_value_exits_2_before_binding_anything() {
    // The listen address is taken by us; a config error must win over the bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let o = run(
        &[],
        &[
            ("WSGATE_UPSTREAM", "127.0.0.1:3000"),
            ("WSGATE_LISTEN", &addr),
            ("WSGATE_MAX_CLIENTS", "abc"),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn unknown_toml_key_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wsgate.toml");
    std::fs::write(&file, "upstream = \"127.0.0.1:3000\"\nmax_client = 5\n").expect("write");
    let o = run(
        &["--config", file.to_str().expect("utf8"), "check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("unknown key max_client") && err.contains("did you mean max_clients?"),
        "{err}"
    );
    assert!(
        !err.contains("accepted keys"),
        "no list of every key: {err}"
    );
    // The chart's camelCase value name, in the file and as a variable.
    std::fs::write(&file, "upstream = \"127.0.0.1:3000\"\nmaxClients = 5\n").expect("write");
    let o = run(
        &["--config", file.to_str().expect("utf8"), "check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown key maxClients")
            && stderr(&o).contains("did you mean max_clients?"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &["check-config"],
        &[
            ("WSGATE_UPSTREAM", "127.0.0.1:3000"),
            ("WSGATE_MAXCLIENTS", "5"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("did you mean WSGATE_MAX_CLIENTS?"),
        "{}",
        stderr(&o)
    );
}

/// `--config` naming a directory, or a file wsgate cannot read, exits 2
/// saying which, not "no such file".
#[test]
fn a_config_path_that_is_not_a_readable_file_exits_2_saying_what_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf8");
    for args in [
        vec!["--config", path, "check-config"],
        vec!["--config", path],
    ] {
        let o = run(&args, &[("WSGATE_UPSTREAM", "127.0.0.1:3000")]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{path}: is a directory, expected a TOML file")),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let missing = dir.path().join("nope.toml");
    let o = run(
        &["--config", missing.to_str().expect("utf8"), "check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("nope.toml: no such file"),
        "{}",
        stderr(&o)
    );
    // Unreadable: only testable where permissions bind (not as root).
    let file = dir.path().join("secret.toml");
    std::fs::write(&file, "upstream = \"127.0.0.1:3000\"\n").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o000))
        .expect("chmod");
    if std::fs::File::open(&file).is_err() {
        let o = run(
            &["--config", file.to_str().expect("utf8"), "check-config"],
            &[],
        );
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains("secret.toml: cannot be read: Permission denied"),
            "{}",
            stderr(&o)
        );
    }
}

/// An upstream on wsgate's own port would loop every request back into
/// wsgate: exit 2 before anything is bound, naming both keys and values.
#[test]
fn an_upstream_on_wsgate_own_port_exits_2_naming_both() {
    for (upstream, listen, admin, key, value) in [
        (
            "127.0.0.1:18080",
            "0.0.0.0:18080",
            "127.0.0.1:0",
            "listen",
            "0.0.0.0:18080",
        ),
        (
            "localhost:18080",
            "127.0.0.1:18080",
            "127.0.0.1:0",
            "listen",
            "127.0.0.1:18080",
        ),
        (
            "[::1]:18080",
            "[::]:18080",
            "127.0.0.1:0",
            "listen",
            "[::]:18080",
        ),
        (
            "127.0.0.1:19090",
            "127.0.0.1:0",
            "0.0.0.0:19090",
            "admin_listen",
            "0.0.0.0:19090",
        ),
    ] {
        let env = [
            ("WSGATE_UPSTREAM", upstream),
            ("WSGATE_LISTEN", listen),
            ("WSGATE_ADMIN_LISTEN", admin),
        ];
        for args in [&["check-config"][..], &[][..]] {
            let o = run(args, &env);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{upstream} {args:?}: {err}");
            assert!(
                err.contains(&format!("upstream = \"{upstream}\""))
                    && err.contains(&format!("{key} = {value}")),
                "{upstream} {args:?}: {err}"
            );
        }
    }
}

/// docs/configuration.md: `log_level` filters the log; a valid `RUST_LOG`
/// wins; an invalid one is ignored with one warning, never silencing the
/// log; an invalid `log_level` exits 2. The runs end on their own: the
/// listen address is taken, so each logs a warning (negative cap), maybe
/// the runtime's INFO line, and the bind error, then exits 1.
#[test]
fn log_level_filters_and_an_invalid_rust_log_never_silences_the_log() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let base = [
        ("WSGATE_UPSTREAM", "127.0.0.1:3000"),
        ("WSGATE_LISTEN", addr.as_str()),
        ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("WS_MAX_CLIENTS", "-1"),
    ];
    let logged = |extra: &[(&str, &str)], rust_log: Option<&str>| {
        let mut c = wsgate(&[], &base);
        c.envs(extra.iter().copied());
        match rust_log {
            Some(v) => c.env("RUST_LOG", v),
            None => c.env_remove("RUST_LOG"),
        };
        let o = c.output().expect("run wsgate");
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(&addr), "{err}");
        err
    };
    let warn_only = logged(&[("WSGATE_LOG_LEVEL", "warn")], None);
    assert!(
        warn_only.contains("is negative") && !warn_only.contains("runtime started"),
        "{warn_only}"
    );
    let info = logged(&[], None);
    assert!(
        info.contains("INFO") && info.contains("runtime started"),
        "{info}"
    );
    let rust_log_wins = logged(&[("WSGATE_LOG_LEVEL", "warn")], Some("info"));
    assert!(rust_log_wins.contains("runtime started"), "{rust_log_wins}");
    let quiet = logged(&[], Some("error"));
    assert!(
        !quiet.contains("is negative") && !quiet.contains("runtime started"),
        "{quiet}"
    );
    for typo in ["debugg", "wsgate=loud"] {
        let err = logged(&[("WSGATE_LOG_LEVEL", "warn")], Some(typo));
        let warning = format!("RUST_LOG={typo:?} is ignored");
        assert_eq!(err.matches(&warning).count(), 1, "{err}");
        assert!(err.contains("logging with log_level = \"warn\""), "{err}");
        assert!(
            err.contains("is negative") && !err.contains("runtime started"),
            "log_level applies: {err}"
        );
        assert!(err.contains("ERROR"), "the bind error is logged: {err}");
    }
    let o = run(
        &["check-config"],
        &[
            ("WSGATE_UPSTREAM", "127.0.0.1:3000"),
            ("WSGATE_LOG_LEVEL", "debugg"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("log_level = \"debugg\"") && stderr(&o).contains("expected"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_config_prints_effective_values_with_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wsgate.toml");
    std::fs::write(
        &file,
        "upstream = \"app:3000\"\nmax_clients = 7\nidle_timeout = \"90s\"\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf8");
    // WSGATE_CONFIG names the file; env wins over the file; WSGATE_ wins over WS_.
    let o = run(
        &["check-config"],
        &[
            ("WSGATE_CONFIG", path),
            ("WS_MAX_CLIENTS", "3"),
            ("WSGATE_MAX_CLIENTS", "9"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("upstream = \"app:3000\""), "{out}");
    assert!(out.contains("max_clients = 9"), "{out}");
    assert!(out.contains("idle_timeout = \"1m 30s\""), "{out}");
    let o = run(
        &["check-config"],
        &[("WSGATE_CONFIG", path), ("WS_MAX_CLIENTS", "-1")],
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("max_clients = 0"));
    assert!(stderr(&o).contains("negative"), "{}", stderr(&o));
}

#[test]
fn taken_listen_or_admin_address_exits_1_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for var in ["WSGATE_LISTEN", "WSGATE_ADMIN_LISTEN"] {
        let other = if var == "WSGATE_LISTEN" {
            "WSGATE_ADMIN_LISTEN"
        } else {
            "WSGATE_LISTEN"
        };
        let o = run(
            &[],
            &[
                ("WSGATE_UPSTREAM", "127.0.0.1:3000"),
                (var, &addr),
                (other, "127.0.0.1:0"),
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{var}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&addr),
            "{var}: message names the address: {}",
            stderr(&o)
        );
    }
}

#[test]
fn version_and_help() {
    let o = run(&["--version"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
    let o = run(&["--help"], &[]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("demo") && help.contains("check-config") && help.contains("--config"),
        "{help}"
    );
}

/// A started binary and the addresses it logged.
struct Running {
    child: Child,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and reads `proxy listening addr=` / `admin listening addr=` from its log.
fn start(env: &[(&str, &str)]) -> Running {
    start_with(&[], env)
}

/// [`start`] with command-line arguments.
fn start_with(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut all = vec![
        ("WSGATE_LISTEN", "127.0.0.1:0"),
        ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0"),
    ];
    all.extend_from_slice(env);
    let mut child = wsgate(args, &all)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    // Read on a thread that keeps draining the log, so the child never
    // blocks on a full pipe.
    let lines = Lines::new(child.stderr.take().expect("stderr"));
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = lines.next("wsgate listening");
        let addr = || {
            line.split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next()?.parse().ok())
        };
        if line.contains("proxy listening") {
            proxy = addr();
        } else if line.contains("admin listening") {
            admin = addr();
        }
    }
    Running {
        child,
        proxy: proxy.expect("proxy addr"),
        admin: admin.expect("admin addr"),
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// Polls the child for its exit within `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> (Option<i32>, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status.code(), start.elapsed());
        }
        assert!(start.elapsed() < limit, "did not exit within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_with_twenty_idle_clients_exits_0_within_grace() {
    let up = spawn_echo_upstream().await;
    let upstream = up.addr.to_string();
    let mut gate = start(&[
        ("WSGATE_UPSTREAM", &upstream),
        ("WSGATE_SHUTDOWN_GRACE", "2s"),
    ]);
    let url = format!("ws://{}/", gate.proxy);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(within("connect", connect(&url)).await.expect("admitted"));
    }
    wait_metric(gate.admin, "wsgate_connections_active", 20.0).await;
    sigterm(&gate.child);
    // Readiness flips at once while the idle clients are still held.
    let start = Instant::now();
    loop {
        let (status, _) = http_get(gate.admin, "/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "readyz still {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, took) = wait_exit(&mut gate.child, Duration::from_secs(4)).await;
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(4),
        "exited after {took:?} (grace 2s)"
    );
    // Every idle client was closed by the hard stop.
    for mut c in clients {
        within("closed by shutdown", async {
            while c.next_message().await {}
        })
        .await;
    }
}

#[tokio::test]
async fn sigterm_with_no_connections_exits_at_once() {
    let up = spawn_echo_upstream().await;
    let upstream = up.addr.to_string();
    let mut gate = start(&[
        ("WSGATE_UPSTREAM", &upstream),
        ("WSGATE_SHUTDOWN_GRACE", "25s"),
    ]);
    sigterm(&gate.child);
    let (code, took) = wait_exit(&mut gate.child, Duration::from_secs(3)).await;
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(2),
        "idle process exited after {took:?}"
    );
}

#[tokio::test]
async fn second_sigterm_stops_at_once() {
    let up = spawn_echo_upstream().await;
    let upstream = up.addr.to_string();
    let mut gate = start(&[
        ("WSGATE_UPSTREAM", &upstream),
        ("WSGATE_SHUTDOWN_GRACE", "60s"),
    ]);
    let _held = within("connect", connect(&format!("ws://{}/", gate.proxy)))
        .await
        .expect("admitted");
    wait_metric(gate.admin, "wsgate_connections_active", 1.0).await;
    sigterm(&gate.child);
    wait_metric_http_status(gate.admin, "/readyz", 503).await;
    sigterm(&gate.child);
    let (code, took) = wait_exit(&mut gate.child, Duration::from_secs(3)).await;
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(2), "second signal took {took:?}");
}

async fn wait_metric_http_status(addr: std::net::SocketAddr, path: &str, want: u16) {
    let start = Instant::now();
    while http_get(addr, path).await.0 != want {
        assert!(start.elapsed() < DEADLINE, "{path} never answered {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn demo_prints_where_to_connect_and_admits_two() {
    let mut child = wsgate(
        &["demo"],
        &[
            ("WSGATE_LISTEN", "127.0.0.1:0"),
            ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn demo");
    let lines = Lines::new(child.stdout.take().expect("stdout"));
    let (mut proxy, mut metrics) = (None::<String>, None::<String>);
    while proxy.is_none() || metrics.is_none() {
        let line = lines.next("the demo banner");
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("proxy") {
            proxy = rest
                .trim()
                .strip_prefix("ws://")
                .and_then(|r| r.split('/').next())
                .map(str::to_owned);
        } else if let Some(rest) = t.strip_prefix("metrics") {
            metrics = rest
                .trim()
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .map(str::to_owned);
        }
    }
    let url = format!("ws://{}/", proxy.expect("proxy"));
    let admin: std::net::SocketAddr = metrics.expect("metrics").parse().expect("admin addr");
    let mut a = within("a", connect(&url)).await.expect("first");
    let _b = within("b", connect(&url)).await.expect("second");
    echo_text(&mut a, "demo").await;
    assert_eq!(connect_refused(&url).await.status(), 503);
    assert_eq!(metric(admin, "wsgate_connections_max").await, 2.0);
    sigterm(&child);
    drop(a);
    drop(_b);
    let (code, _) = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_file_and_keeps_the_old_config_when_invalid() {
    let up = spawn_echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wsgate.toml");
    let write = |text: String| std::fs::write(&file, text).expect("write config");
    write(format!("upstream = \"{}\"\nmax_clients = 3\n", up.addr));
    let path = file.to_str().expect("utf8").to_owned();
    let gate = start_with(&["--config", &path], &[]);
    let url = format!("ws://{}/", gate.proxy);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(within("connect", connect(&url)).await.expect("admitted"));
    }
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &gate.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    write(format!("upstream = \"{}\"\nmax_clients = 1\n", up.addr));
    hup();
    wait_metric(gate.admin, "wsgate_connections_max", 1.0).await;
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_config_reloads_total{result=\"success\"}"
        )
        .await,
        1.0
    );
    for ws in &mut held {
        echo_text(ws, "not dropped by the reload").await;
    }
    assert_eq!(connect_refused(&url).await.status(), 503);
    write("max_clients = \"lots\"\n".to_owned());
    hup();
    wait_metric(
        gate.admin,
        "wsgate_config_reloads_total{result=\"failure\"}",
        1.0,
    )
    .await;
    assert_eq!(
        metric(gate.admin, "wsgate_connections_max").await,
        1.0,
        "the old configuration stays"
    );
    // The file watch shares the SIGHUP's baseline: each edit was read once,
    // by the signal, and is not read again when it has settled. Absence can
    // only be shown by waiting: two polls and a margin.
    tokio::time::sleep(wsgate::CONFIG_POLL_INTERVAL * 2 + Duration::from_millis(500)).await;
    for (result, count) in [("success", 1.0), ("failure", 1.0)] {
        let series = format!("wsgate_config_reloads_total{{result=\"{result}\"}}");
        assert_eq!(metric(gate.admin, &series).await, count, "{result}");
    }
}

/// A ConfigMap mounted as the config file is updated by the kubelet without
/// any signal (and the image has no shell to send one): wsgate notices the
/// file changed, waits until it has settled, and reloads it.
#[tokio::test]
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    let up = spawn_echo_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wsgate.toml");
    std::fs::write(
        &file,
        format!("upstream = \"{}\"\nmax_clients = 3\n", up.addr),
    )
    .expect("write config");
    let path = file.to_str().expect("utf8").to_owned();
    let gate = start_with(&["--config", &path], &[]);
    assert_eq!(metric(gate.admin, "wsgate_connections_max").await, 3.0);

    // A new file renamed over the old one, as the kubelet's symlink swap does.
    let next = dir.path().join("next.toml");
    std::fs::write(
        &next,
        format!("upstream = \"{}\"\nmax_clients = 1\n", up.addr),
    )
    .expect("write config");
    std::fs::rename(&next, &file).expect("rename");
    wait_metric(gate.admin, "wsgate_connections_max", 1.0).await;
    let success = "wsgate_config_reloads_total{result=\"success\"}";
    assert_eq!(metric(gate.admin, success).await, 1.0);

    // An invalid edit in place is refused; the running configuration stays.
    std::fs::write(&file, "max_clients = \"lots\"\n").expect("write config");
    let failure = "wsgate_config_reloads_total{result=\"failure\"}";
    wait_metric(gate.admin, failure, 1.0).await;
    assert_eq!(metric(gate.admin, "wsgate_connections_max").await, 1.0);
    assert_eq!(metric(gate.admin, success).await, 1.0, "no second reload");
}

/// `workers` = 1 (the default: a single-threaded runtime), 0 (one per
/// CPU) and 2 each carry concurrent sessions end to end, and give every
/// slot back; the log says which runtime runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_setting_carries_concurrent_sessions() {
    let up = spawn_echo_upstream().await;
    for workers in ["1", "0", "2"] {
        let env = [
            ("WSGATE_WORKERS", workers.to_owned()),
            ("WSGATE_MAX_CLIENTS", "16".to_owned()),
        ];
        let (gate, proxy, admin) =
            tokio::task::block_in_place(|| GateProcess::proxy(up.addr, &env, None));
        let url = format!("ws://{proxy}/");
        let sessions = (0..8).map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut ws = within("connect", connect(&url)).await.expect("admitted");
                for j in 0..20 {
                    echo_text(&mut ws, &format!("w{i}-{j}")).await;
                }
                close_cleanly(ws).await;
            })
        });
        for s in sessions.collect::<Vec<_>>() {
            s.await.expect("session");
        }
        wait_metric(admin, "wsgate_connections_active", 0.0).await;
        let sent = metric(
            admin,
            "wsgate_messages_total{direction=\"client_to_upstream\"}",
        )
        .await;
        // 8 × (20 texts + the Close).
        assert_eq!(sent, 168.0, "workers = {workers}");
        let log = gate.stderr_text();
        let want = if workers == "1" {
            "runtime=single-threaded"
        } else {
            "runtime=multi-threaded"
        };
        assert!(log.contains(want), "workers = {workers}: {log}");
    }
}
