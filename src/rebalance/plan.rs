//! When an instance sheds, and how many: the decision alone, with the time
//! and the fleet's beats passed in, so every rule is tested without Redis or
//! waiting (docs/operations.md#automatic-rebalancing).
//!
//! An instance sheds only while it has stayed above the fleet mean ×
//! (1 + `rebalance_tolerance`) for `rebalance_after` without a break (a
//! spike shorter than that sheds nothing), the cooldown since its last shed
//! is over, and some other instance is serving below the mean to take the
//! reconnects (two instances never shed into each other). It sheds its
//! excess over the mean, rounded down, so it never ends below the mean.
//!
//! The wait starts again whenever the number of live instances changes, or
//! the fleet's total moved by more than the tolerance since the last beat:
//! an excess that showed against another fleet, or while it filled up,
//! does not count toward it. An
//! instance compares its own count, fresh, with the others' last beats, up
//! to one interval old; while a fleet fills up, the instance that beats
//! just before the others looks above the mean at every beat, and without
//! the restart it would shed the moment a new instance joins, before the
//! front sends it anything and before the others shed with it.

use tokio::time::Instant;

use crate::config::Rebalance;
use crate::fleet::{BeatState, FleetView};

/// Why an instance does not shed now (for the debug log and the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stay {
    /// `rebalance = false`.
    Off,
    /// No heartbeat answer: Redis is unreachable.
    RedisDown,
    /// The instance drains (`POST /drain`) or shuts down.
    Draining,
    /// Fewer than two live instances.
    Alone,
    /// Within the tolerance of the mean.
    Balanced,
    /// Above, but not yet for `rebalance_after`.
    Waiting,
    /// Above for long enough, but its last shed ended less than
    /// `rebalance_cooldown` ago.
    Cooldown,
    /// No other instance serves below the mean to take the reconnects.
    NoReceiver,
}

/// What the planner says after a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Stay(Stay),
    /// Close this many sessions, oldest first, over `rebalance_period`.
    Shed(usize),
}

/// The hysteresis across heartbeats.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    /// Since when the instance has been above the threshold without a break.
    above_since: Option<Instant>,
    /// No shed starts before this (the end of the last one + the cooldown).
    cooldown_until: Option<Instant>,
    /// How many live instances the last answered heartbeat saw.
    fleet_size: Option<usize>,
    /// The fleet's total of active connections at that heartbeat.
    fleet_total: Option<u64>,
}

impl Planner {
    /// The decision after the heartbeat at `now` (`view` = `None` when it
    /// failed); `draining` = an operator's drain or the shutdown runs.
    pub(crate) fn decide(
        &mut self,
        now: Instant,
        view: Option<&FleetView>,
        draining: bool,
        settings: &Rebalance,
    ) -> Decision {
        if let Some(stay) = self.why_not(now, view, draining, settings) {
            // Only a break in being above the threshold restarts the wait.
            if !matches!(stay, Stay::Waiting | Stay::Cooldown | Stay::NoReceiver) {
                self.above_since = None;
            }
            return Decision::Stay(stay);
        }
        let Some((me, mean)) = view.and_then(|v| Some((v.mine()?, v.mean()))) else {
            return Decision::Stay(Stay::Alone);
        };
        // Rounded down: shedding never leaves the instance below the mean.
        let count = (me.active as f64 - mean).floor().max(0.0) as usize;
        if count == 0 {
            return Decision::Stay(Stay::Balanced);
        }
        self.above_since = None;
        Decision::Shed(count)
    }

    /// A shed ended at `now`: the cooldown starts.
    pub(crate) fn shed_ended(&mut self, now: Instant, settings: &Rebalance) {
        self.above_since = None;
        self.cooldown_until = Some(now + settings.cooldown);
    }

    fn why_not(
        &mut self,
        now: Instant,
        view: Option<&FleetView>,
        draining: bool,
        settings: &Rebalance,
    ) -> Option<Stay> {
        if !settings.enabled {
            return Some(Stay::Off);
        }
        let Some(view) = view else {
            return Some(Stay::RedisDown);
        };
        // An instance joined or left, or the fleet is filling up or
        // emptying faster than the tolerance per interval (the others'
        // beats, up to an interval old, then lag this instance's fresh
        // count by more than the margin): the wait starts again.
        let size = view.beats.len();
        let total: u64 = view.beats.iter().map(|b| b.active).sum();
        let joined = self
            .fleet_size
            .replace(size)
            .is_some_and(|before| before != size);
        let moving = self.fleet_total.replace(total).is_some_and(|before| {
            before.abs_diff(total) as f64 > settings.tolerance * total as f64
        });
        if joined || moving {
            self.above_since = None;
        }
        if draining {
            return Some(Stay::Draining);
        }
        let Some(me) = view.mine() else {
            return Some(Stay::Alone);
        };
        if view.beats.len() < 2 {
            return Some(Stay::Alone);
        }
        let mean = view.mean();
        if me.active as f64 <= mean * (1.0 + settings.tolerance) || me.active as f64 - mean < 1.0 {
            return Some(Stay::Balanced);
        }
        let since = *self.above_since.get_or_insert(now);
        if now.duration_since(since) < settings.after {
            return Some(Stay::Waiting);
        }
        if self.cooldown_until.is_some_and(|until| now < until) {
            return Some(Stay::Cooldown);
        }
        let receiver = view
            .beats
            .iter()
            .any(|b| !b.me && b.state == BeatState::Serving && (b.active as f64) < mean);
        if !receiver {
            return Some(Stay::NoReceiver);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fleet::Beat;

    fn settings() -> Rebalance {
        Rebalance {
            enabled: true,
            tolerance: 0.1,
            after: Duration::from_secs(30),
            period: Duration::from_secs(30),
            cooldown: Duration::from_secs(120),
        }
    }

    /// A view with this instance first, then the others (all serving).
    fn fleet(me: u64, others: &[u64]) -> FleetView {
        let mut beats = vec![Beat {
            me: true,
            active: me,
            state: BeatState::Serving,
        }];
        beats.extend(others.iter().map(|&active| Beat {
            me: false,
            active,
            state: BeatState::Serving,
        }));
        FleetView { beats }
    }

    /// Beats every `step` from `t0` for `beats` beats; the decisions.
    fn run(p: &mut Planner, t0: Instant, step: u64, beats: u64, v: &FleetView) -> Vec<Decision> {
        (0..beats)
            .map(|i| {
                p.decide(
                    t0 + Duration::from_secs(i * step),
                    Some(v),
                    false,
                    &settings(),
                )
            })
            .collect()
    }

    #[test]
    fn after_a_scale_out_the_full_instances_shed_their_excess_after_the_wait() {
        let t0 = Instant::now();
        let mut p = Planner::default();
        // 500, 500, 0: mean 333.3; threshold 366.7.
        let v = fleet(500, &[500, 0]);
        let got = run(&mut p, t0, 10, 4, &v);
        assert_eq!(
            got,
            vec![
                Decision::Stay(Stay::Waiting),
                Decision::Stay(Stay::Waiting),
                Decision::Stay(Stay::Waiting),
                Decision::Shed(166),
            ],
            "shed at 30 s, down to the mean rounded up"
        );
    }

    #[test]
    fn a_spike_shorter_than_the_wait_sheds_nothing() {
        let t0 = Instant::now();
        let s = settings();
        let mut p = Planner::default();
        let high = fleet(500, &[300, 300]);
        let calm = fleet(380, &[350, 350]);
        for i in 0..20u64 {
            // 20 s above, 10 s within the tolerance, again and again.
            let v = if i % 3 == 2 { &calm } else { &high };
            let d = p.decide(t0 + Duration::from_secs(i * 10), Some(v), false, &s);
            assert!(!matches!(d, Decision::Shed(_)), "beat {i}: {d:?}");
        }
    }

    #[test]
    fn within_the_tolerance_nothing_moves() {
        let t0 = Instant::now();
        let mut p = Planner::default();
        // 360 vs a mean of 340: +5.9 %, under the 10 %.
        let got = run(&mut p, t0, 10, 10, &fleet(360, &[330, 330]));
        assert!(
            got.iter().all(|d| *d == Decision::Stay(Stay::Balanced)),
            "{got:?}"
        );
        // Tiny fleets: 2 vs 1 is +33 % but only half a session above the mean.
        let got = run(&mut p, t0, 10, 10, &fleet(2, &[1]));
        assert!(
            got.iter().all(|d| *d == Decision::Stay(Stay::Balanced)),
            "{got:?}"
        );
    }

    #[test]
    fn no_shed_without_redis_alone_or_while_draining_and_the_wait_restarts() {
        let t0 = Instant::now();
        let s = settings();
        let v = fleet(500, &[100]);
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut p = Planner::default();
        assert_eq!(
            p.decide(at(0), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(
            p.decide(at(20), None, false, &s),
            Decision::Stay(Stay::RedisDown)
        );
        // The wait starts again after the outage.
        assert_eq!(
            p.decide(at(40), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(
            p.decide(at(60), Some(&v), true, &s),
            Decision::Stay(Stay::Draining)
        );
        assert_eq!(
            p.decide(at(70), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(p.decide(at(100), Some(&v), false, &s), Decision::Shed(200));
        let alone = fleet(500, &[]);
        assert_eq!(
            p.decide(at(200), Some(&alone), false, &s),
            Decision::Stay(Stay::Alone)
        );
        let off = Rebalance {
            enabled: false,
            ..s
        };
        assert_eq!(
            p.decide(at(300), Some(&v), false, &off),
            Decision::Stay(Stay::Off)
        );
    }

    #[test]
    fn a_rebalance_waits_again_after_the_fleet_changes() {
        let t0 = Instant::now();
        let s = settings();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut p = Planner::default();
        // Two instances filling up: this one beats just after its clients
        // came, the other's beat is an interval old, so this one looks above
        // the mean (450 × 1.1 = 495) at every beat.
        let filling = fleet(500, &[400]);
        for secs in [0, 10, 20] {
            assert_eq!(
                p.decide(at(secs), Some(&filling), false, &s),
                Decision::Stay(Stay::Waiting)
            );
        }
        // A third joins: 30 s above, but not against this fleet.
        let joined = fleet(500, &[500, 0]);
        for secs in [30, 40, 50] {
            assert_eq!(
                p.decide(at(secs), Some(&joined), false, &s),
                Decision::Stay(Stay::Waiting),
                "at {secs} s"
            );
        }
        assert_eq!(
            p.decide(at(60), Some(&joined), false, &s),
            Decision::Shed(166)
        );
    }

    #[test]
    fn a_fleet_filling_up_sheds_nothing_however_long_it_takes() {
        let t0 = Instant::now();
        let s = settings();
        let mut p = Planner::default();
        // Clients keep arriving at both, 100 a beat each; this instance's
        // count is fresh, the other's an interval old: it looks 100 above,
        // over the 10 % for 50 s (400 against a mean of 350 at 30 s).
        for beat in 0..5u64 {
            let mine = 100 + 100 * beat;
            let v = fleet(mine, &[mine - 100]);
            let d = p.decide(t0 + Duration::from_secs(10 * beat), Some(&v), false, &s);
            assert!(!matches!(d, Decision::Shed(_)), "beat {beat}: {d:?}");
        }
        // Once the fleet stops growing, a real excess is shed after the wait.
        let v = fleet(1500, &[1000]);
        let at = |secs: u64| t0 + Duration::from_secs(200 + secs);
        assert_eq!(
            p.decide(at(0), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(
            p.decide(at(10), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(p.decide(at(40), Some(&v), false, &s), Decision::Shed(250));
    }

    #[test]
    fn the_cooldown_spaces_sheds() {
        let t0 = Instant::now();
        let s = settings();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut p = Planner::default();
        let v = fleet(500, &[100, 100]);
        assert_eq!(
            p.decide(at(0), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(p.decide(at(30), Some(&v), false, &s), Decision::Shed(266));
        p.shed_ended(at(60), &s);
        // Still above (say the clients came back): waits again, then the cooldown.
        assert_eq!(
            p.decide(at(70), Some(&v), false, &s),
            Decision::Stay(Stay::Waiting)
        );
        assert_eq!(
            p.decide(at(100), Some(&v), false, &s),
            Decision::Stay(Stay::Cooldown)
        );
        assert_eq!(
            p.decide(at(170), Some(&v), false, &s),
            Decision::Stay(Stay::Cooldown)
        );
        assert_eq!(p.decide(at(180), Some(&v), false, &s), Decision::Shed(266));
    }

    #[test]
    fn never_into_an_instance_that_sheds_or_has_no_room() {
        let t0 = Instant::now();
        let s = Rebalance {
            after: Duration::ZERO,
            ..settings()
        };
        let mut p = Planner::default();
        // The only instance below the mean is shedding itself: nobody takes
        // the reconnects.
        let mut v = fleet(600, &[600, 0]);
        v.beats[2].state = BeatState::Shedding;
        assert_eq!(
            p.decide(t0, Some(&v), false, &s),
            Decision::Stay(Stay::NoReceiver)
        );
        // Two instances: the one below the mean never sheds, so they cannot
        // shed into each other; the one above does.
        let mut low = Planner::default();
        let low_view = fleet(400, &[600]);
        assert_eq!(
            low.decide(t0, Some(&low_view), false, &s),
            Decision::Stay(Stay::Balanced)
        );
        let mut high = Planner::default();
        assert_eq!(
            high.decide(t0, Some(&fleet(600, &[400])), false, &s),
            Decision::Shed(100)
        );
        // A shedding instance still counts in the mean: with 500/500/0 and
        // the other full one already shedding, this one sheds 166, not 250.
        let mut v = fleet(500, &[500, 0]);
        v.beats[1].state = BeatState::Shedding;
        assert_eq!(p.decide(t0, Some(&v), false, &s), Decision::Shed(166));
    }
}
