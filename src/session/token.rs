//! A session: its token, its generation, its expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::Scheme;
use crate::quickblox;

/// A session token and what is known of it. Immutable but for its expiry,
/// which every use pushes forward.
pub struct Session {
    pub(super) token: HeaderValue,
    /// Counts the identity's sessions from 1; a refusal names the generation
    /// it saw, so a late report about an old token renews nothing.
    pub(super) generation: u64,
    pub(super) user_id: u64,
    pub(super) created_at: SystemTime,
    /// `created_at` in milliseconds after the identity's epoch.
    pub(super) created_ms: u64,
    /// Milliseconds after the identity's epoch at which the session lapses.
    /// Only ever moves forward (`fetch_max`): responses may arrive out of order.
    pub(super) expires_at_ms: AtomicU64,
    /// When the expiry was last updated. Expiry dates have one-second
    /// resolution, so uses within the same second skip the header parsing.
    pub(super) touched_ms: AtomicU64,
    /// `{"session":{...}}` without the token: the answer to a client's
    /// `GET /session.json`.
    pub(super) public: Bytes,
    /// Its generation in the fleet; 0 while it is this replica's own (no
    /// `[cluster]`, or Redis unreachable when it was made). Set once, when
    /// the session is published to the fleet.
    pub(super) fleet: AtomicU64,
    /// Set for an API key: the headers it goes in, made once.
    pub(super) api_key: Option<ApiKeyHeaders>,
}

/// An API key's headers, made once: `Authorization: ApiKey <key>`
/// (sensitive) and, when it acts as a user, `On-Behalf-Of`.
pub struct ApiKeyHeaders {
    authorization: HeaderValue,
    on_behalf_of: Option<HeaderValue>,
}

impl ApiKeyHeaders {
    /// `None` if the key cannot go in a header. A `user_id` of 0: the
    /// application itself, no `On-Behalf-Of`.
    pub fn new(key: &[u8], user_id: u64) -> Option<ApiKeyHeaders> {
        let mut value = Vec::with_capacity(quickblox::API_KEY_SCHEME.len() + 1 + key.len());
        value.extend_from_slice(quickblox::API_KEY_SCHEME.as_bytes());
        value.push(b' ');
        value.extend_from_slice(key);
        let mut authorization = HeaderValue::from_bytes(&value).ok()?;
        authorization.set_sensitive(true);
        Some(ApiKeyHeaders {
            authorization,
            on_behalf_of: (user_id != 0).then(|| HeaderValue::from(user_id)),
        })
    }

    /// Puts them on a request.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(http::header::AUTHORIZATION, self.authorization.clone());
        if let Some(user) = &self.on_behalf_of {
            headers.insert(quickblox::ON_BEHALF_OF, user.clone());
        }
    }
}

impl Session {
    pub fn token(&self) -> &HeaderValue {
        &self.token
    }

    /// How the token is sent.
    pub fn scheme(&self) -> Scheme {
        match self.api_key {
            Some(_) => Scheme::ApiKey,
            None => Scheme::QbToken,
        }
    }

    /// Puts the session's credential on a request: `QB-Token`, or for an
    /// API key `Authorization: ApiKey` and `On-Behalf-Of` if it acts as a
    /// user. The caller has removed any the client sent.
    pub fn authorize(&self, headers: &mut HeaderMap) {
        match &self.api_key {
            None => {
                headers.insert(quickblox::QB_TOKEN, self.token.clone());
            }
            Some(h) => h.apply(headers),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn user_id(&self) -> u64 {
        self.user_id
    }

    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// The session as QuickBlox describes it, token left out:
    /// `{"session":{"application_id":..,"id":..,"user_id":..,...}}`.
    pub fn public_json(&self) -> &Bytes {
        &self.public
    }

    /// Its generation in the fleet; `None`: this replica's own (held as 0 in
    /// the atomic, which a fleet generation never is).
    pub fn fleet(&self) -> Option<std::num::NonZeroU64> {
        std::num::NonZeroU64::new(self.fleet.load(Ordering::Acquire))
    }

    /// A short prefix of the token, safe for logs.
    pub fn token_prefix(&self) -> String {
        quickblox::token_prefix(self.token.to_str().unwrap_or(""))
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token_prefix())
            .field("generation", &self.generation)
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}
