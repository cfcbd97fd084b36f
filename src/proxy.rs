//! The request handler on the client port: classifies each request, admits
//! and tunnels WebSocket upgrades, and reverse-proxies everything else.
//!
//! Order on the upgrade path (SPEC §3), each step before the next costs
//! anything: validate the handshake (400) → refuse if draining (503) →
//! reserve a slot without waiting (503 over the cap, per-IP, key rules;
//! `admission` and `keys`) → the fleet limits (one Redis round trip at
//! most `fleet_timeout` long; `fleet`) → rate → connect and forward
//! the handshake within `upstream_connect_timeout` (502/504) → return the
//! upstream's 101 and hand the slot to a tracked tunnel task. Errors before
//! the hand-over drop the slot guard, which is the release.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use http::uri::{Authority, Scheme, Uri};
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;

use crate::access_log::{Refusal, Refusals, SessionInfo};
use crate::admission::{Admission, Admitted, Policy, RejectReason};
use crate::config::Config;
use crate::drain::Tunnels;
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::fleet::{Fleet, FleetRefusal, Scope};
use crate::headers::{self, RequestKind};
use crate::keys::{FleetKey, KeyLimits, KeyRequest};
use crate::metrics::Metrics;
use crate::responses::{self, ProxyBody};
use crate::shutdown::Shutdown;
use crate::splice::Limits;
use crate::tunnel::{self, Answer, TunnelContext};
use crate::upstream_client::UpstreamClient;

/// The shared state behind every connection's service.
#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Swapped whole on reload; each request works on one snapshot.
    config: RwLock<Arc<Config>>,
    admission: Admission,
    /// Limits per key: the rules in force and their tables.
    keys: KeyLimits,
    /// Fleet-wide limits through Redis; `None` without `fleet_redis_url`.
    fleet: Option<Fleet>,
    /// Live tunnels, for the drain.
    tunnels: Tunnels,
    metrics: Arc<Metrics>,
    /// Refusals counted for the access log's summary lines.
    refusals: Refusals,
    shutdown: Shutdown,
    /// Pooled keep-alive connections to the upstream for plain HTTP.
    client: UpstreamClient,
    upstream_authority: Authority,
}

impl Proxy {
    /// Builds the proxy state.
    ///
    /// # Errors
    /// The upstream authority from a validated config always parses; an
    /// error here would mean validation let a bad value through.
    pub(crate) fn new(
        config: Config,
        metrics: Metrics,
        shutdown: Shutdown,
        fleet: Option<Fleet>,
    ) -> Result<Self, http::uri::InvalidUri> {
        let admission = Admission::new(
            config.max_clients,
            policy_of(&config),
            metrics.active.clone(),
            metrics.max.clone(),
        );
        let client = UpstreamClient::new(&config);
        let upstream_authority = config.upstream.authority.parse()?;
        let keys = KeyLimits::new(&config, metrics.keys.clone());
        let refusals = Refusals::default();
        refusals.set_enabled(config.access_log);
        metrics.sessions.expect_codes(&config.close);
        Ok(Proxy {
            inner: Arc::new(Inner {
                config: RwLock::new(Arc::new(config)),
                admission,
                keys,
                fleet,
                tunnels: Tunnels::new(),
                metrics: Arc::new(metrics),
                refusals,
                shutdown,
                client,
                upstream_authority,
            }),
        })
    }

    /// The admission state (for tests and the admin server).
    pub(crate) fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// The limits per key (for `/keys` and the busiest-ratio gauges).
    pub(crate) fn keys(&self) -> &KeyLimits {
        &self.inner.keys
    }

    /// The live tunnels (for the drain).
    pub(crate) fn tunnels(&self) -> &Tunnels {
        &self.inner.tunnels
    }

    /// The refusal counts of the access log (flushed at exit).
    pub(crate) fn refusals(&self) -> &Refusals {
        &self.inner.refusals
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .inner
                .config
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Applies a reloaded configuration in place: caps, limits, watermarks,
    /// timeouts and lifetimes take effect for new connections; nothing
    /// already connected is dropped. Addresses, the upstream and the
    /// worker count need a restart: they are kept, with a warning.
    pub(crate) fn reload(&self, mut new: Config) {
        let old = self.config();
        for (key, changed) in [
            ("listen", old.listen != new.listen),
            ("admin_listen", old.admin_listen != new.admin_listen),
            ("upstream", old.upstream != new.upstream),
            ("workers", old.workers != new.workers),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "reload: {key} changes only take effect after a restart"
                );
            }
        }
        new.listen = old.listen;
        new.admin_listen = old.admin_listen;
        new.upstream = old.upstream.clone();
        new.workers = old.workers;
        self.inner.admission.set_cap(new.max_clients);
        self.inner.admission.set_policy(policy_of(&new));
        self.inner.keys.apply(&new);
        self.inner.refusals.set_enabled(new.access_log);
        self.inner.metrics.sessions.expect_codes(&new.close);
        match (&self.inner.fleet, &new.fleet) {
            (Some(fleet), Some(settings)) => fleet.apply(settings),
            (None, None) => {}
            _ => {
                tracing::warn!(
                    key = "fleet_redis_url",
                    "reload: turning fleet limits on or off only takes effect after a restart"
                );
                new.fleet = old.fleet.clone();
            }
        }
        tracing::info!(
            max_clients = new.max_clients,
            active = self.inner.admission.active(),
            "reload: configuration applied"
        );
        *self
            .inner
            .config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
    }

    /// The fleet check (SPEC §10), after the local ones and before rate:
    /// one Redis round trip at most `fleet_timeout` long. The hold goes
    /// into the slot's guard.
    async fn check_fleet(
        &self,
        fleet: &Fleet,
        keys: Vec<FleetKey>,
        admitted: &mut Admitted,
        enforce: bool,
    ) -> Result<(), ProxyError> {
        let total = fleet.total_scope();
        let offset = usize::from(total.is_some());
        let scopes: Vec<Scope> = total
            .into_iter()
            .chain(
                keys.iter()
                    .map(|k| fleet.key_scope(k.rule(), &k.value, k.limit)),
            )
            .collect();
        let answer = fleet.admit(scopes, enforce).await;
        if let Some(hold) = answer.hold {
            admitted.guard.hold_fleet(hold);
        }
        let refusal = match answer.refused {
            None => return Ok(()),
            Some(FleetRefusal::Unavailable) => ProxyError::Rejected(RejectReason::FleetUnavailable),
            Some(FleetRefusal::Full(i)) => match i.checked_sub(offset).and_then(|k| keys.get(k)) {
                Some(key) if enforce => {
                    ProxyError::KeyRejected(RejectReason::Key, key.refusal_status())
                }
                Some(_) => ProxyError::Rejected(RejectReason::Key),
                None => ProxyError::Rejected(RejectReason::Fleet),
            },
        };
        if enforce {
            return Err(refusal);
        }
        let reason = match refusal {
            ProxyError::Rejected(r) | ProxyError::KeyRejected(r, _) => r,
            _ => RejectReason::Fleet,
        };
        admitted.would_reject.get_or_insert(reason);
        Ok(())
    }

    /// Handles one request from a client whose socket peer is `peer`.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let config = self.config();
        let resp = match headers::classify(req.method(), req.version(), req.headers()) {
            Ok(RequestKind::WebSocket) => match self.upgrade(req, peer, &config).await {
                Ok(resp) => resp,
                Err(e) => {
                    self.count_failure(&e, peer);
                    e.answer(retry_after(&config)).into_response()
                }
            },
            Ok(RequestKind::Plain) => self.forward(req, peer).await,
            Err(e) => {
                tracing::debug!(%peer, "refused a websocket upgrade from {peer}: {e}");
                self.inner.refusals.count(Refusal::BadHandshake);
                ProxyError::BadHandshake(e)
                    .answer(config.retry_after_secs)
                    .into_response()
            }
        };
        Ok(resp)
    }

    /// Counts and logs a failed upgrade: one debug line each; the access
    /// log summarises them (an upstream that is down fails every upgrade,
    /// and a line each would flood the log exactly then).
    fn count_failure(&self, e: &ProxyError, peer: SocketAddr) {
        let m = &self.inner.metrics;
        if let ProxyError::Rejected(reason) | ProxyError::KeyRejected(reason, _) = e {
            m.rejected.inc(*reason);
            self.inner.refusals.count(Refusal::Rejected(*reason));
            tracing::debug!(%peer, reason = reason.label(), "refused a websocket upgrade from {peer}: {}", reason.label());
        } else if let Some(kind) = e.upstream_kind() {
            m.upstream_errors.inc(kind);
            self.inner.refusals.count(Refusal::Upstream(kind));
            tracing::debug!(%peer, kind = kind.label(), "a websocket upgrade from {peer} failed: {e}");
        } else if let ProxyError::BadHandshake(_) = e {
            self.inner.refusals.count(Refusal::BadHandshake);
        }
    }

    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        config: &Config,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        if inner.shutdown.is_draining() {
            return Err(ProxyError::Rejected(RejectReason::Draining));
        }
        let client = headers::client_address(req.headers(), peer.ip(), config.trusted_hops);
        let rules = inner.keys.rules();
        let mut keys = KeyRequest::new(
            &inner.keys,
            &rules,
            &config.jwt_from,
            req.headers(),
            req.uri(),
        );
        let mut admitted =
            inner
                .admission
                .admit_with_keys(client, &mut keys)
                .map_err(|reason| match keys.refusal_status(reason) {
                    Some(status) => ProxyError::KeyRejected(reason, status),
                    None => ProxyError::Rejected(reason),
                })?;
        let fleet_keys = keys.take_fleet_keys();
        drop(keys);
        if let Some(fleet) = &inner.fleet {
            // An early return drops `admitted`'s guard: everything the
            // local checks took goes back.
            self.check_fleet(fleet, fleet_keys, &mut admitted, config.enforce)
                .await?;
        }
        inner
            .admission
            .take_rate_token(&mut admitted)
            .map_err(ProxyError::Rejected)?;
        if let Some(reason) = admitted.would_reject {
            inner.metrics.would_reject.inc(reason);
            tracing::debug!(
                %peer,
                %client,
                reason = reason.label(),
                "dry run: admitted a websocket upgrade from {client} that {} would have refused",
                reason.label()
            );
        }
        let guard = admitted.guard;
        inner.metrics.admitted.inc();
        // Taken now, before the head goes to the upstream; completed with
        // the upstream's subprotocol below.
        let session = config.access_log.then(|| {
            Box::new(SessionInfo {
                id: rand::random(),
                client,
                path: req.uri().path().into(),
                subprotocol: "".into(),
                keys: guard.keys_text().into(),
            })
        });

        let client_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, _empty_body) = req.into_parts();
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(ProxyError::BadHandshake(headers::HandshakeError::Key))?;
        headers::upstream_upgrade_headers(
            &mut parts.headers,
            peer.ip(),
            &config.upstream.authority,
        );
        let mut upstream_req = Request::new(Empty::<Bytes>::new());
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = origin_form(&parts.uri);
        *upstream_req.headers_mut() = parts.headers;

        let timeout = config.upstream_connect_timeout;
        let answer = tokio::time::timeout(
            timeout,
            tunnel::handshake(
                &config.upstream,
                config.tcp_keepalive,
                upstream_req,
                &inner.shutdown,
            ),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))??;

        match answer {
            Answer::Other(resp) => {
                // Passed through as it is; the slot goes back with `guard`.
                inner
                    .metrics
                    .upstream_errors
                    .inc(UpstreamErrorKind::RefusedUpgrade);
                inner
                    .refusals
                    .count(Refusal::Upstream(UpstreamErrorKind::RefusedUpgrade));
                let status = resp.status().as_u16();
                tracing::debug!(
                    %peer,
                    status,
                    "the upstream declined a websocket upgrade from {peer} with {status}; passed on"
                );
                let (mut head, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut head.headers);
                // As with our own refusals: the client may already be sending
                // frames after its upgrade request, so this connection ends.
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Ok(Response::from_parts(head, body.boxed()))
            }
            Answer::Switching { head, io, leftover } => {
                if !headers::accept_matches(head.headers(), &key) {
                    return Err(ProxyError::UpstreamBadAccept);
                }
                let (mut head, ()) = head.into_parts();
                headers::client_switching_headers(&mut head.headers);
                let session = session.map(|mut s| {
                    if let Some(p) = head.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
                        s.subprotocol = String::from_utf8_lossy(p.as_bytes()).into();
                    }
                    s
                });
                let ctx = TunnelContext {
                    limits: Limits {
                        half_close: config.half_close_timeout,
                        idle: config.idle_timeout,
                        close: Some(config.close),
                    },
                    guards: config.message_guards,
                    metrics: Arc::clone(&inner.metrics),
                    shutdown: inner.shutdown.clone(),
                    tunnels: inner.tunnels.clone(),
                    lifetime: config
                        .max_connection_lifetime
                        .map(|l| (l, config.lifetime_jitter)),
                    peer,
                    session,
                };
                // The guard moves into the tracked task: the slot now lives
                // as long as the spliced connection, not this request.
                inner.shutdown.tracker().spawn(tunnel::run(
                    client_upgrade,
                    io,
                    leftover,
                    guard,
                    ctx,
                ));
                Ok(Response::from_parts(head, responses::body(Bytes::new())))
            }
        }
    }

    /// Reverse-proxies a plain HTTP request, streaming bodies both ways.
    async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let resp = match self.send_upstream(req, peer).await {
            Ok(resp) => resp,
            Err(e) => {
                if matches!(e, ProxyError::BadTarget(_) | ProxyError::ClientBody(_)) {
                    tracing::debug!(%peer, "a plain request from {peer} failed: {e}");
                } else {
                    tracing::warn!(%peer, "a plain request from {peer} failed: {e}");
                }
                e.answer(0).into_response()
            }
        };
        self.inner.metrics.http_request(resp.status());
        resp
    }

    /// Sends a plain request upstream; the answer's head, with hop-by-hop
    /// headers removed, and its streaming body.
    async fn send_upstream(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, peer.ip());
        let mut uri = parts.uri.into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(inner.upstream_authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadTarget(e.into()))?;
        match inner.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let (mut head, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut head.headers);
                Ok(Response::from_parts(head, body.boxed()))
            }
            // The client's own body was malformed (a bad chunk, a short
            // body): the client's fault, not an upstream failure, so it
            // must not count as a 5xx.
            Err(e) if caused_by_client_body(&e) => Err(ProxyError::ClientBody(e.into())),
            Err(e) if e.is_connect() && caused_by_timeout(&e) => {
                Err(ProxyError::UpstreamRequestTimeout(e.into()))
            }
            Err(e) => Err(ProxyError::UpstreamRequest(e.into())),
        }
    }
}

/// The admission policy a configuration asks for.
fn policy_of(config: &Config) -> Policy {
    Policy {
        max_per_ip: config.max_clients_per_ip,
        rate: config.admission_rate,
        enforce: config.enforce,
        watermarks: config.watermarks,
    }
}

/// `Retry-After` for a refused upgrade. With an admission rate set it carries
/// jitter: clients refused together (a reconnect storm) come back spread over
/// about the time the bucket needs to refill, not all in the same second.
fn retry_after(config: &Config) -> u64 {
    let base = config.retry_after_secs;
    match config.admission_rate {
        Some(rate) => {
            // Spread over the refill time, but never more than a minute:
            // a tiny rate must not send clients away for hours.
            let refill = (rate.burst / rate.per_second).ceil().min(60.0) as u64;
            base.saturating_add(rand::random_range(0..=base.max(refill)))
        }
        None => base,
    }
}

/// Whether an IO timeout is anywhere in the error's cause chain (the
/// connector reports its connect timeout as `io::ErrorKind::TimedOut`).
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether the request failed because reading the client's body failed:
/// hyper reports the body stream's error as a user-body error whose source
/// is the error of the client connection's `Incoming`.
fn caused_by_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_user()
                && std::error::Error::source(h)
                    .is_some_and(|s| s.downcast_ref::<hyper::Error>().is_some())
            {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
}
