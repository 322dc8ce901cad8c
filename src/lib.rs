//! qbproxy: a reverse proxy for the QuickBlox REST API that creates,
//! injects and renews session tokens so its clients never handle one.
//!
//! The binary is thin; everything is here so that tests run the real server
//! in-process: build an [`App`] from a [`Config`], bind listeners on port 0,
//! and call [`App::run`] with a shutdown future. See `ARCHITECTURE.md`.

#![forbid(unsafe_code)]
// The request handler's future nests deeply (the handler, the exchange and
// replay, the pool's wait, hyper's service): computing its layout takes
// more than the default 128 query levels on a build with no cache.
#![recursion_limit = "256"]

// Folders by concern, all private: the surface below is what the binary,
// the tests (`tests/it/`), the fuzz targets and the benches use, nothing
// more.
mod app;
mod chat;
mod cluster;
mod config;
mod gateway;
mod net;
mod proxy;
mod quickblox;
mod session;
mod telemetry;
mod upstream;

pub use app::reload::{ReloadError, Summary};
pub use app::{App, Handle, Listeners, NotReady, StartError};
pub use config::{Config, ConfigError};
pub use session::Session;

/// What the binary does for its process besides running an [`App`]:
/// hardening, binding the workers' sockets, taking sockets over (systemd,
/// an upgrade), logging, and `check --probe`.
pub mod process {
    pub use crate::app::hardening::not_dumpable;
    pub use crate::app::probe::{probe, Created, Probed};
    pub use crate::app::worker::bind;
    pub use crate::chat::Kind as ChatTransport;
    pub use crate::net::handover::{from_systemd, take_over, Offer, Predecessor, Sockets};
    pub use crate::telemetry::logging::{init as init_logging, Format as LogFormat};

    /// `[chat]`'s listening sockets as `config` asks for them: those of
    /// `given` (an upgrade's, systemd's) at its addresses, the others bound;
    /// the rest of `given` closed. For the handover to offer what will be
    /// served, and [`crate::App::with_sockets`] to serve it.
    pub fn chat_sockets(
        config: &crate::Config,
        given: Vec<(ChatTransport, std::net::TcpListener)>,
    ) -> Result<Vec<(ChatTransport, std::net::TcpListener)>, crate::StartError> {
        Ok(crate::chat::sockets(config.chat.as_ref(), given)?)
    }
}

/// QuickBlox's protocol, pure functions the tests and fuzz targets check
/// directly: the signature, the expiry answer and dates.
pub mod protocol {
    pub use crate::quickblox::signer::{sign, Params};
    pub use crate::quickblox::{
        error_message, is_session_expired, parse_expiration, parse_http_date, remaining_lifetime,
        token_prefix, SESSION_LIFETIME,
    };
}

/// The request rules, pure: path canonicalisation, route keys, and the
/// `_method` body scanner.
pub mod rules {
    pub use crate::gateway::canonical::{key_is, path, route_key, BadPath};
    pub use crate::gateway::overrides::Scanner;
}
