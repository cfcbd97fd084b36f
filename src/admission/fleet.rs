//! Fleet: `fleet_max_clients` and every `fleet = true` key rule, counted
//! across every instance of the namespace in Redis (`crate::fleet`). One
//! round trip, at most `fleet_timeout` long; when Redis cannot answer,
//! `fleet_fail_mode` decides.

use super::keys;
use super::outcome::{RejectReason, Verdict};
use crate::fleet::{Fleet, FleetHold, FleetRefusal, Scope};
use crate::keys::FleetKey;

/// The fleet check for a request that took `keys` (its `fleet = true` key
/// values). Dry run (`take_anyway`) counts the connection in Redis even
/// over a limit.
pub(crate) async fn check(
    fleet: &Fleet,
    keys: &[FleetKey],
    take_anyway: bool,
) -> Verdict<Option<FleetHold>> {
    let total = fleet.total_scope();
    let offset = usize::from(total.is_some());
    let scopes: Vec<Scope> = total
        .into_iter()
        .chain(
            keys.iter()
                .map(|k| fleet.key_scope(k.rule(), &k.value, k.limit)),
        )
        .collect();
    let answer = fleet.admit(scopes, !take_anyway).await;
    let taken = Some(answer.hold);
    match answer.refused {
        None => Verdict::Pass(taken.flatten()),
        Some(FleetRefusal::Unavailable) => {
            Verdict::over_taking(RejectReason::FleetUnavailable, taken)
        }
        Some(FleetRefusal::Full(i)) => match i.checked_sub(offset).and_then(|k| keys.get(k)) {
            // A `fleet = true` rule over its limit answers like that rule.
            Some(key) => keys::over(key.refusal(), taken),
            None => Verdict::over_taking(RejectReason::Fleet, taken),
        },
    }
}
