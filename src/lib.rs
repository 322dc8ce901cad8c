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

// Folders by concern; what the binary, the tests, the fuzz targets and the
// benches use is public, everything else is the crate's own.
pub mod app;
mod cluster;
pub mod config;
pub mod gateway;
pub mod net;
mod proxy;
pub mod quickblox;
pub mod session;
pub mod telemetry;
pub(crate) mod upstream;

pub use app::reload::{ReloadError, Summary};
pub use app::{App, Handle, Listeners, NotReady, StartError};
pub use config::Config;
pub use session::pool::Pool;
