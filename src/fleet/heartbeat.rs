//! Heartbeats (docs/operations.md#automatic-rebalancing): each instance
//! publishes its active count and its state to the namespace's Redis and
//! reads back everyone's, in one script call. Automatic rebalancing decides
//! from what comes back.
//!
//! Two keys under the namespace's hash tag (one slot on a Cluster, so the
//! script may touch both): a hash `instance → "<active> <state>"` and a
//! sorted set `instance → expiry` (Redis's clock, like the holds). An
//! instance that stops beating drops out one `fleet_lease_ttl` after its
//! last beat, removed by whoever beats next; one that leaves says so at
//! once. Both keys carry a `PEXPIRE` of one lease, so a namespace whose
//! instances are all gone leaves nothing behind.

use std::sync::Arc;

use redis::Script;

use super::metrics::FleetOp;
use super::scripts::millis;
use super::store::means_lost;
use super::{Fleet, Outcome};

/// Publish one instance's beat (or remove it), drop the instances whose
/// beats expired, and return every live beat.
///
/// `KEYS[1]`: the hash of beats; `KEYS[2]`: their expiries. `ARGV[1]`: the
/// instance; `ARGV[2]`: its beat, empty to remove it; `ARGV[3]`: the lease
/// in ms. Returns the hash as a flat list: instance, beat, instance, beat…
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, i in ipairs(gone) do redis.call('HDEL', KEYS[1], i) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return redis.call('HGETALL', KEYS[1])
";

/// What an instance is doing, as its beat tells the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BeatState {
    /// Serving: counted in the mean, may receive reconnects.
    Serving,
    /// Shedding to rebalance: not ready for a moment (so fronts send the
    /// reconnects elsewhere) but still one of the fleet, counted in the mean.
    Shedding,
}

impl BeatState {
    fn letter(self) -> char {
        match self {
            BeatState::Serving => 'r',
            BeatState::Shedding => 's',
        }
    }

    fn of(letter: &str) -> Option<BeatState> {
        match letter {
            "r" => Some(BeatState::Serving),
            "s" => Some(BeatState::Shedding),
            _ => None,
        }
    }
}

/// One live instance's last beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Beat {
    /// This instance's own beat.
    pub(crate) me: bool,
    /// Its active WebSocket connections.
    pub(crate) active: u64,
    pub(crate) state: BeatState,
}

/// The fleet as the last heartbeat saw it: every live instance's beat.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FleetView {
    pub(crate) beats: Vec<Beat>,
}

impl FleetView {
    /// This instance's own beat, as Redis has it.
    pub(crate) fn mine(&self) -> Option<&Beat> {
        self.beats.iter().find(|b| b.me)
    }

    /// The mean of the active counts of the live instances (those shedding
    /// included: they are part of the fleet, unready for a moment only).
    pub(crate) fn mean(&self) -> f64 {
        if self.beats.is_empty() {
            return 0.0;
        }
        let sum: u64 = self.beats.iter().map(|b| b.active).sum();
        sum as f64 / self.beats.len() as f64
    }
}

/// The beat's keys and the loaded script, made once.
#[derive(Debug)]
pub(super) struct Heartbeats {
    beats: Arc<str>,
    expiries: Arc<str>,
    script: Script,
}

impl Heartbeats {
    pub(super) fn new(namespace: &str) -> Self {
        Heartbeats {
            beats: format!("{{{namespace}}}:instances").into(),
            expiries: format!("{{{namespace}}}:instances:expiry").into(),
            script: Script::new(HEARTBEAT),
        }
    }
}

impl Fleet {
    /// How often an instance beats: every renewal interval.
    pub(crate) fn beat_interval(&self) -> std::time::Duration {
        self.shared.lease / 3
    }

    /// Publishes this instance's beat (`None`: it is leaving, remove it)
    /// and reads every live one. `None` when Redis is known down, fails or
    /// does not answer within a renewal interval. Counted as a `renew`.
    pub(crate) async fn heartbeat(&self, mine: Option<(u64, BeatState)>) -> Option<FleetView> {
        let s = &*self.shared;
        let (generation, mut conn) = s.connection()?;
        let beat = mine.map_or_else(String::new, |(active, state)| {
            format!("{active} {}", state.letter())
        });
        let mut call = s.heartbeats.script.prepare_invoke();
        call.key(&*s.heartbeats.beats)
            .key(&*s.heartbeats.expiries)
            .arg(&s.instance)
            .arg(beat)
            .arg(millis(s.lease));
        let answer = s
            .call(
                FleetOp::Renew,
                s.lease / 3,
                call.invoke_async::<Vec<String>>(&mut conn),
            )
            .await;
        match answer {
            Outcome::Answered(flat) => Some(view(&s.instance, &flat)),
            Outcome::Failed(e) => {
                if means_lost(&e) {
                    s.lost(generation);
                }
                None
            }
            Outcome::TimedOut => None,
        }
    }
}

/// The view from the script's flat answer; beats that do not parse (a
/// newer or older wsgate writing another form) are left out.
fn view(me: &str, flat: &[String]) -> FleetView {
    let beats = flat
        .chunks_exact(2)
        .filter_map(|pair| {
            let (active, state) = pair[1].split_once(' ')?;
            Some(Beat {
                me: pair[0] == me,
                active: active.parse().ok()?,
                state: BeatState::of(state)?,
            })
        })
        .collect();
    FleetView { beats }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_are_read_back_and_odd_ones_left_out() {
        let flat: Vec<String> = [
            "a", "500 r", "b", "300 s", "me", "100 r", "c", "x r", "d", "5 z", "e", "7",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let v = view("me", &flat);
        assert_eq!(v.beats.len(), 3);
        assert_eq!(
            v.beats[1],
            Beat {
                me: false,
                active: 300,
                state: BeatState::Shedding
            }
        );
        assert!(v.beats[2].me);
        assert!((v.mean() - 300.0).abs() < 1e-9);
        assert!(FleetView::default().mean().abs() < 1e-9);
    }
}
