//! No client ever gets a token qbproxy holds: not from `GET /session.json`,
//! not from a response header, and a stolen one cannot be sent back.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::common::setup;
use crate::{h2, h2_send, raw, request};

#[tokio::test]
async fn get_session_is_answered_by_qbproxy_without_the_token() {
    let h = setup().start().await;
    h.ready().await;
    let token = h.token();
    for target in [
        "/session.json",
        "/Session.json",
        "//session.json/",
        "/session",
    ] {
        let a = raw(h.proxy, &request("GET", target, &[], "")).await;
        assert_eq!(a.status, 200, "{target}: {a:?}");
        assert_eq!(a.header("qbproxy-answered"), Some("session"));
        assert!(
            !a.body.contains(&token),
            "{target} leaked the token: {}",
            a.body
        );
        assert!(!a.body.contains("\"token\""), "{}", a.body);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let s = &v["session"];
        // The other fields stay, as QuickBlox gave them.
        assert_eq!(s["user_id"], 1001);
        assert_eq!(s["application_id"], 76730);
        assert!(
            s["id"].as_u64().is_some() && s["created_at"].as_str().is_some(),
            "{s}"
        );
    }
    let a = raw(h.proxy, &request("GET", "/session.xml", &[], "")).await;
    assert!(
        a.body.contains("<user-id type=\"integer\">1001</user-id>"),
        "{}",
        a.body
    );
    assert!(!a.body.contains(&token));
    let a = raw(h.proxy, &request("HEAD", "/session.json", &[], "")).await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_empty());
    // Over HTTP/2 too.
    let (mut send, _conn) = h2(h.proxy, h2::client::Builder::new()).await;
    let (status, _, body) = h2_send(&mut send, h.proxy, "GET", "/session.json", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!String::from_utf8_lossy(&body).contains(&token));
    // None of these reached QuickBlox.
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
}

/// An upstream that creates sessions and echoes the token it received in
/// response headers, in two spellings.
async fn leaky_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let resp = if req.uri().path() == "/session.json" {
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from_static(
                            br#"{"session":{"token":"held-token-0123456789","user_id":7,"id":1}}"#,
                        )))
                } else {
                    let token = req.headers().get("qb-token").cloned();
                    let mut b = Response::builder();
                    if let Some(t) = token {
                        b = b.header("QB-Token", t.clone()).header("QB_Token", t);
                    }
                    b.body(Full::new(Bytes::from_static(b"{}")))
                };
                Ok::<_, Infallible>(resp.unwrap())
            });
            tokio::spawn(
                auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned(),
            );
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn qb_token_response_headers_never_reach_a_client() {
    let url = leaky_upstream().await;
    let h = setup()
        .identity("name = \"app\"\n")
        .upstream_url(&url)
        .start()
        .await;
    h.ready().await;
    let a = raw(h.proxy, &request("GET", "/users.json", &[], "")).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        !a.head.to_ascii_lowercase().contains("qb-token"),
        "{}",
        a.head
    );
    assert!(
        !a.head.to_ascii_lowercase().contains("qb_token"),
        "{}",
        a.head
    );
    assert!(!a.head.contains("held-token"), "{}", a.head);
}

#[tokio::test]
async fn in_keep_mode_a_token_qbproxy_holds_or_held_is_refused() {
    let h = setup()
        .set("proxy", "client_token", "\"keep\"")
        .start()
        .await;
    h.ready().await;
    let current = h.token();
    // The current token, sent back: 403, and the session stays.
    for method in [Method::DELETE, Method::GET] {
        let a = h
            .send(
                method.clone(),
                "/session.json",
                &[("QB-Token", current.as_str())],
                "",
            )
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method}");
        assert_eq!(a.headers["qbproxy-error"], "held-token");
        assert!(!a.text().contains(&current));
    }
    assert!(h.sim.requests().is_empty());
    // Renewed after an expiry: the old token is still refused.
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let renewed = h.token();
    assert_ne!(renewed, current);
    for token in [&current, &renewed] {
        let a = h
            .send(
                Method::POST,
                "/login.json",
                &[("QB-Token", token.as_str())],
                "{}",
            )
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert_eq!(a.headers["qbproxy-error"], "held-token");
    }
    // A client's own token still passes untouched (the simulator does not
    // know it, and says so).
    let refusals = h.sim.refusals();
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QB-Token", "clients-own-token")],
            "",
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.sim.refusals(), refusals + 1);
}
