//! Draining: once the shutdown has stopped admissions (after
//! `shutdown_delay`), every upgrade is refused, `reason = draining`, so
//! clients go to another instance while this one's sessions are drained.
//!
//! Not a limit: dry run does not cover it (a process that is going away
//! cannot admit), and it takes nothing.

use super::outcome::{RejectReason, Rejection};
use crate::shutdown::Shutdown;

/// The draining check.
///
/// # Errors
/// [`RejectReason::Draining`] once the shutdown drains.
pub(crate) fn check(shutdown: &Shutdown) -> Result<(), Rejection> {
    if shutdown.is_draining() {
        return Err(RejectReason::Draining.into());
    }
    Ok(())
}
