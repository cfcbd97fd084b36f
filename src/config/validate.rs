//! [`Config::validate`]: turning what was written into the typed configuration.
//!
//! One line per key, each through its kind's check (the same check that
//! already ran while the file and environment were read, repeated here for a
//! [`RawConfig`] built in code: the demo, tests, reloads), then the rules
//! that span several keys, together in [`rules_across_keys`] so they can be
//! read at once.

use std::time::Duration;

use super::duration::{AnyDuration, Keepalive, OffOrDuration, PositiveDuration};
use super::log_level::LogLevel;
use super::values::{
    Cap, CloseCode, Fraction, ListenAddress, NonNegative, PlainRequests, TrueOrFalse, ValueKind,
    WholeNumber, Workers,
};
use super::{fleet, guards, handshake, key_limits, rebalance, signals};
use super::{
    CloseSettings, Config, ConfigError, LogFormat, RateLimit, RawConfig, Upstream, Watermarks,
    ENV_PREFIX,
};

/// How far below `ready_high_watermark` readiness returns when
/// `ready_low_watermark` is not set (docs/operations.md#rollouts).
const DEFAULT_HYSTERESIS: f64 = 0.1;

impl Config {
    /// Turns what was written into the typed configuration.
    ///
    /// # Errors
    /// The first key whose value is not acceptable.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut warnings = Vec::new();
        if raw.max_clients < 0 {
            warnings.push(format!(
                "max_clients = {} is negative: taken as 0 (unlimited)",
                raw.max_clients
            ));
        }
        let Some(upstream) = raw.upstream.as_ref() else {
            return Err(ConfigError::Invalid {
                key: "upstream".into(),
                value: "(not set)".into(),
                source_hint: format!(" (set it in the config file or {ENV_PREFIX}UPSTREAM)"),
                expected: Upstream::EXPECTED.into(),
            });
        };
        let jwt = key_limits::jwt(
            raw.jwt_jwks_file.as_deref(),
            raw.jwt_issuer.as_deref(),
            raw.jwt_audience.as_deref(),
        )?;
        let fleet = fleet::settings(&raw)?;
        let fleet_on = fleet.is_some();
        let mut config = Config {
            listen: ListenAddress::value("listen", &raw.listen)?,
            upstream: Upstream::value("upstream", upstream)?,
            admin_listen: ListenAddress::value("admin_listen", &raw.admin_listen)?,
            max_clients: Cap::value("max_clients", &raw.max_clients)?,
            retry_after_secs: whole_seconds(AnyDuration::value("retry_after", &raw.retry_after)?),
            upstream_connect_timeout: PositiveDuration::value(
                "upstream_connect_timeout",
                &raw.upstream_connect_timeout,
            )?,
            header_read_timeout: PositiveDuration::value(
                "header_read_timeout",
                &raw.header_read_timeout,
            )?,
            half_close_timeout: PositiveDuration::value(
                "half_close_timeout",
                &raw.half_close_timeout,
            )?,
            idle_timeout: OffOrDuration::value("idle_timeout", &raw.idle_timeout)?,
            tcp_keepalive: Keepalive::value("tcp_keepalive", &raw.tcp_keepalive)?,
            shutdown_grace: AnyDuration::value("shutdown_grace", &raw.shutdown_grace)?,
            log_format: LogFormat::value("log_format", &raw.log_format)?,
            log_level: LogLevel::value("log_level", &raw.log_level)?,
            access_log: TrueOrFalse::value("access_log", &raw.access_log)?,
            workers: Workers::value("workers", &raw.workers)?,
            watermarks: watermarks(
                Fraction::value("ready_high_watermark", &raw.ready_high_watermark)?,
                raw.ready_low_watermark
                    .map(|low| Fraction::value("ready_low_watermark", &low))
                    .transpose()?,
            ),
            shutdown_delay: AnyDuration::value("shutdown_delay", &raw.shutdown_delay)?,
            drain_period: AnyDuration::value("drain_period", &raw.drain_period)?,
            admission_rate: RateLimit::of(
                NonNegative::value("admission_rate", &raw.admission_rate)?,
                WholeNumber::value("admission_burst", &raw.admission_burst)?,
            ),
            max_clients_per_ip: WholeNumber::value("max_clients_per_ip", &raw.max_clients_per_ip)?,
            max_plain_requests: PlainRequests::value(
                "max_plain_requests",
                &raw.max_plain_requests,
            )?,
            trusted_hops: WholeNumber::value("trusted_hops", &raw.trusted_hops)?,
            enforce: TrueOrFalse::value("enforce", &raw.enforce)?,
            max_connection_lifetime: OffOrDuration::value(
                "max_connection_lifetime",
                &raw.max_connection_lifetime,
            )?,
            lifetime_jitter: Fraction::value("lifetime_jitter", &raw.lifetime_jitter)?,
            close: CloseSettings {
                drain: CloseCode::value("close_code_drain", &raw.close_code_drain)?,
                lifetime: CloseCode::value("close_code_lifetime", &raw.close_code_lifetime)?,
                idle: CloseCode::value("close_code_idle", &raw.close_code_idle)?,
                rebalance: CloseCode::value("close_code_rebalance", &raw.close_code_rebalance)?,
                timeout: PositiveDuration::value("close_timeout", &raw.close_timeout)?,
            },
            admin_token_file: key_limits::admin_token_file(raw.admin_token_file.as_deref())?,
            jwt: jwt.clone(),
            jwt_require_exp: TrueOrFalse::value("jwt_require_exp", &raw.jwt_require_exp)?,
            jwt_from: key_limits::token_source(
                &raw.jwt_from,
                handshake::token_prefix(&raw.jwt_subprotocol_prefix)?,
            )?,
            handshake: handshake::policy(&raw)?,
            signals: signals::settings(&raw)?,
            rebalance: rebalance::settings(&raw, fleet_on)?,
            fleet,
            message_guards: guards::settings(&raw)?,
            key_limits: key_limits::rules(&raw.key_limits, jwt.as_ref(), fleet_on)?,
            warnings,
        };
        rules_across_keys(&config)?;
        if let Some(unused) = fleet_counts_nothing(&config) {
            config.warnings.push(unused);
        }
        Ok(config)
    }
}

/// The rules that tie keys together; each names the key to change.
fn rules_across_keys(c: &Config) -> Result<(), ConfigError> {
    // An upstream on wsgate's own port would send every request round
    // again, each time with one more connection open.
    for (key, addr) in [("listen", c.listen), ("admin_listen", c.admin_listen)] {
        if c.upstream.reaches(addr) {
            return Err(ConfigError::Invalid {
                key: "upstream".into(),
                value: format!("{:?}", c.upstream.shown()),
                source_hint: format!(
                    " (the same port as {key} = {addr}: wsgate would forward requests to itself)"
                ),
                expected: "the address of the service behind wsgate, \
                           not one of wsgate's own listen or admin_listen"
                    .into(),
            });
        }
    }
    // Hysteresis needs a gap: readiness returns below where it left.
    if let Some(Watermarks { high, low }) = c.watermarks {
        if low >= high {
            return Err(ConfigError::invalid(
                "ready_low_watermark",
                low.to_string(),
                format!("a fraction below ready_high_watermark ({high})"),
            ));
        }
    }
    // The drain must end before the grace does (docs/operations.md#rollouts).
    if c.shutdown_delay + c.drain_period > c.shutdown_grace {
        return Err(ConfigError::Invalid {
            key: "drain_period".into(),
            value: humantime(c.drain_period),
            source_hint: format!(
                " (shutdown_delay {} + drain_period > shutdown_grace {})",
                humantime(c.shutdown_delay),
                humantime(c.shutdown_grace)
            ),
            expected: "shutdown_delay + drain_period <= shutdown_grace".into(),
        });
    }
    Ok(())
}

/// A warning when a Redis is set but nothing uses it (no fleet limit, no rebalancing): not an
/// error, since a fleet may add its limits in a later reload.
fn fleet_counts_nothing(c: &Config) -> Option<String> {
    let fleet = c.fleet.as_ref()?;
    let counts = fleet.max_clients > 0 || c.key_limits.iter().any(|r| r.fleet);
    (!counts && !c.rebalance.enabled).then(|| {
        "fleet_redis_url is set but nothing uses it: set fleet_max_clients, fleet = true on a \
         key rule, or rebalance = true"
            .to_owned()
    })
}

/// Readiness watermarks: off while `high` is 0; an unset `low` is
/// [`DEFAULT_HYSTERESIS`] below `high`.
fn watermarks(high: f64, low: Option<f64>) -> Option<Watermarks> {
    (high > 0.0).then(|| Watermarks {
        high,
        low: low.unwrap_or((high - DEFAULT_HYSTERESIS).max(0.0)),
    })
}

/// `Retry-After` carries whole seconds: rounded up, at least 1 (docs/configuration.md).
fn whole_seconds(d: Duration) -> u64 {
    let part = u64::from(d.subsec_nanos() > 0);
    (d.as_secs() + part).max(1)
}

/// A duration as messages show it (`1m 30s`).
fn humantime(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigDuration;

    /// A configuration built in code (the demo, tests) gets the same checks
    /// as one read from a file.
    #[test]
    fn values_built_in_code_are_checked_too() {
        let ok = RawConfig {
            upstream: Some("app:3000".into()),
            ..RawConfig::default()
        };
        Config::validate(ok.clone()).expect("valid");
        let cases = [
            (
                RawConfig {
                    listen: "nowhere".into(),
                    ..ok.clone()
                },
                "listen",
                "\"nowhere\"",
            ),
            (
                RawConfig {
                    upstream: Some("https://app:443".into()),
                    ..ok.clone()
                },
                "upstream",
                "\"https://app:443\"",
            ),
            (
                RawConfig {
                    lifetime_jitter: 2.0,
                    ..ok.clone()
                },
                "lifetime_jitter",
                "2",
            ),
            (
                RawConfig {
                    admission_burst: -1,
                    ..ok.clone()
                },
                "admission_burst",
                "-1",
            ),
            (
                RawConfig {
                    max_plain_requests: -1,
                    ..ok.clone()
                },
                "max_plain_requests",
                "-1",
            ),
            (
                RawConfig {
                    max_plain_requests: 1_048_577,
                    ..ok.clone()
                },
                "max_plain_requests",
                "1048577",
            ),
            (
                RawConfig {
                    close_code_idle: 1005,
                    ..ok.clone()
                },
                "close_code_idle",
                "1005",
            ),
            (
                RawConfig {
                    tcp_keepalive: ConfigDuration(Duration::from_millis(500)),
                    ..ok.clone()
                },
                "tcp_keepalive",
                "500ms",
            ),
            (
                RawConfig {
                    close_timeout: ConfigDuration(Duration::ZERO),
                    ..ok.clone()
                },
                "close_timeout",
                "0s",
            ),
            (
                RawConfig {
                    idle_timeout: ConfigDuration(Duration::from_secs(u64::MAX)),
                    ..ok
                },
                "idle_timeout",
                "years",
            ),
        ];
        for (raw, key, value) in cases {
            let e = Config::validate(raw).expect_err(key).to_string();
            assert!(
                e.contains(&format!("{key} = ")) && e.contains(value) && e.contains("expected"),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        for (written, secs) in [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3)] {
            assert_eq!(
                whole_seconds(Duration::from_millis(written)),
                secs,
                "{written}ms"
            );
        }
    }
}
