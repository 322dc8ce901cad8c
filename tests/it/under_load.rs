//! Renewal under load (the short version of bench/'s run): many concurrent
//! clients, every session expired several times mid-run. Zero failed
//! requests, one session creation per expiry.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::setup;
use bytes::Bytes;
use http::{Method, StatusCode};

const WORKERS: usize = 32;
const TOTAL: usize = 3000;
const EXPIRIES: usize = 5;

/// Runs TOTAL requests over WORKERS connections; after every
/// TOTAL/(EXPIRIES+1) completed requests, every session is expired.
/// Asserts that no client request failed.
async fn run(h: &common::Harness) {
    run_as(h, None).await
}

/// [`run`] through the pool `pool`: each worker is a client of its own
/// (`QBProxy-Client: vu-N`), as a load test's virtual users are.
async fn run_as(h: &common::Harness, pool: Option<&'static str>) {
    let done = Arc::new(AtomicUsize::new(0));
    let step = TOTAL / (EXPIRIES + 1);
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (proxy, sim, done) = (h.proxy, h.sim.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = common::client();
            let mut failures = Vec::new();
            loop {
                let n = done.fetch_add(1, Ordering::SeqCst);
                if n >= TOTAL {
                    return failures;
                }
                let (method, body) = if n % 3 == 0 {
                    (
                        Method::POST,
                        Bytes::from(format!("{{\"worker\":{w},\"n\":{n}}}")),
                    )
                } else {
                    (Method::GET, Bytes::new())
                };
                let vu = format!("vu-{w}");
                let headers: &[(&str, &str)] = match pool {
                    Some(pool) => &[("QBProxy-Identity", pool), ("QBProxy-Client", vu.as_str())],
                    None => &[],
                };
                let a = common::send(
                    &client,
                    proxy,
                    method,
                    &format!("/data/Note.json?n={n}"),
                    headers,
                    body,
                )
                .await;
                if a.status != StatusCode::OK {
                    failures.push(format!("request {n}: {} {}", a.status, a.text()));
                }
                if (n + 1) % step == 0 && (n + 1) / step <= EXPIRIES {
                    sim.expire_all();
                }
            }
        }));
    }
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_expiry_under_load_fails_no_request_and_renews_once_each_time() {
    let h = setup().start().await;
    h.ready().await;
    run(&h).await;
    assert_eq!(
        h.sim.creations(),
        1 + EXPIRIES as u64,
        "one creation per expiry"
    );
    assert_eq!(
        h.sim.requests().len(),
        TOTAL,
        "every request accepted exactly once"
    );
    assert!(h.sim.refusals() >= EXPIRIES as u64, "the expiries were hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failed_creations_before_each_success_under_load_fail_nothing() {
    let h = setup().start().await;
    h.ready().await;
    h.sim.set_fail_before_success(3);
    run(&h).await;
    assert_eq!(
        h.sim.creations(),
        1 + EXPIRIES as u64,
        "one creation per expiry"
    );
    assert_eq!(
        h.sim.attempts(),
        1 + 4 * EXPIRIES as u64,
        "three failures and one success per expiry, however many requests waited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_session_creation_under_load_still_fails_nothing() {
    let h = setup().start().await;
    h.ready().await;
    h.sim.set_creation_delay(Duration::from_millis(200));
    run(&h).await;
    assert_eq!(h.sim.creations(), 1 + EXPIRIES as u64);
}

/// A pool under slow and failing session creation (every success preceded
/// by two 500s, each attempt 200 ms), every session expired five times
/// under load: no request fails, replays included. A request whose member
/// cannot renew moves on to a member that can serve it, sticky clients
/// too.
async fn pool_under_failing_creation(strategy: &str) {
    let sim = qbproxy_sim::Sim::start(qbproxy_sim::SimConfig::demo().with_users(
        "loadtest-{n}",
        "pw-{n}",
        1..=8,
    ))
    .await
    .unwrap();
    let h = setup()
        .sim(sim)
        .pool_table(&format!(
            "name = \"load\"\nlogin = \"loadtest-{{n}}\"\npassword = \"pw-{{n}}\"\ncount = 8\n\
             strategy = \"{strategy}\"\n"
        ))
        .start()
        .await;
    h.ready().await;
    h.sim.set_creation_delay(Duration::from_millis(200));
    h.sim.set_fail_before_success(2);
    run_as(&h, Some("load")).await;
    assert!(h.sim.refusals() >= EXPIRIES as u64, "the expiries were hit");
    let members: std::collections::HashSet<u64> =
        h.sim.requests().iter().map(|r| r.user_id).collect();
    assert!(
        members.len() > 1 && !members.contains(&1001),
        "the pool served: {members:?}"
    );
    assert!(
        h.handle
            .metrics_text()
            .lines()
            .any(|l| l.starts_with("qbproxy_replays_total") && !l.ends_with(" 0")),
        "requests were replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_robin_pool_under_failing_creation_fails_no_request() {
    pool_under_failing_creation("round_robin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_pool_under_failing_creation_fails_no_request() {
    pool_under_failing_creation("sticky").await;
}
