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
//!
//! A file that cannot be used (unreadable, empty, or a token no header can
//! carry: a line break inside, a NUL, another control character, non-ASCII)
//! refuses everyone, and says why once, at start-up or when it is first
//! seen, and again only when the file or the cause changes
//! (docs/operations.md#admin-token): a line per request would flood the log exactly
//! while someone is locked out. Refusals themselves are summarised
//! (`refusals.rs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use super::refusals::{AdminRefusals, Refused};
use crate::file_watch::FileVersion;

/// The admin token check; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdminToken {
    inner: Arc<Mutex<State>>,
    /// Refused requests, summarised.
    refusals: AdminRefusals,
}

#[derive(Default)]
struct State {
    path: Option<PathBuf>,
    /// The token as last read, and the file version it was read from.
    read: Option<(Option<FileVersion>, Vec<u8>)>,
    /// The problem last logged, with the version it was seen in; `None`
    /// while the file is usable.
    reported: Option<(Option<FileVersion>, Problem)>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        f.debug_struct("State")
            .field("path", &self.path)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

/// Why a token file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    /// It cannot be read: the error, as the system words it.
    Unreadable(String),
    /// Nothing but white space.
    Empty,
    /// A line break inside the token (surrounding white space is ignored).
    LineBreak,
    /// A NUL byte.
    Nul,
    /// Another control character, or a byte that is not ASCII: no
    /// `Authorization` header could carry such a token.
    NotPrintable,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "admin token file unreadable ({e})"),
            Problem::Empty => f.write_str("admin token file is empty"),
            Problem::LineBreak => f.write_str(
                "admin token file holds a line break inside the token (only one line is allowed)",
            ),
            Problem::Nul => f.write_str("admin token file holds a NUL byte"),
            Problem::NotPrintable => {
                f.write_str("admin token file holds a control character or a non-ASCII byte")
            }
        }
    }
}

/// The token in a file's bytes: the content without surrounding white
/// space (the newline an editor or `kubectl` leaves), if it is one a
/// request can carry.
fn token_of(bytes: &[u8]) -> Result<&[u8], Problem> {
    let token = bytes.trim_ascii();
    if token.is_empty() {
        Err(Problem::Empty)
    } else if token.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        Err(Problem::LineBreak)
    } else if token.contains(&0) {
        Err(Problem::Nul)
    } else if token
        .iter()
        .any(|b| !(b.is_ascii_graphic() || *b == b' ' || *b == b'\t'))
    {
        Err(Problem::NotPrintable)
    } else {
        Ok(token)
    }
}

impl AdminToken {
    /// The check for the token in `path`; `None` = protected paths are 404.
    /// A file already unusable is reported now, not at the first request.
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        let token = AdminToken::default();
        token.set_path(path);
        token
    }

    /// A reload named another file (or none); it is read at once, so a
    /// problem with it is logged with the reload.
    pub(crate) fn set_path(&self, path: Option<PathBuf>) {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if state.path != path {
            *state = State {
                path,
                read: None,
                reported: None,
            };
            if let Some(path) = state.path.clone() {
                refresh(&mut state, &path);
            }
        }
    }

    /// Whether `headers` carry the token: `Err` says why not (its status:
    /// 404 without a token file, 401 otherwise). Refusals are counted for
    /// the summary.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let verdict = self.judge(headers);
        if let Err(refused) = verdict {
            self.refusals.count(refused);
        }
        verdict
    }

    /// Writes the refusals not yet summarised (at exit).
    pub(crate) fn flush_refusals(&self) {
        self.refusals.flush();
    }

    fn judge(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let path = state.path.clone().ok_or(Refused::NoTokenFile)?;
        refresh(&mut state, &path);
        let expected = state
            .read
            .as_ref()
            .map(|(_, t)| t.as_slice())
            .ok_or(Refused::BadTokenFile)?;
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("bearer "))
                    .map(|_| v[7..].trim())
            })
            .ok_or(Refused::NoToken)?;
        if bool::from(given.as_bytes().ct_eq(expected)) {
            Ok(())
        } else {
            Err(Refused::WrongToken)
        }
    }
}

/// Re-reads the token file if it changed (or was not usable), logging a
/// problem only when it is new.
fn refresh(state: &mut State, path: &Path) {
    let version = FileVersion::of(path);
    let stale = state
        .read
        .as_ref()
        .is_none_or(|(v, _)| *v != version || version.is_none());
    if !stale {
        return;
    }
    // An unusable file locks everyone out, rather than keeping a token the
    // operator may have meant to revoke.
    let read = std::fs::read(path).map_err(|e| Problem::Unreadable(e.to_string()));
    match read.as_deref().map_err(Clone::clone).and_then(token_of) {
        Ok(token) => {
            state.read = Some((version, token.to_vec()));
            if state.reported.take().is_some() {
                tracing::info!(file = %path.display(), "admin token file is usable again");
            }
        }
        Err(problem) => {
            state.read = None;
            let seen = Some((version, problem));
            if state.reported != seen {
                if let Some((_, problem)) = &seen {
                    tracing::error!(
                        file = %path.display(),
                        "{problem}: operator paths refuse everyone until it is fixed"
                    );
                }
                state.reported = seen;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

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
            Err(Refused::NoTokenFile)
        );
        assert_eq!(Refused::NoTokenFile.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_token_no_header_can_carry_makes_the_file_unusable() {
        for (content, problem) in [
            (&b"abc\ndef\n"[..], Problem::LineBreak),
            (b"abc\r\ndef", Problem::LineBreak),
            (b"abc\0def", Problem::Nul),
            (b"abc\x07def", Problem::NotPrintable),
            ("abcdéf".as_bytes(), Problem::NotPrintable),
            (b"  \n\t", Problem::Empty),
            (b"", Problem::Empty),
        ] {
            assert_eq!(token_of(content), Err(problem), "{content:?}");
        }
        assert_eq!(token_of(b" tok-en \r\n"), Ok(&b"tok-en"[..]));
    }

    #[test]
    fn a_bad_file_is_reported_once_and_refuses_everyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\ndef\n").expect("write");
        let t = AdminToken::new(Some(path.clone()));
        let reported = || t.inner.lock().expect("lock").reported.clone();
        assert!(matches!(reported(), Some((_, Problem::LineBreak))));
        for token in ["abc", "def", "abc def"] {
            assert_eq!(t.check(&bearer(token)), Err(Refused::BadTokenFile));
        }
        assert_eq!(t.refusals.pending(), 3);
        std::fs::write(&path, "good-token\n").expect("write");
        assert_eq!(t.check(&bearer("good-token")), Ok(()));
        assert_eq!(reported(), None, "usable again");
    }

    #[test]
    fn only_the_token_in_the_file_passes_and_a_new_file_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").expect("write");
        let t = AdminToken::new(Some(path.clone()));
        assert_eq!(t.check(&bearer("first-token")), Ok(()));
        assert_eq!(t.check(&bearer("first-toke")), Err(Refused::WrongToken));
        assert_eq!(
            t.check(&bearer("first-token-and-more")),
            Err(Refused::WrongToken)
        );
        assert_eq!(t.check(&HeaderMap::new()), Err(Refused::NoToken));
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic first-token"),
        );
        assert_eq!(t.check(&basic), Err(Refused::NoToken));

        // A rotated Secret: a new file swapped in (new inode).
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(t.check(&bearer("second-token")), Ok(()));
        assert_eq!(t.check(&bearer("first-token")), Err(Refused::WrongToken));

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            t.check(&bearer("second-token")),
            Err(Refused::BadTokenFile),
            "fails closed"
        );
    }
}
