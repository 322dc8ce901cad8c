//! Making one connection to the upstream: TCP (hyper-util's `HttpConnector`:
//! resolution, connect timeout, `TCP_NODELAY`, keep-alive probes), then for
//! `https://` TLS with tokio-rustls, which resumes a session from the
//! shared cache when it can (counted, full or resumed), and ALPN, which
//! says whether the connection speaks HTTP/2.
//!
//! An HTTP/2 connection's bytes pass through [`FrameWatch`], which reads
//! what the upstream's SETTINGS and GOAWAY frames say (hyper reports
//! neither when it happens), and its writes are gathered by [`Coalesced`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// TLS, HTTP/2 by ALPN; what its server's frames say.
    H2(
        Coalesced<TokioIo<FrameWatch<TlsStream<TcpStream>>>>,
        Arc<ServerFrames>,
    ),
}

/// What an HTTP/2 server's frames said, as they are read: its stream limit
/// (SETTINGS) and the last stream its GOAWAY lets finish.
pub struct ServerFrames {
    /// Stream ids are 31 bits; `u32::MAX` marks "no GOAWAY yet".
    goaway: AtomicU32,
    /// `u64::MAX` marks "no SETTINGS yet".
    streams: AtomicU64,
    /// Called with the new limit when a SETTINGS frame sets it.
    on_limit: Box<dyn Fn(usize) + Send + Sync>,
}

impl ServerFrames {
    /// `on_limit` is called, on the connection's task as it reads, each
    /// time the server sets its stream limit.
    pub fn new(on_limit: impl Fn(usize) + Send + Sync + 'static) -> Self {
        ServerFrames {
            goaway: AtomicU32::new(u32::MAX),
            streams: AtomicU64::new(u64::MAX),
            on_limit: Box::new(on_limit),
        }
    }

    /// How many of the streams this client opened the server processed
    /// (client streams are 1, 3, 5...), if it sent a GOAWAY: every stream
    /// the GOAWAY names or one below was or will be processed, none above.
    pub fn processed(&self) -> Option<u64> {
        match self.goaway.load(Ordering::Relaxed) {
            u32::MAX => None,
            last => Some(u64::from(last).div_ceil(2)),
        }
    }

    /// The streams the server allows at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`; `usize::MAX` if its first
    /// SETTINGS set no limit), once its SETTINGS arrived.
    pub fn streams(&self) -> Option<usize> {
        match self.streams.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    fn seen(&self, frame: Seen) {
        match frame {
            Seen::Goaway(last) => {
                self.goaway.store(last, Ordering::Relaxed);
                tracing::debug!(
                    last_stream = last,
                    "the upstream sent GOAWAY: no new requests go on this connection"
                );
            }
            Seen::Streams(n) => {
                self.streams.store(n.min(u64::MAX - 1), Ordering::Relaxed);
                (self.on_limit)(usize::try_from(n).unwrap_or(usize::MAX));
            }
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
    /// Connects; an HTTP/2 connection's frames are read into `frames`.
    pub async fn connect(
        &self,
        frames: impl FnOnce() -> ServerFrames,
    ) -> Result<Connected, ConnectError> {
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
            let frames = Arc::new(frames());
            let watched = FrameWatch::new(stream, self.metrics.goaways.clone(), frames.clone());
            Connected::H2(Coalesced::new(TokioIo::new(watched), true), frames)
        } else {
            Connected::Tls(TokioIo::new(stream))
        })
    }
}

/// An HTTP/2 connection's byte stream, read frame header by frame header
/// for the SETTINGS and GOAWAY frames the server sends, as h2 reads them.
/// A SETTINGS frame says how many streams the server allows at once: the
/// pool gives a connection no more (else h2 queues the rest on it, behind
/// the requests it carries, while another connection could take them),
/// and h2's own view is read only when a request is sent. A GOAWAY comes
/// before the server closes (nginx after `keepalive_requests`, at its idle
/// timeout, on reload), where hyper only says that the connection ended:
/// each is counted, and the last stream it lets finish is kept (the pool
/// learns from it how many requests the server takes on one connection).
pub struct FrameWatch<T> {
    io: T,
    scan: FrameScan,
    goaways: IntCounter,
    frames: Arc<ServerFrames>,
}

impl<T> FrameWatch<T> {
    fn new(io: T, goaways: IntCounter, frames: Arc<ServerFrames>) -> Self {
        FrameWatch {
            io,
            scan: FrameScan::default(),
            goaways,
            frames,
        }
    }
}

/// Where the reader is in the server's frames (RFC 9113 §4.1: a 9-byte
/// header whose first three bytes are the payload's length, the fourth its
/// type, the fifth its flags). The server's side of a connection starts
/// with a frame, its SETTINGS (§3.4).
#[derive(Default)]
struct FrameScan {
    /// A frame header, a GOAWAY's last stream id or a SETTINGS entry, as
    /// they arrive.
    bytes: [u8; 9],
    have: usize,
    reading: Reading,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The stream limit the SETTINGS frame being read sets, if it does.
    max_streams: Option<u32>,
    /// Whether a SETTINGS frame (not an ACK) was read before.
    had_settings: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Reading {
    #[default]
    Header,
    /// A GOAWAY's last stream id (31 bits, §6.8), then the rest passed over.
    GoawayLast,
    /// SETTINGS entries, 6 bytes each: a 16-bit id, a 32-bit value (§6.5.1).
    SettingsEntry,
    /// A payload passed over.
    Skip,
}

/// What the scanner saw in a frame it completed.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A GOAWAY's last stream id.
    Goaway(u32),
    /// A SETTINGS frame's stream limit: the value it sets, or no limit if
    /// the server's first SETTINGS sets none (§6.5.2: unlimited at first).
    Streams(u64),
}

/// Frame types and the setting read (RFC 9113 §6.5, §6.5.2, §6.8).
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const SETTINGS_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

impl FrameScan {
    /// Reads `data`, the next bytes of the stream, and tells `seen` what
    /// each frame it completed says.
    fn feed(&mut self, mut data: &[u8], mut seen: impl FnMut(Seen)) {
        while !data.is_empty() {
            let want = match self.reading {
                Reading::Skip => {
                    let n = self.left.min(data.len());
                    self.left -= n;
                    data = &data[n..];
                    if self.left == 0 {
                        self.reading = Reading::Header;
                    }
                    continue;
                }
                Reading::Header => 9,
                Reading::GoawayLast => 4,
                Reading::SettingsEntry => 6,
            };
            let n = (want - self.have).min(data.len());
            self.bytes[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < want {
                continue;
            }
            self.have = 0;
            let b = self.bytes;
            match self.reading {
                Reading::Header => self.header(&b, &mut seen),
                Reading::GoawayLast => {
                    self.left -= 4;
                    self.reading = Reading::Skip;
                    seen(Seen::Goaway(
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff,
                    ));
                }
                Reading::SettingsEntry => {
                    self.left -= 6;
                    if u16::from_be_bytes([b[0], b[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS {
                        self.max_streams = Some(u32::from_be_bytes([b[2], b[3], b[4], b[5]]));
                    }
                    if self.left == 0 {
                        self.settings_end(&mut seen);
                    }
                }
                Reading::Skip => unreachable!("skipped above"),
            }
            if self.reading == Reading::Skip && self.left == 0 {
                self.reading = Reading::Header;
            }
        }
    }

    fn header(&mut self, b: &[u8; 9], seen: &mut impl FnMut(Seen)) {
        self.left = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        let (kind, flags) = (b[3], b[4]);
        // Malformed frames (a GOAWAY shorter than its fixed 8 bytes, a
        // SETTINGS not in whole entries) are protocol errors that h2
        // reports; they are passed over here.
        self.reading = match kind {
            GOAWAY if self.left >= 8 => Reading::GoawayLast,
            SETTINGS if flags & SETTINGS_ACK == 0 && self.left % 6 == 0 => {
                self.max_streams = None;
                if self.left == 0 {
                    self.settings_end(seen);
                    return;
                }
                Reading::SettingsEntry
            }
            _ => Reading::Skip,
        };
    }

    fn settings_end(&mut self, seen: &mut impl FnMut(Seen)) {
        self.reading = Reading::Header;
        let first = !std::mem::replace(&mut self.had_settings, true);
        match (self.max_streams.take(), first) {
            (Some(n), _) => seen(Seen::Streams(u64::from(n))),
            (None, true) => seen(Seen::Streams(u64::MAX)),
            (None, false) => {}
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
            let (goaways, frames) = (&this.goaways, &this.frames);
            this.scan.feed(&buf.filled()[before..], |frame| {
                if let Seen::Goaway(_) = frame {
                    goaways.inc();
                }
                frames.seen(frame);
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

    fn frame_with_flags(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = frame(kind, payload);
        f[4] = flags;
        f
    }

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = entries
            .iter()
            .flat_map(|(id, value)| [id.to_be_bytes().as_slice(), &value.to_be_bytes()].concat())
            .collect();
        frame(SETTINGS, &payload)
    }

    /// Everything `stream` says, fed `chunk` bytes at a time.
    fn scan(stream: &[u8], chunk: usize) -> Vec<Seen> {
        let mut scan = FrameScan::default();
        let mut seen = Vec::new();
        for c in stream.chunks(chunk) {
            scan.feed(c, |frame| seen.push(frame));
        }
        assert_eq!(
            (scan.have, scan.left, scan.reading),
            (0, 0, Reading::Header),
            "between frames after {chunk} bytes at a time"
        );
        seen
    }

    const SPLITS: [usize; 9] = [1, 2, 5, 6, 9, 10, 13, 4096, usize::MAX];

    /// GOAWAY frames and their last stream ids are read wherever the reads
    /// split the stream, and payload bytes that look like a GOAWAY's type
    /// are not one.
    #[test]
    fn goaway_frames_are_read_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(settings(&[(0x0707, 7), (0x0707, 7)]));
        stream.extend(frame(0x1, &[0x7; 40])); // HEADERS
        stream.extend(goaway(0x8000_0000 | 2_147_483_647, b""));
        stream.extend(frame(0x0, &vec![0x7; 70_000])); // DATA, a long one
        stream.extend(goaway(19, b"too many requests"));
        for chunk in SPLITS {
            assert_eq!(
                scan(&stream, chunk),
                [
                    Seen::Streams(u64::MAX),
                    Seen::Goaway(2_147_483_647),
                    Seen::Goaway(19)
                ],
                "read {chunk} bytes at a time"
            );
        }
    }

    /// The server's stream limit is read from its SETTINGS wherever the
    /// reads split them: its first SETTINGS without a limit means none;
    /// a later one without a limit changes nothing, one with a limit sets
    /// it; ACKs and malformed SETTINGS say nothing; a SETTINGS frame's
    /// last value for the setting counts.
    #[test]
    fn settings_frames_say_the_servers_stream_limit() {
        let mut stream = Vec::new();
        stream.extend(settings(&[(0x1, 4096), (0x3, 128), (0x4, 65_535)]));
        stream.extend(frame_with_flags(SETTINGS, SETTINGS_ACK, &[]));
        stream.extend(frame(0x1, &[0x4, 0, 0, 0, 0, 3, 0, 0, 0, 1])); // HEADERS
        stream.extend(settings(&[(0x4, 1 << 20)]));
        stream.extend(frame(SETTINGS, &[0, 3, 0, 0, 0])); // not whole entries
        stream.extend(settings(&[(0x3, 100), (0x3, 4)]));
        for chunk in SPLITS {
            assert_eq!(
                scan(&stream, chunk),
                [Seen::Streams(128), Seen::Streams(4)],
                "read {chunk} bytes at a time"
            );
        }
        for chunk in SPLITS {
            let unlimited = [settings(&[]), settings(&[(0x3, 8)])].concat();
            assert_eq!(
                scan(&unlimited, chunk),
                [Seen::Streams(u64::MAX), Seen::Streams(8)]
            );
        }
    }

    #[test]
    fn a_goaway_says_how_many_client_streams_were_processed() {
        let f = ServerFrames::new(|_| {});
        assert_eq!(f.processed(), None);
        f.seen(Seen::Goaway(19));
        assert_eq!(f.processed(), Some(10));
        f.seen(Seen::Goaway(0));
        assert_eq!(f.processed(), Some(0));
    }

    #[test]
    fn settings_set_the_stream_limit_and_call_back() {
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = told.clone();
        let f = ServerFrames::new(move |n| t.lock().unwrap().push(n));
        assert_eq!(f.streams(), None);
        f.seen(Seen::Streams(4));
        assert_eq!(f.streams(), Some(4));
        f.seen(Seen::Streams(u64::MAX));
        assert!(
            f.streams().is_some_and(|n| n > u32::MAX as usize),
            "no limit"
        );
        assert_eq!(*told.lock().unwrap(), [4, usize::MAX]);
    }
}
