//! The request handler on the client port: classifies each request, has
//! the admission pipeline judge WebSocket upgrades (`admission`), tunnels
//! the admitted ones, and reverse-proxies everything else.
//!
//! On the upgrade path each step comes before the next costs anything:
//! validate the handshake (400) → [`Admission::admit`] (503, or a key
//! rule's status; in close mode wsgate's own 101 and Close 1013, see
//! `close_refusal`) → connect and forward the handshake within
//! `upstream_connect_timeout` (502/504) → return the upstream's 101 and
//! hand the admission guard to a tracked tunnel task. Errors before the
//! hand-over drop the guard, which is the release.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::{Refusal, Refusals, SessionInfo};
use crate::admission::{Admission, AdmissionGuard, Admitted, Candidate, RejectReason, Rejection};
use crate::body_timeout::{BodyStalled, TimedBody};
use crate::close_refusal::{self, CloseRefusals};
use crate::config::{Config, RefusalMode};
use crate::drain::Tunnels;
use crate::error::{ProxyError, UpstreamErrorKind};
use crate::first_head::{Replayed, UpgradeHead};
use crate::headers::{self, RequestKind};
use crate::loop_marker::LoopMarker;
use crate::metrics::{labels, Family, Label, Registrar};
use crate::plain_cap::{Held, Place, PlainCap};
use crate::responses::{self, ProxyBody};
use crate::shutdown::Shutdown;
use crate::splice::{Limits, PingSettings};
use crate::subprotocols;
use crate::target;
use crate::throttle::Throttle;
use crate::tunnel::{self, Answer, ClientLeg, TunnelContext, TunnelMetrics, UpstreamIo};
use crate::upstream_client::UpstreamClient;
use crate::upstream_http::Switched;

labels! {
    /// The class of an HTTP status (`wsgate_http_requests_total{class}`).
    enum HttpClass {
        /// 1xx.
        Informational => "1xx",
        /// 2xx.
        Success => "2xx",
        /// 3xx.
        Redirection => "3xx",
        /// 4xx.
        ClientError => "4xx",
        /// 5xx (and anything out of range).
        ServerError => "5xx",
    }
}

impl HttpClass {
    fn of(status: http::StatusCode) -> Self {
        match status.as_u16() {
            100..=199 => HttpClass::Informational,
            200..=299 => HttpClass::Success,
            300..=399 => HttpClass::Redirection,
            400..=499 => HttpClass::ClientError,
            _ => HttpClass::ServerError,
        }
    }
}

/// The request handler's own series.
#[derive(Debug, Clone)]
pub(crate) struct ProxyMetrics {
    /// `wsgate_upstream_errors_total{kind}`.
    upstream_errors: Family<UpstreamErrorKind>,
    /// `wsgate_http_requests_total{class}`.
    http_requests: Family<HttpClass>,
}

impl ProxyMetrics {
    /// Registers the handler's series, every one at 0.
    ///
    /// # Errors
    /// A name is taken on the registry.
    pub(crate) fn register(r: &Registrar<'_>) -> prometheus::Result<Self> {
        Ok(ProxyMetrics {
            upstream_errors: r.family(
                "wsgate_upstream_errors_total",
                "Upstream failures or declined upgrades",
                "kind",
            )?,
            http_requests: r.family(
                "wsgate_http_requests_total",
                "Plain HTTP requests proxied, by class of the status returned",
                "class",
            )?,
        })
    }
}

/// The shared state behind every connection's service.
#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Swapped whole on reload; each request works on one snapshot.
    config: RwLock<Arc<Config>>,
    /// The admission pipeline, with every policy's state.
    admission: Admission,
    /// Live tunnels, for the drain.
    tunnels: Tunnels,
    metrics: ProxyMetrics,
    /// What each tunnel counts into.
    tunnel_metrics: Arc<TunnelMetrics>,
    /// Refusals counted for the access log's summary lines.
    refusals: Refusals,
    /// Close-mode refusals open now, under `max_close_refusals`.
    close_refusals: CloseRefusals,
    shutdown: Shutdown,
    /// Pooled keep-alive connections to the upstream for plain HTTP.
    client: UpstreamClient,
    /// `max_plain_requests`.
    plain: PlainCap,
    upstream_authority: Authority,
    /// Warnings about unreadable `X-Forwarded-For` entries, one a minute.
    unreadable_forwarded_for: Throttle,
    /// Warnings about requests that came back round a loop, one a minute.
    looped: Throttle,
}

impl Proxy {
    /// Builds the proxy state around an admission pipeline.
    ///
    /// # Errors
    /// The upstream authority from a validated config always parses; an
    /// error here would mean validation let a bad value through.
    pub(crate) fn new(
        config: Config,
        admission: Admission,
        metrics: ProxyMetrics,
        tunnel_metrics: TunnelMetrics,
        shutdown: Shutdown,
    ) -> Result<Self, http::uri::InvalidUri> {
        let client = UpstreamClient::new(&config);
        let plain = PlainCap::new(config.max_plain_requests);
        let upstream_authority = config.upstream.authority.parse()?;
        let refusals = Refusals::default();
        refusals.set_enabled(config.access_log);
        tunnel_metrics.sessions.expect_codes(&config.close);
        Ok(Proxy {
            inner: Arc::new(Inner {
                config: RwLock::new(Arc::new(config)),
                admission,
                tunnels: Tunnels::new(),
                metrics,
                tunnel_metrics: Arc::new(tunnel_metrics),
                refusals,
                close_refusals: CloseRefusals::default(),
                shutdown,
                client,
                plain,
                upstream_authority,
                unreadable_forwarded_for: Throttle::new(Duration::from_secs(60)),
                looped: Throttle::new(Duration::from_secs(60)),
            }),
        })
    }

    /// The admission state (for tests and the admin server).
    pub(crate) fn admission(&self) -> &Admission {
        &self.inner.admission
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
    /// already connected is dropped. Addresses, the upstream, the worker
    /// count and the log filter need a restart: they are kept, with a
    /// warning.
    pub(crate) fn reload(&self, mut new: Config) {
        let old = self.config();
        for (key, changed) in [
            ("listen", old.listen != new.listen),
            ("admin_listen", old.admin_listen != new.admin_listen),
            ("upstream", old.upstream != new.upstream),
            ("workers", old.workers != new.workers),
            ("log_level", old.log_level != new.log_level),
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
        new.log_level.clone_from(&old.log_level);
        if self.inner.admission.has_fleet() != new.fleet.is_some() {
            tracing::warn!(
                key = "fleet_redis_url",
                "reload: turning fleet limits on or off only takes effect after a restart"
            );
            new.fleet = old.fleet.clone();
        }
        self.inner.admission.apply(&new);
        self.inner.plain.set(new.max_plain_requests);
        self.inner.refusals.set_enabled(new.access_log);
        self.inner.tunnel_metrics.sessions.expect_codes(&new.close);
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

    /// Handles one request from a client whose socket peer is `peer`.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let config = self.config();
        if let Err(e) = headers::screen_request(req.method(), req.headers()) {
            tracing::debug!(%peer, "refused a request from {peer}: {e}");
            let resp = ProxyError::Request(e).answer(0).into_response();
            self.inner
                .metrics
                .http_requests
                .inc(HttpClass::of(resp.status()));
            return Ok(resp);
        }
        let resp = match headers::classify(req.method(), req.version(), req.headers()) {
            Ok(RequestKind::WebSocket) => {
                let mut req = req;
                let on_upgrade = hyper::upgrade::on(&mut req);
                let (head, _empty_body) = req.into_parts();
                match self.decide(head, peer, &config).await {
                    Ok(decision) => self.said_by_hyper(decision, on_upgrade),
                    Err(e) => {
                        self.count_failure(&e, peer);
                        e.answer(retry_after(&config)).into_response()
                    }
                }
            }
            Ok(RequestKind::Plain) => self.forward(req, peer).await,
            Err(e) => {
                let e = ProxyError::BadHandshake(e);
                self.count_failure(&e, peer);
                e.answer(config.retry_after_secs).into_response()
            }
        };
        Ok(resp)
    }

    /// Counts and logs a failed upgrade, whatever failed it: one debug
    /// line each; the access log summarises them (an upstream that is
    /// down fails every upgrade, and a line each would flood the log
    /// exactly then). Refusals are counted in their metric by admission.
    fn count_failure(&self, e: &ProxyError, peer: SocketAddr) {
        if let ProxyError::Rejected(r) = e {
            self.inner.refusals.count(Refusal::Rejected(r.reason));
            tracing::debug!(%peer, reason = r.reason.label(), "refused a websocket upgrade from {peer}: {}", r.reason.label());
            if r.reason == RejectReason::Loop {
                self.came_back(peer);
            }
        } else if let Some(kind) = e.upstream_kind() {
            self.count_upstream_error(kind);
            tracing::debug!(%peer, kind = kind.label(), "a websocket upgrade from {peer} failed: {e}");
        } else if let ProxyError::BadHandshake(_) = e {
            self.inner.refusals.count(Refusal::BadHandshake);
            tracing::debug!(%peer, "refused a websocket upgrade from {peer}: {e}");
        }
    }

    /// Says that a request came back round a loop (docs/behaviour.md#loop-detection):
    /// a configuration error the operator must see, yet one line per
    /// looped request would be a flood, so at most one a minute.
    fn came_back(&self, peer: SocketAddr) {
        if let Some(more) = self.inner.looped.occurred() {
            tracing::warn!(
                %peer,
                reason = "loop",
                via = LoopMarker::of_this_process().name(),
                upstream = %self.config().upstream.shown(),
                "a request from {peer} came back to this wsgate (its Via header names this \
                 instance) and was answered 508 Loop Detected, not forwarded (+{more} since the \
                 last line): the upstream leads back to wsgate"
            );
        }
    }

    /// Counts an upstream failure in its metric and the refusal summary.
    fn count_upstream_error(&self, kind: UpstreamErrorKind) {
        self.inner.metrics.upstream_errors.inc(kind);
        self.inner.refusals.count(Refusal::Upstream(kind));
    }

    /// Says a decision through hyper's server: the response it writes, and
    /// the tunnel or close-mode refusal spawned to take the socket once
    /// hyper has handed it over.
    fn said_by_hyper(&self, decision: Decision, on_upgrade: OnUpgrade) -> Response<ProxyBody> {
        let tracker = self.inner.shutdown.tracker();
        match decision {
            Decision::Switch { answer, tunnel } => {
                tracker.spawn(tunnel.run(ClientLeg::Hyper(on_upgrade)));
                Response::from_parts(answer.client_head(), responses::body(Bytes::new()))
            }
            Decision::CloseRefusal {
                accept,
                protocol,
                refusal,
            } => {
                tracker.spawn(refusal.run(ClientLeg::Hyper(on_upgrade)));
                responses::switching(accept, protocol)
            }
            Decision::Upstream(response) => response,
        }
    }

    /// The fast path (`crate::first_head`): judges the upgrade whose head
    /// is `first`, writes the answer on `stream` itself, and hands the
    /// socket to what follows: a tunnel task, or the close-mode refusal (on
    /// this task). Only the
    /// upstream's own answer to a declined upgrade, whose body may come in
    /// any framing, is written by hyper (its server reads the head again).
    pub(crate) async fn upgrade_on(
        &self,
        mut stream: TcpStream,
        first: UpgradeHead,
        peer: SocketAddr,
    ) {
        let UpgradeHead {
            head,
            read,
            head_len,
        } = first;
        let config = self.config();
        // Boxed: the decision's state (admission, the upstream handshake)
        // must not be part of the task while the tunnel runs in it.
        let mut deciding = Box::pin(self.decide(head, peer, &config));
        // The client is watched meanwhile: one that leaves (FIN, reset)
        // drops the decision, which gives back whatever it holds, at once.
        // What it sends early is kept for the splice, up to a limit.
        let mut early = BytesMut::new();
        let decided = loop {
            tokio::select! {
                d = &mut deciding => break d,
                // The end of the grace: as hyper's connections, cut now.
                () = self.inner.shutdown.stopped() => return,
                r = stream.read_buf(&mut early), if early.len() < MAX_EARLY_BYTES => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        };
        // Everything the decision held (admission's and the handshake's
        // state, the request head) goes now, not with the connection: the
        // tunnel below may run for hours.
        drop(deciding);
        let retry_after = retry_after(&config);
        drop(config);
        let tunnel_or_refusal = match decided {
            Ok(Decision::Upstream(response)) => {
                return self.replay_answer(stream, read, response, peer).await;
            }
            Err(e) => {
                self.count_failure(&e, peer);
                let answer = e.answer(retry_after).encode();
                // The connection ends here: what the client sends next may
                // be frames, never a request.
                if stream.write_all(&answer).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
                return;
            }
            Ok(other) => other,
        };
        // Copied out (usually nothing): the head buffer is freed now.
        let rest = if early.is_empty() {
            Bytes::copy_from_slice(&read[head_len..])
        } else {
            [&read[head_len..], &early[..]].concat().into()
        };
        drop((read, early));
        match tunnel_or_refusal {
            Decision::Switch { answer, tunnel } => {
                // The tunnel writes the 101: its session starts before.
                let client = ClientLeg::Own {
                    stream,
                    answer: answer.for_client,
                    read: rest,
                };
                // A task of its own: this one, with the head reading and the
                // decision in its state, ends. Boxed where it is made, as the
                // tunnel's state is large and spawning moves a future by
                // value several times: behind a box each move is a pointer.
                self.inner
                    .shutdown
                    .tracker()
                    .spawn(Box::pin(tunnel.run(client)));
            }
            Decision::CloseRefusal {
                accept,
                protocol,
                refusal,
            } => {
                let client = ClientLeg::Own {
                    stream,
                    answer: responses::encode_switching(&accept, protocol.as_ref()),
                    read: rest,
                };
                refusal.run(client).await;
            }
            Decision::Upstream(_) => {}
        }
    }

    /// Writes `response` (the upstream's answer to a declined upgrade, body
    /// streaming) with hyper's server, which reads the request head again
    /// from `read` and answers it with `response`; the connection closes.
    async fn replay_answer(
        &self,
        stream: TcpStream,
        read: Bytes,
        response: Response<ProxyBody>,
        peer: SocketAddr,
    ) {
        let once = std::sync::Mutex::new(Some(response));
        let service = service_fn(move |_req: Request<Incoming>| {
            let response = once
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| ProxyError::Loop.answer(0).into_response());
            std::future::ready(Ok::<_, Infallible>(response))
        });
        // Boxed: a hyper connection is large, and this rare path must not
        // make every connection's state that large.
        let conn = Box::pin(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(Replayed::new(read, stream)), service),
        );
        let result = tokio::select! {
            r = conn => r,
            () = self.inner.shutdown.stopped() => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "passing on the upstream's answer failed");
        }
    }

    /// Judges an upgrade (`head`: method, target, version, headers) and,
    /// if admitted, forwards it: the 101 to send and the tunnel to run
    /// after it, a close-mode refusal, or the upstream's own answer.
    ///
    /// # Errors
    /// Every refusal and upstream failure, which the caller answers.
    async fn decide(
        &self,
        head: http::request::Parts,
        peer: SocketAddr,
        config: &Config,
    ) -> Result<Decision, ProxyError> {
        let inner = &*self.inner;
        let client = headers::client_address(&head.headers, peer.ip(), config.trusted_hops)
            .unwrap_or_else(|_| {
                if let Some(more) = inner.unreadable_forwarded_for.occurred() {
                    tracing::warn!(
                        %peer,
                        trusted_hops = config.trusted_hops,
                        "an X-Forwarded-For entry at the trusted position is not an address \
                         (+{more} since the last line); per-IP limits count the socket peer {peer} \
                         for such requests: check trusted_hops against the proxies in front"
                    );
                }
                peer.ip()
            });
        let candidate = Candidate {
            peer,
            client,
            headers: &head.headers,
            uri: &head.uri,
        };
        let Admitted {
            guard,
            target,
            offer,
        } = match inner.admission.admit(config, candidate).await {
            Ok(admitted) => admitted,
            Err(rejection) => return self.refuse(&head.headers, peer, config, rejection),
        };
        // Taken now, before the head goes to the upstream; completed with
        // the upstream's subprotocol below.
        let session = config.access_log.then(|| {
            Box::new(SessionInfo {
                id: rand::random(),
                client,
                path: target.path().into(),
                subprotocol: "".into(),
                keys: guard.keys_text().into(),
            })
        });

        // The request head the upstream gets, written straight from the
        // client's: the target the rules judged (path normalised, never the
        // raw one), this hop's headers.
        let target_text = target.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Vec::with_capacity(512 + target_text.len());
        request.extend_from_slice(head.method.as_str().as_bytes());
        request.push(b' ');
        request.extend_from_slice(target_text.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\n");
        headers::write_upstream_upgrade(
            &mut request,
            &head.headers,
            peer.ip(),
            &config.upstream.authority,
            offer.rewritten(),
            LoopMarker::of_this_process().value(head.version),
        );
        request.extend_from_slice(b"\r\n");

        let timeout = config.upstream_connect_timeout;
        let answer = tokio::time::timeout(
            timeout,
            tunnel::handshake(
                &config.upstream,
                config.tcp_keepalive,
                &request,
                &inner.shutdown,
            ),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))??;

        match answer {
            Answer::Other(resp) => {
                // Passed through as it is; the slot goes back with `guard`.
                self.count_upstream_error(UpstreamErrorKind::RefusedUpgrade);
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
                Ok(Decision::Upstream(Response::from_parts(head, body.boxed())))
            }
            Answer::Switching {
                head: switched,
                io,
                leftover,
            } => {
                // `classify` let only a request with one valid key get here.
                let key = head
                    .headers
                    .get(header::SEC_WEBSOCKET_KEY)
                    .ok_or(ProxyError::BadHandshake(headers::HandshakeError::Key))?;
                if !headers::accept_matches(
                    switched.accept(),
                    switched.upgrades_to_websocket(),
                    key,
                ) {
                    return Err(ProxyError::UpstreamBadAccept);
                }
                // A browser fails such a handshake silently (1006): a 502
                // says what went wrong. Dropping `io` closes the upstream leg.
                if !subprotocols::selection_is_offered(switched.protocol(), &offer, &head.headers) {
                    return Err(ProxyError::UpstreamBadSubprotocol);
                }
                let session = session.map(|mut s| {
                    if let Ok(Some(p)) = switched.protocol() {
                        s.subprotocol = String::from_utf8_lossy(p).into();
                    }
                    s
                });
                let ctx = TunnelContext {
                    limits: Limits {
                        half_close: config.half_close_timeout,
                        idle: config.idle_timeout,
                        close: Some(config.close),
                        pings: config.signals.ping_interval.map(|interval| PingSettings {
                            interval,
                            pong_timeout: config.signals.pong_timeout,
                        }),
                        send_timeout: config.signals.send_timeout,
                    },
                    guards: config.message_guards,
                    metrics: Arc::clone(&inner.tunnel_metrics),
                    shutdown: inner.shutdown.clone(),
                    tunnels: inner.tunnels.clone(),
                    lifetime: config
                        .max_connection_lifetime
                        .map(|l| (l, config.lifetime_jitter)),
                    peer,
                    session,
                };
                // The guard moves into the tunnel: the slot now lives as
                // long as the spliced connection, not this request.
                Ok(Decision::Switch {
                    answer: switched,
                    tunnel: Box::new(Pending {
                        upstream: io,
                        leftover,
                        guard,
                        ctx,
                    }),
                })
            }
        }
    }

    /// Answers a refused upgrade. In close mode a refusal that says "retry
    /// later" gets wsgate's own 101 and a tracked task that closes it with
    /// 1013 (docs/behaviour.md#refusals-a-browser-can-see), while a place
    /// under `max_close_refusals` is free; every other refusal is the error,
    /// which `handle` answers with its HTTP status.
    fn refuse(
        &self,
        headers: &http::HeaderMap,
        peer: SocketAddr,
        config: &Config,
        rejection: Rejection,
    ) -> Result<Decision, ProxyError> {
        let inner = &*self.inner;
        let signals = &config.signals;
        let place = (signals.refusal_mode == RefusalMode::Close
            && close_refusal::says_retry_later(rejection.reason))
        .then(|| inner.close_refusals.try_take(signals.max_close_refusals))
        .flatten();
        // Only once a place is taken: a status refusal computes nothing more.
        // `classify` let only a request with one valid key get here.
        let Some((place, accept)) = place.and_then(|place| {
            let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
            Some((place, headers::accept_header(key)))
        }) else {
            return Err(ProxyError::Rejected(rejection));
        };
        // Counted like any refusal: in the access log's summary (admission
        // counted the metric); it is not a session.
        self.count_failure(&ProxyError::Rejected(rejection), peer);
        // One of the client's own offers (never the JWT entry), or a
        // browser fails the handshake and never reads the 1013.
        let protocol = subprotocols::own_selection(&config.handshake, &config.jwt_from, headers);
        Ok(Decision::CloseRefusal {
            accept,
            protocol,
            refusal: CloseRefusal {
                secs: close_refusal::retry_after(retry_after(config)),
                timeout: config.close.timeout,
                place,
                stopped: inner.shutdown.stopped_token(),
            },
        })
    }

    /// Reverse-proxies a plain HTTP request, streaming bodies both ways,
    /// within `max_plain_requests` (docs/behaviour.md#slow-request-bodies).
    async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let config = self.config();
        // Sent round a loop back to wsgate: answered, never forwarded.
        let looped = LoopMarker::of_this_process().is_in(req.headers());
        let place = if looped {
            None
        } else {
            self.inner.plain.try_take()
        };
        let resp = match place {
            None if looped => {
                tracing::debug!(%peer, reason = "loop", "a plain request from {peer} came back round a loop: 508");
                self.came_back(peer);
                ProxyError::Loop.answer(0).into_response()
            }
            // Refused before anything reaches the upstream.
            None => {
                tracing::debug!(%peer, "a plain request from {peer} refused: max_plain_requests reached");
                ProxyError::PlainRequestsFull
                    .answer(config.retry_after_secs)
                    .into_response()
            }
            Some(place) => {
                let body_place = place.clone();
                let resp = match self
                    .send_upstream(req, peer, config.header_read_timeout, body_place)
                    .await
                {
                    Ok(resp) => resp,
                    Err(e) => {
                        if matches!(
                            e,
                            ProxyError::BadTarget(_)
                                | ProxyError::ClientBody(_)
                                | ProxyError::ClientBodyStalled(_)
                                | ProxyError::Path(_)
                        ) {
                            tracing::debug!(%peer, "a plain request from {peer} failed: {e}");
                        } else {
                            tracing::warn!(%peer, "a plain request from {peer} failed: {e}");
                        }
                        e.answer(0).into_response()
                    }
                };
                // The place lives until the answer is sent to the end (or
                // the connection is gone), as well as with the request body.
                resp.map(|body| Held::new(body, place).boxed())
            }
        };
        self.inner
            .metrics
            .http_requests
            .inc(HttpClass::of(resp.status()));
        resp
    }

    /// Sends a plain request upstream; the answer's head, with hop-by-hop
    /// headers removed, and its streaming body. The request body fails when
    /// it stalls for `stall` and holds `place` while it lives.
    async fn send_upstream(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        stall: std::time::Duration,
        place: Place,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.inner;
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, peer.ip());
        LoopMarker::of_this_process().add(&mut parts.headers, parts.version);
        // The path as the upstream would read it, normalised like an
        // upgrade's (docs/security.md#paths).
        let path = target::plain_target(&parts.uri)?;
        let mut uri = parts.uri.into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(inner.upstream_authority.clone());
        uri.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadTarget(e.into()))?;
        let body = TimedBody::new(body, stall, place);
        match inner.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // Dropping the answer drops its upstream connection.
                Err(ProxyError::UnrequestedSwitch)
            }
            Ok(resp) => {
                let (mut head, body) = resp.into_parts();
                headers::strip_hop_by_hop(&mut head.headers);
                Ok(Response::from_parts(head, body.boxed()))
            }
            // The client stopped sending its body: 408, its fault too.
            Err(e) if BodyStalled::in_chain(&e).is_some() => {
                Err(ProxyError::ClientBodyStalled(stall))
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

/// How much a client may send after its upgrade head before the upgrade is
/// decided (kept for the splice); past it, the client is no longer read
/// until then, as a splice stops reading a side that is ahead.
const MAX_EARLY_BYTES: usize = 64 * 1024;

/// What an upgrade comes to, before it is said on the client's connection
/// (by hyper's server, or by wsgate itself on the fast path).
enum Decision {
    /// The upstream switched: its 101 as the client gets it, and the tunnel
    /// to run once that is sent.
    Switch {
        answer: Switched,
        tunnel: Box<Pending>,
    },
    /// Refused in close mode: wsgate's own 101, then the Close 1013.
    CloseRefusal {
        /// `Sec-WebSocket-Accept` for the client's key.
        accept: HeaderValue,
        /// One of the client's own offers, if it made any.
        protocol: Option<HeaderValue>,
        refusal: CloseRefusal,
    },
    /// The upstream declined with its own answer, passed on (body streaming).
    Upstream(Response<ProxyBody>),
}

/// An admitted connection whose upstream leg is up: what its tunnel takes.
struct Pending {
    upstream: UpstreamIo,
    /// What the upstream sent right after its 101.
    leftover: Bytes,
    guard: AdmissionGuard,
    ctx: TunnelContext,
}

impl Pending {
    /// The tunnel, once `client`'s side is known.
    fn run(self, client: ClientLeg) -> impl std::future::Future<Output = ()> {
        tunnel::run(client, self.upstream, self.leftover, self.guard, self.ctx)
    }
}

/// A close-mode refusal, to run once wsgate's 101 is sent.
struct CloseRefusal {
    secs: u64,
    timeout: Duration,
    place: close_refusal::Place,
    stopped: tokio_util::sync::CancellationToken,
}

impl CloseRefusal {
    fn run(self, client: ClientLeg) -> impl std::future::Future<Output = ()> {
        close_refusal::run(client, self.secs, self.timeout, self.place, self.stopped)
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
