//! Choosing who a request acts as: the `QBProxy-Identity` header (an
//! identity or a pool name), else a configured path prefix of the
//! canonical path (stripped before forwarding), else the default. Pure
//! lookups; no I/O.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

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

    /// The identity or pool called `name`.
    pub fn named(&self, name: &str) -> Option<&Target> {
        self.by_name.get(name)
    }

    /// The target for a request, and its canonical path with a matched
    /// prefix removed (`named`: the `QBProxy-Identity` header, if sent).
    pub fn route<'p>(
        &self,
        named: Option<&HeaderValue>,
        path: &'p str,
    ) -> Result<(&Target, &'p str), ProxyError> {
        if let Some(name) = named {
            let name = name.to_str().unwrap_or("");
            return match self.by_name.get(name) {
                Some(t) => Ok((t, path)),
                None => Err(ProxyError::UnknownIdentity {
                    name: name.chars().take(64).collect(),
                    valid: self.valid.clone(),
                }),
            };
        }
        for (prefix, target) in &self.prefixes {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() {
                    return Ok((target, "/"));
                }
                if rest.starts_with('/') {
                    return Ok((target, rest));
                }
            }
        }
        Ok((&self.default, path))
    }
}
