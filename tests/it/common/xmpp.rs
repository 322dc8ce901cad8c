//! A bare XMPP-over-WebSocket client (RFC 7395) for the chat tests: what an
//! SDK sends, message by message, with every wait bounded.

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::bounded;

pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";

/// An IQ result, in either quoting (Prosody writes single quotes).
pub fn is_result(iq: &str) -> bool {
    iq.contains(r#"type="result""#) || iq.contains("type='result'")
}

pub struct Xmpp {
    ws: WebSocketStream<TcpStream>,
}

impl Xmpp {
    /// Connects to `url` (`ws://host:port`), asking for the `xmpp`
    /// subprotocol.
    pub async fn connect(url: &str) -> Xmpp {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", "xmpp".parse().unwrap());
        let host = url.trim_start_matches("ws://");
        let host = host.split('/').next().unwrap();
        let tcp = TcpStream::connect(host).await.unwrap();
        let (ws, resp) = bounded(
            "a WebSocket handshake",
            tokio_tungstenite::client_async(req, tcp),
        )
        .await
        .unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("xmpp")
        );
        Xmpp { ws }
    }

    pub async fn send(&mut self, xml: &str) {
        self.ws.send(Message::text(xml)).await.unwrap();
    }

    /// The next text message; `None` if the connection closed.
    pub async fn recv(&mut self) -> Option<String> {
        loop {
            match bounded("an XMPP message", self.ws.next()).await {
                Some(Ok(Message::Text(t))) => return Some(t.to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn open(&mut self, domain: &str) -> (String, String) {
        self.send(&format!(
            r#"<open xmlns="{FRAMING}" to="{domain}" version="1.0"/>"#
        ))
        .await;
        let open = self.recv().await.expect("an open");
        let features = self.recv().await.expect("features");
        (open, features)
    }

    /// SASL PLAIN as the SDKs send it; the server's answer.
    pub async fn auth(&mut self, local: &str, password: &str) -> String {
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{password}"));
        self.send(&format!(
            r#"<auth xmlns="{SASL}" mechanism="PLAIN">{plain}</auth>"#
        ))
        .await;
        self.recv().await.expect("a SASL answer")
    }

    /// Opens, authenticates, reopens, binds `resource` and sends initial
    /// presence; the bound JID, or the SASL failure.
    pub async fn login(
        url: &str,
        domain: &str,
        local: &str,
        password: &str,
        resource: &str,
    ) -> Result<(Xmpp, String), String> {
        let mut c = Xmpp::connect(url).await;
        let (_, features) = c.open(domain).await;
        assert!(features.contains("PLAIN"), "{features}");
        let answer = c.auth(local, password).await;
        if !answer.starts_with("<success") {
            return Err(answer);
        }
        let (_, features) = c.open(domain).await;
        assert!(features.contains("bind"), "{features}");
        c.send(&format!(
            r#"<iq type="set" id="b1" xmlns="jabber:client"><bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"><resource>{resource}</resource></bind></iq>"#
        ))
        .await;
        let bound = c.recv().await.expect("a bind result");
        let jid = bound
            .split("<jid>")
            .nth(1)
            .and_then(|r| r.split("</jid>").next())
            .unwrap_or_else(|| panic!("a JID in {bound}"))
            .to_owned();
        c.send(r#"<iq type="set" id="s1" xmlns="jabber:client"><session xmlns="urn:ietf:params:xml:ns:xmpp-session"/></iq>"#)
            .await;
        let session = c.recv().await.expect("a session result");
        assert!(is_result(&session), "{session}");
        c.send(r#"<presence xmlns="jabber:client"/>"#).await;
        Ok((c, jid))
    }
}

/// A bare XMPP-over-TCP client (RFC 6120) for the chat tests: one XML
/// stream each way, read as text until what a test expects arrives.
pub struct XmppTcp {
    io: Box<dyn Stream>,
    read: String,
}

pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream to='chat.example' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

impl XmppTcp {
    pub async fn connect(addr: std::net::SocketAddr) -> XmppTcp {
        XmppTcp {
            io: Box::new(TcpStream::connect(addr).await.unwrap()),
            read: String::new(),
        }
    }

    pub async fn send(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        self.io.write_all(text.as_bytes()).await.unwrap();
    }

    /// Reads until `needle` arrived; returns what came up to its end, and
    /// keeps the rest. Panics (bounded) if the stream ends first.
    pub async fn expect(&mut self, needle: &str) -> String {
        use tokio::io::AsyncReadExt;
        bounded(needle, async {
            loop {
                if let Some(at) = self.read.find(needle) {
                    let rest = self.read.split_off(at + needle.len());
                    return std::mem::replace(&mut self.read, rest);
                }
                let mut buf = [0u8; 4096];
                let n = self.io.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended before {needle:?}: {}", self.read);
                self.read.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
        })
        .await
    }

    /// STARTTLS on this stream, trusting `ca` for `localhost`.
    pub async fn starttls(&mut self, ca: rustls::pki_types::CertificateDer<'static>) {
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        self.expect("<proceed").await;
        self.expect("/>").await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let plain = std::mem::replace(
            &mut self.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        self.io = Box::new(
            bounded("a TLS handshake", connector.connect(name, plain))
                .await
                .unwrap(),
        );
        self.read.clear();
    }

    /// The stream opened, SASL PLAIN, reopened, bound to `resource`; the
    /// JID. `tls`: STARTTLS first, trusting this CA.
    pub async fn login(
        addr: std::net::SocketAddr,
        local: &str,
        password: &str,
        resource: &str,
        tls: Option<rustls::pki_types::CertificateDer<'static>>,
    ) -> XmppTcp {
        let mut c = XmppTcp::connect(addr).await;
        c.send(HEADER).await;
        if let Some(ca) = tls {
            c.expect("<starttls").await;
            c.expect("</stream:features>").await;
            c.starttls(ca).await;
            c.send(HEADER).await;
        }
        c.expect("<mechanism>PLAIN</mechanism>").await;
        c.expect("</stream:features>").await;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{password}"));
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
        ))
        .await;
        c.expect("<success").await;
        c.send(HEADER).await;
        c.expect("bind").await;
        c.expect("</stream:features>").await;
        c.send(&format!(
            "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
        .await;
        c.expect(&format!("/{resource}</jid>")).await;
        c.expect("</iq>").await;
        c.send("<presence/>").await;
        c
    }
}
