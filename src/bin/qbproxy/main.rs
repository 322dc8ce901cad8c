//! The `qbproxy` binary: parse arguments, set up logging, load the config,
//! bind, and hand over to `qbproxy::App::run`. Config errors exit with 64 before
//! anything binds.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use qbproxy::process::{Offer, Predecessor, Sockets};
use qbproxy::{Config, Listeners};
use tokio::net::TcpListener;

mod demo;

/// jemalloc rather than glibc's malloc: far from QuickBlox thousands of
/// requests are alive at once, and glibc spent a fifth of qbproxy's CPU
/// merging free chunks (bench/PROFILE.md, "Issue 22: the allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// Arguments that do not go together (clap's own code for usage errors).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "A reverse proxy for the QuickBlox REST API that creates, injects and renews session tokens",
    after_help = "With no subcommand, qbproxy runs the proxy on the configuration in --config \
(default ./config.toml). SIGHUP reloads that file; an invalid file is refused and the \
running configuration stays. SIGTERM or SIGINT drains and stops.",
    args_override_self = true
)]
struct Cli {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Log format. The level is set with RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

/// For the commands that serve.
#[derive(clap::Args, Clone, Copy)]
struct RuntimeArgs {
    /// Worker threads [default: the CPUs this process may run on]. The
    /// proxy: one single-threaded runtime per thread, each accepting its
    /// share of connections (SO_REUSEPORT), as nginx's workers do; with 1,
    /// everything runs on one thread. demo and sim: a multi-thread runtime.
    #[arg(long, env = "QBPROXY_THREADS")]
    threads: Option<NonZeroUsize>,
}

impl RuntimeArgs {
    fn threads(self) -> usize {
        self.threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 if valid, 64 if not.
    Check {
        /// The configuration file [default: config.toml].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Then create one session per identity (and per pool, one member's)
        /// against the configured upstream, and print each result: exit 0
        /// only if every one succeeded, 1 if not.
        #[arg(long)]
        probe: bool,
    },
    /// Run qbproxy in front of its built-in QuickBlox simulator. Reads no
    /// configuration file.
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin address (/healthz, /readyz, /metrics).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Chat address, XMPP over WebSocket (browsers).
        #[arg(long, default_value = "127.0.0.1:5291")]
        chat: SocketAddr,
        /// Chat address, XMPP over TCP (Node, iOS, Android).
        #[arg(long, default_value = "127.0.0.1:5222")]
        chat_tcp: SocketAddr,
        /// Serve HTTPS, with a certificate from a throw-away CA made at
        /// start (the official SDKs speak HTTPS only). Prints how to trust it.
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Run only the QuickBlox simulator (for trying configs and for bench/).
    /// It prints its application credentials. Reads no configuration file.
    #[command(long_about = SIM_ABOUT)]
    Sim {
        /// Simulator address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Extra users loadtest-1..N with passwords pw-1..N.
        #[arg(long, default_value_t = 0)]
        users: u64,
        /// Make every session creation take this long, e.g. "500ms".
        #[arg(long, value_parser = humantime::parse_duration)]
        creation_delay: Option<std::time::Duration>,
        /// Fail this many session creations (500) before each success.
        #[arg(long, default_value_t = 0)]
        fail_before_success: u32,
        /// Fail every session creation of this user (500), e.g.
        /// loadtest-3: one pool member down. Repeat for more.
        #[arg(long, value_name = "LOGIN")]
        fail_login: Vec<String>,
        /// Name an S3 stand-in (a port of its own, no token) as new files'
        /// upload URL, as QuickBlox's older answers did, rather than the
        /// API's own host.
        #[arg(long)]
        s3_uploads: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

/// `qbproxy sim --help`: what the simulator covers, and its controls
/// (the README's "The simulator" says the same).
const SIM_ABOUT: &str = "\
Run only the QuickBlox simulator (for trying configs and for bench/). It
prints its application credentials. Reads no configuration file.

It checks signatures, timestamps and nonces, keeps sessions with a sliding
two-hour expiry, and answers 401 \"Required session does not exist\" for
dead tokens. With a session (or an API key) it answers, in QuickBlox's
shapes and with state:
  /session.json            GET, DELETE      /login.json   POST, DELETE
  /users.json              GET (page, per_page)
  /users/{id}.json         GET, PUT/PATCH (own profile, password), DELETE (own)
  /users/by_login.json     GET              /users/by_email.json  GET
  /chat/Dialog.json        GET, POST        /chat/Dialog/{id}.json   PUT, DELETE
  /chat/Message.json       GET (chat_dialog_id, filters), POST
  /chat/Message/{id}.json  PUT, DELETE
  /data/{class}.json       GET (filters), POST
  /data/{class}/{ids}.json GET, PUT/PATCH, DELETE
  /blobs.json POST, /blobs/{id}.json GET, /blobs/{id}/complete.json PUT
  /blobs/{id}/upload/      POST (the file, as a form with the URL's fields)
A new file's upload URL names the API's own host, /blobs/{id}/upload/
(QuickBlox's current answers); with --s3-uploads, an S3 stand-in on a port
of its own that takes the form at / without a token (older answers).

Chat: XMPP over WebSocket (RFC 7395, subprotocol xmpp) on a port of its own
(printed): stream open and close; SASL PLAIN as {user_id}-{application_id}
with a live session token of that user or the user's password (else
not-authorized, \"Password not verified\"); resource bind and session;
presence; one-to-one <message> routing between connected users; pings and
an empty roster. Any other IQ gets feature-not-implemented.
List filters: field=value, field[gt|lt|gte|lte|ne|in|nin]=value,
sort_asc, sort_desc, skip, limit (100, at most 1000), count=1.
Anything else is refused, never answered 200: an unknown path 404, another
method 405 (with Allow), an unknown operator or field 422; each counted as
\"unimplemented\" in /_sim/stats. Every answer carries an \"echo\" of what it
received (tokens shown as prefixes).

Controls (no token):
  POST /_sim/expire   end every session now
  GET  /_sim/stats    counts: creations (per user), attempts, 401s, live
                      sessions, unimplemented calls (the last 20)";

/// The configuration file when none is named.
const DEFAULT_CONFIG: &str = "config.toml";

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Before any secret is read: no core dump, no reading of this
    // process's memory by another of the same user.
    let dumpable = qbproxy::process::not_dumpable();
    // Before any other thread starts: it clears LISTEN_FDS and the like.
    let activated = qbproxy::process::from_systemd();
    let cli = Cli::parse();
    // Held to the end of main: dropping it writes out buffered lines.
    let _log = init_logging(cli.log_format);
    match dumpable {
        Ok(()) => tracing::debug!(
            "not dumpable: no core file, and no other process of this user may read this one's memory"
        ),
        Err(e) => tracing::warn!(error = %e, "could not mark the process not dumpable (PR_SET_DUMPABLE); a core dump could hold tokens"),
    }
    // What was given before a subcommand belongs to running the proxy.
    let root_only = |command: &str| -> Option<String> {
        let given = match (&cli.config, cli.runtime.threads) {
            (Some(_), _) => "--config",
            (None, Some(_)) if std::env::var_os("QBPROXY_THREADS").is_none() => "--threads",
            _ => return None,
        };
        Some(format!(
            "{given} does not apply to `qbproxy {command}`{}",
            match (command, given) {
                ("check", "--config") => "; write `qbproxy check --config FILE`",
                ("check", _) => ": it runs no proxy",
                _ => ": it runs the built-in simulator and reads no configuration file",
            }
        ))
    };
    let usage = |message: String| {
        eprintln!("qbproxy: {message}");
        ExitCode::from(EXIT_USAGE)
    };
    match cli.command {
        Some(Command::Check { ref config, probe }) => {
            if let Some(m) = root_only("check") {
                return usage(m);
            }
            let path = config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
            check(&path, probe)
        }
        Some(Command::Demo {
            listen,
            admin,
            chat,
            chat_tcp,
            tls,
            runtime,
        }) => {
            if let Some(m) = root_only("demo") {
                return usage(m);
            }
            let result = self::runtime(runtime.threads()).block_on(async move {
                let args = demo::DemoArgs {
                    listen,
                    admin,
                    chat,
                    chat_tcp,
                    tls,
                };
                demo::run(args, shutdown_signal()).await
            });
            exit(result)
        }
        Some(Command::Sim {
            listen,
            users,
            creation_delay,
            fail_before_success,
            fail_login,
            s3_uploads,
            runtime,
        }) => {
            if let Some(m) = root_only("sim") {
                return usage(m);
            }
            sim(
                runtime.threads(),
                listen,
                users,
                creation_delay.unwrap_or_default(),
                fail_before_success,
                fail_login,
                s3_uploads,
            )
        }
        None => {
            let path = cli.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
            serve(cli.runtime.threads(), &path, activated)
        }
    }
}

fn sim(
    threads: usize,
    listen: SocketAddr,
    users: u64,
    creation_delay: std::time::Duration,
    fail_before_success: u32,
    fail_logins: Vec<String>,
    s3_uploads: bool,
) -> ExitCode {
    let result = runtime(threads).block_on(async move {
        let shutdown = shutdown_signal();
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut config = qbproxy_sim::SimConfig::demo();
        if users > 0 {
            config = config.with_users("loadtest-{n}", "pw-{n}", 1..=users);
        }
        if s3_uploads {
            config.uploads = qbproxy_sim::Uploads::S3;
        }
        let sim = qbproxy_sim::Sim::start_on(listener, config.clone()).map_err(|e| e.to_string())?;
        sim.set_creation_delay(creation_delay);
        sim.set_fail_before_success(fail_before_success);
        for login in &fail_logins {
            if !sim.fail_user(login) {
                return Err(format!("--fail-login {login}: the simulator has no such user"));
            }
        }
        println!(
            "QuickBlox simulator on {}\napplication_id = \"{}\"\nauth_key = \"{}\"\nauth_secret = \"{}\"\n\
             chat (XMPP over WebSocket): {}\n\
             users: demo/demo-password, other/other-password{}\n\
             POST /_sim/expire expires every session; GET /_sim/stats counts; \
             `qbproxy sim --help` lists what it answers.",
            sim.url(),
            config.application_id,
            config.auth_key,
            config.auth_secret,
            sim.chat_url(),
            if users > 0 { format!(", loadtest-1..{users}/pw-1..{users}") } else { String::new() },
        );
        shutdown.await;
        Ok::<(), String>(())
    });
    exit(result)
}

/// The config at `path`, or exit 64 with every problem on its own line.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        for line in e.lines() {
            eprintln!("qbproxy: {line}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &std::path::Path, probe: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in &config.warnings {
        eprintln!("qbproxy: warning: {w}");
    }
    println!(
        "{}: ok (upstream {}://{}, {})",
        path.display(),
        config.upstream.scheme,
        config.upstream.authority,
        summary(&config)
    );
    // Where each file the config names was found (relative paths are
    // taken from the config file's folder).
    for (key, file) in &config.files {
        println!("  {key}: {}", file.display());
    }
    if !probe {
        return ExitCode::SUCCESS;
    }
    let probed = runtime(1).block_on(qbproxy::process::probe(&config, |p| println!("probe {p}")));
    match probed {
        Ok(results) => {
            let failed = results.iter().filter(|p| p.outcome.is_err()).count();
            if failed == 0 {
                println!("probe: all {} succeeded", results.len());
                ExitCode::SUCCESS
            } else {
                println!("probe: {failed} of {} failed", results.len());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("qbproxy: cannot probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `identities: a, b; pools: load (500 members)`: pools summarised, never
/// their members one by one.
fn summary(config: &Config) -> String {
    let names: Vec<&str> = config
        .identities
        .iter()
        .filter(|i| i.pool.is_none())
        .map(|i| i.name.as_str())
        .collect();
    let mut parts = vec![format!("identities: {}", names.join(", "))];
    if !config.pools.is_empty() {
        let pools: Vec<String> = config
            .pools
            .iter()
            .map(|p| format!("{} ({} members)", p.name, p.members.len()))
            .collect();
        parts.push(format!("pools: {}", pools.join(", ")));
    }
    parts.join("; ")
}

fn serve(
    threads: usize,
    path: &std::path::Path,
    activated: std::io::Result<Option<Sockets>>,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The main runtime is worker 0; workers 1.. start their own.
    let result = runtime(1).block_on(async move {
        // Handlers first: a signal from now on stops qbproxy cleanly.
        let shutdown = shutdown_signal();
        tracing::info!(threads, "starting");
        for w in &config.warnings {
            tracing::warn!(warning = %w, "configuration");
        }
        let open_files = raise_open_file_limit();
        check_open_file_limit(open_files, &config);
        let activated = activated.map_err(|e| e.to_string())?;
        let (sockets, predecessor) = sockets(&config, threads, activated)?;
        let handover = match &config.listen.handover_socket {
            Some(path) => {
                let copies = sockets.try_clone().map_err(|e| e.to_string())?;
                let offer = Offer::bind(path, copies, predecessor).map_err(|e| {
                    format!(
                        "cannot bind {} (listen.handover_socket): {e}",
                        path.display()
                    )
                })?;
                Some(offer)
            }
            None => None,
        };
        let workers = sockets.proxy.len();
        let (listeners, chat) = listeners(sockets)?;
        let app = qbproxy::App::with_sockets(config, workers, chat).map_err(|e| e.to_string())?;
        tokio::spawn(reload_on_sighup(path.to_owned(), app.handle()));
        app.run(
            Listeners {
                handover,
                ..listeners
            },
            shutdown,
        )
        .await;
        Ok::<(), String>(())
    });
    exit(result)
}

/// Where the listening sockets come from: systemd (socket activation), the
/// running qbproxy this one takes over from (`listen.handover_socket`), or
/// binding `listen.addr` once per worker. One proxy socket (systemd's) is
/// served by every worker; several (a predecessor's) by one worker each.
fn sockets(
    config: &Config,
    threads: usize,
    activated: Option<Sockets>,
) -> Result<(Sockets, Option<Predecessor>), String> {
    let taken_over = match (&activated, &config.listen.handover_socket) {
        (None, Some(path)) => qbproxy::process::take_over(path).map_err(|e| {
            format!(
                "cannot take over through {} (listen.handover_socket): {e}",
                path.display()
            )
        })?,
        _ => None,
    };
    let (mut sockets, predecessor) = if let Some(sockets) = activated {
        tracing::info!(
            proxy = sockets.proxy.len(),
            admin = sockets.admin.is_some(),
            chat = sockets.chat.len(),
            "serving on the sockets systemd passed (socket activation); listen.addr is not bound"
        );
        (sockets, None)
    } else if let Some((sockets, predecessor)) = taken_over {
        tracing::info!(
            pid = predecessor.pid,
            proxy = sockets.proxy.len(),
            chat = sockets.chat.len(),
            "taking over the listening sockets of the running qbproxy (an upgrade): \
             it drains once this one is ready"
        );
        if sockets.proxy.len() != threads {
            tracing::info!(
                workers = sockets.proxy.len(),
                "one proxy worker per socket taken over; --threads {threads} applies at the next cold start"
            );
        }
        (sockets, Some(predecessor))
    } else {
        let addr = config.listen.addr;
        let (first, more) = qbproxy::process::bind(addr, threads)
            .map_err(|e| format!("cannot listen on {addr} (listen.addr): {e}"))?;
        let first = first.into_std().map_err(|e| e.to_string())?;
        let proxy = std::iter::once(first).chain(more).collect();
        let sockets = Sockets {
            proxy,
            admin: None,
            chat: Vec::new(),
        };
        (sockets, None)
    };
    if sockets.admin.is_none() {
        let addr = config.admin.addr;
        let admin = std::net::TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen on {addr} (admin.addr): {e}"))?;
        sockets.admin = Some(admin);
    }
    // [chat]'s: those passed or handed over where the config listens, the
    // others bound here, so that the handover offers what is served.
    let given = std::mem::take(&mut sockets.chat);
    sockets.chat = qbproxy::process::chat_sockets(config, given).map_err(|e| e.to_string())?;
    if sockets.proxy.len() == 1 && threads > 1 {
        for _ in 1..threads {
            let copy = sockets.proxy[0].try_clone().map_err(|e| e.to_string())?;
            sockets.proxy.push(copy);
        }
    }
    Ok((sockets, predecessor))
}

/// The listeners to serve, registered with this runtime, and `[chat]`'s.
type ChatSockets = Vec<(qbproxy::process::ChatTransport, std::net::TcpListener)>;
fn listeners(sockets: Sockets) -> Result<(Listeners, ChatSockets), String> {
    let tokio_listener = |l: std::net::TcpListener| {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    let admin = sockets.admin.ok_or("no admin socket")?;
    let admin = tokio_listener(admin).map_err(|e| e.to_string())?;
    let mut proxy = sockets.proxy.into_iter();
    let first = proxy.next().ok_or("no proxy socket")?;
    let workers = proxy
        .map(|l| l.set_nonblocking(true).map(|()| l))
        .collect::<std::io::Result<_>>()
        .map_err(|e| e.to_string())?;
    let listeners = Listeners {
        proxy: tokio_listener(first).map_err(|e| e.to_string())?,
        admin,
        workers,
        handover: None,
    };
    Ok((listeners, sockets.chat))
}

/// One thread: a current-thread runtime, where accepting, proxying and
/// renewing share one thread and no task is ever handed between threads
/// (measured on one core: about 15% less CPU per request than a one-worker
/// multi-thread runtime; bench/PROFILE.md); the proxy's main runtime, and
/// each of its workers' (`worker.rs`). More, for `demo` and `sim`: a
/// work-stealing runtime with that many workers.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .expect("start the tokio runtime")
}

fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    qbproxy::process::init_logging(match format {
        LogFormat::Text => qbproxy::process::LogFormat::Text,
        LogFormat::Json => qbproxy::process::LogFormat::Json,
    })
}

/// On each SIGHUP, reads the config file again and applies it; an invalid
/// file is refused with a log line and the running configuration stays.
/// Reloads run one at a time; SIGHUPs that arrive during one leave exactly
/// one more to run after it.
async fn reload_on_sighup(path: std::path::PathBuf, handle: qbproxy::Handle) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reloading is off");
            return;
        }
    };
    // A Notify keeps at most one wake-up: the queue of one.
    let wanted = std::sync::Arc::new(tokio::sync::Notify::new());
    let worker = {
        let wanted = wanted.clone();
        async move {
            loop {
                wanted.notified().await;
                tracing::info!(config = %path.display(), "SIGHUP received; reloading");
                match handle.reload_file(&path).await {
                    Ok(_) => handle.config(|c| check_open_file_limit(open_file_limit(), c)),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; the running configuration stays")
                    }
                }
            }
        }
    };
    tokio::spawn(worker);
    while hup.recv().await.is_some() {
        wanted.notify_one();
    }
}

/// Raises the soft limit on open files to the hard limit (the default soft
/// limit, often 1024, is below what `limits.max_connections` plus
/// `upstream.max_connections` need). Returns the limit in force.
fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = hard,
                "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            );
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            Some(soft)
        }
    }
}

fn open_file_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Descriptors qbproxy needs besides connections: listeners, the admin
/// port's connections, logs, DNS, token commands.
const SPARE_FILES: u64 = 128;

/// Warns when the connection limits cannot all be open at once.
fn check_open_file_limit(limit: Option<u64>, config: &Config) {
    let Some(limit) = limit else { return };
    let needed =
        (config.limits.max_connections + config.upstream.max_connections) as u64 + SPARE_FILES;
    if needed > limit {
        tracing::warn!(
            limit,
            needed,
            max_connections = config.limits.max_connections,
            upstream_max_connections = config.upstream.max_connections,
            "limits.max_connections plus upstream.max_connections do not fit under the open-file limit; raise it (ulimit -n, LimitNOFILE=) or lower them"
        );
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called (in the runtime), not when the future is first polled, so a
/// signal that comes while qbproxy is still starting is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
}

/// 0, or 1 with the error on stderr.
fn exit<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qbproxy: {e}");
            ExitCode::FAILURE
        }
    }
}
