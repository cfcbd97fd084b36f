//! What an admission check says: the reasons an upgrade is refused (the
//! `reason` label), a refusal with the status it is answered with, and the
//! verdict each policy of the pipeline returns.

use http::StatusCode;
use prometheus::IntCounter;

use crate::metrics::labels;

labels! {
    /// Why wsgate refused an upgrade: the `reason` label of
    /// `wsgate_connections_rejected_total` and `…_would_reject_total`.
    pub(crate) enum RejectReason {
        /// The cap is reached.
        Capacity => "capacity",
        /// The request carries this process's own loop marker: it went
        /// round a loop back into wsgate (508).
        Loop => "loop",
        /// The request target cannot be read unambiguously (an encoded
        /// `/`, a control character, not a path on this host): 400.
        BadPath => "bad_path",
        /// `allowed_origins` / `require_origin`: the page that opened the
        /// WebSocket is not allowed to (403).
        Origin => "origin",
        /// `subprotocols` / `require_subprotocol`, or the JWT entry offered
        /// alone or twice: 400.
        Subprotocol => "subprotocol",
        /// The process is shutting down.
        Draining => "draining",
        /// The admission rate limit.
        Rate => "rate",
        /// The per-client-address cap.
        PerIp => "per_ip",
        /// A key rule: the key holds its limit.
        Key => "key",
        /// A key rule: the request has no usable key (`missing = reject`,
        /// or a value that cannot be a key).
        KeyMissing => "key_missing",
        /// A key rule: a query parameter, cookie or header it reads (or the
        /// token `jwt_from` names) is given more than once: 400.
        KeyAmbiguous => "key_ambiguous",
        /// A key rule: the table already tracks `max_keys` values.
        KeyTableFull => "key_table_full",
        /// A `jwt_claim` rule: the token is present but not valid.
        Jwt => "jwt",
        /// The fleet is at `fleet_max_clients`.
        Fleet => "fleet",
        /// Redis is down or slow and `fleet_fail_mode = closed`.
        FleetUnavailable => "fleet_unavailable",
    }
}

/// A refused upgrade: why, and the status the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// The `reason` label.
    pub(crate) reason: RejectReason,
    /// 503 for the instance's own limits; a key rule's refusals answer
    /// with the rule's status (429 or 503 over the limit, 400 or 401
    /// without a usable key, 401 for a bad token).
    pub(crate) status: StatusCode,
}

impl From<RejectReason> for Rejection {
    /// A refusal answered 503 (every limit of the instance and the fleet).
    fn from(reason: RejectReason) -> Self {
        Rejection {
            reason,
            status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What one policy of the pipeline says about a request.
#[derive(Debug)]
pub(crate) enum Verdict<H> {
    /// Within the limit; `H` is what the policy took for the connection
    /// (given back when it is dropped).
    Pass(H),
    /// Over the limit. In dry run the policy took its share anyway (so
    /// the counts show the truth) and hands it over in `taken`; enforcing,
    /// nothing was taken.
    Over {
        /// The refusal, if it is enforced.
        rejection: Rejection,
        /// What was taken anyway (dry run only).
        taken: Option<H>,
        /// A key rule's own refusal counter
        /// (`wsgate_key_rejected_total{rule}`), counted only when the
        /// refusal is enforced.
        rule_counter: Option<IntCounter>,
    },
}

impl<H> Verdict<H> {
    /// Over the limit, having taken nothing.
    pub(crate) fn over(rejection: impl Into<Rejection>) -> Self {
        Self::over_taking(rejection, None)
    }

    /// Over the limit, having taken `taken` anyway (dry run).
    pub(crate) fn over_taking(rejection: impl Into<Rejection>, taken: Option<H>) -> Self {
        Verdict::Over {
            rejection: rejection.into(),
            taken,
            rule_counter: None,
        }
    }
}
