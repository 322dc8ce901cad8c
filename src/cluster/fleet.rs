//! The renewal protocol: one session per identity across the fleet.
//!
//! [`FleetSource`] wraps an identity's own source (which signs and posts to
//! QuickBlox). When the renewal task asks it for a session:
//!
//! 1. A session stored by another replica, other than the one held (or
//!    found dead) and not lapsed, is adopted: no creation. (Generations only
//!    grow while Redis keeps its data; comparing tokens also converges a
//!    fleet after Redis restarted empty.)
//! 2. For a proactive renewal of the session the fleet still holds, the
//!    replica's own expiry is written to the fleet (the latest wins), and
//!    if the fleet's expiry is not due yet the session simply lives on: an
//!    idle replica does not renew what busy ones keep alive.
//! 3. A pool member the fleet set aside is not tried (unless forced, which
//!    clears the mark).
//! 4. Otherwise the replica takes the lock (`SET NX PX`, a unique owner, a
//!    short lease: `lock_ttl`, 3 s), renewed every third of it while the
//!    creation runs (a watchdog task: a slow creation never loses its lock,
//!    and a holder that dies releases the fleet within one lease); under
//!    it, looks again (step 1), creates, stores the next generation only
//!    while it still holds the lock, and releases it by compare-and-delete.
//!    A creation refused for its credentials sets a pool member aside for
//!    the fleet.
//! 5. A replica that finds the lock held waits for the new session, woken
//!    by the message the storing script publishes (`P:n:{F}`) or, should that
//!    be lost, by a poll (every 500 ms while subscribed, every 50 ms while
//!    not), and adopts it; if the lock disappears without one (its holder
//!    died and its lease ran out) it takes the lock itself. It waits no
//!    longer than `quickblox.retry_wait` nor `session_timeout`: then it
//!    creates a session alone, as with Redis away.
//!
//! Whenever Redis does not answer in time, the replica creates its session
//! alone, as without `[cluster]`: at most one creation per replica per
//! expiry. In the background (`sync`, every ~30 s or a quarter of
//! `renew_before` if that is less, and within 2 s of Redis
//! answering again after it was down) each running identity writes its
//! expiry to the fleet, adopts a newer session, and publishes its own when
//! the fleet holds none, so the fleet converges after Redis comes back.

use std::num::NonZeroU64;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Cluster, Down, Stored};
use crate::session::{
    Attempt, BoxFuture, Held, NewSession, Origin, Reason, Scheme, SessionError, Source,
};

/// How often a running identity syncs with the fleet.
const SYNC_EVERY: Duration = Duration::from_secs(30);
/// How often a replica waiting for another's renewal looks for it, when
/// no message will say it is stored (the pub/sub connection is down) ...
const POLL: Duration = Duration::from_millis(50);
/// ... and when one will: the poll only covers a lost message (or a lock
/// whose holder died).
const POLL_SUBSCRIBED: Duration = Duration::from_millis(500);

pub struct FleetSource {
    inner: Box<dyn Source>,
    cluster: Cluster,
    fingerprint: String,
    /// A pool member: a refusal of its credentials sets it aside fleet-wide.
    pool_member: bool,
    /// How long to wait for another replica's renewal: the least of
    /// `quickblox.session_timeout` and `retry_wait`.
    session_timeout: Duration,
}

impl FleetSource {
    pub fn new(
        inner: Box<dyn Source>,
        cluster: Cluster,
        fingerprint: String,
        pool_member: bool,
        session_timeout: Duration,
    ) -> FleetSource {
        FleetSource {
            inner,
            cluster,
            fingerprint,
            pool_member,
            session_timeout,
        }
    }

    async fn obtain(&self, attempt: Attempt) -> Result<NewSession, SessionError> {
        match self.with_fleet(&attempt).await {
            Ok(outcome) => outcome,
            // Redis is away: this replica does it alone.
            Err(Down) => self.inner.create(attempt).await,
        }
    }

    async fn with_fleet(
        &self,
        attempt: &Attempt,
    ) -> Result<Result<NewSession, SessionError>, Down> {
        let fp = &self.fingerprint;
        let cluster = &self.cluster;
        let dead_token = attempt.refused.as_ref().map(|h| h.token.expose());
        let forced = attempt.reason == Reason::Forced;
        if forced {
            cluster.clear_aside(fp).await?;
        } else {
            if let Some(stored) = cluster.session(fp).await? {
                if let Some(adopted) = self.newer(attempt, &stored, dead_token) {
                    return Ok(Ok(adopted));
                }
                if let Some(lives_on) = self.not_due(attempt, &stored).await? {
                    return Ok(Ok(lives_on));
                }
            }
            if self.pool_member && cluster.is_aside(fp).await? {
                return Ok(Err(SessionError::Refused {
                    status: 401,
                    message:
                        "Unauthorized (set aside by another replica; force a renewal to retry)"
                            .into(),
                    hint: None,
                }));
            }
        }
        let deadline = Instant::now() + self.session_timeout;
        loop {
            let owner = cluster.new_owner();
            if cluster.try_lock(fp, &owner).await? {
                let watchdog = self.keep_lock(&owner);
                let outcome = self
                    .create_locked(attempt, &owner, forced, dead_token)
                    .await;
                watchdog.abort();
                let _ = cluster.unlock(fp, &owner).await;
                return outcome;
            }
            // Another replica is renewing: wait for its session (its
            // message, or the next poll), or for its lease to run out.
            let waiter = cluster.waiter(fp);
            loop {
                let stored = waiter.signal.notified();
                tokio::pin!(stored);
                stored.as_mut().enable();
                if let Some(session) = cluster.session(fp).await? {
                    if let Some(adopted) = self.newer(attempt, &session, dead_token) {
                        return Ok(Ok(adopted));
                    }
                }
                if !cluster.locked(fp).await? {
                    break;
                }
                if Instant::now() >= deadline {
                    // The holder is alive but slow, or the fleet's state
                    // is stuck: this replica does not keep its requests
                    // waiting longer, and creates its own.
                    tracing::warn!(
                        waited = ?self.session_timeout,
                        "another replica's session creation did not finish in time; creating one here"
                    );
                    return Ok(self.inner.create(attempt.clone()).await);
                }
                let poll = if cluster.subscribed() {
                    POLL_SUBSCRIBED
                } else {
                    POLL
                };
                tokio::select! {
                    () = stored => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
        }
    }

    /// Renews the lock's lease every third of it until aborted (the
    /// creation ended): a creation slower than the lease keeps its lock,
    /// and if this replica dies, the lease runs out within `lock_ttl`.
    fn keep_lock(&self, owner: &str) -> tokio::task::JoinHandle<()> {
        let (cluster, fp, owner) = (
            self.cluster.clone(),
            self.fingerprint.clone(),
            owner.to_owned(),
        );
        let every = cluster.lock_ttl() / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match cluster.prolong(&fp, &owner).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "the renewal lock's lease ran out during a session creation; \
                             the creation goes on and its session is kept here"
                        );
                        return;
                    }
                    // Redis away: nothing to renew; the store will say.
                    Err(Down) => {}
                }
            }
        })
    }

    /// Under the lock: adopt what appeared meanwhile, else create and store.
    async fn create_locked(
        &self,
        attempt: &Attempt,
        owner: &str,
        forced: bool,
        dead_token: Option<&str>,
    ) -> Result<Result<NewSession, SessionError>, Down> {
        let fp = &self.fingerprint;
        if !forced {
            if let Some(stored) = self.cluster.session(fp).await? {
                if let Some(adopted) = self.newer(attempt, &stored, dead_token) {
                    return Ok(Ok(adopted));
                }
            }
        }
        let created = self.inner.create(attempt.clone()).await;
        let mut new = match created {
            Ok(new) => new,
            Err(e) => {
                if self.pool_member && e.credentials_refused() {
                    self.cluster.set_aside(fp).await?;
                }
                return Ok(Err(e));
            }
        };
        let stored = Stored {
            generation: 0,
            expires: SystemTime::now() + new.lifetime,
            token: new.token.clone(),
            user_id: new.user_id,
            public: new.public.clone(),
        };
        // If Redis fails here the session is still good: this replica keeps
        // it as its own.
        if let Ok(Some(generation)) = self.cluster.store(fp, owner, &stored).await {
            new.fleet = NonZeroU64::new(generation);
        }
        Ok(Ok(new))
    }

    /// The stored session, to adopt, if it is not the one this replica
    /// holds nor the one it found dead.
    fn newer(
        &self,
        attempt: &Attempt,
        stored: &Stored,
        dead_token: Option<&str>,
    ) -> Option<NewSession> {
        let held = attempt.held.as_ref().map(|h| h.token.expose());
        let stored_token = stored.token.expose();
        let other = dead_token != Some(stored_token) && held != Some(stored_token);
        other.then(|| adopt(stored))
    }

    /// For a proactive renewal of the session the fleet holds: writes this
    /// replica's expiry to the fleet and, if the fleet's latest is not due
    /// yet, answers the same session with that expiry.
    async fn not_due(
        &self,
        attempt: &Attempt,
        stored: &Stored,
    ) -> Result<Option<NewSession>, Down> {
        if attempt.reason != Reason::Proactive {
            return Ok(None);
        }
        let Some(held) = attempt.held.as_ref().filter(|h| h.token == stored.token) else {
            return Ok(None);
        };
        let expires = self
            .cluster
            .extend(&self.fingerprint, stored.generation, held.expires_at)
            .await?
            .unwrap_or(stored.expires)
            .max(held.expires_at);
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if left <= attempt.renew_before {
            return Ok(None);
        }
        let mut same = adopt(stored);
        same.lifetime = left;
        Ok(Some(same))
    }

    async fn sync_now(&self, attempt: Attempt) -> Option<NewSession> {
        self.sync_with_fleet(&attempt).await.ok().flatten()
    }

    async fn sync_with_fleet(&self, attempt: &Attempt) -> Result<Option<NewSession>, Down> {
        let fp = &self.fingerprint;
        let held = attempt.held.as_ref();
        let stored = match self.cluster.session(fp).await? {
            Some(stored) => stored,
            None => {
                // The fleet holds nothing (Redis restarted empty, or this
                // replica ran alone): publish this replica's session.
                let Some(h) = held else { return Ok(None) };
                if let Some(g) = self.cluster.publish_if_absent(fp, &to_store(h)).await? {
                    return Ok(Some(joined(h, g)));
                }
                // Another replica published first, between the read and
                // the write (replicas rejoining together): take its
                // session as any stored one, now rather than at the next
                // sync.
                match self.cluster.session(fp).await? {
                    Some(stored) => stored,
                    None => return Ok(None),
                }
            }
        };
        let refused = attempt.refused.as_ref().map(|h| h.token.expose());
        match held {
            // The same session: the latest expiry any replica saw wins.
            Some(h) if h.token == stored.token => {
                let expires = self
                    .cluster
                    .extend(fp, stored.generation, h.expires_at)
                    .await?
                    .unwrap_or(stored.expires);
                let mut same = adopt(&stored);
                same.lifetime = expires
                    .max(h.expires_at)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                Ok(Some(same))
            }
            // QuickBlox refused the stored session here, and this replica
            // made its own meanwhile (Redis was away): its own replaces the
            // stored one, unless another replica's did first.
            Some(h) if refused == Some(stored.token.expose()) => {
                let generation = self
                    .cluster
                    .replace(fp, stored.generation, &to_store(h))
                    .await?;
                Ok(generation.map(|g| joined(h, g)))
            }
            _ => Ok(self.newer(attempt, &stored, refused)),
        }
    }
}

/// The held session, to store for the fleet.
fn to_store(h: &Held) -> Stored {
    Stored {
        generation: 0,
        expires: h.expires_at,
        token: h.token.clone(),
        user_id: h.user_id,
        public: h.public.clone(),
    }
}

/// The held session, now the fleet's generation `generation`.
fn joined(h: &Held, generation: u64) -> NewSession {
    NewSession {
        token: h.token.clone(),
        user_id: h.user_id,
        lifetime: h
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
        public: h.public.clone(),
        fleet: NonZeroU64::new(generation),
        origin: Origin::Created,
        // The fleet shares sessions only; API keys are never wrapped.
        scheme: Scheme::QbToken,
    }
}

/// A stored session as the renewal task takes it.
fn adopt(stored: &Stored) -> NewSession {
    NewSession {
        token: stored.token.clone(),
        user_id: stored.user_id,
        lifetime: stored
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
        public: stored.public.clone(),
        fleet: NonZeroU64::new(stored.generation),
        origin: Origin::Fleet,
        scheme: Scheme::QbToken,
    }
}

impl Source for FleetSource {
    fn create(&self, attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        Box::pin(self.obtain(attempt))
    }

    fn sync(&self, attempt: Attempt) -> BoxFuture<'_, Option<NewSession>> {
        Box::pin(self.sync_now(attempt))
    }

    fn sync_every(&self) -> Option<Duration> {
        Some(SYNC_EVERY)
    }

    fn rejoins(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.cluster.rejoins())
    }
}
