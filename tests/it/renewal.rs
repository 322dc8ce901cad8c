//! Sessions: reactive renewal with replay, single flight, failures, skew.

use crate::common;
use std::time::Duration;

use std::collections::HashSet;

use crate::common::{bounded, setup};
use http::{Method, StatusCode};
use qbproxy_sim::Fault;

/// 100 concurrent requests after every session expired, a third of them
/// POSTs with distinct bodies: one new session, all succeed, every body
/// reaches QuickBlox byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_under_100_concurrent_requests_renews_once_and_loses_nothing() {
    let h = setup().start().await;
    h.ready().await;
    let old = h.handle.default_identity().current().unwrap();
    assert_eq!(h.sim.expire_all(), 1);

    let mut tasks = Vec::new();
    let mut posted = Vec::new();
    for i in 0..100 {
        let (method, path, body) = if i % 3 == 0 {
            let body = format!(
                "{{\"n\":{i},\"text\":\"note {i} \\u00e9 {}\"}}",
                "x".repeat(i * 7)
            );
            posted.push(body.clone());
            (Method::POST, "/data/Note.json".to_owned(), body)
        } else {
            (Method::GET, format!("/users.json?i={i}"), String::new())
        };
        tasks.push(h.spawn_send(method, path, &[("Content-Type", "application/json")], body));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }

    assert_eq!(h.sim.creations(), 2, "exactly one new session");
    assert!(h.sim.refusals() >= 1, "the expiry was actually hit");
    let new = h.handle.default_identity().current().unwrap();
    assert_eq!(new.generation(), old.generation() + 1);

    let reqs = h.sim.requests();
    assert_eq!(reqs.len(), 100, "each request accepted exactly once");
    assert!(reqs
        .iter()
        .all(|r| r.token == new.token().to_str().unwrap()));
    let bodies: Vec<&[u8]> = reqs
        .iter()
        .filter(|r| r.method == Method::POST)
        .map(|r| &r.body[..])
        .collect();
    assert_eq!(bodies.len(), posted.len());
    for p in &posted {
        assert_eq!(
            bodies.iter().filter(|b| **b == p.as_bytes()).count(),
            1,
            "body {p}"
        );
    }
    let replays = h.metric("qbproxy_replays_total{identity=\"demo\"");
    assert!((1..=100).contains(&replays), "{replays}");
    assert_eq!(
        h.metric("qbproxy_session_renewals_total{identity=\"demo\",pool=\"\",reason=\"expired\"}"),
        1
    );
}

#[tokio::test]
async fn an_oversized_body_is_not_replayed_but_the_session_is_renewed() {
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    h.sim.expire_all();
    let big = "y".repeat(4096);
    let a = h
        .send(
            Method::POST,
            "/data/Note.json",
            &[("Content-Type", "text/plain")],
            big.clone(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.text().contains("Required session does not exist"),
        "{}",
        a.text()
    );
    // The refusal is reported: a new session arrives without another request.
    bounded("the renewal", h.sim.wait_until(|s| s.creations() == 2)).await;
    assert_eq!(h.metric("qbproxy_replays_total{identity=\"demo\""), 0);
    assert!(
        h.sim.requests().is_empty(),
        "the big body never reached QuickBlox under a live session"
    );

    let a = h
        .send(
            Method::POST,
            "/data/Note.json",
            &[("Content-Type", "text/plain")],
            big.clone(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.sim.requests()[0].body, big.as_bytes());
    assert_eq!(h.sim.creations(), 2);
}

#[tokio::test]
async fn a_body_at_the_limit_is_replayed() {
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    h.sim.expire_all();
    let body = "z".repeat(1024);
    let a = h
        .send(Method::POST, "/data/Note.json", &[], body.clone())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.metric("qbproxy_replays_total{identity=\"demo\""), 1);
    assert_eq!(h.sim.requests()[0].body, body.as_bytes());
}

#[tokio::test]
async fn a_passing_session_failure_costs_the_client_time_not_an_error() {
    let sim = common::demo_sim().await;
    for _ in 0..3 {
        sim.push_fault(Fault::Status(
            500,
            r#"{"errors":["Internal Server Error"]}"#.into(),
        ));
    }
    // Default retry_wait (10 s): the request waits through three failed
    // attempts for the fourth.
    let h = setup().sim(sim).start().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.sim.attempts(), 4);
    assert_eq!(
        h.metric("qbproxy_session_failures_total{identity=\"demo\",pool=\"\"}"),
        3
    );
}

/// Issue 11, defect 6: the retry is held at a gate until readiness has
/// been checked (it used to be due 10-20 ms later and could win the race).
#[tokio::test]
async fn with_retry_wait_zero_a_failing_session_endpoint_gives_a_prompt_503_then_recovers() {
    let sim = common::demo_sim().await;
    sim.push_fault(Fault::Status(
        500,
        r#"{"errors":["Internal Server Error"]}"#.into(),
    ));
    let retry = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    sim.push_fault(Fault::Wait(retry.clone()));
    // Upstream timeout 60s: an answer within the 20s bound proves qbproxy
    // did not wait for it.
    let h = setup()
        .sim(sim)
        .set("quickblox", "retry_wait", Duration::from_secs(0))
        .start()
        .await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["qbproxy-error"], "session-unavailable");
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(
        a.error_message(),
        "qbproxy: could not create a QuickBlox session: Internal Server Error (HTTP 500)"
    );
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.text().contains("Internal Server Error"),
        "{}",
        ready.text()
    );

    retry.add_permits(1);
    h.ready().await; // the background retry
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(h.admin_get("/readyz").await.status, StatusCode::OK);
    assert_eq!(h.sim.attempts(), 2);
    assert_eq!(
        h.metric("qbproxy_session_failures_total{identity=\"demo\",pool=\"\"}"),
        1
    );
}

#[tokio::test]
async fn renewal_failing_after_expiry_explains_instead_of_passing_the_401_on() {
    let h = setup()
        .set("quickblox", "retry_wait", Duration::from_secs(0))
        .start()
        .await;
    h.ready().await;
    h.sim.expire_all();
    h.sim.push_fault(Fault::Status(429, String::new()));
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.error_message(),
        "qbproxy: could not create a QuickBlox session: Too Many Requests (HTTP 429)"
    );
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

#[tokio::test]
async fn each_kind_of_session_failure_has_its_status() {
    // Refused credentials: 503 with QuickBlox's message.
    let h = setup()
        .identity("name = \"bot\"\nlogin = \"demo\"\npassword = \"wrong\"\n")
        .start()
        .await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.error_message().ends_with("Unauthorized (HTTP 401)"),
        "{}",
        a.text()
    );

    // A wrong auth secret: QuickBlox's "Unexpected signature".
    let h = setup()
        .set("quickblox", "auth_secret", "not-the-secret")
        .start()
        .await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.error_message()
            .ends_with("Unexpected signature (HTTP 422)"),
        "{}",
        a.text()
    );
    assert!(!a.text().contains("not-the-secret"));

    // Nothing listening: 502 (at once with retry_wait 0; by default after
    // waiting through retries for up to retry_wait).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = setup()
        .upstream_url(&format!("http://{closed}"))
        .set("quickblox", "retry_wait", Duration::from_secs(0))
        .start()
        .await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(
        a.error_message().contains("QuickBlox is unreachable"),
        "{}",
        a.text()
    );

    // The session endpoint hangs past session_timeout: 504.
    let sim = common::demo_sim().await;
    sim.push_fault(Fault::Hang);
    let h = setup()
        .sim(sim)
        .set("quickblox", "session_timeout", Duration::from_millis(300))
        .set("quickblox", "retry_wait", Duration::from_secs(0))
        .start()
        .await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        a.error_message().contains("did not answer within 300ms"),
        "{}",
        a.text()
    );
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

/// The creation hangs (and `session_timeout` is 30 s here): the request
/// is answered at its own `upstream.timeout` (200 ms), not later. The
/// upper bound leaves room for a loaded machine and is still far below
/// the 30 s it would take without the deadline.
#[tokio::test]
async fn a_request_never_waits_past_its_timeout_for_a_session() {
    let sim = common::demo_sim().await;
    sim.push_fault(Fault::Hang);
    let h = setup()
        .sim(sim)
        .set("upstream", "timeout", Duration::from_millis(200))
        .start()
        .await;
    let started = std::time::Instant::now();
    let a = h.get("/users.json").await;
    let waited = started.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.headers["qbproxy-error"], "session-timeout");
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "answered after {waited:?}, not at its 200 ms deadline"
    );
}

#[tokio::test]
async fn bad_timestamp_is_corrected_from_the_upstream_date_and_kept() {
    let sim = common::demo_sim().await;
    sim.set_clock_offset(3 * 3600 + 17);
    let h = setup().sim(sim).start().await;
    h.ready().await;
    assert_eq!(
        h.sim.attempts(),
        2,
        "one refused for Bad timestamp, one corrected"
    );
    assert_eq!(h.sim.creations(), 1);
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);

    // The offset is kept: the next session needs a single attempt.
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(h.sim.attempts(), 3);
    assert_eq!(h.sim.creations(), 2);
}

#[tokio::test]
async fn a_stale_refusal_does_not_renew_again() {
    let h = setup().start().await;
    h.ready().await;
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let refused_before = h.sim.refusals();
    // Sequential requests after the renewal: no further sessions.
    for _ in 0..5 {
        assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    }
    assert_eq!(h.sim.creations(), 2);
    assert_eq!(h.sim.refusals(), refused_before);
    let tokens: HashSet<String> = h.sim.requests().iter().map(|r| r.token.clone()).collect();
    assert_eq!(tokens.len(), 1);
}

/// Issue 11, defect 5: after a request saw the token refused, later requests
/// wait for the replacement instead of taking the dead token. A body too
/// large to replay can only be sent once, so that is the difference between
/// a 401 and a 200 for the second client.
#[tokio::test]
async fn a_token_known_dead_is_not_injected_again() {
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    h.sim
        .set_creation_delay(std::time::Duration::from_millis(300));
    h.sim.expire_all();
    let big = vec![b'a'; 4096];
    let first = h
        .send(Method::POST, "/data/Note.json", &[], big.clone())
        .await;
    assert_eq!(
        first.status,
        StatusCode::UNAUTHORIZED,
        "unreplayable: {}",
        first.text()
    );
    let second = h.send(Method::POST, "/data/Note.json", &[], big).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    assert_eq!(h.sim.creations(), 2);
    assert_eq!(h.sim.refusals(), 1, "only the first met the dead token");
}

/// Every session expiring at once can end a session made just before the
/// refusal came, with the refused one. A request that took the session S1
/// and waited for an upstream slot while a renewal made S2 current, then
/// every session ended: S1 is refused, and S2, the identity's newer
/// session but no newer than the refusal, is refused too. That is not "a
/// renewed session refused at once": the request renews again (S3) and is
/// answered, where it got the 401 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_ended_with_the_refused_one_is_renewed_again() {
    let h = setup().set("upstream", "max_in_flight", 1).start().await;
    h.ready().await;
    // The one upstream slot, held at the simulator.
    let gate = h.sim.gate("/data/Hold");
    let hold = h.spawn_send(Method::GET, "/data/Hold.json", &[], "");
    h.sim.wait_until(|s| s.held_at_gates() == 1).await;
    // Takes S1 and waits for the slot.
    let late = h.spawn_send(Method::GET, "/data/Note.json", &[], "");
    h.metric_reaches("qbproxy_upstream_slot_waits_total", 1)
        .await;
    let renew = common::send(
        &common::client(),
        h.admin,
        Method::POST,
        "/sessions/demo/renew",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(renew.status, StatusCode::OK, "{}", renew.text());
    assert_eq!(h.sim.creations(), 2, "S2 is current");
    h.sim.expire_all();
    gate.add_permits(1);
    assert_eq!(bounded("the held request", hold).await.unwrap().status, 200);
    let answer = bounded("the late request", late).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(h.sim.refusals(), 2, "S1, then S2");
    assert_eq!(h.sim.creations(), 3, "S3, made after both refusals");
}
