//! The configuration file as written: serde structs close to the TOML,
//! unknown keys refused, and every default in one `Default` impl per table.
//! Durations are read by humantime-serde ("500ms", "30s", "10m", "2h").
//! `validate.rs` turns these into a [`Config`](super::Config).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::gateway::{RawClient, RawLimits};
use super::identities::{RawIdentity, RawPool};
use super::ClientToken;

/// Where the config's files are found: relative paths are taken from `dir`
/// (the config file's folder), not from wherever qbproxy was started.
/// Collects every file named, resolved, for `check`.
pub(super) struct Beside<'a> {
    pub dir: &'a std::path::Path,
    pub files: Vec<(String, PathBuf)>,
}

impl Beside<'_> {
    pub(super) fn resolve(&mut self, key: impl Into<String>, path: &mut Option<PathBuf>) {
        if let Some(p) = path {
            if p.is_relative() {
                *p = self.dir.join(&*p);
            }
            self.files.push((key.into(), p.clone()));
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub proxy: RawProxy,
    pub quickblox: RawQuickblox,
    #[serde(default)]
    pub identity: Vec<RawIdentity>,
    #[serde(default)]
    pub pool: Vec<RawPool>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub client: Vec<RawClient>,
    pub cluster: Option<RawCluster>,
    pub chat: Option<super::chat::RawChat>,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub log: RawLog,
}

impl RawConfig {
    /// Every file the config names, relative to the config file's folder
    /// when written relative; returns them all, resolved.
    pub(super) fn resolve_paths(&mut self, dir: &std::path::Path) -> Vec<(String, PathBuf)> {
        let mut b = Beside {
            dir,
            files: Vec::new(),
        };
        let l = &mut self.listen;
        b.resolve("listen.handover_socket", &mut l.handover_socket);
        b.resolve("listen.tls_cert", &mut l.tls_cert);
        b.resolve("listen.tls_key", &mut l.tls_key);
        b.resolve("listen.client_ca", &mut l.client_ca);
        b.resolve("admin.token_file", &mut self.admin.token_file);
        b.resolve("upstream.ca_file", &mut self.upstream.ca_file);
        b.resolve(
            "quickblox.auth_secret_file",
            &mut self.quickblox.auth_secret_file,
        );
        b.resolve("state.file", &mut self.state.file);
        if let Some(c) = &mut self.cluster {
            b.resolve("cluster.redis_url_file", &mut c.redis_url_file);
            b.resolve("cluster.ca_file", &mut c.ca_file);
            b.resolve("cluster.cert_file", &mut c.cert_file);
            b.resolve("cluster.key_file", &mut c.key_file);
        }
        for (n, i) in self.identity.iter_mut().enumerate() {
            i.resolve_paths(&format!("identity[{n}]"), &mut b);
        }
        for (n, p) in self.pool.iter_mut().enumerate() {
            p.resolve_paths(&format!("pool[{n}]"), &mut b);
        }
        for (n, c) in self.client.iter_mut().enumerate() {
            c.resolve_paths(&format!("client[{n}]"), &mut b);
        }
        b.files
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { access: true }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCluster {
    pub redis_url: Option<String>,
    pub redis_url_env: Option<String>,
    pub redis_url_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            redis_url: None,
            redis_url_env: None,
            redis_url_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_prefix: "qbproxy".into(),
            redis_timeout: Duration::from_millis(250),
            // Short: a holder that dies holds the fleet up no longer. A
            // live holder renews it every second.
            lock_ttl: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawListen {
    pub addr: String,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    pub handover_socket: Option<PathBuf>,
    pub allow: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub public_url: Option<String>,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            addr: "127.0.0.1:8080".into(),
            shutdown_grace: Duration::from_secs(10),
            // Long enough for a load balancer's health check (Kubernetes
            // probes every 10 s by default; endpoints go at the first
            // failure) or its deregistration to stop new traffic.
            shutdown_delay: Duration::from_secs(5),
            handover_socket: None,
            allow: Vec::new(),
            public_url: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub addr: String,
    pub hosts: Vec<String>,
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            addr: "127.0.0.1:9090".into(),
            hosts: Vec::new(),
            token: None,
            token_env: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawState {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub http2: bool,
    pub rate: Option<f64>,
    pub burst: Option<f64>,
    #[serde(with = "humantime_serde")]
    pub rate_wait: Duration,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "https://api.quickblox.com".into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            // Below the idle timeouts of what fronts an upstream (AWS ALB
            // 60 s, nginx 75 s, HAProxy's usual `timeout client 50s`), so
            // qbproxy closes an idle connection before they do.
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 4096,
            // Over HTTP/1.1 a connection per request in flight; over HTTP/2
            // far fewer (max_in_flight / the server's stream limit).
            max_connections: 4096,
            // As many as limits.max_connections clients keep waiting, each
            // with one request.
            max_in_flight: 4096,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            ca_file: None,
            http2: true,
            rate: None,
            burst: None,
            rate_wait: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProxy {
    pub client_token: ClientToken,
    pub replay_body_limit: usize,
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
pub(super) enum StringOrInt {
    String(String),
    Int(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQuickblox {
    pub application_id: Option<StringOrInt>,
    pub auth_key: Option<String>,
    pub auth_secret: Option<String>,
    pub auth_secret_env: Option<String>,
    pub auth_secret_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_wait: Duration,
}

impl Default for RawQuickblox {
    fn default() -> Self {
        RawQuickblox {
            application_id: None,
            auth_key: None,
            auth_secret: None,
            auth_secret_env: None,
            auth_secret_file: None,
            session_timeout: Duration::from_secs(10),
            renew_before: Duration::from_secs(10 * 60),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            retry_wait: Duration::from_secs(10),
        }
    }
}
