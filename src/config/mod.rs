//! Configuration: the TOML file as written (`Raw*`, serde, unknown keys
//! refused) and the validated [`Config`] the rest of the program uses, with
//! real types (`SocketAddr`, `Duration`, `Uri`, resolved secrets). Nothing
//! downstream parses a string from the file.
//!
//! Every error names the key and the problem in one line, so `qbproxy check`
//! can print it and exit 64 before anything binds.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use serde::Deserialize;

mod chat;
mod gateway;
mod identities;
mod raw;
mod validate;

use self::raw::RawConfig;
use self::validate::{is_secret_key, mode, Validator, OTHERS_WRITE};

pub use self::chat::{ChatConfig, UnknownUsers};
pub use self::gateway::{ClientConfig, LimitsConfig, PathRule, TlsConfig};
pub use self::identities::{IdentityConfig, IdentityId, PoolConfig, PoolId, Strategy, TargetId};
use crate::quickblox::credentials::Secret;

/// What went wrong while loading the configuration. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}{}", denied_hint(source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {key}: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// Several problems, each an `Invalid`; one line, the problems joined
    /// with "; " ([`ConfigError::lines`] gives one each).
    #[error("{} problems: {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<ConfigError>),
}

/// For a config qbproxy may not read: who it runs as, and the usual cause
/// (a root-owned 0640 file, and a service under systemd's `DynamicUser`).
fn denied_hint(e: &std::io::Error) -> String {
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    format!(
        "; qbproxy runs as uid {}, which may not read it: under systemd's DynamicUser \
         (deploy/qbproxy.service) install it with mode 0644 and keep secrets out of it \
         (LoadCredential=, *_file)",
        rustix::process::getuid().as_raw()
    )
}

impl ConfigError {
    /// One error for all those found: itself when there is one.
    pub(crate) fn all(mut errors: Vec<ConfigError>) -> ConfigError {
        match errors.len() {
            1 => errors.remove(0),
            _ => ConfigError::Several(errors),
        }
    }

    /// Every problem, a line each, for `check` and the start-up report.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Several(all) => all.iter().map(ToString::to_string).collect(),
            one => vec![one.to_string()],
        }
    }
}

/// The validated configuration. Cross-references are typed indices
/// ([`IdentityId`], [`PoolId`], [`TargetId`]) into its own vectors, so
/// nothing downstream looks a name up again. Sections that every identity
/// needs are shared behind `Arc`, not copied into each.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    pub upstream: Arc<UpstreamConfig>,
    pub proxy: ProxyConfig,
    pub quickblox: Arc<QuickbloxConfig>,
    /// Every identity, pool members included. Without `[[identity]]` or
    /// `[[pool]]` in the file, a single application identity named `app`.
    pub identities: Vec<IdentityConfig>,
    pub pools: Vec<PoolConfig>,
    /// Used when a request names no identity: the first `[[identity]]` not
    /// in a pool, else the first pool.
    pub default: TargetId,
    /// Every identity and pool by name (what `QBProxy-Identity` selects).
    pub names: Arc<HashMap<String, TargetId>>,
    pub limits: LimitsConfig,
    /// API-key clients; empty: no key needed.
    pub clients: Vec<ClientConfig>,
    /// Replicas share sessions and the upstream rate through Redis.
    pub cluster: Option<ClusterConfig>,
    /// `[chat]`: chat listeners and the chat server.
    pub chat: Option<ChatConfig>,
    /// `[state] file`: sessions kept across a restart without Redis.
    pub state_file: Option<std::path::PathBuf>,
    /// Every file the config names, by key, resolved (relative paths are
    /// taken from the config file's folder), for `check`.
    pub files: Vec<(String, PathBuf)>,
    pub log: LogConfig,
    /// What is worth a warning but does not stop qbproxy (files others may
    /// read or write); logged at start and on every reload.
    pub warnings: Vec<String>,
    /// Some identity runs a command for its token.
    pub runs_commands: bool,
}

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// After SIGTERM/SIGINT and before it stops accepting, how long qbproxy
    /// answers `/readyz` with 503 while it still serves, so that load
    /// balancers stop sending new traffic first. Zero: stop at once.
    pub shutdown_delay: Duration,
    /// `listen.handover_socket`: the Unix socket through which a new
    /// qbproxy takes over this one's listening sockets (`handover.rs`).
    pub handover_socket: Option<std::path::PathBuf>,
    /// Source addresses allowed to use the proxy; empty: everyone.
    pub allow: Vec<ipnet::IpNet>,
    /// Serve HTTPS (and require client certificates with a client CA).
    pub tls: Option<TlsConfig>,
    /// Where clients reach qbproxy (`scheme://host[:port][/prefix]`, no
    /// trailing slash): an upload URL on the upstream's host is rewritten
    /// to it. Unset: the scheme of this listener and the request's `Host`.
    pub public_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Names the admin listener answers to besides its own address and
    /// `localhost`, lowercase (a `Host` naming anything else gets 421: a
    /// page that rebinds its own name to this address reads nothing).
    pub hosts: Vec<String>,
    /// When set, every endpoint but `/healthz` and `/readyz` needs
    /// `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The `Host` header sent upstream (the authority, precomputed).
    pub host: HeaderValue,
    /// A path prefix from the URL (empty for `https://api.quickblox.com`).
    pub base_path: String,
    /// Whole-request budget: waiting for a session plus the upstream answer
    /// (to the response headers). Past it the client gets 504.
    pub timeout: Duration,
    /// For TCP, TLS and the HTTP handshake of a new connection together.
    pub connect_timeout: Duration,
    /// A connection idle this long is closed.
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept, all workers together.
    pub pool_max_idle_per_host: usize,
    /// Connections open to the upstream at most, all workers together
    /// (each worker opens its share). A request that finds every one busy
    /// waits, within its timeout.
    pub max_connections: usize,
    /// Requests in flight to the upstream at most, from the request being
    /// sent until its response body has been read. More wait, within
    /// their timeout.
    pub max_in_flight: usize,
    /// HTTP/2 PINGs on a connection quiet this long (`None`: none), and
    /// how long the answer may take before the connection is closed.
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Extra roots for the upstream's certificate, besides the system's.
    pub ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// Offer HTTP/2 by ALPN to an `https://` upstream; false: HTTP/1.1 only.
    pub http2: bool,
    /// Requests per second to the upstream, session creations included,
    /// and the burst above it; fleet-wide with `[cluster]`. `None`: no limit.
    pub rate: Option<Rate>,
}

/// `upstream.rate`, `burst` and `rate_wait`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
    /// How long a request over the rate waits for room, then 429.
    pub wait: Duration,
}

/// `[cluster]`: replicas share sessions and the rate through Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `redis://`, `rediss://` (TLS) or `redis+unix://`; may hold a
    /// password, so it is a secret: never logged.
    pub redis_url: Secret,
    /// What the URL names: one server, Sentinels, or a Redis Cluster.
    pub topology: crate::cluster::Topology,
    /// `ca_file`, `cert_file` and `key_file`, read.
    pub tls: crate::cluster::RedisTls,
    /// Every key starts with it.
    pub key_prefix: String,
    /// The most any request waits on one Redis call.
    pub redis_timeout: Duration,
    /// The renewal lock's lease; longer than `quickblox.session_timeout`.
    pub lock_ttl: Duration,
}

impl Config {
    pub fn identity(&self, id: IdentityId) -> &IdentityConfig {
        &self.identities[id.index()]
    }

    pub fn pool(&self, id: PoolId) -> &PoolConfig {
        &self.pools[id.index()]
    }

    /// The name of an identity or pool.
    pub fn target_name(&self, target: TargetId) -> &str {
        match target {
            TargetId::Identity(i) => &self.identity(i).name,
            TargetId::Pool(p) => &self.pool(p).name,
        }
    }

    /// The identity or pool called `name`.
    pub fn target(&self, name: &str) -> Option<TargetId> {
        self.names.get(name).copied()
    }
}

impl UpstreamConfig {
    /// The absolute URI for `path` (canonical) and `query` (as the client
    /// sent it) on the upstream. Nothing is re-encoded.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq)?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// What to do with a `QB-Token` the client sent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientToken {
    /// Replace it with qbproxy's session token (default).
    Replace,
    /// Forward the client's own token untouched; qbproxy neither injects nor
    /// renews for that request.
    Keep,
}

/// `[log]`. The format (`--log-format`) and level (`RUST_LOG`) are set at
/// start; this part reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// One event per request, at the end of its response
    /// (`qbproxy::access` target).
    pub access: bool,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub client_token: ClientToken,
    /// Request bodies up to this many bytes are buffered so that a request
    /// refused for an expired session can be replayed. Larger ones stream.
    pub replay_body_limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuickbloxConfig {
    pub application_id: String,
    pub auth_key: String,
    pub auth_secret: Secret,
    /// Budget for one `POST /session.json`.
    pub session_timeout: Duration,
    /// Renew in the background when the session has less than this left.
    pub renew_before: Duration,
    /// First delay between failed session creations; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long a request waits through failed creations that may pass
    /// (unreachable, timed out, 429, 5xx) for a retry to succeed. Zero: it
    /// is answered at the first failure.
    pub retry_wait: Duration,
}

// ---------------------------------------------------------------------------
// Loading and validation.

impl Config {
    /// Reads and validates the file at `path`, resolving secrets from the
    /// environment and from files. Warnings about the files' permissions
    /// are in [`Config::warnings`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml(&text, path)?;
        if config.runs_commands && mode(path).is_some_and(|m| m & OTHERS_WRITE != 0) {
            config.warnings.push(format!(
                "{}: other users may write this file, and it has *_command entries that qbproxy runs: chmod o-w {}",
                path.display(),
                path.display()
            ));
        }
        Ok(config)
    }

    /// Parses and validates TOML text. `path` names the source in errors,
    /// and files the config names by a relative path are found in its
    /// folder.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let v = Validator {
            path,
            notes: RefCell::default(),
            errors: RefCell::default(),
        };
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let mut problem = if is_secret_key(&key) {
                    // Serde's message would quote the value ("invalid type:
                    // integer `9876...`").
                    "must be a string (the value is not shown: it is a secret)".to_owned()
                } else {
                    let m = inner.message().trim().replace('\n', " ");
                    if m.contains("expected a duration") {
                        format!("{m}; write e.g. \"500ms\", \"30s\", \"10m\"")
                    } else {
                        m
                    }
                };
                if let Some(span) = inner.span() {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    problem = format!("{problem} (line {line})");
                }
                let key = if key == "." || key.is_empty() {
                    "(file)".to_owned()
                } else {
                    key
                };
                v.invalid(&key, problem)
            })?;
        v.validate(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quickblox::credentials::Credentials;

    const MINIMAL: &str = r#"
[quickblox]
application_id = "76730"
auth_key = "key"
auth_secret = "secret"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    fn problem(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin.addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.upstream.authority.as_str(), "api.quickblox.com");
        assert_eq!(c.upstream.scheme, Scheme::HTTPS);
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.max_connections, 4096);
        assert_eq!(c.upstream.max_in_flight, 4096);
        assert_eq!(c.upstream.pool_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.ping_interval, Some(Duration::from_secs(10)));
        assert!(c.upstream.http2);
        assert_eq!(c.proxy.client_token, ClientToken::Replace);
        assert_eq!(c.proxy.replay_body_limit, 1 << 20);
        assert_eq!(c.listen.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.identities.len(), 1);
        assert_eq!(c.identities[0].credentials, Credentials::Application);
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = problem(&format!(
            "{MINIMAL}\n[upstream]\nurl = \"https://x\"\ntimout = \"1s\"\n"
        ));
        assert!(msg.contains("upstream.timout"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[listen]\naddr = \"localhost\"\n", "listen.addr"),
            ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
            ("[upstream]\ntimeout = \"soon\"\n", "upstream.timeout"),
            ("[admin]\naddr = \"127.0.0.1:8080\"\n", "admin.addr"),
            ("[proxy]\nclient_token = \"drop\"\n", "proxy.client_token"),
            (
                "[upstream]\nmax_connections = 0\n",
                "upstream.max_connections",
            ),
            ("[upstream]\nmax_in_flight = 0\n", "upstream.max_in_flight"),
            (
                "[upstream]\nping_timeout = \"0s\"\n",
                "upstream.ping_timeout",
            ),
        ];
        for (extra, key) in cases {
            let msg = problem(&format!("{MINIMAL}{extra}"));
            assert!(msg.contains(key), "{key}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }

    #[test]
    fn secret_sources_are_exclusive_and_resolved() {
        let msg = problem(
            "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret = \"a\"\nauth_secret_env = \"B\"\n",
        );
        assert!(msg.contains("quickblox.auth_secret"), "{msg}");
        let msg = problem(
            "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret_env = \"QBPROXY_TEST_SURELY_UNSET\"\n",
        );
        assert!(msg.contains("quickblox.auth_secret_env"), "{msg}");
        assert!(
            msg.contains("QBPROXY_TEST_SURELY_UNSET is not set"),
            "{msg}"
        );
        let msg = problem("[quickblox]\napplication_id = 1\nauth_key = \"k\"\n");
        assert!(msg.contains("quickblox.auth_secret: missing"), "{msg}");
    }

    #[test]
    fn errors_about_secret_keys_never_show_the_value() {
        for (text, key) in [
            ("[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret = 98765432109876\n", "quickblox.auth_secret"),
            ("[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret = 9876543210.98765\n", "quickblox.auth_secret"),
            (&format!("{MINIMAL}[[identity]]\nname = \"b\"\nlogin = \"b\"\npassword = 98765432109876\n"), "identity[0].password"),
            (&format!("{MINIMAL}[[client]]\nname = \"c\"\nkey = 98765432109876\n"), "client[0].key"),
            (&format!("{MINIMAL}[[identity]]\nname = \"f\"\nprovider = \"facebook\"\ntoken = [98765432109876]\n"), "identity[0].token"),
        ] {
            let msg = problem(text);
            assert!(msg.contains(key), "{msg}");
            assert!(!msg.contains("98765"), "the value shows: {msg}");
            assert!(msg.contains("not shown"), "{msg}");
        }
        // Other keys keep serde's helpful message.
        let msg = problem(&format!("{MINIMAL}[upstream]\ntimeout = 30\n"));
        assert!(msg.contains("invalid type: integer `30`"), "{msg}");
    }

    #[test]
    fn secret_files_others_may_read_and_writable_configs_with_commands_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let secret = dir.join("secret");
        std::fs::write(&secret, "s\n").unwrap();
        let config = dir.join("config.toml");
        let text = format!(
            "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret_file = {:?}\n\
             [[identity]]\nname = \"fb\"\nprovider = \"facebook\"\ntoken_command = \"get-token\"\n",
            secret.display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set(&secret, 0o600);
        set(&config, 0o644);
        assert!(Config::load(&config).unwrap().warnings.is_empty());
        set(&secret, 0o644);
        set(&config, 0o666);
        let warnings = Config::load(&config).unwrap().warnings;
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("quickblox.auth_secret_file: other users may read"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("other users may write this file, and it has *_command entries"),
            "{warnings:?}"
        );
    }

    #[test]
    fn secret_file_is_read_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret_file = {:?}\n",
            file.display().to_string()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.quickblox.auth_secret.expose(), "from-file");
    }

    #[test]
    fn identities_are_checked() {
        let ok = format!(
            "{MINIMAL}[[identity]]\nname = \"bot\"\nlogin = \"bot\"\npassword = \"pw\"\n\
             [[identity]]\nname = \"mail\"\nemail = \"a@b.c\"\npassword = \"pw\"\n\
             [[identity]]\nname = \"reader\"\n"
        );
        let c = parse(&ok).unwrap();
        assert_eq!(c.identities[0].credentials.kind().as_str(), "login");
        assert_eq!(c.identities[1].credentials.kind().as_str(), "email");
        assert_eq!(c.identities[2].credentials, Credentials::Application);

        let msg = problem(&format!(
            "{MINIMAL}[[identity]]\nname = \"bot\"\nlogin = \"bot\"\n"
        ));
        assert!(msg.contains("identity[0].password: missing"), "{msg}");
        let msg = problem(&format!(
            "{MINIMAL}[[identity]]\nname = \"a\"\n[[identity]]\nname = \"a\"\n"
        ));
        assert!(msg.contains("identity[1].name"), "{msg}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = parse(&format!(
            "{MINIMAL}[[identity]]\nname = \"bot\"\nlogin = \"bot\"\npassword = \"hunter2\"\n"
        ))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("\"secret\""));
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn cluster_and_rate_are_optional_and_checked() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.cluster.is_none() && c.upstream.rate.is_none());

        let c = parse(&format!(
            "{MINIMAL}[cluster]\nredis_url = \"redis://:hunter2@10.0.0.5:6379/0\"\n[upstream]\nrate = 150\n"
        ))
        .unwrap();
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.key_prefix, "qbproxy");
        assert_eq!(cluster.redis_timeout, Duration::from_millis(250));
        assert_eq!(cluster.lock_ttl, Duration::from_secs(3));
        let rate = c.upstream.rate.unwrap();
        assert_eq!(
            (rate.per_second, rate.burst),
            (150.0, 150.0),
            "burst defaults to rate"
        );
        assert_eq!(rate.wait, Duration::from_secs(1));
        assert!(!format!("{c:?}").contains("hunter2"), "the URL is a secret");

        for (extra, key) in [
            ("[cluster]\n", "cluster.redis_url: missing"),
            (
                "[cluster]\nredis_url = \"http://:hunter2@x\"\n",
                "cluster.redis_url",
            ),
            (
                "[cluster]\nredis_url = \"redis://x\"\nkey_prefix = \"\"\n",
                "cluster.key_prefix",
            ),
            (
                "[cluster]\nredis_url = \"redis://x\"\nredis_timeout = \"0s\"\n",
                "cluster.redis_timeout",
            ),
            // The lease is renewed every third of it, each renewal taking
            // up to redis_timeout (250 ms by default).
            (
                "[cluster]\nredis_url = \"redis://x\"\nlock_ttl = \"500ms\"\n",
                "cluster.lock_ttl",
            ),
            ("[upstream]\nrate = 0\n", "upstream.rate"),
            (
                "[upstream]\nburst = 10\n",
                "upstream.burst: needs upstream.rate",
            ),
            ("[upstream]\nrate = 10\nburst = 0.5\n", "upstream.burst"),
            (
                "[state]\nfile = \"/nonexistent-qbproxy-dir/sessions.json\"\n",
                "state.file: its directory /nonexistent-qbproxy-dir does not exist",
            ),
        ] {
            let msg = problem(&format!("{MINIMAL}{extra}"));
            assert!(msg.contains(key), "{key}: {msg}");
            assert!(!msg.contains("hunter2"), "the URL shows: {msg}");
        }
        // A URL of the wrong type is named, its value not shown.
        let msg = problem(&format!("{MINIMAL}[cluster]\nredis_url = 6379123456\n"));
        assert!(
            msg.contains("cluster.redis_url") && !msg.contains("6379123456"),
            "{msg}"
        );
    }

    #[test]
    fn upstream_base_path_is_kept_verbatim() {
        let c = parse(&format!(
            "{MINIMAL}[upstream]\nurl = \"http://127.0.0.1:9/api/\"\n"
        ))
        .unwrap();
        let uri = c.upstream.uri_for("/users.json", Some("a=%2C")).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/api/users.json?a=%2C");
    }
}
