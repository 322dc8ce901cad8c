//! One owner for reload: a reconciler from one validated [`Config`] to the
//! [`Live`] requests are served with.
//!
//! [`plan`] diffs the new config against the one in force, by name and
//! with maps (O(n) for a pool of 100,000 members), and decides to reuse what
//! did not change: identities and their sessions (a new source or policy
//! only where theirs changed), pools (and their in-flight counts), the
//! upstream client and its warm connections (unless `[upstream]` changed),
//! the listener's TLS (unless its files changed); it is pure. [`build`]
//! carries the plan out against the running `Live`. The reloader task
//! (`app/mod.rs`) runs
//! reloads one at a time, does the blocking part (reading files, loading
//! certificates, building) off the async threads, then publishes the new
//! `Live` with one store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::app::live::{listener_options, Live};
use crate::app::state::{Restored, StateFile};
use crate::cluster::{fingerprint, Cluster, FleetSource};
use crate::config::{Config, ConfigError, IdentityId, PoolId, TargetId};
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

/// What a reload keeps, makes and drops, decided from the two configs
/// alone: pure, tested without a runtime ([`plan`]); [`build`] carries it
/// out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    /// `[upstream]` is unchanged: the upstream clients (and their warm
    /// connections) are kept.
    pub client_kept: bool,
    /// The listener's TLS files are unchanged.
    pub tls_kept: bool,
    /// `upstream.rate` is unchanged: its limiter (and its state) is kept.
    pub rate_kept: bool,
    /// Session sources are rebuilt for every kept identity (the upstream,
    /// `[quickblox]`, the rate or the fleet changed).
    pub sources_changed: bool,
    /// Per new identity, in config order.
    pub identities: Vec<IdentityPlan>,
    /// Per new pool: the old pool whose creation semaphore it keeps (same
    /// name and `create_concurrency`).
    pub throttles: Vec<Option<PoolId>>,
    /// Per new pool: the old pool kept whole (cursor and in-flight counts),
    /// when nothing about it changed.
    pub pools: Vec<Option<PoolId>>,
    /// Old identities not kept: stopped once the new `Live` is published.
    pub removed: Vec<IdentityId>,
}

/// What becomes of one identity of the new config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityPlan {
    /// New (or its kind or pool changed): made afresh, no session yet.
    Create,
    /// The same name, kind and pool: the old identity, session and all.
    Keep {
        old: IdentityId,
        /// Its source is rebuilt (credentials, semaphore or the sources'
        /// settings changed); the session stays until its next renewal.
        new_source: bool,
        /// An API key whose key or user changed: renewed before publishing.
        rekey: bool,
        /// Its renewal policy changed.
        new_policy: bool,
    },
}

/// The plan from `old` (the config in force, if any) to `new`. O(n): names
/// are looked up in maps.
pub(crate) fn plan(old: Option<&Config>, new: &Config) -> Plan {
    let Some(old) = old else {
        return Plan {
            sources_changed: true,
            identities: vec![IdentityPlan::Create; new.identities.len()],
            throttles: vec![None; new.pools.len()],
            pools: vec![None; new.pools.len()],
            ..Plan::default()
        };
    };
    let client_kept = old.upstream == new.upstream;
    let tls_kept = matches!(
        (&old.listen.tls, &new.listen.tls),
        (Some(a), Some(b)) if a.fingerprint == b.fingerprint
    );
    let rate_kept = old.upstream.rate.is_some() && old.upstream.rate == new.upstream.rate;
    let sources_changed = !client_kept
        || old.quickblox != new.quickblox
        || old.upstream.rate != new.upstream.rate
        || old.cluster.is_some() != new.cluster.is_some();
    let new_policy = old.quickblox.renew_before != new.quickblox.renew_before
        || old.quickblox.retry_initial != new.quickblox.retry_initial
        || old.quickblox.retry_max != new.quickblox.retry_max
        || old.quickblox.retry_wait != new.quickblox.retry_wait;
    let old_pool = |name: &str| match old.target(name)? {
        TargetId::Pool(p) => Some(p),
        TargetId::Identity(_) => None,
    };
    let throttles: Vec<Option<PoolId>> = new
        .pools
        .iter()
        .map(|p| {
            old_pool(&p.name).filter(|o| old.pool(*o).create_concurrency == p.create_concurrency)
        })
        .collect();
    let mut kept = vec![false; old.identities.len()];
    let identities: Vec<IdentityPlan> = new
        .identities
        .iter()
        .map(|id| {
            let new_pool = id.pool.map(|p| new.pool(p).name.as_str());
            let Some(TargetId::Identity(o)) = old.target(&id.name) else {
                return IdentityPlan::Create;
            };
            let was = old.identity(o);
            let old_pool_name = was.pool.map(|p| old.pool(p).name.as_str());
            if was.credentials.kind() != id.credentials.kind() || old_pool_name != new_pool {
                return IdentityPlan::Create;
            }
            kept[o.index()] = true;
            let same_throttle = match (was.pool, id.pool) {
                (None, None) => true,
                (Some(op), Some(np)) => throttles[np.index()] == Some(op),
                _ => false,
            };
            let credentials_changed = was.credentials != id.credentials;
            IdentityPlan::Keep {
                old: o,
                new_source: sources_changed || credentials_changed || !same_throttle,
                rekey: credentials_changed && id.credentials.kind() == IdentityKind::ApiKey,
                new_policy,
            }
        })
        .collect();
    let pools = new
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let o = old_pool(&p.name)?;
            let was = old.pool(o);
            let same_members = was.members.len() == p.members.len()
                && was.members.iter().zip(&p.members).all(|(a, b)| {
                    matches!(identities[b.index()], IdentityPlan::Keep { old, .. } if old == *a)
                });
            (was.strategy == p.strategy
                && was.max_in_flight == p.max_in_flight
                && throttles[i] == Some(o)
                && same_members)
                .then_some(o)
        })
        .collect();
    let removed = kept
        .iter()
        .enumerate()
        .filter(|(_, k)| !**k)
        .map(|(i, _)| IdentityId::from_index(i))
        .collect();
    Plan {
        client_kept,
        tls_kept,
        rate_kept,
        sources_changed,
        identities,
        throttles,
        pools,
        removed,
    }
}

/// Builds the `Live` for `config` as [`plan`] says, reusing what
/// `previous` has. Blocking (it may read certificates); call it off the
/// runtime.
pub(crate) fn build(
    config: Arc<Config>,
    ctx: &Context,
    previous: Option<&Live>,
) -> Result<Built, StartError> {
    let plan = plan(previous.map(|p| &*p.config), &config);
    let mut summary = Summary {
        identities: config.identities.len(),
        pools: config.pools.len(),
        clients: config.clients.len(),
        client_kept: plan.client_kept,
        tls_kept: plan.tls_kept,
        ..Summary::default()
    };
    let clients: Arc<[Client]> = match previous.filter(|_| plan.client_kept) {
        Some(p) => p.clients.clone(),
        None => upstream::pools(&config.upstream, ctx.workers, ctx.metrics.upstream())
            .map_err(StartError::Tls)?,
    };
    let tls = match previous.filter(|_| plan.tls_kept) {
        Some(p) => p.tls.clone(),
        None => config.listen.tls.as_ref().map(|t| t.server.clone()),
    };
    let throttles: Vec<Throttle> = config
        .pools
        .iter()
        .zip(&plan.throttles)
        .map(|(p, keep)| match (keep, previous) {
            (Some(old), Some(prev)) => prev.pools[old.index()].throttle().clone(),
            _ => Throttle::new(p.create_concurrency),
        })
        .collect();
    let rate = match (config.upstream.rate, previous.filter(|_| plan.rate_kept)) {
        (None, _) => None,
        (Some(_), Some(p)) => p.rate.clone(),
        (Some(r), None) => Some(Arc::new(UpstreamRate::new(r, ctx.cluster.clone()))),
    };
    let endpoint = Arc::new(Endpoint {
        client: clients[0].clone(),
        upstream: config.upstream.clone(),
        quickblox: config.quickblox.clone(),
        clock: ctx.clock.clone(),
        rate: rate.clone(),
        metrics: ctx.metrics.clone(),
    });
    let fleet = ctx.cluster.as_ref().filter(|_| config.cluster.is_some());
    let mut rekeyed = Vec::new();
    let mut identities = Vec::with_capacity(config.identities.len());
    for (id, what) in config.identities.iter().zip(&plan.identities) {
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
        let identity = match (*what, previous) {
            (
                IdentityPlan::Keep {
                    old,
                    new_source,
                    rekey,
                    new_policy,
                },
                Some(p),
            ) => {
                let identity = &p.identities[old.index()];
                if new_source {
                    identity.set_source(source());
                }
                // A session-based identity takes new credentials at its
                // next creation; an API key has none, so the reloader puts
                // the new key (or user) in use before it publishes.
                if rekey {
                    rekeyed.push(identity.clone());
                }
                if new_policy {
                    identity.set_policy(policy);
                }
                summary.kept += 1;
                identity.clone()
            }
            _ => {
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
        .zip(&plan.pools)
        .map(|((p, throttle), keep)| {
            if let (Some(old), Some(prev)) = (keep, previous) {
                return Arc::clone(&prev.pools[old.index()]);
            }
            let members: Vec<Identity> = p
                .members
                .iter()
                .map(|m| identities[m.index()].clone())
                .collect();
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

    let removed: Vec<Identity> = match previous {
        Some(p) => plan
            .removed
            .iter()
            .map(|id| p.identities[id.index()].clone())
            .collect(),
        None => Vec::new(),
    };
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const APP: &str =
        "[quickblox]\napplication_id = \"1\"\nauth_key = \"key\"\nauth_secret = \"secret\"\n";

    fn config(rest: &str) -> Config {
        Config::from_toml(&format!("{APP}{rest}"), Path::new("test.toml")).unwrap()
    }

    fn pool(concurrency: usize, password: &str) -> String {
        format!(
            "[[pool]]\nname = \"load\"\nlogin = \"u-{{n}}\"\npassword = \"{password}-{{n}}\"\n\
             count = 3\ncreate_concurrency = {concurrency}\n"
        )
    }

    const BOT: &str = "[[identity]]\nname = \"bot\"\nlogin = \"bot\"\npassword = \"pw\"\n";

    fn keep(old: usize) -> IdentityPlan {
        IdentityPlan::Keep {
            old: IdentityId::from_index(old),
            new_source: false,
            rekey: false,
            new_policy: false,
        }
    }

    #[test]
    fn a_first_build_makes_everything() {
        let new = config(&format!("{BOT}{}", pool(2, "p")));
        let plan = plan(None, &new);
        assert!(!plan.client_kept && plan.sources_changed);
        assert_eq!(plan.identities, vec![IdentityPlan::Create; 4]);
        assert_eq!(plan.pools, vec![None]);
        assert!(plan.removed.is_empty());
    }

    #[test]
    fn an_unchanged_config_keeps_everything() {
        let text = format!("{BOT}{}", pool(2, "p"));
        let plan = plan(Some(&config(&text)), &config(&text));
        assert!(plan.client_kept && !plan.sources_changed);
        assert_eq!(plan.identities, (0..4).map(keep).collect::<Vec<_>>());
        let load = Some(PoolId::from_index(0));
        assert_eq!((plan.throttles, plan.pools), (vec![load], vec![load]));
        assert!(plan.removed.is_empty());
    }

    #[test]
    fn new_credentials_rebuild_a_source_and_keep_the_identity() {
        let old = config(&format!("{BOT}{}", pool(2, "p")));
        let new = config(&format!(
            "{}{}",
            BOT.replace("\"pw\"", "\"pw2\""),
            pool(2, "q")
        ));
        let plan = plan(Some(&old), &new);
        for (i, p) in plan.identities.iter().enumerate() {
            let IdentityPlan::Keep {
                old,
                new_source,
                rekey,
                ..
            } = *p
            else {
                panic!("{i} kept: {p:?}")
            };
            assert_eq!((old.index(), new_source, rekey), (i, true, false));
        }
        // The pool's members are the same identities: it is kept.
        assert_eq!(plan.pools, vec![Some(PoolId::from_index(0))]);
    }

    #[test]
    fn a_new_concurrency_gives_a_pool_a_new_semaphore_and_its_members_new_sources() {
        let old = config(&pool(2, "p"));
        let new = config(&pool(5, "p"));
        let plan = plan(Some(&old), &new);
        assert_eq!(
            (plan.throttles.clone(), plan.pools.clone()),
            (vec![None], vec![None])
        );
        assert!(plan.identities.iter().all(|p| matches!(
            p,
            IdentityPlan::Keep {
                new_source: true,
                ..
            }
        )));
    }

    #[test]
    fn a_changed_kind_or_pool_makes_a_new_identity_and_drops_the_old() {
        let old = config(BOT);
        let api_key = "[[identity]]\nname = \"bot\"\napi_key = \"k-0123456789\"\n";
        let plan = plan(Some(&old), &config(api_key));
        assert_eq!(plan.identities, vec![IdentityPlan::Create]);
        assert_eq!(plan.removed, vec![IdentityId::from_index(0)]);
        // A pool member that leaves its pool is another identity too.
        let pooled = config(&format!(
            "{BOT}[[pool]]\nname = \"bots\"\nidentities = [\"bot\"]\n"
        ));
        let plan = super::plan(Some(&pooled), &config(BOT));
        assert_eq!(plan.identities, vec![IdentityPlan::Create]);
        assert_eq!(plan.removed, vec![IdentityId::from_index(0)]);
    }

    #[test]
    fn a_new_api_key_is_put_in_use_before_publishing() {
        let with = |key: &str| {
            config(&format!(
                "[[identity]]\nname = \"svc\"\napi_key = \"{key}\"\n"
            ))
        };
        let plan = plan(Some(&with("key-a-0123456789")), &with("key-b-0123456789"));
        assert!(matches!(
            plan.identities[0],
            IdentityPlan::Keep {
                rekey: true,
                new_source: true,
                ..
            }
        ));
    }

    #[test]
    fn new_retry_settings_are_a_new_policy_and_a_new_upstream_new_sources() {
        let old = config(BOT);
        let text =
            format!("{APP}{BOT}").replace("[quickblox]\n", "[quickblox]\nretry_max = \"5s\"\n");
        let retry = Config::from_toml(&text, Path::new("test.toml")).unwrap();
        let plan = plan(Some(&old), &retry);
        assert!(
            matches!(
                plan.identities[0],
                IdentityPlan::Keep {
                    new_policy: true,
                    new_source: true,
                    ..
                }
            ),
            "[quickblox] changed: sources too"
        );
        let upstream = config(&format!("{BOT}[upstream]\nmax_in_flight = 7\n"));
        let plan = super::plan(Some(&old), &upstream);
        assert!(!plan.client_kept && plan.sources_changed);
    }
}
