//! How the fields of a text log line are written when the output is not a
//! terminal: `name=value` pairs, the same text tracing-subscriber's default
//! writes without colours, for less CPU.
//!
//! Why: the access log (SPEC §12) writes a 14-field record per session, and
//! the default field formatter styles every field name (`nu_ansi_term`
//! italic and dimmed) even when colours are off, which was about a third of
//! the record's cost per upgrade. On a terminal the default, coloured
//! formatter is kept.
//!
//! The output is the default's: fields separated by one space, `message`
//! first as its text, every other value as its `Debug` form (strings
//! quoted and escaped), `%`-fields as their `Display` form, a raw
//! identifier without its `r#`. As in the default, the characters of a
//! message that could drive a terminal (ESC, BEL, ...) are escaped.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The plain field formatter (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes one event's fields.
struct Visitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// The separator before every field but the first, then `name=`.
    fn start(&mut self, field: &Field) -> fmt::Result {
        if self.first {
            self.first = false;
        } else {
            self.writer.write_char(' ')?;
        }
        let name = field.name();
        if name == "message" {
            return Ok(());
        }
        self.writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.writer.write_char('=')
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                Escaping(&mut self.writer).write_str(value)
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .start(field)
            .and_then(|()| write!(self.writer, "{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                // A message is `format_args!`: its Debug form is its text.
                write!(Escaping(&mut self.writer), "{value:?}")
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }
}

/// Writes through to the line with the characters that can drive a
/// terminal escaped, as the default formatter escapes a message: ESC, BEL,
/// BS, FF, DEL as `\xNN`, C1 controls as `\u{NN}`.
struct Escaping<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some((at, ch)) = rest.char_indices().find(|&(_, c)| drives_a_terminal(c)) {
            self.0.write_str(&rest[..at])?;
            match ch {
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(ch))?,
                _ => write!(self.0, "\\x{:02x}", u32::from(ch))?,
            }
            rest = &rest[at + ch.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// ESC, BEL, BS, FF, DEL and the C1 controls.
fn drives_a_terminal(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::MakeWriter;

    use super::PlainFields;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

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
        let bytes = sink
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn writes_what_the_default_writes_without_colours() {
        let cases: [fn(); 7] = [
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
        ];
        for emit in cases {
            let (plain, default) = (line(true, emit), line(false, emit));
            assert_eq!(plain, default);
            assert!(plain.ends_with('\n') && plain.len() > 10, "{plain}");
        }
    }

    #[test]
    fn an_escape_in_a_message_cannot_reach_the_terminal() {
        let text = line(true, || tracing::info!("a\x1b[31mred\x1b"));
        assert!(text.contains("a\\x1b[31mred\\x1b"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }
}
