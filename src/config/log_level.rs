//! `log_level`: which log lines are written, as tracing filter directives
//! (`info`, `warn,wsgate::access=off`), checked so that a typo cannot
//! silence the log. The same check decides whether `RUST_LOG` is used
//! (`main` sets logging up; docs/configuration.md).
//!
//! tracing reads a bare word that is not a level as a *target* with every
//! level on: `debugg` is "all lines of the target `debugg`", which exists
//! nowhere, so nothing at all is written, errors included. Here a bare word
//! must be a level, or one of wsgate's own targets (`wsgate`,
//! `wsgate::access`); anything else is written `target=level`.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use super::values::ValueKind;

/// The level names tracing accepts, as messages list them.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The `log_level` key.
#[derive(Debug)]
pub(crate) struct LogLevel;

impl ValueKind for LogLevel {
    type Raw = String;
    type Value = String;
    const EXPECTED: &'static str = "a log filter: a level (off, error, warn, info, debug, trace), \
         target=level directives such as wsgate::access=off, or both, separated by commas";
    fn check(raw: &String) -> Option<String> {
        log_filter(raw).ok().map(|_| raw.trim().to_owned())
    }
}

/// The filter `directives` describe, or why they are refused (one phrase,
/// naming the directive at fault).
///
/// # Errors
/// Empty text, a directive tracing cannot parse (`wsgate=verbose`), or a
/// bare word that is neither a level nor a wsgate target (`debugg`).
pub fn log_filter(directives: &str) -> Result<EnvFilter, String> {
    let text = directives.trim();
    let mut seen = false;
    for d in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        seen = true;
        if d.contains(['=', '[']) || d.parse::<LevelFilter>().is_ok() || is_own_target(d) {
            continue;
        }
        let mut why = format!(
            "{d} is neither a level ({}) nor target=level",
            LEVELS.join(", ")
        );
        if let Some(level) = near_level(d) {
            why.push_str(&format!(": did you mean {level}?"));
        }
        return Err(why);
    }
    if !seen {
        return Err("no directive at all".into());
    }
    EnvFilter::builder()
        .parse(text)
        .map_err(|e| format!("{text} cannot be read as tracing directives ({e})"))
}

/// `wsgate` and the targets below it: the only bare targets accepted.
fn is_own_target(word: &str) -> bool {
    word == "wsgate" || word.starts_with("wsgate::")
}

/// The level `word` is most likely a misspelling of: one or two letters
/// off (`debugg`, `inf`), or a longer form of it (`warning`, `errors`).
fn near_level(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    LEVELS
        .into_iter()
        .map(|level| (super::suggest::distance(&word, level), level))
        .filter(|(d, level)| *d <= 2 || word.starts_with(level))
        .min_by_key(|(d, _)| *d)
        .map(|(_, level)| level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_directives_are_accepted() {
        for ok in [
            "info",
            "INFO",
            " warn ",
            "off",
            "info,wsgate::access=off",
            "warn,hyper=debug,wsgate=trace",
            "wsgate",
            "wsgate::access",
            "debug,",
            "wsgate[session]=debug",
        ] {
            assert!(log_filter(ok).is_ok(), "{ok}: {:?}", log_filter(ok).err());
            assert!(LogLevel::check(&ok.to_owned()).is_some(), "{ok}");
        }
    }

    #[test]
    fn a_filter_that_would_silence_the_log_is_refused_and_says_why() {
        for (bad, says) in [
            ("debugg", "did you mean debug?"),
            ("inf", "did you mean info?"),
            ("warning", "did you mean warn?"),
            ("Errors", "did you mean error?"),
            ("verbose", "neither a level"),
            ("info,hyper", "hyper is neither"),
            ("wsgate=verbose", "cannot be read"),
            ("", "no directive"),
            (" , ", "no directive"),
        ] {
            let e = log_filter(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
            assert!(LogLevel::check(&bad.to_owned()).is_none(), "{bad}");
        }
    }
}
