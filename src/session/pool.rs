//! Pools: many identities behind one name, for load tests and gateways.
//!
//! A request picks a member round-robin, or by its `QBProxy-Client` header
//! (sticky). Members start their session on first use; their creations share
//! a semaphore (`create_concurrency`, see `upstream::Throttled`). Members
//! whose credentials QuickBlox refused are set aside and skipped; members
//! whose last creation failed are passed over while another member may
//! serve. With `max_in_flight`, a request waits for a free member until its
//! deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::HeaderValue;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::config::Strategy;
use crate::session::{Identity, Session, Unavailable};
use crate::telemetry::metrics::IdentityMetrics;

pub struct Pool {
    name: String,
    members: Vec<Member>,
    strategy: Strategy,
    /// Round-robin cursor.
    next: AtomicUsize,
    max_in_flight: Option<usize>,
    /// Session creations in flight at once for the members.
    throttle: Throttle,
    /// Wakes one round-robin waiter when a member frees a slot (only with
    /// `max_in_flight`).
    released: Notify,
    /// `try_claim` calls, for the tests that count wake-ups.
    #[cfg(test)]
    claims: AtomicUsize,
    /// Requests answered before a member was chosen.
    metrics: IdentityMetrics,
}

struct Member {
    identity: Identity,
    /// Requests in flight; counted only with `max_in_flight`.
    in_flight: AtomicUsize,
    /// Wakes one sticky waiter for this member when it frees a slot.
    released: Notify,
}

/// Why a pool could not lend a member to a request; the proxy's edge
/// (`proxy::error`) turns it into a 503 and a `QBProxy-Error` code.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("all {size} members of pool {pool:?} are busy")]
    Busy { pool: String, size: usize },
    #[error(
        "every member of pool {pool:?} ({size}) is set aside: QuickBlox refused their credentials"
    )]
    Unavailable { pool: String, size: usize },
}

/// A pool's limit on session creations in flight at once
/// (`create_concurrency`): each member's source waits for one of these
/// permits (`upstream::Throttled`). Kept across a reload that keeps the
/// concurrency, so creations before and after it count together.
#[derive(Clone)]
pub struct Throttle {
    pub permits: Arc<Semaphore>,
    pub size: usize,
}

impl Throttle {
    pub fn new(size: usize) -> Throttle {
        Throttle {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// True if `other` is this same throttle.
    pub fn same(&self, other: &Throttle) -> bool {
        Arc::ptr_eq(&self.permits, &other.permits)
    }
}

/// A member held for one request; frees its slot when dropped.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    pub fn identity(&self) -> &Identity {
        &self.pool.members[self.index].identity
    }

    /// Its member as found in `pool` (the pool it was taken from): a
    /// borrow that may outlive the lease, for what is counted after it.
    pub fn member_of<'p>(&self, pool: &'p Pool) -> &'p Identity {
        debug_assert!(std::ptr::eq(pool, &*self.pool), "a lease of another pool");
        &pool.members[self.index].identity
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.pool.max_in_flight.is_some() {
            let member = &self.pool.members[self.index];
            member.in_flight.fetch_sub(1, Ordering::AcqRel);
            // One slot is free: one waiter for it, not every waiter. A
            // waiter woken but gone passes the wake-up on (tokio's Notify).
            member.released.notify_one();
            self.pool.released.notify_one();
        }
    }
}

enum Claim {
    Got(usize),
    /// Every member that may serve is busy; a sticky request names the one
    /// it waits for.
    Busy(Option<usize>),
    AllSetAside,
}

impl Pool {
    pub fn new(
        name: String,
        members: Vec<Identity>,
        strategy: Strategy,
        max_in_flight: Option<usize>,
        throttle: Throttle,
        metrics: IdentityMetrics,
    ) -> Pool {
        Pool {
            name,
            members: members
                .into_iter()
                .map(|identity| Member {
                    identity,
                    in_flight: AtomicUsize::new(0),
                    released: Notify::new(),
                })
                .collect(),
            strategy,
            next: AtomicUsize::new(0),
            max_in_flight,
            throttle,
            released: Notify::new(),
            #[cfg(test)]
            claims: AtomicUsize::new(0),
            metrics,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn metrics(&self) -> &IdentityMetrics {
        &self.metrics
    }

    pub fn members(&self) -> impl ExactSizeIterator<Item = &Identity> {
        self.members.iter().map(|m| &m.identity)
    }

    /// Its first member (a pool has at least one: validation).
    pub fn first_member(&self) -> &Identity {
        &self.members[0].identity
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn max_in_flight(&self) -> Option<usize> {
        self.max_in_flight
    }

    /// What its members' session creations share.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// True unless every member is set aside.
    pub fn serviceable(&self) -> bool {
        self.members.iter().any(|m| !m.identity.set_aside())
    }

    /// A member for one request, started if it was idle. Waits for a free
    /// member (with `max_in_flight`) until `deadline`. The common case is
    /// one claim of the next member: no registration, no scan.
    pub async fn acquire(
        self: &Arc<Self>,
        client: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<Lease, Refusal> {
        loop {
            let busy = match self.claimed(self.try_claim(client))? {
                Ok(lease) => return Ok(lease),
                Err(busy) => busy,
            };
            // Every member busy: register for a wake-up first, then look
            // again, so a release in between is not missed.
            let notify = match busy {
                Some(member) => &self.members[member].released,
                None => &self.released,
            };
            let released = notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Ok(lease) = self.claimed(self.try_claim(client))? {
                return Ok(lease);
            }
            if timeout_at(deadline, released).await.is_err() {
                return Err(Refusal::Busy {
                    pool: self.name.clone(),
                    size: self.members.len(),
                });
            }
        }
    }

    /// A lease for a claimed member (started if it was idle), the member a
    /// busy request waits for, or the pool's refusal.
    fn claimed(self: &Arc<Self>, claim: Claim) -> Result<Result<Lease, Option<usize>>, Refusal> {
        match claim {
            Claim::Got(index) => {
                self.members[index].identity.start();
                Ok(Ok(Lease {
                    pool: self.clone(),
                    index,
                }))
            }
            Claim::Busy(member) => Ok(Err(member)),
            Claim::AllSetAside => Err(Refusal::Unavailable {
                pool: self.name.clone(),
                size: self.members.len(),
            }),
        }
    }

    /// A member holding a session, for one request. A member whose session
    /// fails (credentials refused, so set aside; or any creation failure
    /// while another member may serve, which is then not waited through) is
    /// left for another member, so a bad or unlucky member costs no request.
    pub async fn acquire_session(
        self: &Arc<Self>,
        client: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<(Lease, Result<Arc<Session>, Unavailable>), Refusal> {
        // Each move follows a member turning set aside (never claimed again)
        // or failing (claimed only when all are); the bound is a backstop.
        let mut moves = self.members.len();
        loop {
            let lease = self.acquire(client, deadline).await?;
            let identity = lease.identity();
            // Who else may serve is asked only when this member has no session.
            let session = match identity.usable() {
                Some(s) => Ok(s),
                None if moves > 0 && self.another_may_serve(&lease) => {
                    identity.session_or_first_failure(deadline).await
                }
                None => identity.session(deadline).await,
            };
            if matches!(session, Err(Unavailable::Failed(_)))
                && (identity.set_aside() || (moves > 0 && self.another_may_serve(&lease)))
            {
                moves = moves.saturating_sub(1);
                continue;
            }
            return Ok((lease, session));
        }
    }

    /// The session to replay a refused request with: `lease`'s member's
    /// replacement for `dead`, or, if that member's renewal fails while
    /// another member may serve (or it was set aside), another member's
    /// session and its lease. A replay, like a first try, costs no request
    /// to a member that cannot renew while another can serve. With
    /// `may_move` false (the last replay a request may make) the member
    /// waits through its own renewal's failures instead, unless set aside:
    /// after every session expired at once, the others' sessions may be as
    /// dead as this one's, and moving on would only meet them.
    pub async fn replacement(
        self: &Arc<Self>,
        lease: &Lease,
        dead: &Session,
        client: Option<&HeaderValue>,
        deadline: Instant,
        may_move: bool,
    ) -> Result<(Option<Lease>, Result<Arc<Session>, Unavailable>), Refusal> {
        let identity = lease.identity();
        let renewed = if may_move && self.another_may_serve(lease) {
            identity.replacement_or_first_failure(dead, deadline).await
        } else {
            identity.replacement(dead, deadline).await
        };
        match renewed {
            Err(Unavailable::Failed(_))
                if identity.set_aside() || (may_move && self.another_may_serve(lease)) =>
            {
                let (other, session) = self.acquire_session(client, deadline).await?;
                Ok((Some(other), session))
            }
            renewed => Ok((None, renewed)),
        }
    }

    /// Whether a member other than `lease`'s is neither set aside nor
    /// failing.
    fn another_may_serve(&self, lease: &Lease) -> bool {
        self.members
            .iter()
            .enumerate()
            .any(|(i, m)| i != lease.index && !m.identity.set_aside() && !m.identity.failing())
    }

    fn try_claim(&self, client: Option<&HeaderValue>) -> Claim {
        #[cfg(test)]
        self.claims.fetch_add(1, Ordering::Relaxed);
        let n = self.members.len();
        let sticky = match (self.strategy, client) {
            (Strategy::Sticky, Some(c)) => Some(sticky_index(c, n)),
            _ => None,
        };
        let start = sticky.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) % n);
        let mut any = false;
        // First pass: members that hold a session or may get one. Members
        // whose last creation failed only when every other is failing too.
        for pass_over_failing in [true, false] {
            let mut candidates = false;
            for k in 0..n {
                let index = (start + k) % n;
                let member = &self.members[index];
                // A set-aside (or, while others may serve, failing) member is
                // skipped; a sticky client moves on to the next member
                // deterministically.
                if member.identity.set_aside() {
                    continue;
                }
                any = true;
                if pass_over_failing && member.identity.failing() {
                    continue;
                }
                candidates = true;
                if self.claim(member) {
                    return Claim::Got(index);
                }
                if sticky.is_some() {
                    // Sticky means this member: wait for it.
                    return Claim::Busy(Some(index));
                }
            }
            if candidates {
                // Busy members that may serve are worth waiting for.
                return Claim::Busy(None);
            }
        }
        if any {
            Claim::Busy(None)
        } else {
            Claim::AllSetAside
        }
    }

    fn claim(&self, member: &Member) -> bool {
        let Some(max) = self.max_in_flight else {
            return true;
        };
        member
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// The member a `QBProxy-Client` value maps to: the same for a given pool
/// size on every replica, in every build and version (FNV-1a, fixed, unlike
/// std's hasher), so a fleet maps a client to one member.
fn sticky_index(client: &HeaderValue, n: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let h = client
        .as_bytes()
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (h % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quickblox::credentials::IdentityKind;
    use crate::session::{
        Attempt, BoxFuture, HeldTokens, Info, NewSession, Policy, SessionError, Source,
    };
    use crate::telemetry::metrics::Metrics;
    use std::time::Duration;

    #[test]
    fn sticky_maps_a_client_to_the_same_member_on_every_replica_and_build() {
        // Fixed values (FNV-1a, computed independently): a hasher seeded per
        // process or changed between Rust releases would move clients
        // between members from one replica to the next.
        for (client, n, member) in [
            ("alice", 50, 33),
            ("alice", 1000, 183),
            ("bob", 50, 42),
            ("load-vu-17", 50, 16),
        ] {
            let value = HeaderValue::from_static(client);
            assert_eq!(sticky_index(&value, n), member, "{client} in {n}");
        }
    }

    /// Sessions are not what these tests are about.
    struct Idle;
    impl Source for Idle {
        fn create(&self, _attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
            Box::pin(std::future::pending())
        }
    }

    fn pool(members: usize, max_in_flight: Option<usize>) -> Arc<Pool> {
        let metrics = Metrics::new();
        let policy = Policy {
            renew_before: Duration::from_secs(600),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
            retry_wait: Duration::ZERO,
            set_aside_on_refused_credentials: true,
        };
        let identities = (0..members)
            .map(|i| {
                let info = Info {
                    name: format!("m-{i}"),
                    pool: Some("p".into()),
                    kind: IdentityKind::Login,
                };
                Identity::new(
                    info,
                    Box::new(Idle),
                    policy,
                    &metrics,
                    &HeldTokens::default(),
                )
            })
            .collect();
        Arc::new(Pool::new(
            "p".into(),
            identities,
            Strategy::RoundRobin,
            max_in_flight,
            Throttle::new(4),
            metrics.identity("", Some("p")),
        ))
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn claims(p: &Pool) -> usize {
        p.claims.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_free_member_is_claimed_at_once() {
        let p = pool(3, Some(2));
        for n in 1..=4 {
            let _lease = p.acquire(None, far()).await.unwrap();
            assert_eq!(claims(&p), n, "one claim per uncontended request");
        }
    }

    /// Issue 11, defect 4: a release wakes one waiter, not every waiter.
    #[tokio::test]
    async fn a_release_wakes_one_waiter() {
        let p = pool(1, Some(1));
        let held = p.acquire(None, far()).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..20 {
            let (p, tx) = (p.clone(), tx.clone());
            tokio::spawn(async move {
                let lease = p.acquire(None, far()).await.unwrap();
                let _ = tx.send(lease);
            });
        }
        // Each waiter claims, registers, claims again, and sleeps.
        let settled = async {
            while claims(&p) < 1 + 20 * 2 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .expect("every waiter asleep");
        drop(held);
        let lease = rx.recv().await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(claims(&p), 1 + 20 * 2 + 1, "only the woken waiter claimed");
        // And the next release wakes the next one.
        drop(lease);
        let _next = rx.recv().await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(claims(&p), 1 + 20 * 2 + 2);
    }
}
