//! `qbproxy check --probe`: before going live, one session creation per
//! identity and per pool member (every member of a pool of up to
//! [`POOL_SAMPLE`]; of a larger pool, a sample of that many: the first, the
//! last, and members evenly spaced between) against the configured
//! upstream, each result on its own line. At most [`AT_ONCE`] at a time,
//! and within `upstream.rate`. The only other way to learn that a
//! password is wrong is to start the proxy and wait through `retry_wait`.
//! An API key has no session to create: it is checked with one read made
//! with its headers (`GET /users/{on_behalf_of}.json`, or `GET
//! /users.json?per_page=1`).

use std::sync::Arc;

use crate::config::{Config, IdentityConfig};
use crate::quickblox::credentials::IdentityKind;
use crate::session::{Attempt, Reason, SessionError, Source};
use crate::telemetry::metrics::Metrics;
use crate::upstream::rate::UpstreamRate;
use crate::upstream::{self, ClockOffset, Endpoint, SessionCreator};

/// One identity's result.
pub struct Probed {
    /// The identity, or `pool (member name)` for a pool's member.
    pub what: String,
    pub outcome: Result<Created, SessionError>,
}

/// A session was created: whose.
pub struct Created {
    /// 0 for an application session.
    pub user_id: u64,
    /// An API key, checked with one read (it has no session to create).
    pub api_key: bool,
}

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = &self.what;
        match &self.outcome {
            Ok(Created {
                user_id: 0,
                api_key: true,
            }) => write!(f, "{what}: ok (API key, as the application)"),
            Ok(Created {
                user_id,
                api_key: true,
            }) => write!(f, "{what}: ok (API key, on behalf of user {user_id})"),
            Ok(Created { user_id: 0, .. }) => write!(f, "{what}: ok (application session)"),
            Ok(Created { user_id, .. }) => write!(f, "{what}: ok (user {user_id})"),
            Err(e) => match e.hint() {
                Some(hint) => write!(f, "{}: FAILED: {e}; {hint}", self.what),
                None => write!(f, "{}: FAILED: {e}", self.what),
            },
        }
    }
}

/// The most members of one pool probed: a pool of more is sampled.
pub const POOL_SAMPLE: usize = 20;
/// Session creations in flight at once.
pub const AT_ONCE: usize = 4;

/// What is probed: every identity outside a pool, and each pool's members
/// (up to [`POOL_SAMPLE`] of them, the first and the last always among
/// them: members share everything but their login and password, and a
/// pattern that numbers one but not the other fails past the first).
fn targets(config: &Config) -> Vec<(String, &IdentityConfig)> {
    let mut out: Vec<(String, &IdentityConfig)> = config
        .identities
        .iter()
        .filter(|id| id.pool.is_none())
        .map(|id| (id.name.clone(), id))
        .collect();
    for pool in &config.pools {
        for at in sample(pool.members.len(), POOL_SAMPLE) {
            let member = config.identity(pool.members[at]);
            out.push((format!("{} (member {})", pool.name, member.name), member));
        }
    }
    out
}

/// Up to `most` indices of `0..n`, evenly spaced, the first and the last
/// included.
fn sample(n: usize, most: usize) -> Vec<usize> {
    if n <= most {
        return (0..n).collect();
    }
    let mut picked: Vec<usize> = (0..most).map(|k| k * (n - 1) / (most - 1)).collect();
    picked.dedup();
    picked
}

/// Creates one session per target, [`AT_ONCE`] at a time (each bounded by
/// `quickblox.session_timeout`, and waiting its turn under
/// `upstream.rate`), calling `each` with every result in order. The
/// sessions are left to lapse: they are not logged out, which would need a
/// second call per identity and proves nothing more.
pub async fn probe(
    config: &Config,
    mut each: impl FnMut(&Probed),
) -> Result<Vec<Probed>, std::io::Error> {
    use futures_util::StreamExt;
    let metrics = Metrics::new();
    // The probe waits for its turn rather than fail for want of one.
    let rate = config.upstream.rate.map(|mut r| {
        r.wait = r.wait.max(config.quickblox.session_timeout);
        Arc::new(UpstreamRate::new(r, None))
    });
    let endpoint = Arc::new(Endpoint {
        client: upstream::pools(&config.upstream, 1, metrics.upstream())?[0].clone(),
        upstream: config.upstream.clone(),
        quickblox: config.quickblox.clone(),
        clock: Arc::new(ClockOffset::default()),
        rate,
        metrics,
    });
    let renew_before = config.quickblox.renew_before;
    let mut results = Vec::new();
    let mut probes = futures_util::stream::iter(targets(config))
        .map(|(what, identity)| {
            let creator = SessionCreator::new(endpoint.clone(), identity.credentials.clone());
            let api_key = identity.credentials.kind() == IdentityKind::ApiKey;
            async move {
                let outcome = if api_key {
                    creator.verify_api_key().await.map(|user_id| Created {
                        user_id,
                        api_key: true,
                    })
                } else {
                    let attempt = Attempt {
                        reason: Reason::Startup,
                        held: None,
                        refused: None,
                        renew_before,
                    };
                    creator.create(attempt).await.map(|s| Created {
                        user_id: s.user_id,
                        api_key: false,
                    })
                };
                Probed { what, outcome }
            }
        })
        .buffered(AT_ONCE);
    while let Some(probed) = probes.next().await {
        each(&probed);
        results.push(probed);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_large_pool_is_sampled_with_its_first_and_last_member() {
        assert_eq!(sample(3, 20), [0, 1, 2]);
        assert_eq!(sample(20, 20), (0..20).collect::<Vec<_>>());
        let s = sample(100_000, 20);
        assert_eq!(s.len(), 20);
        assert_eq!((s[0], s[19]), (0, 99_999));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(21, 20).len(), 20);
    }
}
