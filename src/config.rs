//! Configuration: the figment provider stack, parsing and validation.
//!
//! Precedence, lowest first (SPEC §2): built-in defaults < TOML file
//! (`--config` / `WSGATE_CONFIG`) < `WS_MAX_CLIENTS` (compatibility alias) <
//! `WSGATE_*` environment variables. Loading is pure apart from reading the
//! file, so it is tested with `figment::Jail` and never touches the real
//! process environment.
//!
//! Every invalid value becomes a [`ConfigError`] that names the key, the value
//! and what is accepted; `main` prints it and exits with code 2 before any
//! port is bound.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Environment variable prefix for every key.
pub const ENV_PREFIX: &str = "WSGATE_";
/// The original Go hub's variable, honoured when `WSGATE_MAX_CLIENTS` is not set.
pub const LEGACY_MAX_CLIENTS_ENV: &str = "WS_MAX_CLIENTS";

/// Each key, and what it accepts (used in error messages and `check-config`).
const ACCEPTED: &[(&str, &str)] = &[
    (
        "listen",
        "an IP socket address such as 0.0.0.0:8080 or [::]:8080",
    ),
    ("upstream", "host:port or http://host:port"),
    ("admin_listen", "an IP socket address such as 0.0.0.0:9090"),
    (
        "max_clients",
        "a whole number (0 = unlimited; negative is taken as 0)",
    ),
    ("retry_after", DURATION),
    ("upstream_connect_timeout", POSITIVE_DURATION),
    ("header_read_timeout", POSITIVE_DURATION),
    ("half_close_timeout", POSITIVE_DURATION),
    ("idle_timeout", DURATION),
    (
        "tcp_keepalive",
        "0s (off) or whole seconds from 1s to 32767s (the kernel's range for keepalive)",
    ),
    ("shutdown_grace", DURATION),
    ("log_format", "text or json"),
    ("ready_high_watermark", "a fraction from 0 to 1 (0 = off)"),
    (
        "ready_low_watermark",
        "a fraction from 0 to 1, below ready_high_watermark",
    ),
    ("shutdown_delay", DURATION),
    ("drain_period", DURATION),
    (
        "admission_rate",
        "admissions per second, a number >= 0 (0 = off)",
    ),
    (
        "admission_burst",
        "a whole number >= 0 (0 = same as admission_rate)",
    ),
    ("max_clients_per_ip", "a whole number >= 0 (0 = off)"),
    (
        "trusted_hops",
        "a whole number >= 0 (0 = the socket peer is the client)",
    ),
    ("enforce", "true or false"),
    ("max_connection_lifetime", DURATION),
    ("lifetime_jitter", "a fraction from 0 to 1"),
    ("close_code_drain", CLOSE_CODE),
    ("close_code_lifetime", CLOSE_CODE),
    ("close_code_idle", CLOSE_CODE),
    ("close_timeout", POSITIVE_DURATION),
];
const CLOSE_CODE: &str = "a WebSocket close code: 1000-1014 except 1004-1006, or 3000-4999";
const DURATION: &str =
    "a duration such as 250ms, 5s or 2m (a bare integer means seconds), at most 10 years";
/// Durations are added to instants (deadlines); past this they could
/// overflow and panic, and no timeout here needs more.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const POSITIVE_DURATION: &str =
    "a duration greater than zero such as 250ms, 5s or 2m (a bare integer means seconds)";

fn accepted(key: &str) -> &'static str {
    ACCEPTED
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("a known configuration key", |(_, a)| *a)
}

/// A configuration value that is not acceptable, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value outside what it accepts.
    #[error("invalid configuration: {key} = {value}{source_hint}: expected {expected}")]
    Invalid {
        /// The configuration key.
        key: String,
        /// The offending value, as the user wrote it.
        value: String,
        /// Where the value came from (file, environment variable), if known.
        source_hint: String,
        /// What the key accepts.
        expected: String,
    },
    /// A key that wsgate does not know.
    #[error("invalid configuration: unknown key {key}{source_hint}: accepted keys are {known}")]
    UnknownKey {
        /// The unknown key.
        key: String,
        /// Where it came from.
        source_hint: String,
        /// The keys that exist.
        known: String,
    },
    /// The configuration file named on the command line cannot be read.
    #[error("invalid configuration: config file {path}: {reason}")]
    File {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, value: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            value: value.to_string(),
            source_hint: String::new(),
            expected: accepted(key).to_owned(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration as written in configuration: humantime text or whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                bounded(Duration::from_secs(v))
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .ok()
                    .and_then(|s| bounded(Duration::from_secs(s)))
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let t = v.trim();
                let parsed = match t.parse::<u64>() {
                    Ok(secs) => Some(Duration::from_secs(secs)),
                    Err(_) => humantime::parse_duration(t).ok(),
                };
                parsed
                    .and_then(bounded)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn bounded(d: Duration) -> Option<ConfigDuration> {
    (d <= MAX_DURATION).then_some(ConfigDuration(d))
}

/// The configuration as written: what figment deserialises before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Client-facing address.
    pub listen: String,
    /// `host:port` or `http://host:port` of the upstream; required.
    pub upstream: Option<String>,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: String,
    /// Cap on concurrent WebSocket connections; 0 = unlimited, negative = 0.
    pub max_clients: i64,
    /// `Retry-After` on every 503.
    pub retry_after: ConfigDuration,
    /// Connect + handshake response deadline for the upstream.
    pub upstream_connect_timeout: ConfigDuration,
    /// Deadline for a client's full request head.
    pub header_read_timeout: ConfigDuration,
    /// How long the other side may keep sending after one side closed.
    pub half_close_timeout: ConfigDuration,
    /// Close a spliced connection idle this long; 0 = off.
    pub idle_timeout: ConfigDuration,
    /// TCP keepalive idle time and `TCP_USER_TIMEOUT`; 0 = off.
    pub tcp_keepalive: ConfigDuration,
    /// How long connections may run after SIGTERM/SIGINT.
    pub shutdown_grace: ConfigDuration,
    /// `text` or `json`.
    pub log_format: String,
    /// Readiness turns 503 once active ≥ this fraction of the cap; 0 = off.
    pub ready_high_watermark: f64,
    /// … and 200 again once active ≤ this fraction; unset = high − 0.1.
    pub ready_low_watermark: Option<f64>,
    /// After SIGTERM, keep admitting this long (readiness already 503).
    pub shutdown_delay: ConfigDuration,
    /// Close remaining connections evenly over this period after the delay.
    pub drain_period: ConfigDuration,
    /// Admissions per second (token bucket); 0 = off.
    pub admission_rate: f64,
    /// Bucket size; 0 = same as the rate.
    pub admission_burst: i64,
    /// Concurrent WebSocket connections per client address; 0 = off.
    pub max_clients_per_ip: i64,
    /// How many proxies in front are trusted to append `X-Forwarded-For`.
    pub trusted_hops: i64,
    /// false = dry run: admit everything, count what would be refused.
    pub enforce: bool,
    /// Close a connection at a deadline drawn from
    /// [lifetime × (1 − jitter), lifetime]; 0 = off.
    pub max_connection_lifetime: ConfigDuration,
    /// Fraction of the lifetime over which deadlines are spread.
    pub lifetime_jitter: f64,
    /// Close status when draining or at the end of the grace.
    pub close_code_drain: i64,
    /// Close status when `max_connection_lifetime` expires.
    pub close_code_lifetime: i64,
    /// Close status when `idle_timeout` expires.
    pub close_code_idle: i64,
    /// How long to wait for the peers' Close replies before closing TCP.
    pub close_timeout: ConfigDuration,
}

impl Default for RawConfig {
    fn default() -> Self {
        let secs = |s| ConfigDuration(Duration::from_secs(s));
        RawConfig {
            listen: "0.0.0.0:8080".into(),
            upstream: None,
            admin_listen: "0.0.0.0:9090".into(),
            max_clients: 0,
            retry_after: secs(1),
            upstream_connect_timeout: secs(5),
            header_read_timeout: secs(10),
            half_close_timeout: secs(5),
            idle_timeout: secs(0),
            tcp_keepalive: secs(30),
            shutdown_grace: secs(25),
            log_format: "text".into(),
            ready_high_watermark: 0.0,
            ready_low_watermark: None,
            shutdown_delay: secs(0),
            drain_period: secs(0),
            admission_rate: 0.0,
            admission_burst: 0,
            max_clients_per_ip: 0,
            trusted_hops: 0,
            enforce: true,
            max_connection_lifetime: secs(0),
            lifetime_jitter: 0.5,
            close_code_drain: 1001,
            close_code_lifetime: 1001,
            close_code_idle: 1001,
            close_timeout: secs(2),
        }
    }
}

/// Where the upstream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `host:port` as it goes into URIs and `Host` headers (IPv6 bracketed).
    pub authority: String,
}

impl Upstream {
    /// Parses `host:port` or `http://host:port` (a trailing `/` is allowed).
    ///
    /// # Errors
    /// Returns a message saying what is wrong when the text is not of that form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let rest = if let Some(r) = t.strip_prefix("http://") {
            r
        } else if t.contains("://") {
            return Err("only http:// is supported".into());
        } else {
            t
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err("expected host:port".into());
        }
        let uri: http::uri::Authority = rest.parse().map_err(|_| "expected host:port")?;
        let port = uri.port_u16().ok_or("a port is required")?;
        let host = uri.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err("expected host:port with a non-zero port".into());
        }
        Ok(Upstream {
            host: host.to_owned(),
            port,
            authority: uri.as_str().to_owned(),
        })
    }
}

/// The validated configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// The upstream service.
    pub upstream: Upstream,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Cap on concurrent WebSocket connections; 0 = unlimited.
    pub max_clients: usize,
    /// `Retry-After` value in whole seconds (at least 1).
    pub retry_after_secs: u64,
    /// Connect + handshake deadline.
    pub upstream_connect_timeout: Duration,
    /// Request head deadline.
    pub header_read_timeout: Duration,
    /// Half-close allowance.
    pub half_close_timeout: Duration,
    /// Idle cut-off; `None` = off.
    pub idle_timeout: Option<Duration>,
    /// Keepalive / user timeout; `None` = off.
    pub tcp_keepalive: Option<Duration>,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Readiness hysteresis on saturation (SPEC §7).
    pub watermarks: Option<Watermarks>,
    /// Admissions continue this long after SIGTERM.
    pub shutdown_delay: Duration,
    /// Remaining connections are closed evenly over this period.
    pub drain_period: Duration,
    /// Token bucket for admissions; `None` = off.
    pub admission_rate: Option<RateLimit>,
    /// Per-client-address cap; 0 = off.
    pub max_clients_per_ip: usize,
    /// Trusted proxies in front (for the client address).
    pub trusted_hops: usize,
    /// false = dry run.
    pub enforce: bool,
    /// Connection lifetime limit; `None` = off.
    pub max_connection_lifetime: Option<Duration>,
    /// Fraction of the lifetime over which deadlines are spread.
    pub lifetime_jitter: f64,
    /// Close frames wsgate sends when it ends a connection (SPEC §8).
    pub close: CloseSettings,
    /// What was written, for `check-config` and logging.
    pub raw: RawConfig,
    /// Messages to log once logging is up (e.g. a negative cap taken as 0).
    pub warnings: Vec<String>,
}

/// Saturation-aware readiness: not ready from `high` × cap until `low` × cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watermarks {
    /// Fraction of the cap at which readiness turns 503.
    pub high: f64,
    /// Fraction of the cap at or below which it turns 200 again.
    pub low: f64,
}

/// An admission token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size (at least 1).
    pub burst: f64,
}

/// Close statuses and the reply deadline for connections wsgate ends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseSettings {
    /// Draining, or the end of the grace.
    pub drain: u16,
    /// `max_connection_lifetime` expired.
    pub lifetime: u16,
    /// `idle_timeout` expired.
    pub idle: u16,
    /// How long to wait for Close replies before closing TCP.
    pub timeout: Duration,
}

/// Kubernetes injects `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP...` and
/// `<SERVICE>_SERVICE_HOST/PORT...` variables for every Service in the
/// namespace; a Service named `wsgate` or `wsgate-<anything>` would otherwise
/// trip the unknown-key check. No wsgate key ends in `port` or contains
/// `service_` or `port_<digits>`, so these shapes cannot hide a real key.
fn is_kubernetes_service_link(key: &str) -> bool {
    key == "port"
        || key.ends_with("_port")
        || key.starts_with("service_")
        || key.contains("_service_")
        || key.starts_with("port_")
        || key
            .split("_port_")
            .nth(1)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

impl Config {
    /// The provider stack: defaults < file < `WS_MAX_CLIENTS` < `WSGATE_*`.
    ///
    /// `base` supplies the defaults (the demo uses its own loopback ones).
    ///
    /// # Errors
    /// A named file that does not exist is an error, not silently skipped.
    pub fn figment(base: RawConfig, file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut f = Figment::from(Serialized::defaults(base));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.to_owned(),
                    reason: "no such file".into(),
                });
            }
            f = f.merge(Toml::file_exact(path));
        }
        let legacy = Env::raw()
            .only(&[LEGACY_MAX_CLIENTS_ENV])
            .map(|_| "max_clients".into());
        let env = Env::prefixed(ENV_PREFIX).filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            k != "config" && !is_kubernetes_service_link(&k)
        });
        Ok(f.merge(legacy).merge(env))
    }

    /// Loads `defaults < file < environment` and validates it.
    ///
    /// # Errors
    /// Any invalid value, unknown key or unreadable file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(&Self::figment(RawConfig::default(), file)?)
    }

    /// Extracts and validates a figment.
    ///
    /// # Errors
    /// Any invalid value or unknown key, naming the key and value.
    pub fn from_figment(f: &Figment) -> Result<Self, ConfigError> {
        let raw: RawConfig = f.extract().map_err(|e| from_figment_error(f, e))?;
        Self::validate(raw)
    }

    /// Turns what was written into the typed configuration.
    ///
    /// # Errors
    /// The first key whose value is not acceptable.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut warnings = Vec::new();
        let listen = parse_addr("listen", &raw.listen)?;
        let admin_listen = parse_addr("admin_listen", &raw.admin_listen)?;
        let upstream_text = raw
            .upstream
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid {
                key: "upstream".into(),
                value: "(not set)".into(),
                source_hint: " (set it in the config file or WSGATE_UPSTREAM)".into(),
                expected: accepted("upstream").into(),
            })?;
        let upstream = Upstream::parse(upstream_text).map_err(|why| ConfigError::Invalid {
            key: "upstream".into(),
            value: format!("{upstream_text:?}"),
            source_hint: String::new(),
            expected: format!("{} ({why})", accepted("upstream")),
        })?;
        let max_clients = if raw.max_clients < 0 {
            warnings.push(format!(
                "max_clients = {} is negative: taken as 0 (unlimited)",
                raw.max_clients
            ));
            0
        } else {
            usize::try_from(raw.max_clients)
                .map_err(|_| ConfigError::invalid("max_clients", raw.max_clients))?
        };
        let positive = |key: &str, d: ConfigDuration| {
            if d.0.is_zero() {
                Err(ConfigError::invalid(key, "0s"))
            } else {
                Ok(d.0)
            }
        };
        let optional = |d: ConfigDuration| (!d.0.is_zero()).then_some(d.0);
        let log_format = match raw.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(ConfigError::invalid("log_format", format!("{other:?}"))),
        };
        let fraction = |key: &str, v: f64| {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(ConfigError::invalid(key, v))
            }
        };
        let whole =
            |key: &str, v: i64| usize::try_from(v).map_err(|_| ConfigError::invalid(key, v));
        let high = fraction("ready_high_watermark", raw.ready_high_watermark)?;
        let watermarks = if high > 0.0 {
            let low = match raw.ready_low_watermark {
                Some(l) => fraction("ready_low_watermark", l)?,
                None => (high - 0.1).max(0.0),
            };
            if low >= high {
                return Err(ConfigError::Invalid {
                    key: "ready_low_watermark".into(),
                    value: low.to_string(),
                    source_hint: String::new(),
                    expected: format!("a fraction below ready_high_watermark ({high})"),
                });
            }
            Some(Watermarks { high, low })
        } else {
            if let Some(l) = raw.ready_low_watermark {
                fraction("ready_low_watermark", l)?;
            }
            None
        };
        let rate = raw.admission_rate;
        if !rate.is_finite() || rate < 0.0 {
            return Err(ConfigError::invalid("admission_rate", rate));
        }
        let burst = whole("admission_burst", raw.admission_burst)?;
        let admission_rate = (rate > 0.0).then(|| RateLimit {
            per_second: rate,
            burst: if burst == 0 {
                rate.ceil().max(1.0)
            } else {
                burst as f64
            },
        });
        if raw.shutdown_delay.0 + raw.drain_period.0 > raw.shutdown_grace.0 {
            return Err(ConfigError::Invalid {
                key: "drain_period".into(),
                value: humantime::format_duration(raw.drain_period.0).to_string(),
                source_hint: format!(
                    " (shutdown_delay {} + drain_period > shutdown_grace {})",
                    humantime::format_duration(raw.shutdown_delay.0),
                    humantime::format_duration(raw.shutdown_grace.0)
                ),
                expected: "shutdown_delay + drain_period <= shutdown_grace".into(),
            });
        }
        let close_code = |key: &str, v: i64| {
            u16::try_from(v)
                .ok()
                .filter(|c| crate::frames::is_valid_close_code(*c))
                .ok_or_else(|| ConfigError::invalid(key, v))
        };
        let close = CloseSettings {
            drain: close_code("close_code_drain", raw.close_code_drain)?,
            lifetime: close_code("close_code_lifetime", raw.close_code_lifetime)?,
            idle: close_code("close_code_idle", raw.close_code_idle)?,
            timeout: positive("close_timeout", raw.close_timeout)?,
        };
        Ok(Config {
            close,
            watermarks,
            shutdown_delay: raw.shutdown_delay.0,
            drain_period: raw.drain_period.0,
            admission_rate,
            max_clients_per_ip: whole("max_clients_per_ip", raw.max_clients_per_ip)?,
            trusted_hops: whole("trusted_hops", raw.trusted_hops)?,
            enforce: raw.enforce,
            max_connection_lifetime: optional(raw.max_connection_lifetime),
            lifetime_jitter: fraction("lifetime_jitter", raw.lifetime_jitter)?,
            listen,
            upstream,
            admin_listen,
            max_clients,
            // Whole seconds, rounded up, at least 1 (SPEC §2).
            retry_after_secs: raw.retry_after.0.as_secs_f64().ceil().max(1.0) as u64,
            upstream_connect_timeout: positive(
                "upstream_connect_timeout",
                raw.upstream_connect_timeout,
            )?,
            header_read_timeout: positive("header_read_timeout", raw.header_read_timeout)?,
            half_close_timeout: positive("half_close_timeout", raw.half_close_timeout)?,
            idle_timeout: optional(raw.idle_timeout),
            tcp_keepalive: keepalive(raw.tcp_keepalive)?,
            shutdown_grace: raw.shutdown_grace.0,
            log_format,
            raw,
            warnings,
        })
    }

    /// The effective configuration as `key = value` lines (TOML), for `check-config`.
    pub fn describe(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let opt = |o: Option<Duration>| o.map_or_else(|| "0s".to_owned(), d);
        let fmt = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let max = if self.max_clients == 0 {
            "0 # unlimited".to_owned()
        } else {
            self.max_clients.to_string()
        };
        format!(
            "listen = \"{}\"\nupstream = \"{}\"\nadmin_listen = \"{}\"\nmax_clients = {max}\n\
             retry_after = \"{}s\"\nupstream_connect_timeout = \"{}\"\nheader_read_timeout = \"{}\"\n\
             half_close_timeout = \"{}\"\nidle_timeout = \"{}\"\ntcp_keepalive = \"{}\"\n\
             shutdown_grace = \"{}\"\nlog_format = \"{fmt}\"\n\
             ready_high_watermark = {}\nready_low_watermark = {}\nshutdown_delay = \"{}\"\n\
             drain_period = \"{}\"\nadmission_rate = {}\nadmission_burst = {}\n\
             max_clients_per_ip = {}\ntrusted_hops = {}\nenforce = {}\n\
             max_connection_lifetime = \"{}\"\nlifetime_jitter = {}\n\
             close_code_drain = {}\nclose_code_lifetime = {}\nclose_code_idle = {}\n\
             close_timeout = \"{}\"\n",
            self.listen,
            self.upstream.authority,
            self.admin_listen,
            self.retry_after_secs,
            d(self.upstream_connect_timeout),
            d(self.header_read_timeout),
            d(self.half_close_timeout),
            opt(self.idle_timeout),
            opt(self.tcp_keepalive),
            d(self.shutdown_grace),
            self.watermarks.map_or(0.0, |w| w.high),
            self.watermarks.map_or(0.0, |w| w.low),
            d(self.shutdown_delay),
            d(self.drain_period),
            self.admission_rate.map_or(0.0, |r| r.per_second),
            self.admission_rate.map_or(0.0, |r| r.burst),
            self.max_clients_per_ip,
            self.trusted_hops,
            self.enforce,
            opt(self.max_connection_lifetime),
            self.lifetime_jitter,
            self.close.drain,
            self.close.lifetime,
            self.close.idle,
            d(self.close.timeout),
        )
    }
}

/// The kernel takes keepalive times in whole seconds from 1 to 32767;
/// anything else would be refused by setsockopt and silently leave the
/// kernel's two-hour default in force.
fn keepalive(d: ConfigDuration) -> Result<Option<Duration>, ConfigError> {
    let d = d.0;
    if d.is_zero() {
        return Ok(None);
    }
    if d.subsec_nanos() != 0 || !(1..=32_767).contains(&d.as_secs()) {
        let shown = if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else {
            humantime::format_duration(d).to_string()
        };
        return Err(ConfigError::invalid("tcp_keepalive", shown));
    }
    Ok(Some(d))
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("{text:?}")))
}

/// Where the configuration comes from, kept so SIGHUP can read it afresh.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// Built-in defaults (the demo has its own).
    pub base: RawConfig,
    /// The TOML file, if one was named.
    pub file: Option<PathBuf>,
}

impl ConfigSource {
    /// Loads `base < file < environment` and validates it.
    ///
    /// # Errors
    /// Any invalid value, unknown key or unreadable file.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::from_figment(&Config::figment(self.base.clone(), self.file.as_deref())?)
    }
}

/// Renders a figment value the way the user wrote it.
fn show_actual(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(s) => format!("{s:?}"),
        Actual::Signed(n) => n.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        Actual::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// Where a value came from, as a hint like ` (from environment variable WSGATE_X)`.
fn source_hint(e: &figment::Error, key: &str) -> String {
    let Some(meta) = e.metadata.as_ref() else {
        return String::new();
    };
    if meta.name.contains(ENV_PREFIX) {
        return format!(
            " (from environment variable {ENV_PREFIX}{})",
            key.to_uppercase()
        );
    }
    if meta.name.contains(LEGACY_MAX_CLIENTS_ENV) {
        return format!(" (from environment variable {LEGACY_MAX_CLIENTS_ENV})");
    }
    match &meta.source {
        Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
        _ => String::new(),
    }
}

fn from_figment_error(f: &Figment, e: figment::Error) -> ConfigError {
    use figment::error::Kind;
    // Report the first error only: one line naming one key is what operators read.
    let e = e
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from(String::new()));
    let key = e.path.last().cloned().unwrap_or_default();
    let hint = source_hint(&e, &key);
    match &e.kind {
        Kind::UnknownField(field, _) => ConfigError::UnknownKey {
            key: field.clone(),
            source_hint: hint,
            known: ACCEPTED
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", "),
        },
        Kind::InvalidType(actual, _) | Kind::InvalidValue(actual, _) => ConfigError::Invalid {
            expected: accepted(&key).to_owned(),
            value: show_actual(actual),
            key,
            source_hint: hint,
        },
        other => ConfigError::Invalid {
            expected: accepted(&key).to_owned(),
            value: lookup_value(f, &key).unwrap_or_else(|| other.to_string()),
            key,
            source_hint: hint,
        },
    }
}

fn lookup_value(f: &Figment, key: &str) -> Option<String> {
    match f.find_value(key).ok()? {
        Value::String(_, s) => Some(format!("{s:?}")),
        v => Some(format!("{v:?}")),
    }
}

#[cfg(test)]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures return figment::Error"
)]
mod tests {
    use super::*;
    use figment::Jail;

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
            assert!(e.to_string().contains("nope.toml"));
            Ok(())
        });
    }

    #[test]
    fn upstream_forms() {
        let u = Upstream::parse("http://app:3000/").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("app", 3000));
        let u = Upstream::parse("[::1]:80").expect("valid");
        assert_eq!((u.host.as_str(), u.authority.as_str()), ("::1", "[::1]:80"));
        assert!(Upstream::parse("app").is_err());
        assert!(Upstream::parse("app:0").is_err());
        assert!(Upstream::parse("app:3000/path").is_err());
        assert!(Upstream::parse("ws://app:1").is_err());
    }
}
