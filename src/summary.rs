//! Counts by cause written as one line per window, never one line per
//! event: for events any client can cause at will (refused upgrades,
//! refused admin requests), where a line each would bury the log exactly
//! when it matters.
//!
//! The first event after a quiet time opens a window of
//! [`SUMMARY_WINDOW`] and schedules its line; events during the window
//! only count (one atomic add). The owner writes the line from
//! [`Window::take`], and once more at exit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a summary window stays open: at most one line per window.
pub(crate) const SUMMARY_WINDOW: Duration = Duration::from_secs(10);

/// One summary's counts, `N` causes.
#[derive(Debug)]
pub(crate) struct Window<const N: usize> {
    counts: [AtomicU64; N],
    /// A window is open (its line is scheduled).
    open: AtomicBool,
    /// When the open window began.
    since: Mutex<Option<Instant>>,
}

impl<const N: usize> Default for Window<N> {
    fn default() -> Self {
        Window {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            open: AtomicBool::new(false),
            since: Mutex::new(None),
        }
    }
}

/// What a window counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts<const N: usize> {
    /// By cause.
    pub(crate) by_cause: [u64; N],
    /// All causes.
    pub(crate) total: u64,
    /// How long the window was open, in whole seconds (at least 1).
    pub(crate) window_s: u64,
}

impl<const N: usize> Counts<N> {
    /// The count of `cause`, `None` when 0 (a field left out of the line).
    pub(crate) fn of(&self, cause: usize) -> Option<u64> {
        self.by_cause.get(cause).copied().filter(|n| *n > 0)
    }
}

impl<const N: usize> Window<N> {
    /// Counts one event of `cause`. When it opens a window, `write` runs
    /// once the window has passed (outside a runtime nothing is scheduled:
    /// the owner's exit line still writes the counts).
    pub(crate) fn count(&self, cause: usize, write: impl FnOnce() + Send + 'static) {
        if let Some(c) = self.counts.get(cause) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if self.open.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(SUMMARY_WINDOW).await;
                write();
            });
        }
    }

    /// Takes the counts and closes the window; `None` when nothing was
    /// counted since the last line.
    pub(crate) fn take(&self) -> Option<Counts<N>> {
        // Closed before the counts are taken: an event in between opens a
        // new window and is either in this line or in that one's.
        let since = self
            .since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.open.store(false, Ordering::Release);
        let by_cause: [u64; N] = std::array::from_fn(|i| self.counts[i].swap(0, Ordering::Relaxed));
        let total = by_cause.iter().sum();
        (total > 0).then(|| Counts {
            by_cause,
            total,
            window_s: since.map_or(SUMMARY_WINDOW.as_secs(), |s| s.elapsed().as_secs().max(1)),
        })
    }

    /// Whether a window is open.
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// The counts not yet written.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_one_line_per_window() {
        let window = Arc::new(Window::<3>::default());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let write = {
            let (window, lines) = (Arc::clone(&window), Arc::clone(&lines));
            move || {
                if let Some(c) = window.take() {
                    lines.lock().expect("lock").push(c);
                }
            }
        };
        for _ in 0..1000 {
            window.count(0, write.clone());
        }
        window.count(2, write.clone());
        assert!(window.is_open());
        assert_eq!(window.pending(), 1001);
        tokio::time::sleep(SUMMARY_WINDOW + Duration::from_millis(1)).await;
        let written = lines.lock().expect("lock").clone();
        assert_eq!(written.len(), 1, "one line for the whole storm");
        assert_eq!(written[0].by_cause, [1000, 0, 1]);
        assert_eq!((written[0].total, written[0].of(1)), (1001, None));
        assert!(!window.is_open());
        window.count(1, write);
        assert!(window.is_open(), "the next event opens a new window");
        assert_eq!(window.take().map(|c| c.total), Some(1));
        assert_eq!(window.take(), None, "nothing since");
    }
}
