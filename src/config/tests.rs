//! The configuration as an operator meets it: files and environment
//! variables in a `figment::Jail`, through loading and validation, to the
//! typed [`Config`] or the one-line [`ConfigError`].

#![allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures return figment::Error"
)]

use std::path::Path;
use std::time::Duration;

use figment::Jail;

use super::*;

fn load_in_jail(file: Option<&str>) -> Result<Config, ConfigError> {
    Config::load(file.map(Path::new))
}

#[test]
fn defaults_need_only_an_upstream() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.admin_listen, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(c.max_clients, 0);
        assert_eq!(c.retry_after_secs, 1);
        assert_eq!(c.upstream_connect_timeout, Duration::from_secs(5));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.half_close_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(30)));
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.log_format, LogFormat::Text);
        Ok(())
    });
}

#[test]
fn missing_upstream_names_the_key() {
    Jail::expect_with(|_| {
        let e = load_in_jail(None).expect_err("upstream is required");
        assert!(e.to_string().contains("upstream"), "{e}");
        Ok(())
    });
}

#[test]
fn env_overrides_file_and_file_overrides_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "w.toml",
            "upstream = \"app:3000\"\nmax_clients = 7\nretry_after = \"3s\"\n",
        )?;
        let c = load_in_jail(Some("w.toml")).expect("valid");
        assert_eq!(c.max_clients, 7);
        assert_eq!(c.retry_after_secs, 3);
        jail.set_env("WSGATE_MAX_CLIENTS", "9");
        let c = load_in_jail(Some("w.toml")).expect("valid");
        assert_eq!(c.max_clients, 9);
        assert_eq!(c.upstream.authority, "app:3000");
        Ok(())
    });
}

#[test]
fn wsgate_max_clients_wins_over_legacy_alias() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WS_MAX_CLIENTS", "4");
        assert_eq!(load_in_jail(None).expect("valid").max_clients, 4);
        jail.set_env("WSGATE_MAX_CLIENTS", "6");
        assert_eq!(load_in_jail(None).expect("valid").max_clients, 6);
        Ok(())
    });
}

#[test]
fn negative_cap_is_unlimited_with_a_warning() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WS_MAX_CLIENTS", "-5");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(c.max_clients, 0);
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("-5"));
        Ok(())
    });
}

#[test]
fn durations_accept_humantime_and_bare_seconds() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_HALF_CLOSE_TIMEOUT", "250ms");
        jail.set_env("WSGATE_SHUTDOWN_GRACE", "2m");
        jail.set_env("WSGATE_IDLE_TIMEOUT", "7");
        jail.set_env("WSGATE_RETRY_AFTER", "1500ms");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(c.half_close_timeout, Duration::from_millis(250));
        assert_eq!(c.shutdown_grace, Duration::from_secs(120));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(7)));
        assert_eq!(c.retry_after_secs, 2, "rounded up to whole seconds");
        Ok(())
    });
}

fn assert_rejected(var: &str, value: &str, key: &str) {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env(var, value);
        let e = load_in_jail(None)
            .expect_err("must be rejected")
            .to_string();
        assert!(e.contains(key), "message must name the key {key}: {e}");
        assert!(
            e.contains(value),
            "message must name the value {value}: {e}"
        );
        assert!(
            e.contains("expected"),
            "message must say what is accepted: {e}"
        );
        Ok(())
    });
}

#[test]
fn invalid_values_name_key_value_and_accepted() {
    assert_rejected("WSGATE_MAX_CLIENTS", "abc", "max_clients");
    assert_rejected("WSGATE_LISTEN", "nowhere", "listen");
    assert_rejected("WSGATE_ADMIN_LISTEN", "nowhere:x", "admin_listen");
    assert_rejected("WSGATE_RETRY_AFTER", "-3s", "retry_after");
    assert_rejected("WSGATE_IDLE_TIMEOUT", "soon", "idle_timeout");
    assert_rejected("WSGATE_LOG_FORMAT", "xml", "log_format");
    assert_rejected("WSGATE_UPSTREAM", "https://x:1", "upstream");
    assert_rejected("WSGATE_UPSTREAM", "nohostport", "upstream");
    assert_rejected("WSGATE_UPSTREAM", "unix:run/ws.sock", "upstream");
    assert_rejected("WSGATE_UPSTREAM", "unix:", "upstream");
    assert_rejected("WS_MAX_CLIENTS", "lots", "max_clients");
}

#[test]
fn rollout_keys_parse_with_their_defaults() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(c.watermarks, None);
        assert_eq!(c.admission_rate, None);
        assert!(c.enforce);
        assert_eq!(c.lifetime_jitter, 0.5);
        jail.set_env("WSGATE_READY_HIGH_WATERMARK", "0.95");
        jail.set_env("WSGATE_ADMISSION_RATE", "50");
        jail.set_env("WSGATE_ENFORCE", "false");
        jail.set_env("WSGATE_MAX_CLIENTS_PER_IP", "3");
        jail.set_env("WSGATE_TRUSTED_HOPS", "1");
        jail.set_env("WSGATE_SHUTDOWN_DELAY", "5s");
        jail.set_env("WSGATE_DRAIN_PERIOD", "15s");
        jail.set_env("WSGATE_MAX_CONNECTION_LIFETIME", "1h");
        let c = load_in_jail(None).expect("valid");
        let w = c.watermarks.expect("on");
        assert!(
            (w.low - 0.85).abs() < 1e-9,
            "low defaults to high - 0.1: {}",
            w.low
        );
        assert_eq!(
            c.admission_rate,
            Some(RateLimit {
                per_second: 50.0,
                burst: 50.0
            })
        );
        assert!(!c.enforce);
        assert_eq!((c.max_clients_per_ip, c.trusted_hops), (3, 1));
        assert_eq!(c.max_connection_lifetime, Some(Duration::from_secs(3600)));
        Ok(())
    });
}

#[test]
fn rollout_keys_are_validated() {
    assert_rejected("WSGATE_READY_HIGH_WATERMARK", "1.5", "ready_high_watermark");
    assert_rejected("WSGATE_LIFETIME_JITTER", "2", "lifetime_jitter");
    assert_rejected("WSGATE_ADMISSION_RATE", "-1", "admission_rate");
    assert_rejected("WSGATE_ADMISSION_BURST", "-2", "admission_burst");
    assert_rejected("WSGATE_MAX_CLIENTS_PER_IP", "-1", "max_clients_per_ip");
    assert_rejected("WSGATE_ENFORCE", "maybe", "enforce");
    assert_rejected("WSGATE_DRAIN_PERIOD", "30s", "drain_period");
    // Deadlines are instants plus durations: a huge one must be an
    // error here, not an overflow panic at shutdown.
    assert_rejected(
        "WSGATE_SHUTDOWN_GRACE",
        "18446744073709551615",
        "shutdown_grace",
    );
    assert_rejected("WSGATE_IDLE_TIMEOUT", "500years", "idle_timeout");
    // Outside what the kernel takes for keepalive: refused, not ignored.
    assert_rejected("WSGATE_TCP_KEEPALIVE", "500ms", "tcp_keepalive");
    assert_rejected("WSGATE_TCP_KEEPALIVE", "32768", "tcp_keepalive");
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_READY_HIGH_WATERMARK", "0.8");
        jail.set_env("WSGATE_READY_LOW_WATERMARK", "0.9");
        let e = load_in_jail(None).expect_err("low above high").to_string();
        assert!(
            e.contains("ready_low_watermark") && e.contains("0.9"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn close_codes_are_validated() {
    for bad in ["1005", "999", "2500", "5000", "-1", "abc"] {
        assert_rejected("WSGATE_CLOSE_CODE_DRAIN", bad, "close_code_drain");
    }
    assert_rejected("WSGATE_CLOSE_CODE_LIFETIME", "1006", "close_code_lifetime");
    assert_rejected("WSGATE_CLOSE_CODE_IDLE", "1004", "close_code_idle");
    assert_rejected("WSGATE_CLOSE_TIMEOUT", "0s", "close_timeout");
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_CLOSE_CODE_LIFETIME", "1012");
        jail.set_env("WSGATE_CLOSE_CODE_IDLE", "4000");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(
            c.close,
            CloseSettings {
                drain: 1001,
                lifetime: 1012,
                idle: 4000,
                rebalance: 1012,
                timeout: Duration::from_secs(2)
            }
        );
        Ok(())
    });
}

#[test]
fn zero_connect_timeout_is_rejected() {
    assert_rejected(
        "WSGATE_UPSTREAM_CONNECT_TIMEOUT",
        "0",
        "upstream_connect_timeout",
    );
}

#[test]
fn unknown_keys_in_file_and_env_are_rejected() {
    Jail::expect_with(|jail| {
        jail.create_file("w.toml", "upstream = \"a:1\"\nmax_client = 3\n")?;
        let e = load_in_jail(Some("w.toml"))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("max_client"), "{e}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_MAX_CLIENT", "3");
        let e = load_in_jail(None).expect_err("unknown key").to_string();
        assert!(e.contains("max_client"), "{e}");
        Ok(())
    });
}

/// docs/configuration.md: an unknown key names the key it was most likely
/// meant to be, as it was written (a variable for a variable), instead of
/// every key.
#[test]
fn unknown_keys_suggest_the_key_they_were_meant_to_be() {
    Jail::expect_with(|jail| {
        jail.create_file("w.toml", "upstream = \"a:1\"\nmaxClients = 3\n")?;
        let e = load_in_jail(Some("w.toml"))
            .expect_err("camelCase")
            .to_string();
        assert!(
            e.contains("unknown key maxClients (in ")
                && e.ends_with("did you mean max_clients?")
                && e.contains("Helm chart"),
            "{e}"
        );
        jail.create_file("w.toml", "upstream = \"a:1\"\nmax_client = 3\n")?;
        let e = load_in_jail(Some("w.toml")).expect_err("typo").to_string();
        assert!(e.ends_with(": did you mean max_clients?"), "{e}");
        assert!(!e.contains("accepted keys"), "{e}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_LOG_LEVL", "debug");
        let e = load_in_jail(None).expect_err("typo").to_string();
        assert!(
            e.contains("(from environment variable WSGATE_LOG_LEVL)")
                && e.ends_with("did you mean WSGATE_LOG_LEVEL?"),
            "{e}"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_COLOUR", "blue");
        let e = load_in_jail(None).expect_err("nothing close").to_string();
        assert!(e.contains("accepted keys are listen, upstream,"), "{e}");
        Ok(())
    });
}

#[test]
fn kubernetes_service_links_and_config_var_are_ignored() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_PORT", "tcp://10.0.0.1:8080");
        jail.set_env("WSGATE_PORT_8080_TCP_ADDR", "10.0.0.1");
        jail.set_env("WSGATE_SERVICE_HOST", "10.0.0.1");
        jail.set_env("WSGATE_ADMIN_PORT", "tcp://10.0.0.2:9090");
        jail.set_env("WSGATE_ADMIN_PORT_9090_TCP_PROTO", "tcp");
        jail.set_env("WSGATE_ADMIN_SERVICE_PORT_METRICS", "9090");
        jail.set_env("WSGATE_CONFIG", "/nonexistent.toml");
        load_in_jail(None).expect("service-link variables are not keys");
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    Jail::expect_with(|_| {
        let e = load_in_jail(Some("nope.toml")).expect_err("missing file");
        assert!(e.to_string().contains("nope.toml: no such file"), "{e}");
        Ok(())
    });
}

/// A directory where the file was meant (a ConfigMap mounted at the path
/// instead of a key of it) is named as one, not as a missing file.
#[test]
fn a_directory_as_the_config_file_says_so() {
    Jail::expect_with(|jail| {
        std::fs::create_dir(jail.directory().join("conf.d")).map_err(|e| e.to_string())?;
        let e = load_in_jail(Some("conf.d")).expect_err("a directory");
        assert!(
            e.to_string()
                .ends_with("conf.d: is a directory, expected a TOML file"),
            "{e}"
        );
        Ok(())
    });
}

/// docs/configuration.md: `log_level` takes tracing directives, and refuses
/// one that would silence the log.
#[test]
fn log_level_takes_a_filter_and_refuses_a_typo() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        assert_eq!(load_in_jail(None).expect("valid").log_level, "info");
        jail.set_env("WSGATE_LOG_LEVEL", "warn,wsgate::access=off");
        assert_eq!(
            load_in_jail(None).expect("valid").log_level,
            "warn,wsgate::access=off"
        );
        Ok(())
    });
    assert_rejected("WSGATE_LOG_LEVEL", "debugg", "log_level");
    assert_rejected("WSGATE_LOG_LEVEL", "wsgate=loud", "log_level");
}

/// docs/configuration.md: an upstream on wsgate's own port is refused,
/// naming both keys and both values.
#[test]
fn an_upstream_on_wsgate_own_port_is_refused() {
    for (upstream, var, listen, key) in [
        ("127.0.0.1:8080", "WSGATE_LISTEN", "0.0.0.0:8080", "listen"),
        (
            "localhost:9090",
            "WSGATE_ADMIN_LISTEN",
            "0.0.0.0:9090",
            "admin_listen",
        ),
        ("[::1]:8080", "WSGATE_LISTEN", "[::]:8080", "listen"),
    ] {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", upstream);
            jail.set_env(var, listen);
            let e = load_in_jail(None).expect_err(upstream).to_string();
            assert!(
                e.contains(&format!("upstream = \"{upstream}\""))
                    && e.contains(&format!("{key} = {listen}")),
                "{e}"
            );
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "unix:/run/app/8080.sock");
        load_in_jail(None).expect("a Unix socket is never wsgate's own port");
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:8081");
        load_in_jail(None).expect("another port");
        Ok(())
    });
}

/// The seven `fleet_*` keys (docs/operations.md#fleet-wide-limits) as `check-config` prints them.
const FLEET_KEYS: [&str; 7] = [
    "fleet_redis_url",
    "fleet_namespace",
    "fleet_max_clients",
    "fleet_lease_ttl",
    "fleet_timeout",
    "fleet_fail_mode",
    "fleet_instance_id",
];

#[test]
fn fleet_is_off_by_default_and_printed_with_its_defaults() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        let c = load_in_jail(None).expect("valid");
        assert_eq!(c.fleet, None);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let printed = c.to_toml();
        for line in [
            "fleet_redis_url = \"\"\n",
            "fleet_namespace = \"wsgate\"\n",
            "fleet_max_clients = 0\n",
            "fleet_lease_ttl = \"30s\"\n",
            "fleet_timeout = \"100ms\"\n",
            "fleet_fail_mode = \"open\"\n",
            "fleet_instance_id = \"",
        ] {
            assert!(printed.contains(line), "{line}: {printed}");
        }
        let printed_keys: Vec<&str> = printed
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .filter(|k| k.starts_with("fleet_"))
            .collect();
        assert_eq!(printed_keys, FLEET_KEYS);
        Ok(())
    });
}

#[test]
fn fleet_defaults_apply_once_a_url_is_set_from_the_environment() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://redis:6379/0");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "500");
        let c = load_in_jail(None).expect("valid");
        let f = c.fleet.clone().expect("fleet limits on");
        assert_eq!(f.redis_url.as_str(), "redis://redis:6379/0");
        assert_eq!(f.namespace, "wsgate");
        assert_eq!(f.max_clients, 500);
        assert_eq!(f.lease_ttl, Duration::from_secs(30));
        assert_eq!(f.timeout, Duration::from_millis(100));
        assert_eq!(f.fail_mode, FailMode::Open);
        let (host, hex) = f.instance_id.rsplit_once('-').expect("HOST-suffix");
        assert!(!host.is_empty() && hex.len() == 8, "{}", f.instance_id);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // A reload of the same configuration is no change: the drawn
        // instance id stays.
        assert_eq!(load_in_jail(None).expect("valid").fleet, c.fleet);
        Ok(())
    });
}

/// figment reads an all-digit environment value as a number; a text key
/// takes it as written.
#[test]
fn all_digit_text_from_the_environment_is_taken_as_written() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://redis:6379/0");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "5");
        jail.set_env("WSGATE_FLEET_NAMESPACE", "2024");
        jail.set_env("WSGATE_FLEET_INSTANCE_ID", "12345");
        let f = load_in_jail(None).expect("valid").fleet.expect("fleet on");
        assert_eq!(f.namespace, "2024");
        assert_eq!(f.instance_id, "12345");
        Ok(())
    });
}

#[test]
fn fleet_keys_from_a_file_and_the_environment_over_it() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "w.toml",
            r#"
            upstream = "app:3000"
            fleet_redis_url = "unix:///run/redis.sock?pass=s3cret"
            fleet_namespace = "chat-eu.1"
            fleet_max_clients = 7
            fleet_lease_ttl = "1m"
            fleet_timeout = "250ms"
            fleet_fail_mode = "closed"
            fleet_instance_id = "pod-a"
            "#,
        )?;
        let f = load_in_jail(Some("w.toml")).expect("valid").fleet;
        let f = f.expect("on");
        assert_eq!(f.redis_url.as_str(), "unix:///run/redis.sock?pass=s3cret");
        assert_eq!(
            (f.namespace.as_str(), f.max_clients, f.instance_id.as_str()),
            ("chat-eu.1", 7, "pod-a")
        );
        assert_eq!(
            (f.lease_ttl, f.timeout, f.fail_mode),
            (
                Duration::from_secs(60),
                Duration::from_millis(250),
                FailMode::Closed
            )
        );
        jail.set_env("WSGATE_FLEET_REDIS_URL", "rediss://redis:6380");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "9");
        let f = load_in_jail(Some("w.toml")).expect("valid").fleet;
        let f = f.expect("on");
        assert_eq!(f.redis_url.as_str(), "rediss://redis:6380");
        assert_eq!(f.max_clients, 9);
        Ok(())
    });
}

#[test]
fn fleet_keys_are_refused_past_their_edges() {
    assert_rejected(
        "WSGATE_FLEET_REDIS_URL",
        "http://redis:6379",
        "fleet_redis_url",
    );
    assert_rejected("WSGATE_FLEET_REDIS_URL", "redis://", "fleet_redis_url");
    assert_rejected("WSGATE_FLEET_NAMESPACE", "a b", "fleet_namespace");
    assert_rejected("WSGATE_FLEET_NAMESPACE", "{chat}", "fleet_namespace");
    assert_rejected("WSGATE_FLEET_NAMESPACE", "chat:eu", "fleet_namespace");
    assert_rejected("WSGATE_FLEET_NAMESPACE", &"n".repeat(65), "fleet_namespace");
    assert_rejected("WSGATE_FLEET_MAX_CLIENTS", "-1", "fleet_max_clients");
    assert_rejected(
        "WSGATE_FLEET_MAX_CLIENTS",
        "4294967296",
        "fleet_max_clients",
    );
    assert_rejected("WSGATE_FLEET_MAX_CLIENTS", "lots", "fleet_max_clients");
    assert_rejected("WSGATE_FLEET_LEASE_TTL", "2999ms", "fleet_lease_ttl");
    assert_rejected("WSGATE_FLEET_LEASE_TTL", "3601", "fleet_lease_ttl");
    assert_rejected("WSGATE_FLEET_TIMEOUT", "0s", "fleet_timeout");
    assert_rejected("WSGATE_FLEET_FAIL_MODE", "maybe", "fleet_fail_mode");
    assert_rejected("WSGATE_FLEET_INSTANCE_ID", "pod a", "fleet_instance_id");
    assert_rejected(
        "WSGATE_FLEET_INSTANCE_ID",
        &"i".repeat(129),
        "fleet_instance_id",
    );
}

#[test]
fn fleet_keys_are_accepted_at_their_edges() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://127.0.0.1:6379");
        jail.set_env("WSGATE_FLEET_NAMESPACE", "n".repeat(64));
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "4294967295");
        jail.set_env("WSGATE_FLEET_LEASE_TTL", "3s");
        jail.set_env("WSGATE_FLEET_TIMEOUT", "999ms");
        jail.set_env("WSGATE_FLEET_INSTANCE_ID", "!".repeat(128));
        let f = load_in_jail(None).expect("valid").fleet.expect("on");
        assert_eq!(
            (f.max_clients, f.lease_ttl, f.timeout),
            (u32::MAX, Duration::from_secs(3), Duration::from_millis(999))
        );
        assert_eq!((f.namespace.len(), f.instance_id.len()), (64, 128));
        jail.set_env("WSGATE_FLEET_LEASE_TTL", "1h");
        jail.set_env("WSGATE_FLEET_TIMEOUT", "19m 59s");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "0");
        jail.set_env("WSGATE_FLEET_NAMESPACE", "a");
        jail.set_env("WSGATE_FLEET_INSTANCE_ID", "a");
        let f = load_in_jail(None).expect("valid").fleet.expect("on");
        assert_eq!(f.lease_ttl, Duration::from_secs(3600));
        Ok(())
    });
}

#[test]
fn fleet_timeout_must_stay_below_a_third_of_the_lease() {
    for (ttl, timeout) in [("3s", "1s"), ("30s", "10s"), ("1h", "20m")] {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
            jail.set_env("WSGATE_FLEET_LEASE_TTL", ttl);
            jail.set_env("WSGATE_FLEET_TIMEOUT", timeout);
            let e = load_in_jail(None).expect_err(timeout).to_string();
            assert!(
                e.contains(&format!("fleet_timeout = {timeout}"))
                    && e.contains(&format!("fleet_lease_ttl {ttl}"))
                    && e.contains("expected"),
                "{e}"
            );
            Ok(())
        });
    }
}

#[test]
fn fleet_max_clients_needs_a_redis_url() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "0");
        assert_eq!(load_in_jail(None).expect("0 is off").fleet, None);
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "5");
        let e = load_in_jail(None).expect_err("no URL").to_string();
        assert!(
            e.contains("fleet_max_clients = 5") && e.contains("needs fleet_redis_url"),
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn a_redis_url_that_counts_nothing_is_a_warning() {
    const RULE: &str =
        "[[key_limits]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nmax_per_key = 2\n";
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://redis:6379");
        jail.create_file("local.toml", RULE)?;
        jail.create_file("fleet.toml", &format!("{RULE}fleet = true\n"))?;
        let c = load_in_jail(Some("local.toml")).expect("valid");
        assert_eq!(
            c.warnings,
            [
                "fleet_redis_url is set but nothing uses it: set fleet_max_clients, fleet = true \
              on a key rule, or rebalance = true"
            ]
        );
        assert!(c.fleet.is_some());
        let c = load_in_jail(Some("fleet.toml")).expect("valid");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(c.key_limits[0].fleet);
        jail.set_env("WSGATE_REBALANCE", "true");
        let c = load_in_jail(Some("local.toml")).expect("valid");
        assert!(
            c.warnings.is_empty(),
            "rebalancing uses it: {:?}",
            c.warnings
        );
        jail.set_env("WSGATE_REBALANCE", "false");
        jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "1");
        let c = load_in_jail(Some("local.toml")).expect("valid");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        Ok(())
    });
}

#[test]
fn a_fleet_key_rule_needs_a_redis_url() {
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        jail.create_file(
            "w.toml",
            "[[key_limits]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nmax_per_key = 2\nfleet = true\n",
        )?;
        let e = load_in_jail(Some("w.toml"))
            .expect_err("no URL")
            .to_string();
        assert!(
            e.contains("key_limits[tenant].fleet = true") && e.contains("fleet_redis_url"),
            "{e}"
        );
        jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://redis:6379");
        let c = load_in_jail(Some("w.toml")).expect("valid with a URL");
        assert!(c.key_limits[0].fleet);
        Ok(())
    });
}

/// The Redis password never leaves `RedisUrl::as_str`: not in errors (from
/// figment or from a configuration built in code), `Debug` or `check-config`.
#[test]
fn the_redis_password_is_never_shown() {
    const SECRET: &str = "s3cret-Pa55";
    Jail::expect_with(|jail| {
        jail.set_env("WSGATE_UPSTREAM", "127.0.0.1:3000");
        for bad in [
            format!("redis://app:{SECRET}@0.0.0.0:6379"),
            format!("redis://:{SECRET}@redis:6379/db"),
            format!("rediss://:{SECRET}@redis/#insecure"),
            format!("redis://:{SECRET}/x@redis"),
            format!("unix://relative.sock?pass={SECRET}"),
        ] {
            jail.set_env("WSGATE_FLEET_REDIS_URL", &bad);
            let e = load_in_jail(None).expect_err(&bad);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(
                shown.contains("fleet_redis_url = \"")
                    && shown.contains("***")
                    && shown.contains("WSGATE_FLEET_REDIS_URL"),
                "{shown}"
            );
            let raw = RawConfig {
                upstream: Some("app:3000".into()),
                fleet_redis_url: bad.clone(),
                ..RawConfig::default()
            };
            let e = Config::validate(raw).expect_err(&bad);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(SECRET) && shown.contains("***"), "{shown}");
        }
        for good in [
            format!("redis://app:{SECRET}@redis:6379/0"),
            format!("unix:///run/redis.sock?db=1&pass={SECRET}"),
        ] {
            jail.set_env("WSGATE_FLEET_REDIS_URL", &good);
            jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "10");
            let c = load_in_jail(None).expect(&good);
            let f = c.fleet.as_ref().expect("on");
            assert_eq!(f.redis_url.as_str(), good, "the client gets it whole");
            for shown in [format!("{c:?}"), format!("{f:?}"), c.to_toml()] {
                assert!(!shown.contains(SECRET) && shown.contains("***"), "{shown}");
            }
            // A later error about another key does not show the URL either.
            jail.set_env("WSGATE_FLEET_TIMEOUT", "20s");
            let e = load_in_jail(None).expect_err("timeout");
            assert!(!format!("{e} {e:?}").contains(SECRET), "{e}");
            jail.set_env("WSGATE_FLEET_TIMEOUT", "100ms");
        }
        Ok(())
    });
}

/// The defaults with `edit` applied: the configuration the unit tests of
/// each group of keys (`guards.rs`, `handshake.rs`, …) start from.
pub(super) fn raw_with(edit: impl FnOnce(&mut RawConfig)) -> RawConfig {
    let mut r = RawConfig::default();
    edit(&mut r);
    r
}
