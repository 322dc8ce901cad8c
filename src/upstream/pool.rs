//! One proxy worker's connections to the upstream.
//!
//! Over HTTP/2 a connection carries as many requests at once as the server
//! allows (`SETTINGS_MAX_CONCURRENT_STREAMS`, 128 by default in nginx and
//! AWS ALB); a new request goes on the least loaded connection with room,
//! and when every one is full another is opened, up to the worker's share
//! of `upstream.max_connections`. Over HTTP/1.1 a connection carries one
//! request at a time and is kept alive for the next (the most recently
//! used first, so the rest age out). Idle connections of either kind are
//! closed after `upstream.pool_idle_timeout`, below the idle timeouts of
//! common load balancers, so the upstream never closes one under a request
//! it is sending.
//!
//! Built on hyper's `client::conn` rather than hyper-util's pooled client,
//! which keeps one HTTP/2 connection per host and queues requests past the
//! server's stream limit (hyperium/hyper#2197, #3623); hyper-util's newer
//! `client::pool::singleton` also makes one connection.
//!
//! Connections being made count as capacity to come: while one is being
//! made for HTTP/2, up to as many requests as the last connection allowed
//! streams wait for it instead of each opening their own.
//!
//! A server's stream limit is known from its SETTINGS, read as they arrive
//! (`connect.rs`, [`ServerFrames`]), a round trip after the connection is
//! made. Until one of the upstream's connections has said it
//! ([`StreamLimit`], shared by every worker), a new connection carries
//! one request, and the requests waiting for it wait for its SETTINGS
//! too: assuming a limit (hyper assumes 100) would queue requests inside
//! h2 past a lower one (nginx with `http2_max_concurrent_streams 4`),
//! behind the requests it carries, while another connection could take
//! them.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio::time::{timeout_at, Instant};

use super::connect::{Connected, Connector, ServerFrames};
use super::ConnectError;
use super::SendError;
use crate::config::UpstreamConfig;
use crate::net::body::Body;
use crate::telemetry::metrics::{Protocol, UpstreamMetrics};
use crate::upstream::fair::Slot as Permit;

/// Streams an HTTP/2 connection whose SETTINGS are still on their way is
/// counted on to carry, for the requests waiting for it, while the
/// upstream's limit is not known (RFC 9113 §6.5.2 advises servers to allow
/// at least 100). It carries one until they arrive.
const ASSUMED_STREAMS: usize = 100;

/// Times one request is sent when the upstream did not process it: a
/// refusal costs the upstream nothing, but a server that refuses
/// everything must not keep a request going round until its deadline.
const MAX_ATTEMPTS: usize = 10;

/// One worker's share of `[upstream]`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_connections: usize,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Shared by the workers given clones of these settings.
    pub streams: StreamLimit,
}

/// The upstream's HTTP/2 stream limit as the last SETTINGS of any of its
/// connections said (`SETTINGS_MAX_CONCURRENT_STREAMS`), shared by every
/// worker's pool: a new connection is taken to allow that many from the
/// start. Not known (0) until a first connection's SETTINGS arrive.
#[derive(Clone, Debug, Default)]
pub struct StreamLimit(Arc<AtomicUsize>);

impl StreamLimit {
    fn get(&self) -> Option<usize> {
        Some(self.0.load(Ordering::Relaxed)).filter(|n| *n > 0)
    }

    fn learn(&self, streams: usize) {
        self.0.store(streams.max(1), Ordering::Relaxed);
    }
}

impl Settings {
    /// A worker's share: `max_connections` and the idle connections kept
    /// are divided between the workers (rounded up).
    pub fn share_of(cfg: &UpstreamConfig, workers: usize) -> Settings {
        Settings {
            max_connections: cfg.max_connections.div_ceil(workers),
            max_idle: cfg.pool_max_idle_per_host.div_ceil(workers),
            idle_timeout: cfg.pool_idle_timeout,
            ping_interval: cfg.ping_interval,
            ping_timeout: cfg.ping_timeout,
            streams: StreamLimit::default(),
        }
    }
}

/// One worker's client to the upstream: a cheap-to-clone handle on its
/// connections.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    /// `Host` of HTTP/1.1 requests (HTTP/2 sends the URI's authority).
    host: HeaderValue,
    /// The upstream's scheme and authority, for an HTTP/2 request whose
    /// target an HTTP/1.1 attempt made origin-form.
    origin: (Scheme, Authority),
    settings: Settings,
    state: Mutex<State>,
    /// Signalled when a stream, a connection or room for one frees up.
    room: Notify,
    metrics: UpstreamMetrics,
}

#[derive(Default)]
struct State {
    next_id: u64,
    h2: Vec<H2Conn>,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: VecDeque<Idle>,
    /// Connections whose task runs (HTTP/1.1 busy or idle, HTTP/2).
    open: usize,
    /// Connections being made.
    connecting: usize,
    /// Requests waiting for a connection being made.
    waiting: usize,
    /// Whether the last connection made spoke HTTP/2 (what the next one
    /// will most likely speak).
    likely_h2: bool,
    /// Requests the server takes on one HTTP/2 connection before it sends
    /// GOAWAY (nginx's `keepalive_requests`, 1000 by default), learnt from
    /// two GOAWAYs in a row that refused streams after the same count (a
    /// GOAWAY for another reason, a reload or too many refusals, does not
    /// repeat a count): a connection that has carried that many takes no
    /// more, so none is refused again. Forgotten when a connection that
    /// reached it idles out without a GOAWAY.
    budget: Option<u64>,
    /// The count of the last such GOAWAY, awaiting its repeat.
    budget_seen: Option<u64>,
    reaper: bool,
}

struct H2Conn {
    id: u64,
    send: http2::SendRequest<Body>,
    in_flight: usize,
    /// Streams opened on it, ever.
    sent: u64,
    /// What its server's SETTINGS and GOAWAY said.
    frames: Arc<ServerFrames>,
    /// The upstream's stream limit known when it was made, which it keeps
    /// to until its own SETTINGS arrive.
    known: Option<usize>,
    /// Since when nothing has been in flight.
    idle_since: Instant,
}

impl H2Conn {
    /// The streams it takes at once: its server's limit, or until its
    /// SETTINGS arrive the upstream's known limit, else one.
    fn max(&self) -> usize {
        self.frames.streams().or(self.known).unwrap_or(1)
    }

    /// Whether its stream limit is known.
    fn settled(&self) -> bool {
        self.frames.streams().is_some() || self.known.is_some()
    }
}

struct Idle {
    id: u64,
    send: http1::SendRequest<Body>,
    since: Instant,
}

/// What a request was given to go out on.
enum Checkout {
    H2(u64, http2::SendRequest<Body>),
    H1(u64, http1::SendRequest<Body>),
}

impl Client {
    pub fn new(
        connector: Connector,
        cfg: &UpstreamConfig,
        settings: Settings,
        metrics: UpstreamMetrics,
    ) -> Client {
        let likely_h2 = connector.offers_h2();
        Client {
            shared: Arc::new(Shared {
                connector,
                host: cfg.host.clone(),
                origin: (cfg.scheme.clone(), cfg.authority.clone()),
                settings,
                state: Mutex::new(State {
                    likely_h2,
                    ..State::default()
                }),
                room: Notify::new(),
                metrics,
            }),
        }
    }

    /// Sends `req` and returns the response with the [`Lease`] on its
    /// connection, which the response body holds until it ends (with
    /// `permit`, the request's slot among those in flight). A request the
    /// upstream did not process is sent again on another connection:
    /// hyper's own copy when it never left (a connection that closed
    /// first), else `again()`'s (a stream refused by GOAWAY or
    /// `REFUSED_STREAM`), if it can make one. Waiting for a connection ends
    /// at `deadline`. Dropped while the request is out, the exchange goes
    /// on to its end without the caller ([`Outstanding`]).
    pub async fn send(
        &self,
        mut req: Request<Body>,
        deadline: Instant,
        again: &mut (dyn FnMut() -> Option<Request<Body>> + Send),
        mut permit: Option<Permit>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let mut attempt = 1;
        loop {
            let checkout = self.checkout(deadline).await?;
            let (answer, conn): (Answer, _) = match checkout {
                Checkout::H2(id, mut send) => {
                    for_h2(&mut req, &self.shared.origin);
                    (Box::pin(send.try_send_request(req)), Leased::H2(id))
                }
                Checkout::H1(id, mut send) => {
                    for_h1(&mut req, &self.shared.host);
                    (
                        Box::pin(send.try_send_request(req)),
                        Leased::H1(id, Some(send)),
                    )
                }
            };
            let lease = self.lease(conn, permit.take());
            let (result, mut lease) = Outstanding {
                answer: Some(answer),
                lease: Some(lease),
                deadline,
            }
            .await;
            let mut e = match result {
                Ok(resp) => return Ok((resp, lease)),
                Err(e) => e,
            };
            permit = lease.permit.take();
            drop(lease);
            let next = match e.take_message() {
                // Never written: hyper gives it back.
                Some(message) => Some(message),
                None if not_processed(e.error()) => again(),
                None => None,
            };
            match next {
                Some(next) if attempt < MAX_ATTEMPTS => {
                    self.shared.metrics.resent.inc();
                    tracing::debug!(
                        error = %super::describe(e.error()),
                        "the upstream did not process a request; sending it on another connection"
                    );
                    attempt += 1;
                    req = next;
                }
                _ => return Err(SendError::Failed(e.into_error())),
            }
        }
    }

    fn lease(&self, conn: Leased, permit: Option<Permit>) -> Lease {
        self.shared.metrics.in_flight.inc();
        Lease {
            shared: self.shared.clone(),
            conn,
            complete: false,
            permit,
        }
    }

    /// A stream or an idle connection, else a new connection, else a wait
    /// for one of those until `deadline`.
    async fn checkout(&self, deadline: Instant) -> Result<Checkout, SendError> {
        let shared = &*self.shared;
        loop {
            let notified = shared.room.notified();
            tokio::pin!(notified);
            // Registered before looking, so a release in between wakes it.
            notified.as_mut().enable();
            let next = {
                let mut st = shared.lock();
                if let Some((id, send)) = st.take_stream() {
                    return Ok(Checkout::H2(id, send));
                }
                if let Some((id, send)) = st.take_idle(Instant::now(), shared.settings.idle_timeout)
                {
                    return Ok(Checkout::H1(id, send));
                }
                let (per_connection, settling) = if st.likely_h2 {
                    let budget = st.budget.map_or(usize::MAX, |b| b as usize);
                    let streams = shared.settings.streams.get().unwrap_or(ASSUMED_STREAMS);
                    let settling = st.h2.iter().filter(|c| !c.settled()).count();
                    (streams.min(budget), settling)
                } else {
                    (1, 0)
                };
                // Connections being made, or whose SETTINGS are on their
                // way, are capacity to come.
                if st.waiting < (st.connecting + settling).saturating_mul(per_connection) {
                    st.waiting += 1;
                    Next::AwaitConnection
                } else if st.open + st.connecting < shared.settings.max_connections {
                    st.connecting += 1;
                    Next::Connect
                } else {
                    Next::AwaitRoom
                }
            };
            match next {
                Next::Connect => return self.connect(deadline).await,
                Next::AwaitConnection => {
                    let _waiting = Waiting(shared);
                    timeout_at(deadline, notified)
                        .await
                        .map_err(|_| SendError::Busy)?;
                }
                Next::AwaitRoom => {
                    shared.metrics.connection_wait();
                    timeout_at(deadline, notified)
                        .await
                        .map_err(|_| SendError::Busy)?;
                }
            }
        }
    }

    /// Opens a connection and takes its first stream (HTTP/2) or the
    /// connection itself (HTTP/1.1). The caller counted it in `connecting`.
    async fn connect(&self, deadline: Instant) -> Result<Checkout, SendError> {
        let shared = &self.shared;
        let mut connecting = Connecting {
            shared,
            done: false,
        };
        let until = deadline.min(Instant::now() + shared.connector.timeout);
        let on_limit = {
            let shared = Arc::downgrade(&self.shared);
            move || {
                ServerFrames::new(move |max| {
                    if let Some(shared) = shared.upgrade() {
                        shared.limit_set(max);
                    }
                })
            }
        };
        let io = match timeout_at(until, shared.connector.connect(on_limit)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                shared.metrics.connect_errors.inc();
                return Err(SendError::Connect(e));
            }
            Err(_) => {
                shared.metrics.connect_errors.inc();
                return Err(SendError::Connect(ConnectError::Timeout(
                    shared.connector.timeout,
                )));
            }
        };
        let handshake = async {
            Ok(match io {
                Connected::H2(io, frames) => {
                    // The upstream's known limit, else one stream, until
                    // this connection's SETTINGS say (h2 keeps to it too).
                    let known = shared.settings.streams.get();
                    let initial = frames.streams().or(known).unwrap_or(1);
                    let (send, conn) = self.h2_builder(initial).handshake(io).await?;
                    let id = self.register_h2(send.clone(), known, frames);
                    self.watch(id, Protocol::H2, conn);
                    Checkout::H2(id, send)
                }
                Connected::Tls(io) => self.h1(io).await?,
                Connected::Plain(io) => self.h1(io).await?,
            })
        };
        let checkout = timeout_at(until, handshake)
            .await
            .map_err(|_| {
                SendError::Connect(ConnectError::HandshakeTimeout(shared.connector.timeout))
            })?
            .map_err(|e: hyper::Error| SendError::Connect(ConnectError::Handshake(e)))?;
        connecting.done = true;
        // New streams for those waiting (HTTP/2); or, if the connection
        // speaks HTTP/1.1 where HTTP/2 was expected, no capacity to wait
        // for: they look again.
        shared.room.notify_waiters();
        Ok(checkout)
    }

    fn h2_builder(&self, initial_streams: usize) -> http2::Builder<TokioExecutor> {
        let s = &self.shared.settings;
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_max_send_streams(initial_streams);
        if let Some(interval) = s.ping_interval {
            b.keep_alive_interval(interval)
                .keep_alive_timeout(s.ping_timeout)
                .keep_alive_while_idle(true);
        }
        b
    }

    async fn h1<T>(&self, io: T) -> Result<Checkout, hyper::Error>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (send, conn) = http1::Builder::new().handshake(io).await?;
        let id = {
            let mut st = self.shared.lock();
            st.connecting -= 1;
            st.open += 1;
            st.likely_h2 = false;
            st.next_id += 1;
            st.next_id
        };
        self.shared.metrics.opened(Protocol::H1);
        self.watch(id, Protocol::H1, conn);
        Ok(Checkout::H1(id, send))
    }

    /// Adds a new HTTP/2 connection, its first stream taken.
    fn register_h2(
        &self,
        send: http2::SendRequest<Body>,
        known: Option<usize>,
        frames: Arc<ServerFrames>,
    ) -> u64 {
        let mut st = self.shared.lock();
        st.connecting -= 1;
        st.open += 1;
        st.likely_h2 = true;
        st.next_id += 1;
        let id = st.next_id;
        st.h2.push(H2Conn {
            id,
            send,
            in_flight: 1,
            sent: 1,
            frames,
            known,
            idle_since: Instant::now(),
        });
        drop(st);
        self.shared.metrics.opened(Protocol::H2);
        id
    }

    /// Runs a connection's task on this runtime; when it ends the
    /// connection leaves the pool (also if the runtime drops the task: a
    /// worker that stops). The first connection also starts the task that
    /// closes idle ones, again if that task was dropped.
    fn watch<F>(&self, id: u64, protocol: Protocol, conn: F)
    where
        F: Future<Output = hyper::Result<()>> + Send + 'static,
    {
        let leaves = Leaves {
            shared: Arc::downgrade(&self.shared),
            id,
            protocol,
        };
        tokio::spawn(async move {
            let _leaves = leaves;
            if let Err(e) = conn.await {
                tracing::debug!(error = %super::describe(&e), "upstream connection closed");
            }
        });
        let start_reaper = !std::mem::replace(&mut self.shared.lock().reaper, true);
        if start_reaper {
            tokio::spawn(reap(Arc::downgrade(&self.shared)));
        }
    }
}

/// Takes a connection out of the pool when its task ends or is dropped.
struct Leaves {
    shared: Weak<Shared>,
    id: u64,
    protocol: Protocol,
}

impl Drop for Leaves {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.closed(self.id, self.protocol);
        }
    }
}

enum Next {
    Connect,
    AwaitConnection,
    AwaitRoom,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement that changes it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection's task ended: it leaves the pool.
    fn closed(&self, id: u64, protocol: Protocol) {
        let gone = {
            let mut st = self.lock();
            st.open -= 1;
            match protocol {
                Protocol::H2 => {
                    let gone = st
                        .h2
                        .iter()
                        .position(|c| c.id == id)
                        .map(|i| st.h2.swap_remove(i));
                    if let Some(c) = &gone {
                        st.learn_budget(c);
                    }
                    gone.map(Gone::H2)
                }
                Protocol::H1 => st
                    .idle
                    .iter()
                    .position(|c| c.id == id)
                    .and_then(|i| st.idle.remove(i))
                    .map(Gone::H1),
            }
        };
        drop(gone);
        self.metrics.closed(protocol);
        self.room.notify_waiters();
    }

    /// A stream of connection `id` ended.
    fn release_stream(&self, id: u64) {
        {
            let mut st = self.lock();
            if let Some(c) = st.h2.iter_mut().find(|c| c.id == id) {
                c.in_flight -= 1;
                if c.in_flight == 0 {
                    c.idle_since = Instant::now();
                }
            }
        }
        self.room.notify_one();
    }

    /// A server's SETTINGS set its stream limit to `max` (a connection's
    /// first SETTINGS, or a later change), read on the connection's task:
    /// every worker's next connection starts with it, and the requests
    /// waiting here look again. Takes no lock.
    fn limit_set(&self, max: usize) {
        self.settings.streams.learn(max);
        self.room.notify_waiters();
    }

    /// An HTTP/1.1 connection's response ended: it takes the next request,
    /// unless enough are idle already.
    fn release_connection(&self, id: u64, send: http1::SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let surplus = {
            let mut st = self.lock();
            if st.idle.len() < self.settings.max_idle {
                st.idle.push_back(Idle {
                    id,
                    send,
                    since: Instant::now(),
                });
                None
            } else {
                Some(send)
            }
        };
        // Dropped outside the lock: the connection closes.
        drop(surplus);
        self.room.notify_one();
    }

    /// Closes the connections idle for `idle_timeout`.
    fn reap(&self, now: Instant) {
        let timeout = self.settings.idle_timeout;
        let mut gone = Vec::new();
        {
            let mut st = self.lock();
            while st
                .idle
                .front()
                .is_some_and(|c| now.duration_since(c.since) >= timeout)
            {
                gone.extend(st.idle.pop_front().map(Gone::H1));
            }
            let mut i = 0;
            while i < st.h2.len() {
                let c = &st.h2[i];
                if c.in_flight == 0 && now.duration_since(c.idle_since) >= timeout {
                    if st.budget.is_some_and(|b| c.sent >= b) {
                        // It took no more requests, and the server never
                        // said it would refuse them: the budget was low.
                        st.budget = None;
                    }
                    gone.push(Gone::H2(st.h2.swap_remove(i)));
                } else {
                    i += 1;
                }
            }
        }
        if !gone.is_empty() {
            tracing::debug!(
                connections = gone.len(),
                idle_timeout = ?timeout,
                "closing idle upstream connections"
            );
        }
    }
}

/// A connection taken out of the pool, dropped (and so closed) outside its
/// lock.
#[allow(dead_code)]
enum Gone {
    H2(H2Conn),
    H1(Idle),
}

impl State {
    /// A stream on the least loaded HTTP/2 connection with room (under the
    /// server's stream limit and, if one was learnt, its budget).
    fn take_stream(&mut self) -> Option<(u64, http2::SendRequest<Body>)> {
        let mut best: Option<usize> = None;
        let budget = self.budget.unwrap_or(u64::MAX);
        for (i, c) in self.h2.iter().enumerate() {
            if c.in_flight >= c.max() || c.sent >= budget || c.send.is_closed() {
                continue;
            }
            if best.is_none_or(|b| c.in_flight < self.h2[b].in_flight) {
                best = Some(i);
            }
        }
        let c = &mut self.h2[best?];
        c.in_flight += 1;
        c.sent += 1;
        Some((c.id, c.send.clone()))
    }

    /// Connections that a GOAWAY closed after refusing streams, twice
    /// after the same count, tell how many requests the server takes on
    /// one connection.
    fn learn_budget(&mut self, c: &H2Conn) {
        let Some(processed) = c.frames.processed() else {
            return;
        };
        if c.sent <= processed {
            return;
        }
        let processed = processed.max(1);
        let seen = self.budget_seen.replace(processed);
        if seen == Some(processed) && self.budget != Some(processed) {
            self.budget = Some(processed);
            tracing::info!(
                requests = processed,
                "the upstream sends GOAWAY after this many requests on an HTTP/2 connection; \
                 qbproxy opens the next connection before, so no request is refused"
            );
        }
    }

    /// The most recently used idle HTTP/1.1 connection that is still open
    /// and not past its idle time.
    fn take_idle(
        &mut self,
        now: Instant,
        timeout: Duration,
    ) -> Option<(u64, http1::SendRequest<Body>)> {
        while let Some(c) = self.idle.pop_back() {
            if !c.send.is_closed() && now.duration_since(c.since) < timeout {
                return Some((c.id, c.send));
            }
        }
        None
    }
}

/// The connection a request went out on, held by its response body until
/// it ends: then the stream counts free again (HTTP/2), or the connection
/// takes the next request (HTTP/1.1, if the response was read whole).
pub struct Lease {
    shared: Arc<Shared>,
    conn: Leased,
    complete: bool,
    /// The request's slot among those in flight (`upstream.max_in_flight`),
    /// held as long as the connection is.
    permit: Option<Permit>,
}

enum Leased {
    H2(u64),
    H1(u64, Option<http1::SendRequest<Body>>),
}

impl Lease {
    /// The response was read to its end: the connection takes the next
    /// request. (Dropped otherwise, an HTTP/1.1 connection is closed.)
    pub fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.metrics.in_flight.dec();
        match &mut self.conn {
            Leased::H2(id) => self.shared.release_stream(*id),
            Leased::H1(id, send) => {
                if let (true, Some(send)) = (self.complete, send.take()) {
                    self.shared.release_connection(*id, send);
                }
                // Otherwise the connection is dropped here, and closes.
            }
        }
    }
}

/// A request's answer to come, as hyper returns it.
type Answer =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>> + Send>>;

/// The most of a response [`Outstanding`] reads to let its stream end; a
/// longer one is reset.
const DRAIN_LIMIT: usize = 1 << 20;

/// A request out on a connection until its response head arrives. Dropped
/// before (its client went away), the request is not reset: a task waits
/// for the answer and reads it to its end, within the request's deadline,
/// and only then lets the connection go. A reset stream can hold the
/// server's slot until its handler is done, so streams opened meanwhile go
/// past the server's limit and are refused; and a server that sees many
/// resets and refusals takes them for an attack (nginx closes the
/// connection, under the requests on it). An HTTP/1.1 connection stays
/// usable too.
struct Outstanding {
    answer: Option<Answer>,
    lease: Option<Lease>,
    deadline: Instant,
}

impl Future for Outstanding {
    type Output = (
        Result<Response<Incoming>, TrySendError<Request<Body>>>,
        Lease,
    );

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(answer) = this.answer.as_mut() else {
            unreachable!("polled after it resolved");
        };
        let result = std::task::ready!(answer.as_mut().poll(cx));
        this.answer = None;
        let lease = this
            .lease
            .take()
            .unwrap_or_else(|| unreachable!("the lease goes with the answer"));
        Poll::Ready((result, lease))
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let (Some(answer), Some(lease)) = (self.answer.take(), self.lease.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            lease.shared.metrics.abandoned();
            runtime.spawn(drain(answer, lease, self.deadline));
        }
    }
}

/// Waits for an abandoned request's answer and reads it to its end.
async fn drain(answer: Answer, lease: Lease, deadline: Instant) {
    let read_whole = async {
        let Ok(resp) = answer.await else {
            return false;
        };
        let mut body = resp.into_body();
        let mut read = 0;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            match frame {
                Ok(f) => read += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => return false,
            }
            if read > DRAIN_LIMIT {
                return false;
            }
        }
        true
    };
    if let Ok(true) = timeout_at(deadline, read_whole).await {
        lease.complete();
    }
}

/// Counts a request among those waiting for a connection being made, as
/// long as it waits.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// A connection being made; if it is not made (an error, or the request
/// went away), the count goes down and waiters look again.
struct Connecting<'a> {
    shared: &'a Shared,
    done: bool,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.lock().connecting -= 1;
            self.shared.room.notify_waiters();
        }
    }
}

/// Closes idle connections every quarter of the idle timeout (at least
/// every second), until the pool is gone.
async fn reap(shared: Weak<Shared>) {
    /// Lets the next connection start another if this task is dropped.
    struct Reaping(Weak<Shared>);
    impl Drop for Reaping {
        fn drop(&mut self) {
            if let Some(s) = self.0.upgrade() {
                s.lock().reaper = false;
            }
        }
    }
    let _reaping = Reaping(shared.clone());
    let every = match shared.upgrade() {
        Some(s) => (s.settings.idle_timeout / 4).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match shared.upgrade() {
            Some(s) => s.reap(Instant::now()),
            None => return,
        }
    }
}

/// Whether an error says the upstream did not process the request: a
/// stream above the last one a GOAWAY lets finish, or refused with
/// `REFUSED_STREAM` (RFC 9113 §8.7). Streams the upstream may have begun
/// fail otherwise (a reset with another code, a connection that broke).
fn not_processed(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = s.source();
    }
    false
}

/// HTTP/1.1: the origin-form target and `Host`.
fn for_h1(req: &mut Request<Body>, host: &HeaderValue) {
    if req.uri().scheme().is_some() {
        let target = req
            .uri()
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
        *req.uri_mut() = target;
    }
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut().insert(header::HOST, host.clone());
    }
}

/// HTTP/2: the URI's scheme and authority become `:scheme` and
/// `:authority`; no `host` beside them.
fn for_h2(req: &mut Request<Body>, (scheme, authority): &(Scheme, Authority)) {
    req.headers_mut().remove(header::HOST);
    *req.version_mut() = http::Version::HTTP_2;
    if req.uri().scheme().is_none() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::path::Path;

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::config::Config;
    use crate::telemetry::metrics::Metrics;

    /// A test server's answer: counted in `received`, sent once `gate`
    /// lets it through (a permit each).
    async fn gated(
        gate: Arc<Semaphore>,
        received: Arc<AtomicUsize>,
    ) -> Result<http::Response<Body>, Infallible> {
        received.fetch_add(1, Ordering::SeqCst);
        gate.acquire().await.unwrap().forget();
        Ok(http::Response::new(Body::full("ok")))
    }

    /// An HTTP/1.1 server on loopback that answers each request once a
    /// permit is added to the returned semaphore, and counts the requests
    /// it received.
    async fn gated_server() -> (std::net::SocketAddr, Arc<Semaphore>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let (g, r) = (gate.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (g, r) = (g.clone(), r.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| gated(g.clone(), r.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (addr, gate, received)
    }

    fn client(url: &str, upstream: &str) -> (Client, Metrics) {
        let text = format!(
            "[quickblox]\napplication_id = \"1\"\nauth_key = \"k\"\nauth_secret = \"s\"\n\
             [upstream]\nurl = \"{url}\"\n{upstream}\n"
        );
        let config = Config::from_toml(&text, Path::new("t.toml")).unwrap();
        let metrics = Metrics::new();
        let pools = super::super::pools(&config.upstream, 1, metrics.upstream()).unwrap();
        (pools[0].clone(), metrics)
    }

    fn get(addr: std::net::SocketAddr) -> Request<Body> {
        Request::get(format!("http://{addr}/x"))
            .body(Body::empty())
            .unwrap()
    }

    /// With every connection busy, a request waits for one until its
    /// deadline, then gets `Busy` without having been sent; a connection
    /// that comes free is taken by the next request in line and kept
    /// alive.
    #[tokio::test]
    async fn past_max_connections_a_request_waits_until_its_deadline_unsent() {
        let (addr, gate, received) = gated_server().await;
        let (client, _metrics) = client(&format!("http://{addr}"), "max_connections = 1");
        let far = Instant::now() + Duration::from_secs(20);
        let first = tokio::spawn({
            let c = client.clone();
            async move {
                let (resp, lease) = c.send(get(addr), far, &mut || None, None).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                lease.complete();
                body
            }
        });
        while received.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let soon = Instant::now() + Duration::from_millis(100);
        let busy = client.send(get(addr), soon, &mut || None, None).await;
        assert!(matches!(busy, Err(SendError::Busy)), "{:?}", busy.err());
        assert_eq!(received.load(Ordering::SeqCst), 1, "never sent");
        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), "ok");
        let (resp, _lease) = client
            .send(get(addr), far, &mut || None, None)
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(client.shared.lock().open, 1, "one connection, kept alive");
    }

    /// An HTTP/2 server over TLS (hyper's, allowing `max_streams` at once)
    /// whose bytes to the client, its SETTINGS first, are held until the
    /// returned sender says `true`: a far server, whose SETTINGS come as
    /// late as the test wants. It answers each request once a permit is
    /// added to the semaphore, and counts the requests it received and the
    /// connections it accepted. Returns its address and its certificate.
    struct HeldServer {
        addr: std::net::SocketAddr,
        cert_pem: String,
        release: tokio::sync::watch::Sender<bool>,
        gate: Arc<Semaphore>,
        received: Arc<AtomicUsize>,
        accepted: Arc<AtomicUsize>,
    }

    async fn held_h2_server(max_streams: u32) -> HeldServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let tls = crate::net::tls::server_config(
            vec![key.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
            None,
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let server = HeldServer {
            addr: listener.local_addr().unwrap(),
            cert_pem: key.cert.pem(),
            release,
            gate: Arc::new(Semaphore::new(0)),
            received: Arc::new(AtomicUsize::new(0)),
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        let (gate, received, accepted) = (
            server.gate.clone(),
            server.received.clone(),
            server.accepted.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (ours, theirs) = tokio::io::duplex(1 << 16);
                let (g, r) = (gate.clone(), received.clone());
                let service = service_fn(move |_req| gated(g.clone(), r.clone()));
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(theirs), service),
                );
                let (mut tls_r, mut tls_w) = tokio::io::split(tls);
                let (mut ours_r, mut ours_w) = tokio::io::split(ours);
                tokio::spawn(async move { tokio::io::copy(&mut tls_r, &mut ours_w).await });
                let mut released = released.clone();
                tokio::spawn(async move {
                    let _ = released.wait_for(|r| *r).await;
                    let mut buf = vec![0u8; 1 << 14];
                    while let Ok(n @ 1..) = ours_r.read(&mut buf).await {
                        if tls_w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        server
    }

    /// What `seen` reads from the pool's state once it reads something,
    /// waiting (bounded) until then; read under one lock with the
    /// condition, so a snapshot is never torn.
    async fn state_when<T>(client: &Client, seen: impl Fn(&State) -> Option<T>) -> T {
        let wait = async {
            loop {
                if let Some(t) = seen(&client.shared.lock()) {
                    return t;
                }
                tokio::task::yield_now().await;
            }
        };
        timeout_at(Instant::now() + Duration::from_secs(10), wait)
            .await
            .expect("the pool's state within 10 s")
    }

    /// Requests on each HTTP/2 connection, and those waiting for one.
    fn carried(st: &State) -> (Vec<usize>, usize) {
        (st.h2.iter().map(|c| c.in_flight).collect(), st.waiting)
    }

    /// Until a server's SETTINGS say how many streams it allows, a new
    /// connection of a pool that knows no limit carries one request, and
    /// the requests that wait for it wait for its SETTINGS, opening no
    /// connection of their own. When they arrive (4), it takes three more
    /// and the last two go on a second connection, which starts at the
    /// learnt limit. hyper's assumed 100 would put all six on the first,
    /// where h2 queues two behind the four the server takes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_connection_takes_one_request_until_its_servers_settings_arrive() {
        let server = held_h2_server(4).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &server.cert_pem).unwrap();
        let url = format!("https://localhost:{}", server.addr.port());
        let (client, _metrics) = client(&url, &format!("ca_file = {:?}", ca.display().to_string()));
        let far = Instant::now() + Duration::from_secs(20);
        let sent: Vec<_> = (0..6)
            .map(|_| {
                let c = client.clone();
                let req = get(server.addr);
                tokio::spawn(async move {
                    let (resp, lease) = c.send(req, far, &mut || None, None).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    lease.complete();
                    body
                })
            })
            .collect();
        // Each of the six is on a stream or waiting for one.
        let placed = |st: &State| {
            let (on, waiting) = carried(st);
            (on.iter().sum::<usize>() + waiting == 6 && st.connecting == 0).then_some((on, waiting))
        };
        assert_eq!(
            state_when(&client, placed).await,
            (vec![1], 5),
            "one connection, one request on it, five waiting for its SETTINGS"
        );
        server.release.send(true).unwrap();
        // SETTINGS arrive: every request goes out, none past the limit.
        let out = |st: &State| placed(st).filter(|(_, waiting)| *waiting == 0);
        assert_eq!(state_when(&client, out).await, (vec![4, 2], 0));
        let received = async {
            while server.received.load(Ordering::SeqCst) < 6 {
                tokio::task::yield_now().await;
            }
        };
        timeout_at(far, received)
            .await
            .expect("all six at the server");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.shared.settings.streams.get(), Some(4));
        server.gate.add_permits(6);
        for s in sent {
            assert_eq!(s.await.unwrap(), "ok");
        }
    }
}
