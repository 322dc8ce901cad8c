//! qbproxy against a hostile client. Every proxy client is untrusted, with
//! or without a key: these tests drive raw HTTP/1 bytes and HTTP/2 frames
//! (through the `h2` crate, which sends methods and paths exactly as
//! given), and assert what the upstream received, not only what the client
//! saw. Each module is one class of attack from issue 10.

mod methods;
mod paths;
mod rack;
mod secrets;
mod slow;
mod tokens;

use std::net::SocketAddr;

use crate::common::bounded;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
pub const KEY: &str = "attacker-key-0123456789";

/// A response read off a raw connection.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    /// The value of a response header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn error_code(&self) -> &str {
        self.header("qbproxy-error").unwrap_or("")
    }

    /// Answered by the simulator (its echo, no `QBProxy-Error`), whatever
    /// the status: the request was forwarded, not refused.
    pub fn answered_upstream(&self) -> bool {
        self.error_code().is_empty() && self.body.contains("\"echo\"")
    }
}

/// Sends `request` (raw bytes, which should say `Connection: close`) on a
/// new connection and reads the answer until the server closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    parse(&crate::common::raw(addr, request).await)
}

pub fn parse(text: &str) -> Raw {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// A request line and headers, `Connection: close`, an empty body unless
/// `body` is given (with its `Content-Length`).
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r =
        format!("{method} {target} HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

/// An HTTP/2 connection (prior knowledge) whose driver runs on a task; the
/// handle resolves when the server closes the connection.
pub async fn h2(
    addr: SocketAddr,
    builder: h2::client::Builder,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = bounded("the h2 handshake", builder.handshake(tcp))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

/// Sends one HTTP/2 request with the method and path exactly as given and
/// reads the answer.
pub async fn h2_send(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let ready = bounded("the h2 stream", send.clone().ready())
        .await
        .unwrap();
    *send = ready;
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = bounded("the h2 response", resp).await.unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = bounded("the h2 body", body.data()).await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (parts.status, parts.headers, Bytes::from(out))
}

/// Writes `head` and part of a body, then keeps the connection open
/// without sending more.
pub async fn stall(addr: SocketAddr, head: &str, partial_body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(partial_body).await.unwrap();
    s
}

/// Reads a stalled connection's answer until the server closes it.
pub async fn answer_of(mut s: TcpStream) -> Raw {
    let mut out = Vec::new();
    bounded("the answer", s.read_to_end(&mut out))
        .await
        .unwrap();
    parse(&String::from_utf8_lossy(&out))
}

/// HTTP/2 at the frame level, for what no client library will send.
pub mod frames {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;
    pub const ACK: u8 = 1;
    pub const REFUSED_STREAM: u32 = 7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A header block of literal fields (no indexing, no Huffman), names
    /// and values shorter than 127 bytes.
    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in fields {
            b.push(0);
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
        }
        b
    }

    /// A request stream's HEADERS frame, ending the stream.
    pub fn request(stream: u32, method: &str, path: &str) -> Vec<u8> {
        let fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "proxy"),
            (":path", path),
        ];
        frame(HEADERS, END_STREAM | END_HEADERS, stream, &block(&fields))
    }

    /// The preface and empty SETTINGS.
    pub async fn open(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        s
    }

    /// The next frame: type, flags, stream, payload. `None` once closed.
    pub async fn read(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }
}
