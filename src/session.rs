//! Session store and renewal for one identity.
//!
//! Readers (the proxy, once per request) load the current [`Session`] from
//! an `ArcSwap`: no lock, no waiting. One renewal task per identity is the
//! only writer. It creates the session at start, renews it ahead of expiry,
//! renews it when the proxy reports the token refused, and retries failed
//! creations with capped, jittered exponential backoff.
//!
//! Single flight falls out of that shape: however many requests report the
//! same refused generation, the task sees one report, creates one session,
//! and everyone waiting on the change notification picks up the result.
//!
//! The task only ever talks to a [`Source`], so the scheduling here is
//! tested with paused time and an in-memory source.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use rand::Rng;
use sha1::{Digest, Sha1};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::metrics::{IdentityMetrics, Metrics};
use crate::qb;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why session creation failed. Shown to clients after
/// `qbproxy: could not create a QuickBlox session: `, so it never contains a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("QuickBlox is unreachable: {0}")]
    Unreachable(String),
    #[error("QuickBlox did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from QuickBlox: {0}")]
    BadResponse(String),
    /// The identity's own credentials could not be read (a token command
    /// failed, a token file is missing).
    #[error("{0}")]
    Credentials(String),
}

impl SessionError {
    /// QuickBlox refused the identity's credentials (401 Unauthorized):
    /// retrying the same ones will not help.
    pub fn credentials_refused(&self) -> bool {
        matches!(self, SessionError::Refused { status: 401, .. })
    }

    /// A failure the next attempt may not meet: QuickBlox unreachable,
    /// slow, rate limiting or failing. Refused credentials or signatures,
    /// answers qbproxy cannot read and unreadable credentials are not.
    pub fn transient(&self) -> bool {
        match self {
            SessionError::Unreachable(_) | SessionError::Timeout(_) => true,
            SessionError::Refused { status, .. } => *status == 429 || *status >= 500,
            SessionError::BadResponse(_) | SessionError::Credentials(_) => false,
        }
    }
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
    fn hold(&self, token: &[u8]) {
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
    fn release(&self, token: &[u8]) {
        let until = Instant::now() + qb::SESSION_LIFETIME;
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

/// Creates sessions: the real one signs and posts to QuickBlox
/// ([`crate::upstream::SessionCreator`]); tests script their own.
pub trait Source: Send + Sync + 'static {
    fn create(&self) -> BoxFuture<'_, Result<NewSession, SessionError>>;
}

/// Why a session was created; the `reason` label of
/// `qbproxy_session_renewals_total` and of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Startup,
    Expired,
    Proactive,
    /// An operator asked for it (`POST /sessions/{name}/renew`).
    Forced,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Expired => "expired",
            Reason::Proactive => "proactive",
            Reason::Forced => "forced",
        }
    }

    /// Index into per-reason counters, in the order of `metrics::REASONS`.
    fn index(self) -> usize {
        self as usize
    }
}

/// When to renew and how to back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Renew in the background once less than this is left.
    pub renew_before: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long a request waits through [transient](SessionError::transient)
    /// failures for a retry to succeed.
    pub retry_wait: Duration,
    /// When QuickBlox refuses the credentials (401), stop retrying until a
    /// forced renewal: for pool members, whose pool serves on without them.
    pub set_aside_refused: bool,
}

/// What an identity is, for logs, metrics and the admin API.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub pool: Option<String>,
    /// `Credentials::kind`: application, login, email, facebook, firebase_phone.
    pub kind: &'static str,
}

/// A session token and what is known of it. Immutable but for its expiry,
/// which every use pushes forward.
pub struct Session {
    token: HeaderValue,
    /// Counts the identity's sessions from 1; a refusal names the generation
    /// it saw, so a late report about an old token renews nothing.
    generation: u64,
    user_id: u64,
    created_at: SystemTime,
    /// `created_at` in milliseconds after the identity's epoch.
    created_ms: u64,
    /// Milliseconds after the identity's epoch at which the session lapses.
    /// Only ever moves forward (`fetch_max`): responses may arrive out of order.
    expires_at_ms: AtomicU64,
    /// When the expiry was last updated. Expiry dates have one-second
    /// resolution, so uses within the same second skip the header parsing.
    touched_ms: AtomicU64,
    /// `{"session":{...}}` without the token: the answer to a client's
    /// `GET /session.json`.
    public: Bytes,
}

impl Session {
    pub fn token(&self) -> &HeaderValue {
        &self.token
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

    /// A short prefix of the token, safe for logs.
    pub fn token_prefix(&self) -> String {
        qb::token_prefix(self.token.to_str().unwrap_or(""))
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

/// What readers see: a usable session, the last failure, or both (a
/// proactive renewal failed while the old session is still good).
#[derive(Default)]
struct State {
    session: Option<Arc<Session>>,
    failure: Option<Arc<SessionError>>,
    /// No retry is scheduled: the credentials were refused.
    set_aside: bool,
    /// When the retry after `failure` is due.
    retry_at: Option<Instant>,
    /// The outcome of the latest forced renewal, carried from state to
    /// state until the next one, so a caller reads its own attempt's
    /// outcome, not whichever attempt published last.
    forced: Option<Forced>,
}

#[derive(Clone)]
struct Forced {
    /// Forced renewals asked for up to this count are answered by it.
    upto: u64,
    outcome: Result<Arc<Session>, Arc<SessionError>>,
}

/// Why no session could be handed out.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// The last creation attempt failed; retries continue in the background.
    Failed(Arc<SessionError>),
    /// The request's deadline passed while a session was being created.
    TimedOut,
}

/// A cheap-to-clone handle on one identity's session.
#[derive(Clone)]
pub struct Identity {
    shared: Arc<Shared>,
}

struct Shared {
    info: Info,
    /// Swapped on reload (a rotated password or secret); the renewal task
    /// loads it at each attempt, so the change takes effect at the next one.
    source: ArcSwap<Box<dyn Source>>,
    /// Swapped on reload, like `source`; read at each use.
    policy: ArcSwap<Policy>,
    metrics: IdentityMetrics,
    /// Zero point of the millisecond clocks in [`Session`]; a tokio
    /// `Instant`, so paused-time tests drive it.
    epoch: Instant,
    /// Read on every request, written only by the renewal task: `ArcSwap`
    /// makes the read lock-free and the swap atomic.
    state: ArcSwap<State>,
    /// Bumped after every write to `state`. Only the slow paths (a request
    /// waiting for a first or replacement session) subscribe.
    changes: watch::Sender<u64>,
    /// Highest generation the proxy reported refused as expired.
    refused: AtomicU64,
    /// Forced renewals asked for so far; the renewal task serves them.
    forced: AtomicU64,
    /// Wakes the renewal task after a report or a forced renewal.
    wake: Notify,
    /// The renewal task, once started (pool members start on first use).
    task: OnceLock<AbortHandle>,
    /// Sessions created, by reason (for the admin API).
    renewals: [AtomicU64; 4],
    /// The tokens of every identity, for `client_token = "keep"`.
    held: HeldTokens,
}

impl Identity {
    pub fn new(
        info: Info,
        source: Box<dyn Source>,
        policy: Policy,
        metrics: &Metrics,
        held: &HeldTokens,
    ) -> Self {
        let metrics = metrics.identity(&info.name, info.pool.as_deref());
        Identity {
            shared: Arc::new(Shared {
                info,
                source: ArcSwap::from_pointee(source),
                policy: ArcSwap::from_pointee(policy),
                metrics,
                epoch: Instant::now(),
                state: ArcSwap::from_pointee(State::default()),
                changes: watch::channel(0).0,
                refused: AtomicU64::new(0),
                forced: AtomicU64::new(0),
                wake: Notify::new(),
                task: OnceLock::new(),
                renewals: Default::default(),
                held: held.clone(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.info.name
    }

    pub fn info(&self) -> &Info {
        &self.shared.info
    }

    /// True if `other` is a handle on this same identity.
    pub fn same(&self, other: &Identity) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// This identity's metric series.
    pub fn metrics(&self) -> &IdentityMetrics {
        &self.shared.metrics
    }

    /// Starts the renewal task, which creates the first session at once.
    /// Idempotent: pool members call it on every use.
    pub fn start(&self) {
        self.shared
            .task
            .get_or_init(|| tokio::spawn(renewal_loop(self.shared.clone())).abort_handle());
    }

    /// Replaces how sessions are created (config reload): the current
    /// session stays; the next creation uses the new source.
    pub fn set_source(&self, source: Box<dyn Source>) {
        self.shared.source.store(Arc::new(source));
    }

    /// Replaces the renewal policy (config reload): retries and the
    /// proactive renewal are rescheduled with it at once.
    pub fn set_policy(&self, policy: Policy) {
        self.shared.policy.store(Arc::new(policy));
        // The renewal task recomputes when it is due.
        self.shared.wake.notify_one();
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        **self.shared.policy.load()
    }

    /// Whether the renewal task has been started.
    pub fn started(&self) -> bool {
        self.shared.task.get().is_some()
    }

    /// Stops the renewal task (at shutdown, or when a reload removes the
    /// identity). Its token counts as recently held from now on.
    pub fn stop(&self) {
        if let Some(task) = self.shared.task.get() {
            task.abort();
        }
        if let Some(s) = self.current() {
            self.shared.held.release(s.token.as_bytes());
        }
    }

    /// True while the identity's credentials stand refused and nothing is
    /// retried until a forced renewal.
    pub fn set_aside(&self) -> bool {
        self.shared.state.load().set_aside
    }

    /// True while the identity holds no session and its last creation
    /// failed (a retry may be scheduled): a pool prefers its other members.
    pub fn failing(&self) -> bool {
        let state = self.shared.state.load();
        state.session.is_none() && state.failure.is_some()
    }

    /// Renews now, whatever the state, and waits (until `deadline`) for the
    /// outcome of that attempt (not of one that happened to finish
    /// meanwhile): the operator's "did the new password take?". A failure
    /// leaves a working session in place.
    pub async fn force_renewal(&self, deadline: Instant) -> Result<Arc<Session>, Unavailable> {
        let ticket = self.shared.forced.fetch_add(1, Ordering::AcqRel) + 1;
        if self.started() {
            self.shared.wake.notify_one();
        } else {
            // The first creation is the renewal asked for.
            self.start();
        }
        self.wait_for(deadline, |state| {
            let forced = state.forced.as_ref().filter(|f| f.upto >= ticket)?;
            Some(forced.outcome.clone().map_err(Unavailable::Failed))
        })
        .await
    }

    /// A snapshot for the admin API. Shows a token prefix only.
    pub fn status(&self) -> Status {
        let state = self.shared.state.load();
        let now = Instant::now();
        let wall = SystemTime::now();
        let session = state.session.as_ref().map(|s| SessionStatus {
            user_id: s.user_id,
            token: s.token_prefix(),
            generation: s.generation,
            created_at: s.created_at,
            expires_at: wall + self.expires_at(s).saturating_duration_since(now),
        });
        let state_name = match (&state.session, &state.failure, state.set_aside) {
            _ if !self.started() => "idle",
            (_, _, true) => "set_aside",
            (Some(_), None, _) => "ready",
            (Some(_), Some(_), _) => "ready_renewal_failing",
            (None, Some(_), _) => "failing",
            (None, None, _) => "creating",
        };
        Status {
            name: self.shared.info.name.clone(),
            pool: self.shared.info.pool.clone(),
            kind: self.shared.info.kind,
            state: state_name,
            session,
            renewals: std::array::from_fn(|i| self.shared.renewals[i].load(Ordering::Relaxed)),
            last_error: state.failure.as_ref().map(|e| e.to_string()),
        }
    }

    /// The current session, if one is held, whether or not QuickBlox has
    /// refused it since. Lock-free; never waits.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.shared.state.load().session.clone()
    }

    /// The current session unless a request saw QuickBlox refuse it: the
    /// one to hand out. Lock-free; never waits.
    pub fn usable(&self) -> Option<Arc<Session>> {
        self.shared
            .state
            .load()
            .session
            .as_ref()
            .filter(|s| self.not_refused(s))
            .cloned()
    }

    /// False once a request reported `session`'s generation refused.
    fn not_refused(&self, session: &Session) -> bool {
        self.shared.refused.load(Ordering::Acquire) < session.generation
    }

    /// The current session, waiting (until `deadline`) while one is being
    /// created, and through failures a retry may mend (see
    /// [`Identity::gives_up`]).
    pub async fn session(&self, deadline: Instant) -> Result<Arc<Session>, Unavailable> {
        self.session_within(deadline, true).await
    }

    /// Like [`Identity::session`], but answers the first failure at once
    /// rather than wait through it: for a pool member, when another member
    /// may serve the request instead.
    pub async fn session_or_first_failure(
        &self,
        deadline: Instant,
    ) -> Result<Arc<Session>, Unavailable> {
        self.session_within(deadline, false).await
    }

    /// The current session, or one once created; through failures only if
    /// `patient`.
    async fn session_within(
        &self,
        deadline: Instant,
        patient: bool,
    ) -> Result<Arc<Session>, Unavailable> {
        if let Some(s) = self.usable() {
            return Ok(s);
        }
        // No session, or a refused one: its replacement is on its way.
        let patience = patient.then(|| self.patience(deadline));
        self.wait_for(deadline, |state| {
            match state.session.as_ref().filter(|s| self.not_refused(s)) {
                Some(s) => Some(Ok(s.clone())),
                None => state
                    .failure
                    .as_ref()
                    .and_then(|e| self.gives_up(state, e, patience)),
            }
        })
        .await
    }

    /// Until when a request that starts waiting now waits through failures.
    fn patience(&self, deadline: Instant) -> Instant {
        deadline.min(Instant::now() + self.policy().retry_wait)
    }

    /// Whether a waiting request gives up on `failure`: unless it is
    /// transient and its retry is due within the request's patience (none:
    /// it gives up at once). So a blip (a few failed attempts) costs the
    /// client only time, while refused credentials, or an outage whose
    /// retries have backed off past `retry_wait`, are answered at once.
    fn gives_up<T>(
        &self,
        state: &State,
        failure: &Arc<SessionError>,
        patience: Option<Instant>,
    ) -> Option<Result<T, Unavailable>> {
        match (state.retry_at, patience) {
            (Some(at), Some(patience)) if failure.transient() && at <= patience => None,
            _ => Some(Err(Unavailable::Failed(failure.clone()))),
        }
    }

    /// A session to replace `refused`, which the upstream answered with
    /// "Required session does not exist". Reports the refusal (renewing only
    /// if `refused` is still current) and waits, until `deadline`, for the
    /// single renewal that follows.
    pub async fn replacement(
        &self,
        refused: &Session,
        deadline: Instant,
    ) -> Result<Arc<Session>, Unavailable> {
        let patience = Some(self.patience(deadline));
        self.wait_for(deadline, |state| match &state.session {
            Some(s) if s.generation > refused.generation && self.not_refused(s) => {
                Some(Ok(s.clone()))
            }
            Some(_) => {
                self.report_refused(refused);
                None
            }
            None => state
                .failure
                .as_ref()
                .and_then(|e| self.gives_up(state, e, patience)),
        })
        .await
    }

    /// Tells the renewal task that `refused` is dead, without waiting. A
    /// report about a generation that is no longer current changes nothing.
    pub fn report_refused(&self, refused: &Session) {
        let before = self
            .shared
            .refused
            .fetch_max(refused.generation, Ordering::AcqRel);
        if before < refused.generation {
            self.shared.wake.notify_one();
        }
    }

    /// Records that the upstream answered a request made with `session`,
    /// pushing its expiry forward: to `QB-Token-ExpirationDate` (measured
    /// against the upstream's `Date`) when the answer carries one, else to
    /// two hours from now if the answer was a success. An error without the
    /// header (say, a 502 from a load balancer) proves no use.
    pub fn record_use(&self, session: &Session, status: StatusCode, headers: &HeaderMap) {
        let now = self.now_ms();
        let touched = session.touched_ms.load(Ordering::Relaxed);
        if now < touched.saturating_add(1000) {
            return;
        }
        let left = qb::remaining_lifetime(
            headers
                .get(qb::QB_TOKEN_EXPIRATION)
                .map(HeaderValue::as_bytes),
            headers.get(http::header::DATE).map(HeaderValue::as_bytes),
            SystemTime::now(),
        );
        let left = match left {
            Some(left) => left,
            None if status.is_success() => qb::SESSION_LIFETIME,
            None => return,
        };
        session.touched_ms.store(now, Ordering::Relaxed);
        session
            .expires_at_ms
            .fetch_max(now.saturating_add(millis(left)), Ordering::AcqRel);
    }

    /// Resolves once a session is held (for tests, the demo and readiness).
    pub async fn ready(&self) {
        let mut rx = self.shared.changes.subscribe();
        while self.current().is_none() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The instant at which `session` lapses if not used again.
    pub fn expires_at(&self, session: &Session) -> Instant {
        self.shared.epoch + Duration::from_millis(session.expires_at_ms.load(Ordering::Acquire))
    }

    /// The last creation failure, if the latest attempt failed.
    pub fn last_failure(&self) -> Option<Arc<SessionError>> {
        self.shared.state.load().failure.clone()
    }

    fn now_ms(&self) -> u64 {
        millis(self.shared.epoch.elapsed())
    }

    /// Waits for a state that `check` accepts, until `deadline`. The
    /// subscription comes before the first check, so no change is missed.
    async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&State) -> Option<Result<T, Unavailable>>,
    ) -> Result<T, Unavailable> {
        let mut rx = self.shared.changes.subscribe();
        loop {
            if let Some(done) = check(&self.shared.state.load()) {
                return done;
            }
            match timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                // The sender lives as long as `self`; a closed channel cannot
                // happen while we hold it, but a timeout is the honest answer.
                Ok(Err(_)) | Err(_) => return Err(Unavailable::TimedOut),
            }
        }
    }
}

/// What the admin API shows of an identity.
#[derive(Debug, Clone)]
pub struct Status {
    pub name: String,
    pub pool: Option<String>,
    pub kind: &'static str,
    /// idle (a pool member not used yet), creating, ready,
    /// ready_renewal_failing, failing, set_aside.
    pub state: &'static str,
    pub session: Option<SessionStatus>,
    /// Sessions created, by reason: startup, expired, proactive, forced.
    pub renewals: [u64; 4],
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SessionStatus {
    pub user_id: u64,
    /// A prefix only.
    pub token: String,
    pub generation: u64,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// The renewal task: the only writer of `Shared::state`.

async fn renewal_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::default();
    let mut generation = 0;
    // Forced renewals asked for before the first attempt are answered by it.
    let mut served = shared.forced.load(Ordering::Acquire);
    let mut forced = (served > 0).then_some(served);
    // A failed attempt leaves a retry pending: when, and for which reason.
    let mut retry = attempt(
        &shared,
        Reason::Startup,
        &mut generation,
        &mut backoff,
        forced,
    )
    .await;
    loop {
        let current = shared.state.load().session.clone();
        let due = match (&retry, &current) {
            (Some((at, _)), _) => *at,
            (None, Some(s)) => renew_at(&shared, s),
            // Set aside: nothing until a forced renewal.
            (None, None) => Instant::now() + Duration::from_secs(365 * 24 * 3600),
        };
        forced = None;
        let reason = tokio::select! {
            () = shared.wake.notified() => {
                let asked = shared.forced.load(Ordering::Acquire);
                match &current {
                    _ if asked > served => {
                        served = asked;
                        forced = Some(asked);
                        Reason::Forced
                    }
                    Some(s) if shared.refused.load(Ordering::Acquire) >= s.generation => Reason::Expired,
                    _ => continue,
                }
            },
            () = sleep_until(due) => match (retry.take(), &current) {
                (Some((_, reason)), None) => reason,
                (Some(_), Some(_)) => Reason::Proactive,
                (None, Some(s)) if renew_at(&shared, s) <= Instant::now() => Reason::Proactive,
                // Used since we went to sleep: the expiry moved forward.
                _ => continue,
            },
        };
        retry = attempt(&shared, reason, &mut generation, &mut backoff, forced).await;
    }
}

/// When a session should be renewed: `renew_before` ahead of its expiry,
/// but never sooner than [`MIN_RENEW_INTERVAL`] after it was created, so an
/// upstream that hands out short-lived sessions is not hammered.
fn renew_at(shared: &Shared, s: &Session) -> Instant {
    let expires = shared.epoch + Duration::from_millis(s.expires_at_ms.load(Ordering::Acquire));
    let floor = shared.epoch + Duration::from_millis(s.created_ms) + MIN_RENEW_INTERVAL;
    expires
        .checked_sub(shared.policy.load().renew_before)
        .unwrap_or(shared.epoch)
        .max(floor)
}

/// The least time between two proactive renewals of one identity.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(30);

/// One creation attempt; publishes its outcome (as the answer to forced
/// renewals up to `forced`, if it is one). Returns the retry to schedule
/// after a failure.
async fn attempt(
    shared: &Shared,
    reason: Reason,
    generation: &mut u64,
    backoff: &mut Backoff,
    forced: Option<u64>,
) -> Option<(Instant, Reason)> {
    let source = shared.source.load_full();
    let result = source.create().await;
    let old = shared.state.load_full();
    let name = shared.info.name.as_str();
    match result {
        Ok(new) => {
            *generation += 1;
            let now_ms = millis(shared.epoch.elapsed());
            let token = match HeaderValue::from_str(&new.token) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    v
                }
                Err(_) => {
                    let e =
                        SessionError::BadResponse("the token is not a valid header value".into());
                    return fail(shared, reason, e, &old, backoff, forced);
                }
            };
            let created_at = SystemTime::now();
            let public = public_body(&new, created_at);
            let session = Arc::new(Session {
                token,
                generation: *generation,
                user_id: new.user_id,
                public,
                created_at,
                created_ms: now_ms,
                expires_at_ms: AtomicU64::new(now_ms.saturating_add(millis(new.lifetime))),
                touched_ms: AtomicU64::new(now_ms),
            });
            tracing::info!(
                identity = name,
                reason = reason.as_str(),
                user_id = new.user_id,
                token = %session.token_prefix(),
                lifetime_s = new.lifetime.as_secs(),
                "session created"
            );
            shared.metrics.renewal(reason.as_str());
            shared.metrics.session_up(true);
            if old.set_aside {
                shared.metrics.set_aside(false);
            }
            shared.renewals[reason.index()].fetch_add(1, Ordering::Relaxed);
            publish(
                shared,
                State {
                    session: Some(session),
                    failure: None,
                    set_aside: false,
                    retry_at: None,
                    forced: None,
                },
                forced,
            );
            backoff.reset();
            None
        }
        Err(e) => fail(shared, reason, e, &old, backoff, forced),
    }
}

fn fail(
    shared: &Shared,
    reason: Reason,
    error: SessionError,
    old: &State,
    backoff: &mut Backoff,
    forced: Option<u64>,
) -> Option<(Instant, Reason)> {
    let name = shared.info.name.as_str();
    shared.metrics.session_failure();
    let policy = **shared.policy.load();
    // Whatever failed, a session that still works stays: only a refusal of
    // its own generation ends it.
    let keep = old
        .session
        .as_ref()
        .filter(|s| shared.refused.load(Ordering::Acquire) < s.generation);
    if keep.is_none() && policy.set_aside_refused && error.credentials_refused() {
        tracing::warn!(
            identity = name,
            pool = shared.info.pool.as_deref().unwrap_or(""),
            reason = reason.as_str(),
            error = %error,
            "credentials refused; identity set aside, no retries until a forced renewal"
        );
        shared.metrics.session_up(false);
        shared.metrics.set_aside(true);
        publish(
            shared,
            State {
                session: None,
                failure: Some(Arc::new(error)),
                set_aside: true,
                retry_at: None,
                forced: None,
            },
            forced,
        );
        return None;
    }
    let delay = backoff.next(&policy);
    tracing::warn!(
        identity = name,
        reason = reason.as_str(),
        error = %error,
        retry_in_ms = millis(delay),
        keeping_old_session = keep.is_some(),
        "session creation failed"
    );
    shared.metrics.session_up(keep.is_some());
    publish(
        shared,
        State {
            session: keep.cloned(),
            failure: Some(Arc::new(error)),
            set_aside: false,
            retry_at: Some(Instant::now() + delay),
            forced: None,
        },
        forced,
    );
    let reason = if keep.is_some() {
        Reason::Proactive
    } else {
        reason
    };
    Some((Instant::now() + delay, reason))
}

/// `{"session":{...}}` for a client: QuickBlox's public fields, or what
/// qbproxy knows when the source gave none.
fn public_body(new: &NewSession, created_at: SystemTime) -> Bytes {
    let mut fields = public_fields(&new.public);
    if fields.is_empty() {
        fields.insert("user_id".into(), new.user_id.into());
        let created = time::OffsetDateTime::from(created_at)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        fields.insert("created_at".into(), created.into());
    }
    Bytes::from(serde_json::json!({ "session": fields }).to_string())
}

/// Makes `state` what readers see. With `forced`, this attempt answers the
/// forced renewals asked for up to that count; otherwise the last forced
/// outcome is carried over.
fn publish(shared: &Shared, mut state: State, forced: Option<u64>) {
    let old = shared.state.load();
    state.forced = match forced {
        Some(upto) => Some(Forced {
            upto,
            outcome: match (&state.failure, &state.session) {
                (Some(e), _) => Err(e.clone()),
                (None, Some(s)) => Ok(s.clone()),
                (None, None) => Err(Arc::new(SessionError::BadResponse(
                    "no session and no error".into(),
                ))),
            },
        }),
        None => old.forced.clone(),
    };
    let (before, after) = (old.session.as_ref(), state.session.as_ref());
    if before.map(|s| s.generation) != after.map(|s| s.generation) {
        if let Some(s) = after {
            shared.held.hold(s.token.as_bytes());
        }
        if let Some(s) = before {
            shared.held.release(s.token.as_bytes());
        }
    }
    shared.state.store(Arc::new(state));
    shared.changes.send_modify(|n| *n += 1);
}

/// Capped exponential backoff with jitter: the n-th delay is drawn from
/// `[d/2, d]` where `d = min(retry_max, retry_initial * 2^n)`, with the
/// policy in force at the time.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next(&mut self, policy: &Policy) -> Duration {
        let exp = policy
            .retry_initial
            .saturating_mul(1u32 << self.failures.min(20));
        let cap = exp.min(policy.retry_max);
        self.failures = self.failures.saturating_add(1);
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// A scripted source: each call pops the next outcome (or succeeds), and
    /// optionally waits for a permit first, so a test can hold a creation.
    struct Script {
        calls: AtomicU64,
        outcomes: Mutex<VecDeque<Result<Duration, SessionError>>>,
        gate: Option<Arc<Semaphore>>,
        /// Counts calls that have started (before the gate).
        entered: watch::Sender<u64>,
    }

    impl Source for Arc<Script> {
        fn create(&self) -> BoxFuture<'_, Result<NewSession, SessionError>> {
            Box::pin(async move {
                self.entered.send_modify(|n| *n += 1);
                if let Some(gate) = &self.gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let outcome = self
                    .outcomes
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Ok(qb::SESSION_LIFETIME));
                outcome.map(|lifetime| NewSession {
                    token: format!("token-{n}"),
                    user_id: 7,
                    lifetime,
                    public: serde_json::Map::new(),
                })
            })
        }
    }

    const POLICY: Policy = Policy {
        renew_before: Duration::from_secs(600),
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(8),
        retry_wait: Duration::ZERO,
        set_aside_refused: false,
    };

    fn identity(
        outcomes: Vec<Result<Duration, SessionError>>,
        gate: Option<Arc<Semaphore>>,
    ) -> (Identity, Arc<Script>) {
        identity_with(POLICY, outcomes, gate)
    }

    fn identity_with(
        policy: Policy,
        outcomes: Vec<Result<Duration, SessionError>>,
        gate: Option<Arc<Semaphore>>,
    ) -> (Identity, Arc<Script>) {
        let script = Arc::new(Script {
            calls: AtomicU64::new(0),
            outcomes: Mutex::new(outcomes.into()),
            gate,
            entered: watch::channel(0).0,
        });
        let info = Info {
            name: "bot".into(),
            pool: None,
            kind: "login",
        };
        let id = Identity::new(
            info,
            Box::new(script.clone()),
            policy,
            &Metrics::new(),
            &HeldTokens::default(),
        );
        (id, script)
    }

    fn token(s: &Session) -> &str {
        s.token().to_str().unwrap()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600 * 24)
    }

    async fn next_change(id: &Identity) {
        id.shared.changes.subscribe().changed().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn proactive_renewal_fires_renew_before_expiry() {
        let (id, script) = identity(vec![], None);
        let start = Instant::now();
        id.start();
        id.ready().await;
        let first = id.current().unwrap();
        assert_eq!(token(&first), "token-1");

        // Paused time jumps straight to the renewal timer.
        next_change(&id).await;
        assert_eq!(start.elapsed(), qb::SESSION_LIFETIME - POLICY.renew_before);
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
        assert_eq!(token(&id.current().unwrap()), "token-2");
        // The holder of the old session still has its token.
        assert_eq!(token(&first), "token-1");
        // startup, expired, proactive, forced
        assert_eq!(id.status().renewals, [1, 0, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn use_slides_the_proactive_renewal() {
        let (id, script) = identity(vec![], None);
        let start = Instant::now();
        id.start();
        id.ready().await;
        let s = id.current().unwrap();

        // An hour in, a response without an expiration header: "2h from now".
        tokio::time::advance(Duration::from_secs(3600)).await;
        id.record_use(&s, StatusCode::OK, &HeaderMap::new());
        next_change(&id).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3600) + qb::SESSION_LIFETIME - POLICY.renew_before
        );
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_without_expiry_header_does_not_extend_the_session() {
        let (id, _script) = identity(vec![], None);
        let start = Instant::now();
        id.start();
        id.ready().await;
        let s = id.current().unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        id.record_use(&s, StatusCode::BAD_GATEWAY, &HeaderMap::new());
        assert_eq!(id.expires_at(&s), start + qb::SESSION_LIFETIME);
        // With the header, any status counts: QuickBlox saw the token.
        let mut h = HeaderMap::new();
        let in_90_min = SystemTime::now() + Duration::from_secs(5400);
        h.insert(
            qb::QB_TOKEN_EXPIRATION,
            qb::format_expiration(in_90_min).parse().unwrap(),
        );
        h.insert(
            http::header::DATE,
            httpdate::fmt_http_date(SystemTime::now()).parse().unwrap(),
        );
        id.record_use(&s, StatusCode::UNPROCESSABLE_ENTITY, &h);
        let expected = Instant::now() + Duration::from_secs(5400);
        let got = id.expires_at(&s);
        assert!(
            got + Duration::from_secs(1) >= expected && got <= expected + Duration::from_secs(1),
            "{got:?} vs {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_waits_for_a_proactive_renewal() {
        let gate = Arc::new(Semaphore::new(1));
        let (id, script) = identity(vec![], Some(gate.clone()));
        id.start();
        id.ready().await;
        // Paused time runs to the renewal timer; the creation blocks on the gate.
        let mut entered = script.entered.subscribe();
        entered.wait_for(|n| *n == 2).await.unwrap();
        // Requests during the renewal get the old token without waiting:
        // `session` with an already-passed deadline still succeeds.
        let s = id.session(Instant::now()).await.unwrap();
        assert_eq!(token(&s), "token-1");
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
        gate.add_permits(1);
        next_change(&id).await;
        assert_eq!(token(&id.current().unwrap()), "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_refusals_create_one_session() {
        let (id, script) = identity(vec![], None);
        id.start();
        id.ready().await;
        let refused = id.current().unwrap();
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                let id = id.clone();
                let refused = refused.clone();
                tokio::spawn(async move { id.replacement(&refused, far()).await })
            })
            .collect();
        for w in waiters {
            let s = w.await.unwrap().unwrap();
            assert_eq!(token(&s), "token-2");
        }
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
        // A late report about the old generation renews nothing.
        id.report_refused(&refused);
        let s = id.replacement(&refused, far()).await.unwrap();
        assert_eq!(token(&s), "token-2");
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_fail_fast_then_recover_with_backoff() {
        let refused = SessionError::Refused {
            status: 503,
            message: "down".into(),
        };
        let (id, script) = identity(vec![Err(refused.clone()), Err(refused.clone())], None);
        let start = Instant::now();
        id.start();
        // The first attempt fails: a waiting request gets the error.
        match id.session(far()).await {
            Err(Unavailable::Failed(e)) => assert_eq!(*e, refused),
            other => panic!("expected failure, got {other:?}"),
        }
        // Two retries later (backoff 0.5-1 s, then 1-2 s) it recovers.
        id.ready().await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(3),
            "{waited:?}"
        );
        assert_eq!(script.calls.load(Ordering::SeqCst), 3);
        assert_eq!(id.status().renewals, [1, 0, 0, 0]);
        assert_eq!(id.status().state, "ready");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_through_transient_failures_within_retry_wait() {
        let down = SessionError::Refused {
            status: 503,
            message: "down".into(),
        };
        let patient = Policy {
            retry_wait: Duration::from_secs(10),
            ..POLICY
        };
        // Three failures, then a session: retries after 0.5-1, 1-2, 2-4 s.
        let outcomes = vec![Err(down.clone()), Err(down.clone()), Err(down)];
        let (id, script) = identity_with(patient, outcomes, None);
        id.start();
        let s = id.session(far()).await.expect("rides through the failures");
        assert_eq!(token(&s), "token-4");
        assert_eq!(script.calls.load(Ordering::SeqCst), 4);

        // The same after an expiry: the replacement waits through them too.
        let timeout = SessionError::Timeout(Duration::from_secs(10));
        script
            .outcomes
            .lock()
            .unwrap()
            .extend([Err(timeout.clone()), Err(timeout)]);
        let fresh = id.replacement(&s, far()).await.expect("rides through");
        assert_eq!(token(&fresh), "token-7");
        assert_eq!(id.status().renewals, [1, 1, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_and_retries_past_retry_wait_are_answered_at_once() {
        // The first retry comes after at least 500 ms: past this patience.
        let hasty = Policy {
            retry_wait: Duration::from_millis(400),
            ..POLICY
        };
        let signature = SessionError::Refused {
            status: 422,
            message: "Unexpected signature".into(),
        };
        let down = SessionError::Unreachable("connection refused".into());
        for failure in [signature, down] {
            let (id, _) = identity_with(hasty, vec![Err(failure.clone())], None);
            id.start();
            let asked = Instant::now();
            match id.session(far()).await {
                Err(Unavailable::Failed(e)) => assert_eq!(*e, failure),
                other => panic!("expected {failure:?}, got {other:?}"),
            }
            assert_eq!(asked.elapsed(), Duration::ZERO, "no waiting: {failure:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_proactive_renewal_keeps_the_old_session() {
        let down = SessionError::Unreachable("connection refused".into());
        let (id, script) = identity(vec![Ok(qb::SESSION_LIFETIME), Err(down)], None);
        id.start();
        id.ready().await;
        next_change(&id).await; // the failed proactive attempt
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
        assert_eq!(token(&id.current().unwrap()), "token-1");
        assert!(id.last_failure().is_some());
        next_change(&id).await; // the retry succeeds
        assert_eq!(token(&id.current().unwrap()), "token-3");
        assert!(id.last_failure().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_first_session_times_out() {
        let gate = Arc::new(Semaphore::new(0));
        let (id, _script) = identity(vec![], Some(gate));
        id.start();
        let r = id.session(Instant::now() + Duration::from_secs(5)).await;
        assert!(matches!(r, Err(Unavailable::TimedOut)), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_credentials_set_a_pool_member_aside_until_forced() {
        let unauthorized = SessionError::Refused {
            status: 401,
            message: "Unauthorized".into(),
        };
        let script = Arc::new(Script {
            calls: AtomicU64::new(0),
            outcomes: Mutex::new(vec![Err(unauthorized)].into()),
            gate: None,
            entered: watch::channel(0).0,
        });
        let policy = Policy {
            set_aside_refused: true,
            ..POLICY
        };
        let info = Info {
            name: "load-1".into(),
            pool: Some("load".into()),
            kind: "login",
        };
        let id = Identity::new(
            info,
            Box::new(script.clone()),
            policy,
            &Metrics::new(),
            &HeldTokens::default(),
        );
        assert_eq!(id.status().state, "idle");
        id.start();
        next_change(&id).await;
        assert!(id.set_aside());
        assert_eq!(id.status().state, "set_aside");
        // No retry loop: a whole day of paused time brings no new attempt.
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
        // An operator forces a renewal (the password was fixed).
        let s = id.force_renewal(far()).await.unwrap();
        assert_eq!(token(&s), "token-2");
        assert!(!id.set_aside());
        assert_eq!(id.status().renewals, [0, 0, 0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_renewal_replaces_a_healthy_session_and_reports_failure() {
        let down = SessionError::Unreachable("refused".into());
        let (id, _script) = identity(
            vec![
                Ok(qb::SESSION_LIFETIME),
                Ok(qb::SESSION_LIFETIME),
                Err(down.clone()),
            ],
            None,
        );
        id.start();
        id.ready().await;
        let s = id.force_renewal(far()).await.unwrap();
        assert_eq!(token(&s), "token-2");
        match id.force_renewal(far()).await {
            Err(Unavailable::Failed(e)) => assert_eq!(*e, down),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next(&POLICY)).collect();
        for (n, d) in delays.iter().enumerate() {
            let full = (POLICY.retry_initial * (1 << n)).min(POLICY.retry_max);
            assert!(*d >= full / 2 && *d <= full, "attempt {n}: {d:?}");
        }
        b.reset();
        assert!(b.next(&POLICY) <= POLICY.retry_initial);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_policy_reschedules_the_proactive_renewal_at_once() {
        let (id, script) = identity(vec![], None);
        let start = Instant::now();
        id.start();
        id.ready().await;
        // Renew an hour ahead instead of ten minutes (a reload).
        let hour = Duration::from_secs(3600);
        id.set_policy(Policy {
            renew_before: hour,
            ..POLICY
        });
        next_change(&id).await;
        assert_eq!(start.elapsed(), qb::SESSION_LIFETIME - hour);
        assert_eq!(script.calls.load(Ordering::SeqCst), 2);
        assert_eq!(id.status().renewals, [1, 0, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_policy_changes_how_long_requests_wait_through_failures() {
        let down = SessionError::Unreachable("connection refused".into());
        let (id, _script) = identity(vec![Err(down.clone()), Err(down.clone())], None);
        id.start();
        // retry_wait 0: the first failure is answered at once.
        assert!(matches!(
            id.session(far()).await,
            Err(Unavailable::Failed(_))
        ));
        // With a minute of patience the same request rides out the retries.
        id.set_policy(Policy {
            retry_wait: Duration::from_secs(60),
            ..POLICY
        });
        let s = id.session(far()).await.unwrap();
        assert_eq!(token(&s), "token-3");
    }

    /// Issue 11, defect 1: a forced renewal that fails while QuickBlox is
    /// unreachable leaves the working session in place.
    #[tokio::test(start_paused = true)]
    async fn a_failed_forced_renewal_keeps_a_working_session() {
        let down = SessionError::Unreachable("connection refused".into());
        let (id, _script) = identity(vec![Ok(qb::SESSION_LIFETIME), Err(down.clone())], None);
        id.start();
        id.ready().await;
        match id.force_renewal(far()).await {
            Err(Unavailable::Failed(e)) => assert_eq!(*e, down),
            other => panic!("{other:?}"),
        }
        assert_eq!(token(&id.current().expect("still held")), "token-1");
        assert_eq!(id.status().state, "ready_renewal_failing");
        // Requests go on with it, without waiting.
        let s = id.session(Instant::now()).await.unwrap();
        assert_eq!(token(&s), "token-1");
    }

    /// Issue 11, defect 1: the forced call hears its own attempt's outcome,
    /// not that of a proactive attempt that finished meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_forced_renewal_reports_its_own_attempt() {
        let down = SessionError::Unreachable("connection refused".into());
        let gate = Arc::new(Semaphore::new(1));
        let (id, script) = identity(
            vec![
                Ok(qb::SESSION_LIFETIME),
                Err(down),
                Ok(qb::SESSION_LIFETIME),
            ],
            Some(gate.clone()),
        );
        id.start();
        id.ready().await;
        // The proactive renewal starts and is held at the gate.
        let mut entered = script.entered.subscribe();
        entered.wait_for(|n| *n == 2).await.unwrap();
        // The forced renewal is asked for (join! polls it first); the
        // proactive attempt fails and publishes; then the forced attempt
        // starts, and succeeds.
        let (forced, ()) = tokio::join!(id.force_renewal(far()), async {
            gate.add_permits(1);
            entered.wait_for(|n| *n == 3).await.unwrap();
            gate.add_permits(1);
        });
        let s = forced.expect("the forced attempt's own outcome");
        assert_eq!(token(&s), "token-3");
        assert_eq!(id.status().renewals, [1, 0, 0, 1]);
    }

    /// Issue 11, defect 5: once a request reported a generation refused, it
    /// is not handed out again; requests wait for its replacement.
    #[tokio::test(start_paused = true)]
    async fn a_refused_session_is_never_handed_out_again() {
        let gate = Arc::new(Semaphore::new(1));
        let (id, _script) = identity(vec![], Some(gate.clone()));
        id.start();
        id.ready().await;
        let first = id.current().unwrap();
        id.report_refused(&first);
        // The replacement is held at the gate: a request waits for it
        // rather than take the dead token.
        let r = id.session(Instant::now() + Duration::from_secs(1)).await;
        assert!(matches!(r, Err(Unavailable::TimedOut)), "{r:?}");
        assert!(id.usable().is_none());
        let waiting = tokio::spawn({
            let id = id.clone();
            async move { id.session(far()).await }
        });
        gate.add_permits(1);
        let s = waiting.await.unwrap().unwrap();
        assert_eq!(token(&s), "token-2");
    }
}
