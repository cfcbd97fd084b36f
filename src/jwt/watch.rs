//! The JWKS file watch: one task per verifier that polls the file and
//! reloads the keys once a change has settled, so a rotated Secret is
//! applied without a restart. Polled, not watched, for the reason the
//! configuration file is (see `file_watch`): a Secret update swaps a symlink.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Verifier;
use crate::file_watch::{settled_change, CONFIG_POLL_INTERVAL};

/// How often a missing JWKS file is reported while it stays missing: often
/// enough to be seen in any log window, rarely enough not to flood it.
const MISSING_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Polls the JWKS file every [`CONFIG_POLL_INTERVAL`] and reloads the keys
/// once a change has settled (the same new version on two polls, so a file
/// being written is not read half-way), and at once when
/// [`Verifier::reconfigure`] names a new file, until `stop` is cancelled.
/// Stats and reads run on the blocking pool. Logs each reload: the number of
/// keys, or the error and that the old keys stay.
pub(crate) async fn watch(verifier: Arc<Verifier>, stop: CancellationToken) {
    let mut previous = *verifier.lock_applied();
    let mut missing_reported: Option<Instant> = None;
    let mut ticks = tokio::time::interval(CONFIG_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        let path_changed = tokio::select! {
            () = stop.cancelled() => return,
            () = verifier.path_changed.notified() => true,
            _ = ticks.tick() => false,
        };
        if !path_changed {
            let v = Arc::clone(&verifier);
            let Ok(now) = tokio::task::spawn_blocking(move || v.version_now()).await else {
                return; // the runtime is shutting down
            };
            if now.is_none() {
                if missing_reported.is_none_or(|at| at.elapsed() >= MISSING_REPORT_INTERVAL) {
                    let path = verifier.snapshot().path.clone();
                    tracing::warn!(
                        path = %path.display(),
                        "the jwks file is missing; the last good keys stay in use until it is back"
                    );
                    missing_reported = Some(Instant::now());
                }
            } else {
                missing_reported = None;
            }
            let applied = *verifier.lock_applied();
            let changed = settled_change(applied, previous, now);
            previous = now;
            if !changed {
                continue;
            }
        }
        let v = Arc::clone(&verifier);
        let Ok(reloaded) = tokio::task::spawn_blocking(move || v.reload_keys()).await else {
            return; // the runtime is shutting down
        };
        previous = *verifier.lock_applied();
        let path = verifier.snapshot().path.clone();
        match reloaded {
            Ok(n) => tracing::info!(path = %path.display(), "jwks reloaded: {n} keys"),
            Err(e) => tracing::error!(
                path = %path.display(),
                "jwks reload failed, the old keys stay: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::jwt::test_tokens::{fixtures_dir, token};
    use crate::jwt::tests::{claims, jwks_copy, replace, verifier};
    use crate::jwt::Expect;

    /// The watch applies a replaced file once it settled, and ends on `stop`.
    #[tokio::test]
    async fn watch_applies_a_rotation_and_stops() {
        let (_dir, path) = jwks_copy("jwks.json");
        let v = Arc::new(Verifier::load(&path, Expect::default()).expect("load"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(Arc::clone(&v), stop.clone()));

        let rotated = std::fs::read(fixtures_dir().join("jwks-rotated.json")).expect("read");
        replace(&path, &rotated);
        let new = token("RS256-rotated", claims("new"));
        let bound = CONFIG_POLL_INTERVAL * 5;
        let applied = tokio::time::timeout(bound, async {
            while v.verify(&new).is_err() {
                tokio::time::sleep(CONFIG_POLL_INTERVAL / 4).await;
            }
        })
        .await;
        assert!(applied.is_ok(), "not applied within {bound:?}");

        stop.cancel();
        let ended = tokio::time::timeout(CONFIG_POLL_INTERVAL, task).await;
        assert!(matches!(ended, Ok(Ok(()))), "the watch ends on stop");
    }

    /// A new path from `reconfigure` is read at once, without waiting for
    /// two polls.
    #[tokio::test]
    async fn watch_reads_a_new_path_at_once() {
        let v = Arc::new(verifier(Expect::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(Arc::clone(&v), stop.clone()));
        v.reconfigure(&fixtures_dir().join("jwks-rotated.json"), Expect::default());
        let new = token("RS256-rotated", claims("new"));
        let applied = tokio::time::timeout(CONFIG_POLL_INTERVAL, async {
            while v.verify(&new).is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        stop.cancel();
        assert!(applied.is_ok(), "not read within one poll interval");
        assert!(matches!(task.await, Ok(())));
    }
}
