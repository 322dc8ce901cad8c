//! `[chat]`: the chat listeners (XMPP over WebSocket, XMPP over TCP with
//! STARTTLS) and the chat server they relay to.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::validate::Validator;
use super::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub struct ChatConfig {
    /// XMPP over WebSocket (RFC 7395), for browsers: TLS with `[listen]`'s
    /// certificate when it has one, else plain (loopback and tests).
    pub websocket_addr: Option<SocketAddr>,
    /// XMPP over TCP (RFC 6120), for Node, iOS and Android: STARTTLS
    /// (required) with `[listen]`'s certificate when it has one.
    pub tcp_addr: Option<SocketAddr>,
    /// The chat server, XMPP over WebSocket: `wss://` (QuickBlox's, port
    /// 5291) or `ws://` (the simulator).
    pub upstream: http::Uri,
    /// What a login as a user qbproxy holds no session for gets.
    pub unknown_users: UnknownUsers,
    /// Chat connections open at most; past it, new ones are closed.
    pub max_connections: usize,
    /// An XMPP element (a WebSocket message) from either side, at most.
    pub max_stanza_bytes: usize,
    /// A connection with nothing from either side for this long is closed
    /// (the SDKs ping every minute).
    pub idle_timeout: Duration,
    /// From connect to login done (both SASL exchanges), at most.
    pub login_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownUsers {
    /// Refused with `not-authorized` (the default).
    Refuse,
    /// The client's own credentials go to the chat server as they came.
    Pass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawChat {
    websocket_addr: Option<String>,
    tcp_addr: Option<String>,
    upstream: String,
    unknown_users: UnknownUsers,
    max_connections: usize,
    max_stanza_bytes: usize,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    login_timeout: Duration,
}

impl Default for RawChat {
    fn default() -> Self {
        RawChat {
            websocket_addr: None,
            tcp_addr: None,
            upstream: "wss://chat.quickblox.com:5291".into(),
            unknown_users: UnknownUsers::Refuse,
            max_connections: 4096,
            // QuickBlox's messages are small; a dialog's history is REST.
            max_stanza_bytes: 64 * 1024,
            // Three missed minute pings.
            idle_timeout: Duration::from_secs(180),
            login_timeout: Duration::from_secs(10),
        }
    }
}

impl Validator<'_> {
    pub(super) fn chat(&self, raw: Option<RawChat>) -> Result<Option<ChatConfig>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let websocket_addr = match &raw.websocket_addr {
            Some(a) => Some(self.addr("chat.websocket_addr", a)?),
            None => None,
        };
        let tcp_addr = match &raw.tcp_addr {
            Some(a) => Some(self.addr("chat.tcp_addr", a)?),
            None => None,
        };
        if websocket_addr.is_none() && tcp_addr.is_none() {
            return Err(self.invalid(
                "chat",
                "[chat] needs a listener: websocket_addr = \"127.0.0.1:5291\" (browsers) \
                 and/or tcp_addr = \"127.0.0.1:5222\" (Node, iOS, Android)",
            ));
        }
        let upstream: http::Uri = raw.upstream.parse().map_err(|_| {
            self.invalid("chat.upstream", format!("{:?} is not a URL", raw.upstream))
        })?;
        if !matches!(upstream.scheme_str(), Some("ws" | "wss")) || upstream.host().is_none() {
            return Err(self.invalid(
                "chat.upstream",
                format!(
                    "{:?} must be a ws:// or wss:// URL with a host, e.g. \"wss://chat.quickblox.com:5291\"",
                    raw.upstream
                ),
            ));
        }
        if raw.max_connections == 0 {
            return Err(self.invalid("chat.max_connections", "must be greater than zero"));
        }
        if raw.max_stanza_bytes < 4096 {
            return Err(self.invalid("chat.max_stanza_bytes", "must be at least 4096"));
        }
        Ok(Some(ChatConfig {
            websocket_addr,
            tcp_addr,
            upstream,
            unknown_users: raw.unknown_users,
            max_connections: raw.max_connections,
            max_stanza_bytes: raw.max_stanza_bytes,
            idle_timeout: self.positive("chat.idle_timeout", raw.idle_timeout)?,
            login_timeout: self.positive("chat.login_timeout", raw.login_timeout)?,
        }))
    }
}
