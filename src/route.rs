//! Choosing who a request acts as: the `QBProxy-Identity` header (an
//! identity or a pool name), else a configured path prefix (stripped before
//! forwarding), else the default. Pure lookups; no I/O.

use std::collections::HashMap;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName};

use crate::error::ProxyError;
use crate::pool::Pool;
use crate::session::Identity;

/// Names an identity or a pool; stripped before forwarding (as every
/// `QBProxy-*` header is).
pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("qbproxy-identity");
/// Keys a sticky pool's member choice.
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("qbproxy-client");

/// Where a request goes.
#[derive(Clone)]
pub enum Target {
    Identity(Identity),
    Pool(Arc<Pool>),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Identity(i) => i.name(),
            Target::Pool(p) => p.name(),
        }
    }
}

pub struct Router {
    by_name: HashMap<String, Target>,
    /// Longest first, so `/bot/admin` wins over `/bot`.
    prefixes: Vec<(String, Target)>,
    default: Target,
    /// Every selectable name, sorted, for the 400 message.
    valid: String,
}

impl Router {
    /// `named`: every selectable name; `listed`: the names the 400 message
    /// offers (not every generated pool member).
    pub fn new(
        named: Vec<(String, Target)>,
        mut listed: Vec<String>,
        prefixes: Vec<(String, Target)>,
        default: Target,
    ) -> Router {
        listed.sort_unstable();
        let valid = listed.join(", ");
        let mut prefixes = prefixes;
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Router {
            by_name: named.into_iter().collect(),
            prefixes,
            default,
            valid,
        }
    }

    pub fn default_target(&self) -> &Target {
        &self.default
    }

    /// The identity or pool called `name`.
    pub fn named(&self, name: &str) -> Option<&Target> {
        self.by_name.get(name)
    }

    /// The target for a request, and its path with a matched prefix removed
    /// (`None`: forward the path as it is).
    pub fn route(
        &self,
        headers: &HeaderMap,
        pq: &PathAndQuery,
    ) -> Result<(&Target, Option<PathAndQuery>), ProxyError> {
        if let Some(name) = headers.get(IDENTITY_HEADER) {
            let name = name.to_str().unwrap_or("");
            return match self.by_name.get(name) {
                Some(t) => Ok((t, None)),
                None => Err(ProxyError::UnknownIdentity {
                    name: name.chars().take(64).collect(),
                    valid: self.valid.clone(),
                }),
            };
        }
        let path = pq.path();
        for (prefix, target) in &self.prefixes {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Ok((target, Some(strip(pq, prefix.len()))));
                }
            }
        }
        Ok((&self.default, None))
    }
}

/// `pq` without its first `n` bytes (a prefix of the path), bytes otherwise
/// untouched; an emptied path becomes `/`.
fn strip(pq: &PathAndQuery, n: usize) -> PathAndQuery {
    let rest = &pq.as_str()[n..];
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    // A suffix of a valid path-and-query, with a leading slash, is valid.
    PathAndQuery::try_from(rest).unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_stripping_keeps_bytes() {
        let pq = PathAndQuery::from_static("/bot/users.json?a=%2C&b=c+d");
        assert_eq!(strip(&pq, 4).as_str(), "/users.json?a=%2C&b=c+d");
        let pq = PathAndQuery::from_static("/bot?x=1");
        assert_eq!(strip(&pq, 4).as_str(), "/?x=1");
        let pq = PathAndQuery::from_static("/bot");
        assert_eq!(strip(&pq, 4).as_str(), "/");
    }
}
