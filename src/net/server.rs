//! Listeners: accept connections, serve HTTP/1.1 and HTTP/2 (detected per
//! connection) with a handler, and on shutdown stop accepting and drain the
//! open connections under a grace period.
//!
//! Each connection is driven by [`drive`], which also holds it to its
//! deadlines, whatever the protocol: a request's head must arrive within
//! `header_read_timeout` of its first byte (of the accept, for the first
//! request); a connection with no request in flight is closed after
//! `keepalive_timeout` (HTTP/2 with GOAWAY: a client that only answers
//! PINGs holds no slot for ever); a response the client does not read for
//! `send_timeout` gets the connection closed, which drops the response and
//! frees its upstream slot; and a handler may ask for the connection to
//! close after its answer ([`Conn::close`]).
//!
//! The two first are kept apart on purpose. hyper's own HTTP/1 header
//! timeout starts when it waits for the next head, so it doubles as a
//! keep-alive timeout: a short one (slowloris wants seconds) closes idle
//! connections under clients that are about to reuse them, and the request
//! they send at that moment is lost. So hyper's is off, and [`Watched`]
//! marks the first byte read on an idle connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::app::worker;
use crate::net::body::{Body, BoxError};
use crate::net::limit::ResizableLimit;

/// How a listener treats its connections. (How many it holds open is a
/// [`ResizableLimit`] of its own, so a reload moves it at once.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Time to send a request's head, from its first byte (from the
    /// accept, for a connection's first request).
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept once it has
    /// served one (HTTP/1 keep-alive, HTTP/2 idle).
    pub keepalive_timeout: Duration,
    /// The header limit the handler enforces (431 in JSON); hyper's own
    /// buffers are sized above it so the handler gets to answer.
    pub max_header_bytes: usize,
    /// How long a response may wait for the client to read it.
    pub send_timeout: Duration,
    /// Requests in flight on one connection (HTTP/2 concurrent streams).
    pub max_streams: u32,
    pub shutdown_grace: Duration,
}

/// HTTP/2 receive windows: what a client may send before qbproxy reads it.
/// Small enough that connections cannot pile up unread request bodies
/// (hyper's default is 1 MiB each), large enough for uploads on a LAN.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;

/// What a handler knows of the connection a request came on.
#[derive(Clone)]
pub struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    state: Arc<ConnState>,
}

impl Conn {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The address the connection was accepted on.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// True the first time `event` is reported on this connection: for
    /// what a handler logs once per connection.
    pub fn first(&self, event: OncePerConnection) -> bool {
        self.state.noted.fetch_or(event.0, Ordering::AcqRel) & event.0 == 0
    }

    /// Closes the connection once the answers in flight are sent
    /// (`Connection: close` on HTTP/1, GOAWAY on HTTP/2).
    pub fn close(&self) {
        self.state.close();
    }
}

/// A connection's bookkeeping, shared by its driver and its requests.
#[derive(Default)]
struct ConnState {
    /// Requests in flight: from arrival until the response body is done.
    active: AtomicUsize,
    /// The driver's clock, in ticks; a response body stamps it when the
    /// connection asks it for data.
    tick: AtomicU64,
    /// The tick at which `active` last fell to zero.
    idle_since: AtomicU64,
    /// The tick at which the next request's head began: the accept (0) for
    /// the first, then the first byte read with nothing in flight;
    /// [`NOT_HEARD`] while a request is in flight or the connection idles.
    heard: AtomicU64,
    /// Response bodies being sent: the tick they were last asked for data.
    sending: Mutex<Vec<Arc<AtomicU64>>>,
    /// Set to close the connection gracefully (by a handler, or by the
    /// server's shutdown); `wake` then wakes its driver.
    close: AtomicBool,
    wake: AtomicWaker,
    /// Requests that arrived on it.
    requests: AtomicU64,
    /// Whether the connection opened with HTTP/2's preface (its idle
    /// frames, PING acks among them, are no request's head).
    http2: AtomicBool,
    /// Events already reported on it (see [`Conn::first`]).
    noted: AtomicU8,
}

/// An event a handler reports at most once per connection
/// ([`Conn::first`]): one of eight bits, each handler naming its own.
#[derive(Debug, Clone, Copy)]
pub struct OncePerConnection(u8);

impl OncePerConnection {
    /// Event number `n`, below 8.
    pub const fn nth(n: u8) -> Self {
        assert!(n < 8, "a connection notes eight events");
        OncePerConnection(1 << n)
    }
}

/// A response body's stamp once it is done.
const DONE: u64 = u64::MAX;

/// [`ConnState::heard`] when no request's head is on its way.
const NOT_HEARD: u64 = u64::MAX;

/// What HTTP/2 connections open with (RFC 9113, 3.4), as far as it tells
/// them from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl ConnState {
    fn close(&self) {
        self.close.store(true, Ordering::Release);
        self.wake.wake();
    }

    /// Ready once [`ConnState::close`] was called. Polled at every wake of
    /// the connection's task, so it costs an atomic load and a waker
    /// comparison, not a lock (as a `Notify` or a `watch` would).
    fn close_requested(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.close.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.wake.register(cx.waker());
            match self.close.load(Ordering::Acquire) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
    }

    /// True if a response body has not been asked for data for `limit`
    /// ticks: the client is not reading it.
    fn stalled(&self, now: u64, limit: u64) -> bool {
        let mut sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        sending.retain(|s| s.load(Ordering::Acquire) != DONE);
        sending
            .iter()
            .any(|s| now.saturating_sub(s.load(Ordering::Acquire)) >= limit)
    }
}

/// Counts a request in flight from its arrival until dropped (with its
/// response body, or with the handler if the client went away first).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: &Arc<ConnState>) -> InFlight {
        state.active.fetch_add(1, Ordering::AcqRel);
        state.heard.store(NOT_HEARD, Ordering::Release);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.0.tick.load(Ordering::Acquire);
            self.0.idle_since.store(now, Ordering::Release);
        }
    }
}

/// A response body on its way to the client: stamps when it is asked for
/// data, and keeps its request counted in flight until done.
pub struct Tracked {
    inner: Body,
    stamp: Arc<AtomicU64>,
    _in_flight: InFlight,
}

impl Tracked {
    fn new(inner: Body, in_flight: InFlight) -> Tracked {
        let state = &in_flight.0;
        let stamp = Arc::new(AtomicU64::new(state.tick.load(Ordering::Acquire)));
        state
            .sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stamp.clone());
        Tracked {
            inner,
            stamp,
            _in_flight: in_flight,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.stamp.store(DONE, Ordering::Release);
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let now = this._in_flight.0.tick.load(Ordering::Relaxed);
        this.stamp.store(now, Ordering::Relaxed);
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts open connections for the drain; the server waits for zero.
struct Open(watch::Sender<usize>);

impl Open {
    fn new(count: &watch::Sender<usize>) -> Open {
        count.send_modify(|n| *n += 1);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A listener's settings for the next connection: its options, and a TLS
/// configuration if every connection is TLS (the handshake must finish
/// within the header timeout). Read per connection, so a reload applies.
pub type Settings = Arc<dyn Fn() -> (Options, Option<Arc<rustls::ServerConfig>>) + Send + Sync>;

/// Where and how a listener serves; `connections` is resized in place.
pub struct Listener {
    /// Labels the log lines.
    pub name: &'static str,
    pub listener: TcpListener,
    pub settings: Settings,
    /// Open connections at most; past it, new ones wait in the kernel's
    /// accept queue rather than being accepted and starved.
    pub connections: ResizableLimit,
    /// How the server leaves ahead of its shutdown ([`Leaving`]).
    pub lame_duck: Option<watch::Receiver<Leaving>>,
}

/// How a server leaves ahead of its shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leaving {
    #[default]
    No,
    /// "Lame duck": it still accepts and serves, but every HTTP/1.1
    /// response says `Connection: close` and HTTP/2 connections get
    /// GOAWAY, so clients move to new connections (to another replica)
    /// while nothing is closed under a request they are sending.
    LameDuck,
    /// Lame duck, and another process took the listening socket over
    /// (`handover.rs`): it stops accepting at once, so that no new
    /// connection comes here to be closed at the drain.
    HandedOver,
}

/// Resolves with the next step past `now` (then `now` is it); pending
/// forever without a signal or once the last step was taken.
async fn leaving(signal: &mut Option<watch::Receiver<Leaving>>, now: &mut Leaving) -> Leaving {
    let Some(rx) = signal else {
        return std::future::pending().await;
    };
    let seen = *now;
    let waited = rx.wait_for(|step| *step > seen).await.map(|step| *step);
    let next = match waited {
        Ok(step) => step,
        Err(_) => {
            // Its sender is gone: no step to come.
            *signal = None;
            return std::future::pending().await;
        }
    };
    *now = next;
    if next == Leaving::HandedOver {
        *signal = None;
    }
    next
}

/// Accepts on `listener`; pending forever once it is gone.
async fn accept(listener: &Option<TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Takes a step of [`Leaving`].
fn step_down(
    name: &str,
    step: Leaving,
    lame: &AtomicBool,
    conns: &[Weak<ConnState>],
    listener: &mut Option<TcpListener>,
) {
    if !lame.load(Ordering::Relaxed) {
        go_lame(name, lame, conns);
    }
    if step == Leaving::HandedOver && listener.take().is_some() {
        tracing::info!(
            listener = name,
            worker = worker::current(),
            "stopped accepting: the process taking over accepts on this socket"
        );
    }
}

/// Goes lame duck: HTTP/1.1 responses say `Connection: close` from now on
/// (an idle connection is left to its next request rather than closed
/// under it), and HTTP/2 connections get GOAWAY (which tells the client
/// what it may send again).
fn go_lame(name: &str, lame: &AtomicBool, conns: &[Weak<ConnState>]) {
    lame.store(true, Ordering::Relaxed);
    for state in conns.iter().filter_map(Weak::upgrade) {
        if state.http2.load(Ordering::Relaxed) {
            state.close();
        }
    }
    tracing::info!(
        listener = name,
        worker = worker::current(),
        "lame duck: still serving, every HTTP/1.1 response closes its connection, HTTP/2 ones got GOAWAY"
    );
}

/// Serves `handler` on `listener` until `shutdown` turns true, then drains
/// for at most the grace period.
pub async fn serve<H, F>(listener: Listener, handler: H, mut shutdown: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let Listener {
        name,
        listener,
        settings,
        connections,
        mut lame_duck,
    } = listener;
    let local = listener.local_addr().ok();
    let mut listener = Some(listener);
    let mut left = Leaving::No;
    let lame = Arc::new(AtomicBool::new(false));
    let (mut current, _) = settings();
    let mut builder = connection_builder(&current);
    let open = watch::channel(0usize).0;
    // The connections to close when the server shuts down; only this task
    // touches it. Dead entries go when it has doubled since the last sweep.
    let mut conns: Vec<Weak<ConnState>> = Vec::new();
    let mut sweep_at = 64;
    if let Some(addr) = local {
        tracing::info!(listener = name, worker = worker::current(), %addr, "listening");
    }
    loop {
        // A connection slot first, then accept: beyond the limit, clients
        // wait in the kernel's queue. A reload that grows the limit lets
        // this wait end at once.
        let permit = tokio::select! {
            permit = connections.acquire() => match permit {
                Some(p) => p,
                None => break,
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
            step = leaving(&mut lame_duck, &mut left) => {
                step_down(name, step, &lame, &conns, &mut listener);
                continue;
            }
        };
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    // The settings in force when the connection came:
                    // a reload applies to every later one.
                    let (latest, tls) = settings();
                    if latest != current {
                        builder = connection_builder(&latest);
                        current = latest;
                    }
                    // Latency over batching: responses are small and many.
                    let _ = stream.set_nodelay(true);
                    let local = stream.local_addr().ok().or(local).unwrap_or(peer);
                    let state = Arc::new(ConnState::default());
                    if conns.len() >= sweep_at {
                        conns.retain(|c| c.strong_count() > 0);
                        sweep_at = (2 * conns.len()).max(64);
                    }
                    conns.push(Arc::downgrade(&state));
                    let conn = Conn { peer, local, state: state.clone() };
                    let handler = handler.clone();
                    let lame = lame.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let in_flight = InFlight::new(&conn.state);
                        conn.state.requests.fetch_add(1, Ordering::Relaxed);
                        let http1 = req.version() != http::Version::HTTP_2;
                        let response = handler(req, conn.clone());
                        let lame = lame.clone();
                        async move {
                            let mut response = response.await;
                            if http1 && lame.load(Ordering::Relaxed) {
                                response.headers_mut().insert(
                                    http::header::CONNECTION,
                                    http::HeaderValue::from_static("close"),
                                );
                            }
                            Ok::<_, Infallible>(response.map(|b| Tracked::new(b, in_flight)))
                        }
                    });
                    let builder = builder.clone();
                    let tls = tls.clone();
                    let options = current;
                    let open = Open::new(&open);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _open = open;
                        let result = match tls {
                            None => {
                                let io = Watched::new(stream, &state, Some((name, peer)));
                                drive(&builder, TokioIo::new(io), service, &state, &options, peer, name).await
                            }
                            Some(config) => {
                                let accept = TlsAcceptor::from(config).accept(stream);
                                let stream = match tokio::time::timeout(options.header_read_timeout, accept).await {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(e)) => {
                                        match super::tls::handshake_hint(&e) {
                                            Some(hint) => tracing::info!(listener = name, %peer, error = %e, hint, "TLS handshake refused"),
                                            None => tracing::info!(listener = name, %peer, error = %e, "TLS handshake refused"),
                                        }
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::info!(listener = name, %peer, "TLS handshake timed out");
                                        return;
                                    }
                                };
                                let io = Watched::new(stream, &state, None);
                                drive(&builder, TokioIo::new(io), service, &state, &options, peer, name).await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(listener = name, %peer, error = %e, "connection closed with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning; established connections go on.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            step = leaving(&mut lame_duck, &mut left) => {
                step_down(name, step, &lame, &conns, &mut listener);
            }
        }
    }
    drop(listener);
    for state in conns.iter().filter_map(Weak::upgrade) {
        state.close();
    }
    let grace = settings().0.shutdown_grace;
    tracing::info!(
        listener = name,
        worker = worker::current(),
        grace_s = grace.as_secs_f64(),
        "stopped accepting; draining connections"
    );
    let mut open_count = open.subscribe();
    let drained = tokio::time::timeout(grace, open_count.wait_for(|n| *n == 0))
        .await
        .is_ok();
    match drained {
        true => tracing::info!(
            listener = name,
            worker = worker::current(),
            "all connections drained"
        ),
        false => tracing::warn!(
            listener = name,
            worker = worker::current(),
            "grace period over with requests still in flight; closing them"
        ),
    }
}

/// Serves one connection until it ends, holding it to its deadlines (see
/// the module's documentation). On shutdown it finishes the requests in
/// flight and closes.
#[allow(clippy::too_many_arguments)]
async fn drive<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    state: &Arc<ConnState>,
    options: &Options,
    peer: SocketAddr,
    name: &'static str,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Tracked>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut conn = pin!(builder.serve_connection(io, service));
    // Deadlines are checked on a tick: a few per timeout, so a connection
    // closes between one and 1.25 timeouts after it went quiet.
    let period = (options.header_read_timeout)
        .min(options.keepalive_timeout)
        .min(options.send_timeout)
        / 4;
    let period = period.max(Duration::from_millis(5));
    let ticks = |d: Duration| (d.as_nanos() / period.as_nanos()).max(1) as u64;
    let (head_limit, idle_limit, send_limit) = (
        ticks(options.header_read_timeout),
        ticks(options.keepalive_timeout),
        ticks(options.send_timeout),
    );
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing_since: Option<u64> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            // A handler's Conn::close, or the server shutting down.
            () = state.close_requested(), if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(state.tick.load(Ordering::Acquire));
            }
            _ = ticker.tick() => {
                let now = state.tick.fetch_add(1, Ordering::AcqRel) + 1;
                if state.stalled(now, send_limit) {
                    tracing::info!(listener = name, %peer, send_timeout_s = options.send_timeout.as_secs_f64(),
                        "the client did not read a response within limits.send_timeout; closing its connection");
                    return Ok(());
                }
                if state.active.load(Ordering::Acquire) != 0 {
                    continue;
                }
                let since = |at: &AtomicU64| now.saturating_sub(at.load(Ordering::Acquire));
                let served = state.requests.load(Ordering::Relaxed) > 0;
                let http2 = state.http2.load(Ordering::Relaxed);
                match closing_since {
                    // A head begun and not finished in time (HTTP/1; an
                    // HTTP/2 connection's first request, below): dropped,
                    // with nothing in flight to lose.
                    None if !http2 && state.heard.load(Ordering::Acquire) != NOT_HEARD
                        && since(&state.heard) >= head_limit => {
                        tracing::info!(listener = name, %peer, header_read_timeout_s = options.header_read_timeout.as_secs_f64(),
                            "no whole request head within limits.header_read_timeout; closing the connection");
                        return Ok(());
                    }
                    None if (http2 && !served && since(&state.idle_since) >= head_limit)
                        || (served && since(&state.idle_since) >= idle_limit) => {
                        tracing::debug!(listener = name, %peer, "no request for limits.keepalive_timeout; closing the connection");
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(now);
                    }
                    // Closing, nothing in flight, and still not closed: the
                    // client is not reading what is left to write.
                    Some(since) if now.saturating_sub(since) >= send_limit => return Ok(()),
                    _ => {}
                }
            }
        }
    }
}

/// HTTP/1.1 and HTTP/2 settings for new connections.
fn connection_builder(options: &Options) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request line and headers, with room above the handler's limit.
    let buffer = (options.max_header_bytes + 16 * 1024).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        // `drive` times heads from their first byte (see the module's
        // documentation); hyper's timer would start at idle.
        .header_read_timeout(None)
        .max_buf_size(buffer);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX))
        .max_concurrent_streams(options.max_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .keep_alive_interval(Some(options.header_read_timeout))
        .keep_alive_timeout(options.header_read_timeout);
    builder
}

/// A client connection (plain, or TLS above the handshake) whose reads are
/// watched: the first byte read with nothing in flight starts the next
/// head's clock ([`ConnState::heard`]), and the first bytes tell HTTP/2
/// from HTTP/1. On a plain listener they are also looked at for a TLS
/// record (a handshake, 0x16, which no HTTP/1 method or HTTP/2 preface
/// starts with): a client speaking HTTPS to it, which hyper would report
/// only as a parse error at debug level, and the client as an empty answer.
struct Watched<I> {
    io: I,
    state: Arc<ConnState>,
    looked: bool,
    /// A plain listener's name and the peer, to say so if TLS arrives.
    plain: Option<(&'static str, SocketAddr)>,
}

impl<I> Watched<I> {
    fn new(io: I, state: &Arc<ConnState>, plain: Option<(&'static str, SocketAddr)>) -> Watched<I> {
        Watched {
            io,
            state: state.clone(),
            looked: false,
            plain,
        }
    }

    fn first_bytes(&self, bytes: &[u8]) {
        if bytes.starts_with(H2_PREFACE) {
            self.state.http2.store(true, Ordering::Relaxed);
        }
        if let Some((listener, peer)) = self.plain {
            if bytes[0] == TLS_HANDSHAKE {
                tracing::warn!(
                    listener,
                    %peer,
                    "a TLS handshake (ClientHello) arrived on a plain HTTP listener: the client speaks HTTPS; \
                     give it an http:// URL, or give the listener tls_cert and tls_key (qbproxy demo --tls)"
                );
            }
        }
    }
}

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            if !this.looked {
                this.looked = true;
                this.first_bytes(&buf.filled()[before..]);
            }
            let state = &this.state;
            if state.active.load(Ordering::Acquire) == 0 {
                let now = state.tick.load(Ordering::Acquire);
                let _ = state.heard.compare_exchange(
                    NOT_HEARD,
                    now,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
