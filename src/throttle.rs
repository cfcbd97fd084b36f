//! At most one log line per interval for an event any client can cause
//! at will: the first occurrence is logged at once, the rest of the
//! interval is counted and reported with the next line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One event's throttle. Lock-free: a race lets exactly one caller log.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: Duration,
    origin: Instant,
    /// Milliseconds after `origin` from which the next line may be
    /// written; 0 = at once.
    next_ms: AtomicU64,
    /// Occurrences not logged since the last line.
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle allowing one line per `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Records one occurrence: `Some(n)` when this one is to be logged,
    /// `n` being how many were not logged since the last line; `None`
    /// when it is only counted.
    pub(crate) fn occurred(&self) -> Option<u64> {
        let now_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let interval_ms = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_the_rest_counted_until_the_interval_passes() {
        let t = Throttle::new(Duration::from_millis(50));
        assert_eq!(t.occurred(), Some(0));
        assert_eq!(t.occurred(), None);
        assert_eq!(t.occurred(), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match t.occurred() {
                Some(n) => {
                    assert!(n >= 2, "the suppressed ones are reported: {n}");
                    break;
                }
                None => assert!(Instant::now() < deadline, "never logged again"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
