//! Bounded capture of a worker's combined stdout+stderr.
//!
//! Every line goes to the log as it arrives; memory keeps only the first and last halves
//! of `limit` bytes (with a marker for what was dropped between them) and the last few
//! lines for the status page. Long lines without a newline are split at [`MAX_LINE`];
//! invalid UTF-8 is replaced, never fatal. Memory does not grow with the output.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::AsyncReadExt;

use crate::telemetry::WorkerLog;

/// A line longer than this is logged in pieces.
pub const MAX_LINE: usize = 16 * 1024;
/// Lines kept for the status page, each cut to [`RECENT_LINE_CHARS`].
pub const RECENT_LINES: usize = 10;
const RECENT_LINE_CHARS: usize = 240;
const READ_CHUNK: usize = 64 * 1024;

/// The last lines of a running task, shared with the status page.
#[derive(Debug, Clone, Default)]
pub struct RecentLines(Arc<Mutex<VecDeque<String>>>);

impl RecentLines {
    fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == RECENT_LINES {
            lines.pop_front();
        }
        lines.push_back(line.chars().take(RECENT_LINE_CHARS).collect());
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }
}

/// Head and tail of the output, within `limit` bytes.
#[derive(Debug)]
pub struct Captured {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_cap: usize,
    tail_cap: usize,
    /// Bytes dropped from memory (they still went to the log).
    pub dropped: u64,
    pub total: u64,
}

impl Captured {
    pub fn new(limit: usize) -> Captured {
        let head_cap = limit / 2;
        Captured { head: Vec::new(), tail: VecDeque::new(), head_cap, tail_cap: limit - head_cap, dropped: 0, total: 0 }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.head_cap - self.head.len();
        if room > 0 {
            let n = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        if bytes.len() >= self.tail_cap {
            self.dropped += (self.tail.len() + bytes.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_cap..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_cap);
        self.tail.drain(..overflow);
        self.dropped += overflow as u64;
        self.tail.extend(bytes);
    }

    /// Writes head, `[... N bytes omitted ...]` if anything was dropped, and tail, as
    /// bytes (as the original printed them), ending with a newline; no copy is made.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(&self.head)?;
        let mut last = self.head.last().copied();
        if self.dropped > 0 {
            if last.is_some_and(|b| b != b'\n') {
                out.write_all(b"\n")?;
            }
            writeln!(out, "[... {} bytes omitted ...]", self.dropped)?;
            last = Some(b'\n');
        }
        let (a, b) = self.tail.as_slices();
        out.write_all(a)?;
        out.write_all(b)?;
        last = b.last().or(a.last()).copied().or(last);
        if last.is_some_and(|b| b != b'\n') {
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// [`Captured::write_to`] as text, invalid UTF-8 replaced.
    pub fn render(&self) -> String {
        let mut bytes = Vec::with_capacity(self.held() + 64);
        self.write_to(&mut bytes).expect("writing to memory cannot fail");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes held in memory.
    pub fn held(&self) -> usize {
        self.head.len() + self.tail.len()
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Calls `emit` for each complete line (without its `\n`) in `bytes`.
    pub fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.flush_with(&window[..i], &mut emit);
                    bytes = &bytes[i + 1..];
                }
                None if window.len() == room => {
                    self.flush_with(window, &mut emit);
                    bytes = &bytes[room..];
                }
                None => {
                    self.partial.extend_from_slice(window);
                    bytes = &[];
                }
            }
        }
    }

    fn flush_with(&mut self, rest: &[u8], emit: &mut impl FnMut(&[u8])) {
        if self.partial.is_empty() {
            emit(rest);
        } else {
            self.partial.extend_from_slice(rest);
            emit(&self.partial);
            self.partial.clear();
        }
    }

    /// Emits what is left after the stream ended without a final newline.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

/// Reads `reader` to its end: each line to the log (stream="worker"), the bytes into a
/// bounded [`Captured`], the last lines into `recent`. Ends at EOF, on a read error, or
/// when `stop` is cancelled (a process outside the task still holds the pipe).
pub async fn capture<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    limit: usize,
    recent: RecentLines,
    mut log: WorkerLog,
    stop: tokio_util::sync::CancellationToken,
) -> Captured {
    let mut captured = Captured::new(limit);
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buf) => read,
            _ = stop.cancelled() => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                captured.push(&buf[..n]);
                // Only the last lines of a read can end up on the status page.
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                let mut skip = lines.saturating_sub(RECENT_LINES);
                log.begin();
                splitter.push(&buf[..n], |line| {
                    let shown = skip == 0;
                    skip = skip.saturating_sub(1);
                    log_line(&mut log, line, shown.then_some(&recent));
                });
                log.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading worker output failed");
                break;
            }
        }
    }
    log.begin();
    splitter.finish(|line| log_line(&mut log, line, Some(&recent)));
    log.flush();
    captured
}

/// One worker line to the log, and to the status page's recent lines if given.
fn log_line(log: &mut WorkerLog, line: &[u8], recent: Option<&RecentLines>) {
    let text = String::from_utf8_lossy(line);
    log.line(&text);
    if let Some(recent) = recent {
        recent.push(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_head_and_tail_with_a_marker() {
        let mut c = Captured::new(10);
        c.push(b"0123456789abcdefghij");
        assert_eq!(c.dropped, 10);
        assert_eq!(c.render(), "01234\n[... 10 bytes omitted ...]\nfghij\n");
        let mut small = Captured::new(100);
        small.push(b"hello\n");
        assert_eq!(small.render(), "hello\n");
    }

    #[test]
    fn splits_long_lines_and_keeps_partials() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        s.push(b"ab", |l| lines.push(l.to_vec()));
        s.push(b"c\nd", |l| lines.push(l.to_vec()));
        s.push(&vec![b'x'; MAX_LINE * 2 + 5], |l| lines.push(l.to_vec()));
        s.finish(|l| lines.push(l.to_vec()));
        assert_eq!(lines[0], b"abc");
        assert_eq!(lines[1].len(), MAX_LINE);
        assert!(lines[1].starts_with(b"d"));
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3].len(), 6);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        let input: &[u8] = b"ok\n\xff\xfe bad\n";
        let recent = RecentLines::default();
        let log = WorkerLog::new("CaptureSkps.1", "CaptureSkps", "u-1");
        let c = capture(input, 1024, recent.clone(), log, Default::default()).await;
        assert_eq!(recent.snapshot(), vec!["ok".to_string(), "\u{fffd}\u{fffd} bad".to_string()]);
        assert_eq!(c.total, input.len() as u64);
    }

    proptest! {
        #[test]
        fn capture_stays_within_its_limit(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40), limit in 2usize..500) {
            let mut c = Captured::new(limit);
            let mut all = Vec::new();
            for chunk in &chunks {
                c.push(chunk);
                all.extend_from_slice(chunk);
                prop_assert!(c.held() <= limit);
            }
            prop_assert_eq!(c.total, all.len() as u64);
            prop_assert_eq!(c.dropped as usize + c.held(), all.len());
            let head_len = (limit / 2).min(all.len());
            prop_assert_eq!(&c.head[..], &all[..head_len]);
            let tail: Vec<u8> = c.tail.iter().copied().collect();
            prop_assert!(all.ends_with(&tail));
        }

        #[test]
        fn splitter_reassembles_the_stream(data in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..2000), cut in 0usize..2000) {
            let mut s = LineSplitter::default();
            let mut out = Vec::new();
            let cut = cut.min(data.len());
            for part in [&data[..cut], &data[cut..]] {
                s.push(part, |l| { out.extend_from_slice(l); out.push(b'\n'); });
            }
            s.finish(|l| { out.extend_from_slice(l); out.push(b'\n'); });
            let expected: Vec<u8> = data.iter().copied().filter(|&b| b != b'\n').collect();
            let got: Vec<u8> = out.iter().copied().filter(|&b| b != b'\n').collect();
            prop_assert_eq!(got, expected);
        }
    }
}
