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
pub mod canonical;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod limit;
pub mod metrics;
pub mod overrides;
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
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use config::Config;

use crate::limit::ResizableLimit;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::proxy::{Live, Proxy};
use crate::route::{Router, Target};
use crate::session::{HeldTokens, Identity, Info, Policy, Source};
use crate::upstream::{ClockOffset, SessionCreator, Throttled};

/// The listeners qbproxy serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// Errors that stop qbproxy from starting, or a reload from taking effect,
/// after the config itself was accepted.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up TLS to the upstream: {0}")]
    Tls(std::io::Error),
    #[error("no identity configured")]
    NoIdentity,
}

/// A configured proxy, not yet serving.
pub struct App {
    handle: Handle,
}

/// A cheap-to-clone handle on a (running) [`App`]: readiness, identities,
/// metrics, and [`Handle::reload`].
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    /// Identities, pools and the default, swapped on reload.
    snapshot: ArcSwap<Snapshot>,
    proxy: Proxy,
    metrics: Metrics,
    /// QuickBlox's clock against ours: survives reloads.
    clock: Arc<ClockOffset>,
    /// Every identity's tokens, current and recent: survives reloads.
    held: HeldTokens,
    /// The proxy listener's TLS and connection settings, read per connection.
    tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
    listener: Arc<ArcSwap<server::Options>>,
    /// `limits.max_connections`, resized on reload.
    connections: ResizableLimit,
    /// The configuration in force (reload compares listen addresses with it).
    config: Mutex<Config>,
    /// Set once `run` started the identities: a reload starts new ones.
    running: std::sync::atomic::AtomicBool,
}

/// Who requests can act as, built from one config.
struct Snapshot {
    /// Every identity, pool members included, in config order.
    identities: Vec<Identity>,
    pools: Vec<Arc<Pool>>,
    default: Target,
}

fn listener_options(config: &Config) -> server::Options {
    server::Options {
        header_read_timeout: config.limits.header_read_timeout,
        max_header_bytes: config.limits.max_header_bytes,
        send_timeout: config.limits.send_timeout,
        max_streams: config.limits.max_streams_per_connection,
        shutdown_grace: config.listen.shutdown_grace,
    }
}

/// Builds what requests are served with from `config`. Identities in
/// `previous` with the same name, kind and pool are kept, session and all,
/// with the new way to create their next session.
fn build(
    config: &Config,
    metrics: &Metrics,
    held: &HeldTokens,
    clock: &Arc<ClockOffset>,
    previous: Option<&Snapshot>,
) -> Result<(Live, Snapshot), StartError> {
    let client = upstream::client(&config.upstream).map_err(StartError::Tls)?;
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
            let info = Info {
                name: id.name.clone(),
                pool: id.pool.clone(),
                kind: id.credentials.kind(),
            };
            let kept = previous.and_then(|p| {
                p.identities.iter().find(|i| {
                    let old = i.info();
                    old.name == info.name && old.kind == info.kind && old.pool == info.pool
                })
            });
            let policy = Policy {
                renew_before: config.quickblox.renew_before,
                retry_initial: config.quickblox.retry_initial,
                retry_max: config.quickblox.retry_max,
                retry_wait: config.quickblox.retry_wait,
                set_aside_refused: id.pool.is_some(),
            };
            match kept {
                Some(identity) => {
                    identity.set_source(source);
                    identity.set_policy(policy);
                    identity.clone()
                }
                None => Identity::new(info, source, policy, metrics, held),
            }
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
    let configured = config
        .identities
        .iter()
        .map(|i| (&i.path_prefix, &i.name))
        .chain(config.pools.iter().map(|p| (&p.path_prefix, &p.name)));
    for (prefix, name) in configured {
        if let (Some(prefix), Some(t)) = (prefix, target(name)) {
            prefixes.push((prefix.clone(), t));
        }
    }
    let default = target(&config.default).ok_or(StartError::NoIdentity)?;
    let router = Router::new(named, listed, prefixes, default.clone());
    let gate = access::Gate::new(config, metrics);
    let live = Live::new(config, client, router, gate);
    Ok((
        live,
        Snapshot {
            identities,
            pools,
            default,
        },
    ))
}

impl App {
    pub fn new(config: Config) -> Result<App, StartError> {
        let metrics = Metrics::new();
        let held = HeldTokens::default();
        let clock = Arc::new(ClockOffset::default());
        let (live, snapshot) = build(&config, &metrics, &held, &clock, None)?;
        let tls = Arc::new(ArcSwapOption::new(
            config.listen.tls.as_ref().map(|t| t.server.clone()),
        ));
        let listener = Arc::new(ArcSwap::from_pointee(listener_options(&config)));
        Ok(App {
            handle: Handle {
                shared: Arc::new(Shared {
                    snapshot: ArcSwap::from_pointee(snapshot),
                    proxy: Proxy::new(live, metrics.clone(), held.clone()),
                    metrics,
                    held,
                    clock,
                    tls,
                    listener,
                    connections: ResizableLimit::new(config.limits.max_connections),
                    config: Mutex::new(config),
                    running: std::sync::atomic::AtomicBool::new(false),
                }),
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
        let shared = &self.handle.shared;
        shared
            .running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for identity in &shared.snapshot.load().identities {
            if identity.info().pool.is_none() {
                identity.start();
            }
        }
        let (stop, stopping) = watch::channel(false);
        let proxy = shared.proxy.clone();
        let proxy_server = server::serve(
            server::Listener {
                name: "proxy",
                listener: listeners.proxy,
                options: shared.listener.clone(),
                tls: shared.tls.clone(),
                connections: shared.connections.clone(),
            },
            move |req, conn| {
                let proxy = proxy.clone();
                async move { proxy.handle(req, conn).await }
            },
            stopping.clone(),
        );
        let admin = admin::Admin {
            handle: self.handle.clone(),
            renew_timeout: self.handle.config(|c| c.quickblox.session_timeout),
            shutting_down: stopping.clone(),
        };
        let admin_server = server::serve(
            server::Listener {
                name: "admin",
                listener: listeners.admin,
                options: Arc::new(ArcSwap::from_pointee(**shared.listener.load())),
                tls: Arc::new(ArcSwapOption::empty()),
                // The admin port is for probes and operators: a few connections.
                connections: ResizableLimit::new(64),
            },
            move |req, conn| {
                let admin = admin.clone();
                async move { admin.handle(req, conn).await }
            },
            stopping,
        );
        let trigger = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        };
        tokio::join!(proxy_server, admin_server, trigger);
        for identity in &shared.snapshot.load().identities {
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
    /// Applies a new, already validated configuration (SIGHUP). Requests in
    /// flight finish with the old one; identities that stay keep their
    /// sessions and take new credentials at their next renewal; new
    /// identities start, removed ones stop. The listen addresses cannot
    /// move without a restart: a change is logged and ignored.
    pub fn reload(&self, config: Config) -> Result<(), StartError> {
        let shared = &self.shared;
        let previous = shared.snapshot.load_full();
        let (live, snapshot) = build(
            &config,
            &shared.metrics,
            &shared.held,
            &shared.clock,
            Some(&previous),
        )?;
        let mut current = shared.config.lock().unwrap_or_else(|p| p.into_inner());
        if config.listen.addr != current.listen.addr {
            tracing::warn!(old = %current.listen.addr, new = %config.listen.addr, "listen.addr changed; restart qbproxy to move the proxy listener");
        }
        if config.admin.addr != current.admin.addr {
            tracing::warn!(old = %current.admin.addr, new = %config.admin.addr, "admin.addr changed; restart qbproxy to move the admin listener");
        }
        shared.proxy.replace(live);
        shared
            .tls
            .store(config.listen.tls.as_ref().map(|t| t.server.clone()));
        shared.listener.store(Arc::new(listener_options(&config)));
        shared.connections.resize(config.limits.max_connections);
        let running = shared.running.load(std::sync::atomic::Ordering::SeqCst);
        if running {
            for identity in snapshot
                .identities
                .iter()
                .filter(|i| i.info().pool.is_none())
            {
                identity.start();
            }
        }
        let gone: Vec<&Identity> = previous
            .identities
            .iter()
            .filter(|old| !snapshot.identities.iter().any(|new| new.same(old)))
            .collect();
        for identity in &gone {
            identity.stop();
        }
        tracing::info!(
            identities = snapshot.identities.len(),
            pools = snapshot.pools.len(),
            clients = config.clients.len(),
            removed = gone.len(),
            "configuration reloaded"
        );
        shared.snapshot.store(Arc::new(snapshot));
        *current = config;
        Ok(())
    }

    /// Reads the configuration in force.
    pub fn config<T>(&self, f: impl FnOnce(&Config) -> T) -> T {
        f(&self.shared.config.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves once the default target can serve: the default identity
    /// holds a session (a pool's members start on first use).
    pub async fn ready(&self) {
        let default = self.shared.snapshot.load().default.clone();
        if let Target::Identity(identity) = default {
            identity.ready().await;
        }
    }

    /// Whether the default target can serve now (`/readyz`).
    pub fn is_ready(&self) -> Result<(), String> {
        match &self.shared.snapshot.load().default {
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
    pub fn identity(&self, name: &str) -> Option<Identity> {
        self.shared
            .snapshot
            .load()
            .identities
            .iter()
            .find(|i| i.name() == name)
            .cloned()
    }

    /// Every identity, pool members included, in config order.
    pub fn identities(&self) -> Vec<Identity> {
        self.shared.snapshot.load().identities.clone()
    }

    /// The default identity (for a pool default, its first member).
    pub fn default_identity(&self) -> Identity {
        let snapshot = self.shared.snapshot.load();
        match &snapshot.default {
            Target::Identity(identity) => identity.clone(),
            Target::Pool(pool) => pool
                .members()
                .next()
                .unwrap_or(&snapshot.identities[0])
                .clone(),
        }
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.shared
            .snapshot
            .load()
            .pools
            .iter()
            .find(|p| p.name() == name)
            .cloned()
    }

    /// The Prometheus text exposition, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Request body bytes held for replays right now, across every request
    /// (bounded by `limits.max_buffered_bytes`).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.proxy.buffered_bytes()
    }
}
