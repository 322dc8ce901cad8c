//! The one body type that crosses qbproxy in both directions, and bounded
//! buffering.
//!
//! A body is either held whole in memory (cheap to clone, so a request can
//! be replayed), or streams from a hyper connection, possibly after a
//! buffered head that was read while deciding whether it fits.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One of the upstream's connection slots (`upstream.max_connections`),
/// held by the request that uses it until its response body is done
/// (`None` once released).
pub type Slot = Option<OwnedSemaphorePermit>;

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
    /// A client's request body on its way upstream: a buffered head, then
    /// the rest of the stream, failing once more than `left` bytes follow.
    Capped(Capped),
}

pub struct Capped {
    head: Option<Bytes>,
    tail: Incoming,
    left: u64,
    over: Arc<AtomicBool>,
}

/// The body limit was passed: the stream was cut off.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct OverLimit;

impl Body {
    /// `head` then `tail`, at most `limit` bytes in all. The flag turns true
    /// if the client sent more, so the caller can answer 413.
    pub fn capped(head: Bytes, tail: Incoming, limit: u64) -> (Body, Arc<AtomicBool>) {
        let over = Arc::new(AtomicBool::new(false));
        let head_len = head.len() as u64;
        if head_len > limit {
            over.store(true, Ordering::Relaxed);
        }
        let body = Body::Capped(Capped {
            head: (!head.is_empty()).then_some(head),
            tail,
            left: limit.saturating_sub(head_len),
            over: over.clone(),
        });
        (body, over)
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
    pub fn upstream(body: Incoming, slot: OwnedSemaphorePermit) -> Body {
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
            Body::Capped(c) => {
                if c.over.load(Ordering::Relaxed) {
                    return Poll::Ready(Some(Err(OverLimit.into())));
                }
                if let Some(h) = c.head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                match Pin::new(&mut c.tail).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                        if len > c.left {
                            c.over.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(OverLimit.into())));
                        }
                        c.left -= len;
                        Poll::Ready(Some(Ok(frame)))
                    }
                    other => other.map(boxed),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(data) => data.is_none(),
            Body::Stream { body, .. } => body.is_end_stream(),
            Body::Chain { head, tail, .. } => head.is_none() && tail.is_end_stream(),
            Body::Capped(c) => c.head.is_none() && c.tail.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Stream { body, .. } => body.size_hint(),
            Body::Chain { head, tail, .. } | Body::Capped(Capped { head, tail, .. }) => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let tail = tail.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(tail.lower() + extra);
                if let Some(upper) = tail.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// Frees the upstream slot as soon as the body has ended or failed, rather
/// than when the client has finished reading what is left in buffers.
fn release_at_end<T>(
    polled: &Poll<Option<Result<Frame<Bytes>, T>>>,
    body: &Incoming,
    slot: &mut Slot,
) {
    if matches!(polled, Poll::Ready(None | Some(Err(_)))) || body.is_end_stream() {
        slot.take();
    }
}

/// The outcome of reading a body up to a limit.
pub enum Buffered {
    /// The whole body, at most `limit` bytes.
    Complete(Bytes),
    /// Larger than the limit: what was read, and the rest still to stream.
    /// Sent on as a [`Body::Chain`], so nothing is lost.
    TooLarge { head: Bytes, tail: Incoming },
}

/// Reads `body` whole if it is at most `limit` bytes. A body whose declared
/// length is already over the limit is not read at all. Trailers are
/// dropped: QuickBlox uses none.
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
    // The common case is one frame: keep it without copying.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        len += data.len();
        match first.take() {
            None if rest.is_empty() => first = Some(data),
            prev => {
                if let Some(p) = prev {
                    rest.extend_from_slice(&p);
                }
                rest.extend_from_slice(&data);
            }
        }
        if len > limit {
            let head = first.take().unwrap_or_else(|| rest.split().freeze());
            return Ok(Buffered::TooLarge { head, tail: body });
        }
    }
    Ok(Buffered::Complete(first.unwrap_or_else(|| rest.freeze())))
}
