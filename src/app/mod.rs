//! The application: `App` (built from a `Config`) and `App::run`, the
//! `Handle` tests and the admin API use, the reloader, and the worker
//! threads. Also here: what runs beside it (admin listener, probe, state
//! file, process hardening). The demo is the binary's (`src/bin/qbproxy/`).

pub(crate) mod admin;
pub mod hardening;
pub(crate) mod live;
pub mod probe;
pub(crate) mod reload;
pub(crate) mod state;
pub mod worker;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use self::live::Live;
use self::reload::{Context, ReloadError, Summary};
use self::state::StateFile;
use crate::cluster::{self, Cluster};
use crate::config::{self, Config};
use crate::gateway::route::Target;
use crate::net::limit::ResizableLimit;
use crate::net::{handover, server};
use crate::proxy::Proxy;
use crate::session::pool::Pool;
use crate::session::{self, HeldTokens, Identity, SessionError};
use crate::telemetry::metrics::Metrics;
use crate::upstream::ClockOffset;

/// The listeners qbproxy serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    /// The proxy listener of the main runtime (worker 0).
    pub proxy: TcpListener,
    pub admin: TcpListener,
    /// The proxy listeners of workers 1.. ([`worker::bind`]), each served
    /// by a thread of its own; empty for one runtime.
    pub workers: Vec<std::net::TcpListener>,
    /// `listen.handover_socket`: where a new qbproxy takes these sockets
    /// over from this one (`handover.rs`).
    pub handover: Option<handover::Offer>,
}

/// Errors that stop qbproxy from starting, or a reload from taking effect,
/// after the config itself was accepted.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Redis client could not be made from `[cluster]` (its errors
    /// never hold the URL: it is parsed and checked at load).
    #[error("cannot set up the cluster's Redis client: {0}")]
    Cluster(#[source] redis::RedisError),
    #[error("cannot set up TLS to the upstream: {0}")]
    Tls(std::io::Error),
    #[error("cannot listen on {addr} ({key}): {source}")]
    ChatListen {
        key: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl From<crate::chat::BindError> for StartError {
    fn from(e: crate::chat::BindError) -> StartError {
        StartError::ChatListen {
            key: e.key,
            addr: e.addr,
            source: e.source,
        }
    }
}

/// Why the default target cannot serve now: what `/readyz` answers 503 with.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The default identity holds no session; the last creation's failure,
    /// if one failed.
    #[error("no session yet: {}", match .0 {
        Some(e) => e.to_string(),
        None => "creating one".to_owned(),
    })]
    NoSession(Option<Arc<SessionError>>),
    #[error("every member of pool {0:?} is set aside")]
    PoolSetAside(String),
}

/// `[chat]`'s listeners, bound, by transport.
type ChatListeners = crate::chat::Sockets;

/// A configured proxy, not yet serving.
pub struct App {
    handle: Handle,
    /// `[chat]`: what its connections share, and its listeners, bound.
    chat: Option<(Arc<crate::chat::Chat>, ChatListeners)>,
}

/// A cheap-to-clone handle on a (running) [`App`]: readiness, identities,
/// metrics, and [`Handle::reload`].
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    /// Everything requests, connections and the admin API read, published
    /// whole by the reloader.
    live: Arc<ArcSwap<Live>>,
    proxy: Proxy,
    ctx: Context,
    /// `limits.max_connections`, resized when a reload is published.
    connections: ResizableLimit,
    /// Set once `run` started the identities: a reload starts new ones.
    running: AtomicBool,
    /// The reloader task's queue, started with the first reload.
    reloader: OnceLock<mpsc::Sender<Request>>,
    /// Where `[chat]`'s listeners listen, once bound.
    chat_addrs: Vec<(crate::chat::Kind, std::net::SocketAddr)>,
}

/// A reload asked of the reloader task.
struct Request {
    source: Source,
    reply: oneshot::Sender<Result<Summary, ReloadError>>,
}

enum Source {
    Config(Box<Config>),
    File(PathBuf),
}

impl Shared {
    /// Makes `live` what every request, connection and admin call reads
    /// from now on; the limits it sets first.
    fn publish(&self, live: Live) {
        self.proxy.resize_slots(live.config.upstream.max_in_flight);
        self.connections.resize(live.config.limits.max_connections);
        self.live.store(Arc::new(live));
    }
}

impl App {
    /// An app served by one runtime.
    pub fn new(config: Config) -> Result<App, StartError> {
        App::with_workers(config, 1)
    }

    /// An app served by `workers` proxy workers (`worker.rs`): give
    /// [`App::run`] as many proxy listeners.
    pub fn with_workers(config: Config, workers: usize) -> Result<App, StartError> {
        App::with_sockets(config, workers, Vec::new())
    }

    /// An app served by `workers` runtimes, on `[chat]`'s listening sockets
    /// from `chat` where it has them (an upgrade's, systemd's; see
    /// [`crate::process::chat_sockets`]), binding the others.
    pub fn with_sockets(
        config: Config,
        workers: usize,
        chat_sockets: ChatListeners,
    ) -> Result<App, StartError> {
        let workers = workers.max(1);
        let metrics = Metrics::new();
        let cluster = match &config.cluster {
            Some(c) => Some(
                Cluster::new(
                    c,
                    config.quickblox.auth_secret.expose().as_bytes(),
                    &metrics,
                )
                .map_err(StartError::Cluster)?,
            ),
            None => None,
        };
        let state = config
            .state_file
            .as_deref()
            .map(|path| StateFile::new(path, config.quickblox.auth_secret.expose().as_bytes()))
            .map(Arc::new);
        let restored = state.as_ref().map(|s| s.load()).unwrap_or_default();
        if let Some(state) = &state {
            tracing::info!(
                file = %state.path().display(),
                sessions = restored.len(),
                "[state] file: sessions kept from the last run are used instead of logging in again"
            );
        }
        let ctx = Context {
            metrics,
            held: HeldTokens::default(),
            clock: Arc::new(ClockOffset::default()),
            cluster,
            workers,
            state,
            restored: Arc::new(std::sync::Mutex::new(restored)),
        };
        let max_connections = config.limits.max_connections;
        let built = reload::build(Arc::new(config), &ctx, None)?;
        let live = Arc::new(ArcSwap::from_pointee(built.live));
        let proxy = Proxy::new(live.clone(), ctx.metrics.clone(), ctx.held.clone(), workers);
        let chat_config = live.load().config.chat.clone();
        let chat = match chat_config {
            Some(cfg) => {
                let chat = crate::chat::Chat::new(live.clone(), ctx.metrics.clone(), &cfg)
                    .map_err(StartError::Tls)?;
                let listeners = crate::chat::sockets(Some(&cfg), chat_sockets)?;
                Some((Arc::new(chat), listeners))
            }
            None => {
                // Closes (and says so) any passed while [chat] is off.
                crate::chat::sockets(None, chat_sockets)?;
                None
            }
        };
        let chat_addrs = chat
            .iter()
            .flat_map(|(_, ls)| ls.iter())
            .filter_map(|(kind, l)| Some((*kind, l.local_addr().ok()?)))
            .collect();
        Ok(App {
            handle: Handle {
                shared: Arc::new(Shared {
                    live,
                    proxy,
                    ctx,
                    connections: ResizableLimit::new(max_connections),
                    running: AtomicBool::new(false),
                    reloader: OnceLock::new(),
                    chat_addrs,
                }),
            },
            chat,
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
        shared.running.store(true, Ordering::SeqCst);
        if let Some(cluster) = &shared.ctx.cluster {
            cluster.start_heartbeat();
            cluster.start_listener();
        }
        start_standalone(&shared.live.load());
        // Shutdown in three steps: /readyz says 503 at once and the proxy
        // goes lame duck (while it still serves, for listen.shutdown_delay);
        // then the proxy listeners stop accepting and drain; then the admin
        // listener stops, so that probes get 503, never "connection
        // refused", while requests finish. After a handover the new process
        // answers probes on the same sockets: the admin listener stops at
        // once instead, and /readyz never says 503.
        let (unready, unready_rx) = watch::channel(false);
        let (lame, lame_duck) = watch::channel(server::Leaving::No);
        let (stop, stopping) = watch::channel(false);
        let (stop_admin, admin_stopping) = watch::channel(false);
        let stop_admin = &stop_admin;
        let (leave, leaving) = watch::channel(false);
        // Sent once a new process took the listening sockets over
        // (`handover.rs`); then this one drains.
        let (handed, handed_over) = tokio::sync::oneshot::channel::<()>();
        let proxy_server = serve_proxy(shared, listeners.proxy, &lame_duck, stopping.clone());
        if let Some((chat, listeners)) = self.chat {
            for (kind, listener) in listeners {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tracing::info!(
                            addr = %listener.local_addr().map_or(String::new(), |a| a.to_string()),
                            transport = ?kind,
                            "chat listening"
                        );
                        let chat = chat.clone();
                        tokio::spawn(crate::chat::serve(chat, kind, listener, stopping.clone()));
                    }
                    Err(e) => tracing::error!(error = %e, "a chat listener is unusable"),
                }
            }
        }
        let workers = spawn_workers(shared, listeners.workers, &lame_duck, &stopping);
        if let Some(offer) = listeners.handover {
            let handle = self.handle.clone();
            let saving = shared.clone();
            tokio::spawn(offer.serve(
                async move { handle.ready().await },
                move || {
                    if let Some(state) = &saving.ctx.state {
                        save_state(state, &saving.live.load());
                    }
                },
                move |_| {
                    let _ = handed.send(());
                },
                leaving,
            ));
        }
        let admin = admin::Admin {
            handle: self.handle.clone(),
            shutting_down: unready_rx,
        };
        let admin_options = shared.live.load().options;
        let admin_server = server::serve(
            server::Listener {
                name: "admin",
                listener: listeners.admin,
                settings: Arc::new(move || (admin_options, None)),
                // The admin port is for probes and operators: a few connections.
                connections: ResizableLimit::new(64),
                lame_duck: None,
            },
            move |req, conn| {
                let admin = admin.clone();
                async move { admin.handle(req, conn).await }
            },
            admin_stopping,
        );
        let live = shared.live.clone();
        let trigger = async move {
            // Without an offer (or once it ended unused) the sender is
            // gone: only `shutdown` remains.
            let handed_over = tokio::select! {
                () = shutdown => false,
                Ok(()) = handed_over => true,
            };
            let _ = leave.send(true);
            if handed_over {
                let _ = stop_admin.send(true);
            } else {
                let _ = unready.send(true);
            }
            let _ = lame.send(match handed_over {
                true => server::Leaving::HandedOver,
                false => server::Leaving::LameDuck,
            });
            let delay = live.load().config.listen.shutdown_delay;
            if !delay.is_zero() {
                if handed_over {
                    tracing::info!(
                        delay_s = delay.as_secs_f64(),
                        "handed over: open connections are moved to the new process \
                         (HTTP/1.1 Connection: close, HTTP/2 GOAWAY) for listen.shutdown_delay"
                    );
                } else {
                    tracing::info!(
                        delay_s = delay.as_secs_f64(),
                        "shutting down: /readyz answers 503 while the proxy still serves, \
                         so load balancers stop sending new requests (listen.shutdown_delay)"
                    );
                }
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutting down: no new connections; requests in flight finish");
            let _ = stop.send(true);
            handed_over
        };
        let proxies = async move {
            let ((), handed_over) = tokio::join!(proxy_server, trigger);
            // Each worker drains as the main runtime does, within the grace.
            let _ = tokio::task::spawn_blocking(move || {
                for w in workers {
                    let _ = w.join();
                }
            })
            .await;
            let _ = stop_admin.send(true);
            handed_over
        };
        let (handed_over, ()) = tokio::join!(proxies, admin_server);
        let live = shared.live.load();
        for identity in &live.identities {
            identity.stop();
        }
        // After a handover the new process owns the state file (the old
        // one wrote it before handing over).
        if let (Some(state), false) = (&shared.ctx.state, handed_over) {
            save_state(state, &live);
        }
        tracing::info!("stopped");
    }
}

/// Writes the sessions the identities hold to the state file.
fn save_state(state: &StateFile, live: &Live) {
    let sessions: Vec<(String, session::Held)> = live
        .config
        .identities
        .iter()
        .zip(&live.identities)
        .filter_map(|(config, identity)| {
            Some((cluster::fingerprint(&live.config, config), identity.held()?))
        })
        .collect();
    match state.save(&sessions) {
        Ok(n) => {
            tracing::info!(file = %state.path().display(), sessions = n, "sessions kept in the state file for the next start")
        }
        Err(e) => {
            tracing::warn!(file = %state.path().display(), error = %e, "cannot write the state file ([state] file); the next start logs in again")
        }
    }
}

/// Serves the proxy on `listener` (lame duck once `draining` turns true)
/// until `stopping` turns true, then drains.
fn serve_proxy(
    shared: &Arc<Shared>,
    listener: TcpListener,
    draining: &watch::Receiver<server::Leaving>,
    stopping: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let proxy = shared.proxy.clone();
    let live = shared.live.clone();
    server::serve(
        server::Listener {
            name: "proxy",
            listener,
            settings: Arc::new(move || {
                let live = live.load();
                (live.options, live.tls.clone())
            }),
            connections: shared.connections.clone(),
            lame_duck: Some(draining.clone()),
        },
        move |req, conn| {
            let proxy = proxy.clone();
            // Boxed: the request's future is some 5.7 KiB, and hyper and
            // the server move it two or three times before its first
            // poll; a pointer moves cheaper than that is allocated
            // (about 3 % of a GET's CPU, `bench/PROFILE.md`).
            Box::pin(async move { proxy.handle(req, conn).await })
        },
        stopping,
    )
}

/// Starts a thread with a current-thread runtime for each of workers 1..
/// (`worker.rs`), serving its listener until `stopping` turns true. A
/// worker that cannot start says why; its listener closes, and the kernel
/// gives its share of new connections to the others.
fn spawn_workers(
    shared: &Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
    draining: &watch::Receiver<server::Leaving>,
    stopping: &watch::Receiver<bool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut started = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let n = i + 1;
        let shared = shared.clone();
        let (draining, stopping) = (draining.clone(), stopping.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("qbproxy-worker-{n}"))
            .spawn(move || {
                worker::enter(n);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(worker = n, error = %e, "cannot start the worker's runtime; the other workers serve its share");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve_proxy(&shared, listener, &draining, stopping).await,
                        Err(e) => {
                            tracing::error!(worker = n, error = %e, "cannot register the worker's listener; the other workers serve its share");
                        }
                    }
                });
            });
        match spawned {
            Ok(handle) => started.push(handle),
            Err(e) => {
                tracing::error!(worker = n, error = %e, "cannot start the worker's thread; the other workers serve its share");
            }
        }
    }
    started
}

/// Starts the identities outside pools (pool members start on first use).
/// Idempotent.
fn start_standalone(live: &Live) {
    for identity in &live.identities {
        if identity.info().pool.is_none() {
            identity.start();
        }
    }
}

/// The reloader: the one task that replaces the running configuration,
/// one reload at a time, in the order asked. It holds the app weakly, so
/// it ends with it.
async fn reloader(shared: Weak<Shared>, mut requests: mpsc::Receiver<Request>) {
    while let Some(Request { source, reply }) = requests.recv().await {
        let result = match shared.upgrade() {
            Some(shared) => reload_once(&shared, source).await,
            None => Err(ReloadError::Stopped),
        };
        let _ = reply.send(result);
    }
}

/// One reload: read and validate (for a file), build against the running
/// `Live`, all on a blocking thread; then start, publish, stop.
async fn reload_once(shared: &Shared, source: Source) -> Result<Summary, ReloadError> {
    let began = Instant::now();
    let previous = shared.live.load_full();
    let ctx = shared.ctx.clone();
    let prior = previous.clone();
    let built = tokio::task::spawn_blocking(move || {
        let config = match source {
            Source::Config(c) => *c,
            Source::File(path) => {
                let c = Config::load(&path)?;
                for w in &c.warnings {
                    tracing::warn!(warning = %w, "configuration");
                }
                c
            }
        };
        Ok::<_, ReloadError>(reload::build(Arc::new(config), &ctx, Some(&prior))?)
    })
    .await
    .map_err(|_| ReloadError::Stopped)??;
    let (old, new) = (&previous.config, &built.live.config);
    if new.listen.addr != old.listen.addr {
        tracing::warn!(old = %old.listen.addr, new = %new.listen.addr, "listen.addr changed; restart qbproxy to move the proxy listener");
    }
    if new.listen.handover_socket != old.listen.handover_socket {
        tracing::warn!("listen.handover_socket changed; restart qbproxy to move it");
    }
    if new.cluster != old.cluster {
        tracing::warn!("[cluster] changed; restart qbproxy to join, leave or move the fleet");
    }
    let chat_listener = |c: &Config| {
        c.chat
            .as_ref()
            .map(|c| (c.websocket_addr, c.tcp_addr, c.max_connections))
    };
    if chat_listener(new) != chat_listener(old) {
        tracing::warn!("[chat] added, removed, or its websocket_addr, tcp_addr or max_connections changed; restart qbproxy to apply that (the rest of [chat] applies to new chat connections)");
    }
    if new.admin.addr != old.admin.addr {
        tracing::warn!(old = %old.admin.addr, new = %new.admin.addr, "admin.addr changed; restart qbproxy to move the admin listener");
    }
    if shared.running.load(Ordering::SeqCst) {
        start_standalone(&built.live);
    }
    for identity in built.rekeyed.iter().filter(|i| i.started()) {
        // Immediate: an API key's source makes no call and cannot fail.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        if identity.force_renewal(deadline).await.is_err() {
            tracing::warn!(identity = identity.name(), "the new API key was not in use within 5 s; the renewal task puts it in use when it gets to it");
        }
    }
    shared.publish(built.live);
    for identity in &built.removed {
        identity.stop();
    }
    let s = &built.summary;
    tracing::info!(
        identities = s.identities,
        pools = s.pools,
        clients = s.clients,
        kept = s.kept,
        added = s.added,
        removed = s.removed,
        upstream_client_kept = s.client_kept,
        tls_kept = s.tls_kept,
        took_ms = began.elapsed().as_millis() as u64,
        "configuration reloaded"
    );
    Ok(built.summary)
}

impl Handle {
    /// Where `[chat]`'s XMPP over WebSocket listener listens, if any.
    pub fn chat_addr(&self) -> Option<std::net::SocketAddr> {
        self.chat_listener(crate::chat::Kind::WebSocket)
    }

    /// Where `[chat]`'s XMPP over TCP listener listens, if any.
    pub fn chat_tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.chat_listener(crate::chat::Kind::Tcp)
    }

    fn chat_listener(&self, kind: crate::chat::Kind) -> Option<std::net::SocketAddr> {
        self.shared
            .chat_addrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    /// Applies a new, already validated configuration. Reloads run one at a
    /// time; this resolves when this one is in force (or was refused, and
    /// the running configuration stays). Requests in flight finish with
    /// the old configuration; identities that stay keep their sessions and
    /// take new credentials at their next renewal; new identities start,
    /// removed ones stop. The listen addresses cannot move without a
    /// restart: a change is logged and ignored.
    pub async fn reload(&self, config: Config) -> Result<Summary, ReloadError> {
        self.ask(Source::Config(Box::new(config))).await
    }

    /// Reads, validates and applies the file at `path` (SIGHUP), reading it
    /// off the async threads.
    pub async fn reload_file(&self, path: &Path) -> Result<Summary, ReloadError> {
        self.ask(Source::File(path.to_owned())).await
    }

    async fn ask(&self, source: Source) -> Result<Summary, ReloadError> {
        let requests = self.shared.reloader.get_or_init(|| {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(reloader(Arc::downgrade(&self.shared), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        requests
            .send(Request { source, reply })
            .await
            .map_err(|_| ReloadError::Stopped)?;
        answer.await.map_err(|_| ReloadError::Stopped)?
    }

    /// Reads the configuration in force.
    pub fn config<T>(&self, f: impl FnOnce(&Config) -> T) -> T {
        f(&self.shared.live.load().config)
    }

    /// Resolves once the default target can serve: the default identity
    /// holds a session (a pool's members start on first use).
    pub async fn ready(&self) {
        let live = self.shared.live.load_full();
        if let Target::Identity(identity) = live.default_target() {
            identity.ready().await;
        }
    }

    /// Whether the default target can serve now (`/readyz`), or why not.
    pub fn is_ready(&self) -> Result<(), NotReady> {
        match self.shared.live.load().default_target() {
            Target::Identity(identity) if identity.current().is_some() => Ok(()),
            Target::Identity(identity) => Err(NotReady::NoSession(identity.last_failure())),
            Target::Pool(pool) if pool.serviceable() => Ok(()),
            Target::Pool(pool) => Err(NotReady::PoolSetAside(pool.name().to_owned())),
        }
    }

    /// The identity called `name` (pool members included).
    pub fn identity(&self, name: &str) -> Option<Identity> {
        let live = self.shared.live.load();
        match live.config.target(name)? {
            config::TargetId::Identity(id) => Some(live.identities[id.index()].clone()),
            config::TargetId::Pool(_) => None,
        }
    }

    /// Every identity, pool members included, in config order.
    pub fn identities(&self) -> Vec<Identity> {
        self.shared.live.load().identities.clone()
    }

    /// The default identity (for a pool default, its first member).
    pub fn default_identity(&self) -> Identity {
        match self.shared.live.load().default_target() {
            Target::Identity(identity) => identity.clone(),
            // Validation refuses an empty pool.
            Target::Pool(pool) => pool.first_member().clone(),
        }
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        let live = self.shared.live.load();
        match live.config.target(name)? {
            config::TargetId::Pool(id) => Some(live.pools[id.index()].clone()),
            config::TargetId::Identity(_) => None,
        }
    }

    /// The name of every metric family `/metrics` may show.
    pub fn metric_names(&self) -> Vec<String> {
        self.shared.ctx.metrics.names().to_vec()
    }

    /// The Prometheus text exposition, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.ctx.metrics.render()
    }

    /// Changes whenever a request waits for an upstream slot, a body goes
    /// unbuffered or Redis goes up or down: to wait for those metrics
    /// without polling.
    pub fn metric_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.ctx.metrics.events()
    }

    /// Request body bytes held for replays right now, across every request
    /// (bounded by `limits.max_buffered_bytes`).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.proxy.buffered_bytes()
    }
}
