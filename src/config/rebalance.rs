//! The `rebalance*` keys (docs/operations.md#automatic-rebalancing): whether
//! the instances of a fleet balance their sessions themselves, how far above
//! the fleet mean an instance may stay, for how long, and how it sheds.
//!
//! `close_code_rebalance` sits with the other close codes in
//! [`CloseSettings`](super::CloseSettings).

use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};

use super::duration::AnyDuration;
use super::values::{TrueOrFalse, ValueKind};
use super::{effective, ConfigError, RawConfig};

/// The largest `rebalance_tolerance`: ten times the mean is no balance at all.
const MAX_TOLERANCE: f64 = 10.0;

/// Automatic rebalancing, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    /// `rebalance`: on (needs `fleet_redis_url`).
    pub enabled: bool,
    /// An instance sheds only while above the fleet mean × (1 + this).
    pub tolerance: f64,
    /// … continuously for this long.
    pub after: Duration,
    /// The excess is closed evenly over this period.
    pub period: Duration,
    /// At least this long between the end of one shed and the next.
    pub cooldown: Duration,
}

impl Rebalance {
    /// The documented defaults: off, 10 %, 30 s, 30 s, 2 min.
    pub const DEFAULT: Rebalance = Rebalance {
        enabled: false,
        tolerance: 0.1,
        after: Duration::from_secs(30),
        period: Duration::from_secs(30),
        cooldown: Duration::from_secs(120),
    };
}

/// `rebalance_tolerance`: how far above the mean, as a fraction of it.
#[derive(Debug)]
pub(crate) struct Tolerance;

impl ValueKind for Tolerance {
    type Raw = f64;
    type Value = f64;
    const EXPECTED: &'static str =
        "a number from 0 to 10: the fraction of the fleet mean an instance may stay above it";
    fn check(raw: &f64) -> Option<f64> {
        (raw.is_finite() && (0.0..=MAX_TOLERANCE).contains(raw)).then_some(*raw)
    }
}

/// The five keys, each through its kind, and the rule that rebalancing
/// needs the fleet's Redis.
///
/// # Errors
/// The first key whose value is not acceptable, by name.
pub(super) fn settings(raw: &RawConfig, fleet_on: bool) -> Result<Rebalance, ConfigError> {
    let settings = Rebalance {
        enabled: TrueOrFalse::value("rebalance", &raw.rebalance)?,
        tolerance: Tolerance::value("rebalance_tolerance", &raw.rebalance_tolerance)?,
        after: AnyDuration::value("rebalance_after", &raw.rebalance_after)?,
        period: AnyDuration::value("rebalance_period", &raw.rebalance_period)?,
        cooldown: AnyDuration::value("rebalance_cooldown", &raw.rebalance_cooldown)?,
    };
    if settings.enabled && !fleet_on {
        return Err(ConfigError::Invalid {
            key: "rebalance".into(),
            value: "true".into(),
            source_hint: " (fleet_redis_url is not set)".into(),
            expected: "false: instances find each other through the fleet's Redis \
                (docs/operations.md#automatic-rebalancing)"
                .into(),
        });
    }
    Ok(settings)
}

/// `check-config` prints the five keys with the values in force.
pub(super) fn written<S: Serializer>(r: &Rebalance, s: S) -> Result<S::Ok, S::Error> {
    use effective::Shown;
    let mut map = s.serialize_map(Some(5))?;
    map.serialize_entry("rebalance", &r.enabled)?;
    map.serialize_entry("rebalance_tolerance", &r.tolerance)?;
    map.serialize_entry("rebalance_after", &Shown(Some(r.after)))?;
    map.serialize_entry("rebalance_period", &Shown(Some(r.period)))?;
    map.serialize_entry("rebalance_cooldown", &Shown(Some(r.cooldown)))?;
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigDuration;

    #[test]
    fn the_defaults_are_the_documented_ones() {
        assert_eq!(
            settings(&RawConfig::default(), false).expect("defaults"),
            Rebalance::DEFAULT
        );
    }

    #[test]
    fn tolerance_runs_from_0_to_10() {
        for ok in [0.0, 0.1, 1.0, 10.0] {
            assert_eq!(Tolerance::check(&ok), Some(ok));
        }
        for bad in [-0.01, 10.5, f64::NAN, f64::INFINITY] {
            assert_eq!(Tolerance::check(&bad), None, "{bad}");
        }
    }

    #[test]
    fn rebalancing_needs_the_fleet_redis() {
        let raw = RawConfig {
            rebalance: true,
            ..RawConfig::default()
        };
        let e = settings(&raw, false).expect_err("no Redis").to_string();
        assert!(
            e.contains("rebalance = true") && e.contains("fleet_redis_url is not set"),
            "{e}"
        );
        assert!(settings(&raw, true).expect("with Redis").enabled);
    }

    #[test]
    fn bad_values_name_their_key() {
        let raw = RawConfig {
            rebalance_tolerance: -1.0,
            ..RawConfig::default()
        };
        let e = settings(&raw, true).expect_err("negative").to_string();
        assert!(e.contains("rebalance_tolerance"), "{e}");
        let raw = RawConfig {
            rebalance_period: ConfigDuration(Duration::from_secs(20 * 365 * 86_400)),
            ..RawConfig::default()
        };
        let e = settings(&raw, true).expect_err("too long").to_string();
        assert!(e.contains("rebalance_period"), "{e}");
    }
}
