//! [`AdmissionGuard`]: everything one admitted connection holds, given back
//! by dropping it, and by nothing else.
//!
//! It is moved into the task that owns the spliced connection, so what it
//! holds lives exactly as long as the connection does. There is no
//! `release()` method, so nothing can be given back twice or forgotten:
//! every way a connection ends (and every refusal after a share was taken)
//! drops the guard.

use super::capacity::Slot;
use super::per_ip::IpHold;
use crate::fleet::FleetHold;
use crate::keys::KeyHold;

/// What one admitted connection holds. Fields drop in declaration order,
/// which is the order they are given back in.
#[derive(Debug)]
#[must_use = "dropping the guard gives everything back at once"]
pub(crate) struct AdmissionGuard {
    /// Key shares first: once the slot is free, a reconnect of the same
    /// tenant must find its key share free too. Empty without key rules
    /// (no allocation).
    pub(super) keys: Vec<KeyHold>,
    /// The hold in the fleet's counts; its release is queued for the
    /// fleet worker at once.
    pub(super) fleet: Option<FleetHold>,
    /// The share of the client address's count.
    pub(super) ip: Option<IpHold>,
    /// The place under the cap, given back last.
    #[allow(dead_code, reason = "held for its Drop, which frees the slot")]
    pub(super) slot: Slot,
}

impl AdmissionGuard {
    /// The key values this connection holds, as `rule=value` separated by
    /// spaces, in rule order (the access log's `keys`; key values are
    /// visible ASCII, so a space cannot occur inside one).
    pub(crate) fn keys_text(&self) -> String {
        let mut text = String::new();
        for hold in &self.keys {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(hold.rule());
            text.push('=');
            text.push_str(hold.key());
        }
        text
    }
}
