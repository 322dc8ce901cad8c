//! qbproxy: a reverse proxy for the QuickBlox REST API that creates,
//! injects and renews session tokens so its clients never handle one.
//!
//! The binary is thin; everything is here so that tests run the real server
//! in-process: build an [`App`] from a [`Config`], bind listeners on port 0,
//! and call [`App::run`] with a shutdown future. See `ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod qb;
pub mod server;
pub mod session;
pub mod signer;
pub mod sim;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::session::{Identity, Policy};
use crate::upstream::{ClockOffset, SessionCreator};

/// The listeners qbproxy serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// Errors that stop qbproxy from starting after the config was accepted.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up TLS to the upstream: {0}")]
    Tls(std::io::Error),
    #[error("no identity configured")]
    NoIdentity,
}

/// A configured proxy, not yet serving.
pub struct App {
    config: Config,
    proxy: Proxy,
    identities: Vec<Identity>,
    metrics: Metrics,
}

/// A cheap-to-clone view of a running [`App`], for tests and the demo.
#[derive(Clone)]
pub struct Handle {
    identities: Vec<Identity>,
    metrics: Metrics,
}

impl App {
    pub fn new(config: Config) -> Result<App, StartError> {
        let metrics = Metrics::new();
        let client = upstream::client(&config.upstream).map_err(StartError::Tls)?;
        let clock = Arc::new(ClockOffset::default());
        let policy = Policy {
            renew_before: config.quickblox.renew_before,
            retry_initial: config.quickblox.retry_initial,
            retry_max: config.quickblox.retry_max,
        };
        let identities: Vec<Identity> = config
            .identities
            .iter()
            .map(|id| {
                let source = SessionCreator::new(
                    client.clone(),
                    config.upstream.clone(),
                    config.quickblox.clone(),
                    id.credentials.clone(),
                    clock.clone(),
                );
                Identity::new(id.name.clone(), Box::new(source), policy, metrics.clone())
            })
            .collect();
        // The first identity is the default. `Config::load` always yields
        // one; a hand-built `Config` might not.
        let default = identities.first().cloned().ok_or(StartError::NoIdentity)?;
        let proxy = Proxy::new(&config, client, default, metrics.clone());
        Ok(App {
            config,
            proxy,
            identities,
            metrics,
        })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            identities: self.identities.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Creates the sessions, serves both listeners until `shutdown`
    /// resolves, then drains in-flight requests for at most the configured
    /// grace period.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let renewals: Vec<_> = self
            .identities
            .iter()
            .map(Identity::spawn_renewal)
            .collect();
        let (stop, stopping) = watch::channel(false);
        let grace = self.config.listen.shutdown_grace;

        let proxy = self.proxy.clone();
        let proxy_server = server::serve(
            "proxy",
            listeners.proxy,
            move |req| {
                let proxy = proxy.clone();
                async move { proxy.handle(req).await }
            },
            stopping.clone(),
            grace,
        );
        let admin = admin::Admin {
            identity: self.identities[0].clone(),
            metrics: self.metrics.clone(),
            shutting_down: stopping.clone(),
        };
        let admin_server = server::serve(
            "admin",
            listeners.admin,
            move |req| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            },
            stopping,
            grace,
        );
        let trigger = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        };
        tokio::join!(proxy_server, admin_server, trigger);
        for task in renewals {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

/// Builds and runs qbproxy: `App::new(config)?.run(listeners, shutdown)`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    App::new(config)?.run(listeners, shutdown).await;
    Ok(())
}

impl Handle {
    /// Resolves once the default identity holds a session.
    pub async fn ready(&self) {
        self.identities[0].ready().await;
    }

    /// The identity called `name`.
    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().find(|i| i.name() == name)
    }

    /// The default identity.
    pub fn default_identity(&self) -> &Identity {
        &self.identities[0]
    }

    /// The Prometheus text exposition, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}
