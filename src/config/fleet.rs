//! The `fleet_*` keys (docs/operations.md#fleet-wide-limits): where the fleet's Redis is, how wsgate
//! counts there, and what it does when Redis does not answer.
//!
//! Fleet limits are off while `fleet_redis_url` is empty; [`Config::fleet`]
//! is then `None`. The other six keys are checked all the same, so a typo
//! fails at start-up (exit 2) before anyone turns fleet limits on.
//!
//! The URL is a secret (it may hold the Redis password): [`RedisUrl`] shows
//! it with the password replaced by `***` in `Debug`, `Display`,
//! `check-config` and every error message, and only
//! [`RedisUrl::as_str`] gives it whole, to the Redis client. A URL is
//! accepted exactly when the `redis` crate wsgate connects with accepts
//! it, less the two forms that crate would refuse only when connecting.
//! Two forms are wsgate's own, for the fleet stores beyond one server
//! (docs/operations.md#redis-cluster-and-sentinel): `redis+cluster://`
//! (and `rediss+cluster://`) lists the seed nodes of a Redis Cluster,
//! `redis+sentinel://` the sentinels of a Sentinel-managed primary; each
//! host of either must itself be a host the crate accepts, and
//! [`Deployment`] is the parsed form the store connects with.
//!
//! The kinds of the fleet keys live here rather than in `values.rs`: none
//! is used by another key.
//!
//! [`Config::fleet`]: super::Config::fleet

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Serialize, Serializer};

use super::duration::{ConfigDuration, PositiveDuration};
use super::values::{ValueKind, WrittenVisitor};
use super::{ConfigError, RawConfig};

/// The longest `fleet_instance_id`, as a literal so the accepted-values
/// text below can be built from it at compile time.
macro_rules! max_instance_id_len {
    () => {
        128
    };
}

/// What replaces a password wherever the URL is shown.
const HIDDEN: &str = "***";
/// The shortest `fleet_lease_ttl`: renewals run every third of it, and a
/// renewal more often than every second would be all wsgate sends Redis.
const MIN_LEASE_TTL: Duration = Duration::from_secs(3);
/// The longest `fleet_lease_ttl`: the time a dead instance's holds keep
/// counting against the fleet.
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// The longest `fleet_instance_id`.
const MAX_INSTANCE_ID_LEN: usize = max_instance_id_len!();
/// The longest `fleet_namespace`.
const MAX_NAMESPACE_LEN: usize = 64;

/// `Config.fleet`: `None` when `fleet_redis_url` is empty (fleet limits off).
///
/// Serialised under the keys' names, for `check-config`; equality is what
/// a reload compares to decide whether the Redis client must change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetSettings {
    /// The Redis (or Valkey) server (`fleet_redis_url`).
    #[serde(rename = "fleet_redis_url")]
    pub redis_url: RedisUrl,
    /// Prefix of every Redis key, as a Cluster hash tag `{namespace}`:
    /// instances with the same namespace share their counts.
    #[serde(rename = "fleet_namespace")]
    pub namespace: String,
    /// Cap on the fleet's concurrent WebSocket connections; 0 = off (key
    /// rules with `fleet = true` may still count fleet-wide).
    #[serde(rename = "fleet_max_clients")]
    pub max_clients: u32,
    /// A hold expires this long after its instance last renewed it;
    /// renewals run every third of it.
    #[serde(
        rename = "fleet_lease_ttl",
        serialize_with = "super::effective::duration"
    )]
    pub lease_ttl: Duration,
    /// Limit on one Redis round trip during an admission (below a third
    /// of `lease_ttl`).
    #[serde(
        rename = "fleet_timeout",
        serialize_with = "super::effective::duration"
    )]
    pub timeout: Duration,
    /// What an admission does while Redis is unreachable or slow.
    #[serde(rename = "fleet_fail_mode")]
    pub fail_mode: FailMode,
    /// Whose holds these are: `fleet_instance_id`, by default `$HOSTNAME`
    /// and 8 random hex digits, the same for every reload of one process.
    #[serde(rename = "fleet_instance_id")]
    pub instance_id: String,
}

/// What an admission does while Redis is unreachable or slow
/// (`fleet_fail_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Admit on the local limits alone.
    Open,
    /// Refuse: 503 `fleet_unavailable`.
    Closed,
}

/// The URL as written. `Debug`/`Display`/serialisation show it with any
/// password replaced by `***` (it is a secret: check-config output and
/// logs must never contain it).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// A URL the Redis client accepts (`fleet_redis_url`; empty is not one).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `fleet_redis_url`, the URL with its
    /// password hidden, and why it is refused.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match deployment(text).err() {
            None => Ok(RedisUrl(text.to_owned())),
            Some(why) => Err(ConfigError::invalid(
                "fleet_redis_url",
                format!("{:?}", redact(text)),
                expected_because(why),
            )),
        }
    }

    /// The full URL, password included, for the Redis client.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// Whether the connection is TLS (`rediss://`, `valkeys://`, `rediss+cluster://`).
    pub fn uses_tls(&self) -> bool {
        let scheme = self.0.split_once("://").map_or("", |(s, _)| s);
        ["rediss", "valkeys", CLUSTER_TLS]
            .iter()
            .any(|tls| scheme.eq_ignore_ascii_case(tls))
    }

    /// The deployment the URL names, parsed for the store to connect with.
    ///
    /// # Errors
    /// Why the URL is refused; never the case for a [`RedisUrl`] made by
    /// [`RedisUrl::parse`] or read from the configuration (both validate).
    pub(crate) fn deployment(&self) -> Result<Deployment, &'static str> {
        deployment(&self.0)
    }
}

/// `redis+cluster://`: the seed nodes of a Redis Cluster.
const CLUSTER: &str = "redis+cluster";
/// `rediss+cluster://`: the same over TLS.
const CLUSTER_TLS: &str = "rediss+cluster";
/// `redis+sentinel://`: the sentinels of a Sentinel-managed primary.
const SENTINEL: &str = "redis+sentinel";
/// The port of a sentinel whose host names none (Redis Sentinel's own).
const SENTINEL_PORT: u16 = 26379;
/// The port of a cluster node whose host names none.
const REDIS_PORT: u16 = 6379;

/// Which Redis deployment `fleet_redis_url` names, with what the client
/// needs to reach it (passwords included: no `Debug` that shows them).
#[derive(Clone)]
pub(crate) enum Deployment {
    /// One server: the URL as the client takes it.
    Single(String),
    /// A Redis Cluster: its seed nodes, each a `redis://` (or `rediss://`)
    /// URL with the credentials; the client finds the others.
    Cluster(Vec<ConnectionInfo>),
    /// A primary found through its sentinels.
    Sentinel(SentinelTarget),
}

/// A Sentinel deployment: where the sentinels are, the name they know the
/// primary by, and how to log in to each side.
#[derive(Clone)]
pub(crate) struct SentinelTarget {
    /// `host:port` of every sentinel, in the order written.
    pub(crate) sentinels: Vec<(String, u16)>,
    /// The `MASTER_NAME` of `sentinel monitor`.
    pub(crate) master: String,
    /// The database on the primary.
    pub(crate) db: i64,
    /// The user and password of the URL: the data nodes' (`requirepass`
    /// or an ACL user), the common deployment.
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// The `sentinel_password` query parameter: the sentinels' own
    /// (`requirepass` in sentinel.conf), when they have one.
    pub(crate) sentinel_password: Option<String>,
}

impl fmt::Debug for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Deployment::Single(url) => f.debug_tuple("Single").field(&redact(url)).finish(),
            Deployment::Cluster(nodes) => f
                .debug_tuple("Cluster")
                .field(
                    &nodes
                        .iter()
                        .map(|n| n.addr().to_string())
                        .collect::<Vec<_>>(),
                )
                .finish(),
            Deployment::Sentinel(t) => f
                .debug_struct("Sentinel")
                .field("sentinels", &t.sentinels)
                .field("master", &t.master)
                .field("db", &t.db)
                .finish_non_exhaustive(),
        }
    }
}

/// Parses `text` into the deployment it names, or says why not.
fn deployment(text: &str) -> Result<Deployment, &'static str> {
    let scheme = text.split_once("://").map_or("", |(s, _)| s);
    let rest = text.get(scheme.len() + 3..).unwrap_or_default();
    if scheme.eq_ignore_ascii_case(CLUSTER) {
        cluster(rest, "redis")
    } else if scheme.eq_ignore_ascii_case(CLUSTER_TLS) {
        cluster(rest, "rediss")
    } else if scheme.eq_ignore_ascii_case(SENTINEL) {
        sentinel(rest)
    } else {
        match refusal(text) {
            None => Ok(Deployment::Single(text.to_owned())),
            Some(why) => Err(why),
        }
    }
}

/// `rest` of a multi-host URL (after `scheme://`) cut into the user
/// information (before the last `@` of the authority), the hosts (between
/// commas) and what follows them (the path, query and fragment).
fn split_hosts(rest: &str) -> Result<(Option<&str>, Vec<&str>, &str), &'static str> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err("no host name (hosts are host:port, separated by commas)");
    }
    Ok((userinfo, hosts, tail))
}

/// `host` with `port` added when it names none (`[::1]` has none, `[::1]:7000` has one).
fn with_port(host: &str, port: u16) -> String {
    let has_port = match host.rfind(']') {
        Some(close) => host[close..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

/// One host of a multi-host URL as the client parses it, through the same
/// checks as a one-server URL (`base` is `redis` or `rediss`).
fn node(
    base: &str,
    userinfo: Option<&str>,
    host: &str,
    port: u16,
) -> Result<ConnectionInfo, &'static str> {
    let auth = userinfo.map_or(String::new(), |u| format!("{u}@"));
    let url = format!("{base}://{auth}{}", with_port(host, port));
    if let Some(why) = refusal(&url) {
        return Err(why);
    }
    url.into_connection_info()
        .map_err(|e| client_reason(&e.to_string()))
}

/// `redis+cluster://[user:password@]host:port[,host:port…]`.
fn cluster(rest: &str, base: &str) -> Result<Deployment, &'static str> {
    let (userinfo, hosts, tail) = split_hosts(rest)?;
    if !matches!(tail, "" | "/") {
        return Err(
            "a cluster URL ends after its hosts (a Redis Cluster has database 0 \
            only, and takes no query parameters)",
        );
    }
    let nodes = hosts
        .iter()
        .map(|h| node(base, userinfo, h, REDIS_PORT))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Deployment::Cluster(nodes))
}

/// `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER_NAME[/db][?sentinel_password=…]`.
fn sentinel(rest: &str) -> Result<Deployment, &'static str> {
    let (userinfo, hosts, tail) = split_hosts(rest)?;
    // Checked as data-node logins: the same rules for the user information.
    let first = node("redis", userinfo, hosts[0], SENTINEL_PORT)?;
    let mut sentinels = Vec::with_capacity(hosts.len());
    for host in &hosts {
        match node("redis", None, host, SENTINEL_PORT)?.addr() {
            ConnectionAddr::Tcp(h, p) => sentinels.push((h.clone(), *p)),
            _ => return Err("a sentinel is host:port"),
        }
    }
    if tail.contains('#') {
        return Err("a sentinel URL takes no fragment");
    }
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut parts = path.strip_prefix('/').unwrap_or_default().split('/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() || !master.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("no MASTER_NAME after the sentinels (redis+sentinel://host:port/MASTER_NAME)");
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<u32>()
            .map_err(|_| "the database is not a number")?
            .into(),
    };
    if parts.next().is_some() {
        return Err("the path is /MASTER_NAME or /MASTER_NAME/db");
    }
    let mut sentinel_password = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "sentinel_password" {
            return Err("the only query parameter of a sentinel URL is sentinel_password");
        }
        sentinel_password = Some(value.into_owned());
    }
    let login = first.redis_settings();
    Ok(Deployment::Sentinel(SentinelTarget {
        sentinels,
        master: master.to_owned(),
        db,
        username: login.username().map(str::to_owned),
        password: login.password().map(str::to_owned),
        sentinel_password,
    }))
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedisUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// `fleet_redis_url`: empty = off, else a URL the Redis client takes.
/// Refusals show the URL redacted, so both ways in ([`ValueKind::checked`]
/// while figment reads, [`ValueKind::value`] in `Config::validate`) are
/// written here instead of taken from the trait.
impl ValueKind for RedisUrl {
    type Raw = String;
    type Value = Option<RedisUrl>;
    const EXPECTED: &'static str = "empty (off), redis://[user:password@]host[:port][/db], \
        rediss://… (TLS) or unix:///path/to/redis.sock[?pass=password] \
        (valkey://, valkeys://, redis+unix:// and valkey+unix:// too), \
        redis+cluster://[user:password@]host:port[,host:port…] (rediss+cluster:// for TLS) \
        or redis+sentinel://[user:password@]host:port[,host:port…]/MASTER_NAME[/db]\
        [?sentinel_password=…]";

    fn check(raw: &String) -> Option<Option<RedisUrl>> {
        parse_optional(raw).ok()
    }

    fn checked<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error>
    where
        WrittenVisitor<String>: Visitor<'de, Value = String>,
    {
        d.deserialize_any(UrlVisitor)
    }

    fn value(key: &str, raw: &String) -> Result<Option<RedisUrl>, ConfigError> {
        parse_optional(raw).map_err(|why| {
            ConfigError::invalid(key, format!("{:?}", redact(raw)), expected_because(why))
        })
    }
}

/// Reads `fleet_redis_url` while figment extracts, refusing a bad URL with
/// its redacted form as the value (figment would show the one it was given).
struct UrlVisitor;

impl Visitor<'_> for UrlVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(RedisUrl::EXPECTED)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        match parse_optional(v) {
            Ok(_) => Ok(v.to_owned()),
            Err(why) => Err(E::invalid_value(
                Unexpected::Str(&redact(v)),
                &expected_because(why).as_str(),
            )),
        }
    }
}

/// `fleet_redis_url` as written: `None` when empty (fleet limits off),
/// else the URL, or why the client refuses it.
fn parse_optional(raw: &str) -> Result<Option<RedisUrl>, &'static str> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    deployment(raw).map(|_| Some(RedisUrl(raw.to_owned())))
}

/// What the URL key accepts, and why this one was refused.
fn expected_because(why: &str) -> String {
    format!("{}; this one is refused: {why}", RedisUrl::EXPECTED)
}

/// Why the Redis client cannot use `text`, or `None` when it can. Parsing
/// does not connect. The crate's error is only matched against its known
/// descriptions, never shown, so no part of the URL comes back through it.
fn refusal(text: &str) -> Option<&'static str> {
    let info = match text.into_connection_info() {
        Ok(info) => info,
        Err(e) => return Some(client_reason(&e.to_string())),
    };
    match info.addr() {
        ConnectionAddr::Tcp(_, 0) | ConnectionAddr::TcpTls { port: 0, .. } => {
            Some("port 0 cannot be connected to")
        }
        // The crate accepts `#insecure` here but refuses it when it builds
        // the TLS client: wsgate is built without `tls-rustls-insecure`.
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            Some("#insecure (TLS without certificate checks) is not built into wsgate")
        }
        _ => None,
    }
}

/// Why the Redis crate refused a URL, in wsgate's words, from the crate's
/// fixed descriptions (`Missing hostname - InvalidClientConfig` → `no host
/// name`); anything else is said generally.
fn client_reason(message: &str) -> &'static str {
    const KNOWN: [(&str, &str); 8] = [
        ("Redis URL did not parse", "not a URL of one of these forms"),
        ("Missing hostname", "no host name"),
        ("Missing path", "no absolute socket path"),
        (
            "Cannot connect to a wildcard address",
            "a wildcard address (0.0.0.0 or ::) cannot be connected to",
        ),
        (
            "only #insecure is supported",
            "the only fragment allowed is #insecure",
        ),
        ("Invalid database number", "the database is not a number"),
        (
            "Invalid protocol version",
            "protocol must be 2, resp2, 3 or resp3",
        ),
        (
            "is not valid UTF-8",
            "the user name or password is not UTF-8 once percent-decoded",
        ),
    ];
    KNOWN
        .iter()
        .find(|(says, _)| message.contains(says))
        .map_or("the Redis client does not take it", |(_, why)| why)
}

/// `text` with every password replaced by `***`: the one in the user
/// information (`redis://user:PASSWORD@host`, also before the hosts of
/// the cluster and sentinel forms), the `pass` (or `password`) query
/// parameter of the Unix form (`unix:///s.sock?pass=…`) and the
/// `sentinel_password` parameter of the sentinel form.
///
/// It works on text that may not be a URL at all (refused values are shown
/// too), so where it cannot tell it hides more rather than less: the user
/// information ends at the *last* `@`; without a `scheme://` in front
/// everything before that `@` is hidden; a password parameter hides the
/// rest of the URL (a `&` or `#` may belong to the password).
fn redact(text: &str) -> String {
    let (head, rest) = match text.find("://") {
        Some(i) if is_scheme(&text[..i]) => text.split_at(i + 3),
        _ => ("", text),
    };
    let mut out = String::from(head);
    let rest = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                _ if head.is_empty() => out.push_str(HIDDEN),
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(HIDDEN);
                }
                // A user name alone: no password to hide.
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    let Some((before, query)) = rest.split_once('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(before);
    out.push('?');
    for (i, param) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let name = param.split_once('=').map_or(param, |(name, _)| name);
        if is_password_param(name) {
            out.push_str(name);
            out.push('=');
            out.push_str(HIDDEN);
            return out;
        }
        out.push_str(param);
    }
    out
}

/// `[A-Za-z][A-Za-z0-9+.-]*`: what may stand before `://`.
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
}

/// A query parameter holding a password (`pass` is the one the client
/// reads, `sentinel_password` wsgate's), however its name is
/// percent-encoded or cased.
fn is_password_param(name: &str) -> bool {
    form_urlencoded::parse(name.as_bytes())
        .next()
        .is_some_and(|(n, _)| {
            ["pass", "password", "sentinel_password"]
                .iter()
                .any(|p| n.eq_ignore_ascii_case(p))
        })
}

/// `fleet_namespace`: it becomes the Redis Cluster hash tag `{namespace}`,
/// so braces, colons and spaces are out.
#[derive(Debug)]
pub(crate) struct Namespace;

impl ValueKind for Namespace {
    type Raw = String;
    type Value = String;
    const EXPECTED: &'static str = "1 to 64 of A-Z, a-z, 0-9, _, . and - \
        (it becomes the Redis Cluster hash tag {namespace}: no braces, colons or spaces)";
    fn check(raw: &String) -> Option<String> {
        let ok = (1..=MAX_NAMESPACE_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        ok.then(|| raw.clone())
    }
}

/// `fleet_max_clients`: unlike `max_clients`, a negative value is an
/// error (there is no old hub to stay compatible with).
#[derive(Debug)]
pub(crate) struct FleetCap;

impl ValueKind for FleetCap {
    type Raw = i64;
    type Value = u32;
    const EXPECTED: &'static str = "a whole number from 0 (off) to 4294967295";
    fn check(raw: &i64) -> Option<u32> {
        u32::try_from(*raw).ok()
    }
}

/// `fleet_lease_ttl`: from [`MIN_LEASE_TTL`] to [`MAX_LEASE_TTL`].
#[derive(Debug)]
pub(crate) struct LeaseTtl;

impl ValueKind for LeaseTtl {
    type Raw = ConfigDuration;
    type Value = Duration;
    const EXPECTED: &'static str =
        "a duration from 3s to 1h such as 30s or 2m (a bare integer means seconds)";
    fn check(raw: &ConfigDuration) -> Option<Duration> {
        (MIN_LEASE_TTL..=MAX_LEASE_TTL)
            .contains(&raw.0)
            .then_some(raw.0)
    }
}

impl ValueKind for FailMode {
    type Raw = String;
    type Value = FailMode;
    const EXPECTED: &'static str = "open or closed";
    fn check(raw: &String) -> Option<FailMode> {
        match raw.as_str() {
            "open" => Some(FailMode::Open),
            "closed" => Some(FailMode::Closed),
            _ => None,
        }
    }
}

/// `fleet_instance_id`: empty = [`default_instance_id`]; otherwise 1 to
/// [`MAX_INSTANCE_ID_LEN`] visible ASCII characters, so it can sit in a
/// Redis key and a log line as it is.
#[derive(Debug)]
pub(crate) struct InstanceId;

impl ValueKind for InstanceId {
    type Raw = String;
    type Value = String;
    const EXPECTED: &'static str = concat!(
        "1 to ",
        max_instance_id_len!(),
        " visible ASCII characters (! to ~), or empty for $HOSTNAME-<8 random hex digits>"
    );
    fn check(raw: &String) -> Option<String> {
        if raw.is_empty() {
            return Some(default_instance_id().to_owned());
        }
        let ok = raw.len() <= MAX_INSTANCE_ID_LEN && raw.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| raw.clone())
    }
}

/// This process's instance id when none is set: drawn once, so every
/// reload keeps it (a new id would orphan the holds of the old one until
/// they expire).
fn default_instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        instance_id_for(
            std::env::var("HOSTNAME").ok().as_deref(),
            rand::random::<u32>(),
        )
    })
}

/// `HOSTNAME-suffix` in 8 lowercase hex digits; `wsgate-…` when the host
/// name is unset or empty. A host name is cut to what keeps the id within
/// [`InstanceId`]'s bounds (visible ASCII, at most 128 characters).
fn instance_id_for(hostname: Option<&str>, suffix: u32) -> String {
    let host: String = hostname
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(MAX_INSTANCE_ID_LEN - 9)
        .collect();
    let host = if host.is_empty() { "wsgate" } else { &host };
    format!("{host}-{suffix:08x}")
}

/// The seven keys, each through its kind, and the rules between them.
///
/// # Errors
/// The first key whose value is not acceptable.
pub(super) fn settings(raw: &RawConfig) -> Result<Option<FleetSettings>, ConfigError> {
    let (url, settings) = every_key(raw)?;
    Ok(url.map(|redis_url| FleetSettings {
        redis_url,
        ..settings
    }))
}

/// What `check-config` prints while fleet limits are off: an empty URL and
/// the defaults of the rest (the instance id as it would be).
pub(super) fn shown_when_off() -> FleetSettings {
    every_key(&RawConfig::default())
        .expect("invariant: the built-in defaults of the fleet keys are valid")
        .1
}

/// The URL (`None` = off) and the settings with an empty URL in its place.
fn every_key(raw: &RawConfig) -> Result<(Option<RedisUrl>, FleetSettings), ConfigError> {
    let url = RedisUrl::value("fleet_redis_url", &raw.fleet_redis_url)?;
    let settings = FleetSettings {
        redis_url: RedisUrl(String::new()),
        namespace: Namespace::value("fleet_namespace", &raw.fleet_namespace)?,
        max_clients: FleetCap::value("fleet_max_clients", &raw.fleet_max_clients)?,
        lease_ttl: LeaseTtl::value("fleet_lease_ttl", &raw.fleet_lease_ttl)?,
        timeout: PositiveDuration::value("fleet_timeout", &raw.fleet_timeout)?,
        fail_mode: FailMode::value("fleet_fail_mode", &raw.fleet_fail_mode)?,
        instance_id: InstanceId::value("fleet_instance_id", &raw.fleet_instance_id)?,
    };
    // A renewal runs every third of the lease and may take the whole
    // timeout: it must end before the next one is due.
    if settings.timeout.saturating_mul(3) >= settings.lease_ttl {
        return Err(ConfigError::Invalid {
            key: "fleet_timeout".into(),
            value: humantime(settings.timeout),
            source_hint: format!(
                " (fleet_lease_ttl {} / 3 = {})",
                humantime(settings.lease_ttl),
                humantime(settings.lease_ttl / 3)
            ),
            expected: "a duration below fleet_lease_ttl / 3, the interval between renewals \
                (raise fleet_lease_ttl or lower fleet_timeout)"
                .into(),
        });
    }
    if settings.max_clients > 0 && url.is_none() {
        return Err(ConfigError::Invalid {
            key: "fleet_max_clients".into(),
            value: settings.max_clients.to_string(),
            source_hint: " (fleet_redis_url is not set)".into(),
            expected:
                "0: a fleet-wide cap needs fleet_redis_url (docs/operations.md#fleet-wide-limits)"
                    .into(),
        });
    }
    Ok((url, settings))
}

/// A duration as messages show it (`1m 30s`).
fn humantime(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_the_client_takes_is_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://redis.default.svc:6379/2",
            "redis://:s3cret@redis:6379/0",
            "redis://app:s3cret@redis",
            "redis://[::1]:6380",
            "rediss://redis.example:6380",
            "unix:///run/redis/redis.sock",
            "unix:///run/redis/redis.sock?pass=s3cret&db=1",
            "redis+unix:///run/redis.sock",
            "valkey://valkey:6379",
            "valkeys://valkey:6380",
            "valkey+unix:///run/valkey.sock",
            "redis://redis?protocol=resp3",
        ] {
            let parsed = RedisUrl::parse(url).expect(url);
            assert_eq!(parsed.as_str(), url, "kept as written");
        }
    }

    #[test]
    fn urls_the_client_refuses_are_refused_with_why() {
        for (url, why) in [
            ("http://redis:6379", "not a URL"),
            ("redis:6379", "no host name"),
            ("redis.internal:6379", "not a URL"),
            ("redis://", "no host name"),
            ("redis://0.0.0.0:6379", "wildcard"),
            ("redis://redis:6379/zero", "database"),
            ("redis://redis:99999", "not a URL"),
            ("redis://redis:0", "port 0"),
            ("redis://redis?protocol=4", "protocol"),
            ("rediss://redis/#insecure", "#insecure"),
            ("rediss://redis/#other", "fragment"),
            ("unix://relative.sock", "socket path"),
        ] {
            let e = RedisUrl::parse(url).expect_err(url).to_string();
            assert!(
                e.contains("fleet_redis_url = ") && e.contains(why) && e.contains("expected"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn passwords_are_hidden_wherever_the_url_is_shown() {
        for (url, shown) in [
            ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
            ("redis://app:s3cret@redis", "redis://app:***@redis"),
            ("redis://app@redis", "redis://app@redis"),
            ("redis://:s3@c:ret@redis", "redis://:***@redis"),
            (
                "rediss://u:%40s3cret@redis:6380",
                "rediss://u:***@redis:6380",
            ),
            (
                "unix:///run/r.sock?db=1&pass=s3cret",
                "unix:///run/r.sock?db=1&pass=***",
            ),
            (
                "unix:///run/r.sock?p%61ss=s3cret&db=1",
                "unix:///run/r.sock?p%61ss=***",
            ),
            (
                "unix:///run/r.sock?PASSWORD=s3cret",
                "unix:///run/r.sock?PASSWORD=***",
            ),
            ("redis://redis:6379", "redis://redis:6379"),
            // Not URLs: hide whatever might be a password.
            ("app:s3cret@redis:6379", "***@redis:6379"),
            (":x://s3cret@redis", "***@redis"),
            ("redis://:s3cret/x@redis", "redis://:***@redis"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
        let url = RedisUrl(String::from("redis://app:s3cret@redis:6379"));
        for text in [
            format!("{url:?}"),
            url.to_string(),
            url.redacted(),
            toml::Value::try_from(&url).expect("serialise").to_string(),
        ] {
            assert!(
                !text.contains("s3cret") && text.contains("app:***@redis"),
                "{text}"
            );
        }
        assert_eq!(url.as_str(), "redis://app:s3cret@redis:6379");
    }

    #[test]
    fn cluster_and_sentinel_forms_are_parsed() {
        let url = RedisUrl::parse("redis+cluster://app:s%40cret@10.0.0.1:7000,redis-1,[::1]:7002/")
            .expect("cluster");
        let Ok(Deployment::Cluster(nodes)) = url.deployment() else {
            panic!("a cluster: {url:?}");
        };
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:7000", "redis-1:6379", "::1:7002"]);
        for n in &nodes {
            assert_eq!(n.redis_settings().username(), Some("app"));
            assert_eq!(
                n.redis_settings().password(),
                Some("s@cret"),
                "percent-decoded"
            );
        }
        let tls = RedisUrl::parse("rediss+cluster://redis:7000").expect("TLS cluster");
        assert!(tls.uses_tls());
        assert!(matches!(
            tls.deployment(),
            Ok(Deployment::Cluster(n)) if matches!(n[0].addr(), ConnectionAddr::TcpTls { .. })
        ));
        assert!(!url.uses_tls());

        let url = RedisUrl::parse(
            "redis+sentinel://:data%21pw@s1:26380,s2,[::1]:5000/mymaster/2?sentinel_password=s%20pw",
        )
        .expect("sentinel");
        let Ok(Deployment::Sentinel(t)) = url.deployment() else {
            panic!("a sentinel: {url:?}");
        };
        assert_eq!(
            t.sentinels,
            [
                ("s1".to_owned(), 26380),
                ("s2".to_owned(), 26379),
                ("::1".to_owned(), 5000)
            ]
        );
        assert_eq!((t.master.as_str(), t.db), ("mymaster", 2));
        assert_eq!(t.username, None);
        assert_eq!(
            t.password.as_deref(),
            Some("data!pw"),
            "the data nodes' password"
        );
        assert_eq!(t.sentinel_password.as_deref(), Some("s pw"));
        let Ok(Deployment::Sentinel(t)) = RedisUrl::parse("redis+sentinel://s1:26379/m")
            .expect("minimal")
            .deployment()
        else {
            panic!("a sentinel");
        };
        assert_eq!((t.db, t.password, t.sentinel_password), (0, None, None));
        let shown = format!("{:?}", url.deployment());
        assert!(!shown.contains("pw"), "{shown}");
    }

    #[test]
    fn cluster_and_sentinel_urls_are_refused_with_why() {
        for (url, why) in [
            ("redis+cluster://", "no host name"),
            ("redis+cluster://a:7000,,b:7001", "no host name"),
            ("redis+cluster://a:7000,0.0.0.0:7001", "wildcard"),
            ("redis+cluster://a:0", "port 0"),
            ("redis+cluster://a:7000/1", "database 0"),
            ("redis+cluster://a:7000?protocol=3", "query"),
            ("redis+sentinel://s1:26379", "MASTER_NAME"),
            ("redis+sentinel://s1:26379/", "MASTER_NAME"),
            ("redis+sentinel://s1:26379/m/x", "database"),
            ("redis+sentinel://s1:26379/m/1/2", "/MASTER_NAME/db"),
            ("redis+sentinel://s1:26379/m?pass=x", "sentinel_password"),
            ("redis+sentinel://s1:26379/m#x", "fragment"),
            ("redis+sentinel://s1:99999/m", "not a URL"),
        ] {
            let e = RedisUrl::parse(url).expect_err(url).to_string();
            assert!(
                e.contains("fleet_redis_url = ") && e.contains(why) && e.contains("expected"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn passwords_of_every_host_list_form_are_hidden() {
        for (url, shown) in [
            (
                "redis+cluster://app:s3cret@a:7000,b:7001,c:7002",
                "redis+cluster://app:***@a:7000,b:7001,c:7002",
            ),
            (
                "rediss+cluster://:s3cret@a:7000,b:7001",
                "rediss+cluster://:***@a:7000,b:7001",
            ),
            (
                "redis+sentinel://:s3cret@s1:26379,s2:26379/mymaster/1",
                "redis+sentinel://:***@s1:26379,s2:26379/mymaster/1",
            ),
            (
                "redis+sentinel://s1:26379,s2:26379/m?sentinel_password=s3cret",
                "redis+sentinel://s1:26379,s2:26379/m?sentinel_password=***",
            ),
            (
                "redis+sentinel://u:s3cret@s1,s2/m?Sentinel_Password=s3cret",
                "redis+sentinel://u:***@s1,s2/m?Sentinel_Password=***",
            ),
            (
                "redis+cluster://a:7000,b:7001",
                "redis+cluster://a:7000,b:7001",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
        for url in [
            "redis+cluster://:s3cret@a:7000,0.0.0.0:1",
            "redis+sentinel://:s3cret@s1/m/x?sentinel_password=s3cret",
            "redis+sentinel://s1/m?sentinel_password=s3cret&other=1",
        ] {
            let e = RedisUrl::parse(url).expect_err(url);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
        }
    }

    #[test]
    fn refusals_never_echo_the_password() {
        for url in [
            "redis://:s3cret@0.0.0.0:6379",
            "redis://:s3cret@redis:6379/zero",
            "redis://:s3cret/x@redis",
            "redis://:s3cret@redis?protocol=4",
            "rediss://:s3cret@redis/#insecure",
            "http://:s3cret@redis",
            "unix://rel?pass=s3cret",
        ] {
            let e = RedisUrl::parse(url).expect_err(url);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
            let e = RedisUrl::value("fleet_redis_url", &url.to_owned()).expect_err(url);
            assert_eq!(
                e.to_string(),
                RedisUrl::parse(url).expect_err(url).to_string()
            );
        }
    }

    #[test]
    fn empty_url_is_off() {
        assert_eq!(
            RedisUrl::value("fleet_redis_url", &String::new()).ok(),
            Some(None)
        );
        assert_eq!(
            RedisUrl::value("fleet_redis_url", &" ".to_owned()).ok(),
            Some(None)
        );
        assert!(RedisUrl::parse("").is_err(), "parse wants a URL");
    }

    #[test]
    fn namespace_is_a_hash_tag_of_safe_characters() {
        for ok in ["wsgate", "a", "Prod_eu-1.chat", &"n".repeat(64)] {
            assert_eq!(Namespace::check(&ok.to_owned()).as_deref(), Some(ok));
        }
        for bad in ["", "a b", "a:b", "{a}", "a}", "é", "a/b", &"n".repeat(65)] {
            assert_eq!(Namespace::check(&bad.to_owned()), None, "{bad}");
        }
    }

    #[test]
    fn fleet_cap_is_a_whole_number_from_zero() {
        assert_eq!(FleetCap::check(&0), Some(0));
        assert_eq!(FleetCap::check(&4_294_967_295), Some(u32::MAX));
        assert_eq!(FleetCap::check(&-1), None);
        assert_eq!(FleetCap::check(&4_294_967_296), None);
    }

    #[test]
    fn lease_ttl_runs_from_3s_to_1h() {
        let d = |ms| ConfigDuration(Duration::from_millis(ms));
        assert_eq!(LeaseTtl::check(&d(3000)), Some(Duration::from_secs(3)));
        assert_eq!(
            LeaseTtl::check(&d(3_600_000)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(LeaseTtl::check(&d(2999)), None);
        assert_eq!(LeaseTtl::check(&d(3_600_001)), None);
        assert_eq!(LeaseTtl::check(&d(0)), None);
    }

    #[test]
    fn fail_mode_is_open_or_closed() {
        assert_eq!(FailMode::check(&"open".into()), Some(FailMode::Open));
        assert_eq!(FailMode::check(&"closed".into()), Some(FailMode::Closed));
        assert_eq!(FailMode::check(&"Open".into()), None);
        assert_eq!(FailMode::check(&"".into()), None);
    }

    #[test]
    fn instance_id_is_visible_ascii_up_to_128() {
        for ok in ["a", "pod-7f9c", "!~", &"i".repeat(128)] {
            assert_eq!(InstanceId::check(&ok.to_owned()).as_deref(), Some(ok));
        }
        for bad in ["a b", "tab\t", "é", &"i".repeat(129)] {
            assert_eq!(InstanceId::check(&bad.to_owned()), None, "{bad}");
        }
        let drawn = InstanceId::check(&String::new()).expect("default");
        assert_eq!(drawn, default_instance_id(), "drawn once per process");
        assert_eq!(InstanceId::check(&drawn), Some(drawn.clone()));
    }

    #[test]
    fn default_instance_id_is_hostname_and_8_hex_digits() {
        assert_eq!(
            instance_id_for(Some("wsgate-7d9f-x2"), 0xab),
            "wsgate-7d9f-x2-000000ab"
        );
        assert_eq!(instance_id_for(None, 0xdead_beef), "wsgate-deadbeef");
        assert_eq!(instance_id_for(Some(""), 1), "wsgate-00000001");
        assert_eq!(instance_id_for(Some("odd host"), 1), "oddhost-00000001");
        let long = instance_id_for(Some(&"h".repeat(300)), 1);
        assert_eq!(long.len(), 128);
        assert!(InstanceId::check(&long).is_some());
        let id = default_instance_id();
        let (_, hex) = id.rsplit_once('-').expect("a dash before the suffix");
        assert!(
            hex.len() == 8
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{id}"
        );
    }
}
