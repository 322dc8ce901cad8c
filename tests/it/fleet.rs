//! Fleet (`[cluster]`): three replicas, each a real `App`, in front of one
//! simulator, sharing sessions and the upstream rate through a real
//! `redis-server` that the tests start, kill, pause and restart empty.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fleet::{assert_all_ok, burst_of_300, proxies, statuses, three, tokens, Load};
use crate::common::redis_server::RedisServer;
use crate::common::{bounded, demo_sim, setup, Harness, Setup, BOUND};
use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy_sim::{Fault, Sim, SimConfig};
use tokio::time::Instant;

/// A replica of the fleet: `[cluster]` on `redis`, in front of `sim`.
fn replica(sim: &Sim, redis: &RedisServer) -> Setup {
    setup()
        .sim(sim.clone())
        .set("cluster", "redis_url", redis.url())
        .set("quickblox", "session_timeout", Duration::from_secs(5))
}

async fn fleet_of_three(sim: &Sim, redis: &RedisServer) -> [Harness; 3] {
    three([
        replica(sim, redis),
        replica(sim, redis),
        replica(sim, redis),
    ])
    .await
}

fn adoptions(fleet: &[Harness]) -> u64 {
    fleet
        .iter()
        .map(|h| h.metric("qbproxy_session_adoptions_total{identity=\"demo\""))
        .sum()
}

/// `source` of identity `name` in a replica's `/sessions`.
async fn source(h: &Harness, name: &str) -> String {
    let sessions = h.admin_get("/sessions").await.json();
    let identity = sessions["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {sessions}"))
        .clone();
    identity["source"].as_str().unwrap_or("none").to_owned()
}

/// Waits until the replica's default identity holds a session `check`
/// accepts.
async fn session_where(h: &Harness, check: impl FnMut(&qbproxy::Session) -> bool) {
    h.handle
        .default_identity()
        .session_where(Instant::now() + BOUND, check)
        .await
        .expect("the awaited session");
}

// 1 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_starting_together_create_one_session() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    // A slow creation: the other two are surely waiting on the lock.
    sim.set_creation_delay(Duration::from_millis(200));
    let fleet = fleet_of_three(&sim, &redis).await;

    assert_eq!(sim.creations(), 1, "one creation for the fleet");
    assert_eq!(tokens(&fleet).len(), 1, "one token: {:?}", tokens(&fleet));
    assert_eq!(adoptions(&fleet), 2, "two replicas adopted it");
    for h in &fleet {
        assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
        assert_eq!(source(h, "demo").await, "cluster");
        assert_eq!(h.metric("qbproxy_cluster_up"), 1);
    }
    let seen: HashSet<String> = sim.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(seen, tokens(&fleet), "the upstream saw the one token");
}

// 2 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_seen_by_300_requests_over_three_replicas_is_one_creation() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let fleet = fleet_of_three(&sim, &redis).await;
    assert_eq!(sim.creations(), 1);
    let before = fleet[0].token();

    for round in 1..=2 {
        sim.expire_all();
        sim.set_creation_delay(Duration::from_millis(100));
        let answers = burst_of_300(&fleet).await;
        assert_all_ok(&answers);
        assert_eq!(sim.creations(), 1 + round, "round {round}: one creation");
        assert_eq!(tokens(&fleet).len(), 1);
        assert!(!tokens(&fleet).contains(&before));
    }
    assert!(sim.refusals() > 0, "the replicas did see the expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_replicas_listen_for_the_stored_session_and_poll_only_as_a_fallback() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let fleet = fleet_of_three(&sim, &redis).await;
    // Every replica listens for stored sessions.
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_subscribed", 1).await;
    }

    // A renewal that takes 1.5 s: the two replicas waiting for it would
    // read the stored session 30 times each polling at 50 ms.
    sim.set_creation_delay(Duration::from_millis(1500));
    sim.expire_all();
    let before = redis.command_calls().await;
    assert_all_ok(&burst_of_300(&fleet).await);
    let after = redis.command_calls().await;
    assert_eq!(sim.creations(), 2);
    let reads = after["hmget"] - before.get("hmget").copied().unwrap_or(0);
    // Each replica: a read before the lock, one under it or one per slow
    // poll (every 500 ms while subscribed), one after the message. (The
    // message's effect is on latency: bench/fleet.sh.)
    assert!(reads <= 3 * 6, "{reads} reads of the stored session");
}

// Proactive renewal ---------------------------------------------------------

/// Sessions live this long after their last use, and are renewed 3 s
/// ahead: a replica's own proactive renewal comes due 33 s after the
/// session was made (never sooner than 30 s after, by design).
const LIFETIME: Duration = Duration::from_secs(36);

async fn short_lived_sim() -> Sim {
    let mut config = SimConfig::demo();
    config.session_lifetime = LIFETIME;
    Sim::start(config).await.unwrap()
}

fn renewing_replica(sim: &Sim, redis: &RedisServer) -> Setup {
    replica(sim, redis).set("quickblox", "renew_before", Duration::from_secs(3))
}

async fn renewing_fleet(sim: &Sim, redis: &RedisServer) -> [Harness; 3] {
    three([
        renewing_replica(sim, redis),
        renewing_replica(sim, redis),
        renewing_replica(sim, redis),
    ])
    .await
}

/// How long the replica's default identity thinks its session has left.
fn left(h: &Harness) -> Duration {
    let id = h.handle.default_identity();
    let s = id.current().expect("a session");
    id.expires_at(&s).saturating_duration_since(Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_does_not_renew_a_session_a_busy_one_keeps_alive() {
    let redis = RedisServer::start().await;
    let sim = short_lived_sim().await;
    let fleet = renewing_fleet(&sim, &redis).await;
    assert_eq!(sim.creations(), 1);
    let token = fleet[0].token();

    // Replica 0 is busy until well past the moment the idle replicas'
    // renewal came due by the expiry they saw themselves (33 s).
    let until = Instant::now() + LIFETIME + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(fleet[0].get("/users.json").await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(sim.creations(), 1, "no replica renewed a session in use");
    assert_eq!(tokens(&fleet), HashSet::from([token]));
    // The idle replicas learnt the expiry the busy one saw: theirs is
    // well ahead of the 36 s their own last use would give.
    for h in &fleet[1..] {
        let left = left(h);
        assert!(
            left > Duration::from_secs(20),
            "{left:?} left on an idle replica"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proactive_renewal_of_an_idle_fleet_is_one_creation() {
    let redis = RedisServer::start().await;
    let sim = short_lived_sim().await;
    let fleet = renewing_fleet(&sim, &redis).await;
    assert_eq!(sim.creations(), 1);
    let first = fleet[0].token();

    // All three come due at the same moment; one renews, two adopt.
    for h in &fleet {
        h.handle
            .default_identity()
            .session_where(Instant::now() + LIFETIME + BOUND, |s| {
                s.token().to_str().unwrap() != first
            })
            .await
            .expect("the renewed session");
    }
    assert_eq!(sim.creations(), 2, "one creation for the fleet");
    assert_eq!(tokens(&fleet).len(), 1, "one token: {:?}", tokens(&fleet));
    assert_eq!(
        adoptions(&fleet),
        2 + 2,
        "two adoptions at the start, two now"
    );
}

// 3 -------------------------------------------------------------------------

async fn sim_with_users(n: u64) -> Sim {
    Sim::start(SimConfig::demo().with_users("loadtest-{n}", "pw-{n}", 1..=n))
        .await
        .unwrap()
}

const POOL: &str = "name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 50\npassword = \"pw-{n}\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_50_behind_three_replicas_is_50_creations() {
    let redis = RedisServer::start().await;
    let sim = sim_with_users(50).await;
    let fleet = three([
        replica(&sim, &redis).pool_table(POOL),
        replica(&sim, &redis).pool_table(POOL),
        replica(&sim, &redis).pool_table(POOL),
    ])
    .await;
    assert_eq!(sim.creations(), 1, "the demo identity; members are lazy");

    // Every member used from every replica, all at once.
    let mut tasks = Vec::new();
    for h in &fleet {
        for i in 0..100 {
            tasks.push(h.spawn_send(
                Method::GET,
                format!("/users.json?i={i}"),
                &[("QBProxy-Identity", "load")],
                Bytes::new(),
            ));
        }
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    for h in &fleet {
        for n in 1..=50 {
            assert!(
                h.handle
                    .identity(&format!("load-{n}"))
                    .unwrap()
                    .current()
                    .is_some(),
                "load-{n} holds a session on every replica"
            );
        }
    }
    assert_eq!(sim.creations(), 1 + 50, "50 creations, not 150");
    for n in 1..=50 {
        assert_eq!(sim.creations_for(100_000 + n), 1, "loadtest-{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_maps_a_client_to_the_same_member_on_every_replica() {
    let redis = RedisServer::start().await;
    let sim = sim_with_users(10).await;
    let pool = "name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 10\npassword = \"pw-{n}\"\nstrategy = \"sticky\"\n";
    let fleet = three([
        replica(&sim, &redis).pool_table(pool),
        replica(&sim, &redis).pool_table(pool),
        replica(&sim, &redis).pool_table(pool),
    ])
    .await;
    for c in 0..20 {
        let client = format!("client-{c}");
        let mut users = HashSet::new();
        for h in &fleet {
            let a = h
                .send(
                    Method::GET,
                    &format!("/users.json?c={c}"),
                    &[("QBProxy-Identity", "load"), ("QBProxy-Client", &client)],
                    Bytes::new(),
                )
                .await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text());
            users.insert(sim.requests().last().unwrap().user_id);
        }
        assert_eq!(users.len(), 1, "{client} went to {users:?}");
    }
}

// 4 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_in_redis() {
    let redis = RedisServer::start().await;
    let sim = sim_with_users(3).await;
    let pool = "name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 3\npassword = \"pw-{n}\"\n";
    let fleet = three([
        replica(&sim, &redis).pool_table(pool),
        replica(&sim, &redis).pool_table(pool),
        replica(&sim, &redis).pool_table(pool),
    ])
    .await;
    // Round robin: three requests through each replica use every member.
    for h in &fleet {
        for _ in 0..3 {
            assert_eq!(h.get_as("load", "/users.json").await.status, StatusCode::OK);
        }
    }
    let held: Vec<String> = fleet[0]
        .handle
        .identities()
        .iter()
        .filter_map(|i| i.current())
        .map(|s| s.token().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(held.len(), 4, "demo and three members");

    let app = sim.config().clone();
    let mut secrets: Vec<String> = held.clone();
    secrets.push(app.auth_secret.clone());
    secrets.push(app.users[0].password.clone());
    secrets.extend((1..=3).map(|n| format!("pw-{n}")));
    // And each token spelled in hex.
    for t in &held {
        secrets.push(hex(t.as_bytes()));
    }

    let dump = redis.dump().await;
    let sessions = dump
        .iter()
        .filter(|(k, _)| k.starts_with("qbproxy:s:"))
        .count();
    assert_eq!(sessions, 4, "every session is stored: {:?}", keys(&dump));
    for (key, values) in &dump {
        for secret in &secrets {
            assert!(
                !key.contains(secret.as_str()),
                "a key names a secret: {key}"
            );
            for v in values {
                assert!(
                    !contains(v, secret.as_bytes()),
                    "{key} holds a secret in the clear"
                );
            }
        }
    }
}

fn keys(dump: &[(String, Vec<Vec<u8>>)]) -> Vec<&str> {
    dump.iter().map(|(k, _)| k.as_str()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// The hot path -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_valid_session_makes_no_redis_call() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let fleet = fleet_of_three(&sim, &redis).await;
    let before = redis.command_calls().await;
    assert!(
        before.values().sum::<u64>() > 0,
        "the replicas did use Redis: {before:?}"
    );
    let answers = burst_of_300(&fleet).await;
    assert_all_ok(&answers);
    let after = redis.command_calls().await;
    // What changed, less the `INFO` this test sends and the heartbeat
    // (every 10 s, whatever the traffic).
    let heartbeat = ["info", "zadd", "zremrangebyscore", "zcard"];
    let changed: BTreeMap<&String, u64> = after
        .iter()
        .filter(|(name, _)| !heartbeat.contains(&name.as_str()))
        .map(|(name, n)| (name, n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(
        changed.is_empty(),
        "300 requests made Redis calls: {changed:?}"
    );
}

// 5 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rate_is_enforced_fleet_wide() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let rated = |s: Setup| {
        s.set("upstream", "rate", 100)
            .set("upstream", "burst", 20)
            .set("upstream", "rate_wait", Duration::from_millis(200))
    };
    let fleet = three([
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
    ])
    .await;
    let seen_before = sim.requests_to("/users.json");
    let rate_calls_before = redis.command_calls().await;

    // Three seconds of load, ten requests at a time through each replica.
    let load = Load::start(&proxies(&fleet), 10);
    tokio::time::sleep(Duration::from_secs(3)).await; // the load's length, not a synchronisation
    let (answers, elapsed) = load.stop().await;

    let counts = statuses(&answers);
    let ok = counts.get("200 OK ").copied().unwrap_or(0);
    let limited = counts
        .get("429 Too Many Requests upstream-rate-limited")
        .copied()
        .unwrap_or(0);
    assert_eq!(ok + limited, answers.len(), "only 200 or 429: {counts:?}");
    assert!(limited > 0, "the load exceeded the rate: {counts:?}");
    let refused: u64 = fleet
        .iter()
        .map(|h| h.metric("qbproxy_upstream_rate_limited_total"))
        .sum();
    assert_eq!(refused as usize, limited);

    // At most the burst plus the rate over the time the load ran (one
    // more for the two clocks: Redis's and this process's).
    let upstream = sim.requests_to("/users.json") - seen_before;
    let most = (100.0 * elapsed.as_secs_f64() + 20.0 + 1.0).floor() as usize;
    assert_eq!(upstream, ok, "every 200 went upstream");
    assert!(
        upstream <= most,
        "the upstream saw {upstream} requests in {elapsed:?}; at most {most}"
    );
    assert!(upstream > 20, "turns came after the burst: {upstream}");
    // The fleet's rate, in Redis: one script call per request.
    let after = redis.command_calls().await;
    let scripts = |m: &BTreeMap<String, u64>| {
        m.get("evalsha").copied().unwrap_or(0) + m.get("eval").copied().unwrap_or(0)
    };
    assert!(
        scripts(&after) - scripts(&rate_calls_before) >= answers.len() as u64,
        "{rate_calls_before:?} -> {after:?}"
    );
    for h in &fleet {
        assert_eq!(h.metric("qbproxy_cluster_up"), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_the_rate_is_enforced_locally() {
    let h = setup()
        .set("upstream", "rate", 50)
        .set("upstream", "burst", 10)
        .set("upstream", "rate_wait", Duration::from_millis(100))
        .start()
        .await;
    h.ready().await;
    let seen_before = h.sim.requests_to("/users.json");
    let load = Load::start(&[h.proxy], 10);
    tokio::time::sleep(Duration::from_secs(2)).await; // the load's length
    let (answers, elapsed) = load.stop().await;
    let counts = statuses(&answers);
    let ok = counts.get("200 OK ").copied().unwrap_or(0);
    assert!(
        counts.contains_key("429 Too Many Requests upstream-rate-limited"),
        "{counts:?}"
    );
    let upstream = h.sim.requests_to("/users.json") - seen_before;
    assert_eq!(upstream, ok);
    let most = (50.0 * elapsed.as_secs_f64() + 10.0).floor() as usize;
    assert!(
        upstream <= most,
        "{upstream} in {elapsed:?}; at most {most}"
    );
}

#[tokio::test]
async fn session_creations_count_against_the_rate() {
    // One request every ten seconds, no burst: the first session creation
    // takes the only turn there is.
    let h = setup()
        .set("upstream", "rate", 0.1)
        .set("upstream", "burst", 1)
        .set("upstream", "rate_wait", Duration::from_secs(1))
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.sim.creations(), 1);
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text());
    assert_eq!(a.headers["qbproxy-error"], "upstream-rate-limited");
    assert_eq!(a.headers["retry-after"], "1");
    assert!(
        a.error_message().contains("upstream.rate"),
        "{}",
        a.error_message()
    );
    assert_eq!(h.sim.requests_to("/users.json"), 0, "nothing went upstream");
}

#[tokio::test]
async fn quickblox_429s_are_counted() {
    let h = setup().start().await;
    h.ready().await;
    // A creation refused with 429 backs off and retries, as any failure.
    h.sim.push_fault(Fault::Status(
        429,
        r#"{"errors":["Rate limit for your current plan is exceeded"]}"#.into(),
    ));
    let client = common::client();
    let r = common::send(
        &client,
        h.admin,
        Method::POST,
        "/sessions/demo/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(h.metric("qbproxy_upstream_429_total"), 1);
    // The session held is kept through the failed renewal.
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

// 6 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_fails_no_request_and_restarted_empty_the_fleet_converges() {
    let mut redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let fleet = fleet_of_three(&sim, &redis).await;
    let first = fleet[0].token();
    let load = Load::start(&proxies(&fleet), 4);

    // Redis dies, then the session expires: each replica renews alone.
    redis.kill().await;
    sim.expire_all();
    for h in &fleet {
        session_where(h, |s| s.token().to_str().unwrap() != first).await;
        h.metric_becomes("qbproxy_cluster_up", 0).await;
        assert_eq!(source(h, "demo").await, "local");
        let ready = h.admin_get("/readyz").await;
        assert_eq!(
            ready.status,
            StatusCode::OK,
            "readiness does not need Redis"
        );
    }
    let alone = sim.creations() - 1;
    assert!(
        (1..=3).contains(&alone),
        "at most one creation per replica: {alone}"
    );

    // Redis comes back, empty: one replica publishes its session, the
    // others adopt it, without a request failing.
    redis.restart_empty().await;
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
        session_where(h, |s| s.fleet().is_some()).await;
    }
    assert_eq!(tokens(&fleet).len(), 1, "converged: {:?}", tokens(&fleet));
    for h in &fleet {
        assert_eq!(source(h, "demo").await, "cluster");
    }
    let converged = sim.creations();
    assert_eq!(converged, 1 + alone, "converging created nothing");

    // And the next expiry is one creation again.
    sim.expire_all();
    let (answers, _) = load.stop().await;
    assert_eq!(statuses(&answers).keys().collect::<Vec<_>>(), ["200 OK "]);
    assert_all_ok(&burst_of_300(&fleet).await);
    assert_eq!(sim.creations(), converged + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_requests_at_most_redis_timeout() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    // A rate (far above the load) puts Redis on every request's path;
    // requests time out after 3 s, far above redis_timeout (250 ms).
    let rated = |s: Setup| {
        s.set("upstream", "rate", 100000)
            .set("upstream", "timeout", Duration::from_secs(3))
    };
    let fleet = three([
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
    ])
    .await;
    let first = fleet[0].token();

    redis.pause();
    sim.expire_all();
    let answers = burst_of_300(&fleet).await;
    assert_all_ok(&answers);
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 0).await;
        assert_ne!(h.token(), first);
    }
    assert!(sim.creations() - 1 <= 3, "at most one creation per replica");

    redis.resume();
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
        session_where(h, |s| s.fleet().is_some_and(|g| g.get() > 1)).await;
    }
    assert_eq!(tokens(&fleet).len(), 1, "converged: {:?}", tokens(&fleet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_keeps_its_share_of_the_rate() {
    let mut redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let rated = |s: Setup| {
        s.set("upstream", "rate", 30)
            .set("upstream", "burst", 3)
            .set("upstream", "rate_wait", Duration::from_millis(100))
    };
    let fleet = three([
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
        rated(replica(&sim, &redis)),
    ])
    .await;
    // Each replica counts three alive (heartbeats every 10 s).
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_replicas", 3).await;
    }
    redis.kill().await;
    let seen_before = sim.requests_to("/users.json");
    let load = Load::start(&[fleet[0].proxy], 10);
    tokio::time::sleep(Duration::from_secs(2)).await; // the load's length
    let (answers, elapsed) = load.stop().await;
    fleet[0].metric_becomes("qbproxy_cluster_up", 0).await;
    let ok = statuses(&answers).get("200 OK ").copied().unwrap_or(0);
    let upstream = sim.requests_to("/users.json") - seen_before;
    assert_eq!(upstream, ok);
    // A third of the rate (10/s), a third of the burst (at least 1), and
    // the one request that found Redis gone (it went through the fleet's
    // rate before the fallback).
    let most = (10.0 * elapsed.as_secs_f64() + 1.0 + 1.0).floor() as usize;
    assert!(
        upstream <= most,
        "{upstream} in {elapsed:?}; at most {most}"
    );
}

// 7 -------------------------------------------------------------------------

#[test]
fn a_lock_holder_that_dies_mid_creation_is_taken_over_after_its_lease() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Replica A lives on a runtime of its own, so that it can die: its
    // tasks end mid-await, holding the lock, as a killed process would.
    let a_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let redis = RedisServer::start().await;
        let sim = demo_sim().await;
        // The default lease (3 s): renewed while A lives, out 3 s after A
        // dies. Creation may take up to 10 s, longer than the lease.
        let short = |s: Setup| s.set("quickblox", "session_timeout", Duration::from_secs(10));
        let a = a_rt
            .spawn(short(replica(&sim, &redis)).start())
            .await
            .unwrap();
        a.ready().await;
        let (b, c) = tokio::join!(
            short(replica(&sim, &redis)).start(),
            short(replica(&sim, &redis)).start()
        );
        b.ready().await;
        c.ready().await;
        assert_eq!(sim.creations(), 1);

        // A finds the session expired, takes the lock, and its creation
        // hangs at QuickBlox.
        sim.push_fault(Fault::Hang);
        sim.expire_all();
        let attempts = sim.attempts();
        let _lost = a.spawn_send(Method::GET, "/users.json", &[], Bytes::new());
        sim.wait_until(|s| s.attempts() > attempts).await;
        let dump = redis.dump().await;
        assert!(
            dump.iter().any(|(k, _)| k.starts_with("qbproxy:l:")),
            "A holds the lock: {:?}",
            keys(&dump)
        );

        // A dies, and with it the watchdog renewing its lease.
        a_rt.shutdown_background();
        let died = Instant::now();

        // Readiness, sampled on B and C throughout: it never drops.
        let watching = Arc::new(AtomicBool::new(true));
        let not_ready = Arc::new(std::sync::Mutex::new(Vec::new()));
        let monitor = tokio::spawn({
            let (b, c) = (b.handle.clone(), c.handle.clone());
            let (watching, not_ready) = (watching.clone(), not_ready.clone());
            async move {
                while watching.load(Ordering::SeqCst) {
                    for (name, h) in [("B", &b), ("C", &c)] {
                        if let Err(why) = h.is_ready() {
                            not_ready.lock().unwrap().push(format!("{name}: {why}"));
                        }
                    }
                    // Sampling, not synchronisation: nothing to wait on.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });

        // B and C see the expiry; they wait for A's lease, then one of
        // them renews. No request fails.
        let mut tasks = Vec::new();
        for i in 0..100 {
            let h = if i % 2 == 0 { &b } else { &c };
            tasks.push(h.spawn_send(Method::GET, format!("/users.json?i={i}"), &[], Bytes::new()));
        }
        for t in tasks {
            let answer = t.await.unwrap();
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        }
        let took = died.elapsed();
        watching.store(false, Ordering::SeqCst);
        monitor.await.unwrap();
        assert_eq!(sim.creations(), 2, "one renewal after the lease");
        assert_eq!(b.token(), c.token());
        assert!(
            not_ready.lock().unwrap().is_empty(),
            "{:?}",
            not_ready.lock().unwrap()
        );
        // Released within the lease (3 s) and a creation, not lock_ttl's
        // old 20 s: the requests waited no longer.
        assert!(took < Duration::from_secs(8), "{took:?}");
        drop(a);
    });
}

/// A creation slower than the lock's lease keeps its lock (a watchdog
/// renews the lease while it runs): the other replica waits and adopts,
/// and the fleet makes one session, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_slower_than_the_lease_keeps_its_lock() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let slow = |s: Setup| s.set("cluster", "lock_ttl", Duration::from_millis(900));
    let (a, b) = tokio::join!(
        slow(replica(&sim, &redis)).start(),
        slow(replica(&sim, &redis)).start()
    );
    a.ready().await;
    b.ready().await;
    assert_eq!(sim.creations(), 1);
    // Each creation now takes more than two leases.
    sim.set_creation_delay(Duration::from_millis(2500));
    sim.expire_all();
    let answers: Vec<_> = (0..20)
        .map(|i| {
            let h = if i % 2 == 0 { &a } else { &b };
            h.spawn_send(Method::GET, format!("/users.json?i={i}"), &[], Bytes::new())
        })
        .collect();
    for t in answers {
        let answer = bounded("an answer", t).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(sim.creations(), 2, "one renewal for the fleet");
    assert_eq!(a.token(), b.token());
}

/// A lock holder that lives but whose creation hangs: another replica
/// waits for it no longer than `retry_wait` (1 s here; the hang lasts up to
/// the holder's `session_timeout`, 10 s), then creates a session of its own
/// and answers its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_replica_creates_its_own_after_retry_wait() {
    let redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let patient = |s: Setup| {
        s.set("quickblox", "session_timeout", Duration::from_secs(10))
            .set("quickblox", "retry_wait", Duration::from_secs(1))
    };
    let [a, b] = [0, 1].map(|_| patient(replica(&sim, &redis)));
    let (a, b) = tokio::join!(a.start(), b.start());
    a.ready().await;
    b.ready().await;
    assert_eq!(sim.creations(), 1);

    // A takes the lock; its creation hangs at QuickBlox (A lives on).
    sim.push_fault(Fault::Hang);
    sim.expire_all();
    let attempts = sim.attempts();
    let _held = a.spawn_send(Method::GET, "/users.json", &[], Bytes::new());
    sim.wait_until(|s| s.attempts() > attempts).await;

    let started = Instant::now();
    let answer = b.get("/users.json").await;
    let waited = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(sim.creations(), 2, "B made its own");
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "B answered after {waited:?}: it should wait retry_wait (1 s), not A's hang (10 s)"
    );
}

/// A dropped Redis connection (Redis restarted empty, or `CLIENT KILL` of
/// every client) followed at once by an expiry: each replica's first call
/// fails on its dead connection and is made again on a new one, so the
/// fleet still makes one creation, not one per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_redis_connection_costs_no_extra_creation() {
    let mut redis = RedisServer::start().await;
    let sim = demo_sim().await;
    let fleet = fleet_of_three(&sim, &redis).await;
    assert_eq!(sim.creations(), 1);
    for (round, how) in ["restart empty", "CLIENT KILL"].into_iter().enumerate() {
        match how {
            "restart empty" => redis.restart_empty().await,
            _ => {
                let mut conn = redis.connection().await;
                for kind in ["normal", "pubsub"] {
                    let _: i64 = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg(kind)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            }
        }
        let started = Instant::now();
        sim.expire_all();
        let answers = burst_of_300(&fleet).await;
        assert_all_ok(&answers);
        assert!(started.elapsed() < BOUND);
        assert_eq!(
            sim.creations(),
            2 + round as u64,
            "after {how}: one creation"
        );
        assert_eq!(tokens(&fleet).len(), 1, "after {how}");
    }
    let reconnects: u64 = fleet
        .iter()
        .map(|h| h.metric("qbproxy_cluster_reconnects_total"))
        .sum();
    assert!(reconnects >= 3, "{reconnects}");
}

// 8 -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_credentials_under_one_name_never_share_a_session() {
    let redis = RedisServer::start().await;
    let sim = sim_with_users(2).await;
    let bot = |n: u64| format!("name = \"bot\"\nlogin = \"loadtest-{n}\"\npassword = \"pw-{n}\"\n");
    let a = replica(&sim, &redis).identity(&bot(1)).start().await;
    let b = replica(&sim, &redis).identity(&bot(2)).start().await;
    let c = replica(&sim, &redis).identity(&bot(1)).start().await;
    for h in [&a, &b, &c] {
        h.ready().await;
    }
    assert_eq!(sim.creations(), 2, "one per login");
    assert_eq!(sim.creations_for(100_001), 1);
    assert_eq!(sim.creations_for(100_002), 1);
    let token = |h: &Harness| {
        let s = h.handle.identity("bot").unwrap().current().unwrap();
        (s.user_id(), s.token().to_str().unwrap().to_owned())
    };
    assert_eq!(token(&a), token(&c), "the same login shares");
    assert_ne!(token(&a).1, token(&b).1);
    assert_eq!(token(&b).0, 100_002);
    for (h, user) in [(&a, 100_001), (&b, 100_002), (&c, 100_001)] {
        assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
        assert_eq!(sim.requests().last().unwrap().user_id, user);
    }
}

// Set aside fleet-wide ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refused_on_one_replica_is_set_aside_for_the_fleet_until_forced() {
    let redis = RedisServer::start().await;
    let sim = sim_with_users(2).await;
    let pool = "name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 2\npassword = \"pw-{n}\"\n";
    sim.set_password("loadtest-1", "changed");
    let a = replica(&sim, &redis).pool_table(pool).start().await;
    let b = replica(&sim, &redis).pool_table(pool).start().await;
    a.ready().await;
    b.ready().await;

    // A tries member 1, is refused, serves from member 2.
    assert_eq!(a.get_as("load", "/users.json").await.status, StatusCode::OK);
    let member = a.handle.identity("load-1").unwrap();
    assert!(member.set_aside());
    let attempts = sim.attempts();

    // B never tries member 1, the fleet set it aside; it adopts member 2.
    for _ in 0..4 {
        assert_eq!(b.get_as("load", "/users.json").await.status, StatusCode::OK);
    }
    assert!(b.handle.identity("load-1").unwrap().set_aside());
    assert_eq!(sim.attempts(), attempts, "B tried no creation");
    assert_eq!(sim.creations_for(100_001), 0);
    assert_eq!(sim.creations_for(100_002), 1);

    // The password is fixed; a forced renewal on B clears the mark.
    sim.set_password("loadtest-1", "pw-1");
    let r = common::send(
        &common::client(),
        b.admin,
        Method::POST,
        "/sessions/load-1/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let dump = redis.dump().await;
    assert!(
        !dump.iter().any(|(k, _)| k.starts_with("qbproxy:a:")),
        "the mark is gone: {:?}",
        keys(&dump)
    );
    assert_eq!(sim.creations_for(100_001), 1);
}

// Secrets -----------------------------------------------------------------------

#[tokio::test]
async fn the_redis_password_never_shows() {
    let logs = common::capture_logs();
    // Nothing listens on port 9 of loopback: Redis is down from the start.
    let h = setup()
        .set(
            "cluster",
            "redis_url",
            "redis://:hunter2-redis-pw@127.0.0.1:9/0",
        )
        .start()
        .await;
    h.ready().await;
    h.metric_becomes("qbproxy_cluster_up", 0).await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(source(&h, "demo").await, "local");
    assert!(logs.has_line(&["Redis is unavailable"]), "{}", logs.text());
    assert!(
        logs.has_line(&["shared through Redis", "redis=127.0.0.1:9"]),
        "the start names the server: {}",
        logs.text()
    );
    let everything = format!(
        "{}{}{}",
        logs.text(),
        h.handle.metrics_text(),
        h.admin_get("/sessions").await.text()
    );
    assert!(!everything.contains("hunter2-redis-pw"));
}
