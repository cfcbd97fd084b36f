//! How log lines are written, for less CPU than tracing-subscriber's
//! defaults and the same text. [`dispatch`] is the subscriber `main`
//! installs (and tests build), made of:
//! - [`PlainLine`]: a text line when the output is not a terminal, the
//!   default `Full` format's `<time> <level> <target>: <fields>` built in
//!   one `String` without `fmt` (events in a span and `log` records are
//!   left to `Full`);
//! - [`PlainFields`]: the fields of such a line, `name=value` pairs as the
//!   default writes them without colours;
//! - [`JsonLine`]: a JSON line (`log_format = "json"`), tracing-subscriber's
//!   flattened `Json` object built in one `String` without `serde_json`;
//! - [`Timestamp`]: the RFC 3339 time (microseconds, UTC) every line starts
//!   with, its date and time of day formatted once per second, not per line.
//!
//! Why: the access log (docs/operations.md#access-log) writes a 14-field record per session, and
//! the default field formatter styles every field name (`nu_ansi_term`
//! italic and dimmed) even when colours are off, which was about a third of
//! the record's cost per upgrade; the default event formatter paints the
//! level and target the same way, and every piece of a line was a call
//! through `fmt::Write`. On a terminal the default, coloured formatters are
//! kept.
//!
//! The output is the default's: fields separated by one space, `message`
//! first as its text, every other value as its `Debug` form (strings
//! quoted and escaped), `%`-fields as their `Display` form, a raw
//! identifier without its `r#`. As in the default, the characters of a
//! message that could drive a terminal (ESC, BEL, ...) are escaped.
//! A line is appended to a `String` kept per thread and handed to the
//! writer in one write, not written piece by piece through `fmt::Write`;
//! strings of plain printable ASCII, integers and booleans skip the `fmt`
//! machinery.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod json;

pub use self::json::JsonLine;

/// The subscriber wsgate logs through (`main` installs it): lines in
/// `format`, those `filter` lets through, written to `writer`, coloured
/// when `ansi` (stderr is a terminal). Tests build the same one.
pub fn dispatch<W>(format: LogFormat, filter: EnvFilter, ansi: bool, writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_timer(Timestamp)
        .with_ansi(ansi);
    match format {
        LogFormat::Text if ansi => builder.finish().into(),
        // The same text without the cost of styling every field name.
        LogFormat::Text => builder
            .fmt_fields(PlainFields)
            .event_format(PlainLine::default())
            .finish()
            .into(),
        // Fields at the top level of each object (not under "fields"), so
        // `jq '.close_code'` reads the access log (docs/operations.md#access-log) as it is:
        // `Json` flattened, without spans, as `JsonLine` writes it.
        LogFormat::Json => builder
            .json()
            .event_format(JsonLine::default())
            .finish()
            .into(),
    }
}

/// The plain field formatter (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        with_line(|line| {
            let mut visitor = Visitor::new(line);
            fields.record(&mut visitor);
            visitor.result?;
            writer.write_str(line)
        })
    }
}

/// The text line when the output is not a terminal: what
/// tracing-subscriber's default `Full` format writes with [`Timestamp`]
/// and [`PlainFields`] (`<time> <level> <target>: <fields>`), built in one
/// `String` without `fmt`: the level and the target are written as they
/// are, not painted with an empty style through `write!`.
///
/// Events in a span and `log` records (whose level and target tracing-log
/// rewrites) are left to `Full` itself.
#[derive(Debug)]
pub struct PlainLine {
    full: Format<Full, Timestamp>,
}

impl Default for PlainLine {
    fn default() -> Self {
        PlainLine {
            full: Format::default().with_timer(Timestamp),
        }
    }
}

impl<S> FormatEvent<S, PlainFields> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, PlainFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Colours (not set where this formatter is used), a `log` record,
        // spans: the default's own way.
        if writer.has_ansi_escapes() || meta.target() == "log" || ctx.event_scope().is_some() {
            return self.full.format_event(ctx, writer, event);
        }
        with_line(|line| {
            if write_time(line).is_err() {
                line.push_str("<unknown time>");
            }
            line.push(' ');
            // `Full`'s level: padded to five, no colour.
            line.push_str(match *meta.level() {
                Level::TRACE => "TRACE",
                Level::DEBUG => "DEBUG",
                Level::INFO => " INFO",
                Level::WARN => " WARN",
                Level::ERROR => "ERROR",
            });
            line.push(' ');
            line.push_str(meta.target());
            line.push_str(": ");
            let mut visitor = Visitor::new(line);
            event.record(&mut visitor);
            visitor.result?;
            line.push('\n');
            writer.write_str(line)
        })
    }
}

thread_local! {
    /// The text being formatted on this thread, kept from line to line so
    /// that a line costs no allocation.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The most of [`LINE`]'s capacity kept after a line (one huge line must
/// not hold its memory for the thread's life).
const LINE_KEPT: usize = 16 * 1024;

/// Runs `format` on this thread's line text, empty. A line formatted while
/// another is (a field's `Debug` that logs) gets a `String` of its own.
fn with_line(format: impl FnOnce(&mut String) -> fmt::Result) -> fmt::Result {
    LINE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            let result = format(&mut line);
            if line.capacity() > LINE_KEPT {
                *line = String::new();
            }
            result
        }
        Err(_) => format(&mut String::new()),
    })
}

/// Appends one event's fields to a line: each write is a `String` append,
/// not a call through `fmt::Write`.
struct Visitor<'line> {
    line: &'line mut String,
    first: bool,
    /// A `Debug` or `Display` implementation's error, if one failed.
    result: fmt::Result,
}

impl<'line> Visitor<'line> {
    fn new(line: &'line mut String) -> Self {
        Visitor {
            line,
            first: true,
            result: Ok(()),
        }
    }

    /// The separator before every field but the first, then `name=`;
    /// whether the field is the message (written without its name).
    #[inline(always)]
    fn start(&mut self, field: &Field) -> bool {
        if self.first {
            self.first = false;
        } else {
            self.line.push(' ');
        }
        let name = field.name();
        if name == "message" {
            return true;
        }
        self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.line.push('=');
        false
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if self.start(field) {
            push_escaped(self.line, value);
        } else if value.bytes().all(|b| QUOTED_AS_IT_IS[usize::from(b)]) {
            // What `Debug` would write, without its per-character escaping.
            self.line.push('"');
            self.line.push_str(value);
            self.line.push('"');
        } else {
            self.result = write!(self.line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.start(field);
        push_u64(self.line, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_err() {
            return;
        }
        self.start(field);
        if value < 0 {
            self.line.push('-');
        }
        push_u64(self.line, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_err() {
            return;
        }
        self.start(field);
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = if self.start(field) {
            // A message is `format_args!`: its Debug form is its text.
            write!(Escaping(self.line, push_escaped), "{value:?}")
        } else {
            write!(self.line, "{value:?}")
        };
    }
}

/// The bytes `Debug` writes as they are inside a string's quotes, and
/// that cannot start a character it would escape: printable ASCII but `"`
/// and `\`. (A table: a lookup per byte costs less than the comparisons.)
static QUOTED_AS_IT_IS: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = b' ';
    while byte <= b'~' {
        table[byte as usize] = byte != b'"' && byte != b'\\';
        byte += 1;
    }
    table
};

/// Appends `text` with the characters that can drive a terminal escaped,
/// as the default formatter escapes a message: ESC, BEL, BS, FF, DEL as
/// `\xNN`, C1 controls as `\u{NN}`.
fn push_escaped(line: &mut String, text: &str) {
    // None of those bytes, nor the first byte of a C1 control's UTF-8: as it is.
    if !text.bytes().any(|b| TERMINAL_BYTES[usize::from(b)]) {
        line.push_str(text);
        return;
    }
    let mut rest = text;
    while let Some((at, ch)) = rest.char_indices().find(|&(_, c)| drives_a_terminal(c)) {
        line.push_str(&rest[..at]);
        line.push_str(if ('\u{80}'..='\u{9f}').contains(&ch) {
            "\\u{"
        } else {
            "\\x"
        });
        // All below 0x100: two digits.
        let code = u32::from(ch);
        line.push(hex_digit(code >> 4));
        line.push(hex_digit(code));
        if ch > '\u{7f}' {
            line.push('}');
        }
        rest = &rest[at + ch.len_utf8()..];
    }
    line.push_str(rest);
}

/// The lowercase hex digit of `n`'s low four bits.
fn hex_digit(n: u32) -> char {
    char::from(b"0123456789abcdef"[(n & 0xf) as usize])
}

/// ESC, BEL, BS, FF, DEL, and 0xC2 (which starts every C1 control's
/// UTF-8, and other characters): the bytes [`push_escaped`] looks closer at.
static TERMINAL_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    let bytes = [0x1b, 0x07, 0x08, 0x0c, 0x7f, 0xc2];
    while i < bytes.len() {
        table[bytes[i]] = true;
        i += 1;
    }
    table
};

/// Writes through to a line, every piece escaped by the function it holds
/// (this format's [`push_escaped`], or JSON's).
struct Escaping<'a>(&'a mut String, fn(&mut String, &str));

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        (self.1)(self.0, text);
        Ok(())
    }
}

/// ESC, BEL, BS, FF, DEL and the C1 controls.
fn drives_a_terminal(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// Appends `n` in decimal, without `fmt`.
#[inline]
fn push_u64(line: &mut String, n: u64) {
    if n < 10 {
        line.push(digit(n));
    } else {
        push_digits(line, n);
    }
}

/// `push_u64` of two digits or more.
fn push_digits(line: &mut String, mut n: u64) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while n > 0 {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    for &d in &digits[start..] {
        line.push(char::from(d));
    }
}

/// The last decimal digit of `n`.
fn digit(n: u64) -> char {
    // `n % 10` < 10: the cast cannot truncate.
    char::from(b'0' + (n % 10) as u8)
}

/// The time at the start of every line, as tracing-subscriber's default
/// writes it (`2026-12-06T02:35:41.154937Z`), with the part up to the
/// second kept per thread and formatted again only when the second changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamp;

thread_local! {
    /// The last second formatted on this thread, and its text with the dot.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w)
    }
}

/// Writes the time as [`Timestamp`] does, to a line or a [`Writer`].
fn write_time(out: &mut impl fmt::Write) -> fmt::Result {
    let Ok(since) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        // A clock before 1970: leave it to the default formatter.
        return tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(out));
    };
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            write_second(&mut cached.1, secs)?;
            cached.0 = secs;
        }
        out.write_str(&cached.1)
    })?;
    let micros = u64::from(since.subsec_micros());
    for power in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.write_char(digit(micros / power))?;
    }
    out.write_char('Z')
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` since the Unix epoch (UTC).
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::EnvFilter;

    use super::{PlainFields, Timestamp};
    use crate::config::LogFormat;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    pub(super) struct Sink(pub(super) Arc<Mutex<Vec<u8>>>);

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        /// Everything written so far, as text.
        pub(super) fn text(&self) -> String {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            String::from_utf8(bytes).expect("utf-8")
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// What `emit` logs, through a subscriber with the given field
    /// formatter (plain or tracing-subscriber's default), without the
    /// timestamp.
    fn line(plain: bool, emit: fn()) -> String {
        let sink = Sink::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(sink.clone())
            .with_ansi(false)
            .without_time();
        if plain {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        sink.text()
    }

    /// Events of every kind of field, message and escape.
    pub(super) const CASES: [fn(); 8] = [
        || {
            tracing::info!(
                target: "wsgate::access",
                session = %format_args!("{:016x}", 0xabc_u64),
                client = %std::net::IpAddr::from([127, 0, 0, 1]),
                path = "/a b\"c\\d",
                subprotocol = "",
                duration_ms = 12_u64,
                close_code = 1000_u16,
                signed = -3_i64,
                min = i64::MIN,
                flag = true,
                ratio = 0.5_f64,
                close_reason = "tab\there \u{7f} é",
                "session"
            );
        },
        || tracing::warn!("reload: {} changes only take effect after a restart", "x"),
        || tracing::info!(addr = %"127.0.0.1:1", "proxy listening"),
        || tracing::info!(r#type = "raw", "identifier"),
        || tracing::info!(error = ?std::io::Error::other("boom"), "debug field"),
        || tracing::info!(only = 1_u64),
        || {
            tracing::info!(
                "bell\x07 bs\x08 ff\x0c del\x7f c1\u{85} esc\x1b[0m {}",
                "\x1b"
            )
        },
        || tracing::info!(message = "a &str \x1b message", quiet = false),
    ];

    #[test]
    fn writes_what_the_default_writes_without_colours() {
        for emit in CASES {
            let (plain, default) = (line(true, emit), line(false, emit));
            assert_eq!(plain, default);
            assert!(plain.ends_with('\n') && plain.len() > 10, "{plain}");
        }
    }

    /// What `emit` logs through the text subscriber wsgate installs when
    /// stderr is not a terminal (`ours`), or through the default `Full`
    /// format with [`Timestamp`] and [`PlainFields`], with every line's
    /// timestamp replaced by `<time>`.
    fn text_line(ours: bool, emit: fn()) -> String {
        let sink = Sink::default();
        let filter = || EnvFilter::new("trace");
        if ours {
            let dispatch = super::dispatch(LogFormat::Text, filter(), false, sink.clone());
            tracing::dispatcher::with_default(&dispatch, emit);
        } else {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(sink.clone())
                .with_timer(Timestamp)
                .with_ansi(false)
                .fmt_fields(PlainFields)
                .finish();
            tracing::subscriber::with_default(subscriber, emit);
        }
        let text = sink.text();
        // A line is a record or, after a raw newline in a value, the rest
        // of one.
        let shape = b"0000-00-00T00:00:00.000000Z ";
        let stamped = |l: &str| {
            l.len() > shape.len()
                && l.bytes().zip(shape).all(|(b, &s)| {
                    if s == b'0' {
                        b.is_ascii_digit()
                    } else {
                        b == s
                    }
                })
        };
        assert!(stamped(&text), "no timestamp: {text:?}");
        text.split_inclusive('\n')
            .map(|l| {
                if stamped(l) {
                    format!("<time>{}", &l[shape.len() - 1..])
                } else {
                    l.to_owned()
                }
            })
            .collect()
    }

    #[test]
    fn plain_line_is_what_the_default_event_format_writes() {
        let more: [fn(); 10] = [
            || tracing::trace!(n = 1_u64, "trace"),
            || tracing::debug!(n = 2_u64, "debug"),
            || tracing::warn!(n = 3_u64, "warn"),
            || tracing::error!(n = 4_u64, "error"),
            || tracing::info!(target: "wsgate::access", n = 5_u64),
            // No field recorded at all.
            || tracing::info!(empty = tracing::field::Empty),
            // Left to the default: in a span, and a `log` record's target.
            || {
                let _span = tracing::info_span!("conn", id = 7_u64).entered();
                tracing::info!(x = 1_u64, "inside");
            },
            || tracing::info!(target: "log", "like a log record"),
            || tracing::info!(parent: None, "no parent"),
            || {
                let every: String = (0..0x80_u8)
                    .map(char::from)
                    .chain(['é', '\u{85}', '\u{a0}', '€'])
                    .collect();
                tracing::info!(every = every.as_str(), debug = ?every, shown = %every, "{every}");
            },
        ];
        for emit in CASES.into_iter().chain(more) {
            let (ours, full) = (text_line(true, emit), text_line(false, emit));
            assert_eq!(ours, full);
            assert!(
                ours.starts_with("<time> ") && ours.ends_with('\n'),
                "{ours}"
            );
        }
    }

    #[test]
    fn dates_and_times_of_day_are_the_calendar_s() {
        let second = |secs| {
            let mut s = String::new();
            super::write_second(&mut s, secs).expect("format");
            s
        };
        assert_eq!(second(0), "1970-01-01T00:00:00.");
        assert_eq!(second(951_782_399), "2000-02-28T23:59:59.");
        assert_eq!(second(951_782_400), "2000-02-29T00:00:00.");
        assert_eq!(second(4_107_542_400), "2100-03-01T00:00:00.");
        assert_eq!(second(1_798_761_599), "2026-12-31T23:59:59.");
        assert_eq!(second(1_709_210_096), "2024-02-29T12:34:56.");
    }

    #[test]
    fn the_timestamp_is_the_default_s_to_the_second() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        // Retried when a second boundary falls between the two readings.
        for _ in 0..5 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            super::Timestamp
                .format_time(&mut Writer::new(&mut ours))
                .expect("format");
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .expect("format");
            assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..20] == theirs[..20] {
                return;
            }
        }
        panic!("the second never matched the default formatter's");
    }

    /// A line logged while another is formatted (a field's `Debug` that
    /// logs, through the global subscriber) is built in a `String` of its
    /// own, not in the one in use.
    #[test]
    fn a_line_inside_another_has_its_own_text() {
        let outer = super::with_line(|line| {
            line.push_str("outer");
            super::with_line(|inner| {
                assert_eq!(inner, "");
                inner.push_str("inner");
                Ok(())
            })?;
            assert_eq!(line, "outer");
            Ok(())
        });
        assert_eq!(outer, Ok(()));
        super::with_line(|line| {
            assert_eq!(line, "", "the text of the last line is cleared");
            Ok(())
        })
        .expect("format");
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 1000, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut line = String::new();
            super::push_u64(&mut line, n);
            assert_eq!(line, n.to_string());
        }
    }

    #[test]
    fn an_escape_in_a_message_cannot_reach_the_terminal() {
        let text = line(true, || tracing::info!("a\x1b[31mred\x1b"));
        assert!(text.contains("a\\x1b[31mred\\x1b"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }
}
