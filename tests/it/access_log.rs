//! The access log: one event per request, when its response is done, with
//! who called what, as whom, and how long QuickBlox took; query values
//! never logged.

use crate::common;

use std::path::Path;

use crate::common::{bounded, setup};
use http::{Method, StatusCode};
use qbproxy::Config;

const KEY: &str = "billing-key-0123456789";

/// Waits until the access lines holding every fragment are written, and
/// returns them.
async fn written(logs: &common::Captured, what: &str, fragments: &[&str]) -> Vec<String> {
    bounded(what, async {
        loop {
            let found = events(logs, fragments);
            if !found.is_empty() {
                return found;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// The access lines that hold every fragment.
fn events(logs: &common::Captured, fragments: &[&str]) -> Vec<String> {
    logs.text()
        .lines()
        .filter(|l| l.contains("qbproxy::access") && fragments.iter().all(|f| l.contains(f)))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_event_with_who_what_and_how_long() {
    let logs = common::capture_logs();
    let h = setup()
        .raw_table(&format!(
            "[[client]]\nname = \"billing\"\nkey = \"{KEY}\"\n"
        ))
        .start()
        .await;
    h.ready().await;
    let key = [("QBProxy-Key", KEY)];

    // A read, query values masked.
    let a = h
        .send(
            Method::GET,
            "/users/by_login.json?login=alice&password=hunter2&flag",
            &key,
            "",
        )
        .await;
    // The simulator knows no alice: QuickBlox's 404, passed on.
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let body_len = a.body.len().to_string();
    let lines = written(
        &logs,
        "the read's event",
        &["path=\"/users/by_login.json\""],
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for field in [
        "peer=127.0.0.1:",
        "client=\"billing\"",
        "identity=\"demo\"",
        "method=GET",
        "query=login=*&password=*&*",
        "status=404",
        "bytes_in=0",
        &format!("bytes_out={body_len}"),
        "replayed=false",
        "complete=true",
        "upstream_ms=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(!logs.text().contains("hunter2"), "a query value was logged");
    assert!(!logs.text().contains("alice"), "a query value was logged");

    // A write after an expiry: replayed, bytes in counted, one event.
    h.sim.expire_all();
    let body = r#"{"type":1,"name":"access-log-test"}"#;
    let a = h.send(Method::POST, "/chat/Dialog.json", &key, body).await;
    assert_eq!(a.status, StatusCode::OK);
    let lines = written(&logs, "the write's event", &["path=\"/chat/Dialog.json\""]).await;
    assert_eq!(
        lines.len(),
        1,
        "one event for a replayed request: {lines:?}"
    );
    assert!(lines[0].contains("replayed=true"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("bytes_in={}", body.len())),
        "{}",
        lines[0]
    );

    // Refused by qbproxy: its error code.
    let a = h
        .send(
            Method::GET,
            "/users/1001.json",
            &[("QBProxy-Key", KEY), ("QBProxy-Identity", "nobody")],
            "",
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let code = a.headers["qbproxy-error"].to_str().unwrap().to_owned();
    let lines = written(
        &logs,
        "the refusal's event",
        &["path=\"/users/1001.json\"", "status=400"],
    )
    .await;
    assert!(
        lines[0].contains(&format!("error=\"{code}\"")),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("client=\"billing\""), "{}", lines[0]);
    assert!(
        !lines[0].contains("identity="),
        "no identity was chosen: {}",
        lines[0]
    );
}

#[tokio::test]
async fn access_false_writes_no_events_and_a_reload_turns_them_on() {
    let logs = common::capture_logs();
    let off = setup().set("log", "access", false);
    let h = off.start().await;
    h.ready().await;
    assert_eq!(h.get("/users/1002.json?quiet").await.status, StatusCode::OK);
    // The proxy's own line for the same moment is there; no access event.
    assert!(events(&logs, &["path=\"/users/1002.json\""]).is_empty());

    let on = setup().set("log", "access", true);
    let config = Config::from_toml(&on.config_text(&h.sim), Path::new("r.toml")).unwrap();
    h.handle.reload(config).await.unwrap();
    assert_eq!(h.get("/users/1002.json?loud").await.status, StatusCode::OK);
    let lines = written(
        &logs,
        "the event after the reload",
        &["path=\"/users/1002.json\""],
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("query=*"), "{}", lines[0]);
}

/// A client that goes away while qbproxy waits for QuickBlox: the request
/// is logged all the same, as nginx does it (499, not complete).
#[tokio::test]
async fn a_request_whose_client_went_away_is_logged_as_499() {
    let logs = common::capture_logs();
    let h = setup().start().await;
    h.ready().await;
    let gate = h.sim.gate("/users/7.json");
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        b"GET /users/7.json?page=3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    bounded(
        "the request at the gate",
        h.sim.wait_until(|s| s.held_at_gates() == 1),
    )
    .await;
    drop(s);
    let lines = written(
        &logs,
        "the event of the dropped request",
        &["path=\"/users/7.json\""],
    )
    .await;
    gate.add_permits(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for field in [
        "status=499",
        "complete=false",
        "identity=\"demo\"",
        "query=page=*",
    ] {
        assert!(lines[0].contains(field), "{field} in {}", lines[0]);
    }
}

/// Every answer to a known client counts under its name, refusals
/// included (a rate-limit refusal is decided after its key named it), and
/// a refusal is one line: the access line, with the code and the reason.
#[tokio::test]
async fn a_refused_request_counts_under_its_client_in_one_line() {
    let logs = common::capture_logs();
    let h = setup()
        .raw_table(&format!(
            "[[client]]\nname = \"billing\"\nkey = \"{KEY}\"\nrate = 1\nburst = 2\n\
             deny_paths = [\"DELETE /users/*\"]\n"
        ))
        .start()
        .await;
    h.ready().await;
    let key = [("QBProxy-Key", KEY)];

    // Denied by a rule, then over the rate (a burst of 2, so the third
    // request at the latest is refused).
    let denied = h.send(Method::DELETE, "/users/31337.json", &key, "").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let mut limited = 0;
    for _ in 0..4 {
        let a = h.send(Method::GET, "/users/4242.json", &key, "").await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(limited >= 2, "{limited} of 4 refused for the rate");

    // Counted under the client, code by code.
    assert_eq!(
        h.metric("qbproxy_client_requests_total{client=\"billing\",code=\"429\"}"),
        limited
    );
    assert_eq!(
        h.metric("qbproxy_client_requests_total{client=\"billing\",code=\"403\"}"),
        1
    );

    // One access line per refusal, naming the client, the code and why.
    let lines = written(
        &logs,
        "the rate refusals' events",
        &["path=\"/users/4242.json\"", "status=429"],
    )
    .await;
    assert_eq!(lines.len() as u64, limited, "{lines:?}");
    for line in &lines {
        for field in [
            "client=\"billing\"",
            "error=\"rate-limited\"",
            "reason=\"client \\\"billing\\\" is over its rate limit",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
    }
    let denied = written(
        &logs,
        "the rule refusal's event",
        &["path=\"/users/31337.json\""],
    )
    .await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].contains("error=\"forbidden\"") && denied[0].contains("deny_paths rule"),
        "{}",
        denied[0]
    );
    // And no second line for any of them.
    let text = logs.text();
    let warned = text
        .lines()
        .filter(|l| l.contains("request answered by qbproxy"))
        .filter(|l| l.contains("/users/4242.json") || l.contains("/users/31337.json"))
        .count();
    assert_eq!(warned, 0, "{text}");
}
