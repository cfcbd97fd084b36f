//! Limits per key (SPEC §9): the rules in force, their key tables, and the
//! per-request check that admission runs between per-IP and rate.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | [`KeyLimits`] (rules + tables, swapped on reload), [`KeyRequest`] (one upgrade's checks) |
//! | `extract.rs` | reading a key or a token out of the request head |
//! | `table.rs` | one rule's counts per value, and [`KeyHold`], one connection's share |
//!
//! Reload keeps each rule's table when the rule keeps its name and key
//! source, so lowering a limit only stops new admissions. A rule that is
//! removed releases nothing: its holds keep their table alive until their
//! connections end. A new rule counts the connections admitted from then on
//! (existing ones are not back-counted: wsgate does not keep every request
//! head, and a rule must not refuse what it never admitted).

pub(crate) mod extract;
pub(crate) mod table;

use std::sync::{Arc, PoisonError, RwLock};

use http::{HeaderMap, StatusCode, Uri};
use prometheus::{Gauge, IntCounter};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admission::{KeyChecks, RejectReason};
use crate::config::{Config, KeyRule, KeySource, MissingKey, TokenSource};
use crate::jwt::{self, Claims, Expect, Verifier};
use crate::metrics::KeyMetrics;

use self::extract::Found;
pub(crate) use self::table::KeyHold;
use self::table::{Full, KeyTable};

/// One rule in force: its settings, its table and its metric handles.
#[derive(Debug)]
pub(crate) struct Rule {
    config: KeyRule,
    table: Arc<KeyTable>,
    /// `wsgate_key_rejected_total{rule}`.
    rejected: IntCounter,
    /// `wsgate_key_busiest_ratio{rule}`, set at scrape time.
    busiest: Gauge,
}

/// The rules in force, in file order; replaced whole on reload.
#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    rules: Vec<Arc<Rule>>,
}

/// The limits per key: the rule set in force and the JWT verifier.
#[derive(Debug, Clone)]
pub(crate) struct KeyLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rules: RwLock<Arc<RuleSet>>,
    /// Created when a configuration first names a JWKS file; kept (and
    /// reconfigured) after that, so its one file watch stays the only one.
    verifier: RwLock<Option<Arc<Verifier>>>,
    metrics: KeyMetrics,
    /// Stops the JWKS watch when the proxy is dropped.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl KeyLimits {
    /// The limits of `config`. Must run inside the runtime (it may start the
    /// JWKS watch).
    pub(crate) fn new(config: &Config, metrics: KeyMetrics) -> Self {
        let limits = KeyLimits {
            inner: Arc::new(Inner {
                rules: RwLock::new(Arc::default()),
                verifier: RwLock::new(None),
                metrics,
                stop: CancellationToken::new(),
            }),
        };
        limits.apply(config);
        limits
    }

    /// Applies `config`'s rules and JWT settings in place (see the module
    /// doc for what happens to connections already admitted).
    pub(crate) fn apply(&self, config: &Config) {
        let inner = &*self.inner;
        let old = self.rules();
        let rules = config
            .key_limits
            .iter()
            .map(|rule| {
                let kept = old
                    .rules
                    .iter()
                    .find(|o| o.config.name == rule.name && o.config.key == rule.key);
                let table = match kept {
                    Some(o) => Arc::clone(&o.table),
                    None => KeyTable::new(&rule.name, inner.metrics.tracked(&rule.name)),
                };
                Arc::new(Rule {
                    config: rule.clone(),
                    table,
                    rejected: inner.metrics.rejected(&rule.name),
                    busiest: inner.metrics.busiest(&rule.name),
                })
            })
            .collect();
        for gone in old
            .rules
            .iter()
            .filter(|o| !config.key_limits.iter().any(|r| r.name == o.config.name))
        {
            inner.metrics.remove(&gone.config.name);
        }
        *inner.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(RuleSet { rules });
        if let Some(jwt) = &config.jwt {
            self.configure_verifier(jwt);
        }
    }

    fn configure_verifier(&self, jwt: &crate::config::JwtSettings) {
        let expect = Expect {
            issuer: jwt.issuer.clone(),
            audience: jwt.audience.clone(),
        };
        let inner = &*self.inner;
        let mut slot = inner
            .verifier
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = slot.as_ref() {
            // A new path is read by the watch at once, on the blocking pool.
            v.reconfigure(&jwt.jwks_file, expect);
            return;
        }
        match Verifier::load(&jwt.jwks_file, expect) {
            Ok(v) => {
                let v = Arc::new(v);
                tokio::spawn(jwt::watch(Arc::clone(&v), inner.stop.clone()));
                *slot = Some(v);
            }
            // Validation read the same file a moment ago; if it changed
            // since, the jwt rules refuse (401) until a good file appears.
            Err(e) => tracing::error!(file = %jwt.jwks_file.display(), "jwks: {e}"),
        }
    }

    /// The rule set in force (one snapshot per upgrade).
    pub(crate) fn rules(&self) -> Arc<RuleSet> {
        Arc::clone(
            &self
                .inner
                .rules
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn verifier(&self) -> Option<Arc<Verifier>> {
        self.inner
            .verifier
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets `wsgate_key_busiest_ratio` for every rule (at scrape time: it
    /// takes a pass over each table, which the connection path must not).
    pub(crate) fn refresh_gauges(&self) {
        for rule in &self.rules().rules {
            rule.busiest
                .set(rule.table.busiest_ratio(|k| rule.config.limit_for(k)));
        }
    }

    /// `GET /keys`: the `top` values of rule `name` with the most
    /// connections; `None` for an unknown rule.
    pub(crate) fn top(&self, name: &str, top: usize) -> Option<KeysAnswer> {
        let rules = self.rules();
        let rule = rules.rules.iter().find(|r| r.config.name == name)?;
        let keys = rule
            .table
            .top(top)
            .into_iter()
            .map(|(key, active)| KeyEntry {
                limit: rule.config.limit_for(&key),
                key,
                active,
            })
            .collect();
        Some(KeysAnswer {
            rule: rule.config.name.clone(),
            keys,
        })
    }
}

/// The `GET /keys` answer (SPEC §9).
#[derive(Debug, Serialize)]
pub(crate) struct KeysAnswer {
    rule: String,
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Serialize)]
struct KeyEntry {
    key: String,
    active: u32,
    /// 0 = unlimited.
    limit: u32,
}

/// What a request's token turned out to be; read once per request however
/// many `jwt_claim` rules there are.
#[derive(Debug)]
enum Token {
    Unread,
    Absent,
    Verified(Claims),
    Bad,
}

/// One upgrade's key checks: the request head, the rules in force, and
/// which rule refused it, if one did.
#[derive(Debug)]
pub(crate) struct KeyRequest<'a> {
    limits: &'a KeyLimits,
    rules: &'a RuleSet,
    jwt_from: &'a TokenSource,
    headers: &'a HeaderMap,
    uri: &'a Uri,
    token: Token,
    refused: Option<(Arc<Rule>, RejectReason)>,
    /// The key values of `fleet = true` rules this request took, for the
    /// fleet check that follows (SPEC §10).
    fleet: Vec<FleetKey>,
}

/// One key value of a `fleet = true` rule that a request falls under.
#[derive(Debug)]
pub(crate) struct FleetKey {
    rule: Arc<Rule>,
    /// The key value ("" for the shared bucket of requests without one).
    pub(crate) value: String,
    /// The value's limit (≥ 1: an unlimited value has no fleet count).
    pub(crate) limit: u32,
}

impl FleetKey {
    /// The rule's name.
    pub(crate) fn rule(&self) -> &str {
        &self.rule.config.name
    }

    /// The rule refused this value fleet-wide: counts it against the rule
    /// and gives the rule's status (SPEC §9: like any key rule, reason `key`).
    pub(crate) fn refusal_status(&self) -> StatusCode {
        self.rule.rejected.inc();
        StatusCode::from_u16(self.rule.config.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
    }
}

impl<'a> KeyRequest<'a> {
    /// The checks for one request.
    pub(crate) fn new(
        limits: &'a KeyLimits,
        rules: &'a RuleSet,
        jwt_from: &'a TokenSource,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Self {
        KeyRequest {
            limits,
            rules,
            jwt_from,
            headers,
            uri,
            token: Token::Unread,
            refused: None,
            fleet: Vec::new(),
        }
    }

    /// The `fleet = true` rule values this request took (after
    /// [`KeyChecks::reserve_keys`]).
    pub(crate) fn take_fleet_keys(&mut self) -> Vec<FleetKey> {
        std::mem::take(&mut self.fleet)
    }

    /// The status for a refusal by `reason` (SPEC §9), and counts it
    /// against the rule that refused. `None` when no key rule refused.
    pub(crate) fn refusal_status(&self, reason: RejectReason) -> Option<StatusCode> {
        let (rule, by) = self.refused.as_ref().filter(|(_, by)| *by == reason)?;
        rule.rejected.inc();
        let jwt_rule = matches!(rule.config.key, KeySource::JwtClaim(_));
        Some(match by {
            RejectReason::Key => {
                StatusCode::from_u16(rule.config.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
            }
            RejectReason::KeyMissing if jwt_rule => StatusCode::UNAUTHORIZED,
            RejectReason::KeyMissing => StatusCode::BAD_REQUEST,
            RejectReason::Jwt => StatusCode::UNAUTHORIZED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        })
    }

    /// The key `rule` takes from this request.
    fn find(&mut self, rule: &Rule) -> Result<Found<'a>, RejectReason> {
        let KeySource::JwtClaim(claim) = &rule.config.key else {
            return Ok(extract::key(&rule.config.key, self.headers, self.uri));
        };
        if matches!(self.token, Token::Unread) {
            self.token = self.read_token();
        }
        match &self.token {
            Token::Verified(claims) => Ok(match claims.key(claim) {
                Some(v) if crate::config::is_usable_key(&v) => {
                    Found::Value(std::borrow::Cow::Owned(v))
                }
                Some(v) if v.is_empty() => Found::Missing,
                Some(_) => Found::Unusable,
                None => Found::Missing,
            }),
            Token::Absent => Ok(Found::Missing),
            Token::Bad | Token::Unread => Err(RejectReason::Jwt),
        }
    }

    fn read_token(&self) -> Token {
        let Some(token) = extract::token(self.jwt_from, self.headers, self.uri) else {
            return Token::Absent;
        };
        // No verifier: the JWKS file named at start could not be read since.
        let Some(verifier) = self.limits.verifier() else {
            return Token::Bad;
        };
        match verifier.verify(&token) {
            Ok(claims) => Token::Verified(claims),
            Err(e) => {
                tracing::debug!("refused a token: {e}");
                Token::Bad
            }
        }
    }

    /// Takes `rule`'s share for this request: `Ok(None)` when the rule
    /// does not apply to it.
    fn reserve(
        &mut self,
        rule: &Arc<Rule>,
        enforce: bool,
    ) -> Result<(Option<KeyHold>, bool), RejectReason> {
        let key = match self.find(rule)? {
            Found::Value(v) => v,
            Found::Unusable => return Err(RejectReason::KeyMissing),
            Found::Missing => match rule.config.missing {
                MissingKey::Allow => return Ok((None, false)),
                MissingKey::Reject => return Err(RejectReason::KeyMissing),
                MissingKey::Shared => std::borrow::Cow::Borrowed(""),
            },
        };
        let limit = rule.config.limit_for(&key);
        // Dry run: the count goes past the limit (so it shows the truth),
        // and the report says it would have refused.
        let would = !enforce && rule.table.is_full(&key, limit);
        match rule
            .table
            .reserve(&key, limit, rule.config.max_keys, !enforce)
        {
            Ok(hold) => {
                if rule.config.fleet && limit > 0 {
                    self.fleet.push(FleetKey {
                        rule: Arc::clone(rule),
                        value: key.into_owned(),
                        limit,
                    });
                }
                Ok((Some(hold), would))
            }
            Err(Full::Key) => Err(RejectReason::Key),
            Err(Full::Table) => Err(RejectReason::KeyTableFull),
        }
    }
}

impl KeyChecks for KeyRequest<'_> {
    fn reserve_keys(
        &mut self,
        enforce: bool,
        holds: &mut Vec<KeyHold>,
    ) -> Result<Option<RejectReason>, RejectReason> {
        let mut would_reject = None;
        let path = self.uri.path();
        for rule in &self.rules.rules {
            if !path.starts_with(rule.config.path_prefix.as_str()) {
                continue;
            }
            match self.reserve(rule, enforce) {
                Ok((hold, would)) => {
                    holds.extend(hold);
                    if would {
                        self.refused
                            .get_or_insert((Arc::clone(rule), RejectReason::Key));
                        would_reject.get_or_insert(RejectReason::Key);
                    }
                }
                Err(reason) => {
                    self.refused.get_or_insert((Arc::clone(rule), reason));
                    if enforce {
                        return Err(reason);
                    }
                    would_reject.get_or_insert(reason);
                }
            }
        }
        Ok(would_reject)
    }
}
