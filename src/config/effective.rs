//! The effective configuration as TOML, for `wsgate check-config`.
//!
//! [`Config`] is serialised through the `toml` crate, so a new key is
//! printed without code here. The helpers below give the few typed fields
//! whose form differs from what is written their written form again:
//! durations in humantime (`1m 30s`), "off" as `0s` or `0`, the upstream as
//! `host:port` or `unix:/path`. The output is itself a configuration file
//! that loads to the same values (tested below), every key with the value
//! wsgate uses, but for one: a password in `fleet_redis_url` is printed as
//! `***`.

use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};

use serde::Serialize;

use super::{fleet, Config, FleetSettings, RateLimit, Upstream, Watermarks};

impl Config {
    /// The effective configuration as a TOML document: every key, with the
    /// value wsgate uses (defaults, file and environment applied; a negative
    /// cap shown as 0, an unset low watermark and burst as computed).
    pub fn to_toml(&self) -> String {
        toml::to_string(self)
            .expect("invariant: every field serialises to a TOML string, integer, float or bool")
    }
}

/// A duration as configuration writes it.
pub(super) fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// A duration that `None` turns off, written `0s` when off.
pub(super) fn off_or_duration<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    duration(&d.unwrap_or_default(), s)
}

/// A duration inside a map a group of keys writes itself (`None` = off,
/// written `0s`).
pub(super) struct Shown(pub(super) Option<Duration>);

impl Serialize for Shown {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        off_or_duration(&self.0, s)
    }
}

/// Whole seconds, as a duration.
pub(super) fn seconds<S: Serializer>(secs: &u64, s: S) -> Result<S::Ok, S::Error> {
    duration(&Duration::from_secs(*secs), s)
}

/// The upstream as `host:port`, or `unix:/path`.
pub(super) fn upstream<S: Serializer>(u: &Upstream, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&u.shown())
}

/// `ready_high_watermark` and `ready_low_watermark`; both 0 when off.
pub(super) fn watermarks<S: Serializer>(w: &Option<Watermarks>, s: S) -> Result<S::Ok, S::Error> {
    let (high, low) = w.map_or((0.0, 0.0), |w| (w.high, w.low));
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("ready_high_watermark", &high)?;
    map.serialize_entry("ready_low_watermark", &low)?;
    map.end()
}

/// The seven `fleet_*` keys; while fleet limits are off, an empty
/// `fleet_redis_url` and the defaults of the rest.
pub(super) fn fleet<S: Serializer>(f: &Option<FleetSettings>, s: S) -> Result<S::Ok, S::Error> {
    match f {
        Some(f) => f.serialize(s),
        None => fleet::shown_when_off().serialize(s),
    }
}

/// `admission_rate` and `admission_burst` (the bucket in use, a whole
/// number as the key takes it); both 0 when off.
pub(super) fn admission_rate<S: Serializer>(
    r: &Option<RateLimit>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let (rate, burst) = r.map_or((0.0, 0), |r| (r.per_second, r.burst as u64));
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("admission_rate", &rate)?;
    map.serialize_entry("admission_burst", &burst)?;
    map.end()
}

#[cfg(test)]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures return figment::Error"
)]
mod tests {
    use super::super::RawConfig;
    use super::*;
    use figment::Jail;

    /// The key names of a TOML document, in order.
    fn keys(toml_text: &str) -> Vec<String> {
        toml_text
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_owned()))
            .collect()
    }

    #[test]
    fn every_key_is_printed_in_order() {
        let raw = RawConfig {
            upstream: Some("app:3000".into()),
            ready_low_watermark: Some(0.5),
            ..RawConfig::default()
        };
        let written = toml::to_string(&raw).expect("serialise");
        let config = Config::validate(raw).expect("valid");
        assert_eq!(keys(&config.to_toml()), keys(&written));
        assert_eq!(keys(&written).len(), 64, "{written}");
    }

    /// Key rules print as `[[key_limits]]` tables that load to the same rules.
    #[test]
    fn key_rules_print_and_load_to_themselves() {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", "app:3000");
            jail.create_file(
                "rules.toml",
                r#"
                [[key_limits]]
                name = "tenant"
                key = "header:X-Tenant"
                max_per_key = 2
                [key_limits.overrides]
                "big\"one\\" = 10
                internal = 0

                [[key_limits]]
                name = "room"
                key = "path_segment:2"
                max_per_key = 50
                path_prefix = "/rooms/"
                missing = "reject"
                status = 503
                max_keys = 10
                "#,
            )?;
            let printed = Config::load(Some("rules.toml".as_ref()))
                .expect("valid")
                .to_toml();
            assert!(printed.contains("key = \"header:x-tenant\""), "{printed}");
            assert!(printed.contains("missing = \"reject\""), "{printed}");
            jail.create_file("printed.toml", &printed)?;
            let again = Config::load(Some("printed.toml".as_ref())).expect("loads");
            assert_eq!(again.to_toml(), printed);
            assert_eq!(again.key_limits.len(), 2);
            assert_eq!(again.key_limits[0].limit_for("big\"one\\"), 10);
            Ok(())
        });
    }

    /// With fleet limits on, the seven keys print as set and load to
    /// themselves; a password in the URL prints as `***`.
    #[test]
    fn fleet_keys_print_and_load_to_themselves_with_the_password_hidden() {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", "app:3000");
            jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://redis:6379/1");
            jail.set_env("WSGATE_FLEET_MAX_CLIENTS", "100");
            jail.set_env("WSGATE_FLEET_LEASE_TTL", "90s");
            jail.set_env("WSGATE_FLEET_FAIL_MODE", "closed");
            jail.set_env("WSGATE_FLEET_INSTANCE_ID", "pod-a");
            let printed = Config::load(None).expect("valid").to_toml();
            for line in [
                "fleet_redis_url = \"redis://redis:6379/1\"\n",
                "fleet_namespace = \"wsgate\"\n",
                "fleet_max_clients = 100\n",
                "fleet_lease_ttl = \"1m 30s\"\n",
                "fleet_timeout = \"100ms\"\n",
                "fleet_fail_mode = \"closed\"\n",
                "fleet_instance_id = \"pod-a\"\n",
            ] {
                assert!(printed.contains(line), "{line}: {printed}");
            }
            jail.clear_env();
            jail.create_file("printed.toml", &printed)?;
            let again = Config::load(Some("printed.toml".as_ref())).expect("loads");
            assert_eq!(again.to_toml(), printed);
            jail.set_env("WSGATE_FLEET_REDIS_URL", "redis://app:s3cret@redis:6379/1");
            let printed = Config::load(Some("printed.toml".as_ref()))
                .expect("valid")
                .to_toml();
            assert!(
                printed.contains("fleet_redis_url = \"redis://app:***@redis:6379/1\"\n")
                    && !printed.contains("s3cret"),
                "{printed}"
            );
            Ok(())
        });
    }

    /// docs/operations.md#unix-socket-upstream: `check-config` prints a Unix upstream as it was given.
    #[test]
    fn a_unix_upstream_prints_as_given_and_loads_to_itself() {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", "unix:/run/app/ws.sock");
            let printed = Config::load(None).expect("valid").to_toml();
            assert!(
                printed.contains("upstream = \"unix:/run/app/ws.sock\"\n"),
                "{printed}"
            );
            jail.clear_env();
            jail.create_file("printed.toml", &printed)?;
            let again = Config::load(Some("printed.toml".as_ref())).expect("loads");
            assert_eq!(again.to_toml(), printed);
            Ok(())
        });
    }

    #[test]
    fn printed_configuration_loads_to_itself() {
        Jail::expect_with(|jail| {
            jail.set_env("WSGATE_UPSTREAM", "http://app:3000/");
            jail.set_env("WS_MAX_CLIENTS", "-5");
            jail.set_env("WSGATE_RETRY_AFTER", "1500ms");
            jail.set_env("WSGATE_IDLE_TIMEOUT", "90s");
            jail.set_env("WSGATE_READY_HIGH_WATERMARK", "0.95");
            jail.set_env("WSGATE_ADMISSION_RATE", "2.5");
            jail.set_env("WSGATE_CLOSE_CODE_IDLE", "4000");
            let printed = Config::load(None).expect("valid").to_toml();
            assert!(printed.contains("upstream = \"app:3000\""), "{printed}");
            assert!(printed.contains("max_clients = 0\n"), "{printed}");
            assert!(printed.contains("retry_after = \"2s\""), "{printed}");
            assert!(printed.contains("idle_timeout = \"1m 30s\""), "{printed}");
            assert!(printed.contains("admission_burst = 3\n"), "{printed}");
            assert!(printed.contains("tcp_keepalive = \"30s\""), "{printed}");
            assert!(
                printed.contains("max_connection_lifetime = \"0s\""),
                "{printed}"
            );
            jail.clear_env();
            jail.create_file("printed.toml", &printed)?;
            let again = Config::load(Some("printed.toml".as_ref()))
                .expect("the printed configuration is a valid file")
                .to_toml();
            assert_eq!(again, printed);
            Ok(())
        });
    }
}
