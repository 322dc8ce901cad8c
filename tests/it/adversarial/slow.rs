//! Slow and greedy clients cannot starve everyone else: bodies have a
//! deadline, body memory has one bound across connections, idle HTTP/2
//! connections close, a client that does not read loses its upstream
//! slots, and one connection holds a bounded number of requests.

use std::time::Duration;

use http::StatusCode;
use tokio::io::AsyncWriteExt;

use super::frames;
use super::{answer_of, h2, h2_send, stall, DEMO};
use crate::common::{bounded, setup};

#[tokio::test]
async fn a_stalled_body_gets_408_and_holds_no_pool_member_meanwhile() {
    let h = setup()
        .identity(DEMO)
        .pool_table("name = \"load\"\nidentities = [\"demo\"]\nmax_in_flight = 1\n")
        .set("limits", "body_read_timeout", Duration::from_millis(400))
        .start()
        .await;
    // Headers and 2 bytes of a 100-byte body, then nothing.
    let head = "POST /data/Note.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let stalled = stall(h.proxy, head, b"{\"").await;
    // The pool's only member serves someone else meanwhile.
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = answer_of(stalled).await;
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.error_code(), "body-timeout");
    // Nothing of it reached QuickBlox.
    let paths: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(paths, ["/users.json"]);
}

#[tokio::test]
async fn a_trickling_body_is_cut_off_at_the_request_deadline() {
    // Each byte comes well within body_read_timeout, but the whole request
    // must fit in upstream.timeout.
    let h = setup()
        .set("limits", "body_read_timeout", Duration::from_secs(5))
        .set("upstream", "timeout", Duration::from_millis(600))
        .start()
        .await;
    h.ready().await;
    let head = "POST /data/Note.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Length: 1000\r\n\r\n";
    let mut s = stall(h.proxy, head, b"a").await;
    let trickle = async {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if s.write_all(b"a").await.is_err() {
                break;
            }
        }
    };
    bounded("the trickle to be cut off", trickle).await;
    let a = answer_of(s).await;
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.error_code(), "body-timeout");
    assert!(h.sim.requests().is_empty());
}

#[tokio::test]
async fn a_streaming_body_that_stalls_is_cut_off_too() {
    // Over the replay limit the body streams upstream; a stall there ends
    // the same way, and the upstream never gets a whole request.
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .set("limits", "body_read_timeout", Duration::from_millis(400))
        .start()
        .await;
    h.ready().await;
    let head = "POST /data/Note.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Length: 100000\r\n\r\n";
    let stalled = stall(h.proxy, head, &[b'a'; 4096]).await;
    let a = answer_of(stalled).await;
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.error_code(), "body-timeout");
    assert!(h.sim.requests().is_empty());
}

#[tokio::test]
async fn body_memory_is_bounded_across_all_connections() {
    let h = setup()
        .set("limits", "max_buffered_bytes", 10000)
        .set("limits", "body_read_timeout", Duration::from_secs(30))
        .set("proxy", "replay_body_limit", 8000)
        .start()
        .await;
    h.ready().await;
    // Five clients each send 6000 bytes of a 7000-byte body and stall.
    let head = "POST /data/Note.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Length: 7000\r\n\r\n";
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(stall(h.proxy, head, &[b'a'; 6000]).await);
    }
    // One is buffered (6000 bytes); the budget has no room for a second,
    // so the other four stream without a replay buffer.
    h.metric_reaches("qbproxy_buffer_full_total", 4).await;
    assert_eq!(h.handle.buffered_bytes(), 6000);
    // Each completes, and the budget is whole again.
    for mut s in stalled {
        s.write_all(&[b'a'; 1000]).await.unwrap();
        let a = answer_of(s).await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    assert_eq!(h.handle.buffered_bytes(), 0);
    assert_eq!(h.sim.requests().len(), 5);
    assert!(h.sim.requests().iter().all(|r| r.body.len() == 7000));
}

#[tokio::test]
async fn idle_http2_connections_are_closed_and_free_their_slots() {
    let h = setup()
        .set("limits", "max_connections", 2)
        .set("limits", "header_read_timeout", Duration::from_millis(300))
        .start()
        .await;
    h.ready().await;
    // Two HTTP/2 clients that only answer PINGs fill every slot...
    let (_a, conn_a) = h2(h.proxy, h2::client::Builder::new()).await;
    let (_b, conn_b) = h2(h.proxy, h2::client::Builder::new()).await;
    // ...until they are sent GOAWAY and closed; then a third is served.
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK);
    for conn in [conn_a, conn_b] {
        bounded("the idle connection to close", conn)
            .await
            .unwrap()
            .expect("a graceful close");
    }
}

#[tokio::test]
async fn an_http2_connection_with_requests_in_flight_is_not_idle() {
    let h = setup()
        .set("limits", "header_read_timeout", Duration::from_millis(200))
        .set("limits", "keepalive_timeout", Duration::from_millis(200))
        .start()
        .await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let (mut send, conn) = h2(h.proxy, h2::client::Builder::new()).await;
    let proxy = h.proxy;
    let slow =
        tokio::spawn(async move { h2_send(&mut send, proxy, "GET", "/data/Slow.json", &[]).await });
    h.sim.wait_until(|s| s.held_at_gates() == 1).await;
    // Held three idle timeouts long (time must pass for the timeout to be
    // tested), then answered on the same, still open, connection.
    tokio::time::sleep(Duration::from_millis(600)).await;
    gate.add_permits(1);
    let (status, _, _) = bounded("the slow answer", slow).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // Now idle: closed.
    bounded("the idle close", conn).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_source_outside_the_allowlist_gets_403_then_loses_the_connection() {
    let h = setup().set("listen", "allow", ["10.0.0.0/8"]).start().await;
    h.ready().await;
    let (mut send, conn) = h2(h.proxy, h2::client::Builder::new()).await;
    let (status, headers, _) = h2_send(&mut send, h.proxy, "GET", "/users.json", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["qbproxy-error"], "forbidden");
    bounded("the connection to close", conn)
        .await
        .unwrap()
        .unwrap();
    // HTTP/1 keep-alive: the 403 closes the connection as well.
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /users.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let a = answer_of(s).await;
    assert_eq!(a.status, 403, "{a:?}");
    assert!(h.sim.requests().is_empty());
}

#[tokio::test]
async fn a_client_that_does_not_read_loses_its_upstream_slots() {
    let h = setup()
        .set("upstream", "max_in_flight", 2)
        .set("upstream", "timeout", Duration::from_secs(10))
        .set("limits", "send_timeout", Duration::from_millis(300))
        .start()
        .await;
    h.ready().await;
    // An HTTP/2 client with a zero window: it takes answers' headers but
    // can never be sent a byte of their bodies.
    let mut zero_window = h2::client::Builder::new();
    zero_window.initial_window_size(0);
    let (mut send, conn) = h2(h.proxy, zero_window).await;
    let mut pending = Vec::new();
    for _ in 0..2 {
        let req = http::Request::get(format!("http://{}/users.json", h.proxy))
            .body(())
            .unwrap();
        send = bounded("ready", send.ready()).await.unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        pending.push(resp);
    }
    for resp in pending.iter_mut() {
        let r = bounded("the headers", resp).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // Both upstream slots are held by bodies nobody reads; another client
    // gets one once the stalled connection is dropped.
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // The connection was dropped (the zero window could never have let it
    // finish on its own).
    let _ = bounded("the stalled connection to end", conn).await;
}

#[tokio::test]
async fn one_connection_holds_at_most_max_streams_requests() {
    let h = setup()
        .set("limits", "max_streams_per_connection", 2)
        .start()
        .await;
    h.ready().await;
    let gate = h.sim.gate("/data/Held");
    // Four streams at once, at the frame level (a library would wait for
    // the server's limit).
    let mut s = frames::open(h.proxy).await;
    // Wait for the server's SETTINGS, acknowledge it, then open streams.
    loop {
        let (kind, flags, _, _) = bounded("SETTINGS", frames::read(&mut s)).await.unwrap();
        if kind == frames::SETTINGS && flags & frames::ACK == 0 {
            break;
        }
    }
    s.write_all(&frames::frame(frames::SETTINGS, frames::ACK, 0, &[]))
        .await
        .unwrap();
    for stream in [1, 3, 5, 7] {
        s.write_all(&frames::request(stream, "GET", "/data/Held.json"))
            .await
            .unwrap();
    }
    // Two are refused outright...
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let (kind, _, stream, payload) = bounded("RST_STREAM", frames::read(&mut s))
            .await
            .expect("the connection stays open");
        if kind == frames::RST_STREAM {
            let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
            assert_eq!(code, frames::REFUSED_STREAM);
            refused.push(stream);
        }
    }
    assert_eq!(refused, [5, 7]);
    // ...and two are in flight upstream.
    h.sim.wait_until(|s| s.held_at_gates() == 2).await;
    gate.add_permits(2);
    h.sim.wait_until(|s| s.held_at_gates() == 0).await;
    assert_eq!(h.sim.max_held_at_gates(), 2);
    assert_eq!(h.sim.requests_to("/data/Held"), 2);
}

/// Closed at `header_read_timeout` (300 ms here), not at the default
/// 10 s: the upper bound leaves room for a loaded machine.
#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed() {
    let h = setup()
        .set("limits", "header_read_timeout", Duration::from_millis(300))
        .start()
        .await;
    let started = std::time::Instant::now();
    let silent = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let a = answer_of(silent).await;
    let closed = started.elapsed();
    assert_eq!(a.status, 0, "closed without an answer: {a:?}");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_secs(3),
        "closed after {closed:?}, not at header_read_timeout (300 ms)"
    );
}

const GREEDY: &str = "greedy-key-0123456789";
const POLITE: &str = "polite-key-0123456789";

/// Two API clients on an upstream of 8 slots; `greedy` with `greedy_cap`
/// as its own `max_in_flight` (none: the default, half the slots).
fn two_clients(greedy_cap: Option<usize>) -> crate::common::Setup {
    let cap = greedy_cap.map_or(String::new(), |n| format!("max_in_flight = {n}\n"));
    setup()
        .identity(DEMO)
        .set("upstream", "max_in_flight", 8)
        .raw_table(&format!(
            "[[client]]\nname = \"greedy\"\nkey = \"{GREEDY}\"\nrate = 30\n{cap}\
             [[client]]\nname = \"polite\"\nkey = \"{POLITE}\"\n"
        ))
}

/// A client keeping 24 slow requests in flight, within its rate, holds
/// only its share (half the slots by default): another client's request
/// is answered while every one of the greedy client's still waits, as if
/// the upstream were idle.
#[tokio::test]
async fn a_greedy_client_holds_only_its_share_of_the_upstream() {
    let h = two_clients(None).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let greedy: Vec<_> = (0..24)
        .map(|i| {
            h.spawn_send(
                http::Method::GET,
                format!("/data/Slow{i}.json"),
                &[("QBProxy-Key", GREEDY)],
                "",
            )
        })
        .collect();
    bounded(
        "the greedy share held",
        h.sim.wait_until(|s| s.held_at_gates() == 4),
    )
    .await;
    let a = h
        .send(
            http::Method::GET,
            "/users.json",
            &[("QBProxy-Key", POLITE)],
            "",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // Answered with every greedy request still held or waiting.
    assert_eq!(h.sim.held_at_gates(), 4);
    assert_eq!(h.sim.requests_to("/data/Slow"), 4);
    gate.add_permits(24);
    for g in greedy {
        assert_eq!(
            bounded("a greedy request", g).await.unwrap().status,
            StatusCode::OK
        );
    }
    assert_eq!(h.sim.max_held_at_gates(), 4, "never more than its share");
}

/// Even a client allowed every slot yields the next free one to a client
/// holding fewer, though its own requests queued first.
#[tokio::test]
async fn a_free_slot_goes_to_the_client_holding_fewer() {
    let h = two_clients(Some(8)).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let greedy: Vec<_> = (0..24)
        .map(|i| {
            h.spawn_send(
                http::Method::GET,
                format!("/data/Slow{i}.json"),
                &[("QBProxy-Key", GREEDY)],
                "",
            )
        })
        .collect();
    bounded(
        "every slot held",
        h.sim.wait_until(|s| s.held_at_gates() == 8),
    )
    .await;
    // The greedy client's 16 others queue for slots.
    h.metric_reaches("qbproxy_upstream_slot_waits_total", 16)
        .await;
    let polite = h.spawn_send(
        http::Method::GET,
        "/users.json",
        &[("QBProxy-Key", POLITE)],
        "",
    );
    h.metric_reaches("qbproxy_upstream_slot_waits_total", 17)
        .await;
    // One greedy request ends: its slot goes to the polite client.
    gate.add_permits(1);
    let a = bounded("the polite request", polite).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // The upstream saw it before any greedy request that queued earlier.
    let order: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    let polite_at = order.iter().position(|p| p == "/users.json").unwrap();
    let slow_before = order[..polite_at]
        .iter()
        .filter(|p| p.starts_with("/data/Slow"))
        .count();
    assert_eq!(slow_before, 8, "{order:?}");
    gate.add_permits(23);
    for g in greedy {
        assert_eq!(
            bounded("a greedy request", g).await.unwrap().status,
            StatusCode::OK
        );
    }
}
