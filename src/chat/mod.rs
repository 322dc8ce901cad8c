//! Chat through qbproxy: XMPP over WebSocket (RFC 7395), logged in with
//! the session qbproxy holds.
//!
//! A client (an official SDK) connects to `[chat] websocket_addr` (TLS
//! with `[listen]`'s certificate when it has one) and opens a stream;
//! qbproxy answers it itself and offers SASL PLAIN. The client logs in as
//! `{user_id}-{application_id}` with any password (with `[[client]]` keys
//! configured: its key). When qbproxy holds a session for that user (an
//! identity or a pool member whose session is that user's) and the client
//! may act as it (its `[[client]]` rules, for `POST /chat/xmpp`), qbproxy
//! connects to the chat server and logs in there with the session's token;
//! refused as not authorized (the token died), it renews the session once
//! and tries again. The client gets `<success/>`, never the token; from its
//! stream's restart on, every element passes through unread, both ways,
//! under the element size limit and the idle timeout.
//!
//! A user qbproxy holds no session for is refused, or with
//! `chat.unknown_users = "pass"` logs in with its own credentials.

pub(crate) mod client;
pub(crate) mod sasl;
pub(crate) mod split;
pub(crate) mod upstream;
pub(crate) mod xml;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;

use self::client::{ClientSide, Ended, Incoming, Transport};
use self::sasl::Plain;
use self::upstream::{ChatUpstreamError, Login, Ws};
use self::xml::Element;
use crate::app::live::Live;
use crate::config::{ChatConfig, UnknownUsers};
use crate::session::{Identity, Scheme};
use crate::telemetry::metrics::Metrics;

/// A byte stream either side of a chat connection runs on.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// XMPP's namespaces qbproxy speaks before the login.
pub(crate) mod ns {
    pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    pub const STREAMS: &str = "http://etherx.jabber.org/streams";
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
}

/// What every chat connection shares.
pub(crate) struct Chat {
    live: Arc<ArcSwap<Live>>,
    metrics: Metrics,
    /// TLS to a `wss://` chat server: the system's roots and
    /// `upstream.ca_file`, ALPN `http/1.1`.
    upstream_tls: Arc<rustls::ClientConfig>,
    /// `chat.max_connections`.
    slots: Arc<Semaphore>,
}

impl Chat {
    pub fn new(
        live: Arc<ArcSwap<Live>>,
        metrics: Metrics,
        cfg: &ChatConfig,
    ) -> Result<Chat, std::io::Error> {
        let upstream = live.load().config.upstream.clone();
        let secure = cfg.upstream.scheme_str() == Some("wss");
        let roots = crate::net::tls::upstream_roots(secure, upstream.ca.as_deref().unwrap_or(&[]))?;
        let mut tls = crate::net::tls::client_config(roots)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Chat {
            live,
            metrics,
            upstream_tls: Arc::new(tls),
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
        })
    }
}

/// A chat listener's transport (`qbproxy::process::ChatTransport`: its
/// sockets are handed over in an upgrade, and passed by systemd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// XMPP over WebSocket (browsers), TLS first when configured:
    /// `chat.websocket_addr`.
    WebSocket,
    /// XMPP over TCP (Node, iOS, Android), STARTTLS when configured:
    /// `chat.tcp_addr`.
    Tcp,
}

impl Kind {
    /// The name of its socket in a systemd socket unit
    /// (`FileDescriptorName=`).
    pub const fn socket_name(self) -> &'static str {
        match self {
            Kind::WebSocket => "chat-websocket",
            Kind::Tcp => "chat-tcp",
        }
    }

    /// The config key of its address.
    pub const fn config_key(self) -> &'static str {
        match self {
            Kind::WebSocket => "chat.websocket_addr",
            Kind::Tcp => "chat.tcp_addr",
        }
    }
}

/// `[chat]`'s listening sockets, by transport.
pub type Sockets = Vec<(Kind, std::net::TcpListener)>;

/// The listening sockets `chat` asks for: of `given` (handed over by the
/// process this one takes over from, or passed by systemd), each whose
/// transport `chat` listens on, at its address (any port when the config
/// says port 0), in non-blocking mode; the addresses none of them has,
/// bound. The rest of `given` is closed, with a log line. Taking what is
/// given is what lets an upgrade keep `[chat]`'s ports: the process being
/// replaced still holds them.
pub(crate) fn sockets(chat: Option<&ChatConfig>, mut given: Sockets) -> Result<Sockets, BindError> {
    let mut sockets = Vec::new();
    for kind in [Kind::WebSocket, Kind::Tcp] {
        let wanted = chat.and_then(|c| match kind {
            Kind::WebSocket => c.websocket_addr,
            Kind::Tcp => c.tcp_addr,
        });
        let Some(addr) = wanted else { continue };
        let serves = |at: SocketAddr| at == addr || (addr.port() == 0 && at.ip() == addr.ip());
        let listener = match given
            .iter()
            .position(|(k, l)| *k == kind && l.local_addr().is_ok_and(serves))
        {
            Some(i) => given.swap_remove(i).1,
            None => std::net::TcpListener::bind(addr).map_err(|source| BindError {
                key: kind.config_key(),
                addr,
                source,
            })?,
        };
        listener.set_nonblocking(true).map_err(|source| BindError {
            key: kind.config_key(),
            addr,
            source,
        })?;
        sockets.push((kind, listener));
    }
    for (kind, unused) in given {
        tracing::info!(
            transport = kind.socket_name(),
            addr = %unused.local_addr().map_or(String::new(), |a| a.to_string()),
            "a chat socket passed to this process is not one [chat] listens on; closing it"
        );
    }
    Ok(sockets)
}

/// A chat listener that could not be bound.
#[derive(Debug)]
pub(crate) struct BindError {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Serves chat connections of `kind` on `listener` until `stopping`.
pub(crate) async fn serve(
    chat: Arc<Chat>,
    kind: Kind,
    listener: TcpListener,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "chat listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopping.changed() => return,
        };
        let Ok(slot) = chat.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                peer = %peer,
                "chat.max_connections chat connections are open; closing a new one"
            );
            continue;
        };
        let chat = chat.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(&chat, kind, tcp, peer, stopping).await;
        });
    }
}

/// One connection's record, logged when it ends.
#[derive(Default)]
struct Record {
    client: Option<Arc<str>>,
    identity: Option<String>,
    user: Option<u64>,
    stanzas_in: u64,
    stanzas_out: u64,
    reason: &'static str,
}

async fn connection(
    chat: &Chat,
    kind: Kind,
    tcp: TcpStream,
    peer: SocketAddr,
    stopping: watch::Receiver<bool>,
) {
    let transport = match kind {
        Kind::WebSocket => "websocket",
        Kind::Tcp => "tcp",
    };
    let _open = chat.metrics.chat().open(transport);
    let started = Instant::now();
    let live = chat.live.load_full();
    let Some(cfg) = live.config.chat.clone() else {
        return;
    };
    let _ = tcp.set_nodelay(true);
    let deadline = started + cfg.login_timeout;
    let mut record = Record::default();
    let connected = match kind {
        Kind::WebSocket => timeout_at(deadline, websocket(&live, &cfg, tcp, peer)).await,
        Kind::Tcp => Ok(Some(ClientSide {
            transport: Transport::Tcp(Box::new(client::TcpStream::new(
                Box::new(tcp),
                cfg.max_stanza_bytes,
            ))),
            send_timeout: live.config.limits.send_timeout,
        })),
    };
    let Ok(Some(mut client)) = connected else {
        return;
    };
    let login = timeout_at(
        deadline,
        log_in(chat, &live, &cfg, &mut client, peer, &mut record),
    )
    .await;
    match login {
        Ok(Ok((up, domain))) => {
            relay(chat, &cfg, &mut client, up, &domain, &mut record, stopping).await
        }
        Ok(Err(reason)) => {
            record.reason = reason;
            client.close().await;
        }
        Err(_) => {
            record.reason = "login timeout";
            client.stream_error("connection-timeout").await;
        }
    }
    let duration = started.elapsed();
    if live.config.log.access {
        tracing::info!(
            target: "qbproxy::access",
            kind = "chat",
            transport,
            peer = %peer,
            client = record.client.as_deref().unwrap_or(""),
            identity = record.identity.as_deref().unwrap_or(""),
            user = record.user.unwrap_or(0),
            duration_ms = duration.as_millis() as u64,
            stanzas_in = record.stanzas_in,
            stanzas_out = record.stanzas_out,
            reason = record.reason,
            "chat"
        );
    }
}

/// TLS (with `[listen]`'s certificate, if it has one) and the WebSocket
/// handshake.
async fn websocket(
    live: &Live,
    cfg: &ChatConfig,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<ClientSide> {
    let io: Box<dyn Io> = match &live.tls {
        Some(tls) => match tokio_rustls::TlsAcceptor::from(with_alpn(tls, &[b"http/1.1"]))
            .accept(tcp)
            .await
        {
            Ok(s) => Box::new(s),
            Err(e) => {
                tls_failed(peer, &e);
                return None;
            }
        },
        None => Box::new(tcp),
    };
    let accept = tokio_tungstenite::accept_hdr_async_with_config(
        io,
        subprotocol,
        Some(upstream::ws_config(cfg)),
    );
    match accept.await {
        Ok(ws) => Some(ClientSide {
            transport: Transport::WebSocket(Box::new(ws)),
            send_timeout: live.config.limits.send_timeout,
        }),
        Err(e) => {
            tracing::info!(peer = %peer, error = %e, "chat: not a WebSocket for XMPP");
            None
        }
    }
}

/// `[listen]`'s TLS with other ALPN protocols: a WebSocket is HTTP/1.1
/// (offered `h2`, a browser would try RFC 8441's WebSocket over HTTP/2),
/// and XMPP's STARTTLS names none.
fn with_alpn(tls: &Arc<rustls::ServerConfig>, protocols: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let mut config = (**tls).clone();
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn tls_failed(peer: SocketAddr, e: &std::io::Error) {
    tracing::info!(
        peer = %peer,
        error = %e,
        hint = crate::net::tls::handshake_hint(e).unwrap_or(""),
        "chat: TLS handshake failed"
    );
}

/// The WebSocket handshake's check: the client must offer the `xmpp`
/// subprotocol (RFC 7395 §3.2), which the answer names.
// The error type is tungstenite's, for its handshake callback.
#[allow(clippy::result_large_err)]
fn subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("xmpp"));
    if !offered {
        let mut refused = ErrorResponse::new(Some(
            "qbproxy's chat listener speaks XMPP over WebSocket: offer the subprotocol xmpp".into(),
        ));
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return Err(refused);
    }
    resp.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
    Ok(resp)
}

fn failure(condition: &str, text: &str) -> Element {
    Element::new("failure")
        .with("xmlns", ns::SASL)
        .child(Element::new(condition))
        .child(Element::new("text").with("xml:lang", "en").text(text))
}

/// The client's stream (re)opened: its domain, the stream answered. Over
/// TCP with a certificate, STARTTLS first (required), then the stream
/// again over TLS.
async fn negotiate(live: &Live, client: &mut ClientSide) -> Result<String, &'static str> {
    let domain = opened(client).await?;
    if let (Transport::Tcp(_), Some(tls)) = (&client.transport, &live.tls) {
        let starttls = Element::new("stream:features")
            .with("xmlns:stream", ns::STREAMS)
            .child(
                Element::new("starttls")
                    .with("xmlns", ns::TLS)
                    .child(Element::new("required")),
            );
        client
            .send_element(&starttls)
            .await
            .map_err(|_| "client gone")?;
        let asked = client.next_element().await.map_err(|e| e.reason())?;
        if asked.local() != "starttls" {
            client.stream_error("policy-violation").await;
            return Err("no STARTTLS");
        }
        client
            .send_element(&Element::new("proceed").with("xmlns", ns::TLS))
            .await
            .map_err(|_| "client gone")?;
        let Transport::Tcp(tcp) = &mut client.transport else {
            unreachable!("matched above");
        };
        let plain = std::mem::replace(
            &mut tcp.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let tls = tokio_rustls::TlsAcceptor::from(with_alpn(tls, &[]))
            .accept(plain)
            .await
            .map_err(|_| "TLS failed")?;
        tcp.restart(Box::new(tls));
        let again = opened(client).await?;
        if again != domain {
            client.stream_error("host-unknown").await;
            return Err("another domain");
        }
    }
    let features = Element::new("stream:features")
        .with("xmlns:stream", ns::STREAMS)
        .child(
            Element::new("mechanisms")
                .with("xmlns", ns::SASL)
                .child(Element::new("mechanism").text("PLAIN")),
        );
    client
        .send_element(&features)
        .await
        .map_err(|_| "client gone")?;
    Ok(domain)
}

/// Reads the client's stream open and answers it; its domain.
async fn opened(client: &mut ClientSide) -> Result<String, &'static str> {
    let domain = match client.next().await.map_err(|e| e.reason())? {
        Incoming::Open(Some(domain)) => domain,
        Incoming::Open(None) => {
            client.stream_error("host-unknown").await;
            return Err("no domain");
        }
        Incoming::Element(_) | Incoming::Close => {
            client.stream_error("not-authorized").await;
            return Err("no stream opened");
        }
    };
    let id = format!("{:016x}", rand::random::<u64>());
    client.open(&domain, &id).await.map_err(|_| "client gone")?;
    Ok(domain)
}

/// The client's stream open and SASL exchange, answered by qbproxy, and
/// the login on the chat server; the chat server's stream, logged in, and
/// the domain, or why not (the client was told).
async fn log_in(
    chat: &Chat,
    live: &Live,
    cfg: &ChatConfig,
    client: &mut ClientSide,
    peer: SocketAddr,
    record: &mut Record,
) -> Result<(Ws, String), &'static str> {
    let domain = negotiate(live, client).await?;
    let auth = client.next_element().await.map_err(|e| e.reason())?;
    if auth.local() != "auth" {
        client.stream_error("not-authorized").await;
        return Err("no login");
    }
    if auth.attr("mechanism") != Some("PLAIN") {
        let _ = client
            .send_element(&failure("invalid-mechanism", "qbproxy offers PLAIN"))
            .await;
        return Err("refused");
    }
    let Some(plain) = Plain::decode(&auth.text) else {
        let _ = client
            .send_element(&failure("malformed-request", "not a PLAIN message"))
            .await;
        return Err("refused");
    };
    let local = plain.local().to_owned();
    let app = &live.config.quickblox.application_id;
    let user = local
        .strip_suffix(&format!("-{app}"))
        .and_then(|id| id.parse::<u64>().ok());
    record.user = user;
    let refuse = |text: String| failure("not-authorized", &text);
    let client_key = match live.gate.admit_chat(peer.ip(), plain.password.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "chat login refused");
            chat.metrics.chat().login("", "", "refused");
            let _ = client.send_element(&refuse(format!("qbproxy: {e}"))).await;
            return Err("refused");
        }
    };
    record.client = client_key.map(|c| c.name.clone());
    let Some(user) = user else {
        let text =
            format!("qbproxy: log in as {{user_id}}-{app}, the JID's local part (got {local:?})");
        chat.metrics.chat().login("", "", "refused");
        let _ = client.send_element(&refuse(text)).await;
        return Err("refused");
    };
    let Some(identity) = holding(live, user) else {
        return match cfg.unknown_users {
            UnknownUsers::Refuse => {
                tracing::info!(
                    peer = %peer,
                    user,
                    "chat login refused: qbproxy holds no session for this user (chat.unknown_users = \"refuse\")"
                );
                chat.metrics.chat().login("", "", "refused");
                let text = format!("qbproxy holds no session for user {user}");
                let _ = client.send_element(&refuse(text)).await;
                Err("unknown user")
            }
            UnknownUsers::Pass => pass(chat, cfg, client, &domain, &auth)
                .await
                .map(|up| (up, domain)),
        };
    };
    let name = identity.name().to_owned();
    let pool = identity.info().pool.clone().unwrap_or_default();
    record.identity = Some(name.clone());
    if let Some(c) = client_key {
        let target_name = if pool.is_empty() { &name } else { &pool };
        let target = live.config.names.get(target_name).copied();
        let permitted = target.map(|t| c.permit(t, target_name, &Method::POST, "/chat/xmpp"));
        if let Some(Err(e)) = permitted {
            tracing::warn!(peer = %peer, error = %e, "chat login refused");
            chat.metrics.chat().login(&name, &pool, "refused");
            let _ = client.send_element(&refuse(format!("qbproxy: {e}"))).await;
            return Err("refused");
        }
    }
    let deadline = Instant::now() + cfg.login_timeout;
    let login = as_identity(chat, cfg, identity, &domain, &local, deadline).await;
    match login {
        Ok((up, outcome)) => {
            chat.metrics.chat().login(&name, &pool, outcome);
            client
                .send_element(&Element::new("success").with("xmlns", ns::SASL))
                .await
                .map_err(|_| "client gone")?;
            client.restarting();
            Ok((up, domain))
        }
        Err(LoginError::Refused(answer)) => {
            chat.metrics.chat().login(&name, &pool, "refused");
            tracing::warn!(
                identity = name,
                user,
                "the chat server refused the login with a renewed session token"
            );
            let answer = Element::parse(&answer).unwrap_or_else(|| refuse(String::new()));
            let _ = client.send_element(&answer).await;
            Err("refused upstream")
        }
        Err(LoginError::Upstream(e)) => {
            chat.metrics.chat().login(&name, &pool, "failed");
            tracing::warn!(identity = name, error = %e, "chat login failed");
            let text = format!("qbproxy: {e}");
            let _ = client
                .send_element(&failure("temporary-auth-failure", &text))
                .await;
            Err("chat server failed")
        }
        Err(LoginError::NoSession(e)) => {
            chat.metrics.chat().login(&name, &pool, "failed");
            let text = format!("qbproxy: {e}");
            let _ = client
                .send_element(&failure("temporary-auth-failure", &text))
                .await;
            Err("no session")
        }
    }
}

/// The identity (standalone or a pool member) whose session is user
/// `user`'s.
fn holding(live: &Live, user: u64) -> Option<&Identity> {
    live.identities
        .iter()
        .find(|i| i.current().is_some_and(|s| s.user_id() == user))
}

/// Why no session could be had, for the client's failure text.
fn no_session(e: crate::session::Unavailable) -> LoginError {
    LoginError::NoSession(match e {
        crate::session::Unavailable::Failed(e) => format!("no session for this user: {e}"),
        crate::session::Unavailable::TimedOut => {
            "no session for this user within chat.login_timeout".to_owned()
        }
    })
}

enum LoginError {
    /// The chat server's `<failure>`, with a renewed token too.
    Refused(String),
    Upstream(ChatUpstreamError),
    NoSession(String),
}

/// Logs in on the chat server with `identity`'s token; refused as not
/// authorized, with a renewed one (once). The outcome for the metric.
async fn as_identity(
    chat: &Chat,
    cfg: &ChatConfig,
    identity: &Identity,
    domain: &str,
    local: &str,
    deadline: Instant,
) -> Result<(Ws, &'static str), LoginError> {
    let mut session = identity.session(deadline).await.map_err(no_session)?;
    let mut renewed = false;
    loop {
        if session.scheme() != Scheme::QbToken {
            return Err(LoginError::NoSession(
                "this user's identity has an API key, not a session token to log in to chat with"
                    .into(),
            ));
        }
        let token = session.token().to_str().unwrap_or_default().to_owned();
        let mut up = upstream::connect(cfg, &chat.upstream_tls, deadline)
            .await
            .map_err(LoginError::Upstream)?;
        let login = upstream::login(&mut up, domain, local, &token, deadline)
            .await
            .map_err(LoginError::Upstream)?;
        match login {
            Login::Success => return Ok((up, if renewed { "renewed" } else { "ok" })),
            refused if refused.not_authorized() && !renewed => {
                let _ = up.close(None).await;
                tracing::info!(
                    identity = identity.name(),
                    token = %session.token_prefix(),
                    "the chat server refused the session's token; renewing it once"
                );
                identity.report_dead(&session);
                session = identity
                    .replacement(&session, deadline)
                    .await
                    .map_err(no_session)?;
                renewed = true;
            }
            Login::Failure(answer) => return Err(LoginError::Refused(answer)),
        }
    }
}

/// A user qbproxy does not hold, `chat.unknown_users = "pass"`: the
/// client's own `<auth>` goes to the chat server, and its answer back.
async fn pass(
    chat: &Chat,
    cfg: &ChatConfig,
    client: &mut ClientSide,
    domain: &str,
    auth: &Element,
) -> Result<Ws, &'static str> {
    let deadline = Instant::now() + cfg.login_timeout;
    let attempt = async {
        let mut up = upstream::connect(cfg, &chat.upstream_tls, deadline).await?;
        let login = upstream::login_as_sent(&mut up, domain, auth, deadline).await?;
        Ok::<_, ChatUpstreamError>((up, login))
    };
    match attempt.await {
        Ok((up, Login::Success)) => {
            chat.metrics.chat().login("", "", "passed");
            client
                .send_element(&Element::new("success").with("xmlns", ns::SASL))
                .await
                .map_err(|_| "client gone")?;
            client.restarting();
            Ok(up)
        }
        Ok((_, Login::Failure(answer))) => {
            chat.metrics.chat().login("", "", "refused");
            if let Some(answer) = Element::parse(&answer) {
                let _ = client.send_element(&answer).await;
            }
            Err("refused upstream")
        }
        Err(e) => {
            chat.metrics.chat().login("", "", "failed");
            let text = format!("qbproxy: {e}");
            let _ = client
                .send_element(&failure("temporary-auth-failure", &text))
                .await;
            Err("chat server failed")
        }
    }
}

/// How long the chat server has to answer a client's close.
const CLOSING: Duration = Duration::from_secs(5);

/// Both ways, element by element, until either side closes, nothing
/// moves for `chat.idle_timeout`, or qbproxy stops.
async fn relay(
    chat: &Chat,
    cfg: &ChatConfig,
    client: &mut ClientSide,
    mut up: Ws,
    domain: &str,
    record: &mut Record,
    mut stopping: watch::Receiver<bool>,
) {
    let (stanzas_in, stanzas_out) = chat.metrics.chat().stanzas();
    let mut idle_until = Instant::now() + cfg.idle_timeout;
    let restart = Element::new("open")
        .with("xmlns", ns::FRAMING)
        .with("to", domain)
        .with("version", "1.0")
        .to_string();
    let close = Element::new("close").with("xmlns", ns::FRAMING).to_string();
    // The client closed its stream: the server's answer (its own close)
    // is still passed on, for a few seconds at most.
    let mut closing = false;
    record.reason = loop {
        tokio::select! {
            from_client = client.next(), if !closing => {
                idle_until = Instant::now() + cfg.idle_timeout;
                let text = match from_client {
                    // The stream's restart after the login, or a later one.
                    Ok(Incoming::Open(_)) => restart.clone(),
                    Ok(Incoming::Element(e)) => {
                        stanzas_in.inc();
                        record.stanzas_in += 1;
                        client::framed_for_websocket(&e)
                    }
                    Ok(Incoming::Close) => {
                        closing = true;
                        idle_until = Instant::now() + CLOSING;
                        close.clone()
                    }
                    Err(ended) => {
                        if let Ended::Failed(e) = &ended {
                            tracing::debug!(error = %e, "chat: the client's side failed");
                        }
                        if !matches!(ended, Ended::Closed) {
                            tracing::info!(reason = ended.reason(), "chat: ending a client's connection");
                            client.stream_error(match ended {
                                Ended::TooLarge => "policy-violation",
                                _ => "not-well-formed",
                            }).await;
                        }
                        break ended.reason();
                    }
                };
                // The chat server reads within the same bound as clients.
                let sent = tokio::time::timeout(client.send_timeout, up.send(Message::text(text)));
                if !matches!(sent.await, Ok(Ok(()))) {
                    client.stream_error("remote-connection-failed").await;
                    break "chat server closed";
                }
            },
            from_up = up.next() => match from_up {
                Some(Ok(Message::Text(t))) => {
                    if client::is_element(t.as_str()) {
                        stanzas_out.inc();
                        record.stanzas_out += 1;
                    }
                    idle_until = Instant::now() + cfg.idle_timeout;
                    if let Err(ended) = client.relay_from_server(t.as_str()).await {
                        break match ended {
                            Ended::Closed if closing => "client closed",
                            Ended::Closed => "chat server closed",
                            other => other.reason(),
                        };
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_) | Message::Close(_))) | None | Some(Err(_)) => {
                    if closing {
                        client.close().await;
                        break "client closed";
                    }
                    client.stream_error("remote-connection-failed").await;
                    break "chat server closed";
                }
            },
            () = sleep_until(idle_until) => {
                if closing {
                    client.close().await;
                    break "client closed";
                }
                client.stream_error("connection-timeout").await;
                break "idle";
            }
            _ = stopping.changed() => {
                client.stream_error("system-shutdown").await;
                break "shutdown";
            }
        }
    };
    let closing = async {
        let _ = up.send(Message::text(close)).await;
        let _ = up.close(None).await;
    };
    let _ = tokio::time::timeout(CLOSING, closing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(websocket: &str, tcp: Option<&str>) -> ChatConfig {
        ChatConfig {
            websocket_addr: Some(websocket.parse().unwrap()),
            tcp_addr: tcp.map(|t| t.parse().unwrap()),
            upstream: "ws://127.0.0.1:1".parse().unwrap(),
            unknown_users: UnknownUsers::Refuse,
            max_connections: 1,
            max_stanza_bytes: 1024,
            idle_timeout: Duration::from_secs(1),
            login_timeout: Duration::from_secs(1),
        }
    }

    fn bound(addr: &str) -> std::net::TcpListener {
        std::net::TcpListener::bind(addr).unwrap()
    }

    /// A socket given for a transport the config listens on, at its
    /// address, is the one served (port 0 takes any port); a transport
    /// given none is bound; a given socket the config does not want (the
    /// wrong address, or a transport it does not listen on) is closed.
    #[test]
    fn given_sockets_are_served_where_the_config_listens_and_the_rest_closed() {
        let ws = bound("127.0.0.1:0");
        let ws_at = ws.local_addr().unwrap();
        let elsewhere = bound("127.0.0.1:0");
        let elsewhere_at = elsewhere.local_addr().unwrap();
        let given = vec![(Kind::Tcp, elsewhere), (Kind::WebSocket, ws)];

        let cfg = config("127.0.0.1:0", Some("127.0.0.1:0"));
        let served = sockets(Some(&cfg), given).unwrap();
        let at = |kind| {
            served
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, l)| l.local_addr().unwrap())
        };
        assert_eq!(at(Kind::WebSocket), Some(ws_at), "the given one");
        // Port 0 takes any port on its IP: the given TCP one too.
        assert_eq!(at(Kind::Tcp), Some(elsewhere_at));

        // A fixed address: a given socket elsewhere is closed, and the
        // configured address bound.
        let other = bound("127.0.0.1:0");
        let other_at = other.local_addr().unwrap();
        let free = bound("127.0.0.1:0").local_addr().unwrap();
        let cfg = config(&free.to_string(), None);
        let served = super::sockets(
            Some(&cfg),
            vec![(Kind::WebSocket, other), (Kind::Tcp, bound("127.0.0.1:0"))],
        )
        .unwrap();
        assert_eq!(served.len(), 1, "no TCP listener wanted");
        assert_eq!(served[0].1.local_addr().unwrap(), free);
        assert!(
            std::net::TcpStream::connect(other_at).is_err(),
            "the socket not wanted is closed"
        );

        // [chat] off: everything given is closed.
        let given = bound("127.0.0.1:0");
        let given_at = given.local_addr().unwrap();
        assert!(super::sockets(None, vec![(Kind::Tcp, given)])
            .unwrap()
            .is_empty());
        assert!(std::net::TcpStream::connect(given_at).is_err());
    }

    /// A configured address that cannot be bound names its key.
    #[test]
    fn an_address_taken_is_refused_with_its_key() {
        let taken = bound("127.0.0.1:0");
        let cfg = config(
            "127.0.0.1:0",
            Some(&taken.local_addr().unwrap().to_string()),
        );
        let e = sockets(Some(&cfg), Vec::new()).unwrap_err();
        assert_eq!(e.key, "chat.tcp_addr");
        assert_eq!(e.addr, taken.local_addr().unwrap());
    }
}
