//! A request body that must keep arriving (docs/behaviour.md#slow-request-bodies): [`TimedBody`]
//! fails with [`BodyStalled`] when its client sends nothing for the stall
//! limit (`header_read_timeout`) while wsgate is waiting for the next part.
//!
//! Why: hyper's `header_read_timeout` ends at the blank line of the head.
//! A client that declares a large `Content-Length` and then sends a few
//! bytes would otherwise hold its socket, the upstream's socket and a task
//! for ever, and enough of them exhaust the descriptor table.
//!
//! The clock runs only while wsgate is waiting on the client: it is armed
//! when a read finds nothing ready and disarmed when a part arrives. Time
//! the body is not polled at all (the upstream connection is still being
//! made, or the upstream is slow to take what was sent) is not the
//! client's fault and does not count.
//!
//! It also carries what must live exactly as long as the body: the place
//! the request holds under `max_plain_requests` (`crate::plain_cap`).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::plain_cap::Place;

/// The boxed error of a [`TimedBody`]: the inner body's error as it was,
/// or [`BodyStalled`].
pub(crate) type BodyError = Box<dyn StdError + Send + Sync>;

/// The client sent nothing of its body for the stall limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyStalled {
    /// The limit that passed.
    pub(crate) after: Duration,
}

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent nothing of its request body for {:?}",
            self.after
        )
    }
}

impl StdError for BodyStalled {}

impl BodyStalled {
    /// The stall, if one is anywhere in `e`'s cause chain (the HTTP client
    /// reports a failed request body as its own error with this as the
    /// source).
    pub(crate) fn in_chain(e: &(dyn StdError + 'static)) -> Option<BodyStalled> {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(s) = c.downcast_ref::<BodyStalled>() {
                return Some(*s);
            }
            cause = c.source();
        }
        None
    }
}

/// `inner`, failing with [`BodyStalled`] when a read waits longer than
/// `limit`.
#[derive(Debug)]
pub(crate) struct TimedBody<B> {
    inner: B,
    limit: Duration,
    /// Armed while a read is waiting on the client; boxed so the body stays
    /// `Unpin`, as the HTTP client requires.
    waiting: Option<Pin<Box<Sleep>>>,
    /// Set once the limit passed: the body is over, whatever comes later.
    stalled: bool,
    /// Given back when the body is dropped (or never held: no cap).
    _place: Place,
}

impl<B> TimedBody<B> {
    /// Wraps `inner`; `place` is released with the body.
    pub(crate) fn new(inner: B, limit: Duration, place: Place) -> Self {
        TimedBody {
            inner,
            limit,
            waiting: None,
            stalled: false,
            _place: place,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = B::Data;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.stalled {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // Something arrived (or the body ended): the next wait starts afresh.
            this.waiting = None;
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let limit = this.limit;
        let sleep = this
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(sleep.as_mut().poll(cx));
        this.waiting = None;
        this.stalled = true;
        Poll::Ready(Some(Err(Box::new(BodyStalled { after: limit }))))
    }

    fn is_end_stream(&self) -> bool {
        self.stalled || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed from a channel, so the test decides when each part arrives.
    struct Chunks(mpsc::Receiver<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn channel_body() -> (mpsc::Sender<Bytes>, Chunks) {
        let (tx, rx) = mpsc::channel(4);
        (tx, Chunks(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_is_never_cut() {
        let (tx, inner) = channel_body();
        let body = TimedBody::new(inner, Duration::from_secs(1), Place::default());
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let _ = tx.send(Bytes::from_static(b"x")).await;
            }
        });
        let all = body
            .collect()
            .await
            .expect("each part came within the limit");
        assert_eq!(all.to_bytes(), Bytes::from_static(b"xxxxx"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_fails_once_then_the_body_is_over() {
        let (tx, inner) = channel_body();
        tx.send(Bytes::from_static(b"abc")).await.expect("send");
        let mut body = TimedBody::new(inner, Duration::from_secs(1), Place::default());
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"abc")));
        let start = tokio::time::Instant::now();
        let e = body.frame().await.expect("an error").expect_err("stalled");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(
            BodyStalled::in_chain(&*e),
            Some(BodyStalled {
                after: Duration::from_secs(1)
            })
        );
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        drop(tx);
    }
}
