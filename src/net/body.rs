//! The one body type that crosses qbproxy in both directions, and bounded
//! buffering.
//!
//! A body is either held whole in memory (cheap to clone, so a request can
//! be replayed), or streams from a hyper connection, possibly after a
//! buffered head that was read while deciding whether it fits.
//!
//! A client's body is read under its limits: no wait for bytes longer than
//! `limits.body_read_timeout` or past the request's deadline, no more than
//! `limits.max_body_bytes`, and no more held for replays, across every
//! request at once, than `limits.max_buffered_bytes` (the [`Budget`]). Past
//! that budget a body streams without a replay buffer rather than wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};

use crate::gateway::overrides::{Found, Scanner};
use crate::upstream::Lease;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request's hold on the upstream: its connection's [`Lease`] (with its
/// slot among the requests in flight, `upstream.max_in_flight`), kept by
/// the response body until it is done (`None` once released).
pub type Slot = Option<Lease>;

pub enum Body {
    /// Whole in memory; `None` once sent.
    Full(Option<Bytes>),
    /// Streams from a connection; an upstream response holds its slot
    /// until it is read or dropped.
    Stream { body: Incoming, slot: Slot },
    /// A buffered head, then the rest of the stream.
    Chain {
        head: Option<Bytes>,
        tail: Incoming,
        slot: Slot,
    },
    /// A client's request body streaming upstream (it was not buffered for
    /// a replay): bounded in size and time, and scanned for `_method`.
    Client(Box<ClientBody>),
    /// A body whose end is reported to a hook ([`Body::on_end`]).
    Watched(Box<Watched>),
}

/// How a [`Body::on_end`] body ended.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// Data bytes it yielded.
    pub bytes: u64,
    /// It reached its end; false if it was dropped first (the peer went
    /// away) or failed.
    pub complete: bool,
}

/// What [`Body::on_end`] tells how a body ended: a closure, called once.
pub trait EndHook: Send {
    fn ended(&mut self, end: Ended);
}

impl<F: FnOnce(Ended) + Send> EndHook for Option<F> {
    fn ended(&mut self, end: Ended) {
        if let Some(hook) = self.take() {
            hook(end);
        }
    }
}

/// A body and the hook told how it ended, once: at its end or when it is
/// dropped (a body never polled but empty, as for HEAD, 204 or 304, is
/// complete). The hook is its last field, so one allocation holds both.
pub struct Watched<H: EndHook + ?Sized = dyn EndHook> {
    body: Body,
    bytes: u64,
    ended: bool,
    hook: H,
}

impl<H: EndHook + ?Sized> Watched<H> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.body.is_end_stream() {
                    self.ended = true;
                }
            }
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }
}

impl<H: EndHook + ?Sized> Drop for Watched<H> {
    fn drop(&mut self) {
        let end = Ended {
            bytes: self.bytes,
            complete: self.ended || self.body.is_end_stream(),
        };
        self.hook.ended(end);
    }
}

impl Body {
    /// This body, telling `hook` how it ended (the access log writes a
    /// request's event then).
    pub fn on_end(self, hook: impl FnOnce(Ended) + Send + 'static) -> Body {
        Body::Watched(Box::new(Watched {
            body: self,
            bytes: 0,
            ended: false,
            hook: Some(hook),
        }))
    }
}

/// Why a client's body was cut off on its way upstream. The upstream
/// never gets the rest, so never a complete request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// More than its limit (`limits.max_body_bytes`, or for a file
    /// `limits.max_upload_bytes`), which it carries.
    TooLarge(u64),
    /// No bytes for `limits.body_read_timeout`, or the request's deadline
    /// passed.
    TimedOut,
    /// A `_method` parameter (or a part too long to inspect).
    Override(Found),
}

/// Set when a client body is cut off, read by the handler to answer with
/// the right status when the upstream exchange fails because of it. It
/// also counts the body's bytes passed on, for the access log.
#[derive(Default)]
pub struct CutFlag {
    /// Set once, by the first cut; read without a lock.
    cut: std::sync::OnceLock<Cut>,
    passed: AtomicU64,
}

impl CutFlag {
    pub fn get(&self) -> Option<Cut> {
        self.cut.get().copied()
    }

    /// The first cut is the one reported.
    fn set(&self, cut: Cut) {
        let _ = self.cut.set(cut);
    }

    /// Bytes of the body passed on so far.
    pub fn passed(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
    }
}

/// The body was cut off (see [`Cut`]).
#[derive(Debug, thiserror::Error)]
#[error("request body cut off: {0:?}")]
pub struct CutOff(pub Cut);

/// How long and how much of a client's body qbproxy waits for.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Bytes in all (`limits.max_body_bytes`).
    pub max_bytes: u64,
    /// The longest wait for the next bytes (`limits.body_read_timeout`).
    pub idle: Duration,
    /// The request's deadline: the body must have arrived by then.
    pub deadline: Instant,
}

impl BodyLimits {
    /// When the next bytes must have arrived.
    fn next_by(&self) -> Instant {
        (Instant::now() + self.idle).min(self.deadline)
    }
}

pub struct ClientBody {
    /// Read before streaming began, in reverse order (popped from the end).
    head: Vec<Bytes>,
    tail: Incoming,
    /// Bytes still allowed.
    left: u64,
    limits: BodyLimits,
    /// Fires when the next bytes are overdue; reset by every frame.
    timer: Pin<Box<Sleep>>,
    scanner: Option<Scanner>,
    cut: Arc<CutFlag>,
    /// Budget for the buffered head, returned when the body is dropped.
    _reserved: Option<Reservation>,
}

impl ClientBody {
    /// A body of `head` (already read and scanned) then `tail`, within
    /// `limits`; the flag tells why, if it was cut off.
    pub fn stream(
        head: Vec<Bytes>,
        tail: Incoming,
        limits: BodyLimits,
        scanner: Option<Scanner>,
        reserved: Option<Reservation>,
    ) -> (Body, Arc<CutFlag>) {
        let cut = Arc::new(CutFlag::default());
        let head_len: u64 = head.iter().map(|h| h.len() as u64).sum();
        if head_len > limits.max_bytes {
            cut.set(Cut::TooLarge(limits.max_bytes));
        }
        let mut head: Vec<Bytes> = head.into_iter().filter(|h| !h.is_empty()).collect();
        head.reverse();
        let body = ClientBody {
            head,
            tail,
            left: limits.max_bytes.saturating_sub(head_len),
            timer: Box::pin(sleep_until(limits.next_by())),
            limits,
            scanner,
            cut: cut.clone(),
            _reserved: reserved,
        };
        (Body::Client(Box::new(body)), cut)
    }

    fn cut_off(&mut self, cut: Cut) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.cut.set(cut);
        Poll::Ready(Some(Err(CutOff(cut).into())))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(cut) = self.cut.get() {
            return Poll::Ready(Some(Err(CutOff(cut).into())));
        }
        if let Some(h) = self.head.pop() {
            self.cut.passed.fetch_add(h.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        match Pin::new(&mut self.tail).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.left {
                        return self.cut_off(Cut::TooLarge(self.limits.max_bytes));
                    }
                    self.left -= len;
                    // Scanned before it is passed on: the chunk that holds
                    // `_method=` never reaches the upstream.
                    if let Some(found) = self.scanner.as_mut().and_then(|s| s.feed(data)) {
                        return self.cut_off(Cut::Override(found));
                    }
                    self.cut.passed.fetch_add(len, Ordering::Relaxed);
                }
                let next = self.limits.next_by();
                self.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(BoxError::from))),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => self.cut_off(Cut::TimedOut),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Bytes of request bodies held for replays, across every request
/// (`limits.max_buffered_bytes`). Lives for the proxy's life; the limit
/// comes with each request's configuration, so a reload applies at once.
#[derive(Default)]
pub struct Budget {
    used: AtomicUsize,
}

impl Budget {
    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A share of the [`Budget`], returned when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub fn new(budget: &Arc<Budget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Takes `n` more bytes if the budget has room under `limit`.
    fn grow(&mut self, n: usize, limit: usize) -> bool {
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= limit)
            });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }

    /// Gives back `n` bytes (memory that was freed).
    fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.budget.used.fetch_sub(n, Ordering::AcqRel);
        self.bytes -= n;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// A response streaming from the upstream, holding `slot` until done.
    pub fn upstream(body: Incoming, slot: Lease) -> Body {
        Body::Stream {
            body,
            slot: Some(slot),
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let boxed =
            |r: Option<Result<Frame<Bytes>, hyper::Error>>| r.map(|f| f.map_err(BoxError::from));
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Stream { body, slot } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                release_at_end(&polled, body, slot);
                polled.map(boxed)
            }
            Body::Chain { head, tail, slot } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => {
                    let polled = Pin::new(&mut *tail).poll_frame(cx);
                    release_at_end(&polled, tail, slot);
                    polled.map(boxed)
                }
            },
            Body::Client(c) => c.poll_next(cx),
            Body::Watched(w) => w.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(data) => data.is_none(),
            Body::Stream { body, .. } => body.is_end_stream(),
            Body::Chain { head, tail, .. } => head.is_none() && tail.is_end_stream(),
            Body::Client(c) => c.head.is_empty() && c.tail.is_end_stream(),
            Body::Watched(w) => w.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Stream { body, .. } => body.size_hint(),
            Body::Chain { head, tail, .. } => size_hint(head.iter(), tail),
            Body::Client(c) => size_hint(c.head.iter(), &c.tail),
            Body::Watched(w) => w.body.size_hint(),
        }
    }
}

/// A buffered head's length added to what the rest of the stream says.
fn size_hint<'a>(head: impl Iterator<Item = &'a Bytes>, tail: &Incoming) -> SizeHint {
    let extra: u64 = head.map(|h| h.len() as u64).sum();
    let tail = tail.size_hint();
    let mut hint = SizeHint::new();
    hint.set_lower(tail.lower() + extra);
    if let Some(upper) = tail.upper() {
        hint.set_upper(upper + extra);
    }
    hint
}

/// Frees the upstream slot as soon as the body has ended or failed, rather
/// than when the client has finished reading what is left in buffers.
fn release_at_end<T>(
    polled: &Poll<Option<Result<Frame<Bytes>, T>>>,
    body: &Incoming,
    slot: &mut Slot,
) {
    match polled {
        Poll::Ready(Some(Err(_))) => drop(slot.take()),
        Poll::Ready(None) => slot.take().map_or((), Lease::complete),
        _ if body.is_end_stream() => slot.take().map_or((), Lease::complete),
        _ => {}
    }
}

/// The outcome of reading an upstream body up to a limit.
pub enum Buffered {
    /// The whole body, at most `limit` bytes.
    Complete(Bytes),
    /// Larger than the limit: what was read, and the rest still to stream.
    /// Sent on as a [`Body::Chain`], so nothing is lost.
    TooLarge { head: Bytes, tail: Incoming },
}

/// Reads `body` whole if it is at most `limit` bytes. A body whose declared
/// length is already over the limit is not read at all. Trailers are
/// dropped: QuickBlox uses none. (The caller bounds the time.)
pub async fn buffer(mut body: Incoming, limit: usize) -> Result<Buffered, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Buffered::Complete(Bytes::new()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Buffered::TooLarge {
            head: Bytes::new(),
            tail: body,
        });
    }
    let mut acc = Chunks::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        acc.push(data);
        if acc.len > limit {
            return Ok(Buffered::TooLarge {
                head: acc.take(),
                tail: body,
            });
        }
    }
    Ok(Buffered::Complete(acc.take()))
}

/// Chunks read so far. The common case is one chunk: kept without copying.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    rest: BytesMut,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(data),
            prev => {
                if let Some(p) = prev {
                    self.rest.extend_from_slice(&p);
                }
                self.rest.extend_from_slice(&data);
            }
        }
    }

    fn take(&mut self) -> Bytes {
        self.first
            .take()
            .unwrap_or_else(|| self.rest.split().freeze())
    }
}

/// A client's body read so far, with its memory taken from the budget
/// *before* it is allocated, so the budget bounds what is really held. One
/// chunk is kept as it came; more are copied into one buffer, sized once
/// when the length is known, else grown by doubling.
#[derive(Default)]
struct Accumulator {
    first: Option<Bytes>,
    buf: Vec<u8>,
    len: usize,
    /// The declared length, if any.
    expected: Option<usize>,
}

impl Accumulator {
    /// Keeps `data`, or gives it back if the budget has no room for it.
    fn push(&mut self, data: Bytes, reserved: &mut Reservation, limit: usize) -> Result<(), Bytes> {
        if self.first.is_none() && self.buf.capacity() == 0 {
            if !reserved.grow(data.len(), limit) {
                return Err(data);
            }
            self.len = data.len();
            self.first = Some(data);
            return Ok(());
        }
        let required = self.len + data.len();
        if required > self.buf.capacity() {
            let new_cap = match self.expected {
                Some(n) if n >= required => n,
                _ => required.max(self.buf.capacity() * 2).max(16 * 1024),
            };
            // The new buffer is taken from the budget before it exists; the
            // old one (or the first chunk) is given back once copied.
            if !reserved.grow(new_cap, limit) {
                return Err(data);
            }
            let mut grown = Vec::with_capacity(new_cap);
            let freed = match self.first.take() {
                Some(first) => {
                    grown.extend_from_slice(&first);
                    first.len()
                }
                None => {
                    grown.extend_from_slice(&self.buf);
                    self.buf.capacity()
                }
            };
            self.buf = grown;
            reserved.shrink(freed);
        }
        self.buf.extend_from_slice(&data);
        self.len = required;
        Ok(())
    }

    fn take(&mut self) -> Bytes {
        match self.first.take() {
            Some(first) => first,
            None => Bytes::from(std::mem::take(&mut self.buf)),
        }
    }
}

/// A client's request body, read for a possible replay.
pub enum ClientRead {
    /// Whole, with its share of the buffer budget (hold it while the bytes
    /// may be replayed).
    Complete(Bytes, Reservation),
    /// Not buffered whole: over `replay_limit`, or the budget was full. The
    /// head read so far (in order) and the rest, to stream upstream (no
    /// replay).
    Partial {
        head: Vec<Bytes>,
        tail: Incoming,
        scanner: Option<Scanner>,
        reserved: Reservation,
        /// True if the budget (not the size) stopped the buffering.
        budget_full: bool,
    },
}

/// Why a client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no request body bytes arrived in time")]
    TimedOut,
    #[error("request body is over the limit of {0} bytes")]
    TooLarge(u64),
    #[error("{0:?} in the request body")]
    Override(Found),
    #[error("could not read the request body: {0}")]
    Body(hyper::Error),
}

/// Reads a client's body to replay it if it is refused: whole if it is at
/// most `replay_limit` bytes and the budget (`budget_limit` bytes across
/// every request) has room, else as far as it got (see [`ClientRead`]).
/// Every wait for bytes ends at `limits`' idle timeout or deadline; a body
/// over `limits.max_bytes` or carrying `_method` is refused as soon as that
/// is known.
pub async fn read_client(
    mut body: Incoming,
    replay_limit: usize,
    budget: &Arc<Budget>,
    budget_limit: usize,
    limits: BodyLimits,
    mut scanner: Option<Scanner>,
) -> Result<ClientRead, ReadError> {
    let mut reserved = Reservation::new(budget);
    if body.is_end_stream() {
        return match scanner.as_mut().and_then(Scanner::finish) {
            Some(found) => Err(ReadError::Override(found)),
            None => Ok(ClientRead::Complete(Bytes::new(), reserved)),
        };
    }
    let hint = body.size_hint();
    let declared = hint.lower();
    if declared > limits.max_bytes {
        return Err(ReadError::TooLarge(limits.max_bytes));
    }
    if declared > replay_limit as u64 {
        return Ok(ClientRead::Partial {
            head: Vec::new(),
            tail: body,
            scanner,
            reserved,
            budget_full: false,
        });
    }
    let mut acc = Accumulator {
        expected: hint.exact().map(|n| n as usize),
        ..Accumulator::default()
    };
    loop {
        let frame = match timeout_at(limits.next_by(), body.frame()).await {
            Err(_) => return Err(ReadError::TimedOut),
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(ReadError::Body)?,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if (acc.len + data.len()) as u64 > limits.max_bytes {
            return Err(ReadError::TooLarge(limits.max_bytes));
        }
        if let Some(found) = scanner.as_mut().and_then(|s| s.feed(&data)) {
            return Err(ReadError::Override(found));
        }
        let fits = acc.len + data.len() <= replay_limit;
        let kept = if fits {
            acc.push(data, &mut reserved, budget_limit)
        } else {
            Err(data)
        };
        if let Err(data) = kept {
            return Ok(ClientRead::Partial {
                head: vec![acc.take(), data],
                tail: body,
                scanner,
                reserved,
                budget_full: fits,
            });
        }
    }
    match scanner.as_mut().and_then(Scanner::finish) {
        Some(found) => Err(ReadError::Override(found)),
        None => Ok(ClientRead::Complete(acc.take(), reserved)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(acc: &Accumulator) -> usize {
        acc.first.as_ref().map_or(0, Bytes::len) + acc.buf.capacity()
    }

    #[test]
    fn the_budget_is_taken_before_memory_is_and_covers_what_is_held() {
        let budget = Arc::new(Budget::default());
        let mut r = Reservation::new(&budget);
        let mut acc = Accumulator::default();
        let chunk = Bytes::from(vec![7u8; 10_000]);
        // One chunk: kept as it came.
        acc.push(chunk.clone(), &mut r, 1 << 20).unwrap();
        assert_eq!((budget.used(), held(&acc)), (10_000, 10_000));
        // More, length unknown: one buffer, grown by doubling, each growth
        // taken first; the budget always covers the memory held.
        for _ in 0..20 {
            acc.push(chunk.clone(), &mut r, 1 << 20).unwrap();
            assert!(
                budget.used() >= held(&acc),
                "{} < {}",
                budget.used(),
                held(&acc)
            );
            assert!(budget.used() <= 2 * acc.len + 16 * 1024);
        }
        // No room: the chunk comes back and nothing was allocated for it.
        let before = (budget.used(), acc.buf.capacity());
        let big = Bytes::from(vec![1u8; 1 << 20]);
        assert_eq!(acc.push(big.clone(), &mut r, 1 << 20), Err(big));
        assert_eq!((budget.used(), acc.buf.capacity()), before);
        let bytes = acc.take();
        assert_eq!(bytes.len(), 210_000);
        drop(r);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_declared_length_is_allocated_once() {
        let budget = Arc::new(Budget::default());
        let mut r = Reservation::new(&budget);
        let mut acc = Accumulator {
            expected: Some(30_000),
            ..Accumulator::default()
        };
        for _ in 0..3 {
            acc.push(Bytes::from(vec![1u8; 10_000]), &mut r, 1 << 20)
                .unwrap();
        }
        assert_eq!(acc.buf.capacity(), 30_000);
        assert_eq!(budget.used(), 30_000);
    }
}
