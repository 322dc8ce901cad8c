//! qbproxy: a reverse proxy for the QuickBlox REST API that creates,
//! injects and renews session tokens so its clients never handle one.
//!
//! The binary is thin; everything is here so that tests run the real server
//! in-process: build an [`App`] from a [`Config`], bind listeners on port 0,
//! and call [`App::run`] with a shutdown future. See `ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod body;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod qb;
pub mod route;
pub mod server;
pub mod session;
pub mod signer;
pub mod sim;
pub mod tls;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use config::Config;

use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::{Live, Proxy};
use crate::route::{Router, Target};
use crate::session::{Identity, Info, Policy, Source};
use crate::upstream::{ClockOffset, SessionCreator, Throttled};

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
    handle: Handle,
    /// The proxy listener's TLS config, swapped on reload.
    tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
}

/// A cheap-to-clone view of a running [`App`], for tests, the demo and the
/// admin API.
#[derive(Clone)]
pub struct Handle {
    /// Every identity, pool members included, in config order.
    identities: Arc<Vec<Identity>>,
    pools: Arc<Vec<Arc<Pool>>>,
    default: Target,
    metrics: Metrics,
}

impl App {
    pub fn new(config: Config) -> Result<App, StartError> {
        let metrics = Metrics::new();
        let client = upstream::client(&config.upstream).map_err(StartError::Tls)?;
        let clock = Arc::new(ClockOffset::default());
        // One creation semaphore per pool, shared by its members.
        let throttles: HashMap<&str, Arc<Semaphore>> = config
            .pools
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    Arc::new(Semaphore::new(p.create_concurrency)),
                )
            })
            .collect();
        let identities: Vec<Identity> = config
            .identities
            .iter()
            .map(|id| {
                let creator = SessionCreator::new(
                    client.clone(),
                    config.upstream.clone(),
                    config.quickblox.clone(),
                    id.credentials.clone(),
                    clock.clone(),
                );
                let throttle = id.pool.as_deref().and_then(|p| throttles.get(p));
                let source: Box<dyn Source> = match throttle {
                    Some(permits) => Box::new(Throttled::new(creator, permits.clone())),
                    None => Box::new(creator),
                };
                let policy = Policy {
                    renew_before: config.quickblox.renew_before,
                    retry_initial: config.quickblox.retry_initial,
                    retry_max: config.quickblox.retry_max,
                    set_aside_refused: id.pool.is_some(),
                };
                let info = Info {
                    name: id.name.clone(),
                    pool: id.pool.clone(),
                    kind: id.credentials.kind(),
                };
                Identity::new(info, source, policy, &metrics)
            })
            .collect();
        let by_name: HashMap<&str, &Identity> = identities.iter().map(|i| (i.name(), i)).collect();
        let pools: Vec<Arc<Pool>> = config
            .pools
            .iter()
            .map(|p| {
                let members = p
                    .members
                    .iter()
                    .filter_map(|m| by_name.get(m.as_str()).map(|i| (*i).clone()))
                    .collect();
                Arc::new(Pool::new(
                    p.name.clone(),
                    members,
                    p.strategy,
                    p.max_in_flight,
                    metrics.identity("", Some(&p.name)),
                ))
            })
            .collect();

        let mut named: Vec<(String, Target)> = identities
            .iter()
            .map(|i| (i.name().to_owned(), Target::Identity(i.clone())))
            .collect();
        named.extend(
            pools
                .iter()
                .map(|p| (p.name().to_owned(), Target::Pool(p.clone()))),
        );
        // The 400 message lists what a client would choose: standalone
        // identities and pools, not every generated member.
        let listed: Vec<String> = config
            .identities
            .iter()
            .filter(|i| i.pool.is_none())
            .map(|i| i.name.clone())
            .chain(config.pools.iter().map(|p| p.name.clone()))
            .collect();
        let target = |name: &str| {
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
        };
        let mut prefixes = Vec::new();
        for id in &config.identities {
            if let (Some(prefix), Some(t)) = (&id.path_prefix, target(&id.name)) {
                prefixes.push((prefix.clone(), t));
            }
        }
        for p in &config.pools {
            if let (Some(prefix), Some(t)) = (&p.path_prefix, target(&p.name)) {
                prefixes.push((prefix.clone(), t));
            }
        }
        let default = target(&config.default).ok_or(StartError::NoIdentity)?;
        let router = Router::new(named, listed, prefixes, default.clone());
        let gate = access::Gate::new(&config, &metrics);
        let proxy = Proxy::new(Live::new(&config, client, router, gate), metrics.clone());
        let tls = Arc::new(ArcSwapOption::new(
            config.listen.tls.as_ref().map(|t| t.server.clone()),
        ));
        Ok(App {
            tls,
            config,
            proxy,
            handle: Handle {
                identities: Arc::new(identities),
                pools: Arc::new(pools),
                default,
                metrics,
            },
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Creates the sessions (pool members' on first use), serves both
    /// listeners until `shutdown` resolves, then drains in-flight requests
    /// for at most the configured grace period.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        for identity in self.handle.identities.iter() {
            if identity.info().pool.is_none() {
                identity.start();
            }
        }
        let (stop, stopping) = watch::channel(false);
        let limits = &self.config.limits;
        let proxy_options = server::Options {
            max_connections: limits.max_connections,
            header_read_timeout: limits.header_read_timeout,
            max_header_bytes: limits.max_header_bytes,
            shutdown_grace: self.config.listen.shutdown_grace,
        };
        // The admin port is for probes and operators: a few connections.
        let admin_options = server::Options {
            max_connections: 64,
            ..proxy_options
        };

        let proxy = self.proxy.clone();
        let proxy_server = server::serve(
            "proxy",
            listeners.proxy,
            move |req, peer| {
                let proxy = proxy.clone();
                async move { proxy.handle(req, peer).await }
            },
            stopping.clone(),
            proxy_options,
            self.tls.clone(),
        );
        let admin = admin::Admin {
            handle: self.handle.clone(),
            renew_timeout: self.config.quickblox.session_timeout,
            shutting_down: stopping.clone(),
        };
        let admin_server = server::serve(
            "admin",
            listeners.admin,
            move |req, _peer| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            },
            stopping,
            admin_options,
            Arc::new(ArcSwapOption::empty()),
        );
        let trigger = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        };
        tokio::join!(proxy_server, admin_server, trigger);
        for identity in self.handle.identities.iter() {
            identity.stop();
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
    /// Resolves once the default target can serve: the default identity
    /// holds a session (a pool's members start on first use).
    pub async fn ready(&self) {
        if let Target::Identity(identity) = &self.default {
            identity.ready().await;
        }
    }

    /// Whether the default target can serve now (`/readyz`).
    pub fn is_ready(&self) -> Result<(), String> {
        match &self.default {
            Target::Identity(identity) if identity.current().is_some() => Ok(()),
            Target::Identity(identity) => Err(match identity.last_failure() {
                Some(e) => format!("no session yet: {e}"),
                None => "no session yet: creating one".to_owned(),
            }),
            Target::Pool(pool) if pool.serviceable() => Ok(()),
            Target::Pool(pool) => Err(format!(
                "every member of pool {:?} is set aside",
                pool.name()
            )),
        }
    }

    /// The identity called `name` (pool members included).
    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().find(|i| i.name() == name)
    }

    /// Every identity, pool members included, in config order.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// The default identity (for a pool default, its first member).
    pub fn default_identity(&self) -> &Identity {
        match &self.default {
            Target::Identity(identity) => identity,
            Target::Pool(pool) => pool.members().next().unwrap_or(&self.identities[0]),
        }
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name() == name)
    }

    /// The Prometheus text exposition, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}
