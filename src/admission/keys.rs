//! Key rules: limits per tenant, user, API key or path (`[[key_limits]]`),
//! checked in file order. The rules, their tables and the key extraction
//! are `crate::keys`; this file turns one rule's outcome into a verdict.

use super::outcome::{RejectReason, Rejection, Verdict};
use crate::keys::{KeyHold, KeyRefusal, Refused, RuleOutcome};

/// The verdict of one rule: `Pass(None)` when the rule does not apply.
pub(crate) fn verdict(outcome: RuleOutcome) -> Verdict<Option<KeyHold>> {
    match outcome {
        RuleOutcome::NotApplicable => Verdict::Pass(None),
        RuleOutcome::Within(hold) => Verdict::Pass(Some(hold)),
        RuleOutcome::Over { refused, taken } => over(refused, taken.map(Some)),
    }
}

/// A key rule's refusal as a verdict, carrying the rule's own counter.
pub(crate) fn over<H>(refused: Refused, taken: Option<H>) -> Verdict<H> {
    Verdict::Over {
        rejection: Rejection {
            reason: reason(refused.why),
            status: refused.status,
        },
        taken,
        rule_counter: Some(refused.counter),
    }
}

/// The `reason` label of a key rule's refusal.
fn reason(why: KeyRefusal) -> RejectReason {
    match why {
        KeyRefusal::OverLimit => RejectReason::Key,
        KeyRefusal::Missing => RejectReason::KeyMissing,
        KeyRefusal::Ambiguous => RejectReason::KeyAmbiguous,
        KeyRefusal::TableFull => RejectReason::KeyTableFull,
        KeyRefusal::BadToken => RejectReason::Jwt,
    }
}
