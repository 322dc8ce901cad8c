//! Where sessions come from: the [`Source`] a renewal task asks, and what
//! it answers.

use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use super::{Reason, SessionError};
use crate::quickblox::credentials::Secret;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the renewal task knows when it asks its [`Source`] for a session.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub reason: Reason,
    /// The session this replica holds, unless QuickBlox refused it: its
    /// token, its fleet generation (0: this replica's own) and when it
    /// lapses.
    pub held: Option<Held>,
    /// The latest session QuickBlox refused here ("Required session does
    /// not exist"), kept after the state let go of it: a source must never
    /// hand it out again, and in a fleet it proves the stored session dead.
    pub refused: Option<Held>,
    /// The policy's `renew_before`, to tell whether a renewal is due.
    pub renew_before: Duration,
}

/// What a source may know of the session a replica holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub token: Secret,
    /// Its generation in the fleet (`[cluster]`); `None`: this replica's own.
    pub fleet: Option<NonZeroU64>,
    pub expires_at: SystemTime,
    pub user_id: u64,
    /// QuickBlox's public fields of it.
    pub public: serde_json::Map<String, serde_json::Value>,
}

/// Gives the renewal task its sessions: the real one signs and posts to
/// QuickBlox ([`crate::upstream::SessionCreator`]); with `[cluster]` one
/// shares them with the other replicas (`crate::cluster::FleetSource`);
/// tests script their own.
pub trait Source: Send + Sync + 'static {
    /// A session for `attempt`: a new one, or one another replica stored.
    /// A session with the held token is the held one, known to live longer.
    fn create(&self, attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>>;

    /// Called every [`Source::sync_every`] while the identity runs: a
    /// session to adopt, or the held one living longer, if the fleet knows
    /// better.
    fn sync(&self, _attempt: Attempt) -> BoxFuture<'_, Option<NewSession>> {
        Box::pin(async { None })
    }

    /// How often to sync; `None` (the default): never.
    fn sync_every(&self) -> Option<Duration> {
        None
    }

    /// A counter that moves when the source wants a sync now, not at the
    /// next [`Source::sync_every`] (the fleet's Redis came back); `None`
    /// (the default): never.
    fn rejoins(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// What a [`Source`] returns: a fresh token and what QuickBlox said of it.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// Redacted in `Debug`, as every credential.
    pub token: Secret,
    pub user_id: u64,
    /// Time left before the session lapses if unused.
    pub lifetime: Duration,
    /// The session object QuickBlox returned, without its token (see
    /// [`public_fields`]): what `GET /session.json` is answered with.
    pub public: serde_json::Map<String, serde_json::Value>,
    /// Its generation in the fleet (`[cluster]`); `None`: this replica's own.
    pub fleet: Option<NonZeroU64>,
    /// Created now, or taken from elsewhere (no creation).
    pub origin: Origin,
    /// How the token goes on a request.
    pub scheme: Scheme,
}

/// Where a session a [`Source`] returns comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// QuickBlox created it for this replica now.
    #[default]
    Created,
    /// Another replica created it; this one adopted it (`[cluster]`).
    Fleet,
    /// This replica held it before its restart (`[state] file`).
    StateFile,
}

/// How a session's token is sent to QuickBlox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scheme {
    /// `QB-Token: <token>`: a session QuickBlox created.
    #[default]
    QbToken,
    /// `Authorization: ApiKey <token>`, and `On-Behalf-Of: <user_id>`
    /// unless the user id is 0. An API key has no session: it never
    /// expires, and QuickBlox never answers it "Required session does not
    /// exist".
    ApiKey,
}

/// How long an API key "session" lives: for ever, written so that adding
/// it to an `Instant` cannot overflow.
pub const API_KEY_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The [`Source`] of an API-key identity: hands out the key, at once,
/// every time. Nothing is created at QuickBlox and nothing can fail, so the
/// renewal task publishes it on start and never again (unless a reload
/// brings a new key, or an operator forces a renewal).
pub struct ApiKeySource {
    key: crate::quickblox::credentials::Secret,
    on_behalf_of: Option<u64>,
}

impl ApiKeySource {
    pub fn new(key: crate::quickblox::credentials::Secret, on_behalf_of: Option<u64>) -> Self {
        ApiKeySource { key, on_behalf_of }
    }
}

impl Source for ApiKeySource {
    fn create(&self, _attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        let session = NewSession {
            token: self.key.clone(),
            user_id: self.on_behalf_of.unwrap_or(0),
            lifetime: API_KEY_LIFETIME,
            scheme: Scheme::ApiKey,
            ..NewSession::default()
        };
        Box::pin(async move { Ok(session) })
    }
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
