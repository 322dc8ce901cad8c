//! Choosing who a request acts as: the `QBProxy-Identity` header (an
//! identity or a pool name), else a configured path prefix of the
//! canonical path (stripped before forwarding), else the default. Pure
//! lookups; no I/O.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use crate::config::{Config, TargetId};
use crate::session::pool::Pool;
use crate::session::Identity;

/// Names an identity or a pool; stripped before forwarding (as every
/// `QBProxy-*` header is).
pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("qbproxy-identity");
/// Keys a sticky pool's member choice.
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("qbproxy-client");

/// Where a request goes, resolved from a [`TargetId`] by the `Live` that
/// routed it.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Identity(&'a Identity),
    Pool(&'a Arc<Pool>),
}

impl Target<'_> {
    pub fn name(&self) -> &str {
        match self {
            Target::Identity(i) => i.name(),
            Target::Pool(p) => p.name(),
        }
    }
}

/// A `QBProxy-Identity` that names no identity or pool: the name sent (at
/// most 64 characters) and every valid one.
#[derive(Debug)]
pub struct UnknownTarget {
    pub name: String,
    pub valid: String,
}

pub struct Router {
    /// Every identity and pool by name (shared with the config).
    names: Arc<HashMap<String, TargetId>>,
    /// Longest first, so `/bot/admin` wins over `/bot`.
    prefixes: Vec<(String, TargetId)>,
    default: TargetId,
    /// The names a client would choose (standalone identities and pools,
    /// not every generated member), sorted, for the 400 message.
    valid: String,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut listed: Vec<&str> = config
            .identities
            .iter()
            .filter(|i| i.pool.is_none())
            .map(|i| i.name.as_str())
            .chain(config.pools.iter().map(|p| p.name.as_str()))
            .collect();
        listed.sort_unstable();
        // Only standalone identities and pools have prefixes (validation).
        let mut prefixes: Vec<(String, TargetId)> = config
            .identities
            .iter()
            .map(|i| (&i.path_prefix, &i.name))
            .chain(config.pools.iter().map(|p| (&p.path_prefix, &p.name)))
            .filter_map(|(prefix, name)| Some((prefix.clone()?, config.target(name)?)))
            .collect();
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Router {
            names: config.names.clone(),
            prefixes,
            default: config.default,
            valid: listed.join(", "),
        }
    }

    /// The target for a request, and its canonical path with a matched
    /// prefix removed (`named`: the `QBProxy-Identity` header, if sent).
    pub fn route<'p>(
        &self,
        named: Option<&HeaderValue>,
        path: &'p str,
    ) -> Result<(TargetId, &'p str), UnknownTarget> {
        if let Some(name) = named {
            let name = name.to_str().unwrap_or("");
            return match self.names.get(name) {
                Some(t) => Ok((*t, path)),
                None => Err(UnknownTarget {
                    name: name.chars().take(64).collect(),
                    valid: self.valid.clone(),
                }),
            };
        }
        for (prefix, target) in &self.prefixes {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() {
                    return Ok((*target, "/"));
                }
                if rest.starts_with('/') {
                    return Ok((*target, rest));
                }
            }
        }
        Ok((self.default, path))
    }
}
