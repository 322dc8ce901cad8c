//! Who may use the proxy, checked before anything is forwarded: the source
//! address allowlist, the header-size limit, client API keys
//! (`QBProxy-Key`, compared in constant time), per-client rate limits,
//! and per-client identity and path rules.
//!
//! A [`Gate`] is built from the config and swapped whole on reload.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use http::{HeaderMap, HeaderName, Method};
use ipnet::IpNet;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::config::{ClientConfig, Config, PathRule, TargetId};
use crate::gateway::canonical;
use crate::telemetry::metrics::{CodeCounter, Metrics};

/// The client's API key; stripped before forwarding like every `QBProxy-*`.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("qbproxy-key");

pub struct Gate {
    allow: Vec<IpNet>,
    clients: Vec<ApiClient>,
    max_header_bytes: usize,
    pub max_body_bytes: u64,
}

/// A `[[client]]`: a caller known by its API key.
pub struct ApiClient {
    /// Shared with the access events of its requests.
    pub name: Arc<str>,
    /// SHA-1 of the key: comparing digests in constant time leaks neither
    /// the key nor its length.
    digest: [u8; 20],
    /// What it may act as (the first is its default), with their names for
    /// messages; `None`: anything.
    identities: Option<Vec<(TargetId, String)>>,
    allow_paths: Vec<PathRule>,
    deny_paths: Vec<PathRule>,
    bucket: Option<Mutex<Bucket>>,
    pub metrics: CodeCounter,
    /// Upstream slots it holds at most (`fair.rs`).
    pub max_in_flight: usize,
}

impl Gate {
    pub fn new(config: &Config, metrics: &Metrics) -> Gate {
        Gate {
            allow: config.listen.allow.clone(),
            clients: config
                .clients
                .iter()
                .map(|c| ApiClient::new(c, config, metrics))
                .collect(),
            max_header_bytes: config.limits.max_header_bytes,
            max_body_bytes: config.limits.max_body_bytes,
        }
    }

    /// Checks a request's source, headers and key; returns its client when
    /// keys are configured.
    /// `size`: the request's headers as sent ([`header_bytes`]), before
    /// hop-by-hop ones were removed.
    pub fn admit(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        size: usize,
    ) -> Result<Option<&ApiClient>, Refusal> {
        let peer = peer.to_canonical();
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&peer)) {
            return Err(Refusal::SourceNotAllowed(peer));
        }
        if size > self.max_header_bytes {
            return Err(Refusal::HeaderTooLarge {
                size,
                limit: self.max_header_bytes,
            });
        }
        if self.clients.is_empty() {
            return Ok(None);
        }
        // `QBProxy_Key` is never read (nor forwarded): point its sender at
        // the spelling it meant.
        let misspelt = headers.keys().any(|n| {
            n.as_str().contains('_') && canonical::same_header_name(n.as_str(), KEY_HEADER.as_str())
        });
        let Some(key) = headers.get(KEY_HEADER) else {
            return Err(Refusal::NoKey { misspelt });
        };
        self.client_for(key.as_bytes())
            .map(Some)
            .ok_or(Refusal::BadKey { misspelt })
    }

    /// A chat login's source and key: with `[[client]]` keys configured,
    /// the SASL password must be one (a WebSocket from a browser cannot
    /// send headers); its client's rules then apply.
    pub fn admit_chat(&self, peer: IpAddr, password: &[u8]) -> Result<Option<&ApiClient>, Refusal> {
        let peer = peer.to_canonical();
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&peer)) {
            return Err(Refusal::SourceNotAllowed(peer));
        }
        if self.clients.is_empty() {
            return Ok(None);
        }
        self.client_for(password)
            .map(Some)
            .ok_or(Refusal::BadKey { misspelt: false })
    }

    /// The client whose key this is. Every client is compared, so the time
    /// taken does not say which (or whether one) matched.
    fn client_for(&self, key: &[u8]) -> Option<&ApiClient> {
        let digest: [u8; 20] = Sha1::digest(key).into();
        let mut found = None;
        for client in &self.clients {
            if bool::from(client.digest.ct_eq(&digest)) {
                found = Some(client);
            }
        }
        found
    }
}

impl ApiClient {
    /// Takes a token from the client's rate bucket, if it has a `rate`.
    /// Apart from [`Gate::admit`] so that a refusal here is counted and
    /// logged under the client it identified.
    pub fn within_rate(&self) -> Result<(), Refusal> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket
            .take(Instant::now())
            .map_err(|retry_after| Refusal::RateLimited {
                client: self.name.to_string(),
                retry_after,
            })
    }

    fn new(c: &ClientConfig, config: &Config, metrics: &Metrics) -> ApiClient {
        ApiClient {
            name: c.name.as_str().into(),
            digest: Sha1::digest(c.key.expose().as_bytes()).into(),
            identities: c.identities.as_ref().map(|ids| {
                ids.iter()
                    .map(|t| (*t, config.target_name(*t).to_owned()))
                    .collect()
            }),
            allow_paths: c.allow_paths.clone(),
            deny_paths: c.deny_paths.clone(),
            bucket: c
                .rate
                .map(|(rate, burst)| Mutex::new(Bucket::new(rate, burst))),
            metrics: metrics.client(&c.name),
            max_in_flight: c.max_in_flight,
        }
    }

    /// The identity this client uses when the request names none: its
    /// first allowed one, if it is restricted.
    pub fn default_target(&self) -> Option<TargetId> {
        self.identities
            .as_ref()
            .and_then(|ids| ids.first())
            .map(|(t, _)| *t)
    }

    /// The names of the identities and pools it may use; `None`: all.
    pub fn allowed_names(&self) -> Option<String> {
        self.identities.as_ref().map(|ids| {
            ids.iter()
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// May this client act as `target` (called `name`) and send `method
    /// path`? `path` is canonical; the rules compare its route key.
    pub fn permit(
        &self,
        target: TargetId,
        name: &str,
        method: &Method,
        path: &str,
    ) -> Result<(), Refusal> {
        if let Some(ids) = &self.identities {
            if !ids.iter().any(|(t, _)| *t == target) {
                return Err(Refusal::Identity {
                    client: self.name.to_string(),
                    target: name.to_owned(),
                    allowed: self.allowed_names().unwrap_or_default(),
                });
            }
        }
        if self.deny_paths.is_empty() && self.allow_paths.is_empty() {
            return Ok(());
        }
        let key = canonical::route_key(path);
        if let Some(rule) = self.deny_paths.iter().find(|r| r.matches(method, &key)) {
            return Err(Refusal::DeniedPath {
                client: self.name.to_string(),
                method: method.clone(),
                path: path.to_owned(),
                rule: rule.text.clone(),
            });
        }
        if !self.allow_paths.is_empty() && !self.allow_paths.iter().any(|r| r.matches(method, &key))
        {
            return Err(Refusal::NoAllowedPath {
                client: self.name.to_string(),
                method: method.clone(),
                path: path.to_owned(),
            });
        }
        Ok(())
    }
}

/// Why the gate refused a request; the proxy's edge (`proxy::error`) turns
/// it into a status and a `QBProxy-Error` code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not in listen.allow")]
    SourceNotAllowed(IpAddr),
    #[error("request headers are {size} bytes; the limit is {limit}")]
    HeaderTooLarge { size: usize, limit: usize },
    /// `misspelt`: a `QBProxy_Key` header was sent (and ignored).
    #[error("this proxy needs a QBProxy-Key header{}", misspelt_hint(*.misspelt))]
    NoKey { misspelt: bool },
    #[error("the QBProxy-Key is not valid{}", misspelt_hint(*.misspelt))]
    BadKey { misspelt: bool },
    #[error("client {client:?} is over its rate limit; retry in {retry_after}s")]
    RateLimited { client: String, retry_after: u64 },
    #[error("client {client:?} may not use identity {target:?}; it may use: {allowed}")]
    Identity {
        client: String,
        target: String,
        allowed: String,
    },
    #[error("client {client:?} may not {method} {path} (deny_paths rule {rule:?})")]
    DeniedPath {
        client: String,
        method: Method,
        path: String,
        rule: String,
    },
    #[error("client {client:?} may not {method} {path} (no allow_paths rule matches)")]
    NoAllowedPath {
        client: String,
        method: Method,
        path: String,
    },
}

fn misspelt_hint(misspelt: bool) -> &'static str {
    if misspelt {
        " (a header spelt with '_' was ignored: write QBProxy-Key)"
    } else {
        ""
    }
}

/// Request header size as `limits.max_header_bytes` counts it: names and
/// values, plus 4 bytes per header for `: ` and CRLF.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says in how many whole seconds one will be there.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst() {
        let start = Instant::now();
        let mut b = Bucket::new(2.0, 3.0);
        b.at = start;
        for _ in 0..3 {
            assert!(b.take(start).is_ok());
        }
        assert_eq!(b.take(start), Err(1));
        // Half a second later: one more token.
        assert!(b.take(start + Duration::from_millis(500)).is_ok());
        assert!(b.take(start + Duration::from_millis(500)).is_err());
        // A long pause saves up no more than the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
        // Slow rates ask for longer waits.
        let mut slow = Bucket::new(0.1, 1.0);
        slow.at = start;
        assert!(slow.take(start).is_ok());
        assert_eq!(slow.take(start), Err(10));
    }

    #[test]
    fn header_size_counts_names_values_and_separators() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "12345".parse().unwrap());
        assert_eq!(header_bytes(&h), 3 + 5 + 4);
    }
}
