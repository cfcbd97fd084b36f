//! `/drain` on the admin port (docs/operations.md#access-log): an operator closes part of this
//! instance's connections, oldest first, evenly over a period, while it
//! stays ready and keeps admitting — to rebalance after a scale-out, or
//! before node maintenance. The pacing is `crate::drain`'s; this file is
//! the HTTP face: the request body, its checks, and the JSON answers.
//!
//! - `POST /drain` `{"fraction": 0.25}` or `{"count": 100}`, optional
//!   `"period": "30s"` → 202 `{"planned", "period_ms"}`; 409 while one runs;
//!   503 once shutting down; 400 naming the field for a bad body; 413 over
//!   [`MAX_BODY`]; 408 with `Connection: close` when the body stalls for
//!   `header_read_timeout` (docs/behaviour.md#slow-request-bodies).
//! - `DELETE /drain` stops it: 200 `{"stopped": true, "planned", "drained"}`
//!   (or `{"stopped": false}` when none ran).
//! - `GET /drain`: 200 `{"running", "planned", "drained", "period_ms"}`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{json_answer, AdminState};
use crate::body_timeout::{BodyStalled, TimedBody};
use crate::config::ConfigDuration;
use crate::drain::{AdminDrainStatus, Amount};
use crate::plain_cap::Place;

/// The largest request body read (a drain request is a few dozen bytes).
const MAX_BODY: usize = 4096;

/// The period when the request names none and `drain_period` is 0.
const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

/// The longest period accepted: a drain is an operator's action, watched
/// while it runs; a day-long one would be a mistake.
const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// Answers `/drain` (the token already checked).
pub(super) async fn answer(
    method: &Method,
    body: Incoming,
    state: &AdminState,
) -> http::Response<Full<Bytes>> {
    match *method {
        Method::POST => start(body, state).await,
        Method::DELETE => match state.drain.stop() {
            Some(s) => json_answer(
                StatusCode::OK,
                &json!({"stopped": true, "planned": s.planned, "drained": s.drained}),
            ),
            None => json_answer(StatusCode::OK, &json!({"stopped": false})),
        },
        Method::GET | Method::HEAD => {
            let s = state.drain.status();
            json_answer(
                StatusCode::OK,
                &json!({
                    "running": s.running,
                    "planned": s.planned,
                    "drained": s.drained,
                    "period_ms": millis(s.period),
                }),
            )
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST, DELETE or GET on /drain",
        ),
    }
}

async fn start(body: Incoming, state: &AdminState) -> http::Response<Full<Bytes>> {
    let shutdown = &state.readiness.shutdown;
    if shutdown.is_signalled() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: the shutdown's own drain is closing every connection",
        );
    }
    let stall = state.proxy.config().header_read_timeout;
    let body = TimedBody::new(body, stall, Place::default());
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if BodyStalled::in_chain(&*e).is_some() => {
            tracing::debug!("an admin drain request's body stalled for {stall:?}");
            let mut resp = error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the body stopped arriving for {stall:?}"),
            );
            // The rest of the body may still come: never read it as a next request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body must be at most {MAX_BODY} bytes"),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let default_period = match state.proxy.config().drain_period {
        d if d.is_zero() => DEFAULT_PERIOD,
        d => d,
    };
    let (amount, period) = match parse(&bytes, default_period) {
        Ok(request) => request,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let started = state.drain.start(
        state.proxy.tunnels(),
        amount,
        period,
        state.admin_drained.clone(),
        shutdown.signalled_token(),
    );
    match started {
        Ok(s) => {
            tracing::info!(
                planned = s.planned,
                period_ms = millis(s.period),
                "admin drain started"
            );
            json_answer(
                StatusCode::ACCEPTED,
                &json!({"planned": s.planned, "period_ms": millis(s.period)}),
            )
        }
        Err(s) => running(s),
    }
}

/// 409: another drain runs.
fn running(s: AdminDrainStatus) -> http::Response<Full<Bytes>> {
    json_answer(
        StatusCode::CONFLICT,
        &json!({
            "error": "an admin drain is running",
            "planned": s.planned,
            "drained": s.drained,
        }),
    )
}

fn error(status: StatusCode, why: &str) -> http::Response<Full<Bytes>> {
    json_answer(status, &json!({ "error": why }))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The request body → what to drain and over how long; `Err` says which
/// field is wrong and what is accepted.
fn parse(body: &[u8], default_period: Duration) -> Result<(Amount, Duration), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            r#"the body must be a JSON object such as {{"fraction": 0.25, "period": "30s"}}: {e}"#
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(r#"the body must be a JSON object such as {"count": 100}"#.into());
    };
    let amount = match (fields.remove("fraction"), fields.remove("count")) {
        (Some(_), Some(_)) => return Err("give fraction or count, not both".into()),
        (None, None) => return Err("give fraction (0 < f <= 1) or count (>= 1)".into()),
        (Some(f), None) => match f.as_f64() {
            Some(f) if f > 0.0 && f <= 1.0 => Amount::Fraction(f),
            _ => return Err(format!("fraction: {f} is not a number in (0, 1]")),
        },
        (None, Some(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n >= 1 => Amount::Count(n),
            _ => return Err(format!("count: {n} is not a whole number >= 1")),
        },
    };
    let period = match fields.remove("period") {
        None => default_period,
        Some(p) => period(p)?,
    };
    if let Some(unknown) = first_key(&fields) {
        return Err(format!(
            "unknown field {unknown:?}: the fields are fraction, count and period"
        ));
    }
    Ok((amount, period))
}

fn period(value: Value) -> Result<Duration, String> {
    let written = value.to_string();
    match serde_json::from_value::<ConfigDuration>(value) {
        Ok(ConfigDuration(d)) if !d.is_zero() && d <= MAX_PERIOD => Ok(d),
        Ok(_) => Err(format!("period: {written} must be above 0 and at most 1h")),
        Err(_) => Err(format!(
            "period: {written} is not a duration such as \"500ms\", \"30s\" or \"2m\" \
             (a bare integer means seconds), above 0 and at most 1h"
        )),
    }
}

fn first_key(fields: &Map<String, Value>) -> Option<&str> {
    fields.keys().next().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Duration = Duration::from_secs(10);

    #[test]
    fn a_fraction_or_a_count_with_an_optional_period() {
        assert_eq!(
            parse(br#"{"fraction": 0.5, "period": "5s"}"#, TEN),
            Ok((Amount::Fraction(0.5), Duration::from_secs(5)))
        );
        assert_eq!(
            parse(br#"{"count": 100}"#, TEN),
            Ok((Amount::Count(100), TEN))
        );
        assert_eq!(
            parse(br#"{"count": 1, "period": 30}"#, TEN),
            Ok((Amount::Count(1), Duration::from_secs(30)))
        );
        assert_eq!(
            parse(br#"{"fraction": 1, "period": "250ms"}"#, TEN),
            Ok((Amount::Fraction(1.0), Duration::from_millis(250)))
        );
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, field) in [
            (&br#"{"fraction": 0}"#[..], "fraction"),
            (br#"{"fraction": 1.5}"#, "fraction"),
            (br#"{"fraction": "half"}"#, "fraction"),
            (br#"{"count": 0}"#, "count"),
            (br#"{"count": -3}"#, "count"),
            (br#"{"count": 2.5}"#, "count"),
            (br#"{"fraction": 0.5, "count": 3}"#, "not both"),
            (br#"{}"#, "fraction (0 < f <= 1) or count"),
            (br#"{"count": 3, "speed": 1}"#, "speed"),
            (br#"{"count": 3, "period": "abc"}"#, "period"),
            (br#"{"count": 3, "period": "0s"}"#, "period"),
            (br#"{"count": 3, "period": "2h"}"#, "period"),
            (br#"[1, 2]"#, "JSON object"),
            (b"count=3", "JSON object"),
        ] {
            let e = parse(body, TEN).expect_err(&String::from_utf8_lossy(body));
            assert!(e.contains(field), "{e:?} should name {field}");
        }
    }
}
