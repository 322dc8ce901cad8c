//! `qbproxy check --probe`: before going live, one session creation per
//! identity (and one member per pool) against the configured upstream,
//! each result on its own line. The only other way to learn that a
//! password is wrong is to start the proxy and wait through `retry_wait`.
//! An API key has no session to create: it is checked with one read made
//! with its headers (`GET /users/{on_behalf_of}.json`, or `GET
//! /users.json?per_page=1`).

use std::sync::Arc;

use crate::config::{Config, IdentityConfig};
use crate::quickblox::credentials::IdentityKind;
use crate::session::{Attempt, Reason, SessionError, Source};
use crate::telemetry::metrics::Metrics;
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

/// What is probed: every identity outside a pool, and each pool's first
/// member (members share everything but their login).
fn targets(config: &Config) -> Vec<(String, &IdentityConfig)> {
    let mut out: Vec<(String, &IdentityConfig)> = config
        .identities
        .iter()
        .filter(|id| id.pool.is_none())
        .map(|id| (id.name.clone(), id))
        .collect();
    for pool in &config.pools {
        if let Some(&first) = pool.members.first() {
            let member = config.identity(first);
            out.push((format!("{} (member {})", pool.name, member.name), member));
        }
    }
    out
}

/// Creates one session per target, one after another (each bounded by
/// `quickblox.session_timeout`), calling `each` with every result as it
/// comes. The sessions are left to lapse: they are not logged out, which
/// would need a second call per identity and proves nothing more.
pub async fn probe(
    config: &Config,
    mut each: impl FnMut(&Probed),
) -> Result<Vec<Probed>, std::io::Error> {
    let metrics = Metrics::new();
    let endpoint = Arc::new(Endpoint {
        client: upstream::pools(&config.upstream, 1, metrics.upstream())?[0].clone(),
        upstream: config.upstream.clone(),
        quickblox: config.quickblox.clone(),
        clock: Arc::new(ClockOffset::default()),
        rate: None,
        metrics,
    });
    let mut results = Vec::new();
    for (what, identity) in targets(config) {
        let creator = SessionCreator::new(endpoint.clone(), identity.credentials.clone());
        let outcome = if identity.credentials.kind() == IdentityKind::ApiKey {
            creator.verify_api_key().await.map(|user_id| Created {
                user_id,
                api_key: true,
            })
        } else {
            let attempt = Attempt {
                reason: Reason::Startup,
                held: None,
                refused: None,
                renew_before: config.quickblox.renew_before,
            };
            creator.create(attempt).await.map(|s| Created {
                user_id: s.user_id,
                api_key: false,
            })
        };
        let probed = Probed { what, outcome };
        each(&probed);
        results.push(probed);
    }
    Ok(results)
}
