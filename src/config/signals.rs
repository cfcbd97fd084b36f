//! The keys of signals a client can act on (docs/behaviour.md#signals-clients-can-act-on):
//! `refusal_mode` and `max_close_refusals` (refusals a browser can read),
//! `ping_interval` and `pong_timeout` (pings from wsgate), `send_timeout`
//! (a client that stops reading), with their typed form.

use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::duration::{OffOrDuration, PositiveDuration};
use super::values::{ValueKind, WholeNumber};
use super::{effective, ConfigError, RawConfig};

/// How wsgate answers an upgrade it refuses for load (`refusal_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusalMode {
    /// An HTTP status (503 with `Retry-After`, or the key rule's status).
    Status,
    /// wsgate's own 101, then Close 1013 with `retry after N s`.
    Close,
}

impl ValueKind for RefusalMode {
    type Raw = String;
    type Value = RefusalMode;
    const EXPECTED: &'static str = "status (refusals are HTTP answers) or close (wsgate accepts \
         the WebSocket and closes it with 1013 Try Again Later, which a browser page can read)";
    fn check(raw: &String) -> Option<RefusalMode> {
        match raw.as_str() {
            "status" => Some(RefusalMode::Status),
            "close" => Some(RefusalMode::Close),
            _ => None,
        }
    }
}

/// The signals of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSignals {
    /// How load refusals are answered.
    pub refusal_mode: RefusalMode,
    /// Close-mode refusals open at once; past it, the HTTP status.
    pub max_close_refusals: usize,
    /// Ping the client after this long without a frame from it; `None` = off.
    pub ping_interval: Option<Duration>,
    /// No frame within this long after wsgate's Ping ends the session.
    pub pong_timeout: Duration,
    /// Bytes for the client not accepted for this long end the session;
    /// `None` = off.
    pub send_timeout: Option<Duration>,
}

impl ClientSignals {
    /// Every signal at its default: status refusals, no pings, no send timeout.
    pub const DEFAULT: ClientSignals = ClientSignals {
        refusal_mode: RefusalMode::Status,
        max_close_refusals: 1024,
        ping_interval: None,
        pong_timeout: Duration::from_secs(10),
        send_timeout: None,
    };
}

/// The signals from their five keys.
///
/// # Errors
/// The first key whose value is not acceptable, by name.
pub(super) fn settings(raw: &RawConfig) -> Result<ClientSignals, ConfigError> {
    Ok(ClientSignals {
        refusal_mode: RefusalMode::value("refusal_mode", &raw.refusal_mode)?,
        max_close_refusals: WholeNumber::value("max_close_refusals", &raw.max_close_refusals)?,
        ping_interval: OffOrDuration::value("ping_interval", &raw.ping_interval)?,
        pong_timeout: PositiveDuration::value("pong_timeout", &raw.pong_timeout)?,
        send_timeout: OffOrDuration::value("send_timeout", &raw.send_timeout)?,
    })
}

/// `check-config` prints the five keys with the values in force.
pub(super) fn written<S: Serializer>(c: &ClientSignals, s: S) -> Result<S::Ok, S::Error> {
    use effective::Shown;
    let mut map = s.serialize_map(Some(5))?;
    map.serialize_entry("refusal_mode", &c.refusal_mode)?;
    map.serialize_entry("max_close_refusals", &c.max_close_refusals)?;
    map.serialize_entry("ping_interval", &Shown(c.ping_interval))?;
    map.serialize_entry("pong_timeout", &Shown(Some(c.pong_timeout)))?;
    map.serialize_entry("send_timeout", &Shown(c.send_timeout))?;
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_documented_ones() {
        assert_eq!(
            settings(&RawConfig::default()).expect("defaults"),
            ClientSignals::DEFAULT
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        type Edit = fn(&mut RawConfig);
        let cases: [(&str, Edit); 3] = [
            ("refusal_mode", |r| r.refusal_mode = "1013".into()),
            ("max_close_refusals", |r| r.max_close_refusals = -1),
            ("pong_timeout", |r| {
                r.pong_timeout = super::super::ConfigDuration(Duration::ZERO);
            }),
        ];
        for (key, edit) in cases {
            let mut r = RawConfig::default();
            edit(&mut r);
            let e = settings(&r).expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
