//! Gateway keys: who may connect (`[listen] allow`, TLS, `[[client]]`) and
//! how much they may send (`[limits]`). Certificates and keys are read and
//! parsed here, so `qbproxy check` catches a bad PEM file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha1::{Digest, Sha1};

use std::collections::HashMap;

use super::validate::Validator;
use super::{ConfigError, Secret, TargetId};

/// Inbound TLS, loaded and checked: the certificate chain and key, and the
/// CA that client certificates must chain to if `client_ca` was set (mTLS).
#[derive(Clone)]
pub struct TlsConfig {
    pub server: Arc<rustls::ServerConfig>,
    /// SHA-1 over the certificates, key and client CAs: a reload whose
    /// files did not change keeps the running `server` (and its session
    /// tickets).
    pub fingerprint: [u8; 20],
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Request header names and values, plus 4 bytes per header (`: ` and
    /// CRLF). Over it: 431.
    pub max_header_bytes: usize,
    /// Request body. Over it: 413.
    pub max_body_bytes: u64,
    /// A file upload's body (`POST /blobs/{id}/upload`), streamed, never
    /// held for a replay. Over it: 413.
    pub max_upload_bytes: u64,
    /// The longest a file upload may take, body and answer.
    pub upload_timeout: Duration,
    /// Open client connections; past it, new ones wait in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's head, from its first byte
    /// (from the accept, for a connection's first request).
    pub header_read_timeout: Duration,
    /// The longest a connection with no request in flight is kept once it
    /// has served one (HTTP/1 keep-alive, HTTP/2 idle).
    pub keepalive_timeout: Duration,
    /// The longest wait for a request body's next bytes. Over it: 408.
    pub body_read_timeout: Duration,
    /// Request body bytes held for replays, across every request at once.
    /// Past it, a body streams without a replay buffer.
    pub max_buffered_bytes: usize,
    /// The longest a response waits for the client to read it; past it the
    /// connection is closed and its upstream slots freed.
    pub send_timeout: Duration,
    /// Requests in flight on one connection at most (HTTP/2 streams).
    pub max_streams_per_connection: u32,
    /// Upstream slots one API client holds at most unless its own
    /// `max_in_flight` says otherwise (default: half of
    /// `upstream.max_in_flight`).
    pub client_max_in_flight: usize,
}

/// A path rule: `"DELETE /users/*"`, `"/chat/*"` (any method), `"GET *"`.
/// `*` matches any run of characters, slashes included. The pattern is
/// kept in route-key form (lowercase, no format suffix, no trailing
/// slash) and compared with a request's route key, so `"DELETE /users/*"`
/// holds for `/Users/5.xml` and `//users/5` as well. A rule holds for the
/// methods Rails routes to the same action: a `GET` rule for `HEAD`, a
/// `PUT` rule for `PATCH` and a `PATCH` rule for `PUT` (both `#update`).
#[derive(Debug, Clone)]
pub struct PathRule {
    pub text: String,
    pub method: Option<Method>,
    pub pattern: String,
}

impl PathRule {
    /// `key` is a route key ([`crate::gateway::canonical::route_key`]).
    pub fn matches(&self, method: &Method, key: &str) -> bool {
        let method_matches = match &self.method {
            None => true,
            Some(m) => m == method || same_route(m, method),
        };
        method_matches && glob(&self.pattern, key)
    }
}

/// Whether Rails routes `method` to the action a rule for `rule` names.
fn same_route(rule: &Method, method: &Method) -> bool {
    matches!(
        (rule, method),
        (&Method::GET, &Method::HEAD)
            | (&Method::PUT, &Method::PATCH)
            | (&Method::PATCH, &Method::PUT)
    )
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A client of the gateway, known by its API key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub key: Secret,
    /// Identities and pools it may use, the first its default; `None`: all.
    pub identities: Option<Vec<TargetId>>,
    pub allow_paths: Vec<PathRule>,
    pub deny_paths: Vec<PathRule>,
    /// Requests per second, and the burst above it.
    pub rate: Option<(f64, f64)>,
    /// Upstream slots it holds at most (`fair.rs`).
    pub max_in_flight: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_header_bytes: usize,
    max_body_bytes: u64,
    max_upload_bytes: u64,
    #[serde(with = "humantime_serde")]
    upload_timeout: Duration,
    max_connections: usize,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
    #[serde(with = "humantime_serde")]
    body_read_timeout: Duration,
    max_buffered_bytes: usize,
    #[serde(with = "humantime_serde")]
    send_timeout: Duration,
    max_streams_per_connection: u32,
    client_max_in_flight: Option<usize>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            // QuickBlox's largest plan below Enterprise (Growth, HIPAA):
            // 50 MB per file.
            max_upload_bytes: 50 * 1024 * 1024,
            // 50 MiB at 2 Mbit/s takes 210 s.
            upload_timeout: Duration::from_secs(300),
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            // nginx's: longer than common clients' pool idle timeouts, so
            // the client, not qbproxy, closes an idle connection.
            keepalive_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(10),
            max_buffered_bytes: 64 * 1024 * 1024,
            send_timeout: Duration::from_secs(30),
            max_streams_per_connection: 100,
            client_max_in_flight: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    name: String,
    key: Option<String>,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    identities: Option<Vec<String>>,
    #[serde(default)]
    allow_paths: Vec<String>,
    #[serde(default)]
    deny_paths: Vec<String>,
    rate: Option<f64>,
    burst: Option<f64>,
    max_in_flight: Option<usize>,
}

impl RawClient {
    pub(super) fn resolve_paths(&mut self, at: &str, b: &mut super::raw::Beside<'_>) {
        b.resolve(format!("{at}.key_file"), &mut self.key_file);
    }
}

/// Largest header limit hyper's buffers are sized for.
const MAX_HEADER_LIMIT: usize = 1024 * 1024;

impl Validator<'_> {
    pub(super) fn allow(&self, raw: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        raw.iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        self.invalid(
                            &format!("listen.allow[{i}]"),
                            format!("{s:?} is not an address or a CIDR range like \"10.0.0.0/8\" or \"fd00::/8\""),
                        )
                    })
            })
            .collect()
    }

    pub(super) fn tls(
        &self,
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<TlsConfig>, ConfigError> {
        let (cert, key) = match (cert, key, client_ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), _) => (c, k),
            (None, _, _) => {
                return Err(
                    self.invalid("listen.tls_cert", "missing: TLS needs tls_cert and tls_key")
                )
            }
            (_, None, _) => {
                return Err(
                    self.invalid("listen.tls_key", "missing: TLS needs tls_cert and tls_key")
                )
            }
        };
        let cert_chain = self.certs("listen.tls_cert", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            self.invalid(
                "listen.tls_key",
                format!(
                    "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                    key.display()
                ),
            )
        })?;
        let client_ca = client_ca
            .map(|p| self.certs("listen.client_ca", p))
            .transpose()?;
        let mut digest = Sha1::new();
        for cert in cert_chain.iter().chain(client_ca.iter().flatten()) {
            digest.update(cert.as_ref());
            digest.update(b"\0");
        }
        digest.update(key.secret_der());
        let fingerprint = digest.finalize().into();
        let server = crate::net::tls::server_config(cert_chain, key, client_ca.as_deref())
            .map_err(|e| self.invalid("listen.tls_key", e.to_string()))?;
        Ok(Some(TlsConfig {
            server,
            fingerprint,
        }))
    }

    /// Every certificate in a PEM file; at least one.
    pub(super) fn certs(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| self.invalid(key, format!("cannot read {}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.invalid(key, format!("{}: bad PEM: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(self.invalid(key, format!("{}: no certificate in it", path.display())));
        }
        Ok(certs)
    }

    /// `upstream_in_flight`: `upstream.max_in_flight`, which a client's
    /// default share is half of.
    pub(super) fn limits(
        &self,
        raw: &RawLimits,
        upstream_in_flight: usize,
    ) -> Result<LimitsConfig, ConfigError> {
        if raw.max_header_bytes < 1024 || raw.max_header_bytes > MAX_HEADER_LIMIT {
            return Err(self.invalid(
                "limits.max_header_bytes",
                format!("must be between 1024 and {MAX_HEADER_LIMIT}"),
            ));
        }
        if raw.max_body_bytes == 0 {
            return Err(self.invalid("limits.max_body_bytes", "must be greater than zero"));
        }
        if raw.max_upload_bytes == 0 {
            return Err(self.invalid("limits.max_upload_bytes", "must be greater than zero"));
        }
        if raw.max_connections == 0 {
            return Err(self.invalid("limits.max_connections", "must be greater than zero"));
        }
        if raw.max_streams_per_connection == 0 {
            return Err(self.invalid(
                "limits.max_streams_per_connection",
                "must be greater than zero",
            ));
        }
        Ok(LimitsConfig {
            max_header_bytes: raw.max_header_bytes,
            max_body_bytes: raw.max_body_bytes,
            max_upload_bytes: raw.max_upload_bytes,
            upload_timeout: self.positive("limits.upload_timeout", raw.upload_timeout)?,
            max_connections: raw.max_connections,
            header_read_timeout: self
                .positive("limits.header_read_timeout", raw.header_read_timeout)?,
            keepalive_timeout: self.positive("limits.keepalive_timeout", raw.keepalive_timeout)?,
            body_read_timeout: self.positive("limits.body_read_timeout", raw.body_read_timeout)?,
            max_buffered_bytes: raw.max_buffered_bytes,
            send_timeout: self.positive("limits.send_timeout", raw.send_timeout)?,
            max_streams_per_connection: raw.max_streams_per_connection,
            client_max_in_flight: match raw.client_max_in_flight {
                Some(0) => {
                    return Err(self.invalid("limits.client_max_in_flight", "must be at least 1"))
                }
                Some(n) => n,
                None => (upstream_in_flight / 2).max(1),
            },
        })
    }

    pub(super) fn clients(
        &self,
        raw: Vec<RawClient>,
        names: &HashMap<String, TargetId>,
        default_in_flight: usize,
    ) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut out: Vec<ClientConfig> = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let at = |field: &str| format!("client[{i}].{field}");
            if r.name.is_empty() || out.iter().any(|c| c.name == r.name) {
                return Err(self.invalid(&at("name"), format!("{:?}: empty or used twice", r.name)));
            }
            let key = self
                .secret(&at("key"), r.key, r.key_env, r.key_file)?
                .ok_or_else(|| self.invalid(&at("key"), "missing: set key, key_env or key_file"))?;
            if key.expose().len() < 16 {
                return Err(self.invalid(&at("key"), "must be at least 16 characters"));
            }
            if out.iter().any(|c| c.key == key) {
                return Err(self.invalid(&at("key"), "the same key as another client"));
            }
            let identities = match &r.identities {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .map(|n| {
                            names.get(n).copied().ok_or_else(|| {
                                self.invalid(
                                    &at("identities"),
                                    format!("no identity or pool is named {n:?}"),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let rules = |field: &str, list: &[String]| -> Result<Vec<PathRule>, ConfigError> {
                list.iter()
                    .map(|text| self.rule(&at(field), text))
                    .collect()
            };
            let rate = match (r.rate, r.burst) {
                (None, None) => None,
                (None, Some(_)) => return Err(self.invalid(&at("burst"), "needs rate")),
                (Some(rate), burst) => {
                    if !(rate > 0.0 && rate.is_finite()) {
                        return Err(
                            self.invalid(&at("rate"), "requests per second, greater than zero")
                        );
                    }
                    let burst = burst.unwrap_or(rate.max(1.0));
                    if !(burst >= 1.0 && burst.is_finite()) {
                        return Err(self.invalid(&at("burst"), "at least 1"));
                    }
                    Some((rate, burst))
                }
            };
            let max_in_flight = match r.max_in_flight {
                Some(0) => return Err(self.invalid(&at("max_in_flight"), "must be at least 1")),
                Some(n) => n,
                None => default_in_flight,
            };
            out.push(ClientConfig {
                max_in_flight,
                allow_paths: rules("allow_paths", &r.allow_paths)?,
                deny_paths: rules("deny_paths", &r.deny_paths)?,
                name: r.name,
                key,
                identities,
                rate,
            });
        }
        Ok(out)
    }

    fn rule(&self, key: &str, text: &str) -> Result<PathRule, ConfigError> {
        let (method, pattern) = match text.split_once(' ') {
            Some(("*", p)) => (None, p.trim()),
            Some((m, p)) => {
                let method = Method::from_bytes(m.as_bytes())
                    .ok()
                    .filter(crate::gateway::canonical::method_allowed)
                    .ok_or_else(|| {
                        self.invalid(
                            key,
                            format!(
                                "{text:?}: {m:?} is not one of {}",
                                crate::gateway::canonical::ALLOW
                            ),
                        )
                    })?;
                (Some(method), p.trim())
            }
            None => (None, text),
        };
        if !pattern.starts_with('/') && pattern != "*" {
            return Err(self.invalid(
                key,
                format!("{text:?}: write \"[METHOD] /path/*\", e.g. \"DELETE /users/*\""),
            ));
        }
        // Rules are written as the canonical paths they compare against.
        let canonical = pattern == "*"
            || (!pattern.contains(['%', '\\', '?', '#'])
                && crate::gateway::canonical::path(pattern).is_ok_and(|c| c == pattern));
        if !canonical {
            return Err(self.invalid(
                key,
                format!("{text:?}: write the path plainly: no %-escapes, '\\', '?', '//', '.' or '..' segments"),
            ));
        }
        Ok(PathRule {
            text: text.to_owned(),
            method,
            pattern: rule_key(pattern).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("{text:?}: no '*' in a format suffix: a rule holds for every format (.json, .xml, none) already"),
                )
            })?,
        })
    }
}

/// A rule's pattern in route-key form: lowercase, the format suffix of its
/// last segment and trailing slashes dropped. `None` if the suffix holds a
/// `*` (it would not mean what it says once formats are folded).
fn rule_key(pattern: &str) -> Option<String> {
    if pattern == "*" {
        return Some(pattern.to_owned());
    }
    let lower = pattern.to_ascii_lowercase();
    let trimmed = lower.trim_end_matches('/');
    let last = trimmed.rfind('/').map_or(0, |i| i + 1);
    let stem = match trimmed[last..].find('.') {
        Some(dot) if trimmed[last + dot..].contains('*') => return None,
        Some(dot) => &trimmed[..last + dot],
        None => trimmed,
    };
    let stem = stem.trim_end_matches('/');
    Some(if stem.is_empty() {
        "/".into()
    } else {
        stem.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("/users/*", "/users/5.json"));
        assert!(glob("/users/*", "/users/"));
        assert!(!glob("/users/*", "/users"));
        assert!(glob("*", "/anything"));
        assert!(glob("/chat/*/messages*", "/chat/1/messages.json"));
        assert!(!glob("/chat/*/messages*", "/chat/1/dialogs.json"));
        assert!(glob("/a*b*c", "/aXbYc"));
        assert!(!glob("/a*bc", "/abc/x"));
        assert!(glob("/exact.json", "/exact.json"));
        assert!(!glob("/exact.json", "/exact.json/x"));
    }

    #[test]
    fn rule_patterns_take_route_key_form() {
        assert_eq!(rule_key("/users/*").as_deref(), Some("/users/*"));
        assert_eq!(rule_key("/Users/*.json").as_deref(), Some("/users/*"));
        assert_eq!(rule_key("/users.json").as_deref(), Some("/users"));
        assert_eq!(rule_key("/users/").as_deref(), Some("/users"));
        assert_eq!(
            rule_key("/chat/*/Messages*").as_deref(),
            Some("/chat/*/messages*")
        );
        assert_eq!(rule_key("*").as_deref(), Some("*"));
        assert_eq!(rule_key("/a.*"), None);
        let rule = PathRule {
            text: "GET /users/*".into(),
            method: Some(Method::GET),
            pattern: "/users/*".into(),
        };
        assert!(rule.matches(&Method::GET, "/users/5"));
        assert!(
            rule.matches(&Method::HEAD, "/users/5"),
            "HEAD is routed as GET"
        );
        assert!(!rule.matches(&Method::DELETE, "/users/5"));
        for (rule, other) in [(Method::PUT, Method::PATCH), (Method::PATCH, Method::PUT)] {
            let rule = PathRule {
                text: format!("{rule} /users/*"),
                method: Some(rule),
                pattern: "/users/*".into(),
            };
            assert!(
                rule.matches(&other, "/users/5"),
                "{} holds for {other}",
                rule.text
            );
            assert!(!rule.matches(&Method::POST, "/users/5"));
        }
    }
}
