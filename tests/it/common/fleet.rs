//! Helpers for tests that run several replicas: load through them, bursts,
//! and what they answered.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{bounded, Harness, Setup};

/// Three replicas started together, each ready.
pub async fn three(setups: [Setup; 3]) -> [Harness; 3] {
    let [a, b, c] = setups;
    let (a, b, c) = tokio::join!(a.start(), b.start(), c.start());
    let fleet = [a, b, c];
    for h in &fleet {
        h.ready().await;
    }
    fleet
}

pub fn tokens(fleet: &[Harness]) -> HashSet<String> {
    fleet.iter().map(Harness::token).collect()
}

/// 300 requests at once, 100 through each replica.
pub async fn burst_of_300(fleet: &[Harness]) -> Vec<super::Answer> {
    let mut tasks = Vec::new();
    for i in 0..300 {
        let h = &fleet[i % fleet.len()];
        tasks.push(h.spawn_send(Method::GET, format!("/users.json?i={i}"), &[], Bytes::new()));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

pub fn assert_all_ok(answers: &[super::Answer]) {
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK)
        .map(|a| format!("{} {}", a.status, a.text()))
        .collect();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
}

/// Requests sent without pause through the given proxies by `workers`
/// tasks each, until stopped; what each got back.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<(StatusCode, String)>>>,
    started: Instant,
}

impl Load {
    pub fn start(proxies: &[SocketAddr], workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (p, proxy) in proxies.iter().enumerate() {
            for w in 0..workers {
                let (stop, proxy) = (stop.clone(), *proxy);
                tasks.push(tokio::spawn(async move {
                    let client = super::client();
                    let mut seen = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let a = super::send(
                            &client,
                            proxy,
                            Method::GET,
                            &format!("/users.json?p={p}&w={w}&i={i}"),
                            &[],
                            Bytes::new(),
                        )
                        .await;
                        let error = a
                            .headers
                            .get("qbproxy-error")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        seen.push((a.status, error));
                        i += 1;
                    }
                    seen
                }));
            }
        }
        Load {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    /// Stops the load; every answer, and how long it ran until the last.
    pub async fn stop(self) -> (Vec<(StatusCode, String)>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(bounded("the load to stop", t).await.unwrap());
        }
        (all, self.started.elapsed())
    }
}

pub fn statuses(answers: &[(StatusCode, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (status, error) in answers {
        *counts.entry(format!("{status} {error}")).or_default() += 1;
    }
    counts
}

pub fn proxies(fleet: &[Harness]) -> Vec<SocketAddr> {
    fleet.iter().map(|h| h.proxy).collect()
}
