//! The kinds of value a key takes: what each accepts, and the check.
//!
//! Each kind ([`ValueKind`]) says once, in [`ValueKind::EXPECTED`], what it
//! accepts, and checks a value in [`ValueKind::check`]. A [`RawConfig`]
//! field names its kind in `#[serde(deserialize_with = "Kind::checked")]`,
//! so a value refused while the file and environment are read is reported
//! by figment with the key, the value as written, where it came from and
//! that text; `Config::validate` calls [`ValueKind::value`] with the same
//! check for a [`RawConfig`] built in code. Neither the text nor the check
//! is repeated per key.
//!
//! Durations are kinds too; they live in `duration.rs` with the parser.
//!
//! [`RawConfig`]: super::RawConfig

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// A kind of configuration value: what it accepts and how it is checked.
pub(crate) trait ValueKind: Sized {
    /// How the value is held in [`RawConfig`](super::RawConfig).
    type Raw: Written;
    /// What [`Config`](super::Config) keeps once the value is accepted.
    type Value;
    /// What is accepted, as error messages give it after "expected".
    const EXPECTED: &'static str;

    /// The value wsgate uses, or `None` when `raw` is not acceptable.
    fn check(raw: &Self::Raw) -> Option<Self::Value>;

    /// For `#[serde(deserialize_with)]`: reads a field of this kind,
    /// refusing (with [`Self::EXPECTED`]) a value of the wrong type or one
    /// that [`Self::check`] refuses.
    fn checked<'de, D: Deserializer<'de>>(d: D) -> Result<Self::Raw, D::Error>
    where
        WrittenVisitor<Self::Raw>: Visitor<'de, Value = Self::Raw>,
    {
        d.deserialize_any(WrittenVisitor {
            expected: Self::EXPECTED,
            accept: |raw| Self::check(raw).is_some(),
        })
    }

    /// [`Self::checked`] for an optional field (unset = `None`).
    fn checked_optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Self::Raw>, D::Error>
    where
        WrittenVisitor<Self::Raw>: Visitor<'de, Value = Self::Raw>,
    {
        /// Unset stays `None`; anything else is read as the kind.
        struct OptionVisitor<K>(PhantomData<K>);
        impl<'de, K: ValueKind> Visitor<'de> for OptionVisitor<K>
        where
            WrittenVisitor<K::Raw>: Visitor<'de, Value = K::Raw>,
        {
            type Value = Option<K::Raw>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(K::EXPECTED)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                K::checked(d).map(Some)
            }
        }
        d.deserialize_option(OptionVisitor::<Self>(PhantomData))
    }

    /// The value `key` has in [`Config`](super::Config).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `key`, `raw` and [`Self::EXPECTED`].
    fn value(key: &str, raw: &Self::Raw) -> Result<Self::Value, ConfigError> {
        Self::check(raw).ok_or_else(|| ConfigError::invalid(key, raw.shown(), Self::EXPECTED))
    }
}

/// A type a value is held as in [`RawConfig`](super::RawConfig). It is
/// read by [`WrittenVisitor`], with the expected text of the key's kind
/// instead of serde's ("i64", "a boolean").
pub(crate) trait Written: Sized {
    /// The value as an error message shows it.
    fn shown(&self) -> String;
}

/// Reads one value of type `T` as written; serde's default `visit_*`
/// methods refuse every other type with [`Self::expected`]. One `Visitor`
/// impl per [`Written`] type says which forms of it are accepted.
pub(crate) struct WrittenVisitor<T> {
    /// What the key accepts.
    pub(crate) expected: &'static str,
    /// The kind's check.
    pub(crate) accept: fn(&T) -> bool,
}

impl<T> WrittenVisitor<T> {
    /// `value` if it was read and is accepted; otherwise an error showing
    /// the value as it was written.
    pub(crate) fn keep<E: de::Error>(
        &self,
        value: Option<T>,
        as_written: Unexpected<'_>,
    ) -> Result<T, E> {
        value
            .filter(|v| (self.accept)(v))
            .ok_or_else(|| E::invalid_value(as_written, &self.expected))
    }
}

impl<'de> Visitor<'de> for WrittenVisitor<i64> {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        self.keep(Some(v), Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        self.keep(i64::try_from(v).ok(), Unexpected::Unsigned(v))
    }
}

impl Written for i64 {
    fn shown(&self) -> String {
        self.to_string()
    }
}

impl<'de> Visitor<'de> for WrittenVisitor<f64> {
    type Value = f64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        self.keep(Some(v), Unexpected::Float(v))
    }
    // `1` is a number too: TOML and the environment write whole numbers
    // without a decimal point.
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        self.keep(Some(v as f64), Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        self.keep(Some(v as f64), Unexpected::Unsigned(v))
    }
}

impl Written for f64 {
    fn shown(&self) -> String {
        self.to_string()
    }
}

impl<'de> Visitor<'de> for WrittenVisitor<bool> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.keep(Some(v), Unexpected::Bool(v))
    }
}

impl Written for bool {
    fn shown(&self) -> String {
        self.to_string()
    }
}

impl<'de> Visitor<'de> for WrittenVisitor<String> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.keep(Some(v.to_owned()), Unexpected::Str(v))
    }
    // figment reads `WSGATE_FLEET_NAMESPACE=2024` as a number: a text key
    // takes the digits as written.
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.keep(Some(v.to_string()), Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.keep(Some(v.to_string()), Unexpected::Unsigned(v))
    }
}

impl Written for String {
    fn shown(&self) -> String {
        format!("{self:?}")
    }
}

/// An address to listen on (`listen`, `admin_listen`).
#[derive(Debug)]
pub(crate) struct ListenAddress;

impl ValueKind for ListenAddress {
    type Raw = String;
    type Value = SocketAddr;
    const EXPECTED: &'static str = "an IP socket address such as 0.0.0.0:8080 or [::]:8080";
    fn check(raw: &String) -> Option<SocketAddr> {
        raw.trim().parse().ok()
    }
}

/// Where the upstream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// How wsgate reaches it.
    pub endpoint: Endpoint,
    /// What goes into URIs and `Host` headers: `host:port` (IPv6
    /// bracketed); `localhost` for a Unix socket (docs/operations.md#unix-socket-upstream), which has no
    /// host name of its own.
    pub authority: String,
}

/// The address wsgate connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP to a host and port.
    Tcp {
        /// Host name or IP literal (without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket at this absolute path.
    Unix(PathBuf),
}

/// The prefix of the Unix socket form (`unix:/run/app/ws.sock`).
const UNIX_PREFIX: &str = "unix:";

/// The longest socket path: `sun_path` holds 108 bytes on Linux, the last
/// of them the terminating NUL. A longer path cannot be connected to at
/// all, so it is refused at start-up rather than on every upgrade.
const MAX_UNIX_PATH: usize = 107;

/// The `Host` a Unix upstream gets when the client sent none.
const UNIX_AUTHORITY: &str = "localhost";

impl Upstream {
    /// Parses `host:port`, `http://host:port` (a trailing `/` is allowed)
    /// or `unix:/absolute/path`.
    ///
    /// # Errors
    /// Returns a message saying what is wrong when the text is not of one
    /// of those forms.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(path) = t.strip_prefix(UNIX_PREFIX) {
            return Self::unix(path);
        }
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
            endpoint: Endpoint::Tcp {
                host: host.to_owned(),
                port,
            },
            authority: uri.as_str().to_owned(),
        })
    }

    /// The Unix socket form, from what follows `unix:`.
    fn unix(path: &str) -> Result<Self, String> {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        if !path.starts_with('/') {
            return Err("the socket path must be absolute".into());
        }
        if path.contains('\0') {
            return Err("the socket path cannot contain NUL".into());
        }
        if path.len() > MAX_UNIX_PATH {
            return Err(format!(
                "the socket path is {} bytes, over the {MAX_UNIX_PATH} a Unix socket takes",
                path.len()
            ));
        }
        Ok(Upstream {
            endpoint: Endpoint::Unix(PathBuf::from(path)),
            authority: UNIX_AUTHORITY.to_owned(),
        })
    }

    /// Whether connecting to this upstream reaches a socket listening on
    /// `addr`: the same port, on `addr`'s own IP, or on a loopback or
    /// wildcard address that `addr` accepts connections for. `localhost`
    /// counts as loopback without asking DNS; other names are not resolved
    /// (whether one leads to this very pod cannot be known at start-up).
    pub fn reaches(&self, addr: SocketAddr) -> bool {
        let Endpoint::Tcp { host, port } = &self.endpoint else {
            return false;
        };
        if *port != addr.port() {
            return false;
        }
        let listen = addr.ip().to_canonical();
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.eq_ignore_ascii_case("localhost") {
            return [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
                .into_iter()
                .any(|ip| accepts(listen, ip));
        }
        host.parse::<IpAddr>()
            .is_ok_and(|ip| accepts(listen, ip.to_canonical()))
    }

    /// The upstream as configuration writes it: `host:port`, or
    /// `unix:/path` (`check-config`, logs).
    pub fn shown(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp { .. } => self.authority.clone(),
            Endpoint::Unix(path) => format!("{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Whether a socket listening on `listen` gets a connection made to
/// `target`. Linux connects a wildcard target (`0.0.0.0`, `::`) to the
/// host itself, as loopback; `0.0.0.0` listens on every IPv4 address of
/// the host, `::` on every address of both families (IPv6 sockets accept
/// IPv4 too unless `net.ipv6.bindv6only` is set).
fn accepts(listen: IpAddr, target: IpAddr) -> bool {
    let target = match target {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    match listen {
        _ if listen == target => true,
        IpAddr::V4(ip) if ip.is_unspecified() => target.is_ipv4() && target.is_loopback(),
        IpAddr::V6(ip) if ip.is_unspecified() => target.is_loopback(),
        _ => false,
    }
}

impl ValueKind for Upstream {
    type Raw = String;
    type Value = Upstream;
    const EXPECTED: &'static str =
        "host:port or http://host:port with a non-zero port (https:// is not supported), \
         or unix:/absolute/path to a Unix socket (at most 107 bytes)";
    fn check(raw: &String) -> Option<Upstream> {
        Upstream::parse(raw).ok()
    }
}

/// The cap on concurrent WebSocket connections (`max_clients`). A negative
/// cap is taken as 0 for the original hub's sake (`Config::validate`
/// warns).
#[derive(Debug)]
pub(crate) struct Cap;

impl ValueKind for Cap {
    type Raw = i64;
    type Value = usize;
    const EXPECTED: &'static str = "a whole number (0 = unlimited; negative is taken as 0)";
    fn check(raw: &i64) -> Option<usize> {
        usize::try_from((*raw).max(0)).ok()
    }
}

/// A count: a whole number, 0 or more.
#[derive(Debug)]
pub(crate) struct WholeNumber;

impl ValueKind for WholeNumber {
    type Raw = i64;
    type Value = usize;
    const EXPECTED: &'static str = "a whole number >= 0";
    fn check(raw: &i64) -> Option<usize> {
        usize::try_from(*raw).ok()
    }
}

/// The most `max_plain_requests` accepted: Linux's default `fs.nr_open`,
/// the most descriptors a process may have unless the host raises it. A cap
/// above what can ever be open protects nothing: it is a typo.
pub const MAX_PLAIN_REQUESTS: usize = 1 << 20;

/// `max_plain_requests`: plain requests in flight (docs/behaviour.md#slow-request-bodies).
#[derive(Debug)]
pub(crate) struct PlainRequests;

impl ValueKind for PlainRequests {
    type Raw = i64;
    type Value = usize;
    const EXPECTED: &'static str = "a whole number from 0 to 1048576 (0 = unlimited)";
    fn check(raw: &i64) -> Option<usize> {
        usize::try_from(*raw)
            .ok()
            .filter(|n| *n <= MAX_PLAIN_REQUESTS)
    }
}

/// `workers`: how many threads run connections. More than the machine
/// could ever use is a typo, not a wish.
#[derive(Debug)]
pub(crate) struct Workers;

/// The most `workers` accepted.
const MAX_WORKERS: i64 = 256;

impl ValueKind for Workers {
    type Raw = i64;
    type Value = usize;
    const EXPECTED: &'static str =
        "a whole number from 0 to 256 (1 = one thread, 0 = one per available CPU)";
    fn check(raw: &i64) -> Option<usize> {
        (0..=MAX_WORKERS)
            .contains(raw)
            .then(|| usize::try_from(*raw).ok())
            .flatten()
    }
}

/// A fraction of something (watermarks, jitter).
#[derive(Debug)]
pub(crate) struct Fraction;

impl ValueKind for Fraction {
    type Raw = f64;
    type Value = f64;
    const EXPECTED: &'static str = "a fraction from 0 to 1";
    fn check(raw: &f64) -> Option<f64> {
        (raw.is_finite() && (0.0..=1.0).contains(raw)).then_some(*raw)
    }
}

/// A rate: any finite number, 0 or more.
#[derive(Debug)]
pub(crate) struct NonNegative;

impl ValueKind for NonNegative {
    type Raw = f64;
    type Value = f64;
    const EXPECTED: &'static str = "a number >= 0 (0 = off)";
    fn check(raw: &f64) -> Option<f64> {
        (raw.is_finite() && *raw >= 0.0).then_some(*raw)
    }
}

/// A switch.
#[derive(Debug)]
pub(crate) struct TrueOrFalse;

impl ValueKind for TrueOrFalse {
    type Raw = bool;
    type Value = bool;
    const EXPECTED: &'static str = "true or false";
    fn check(raw: &bool) -> Option<bool> {
        Some(*raw)
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

impl ValueKind for LogFormat {
    type Raw = String;
    type Value = LogFormat;
    const EXPECTED: &'static str = "text or json";
    fn check(raw: &String) -> Option<LogFormat> {
        match raw.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The status of a Close frame wsgate sends (docs/behaviour.md#close-frames).
#[derive(Debug)]
pub(crate) struct CloseCode;

impl ValueKind for CloseCode {
    type Raw = i64;
    type Value = u16;
    const EXPECTED: &'static str =
        "a WebSocket close code: 1000-1014 except 1004-1006, or 3000-4999";
    fn check(raw: &i64) -> Option<u16> {
        u16::try_from(*raw)
            .ok()
            .filter(|c| crate::frames::is_valid_close_code(*c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        let u = Upstream::parse("http://app:3000/").expect("valid");
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "app".into(),
                port: 3000
            }
        );
        let u = Upstream::parse("[::1]:80").expect("valid");
        assert_eq!(u.authority, "[::1]:80");
        assert!(matches!(&u.endpoint, Endpoint::Tcp { host, .. } if host == "::1"));
        assert!(Upstream::parse("app").is_err());
        assert!(Upstream::parse("app:0").is_err());
        assert!(Upstream::parse("app:3000/path").is_err());
        assert!(Upstream::parse("ws://app:1").is_err());
    }

    /// docs/configuration.md: an upstream that is wsgate's own port would
    /// forward every request to wsgate again.
    #[test]
    fn an_upstream_on_wsgate_own_port_is_found() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect(s);
        let up = |s: &str| Upstream::parse(s).expect(s);
        for (upstream, listen) in [
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("127.0.0.2:8080", "0.0.0.0:8080"),
            ("http://127.0.0.1:8080/", "0.0.0.0:8080"),
            ("localhost:8080", "0.0.0.0:8080"),
            ("LOCALHOST.:8080", "127.0.0.1:8080"),
            ("localhost:8080", "[::1]:8080"),
            ("localhost:8080", "[::]:8080"),
            ("[::1]:8080", "[::]:8080"),
            ("[::1]:8080", "[::1]:8080"),
            ("127.0.0.1:8080", "[::]:8080"),
            ("[::ffff:127.0.0.1]:8080", "0.0.0.0:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "0.0.0.0:8080"),
            ("[::]:9090", "[::1]:9090"),
            ("10.1.2.3:8080", "10.1.2.3:8080"),
        ] {
            assert!(up(upstream).reaches(addr(listen)), "{upstream} vs {listen}");
        }
        for (upstream, listen) in [
            ("127.0.0.1:3000", "0.0.0.0:8080"),
            ("localhost:3000", "0.0.0.0:8080"),
            ("app:8080", "0.0.0.0:8080"),
            ("localhostx:8080", "0.0.0.0:8080"),
            ("10.1.2.3:8080", "0.0.0.0:8080"),
            ("10.1.2.3:8080", "127.0.0.1:8080"),
            ("127.0.0.2:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "0.0.0.0:8080"),
            ("localhost:8080", "127.0.0.2:8080"),
            ("127.0.0.1:8080", "127.0.0.1:0"),
            ("unix:/run/app/ws.sock", "0.0.0.0:8080"),
        ] {
            assert!(
                !up(upstream).reaches(addr(listen)),
                "{upstream} vs {listen}"
            );
        }
    }

    #[test]
    fn unix_socket_upstream() {
        let u = Upstream::parse("unix:/run/app/ws.sock").expect("valid");
        assert_eq!(u.endpoint, Endpoint::Unix("/run/app/ws.sock".into()));
        assert_eq!(
            u.authority, "localhost",
            "the Host when the client sent none"
        );
        assert_eq!(u.shown(), "unix:/run/app/ws.sock", "printed back as given");
        assert_eq!(
            Upstream::parse("app:3000").expect("valid").shown(),
            "app:3000"
        );
        // Exactly the sun_path limit, and one byte over it.
        let longest = format!("/{}", "a".repeat(MAX_UNIX_PATH - 1));
        assert!(Upstream::parse(&format!("unix:{longest}")).is_ok());
        let too_long = Upstream::parse(&format!("unix:{longest}a")).expect_err("108 bytes");
        assert!(too_long.contains("108 bytes"), "{too_long}");
        for (bad, why) in [
            ("unix:", "needs a socket path"),
            ("unix:run/app/ws.sock", "absolute"),
            ("unix:./ws.sock", "absolute"),
            ("unix:/run/a\0b", "NUL"),
        ] {
            let e = Upstream::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        // The URL spelling other tools use names the same file (the kernel
        // reads `///run` as `/run`) and is printed back as written.
        let url = Upstream::parse("unix:///run/app/ws.sock").expect("an absolute path");
        assert_eq!(url.shown(), "unix:///run/app/ws.sock");
        assert!(Upstream::check(&"unix:ws.sock".to_owned()).is_none());
        assert!(Upstream::EXPECTED.contains("unix:/absolute/path"));
    }
}
