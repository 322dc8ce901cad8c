//! [`Live`]: everything a request, a connection or the admin API reads,
//! built from one validated [`Config`] and published whole. A request loads
//! it once and runs start to end with it; a reload stores a new one with a
//! single write, so nothing ever sees half of a reload. Only the reloader
//! (`reload.rs`) builds and publishes one.

use std::sync::Arc;
use std::time::Duration;

use crate::app::worker;
use crate::config::{ClientToken, Config, TargetId, UpstreamConfig};
use crate::gateway::access::Gate;
use crate::gateway::route::{Router, Target};
use crate::net::server;
use crate::session::pool::Pool;
use crate::session::Identity;
use crate::upstream::rate::UpstreamRate;
use crate::upstream::Client;

pub struct Live {
    pub config: Arc<Config>,
    /// The upstream connections, a pool per proxy worker (`worker.rs`; the
    /// first also creates sessions); kept across reloads unless
    /// `[upstream]` changed, so warm (TLS) connections survive them.
    pub clients: Arc<[Client]>,
    /// Chooses the identity (or pool) whose session is injected.
    pub router: Router,
    /// Who may send what.
    pub gate: Gate,
    /// By [`crate::config::IdentityId`], pool members included.
    pub identities: Vec<Identity>,
    /// By [`crate::config::PoolId`].
    pub pools: Vec<Arc<Pool>>,
    /// How the proxy listener treats new connections.
    pub options: server::Options,
    /// The proxy listener's TLS, if it serves HTTPS; kept across reloads
    /// unless its files changed.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `upstream.rate`, fleet-wide with `[cluster]`; kept (with its state)
    /// across reloads unless it changed.
    pub rate: Option<Arc<UpstreamRate>>,
}

impl Live {
    /// The identity or pool `id` names (an id of this `Live`'s config).
    pub fn target(&self, id: TargetId) -> Target<'_> {
        match id {
            TargetId::Identity(i) => Target::Identity(&self.identities[i.index()]),
            TargetId::Pool(p) => Target::Pool(&self.pools[p.index()]),
        }
    }

    /// Where a request that names no identity goes.
    pub fn default_target(&self) -> Target<'_> {
        self.target(self.config.default)
    }

    /// The upstream client of the worker this thread runs.
    pub fn client(&self) -> &Client {
        &self.clients[worker::current() % self.clients.len()]
    }

    pub fn upstream(&self) -> &UpstreamConfig {
        &self.config.upstream
    }

    /// Budget of a whole request: body, session wait, upstream, replay.
    pub fn timeout(&self) -> Duration {
        self.config.upstream.timeout
    }

    pub fn client_token(&self) -> ClientToken {
        self.config.proxy.client_token
    }

    pub fn replay_body_limit(&self) -> usize {
        self.config.proxy.replay_body_limit
    }

    /// The longest wait for a client's next body bytes.
    pub fn body_read_timeout(&self) -> Duration {
        self.config.limits.body_read_timeout
    }

    /// Body bytes held for replays across every request at once.
    pub fn max_buffered_bytes(&self) -> usize {
        self.config.limits.max_buffered_bytes
    }
}

/// The proxy listener's connection settings from a config.
pub fn listener_options(config: &Config) -> server::Options {
    server::Options {
        header_read_timeout: config.limits.header_read_timeout,
        keepalive_timeout: config.limits.keepalive_timeout,
        max_header_bytes: config.limits.max_header_bytes,
        send_timeout: config.limits.send_timeout,
        max_streams: config.limits.max_streams_per_connection,
        shutdown_grace: config.listen.shutdown_grace,
    }
}
