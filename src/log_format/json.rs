//! The JSON line ([`JsonLine`]): what tracing-subscriber's `Json` format
//! writes as wsgate configures it (fields flattened into the object, no
//! span), built in the per-thread line `String` instead of through
//! `serde_json`.
//!
//! Why: `Json` formats the timestamp into a `String` of its own, builds a
//! `serde_json` serializer over an `io::Write` adaptor of the line (every
//! piece checked as UTF-8 again), and writes every field through it; the
//! access log's record cost about 24,000 instructions that way, a quarter
//! of an upgrade's, against under 5,000 here.
//!
//! The object is `Json`'s, key for key: `timestamp`, `level`, the event's
//! fields in order (booleans and integers as JSON numbers and literals,
//! floats as `serde_json` writes them, every other value as the string of
//! its `Debug` form, `%`-fields of their `Display` form), then `target`.
//! Strings are escaped as `serde_json` escapes them: `"` and `\`, the
//! controls below U+0020 (`\b \t \n \f \r` by name, the others as
//! `\u00XX`), nothing else. A `log` record (whose level and target
//! tracing-log rewrites) is left to `Json` itself.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::{push_u64, with_line, write_time, Escaping, Timestamp};

/// The JSON line (see the module documentation).
#[derive(Debug)]
pub struct JsonLine {
    json: Format<Json, Timestamp>,
}

impl Default for JsonLine {
    fn default() -> Self {
        JsonLine {
            json: Format::default()
                .with_timer(Timestamp)
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() == "log" {
            return self.json.format_event(ctx, writer, event);
        }
        with_line(|line| {
            // The time has nothing to escape.
            line.push_str("{\"timestamp\":\"");
            write_time(line)?;
            line.push_str("\",\"level\":\"");
            line.push_str(match *meta.level() {
                Level::TRACE => "TRACE",
                Level::DEBUG => "DEBUG",
                Level::INFO => "INFO",
                Level::WARN => "WARN",
                Level::ERROR => "ERROR",
            });
            line.push('"');
            let mut visitor = Visitor {
                line: &mut *line,
                result: Ok(()),
            };
            event.record(&mut visitor);
            visitor.result?;
            line.push_str(",\"target\":");
            push_str(line, meta.target());
            line.push_str("}\n");
            writer.write_str(line)
        })
    }
}

/// Appends one event's fields as `,"name":value`, each value as
/// tracing-serde's map visitor serializes it.
struct Visitor<'line> {
    line: &'line mut String,
    /// A `Debug` or `Display` implementation's error, if one failed (the
    /// line is then not written, as `Json` writes none).
    result: fmt::Result,
}

impl Visitor<'_> {
    /// `,"name":`; whether to go on (no error so far).
    #[inline(always)]
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        self.line.push(',');
        push_str(self.line, field.name());
        self.line.push(':');
        true
    }
}

impl Visit for Visitor<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            push_u64(self.line, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            if value < 0 {
                self.line.push('-');
            }
            push_u64(self.line, value.unsigned_abs());
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            // Shortest round-trip digits, `null` for NaN and infinities:
            // `serde_json`'s own, rare enough to pay its `String`.
            match serde_json::to_string(&value) {
                Ok(number) => self.line.push_str(&number),
                Err(_) => self.result = Err(fmt::Error),
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            push_str(self.line, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.line.push('"');
            self.result = write!(Escaping(self.line, push_escaped), "{value:?}");
            self.line.push('"');
        }
    }
}

/// Appends `text` as a JSON string, quoted and escaped.
#[inline(always)]
fn push_str(line: &mut String, text: &str) {
    line.push('"');
    if text.bytes().all(|b| !escaped(b)) {
        line.push_str(text);
    } else {
        push_escaped(line, text);
    }
    line.push('"');
}

/// Appends `text` escaped as `serde_json` escapes a string's contents.
fn push_escaped(line: &mut String, mut text: &str) {
    while let Some(at) = text.bytes().position(escaped) {
        // An ASCII byte's position: a character boundary.
        let (plain, rest) = text.split_at(at);
        line.push_str(plain);
        let byte = rest.as_bytes()[0];
        match byte {
            b'"' => line.push_str("\\\""),
            b'\\' => line.push_str("\\\\"),
            0x08 => line.push_str("\\b"),
            b'\t' => line.push_str("\\t"),
            b'\n' => line.push_str("\\n"),
            0x0c => line.push_str("\\f"),
            b'\r' => line.push_str("\\r"),
            _ => {
                line.push_str("\\u00");
                for nibble in [byte >> 4, byte & 0xf] {
                    line.push(char::from(b"0123456789abcdef"[usize::from(nibble)]));
                }
            }
        }
        text = &rest[1..];
    }
    line.push_str(text);
}

/// Whether `serde_json` escapes `byte` in a string: `"`, `\`, the
/// controls below 0x20.
fn escaped(byte: u8) -> bool {
    ESCAPED[usize::from(byte)]
}

/// [`escaped`] of every byte value.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = byte < 0x20 || byte == b'"' as usize || byte == b'\\' as usize;
        byte += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use tracing_subscriber::EnvFilter;

    use super::super::tests::{Sink, CASES};
    use super::super::{dispatch, Timestamp};
    use crate::config::LogFormat;

    /// What `emit` logs through the JSON subscriber wsgate installs
    /// (`ours`), or through tracing-subscriber's `Json` format as wsgate
    /// configured it before [`super::JsonLine`], with every line's
    /// timestamp replaced by `<time>`.
    fn json_line(ours: bool, emit: fn()) -> String {
        let sink = Sink::default();
        let filter = || EnvFilter::new("trace");
        if ours {
            let dispatch = dispatch(LogFormat::Json, filter(), false, sink.clone());
            tracing::dispatcher::with_default(&dispatch, emit);
        } else {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(sink.clone())
                .with_timer(Timestamp)
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish();
            tracing::subscriber::with_default(subscriber, emit);
        }
        let text = sink.text();
        let head = "{\"timestamp\":\"";
        text.split_inclusive('\n')
            .map(|l| {
                assert!(l.starts_with(head) && l.len() > head.len() + 27, "{l:?}");
                let time = &l[head.len()..head.len() + 27];
                assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{l:?}");
                format!("{head}<time>{}", &l[head.len() + 27..])
            })
            .collect()
    }

    #[test]
    fn json_line_is_what_the_json_format_writes() {
        let more: [fn(); 12] = [
            || tracing::trace!(n = 1_u64, "trace"),
            || tracing::debug!(n = -2_i64, "debug"),
            || tracing::warn!(n = 3_u64, "warn"),
            || tracing::error!(n = 4_u64, "error"),
            || {
                tracing::info!(
                    half = 0.5_f64,
                    one = 1.0_f64,
                    minus_zero = -0.0_f64,
                    big = 1e21_f64,
                    small = 1.5e-7_f64,
                    max = f64::MAX,
                    nan = f64::NAN,
                    inf = f64::INFINITY,
                    "floats"
                )
            },
            || {
                tracing::info!(
                    wide = u128::MAX,
                    negative = i128::MIN,
                    bytes = &b"a\x00\""[..]
                )
            },
            || {
                let error = std::io::Error::other("disk \"full\"");
                let outer = std::io::Error::new(std::io::ErrorKind::NotFound, error);
                tracing::info!(error = &outer as &(dyn std::error::Error + 'static));
            },
            || {
                let every: String = (0..0x80_u8)
                    .map(char::from)
                    .chain(['é', '\u{85}', '€'])
                    .collect();
                tracing::info!(every = every.as_str(), debug = ?every, shown = %every, "{every}");
            },
            || tracing::info!("quoted \"name\"" = 1_u64, "a.b" = true, no = false),
            || tracing::info!(empty = tracing::field::Empty),
            || {
                let _span = tracing::info_span!("conn", id = 7_u64).entered();
                tracing::info!(x = 1_u64, "inside");
            },
            || tracing::info!(target: "log", "like a log record"),
        ];
        for emit in CASES.into_iter().chain(more) {
            let (ours, json) = (json_line(true, emit), json_line(false, emit));
            assert_eq!(ours, json);
            assert!(ours.ends_with("}\n"), "{ours}");
        }
    }
}
