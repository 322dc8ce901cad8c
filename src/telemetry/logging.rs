//! The process's log: text or JSON lines on stderr, level from `RUST_LOG`
//! (default `info`).
//!
//! Lines are formatted on the thread that logs, once, then handed to a
//! writer thread through a bounded channel; that thread writes them in
//! batches (a 64 KiB buffer flushed whenever the channel is empty). So a
//! request never waits for stderr: a slow terminal or a stalled log
//! collector costs log lines, never requests. Lines dropped because the
//! channel was full are counted (`qbproxy_log_lines_dropped_total`).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Lines the channel holds before new ones are dropped: a burst of about
/// a third of a second of access lines at 50,000 requests/s. Its slots
/// are allocated (and touched) up front, 32 bytes each, so this is 512 KiB
/// of resident memory; tracing-appender's default, 128 Ki lines, was 4 MiB.
const BUFFERED_LINES: usize = 16 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber. Keep the guard until the process ends:
/// dropping it writes out what is still buffered.
pub fn init(format: Format) -> WorkerGuard {
    let stderr = std::io::stderr();
    let ansi = stderr.is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("qbproxy-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, stderr));
    let _ = DROPPED.set(writer.error_counter());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// Log lines dropped so far because the writer fell behind (0 when the
/// log was not set up by [`init`], as in tests).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
