//! Making one connection to the upstream: TCP (hyper-util's `HttpConnector`:
//! resolution, connect timeout, `TCP_NODELAY`, keep-alive probes), then for
//! `https://` TLS with tokio-rustls, which resumes a session from the
//! shared cache when it can (counted, full or resumed), and ALPN, which
//! says whether the connection speaks HTTP/2.
//!
//! An HTTP/2 connection's bytes pass through [`FrameWatch`], which counts
//! the GOAWAY frames the upstream sends (hyper does not report them), and
//! its writes are gathered by [`Coalesced`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::coalesce::Coalesced;
use super::ConnectError;
use crate::config::UpstreamConfig;
use crate::telemetry::metrics::UpstreamMetrics;

/// A new connection, by what it will speak.
pub enum Connected {
    /// `http://`: HTTP/1.1 in the clear (the simulator, a sidecar).
    Plain(TokioIo<TcpStream>),
    /// TLS, HTTP/1.1.
    Tls(TokioIo<TlsStream<TcpStream>>),
    /// TLS, HTTP/2 by ALPN; the GOAWAY its server sends, when it does.
    H2(
        Coalesced<TokioIo<FrameWatch<TlsStream<TcpStream>>>>,
        Arc<Goaway>,
    ),
}

/// The last stream a server's GOAWAY lets finish: every stream it names
/// or one below was or will be processed, none above it was.
#[derive(Debug, Default)]
pub struct Goaway(AtomicU32);

impl Goaway {
    /// Stream ids are 31 bits; this marks "no GOAWAY yet".
    const NONE: u32 = u32::MAX;

    /// How many of the streams this client opened the server processed
    /// (client streams are 1, 3, 5...), if it sent a GOAWAY.
    pub fn processed(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            Goaway::NONE => None,
            last => Some(u64::from(last).div_ceil(2)),
        }
    }
}

/// Makes connections to one upstream.
pub struct Connector {
    tcp: HttpConnector,
    /// `scheme://authority`, what the TCP connector resolves.
    target: Uri,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// ALPN offers `h2`.
    h2: bool,
    pub timeout: Duration,
    metrics: UpstreamMetrics,
}

/// The TLS client configuration every worker's connections share (and so
/// its cache of sessions to resume: rustls keeps 256 by default): the
/// system's roots plus `upstream.ca_file`, and ALPN offering `h2` unless
/// `upstream.http2` is off.
pub fn tls_config(cfg: &UpstreamConfig) -> Result<Arc<ClientConfig>, io::Error> {
    let https = cfg.scheme == http::uri::Scheme::HTTPS;
    let roots = crate::net::tls::upstream_roots(https, cfg.ca.as_deref().unwrap_or(&[]))?;
    let mut config = crate::net::tls::client_config(roots)?;
    config.alpn_protocols = if cfg.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

impl Connector {
    pub fn new(cfg: &UpstreamConfig, tls: Arc<ClientConfig>, metrics: UpstreamMetrics) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(cfg.connect_timeout));
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        let target = Uri::builder()
            .scheme(cfg.scheme.clone())
            .authority(cfg.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_else(|e| unreachable!("a validated upstream URL: {e}"));
        let tls = (cfg.scheme == http::uri::Scheme::HTTPS).then(|| {
            // The host without brackets: an IP address or a DNS name, as
            // validated.
            let host = cfg.authority.host().trim_matches(['[', ']']).to_owned();
            let name = ServerName::try_from(host)
                .unwrap_or_else(|e| unreachable!("a validated upstream host: {e}"));
            (TlsConnector::from(tls), name)
        });
        Connector {
            tcp,
            target,
            h2: tls.is_some() && cfg.http2,
            tls,
            timeout: cfg.connect_timeout,
            metrics,
        }
    }

    /// Whether new connections will likely speak HTTP/2.
    pub fn offers_h2(&self) -> bool {
        self.h2
    }

    /// One new connection, TLS handshake done. The caller bounds the time
    /// (TCP alone is bounded by `upstream.connect_timeout` here).
    pub async fn connect(&self) -> Result<Connected, ConnectError> {
        let mut tcp = self.tcp.clone();
        let tcp = tower_service::Service::call(&mut tcp, self.target.clone())
            .await
            .map_err(|e| ConnectError::Tcp(e.into()))?
            .into_inner();
        let Some((tls, name)) = &self.tls else {
            return Ok(Connected::Plain(TokioIo::new(tcp)));
        };
        let stream = tls
            .connect(name.clone(), tcp)
            .await
            .map_err(ConnectError::Tls)?;
        let session = stream.get_ref().1;
        self.metrics
            .handshake(session.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        Ok(if session.alpn_protocol() == Some(b"h2") {
            let goaway = Arc::new(Goaway(AtomicU32::new(Goaway::NONE)));
            let watched = FrameWatch::new(stream, self.metrics.goaways.clone(), goaway.clone());
            Connected::H2(Coalesced::new(TokioIo::new(watched), true), goaway)
        } else {
            Connected::Tls(TokioIo::new(stream))
        })
    }
}

/// An HTTP/2 connection's byte stream, read frame header by frame header
/// for the GOAWAY frames the server sends: it sends one before it closes
/// (nginx after `keepalive_requests`, at its idle timeout, on reload), and
/// hyper only says that the connection ended. Each is counted, and the
/// last stream it lets finish is kept (the pool learns from it how many
/// requests the server takes on one connection).
pub struct FrameWatch<T> {
    io: T,
    scan: FrameScan,
    goaways: IntCounter,
    goaway: Arc<Goaway>,
}

impl<T> FrameWatch<T> {
    fn new(io: T, goaways: IntCounter, goaway: Arc<Goaway>) -> Self {
        FrameWatch {
            io,
            scan: FrameScan::default(),
            goaways,
            goaway,
        }
    }
}

/// Where the reader is in the server's frames (RFC 9113 §4.1: a 9-byte
/// header whose first three bytes are the payload's length, the fourth its
/// type). The server's side of a connection starts with a frame. A
/// GOAWAY's payload opens with the last stream id (31 bits, §6.8).
#[derive(Default)]
struct FrameScan {
    /// A frame header, then a GOAWAY's last stream id, as they arrive.
    bytes: [u8; 9],
    have: usize,
    /// Reading a GOAWAY's last stream id rather than a header.
    in_goaway: bool,
    /// Payload bytes still to pass over.
    skip: usize,
}

/// The GOAWAY frame's type (RFC 9113 §6.8).
const GOAWAY: u8 = 0x7;

impl FrameScan {
    /// Reads `data`, the next bytes of the stream; returns the last stream
    /// id of every GOAWAY frame it completed.
    fn feed(&mut self, mut data: &[u8], mut goaway: impl FnMut(u32)) {
        while !data.is_empty() {
            let want = if self.in_goaway { 4 } else { 9 };
            if self.skip > 0 && !self.in_goaway {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (want - self.have).min(data.len());
            self.bytes[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < want {
                continue;
            }
            self.have = 0;
            let b = &self.bytes;
            if self.in_goaway {
                self.in_goaway = false;
                self.skip -= 4;
                goaway(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff);
            } else {
                self.skip = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                // A GOAWAY shorter than its fixed 8 bytes is a protocol
                // error that h2 reports; it is passed over here.
                self.in_goaway = b[3] == GOAWAY && self.skip >= 8;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let (goaways, goaway) = (&this.goaways, &this.goaway);
            this.scan.feed(&buf.filled()[before..], |last| {
                goaways.inc();
                goaway.0.store(last, Ordering::Relaxed);
                tracing::debug!(
                    last_stream = last,
                    "the upstream sent GOAWAY: no new requests go on this connection"
                );
            });
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, slices)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn goaway(last: u32, debug: &[u8]) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 0]); // NO_ERROR
        payload.extend_from_slice(debug);
        frame(GOAWAY, &payload)
    }

    /// GOAWAY frames and their last stream ids are read wherever the reads
    /// split the stream, and payload bytes that look like a GOAWAY's type
    /// are not one.
    #[test]
    fn goaway_frames_are_read_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(0x4, &[0x7; 18])); // SETTINGS
        stream.extend(frame(0x1, &[0x7; 40])); // HEADERS
        stream.extend(goaway(0x8000_0000 | 2_147_483_647, b""));
        stream.extend(frame(0x0, &vec![0x7; 70_000])); // DATA, a long one
        stream.extend(goaway(19, b"too many requests"));
        for chunk in [1, 2, 5, 9, 10, 13, 4096, stream.len()] {
            let mut scan = FrameScan::default();
            let mut seen = Vec::new();
            for c in stream.chunks(chunk) {
                scan.feed(c, |last| seen.push(last));
            }
            assert_eq!(seen, [2_147_483_647, 19], "read {chunk} bytes at a time");
            assert_eq!((scan.have, scan.skip, scan.in_goaway), (0, 0, false));
        }
    }

    #[test]
    fn a_goaway_says_how_many_client_streams_were_processed() {
        let g = Goaway(AtomicU32::new(Goaway::NONE));
        assert_eq!(g.processed(), None);
        g.0.store(19, Ordering::Relaxed);
        assert_eq!(g.processed(), Some(10));
        g.0.store(0, Ordering::Relaxed);
        assert_eq!(g.processed(), Some(0));
    }
}
