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
use crate::config::UpstreamConfig;
use crate::metrics::UpstreamMetrics;

/// A new connection, by what it will speak.
pub enum Connected {
    /// `http://`: HTTP/1.1 in the clear (the simulator, a sidecar).
    Plain(TokioIo<TcpStream>),
    /// TLS, HTTP/1.1.
    Tls(TokioIo<TlsStream<TcpStream>>),
    /// TLS, HTTP/2 by ALPN.
    H2(Coalesced<TokioIo<FrameWatch<TlsStream<TcpStream>>>>),
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
    let roots = crate::tls::upstream_roots(https, cfg.ca.as_deref().unwrap_or(&[]))?;
    let mut config = crate::tls::client_config(roots)?;
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
    pub async fn connect(&self) -> Result<Connected, String> {
        let mut tcp = self.tcp.clone();
        let tcp = tower_service::Service::call(&mut tcp, self.target.clone())
            .await
            .map_err(|e| super::describe(&e))?
            .into_inner();
        let Some((tls, name)) = &self.tls else {
            return Ok(Connected::Plain(TokioIo::new(tcp)));
        };
        let stream = tls
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let session = stream.get_ref().1;
        self.metrics
            .handshake(session.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        Ok(if session.alpn_protocol() == Some(b"h2") {
            let watched = FrameWatch::new(stream, self.metrics.goaways.clone());
            Connected::H2(Coalesced::new(TokioIo::new(watched), true))
        } else {
            Connected::Tls(TokioIo::new(stream))
        })
    }
}

/// An HTTP/2 connection's byte stream, read frame header by frame header
/// to count the GOAWAY frames the server sends: it sends one before it
/// closes (nginx after `keepalive_requests`, at its idle timeout, on
/// reload), and hyper only says that the connection ended.
pub struct FrameWatch<T> {
    io: T,
    scan: FrameScan,
    goaways: IntCounter,
}

impl<T> FrameWatch<T> {
    fn new(io: T, goaways: IntCounter) -> Self {
        FrameWatch {
            io,
            scan: FrameScan::default(),
            goaways,
        }
    }
}

/// Where the reader is in the server's frames (RFC 9113 §4.1: a 9-byte
/// header whose first three bytes are the payload's length, the fourth its
/// type). The server's side of a connection starts with a frame.
#[derive(Default)]
struct FrameScan {
    header: [u8; 9],
    have: usize,
    /// Payload bytes still to pass over.
    skip: usize,
}

/// The GOAWAY frame's type (RFC 9113 §6.8).
const GOAWAY: u8 = 0x7;

impl FrameScan {
    /// Reads `data`, the next bytes of the stream; returns how many GOAWAY
    /// frame headers it completed.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut goaways = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                let h = &self.header;
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                if h[3] == GOAWAY {
                    goaways += 1;
                }
                self.have = 0;
            }
        }
        goaways
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
            let seen = this.scan.feed(&buf.filled()[before..]);
            if seen > 0 {
                this.goaways.inc_by(seen);
                tracing::debug!("the upstream sent GOAWAY: no new requests go on this connection");
            }
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

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.resize(9 + payload, 0x7);
        f
    }

    /// GOAWAY frames are counted wherever the reads split the stream, and
    /// a payload byte that looks like GOAWAY's type is not one.
    #[test]
    fn goaway_frames_are_counted_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(0x4, 18)); // SETTINGS
        stream.extend(frame(0x1, 40)); // HEADERS (payload of 0x07 bytes)
        stream.extend(frame(GOAWAY, 8));
        stream.extend(frame(0x0, 70_000)); // DATA, a long one
        stream.extend(frame(GOAWAY, 8));
        for chunk in [1, 2, 5, 9, 10, 4096, stream.len()] {
            let mut scan = FrameScan::default();
            let seen: u64 = stream.chunks(chunk).map(|c| scan.feed(c)).sum();
            assert_eq!(seen, 2, "read {chunk} bytes at a time");
            assert_eq!((scan.have, scan.skip), (0, 0));
        }
    }
}
