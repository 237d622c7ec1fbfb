//! Logging: `text` for humans, `json` for collectors: one object a line with `timestamp`,
//! `level`, `message`, the event's fields and the fields of every enclosing span (so a
//! task's lines carry `task_id`, `kind` and `run_id` at top level). `RUST_LOG` overrides
//! the default level (info).

use std::cell::RefCell;
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

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| Stderr)
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
        let _ = Stderr.write_all(text.as_bytes());
    }
}

thread_local! {
    /// While [`batched`] runs on this thread: the log bytes not yet written.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Stderr, or the current [`batched`] buffer. Each log line is written whole.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH.with(|b| b.borrow_mut().as_mut().map(|v| v.extend_from_slice(buf)).is_some());
        if batched {
            Ok(buf.len())
        } else {
            std::io::stderr().lock().write_all(buf).map(|()| buf.len())
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Runs `f` (synchronous, so nothing else logs on this thread meanwhile) with the log
/// lines it emits collected and written to stderr in one go: a worker flooding its
/// output costs one write per read instead of one per line.
pub fn batched<R>(f: impl FnOnce() -> R) -> R {
    /// Writes the batch out even if `f` panics, so later lines are never held back.
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            if let Some(bytes) = BATCH.with(|b| b.borrow_mut().take()) {
                let _ = std::io::stderr().lock().write_all(&bytes);
            }
        }
    }
    BATCH.with(|b| *b.borrow_mut() = Some(Vec::with_capacity(128 * 1024)));
    let _flush = Flush;
    f()
}
