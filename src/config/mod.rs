//! Configuration: the keys wsgate reads, their defaults, and the typed form
//! the rest of wsgate uses.
//!
//! Precedence, lowest first (docs/configuration.md): built-in defaults < TOML file
//! (`--config` / `WSGATE_CONFIG`) < `WS_MAX_CLIENTS` (compatibility alias) <
//! `WSGATE_*` environment variables. Every invalid value becomes a
//! [`ConfigError`] that names the key, the value as written and what is
//! accepted; `main` prints it and exits with code 2 before any port is bound.
//!
//! # Layout
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the keys: [`RawConfig`] (as written, with defaults) and [`Config`] (typed) |
//! | `values.rs` | the kinds of value a key takes: what each accepts, and the check |
//! | `duration.rs` | [`ConfigDuration`], the 10-year bound, and the kinds of duration |
//! | `load.rs` | the figment provider stack, environment filtering, figment errors → [`ConfigError`] |
//! | `validate.rs` | [`RawConfig`] → [`Config`]: each key's check, then the rules across keys |
//! | `key_limits.rs` | the `[[key_limits]]` rules and the `jwt_*` keys (docs/operations.md#limits-per-key) |
//! | `fleet.rs` | the `fleet_*` keys (docs/operations.md#fleet-wide-limits), their kinds, and the Redis URL kept secret |
//! | `handshake.rs` | `allowed_origins`, `subprotocols` and their `require_*` keys (docs/security.md#handshake-policy) |
//! | `signals.rs` | `refusal_mode`, the client pings, `send_timeout` (docs/behaviour.md#signals-clients-can-act-on) |
//! | `rebalance.rs` | the `rebalance*` keys (docs/operations.md#automatic-rebalancing) |
//! | `guards.rs` | the message-guard keys (docs/operations.md#message-guards) and their typed form |
//! | `log_level.rs` | the `log_level` filter and its check, which `RUST_LOG` must pass too |
//! | `suggest.rs` | "did you mean": the known key closest to an unknown one |
//! | `effective.rs` | the effective configuration as TOML, for `wsgate check-config` |
//! | `error.rs` | [`ConfigError`] |
//!
//! # Adding a key
//! 1. A field in [`RawConfig`]: its `///` doc, the kind of value it takes
//!    (`#[serde(deserialize_with = "Kind::checked")]`, a kind from
//!    `values.rs` or `duration.rs`, or a new one there; a group of keys
//!    with a file of its own, like `fleet.rs`, keeps its kinds there), and
//!    its default in `RawConfig::default` just below.
//! 2. Its typed field in [`Config`]; `check-config` prints it under its
//!    field name (a `rename` or `serialize_with` when the typed form differs
//!    from the key, see `effective.rs`).
//! 3. Its line in [`Config::validate`] (`Kind::value("key", &raw.key)?`),
//!    and any rule it shares with other keys there.
//! 4. The docs: docs/configuration.md (and the chart, if it has a value).
//!
//! Nothing else: error messages take what is accepted from the kind, the
//! list of known keys from serde, and `check-config` serialises [`Config`].

mod duration;
mod effective;
mod error;
mod fleet;
mod guards;
mod handshake;
mod key_limits;
mod load;
mod log_level;
mod rebalance;
mod signals;
mod suggest;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::duration::ConfigDuration;
pub use self::error::ConfigError;
pub(crate) use self::fleet::{Deployment, SentinelTarget};
pub use self::fleet::{FailMode, FleetSettings, RedisUrl};
pub use self::guards::{MessageGuards, RateAction};
pub(crate) use self::handshake::is_token;
pub use self::handshake::HandshakePolicy;
pub use self::key_limits::{
    is_usable_key, JwtSettings, KeyRule, KeySource, MissingKey, RawKeyRule, TokenSource,
    MAX_KEY_LEN,
};
pub use self::load::{ConfigSource, ENV_PREFIX, LEGACY_MAX_CLIENTS_ENV};
pub use self::log_level::log_filter;
pub use self::rebalance::Rebalance;
pub use self::signals::{ClientSignals, RefusalMode};
pub use self::values::{Endpoint, LogFormat, Upstream, MAX_PLAIN_REQUESTS};

use self::duration::{AnyDuration, Keepalive, OffOrDuration, PositiveDuration};
use self::fleet::{FleetCap, InstanceId, LeaseTtl, Namespace};
use self::guards::RateAction as RateActionKind;
use self::log_level::LogLevel;
use self::rebalance::Tolerance;
use self::values::{
    Cap, CloseCode, Fraction, ListenAddress, NonNegative, PlainRequests, TrueOrFalse, ValueKind,
    WholeNumber, Workers,
};

/// The configuration as written: what figment deserialises before
/// [`Config::validate`]. Each field names the kind of value it takes, which
/// says what is accepted and checks it while the file and environment are
/// read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Client-facing address.
    #[serde(deserialize_with = "ListenAddress::checked")]
    pub listen: String,
    /// `host:port`, `http://host:port` or `unix:/absolute/path` of the
    /// upstream; required.
    #[serde(deserialize_with = "Upstream::checked_optional")]
    pub upstream: Option<String>,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[serde(deserialize_with = "ListenAddress::checked")]
    pub admin_listen: String,
    /// Cap on concurrent WebSocket connections; 0 = unlimited, negative = 0.
    #[serde(deserialize_with = "Cap::checked")]
    pub max_clients: i64,
    /// `Retry-After` on every 503 (whole seconds, rounded up, at least 1).
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub retry_after: ConfigDuration,
    /// Connect + handshake response deadline for the upstream.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub upstream_connect_timeout: ConfigDuration,
    /// Deadline for a client's full request head.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub header_read_timeout: ConfigDuration,
    /// How long the other side may keep sending after one side closed.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub half_close_timeout: ConfigDuration,
    /// Close a spliced connection idle this long; 0 = off.
    #[serde(deserialize_with = "OffOrDuration::checked")]
    pub idle_timeout: ConfigDuration,
    /// TCP keepalive idle time and `TCP_USER_TIMEOUT`; 0 = off.
    #[serde(deserialize_with = "Keepalive::checked")]
    pub tcp_keepalive: ConfigDuration,
    /// How long connections may run after SIGTERM/SIGINT.
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub shutdown_grace: ConfigDuration,
    /// `text` or `json`.
    #[serde(deserialize_with = "LogFormat::checked")]
    pub log_format: String,
    /// Which lines are logged: tracing filter directives (`RUST_LOG` wins
    /// when it is set and valid).
    #[serde(deserialize_with = "LogLevel::checked")]
    pub log_level: String,
    /// One access-log record per WebSocket session, and refusal summaries.
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub access_log: bool,
    /// Runtime threads: 1 = one thread, 0 = one per available CPU.
    #[serde(deserialize_with = "Workers::checked")]
    pub workers: i64,
    /// Readiness turns 503 once active ≥ this fraction of the cap; 0 = off.
    #[serde(deserialize_with = "Fraction::checked")]
    pub ready_high_watermark: f64,
    /// … and 200 again once active ≤ this fraction; unset = high − 0.1.
    #[serde(deserialize_with = "Fraction::checked_optional")]
    pub ready_low_watermark: Option<f64>,
    /// After SIGTERM, keep admitting this long (readiness already 503).
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub shutdown_delay: ConfigDuration,
    /// Close remaining connections evenly over this period after the delay.
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub drain_period: ConfigDuration,
    /// Admissions per second (token bucket); 0 = off.
    #[serde(deserialize_with = "NonNegative::checked")]
    pub admission_rate: f64,
    /// Bucket size; 0 = same as the rate.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub admission_burst: i64,
    /// Concurrent WebSocket connections per client address; 0 = off.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub max_clients_per_ip: i64,
    /// Plain (non-upgrade) requests in flight; 0 = unlimited.
    #[serde(deserialize_with = "PlainRequests::checked")]
    pub max_plain_requests: i64,
    /// How many proxies in front are trusted to append `X-Forwarded-For`;
    /// 0 = the socket peer is the client.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub trusted_hops: i64,
    /// false = dry run: admit everything, count what would be refused.
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub enforce: bool,
    /// Close a connection at a deadline drawn from
    /// [lifetime × (1 − jitter), lifetime]; 0 = off.
    #[serde(deserialize_with = "OffOrDuration::checked")]
    pub max_connection_lifetime: ConfigDuration,
    /// Fraction of the lifetime over which deadlines are spread.
    #[serde(deserialize_with = "Fraction::checked")]
    pub lifetime_jitter: f64,
    /// Close status when draining or at the end of the grace.
    #[serde(deserialize_with = "CloseCode::checked")]
    pub close_code_drain: i64,
    /// Close status when `max_connection_lifetime` expires.
    #[serde(deserialize_with = "CloseCode::checked")]
    pub close_code_lifetime: i64,
    /// Close status when `idle_timeout` expires.
    #[serde(deserialize_with = "CloseCode::checked")]
    pub close_code_idle: i64,
    /// Close status of the sessions a rebalance sheds (1012 Service Restart).
    #[serde(deserialize_with = "CloseCode::checked")]
    pub close_code_rebalance: i64,
    /// How long to wait for the peers' Close replies before closing TCP.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub close_timeout: ConfigDuration,
    /// A file holding the admin token (`/keys`, `/drain`); unset = those paths are 404.
    pub admin_token_file: Option<String>,
    /// The JWKS document for `jwt_claim` rules (re-read when it changes).
    pub jwt_jwks_file: Option<String>,
    /// Required `iss` of tokens, when set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` of tokens, when set.
    pub jwt_audience: Option<String>,
    /// Tokens without `exp` are refused (a token that never expires is a
    /// credential that cannot be taken back).
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub jwt_require_exp: bool,
    /// Where the token is: `header:Authorization` (Bearer), `query:P`,
    /// `cookie:C`, or `subprotocol`.
    pub jwt_from: String,
    /// With `jwt_from = "subprotocol"`: the offered subprotocol entry that
    /// starts with this carries the JWT (the rest of it).
    pub jwt_subprotocol_prefix: String,
    /// Origins allowed to open a WebSocket (docs/security.md#handshake-policy); empty = any.
    #[serde(deserialize_with = "handshake::list")]
    pub allowed_origins: Vec<String>,
    /// Refuse (403) an upgrade without an `Origin` header.
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub require_origin: bool,
    /// Subprotocol names a client may offer (the others are removed); empty = any.
    #[serde(deserialize_with = "handshake::list")]
    pub subprotocols: Vec<String>,
    /// Refuse (400) an upgrade that offers none of `subprotocols`.
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub require_subprotocol: bool,
    /// `status` (HTTP refusals) or `close` (101, then Close 1013) for load refusals.
    #[serde(deserialize_with = "RefusalMode::checked")]
    pub refusal_mode: String,
    /// Close-mode refusals open at once; past it the HTTP status.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub max_close_refusals: i64,
    /// Ping a client after this long without a frame from it; 0 = off.
    #[serde(deserialize_with = "OffOrDuration::checked")]
    pub ping_interval: ConfigDuration,
    /// No frame within this long after wsgate's Ping ends the session.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub pong_timeout: ConfigDuration,
    /// Bytes the client's socket has not accepted for this long end the session; 0 = off.
    #[serde(deserialize_with = "OffOrDuration::checked")]
    pub send_timeout: ConfigDuration,
    /// The Redis of fleet-wide limits (docs/operations.md#fleet-wide-limits); empty = off. It may hold
    /// a password: [`Config`], `check-config` and errors show it redacted
    /// ([`RedisUrl`]); this raw form (and its `Debug`) has it whole.
    #[serde(deserialize_with = "RedisUrl::checked")]
    pub fleet_redis_url: String,
    /// Prefix of every Redis key; fleets with different namespaces do not share.
    #[serde(deserialize_with = "Namespace::checked")]
    pub fleet_namespace: String,
    /// Cap on the fleet's concurrent WebSocket connections; 0 = off.
    #[serde(deserialize_with = "FleetCap::checked")]
    pub fleet_max_clients: i64,
    /// A hold in Redis expires this long after its instance last renewed it.
    #[serde(deserialize_with = "LeaseTtl::checked")]
    pub fleet_lease_ttl: ConfigDuration,
    /// Limit on one Redis round trip during an admission.
    #[serde(deserialize_with = "PositiveDuration::checked")]
    pub fleet_timeout: ConfigDuration,
    /// Redis unreachable or slow: `open` (local limits alone) or `closed` (503).
    #[serde(deserialize_with = "FailMode::checked")]
    pub fleet_fail_mode: String,
    /// Identity of this instance's holds; empty = `$HOSTNAME-<8 random hex>`.
    #[serde(deserialize_with = "InstanceId::checked")]
    pub fleet_instance_id: String,
    /// Instances of a fleet balance their sessions (docs/operations.md#automatic-rebalancing).
    #[serde(deserialize_with = "TrueOrFalse::checked")]
    pub rebalance: bool,
    /// Shed only while above the fleet mean × (1 + this).
    #[serde(deserialize_with = "Tolerance::checked")]
    pub rebalance_tolerance: f64,
    /// … continuously for this long.
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub rebalance_after: ConfigDuration,
    /// The excess is closed evenly over this period.
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub rebalance_period: ConfigDuration,
    /// At least this long between the end of one shed and the next.
    #[serde(deserialize_with = "AnyDuration::checked")]
    pub rebalance_cooldown: ConfigDuration,
    /// Payload bytes of one client message (docs/operations.md#message-guards); 0 = off.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub max_message_size: i64,
    /// Messages per second from a client (control frames count); 0 = off.
    #[serde(deserialize_with = "NonNegative::checked")]
    pub message_rate: f64,
    /// Bucket size of `message_rate`; 0 = one second's worth.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub message_burst: i64,
    /// `throttle` (stop reading) or `close` (Close 1008) over `message_rate`.
    #[serde(deserialize_with = "RateActionKind::checked")]
    pub message_rate_action: String,
    /// Payload bytes per second from a client (always throttles); 0 = off.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub byte_rate: i64,
    /// Bucket size of `byte_rate`; 0 = one second's worth.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub byte_burst: i64,
    /// Frames one client message may have, the first and its continuations; 0 = off.
    #[serde(deserialize_with = "WholeNumber::checked")]
    pub max_fragments: i64,
    /// `[[key_limits]]`: concurrent connections per key (docs/operations.md#limits-per-key). Last:
    /// TOML writes tables after plain values.
    pub key_limits: Vec<RawKeyRule>,
}

/// The built-in defaults (docs/configuration.md, §7, §8), one line per key.
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
            log_level: "info".into(),
            access_log: true,
            workers: 1,
            ready_high_watermark: 0.0,
            ready_low_watermark: None,
            shutdown_delay: secs(0),
            drain_period: secs(0),
            admission_rate: 0.0,
            admission_burst: 0,
            max_clients_per_ip: 0,
            max_plain_requests: 1024,
            trusted_hops: 0,
            enforce: true,
            max_connection_lifetime: secs(0),
            lifetime_jitter: 0.5,
            close_code_drain: 1001,
            close_code_lifetime: 1001,
            close_code_idle: 1001,
            close_timeout: secs(2),
            admin_token_file: None,
            jwt_jwks_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_require_exp: true,
            jwt_from: "header:Authorization".into(),
            jwt_subprotocol_prefix: key_limits::DEFAULT_SUBPROTOCOL_PREFIX.into(),
            allowed_origins: Vec::new(),
            require_origin: false,
            subprotocols: Vec::new(),
            require_subprotocol: false,
            refusal_mode: "status".into(),
            max_close_refusals: 1024,
            ping_interval: secs(0),
            pong_timeout: secs(10),
            send_timeout: secs(0),
            fleet_redis_url: String::new(),
            fleet_namespace: "wsgate".into(),
            fleet_max_clients: 0,
            fleet_lease_ttl: secs(30),
            fleet_timeout: ConfigDuration(Duration::from_millis(100)),
            fleet_fail_mode: "open".into(),
            fleet_instance_id: String::new(),
            rebalance: rebalance::Rebalance::DEFAULT.enabled,
            rebalance_tolerance: rebalance::Rebalance::DEFAULT.tolerance,
            rebalance_after: ConfigDuration(rebalance::Rebalance::DEFAULT.after),
            rebalance_period: ConfigDuration(rebalance::Rebalance::DEFAULT.period),
            rebalance_cooldown: ConfigDuration(rebalance::Rebalance::DEFAULT.cooldown),
            close_code_rebalance: 1012,
            max_message_size: 0,
            message_rate: 0.0,
            message_burst: 0,
            message_rate_action: "throttle".into(),
            byte_rate: 0,
            byte_burst: 0,
            max_fragments: 1024,
            key_limits: Vec::new(),
        }
    }
}

/// The validated configuration every other module reads.
///
/// Serialising it gives the effective configuration under the keys'
/// names (`wsgate check-config`; see `effective.rs`).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// The upstream service.
    #[serde(serialize_with = "effective::upstream")]
    pub upstream: Upstream,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Cap on concurrent WebSocket connections; 0 = unlimited.
    pub max_clients: usize,
    /// `Retry-After` value in whole seconds (at least 1).
    #[serde(rename = "retry_after", serialize_with = "effective::seconds")]
    pub retry_after_secs: u64,
    /// Connect + handshake deadline.
    #[serde(serialize_with = "effective::duration")]
    pub upstream_connect_timeout: Duration,
    /// Request head deadline.
    #[serde(serialize_with = "effective::duration")]
    pub header_read_timeout: Duration,
    /// Half-close allowance.
    #[serde(serialize_with = "effective::duration")]
    pub half_close_timeout: Duration,
    /// Idle cut-off; `None` = off.
    #[serde(serialize_with = "effective::off_or_duration")]
    pub idle_timeout: Option<Duration>,
    /// Keepalive / user timeout; `None` = off.
    #[serde(serialize_with = "effective::off_or_duration")]
    pub tcp_keepalive: Option<Duration>,
    /// Shutdown grace.
    #[serde(serialize_with = "effective::duration")]
    pub shutdown_grace: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// The log filter (`main` prefers a valid `RUST_LOG`).
    pub log_level: String,
    /// The access log (docs/operations.md#access-log) is written.
    pub access_log: bool,
    /// Threads that run connections: 1 = a single-threaded runtime,
    /// 0 = one worker per available CPU (quota and affinity), N = N.
    pub workers: usize,
    /// Readiness hysteresis on saturation (docs/operations.md#rollouts).
    #[serde(flatten, serialize_with = "effective::watermarks")]
    pub watermarks: Option<Watermarks>,
    /// Admissions continue this long after SIGTERM.
    #[serde(serialize_with = "effective::duration")]
    pub shutdown_delay: Duration,
    /// Remaining connections are closed evenly over this period.
    #[serde(serialize_with = "effective::duration")]
    pub drain_period: Duration,
    /// Token bucket for admissions; `None` = off.
    #[serde(flatten, serialize_with = "effective::admission_rate")]
    pub admission_rate: Option<RateLimit>,
    /// Per-client-address cap; 0 = off.
    pub max_clients_per_ip: usize,
    /// Cap on plain requests in flight (docs/behaviour.md#slow-request-bodies); 0 = unlimited.
    pub max_plain_requests: usize,
    /// Trusted proxies in front (for the client address).
    pub trusted_hops: usize,
    /// false = dry run.
    pub enforce: bool,
    /// Connection lifetime limit; `None` = off.
    #[serde(serialize_with = "effective::off_or_duration")]
    pub max_connection_lifetime: Option<Duration>,
    /// Fraction of the lifetime over which deadlines are spread.
    pub lifetime_jitter: f64,
    /// Close frames wsgate sends when it ends a connection (docs/behaviour.md#close-frames).
    #[serde(flatten)]
    pub close: CloseSettings,
    /// The admin token's file; `None` = the operator paths (`/keys`,
    /// `/drain`) are 404.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// The JWT verifier's keys and expectations; `None` without a JWKS file.
    #[serde(flatten)]
    pub jwt: Option<JwtSettings>,
    /// Tokens without `exp` are refused.
    pub jwt_require_exp: bool,
    /// Where the JWT is read from.
    #[serde(flatten, serialize_with = "key_limits::written_source")]
    pub jwt_from: TokenSource,
    /// Origin and subprotocol checks (docs/security.md#handshake-policy).
    #[serde(flatten, serialize_with = "handshake::written")]
    pub handshake: HandshakePolicy,
    /// Close-mode refusals, pings from wsgate, the send timeout
    /// (docs/behaviour.md#signals-clients-can-act-on).
    #[serde(flatten, serialize_with = "signals::written")]
    pub signals: ClientSignals,
    /// Fleet-wide limits through Redis (docs/operations.md#fleet-wide-limits); `None` = off
    /// (`check-config` prints the keys all the same, with an empty URL).
    #[serde(flatten, serialize_with = "effective::fleet")]
    pub fleet: Option<FleetSettings>,
    /// Automatic rebalancing across the fleet (docs/operations.md#automatic-rebalancing).
    #[serde(flatten, serialize_with = "rebalance::written")]
    pub rebalance: Rebalance,
    /// Limits on what a client sends inside a connection (docs/operations.md#message-guards).
    #[serde(flatten, serialize_with = "guards::written")]
    pub message_guards: MessageGuards,
    /// Limits per key, in the order they are checked.
    pub key_limits: Vec<KeyRule>,
    /// Messages to log once logging is up (e.g. a negative cap taken as 0).
    #[serde(skip)]
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

/// A token bucket's rate and size (admissions, message guards).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size (at least 1).
    pub burst: f64,
}

impl RateLimit {
    /// A token bucket (admissions, message guards) from its two keys: off
    /// while the rate is 0; a burst of 0 means one second's worth of
    /// tokens (at least 1).
    pub(crate) fn of(rate: f64, burst: usize) -> Option<RateLimit> {
        (rate > 0.0).then(|| RateLimit {
            per_second: rate,
            burst: if burst == 0 {
                rate.ceil().max(1.0)
            } else {
                burst as f64
            },
        })
    }
}

/// Close statuses and the reply deadline for connections wsgate ends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CloseSettings {
    /// Draining, or the end of the grace.
    #[serde(rename = "close_code_drain")]
    pub drain: u16,
    /// `max_connection_lifetime` expired.
    #[serde(rename = "close_code_lifetime")]
    pub lifetime: u16,
    /// `idle_timeout` expired.
    #[serde(rename = "close_code_idle")]
    pub idle: u16,
    /// Shed by automatic rebalancing.
    #[serde(rename = "close_code_rebalance")]
    pub rebalance: u16,
    /// How long to wait for Close replies before closing TCP.
    #[serde(rename = "close_timeout", serialize_with = "effective::duration")]
    pub timeout: Duration,
}
