//! QuickBlox's chat, as much as the official SDKs need: XMPP over
//! WebSocket (RFC 7395, subprotocol `xmpp`, one element per message) on a
//! port of its own. Stream open and close; SASL PLAIN whose password is a
//! live session token of the JID's user (`{user_id}-{application_id}`) or
//! the user's password, else `not-authorized` "Password not verified";
//! resource binding and session; presence; one-to-one `<message>` routing
//! between connected users; pings (XEP-0199) and an empty roster. Any
//! other IQ is answered `feature-not-implemented` and counted, never
//! acknowledged as if done.

use std::collections::HashMap;
use std::sync::Weak;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;

use crate::xml::Element;
use crate::{Shared, Sim};

pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const STREAMS: &str = "http://etherx.jabber.org/streams";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const CLIENT: &str = "jabber:client";

/// The chat's record and who is online.
#[derive(Default)]
pub(crate) struct Chat {
    /// Bound resources by user: full JID and the way to its connection.
    pub online: HashMap<u64, Vec<(String, mpsc::UnboundedSender<String>)>>,
    pub logins: Vec<ChatLogin>,
    pub messages: Vec<ChatMessage>,
    pub unimplemented: u64,
}

/// A SASL login, as the chat server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatLogin {
    pub user_id: u64,
    /// With what the password matched: a live session's token, the user's
    /// password, or nothing (refused).
    pub with: Credential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Token,
    Password,
    Refused,
}

/// A one-to-one message, as routed.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub from: u64,
    pub to: u64,
    pub body: String,
    /// Delivered to a connected resource of the recipient (else refused
    /// with `service-unavailable`).
    pub delivered: bool,
}

/// Serves chat connections until the simulator stops.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Weak<Shared>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = stopping.changed() => return,
        };
        let shared = shared.clone();
        let stop = stopping.clone();
        tokio::spawn(async move {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let sim = Sim {
                addr: stream.local_addr().unwrap_or(([127, 0, 0, 1], 0).into()),
                shared,
            };
            sim.chat_connection(stream, stop).await;
        });
    }
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
        .any(|p| p.trim() == "xmpp");
    if !offered {
        let mut refused = ErrorResponse::new(Some("subprotocol xmpp required".into()));
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return Err(refused);
    }
    resp.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
    Ok(resp)
}

/// Where a connection is in the stream's life.
#[derive(PartialEq)]
enum Phase {
    /// Before the first `<open/>`, or after SASL success before the next.
    Open { authenticated: bool },
    /// Features sent; SASL expected.
    Auth,
    /// Authenticated and reopened: stanzas.
    Stanzas,
}

impl Sim {
    async fn chat_connection(self, stream: tokio::net::TcpStream, mut stop: watch::Receiver<bool>) {
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, subprotocol).await else {
            return;
        };
        let (mut sink, mut source) = ws.split();
        let (to_me, mut for_me) = mpsc::unbounded_channel::<String>();
        let mut conn = ChatConn {
            sim: &self,
            phase: Phase::Open {
                authenticated: false,
            },
            user: 0,
            domain: String::new(),
            jid: None,
            to_me,
        };
        loop {
            let out = tokio::select! {
                got = source.next() => match got {
                    Some(Ok(Message::Text(text))) => conn.receive(text.as_str()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => vec![stream_error("unsupported-stanza-type")],
                },
                routed = for_me.recv() => routed.into_iter().collect(),
                _ = stop.changed() => break,
            };
            let mut closing = false;
            for text in out {
                closing |= text.starts_with("<close") || text.contains("stream:error");
                if sink.send(Message::text(text)).await.is_err() {
                    closing = true;
                    break;
                }
            }
            if closing {
                let _ = sink.close().await;
                break;
            }
        }
        conn.gone();
    }
}

struct ChatConn<'a> {
    sim: &'a Sim,
    phase: Phase,
    user: u64,
    domain: String,
    jid: Option<String>,
    to_me: mpsc::UnboundedSender<String>,
}

impl ChatConn<'_> {
    /// One message from the client; the messages to send back.
    fn receive(&mut self, text: &str) -> Vec<String> {
        let Some(el) = Element::parse(text) else {
            return vec![stream_error("not-well-formed")];
        };
        match (&self.phase, el.local()) {
            (_, "close") => vec![Element::new("close").with("xmlns", FRAMING).to_string()],
            (Phase::Open { authenticated }, "open") => {
                let authenticated = *authenticated;
                self.domain = el.attr("to").unwrap_or("chat.quickblox.com").to_owned();
                let open = Element::new("open")
                    .with("xmlns", FRAMING)
                    .with("from", &self.domain)
                    .with("id", &format!("{:016x}", rand::random::<u64>()))
                    .with("version", "1.0")
                    .with("xml:lang", "en");
                let features = if authenticated {
                    self.phase = Phase::Stanzas;
                    Element::new("stream:features")
                        .with("xmlns:stream", STREAMS)
                        .child(Element::new("bind").with("xmlns", BIND))
                        .child(
                            Element::new("session")
                                .with("xmlns", SESSION)
                                .child(Element::new("optional")),
                        )
                } else {
                    self.phase = Phase::Auth;
                    Element::new("stream:features")
                        .with("xmlns:stream", STREAMS)
                        .child(
                            Element::new("mechanisms")
                                .with("xmlns", SASL)
                                .child(Element::new("mechanism").text("PLAIN")),
                        )
                };
                vec![open.to_string(), features.to_string()]
            }
            (Phase::Auth, "auth") => self.auth(&el),
            (Phase::Stanzas, "iq") => vec![self.iq(&el)],
            (Phase::Stanzas, "presence") => {
                self.presence(el);
                Vec::new()
            }
            (Phase::Stanzas, "message") => self.message(el),
            _ => vec![stream_error("not-authorized")],
        }
    }

    fn auth(&mut self, el: &Element) -> Vec<String> {
        let failure = |text: &str| {
            Element::new("failure")
                .with("xmlns", SASL)
                .child(Element::new("not-authorized"))
                .child(Element::new("text").with("xml:lang", "en").text(text))
                .to_string()
        };
        if el.attr("mechanism") != Some("PLAIN") {
            return vec![Element::new("failure")
                .with("xmlns", SASL)
                .child(Element::new("invalid-mechanism"))
                .to_string()];
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(el.text.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some(decoded) = decoded else {
            return vec![failure("Malformed request")];
        };
        // authzid \0 authcid \0 password; the JID's local part is
        // `{user_id}-{application_id}`, in authcid (or a JID in authzid).
        let mut parts = decoded.splitn(3, '\0');
        let (authzid, authcid, password) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let local = if authcid.is_empty() {
            authzid.split('@').next().unwrap_or("")
        } else {
            authcid.split('@').next().unwrap_or("")
        };
        let app = &self.sim.shared.config.application_id;
        let user = local
            .strip_suffix(&format!("-{app}"))
            .and_then(|id| id.parse::<u64>().ok());
        let with = user.map_or(Credential::Refused, |user| {
            self.sim.chat_credential(user, password)
        });
        self.sim.state().chat.logins.push(ChatLogin {
            user_id: user.unwrap_or(0),
            with,
        });
        self.sim.changed();
        if with == Credential::Refused {
            return vec![failure("Password not verified")];
        }
        self.user = user.unwrap_or(0);
        self.phase = Phase::Open {
            authenticated: true,
        };
        vec![Element::new("success").with("xmlns", SASL).to_string()]
    }

    fn iq(&mut self, el: &Element) -> String {
        let id = el.attr("id").unwrap_or("");
        let result = Element::new("iq")
            .with("xmlns", CLIENT)
            .with("type", "result")
            .with("id", id);
        let child = el.children.first();
        match (
            el.attr("type"),
            child.map(|c| (c.local(), c.ns().unwrap_or(""))),
        ) {
            (Some("set"), Some(("bind", BIND))) => {
                let resource = child
                    .and_then(|c| c.find("resource"))
                    .map(|r| r.text.clone())
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
                let app = &self.sim.shared.config.application_id;
                let jid = format!("{}-{app}@{}/{resource}", self.user, self.domain);
                self.sim
                    .state()
                    .chat
                    .online
                    .entry(self.user)
                    .or_default()
                    .push((jid.clone(), self.to_me.clone()));
                self.jid = Some(jid.clone());
                self.sim.changed();
                result
                    .child(
                        Element::new("bind")
                            .with("xmlns", BIND)
                            .child(Element::new("jid").text(&jid)),
                    )
                    .to_string()
            }
            (Some("set"), Some(("session", SESSION))) => result.to_string(),
            (Some("get"), Some(("ping", "urn:xmpp:ping"))) => result.to_string(),
            (Some("get"), Some(("query", "jabber:iq:roster"))) => result
                .child(Element::new("query").with("xmlns", "jabber:iq:roster"))
                .to_string(),
            _ => {
                self.sim.state().chat.unimplemented += 1;
                self.sim.changed();
                Element::new("iq")
                    .with("xmlns", CLIENT)
                    .with("type", "error")
                    .with("id", id)
                    .child(
                        Element::new("error")
                            .with("type", "cancel")
                            .child(Element::new("feature-not-implemented").with("xmlns", STANZAS)),
                    )
                    .to_string()
            }
        }
    }

    /// Presence to another user is routed to it; broadcast presence is
    /// taken (there is no roster to tell).
    fn presence(&mut self, mut el: Element) {
        if let (Some(to), Some(from)) = (el.attr("to").map(str::to_owned), self.jid.clone()) {
            el.set("from", &from);
            el.set("xmlns", CLIENT);
            self.sim.route(&to, &el.to_string());
        }
    }

    fn message(&mut self, mut el: Element) -> Vec<String> {
        let (Some(to), Some(from)) = (el.attr("to").map(str::to_owned), self.jid.clone()) else {
            return Vec::new();
        };
        el.set("from", &from);
        el.set("xmlns", CLIENT);
        let body = el.find("body").map(|b| b.text.clone()).unwrap_or_default();
        let recipient = user_of(&to);
        let delivered = self.sim.route(&to, &el.to_string());
        self.sim.state().chat.messages.push(ChatMessage {
            from: self.user,
            to: recipient.unwrap_or(0),
            body,
            delivered,
        });
        self.sim.changed();
        if delivered {
            return Vec::new();
        }
        let mut error = Element::new("message")
            .with("xmlns", CLIENT)
            .with("type", "error")
            .with("from", &to)
            .with("to", &from);
        if let Some(id) = el.attr("id") {
            error.set("id", id);
        }
        vec![error
            .child(
                Element::new("error")
                    .with("type", "cancel")
                    .child(Element::new("service-unavailable").with("xmlns", STANZAS)),
            )
            .to_string()]
    }

    fn gone(&self) {
        if let Some(jid) = &self.jid {
            let mut st = self.sim.state();
            if let Some(resources) = st.chat.online.get_mut(&self.user) {
                resources.retain(|(j, _)| j != jid);
            }
            drop(st);
            self.sim.changed();
        }
    }
}

/// The user id of a JID `{user_id}-{app}@domain[/resource]`.
fn user_of(jid: &str) -> Option<u64> {
    jid.split('@').next()?.split('-').next()?.parse().ok()
}

fn stream_error(condition: &str) -> String {
    Element::new("stream:error")
        .with("xmlns:stream", STREAMS)
        .child(Element::new(condition).with("xmlns", "urn:ietf:params:xml:ns:xmpp-streams"))
        .to_string()
}

impl Sim {
    /// What `password` is for chat user `user`: a live session's token, its
    /// password, or neither.
    fn chat_credential(&self, user: u64, password: &str) -> Credential {
        let now = self.now();
        let st = self.state();
        let live_token = st
            .sessions
            .get(password)
            .is_some_and(|s| s.user_id == user && s.expires_at > now);
        if live_token {
            return Credential::Token;
        }
        let matches = self.shared.config.users.iter().any(|u| {
            u.id == user
                && !password.is_empty()
                && st.passwords.get(&u.login).unwrap_or(&u.password) == password
        });
        if matches && !st.resources.deleted_users().contains(&user) {
            Credential::Password
        } else {
            Credential::Refused
        }
    }

    /// Sends `stanza` to the resources `to` names (a bare JID: every one of
    /// its user's); whether any took it.
    fn route(&self, to: &str, stanza: &str) -> bool {
        let Some(user) = user_of(to) else {
            return false;
        };
        let full = to.contains('/');
        let st = self.state();
        let mut delivered = false;
        for (jid, conn) in st.chat.online.get(&user).into_iter().flatten() {
            if (!full || jid == to) && conn.send(stanza.to_owned()).is_ok() {
                delivered = true;
            }
        }
        delivered
    }
}
