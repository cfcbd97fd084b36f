//! The effective configuration as TOML, for `wsgate check-config`.
//!
//! [`Config`] is serialised through the `toml` crate, so a new key is
//! printed without code here. The helpers below give the few typed fields
//! whose form differs from what is written their written form again:
//! durations in humantime (`1m 30s`), "off" as `0s` or `0`, the upstream as
//! `host:port`. The output is itself a configuration file that loads to the
//! same values (tested below), every key with the value wsgate uses.

use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};

use super::{Config, RateLimit, Upstream, Watermarks};

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

/// Whole seconds, as a duration.
pub(super) fn seconds<S: Serializer>(secs: &u64, s: S) -> Result<S::Ok, S::Error> {
    duration(&Duration::from_secs(*secs), s)
}

/// The upstream as `host:port`.
pub(super) fn upstream<S: Serializer>(u: &Upstream, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&u.authority)
}

/// `ready_high_watermark` and `ready_low_watermark`; both 0 when off.
pub(super) fn watermarks<S: Serializer>(w: &Option<Watermarks>, s: S) -> Result<S::Ok, S::Error> {
    let (high, low) = w.map_or((0.0, 0.0), |w| (w.high, w.low));
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry("ready_high_watermark", &high)?;
    map.serialize_entry("ready_low_watermark", &low)?;
    map.end()
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

