//! The admin token: who may use the operator paths of the admin port
//! (`GET /keys`, and the drain controls of docs/operations.md#access-log).
//!
//! The token lives in a file (a Kubernetes Secret), named by
//! `admin_token_file`. It is re-read when the file changes (same
//! device/inode/size/mtime test as the config file, so a Secret's symlink
//! swap is seen), checked on each protected request: those are rare, and a
//! `stat` is cheaper than a watch task. Requests carry
//! `Authorization: Bearer <token>`, compared in constant time. Without a
//! token file the protected paths do not exist (404): an operator who has
//! not set a secret must not get an open control surface.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use http::{header, HeaderMap, StatusCode};
use subtle::ConstantTimeEq;

use crate::file_watch::FileVersion;

/// The admin token check; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdminToken {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    path: Option<PathBuf>,
    /// The token as last read, and the file version it was read from.
    read: Option<(Option<FileVersion>, Vec<u8>)>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("State")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AdminToken {
    /// The check for the token in `path`; `None` = protected paths are 404.
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        let token = AdminToken::default();
        token.set_path(path);
        token
    }

    /// A reload named another file (or none).
    pub(crate) fn set_path(&self, path: Option<PathBuf>) {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if state.path != path {
            *state = State { path, read: None };
        }
    }

    /// Whether `headers` carry the token: `Err` is the status to answer
    /// (404 without a token file, 401 otherwise).
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), StatusCode> {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let path = state.path.clone().ok_or(StatusCode::NOT_FOUND)?;
        let version = FileVersion::of(&path);
        let stale = state
            .read
            .as_ref()
            .is_none_or(|(v, _)| *v != version || version.is_none());
        if stale {
            // An unreadable or empty file locks everyone out (logged), rather
            // than keeping a token the operator may have meant to revoke.
            state.read = match std::fs::read_to_string(&path) {
                Ok(text) if !text.trim().is_empty() => {
                    Some((version, text.trim().as_bytes().to_vec()))
                }
                Ok(_) => {
                    tracing::error!(file = %path.display(), "admin token file is empty: operator paths refuse everyone");
                    None
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), "admin token file unreadable ({e}): operator paths refuse everyone");
                    None
                }
            };
        }
        let expected = state
            .read
            .as_ref()
            .map(|(_, t)| t.as_slice())
            .ok_or(StatusCode::UNAUTHORIZED)?;
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("bearer "))
                    .map(|_| v[7..].trim())
            })
            .ok_or(StatusCode::UNAUTHORIZED)?;
        if bool::from(given.as_bytes().ct_eq(expected)) {
            Ok(())
        } else {
            Err(StatusCode::UNAUTHORIZED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).expect("value"),
        );
        h
    }

    #[test]
    fn without_a_file_the_paths_do_not_exist() {
        assert_eq!(
            AdminToken::new(None).check(&bearer("x")),
            Err(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn only_the_token_in_the_file_passes_and_a_new_file_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").expect("write");
        let t = AdminToken::new(Some(path.clone()));
        assert_eq!(t.check(&bearer("first-token")), Ok(()));
        assert_eq!(
            t.check(&bearer("first-toke")),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            t.check(&bearer("first-token-and-more")),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(t.check(&HeaderMap::new()), Err(StatusCode::UNAUTHORIZED));
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic first-token"),
        );
        assert_eq!(t.check(&basic), Err(StatusCode::UNAUTHORIZED));

        // A rotated Secret: a new file swapped in (new inode).
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(t.check(&bearer("second-token")), Ok(()));
        assert_eq!(
            t.check(&bearer("first-token")),
            Err(StatusCode::UNAUTHORIZED)
        );

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            t.check(&bearer("second-token")),
            Err(StatusCode::UNAUTHORIZED),
            "fails closed"
        );
    }
}
