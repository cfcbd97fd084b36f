//! Configuration reload: SIGHUP and a watch on the `--config` file, both
//! producing the configuration read afresh.
//!
//! Why a poll and not inotify: a Kubernetes ConfigMap mounted as the file is
//! updated by swapping a symlink, which a watch on the file misses, and the
//! image has no shell to send SIGHUP from. A `stat` every
//! [`CONFIG_POLL_INTERVAL`] costs nothing. Applying what is read is
//! [`crate::run`]'s job; this module only decides *when* to read and makes
//! sure what it hands over is one whole version of the file.

use crate::config::{Config, ConfigError, ConfigSource};
use crate::file_watch::{settled_change, FileVersion, CONFIG_POLL_INTERVAL};

/// SIGHUP on Unix; nothing elsewhere.
#[cfg(unix)]
pub(crate) type Hangups = tokio::signal::unix::Signal;
/// SIGHUP on Unix; nothing elsewhere.
#[cfg(not(unix))]
pub(crate) type Hangups = std::convert::Infallible;

/// The next SIGHUP; never, when there are none to wait for.
async fn next_hangup(hangups: &mut Option<Hangups>) {
    match hangups {
        #[cfg(unix)]
        Some(h) => {
            if h.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        Some(never) => match *never {},
        None => std::future::pending().await,
    }
}

/// One read of the configuration, with the file's version just before and
/// just after it: the read is of one version only when the two agree.
struct Reading {
    before: Option<FileVersion>,
    after: Option<FileVersion>,
    config: Result<Config, ConfigError>,
}

impl Reading {
    /// Whether the file stayed the same version through the read and, for
    /// a poll, is the version that settled (`settled`; `None` for SIGHUP,
    /// which reads whatever is there).
    fn is_of_one_version(&self, settled: Option<Option<FileVersion>>) -> bool {
        self.before == self.after && settled.is_none_or(|version| version == self.before)
    }

    /// Reads on the blocking pool: the file may sit on a slow volume, and a
    /// runtime worker must not wait for it. `None` only when the runtime is
    /// shutting down.
    async fn take(source: &ConfigSource) -> Option<Self> {
        let source = source.clone();
        tokio::task::spawn_blocking(move || {
            let version = || source.file.as_deref().and_then(FileVersion::of);
            let before = version();
            let config = source.load();
            Reading {
                before,
                after: version(),
                config,
            }
        })
        .await
        .ok()
    }
}

/// Reloads on SIGHUP and, when `source` names a file, once a change of that
/// file has settled: it is polled every [`CONFIG_POLL_INTERVAL`]. With a
/// ConfigMap mounted as the file, editing the ConfigMap then applies it
/// without a restart and without a signal (the image has no shell to send
/// one from). A stat every 2 s costs nothing, and unlike an inotify watch on
/// the file it sees the symlink swap by which the kubelet updates a mounted
/// ConfigMap.
///
/// Both triggers share one task and one baseline, so a change is applied
/// and counted once whichever sees it first. A read during which the file
/// changed is not applied (it may hold half a file, and a prefix of a TOML
/// file is often valid TOML: `max_clients = 1` of `max_clients = 1000`);
/// the change is applied once it has settled.
///
/// `deliver` hands each reading over and says whether anyone still listens;
/// the task ends when nobody does (the process is ending).
pub(crate) async fn reload_on_request(
    source: ConfigSource,
    loaded: Option<FileVersion>,
    mut hangups: Option<Hangups>,
    deliver: impl Fn(Result<Config, ConfigError>) -> bool,
) {
    // The baseline is the version the running configuration came from, not
    // whatever the file is when this task first gets to run: a change made
    // in between (a busy start) would otherwise be taken as the baseline
    // and never applied.
    let mut applied = loaded;
    let mut previous = applied;
    let watching = source.file.is_some();
    let mut ticks = tokio::time::interval(CONFIG_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        let signalled = tokio::select! {
            () = next_hangup(&mut hangups) => true,
            _ = ticks.tick(), if watching => false,
        };
        // A poll reloads a version that has settled, and only that version;
        // a SIGHUP reads whatever is there now.
        let mut settled = None;
        if !signalled {
            let now = match source.file.clone() {
                Some(path) => tokio::task::spawn_blocking(move || FileVersion::of(&path))
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            let changed = settled_change(applied, previous, now);
            previous = now;
            if !changed {
                continue;
            }
            if let Some(path) = &source.file {
                tracing::info!(path = %path.display(), "configuration file changed: reloading");
            }
            settled = Some(now);
        }
        let Some(reading) = Reading::take(&source).await else {
            return; // the runtime is shutting down
        };
        previous = reading.after;
        if !reading.is_of_one_version(settled) {
            tracing::warn!(
                "configuration file changed while it was read: it is applied once it has settled"
            );
            continue;
        }
        applied = reading.after;
        if !deliver(reading.config) {
            return; // nobody listens any more: the process is ending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(inode: u64, len: u64) -> Option<FileVersion> {
        Some(FileVersion::made_up(inode, len))
    }

    #[test]
    fn a_read_during_a_change_is_not_applied() {
        let (a, b) = (version(1, 10), version(1, 0));
        let reading = |before, after| Reading {
            before,
            after,
            // What was read does not matter here, only when.
            config: Config::load(None),
        };
        assert!(
            reading(a, a).is_of_one_version(Some(a)),
            "the settled version"
        );
        assert!(
            reading(a, a).is_of_one_version(None),
            "SIGHUP, file unchanged"
        );
        assert!(
            !reading(a, b).is_of_one_version(Some(a)),
            "truncated while read"
        );
        assert!(
            !reading(a, b).is_of_one_version(None),
            "truncated while read after a SIGHUP"
        );
        assert!(
            !reading(b, b).is_of_one_version(Some(a)),
            "truncated between the poll and the read: not the version that settled"
        );
        assert!(
            reading(None, None).is_of_one_version(None),
            "no file: SIGHUP re-reads the environment"
        );
    }

    /// The failure CI once caught: the file replaced after the running
    /// configuration was read but before the watch task first ran. The
    /// baseline must be the version that was read, so the change is applied.
    #[tokio::test]
    async fn a_change_before_the_watch_starts_is_still_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("wsgate.toml");
        std::fs::write(&file, "upstream = \"127.0.0.1:1\"\nmax_clients = 3\n").expect("write");
        let loaded = FileVersion::of(&file);
        assert!(loaded.is_some());

        let next = dir.path().join("next.toml");
        std::fs::write(&next, "upstream = \"127.0.0.1:1\"\nmax_clients = 1\n").expect("write");
        std::fs::rename(&next, &file).expect("rename");

        let source = ConfigSource {
            base: crate::config::RawConfig::default(),
            file: Some(file.clone()),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = tokio::spawn(reload_on_request(source, loaded, None, move |c| {
            tx.send(c).is_ok()
        }));
        let bound = CONFIG_POLL_INTERVAL * 5;
        let message = tokio::time::timeout(bound, rx.recv()).await;
        watch.abort();
        match message {
            Ok(Some(loaded)) => match loaded {
                Ok(config) => assert_eq!(config.max_clients, 1),
                Err(e) => panic!("the new file is valid: {e}"),
            },
            other => panic!("no reload within {bound:?}: {other:?}"),
        }
    }
}
