//! Refused admin requests, summarised (docs/operations.md#admin-refusals): at most one line per
//! summary window (`crate::summary`) with the counts by cause, never one
//! line each, as client refusals are (`access_log`).
//!
//! Why: a scanner, a misconfigured probe or a script with a stale token
//! asks again and again; a line each would bury everything else in the
//! log, and writing it would cost more than refusing. Unlike the client
//! summaries these are written whatever `access_log` says: they are about
//! who tries the operator controls, not about traffic.

use std::sync::Arc;

use crate::summary::Window;

/// The tracing target of the summary lines.
pub(crate) const TARGET: &str = "wsgate::admin";

/// Why an operator path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No `admin_token_file` is configured: the paths do not exist (404).
    NoTokenFile,
    /// The token file cannot be used (unreadable, empty, a line break…):
    /// everyone is refused (401) until it is fixed.
    BadTokenFile,
    /// No `Authorization: Bearer` token (401).
    NoToken,
    /// A token that is not the one in the file (401).
    WrongToken,
}

impl Refused {
    /// Every cause, in slot order.
    const ALL: [Refused; 4] = [
        Refused::NoTokenFile,
        Refused::BadTokenFile,
        Refused::NoToken,
        Refused::WrongToken,
    ];

    /// The status answered.
    pub(crate) fn status(self) -> http::StatusCode {
        match self {
            Refused::NoTokenFile => http::StatusCode::NOT_FOUND,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// Counts refusals and writes the summaries; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdminRefusals {
    window: Arc<Window<{ Refused::ALL.len() }>>,
}

impl AdminRefusals {
    /// Counts one refusal; the first of a window schedules its line.
    pub(crate) fn count(&self, refused: Refused) {
        let this = self.clone();
        self.window.count(refused.slot(), move || this.flush());
    }

    /// Writes one line with the counts since the last, if any, and closes
    /// the window (at its end, and once more at exit).
    pub(crate) fn flush(&self) {
        let Some(c) = self.window.take() else {
            return;
        };
        let n = |r: Refused| c.of(r.slot());
        tracing::info!(
            target: TARGET,
            window_s = c.window_s,
            total = c.total,
            no_token = n(Refused::NoToken),
            wrong_token = n(Refused::WrongToken),
            no_token_file = n(Refused::NoTokenFile),
            bad_token_file = n(Refused::BadTokenFile),
            "admin refusals"
        );
    }

    /// The counts not yet written (tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> u64 {
        self.window.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::SUMMARY_WINDOW;

    #[test]
    fn slots_follow_the_list() {
        for (i, r) in Refused::ALL.iter().enumerate() {
            assert_eq!(r.slot(), i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_one_line_per_window() {
        let r = AdminRefusals::default();
        for _ in 0..1000 {
            r.count(Refused::WrongToken);
        }
        r.count(Refused::NoToken);
        assert_eq!(r.pending(), 1001);
        tokio::time::sleep(SUMMARY_WINDOW + std::time::Duration::from_millis(1)).await;
        assert_eq!(r.pending(), 0, "the window's line took the counts");
        r.count(Refused::NoTokenFile);
        r.flush();
        assert_eq!(r.pending(), 0);
    }
}
