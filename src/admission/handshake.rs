//! The handshake policy (docs/security.md#handshake-policy): whether the
//! page's origin may open a WebSocket here, and which of the offered
//! subprotocols go on. Checked before anything is taken; like the target,
//! these always refuse (dry run does not cover them: they are security
//! policy, not limits).

use http::header::ORIGIN;
use http::{HeaderMap, StatusCode};

use super::{RejectReason, Rejection};
use crate::config::Config;
use crate::origin;
use crate::subprotocols::{self, Forward};

/// 403 `origin` unless the request's `Origin` is allowed.
pub(super) fn origin(config: &Config, headers: &HeaderMap) -> Result<(), Rejection> {
    let policy = &config.handshake;
    let values = headers.get_all(ORIGIN).iter().map(|v| v.as_bytes());
    if origin::admits(&policy.allowed_origins, policy.require_origin, values) {
        Ok(())
    } else {
        Err(Rejection {
            reason: RejectReason::Origin,
            status: StatusCode::FORBIDDEN,
        })
    }
}

/// What to forward of the offered subprotocols, or 400 `subprotocol`.
pub(super) fn subprotocols(config: &Config, headers: &HeaderMap) -> Result<Forward, Rejection> {
    subprotocols::screen(&config.handshake, &config.jwt_from, headers).map_err(|_| Rejection {
        reason: RejectReason::Subprotocol,
        status: StatusCode::BAD_REQUEST,
    })
}
