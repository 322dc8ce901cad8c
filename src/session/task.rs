//! The renewal task: the only writer of an identity's state. One per
//! identity; it creates the first session, renews ahead of expiry and on a
//! reported refusal, retries with backoff, and answers forced renewals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use rand::Rng;
use tokio::time::{sleep_until, Instant};

use crate::quickblox::credentials::Secret;

use super::*;

/// What readers see: a usable session, the last failure, or both (a
/// proactive renewal failed while the old session is still good).
#[derive(Default)]
pub(super) struct State {
    pub(super) session: Option<Arc<Session>>,
    pub(super) failure: Option<Arc<SessionError>>,
    /// No retry is scheduled: the credentials were refused.
    pub(super) set_aside: bool,
    /// When the retry after `failure` is due.
    pub(super) retry_at: Option<Instant>,
    /// The outcome of the latest forced renewal, carried from state to
    /// state until the next one, so a caller reads its own attempt's
    /// outcome, not whichever attempt published last.
    pub(super) forced: Option<Forced>,
}

#[derive(Clone)]
pub(super) struct Forced {
    /// Forced renewals asked for up to this count are answered by it.
    pub(super) upto: u64,
    pub(super) outcome: Result<Arc<Session>, Arc<SessionError>>,
}

// ---------------------------------------------------------------------------
// The renewal task: the only writer of `Shared::state`.

/// What the renewal task carries from one attempt to the next.
#[derive(Default)]
struct Memory {
    /// The generation of the last session published.
    generation: u64,
    backoff: Backoff,
    /// The latest session QuickBlox refused (see [`Attempt::refused`]).
    refused: Option<Held>,
}

pub(super) async fn renewal_loop(shared: Arc<Shared>) {
    let mut memory = Memory::default();
    // Forced renewals asked for before the first attempt are answered by it.
    let mut served = shared.forced.load(Ordering::Acquire);
    let mut forced = (served > 0).then_some(served);
    // The rejoins already synced for (see `Source::rejoins`).
    let mut rejoined = rejoins(&shared).map_or(0, |rx| *rx.borrow());
    // A failed attempt leaves a retry pending: when, and for which reason.
    let mut retry = attempt(&shared, Reason::Startup, &mut memory, forced).await;
    loop {
        let current = shared.state.load().session.clone();
        let due = match (&retry, &current) {
            (Some((at, _)), _) => *at,
            (None, Some(s)) => renew_at(&shared, s),
            // Set aside: nothing until a forced renewal.
            (None, None) => Instant::now() + Duration::from_secs(365 * 24 * 3600),
        };
        forced = None;
        let sync_at = shared
            .source
            .load()
            .sync_every()
            .map(|every| Instant::now() + jittered(sync_interval(every, &shared)));
        let mut rejoins = rejoins(&shared);
        let reason = tokio::select! {
            () = sleep_until(sync_at.unwrap_or(due)), if sync_at.is_some_and(|at| at < due) => {
                sync(&shared, &mut memory).await;
                continue;
            },
            now = rejoined_since(rejoins.as_mut(), rejoined) => {
                rejoined = now;
                // Spread the fleet's identities over a moment.
                let spread = rand::rng().random_range(Duration::ZERO..=REJOIN_SPREAD);
                tokio::time::sleep(spread).await;
                sync(&shared, &mut memory).await;
                continue;
            },
            () = shared.wake.notified() => {
                let asked = shared.forced.load(Ordering::Acquire);
                match &current {
                    _ if asked > served => {
                        served = asked;
                        forced = Some(asked);
                        Reason::Forced
                    }
                    Some(s) if shared.dead.load(Ordering::Acquire) >= s.generation => Reason::Expired,
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
        retry = attempt(&shared, reason, &mut memory, forced).await;
    }
}

/// A sync after a rejoin happens within this long, at random, so that a
/// fleet's identities do not all call Redis in the same instant.
const REJOIN_SPREAD: Duration = Duration::from_secs(2);

fn rejoins(shared: &Shared) -> Option<tokio::sync::watch::Receiver<u64>> {
    shared.source.load().rejoins()
}

/// Resolves with the rejoin count once it differs from `seen` (at once if
/// it already does: a rejoin during an attempt is not missed); never
/// without a source that rejoins.
async fn rejoined_since(rx: Option<&mut tokio::sync::watch::Receiver<u64>>, seen: u64) -> u64 {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        let now = *rx.borrow_and_update();
        if now != seen {
            return now;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// `every`, give or take a tenth, so replicas and identities spread out.
fn jittered(every: Duration) -> Duration {
    let tenth = every / 10;
    every - tenth + rand::rng().random_range(Duration::ZERO..=tenth * 2)
}

/// How often to sync with the fleet: the source's interval, but at least
/// four times within `renew_before`, so that when an idle replica's
/// proactive renewal comes due, the latest expiry a busy replica saw is
/// already in the fleet (and it does not renew a session kept alive).
fn sync_interval(every: Duration, shared: &Shared) -> Duration {
    every
        .min(shared.policy.load().renew_before / 4)
        .max(MIN_SYNC_INTERVAL)
}

const MIN_SYNC_INTERVAL: Duration = Duration::from_secs(1);

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
    memory: &mut Memory,
    forced: Option<u64>,
) -> Option<(Instant, Reason)> {
    let source = shared.source.load_full();
    let result = source
        .create(attempt_for(shared, reason, &mut memory.refused))
        .await;
    let old = shared.state.load_full();
    match result {
        Ok(new) => {
            let outcome = accept(shared, new, reason, &mut memory.generation, &old, forced);
            match outcome {
                Ok(()) => {
                    memory.backoff.reset();
                    None
                }
                Err(e) => fail(shared, reason, e, &old, &mut memory.backoff, forced),
            }
        }
        Err(e) => fail(shared, reason, e, &old, &mut memory.backoff, forced),
    }
}

/// What the source is told: why, the session held and the latest one
/// refused. `refused` is the renewal task's memory of it: the state lets a
/// refused session go after a failed renewal, the source must still know.
fn attempt_for(shared: &Shared, reason: Reason, refused: &mut Option<Held>) -> Attempt {
    let state = shared.state.load();
    let mut held = state.session.as_ref().map(|s| held_of(shared, s));
    let dead = state
        .session
        .as_ref()
        .is_some_and(|s| shared.dead.load(Ordering::Acquire) >= s.generation);
    if dead {
        *refused = held.take();
    }
    Attempt {
        reason,
        held,
        refused: refused.clone(),
        renew_before: shared.policy.load().renew_before,
    }
}

pub(super) fn held_of(shared: &Shared, s: &Session) -> Held {
    let now = Instant::now();
    Held {
        token: Secret::new(s.token.to_str().unwrap_or("")),
        fleet: s.fleet(),
        expires_at: SystemTime::now() + expires(shared, s).saturating_duration_since(now),
        user_id: s.user_id,
        public: serde_json::from_slice::<serde_json::Value>(&s.public)
            .ok()
            .and_then(|v| v.get("session").and_then(|m| m.as_object()).cloned())
            .unwrap_or_default(),
    }
}

fn expires(shared: &Shared, s: &Session) -> Instant {
    shared.epoch + Duration::from_millis(s.expires_at_ms.load(Ordering::Acquire))
}

/// Publishes what a source gave: the held session living longer (the same
/// token; it may have joined the fleet meanwhile), or a new one, created
/// here or adopted from another replica.
fn accept(
    shared: &Shared,
    new: NewSession,
    reason: Reason,
    generation: &mut u64,
    old: &State,
    forced: Option<u64>,
) -> Result<(), SessionError> {
    let name = shared.info.name.as_str();
    let now_ms = millis(shared.epoch.elapsed());
    if let Some(held) = old.session.as_ref().filter(|s| {
        s.token.as_bytes() == new.token.expose().as_bytes()
            && s.user_id == new.user_id
            && s.scheme() == new.scheme
            && shared.dead.load(Ordering::Acquire) < s.generation
    }) {
        held.expires_at_ms.fetch_max(
            now_ms.saturating_add(millis(new.lifetime)),
            Ordering::AcqRel,
        );
        if let Some(fleet) = new.fleet {
            held.fleet.store(fleet.get(), Ordering::Release);
        }
        tracing::debug!(
            identity = name,
            fleet = new.fleet,
            "the held session lives on"
        );
        publish(
            shared,
            State {
                session: Some(held.clone()),
                failure: None,
                set_aside: false,
                retry_at: None,
                forced: None,
            },
            forced,
        );
        return Ok(());
    }
    let mut token = HeaderValue::from_str(new.token.expose())
        .map_err(|_| SessionError::BadResponse("the token is not a valid header value".into()))?;
    token.set_sensitive(true);
    *generation += 1;
    let created_at = SystemTime::now();
    let public = public_body(&new, created_at);
    let api_key = match new.scheme {
        Scheme::QbToken => None,
        Scheme::ApiKey => Some(
            ApiKeyHeaders::new(token.as_bytes(), new.user_id).ok_or_else(|| {
                SessionError::Credentials("the API key is not a valid header value".into())
            })?,
        ),
    };
    let session = Arc::new(Session {
        api_key,
        token,
        generation: *generation,
        user_id: new.user_id,
        public,
        created_at,
        created_ms: now_ms,
        expires_at_ms: AtomicU64::new(now_ms.saturating_add(millis(new.lifetime))),
        touched_ms: AtomicU64::new(now_ms),
        fleet: AtomicU64::new(new.fleet.map_or(0, |g| g.get())),
    });
    if new.origin != Origin::Created {
        let from = match new.origin {
            Origin::StateFile => "session restored from the state file ([state] file)",
            _ => "session adopted from the fleet",
        };
        tracing::info!(
            identity = name,
            reason = reason.as_str(),
            user_id = new.user_id,
            token = %session.token_prefix(),
            fleet_generation = new.fleet,
            "{from}"
        );
        if new.origin == Origin::Fleet {
            shared.metrics.adoption();
        }
    } else if new.scheme == Scheme::ApiKey {
        tracing::info!(
            identity = name,
            reason = reason.as_str(),
            on_behalf_of = new.user_id,
            key = %session.token_prefix(),
            "API key in use (no session: nothing to create or renew)"
        );
    } else {
        tracing::info!(
            identity = name,
            reason = reason.as_str(),
            user_id = new.user_id,
            token = %session.token_prefix(),
            lifetime_s = new.lifetime.as_secs(),
            fleet_generation = new.fleet,
            "session created"
        );
    }
    if new.origin == Origin::Created {
        shared.metrics.renewal(reason);
        shared.renewals[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    shared.metrics.session_up(true);
    if old.set_aside {
        shared.metrics.set_aside(false);
    }
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
    Ok(())
}

/// A sync with the fleet: adopts what it says, changes nothing otherwise.
async fn sync(shared: &Shared, memory: &mut Memory) {
    let source = shared.source.load_full();
    let reason = Reason::Proactive;
    let attempt = attempt_for(shared, reason, &mut memory.refused);
    if let Some(new) = source.sync(attempt).await {
        let old = shared.state.load_full();
        if let Err(e) = accept(shared, new, reason, &mut memory.generation, &old, None) {
            tracing::warn!(identity = shared.info.name.as_str(), error = %e, "a session from the fleet could not be used");
        }
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
        .filter(|s| shared.dead.load(Ordering::Acquire) < s.generation);
    if keep.is_none() && policy.set_aside_on_refused_credentials && error.credentials_refused() {
        tracing::warn!(
            identity = name,
            pool = shared.info.pool.as_deref().unwrap_or(""),
            reason = reason.as_str(),
            error = %error,
            hint = error.hint(),
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
        hint = error.hint(),
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
pub(super) struct Backoff {
    failures: u32,
}

impl Backoff {
    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(super) fn next(&mut self, policy: &Policy) -> Duration {
        let exp = policy
            .retry_initial
            .saturating_mul(1u32 << self.failures.min(20));
        let cap = exp.min(policy.retry_max);
        self.failures = self.failures.saturating_add(1);
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}
