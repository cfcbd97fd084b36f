//! The admin server: a separate listener, never the client port.
//!
//! Routes:
//! - `GET /metrics`: Prometheus text exposition of the owned registry.
//! - `GET /healthz`: 200 `ok` while the process runs.
//! - `GET /readyz`: 200 while accepting; 503 from the shutdown signal on,
//!   while saturated (active reached `ready_high_watermark` of the cap
//!   and has not yet come down to `ready_low_watermark`), and while a
//!   rebalancing shed runs (body `rebalancing`).
//! - `GET /keys?rule=NAME&top=N`: the busiest key values of a key rule, as
//!   JSON (docs/operations.md#limits-per-key).
//! - `POST`, `DELETE`, `GET /drain`: the operator's drain (docs/operations.md#access-log,
//!   `drain.rs`).
//! - `POST /shutdown`: the pod's pre-stop hook (docs/operations.md#pod-deletion):
//!   starts the shutdown timeline as SIGTERM would and answers once it is
//!   over. Open to the pod's own loopback; from anywhere else it needs the
//!   admin token like the operator paths.
//!
//! `/keys` and `/drain` need the admin token (`token.rs`): without a token
//! file they are 404, without the right token 401, each refusal counted in
//! a summary line rather than logged (`refusals.rs`). Anything else is 404
//! (405 for a known path with another method).

mod drain;
mod refusals;
mod token;

pub(crate) use self::token::AdminToken;

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admission::Admission;
use crate::drain::AdminDrain;
use crate::keys::KeyLimits;
use crate::metrics;
use crate::proxy::Proxy;
use crate::rebalance::Shedding;
use crate::shutdown::Shutdown;

/// What `/readyz` and `wsgate_ready` are computed from.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    /// Not ready from the shutdown signal on.
    shutdown: Shutdown,
    /// Not ready while saturated.
    admission: Admission,
    /// Not ready while a rebalancing shed runs.
    shedding: Shedding,
    /// `wsgate_ready`, kept equal to what `/readyz` answers.
    gauge: prometheus::IntGauge,
}

impl Readiness {
    /// Readiness from `shutdown` and `admission`, with `wsgate_ready`
    /// registered with `r`.
    ///
    /// # Errors
    /// The name is taken on the registry.
    pub(crate) fn new(
        shutdown: Shutdown,
        admission: Admission,
        shedding: Shedding,
        r: &crate::metrics::Registrar<'_>,
    ) -> prometheus::Result<Self> {
        let gauge = r.gauge("wsgate_ready", "1 while /readyz answers 200, else 0")?;
        Ok(Readiness {
            shutdown,
            admission,
            shedding,
            gauge,
        })
    }

    /// Whether `/readyz` answers 200; also updates `wsgate_ready`.
    pub(crate) fn check(&self) -> bool {
        let ready = !self.shutdown.is_signalled()
            && !self.admission.is_saturated()
            && !self.shedding.is_on();
        self.gauge.set(i64::from(ready));
        ready
    }
}

/// What the admin routes answer from.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    /// Every wsgate metric.
    pub(crate) registry: Registry,
    /// `/readyz`.
    pub(crate) readiness: Readiness,
    /// The proxy: its configuration, key limits (`/keys`, and the
    /// busiest-ratio gauges refreshed at each scrape) and live tunnels.
    pub(crate) proxy: Proxy,
    /// Who may use the operator paths.
    pub(crate) token: AdminToken,
    /// The operator's drain (`/drain`).
    pub(crate) drain: AdminDrain,
    /// `wsgate_admin_drained_total`.
    pub(crate) admin_drained: prometheus::IntCounter,
}

/// The paths that need the admin token.
const OPERATOR_PATHS: [&str; 2] = ["/keys", "/drain"];

/// How long `POST /shutdown` waits past `shutdown_grace` for the timeline to
/// end before it answers anyway (the timeline's own hard-stop margin fits).
const SHUTDOWN_ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The most values `/keys` lists at once (`top` above it is clamped).
const MAX_TOP: usize = 1000;

/// Serves the admin routes until the returned future is dropped (which also
/// aborts its connection tasks: they live in a `JoinSet`).
pub(crate) async fn serve(listener: TcpListener, state: AdminState) {
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let peer = peer.ip();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(req, peer, &state).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn route(req: Request<Incoming>, peer: IpAddr, state: &AdminState) -> Response<Full<Bytes>> {
    let readiness = &state.readiness;
    let path = req.uri().path();
    let hook_from_pod = path == "/shutdown" && in_this_pod(peer);
    if (OPERATOR_PATHS.contains(&path) || path == "/shutdown") && !hook_from_pod {
        if let Err(refused) = state.token.check(req.headers()) {
            let status = refused.status();
            return match status {
                StatusCode::NOT_FOUND => text(status, "not found\n"),
                _ => {
                    let mut resp = text(
                        status,
                        "unauthorized: send Authorization: Bearer <admin token>\n",
                    );
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    resp
                }
            };
        }
    }
    if path == "/drain" {
        let method = req.method().clone();
        return drain::answer(&method, req.into_body(), state).await;
    }
    if path == "/shutdown" {
        return shutdown_hook(req.method(), peer, state).await;
    }
    if !matches!(path, "/metrics" | "/healthz" | "/readyz" | "/keys") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/keys" => keys(
            req.uri().query().unwrap_or(""),
            state.proxy.admission().keys(),
        ),
        "/metrics" => {
            readiness.check();
            state.proxy.admission().keys().refresh_gauges();
            let mut resp = Response::new(Full::new(Bytes::from(metrics::encode(&state.registry))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ if readiness.check() => text(StatusCode::OK, "ready\n"),
        _ if readiness.shutdown.is_signalled() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        _ if readiness.shedding.is_on() => text(StatusCode::SERVICE_UNAVAILABLE, "rebalancing\n"),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "saturated\n"),
    }
}

/// Whether `peer` is a process in the pod's own network namespace: only
/// those can connect from loopback (the kernel drops loopback-sourced
/// packets that arrive from outside), so the pre-stop hook needs no token
/// (it has none to send). An IPv4 peer on a dual-stack listener arrives
/// mapped (`::ffff:127.0.0.1`).
fn in_this_pod(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// `POST /shutdown` (caller already allowed): the shutdown timeline, as at
/// SIGTERM, answered when it is over.
async fn shutdown_hook(method: &Method, peer: IpAddr, state: &AdminState) -> Response<Full<Bytes>> {
    if method != Method::POST {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: POST\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let shutdown = &state.readiness.shutdown;
    tracing::info!(
        %peer,
        "shutdown requested over the admin port (POST /shutdown): draining as at SIGTERM"
    );
    shutdown.request();
    let bound = state.proxy.config().shutdown_grace + SHUTDOWN_ANSWER_MARGIN;
    match tokio::time::timeout(bound, shutdown.ended()).await {
        Ok(()) => text(StatusCode::OK, "drained\n"),
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            "the shutdown is still running\n",
        ),
    }
}

/// `GET /keys?rule=NAME&top=N` (token already checked).
fn keys(query: &str, limits: &KeyLimits) -> Response<Full<Bytes>> {
    let mut rule = None;
    let mut top = Some(20);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "rule" => rule = Some(v.into_owned()),
            "top" => top = v.parse::<usize>().ok(),
            _ => {}
        }
    }
    let Some(top) = top else {
        return text(StatusCode::BAD_REQUEST, "top must be a whole number\n");
    };
    let Some(rule) = rule else {
        return text(
            StatusCode::BAD_REQUEST,
            "name a key rule: /keys?rule=NAME\n",
        );
    };
    let Some(answer) = limits.top(&rule, top.min(MAX_TOP)) else {
        return text(
            StatusCode::NOT_FOUND,
            "no key rule of that name is in force\n",
        );
    };
    json_answer(StatusCode::OK, &answer)
}

/// A JSON answer.
fn json_answer(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::in_this_pod;

    #[test]
    fn only_loopback_peers_are_in_this_pod() {
        for inside in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(in_this_pod(inside.parse().expect("ip")), "{inside}");
        }
        for outside in [
            "10.0.0.7",
            "192.0.2.2",
            "::ffff:10.0.0.7",
            "fd00::1",
            "0.0.0.0",
            "::",
        ] {
            assert!(!in_this_pod(outside.parse().expect("ip")), "{outside}");
        }
    }
}
