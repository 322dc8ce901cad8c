//! One owner for reload: a reconciler from one validated [`Config`] to the
//! [`Live`] requests are served with.
//!
//! [`build`] diffs the new config against the `Live` in force, by name and
//! with maps (O(n) for a pool of 100,000 members), and reuses what did not
//! change: identities and their sessions (a new source or policy only where
//! theirs changed), pools (and their in-flight counts), the upstream client
//! and its warm connections (unless `[upstream]` changed), the listener's
//! TLS (unless its files changed). The reloader task (`lib.rs`) runs
//! reloads one at a time, does the blocking part (reading files, loading
//! certificates, building) off the async threads, then publishes the new
//! `Live` with one store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::app::live::{listener_options, Live};
use crate::app::state::{Restored, StateFile};
use crate::cluster::{fingerprint, Cluster, FleetSource};
use crate::config::{Config, ConfigError, TargetId};
use crate::gateway::access::Gate;
use crate::gateway::route::Router;
use crate::quickblox::credentials::{Credentials, IdentityKind};
use crate::session::pool::{Pool, Throttle};
use crate::session::{ApiKeySource, Held, HeldTokens, Identity, Info, Policy, Source};
use crate::telemetry::metrics::Metrics;
use crate::upstream::rate::UpstreamRate;
use crate::upstream::{self, Client, ClockOffset, Endpoint, SessionCreator, Throttled};
use crate::StartError;

/// What lives across reloads besides the published `Live`.
#[derive(Clone)]
pub(crate) struct Context {
    pub metrics: Metrics,
    pub held: HeldTokens,
    /// QuickBlox's clock against ours: a property of the two clocks.
    pub clock: Arc<ClockOffset>,
    /// The fleet's Redis, if `[cluster]` was configured at start (joining
    /// or leaving a fleet takes a restart).
    pub cluster: Option<Cluster>,
    /// Proxy workers (`worker.rs`), each with an upstream client of its
    /// own; at least 1 (`App::with_workers`).
    pub workers: usize,
    /// `[state] file`, if configured at start.
    pub state: Option<Arc<StateFile>>,
    /// Sessions read from it at start, by fingerprint; each is taken by the
    /// first build that makes its identity.
    pub restored: Arc<std::sync::Mutex<HashMap<String, Held>>>,
}

/// Why a reload did not take effect; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("qbproxy is shutting down")]
    Stopped,
}

/// What a reload changed, for its log line and for callers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub identities: usize,
    pub pools: usize,
    pub clients: usize,
    /// Identities kept, session and all.
    pub kept: usize,
    pub added: usize,
    pub removed: usize,
    /// The upstream client (and its connections) was kept.
    pub client_kept: bool,
    /// The listener's TLS configuration was kept.
    pub tls_kept: bool,
}

/// A new `Live`, and the identities of the old one it does not keep.
pub(crate) struct Built {
    pub live: Live,
    pub removed: Vec<Identity>,
    /// Kept API-key identities whose key or user changed: renewed before
    /// the new `Live` is published, so every request after the reload
    /// carries the new key.
    pub rekeyed: Vec<Identity>,
    pub summary: Summary,
}

/// Builds the `Live` for `config`, reusing what `previous` has that did not
/// change. Blocking (it may read certificates); call it off the runtime.
pub(crate) fn build(
    config: Arc<Config>,
    ctx: &Context,
    previous: Option<&Live>,
) -> Result<Built, StartError> {
    let mut summary = Summary {
        identities: config.identities.len(),
        pools: config.pools.len(),
        clients: config.clients.len(),
        ..Summary::default()
    };
    let clients: Arc<[Client]> = match previous.filter(|p| p.config.upstream == config.upstream) {
        Some(p) => {
            summary.client_kept = true;
            p.clients.clone()
        }
        None => upstream::pools(&config.upstream, ctx.workers, ctx.metrics.upstream())
            .map_err(StartError::Tls)?,
    };
    let tls = match (&config.listen.tls, previous) {
        (Some(new), Some(p))
            if p.config.listen.tls.as_ref().map(|t| t.fingerprint) == Some(new.fingerprint) =>
        {
            summary.tls_kept = true;
            p.tls.clone()
        }
        (new, _) => new.as_ref().map(|t| t.server.clone()),
    };
    // A pool's creation semaphore, kept when its concurrency is.
    let old_pools: HashMap<&str, &Arc<Pool>> = previous
        .map(|p| p.pools.iter().map(|pool| (pool.name(), pool)).collect())
        .unwrap_or_default();
    let throttles: Vec<Throttle> = config
        .pools
        .iter()
        .map(|p| match old_pools.get(p.name.as_str()) {
            Some(old) if old.throttle().size == p.create_concurrency => old.throttle().clone(),
            _ => Throttle::new(p.create_concurrency),
        })
        .collect();

    // The fleet-wide rate: kept (with its state) unless it changed.
    let rate = match (config.upstream.rate, previous) {
        (None, _) => None,
        (Some(r), Some(p)) if p.rate.as_ref().is_some_and(|old| old.rate() == r) => p.rate.clone(),
        (Some(r), _) => Some(Arc::new(UpstreamRate::new(r, ctx.cluster.clone()))),
    };
    let sources_changed = previous.is_none_or(|p| {
        !summary.client_kept
            || p.config.quickblox != config.quickblox
            || p.config.upstream.rate != config.upstream.rate
            || p.config.cluster.is_some() != config.cluster.is_some()
    });
    let endpoint = Arc::new(Endpoint {
        client: clients[0].clone(),
        upstream: config.upstream.clone(),
        quickblox: config.quickblox.clone(),
        clock: ctx.clock.clone(),
        rate: rate.clone(),
        metrics: ctx.metrics.clone(),
    });
    let fleet = ctx.cluster.as_ref().filter(|_| config.cluster.is_some());
    let mut kept = vec![false; previous.map_or(0, |p| p.identities.len())];
    let mut rekeyed = Vec::new();
    let mut identities = Vec::with_capacity(config.identities.len());
    for id in &config.identities {
        let pool = id.pool.map(|p| config.pool(p));
        let throttle = id.pool.map(|p| &throttles[p.index()]);
        let policy = Policy {
            renew_before: config.quickblox.renew_before,
            retry_initial: config.quickblox.retry_initial,
            retry_max: config.quickblox.retry_max,
            retry_wait: config.quickblox.retry_wait,
            set_aside_on_refused_credentials: pool.is_some(),
        };
        let source = || -> Box<dyn Source> {
            // An API key: nothing to create, throttle or share.
            if let Credentials::ApiKey { key, on_behalf_of } = &id.credentials {
                return Box::new(ApiKeySource::new(key.clone(), *on_behalf_of));
            }
            let creator = SessionCreator::new(endpoint.clone(), id.credentials.clone());
            let mut own: Box<dyn Source> = match throttle {
                Some(t) => Box::new(Throttled::new(creator, t.permits.clone())),
                None => Box::new(creator),
            };
            let restored = ctx
                .restored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fingerprint(&config, id));
            if let Some(held) = restored {
                own = Box::new(Restored::new(own, held));
            }
            match fleet {
                Some(cluster) => Box::new(FleetSource::new(
                    own,
                    cluster.clone(),
                    fingerprint(&config, id),
                    pool.is_some(),
                    // A request waits for another replica's creation no
                    // longer than it would wait for a retry of its own.
                    config
                        .quickblox
                        .session_timeout
                        .min(config.quickblox.retry_wait.max(Duration::from_secs(1))),
                )),
                None => own,
            }
        };
        // The same name, kind and pool: the same identity, session and all.
        let old = previous.and_then(|p| match p.config.target(&id.name)? {
            TargetId::Identity(old) => {
                let identity = &p.identities[old.index()];
                let info = identity.info();
                let same = info.kind == id.credentials.kind()
                    && info.pool.as_deref() == pool.map(|p| p.name.as_str());
                same.then_some((old, identity, p))
            }
            TargetId::Pool(_) => None,
        });
        let identity = match old {
            Some((old_id, identity, p)) => {
                kept[old_id.index()] = true;
                let old_config = p.config.identity(old_id);
                let old_throttle = old_config.pool.map(|op| p.pools[op.index()].throttle());
                let same_throttle = match (old_throttle, throttle) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.same(b),
                    _ => false,
                };
                let credentials_changed = old_config.credentials != id.credentials;
                if sources_changed || credentials_changed || !same_throttle {
                    identity.set_source(source());
                }
                // A session-based identity takes new credentials at its
                // next creation; an API key has none, so the reloader puts
                // the new key (or user) in use before it publishes.
                if credentials_changed && id.credentials.kind() == IdentityKind::ApiKey {
                    rekeyed.push(identity.clone());
                }
                if identity.policy() != policy {
                    identity.set_policy(policy);
                }
                summary.kept += 1;
                identity.clone()
            }
            None => {
                summary.added += 1;
                let info = Info {
                    name: id.name.clone(),
                    pool: pool.map(|p| p.name.clone()),
                    kind: id.credentials.kind(),
                };
                Identity::new(info, source(), policy, &ctx.metrics, &ctx.held)
            }
        };
        identities.push(identity);
    }

    let pools = config
        .pools
        .iter()
        .zip(throttles)
        .map(|(p, throttle)| {
            let members: Vec<Identity> = p
                .members
                .iter()
                .map(|m| identities[m.index()].clone())
                .collect();
            // An unchanged pool is kept, with its cursor and in-flight counts.
            if let Some(old) = old_pools.get(p.name.as_str()) {
                if old.strategy() == p.strategy
                    && old.max_in_flight() == p.max_in_flight
                    && old.throttle().same(&throttle)
                    && old.members().len() == members.len()
                    && old.members().zip(&members).all(|(a, b)| a.same(b))
                {
                    return Arc::clone(old);
                }
            }
            Arc::new(Pool::new(
                p.name.clone(),
                members,
                p.strategy,
                p.max_in_flight,
                throttle,
                ctx.metrics.identity("", Some(&p.name)),
            ))
        })
        .collect();

    let removed: Vec<Identity> = previous
        .map(|p| {
            p.identities
                .iter()
                .zip(&kept)
                .filter(|(_, kept)| !**kept)
                .map(|(i, _)| i.clone())
                .collect()
        })
        .unwrap_or_default();
    summary.removed = removed.len();
    let live = Live {
        rate,
        router: Router::new(&config),
        gate: Gate::new(&config, &ctx.metrics),
        options: listener_options(&config),
        clients,
        identities,
        pools,
        tls,
        config,
    };
    Ok(Built {
        live,
        removed,
        rekeyed,
        summary,
    })
}
