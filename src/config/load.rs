//! Reading the configuration: the figment provider stack, the environment
//! filter, and figment's errors turned into [`ConfigError`]s.
//!
//! Loading is pure apart from reading the file, so it is tested with
//! `figment::Jail` and never touches the real process environment. Each
//! kind of value reports what it accepts through serde's "expected" text
//! (see `values.rs`), and serde lists the known keys (`suggest.rs` picks
//! the one an unknown key was meant to be), so this file needs no table of
//! keys.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;

use super::{suggest, Config, ConfigError, RawConfig};

/// Environment variable prefix for every key.
pub const ENV_PREFIX: &str = "WSGATE_";
/// The original Go hub's variable, honoured when `WSGATE_MAX_CLIENTS` is not set.
pub const LEGACY_MAX_CLIENTS_ENV: &str = "WS_MAX_CLIENTS";

/// Where the configuration comes from, kept so SIGHUP can read it afresh.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// Built-in defaults (the demo has its own).
    pub base: RawConfig,
    /// The TOML file, if one was named.
    pub file: Option<PathBuf>,
}

impl ConfigSource {
    /// Loads `base < file < environment` and validates it.
    ///
    /// # Errors
    /// Any invalid value, unknown key or unreadable file.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::from_figment(&Config::figment(self.base.clone(), self.file.as_deref())?)
    }
}

impl Config {
    /// The provider stack: defaults < file < `WS_MAX_CLIENTS` < `WSGATE_*`.
    ///
    /// `base` supplies the defaults (the demo uses its own loopback ones).
    ///
    /// # Errors
    /// A named file that does not exist, is a directory or cannot be read
    /// is an error, not silently skipped.
    pub fn figment(base: RawConfig, file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut f = Figment::from(Serialized::defaults(base));
        if let Some(path) = file {
            readable(path)?;
            f = f.merge(Toml::file_exact(path));
        }
        let legacy = Env::raw()
            .only(&[LEGACY_MAX_CLIENTS_ENV])
            .map(|_| "max_clients".into());
        let env = Env::prefixed(ENV_PREFIX).filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            k != "config" && !is_kubernetes_service_link(&k)
        });
        Ok(f.merge(legacy).merge(env))
    }

    /// Loads `defaults < file < environment` and validates it.
    ///
    /// # Errors
    /// Any invalid value, unknown key or unreadable file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(&Self::figment(RawConfig::default(), file)?)
    }

    /// Extracts and validates a figment.
    ///
    /// # Errors
    /// Any invalid value or unknown key, naming the key and value.
    pub fn from_figment(f: &Figment) -> Result<Self, ConfigError> {
        let raw: RawConfig = f.extract().map_err(|e| from_figment_error(f, e))?;
        Self::validate(raw)
    }
}

/// Checks that `path` is a TOML file wsgate can read, saying what it is
/// instead when it is not (a directory mounted where a file was meant, a
/// file the process's user cannot read).
fn readable(path: &Path) -> Result<(), ConfigError> {
    let reason = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file".to_owned(),
        Err(e) => format!("cannot be read: {e}"),
        Ok(m) if m.is_dir() => "is a directory, expected a TOML file".to_owned(),
        Ok(m) if !m.is_file() => "is not a regular file, expected a TOML file".to_owned(),
        Ok(_) => match std::fs::File::open(path) {
            Ok(_) => return Ok(()),
            Err(e) => format!("cannot be read: {e}"),
        },
    };
    Err(ConfigError::File {
        path: path.to_owned(),
        reason,
    })
}

/// Kubernetes injects `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP...` and
/// `<SERVICE>_SERVICE_HOST/PORT...` variables for every Service in the
/// namespace; a Service named `wsgate` or `wsgate-<anything>` would otherwise
/// trip the unknown-key check. No wsgate key ends in `port` or contains
/// `service_` or `port_<digits>`, so these shapes cannot hide a real key.
fn is_kubernetes_service_link(key: &str) -> bool {
    key == "port"
        || key.ends_with("_port")
        || key.starts_with("service_")
        || key.contains("_service_")
        || key.starts_with("port_")
        || key
            .split("_port_")
            .nth(1)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// One figment error as one [`ConfigError`]: the key, the value as written,
/// where it came from and what the key accepts (the kind's "expected" text).
fn from_figment_error(f: &Figment, e: figment::Error) -> ConfigError {
    use figment::error::Kind;
    // Report the first error only: one line naming one key is what operators read.
    let e = e
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from(String::new()));
    let key = e.path.last().cloned().unwrap_or_default();
    let hint = source_hint(&e, &key);
    match &e.kind {
        Kind::UnknownField(field, known) => ConfigError::UnknownKey {
            advice: suggest::advice(field, known, from_env(&e)),
            key: field.clone(),
            source_hint: hint,
        },
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            ConfigError::Invalid {
                value: show_actual(actual),
                key,
                source_hint: hint,
                expected: expected.clone(),
            }
        }
        // No key: the file itself is unusable (TOML syntax).
        other if key.is_empty() => match file_of(&e) {
            Some(path) => ConfigError::File {
                path,
                reason: other.to_string().trim_end().to_owned(),
            },
            None => ConfigError::Invalid {
                key,
                value: other.to_string(),
                source_hint: hint,
                expected: "a TOML document of known keys".into(),
            },
        },
        // Not produced by RawConfig's fields today; said as plainly as figment says it.
        other => ConfigError::Invalid {
            value: lookup_value(f, &key).unwrap_or_else(|| "?".into()),
            key,
            source_hint: hint,
            expected: format!("a value this key accepts ({other})"),
        },
    }
}

/// Renders a figment value the way the user wrote it.
fn show_actual(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(s) => format!("{s:?}"),
        Actual::Signed(n) => n.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        Actual::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// Whether the value of an error came from a `WSGATE_*` variable.
fn from_env(e: &figment::Error) -> bool {
    e.metadata
        .as_ref()
        .is_some_and(|meta| meta.name.contains(ENV_PREFIX))
}

/// Where a value came from, as a hint like ` (from environment variable WSGATE_X)`.
fn source_hint(e: &figment::Error, key: &str) -> String {
    let Some(meta) = e.metadata.as_ref() else {
        return String::new();
    };
    if from_env(e) {
        return format!(
            " (from environment variable {ENV_PREFIX}{})",
            key.to_uppercase()
        );
    }
    if meta.name.contains(LEGACY_MAX_CLIENTS_ENV) {
        return format!(" (from environment variable {LEGACY_MAX_CLIENTS_ENV})");
    }
    match file_of(e) {
        Some(p) => format!(" (in {})", p.display()),
        None => String::new(),
    }
}

/// The file an error's value came from, if it came from one.
fn file_of(e: &figment::Error) -> Option<PathBuf> {
    match e.metadata.as_ref()?.source.as_ref()? {
        figment::Source::File(p) => Some(p.clone()),
        _ => None,
    }
}

/// The value of `key` as figment holds it, for errors that do not carry it.
fn lookup_value(f: &Figment, key: &str) -> Option<String> {
    match f.find_value(key).ok()? {
        Value::String(_, s) => Some(format!("{s:?}")),
        v => Some(format!("{v:?}")),
    }
}
