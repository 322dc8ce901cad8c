//! Start-up, admin endpoints, graceful shutdown, and what logs may show.

use crate::common;
use std::time::Duration;

use crate::common::{bounded, setup};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let h = setup().start().await;
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
    h.ready().await;
    assert_eq!(h.admin_get("/readyz").await.status, StatusCode::OK);
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);

    let m = h.admin_get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = m.text();
    for family in [
        "qbproxy_requests_total{code=\"200\",identity=\"demo\",pool=\"\"} 1",
        "qbproxy_session_renewals_total{identity=\"demo\",pool=\"\",reason=\"startup\"} 1",
        "qbproxy_session_renewals_total{identity=\"demo\",pool=\"\",reason=\"expired\"} 1",
        "qbproxy_replays_total{identity=\"demo\",pool=\"\"} 1",
        "qbproxy_upstream_duration_seconds_bucket",
        "qbproxy_session_up{identity=\"demo\",pool=\"\"} 1",
    ] {
        assert!(text.contains(family), "missing {family} in\n{text}");
    }
    assert!(
        text.contains("# TYPE qbproxy_session_failures_total counter"),
        "{text}"
    );
    assert_eq!(h.admin_get("/nope").await.status, StatusCode::NOT_FOUND);

    // The proxy port does not serve admin endpoints: /metrics goes upstream.
    let a = h.get("/metrics").await;
    assert_eq!(a.json()["echo"]["path"], "/metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_lets_the_request_in_flight_finish() {
    let mut h = setup().start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let proxy = h.proxy;
    let in_flight = h.spawn_send(Method::GET, "/data/Slow.json", &[], "");
    bounded(
        "the request to reach QuickBlox",
        h.sim.wait_until(|s| s.requests_to("/data/Slow") == 1),
    )
    .await;

    let run = h.take_task();
    h.trigger_shutdown();
    // New connections are refused while the request is still held upstream.
    bounded("the listener to close", async {
        while TcpStream::connect(proxy).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!run.is_finished(), "run() waits for the request in flight");

    gate.add_permits(1);
    let a = bounded("the in-flight response", in_flight).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["echo"]["path"], "/data/Slow.json");
    bounded("run() to return after the drain", run)
        .await
        .unwrap();
}

/// A shutdown closes the connections kept alive with nothing in flight at
/// once (HTTP/1.1 by closing, HTTP/2 with GOAWAY), rather than leaving them
/// to hold the drain until the grace period ends. The grace and every
/// connection deadline are far past the test's bound, so neither the end of
/// the grace nor a deadline's periodic check can stand in for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let mut h = setup()
        .set("listen", "shutdown_grace", Duration::from_secs(600))
        .set("limits", "header_read_timeout", Duration::from_secs(600))
        .set("limits", "keepalive_timeout", Duration::from_secs(600))
        .set("limits", "send_timeout", Duration::from_secs(600))
        .start()
        .await;
    h.ready().await;

    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(h1_conn);
    let req = Request::get(format!("http://{}/users.json", h.proxy))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = bounded("the HTTP/1.1 answer", h1.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (h2, h2_conn) = h2::client::handshake(tcp).await.unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let mut h2 = bounded("the h2 stream", h2.ready()).await.unwrap();
    let req = Request::get(format!("http://{}/users.json", h.proxy))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = bounded("the HTTP/2 answer", resp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    while let Some(chunk) = bounded("the HTTP/2 body", body.data()).await {
        chunk.unwrap();
    }
    assert!(!h1_conn.is_finished() && !h2_conn.is_finished());

    let run = h.take_task();
    h.trigger_shutdown();
    bounded("the idle HTTP/1.1 connection to be closed", h1_conn)
        .await
        .unwrap()
        .unwrap();
    bounded("the idle HTTP/2 connection to be closed", h2_conn)
        .await
        .unwrap()
        .unwrap();
    bounded("run() to return", run).await.unwrap();
}

/// A shutdown first answers `/readyz` with 503 for `listen.shutdown_delay`
/// while the proxy still serves (so load balancers stop sending); then
/// stops accepting; requests in flight finish, an HTTP/1.1 connection's
/// with `Connection: close`, an HTTP/2 connection's after a GOAWAY; and
/// the admin listener answers 503, not "connection refused", until the
/// proxy has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_says_not_ready_first_then_drains_busy_connections() {
    let mut h = setup()
        .set("listen", "shutdown_delay", Duration::from_secs(1))
        .start()
        .await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(h1_conn);
    let req = Request::get(format!("http://{}/data/Slow1.json", h.proxy))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let h1_answer = tokio::spawn(h1.send_request(req));
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (h2, h2_conn) = h2::client::handshake(tcp).await.unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let mut h2 = bounded("the h2 stream", h2.ready()).await.unwrap();
    let req = Request::get(format!("http://{}/data/Slow2.json", h.proxy))
        .body(())
        .unwrap();
    let (h2_answer, _) = h2.send_request(req, true).unwrap();
    bounded(
        "both requests held upstream",
        h.sim.wait_until(|s| s.held_at_gates() == 2),
    )
    .await;

    let run = h.take_task();
    h.trigger_shutdown();
    // Not ready at once, while a new connection is still served.
    bounded("/readyz to say 503", async {
        while h.admin_get("/readyz").await.status != StatusCode::SERVICE_UNAVAILABLE {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(h.admin_get("/readyz").await.text(), "shutting down\n");
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    // Then the listener closes, with both requests still in flight, and
    // the admin listener still answers.
    let proxy = h.proxy;
    bounded("the listener to close", async {
        while TcpStream::connect(proxy).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(h.sim.held_at_gates(), 2);
    assert_eq!(
        h.admin_get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    gate.add_permits(2);
    let resp = bounded("the HTTP/1.1 answer", h1_answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["connection"], "close");
    resp.into_body().collect().await.unwrap();
    let resp = bounded("the HTTP/2 answer", h2_answer).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    while let Some(chunk) = bounded("the HTTP/2 body", body.data()).await {
        chunk.unwrap();
    }
    bounded("the HTTP/1.1 connection to close", h1_conn)
        .await
        .unwrap()
        .unwrap();
    bounded("the HTTP/2 connection to end on GOAWAY", h2_conn)
        .await
        .unwrap()
        .unwrap();
    bounded("run() to return", run).await.unwrap();
}

/// During the shutdown delay the proxy goes lame duck: an idle HTTP/1.1
/// connection is not closed under the request its client may be sending;
/// its next request is answered, with `Connection: close`; an HTTP/2
/// connection gets GOAWAY at once (its client knows what to send again);
/// new connections are still accepted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_shutdown_delay_clients_are_moved_off_without_a_close_under_a_request() {
    let mut h = setup()
        .set("listen", "shutdown_delay", Duration::from_secs(2))
        .start()
        .await;
    h.ready().await;
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(h1_conn);
    let proxy = h.proxy;
    let get = move |path: &str| {
        Request::get(format!("http://{proxy}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = bounded("a first answer", h1.send_request(get("/users.json")))
        .await
        .unwrap();
    assert!(resp.headers().get("connection").is_none());
    resp.into_body().collect().await.unwrap();
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let (h2, h2_conn) = h2::client::handshake(tcp).await.unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    bounded("the h2 stream", h2.ready()).await.unwrap();

    let run = h.take_task();
    h.trigger_shutdown();
    bounded("/readyz to say 503", async {
        while h.admin_get("/readyz").await.status != StatusCode::SERVICE_UNAVAILABLE {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // HTTP/2: GOAWAY, while the listener still accepts.
    bounded("the h2 connection to end on GOAWAY", h2_conn)
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(h.proxy).await.is_ok(), "still accepting");
    // HTTP/1.1: the idle connection still takes a request, and says close.
    assert!(!h1_conn.is_finished());
    let resp = bounded(
        "the answer in the delay",
        h1.send_request(get("/users.json")),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["connection"], "close");
    resp.into_body().collect().await.unwrap();
    bounded("the HTTP/1.1 connection to close", h1_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.sim.requests_to("/users"), 2);
    bounded("run() to return", run).await.unwrap();
}

/// With `[state] file`, a restart logs nobody in again: the sessions held
/// at shutdown (a standalone identity's and a pool member's) are written,
/// sealed, and the next start uses them; the one that lapsed meanwhile is
/// created anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_state_file_logs_nobody_in_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sessions.json");
    let sim = common::demo_sim().await;
    let with_state = || {
        setup()
            .sim(sim.clone())
            .set("state", "file", &file)
            .identity("name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n")
            .identity("name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n")
            .pool_table("name = \"p\"\nidentities = [\"other\"]\n")
    };
    let mut first = with_state().start().await;
    first.ready().await;
    assert_eq!(
        first.get_as("p", "/users.json").await.status,
        StatusCode::OK
    );
    assert_eq!(sim.creations(), 2);
    let token = first.token();
    first.shutdown().await;
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(!saved.contains(&token), "sealed, not in the clear");

    let mut second = with_state().start().await;
    second.ready().await;
    assert_eq!(second.token(), token, "the same session");
    assert_eq!(second.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(
        second.get_as("p", "/users.json").await.status,
        StatusCode::OK
    );
    assert_eq!(sim.creations(), 2, "no login at the restart");
    second.shutdown().await;

    // The sessions lapse (QuickBlox forgets them): the next start finds
    // them refused and creates new ones, once.
    sim.expire_all();
    let third = with_state().start().await;
    third.ready().await;
    assert_eq!(third.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(sim.creations(), 3);
}

/// Logs at TRACE, metrics and error bodies never show a whole token, the
/// auth secret or a password. (Single-threaded runtime: the thread-local
/// subscriber sees every task.)
#[tokio::test]
async fn no_secret_reaches_logs_metrics_or_errors() {
    let logs = common::capture_logs();

    let h = setup().start().await;
    h.ready().await;
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(
        h.send(Method::DELETE, "/session.json", &[], "")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let bad = setup()
        .identity("name = \"bot\"\nlogin = \"demo\"\npassword = \"wrong-password-123\"\n")
        .start()
        .await;
    let err = bad.get("/users.json").await;
    assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);

    let text = logs.text();
    let mut tokens: Vec<String> = h.sim.requests().iter().map(|r| r.token.clone()).collect();
    tokens.push(h.token());
    let app = h.sim.config().clone();
    let mut secrets = vec![
        app.auth_secret.clone(),
        app.users[0].password.clone(),
        "wrong-password-123".to_owned(),
    ];
    secrets.extend(tokens.iter().cloned());
    let metrics = h.handle.metrics_text() + &bad.handle.metrics_text();
    for secret in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "log shows {secret}:\n{text}"
        );
        assert!(!metrics.contains(secret.as_str()), "metrics show {secret}");
        assert!(
            !err.text().contains(secret.as_str()),
            "error shows {secret}"
        );
    }
    // What the logs do say: one line per renewal, with why and a prefix.
    assert!(
        text.contains("session created") && text.contains("reason=\"expired\""),
        "{text}"
    );
    let prefix: String = tokens.last().unwrap().chars().take(6).collect();
    assert!(text.contains(&format!("token={prefix}…")), "{text}");
    assert!(
        text.contains("Unauthorized"),
        "QuickBlox's message is logged:\n{text}"
    );
}

/// The README's error tables name every `QBProxy-Error` code the proxy and
/// the admin API send (the codes are read from `src/error.rs`, where each
/// error's code is defined).
#[test]
fn every_error_code_is_in_the_readme_tables() {
    let source = include_str!("../../src/proxy/error.rs");
    let codes: std::collections::BTreeSet<&str> = source
        .lines()
        .filter_map(|l| {
            l.trim()
                .split_once("=> \"")?
                .1
                .split_once("\",")
                .map(|c| c.0)
        })
        .collect();
    assert!(codes.len() > 20, "{codes:?}");
    let readme = include_str!("../../README.md");
    let documented: std::collections::BTreeSet<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| ") && l.trim_end().ends_with('|'))
        .filter_map(|l| l.trim_end().trim_end_matches('|').rsplit_once('|'))
        .flat_map(|(_, last)| last.split('/'))
        .map(|c| c.trim().trim_matches('`'))
        .collect();
    for code in &codes {
        assert!(
            documented.contains(code),
            "QBProxy-Error {code} is in no README error table"
        );
    }
}

/// The README's metrics table names every metric family qbproxy exports,
/// and nothing that is not one.
#[tokio::test]
async fn every_exported_metric_is_in_the_readme_table() {
    let h = setup().start().await;
    let exported = h.handle.metric_names();
    assert!(exported.len() > 10, "{exported:?}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `qbproxy_"))
        .map(|rest| rest.split(['{', '`']).next().unwrap())
        .collect();
    for name in &exported {
        let short = name.strip_prefix("qbproxy_").unwrap();
        assert!(
            table.contains(&short),
            "{name} is not in the README's metrics table"
        );
    }
    for short in &table {
        let name = format!("qbproxy_{short}");
        assert!(
            exported.contains(&name),
            "the README lists {name}, which is not exported"
        );
    }
}
