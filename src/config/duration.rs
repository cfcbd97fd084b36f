//! Durations as configuration writes them, and the kinds of duration a key takes.
//!
//! docs/configuration.md: `250ms`, `5s`, `2m` (humantime), or a bare integer meaning
//! seconds. Every duration is at most [`MAX_DURATION`]: durations are added
//! to instants (deadlines), and past that bound they could overflow and
//! panic, while no timeout here needs more.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

use super::values::{ValueKind, Written, WrittenVisitor};

/// The longest duration any key accepts.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a plain duration key accepts.
const DURATION: &str =
    "a duration such as 250ms, 5s or 2m (a bare integer means seconds), at most 10 years";

/// A duration as written in configuration: humantime text or whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AnyDuration::checked(d)
    }
}

impl<'de> Visitor<'de> for WrittenVisitor<ConfigDuration> {
    type Value = ConfigDuration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigDuration, E> {
        self.keep(
            Some(ConfigDuration(Duration::from_secs(v))),
            Unexpected::Unsigned(v),
        )
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigDuration, E> {
        let secs = u64::try_from(v).ok();
        self.keep(
            secs.map(|s| ConfigDuration(Duration::from_secs(s))),
            Unexpected::Signed(v),
        )
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigDuration, E> {
        let t = v.trim();
        let parsed = match t.parse::<u64>() {
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => humantime::parse_duration(t).ok(),
        };
        self.keep(parsed.map(ConfigDuration), Unexpected::Str(v))
    }
}

impl Written for ConfigDuration {
    fn shown(&self) -> String {
        humantime::format_duration(self.0).to_string()
    }
}

/// Any duration up to the bound, zero included.
#[derive(Debug)]
pub(crate) struct AnyDuration;

impl ValueKind for AnyDuration {
    type Raw = ConfigDuration;
    type Value = Duration;
    const EXPECTED: &'static str = DURATION;
    fn check(raw: &ConfigDuration) -> Option<Duration> {
        (raw.0 <= MAX_DURATION).then_some(raw.0)
    }
}

/// A deadline that must be able to pass: zero is refused.
#[derive(Debug)]
pub(crate) struct PositiveDuration;

impl ValueKind for PositiveDuration {
    type Raw = ConfigDuration;
    type Value = Duration;
    const EXPECTED: &'static str =
        "a duration greater than zero such as 250ms, 5s or 2m (a bare integer means seconds), at most 10 years";
    fn check(raw: &ConfigDuration) -> Option<Duration> {
        AnyDuration::check(raw).filter(|d| !d.is_zero())
    }
}

/// A limit that 0 turns off.
#[derive(Debug)]
pub(crate) struct OffOrDuration;

impl ValueKind for OffOrDuration {
    type Raw = ConfigDuration;
    type Value = Option<Duration>;
    const EXPECTED: &'static str =
        "0s (off) or a duration such as 250ms, 5s or 2m (a bare integer means seconds), at most 10 years";
    fn check(raw: &ConfigDuration) -> Option<Option<Duration>> {
        AnyDuration::check(raw).map(|d| (!d.is_zero()).then_some(d))
    }
}

/// TCP keepalive idle time and `TCP_USER_TIMEOUT`. The kernel takes
/// keepalive times in whole seconds from 1 to 32767; anything else would be
/// refused by setsockopt and silently leave the kernel's two-hour default in
/// force, so it is refused here.
#[derive(Debug)]
pub(crate) struct Keepalive;

impl ValueKind for Keepalive {
    type Raw = ConfigDuration;
    type Value = Option<Duration>;
    const EXPECTED: &'static str =
        "0s (off) or whole seconds from 1s to 32767s (the kernel's range for keepalive)";
    fn check(raw: &ConfigDuration) -> Option<Option<Duration>> {
        let d = raw.0;
        if d.is_zero() {
            Some(None)
        } else if d.subsec_nanos() == 0 && (1..=32_767).contains(&d.as_secs()) {
            Some(Some(d))
        } else {
            None
        }
    }
}
