//! Refusals a browser can see (docs/behaviour.md#refusals-a-browser-can-see):
//! with `refusal_mode = "close"`, an upgrade refused for load is accepted by
//! wsgate itself and closed at once with Close 1013 (Try Again Later),
//! reason `retry after N s`.
//!
//! Why: a browser's WebSocket API hides the status of a failed handshake (a
//! 503 and a 401 both surface as 1006), so a page cannot tell "come back
//! later" from "broken". A Close code and reason it can read.
//!
//! Reconnect storms are what reach this path, so it is kept cheap: the
//! upstream is never contacted and no slot is held; the Close frame is built
//! on the stack; what the client sends back is skipped by frame headers
//! through a small stack buffer, never kept; each refusal lasts at most
//! `close_timeout` and holds a place of `max_close_refusals`, past which the
//! refusal is the HTTP answer again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::admission::RejectReason;
use crate::frames::{CloseFrame, CloseWatch};
use crate::tunnel::ClientLeg;

/// RFC 6455 §7.4.1: Try Again Later.
const TRY_AGAIN_LATER: u16 = 1013;

/// How much of what the client sends is read at a time (and dropped).
const DISCARD_BUFFER: usize = 256;

/// Whether a refusal is one a client should retry later, and so one said
/// with a Close frame in close mode. The others stay HTTP answers: retrying
/// them unchanged cannot succeed, and their status says why.
pub(crate) fn says_retry_later(reason: RejectReason) -> bool {
    match reason {
        RejectReason::Capacity
        | RejectReason::PerIp
        | RejectReason::Key
        | RejectReason::KeyTableFull
        | RejectReason::Fleet
        | RejectReason::FleetUnavailable
        | RejectReason::Rate
        | RejectReason::Draining => true,
        RejectReason::Loop
        | RejectReason::BadPath
        | RejectReason::Origin
        | RejectReason::Subprotocol
        | RejectReason::KeyMissing
        | RejectReason::KeyAmbiguous
        | RejectReason::Jwt => false,
    }
}

/// The `N` of `retry after N s`: the status answer's `Retry-After` times a
/// uniform factor in [1, 2), rounded up, so pages refused together do not
/// all come back in the same second.
pub(crate) fn retry_after(status_value: u64) -> u64 {
    let factor: f64 = rand::random_range(1.0..2.0);
    (status_value as f64 * factor).ceil() as u64
}

/// The close-mode refusals open now; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct CloseRefusals {
    open: Arc<AtomicUsize>,
}

/// One open close-mode refusal's place; given back when dropped.
#[derive(Debug)]
pub(crate) struct Place {
    open: Arc<AtomicUsize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CloseRefusals {
    /// A place, if fewer than `max` are open. `max` is read per refusal
    /// from the configuration in force, so a reload that lowers it only
    /// stops new ones.
    pub(crate) fn try_take(&self, max: usize) -> Option<Place> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place {
                open: Arc::clone(&self.open),
            })
    }
}

/// The tracked task of one close-mode refusal, once wsgate's 101 is on its
/// way: take the client's socket, send Close 1013 `retry after {secs} s`,
/// skip what the client sends until its Close (or EOF), then close TCP.
/// All of it within `timeout` (`close_timeout`), and never past the hard
/// stop (`stopped`, [`crate::shutdown::Shutdown::stopped_token`]), so it
/// cannot hold the shutdown beyond the grace. `place` lives as long as the
/// socket.
pub(crate) async fn run(
    client: ClientLeg,
    secs: u64,
    timeout: Duration,
    place: Place,
    stopped: CancellationToken,
) {
    let exchange = async {
        // The client vanished before its 101 went out: nothing to close.
        let Some((mut io, read)) = client.ready().await else {
            return;
        };
        let frame = CloseFrame::unmasked(TRY_AGAIN_LATER, format_args!("retry after {secs} s"));
        if io.write_all(frame.as_bytes()).await.is_err() {
            return;
        }
        let mut watch = CloseWatch::default();
        // What the client sent right after its request head comes first.
        if watch.feed(&read) {
            return;
        }
        let mut buf = [0u8; DISCARD_BUFFER];
        loop {
            match io.read(&mut buf).await {
                // EOF, a reset, or its Close read whole (so no byte of it is
                // left unread to turn the close into a reset): `io` drops on
                // return, and wsgate closes TCP first, as RFC 6455 §7.1.1
                // asks of a server.
                Ok(0) | Err(_) => return,
                Ok(n) if watch.feed(&buf[..n]) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(timeout, exchange) => {}
        // The shutdown's hard stop: the socket is closed now, without
        // waiting for the reply.
        () = stopped.cancelled() => {}
    }
    drop(place);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_load_refusals_say_retry_later() {
        use crate::metrics::Label;
        let closing: Vec<_> = RejectReason::ALL
            .iter()
            .filter(|r| says_retry_later(**r))
            .map(|r| r.label())
            .collect();
        assert_eq!(
            closing,
            [
                "capacity",
                "draining",
                "rate",
                "per_ip",
                "key",
                "key_table_full",
                "fleet",
                "fleet_unavailable"
            ]
        );
    }

    #[test]
    fn retry_after_is_between_once_and_twice_the_status_value() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let n = retry_after(3);
            assert!((3..=6).contains(&n), "{n}");
            seen.insert(n);
        }
        assert!(seen.len() > 1, "never varies: {seen:?}");
        assert_eq!(retry_after(0), 0);
    }

    #[test]
    fn places_stop_at_the_cap_and_come_back_when_dropped() {
        let refusals = CloseRefusals::default();
        let a = refusals.try_take(2).expect("first");
        let _b = refusals.try_take(2).expect("second");
        assert!(refusals.try_take(2).is_none(), "over the cap");
        assert!(refusals.try_take(0).is_none(), "0: never");
        drop(a);
        assert!(refusals.try_take(2).is_some(), "given back");
        // A lower cap after a reload refuses while more are open.
        assert!(refusals.try_take(1).is_none());
    }
}
