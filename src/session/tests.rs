//! The renewal task against a scripted source, in paused time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::task::Backoff;
use super::*;
use crate::quickblox;
use crate::quickblox::credentials::IdentityKind;
use crate::telemetry::metrics::Metrics;

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
    fn create(&self, _attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
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
                .unwrap_or(Ok(quickblox::SESSION_LIFETIME));
            outcome.map(|lifetime| NewSession {
                token: crate::quickblox::credentials::Secret::new(format!("token-{n}")),
                user_id: 7,
                lifetime,
                ..NewSession::default()
            })
        })
    }
}

const POLICY: Policy = Policy {
    renew_before: Duration::from_secs(600),
    retry_initial: Duration::from_secs(1),
    retry_max: Duration::from_secs(8),
    retry_wait: Duration::ZERO,
    set_aside_on_refused_credentials: false,
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
        kind: IdentityKind::Login,
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
    assert_eq!(
        start.elapsed(),
        quickblox::SESSION_LIFETIME - POLICY.renew_before
    );
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
        Duration::from_secs(3600) + quickblox::SESSION_LIFETIME - POLICY.renew_before
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
    assert_eq!(id.expires_at(&s), start + quickblox::SESSION_LIFETIME);
    // With the header, any status counts: QuickBlox saw the token.
    let mut h = HeaderMap::new();
    let in_90_min = SystemTime::now() + Duration::from_secs(5400);
    h.insert(
        quickblox::QB_TOKEN_EXPIRATION,
        quickblox::format_expiration(in_90_min).parse().unwrap(),
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
    id.report_dead(&refused);
    let s = id.replacement(&refused, far()).await.unwrap();
    assert_eq!(token(&s), "token-2");
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_fail_fast_then_recover_with_backoff() {
    let refused = SessionError::Refused {
        status: 503,
        message: "down".into(),
        hint: None,
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
    assert_eq!(id.status().state, SessionState::Ready);
}

#[tokio::test(start_paused = true)]
async fn requests_wait_through_transient_failures_within_retry_wait() {
    let down = SessionError::Refused {
        status: 503,
        message: "down".into(),
        hint: None,
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
        hint: None,
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
    let (id, script) = identity(vec![Ok(quickblox::SESSION_LIFETIME), Err(down)], None);
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
        hint: None,
    };
    let script = Arc::new(Script {
        calls: AtomicU64::new(0),
        outcomes: Mutex::new(vec![Err(unauthorized)].into()),
        gate: None,
        entered: watch::channel(0).0,
    });
    let policy = Policy {
        set_aside_on_refused_credentials: true,
        ..POLICY
    };
    let info = Info {
        name: "load-1".into(),
        pool: Some("load".into()),
        kind: IdentityKind::Login,
    };
    let id = Identity::new(
        info,
        Box::new(script.clone()),
        policy,
        &Metrics::new(),
        &HeldTokens::default(),
    );
    assert_eq!(id.status().state, SessionState::Idle);
    id.start();
    next_change(&id).await;
    assert!(id.set_aside());
    assert_eq!(id.status().state, SessionState::SetAside);
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
            Ok(quickblox::SESSION_LIFETIME),
            Ok(quickblox::SESSION_LIFETIME),
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
    assert_eq!(start.elapsed(), quickblox::SESSION_LIFETIME - hour);
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
    let (id, _script) = identity(
        vec![Ok(quickblox::SESSION_LIFETIME), Err(down.clone())],
        None,
    );
    id.start();
    id.ready().await;
    match id.force_renewal(far()).await {
        Err(Unavailable::Failed(e)) => assert_eq!(*e, down),
        other => panic!("{other:?}"),
    }
    assert_eq!(token(&id.current().expect("still held")), "token-1");
    assert_eq!(id.status().state, SessionState::ReadyRenewalFailing);
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
            Ok(quickblox::SESSION_LIFETIME),
            Err(down),
            Ok(quickblox::SESSION_LIFETIME),
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
    id.report_dead(&first);
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
