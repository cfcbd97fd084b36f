//! Rate: new admissions per second (`admission_rate`, `admission_burst`),
//! a token bucket refilled lazily on use.
//!
//! It is the last check of the pipeline, so a token is spent only by an
//! upgrade every other check admitted.

use std::sync::Mutex;

use tokio::time::Instant;

use super::capacity::lock;
use super::outcome::{RejectReason, Verdict};
use crate::config::RateLimit;

/// The admission rate limit and its bucket.
#[derive(Debug)]
pub(crate) struct Rate {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `None` = off.
    limit: Option<RateLimit>,
    tokens: f64,
    last: Option<Instant>,
}

impl Rate {
    /// A bucket for `limit` (`None` = off); it starts empty and fills at
    /// the first check.
    pub(crate) fn new(limit: Option<RateLimit>) -> Self {
        Rate {
            state: Mutex::new(State {
                limit,
                tokens: 0.0,
                last: None,
            }),
        }
    }

    /// The rate check: takes a token, or is over. Nothing is held, so dry
    /// run has nothing to take anyway.
    pub(crate) fn check(&self) -> Verdict<()> {
        let mut s = lock(&self.state);
        let Some(limit) = s.limit else {
            return Verdict::Pass(());
        };
        let now = Instant::now();
        let elapsed = s
            .last
            .map_or(f64::INFINITY, |t| now.duration_since(t).as_secs_f64());
        s.tokens = (s.tokens + elapsed * limit.per_second).min(limit.burst);
        s.last = Some(now);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Verdict::Pass(())
        } else {
            Verdict::over(RejectReason::Rate)
        }
    }

    /// Changes the limit in place; the bucket keeps its tokens up to the new burst.
    pub(crate) fn set(&self, limit: Option<RateLimit>) {
        let mut s = lock(&self.state);
        if let Some(l) = limit {
            s.tokens = s.tokens.min(l.burst);
        }
        s.limit = limit;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn passes(r: &Rate) -> bool {
        matches!(r.check(), Verdict::Pass(()))
    }

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_the_steady_rate() {
        let r = Rate::new(Some(RateLimit {
            per_second: 10.0,
            burst: 5.0,
        }));
        for _ in 0..5 {
            assert!(passes(&r), "burst");
        }
        assert!(!passes(&r));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(passes(&r), "one token refilled after 100 ms");
        assert!(!passes(&r));
    }

    #[test]
    fn off_always_passes() {
        let r = Rate::new(None);
        assert!((0..1000).all(|_| passes(&r)));
    }
}
