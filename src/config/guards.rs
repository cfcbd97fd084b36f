//! The message-guard keys (docs/operations.md#message-guards): limits on what a client sends inside
//! an admitted connection, and their typed form.
//!
//! All of them are off at 0. Only `max_fragments` is on by default: a
//! message of empty continuation frames costs the upstream a frame each
//! while costing the client no payload byte and no message token, so
//! nothing else bounds it (docs/operations.md#message-guards). The typed
//! form keeps each guard as an `Option`, resolved once here (a burst of 0
//! becomes its documented default), so the splice never interprets a raw
//! value.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::values::{NonNegative, ValueKind, WholeNumber};
use super::{ConfigError, RateLimit, RawConfig};

/// What the message-rate guard does with a client over its bucket
/// (`message_rate_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateAction {
    /// Stop reading from the client until a token is free.
    Throttle,
    /// End the connection: Close 1008 to the client, 1001 to the upstream.
    Close,
}

impl ValueKind for RateAction {
    type Raw = String;
    type Value = RateAction;
    const EXPECTED: &'static str = "throttle or close";
    fn check(raw: &String) -> Option<RateAction> {
        match raw.as_str() {
            "throttle" => Some(RateAction::Throttle),
            "close" => Some(RateAction::Close),
            _ => None,
        }
    }
}

/// The message guards of one connection; `None` = that guard is off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageGuards {
    /// Payload bytes one message may carry, all its fragments together.
    pub max_message_size: Option<u64>,
    /// Messages (data messages and control frames) per second.
    pub message_rate: Option<RateLimit>,
    /// What happens to a client over `message_rate`.
    pub message_rate_action: RateAction,
    /// Payload bytes per second (always throttles).
    pub byte_rate: Option<RateLimit>,
    /// Frames one message may have, its first frame and its continuations.
    pub max_fragments: Option<u64>,
}

impl MessageGuards {
    /// Every guard off.
    pub const OFF: MessageGuards = MessageGuards {
        max_message_size: None,
        message_rate: None,
        message_rate_action: RateAction::Throttle,
        byte_rate: None,
        max_fragments: None,
    };

    /// Whether any guard is on (off: the splice takes its plain path).
    pub fn any(&self) -> bool {
        self.max_message_size.is_some()
            || self.message_rate.is_some()
            || self.byte_rate.is_some()
            || self.max_fragments.is_some()
    }
}

/// The guards from their seven keys.
///
/// # Errors
/// The first key whose value is not acceptable, by name.
pub(super) fn settings(raw: &RawConfig) -> Result<MessageGuards, ConfigError> {
    let size = WholeNumber::value("max_message_size", &raw.max_message_size)?;
    let rate = NonNegative::value("message_rate", &raw.message_rate)?;
    let burst = WholeNumber::value("message_burst", &raw.message_burst)?;
    let action = RateAction::value("message_rate_action", &raw.message_rate_action)?;
    let bytes = WholeNumber::value("byte_rate", &raw.byte_rate)?;
    let byte_burst = WholeNumber::value("byte_burst", &raw.byte_burst)?;
    let fragments = WholeNumber::value("max_fragments", &raw.max_fragments)?;
    Ok(MessageGuards {
        max_message_size: (size > 0).then_some(size as u64),
        message_rate: RateLimit::of(rate, burst),
        message_rate_action: action,
        byte_rate: RateLimit::of(bytes as f64, byte_burst),
        max_fragments: (fragments > 0).then_some(fragments as u64),
    })
}

/// `check-config` prints the seven keys with the values in force (a burst of
/// 0 shown as what it resolved to).
pub(super) fn written<S: Serializer>(g: &MessageGuards, s: S) -> Result<S::Ok, S::Error> {
    let (rate, burst) = g
        .message_rate
        .map_or((0.0, 0), |b| (b.per_second, b.burst as u64));
    let (bytes, byte_burst) = g
        .byte_rate
        .map_or((0, 0), |b| (b.per_second as u64, b.burst as u64));
    let mut map = s.serialize_map(Some(7))?;
    map.serialize_entry("max_message_size", &g.max_message_size.unwrap_or(0))?;
    map.serialize_entry("message_rate", &rate)?;
    map.serialize_entry("message_burst", &burst)?;
    map.serialize_entry("message_rate_action", &g.message_rate_action)?;
    map.serialize_entry("byte_rate", &bytes)?;
    map.serialize_entry("byte_burst", &byte_burst)?;
    map.serialize_entry("max_fragments", &g.max_fragments.unwrap_or(0))?;
    map.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::raw_with as raw;

    #[test]
    fn only_the_fragment_cap_is_on_by_default() {
        let g = settings(&RawConfig::default()).expect("defaults");
        assert_eq!(
            g,
            MessageGuards {
                max_fragments: Some(1024),
                ..MessageGuards::OFF
            }
        );
        assert!(g.any());
        assert!(!MessageGuards::OFF.any());
    }

    #[test]
    fn zero_fragments_is_no_cap() {
        let g = settings(&raw(|r| r.max_fragments = 0)).expect("valid");
        assert_eq!(g, MessageGuards::OFF);
        let g = settings(&raw(|r| r.max_fragments = 1)).expect("valid");
        assert_eq!(g.max_fragments, Some(1));
    }

    #[test]
    fn bursts_default_to_one_second() {
        let g = settings(&raw(|r| {
            r.message_rate = 2.5;
            r.byte_rate = 1024;
        }))
        .expect("valid");
        assert_eq!(
            g.message_rate,
            Some(RateLimit {
                per_second: 2.5,
                burst: 3.0
            })
        );
        assert_eq!(
            g.byte_rate,
            Some(RateLimit {
                per_second: 1024.0,
                burst: 1024.0
            })
        );
        let g = settings(&raw(|r| {
            r.message_rate = 0.2;
            r.message_burst = 0;
        }))
        .expect("valid");
        assert_eq!(
            g.message_rate.map(|b| b.burst),
            Some(1.0),
            "at least one token"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(&str, RawConfig); 5] = [
            ("max_message_size", raw(|r| r.max_message_size = -1)),
            ("message_rate", raw(|r| r.message_rate = -5.0)),
            (
                "message_rate_action",
                raw(|r| r.message_rate_action = "drop".into()),
            ),
            ("byte_burst", raw(|r| r.byte_burst = -2)),
            ("max_fragments", raw(|r| r.max_fragments = -1)),
        ];
        for (key, r) in cases {
            let e = settings(&r).expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
