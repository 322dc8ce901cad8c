//! From the file as written to a [`Config`]: every value checked, every
//! secret resolved, every reference typed; errors name their key in one
//! line. The sections with more to check have files of their own
//! (`gateway.rs`, `identities.rs`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderValue, Uri};

use super::raw::{
    RawAdmin, RawCluster, RawConfig, RawListen, RawProxy, RawQuickblox, RawUpstream, StringOrInt,
};
use super::*;

pub(super) struct Validator<'a> {
    pub path: &'a Path,
    /// What validation saw that may deserve a warning.
    pub notes: RefCell<Notes>,
    /// Every problem found so far: one run reports them all.
    pub errors: RefCell<Vec<ConfigError>>,
}

#[derive(Default)]
pub(super) struct Notes {
    /// Files secrets are read from: `(key, path)`.
    secret_files: Vec<(String, PathBuf)>,
    /// Some identity runs a command to get its token.
    commands: bool,
    /// Whatever else deserves a warning.
    warnings: Vec<String>,
}

/// Keys whose values are secrets: an error about one never shows its value.
pub(super) const SECRET_KEYS: [&str; 8] = [
    "auth_secret",
    "redis_url",
    "password",
    "key",
    "token",
    "secret",
    "access_token",
    "api_key",
];

/// True if a config key path (`quickblox.auth_secret`, `client[0].key`)
/// names a secret's value.
pub(super) fn is_secret_key(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let name = last.split('[').next().unwrap_or(last);
    SECRET_KEYS.contains(&name)
}

/// Mode bits: read by others, written by others.
pub(super) const OTHERS_READ: u32 = 0o004;
pub(super) const OTHERS_WRITE: u32 = 0o002;

pub(super) fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

impl Validator<'_> {
    /// A secret is read from `file` (for the permission warning).
    pub(super) fn note_secret_file(&self, key: &str, file: &Path) {
        self.notes
            .borrow_mut()
            .secret_files
            .push((key.to_owned(), file.to_owned()));
    }

    /// Something valid but probably not meant.
    pub(super) fn note_warning(&self, warning: String) {
        self.notes.borrow_mut().warnings.push(warning);
    }

    /// An identity runs a command for its token.
    pub(super) fn note_command(&self) {
        self.notes.borrow_mut().commands = true;
    }

    pub(super) fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            problem: problem.into(),
        }
    }

    /// A file qbproxy creates: its directory must exist.
    fn in_existing_dir(&self, key: &str, file: PathBuf) -> Result<PathBuf, ConfigError> {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(self.invalid(
                key,
                format!("its directory {} does not exist", dir.display()),
            ));
        }
        Ok(file)
    }

    /// Checks every section, each on its own, so that one run reports every
    /// problem it finds (a section whose input is wrong is not checked
    /// against it: the clients against the identities' names, say).
    pub(super) fn validate(&self, mut raw: RawConfig) -> Result<Config, ConfigError> {
        // Files are named as seen from the config's folder.
        let dir = self.path.parent().unwrap_or(Path::new(""));
        let files = raw.resolve_paths(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()));
        let listen = self.keep(self.listen(raw.listen));
        let admin = listen
            .as_ref()
            .and_then(|l| self.keep(self.admin(raw.admin, l.addr)));
        let upstream = self.keep(self.upstream(&raw.upstream));
        let proxy = self.keep(self.proxy(&raw.proxy));
        let quickblox = self.keep(self.quickblox(raw.quickblox));
        let cluster = self.keep(self.cluster(raw.cluster));
        let chat = self.keep(self.chat(raw.chat));
        let resolved = self.keep(self.identities_and_pools(raw.identity, raw.pool));
        let limits = upstream
            .as_ref()
            .and_then(|u| self.keep(self.limits(&raw.limits, u.max_in_flight)));
        let clients = match (&resolved, &limits) {
            (Some(r), Some(l)) => {
                self.keep(self.clients(raw.client, &r.names, l.client_max_in_flight))
            }
            _ => None,
        };
        let state_file = self.keep(match raw.state.file {
            Some(file) => self.in_existing_dir("state.file", file).map(Some),
            None => Ok(None),
        });
        let errors = self.errors.take();
        let (
            true,
            Some(listen),
            Some(admin),
            Some(upstream),
            Some(proxy),
            Some(quickblox),
            Some(cluster),
            Some(chat),
            Some(resolved),
            Some(limits),
            Some(clients),
            Some(state_file),
        ) = (
            errors.is_empty(),
            listen,
            admin,
            upstream,
            proxy,
            quickblox,
            cluster,
            chat,
            resolved,
            limits,
            clients,
            state_file,
        )
        else {
            return Err(ConfigError::all(errors));
        };
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
            .chain(notes.warnings)
            .collect();
        Ok(Config {
            log: LogConfig {
                access: raw.log.access,
            },
            cluster,
            chat,
            state_file,
            files,
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

    /// The value, or `None` with its error noted for the report.
    pub(super) fn keep<T>(&self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.note_error(e)).ok()
    }

    /// A problem for the report; checking goes on.
    pub(super) fn note_error(&self, e: ConfigError) {
        self.errors.borrow_mut().push(e);
    }

    fn listen(&self, raw: RawListen) -> Result<ListenConfig, ConfigError> {
        Ok(ListenConfig {
            addr: self.addr("listen.addr", &raw.addr)?,
            shutdown_grace: raw.shutdown_grace,
            shutdown_delay: raw.shutdown_delay,
            handover_socket: match raw.handover_socket {
                Some(path) => Some(self.in_existing_dir("listen.handover_socket", path)?),
                None => None,
            },
            allow: self.allow(&raw.allow)?,
            tls: self.tls(
                raw.tls_cert.as_deref(),
                raw.tls_key.as_deref(),
                raw.client_ca.as_deref(),
            )?,
            public_url: match raw.public_url {
                Some(url) => Some(self.public_url(&url)?),
                None => None,
            },
        })
    }

    /// `listen.public_url`: an `http://` or `https://` URL with a host,
    /// maybe a path prefix, no query; kept without a trailing slash.
    fn public_url(&self, url: &str) -> Result<String, ConfigError> {
        let bad = |why: &str| self.invalid("listen.public_url", format!("{why}: {url:?}"));
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("must start with http:// or https://"));
        }
        if uri.authority().is_none_or(|a| a.host().is_empty()) {
            return Err(bad("must name a host"));
        }
        if uri.query().is_some() || url.contains('#') {
            return Err(bad("must have no query or fragment"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("must have no user or password"));
        }
        Ok(url.trim_end_matches('/').to_owned())
    }

    fn admin(&self, raw: RawAdmin, listen: SocketAddr) -> Result<AdminConfig, ConfigError> {
        let admin = AdminConfig {
            addr: self.addr("admin.addr", &raw.addr)?,
            hosts: raw
                .hosts
                .iter()
                .map(|h| match http::uri::Authority::try_from(h.as_str()) {
                    Ok(a) if a.port().is_none() && !h.is_empty() => Ok(h.to_ascii_lowercase()),
                    _ => Err(self.invalid(
                        "admin.hosts",
                        format!("{h:?} is not a host name (no port, no scheme)"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            token: self.secret("admin.token", raw.token, raw.token_env, raw.token_file)?,
        };
        if admin.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(self.invalid("admin.token", "must be at least 16 characters"));
        }
        // Port 0 (each picks a free port, as tests do) cannot collide.
        if admin.addr == listen && listen.port() != 0 {
            return Err(self.invalid(
                "admin.addr",
                format!(
                    "{} is also listen.addr; the admin endpoints need their own port",
                    admin.addr
                ),
            ));
        }
        Ok(admin)
    }

    fn proxy(&self, raw: &RawProxy) -> Result<ProxyConfig, ConfigError> {
        if raw.replay_body_limit > 64 * 1024 * 1024 {
            return Err(self.invalid(
                "proxy.replay_body_limit",
                "at most 67108864 (64 MiB): every buffered body is held in memory",
            ));
        }
        Ok(ProxyConfig {
            client_token: raw.client_token,
            replay_body_limit: raw.replay_body_limit,
        })
    }

    pub(super) fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                key,
                format!("{value:?} is not an IP address with a port, e.g. \"127.0.0.1:8080\""),
            )
        })
    }

    /// `d`, refused if it is zero.
    pub(super) fn positive(&self, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            return Err(self.invalid(key, "must be greater than zero"));
        }
        Ok(d)
    }

    pub(super) fn upstream(&self, raw: &RawUpstream) -> Result<UpstreamConfig, ConfigError> {
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
            timeout: self.positive("upstream.timeout", raw.timeout)?,
            connect_timeout: self.positive("upstream.connect_timeout", raw.connect_timeout)?,
            pool_idle_timeout: self
                .positive("upstream.pool_idle_timeout", raw.pool_idle_timeout)?,
            pool_max_idle_per_host: raw.pool_max_idle_per_host,
            max_connections: self.count("upstream.max_connections", raw.max_connections)?,
            max_in_flight: self.count("upstream.max_in_flight", raw.max_in_flight)?,
            // 0s: no pings.
            ping_interval: (!raw.ping_interval.is_zero()).then_some(raw.ping_interval),
            ping_timeout: self.positive("upstream.ping_timeout", raw.ping_timeout)?,
            ca: raw
                .ca_file
                .as_deref()
                .map(|p| self.certs("upstream.ca_file", p))
                .transpose()?,
            http2: raw.http2,
            rate: self.rate(raw)?,
        })
    }

    /// A cap of at least one, and no more than a semaphore holds.
    fn count(&self, key: &str, n: usize) -> Result<usize, ConfigError> {
        match n {
            0 => Err(self.invalid(key, "must be at least 1")),
            n if n > tokio::sync::Semaphore::MAX_PERMITS => Err(self.invalid(key, "is too large")),
            n => Ok(n),
        }
    }

    fn rate(&self, raw: &RawUpstream) -> Result<Option<Rate>, ConfigError> {
        let per_second = match (raw.rate, raw.burst) {
            (None, None) => return Ok(None),
            (None, Some(_)) => return Err(self.invalid("upstream.burst", "needs upstream.rate")),
            (Some(r), _) => r,
        };
        if !(per_second > 0.0 && per_second.is_finite()) {
            return Err(self.invalid("upstream.rate", "requests per second, greater than zero"));
        }
        let burst = raw.burst.unwrap_or(per_second.max(1.0));
        if !(burst >= 1.0 && burst.is_finite()) {
            return Err(self.invalid("upstream.burst", "at least 1"));
        }
        Ok(Some(Rate {
            per_second,
            burst,
            wait: raw.rate_wait,
        }))
    }

    fn cluster(&self, raw: Option<RawCluster>) -> Result<Option<ClusterConfig>, ConfigError> {
        let Some(mut raw) = raw else { return Ok(None) };
        let url = self
            .secret(
                "cluster.redis_url",
                raw.redis_url.take(),
                raw.redis_url_env.take(),
                raw.redis_url_file.take(),
            )?
            .ok_or_else(|| {
                self.invalid(
                    "cluster.redis_url",
                    "missing: set redis_url, redis_url_env or redis_url_file",
                )
            })?;
        // The problem, never the value: it may carry a password.
        let topology = crate::cluster::Topology::parse(url.expose())
            .map_err(|problem| self.invalid("cluster.redis_url", problem))?;
        let tls = self.redis_tls(&raw, &topology)?;
        if raw.key_prefix.is_empty()
            || raw.key_prefix.contains(char::is_whitespace)
            || raw.key_prefix.contains(['{', '}'])
        {
            return Err(self.invalid(
                "cluster.key_prefix",
                "must not be empty or hold spaces or braces (keys carry a Redis Cluster hash tag)",
            ));
        }
        let redis_timeout = self.positive("cluster.redis_timeout", raw.redis_timeout)?;
        // The watchdog renews the lease every third of it, each renewal
        // taking up to redis_timeout.
        if raw.lock_ttl < redis_timeout * 3 || raw.lock_ttl < Duration::from_millis(300) {
            return Err(self.invalid(
                "cluster.lock_ttl",
                format!(
                    "must be at least three times cluster.redis_timeout ({redis_timeout:?}), and 300ms: \
                     the lease is renewed every third of it while a creation runs"
                ),
            ));
        }
        Ok(Some(ClusterConfig {
            redis_url: url,
            topology,
            tls,
            key_prefix: raw.key_prefix,
            redis_timeout,
            lock_ttl: raw.lock_ttl,
        }))
    }

    /// `cluster.ca_file`, `cert_file` and `key_file`: read and checked now
    /// (a bad file is a config error, not a Redis outage later).
    fn redis_tls(
        &self,
        raw: &RawCluster,
        topology: &crate::cluster::Topology,
    ) -> Result<crate::cluster::RedisTls, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        let mut tls = crate::cluster::RedisTls::default();
        if let Some(ca) = &raw.ca_file {
            self.certs("cluster.ca_file", ca)?;
            tls.ca = Some(std::fs::read(ca).map_err(|e| {
                self.invalid(
                    "cluster.ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                )
            })?);
        }
        match (&raw.cert_file, &raw.key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                self.certs("cluster.cert_file", cert)?;
                self.note_secret_file("cluster.key_file", key);
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    self.invalid(
                        "cluster.key_file",
                        format!(
                            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                            key.display()
                        ),
                    )
                })?;
                let read = |k: &str, p: &std::path::Path| {
                    std::fs::read(p)
                        .map_err(|e| self.invalid(k, format!("cannot read {}: {e}", p.display())))
                };
                tls.client = Some((
                    read("cluster.cert_file", cert)?,
                    read("cluster.key_file", key)?,
                ));
            }
            (Some(_), None) => {
                return Err(self.invalid("cluster.key_file", "missing: cert_file needs key_file"))
            }
            (None, Some(_)) => {
                return Err(self.invalid("cluster.cert_file", "missing: key_file needs cert_file"))
            }
        }
        if (tls.ca.is_some() || tls.client.is_some()) && !topology.is_tls() {
            return Err(self.invalid(
                "cluster.ca_file",
                "ca_file, cert_file and key_file apply to TLS only: use rediss:// \
                 (rediss+sentinel://, rediss+cluster://)",
            ));
        }
        Ok(tls)
    }

    pub(super) fn quickblox(&self, raw: RawQuickblox) -> Result<QuickbloxConfig, ConfigError> {
        let application_id = match raw.application_id {
            Some(StringOrInt::Int(n)) => n.to_string(),
            Some(StringOrInt::String(s)) => s,
            None => {
                return Err(self.invalid(
                    "quickblox.application_id",
                    "missing: the application's id, from the QuickBlox dashboard",
                ))
            }
        };
        if application_id.is_empty() || !application_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(
                "quickblox.application_id",
                format!("{application_id:?} is not a number"),
            ));
        }
        let auth_key = match raw.auth_key {
            Some(k) if !k.is_empty() => k,
            Some(_) => return Err(self.invalid("quickblox.auth_key", "must not be empty")),
            None => {
                return Err(self.invalid(
                    "quickblox.auth_key",
                    "missing: the application's auth key, from the QuickBlox dashboard",
                ))
            }
        };
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
        let retry_initial = self.positive("quickblox.retry_initial", raw.retry_initial)?;
        let retry_max = self.positive("quickblox.retry_max", raw.retry_max)?;
        if retry_max < retry_initial {
            return Err(self.invalid(
                "quickblox.retry_max",
                "must not be less than quickblox.retry_initial",
            ));
        }
        let renew_before = raw.renew_before;
        if renew_before >= crate::quickblox::SESSION_LIFETIME {
            return Err(self.invalid(
                "quickblox.renew_before",
                "must be less than the 2h session lifetime",
            ));
        }
        Ok(QuickbloxConfig {
            application_id,
            auth_key,
            auth_secret,
            session_timeout: self.positive("quickblox.session_timeout", raw.session_timeout)?,
            renew_before,
            retry_initial,
            retry_max,
            retry_wait: raw.retry_wait,
        })
    }

    /// Resolves a secret given inline, by environment variable or by file:
    /// at most one of the three. `key` is the inline key's name.
    pub(super) fn secret(
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
