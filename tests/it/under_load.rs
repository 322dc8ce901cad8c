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
                let a = common::send(
                    &client,
                    proxy,
                    method,
                    &format!("/data/Note.json?n={n}"),
                    &[],
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
