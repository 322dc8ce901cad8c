//! The access log: one event per request, written when its response body
//! is done (or dropped), on the `qbproxy::access` target, in the format of
//! the rest of the log (`--log-format`). It answers "who called what, as
//! whom, and how long did QuickBlox take": source address, API client,
//! identity (or pool member), method, canonical path, query with its values
//! masked, status, `QBProxy-Error` code, bytes in and out, total and
//! upstream time, and whether the request was replayed.
//!
//! `[log] access = false` turns it off (a reload applies at once); so does
//! `RUST_LOG=info,qbproxy::access=off`. What it costs is measured in
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

use http::{HeaderValue, Method, Response, Uri};
use tokio::time::Instant;

use crate::net::body::{Body, CutFlag};
use crate::session::pool::Pool;
use crate::session::Identity;

/// The log target of access events: a name operators filter on
/// (`RUST_LOG=info,qbproxy::access=off`), kept whatever module writes them.
pub const TARGET: &str = "qbproxy::access";

/// One request's record, from its head to its access event: what it was,
/// who sent it and who it acts as once known, and what happened. Lives on
/// the handler's stack; the stages fill it in. With the access log on, the
/// answer's body writes the event when it is done ([`Trace::answer`]),
/// and a request dropped unanswered (its client went away while qbproxy
/// waited for a session, the upstream or the body) writes its event when
/// the record drops: status 499, as nginx logs it, `complete=false`.
pub struct Trace {
    started: Instant,
    method: Method,
    /// With the access log on: the peer, and the URI as sent (kept, a few
    /// reference counts, for its path and masked query).
    access: Option<(SocketAddr, Uri)>,
    /// Time spent waiting for the upstream's response heads, all attempts.
    upstream_us: AtomicU64,
    replayed: AtomicBool,
    /// A buffered body's length.
    bytes_in: AtomicU64,
    /// A streamed body's counter (read when the event is written, once the
    /// body has gone upstream).
    streamed: OnceLock<Arc<CutFlag>>,
    /// Who sent it and who it acts as, once known, for an unanswered
    /// request's event.
    client: OnceLock<Arc<str>>,
    who: OnceLock<Who>,
    answered: AtomicBool,
}

impl Trace {
    /// `access`: the peer and the URI, when the access log is on.
    pub fn new(started: Instant, method: Method, access: Option<(SocketAddr, Uri)>) -> Trace {
        Trace {
            started,
            method,
            access,
            upstream_us: AtomicU64::new(0),
            replayed: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            streamed: OnceLock::new(),
            client: OnceLock::new(),
            who: OnceLock::new(),
            answered: AtomicBool::new(false),
        }
    }

    /// True when the access log is on for this request.
    pub fn on(&self) -> bool {
        self.access.is_some()
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Who sent it and who it acts as, for the event of a request dropped
    /// before its answer.
    pub fn known(&self, client: Option<&Arc<str>>, who: impl FnOnce() -> Who) {
        if self.on() {
            if let Some(c) = client {
                let _ = self.client.set(c.clone());
            }
            let _ = self.who.set(who());
        }
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

    /// The request's answer: with the access log on, its body writes the
    /// event, with what `outcome` says, when it is done.
    pub fn answer(
        &self,
        resp: Response<Body>,
        outcome: impl FnOnce() -> Outcome,
    ) -> Response<Body> {
        let Some((peer, uri)) = &self.access else {
            return resp;
        };
        self.answered.store(true, Ordering::Relaxed);
        let entry = self.entry(
            *peer,
            uri,
            outcome(),
            resp.status().as_u16(),
            resp.headers(),
        );
        resp.map(|body| body.on_end(move |end| entry.write(end.bytes, end.complete)))
    }

    fn entry(
        &self,
        peer: SocketAddr,
        uri: &Uri,
        outcome: Outcome,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Entry {
        Entry {
            peer,
            client: outcome.client,
            who: outcome.who,
            method: self.method.clone(),
            path: outcome.path.unwrap_or_else(|| uri.path().to_owned()),
            uri: uri.clone(),
            status,
            error: headers.get(crate::quickblox::QBPROXY_ERROR).cloned(),
            reason: outcome.reason,
            started: self.started,
            upstream_us: self.upstream_us.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            streamed: self.streamed.get().cloned(),
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let Some((peer, uri)) = &self.access else {
            return;
        };
        if self.answered.load(Ordering::Relaxed) {
            return;
        }
        let outcome = Outcome {
            client: self.client.get().cloned(),
            who: self.who.get().cloned().unwrap_or(Who::Nobody),
            path: None,
            reason: None,
        };
        self.entry(*peer, uri, outcome, CLIENT_CLOSED, &http::HeaderMap::new())
            .write(0, false);
    }
}

/// What the handler knows at the end: who, on which path, and why qbproxy
/// answered itself, if it did.
pub struct Outcome {
    pub client: Option<Arc<str>>,
    pub who: Who,
    /// Canonical once decided on; `None`: as sent.
    pub path: Option<String>,
    pub reason: Option<String>,
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
struct Entry {
    peer: SocketAddr,
    client: Option<Arc<str>>,
    who: Who,
    method: Method,
    /// Canonical once decided on; as sent before that.
    path: String,
    /// The request's URI, kept (a reference count) for its query.
    uri: Uri,
    status: u16,
    /// The `QBProxy-Error` code and the reason, when qbproxy answered.
    error: Option<HeaderValue>,
    reason: Option<String>,
    started: Instant,
    upstream_us: u64,
    replayed: bool,
    bytes_in: u64,
    streamed: Option<Arc<CutFlag>>,
}

impl Entry {
    fn write(&self, bytes_out: u64, complete: bool) {
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
            reason = self.reason.as_deref(),
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
