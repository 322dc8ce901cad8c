//! Where sessions come from: the [`Source`] a renewal task asks, and what
//! it answers.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::SessionError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Creates sessions: the real one signs and posts to QuickBlox
/// ([`crate::upstream::SessionCreator`]); tests script their own.
pub trait Source: Send + Sync + 'static {
    fn create(&self) -> BoxFuture<'_, Result<NewSession, SessionError>>;
}

/// What a [`Source`] returns: a fresh token and what QuickBlox said of it.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    pub token: String,
    pub user_id: u64,
    /// Time left before the session lapses if unused.
    pub lifetime: Duration,
    /// The session object QuickBlox returned, without its token (see
    /// [`public_fields`]): what `GET /session.json` is answered with.
    pub public: serde_json::Map<String, serde_json::Value>,
}

/// The fields of QuickBlox's session object that a client may see. A
/// list of what is allowed rather than of what is not: a field QuickBlox
/// adds one day (a refresh token, say) stays inside qbproxy.
pub const PUBLIC_FIELDS: [&str; 8] = [
    "application_id",
    "created_at",
    "id",
    "nonce",
    "ts",
    "updated_at",
    "user_id",
    "_id",
];

/// The client-visible part of a session object: [`PUBLIC_FIELDS`] only.
pub fn public_fields(
    session: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    session
        .iter()
        .filter(|(k, _)| PUBLIC_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
