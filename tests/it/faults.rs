//! Upstream faults: each test ends with the proxy still serving, and no
//! request lost that could have been replayed. The upstream is a raw TCP
//! script that answers `POST /session.json` properly and misbehaves on
//! everything else as told.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::setup;
use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Headers and part of the body, then the connection closes.
    CloseMidResponse,
    /// A good answer on a keep-alive connection, then the connection is
    /// closed before the next request.
    ResetKeepAlive,
    /// Bytes that are not HTTP.
    Garbage,
}

const SESSION: &str = r#"{"session":{"token":"faulty-upstream-token","user_id":7}}"#;

/// Serves until the test ends. Counts the requests it saw (not sessions).
async fn faulty_upstream(fault: Fault, seen: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(conn, fault, seen.clone()));
        }
    });
    format!("http://{addr}")
}

async fn serve(mut conn: TcpStream, fault: Fault, seen: Arc<AtomicUsize>) {
    loop {
        let Some(head) = read_request(&mut conn).await else {
            return;
        };
        if head.starts_with("POST /session.json") {
            let resp = format!(
                "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{SESSION}",
                SESSION.len()
            );
            if conn.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        seen.fetch_add(1, Ordering::SeqCst);
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
        let _ = match fault {
            Fault::CloseMidResponse => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"partial\":")
                    .await
            }
            Fault::ResetKeepAlive => conn.write_all(ok.as_bytes()).await,
            Fault::Garbage => conn.write_all(b"\x00\x01garbage, not http\r\n\r\n").await,
        };
        // Every fault ends the connection after one answer.
        return;
    }
}

/// Reads one request (head and a Content-Length body); `None` at EOF.
async fn read_request(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.ok()?;
    Some(head)
}

async fn proxy_in_front_of(url: &str) -> common::Harness {
    let sim = common::demo_sim().await; // credentials only
    let text = setup().upstream_url(url).config_text(&sim);
    let h = common::start_app(sim, Config::from_toml(&text, Path::new("t")).unwrap()).await;
    h.ready().await;
    h
}

#[tokio::test]
async fn an_upstream_closing_mid_response_gives_a_clear_error_and_the_proxy_serves_on() {
    let seen = Arc::new(AtomicUsize::new(0));
    let h = proxy_in_front_of(&faulty_upstream(Fault::CloseMidResponse, seen.clone()).await).await;
    for _ in 0..3 {
        // The head arrived and was passed on; the body is cut short. The
        // client sees a broken response, never a made-up complete one.
        let resp = common::client()
            .get(format!("http://{}/users.json", h.proxy).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "a truncated body must not look complete");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn reset_keep_alive_connections_lose_no_request() {
    let seen = Arc::new(AtomicUsize::new(0));
    let h = proxy_in_front_of(&faulty_upstream(Fault::ResetKeepAlive, seen.clone()).await).await;
    // Every pooled connection dies after one answer: the next request finds
    // it closed and goes out on a new one.
    for i in 0..20 {
        let method = if i % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let a = h
            .send(
                method,
                &format!("/users.json?{i}"),
                &[],
                Bytes::from_static(b"{}"),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        20,
        "each request reached the upstream once"
    );
}

#[tokio::test]
async fn garbage_from_the_upstream_is_a_502_and_the_proxy_serves_on() {
    let seen = Arc::new(AtomicUsize::new(0));
    let h = proxy_in_front_of(&faulty_upstream(Fault::Garbage, seen.clone()).await).await;
    for _ in 0..3 {
        let a = h.get("/users.json").await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        assert_eq!(a.headers["qbproxy-error"], "upstream-error");
        assert!(
            a.error_message()
                .starts_with("qbproxy: error talking to QuickBlox"),
            "{}",
            a.text()
        );
    }
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
}

/// The upstream's name stops resolving, then its port stops answering;
/// each time the client gets a 502 that says which, and once the upstream
/// is back the proxy serves again with the session it had.
#[tokio::test]
async fn dns_and_connect_failures_are_clear_502s_and_the_proxy_serves_on() {
    let h = setup().start().await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let reload_to = |url: String| {
        let text = setup().upstream_url(&url).config_text(&h.sim);
        let handle = h.handle.clone();
        async move {
            handle
                .reload(Config::from_toml(&text, Path::new("t")).unwrap())
                .await
                .unwrap();
        }
    };

    // A DNS label longer than 63 bytes (RFC 1035): the system resolver
    // refuses the name without sending a query, so this stays on the
    // machine.
    reload_to(format!("http://{}.qbproxy.invalid", "a".repeat(64))).await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert_eq!(a.headers["qbproxy-error"], "upstream-unreachable");
    assert!(a.error_message().contains("dns error"), "{}", a.text());

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    reload_to(format!("http://{closed}")).await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert_eq!(a.headers["qbproxy-error"], "upstream-unreachable");
    assert!(
        a.error_message().contains("Connection refused"),
        "{}",
        a.text()
    );
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);

    reload_to(h.sim.url()).await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(h.sim.creations(), 1, "the session survived the outage");
    assert_eq!(h.sim.requests_to("/users.json"), 2);
}
