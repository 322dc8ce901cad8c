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

mod gateway;
mod identities;

pub use self::gateway::{ClientConfig, LimitsConfig, PathRule, TlsConfig};
pub use self::identities::{IdentityConfig, IdentityId, PoolConfig, PoolId, Strategy, TargetId};
pub use crate::credentials::{Credentials, Secret, SecretSource};

/// What went wrong while loading the configuration. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
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
    /// Source addresses allowed to use the proxy; empty: everyone.
    pub allow: Vec<ipnet::IpNet>,
    /// Serve HTTPS (and require client certificates with a client CA).
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
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
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Requests in flight to the upstream at most, from the request being
    /// sent until its response body has been read (with HTTP/1.1, about
    /// the connections open to it). More wait, within their timeout.
    pub max_connections: usize,
    /// Extra roots for the upstream's certificate, besides the system's.
    pub ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// Offer HTTP/2 by ALPN to an `https://` upstream; false: HTTP/1.1 only.
    pub http2: bool,
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
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    proxy: RawProxy,
    quickblox: RawQuickblox,
    #[serde(default)]
    identity: Vec<identities::RawIdentity>,
    #[serde(default)]
    pool: Vec<identities::RawPool>,
    #[serde(default)]
    limits: gateway::RawLimits,
    #[serde(default)]
    client: Vec<gateway::RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    addr: String,
    shutdown_grace: String,
    allow: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            addr: "127.0.0.1:8080".into(),
            shutdown_grace: "10s".into(),
            allow: Vec::new(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    addr: String,
    token: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            addr: "127.0.0.1:9090".into(),
            token: None,
            token_env: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    url: String,
    timeout: String,
    connect_timeout: String,
    pool_idle_timeout: String,
    pool_max_idle_per_host: usize,
    max_connections: usize,
    ca_file: Option<PathBuf>,
    http2: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "https://api.quickblox.com".into(),
            timeout: "30s".into(),
            connect_timeout: "5s".into(),
            pool_idle_timeout: "90s".into(),
            pool_max_idle_per_host: 256,
            max_connections: 256,
            ca_file: None,
            http2: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    client_token: ClientToken,
    replay_body_limit: usize,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            client_token: ClientToken::Replace,
            replay_body_limit: 1024 * 1024,
        }
    }
}

/// `application_id = 76730` and `application_id = "76730"` both work.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrInt {
    String(String),
    Int(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuickblox {
    application_id: StringOrInt,
    auth_key: String,
    auth_secret: Option<String>,
    auth_secret_env: Option<String>,
    auth_secret_file: Option<PathBuf>,
    #[serde(default = "default_session_timeout")]
    session_timeout: String,
    #[serde(default = "default_renew_before")]
    renew_before: String,
    #[serde(default = "default_retry_initial")]
    retry_initial: String,
    #[serde(default = "default_retry_max")]
    retry_max: String,
    #[serde(default = "default_retry_wait")]
    retry_wait: String,
}

fn default_session_timeout() -> String {
    "10s".into()
}
fn default_renew_before() -> String {
    "10m".into()
}
fn default_retry_initial() -> String {
    "500ms".into()
}
fn default_retry_max() -> String {
    "30s".into()
}
fn default_retry_wait() -> String {
    "10s".into()
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

    /// Parses and validates TOML text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let v = Validator {
            path,
            notes: RefCell::default(),
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
                    inner.message().trim().replace('\n', " ")
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

struct Validator<'a> {
    path: &'a Path,
    /// What validation saw that may deserve a warning.
    notes: RefCell<Notes>,
}

#[derive(Default)]
struct Notes {
    /// Files secrets are read from: `(key, path)`.
    secret_files: Vec<(String, PathBuf)>,
    /// Some identity runs a command to get its token.
    commands: bool,
}

/// Keys whose values are secrets: an error about one never shows its value.
const SECRET_KEYS: [&str; 7] = [
    "auth_secret",
    "password",
    "key",
    "token",
    "secret",
    "access_token",
    "api_key",
];

/// True if a config key path (`quickblox.auth_secret`, `client[0].key`)
/// names a secret's value.
fn is_secret_key(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let name = last.split('[').next().unwrap_or(last);
    SECRET_KEYS.contains(&name)
}

/// Mode bits: read by others, written by others.
const OTHERS_READ: u32 = 0o004;
const OTHERS_WRITE: u32 = 0o002;

fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

impl Validator<'_> {
    /// A secret is read from `file` (for the permission warning).
    fn note_secret_file(&self, key: &str, file: &Path) {
        self.notes
            .borrow_mut()
            .secret_files
            .push((key.to_owned(), file.to_owned()));
    }

    /// An identity runs a command for its token.
    fn note_command(&self) {
        self.notes.borrow_mut().commands = true;
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            problem: problem.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = ListenConfig {
            addr: self.addr("listen.addr", &raw.listen.addr)?,
            shutdown_grace: self.duration("listen.shutdown_grace", &raw.listen.shutdown_grace)?,
            allow: self.allow(&raw.listen.allow)?,
            tls: self.tls(
                raw.listen.tls_cert.as_deref(),
                raw.listen.tls_key.as_deref(),
                raw.listen.client_ca.as_deref(),
            )?,
        };
        let admin = AdminConfig {
            addr: self.addr("admin.addr", &raw.admin.addr)?,
            token: self.secret(
                "admin.token",
                raw.admin.token,
                raw.admin.token_env,
                raw.admin.token_file,
            )?,
        };
        if admin.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(self.invalid("admin.token", "must be at least 16 characters"));
        }
        // Port 0 (each picks a free port, as tests do) cannot collide.
        if admin.addr == listen.addr && listen.addr.port() != 0 {
            return Err(self.invalid(
                "admin.addr",
                format!(
                    "{} is also listen.addr; the admin endpoints need their own port",
                    admin.addr
                ),
            ));
        }
        let upstream = self.upstream(&raw.upstream)?;
        if raw.proxy.replay_body_limit > 64 * 1024 * 1024 {
            return Err(self.invalid(
                "proxy.replay_body_limit",
                "at most 67108864 (64 MiB): every buffered body is held in memory",
            ));
        }
        let proxy = ProxyConfig {
            client_token: raw.proxy.client_token,
            replay_body_limit: raw.proxy.replay_body_limit,
        };
        let quickblox = self.quickblox(raw.quickblox)?;
        let resolved = self.identities_and_pools(raw.identity, raw.pool)?;
        let limits = self.limits(&raw.limits)?;
        let clients = self.clients(raw.client, &resolved.names)?;
        let notes = self.notes.take();
        let warnings = notes
            .secret_files
            .iter()
            .filter(|(_, file)| mode(file).is_some_and(|m| m & OTHERS_READ != 0))
            .map(|(key, file)| {
                format!(
                    "{key}: other users may read {} (chmod o-r {})",
                    file.display(),
                    file.display()
                )
            })
            .collect();
        Ok(Config {
            warnings,
            runs_commands: notes.commands,
            limits,
            clients,
            listen,
            admin,
            upstream: Arc::new(upstream),
            proxy,
            quickblox: Arc::new(quickblox),
            identities: resolved.identities,
            pools: resolved.pools,
            default: resolved.default,
            names: Arc::new(resolved.names),
        })
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                key,
                format!("{value:?} is not an IP address with a port, e.g. \"127.0.0.1:8080\""),
            )
        })
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(value).map_err(|e| {
            self.invalid(
                key,
                format!(
                    "{value:?} is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"10m\""
                ),
            )
        })
    }

    fn positive(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(key, value)?;
        if d.is_zero() {
            return Err(self.invalid(key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn upstream(&self, raw: &RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let key = "upstream.url";
        let uri: Uri = raw
            .url
            .parse()
            .map_err(|e| self.invalid(key, format!("{:?} is not a URL: {e}", raw.url)))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                return Err(self.invalid(
                    key,
                    format!(
                        "{:?} must start with https:// (or http:// for a local upstream)",
                        raw.url
                    ),
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| self.invalid(key, format!("{:?} has no host", raw.url)))?;
        if uri.query().is_some() {
            return Err(self.invalid(key, "must not have a query string"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| self.invalid(key, "host is not a valid header value"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(UpstreamConfig {
            scheme,
            authority,
            host,
            base_path,
            timeout: self.positive("upstream.timeout", &raw.timeout)?,
            connect_timeout: self.positive("upstream.connect_timeout", &raw.connect_timeout)?,
            pool_idle_timeout: self
                .positive("upstream.pool_idle_timeout", &raw.pool_idle_timeout)?,
            pool_max_idle_per_host: raw.pool_max_idle_per_host,
            max_connections: match raw.max_connections {
                0 => return Err(self.invalid("upstream.max_connections", "must be at least 1")),
                n if n > tokio::sync::Semaphore::MAX_PERMITS => {
                    return Err(self.invalid("upstream.max_connections", "is too large"))
                }
                n => n,
            },
            ca: raw
                .ca_file
                .as_deref()
                .map(|p| self.certs("upstream.ca_file", p))
                .transpose()?,
            http2: raw.http2,
        })
    }

    fn quickblox(&self, raw: RawQuickblox) -> Result<QuickbloxConfig, ConfigError> {
        let application_id = match raw.application_id {
            StringOrInt::Int(n) => n.to_string(),
            StringOrInt::String(s) => s,
        };
        if application_id.is_empty() || !application_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(
                "quickblox.application_id",
                format!("{application_id:?} is not a number"),
            ));
        }
        if raw.auth_key.is_empty() {
            return Err(self.invalid("quickblox.auth_key", "must not be empty"));
        }
        let auth_secret = self
            .secret(
                "quickblox.auth_secret",
                raw.auth_secret,
                raw.auth_secret_env,
                raw.auth_secret_file,
            )?
            .ok_or_else(|| {
                self.invalid(
                    "quickblox.auth_secret",
                    "missing: set one of auth_secret, auth_secret_env or auth_secret_file",
                )
            })?;
        let retry_initial = self.positive("quickblox.retry_initial", &raw.retry_initial)?;
        let retry_max = self.positive("quickblox.retry_max", &raw.retry_max)?;
        if retry_max < retry_initial {
            return Err(self.invalid(
                "quickblox.retry_max",
                "must not be less than quickblox.retry_initial",
            ));
        }
        let renew_before = self.duration("quickblox.renew_before", &raw.renew_before)?;
        if renew_before >= crate::qb::SESSION_LIFETIME {
            return Err(self.invalid(
                "quickblox.renew_before",
                "must be less than the 2h session lifetime",
            ));
        }
        Ok(QuickbloxConfig {
            application_id,
            auth_key: raw.auth_key,
            auth_secret,
            session_timeout: self.positive("quickblox.session_timeout", &raw.session_timeout)?,
            renew_before,
            retry_initial,
            retry_max,
            retry_wait: self.duration("quickblox.retry_wait", &raw.retry_wait)?,
        })
    }

    /// Resolves a secret given inline, by environment variable or by file:
    /// at most one of the three. `key` is the inline key's name.
    fn secret(
        &self,
        key: &str,
        inline: Option<String>,
        env: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<Option<Secret>, ConfigError> {
        let given = inline.is_some() as u8 + env.is_some() as u8 + file.is_some() as u8;
        if given > 1 {
            return Err(self.invalid(key, format!("set only one of {key}, {key}_env, {key}_file")));
        }
        if let Some(s) = inline {
            return Ok(Some(Secret::new(s)));
        }
        if let Some(var) = env {
            let key = format!("{key}_env");
            return match std::env::var(&var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                Ok(_) => Err(self.invalid(&key, format!("environment variable {var} is empty"))),
                Err(_) => Err(self.invalid(&key, format!("environment variable {var} is not set"))),
            };
        }
        if let Some(path) = file {
            let key = format!("{key}_file");
            self.note_secret_file(&key, &path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| self.invalid(&key, format!("cannot read {}: {e}", path.display())))?;
            // Files written by `echo` or editors end in a newline that is not
            // part of the secret.
            let s = text.trim_end_matches(['\r', '\n']).to_owned();
            if s.is_empty() {
                return Err(self.invalid(&key, format!("{} is empty", path.display())));
            }
            return Ok(Some(Secret::new(s)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.upstream.max_connections, 256);
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
        let dir = std::env::temp_dir().join(format!("qbproxy-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_file_is_read_without_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("qbproxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret_file = {:?}\n",
            file.display().to_string()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.quickblox.auth_secret.expose(), "from-file");
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn upstream_base_path_is_kept_verbatim() {
        let c = parse(&format!(
            "{MINIMAL}[upstream]\nurl = \"http://127.0.0.1:9/api/\"\n"
        ))
        .unwrap();
        let uri = c.upstream.uri_for("/users.json", Some("a=%2C")).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/api/users.json?a=%2C");
    }
}
