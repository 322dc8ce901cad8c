//! Session store and renewal for one identity.
//!
//! Readers (the proxy, once per request) load the current [`Session`] from
//! an `ArcSwap`: no lock, no waiting. One renewal task per identity is the
//! only writer. It creates the session at start, renews it ahead of expiry,
//! renews it when the proxy reports the token dead ("Required session does
//! not exist"), and retries failed creations with capped, jittered
//! exponential backoff.
//!
//! Single flight falls out of that shape: however many requests report the
//! same dead generation, the task sees one report, creates one session,
//! and everyone waiting on the change notification picks up the result.
//!
//! The task only ever talks to a [`Source`], so the scheduling here is
//! tested with paused time and an in-memory source.
//!
//! Files: this one is the [`Identity`] handle (what readers call);
//! `task.rs` the single-writer renewal task; `token.rs` the [`Session`];
//! `source.rs` the [`Source`] of sessions; `error.rs` why there is none;
//! `status.rs` what the admin API shows; `held.rs` the [`HeldTokens`].

pub(crate) mod pool;

mod error;
mod held;
mod source;
mod status;
mod task;
#[cfg(test)]
mod tests;
mod token;

pub use self::error::{SessionError, Unavailable};
pub use self::held::HeldTokens;
pub use self::source::{
    public_fields, ApiKeySource, Attempt, BoxFuture, Held, NewSession, Origin, Scheme, Source,
};
pub use self::status::{SessionState, SessionStatus, Status};
pub use self::token::{ApiKeyHeaders, Session};

use self::task::{renewal_loop, State};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};

use crate::quickblox;
use crate::quickblox::credentials::IdentityKind;
use crate::telemetry::metrics::{IdentityMetrics, Metrics};

/// Why a session was created; the `reason` label of
/// `qbproxy_session_renewals_total`, of the log line and of `/sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Startup,
    Expired,
    Proactive,
    /// An operator asked for it (`POST /sessions/{name}/renew`).
    Forced,
}

impl Reason {
    /// Every reason, in the order of per-reason counters.
    pub const ALL: [Reason; 4] = [
        Reason::Startup,
        Reason::Expired,
        Reason::Proactive,
        Reason::Forced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Expired => "expired",
            Reason::Proactive => "proactive",
            Reason::Forced => "forced",
        }
    }

    /// Index into per-reason counters, in the order of [`Reason::ALL`].
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
    pub set_aside_on_refused_credentials: bool,
}

/// What an identity is, for logs, metrics and the admin API.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub pool: Option<String>,
    /// `Credentials::kind`: application, login, email, facebook, firebase_phone.
    pub kind: IdentityKind,
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
    /// Highest generation a request reported dead: QuickBlox answered it
    /// "Required session does not exist". (Not to be confused with
    /// credentials QuickBlox refuses: `SessionError::credentials_refused`.)
    dead: AtomicU64,
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
                dead: AtomicU64::new(0),
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

    /// The session it holds, if one is usable (not reported dead), as the
    /// fleet and the state file keep it: its token, user, public fields and
    /// when it lapses unless used.
    pub fn held(&self) -> Option<Held> {
        let session = self.usable()?;
        (session.scheme() == Scheme::QbToken).then(|| task::held_of(&self.shared, &session))
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
        let ticket = self.renew_now();
        self.wait_for(deadline, |state| {
            let forced = state.forced.as_ref().filter(|f| f.upto >= ticket)?;
            Some(forced.outcome.clone().map_err(Unavailable::Failed))
        })
        .await
    }

    /// Asks for a renewal now, whatever the state, without waiting for it;
    /// counted as forced. Returns its ticket.
    fn renew_now(&self) -> u64 {
        let ticket = self.shared.forced.fetch_add(1, Ordering::AcqRel) + 1;
        if self.started() {
            self.shared.wake.notify_one();
        } else {
            // The first creation is the renewal asked for.
            self.start();
        }
        ticket
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
            fleet: s.fleet(),
            created_at: s.created_at,
            expires_at: (s.scheme() == Scheme::QbToken)
                .then(|| wall + self.expires_at(s).saturating_duration_since(now)),
        });
        let state_name = match (&state.session, &state.failure, state.set_aside) {
            _ if !self.started() => SessionState::Idle,
            (_, _, true) => SessionState::SetAside,
            (Some(_), None, _) => SessionState::Ready,
            (Some(_), Some(_), _) => SessionState::ReadyRenewalFailing,
            (None, Some(_), _) => SessionState::Failing,
            (None, None, _) => SessionState::Creating,
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
    /// reported it dead since. Lock-free; never waits.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.shared.state.load().session.clone()
    }

    /// The current session unless a request reported it dead: the one to
    /// hand out. Lock-free; never waits.
    pub fn usable(&self) -> Option<Arc<Session>> {
        self.shared
            .state
            .load()
            .session
            .as_ref()
            .filter(|s| self.alive(s))
            .cloned()
    }

    /// False once a request reported `session`'s generation dead.
    fn alive(&self, session: &Session) -> bool {
        self.shared.dead.load(Ordering::Acquire) < session.generation
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
        // No session, or a dead one: its replacement is on its way.
        let patience = patient.then(|| self.patience(deadline));
        self.wait_for(deadline, |state| {
            match state.session.as_ref().filter(|s| self.alive(s)) {
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

    /// A session to replace `dead`, which the upstream answered with
    /// "Required session does not exist". Reports it (renewing only if
    /// `dead` is still current) and waits, until `deadline`, for the single
    /// renewal that follows.
    pub async fn replacement(
        &self,
        dead: &Session,
        deadline: Instant,
    ) -> Result<Arc<Session>, Unavailable> {
        self.replacement_within(dead, deadline, true).await
    }

    /// Like [`Identity::replacement`], but answers the first failure at
    /// once: for a pool member, when another member may serve the replay.
    pub async fn replacement_or_first_failure(
        &self,
        dead: &Session,
        deadline: Instant,
    ) -> Result<Arc<Session>, Unavailable> {
        self.replacement_within(dead, deadline, false).await
    }

    async fn replacement_within(
        &self,
        dead: &Session,
        deadline: Instant,
        patient: bool,
    ) -> Result<Arc<Session>, Unavailable> {
        let patience = patient.then(|| self.patience(deadline));
        self.wait_for(deadline, |state| match &state.session {
            Some(s) if s.generation > dead.generation && self.alive(s) => Some(Ok(s.clone())),
            Some(_) => {
                self.report_dead(dead);
                None
            }
            None => state
                .failure
                .as_ref()
                .and_then(|e| self.gives_up(state, e, patience)),
        })
        .await
    }

    /// Tells the renewal task that `dead` does not exist at QuickBlox any
    /// more, without waiting. A report about a generation that is no longer
    /// current changes nothing.
    pub fn report_dead(&self, dead: &Session) {
        let before = self
            .shared
            .dead
            .fetch_max(dead.generation, Ordering::AcqRel);
        if before < dead.generation {
            self.shared.wake.notify_one();
        }
    }

    /// Records that the upstream answered a request made with `session`,
    /// pushing its expiry forward: to `QB-Token-ExpirationDate` (measured
    /// against the upstream's `Date`) when the answer carries one, else to
    /// two hours from now if the answer was a success. An error without the
    /// header (say, a 502 from a load balancer) proves no use.
    pub fn record_use(&self, session: &Session, status: StatusCode, headers: &HeaderMap) {
        if session.api_key.is_some() {
            // An API key does not expire.
            return;
        }
        let now = self.now_ms();
        let touched = session.touched_ms.load(Ordering::Relaxed);
        if now < touched.saturating_add(1000) {
            return;
        }
        let left = quickblox::remaining_lifetime(
            headers
                .get(quickblox::QB_TOKEN_EXPIRATION)
                .map(HeaderValue::as_bytes),
            headers.get(http::header::DATE).map(HeaderValue::as_bytes),
            SystemTime::now(),
        );
        let left = match left {
            Some(left) => left,
            None if status.is_success() => quickblox::SESSION_LIFETIME,
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

    /// Waits, until `deadline`, for a held session that `check` accepts:
    /// for tools and tests that watch an identity change (a fleet
    /// converging on one token, say).
    pub async fn session_where(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&Session) -> bool,
    ) -> Result<Arc<Session>, Unavailable> {
        self.wait_for(deadline, |state| {
            state
                .session
                .as_ref()
                .filter(|s| check(s))
                .map(|s| Ok(s.clone()))
        })
        .await
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
