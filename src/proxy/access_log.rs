//! The access log: one event per request, written when its response body
//! is done (or dropped), on the `qbproxy::gateway::access` target, in the format of
//! the rest of the log (`--log-format`). It answers "who called what, as
//! whom, and how long did QuickBlox take": source address, API client,
//! identity (or pool member), method, canonical path, query with its values
//! masked, status, `QBProxy-Error` code, bytes in and out, total and
//! upstream time, and whether the request was replayed.
//!
//! `[log] access = false` turns it off (a reload applies at once); so does
//! `RUST_LOG=info,qbproxy::gateway::access=off`. What it costs is measured in
//! `bench/compare.sh`.
//!
//! Cheap by construction: a request gathers its facts in a [`Trace`] of
//! atomics on the handler's stack; the event is built from fields, each
//! formatted once, straight into the log line; the line goes to a
//! buffered writer off the request's thread (see `logging`).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;

use crate::net::body::CutFlag;
use crate::session::pool::Pool;
use crate::session::Identity;

/// The log target of access events.
pub const TARGET: &str = "qbproxy::gateway::access";

/// What a request learns about itself while it is served, for its access
/// event. Lives on the handler's stack; the forwarding code fills it in.
pub struct Trace {
    started: Instant,
    /// Time spent waiting for the upstream's response heads, all attempts.
    upstream_us: AtomicU64,
    replayed: AtomicBool,
    /// A buffered body's length.
    bytes_in: AtomicU64,
    /// A streamed body's counter (read when the event is written, once the
    /// body has gone upstream).
    streamed: OnceLock<Arc<CutFlag>>,
    /// For [`Unanswered`]: who sent it and who it acts as, once known, and
    /// whether an answer was made.
    client: OnceLock<Arc<str>>,
    who: OnceLock<Who>,
    answered: AtomicBool,
}

impl Trace {
    pub fn new(started: Instant) -> Trace {
        Trace {
            started,
            upstream_us: AtomicU64::new(0),
            replayed: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            streamed: OnceLock::new(),
            client: OnceLock::new(),
            who: OnceLock::new(),
            answered: AtomicBool::new(false),
        }
    }

    /// The API client that sent it (for [`Unanswered`]).
    pub fn sent_by(&self, client: &Arc<str>) {
        let _ = self.client.set(client.clone());
    }

    /// Who it acts as (for [`Unanswered`]).
    pub fn acts_as(&self, who: Who) {
        let _ = self.who.set(who);
    }

    /// An answer was made: its event comes with its response body.
    pub fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// One exchange with the upstream took `took` to its response head.
    pub fn upstream(&self, took: Duration) {
        self.upstream_us.fetch_add(micros(took), Ordering::Relaxed);
    }

    pub fn replayed(&self) {
        self.replayed.store(true, Ordering::Relaxed);
    }

    /// The request body was read whole: `n` bytes.
    pub fn body_read(&self, n: usize) {
        self.bytes_in.store(n as u64, Ordering::Relaxed);
    }

    /// The request body streams; `flag` counts what went through.
    pub fn body_streams(&self, flag: &Arc<CutFlag>) {
        let _ = self.streamed.set(flag.clone());
    }
}

/// Writes the event of a request dropped before it was answered: its
/// client went away while qbproxy was still waiting (for a session, the
/// upstream, the body). Status 499, as nginx logs it; `complete=false`.
pub struct Unanswered<'a> {
    pub trace: &'a Trace,
    pub peer: SocketAddr,
    pub method: Method,
    pub uri: &'a Uri,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let t = self.trace;
        if t.answered.load(Ordering::Relaxed) {
            return;
        }
        let who = t.who.get().cloned().unwrap_or(Who::Nobody);
        Entry::new(
            t,
            self.peer,
            t.client.get().cloned(),
            who,
            std::mem::replace(&mut self.method, Method::GET),
            self.uri.path().to_owned(),
            self.uri.clone(),
            CLIENT_CLOSED,
            None,
        )
        .write(0, false);
    }
}

/// The status an unanswered request is logged with (nginx's 499, "client
/// closed request"); never sent.
pub const CLIENT_CLOSED: u16 = 499;

/// Who a request acted as, as far as it got.
#[derive(Clone)]
pub enum Who {
    Nobody,
    /// An identity, or the pool member that served it.
    Identity(Identity),
    /// A pool that had no member to give.
    Pool(Arc<Pool>),
}

/// One request's access event, written when its response body is done.
pub struct Entry {
    pub peer: SocketAddr,
    pub client: Option<Arc<str>>,
    pub who: Who,
    pub method: Method,
    /// Canonical once decided on; as sent before that.
    pub path: String,
    /// The request's URI, kept (a reference count) for its query.
    pub uri: Uri,
    pub status: u16,
    pub error: Option<HeaderValue>,
    started: Instant,
    upstream_us: u64,
    replayed: bool,
    bytes_in: u64,
    streamed: Option<Arc<CutFlag>>,
}

impl Entry {
    /// An entry with what `trace` gathered.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trace: &Trace,
        peer: SocketAddr,
        client: Option<Arc<str>>,
        who: Who,
        method: Method,
        path: String,
        uri: Uri,
        status: u16,
        error: Option<HeaderValue>,
    ) -> Entry {
        Entry {
            peer,
            client,
            who,
            method,
            path,
            uri,
            status,
            error,
            started: trace.started,
            upstream_us: trace.upstream_us.load(Ordering::Relaxed),
            replayed: trace.replayed.load(Ordering::Relaxed),
            bytes_in: trace.bytes_in.load(Ordering::Relaxed),
            streamed: trace.streamed.get().cloned(),
        }
    }

    pub fn write(&self, bytes_out: u64, complete: bool) {
        let (identity, pool) = match &self.who {
            Who::Nobody => (None, None),
            Who::Identity(i) => (Some(i.name()), i.info().pool.as_deref()),
            Who::Pool(p) => (None, Some(p.name())),
        };
        let bytes_in = self
            .streamed
            .as_ref()
            .map_or(self.bytes_in, |flag| flag.passed());
        tracing::info!(
            target: TARGET,
            peer = %self.peer,
            client = self.client.as_deref(),
            identity,
            pool,
            method = %self.method,
            path = self.path.as_str(),
            query = self.uri.query().map(|q| tracing::field::display(Masked(q))),
            status = self.status,
            error = self.error.as_ref().and_then(|e| e.to_str().ok()),
            bytes_in,
            bytes_out,
            duration_ms = millis(micros(self.started.elapsed())),
            upstream_ms = millis(self.upstream_us),
            replayed = self.replayed,
            complete,
            "request"
        );
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds to the microsecond.
fn millis(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A query string with its values masked: `page=*&per_page=*`; a part
/// without `=` is masked whole. A client may put anything in a query
/// (a password, a token), so no value is ever logged.
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.0.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            match part.split_once('=') {
                Some((name, _)) => {
                    f.write_str(name)?;
                    f.write_str("=*")?;
                }
                None if part.is_empty() => {}
                None => f.write_str("*")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Masked;

    #[test]
    fn query_values_are_masked() {
        for (query, logged) in [
            ("page=2&per_page=10", "page=*&per_page=*"),
            ("login=alice&password=hunter2", "login=*&password=*"),
            ("token-in-the-clear", "*"),
            ("a=&=b&&c", "a=*&=*&&*"),
            ("", ""),
        ] {
            assert_eq!(Masked(query).to_string(), logged, "{query}");
        }
    }
}
