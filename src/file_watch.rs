//! Telling when a watched file has changed, for every file wsgate polls:
//! the configuration (`reload`), the JWKS (`jwt`) and the admin token
//! (`admin::token`). [`FileVersion`] is which file a path resolves to, its
//! size and its modification time; [`settled_change`] says when a change is
//! safe to read.
//!
//! A leaf: it names nothing else of the crate, so a watcher depends on this
//! and not on another watcher (the JWT verifier once took these from
//! `reload`, and so depended on `config`).

use std::path::Path;
use std::time::{Duration, SystemTime};

/// How often the configuration file is looked at (the JWKS file too).
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// One version of a watched file: the file the path resolves to (a
/// Kubernetes ConfigMap or Secret update swaps a symlink to a new file), its
/// size and its modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileVersion {
    /// The version at `path` now; `None` when it cannot be read. One
    /// `stat`: blocking, so the watch task runs it on the blocking pool.
    pub fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (device, inode) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (device, inode) = (0, 0);
        Some(FileVersion {
            device,
            inode,
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// Whether to reload now, given the version last applied, the one seen at
/// the previous poll and the one seen now: only a change that has settled
/// (the same new version on two polls in a row), so a file still being
/// written in place is never read half-way (an empty file is a valid
/// configuration too: all defaults, no cap). A file that vanished is not a
/// change; the running configuration stays.
pub(crate) fn settled_change(
    applied: Option<FileVersion>,
    previous: Option<FileVersion>,
    now: Option<FileVersion>,
) -> bool {
    now.is_some() && now == previous && now != applied
}

#[cfg(test)]
impl FileVersion {
    /// A version of no real file, for tests of what counts as a change.
    pub(crate) fn made_up(inode: u64, len: u64) -> Self {
        FileVersion {
            device: 1,
            inode,
            len,
            modified: None,
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
    fn reloads_only_a_settled_change() {
        let (a, b, c) = (version(1, 10), version(1, 20), version(2, 20));
        assert!(!settled_change(a, a, a), "nothing changed");
        assert!(
            !settled_change(a, a, b),
            "changed since the last poll: may still be written"
        );
        assert!(
            settled_change(a, b, b),
            "the same new version twice: reload"
        );
        assert!(!settled_change(b, b, b), "already applied");
        assert!(
            !settled_change(b, b, c) && settled_change(b, c, c),
            "a swapped symlink"
        );
        assert!(!settled_change(a, b, c), "still changing");
        assert!(
            !settled_change(a, None, None),
            "vanished: keep the running configuration"
        );
        assert!(
            settled_change(None, a, a),
            "a file that appears is read once it settled"
        );
    }
}
