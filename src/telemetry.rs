//! Logging: `text` for humans, `json` for collectors: one object a line with `timestamp`,
//! `level`, `message`, the event's fields and the fields of every enclosing span (so a
//! task's lines carry `task_id`, `kind` and `run_id` at top level). `RUST_LOG` overrides
//! the default level (info).

use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The format [`init`] installed; unset when nothing was installed (library tests).
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init()
            .map_err(|e| e.to_string()),
        LogFormat::Json => {
            tracing_subscriber::registry().with(filter).with(JsonLines).try_init().map_err(|e| e.to_string())
        }
    };
}

/// The JSON-lines layer. Span fields are kept in the span's extensions.
pub struct JsonLines;

#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JsonLines {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::from(event.metadata().level().as_str()));
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<Fields>() {
                    line.extend(fields.0.clone());
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        line.extend(fields.0);
        line.entry("message").or_insert(Value::from(""));
        line.insert("target".into(), Value::from(event.metadata().target()));
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Logs one task's worker output lines. A worker can print millions of lines, so they
/// bypass per-event formatting: each is written in the installed format with the task's
/// span fields (the same bytes a `tracing` event inside the task span would give, minus
/// ANSI colours), and the lines of one read go to stderr in one write. Without an
/// installed subscriber (library tests) each line is an ordinary `tracing` event.
pub struct WorkerLog {
    format: Option<LogFormat>,
    text_prefix: String,
    json_fields: String,
    timestamp: String,
    buf: Vec<u8>,
}

impl WorkerLog {
    pub fn new(task_id: &str, kind: &str, run_id: &str) -> WorkerLog {
        let format = FORMAT.get().copied().filter(|_| tracing::enabled!(tracing::Level::INFO));
        WorkerLog::with_format(format, task_id, kind, run_id)
    }

    fn with_format(format: Option<LogFormat>, task_id: &str, kind: &str, run_id: &str) -> WorkerLog {
        let quote = |s: &str| Value::from(s).to_string();
        WorkerLog {
            format,
            text_prefix: format!("task{{task_id={task_id} kind={kind:?} run_id={run_id:?}}}: "),
            json_fields: format!(
                r#""level":"INFO","task_id":{},"kind":{},"run_id":{},"stream":"worker","target":"ct_poller::output","message":"#,
                quote(task_id),
                quote(kind),
                quote(run_id)
            ),
            timestamp: String::new(),
            buf: Vec::new(),
        }
    }

    /// Starts a batch: its lines share one timestamp.
    pub fn begin(&mut self) {
        if self.format.is_some() {
            self.timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        }
    }

    pub fn line(&mut self, text: &str) {
        match self.format {
            None => tracing::info!(stream = "worker", "{text}"),
            Some(LogFormat::Text) => {
                self.buf.extend_from_slice(self.timestamp.as_bytes());
                self.buf.extend_from_slice(b"  INFO ");
                self.buf.extend_from_slice(self.text_prefix.as_bytes());
                if text.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    for c in text.chars() {
                        match c {
                            '\t' => self.buf.push(b'\t'),
                            c if c.is_ascii_control() => {
                                self.buf.extend_from_slice(c.escape_default().to_string().as_bytes())
                            }
                            c => self.buf.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                } else {
                    self.buf.extend_from_slice(text.as_bytes());
                }
                self.buf.extend_from_slice(b" stream=\"worker\"\n");
            }
            Some(LogFormat::Json) => {
                self.buf.extend_from_slice(b"{\"timestamp\":\"");
                self.buf.extend_from_slice(self.timestamp.as_bytes());
                self.buf.extend_from_slice(b"\",");
                self.buf.extend_from_slice(self.json_fields.as_bytes());
                let _ = serde_json::to_writer(&mut self.buf, text);
                self.buf.extend_from_slice(b"}\n");
            }
        }
    }

    /// Writes the batch's lines to stderr in one go.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = std::io::stderr().lock().write_all(&self.buf);
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(format: LogFormat, texts: &[&str]) -> String {
        let mut log = WorkerLog::with_format(Some(format), "LuaScript.7", "LuaScript", "u-20190115195438");
        log.begin();
        for text in texts {
            log.line(text);
        }
        let out = String::from_utf8(log.buf.clone()).unwrap();
        log.buf.clear();
        out
    }

    #[test]
    fn text_lines_look_like_tracing_events_and_escape_controls() {
        let out = lines(LogFormat::Text, &["hello\tworld", "bell\u{7}\u{1b}[31m"]);
        let mut rows = out.lines();
        let first = rows.next().unwrap();
        assert!(first.ends_with(
            r#"  INFO task{task_id=LuaScript.7 kind="LuaScript" run_id="u-20190115195438"}: hello	world stream="worker""#
        ));
        assert!(rows.next().unwrap().contains(r"bell\u{7}\u{1b}[31m stream"), "{out}");
    }

    #[test]
    fn json_lines_are_objects_with_the_task_fields() {
        let out = lines(LogFormat::Json, &["a \"quoted\" line", "\u{0}"]);
        let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["message"], "a \"quoted\" line");
        assert_eq!(rows[0]["task_id"], "LuaScript.7");
        assert_eq!(rows[0]["run_id"], "u-20190115195438");
        assert_eq!(rows[0]["stream"], "worker");
        assert_eq!(rows[1]["message"], "\u{0}");
        assert!(rows[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
