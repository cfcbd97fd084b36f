//! Admission: the whole decision on a WebSocket upgrade, taken before
//! wsgate touches the upstream.
//!
//! [`Admission::admit`] runs the policies in one fixed order, one line
//! each; the first refusal wins, and whatever earlier policies took is
//! given back when a later one refuses (it sits in the [`AdmissionGuard`]
//! under construction, which the refusal drops). The order, and why:
//!
//! 0. **loop**, then **target**: a request carrying this process's own
//!    `Via` entry came back round a loop (`crate::loop_marker`) and is
//!    refused (508 `loop`); the path is read the way the upstream will
//!    read it (`crate::target`), and a target that cannot be is refused
//!    (`bad_path`). Neither is a limit: dry run does not cover them. The
//!    normalised target is what the key rules judge and what is forwarded;
//!    then the **handshake policy**: the `Origin` (403 `origin`) and the
//!    offered subprotocols (400 `subprotocol`; what is left of the offer is
//!    what is forwarded). Security policy, not limits: dry run does not
//!    cover them either;
//! 1. **draining**: a process going away admits nothing (not a limit:
//!    dry run does not cover it);
//! 2. **capacity**: a slot under `max_clients`, without waiting;
//! 3. **per-IP**: `max_clients_per_ip`;
//! 4. **key rules**, in file order (`[[key_limits]]`);
//! 5. **fleet**: the fleet-wide limits in Redis, one round trip, after
//!    every local check so a refused upgrade costs Redis nothing;
//! 6. **rate**: last, so a token is spent only by an admission.
//!
//! Each policy returns a [`Verdict`]; whether "over the limit" refuses or
//! is only reported (dry run, `enforce = false`) is decided in one place,
//! [`Screen`]. Adding a policy is one file here, one line in
//! [`Admission::screen`], its configuration and its docs
//! (`docs/architecture.md#the-admission-pipeline`).
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | [`Admission`], the order of the checks, enforce or report, the metrics |
//! | `outcome.rs` | [`RejectReason`], [`Rejection`], [`Verdict`] |
//! | `guard.rs` | [`AdmissionGuard`]: what a connection holds; dropping it is the only release |
//! | `handshake.rs` | the `Origin` and subprotocol policy |
//! | `draining.rs` | refuse once the shutdown drains |
//! | `capacity.rs` | the active count and the cap (compare-and-swap), readiness watermarks |
//! | `per_ip.rs` | counts per client address |
//! | `keys.rs` | a key rule's outcome as a verdict (the rules are `crate::keys`) |
//! | `fleet.rs` | the fleet check (the Redis store is `crate::fleet`) |
//! | `rate.rs` | the admission token bucket |

mod capacity;
mod draining;
mod fleet;
mod guard;
mod handshake;
mod keys;
mod outcome;
mod per_ip;
mod rate;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, StatusCode, Uri};
use prometheus::{IntCounter, IntGauge};

use self::capacity::Capacity;
pub(crate) use self::guard::AdmissionGuard;
use self::outcome::Verdict;
pub(crate) use self::outcome::{RejectReason, Rejection};
use self::per_ip::PerIp;
use self::rate::Rate;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::keys::{KeyLimits, KeyMetrics, KeyRequest};
use crate::loop_marker::LoopMarker;
use crate::metrics::{Family, Label, Registrar};
use crate::shutdown::Shutdown;
use crate::subprotocols::Forward;
use crate::target;

/// The upgrade being judged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    /// The socket peer (for logs).
    pub(crate) peer: SocketAddr,
    /// The client: the peer, or an `X-Forwarded-For` entry (`trusted_hops`).
    pub(crate) client: IpAddr,
    /// The request head's headers.
    pub(crate) headers: &'a HeaderMap,
    /// The request target as the client sent it.
    pub(crate) uri: &'a Uri,
}

/// An admitted upgrade: what it holds, and the target it was judged on,
/// which is the one forwarded.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Everything the connection holds; dropping it is the release.
    pub(crate) guard: AdmissionGuard,
    /// The request target in origin-form, path normalised.
    pub(crate) target: Uri,
    /// What goes to the upstream of the offered subprotocols.
    pub(crate) offer: Forward,
}

/// The admission series.
#[derive(Debug, Clone)]
struct AdmissionMetrics {
    /// `wsgate_connections_admitted_total`.
    admitted: IntCounter,
    /// `wsgate_connections_rejected_total{reason}`.
    rejected: Family<RejectReason>,
    /// `wsgate_connections_would_reject_total{reason}` (dry run; never
    /// `draining`, `bad_path`, `loop`, `origin` or `subprotocol`, which
    /// are not limits).
    would_reject: Family<RejectReason>,
}

/// The admission state shared by every connection: each policy's state,
/// changed in place on reload.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: Capacity,
    per_ip: PerIp,
    keys: KeyLimits,
    /// `None` without `fleet_redis_url`.
    fleet: Option<Fleet>,
    rate: Rate,
    shutdown: Shutdown,
    metrics: AdmissionMetrics,
}

impl Admission {
    /// The policies of `config`, their series registered with `r`. Must
    /// run inside the runtime (the key rules may start the JWKS watch).
    ///
    /// # Errors
    /// A metric name is taken on the registry.
    pub(crate) fn new(
        config: &Config,
        r: &Registrar<'_>,
        fleet: Option<Fleet>,
        shutdown: Shutdown,
    ) -> prometheus::Result<Self> {
        let active: IntGauge = r.gauge(
            "wsgate_connections_active",
            "WebSocket slots held right now",
        )?;
        let max: IntGauge = r.gauge(
            "wsgate_connections_max",
            "Cap on concurrent WebSocket connections in force; 0 = unlimited",
        )?;
        let metrics = AdmissionMetrics {
            admitted: r.counter(
                "wsgate_connections_admitted_total",
                "WebSocket upgrades that got a slot",
            )?,
            rejected: r.family(
                "wsgate_connections_rejected_total",
                "WebSocket upgrades refused by wsgate",
                "reason",
            )?,
            would_reject: r.family_of(
                "wsgate_connections_would_reject_total",
                "Dry run (enforce = false): upgrades that would have been refused",
                "reason",
                |reason| {
                    !matches!(
                        reason,
                        RejectReason::Draining
                            | RejectReason::BadPath
                            | RejectReason::Loop
                            | RejectReason::Origin
                            | RejectReason::Subprotocol
                    )
                },
            )?,
        };
        Ok(Admission {
            inner: Arc::new(Inner {
                capacity: Capacity::new(config.max_clients, config.watermarks, active, max),
                per_ip: PerIp::new(config.max_clients_per_ip),
                keys: KeyLimits::new(config, KeyMetrics::register(r)?),
                fleet,
                rate: Rate::new(config.admission_rate),
                shutdown,
                metrics,
            }),
        })
    }

    /// Applies a reloaded configuration in place: nothing admitted is
    /// touched (lowering a limit only stops new admissions).
    pub(crate) fn apply(&self, config: &Config) {
        let inner = &*self.inner;
        inner.capacity.set_cap(config.max_clients);
        inner.capacity.set_watermarks(config.watermarks);
        inner.per_ip.set_max(config.max_clients_per_ip);
        inner.rate.set(config.admission_rate);
        inner.keys.apply(config);
        if let (Some(fleet), Some(settings)) = (&inner.fleet, &config.fleet) {
            fleet.apply(settings);
        }
    }

    /// Judges an upgrade: the guard of everything it took, or why it is
    /// refused. Counts the outcome.
    ///
    /// # Errors
    /// The first policy that refuses (only what is enforced refuses).
    pub(crate) async fn admit(
        &self,
        config: &Config,
        req: Candidate<'_>,
    ) -> Result<Admitted, Rejection> {
        let m = &self.inner.metrics;
        let mut screen = Screen {
            enforce: config.enforce,
            would_reject: None,
        };
        match self.screen(&mut screen, config, req).await {
            Ok(admitted) => {
                m.admitted.inc();
                if let Some(reason) = screen.would_reject {
                    m.would_reject.inc(reason);
                    tracing::debug!(
                        peer = %req.peer,
                        client = %req.client,
                        reason = reason.label(),
                        "dry run: admitted a websocket upgrade from {} that {} would have refused",
                        req.client,
                        reason.label()
                    );
                }
                Ok(admitted)
            }
            Err(rejection) => {
                m.rejected.inc(rejection.reason);
                Err(rejection)
            }
        }
    }

    /// The checks, in order. A refusal drops `guard` on its way out,
    /// which gives back what the earlier checks took.
    async fn screen(
        &self,
        s: &mut Screen,
        config: &Config,
        req: Candidate<'_>,
    ) -> Result<Admitted, Rejection> {
        let inner = &*self.inner;
        let anyway = !s.enforce;
        if LoopMarker::of_this_process().is_in(req.headers) {
            return Err(Rejection {
                reason: RejectReason::Loop,
                status: StatusCode::LOOP_DETECTED,
            });
        }
        let target = target::upgrade_target(req.uri, req.headers).map_err(|_| Rejection {
            reason: RejectReason::BadPath,
            status: StatusCode::BAD_REQUEST,
        })?;
        handshake::origin(config, req.headers)?;
        let offer = handshake::subprotocols(config, req.headers)?;
        draining::check(&inner.shutdown)?;
        let slot = s.require(inner.capacity.check(anyway))?;
        let mut guard = AdmissionGuard {
            keys: Vec::new(),
            fleet: None,
            ip: None,
            slot,
        };
        guard.ip = s.apply(inner.per_ip.check(req.client, anyway))?;
        let fleet_keys = {
            let rules = inner.keys.rules();
            let mut keys = KeyRequest::new(&inner.keys, &config.jwt_from, req.headers, &target);
            for rule in rules.applying_to(target.path()) {
                let verdict = keys::verdict(keys.check(rule, anyway));
                guard.keys.extend(s.apply(verdict)?.flatten());
            }
            keys.take_fleet_keys()
        };
        if let Some(f) = &inner.fleet {
            guard.fleet = s
                .apply(fleet::check(f, &fleet_keys, anyway).await)?
                .flatten();
        }
        s.apply(inner.rate.check())?;
        Ok(Admitted {
            guard,
            target,
            offer,
        })
    }

    /// The limits per key (for `/keys` and the busiest-ratio gauges).
    pub(crate) fn keys(&self) -> &KeyLimits {
        &self.inner.keys
    }

    /// Whether fleet-wide limits are on (they can only be turned on or off
    /// by a restart).
    pub(crate) fn has_fleet(&self) -> bool {
        self.inner.fleet.is_some()
    }

    /// Slots held right now.
    pub(crate) fn active(&self) -> usize {
        self.inner.capacity.active()
    }

    /// Whether saturation makes the instance not ready (the watermarks).
    pub(crate) fn is_saturated(&self) -> bool {
        self.inner.capacity.is_saturated()
    }
}

/// Enforce or only report: the one place it is decided. Enforcing, the
/// first policy over its limit refuses; in dry run every policy runs,
/// takes its share anyway, and the first that would have refused is
/// noted.
#[derive(Debug)]
struct Screen {
    enforce: bool,
    would_reject: Option<RejectReason>,
}

impl Screen {
    /// A verdict whose share is optional (the connection goes on without
    /// it): what the policy took, if anything.
    fn apply<H>(&mut self, verdict: Verdict<H>) -> Result<Option<H>, Rejection> {
        match verdict {
            Verdict::Pass(held) => Ok(Some(held)),
            Verdict::Over {
                rejection,
                taken,
                rule_counter,
            } => {
                if self.enforce {
                    if let Some(counter) = rule_counter {
                        counter.inc();
                    }
                    return Err(rejection);
                }
                self.would_reject.get_or_insert(rejection.reason);
                Ok(taken)
            }
        }
    }

    /// A verdict whose share the connection cannot go on without (the
    /// slot): refused unless the policy took it.
    fn require<H>(&mut self, verdict: Verdict<H>) -> Result<H, Rejection> {
        let rejection = match &verdict {
            Verdict::Over { rejection, .. } => *rejection,
            Verdict::Pass(_) => RejectReason::Capacity.into(),
        };
        self.apply(verdict)?.ok_or(rejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(taken: Option<u8>) -> Verdict<u8> {
        Verdict::over_taking(RejectReason::PerIp, taken)
    }

    #[test]
    fn enforcing_the_first_over_refuses_and_counts_the_rule() {
        let mut s = Screen {
            enforce: true,
            would_reject: None,
        };
        assert_eq!(s.apply(Verdict::Pass(1)), Ok(Some(1)));
        let counter = IntCounter::new("r", "r").expect("metric");
        let refused = Verdict::<u8>::Over {
            rejection: RejectReason::Key.into(),
            taken: None,
            rule_counter: Some(counter.clone()),
        };
        assert_eq!(
            s.apply(refused).map_err(|r| r.reason),
            Err(RejectReason::Key)
        );
        assert_eq!(counter.get(), 1, "an enforced key refusal counts its rule");
        assert_eq!(s.would_reject, None);
    }

    #[test]
    fn dry_run_keeps_what_was_taken_and_notes_the_first_refusal() {
        let mut s = Screen {
            enforce: false,
            would_reject: None,
        };
        let counter = IntCounter::new("r", "r").expect("metric");
        let first = Verdict::Over {
            rejection: RejectReason::Key.into(),
            taken: Some(7),
            rule_counter: Some(counter.clone()),
        };
        assert_eq!(s.apply(first), Ok(Some(7)));
        assert_eq!(s.apply(over(None)), Ok(None));
        assert_eq!(
            s.would_reject,
            Some(RejectReason::Key),
            "first refusal wins"
        );
        assert_eq!(counter.get(), 0, "dry run counts no rule refusal");
        assert_eq!(s.require(over(Some(3))), Ok(3));
        assert_eq!(
            s.require(over(None)).map_err(|r| r.reason),
            Err(RejectReason::PerIp),
            "a required share that was not taken refuses even in dry run"
        );
    }
}
