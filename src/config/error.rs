//! [`ConfigError`]: a configuration that cannot be used, said in one line.
//!
//! Operators read these at start-up (exit code 2) and in the log when a
//! reload is refused, so each one names the key, the value as written, where
//! it came from when that is known, and what the key accepts.

use std::path::PathBuf;

/// A configuration value that is not acceptable, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value outside what it accepts.
    #[error("invalid configuration: {key} = {value}{source_hint}: expected {expected}")]
    Invalid {
        /// The configuration key.
        key: String,
        /// The offending value, as the user wrote it.
        value: String,
        /// Where the value came from (file, environment variable), if known.
        source_hint: String,
        /// What the key accepts.
        expected: String,
    },
    /// A key that wsgate does not know.
    #[error("invalid configuration: unknown key {key}{source_hint}: {advice}")]
    UnknownKey {
        /// The unknown key.
        key: String,
        /// Where it came from.
        source_hint: String,
        /// The key it was most likely meant to be ("did you mean …?"), or
        /// the keys that exist when none is close.
        advice: String,
    },
    /// The configuration file named on the command line cannot be read.
    #[error("invalid configuration: config file {path}: {reason}")]
    File {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    /// A value refused by a check that has no source to point at (the
    /// checks run on a [`RawConfig`](super::RawConfig) built in code, or
    /// span several keys).
    pub(crate) fn invalid(key: &str, value: String, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            value,
            source_hint: String::new(),
            expected: expected.into(),
        }
    }
}
