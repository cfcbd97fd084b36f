//! `max_plain_requests` (docs/behaviour.md#slow-request-bodies): a cap of their own on plain
//! (non-upgrade) requests in flight, so that they cannot take every
//! descriptor the WebSocket sessions need.
//!
//! Each request in flight holds a [`Place`]: a share of one permit of a
//! tokio `Semaphore`. The request body and the response body each carry a
//! share, so the place is given back only when both are gone: the body was
//! sent upstream (or failed) *and* the answer was sent to the client (or the
//! connection dropped). A place held only by the request future would be
//! given back as soon as a streaming answer began, and a request whose
//! upstream answered early would keep its sockets while holding nothing.
//!
//! Over the cap wsgate answers 503 at once, without waiting for a place and
//! without touching the upstream (`proxy.rs`). A place is never waited for:
//! a request that queued here would hold the very descriptor the cap exists
//! to protect.
//!
//! A reload changes the cap in place. Raising it adds permits. Lowering it
//! forgets the permits that are free now and records the rest as a debt:
//! places given back while it is owed are forgotten instead of returned.
//! So lowering the cap below the count in flight only stops new requests,
//! and nothing in flight is cut. `0` turns the cap off: requests then hold
//! no place, so turning a cap on by a reload counts the requests that start
//! after it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest cap the semaphore is given (`Config::validate` refuses
/// more; this keeps a configuration built in code from panicking it).
const MAX_CAP: usize = crate::config::MAX_PLAIN_REQUESTS;

/// The cap on plain requests in flight; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct PlainCap {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    semaphore: Arc<Semaphore>,
    /// `max_plain_requests` is 0: no place is taken.
    unlimited: AtomicBool,
    /// What the permits should come to, and what is still owed.
    state: Mutex<Permits>,
    /// `state.owed > 0`, readable without the lock: a place given back
    /// looks at the lock only while something is owed.
    owing: AtomicBool,
}

#[derive(Debug)]
struct Permits {
    /// The cap the semaphore stands for: its permits, free and taken,
    /// minus `owed` (the last non-zero cap).
    target: usize,
    /// Permits to forget as they come back (after a lowering).
    owed: usize,
}

/// A request's place under the cap, shared by its request and response
/// bodies; given back when the last share is dropped. `Default` holds no
/// place (no cap).
#[derive(Debug, Clone, Default)]
pub(crate) struct Place(#[allow(dead_code, reason = "held for its Drop")] Option<Arc<Slot>>);

/// One taken permit, and where to give it back.
#[derive(Debug)]
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    cap: Arc<Inner>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let inner = &*self.cap;
        if inner.owing.load(Ordering::Acquire) {
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.owed > 0 {
                state.owed -= 1;
                inner.owing.store(state.owed > 0, Ordering::Release);
                permit.forget();
            }
        }
        // Otherwise dropping the permit returns it.
    }
}

impl PlainCap {
    /// A cap of `cap` requests in flight; 0 = unlimited.
    pub(crate) fn new(cap: usize) -> Self {
        let target = cap.min(MAX_CAP);
        PlainCap {
            inner: Arc::new(Inner {
                semaphore: Arc::new(Semaphore::new(target)),
                unlimited: AtomicBool::new(cap == 0),
                state: Mutex::new(Permits { target, owed: 0 }),
                owing: AtomicBool::new(false),
            }),
        }
    }

    /// A place for one more request, or `None` when the cap is reached.
    pub(crate) fn try_take(&self) -> Option<Place> {
        if self.inner.unlimited.load(Ordering::Acquire) {
            return Some(Place::default());
        }
        let permit = Arc::clone(&self.inner.semaphore).try_acquire_owned().ok()?;
        Some(Place(Some(Arc::new(Slot {
            permit: Some(permit),
            cap: Arc::clone(&self.inner),
        }))))
    }

    /// Applies a reloaded cap (see the module docs for lowering it).
    pub(crate) fn set(&self, cap: usize) {
        let inner = &*self.inner;
        if cap == 0 {
            inner.unlimited.store(true, Ordering::Release);
            return;
        }
        let cap = cap.min(MAX_CAP);
        let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
        if cap > state.target {
            // A debt is cancelled before any permit is added.
            let more = cap - state.target;
            let cancelled = more.min(state.owed);
            state.owed -= cancelled;
            inner.semaphore.add_permits(more - cancelled);
        } else if cap < state.target {
            let fewer = state.target - cap;
            state.owed += fewer - inner.semaphore.forget_permits(fewer);
        }
        state.target = cap;
        inner.owing.store(state.owed > 0, Ordering::Release);
        inner.unlimited.store(false, Ordering::Release);
    }
}

/// A response body that holds its request's [`Place`] until it is dropped:
/// sent to the end, or abandoned with its connection.
#[derive(Debug)]
pub(crate) struct Held<B> {
    inner: B,
    _place: Place,
}

impl<B> Held<B> {
    /// `inner`, holding `place`.
    pub(crate) fn new(inner: B, place: Place) -> Self {
        Held {
            inner,
            _place: place,
        }
    }
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(cap: &PlainCap, n: usize) -> Vec<Place> {
        (0..n)
            .map(|i| cap.try_take().unwrap_or_else(|| panic!("place {i}")))
            .collect()
    }

    #[test]
    fn a_place_is_held_until_its_last_share_is_dropped() {
        let cap = PlainCap::new(2);
        let mut places = take_all(&cap, 2);
        assert!(cap.try_take().is_none(), "over the cap");
        let request_share = places.pop().expect("a place");
        let response_share = request_share.clone();
        drop(request_share);
        assert!(cap.try_take().is_none(), "the response still holds it");
        drop(response_share);
        assert!(cap.try_take().is_some(), "given back");
    }

    #[test]
    fn zero_is_unlimited() {
        let cap = PlainCap::new(0);
        let _places = take_all(&cap, 10_000);
    }

    #[test]
    fn lowering_below_the_count_in_flight_only_stops_new_requests() {
        let cap = PlainCap::new(4);
        let mut in_flight = take_all(&cap, 4);
        cap.set(2);
        assert!(cap.try_take().is_none());
        // Two come back: both are forgotten, none goes to new requests.
        in_flight.truncate(2);
        assert!(cap.try_take().is_none(), "still 2 in flight at a cap of 2");
        in_flight.pop();
        let _again = cap.try_take().expect("1 in flight under a cap of 2");
        assert!(cap.try_take().is_none());
    }

    #[test]
    fn raising_while_a_lowering_waits_ends_at_the_new_cap() {
        let cap = PlainCap::new(4);
        let in_flight = take_all(&cap, 4);
        cap.set(1);
        cap.set(3);
        drop(in_flight);
        let _places = take_all(&cap, 3);
        assert!(cap.try_take().is_none(), "the cap is 3");
    }

    #[test]
    fn turning_the_cap_off_and_on_again() {
        let cap = PlainCap::new(1);
        let held = take_all(&cap, 1);
        cap.set(0);
        let _free = take_all(&cap, 100);
        cap.set(2);
        let _one_more = take_all(&cap, 1);
        assert!(cap.try_take().is_none(), "the place held before counts");
        drop(held);
    }
}
