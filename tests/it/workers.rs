//! Proxy workers (`--threads`, `worker.rs`): one current-thread runtime per
//! worker, each accepting on its own `SO_REUSEPORT` listener. Each test
//! opens 24 connections: the kernel spreads them by a hash of their ports,
//! so the chance that one worker gets none is 2^-23.

use crate::common;

use std::path::Path;

use crate::common::{bounded, raw, setup};
use qbproxy_sim::{Sim, SimConfig};

const CONNECTIONS: usize = 24;

/// GET `path` on a connection of its own; the status line's code.
async fn get_alone(h: &common::Harness, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: qbproxy\r\nConnection: close\r\n\r\n");
    let answer = bounded("an answer", raw(h.proxy, request.as_bytes())).await;
    answer.split(' ').nth(1).unwrap_or("").to_owned()
}

fn served_by(h: &common::Harness, worker: usize) -> u64 {
    h.metric(&format!(
        "qbproxy_worker_requests_total{{worker=\"{worker}\"}}"
    ))
}

/// Every worker accepts connections and serves them: requests from
/// connections spread over both reach the upstream with the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_its_share_of_connections() {
    let h = setup().start_workers(2).await;
    h.ready().await;
    let calls = (0..CONNECTIONS).map(|i| {
        let path = format!("/data/Spread/{i}.json");
        let h = &h;
        async move { (get_alone(h, &path).await, path) }
    });
    for (code, path) in futures_util::future::join_all(calls).await {
        assert_eq!(code, "200", "{path}");
    }
    let (first, second) = (served_by(&h, 0), served_by(&h, 1));
    assert_eq!(first + second, CONNECTIONS as u64);
    assert!(
        first > 0 && second > 0,
        "worker 0 served {first}, worker 1 {second}"
    );
    // Each reached QuickBlox with the session qbproxy holds.
    let received = h.sim.requests();
    for i in 0..CONNECTIONS {
        let path = format!("/data/Spread/{i}.json");
        let r = received
            .iter()
            .find(|r| r.path_and_query == path)
            .expect(&path);
        assert!(r.headers.contains_key("qb-token"), "{path}");
    }
}

/// A reload that moves the upstream rebuilds every worker's upstream
/// client: afterwards, connections on either worker reach the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_worker() {
    let h = setup().start_workers(2).await;
    h.ready().await;
    assert_eq!(get_alone(&h, "/users.json").await, "200");
    let before = (served_by(&h, 0), served_by(&h, 1));

    let moved = Sim::start(SimConfig::demo()).await.unwrap();
    let text = setup().config_text(&moved);
    let summary = h
        .handle
        .reload(qbproxy::Config::from_toml(&text, Path::new("t.toml")).unwrap())
        .await
        .unwrap();
    assert!(!summary.client_kept);
    let old_seen = h.sim.requests_to("/data/After");
    let calls = (0..CONNECTIONS).map(|i| {
        let h = &h;
        async move { get_alone(h, &format!("/data/After/{i}.json")).await }
    });
    for code in futures_util::future::join_all(calls).await {
        assert_eq!(code, "200");
    }
    assert_eq!(moved.requests_to("/data/After"), CONNECTIONS);
    assert_eq!(h.sim.requests_to("/data/After"), old_seen);
    let after = (served_by(&h, 0) - before.0, served_by(&h, 1) - before.1);
    assert!(
        after.0 > 0 && after.1 > 0,
        "served after the reload: {after:?}"
    );
}

/// A shutdown drains every worker: requests held upstream on connections
/// of both are answered before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_drains_every_worker() {
    let mut h = setup().start_workers(2).await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let proxy = h.proxy;
    let held: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let request = format!(
                "GET /data/Slow/{i}.json HTTP/1.1\r\nHost: qbproxy\r\nConnection: close\r\n\r\n"
            );
            tokio::spawn(async move { raw(proxy, request.as_bytes()).await })
        })
        .collect();
    bounded(
        "every request to reach QuickBlox",
        h.sim
            .wait_until(|s| s.requests_to("/data/Slow") == CONNECTIONS),
    )
    .await;
    assert!(served_by(&h, 0) > 0 && served_by(&h, 1) > 0);

    let run = h.take_task();
    h.trigger_shutdown();
    bounded("every listener to close", async {
        while tokio::net::TcpStream::connect(proxy).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        !run.is_finished(),
        "run() waits for every worker's requests"
    );
    gate.add_permits(CONNECTIONS);
    for answer in held {
        let answer = bounded("a held answer", answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    bounded("run() to return after the drains", run)
        .await
        .unwrap();
}

/// The port taken by another process, even one that set `SO_REUSEPORT` as
/// a second qbproxy would: binding the workers fails ("address in use")
/// instead of splitting the port's connections with it.
#[tokio::test]
async fn workers_refuse_a_port_another_process_shares_by_reuseport() {
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.set_reuseport(true).unwrap();
    other.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let other = other.listen(16).unwrap();
    let taken = other.local_addr().unwrap();
    let e = qbproxy::process::bind(taken, 2).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let e = qbproxy::process::bind(taken, 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    // A free port: every listener on the same one.
    let (first, more) = qbproxy::process::bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    let port = first.local_addr().unwrap().port();
    assert_eq!(more.len(), 2);
    assert!(more.iter().all(|l| l.local_addr().unwrap().port() == port));
}
