//! Forwarding: what reaches QuickBlox, byte for byte.

use crate::common;

use crate::common::{bounded, raw, setup};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use qbproxy::protocol::{self as signer, Params};

#[tokio::test]
async fn injects_the_current_session_token() {
    let h = setup().start().await;
    h.ready().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let reqs = h.sim.requests();
    assert_eq!(reqs.len(), 1);
    let current = h.handle.default_identity().current().unwrap();
    assert_eq!(reqs[0].token, current.token().to_str().unwrap());
    // The simulator knows whose token that is: the configured user's.
    assert_eq!(reqs[0].user_id, 1001);
    assert_eq!(a.json()["echo"]["user_id"], 1001);
}

/// The query goes byte for byte; the path goes in its canonical form (see
/// tests/it/adversarial.rs), which for an ordinary path is itself.
#[tokio::test]
async fn host_is_rewritten_and_queries_go_byte_for_byte() {
    let h = setup().start().await;
    h.ready().await;
    let target =
        "/users.json?filter%5Bname%5D=a%2Cb&x=%7E~&sp=a+b%20c&u=%C3%A9&odd=!$'()*,;=:@/?&&empty=";
    let paths = [
        target,
        "//users//1001.json?",
        "/chat/Message.json?chat_dialog_id=5f%2F1&sort_desc=date_sent",
    ];
    for path in paths {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n");
        let resp = raw(h.proxy, req.as_bytes()).await;
        // The simulator's answer (it knows no such dialog: 404), not a
        // refusal of qbproxy's.
        assert!(
            resp.contains("\"echo\"") && !resp.contains("qbproxy-error"),
            "{resp}"
        );
    }
    let reqs = h.sim.requests();
    let seen: Vec<&str> = reqs.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(seen, [paths[0], "/users/1001.json?", paths[2]]);
    let sim_authority = h.sim.addr().to_string();
    for r in &reqs {
        assert_eq!(r.headers["host"], sim_authority.as_str());
        assert_eq!(r.headers.get_all("host").iter().count(), 1);
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_the_client_token_replaced() {
    let h = setup().start().await;
    h.ready().await;
    let req = "POST /data/Note.json HTTP/1.1\r\n\
               Host: client.example\r\n\
               Connection: close, Keep-Alive, TE\r\n\
               Keep-Alive: timeout=5\r\n\
               Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
               Proxy-Connection: keep-alive\r\n\
               TE: trailers\r\n\
               QB-Token: the-clients-own-token\r\n\
               QBProxy-Anything: for the proxy only\r\n\
               X-End-To-End: keep me\r\n\
               Content-Type: application/json\r\n\
               Content-Length: 11\r\n\r\n\
               {\"a\":\"b\"}\r\n";
    let resp = raw(h.proxy, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let r = &h.sim.requests()[0];
    for gone in [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "qbproxy-anything",
    ] {
        assert!(
            !r.headers.contains_key(gone),
            "{gone} was forwarded: {:?}",
            r.headers
        );
    }
    assert_eq!(r.headers["x-end-to-end"], "keep me");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers.get_all("qb-token").iter().count(), 1);
    let ours = h.handle.default_identity().current().unwrap();
    assert_eq!(r.headers["qb-token"], ours.token().to_str().unwrap());
    assert_eq!(&r.body[..], b"{\"a\":\"b\"}\r\n");
}

#[tokio::test]
async fn keep_mode_forwards_the_clients_own_token_untouched() {
    let h = setup().set("proxy", "client_token", "keep").start().await;
    h.ready().await;
    // A client with its own (dead) token sees QuickBlox's answer; qbproxy
    // neither replaces nor renews for it.
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QB-Token", "clients-own")],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.text().contains("Required session does not exist"));
    assert_eq!(h.sim.creations(), 1);
    assert_eq!(h.metric("qbproxy_replays_total{identity=\"demo\""), 0);
    // Without a token of its own, the client gets qbproxy's.
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn calls_that_would_touch_the_shared_session_get_403() {
    let h = setup().start().await;
    h.ready().await;
    let cases = [
        (Method::DELETE, "/session.json"),
        (Method::DELETE, "/%73ession.json"),
        (Method::DELETE, "/Session.json/"),
        (Method::POST, "/login.json"),
        (Method::DELETE, "/login.json"),
        (Method::POST, "/login"),
    ];
    for (method, path) in cases {
        let a = h
            .send(
                method.clone(),
                path,
                &[("Content-Type", "application/json")],
                r#"{"login":"other","password":"other-password"}"#,
            )
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(a.headers["qbproxy-error"], "shared-session");
        assert_eq!(a.headers["content-type"], "application/json");
        assert!(
            a.error_message()
                .starts_with("qbproxy: the session is shared"),
            "{}",
            a.text()
        );
    }
    // None reached QuickBlox, and the session is intact: still the same
    // user, no renewal needed.
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    let a = h.get("/session.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["session"]["user_id"], 1001);
    assert_eq!(h.sim.creations(), 1);
    assert_eq!(
        h.metric("qbproxy_requests_total{code=\"403\",identity=\"demo\""),
        6
    );
}

#[tokio::test]
async fn a_clients_own_session_creation_passes_through_untouched() {
    let h = setup().start().await;
    h.ready().await;
    let app = h.sim.config().clone();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let params = Params::new()
        .str("application_id", app.application_id.as_str())
        .str("auth_key", app.auth_key.as_str())
        .str("timestamp", ts)
        .str("nonce", "424242")
        .map(
            "user",
            &[("login", "other"), ("password", "other-password")],
        );
    let sig = signer::sign(&app.auth_secret, &params);
    let body = params.str("signature", sig).to_json().to_string();
    let a = h
        .send(
            Method::POST,
            "/session.json",
            &[("Content-Type", "application/json")],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let session = a.json();
    assert_eq!(session["session"]["user_id"], 1002);
    // The client got its own session; qbproxy's is not the one it received.
    let ours = h.handle.default_identity().current().unwrap();
    assert_ne!(session["session"]["token"], ours.token().to_str().unwrap());
    assert_eq!(h.sim.creations(), 2);
}

#[tokio::test]
async fn serves_http2_clients() {
    let h = setup().start().await;
    h.ready().await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let req = http::Request::get(format!("http://{}/users.json?v=2", h.proxy))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = bounded("h2 response", client.request(req)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("/users.json?v=2"));
    assert_eq!(
        h.sim.requests()[0].headers["host"],
        h.sim.addr().to_string().as_str()
    );
}

#[tokio::test]
async fn bodies_larger_than_the_replay_limit_arrive_intact() {
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let a = h
        .send(
            Method::POST,
            "/blobs.json",
            &[("Content-Type", "application/octet-stream")],
            big.clone(),
        )
        .await;
    // The simulator makes a file record of it.
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.json()["echo"]["body_bytes"], big.len());
    assert_eq!(h.sim.requests()[0].body, big);
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_kept_alive() {
    let h = setup().start().await;
    h.ready().await;
    for i in 0..20 {
        let a = h.get(&format!("/users.json?i={i}")).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    // The session creation and 20 sequential requests share one connection.
    assert_eq!(h.sim.connections(), 1);
}

/// A legacy client that sends a token of its own acts as the shared
/// identity: each such request is counted, and the first on each
/// connection is logged.
#[tokio::test]
async fn replaced_client_tokens_are_counted_and_logged_once_per_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = common::capture_logs();
    let h = setup().start().await;
    h.ready().await;
    let get = |close: bool| {
        format!(
            "GET /users.json HTTP/1.1\r\nHost: x\r\nQB-Token: legacy-own-token\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    // Two requests on one connection, one on another.
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(format!("{}{}", get(false), get(true)).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    common::bounded("two answers", s.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert!(raw(h.proxy, get(true).as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));

    assert_eq!(
        h.metric("qbproxy_client_tokens_replaced_total{identity=\"demo\",pool=\"\"}"),
        3
    );
    let ours = h.token();
    for r in h.sim.requests() {
        assert_eq!(r.token, ours, "the upstream saw the identity's token");
    }
    let text = logs.text();
    let logged: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sent credentials of its own") && l.contains("header=\"qb-token\""))
        .collect();
    let on_first = logged
        .iter()
        .filter(|l| l.contains(&format!("127.0.0.1:{port}")))
        .count();
    assert_eq!(on_first, 1, "once for the connection of two: {logged:?}");
    assert!(logged.iter().all(|l| !l.contains("legacy-own-token")));
}
