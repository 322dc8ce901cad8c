//! The tokens qbproxy holds or held, for `client_token = "keep"`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha1::{Digest, Sha1};
use tokio::time::Instant;

use crate::quickblox;

/// Every token qbproxy holds, and those it held within a session's
/// lifetime, as SHA-1 digests, across all identities. With
/// `client_token = "keep"` a client that sends one of them back is refused:
/// it could only have it by theft, and could use it to destroy or upgrade
/// a session others share. Digests, so that looking one up compares
/// digests, never token bytes.
#[derive(Clone, Default)]
pub struct HeldTokens {
    inner: Arc<Mutex<HeldInner>>,
}

#[derive(Default)]
struct HeldInner {
    /// `None`: held now; `Some(t)`: replaced, remembered until `t`.
    tokens: HashMap<[u8; 20], Option<Instant>>,
    /// Prune replaced tokens once the map reaches this size.
    prune_at: usize,
}

impl HeldTokens {
    fn digest(token: &[u8]) -> [u8; 20] {
        Sha1::digest(token).into()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session was created with `token`.
    pub(super) fn hold(&self, token: &[u8]) {
        let mut inner = self.lock();
        inner.tokens.insert(Self::digest(token), None);
        if inner.tokens.len() >= inner.prune_at {
            let now = Instant::now();
            inner
                .tokens
                .retain(|_, until| until.is_none_or(|t| t > now));
            inner.prune_at = (inner.tokens.len() * 2).max(64);
        }
    }

    /// `token` is no longer used; it may still be alive at QuickBlox for a
    /// session's lifetime.
    pub(super) fn release(&self, token: &[u8]) {
        let until = Instant::now() + quickblox::SESSION_LIFETIME;
        if let Some(entry) = self.lock().tokens.get_mut(&Self::digest(token)) {
            *entry = Some(until);
        }
    }

    /// True if qbproxy holds `token`, or held it within a session's lifetime.
    pub fn contains(&self, token: &[u8]) -> bool {
        let now = Instant::now();
        self.lock()
            .tokens
            .get(&Self::digest(token))
            .is_some_and(|until| until.is_none_or(|t| t > now))
    }
}
