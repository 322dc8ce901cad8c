//! The gateway's access control and limits.

use crate::common;
use std::time::Duration;

use crate::common::{bounded, keep_alive_get, raw, setup};
use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
const OTHER: &str = "name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n";
const BILLING_KEY: &str = "billing-key-0123456789";
const OPS_KEY: &str = "ops-key-0123456789abcdef";

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_allowlist_admits_ipv4_and_ipv6_sources_and_refuses_others() {
    let h = setup()
        .set("listen", "allow", ["10.0.0.0/8", "127.0.0.1/32"])
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);

    let h = setup()
        .set("listen", "allow", ["10.0.0.0/8", "fd00::/8"])
        .start()
        .await;
    h.ready().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.headers["qbproxy-error"], "forbidden");
    assert_eq!(
        a.error_message(),
        "qbproxy: 127.0.0.1 is not in listen.allow"
    );
    assert!(h.sim.requests().is_empty(), "nothing was forwarded");
    // Nothing else is served to that source on the connection: it is
    // closed after the answer (a kept-alive one would be read to no end).
    let refused = raw(h.proxy, b"GET /users.json HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&refused), 403, "{refused}");

    // IPv6: the proxy on [::1].
    let h = setup()
        .bind("[::1]:0")
        .set("listen", "allow", ["::1/128"])
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let h = setup()
        .bind("[::1]:0")
        .set("listen", "allow", ["127.0.0.0/8", "fd00::/8"])
        .start()
        .await;
    h.ready().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.error_message(), "qbproxy: ::1 is not in listen.allow");
}

fn with_clients() -> common::Setup {
    setup()
        .identity(DEMO)
        .identity(OTHER)
        .raw_table(&format!(
            "[[client]]\nname = \"billing\"\nkey = \"{BILLING_KEY}\"\nidentities = [\"other\"]\n\
             deny_paths = [\"DELETE /users/*\"]\n\
             [[client]]\nname = \"ops\"\nkey = \"{OPS_KEY}\"\nallow_paths = [\"GET /users*\", \"* /chat/*\"]\n"
        ))
}

#[tokio::test]
async fn client_keys_are_required_checked_and_stripped() {
    let h = with_clients().start().await;
    h.ready().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["qbproxy-error"], "unauthorized");
    assert_eq!(
        a.error_message(),
        "qbproxy: this proxy needs a QBProxy-Key header"
    );
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QBProxy-Key", "billing-key-0123456788")],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error_message(), "qbproxy: the QBProxy-Key is not valid");
    assert!(h.sim.requests().is_empty());

    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QBProxy-Key", OPS_KEY)],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        !h.sim.requests()[0].headers.contains_key("qbproxy-key"),
        "the key is not forwarded"
    );
    let m = h.handle.metrics_text();
    assert!(
        m.contains("qbproxy_client_requests_total{client=\"ops\",code=\"200\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn clients_are_held_to_their_identities_and_path_rules() {
    let h = with_clients().start().await;
    h.ready().await;
    let billing = [("QBProxy-Key", BILLING_KEY)];
    // Restricted to "other": that is its default, and "demo" is refused.
    let a = h
        .send(Method::GET, "/users.json", &billing, Bytes::new())
        .await;
    assert_eq!(a.json()["echo"]["user_id"], 1002);
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[billing[0], ("QBProxy-Identity", "demo")],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.error_message(),
        "qbproxy: client \"billing\" may not use identity \"demo\"; it may use: other"
    );
    // Deny rule.
    let a = h
        .send(Method::DELETE, "/users/5.json", &billing, Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.error_message(),
        "qbproxy: client \"billing\" may not DELETE /users/5.json (deny_paths rule \"DELETE /users/*\")"
    );
    assert_eq!(
        h.send(Method::GET, "/users/1002.json", &billing, Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    // Allow rules.
    let ops = [("QBProxy-Key", OPS_KEY)];
    assert_eq!(
        h.send(Method::GET, "/users/1002.json", &ops, Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.send(Method::POST, "/chat/Message.json", &ops, "{}")
            .await
            .status,
        StatusCode::OK
    );
    let a = h.send(Method::POST, "/data/Note.json", &ops, "{}").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.error_message(),
        "qbproxy: client \"ops\" may not POST /data/Note.json (no allow_paths rule matches)"
    );
    let forwarded: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(
        forwarded,
        [
            "/users.json",
            "/users/1002.json",
            "/users/1002.json",
            "/chat/Message.json"
        ]
    );
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let h = setup()
        .raw_table(&format!(
            "[[client]]\nname = \"bulk\"\nkey = \"{OPS_KEY}\"\nrate = 0.5\nburst = 2\n"
        ))
        .start()
        .await;
    h.ready().await;
    let key = [("QBProxy-Key", OPS_KEY)];
    assert_eq!(
        h.send(Method::GET, "/data/A.json", &key, Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.send(Method::GET, "/data/B.json", &key, Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    let a = h.send(Method::GET, "/c.json", &key, Bytes::new()).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["qbproxy-error"], "rate-limited");
    assert_eq!(a.headers["retry-after"], "2");
    assert_eq!(h.sim.requests().len(), 2);
}

/// A raw request whose headers count exactly `total` bytes as
/// `limits.max_header_bytes` counts them.
fn request_with_header_bytes(total: usize) -> String {
    // host: x (4+1+4) + connection: close (10+5+4) + x-pad: ... (5+n+4)
    let fixed = (4 + 1 + 4) + (10 + 5 + 4) + (5 + 4);
    let pad = "p".repeat(total - fixed);
    format!("GET /users.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {pad}\r\n\r\n")
}

#[tokio::test]
async fn header_size_limit_at_the_boundary() {
    let h = setup()
        .set("limits", "max_header_bytes", 2048)
        .start()
        .await;
    h.ready().await;
    for (total, expected) in [(2047, 200), (2048, 200), (2049, 431)] {
        let resp = raw(h.proxy, request_with_header_bytes(total).as_bytes()).await;
        assert_eq!(status_of(&resp), expected, "{total} bytes: {resp}");
        if expected == 431 {
            assert!(resp.contains("qbproxy-error: header-too-large"), "{resp}");
            assert!(
                resp.contains("request headers are 2049 bytes; the limit is 2048"),
                "{resp}"
            );
        }
    }
}

#[tokio::test]
async fn body_size_limit_at_the_boundary_declared_or_streamed() {
    let h = setup()
        .set("limits", "max_body_bytes", 4096)
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    for (size, expected) in [
        (4095, StatusCode::OK),
        (4096, StatusCode::OK),
        (4097, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let a = h
            .send(Method::POST, "/data/Note.json", &[], vec![b'b'; size])
            .await;
        assert_eq!(a.status, expected, "{size} bytes");
        if expected != StatusCode::OK {
            assert_eq!(a.headers["qbproxy-error"], "body-too-large");
            assert_eq!(
                a.error_message(),
                "qbproxy: request body is over the limit of 4096 bytes"
            );
        }
    }
    // Chunked, no length declared: cut off while streaming past the replay
    // buffer...
    let chunked = |size: usize| {
        let chunk = "c".repeat(size);
        format!(
            "POST /data/Note.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{size:x}\r\n{chunk}\r\n0\r\n\r\n"
        )
    };
    let resp = raw(h.proxy, chunked(4097).as_bytes()).await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    let sizes: Vec<usize> = h.sim.requests().iter().map(|r| r.body.len()).collect();
    assert_eq!(
        sizes,
        [4095, 4096],
        "nothing over the limit reached QuickBlox"
    );

    // ...and when the replay buffer is larger than the limit, refused whole.
    let h = setup()
        .set("limits", "max_body_bytes", 4096)
        .set("proxy", "replay_body_limit", 65536)
        .start()
        .await;
    h.ready().await;
    assert_eq!(
        status_of(&raw(h.proxy, chunked(4096).as_bytes()).await),
        200
    );
    assert_eq!(
        status_of(&raw(h.proxy, chunked(4097).as_bytes()).await),
        413
    );
    assert_eq!(h.sim.requests().len(), 1);
}

#[tokio::test]
async fn an_upstream_slower_than_the_timeout_gives_504() {
    let h = setup()
        .set("upstream", "timeout", Duration::from_millis(300))
        .start()
        .await;
    h.ready().await;
    let _gate = h.sim.gate("/data/Slow");
    let a = h.get("/data/Slow.json").await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.headers["qbproxy-error"], "upstream-timeout");
    assert_eq!(
        a.error_message(),
        "qbproxy: QuickBlox did not answer within 300ms"
    );
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_instead_of_being_starved() {
    let h = setup().set("limits", "max_connections", 2).start().await;
    h.ready().await;
    let mut a = TcpStream::connect(h.proxy).await.unwrap();
    let mut b = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        status_of(&keep_alive_get(&mut a, "/data/A1.json").await),
        200
    );
    assert_eq!(
        status_of(&keep_alive_get(&mut b, "/data/B1.json").await),
        200
    );
    // A third connection is queued by the kernel, not served.
    let proxy = h.proxy;
    let third = tokio::spawn(async move {
        let mut c = TcpStream::connect(proxy).await.unwrap();
        keep_alive_get(&mut c, "/data/C1.json").await
    });
    // The two accepted connections keep working meanwhile...
    assert_eq!(
        status_of(&keep_alive_get(&mut a, "/data/A2.json").await),
        200
    );
    assert_eq!(
        h.sim.requests_to("/data/C1"),
        0,
        "the third connection was not served"
    );
    assert!(!third.is_finished());
    // ...and when one closes, the third is served.
    drop(b);
    let resp = bounded("the queued connection", third).await.unwrap();
    assert_eq!(status_of(&resp), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_malformed_clients_are_cut_off_without_harming_others() {
    let h = setup()
        .set("limits", "header_read_timeout", Duration::from_millis(300))
        .start()
        .await;
    h.ready().await;
    // Headers that never finish.
    let mut slow = TcpStream::connect(h.proxy).await.unwrap();
    slow.write_all(b"GET /users.json HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Garbage instead of HTTP.
    let garbage = raw(h.proxy, b"\x16\x03\x01 this is not http\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage:?}"
    );
    // A client that declares a body and hangs up halfway.
    let mut quitter = TcpStream::connect(h.proxy).await.unwrap();
    quitter
        .write_all(
            b"POST /data/Note.json HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly-part",
        )
        .await
        .unwrap();
    drop(quitter);
    // Everyone else is served meanwhile.
    for i in 0..5 {
        assert_eq!(
            h.get(&format!("/users.json?{i}")).await.status,
            StatusCode::OK
        );
    }
    // The slow client is disconnected by the header timeout.
    let mut rest = Vec::new();
    bounded(
        "the slowloris connection to be closed",
        slow.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    assert_eq!(
        h.sim.requests_to("/data"),
        0,
        "the half body was never forwarded whole"
    );
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

/// An idle HTTP/1 keep-alive connection is kept for `keepalive_timeout`,
/// not `header_read_timeout`: a pooling client that reuses it after a
/// pause longer than the header timeout is served, and once it stays idle
/// for the keep-alive timeout the server closes it.
#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_until_keepalive_timeout() {
    let h = setup()
        .set("limits", "header_read_timeout", Duration::from_millis(150))
        .set("limits", "keepalive_timeout", Duration::from_secs(2))
        .start()
        .await;
    h.ready().await;
    let mut conn = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        status_of(&keep_alive_get(&mut conn, "/users.json?first").await),
        200
    );
    // Idle for four header timeouts (the idleness is what is tested), then
    // reused: hyper's own header timer, which started at idle, closed the
    // connection here and lost this request.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        status_of(&keep_alive_get(&mut conn, "/users.json?second").await),
        200
    );
    assert_eq!(h.sim.requests_to("/users"), 2);
    // Nothing more is sent: the server closes the connection.
    let mut rest = Vec::new();
    bounded(
        "the idle connection to be closed",
        conn.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// On a kept-alive connection a head's clock starts at its first byte: one
/// trickled slower than `header_read_timeout` is cut off long before the
/// keep-alive timeout, and never reaches the upstream.
#[tokio::test]
async fn a_head_trickled_on_a_kept_alive_connection_is_cut_off_by_the_header_timeout() {
    let h = setup()
        .set("limits", "header_read_timeout", Duration::from_millis(300))
        .set("limits", "keepalive_timeout", Duration::from_secs(3600))
        .start()
        .await;
    h.ready().await;
    let mut conn = TcpStream::connect(h.proxy).await.unwrap();
    assert_eq!(
        status_of(&keep_alive_get(&mut conn, "/users.json?first").await),
        200
    );
    let (mut read, mut write) = conn.into_split();
    // A header every 50 ms until the server hangs up: bytes keep coming,
    // the head never ends.
    let trickle = tokio::spawn(async move {
        let mut sent = write
            .write_all(b"GET /users.json?trickled HTTP/1.1\r\nHost: x\r\n")
            .await;
        while sent.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            sent = write.write_all(b"X-Slow: 1\r\n").await;
        }
    });
    // Closed (a reset, with the unread header bytes, is a close too).
    let mut rest = Vec::new();
    let _ = bounded(
        "the trickling connection to be closed",
        read.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    trickle.abort();
    assert_eq!(h.sim.requests_to("/users"), 1, "only the first request");
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_in_flight_are_capped_and_requests_over_the_cap_wait_their_turn() {
    let h = setup().set("upstream", "max_in_flight", 2).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let sent: Vec<_> = (0..6)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Slow{i}.json"), &[], ""))
        .collect();
    h.sim.wait_until(|s| s.requests_to("/data/Slow") >= 2).await;
    // One at a time: each request let through frees a slot for the next.
    for k in 3..=6 {
        gate.add_permits(1);
        h.sim.wait_until(|s| s.requests_to("/data/Slow") >= k).await;
    }
    gate.add_permits(2);
    for s in sent {
        assert_eq!(bounded("a queued request", s).await.unwrap().status, 200);
    }
    assert_eq!(
        h.sim.max_held_at_gates(),
        2,
        "never more than upstream.max_in_flight requests upstream at once"
    );
    assert!(h
        .handle
        .metrics_text()
        .contains("\nqbproxy_upstream_slot_waits_total "));
}
