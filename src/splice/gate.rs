//! A waker gate: polls a rarely-ready future only when *its own* waker
//! fired (or when it was just changed).
//!
//! Why: the splice task is woken for every chunk of data; re-polling the
//! stop future (cancellation token, drain notification, lifetime timer) on
//! each of those wake-ups would take their internal locks — one of them
//! shared by every tunnel — once per message. The gate gives the future a
//! waker of its own that raises a flag (and wakes the task), and polls the
//! future only when the flag is up.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The waker handed to the gated future.
struct Gate {
    /// The gated future's waker fired since it was last polled.
    woken: AtomicBool,
    /// The splice task, woken in turn.
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A boxed future polled through a [`Gate`].
pub(crate) struct Gated<F> {
    future: Pin<Box<F>>,
    gate: Arc<Gate>,
}

impl<F: Future> Gated<F> {
    /// Gates `future`; its first poll goes through.
    pub(crate) fn new(future: Pin<Box<F>>) -> Self {
        Gated {
            future,
            gate: Arc::new(Gate {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }

    /// The future, to change it in place (a timer's deadline): it is
    /// polled through at the next [`Gated::poll`], whether its waker fired
    /// or not.
    pub(crate) fn future_mut(&mut self) -> Pin<&mut F> {
        self.gate.woken.store(true, Ordering::Release);
        self.future.as_mut()
    }

    /// Polls the future if its waker fired since the last poll; `Pending`
    /// otherwise (the task is woken when it fires).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        self.gate.task.register(cx.waker());
        let waker = Waker::from(Arc::clone(&self.gate));
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}
