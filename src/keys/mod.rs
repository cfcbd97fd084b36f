//! Limits per key (docs/operations.md#limits-per-key): the rules in force, their key tables, and the
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

use crate::config::{Config, KeyRule, KeySource, MissingKey, TokenSource};
use crate::jwt::{self, Claims, Expect, Verifier};
use crate::metrics::Registrar;

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

/// The per-rule series, labelled by rule name (never by a key value):
/// they exist for the rules in force, created when a rule appears and
/// removed when a reload drops it.
#[derive(Debug, Clone)]
pub(crate) struct KeyMetrics {
    /// `wsgate_key_rejected_total{rule}`.
    rejected: prometheus::IntCounterVec,
    /// `wsgate_keys_tracked{rule}`.
    tracked: prometheus::IntGaugeVec,
    /// `wsgate_key_busiest_ratio{rule}`.
    busiest: prometheus::GaugeVec,
}

impl KeyMetrics {
    /// Registers the per-rule families (no series until a rule exists).
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        Ok(KeyMetrics {
            rejected: r.counter_vec(
                "wsgate_key_rejected_total",
                "WebSocket upgrades refused by a key rule, by rule",
                &["rule"],
            )?,
            tracked: r.gauge_vec(
                "wsgate_keys_tracked",
                "Distinct key values with connections now, by rule",
                &["rule"],
            )?,
            busiest: r.float_gauge_vec(
                "wsgate_key_busiest_ratio",
                "Highest active / limit among a rule's key values (1 = some key is full)",
                &["rule"],
            )?,
        })
    }

    /// Drops a removed rule's series. Handles still held (by connections
    /// admitted under the rule) keep working but are no longer exported.
    fn remove(&self, rule: &str) {
        let _ = self.rejected.remove_label_values(&[rule]);
        let _ = self.tracked.remove_label_values(&[rule]);
        let _ = self.busiest.remove_label_values(&[rule]);
    }
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
                    None => KeyTable::new(
                        &rule.name,
                        inner.metrics.tracked.with_label_values(&[&rule.name]),
                    ),
                };
                Arc::new(Rule {
                    config: rule.clone(),
                    table,
                    rejected: inner.metrics.rejected.with_label_values(&[&rule.name]),
                    busiest: inner.metrics.busiest.with_label_values(&[&rule.name]),
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
            self.configure_verifier(jwt, config.jwt_require_exp);
        }
    }

    fn configure_verifier(&self, jwt: &crate::config::JwtSettings, require_exp: bool) {
        let expect = Expect {
            issuer: jwt.issuer.clone(),
            audience: jwt.audience.clone(),
            require_exp,
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

/// The `GET /keys` answer (docs/operations.md#limits-per-key).
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
    /// Given more than once where `jwt_from` reads it.
    Ambiguous,
}

/// Why a key rule refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRefusal {
    /// The key holds its limit.
    OverLimit,
    /// No usable key (`missing = reject`, or a value that cannot be a key).
    Missing,
    /// The key (or the token) is given more than once.
    Ambiguous,
    /// The rule's table already tracks `max_keys` values.
    TableFull,
    /// A `jwt_claim` rule: the token is present but not valid.
    BadToken,
}

/// A key rule's refusal: why, the status the rule answers with, and the
/// rule's `wsgate_key_rejected_total{rule}` series (counted by the caller
/// when the refusal is enforced, not in dry run).
#[derive(Debug)]
pub(crate) struct Refused {
    /// Why.
    pub(crate) why: KeyRefusal,
    /// The answer's status.
    pub(crate) status: StatusCode,
    /// The refusing rule's counter.
    pub(crate) counter: IntCounter,
}

impl Rule {
    /// The rule's refusal for `why`: its configured status over the limit
    /// (429 or 503), 401 for a `jwt_claim` rule without a token or with a
    /// bad one, 400 for any other missing key, 503 for a full table.
    fn refusal(&self, why: KeyRefusal) -> Refused {
        let jwt_rule = matches!(self.config.key, KeySource::JwtClaim(_));
        let status = match why {
            KeyRefusal::OverLimit => {
                StatusCode::from_u16(self.config.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
            }
            KeyRefusal::Missing if jwt_rule => StatusCode::UNAUTHORIZED,
            KeyRefusal::Missing | KeyRefusal::Ambiguous => StatusCode::BAD_REQUEST,
            KeyRefusal::BadToken => StatusCode::UNAUTHORIZED,
            KeyRefusal::TableFull => StatusCode::SERVICE_UNAVAILABLE,
        };
        Refused {
            why,
            status,
            counter: self.rejected.clone(),
        }
    }
}

/// What one rule says about one request.
#[derive(Debug)]
pub(crate) enum RuleOutcome {
    /// The rule does not apply (no key and `missing = allow`).
    NotApplicable,
    /// The request's share of its key.
    Within(KeyHold),
    /// Refused; in dry run the share was taken anyway and is in `taken`.
    Over {
        /// The refusal.
        refused: Refused,
        /// The share taken past the limit (dry run only).
        taken: Option<KeyHold>,
    },
}

impl RuleSet {
    /// The rules that apply to an upgrade of `path` (normalised), in file
    /// order.
    pub(crate) fn applying_to<'r>(&'r self, path: &'r str) -> impl Iterator<Item = &'r Arc<Rule>> {
        self.rules
            .iter()
            .filter(move |rule| under_prefix(path, &rule.config.path_prefix))
    }
}

/// Whether `path` is `prefix` or below it, in whole segments: `/api`
/// covers `/api` and `/api/x`, not `/apix`; `/api/` covers `/api/` and
/// `/api/x`, not `/api`.
fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// One upgrade's key checks: the request head, the token read once
/// however many `jwt_claim` rules there are, and the `fleet = true` values
/// taken for the fleet check that follows.
#[derive(Debug)]
pub(crate) struct KeyRequest<'a> {
    limits: &'a KeyLimits,
    jwt_from: &'a TokenSource,
    headers: &'a HeaderMap,
    uri: &'a Uri,
    token: Token,
    /// The key values of `fleet = true` rules this request took.
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

    /// The rule's refusal when the fleet holds this value's limit: like
    /// any key rule over its limit.
    pub(crate) fn refusal(&self) -> Refused {
        self.rule.refusal(KeyRefusal::OverLimit)
    }
}

impl<'a> KeyRequest<'a> {
    /// The checks for one request.
    pub(crate) fn new(
        limits: &'a KeyLimits,
        jwt_from: &'a TokenSource,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Self {
        KeyRequest {
            limits,
            jwt_from,
            headers,
            uri,
            token: Token::Unread,
            fleet: Vec::new(),
        }
    }

    /// The `fleet = true` rule values this request took.
    pub(crate) fn take_fleet_keys(&mut self) -> Vec<FleetKey> {
        std::mem::take(&mut self.fleet)
    }

    /// The key `rule` takes from this request.
    fn find(&mut self, rule: &Rule) -> Result<Found<'a>, KeyRefusal> {
        let KeySource::JwtClaim(claim) = &rule.config.key else {
            return Ok(extract::key(&rule.config.key, self.headers, self.uri));
        };
        if matches!(self.token, Token::Unread) {
            self.token = self.read_token();
        }
        match &self.token {
            Token::Verified(claims) => match claims.key(claim) {
                Ok(v) => Ok(Found::checked(v.map(std::borrow::Cow::Owned))),
                Err(e) => {
                    tracing::debug!("refused a token: {e}");
                    Err(KeyRefusal::BadToken)
                }
            },
            Token::Absent => Ok(Found::Missing),
            Token::Ambiguous => Err(KeyRefusal::Ambiguous),
            Token::Bad | Token::Unread => Err(KeyRefusal::BadToken),
        }
    }

    fn read_token(&self) -> Token {
        let token = match extract::token(self.jwt_from, self.headers, self.uri) {
            Ok(Some(token)) => token,
            Ok(None) => return Token::Absent,
            Err(extract::Ambiguous) => return Token::Ambiguous,
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

    /// Takes `rule`'s share for this request. Over the limit, dry run
    /// (`take_anyway`) takes it all the same, so the count shows the truth.
    pub(crate) fn check(&mut self, rule: &Arc<Rule>, take_anyway: bool) -> RuleOutcome {
        let refused = |why| RuleOutcome::Over {
            refused: rule.refusal(why),
            taken: None,
        };
        let key = match self.find(rule) {
            Ok(Found::Value(v)) => v,
            Ok(Found::Unusable) => return refused(KeyRefusal::Missing),
            Ok(Found::Ambiguous) => return refused(KeyRefusal::Ambiguous),
            Ok(Found::Missing) => match rule.config.missing {
                MissingKey::Allow => return RuleOutcome::NotApplicable,
                MissingKey::Reject => return refused(KeyRefusal::Missing),
                MissingKey::Shared => std::borrow::Cow::Borrowed(""),
            },
            Err(why) => return refused(why),
        };
        let limit = rule.config.limit_for(&key);
        let over = take_anyway && rule.table.is_full(&key, limit);
        match rule
            .table
            .reserve(&key, limit, rule.config.max_keys, take_anyway)
        {
            Ok(hold) => {
                if rule.config.fleet && limit > 0 {
                    self.fleet.push(FleetKey {
                        rule: Arc::clone(rule),
                        value: key.into_owned(),
                        limit,
                    });
                }
                if over {
                    RuleOutcome::Over {
                        refused: rule.refusal(KeyRefusal::OverLimit),
                        taken: Some(hold),
                    }
                } else {
                    RuleOutcome::Within(hold)
                }
            }
            Err(Full::Key) => refused(KeyRefusal::OverLimit),
            Err(Full::Table) => refused(KeyRefusal::TableFull),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::under_prefix;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under_prefix("/api", "/api"));
        assert!(under_prefix("/api/x", "/api"));
        assert!(!under_prefix("/apix", "/api"));
        assert!(!under_prefix("/ap", "/api"));
        assert!(under_prefix("/api/", "/api/"));
        assert!(under_prefix("/api/x", "/api/"));
        assert!(!under_prefix("/api", "/api/"));
        assert!(under_prefix("/anything", "/"));
        assert!(under_prefix("/", "/"));
    }
}
