//! The client's side of a chat connection, over either transport: XMPP
//! over WebSocket (one element per message, `<open/>` and `<close/>`,
//! RFC 7395) or XMPP over TCP (one XML stream, `<stream:stream>` and
//! `</stream:stream>`, RFC 6120, read with [`Splitter`]). The login and the
//! relay see the same parts either way.

use std::collections::VecDeque;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::split::{Part, SplitError, Splitter};
use super::xml::Element;
use super::{ns, Io};

/// What the client sent, transport aside.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A stream (re)opened, to this domain (if it named one).
    Open(Option<String>),
    /// One element, as written.
    Element(String),
    /// The stream closed (`<close/>`, `</stream:stream>`).
    Close,
}

/// Why the client's side ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It closed (or went away).
    Closed,
    /// An element over the limit.
    TooLarge,
    /// What XMPP does not allow.
    NotWellFormed,
    /// The transport failed.
    Failed(String),
}

impl Ended {
    pub fn reason(&self) -> &'static str {
        match self {
            Ended::Closed => "client closed",
            Ended::TooLarge => "element too large",
            Ended::NotWellFormed => "not well-formed",
            Ended::Failed(_) => "client failed",
        }
    }
}

pub(crate) enum Transport {
    WebSocket(Box<WebSocketStream<Box<dyn Io>>>),
    Tcp(Box<TcpStream>),
}

/// XMPP over TCP: the byte stream, its parts as they complete.
pub(crate) struct TcpStream {
    pub io: Box<dyn Io>,
    split: Splitter,
    parts: VecDeque<Part>,
    max: usize,
}

impl TcpStream {
    pub fn new(io: Box<dyn Io>, max: usize) -> TcpStream {
        TcpStream {
            io,
            split: Splitter::new(max),
            parts: VecDeque::new(),
            max,
        }
    }

    /// A new stream on a new layer (after STARTTLS): reading starts over.
    pub fn restart(&mut self, io: Box<dyn Io>) {
        self.io = io;
        self.split = Splitter::new(self.max);
        self.parts.clear();
    }
}

pub(crate) struct ClientSide {
    pub transport: Transport,
    /// The longest a write to the client may wait for it to read
    /// (`limits.send_timeout`): a client that stops reading does not hold
    /// its connection, and the chat server's, for ever.
    pub send_timeout: std::time::Duration,
}

impl ClientSide {
    /// SASL succeeded: the client starts a new stream on the same bytes
    /// (RFC 6120 §6.4.6), which over TCP is read from its header anew.
    pub fn restarting(&mut self) {
        if let Transport::Tcp(tcp) = &mut self.transport {
            tcp.split = Splitter::new(tcp.max);
            tcp.parts.clear();
        }
    }

    /// The next thing the client sent.
    pub async fn next(&mut self) -> Result<Incoming, Ended> {
        match &mut self.transport {
            Transport::WebSocket(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(from_framed(t.as_str())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Binary(_))) => return Err(Ended::NotWellFormed),
                    Some(Ok(Message::Close(_))) | None => return Err(Ended::Closed),
                    Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                        return Err(Ended::TooLarge)
                    }
                    Some(Err(e)) => return Err(Ended::Failed(e.to_string())),
                }
            },
            Transport::Tcp(tcp) => loop {
                if let Some(part) = tcp.parts.pop_front() {
                    return Ok(match part {
                        Part::Header(h) => Incoming::Open(attr_of(&h, "to")),
                        Part::Element(e) => Incoming::Element(e),
                        Part::End => Incoming::Close,
                    });
                }
                let mut buf = [0u8; 8192];
                let n = match tcp.io.read(&mut buf).await {
                    Ok(0) => return Err(Ended::Closed),
                    Ok(n) => n,
                    Err(e) => return Err(Ended::Failed(e.to_string())),
                };
                let mut parts = Vec::new();
                tcp.split.feed(&buf[..n], &mut parts).map_err(|e| match e {
                    SplitError::TooLarge(_) => Ended::TooLarge,
                    SplitError::NotWellFormed => Ended::NotWellFormed,
                })?;
                tcp.parts.extend(parts);
            },
        }
    }

    /// The next element before the login, read; `Err` if the client sent
    /// something else or went away.
    pub async fn next_element(&mut self) -> Result<Element, Ended> {
        match self.next().await? {
            Incoming::Element(e) => Element::parse(&e).ok_or(Ended::NotWellFormed),
            Incoming::Open(_) | Incoming::Close => Err(Ended::NotWellFormed),
        }
    }

    /// Opens the stream toward the client: `from` the domain, with a new
    /// stream id.
    pub async fn open(&mut self, from: &str, id: &str) -> Result<(), Ended> {
        match &mut self.transport {
            Transport::WebSocket(_) => {
                let open = Element::new("open")
                    .with("xmlns", ns::FRAMING)
                    .with("from", from)
                    .with("id", id)
                    .with("version", "1.0")
                    .with("xml:lang", "en");
                self.send(&open.to_string()).await
            }
            Transport::Tcp(_) => {
                let mut header = Element::new("stream:stream")
                    .with("xmlns", "jabber:client")
                    .with("xmlns:stream", ns::STREAMS)
                    .with("from", from)
                    .with("id", id)
                    .with("version", "1.0")
                    .with("xml:lang", "en")
                    .to_string();
                // A start tag, never closed until the stream ends.
                header.truncate(header.len() - 2);
                header.push('>');
                self.send(&format!("<?xml version='1.0'?>{header}")).await
            }
        }
    }

    /// Sends one element (or, over TCP, any stream text) as it is, within
    /// the send timeout.
    pub async fn send(&mut self, text: &str) -> Result<(), Ended> {
        let limit = self.send_timeout;
        match tokio::time::timeout(limit, self.write(text)).await {
            Ok(sent) => sent,
            Err(_) => Err(Ended::Failed(format!(
                "the client read nothing for {limit:?} (limits.send_timeout)"
            ))),
        }
    }

    async fn write(&mut self, text: &str) -> Result<(), Ended> {
        let sent = match &mut self.transport {
            Transport::WebSocket(ws) => ws
                .send(Message::text(text))
                .await
                .map_err(|e| e.to_string()),
            Transport::Tcp(tcp) => {
                // Through TLS, so flushed: the element goes now.
                let io = &mut tcp.io;
                let written = async {
                    io.write_all(text.as_bytes()).await?;
                    io.flush().await
                };
                written.await.map_err(|e| e.to_string())
            }
        };
        sent.map_err(Ended::Failed)
    }

    pub async fn send_element(&mut self, el: &Element) -> Result<(), Ended> {
        self.send(&el.to_string()).await
    }

    /// Closes the stream and the connection.
    pub async fn close(&mut self) {
        let closing = async {
            match &mut self.transport {
                Transport::WebSocket(ws) => {
                    let close = Element::new("close").with("xmlns", ns::FRAMING);
                    let _ = ws.send(Message::text(close.to_string())).await;
                    let _ = (**ws).close(None).await;
                }
                Transport::Tcp(tcp) => {
                    let _ = tcp.io.write_all(b"</stream:stream>").await;
                    let _ = tcp.io.shutdown().await;
                }
            }
        };
        let _ = tokio::time::timeout(self.send_timeout, closing).await;
    }

    /// A stream error, then the stream's end (RFC 6120 §4.9).
    pub async fn stream_error(&mut self, condition: &str) {
        let error = Element::new("stream:error")
            .with("xmlns:stream", ns::STREAMS)
            .child(Element::new(condition).with("xmlns", ns::STREAM_ERRORS));
        let _ = self.send_element(&error).await;
        self.close().await;
    }

    /// Passes on what the chat server sent (one element of XMPP over
    /// WebSocket): its stream open becomes this transport's, its close
    /// ends the stream.
    pub async fn relay_from_server(&mut self, text: &str) -> Result<(), Ended> {
        match from_framed(text) {
            Incoming::Element(e) => self.send(&e).await,
            Incoming::Open(_) => {
                let el = Element::parse(text).ok_or(Ended::NotWellFormed)?;
                let from = el.attr("from").unwrap_or_default().to_owned();
                let id = el.attr("id").unwrap_or_default().to_owned();
                self.open(&from, &id).await
            }
            Incoming::Close => {
                self.close().await;
                Err(Ended::Closed)
            }
        }
    }
}

/// Whether a message of XMPP over WebSocket is an element (a stanza, the
/// features, SASL, …) rather than the stream's `<open/>` or `<close/>`.
pub(crate) fn is_element(text: &str) -> bool {
    matches!(from_framed(text), Incoming::Element(_))
}

/// A framed message read as the part it is.
fn from_framed(text: &str) -> Incoming {
    let t = text.trim_start();
    let named = |name: &str| {
        t.strip_prefix('<')
            .and_then(|r| r.strip_prefix(name))
            .is_some_and(|r| r.starts_with([' ', '/', '>', '\t', '\n', '\r']))
    };
    if named("open") {
        Incoming::Open(attr_of(t, "to"))
    } else if named("close") {
        Incoming::Close
    } else {
        Incoming::Element(text.to_owned())
    }
}

/// An attribute of a start tag, read without a full parse (a stream header
/// is a start tag alone, not a well-formed element).
fn attr_of(tag: &str, name: &str) -> Option<String> {
    let mut closed = tag
        .trim_end()
        .trim_end_matches('>')
        .trim_end_matches('/')
        .to_owned();
    closed.push_str("/>");
    Element::parse(&closed)?.attr(name).map(str::to_owned)
}

/// An element from a client over TCP, framed for XMPP over WebSocket: a
/// stanza inherits `jabber:client` from the stream over TCP, and must
/// carry it itself in a message of its own (RFC 7395 §3.3.3).
pub(crate) fn framed_for_websocket(element: &str) -> String {
    let name_end = element[1..]
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .map_or(element.len(), |i| i + 1);
    let name = &element[1..name_end];
    let stanza = matches!(name, "message" | "presence" | "iq");
    let has_xmlns = attr_of(
        &element[..element.find('>').map_or(element.len(), |i| i + 1)],
        "xmlns",
    )
    .is_some();
    if !stanza || has_xmlns {
        return element.to_owned();
    }
    format!(
        "{} xmlns=\"jabber:client\"{}",
        &element[..name_end],
        &element[name_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_over_tcp_gain_their_namespace_for_a_websocket() {
        assert_eq!(
            framed_for_websocket("<message to='a'><body>x</body></message>"),
            "<message xmlns=\"jabber:client\" to='a'><body>x</body></message>"
        );
        assert_eq!(
            framed_for_websocket("<presence/>"),
            "<presence xmlns=\"jabber:client\"/>"
        );
        let has = "<iq xmlns='jabber:client' type='get'/>";
        assert_eq!(framed_for_websocket(has), has);
        let other = "<r xmlns='urn:xmpp:sm:3'/>";
        assert_eq!(framed_for_websocket(other), other);
    }

    #[test]
    fn framed_messages_are_read_as_their_parts() {
        assert!(matches!(
            from_framed(r#"<open xmlns="urn:ietf:params:xml:ns:xmpp-framing" to="chat.example" version="1.0"/>"#),
            Incoming::Open(Some(d)) if d == "chat.example"
        ));
        assert!(matches!(
            from_framed(r#"<close xmlns="x"/>"#),
            Incoming::Close
        ));
        assert!(matches!(from_framed("<openly/>"), Incoming::Element(_)));
        assert_eq!(
            attr_of(
                "<stream:stream xmlns='jabber:client' xmlns:stream='s' to='d' version='1.0'>",
                "to"
            )
            .as_deref(),
            Some("d")
        );
    }
}
