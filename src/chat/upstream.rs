//! The chat server's side: a WebSocket (`ws://` or `wss://`, subprotocol
//! `xmpp`) and the login qbproxy makes on it: stream open, features, SASL
//! (PLAIN, else SCRAM-SHA-1), its answer. After a success the server waits
//! for the stream's restart, which the client sends.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::sasl::{Plain, Scram};
use super::xml::Element;
use super::{ns, Io};
use crate::config::ChatConfig;

pub(crate) type Ws = WebSocketStream<Box<dyn Io>>;

/// Why the chat server could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChatUpstreamError {
    #[error("cannot connect to the chat server: {0}")]
    Connect(std::io::Error),
    #[error("TLS with the chat server failed: {0}")]
    Tls(std::io::Error),
    #[error("the chat server's WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("the chat server did not answer in time")]
    Timeout,
    #[error("the chat server closed the connection")]
    Closed,
    #[error("the chat server sent what XMPP does not allow here: {0}")]
    Protocol(String),
    #[error("the chat server offers neither PLAIN nor SCRAM-SHA-1")]
    NoMechanism,
}

/// What the chat server made of a login.
pub(crate) enum Login {
    /// `<success/>`: the stream restarts next.
    Success,
    /// `<failure>`, as the server sent it (passed on to the client).
    Failure(String),
}

impl Login {
    /// A refusal of the password itself (`not-authorized`), which a new
    /// session may cure.
    pub fn not_authorized(&self) -> bool {
        matches!(self, Login::Failure(f) if f.contains("not-authorized"))
    }
}

/// The WebSocket configuration of both sides: messages (elements) and
/// frames bounded by `chat.max_stanza_bytes`.
pub(crate) fn ws_config(cfg: &ChatConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(cfg.max_stanza_bytes))
        .max_frame_size(Some(cfg.max_stanza_bytes))
}

/// Connects to `chat.upstream` by `deadline`.
pub(crate) async fn connect(
    cfg: &ChatConfig,
    tls: &Arc<rustls::ClientConfig>,
    deadline: Instant,
) -> Result<Ws, ChatUpstreamError> {
    let uri = &cfg.upstream;
    let secure = uri.scheme_str() == Some("wss");
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = timeout_at(deadline, TcpStream::connect((host, port)))
        .await
        .map_err(|_| ChatUpstreamError::Timeout)?
        .map_err(ChatUpstreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if secure {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| ChatUpstreamError::Tls(std::io::Error::other(e)))?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        Box::new(
            timeout_at(deadline, connector.connect(name, tcp))
                .await
                .map_err(|_| ChatUpstreamError::Timeout)?
                .map_err(ChatUpstreamError::Tls)?,
        )
    } else {
        Box::new(tcp)
    };
    let mut req = uri
        .to_string()
        .into_client_request()
        .map_err(|e| ChatUpstreamError::Handshake(e.to_string()))?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static("xmpp"),
    );
    let handshake = tokio_tungstenite::client_async_with_config(req, io, Some(ws_config(cfg)));
    let (ws, resp) = timeout_at(deadline, handshake)
        .await
        .map_err(|_| ChatUpstreamError::Timeout)?
        .map_err(|e| ChatUpstreamError::Handshake(e.to_string()))?;
    let agreed = resp
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"xmpp"));
    if !agreed {
        return Err(ChatUpstreamError::Handshake(
            "the server did not agree to the xmpp subprotocol".into(),
        ));
    }
    Ok(ws)
}

/// The next element from the chat server, by `deadline`.
async fn next(ws: &mut Ws, deadline: Instant) -> Result<Element, ChatUpstreamError> {
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(ChatUpstreamError::Timeout),
            Ok(None | Some(Err(_))) => return Err(ChatUpstreamError::Closed),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => {
                return Element::parse(t.as_str())
                    .ok_or_else(|| ChatUpstreamError::Protocol(t.as_str().to_owned()))
            }
            Message::Close(_) => return Err(ChatUpstreamError::Closed),
            _ => continue,
        }
    }
}

async fn send(ws: &mut Ws, el: &Element) -> Result<(), ChatUpstreamError> {
    ws.send(Message::text(el.to_string()))
        .await
        .map_err(|_| ChatUpstreamError::Closed)
}

/// Opens the stream to `domain` and reads the mechanisms offered.
async fn open(
    ws: &mut Ws,
    domain: &str,
    deadline: Instant,
) -> Result<Vec<String>, ChatUpstreamError> {
    let open = Element::new("open")
        .with("xmlns", ns::FRAMING)
        .with("to", domain)
        .with("version", "1.0");
    send(ws, &open).await?;
    let opened = next(ws, deadline).await?;
    if opened.local() != "open" {
        return Err(ChatUpstreamError::Protocol(opened.to_string()));
    }
    let features = next(ws, deadline).await?;
    if features.local() != "features" {
        return Err(ChatUpstreamError::Protocol(features.to_string()));
    }
    Ok(features
        .find("mechanisms")
        .map(|m| {
            m.children
                .iter()
                .map(|c| c.text.trim().to_owned())
                .collect()
        })
        .unwrap_or_default())
}

/// Logs in as `local` (`{user_id}-{application_id}`) with `password` (a
/// session token), PLAIN if offered, else SCRAM-SHA-1.
pub(crate) async fn login(
    ws: &mut Ws,
    domain: &str,
    local: &str,
    password: &str,
    deadline: Instant,
) -> Result<Login, ChatUpstreamError> {
    let mechanisms = open(ws, domain, deadline).await?;
    let auth = |mechanism: &str, text: String| {
        Element::new("auth")
            .with("xmlns", ns::SASL)
            .with("mechanism", mechanism)
            .text(&text)
    };
    if mechanisms.iter().any(|m| m == "PLAIN") {
        send(ws, &auth("PLAIN", Plain::encode(local, password))).await?;
        return answer(next(ws, deadline).await?);
    }
    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-1") {
        return Err(ChatUpstreamError::NoMechanism);
    }
    let nonce = format!("{:032x}", rand::random::<u128>());
    let mut scram = Scram::new(local, password, &nonce);
    send(ws, &auth("SCRAM-SHA-1", scram.first())).await?;
    let challenge = next(ws, deadline).await?;
    if challenge.local() != "challenge" {
        return answer(challenge);
    }
    let Some(response) = scram.respond(&challenge.text) else {
        return Err(ChatUpstreamError::Protocol(challenge.to_string()));
    };
    let response = Element::new("response")
        .with("xmlns", ns::SASL)
        .text(&response);
    send(ws, &response).await?;
    let done = next(ws, deadline).await?;
    if done.local() == "success" && !scram.verify(&done.text) {
        return Err(ChatUpstreamError::Protocol(
            "the server's SCRAM signature does not prove it knows the token".into(),
        ));
    }
    answer(done)
}

/// Passes a client's own `<auth>` on as it came (a user qbproxy does not
/// hold, `chat.unknown_users = "pass"`).
pub(crate) async fn login_as_sent(
    ws: &mut Ws,
    domain: &str,
    auth: &Element,
    deadline: Instant,
) -> Result<Login, ChatUpstreamError> {
    open(ws, domain, deadline).await?;
    send(ws, auth).await?;
    answer(next(ws, deadline).await?)
}

fn answer(el: Element) -> Result<Login, ChatUpstreamError> {
    match el.local() {
        "success" => Ok(Login::Success),
        "failure" => Ok(Login::Failure(el.to_string())),
        _ => Err(ChatUpstreamError::Protocol(el.to_string())),
    }
}
