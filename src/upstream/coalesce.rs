//! Write coalescing for HTTP/2 connections to the upstream.
//!
//! The `h2` crate buffers at most one DATA frame of 256 bytes or more at a
//! time, and flushes the connection before it takes the next
//! (hyperium/h2#902). Over TLS each of those flushes is a TLS record and a
//! `writev`: fifty POSTs in flight on one connection make fifty writes,
//! where their HEADERS frames, small enough to be copied, go out in one.
//!
//! [`Coalesced`] sits between hyper and the TLS stream and gathers the bytes
//! of such flushes instead: a flush that follows a chained DATA frame (a
//! vectored write of more than one slice) is deferred, and the connection's
//! task is woken so that it is polled again; whatever it writes meanwhile
//! joins the same buffer. The bytes go out in one write at the first of:
//! - the connection's next read (every poll of an `h2` connection reads
//!   until the socket has nothing more, so the self-wake reaches it);
//! - a flush after a write that was not a chained DATA frame (the end of
//!   `h2`'s own batch);
//! - the buffer reaching [`LIMIT`] (the rest waits for the socket: the
//!   bound holds per connection);
//! - shutdown.
//!
//! With nothing gathered, writes that are not chained DATA frames (the
//! frames `h2` copies into its own buffer: HEADERS, small DATA, WINDOW_UPDATE)
//! pass straight through, so GETs cost no copy. HTTP/1.1 connections, which
//! write a request's head and body in one flush anyway, do not use it
//! (`connect.rs`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};

/// Bytes gathered before they are written whatever the flushes say.
pub const LIMIT: usize = 64 * 1024;

/// A connection whose writes are gathered when it speaks HTTP/2 (see the
/// module's documentation).
#[derive(Debug)]
pub struct Coalesced<T> {
    io: T,
    on: bool,
    buf: Vec<u8>,
    /// How much of `buf` is already written.
    sent: usize,
    /// Whether the last write was a chained DATA frame.
    chained: bool,
}

impl<T> Coalesced<T> {
    pub fn new(io: T, on: bool) -> Coalesced<T> {
        Coalesced {
            io,
            on,
            buf: Vec::new(),
            sent: 0,
            chained: false,
        }
    }

    /// Bytes gathered and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<T: Write + Unpin> Coalesced<T> {
    /// Writes out what is gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Room for `len` more bytes: the gathered ones are written first if
    /// they would pass the limit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buf.len() + len > LIMIT {
            std::task::ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Read + Write + Unpin> Read for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A deferred flush goes out now. If the socket is full, the read
        // goes on; the pending write has registered for the socket.
        if this.pending() > 0 {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.chained = false;
        if !this.on || this.pending() == 0 {
            // Nothing gathered to keep the order of: straight through.
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        std::task::ready!(this.poll_room(cx, data.len()))?;
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let chained = slices.iter().filter(|s| !s.is_empty()).count() > 1;
        this.chained = chained;
        if !this.on || (this.pending() == 0 && !chained) {
            return Pin::new(&mut this.io).poll_write_vectored(cx, slices);
        }
        let len = slices.iter().map(|s| s.len()).sum();
        std::task::ready!(this.poll_room(cx, len))?;
        for s in slices {
            this.buf.extend_from_slice(s);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.on || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.on && this.pending() > 0 {
            if this.chained {
                // h2 flushes only to make room for its next frame: gather
                // that too, and be polled again to write them out. A
                // second flush with nothing written since drains.
                this.chained = false;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// A socket that records each write it is given.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        /// Refuses writes as a full socket does.
        full: bool,
        vectored: bool,
    }

    impl Write for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            slices: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            let one: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let n = one.len();
            self.writes.push(one);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Read for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: ReadBufCursor<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        conn: Coalesced<Socket>,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Harness {
        fn new(h2: bool) -> Harness {
            let wakes = Arc::new(Wakes::default());
            Harness {
                conn: Coalesced::new(Socket::default(), h2),
                waker: Waker::from(wakes.clone()),
                wakes,
            }
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        /// Polls the connection once with the counting waker.
        fn poll<R>(
            &mut self,
            f: impl FnOnce(Pin<&mut Coalesced<Socket>>, &mut Context<'_>) -> R,
        ) -> R {
            let waker = self.waker.clone();
            f(Pin::new(&mut self.conn), &mut Context::from_waker(&waker))
        }

        /// A DATA frame as h2 writes one it chained: head and payload.
        fn chained(&mut self, byte: u8, len: usize) -> Poll<io::Result<usize>> {
            let (head, payload) = ([byte; 9], vec![byte; len]);
            self.poll(|c, cx| {
                c.poll_write_vectored(cx, &[io::IoSlice::new(&head), io::IoSlice::new(&payload)])
            })
        }

        /// Frames h2 copied into its own buffer: one slice.
        fn copied(&mut self, byte: u8, len: usize) -> Poll<io::Result<usize>> {
            let frames = vec![byte; len];
            self.poll(|c, cx| c.poll_write_vectored(cx, &[io::IoSlice::new(&frames)]))
        }

        fn flush(&mut self) -> Poll<io::Result<()>> {
            self.poll(|c, cx| c.poll_flush(cx))
        }

        fn read(&mut self) -> Poll<io::Result<()>> {
            let mut space = [0u8; 16];
            let mut buf = hyper::rt::ReadBuf::new(&mut space);
            self.poll(|c, cx| c.poll_read(cx, buf.unfilled()))
        }

        fn writes(&self) -> Vec<usize> {
            self.conn.io.writes.iter().map(Vec::len).collect()
        }
    }

    fn ready<T: std::fmt::Debug>(p: Poll<io::Result<T>>) -> T {
        match p {
            Poll::Ready(Ok(t)) => t,
            other => panic!("not ready: {other:?}"),
        }
    }

    /// The writes of an h2 batch of POSTs: a DATA frame chained, a flush to
    /// take the next, and so on: one write at the connection's next read,
    /// in order.
    #[test]
    fn chained_data_frames_and_their_flushes_go_out_in_one_write_at_the_next_read() {
        let mut h = Harness::new(true);
        for (i, byte) in [1u8, 2, 3].into_iter().enumerate() {
            assert_eq!(ready(h.chained(byte, 300)), 309);
            ready(h.flush());
            assert!(h.writes().is_empty(), "frame {i} written on its own");
            assert_eq!(
                h.wakes(),
                i + 1,
                "the flush wakes the task to be polled again"
            );
        }
        assert!(h.read().is_pending());
        assert_eq!(h.writes(), vec![3 * 309]);
        let out = &h.conn.io.writes[0];
        assert!(out[..309].iter().all(|&b| b == 1) && out[618..].iter().all(|&b| b == 3));
        assert_eq!(h.conn.pending(), 0);
    }

    /// h2 ends its batch with a flush after frames it copied: that flush
    /// writes everything out; so does a second flush with nothing written
    /// since the first (no task spins on a deferred flush).
    #[test]
    fn a_flush_that_ends_the_batch_or_repeats_writes_out() {
        let mut h = Harness::new(true);
        ready(h.chained(1, 300));
        ready(h.flush());
        ready(h.copied(2, 40));
        ready(h.flush());
        assert_eq!(h.writes(), vec![349]);

        ready(h.chained(3, 300));
        ready(h.flush());
        assert!(h.writes().len() == 1);
        ready(h.flush());
        assert_eq!(h.writes(), vec![349, 309]);
        assert_eq!(h.wakes(), 2);
    }

    /// With nothing gathered, frames h2 copied (small requests, GETs) pass
    /// straight through; so does everything on an HTTP/1.1 connection.
    #[test]
    fn with_nothing_gathered_and_over_http1_writes_pass_straight_through() {
        let mut h = Harness::new(true);
        ready(h.copied(1, 40));
        assert_eq!(h.writes(), vec![40]);
        ready(h.flush());
        assert_eq!(h.wakes(), 0);

        let mut h = Harness::new(false);
        ready(h.chained(1, 300));
        assert_eq!(h.writes(), vec![309]);
        ready(h.flush());
        assert_eq!(h.wakes(), 0);
        assert!(!h.conn.is_write_vectored(), "the socket's own answer");
    }

    /// The buffer holds at most LIMIT bytes: past it, what is gathered is
    /// written first, and a full socket holds the writer back.
    #[test]
    fn the_buffer_is_bounded_and_a_full_socket_holds_the_writer_back() {
        let mut h = Harness::new(true);
        let frames = LIMIT / 1009;
        for _ in 0..frames {
            ready(h.chained(7, 1000));
            ready(h.flush());
        }
        assert!(h.writes().is_empty());
        h.conn.io.full = true;
        assert!(h.chained(8, 1000).is_pending(), "gathered past the limit");
        assert_eq!(h.conn.pending(), frames * 1009);
        h.conn.io.full = false;
        assert_eq!(ready(h.chained(8, 1000)), 1009);
        assert_eq!(h.writes(), vec![frames * 1009]);
        assert_eq!(h.conn.pending(), 1009);
    }
}
