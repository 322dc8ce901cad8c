//! Pools: round robin, sticky, lazy throttled creation, set-aside members,
//! max_in_flight.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{bounded, setup};
use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy_sim::{Fault, Sim, SimConfig};

const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";

async fn sim_with_users(n: u64) -> Sim {
    Sim::start(SimConfig::demo().with_users("loadtest-{n}", "pw-{n}", 1..=n))
        .await
        .unwrap()
}

fn pool(extra: &str) -> String {
    format!(
        "name = \"load\"\nlogin = \"loadtest-{{n}}\"\ncount = 50\npassword = \"pw-{{n}}\"\n{extra}"
    )
}

/// Users the simulator saw for accepted requests, by count.
fn users(sim: &Sim) -> HashMap<u64, usize> {
    let mut seen = HashMap::new();
    for r in sim.requests() {
        *seen.entry(r.user_id).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn round_robin_spreads_over_every_member_and_creates_lazily() {
    let sim = sim_with_users(50).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .pool_table(&pool(""))
        .start()
        .await;
    h.ready().await;
    // Only the standalone identity has a session; members are idle.
    assert_eq!(h.sim.creations(), 1);
    let sessions = h.admin_get("/sessions").await.json();
    let idle = sessions["identities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "idle")
        .count();
    assert_eq!(idle, 50);

    for i in 0..100 {
        let a = h.get_as("load", &format!("/users.json?i={i}")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    let seen = users(&h.sim);
    assert_eq!(seen.len(), 50, "every member served");
    assert!(seen.values().all(|n| *n == 2), "evenly: {seen:?}");
    assert!(seen.keys().all(|u| (100_001..=100_050).contains(u)));
    // One session per member, created on first use.
    assert_eq!(h.sim.creations(), 51);
    for n in 1..=50 {
        assert_eq!(h.sim.creations_for(100_000 + n), 1);
    }
    let m = h.handle.metrics_text();
    assert!(
        m.contains("qbproxy_requests_total{code=\"200\",identity=\"load-7\",pool=\"load\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_creation_never_exceeds_create_concurrency() {
    let sim = sim_with_users(50).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .pool_table(&pool("create_concurrency = 3\n"))
        .start()
        .await;
    h.ready().await;
    // Slow creations, so that many would overlap without the limit.
    h.sim.set_creation_delay(Duration::from_millis(30));
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(h.spawn_send(
            Method::GET,
            format!("/data/X.json?{i}"),
            &[("QBProxy-Identity", "load")],
            "",
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(h.sim.creations(), 51);
    assert_eq!(
        h.sim.max_concurrent_creations(),
        3,
        "the limit was reached and never passed"
    );
}

#[tokio::test]
async fn sticky_clients_keep_their_member() {
    let sim = sim_with_users(50).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .pool_table(&pool("strategy = \"sticky\"\npath_prefix = \"/load\"\n"))
        .start()
        .await;
    h.ready().await;
    let mut by_client: HashMap<String, HashSet<u64>> = HashMap::new();
    for round in 0..3 {
        for vu in 0..20 {
            let client = format!("vu-{vu}");
            let a = h
                .send(
                    Method::GET,
                    &format!("/load/users.json?r={round}"),
                    &[("QBProxy-Client", &client)],
                    Bytes::new(),
                )
                .await;
            assert_eq!(a.status, StatusCode::OK);
            by_client
                .entry(client)
                .or_default()
                .insert(a.json()["echo"]["user_id"].as_u64().unwrap());
        }
    }
    assert!(
        by_client.values().all(|users| users.len() == 1),
        "{by_client:?}"
    );
    let distinct: HashSet<u64> = by_client.values().flatten().copied().collect();
    assert!(
        distinct.len() > 5,
        "clients spread over members: {distinct:?}"
    );
    // The prefix was stripped and the client header not forwarded.
    let r = h.sim.requests();
    assert!(r
        .iter()
        .all(|r| r.path_and_query.starts_with("/users.json?r=")));
    assert!(r.iter().all(|r| !r.headers.contains_key("qbproxy-client")));
}

#[tokio::test]
async fn a_member_with_refused_credentials_is_set_aside_and_the_pool_serves_on() {
    let logs = common::capture_logs();
    let sim = sim_with_users(3).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .identity("name = \"good1\"\nlogin = \"loadtest-1\"\npassword = \"pw-1\"\n")
        .identity("name = \"bad\"\nlogin = \"loadtest-2\"\npassword = \"wrong\"\n")
        .identity("name = \"good2\"\nlogin = \"loadtest-3\"\npassword = \"pw-3\"\n")
        .pool_table("name = \"load\"\nidentities = [\"good1\", \"bad\", \"good2\"]\n")
        .start()
        .await;
    h.ready().await;
    for i in 0..30 {
        let a = h.get_as("load", &format!("/users.json?{i}")).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
    }
    let seen = users(&h.sim);
    assert_eq!(
        seen.keys().copied().collect::<HashSet<_>>(),
        HashSet::from([100_001, 100_003])
    );
    // One attempt for the bad member, never retried: demo + 3 members.
    assert_eq!(h.sim.attempts(), 4);
    assert!(h.handle.identity("bad").unwrap().set_aside());
    let m = h.handle.metrics_text();
    assert!(
        m.contains("qbproxy_session_set_aside{identity=\"bad\",pool=\"load\"} 1"),
        "{m}"
    );
    assert!(
        logs.has_line(&["identity=\"bad\"", "pool=\"load\"", "identity set aside"]),
        "{}",
        logs.text()
    );
    let s = h.admin_get("/sessions").await.json();
    let bad = s["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "bad")
        .unwrap()
        .clone();
    assert_eq!(bad["state"], "set_aside");
}

#[tokio::test]
async fn every_member_set_aside_gives_a_clear_503() {
    let sim = sim_with_users(2).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .pool_table("name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 2\npassword = \"wrong\"\n")
        .start()
        .await;
    h.ready().await;
    let a = h.get_as("load", "/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["qbproxy-error"], "pool-unavailable");
    assert!(
        a.error_message()
            .contains("every member of pool \"load\" (2) is set aside"),
        "{}",
        a.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_spreads_load_and_busy_pools_answer_503() {
    let sim = sim_with_users(2).await;
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .pool_table("name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 2\npassword = \"pw-{n}\"\nmax_in_flight = 1\n")
        .set("upstream", "timeout", Duration::from_secs(1))
        .start()
        .await;
    h.ready().await;
    let spawn = |path: &str| h.spawn_send(Method::GET, path, &[("QBProxy-Identity", "load")], "");

    // Two requests held upstream at once went to different members, although
    // round robin would have allowed the same one twice after a skip.
    let gate = h.sim.gate("/data/Slow");
    let first = spawn("/data/Slow.json?1");
    let second = spawn("/data/Slow.json?2");
    bounded(
        "both held upstream",
        h.sim.wait_until(|s| s.requests_to("/data/Slow") == 2),
    )
    .await;
    let held: HashSet<u64> = h.sim.requests().iter().map(|r| r.user_id).collect();
    assert_eq!(held.len(), 2, "one request per member");
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(second.await.unwrap().status, StatusCode::OK);

    // Every member busy (held here through the pool's own API): a request
    // waits until its deadline, then gets 503.
    let pool = h.handle.pool("load").unwrap().clone();
    let far = tokio::time::Instant::now() + Duration::from_secs(5);
    let a = pool.acquire(None, far).await.unwrap();
    let b = pool.acquire(None, far).await.unwrap();
    assert_ne!(a.identity().name(), b.identity().name());
    let busy = h.get_as("load", "/users.json").await;
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.headers["qbproxy-error"], "pool-busy");
    assert_eq!(
        busy.error_message(),
        "qbproxy: all 2 members of pool \"load\" are busy"
    );

    // A waiting request takes the first member freed.
    let waiting = spawn("/users.json?waiting");
    let freed = b.identity().name().to_owned();
    drop(b);
    let w = waiting.await.unwrap();
    assert_eq!(w.status, StatusCode::OK);
    let user = h
        .handle
        .identity(&freed)
        .unwrap()
        .current()
        .unwrap()
        .user_id();
    assert_eq!(w.json()["echo"]["user_id"], user);
    drop(a);
}

/// A pool of three listed members; "flaky" is loadtest-2 (user 100,002).
async fn pool_with_a_flaky_member(retry: Duration) -> common::Harness {
    let h = setup()
        .sim(sim_with_users(3).await)
        .identity(DEMO)
        .identity("name = \"good1\"\nlogin = \"loadtest-1\"\npassword = \"pw-1\"\n")
        .identity("name = \"flaky\"\nlogin = \"loadtest-2\"\npassword = \"pw-2\"\n")
        .identity("name = \"good2\"\nlogin = \"loadtest-3\"\npassword = \"pw-3\"\n")
        .pool_table("name = \"load\"\nidentities = [\"good1\", \"flaky\", \"good2\"]\n")
        .set("quickblox", "retry_initial", retry)
        .set("quickblox", "retry_max", retry)
        .start()
        .await;
    h.ready().await;
    let a = h.get_as("load", "/users.json?i=0").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // The next member is "flaky"; its first creation fails.
    h.sim
        .push_fault(Fault::Status(500, "{\"errors\":[\"boom\"]}".into()));
    h
}

/// The user the simulator saw for the request with this query.
fn served_by(sim: &Sim, query: &str) -> u64 {
    let path = format!("/users.json?{query}");
    let r = sim.requests();
    r.iter().find(|r| r.path_and_query == path).unwrap().user_id
}

#[tokio::test]
async fn a_failing_member_is_passed_over_while_the_others_serve() {
    // No retry within the test: "flaky" stays failing throughout.
    let h = pool_with_a_flaky_member(Duration::from_secs(3600)).await;
    for i in 1..=30 {
        let a = h.get_as("load", &format!("/users.json?i={i}")).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
    }
    // The request that met the failure moved on; no later one chose it.
    let seen = users(&h.sim);
    assert_eq!(
        seen.keys().copied().collect::<HashSet<_>>(),
        HashSet::from([100_001, 100_003])
    );
    assert!(h.handle.identity("flaky").unwrap().failing());
    // demo, good1, flaky's one failed attempt, good2: nothing more.
    assert_eq!(h.sim.attempts(), 4);
    let s = h.admin_get("/sessions").await.json();
    let flaky = s["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "flaky")
        .unwrap()
        .clone();
    assert_eq!(flaky["state"], "failing");
}

#[tokio::test]
async fn a_request_on_a_failing_member_moves_on_rather_than_wait_for_its_retry() {
    // "flaky" retries after 100 ms and then succeeds, well within retry_wait
    // (10 s): a lone identity's request would wait for that retry.
    let h = pool_with_a_flaky_member(Duration::from_millis(100)).await;
    let a = h.get_as("load", "/users.json?i=1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(served_by(&h.sim, "i=1"), 100_003);
    // "flaky" recovers on its own and serves again.
    let flaky = h.handle.identity("flaky").unwrap();
    bounded("flaky's retry", flaky.ready()).await;
    assert!(!flaky.failing());
    for i in 2..=7 {
        let a = h.get_as("load", &format!("/users.json?i={i}")).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
    }
    assert!(users(&h.sim).contains_key(&100_002));
}

#[tokio::test]
async fn when_every_member_is_failing_the_request_gets_the_failure() {
    let h = setup()
        .sim(sim_with_users(2).await)
        .identity(DEMO)
        .pool_table("name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 2\npassword = \"pw-{n}\"\n")
        .set("quickblox", "retry_initial", Duration::from_secs(3600))
        .set("quickblox", "retry_max", Duration::from_secs(3600))
        .start()
        .await;
    h.ready().await;
    for _ in 0..2 {
        h.sim
            .push_fault(Fault::Status(500, "{\"errors\":[\"boom\"]}".into()));
    }
    // The first member fails, the request moves to the second, which fails
    // too: nothing is left to move to.
    let a = h.get_as("load", "/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert!(a.error_message().contains("boom"), "{}", a.text());
    // demo, then one attempt per member; no loop.
    assert_eq!(h.sim.attempts(), 3);
    // Both failing: the next request goes to one of them (and gets its
    // failure) rather than waiting for a member that may serve.
    let b = h.get_as("load", "/users.json").await;
    assert_eq!(b.status, StatusCode::SERVICE_UNAVAILABLE, "{}", b.text());
    assert_eq!(h.sim.attempts(), 3);
}

/// A pool whose login is numbered but whose password is not: member 1
/// logs in, the others are refused. `check` warns; the probe tries every
/// member of a small pool (the first and the last of a large one) and
/// says which fail; at run time the pool serves through member 1 while
/// `/readyz` stays 200, and `/sessions` and a metric count the members set
/// aside.
#[tokio::test]
async fn a_pool_whose_password_lacks_n_is_seen_whole() {
    let sim = sim_with_users(5).await;
    let setup = setup()
        .identity(DEMO)
        .pool_table("name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 5\npassword = \"pw-1\"\n");
    let text = setup.config_text(&sim);
    let config = qbproxy::Config::from_toml(&text, std::path::Path::new("pool.toml")).unwrap();
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("the password has no {n}")),
        "{:?}",
        config.warnings
    );
    let mut said = Vec::new();
    let probed = qbproxy::process::probe(&config, |p| said.push(p.to_string()))
        .await
        .unwrap();
    assert_eq!(probed.len(), 6, "demo and every member: {said:?}");
    let failed: Vec<&String> = said.iter().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed.len(), 4, "{said:?}");
    assert!(
        said.iter()
            .any(|l| l.starts_with("load (member load-1): ok")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|l| l.starts_with("load (member load-5): FAILED")),
        "{said:?}"
    );

    let h = setup.sim(sim).start().await;
    h.ready().await;
    for i in 0..20 {
        let a = h.get_as("load", &format!("/users.json?{i}")).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
    }
    // Every member tried once; the four refused ones are set aside.
    bounded(
        "four members set aside",
        h.metric_becomes("qbproxy_pool_members_set_aside{pool=\"load\"}", 4),
    )
    .await;
    assert_eq!(h.admin_get("/readyz").await.status, StatusCode::OK);
    let pools = h.admin_get("/sessions").await.json()["pools"].clone();
    assert_eq!(
        pools,
        serde_json::json!([{"name": "load", "members": 5, "ready": 1, "set_aside": 4}])
    );
}

/// Every session expires while one member cannot renew (its creations
/// fail, 500): the requests refused on that member are replayed through
/// another member, at once, not answered 503 after `retry_wait`, for
/// round-robin and sticky clients alike.
#[tokio::test]
async fn a_replay_moves_to_another_member_when_its_own_cannot_renew() {
    for strategy in ["round_robin", "sticky"] {
        let sim = sim_with_users(4).await;
        let h = setup()
            .sim(sim)
            .set("quickblox", "retry_wait", Duration::from_secs(5))
            .pool_table(&format!(
                "name = \"load\"\nlogin = \"loadtest-{{n}}\"\npassword = \"pw-{{n}}\"\ncount = 4\n\
                 strategy = \"{strategy}\"\n"
            ))
            .start()
            .await;
        h.ready().await;
        let clients: Vec<String> = (0..16).map(|i| format!("vu-{i}")).collect();
        let (h, clients) = (&h, &clients);
        let call = |i: usize| {
            let vu = clients[i].as_str();
            async move {
                let headers = [("QBProxy-Identity", "load"), ("QBProxy-Client", vu)];
                h.send(Method::GET, &format!("/users.json?{i}"), &headers, "")
                    .await
            }
        };
        // Every member holds a session.
        for i in 0..16 {
            assert_eq!(call(i).await.status, StatusCode::OK, "{strategy}");
        }
        assert_eq!(users(&h.sim).len(), 4, "{strategy}: every member served");
        let served_by_1 = "qbproxy_requests_total{identity=\"load-1\",pool=\"load\"}";
        let before = h.metric(served_by_1);
        h.sim.fail_user("loadtest-1");
        h.sim.expire_all();
        let started = tokio::time::Instant::now();
        let answers = futures_util::future::join_all((0..16).map(call)).await;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(
                a.status,
                StatusCode::OK,
                "{strategy}, request {i}: {}",
                a.text()
            );
        }
        // Nobody waited through the failing member's retries.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{strategy}: {:?}",
            started.elapsed()
        );
        let replayed_on_member_1 = h
            .sim
            .requests()
            .iter()
            .rev()
            .take(16)
            .filter(|r| r.user_id == 100_001)
            .count();
        assert_eq!(replayed_on_member_1, 0, "{strategy}");
        // Counted under the member that answered, not the one that failed.
        assert_eq!(h.metric(served_by_1), before, "{strategy}");
    }
}

/// Every session expired at once, and three session creations fail before
/// each success: a request's member cannot renew at first, so its replay
/// moves on, and the members it moves to had lapsed too and cannot renew
/// at first either. Its last replay waits
/// for its member's renewal rather than move into another lapsed session,
/// so the request is answered, not refused with QuickBlox's 401.
#[tokio::test]
async fn a_last_replay_waits_for_a_renewal_rather_than_meet_another_lapsed_session() {
    let sim = sim_with_users(6).await;
    let h = setup()
        .sim(sim)
        .pool_table(
            "name = \"load\"\nlogin = \"loadtest-{n}\"\npassword = \"pw-{n}\"\ncount = 6\n\
             strategy = \"round_robin\"\n",
        )
        .start()
        .await;
    h.ready().await;
    let headers = [("QBProxy-Identity", "load")];
    for i in 0..6 {
        let a = h
            .send(Method::GET, &format!("/users.json?{i}"), &headers, "")
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    assert_eq!(users(&h.sim).len(), 6, "every member holds a session");
    h.sim.expire_all();
    h.sim.set_fail_before_success(3);
    let a = h.send(Method::GET, "/users.json?after", &headers, "").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // It was replayed as often as a request may be, the last time on a
    // renewed session.
    let replays: u64 = h
        .handle
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("qbproxy_replays_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(replays, 3, "{}", h.handle.metrics_text());
}
