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
        assert!(session.contains(r#"type="result""#), "{session}");
        c.send(r#"<presence xmlns="jabber:client"/>"#).await;
        Ok((c, jid))
    }
}
