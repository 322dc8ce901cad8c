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

use super::{h2, h2_send, raw, request};
use crate::common::{last_received, setup};

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
    let h = setup().set("proxy", "client_token", "keep").start().await;
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

const SVC: &str = "name = \"svc\"\napi_key = \"demo-api-key\"\non_behalf_of = 1001\n";

/// A client's own credentials, in as many spellings and copies as HTTP/1
/// allows: none of them reaches QuickBlox; the identity's alone does,
/// whether it is a session or an API key.
#[tokio::test]
async fn a_clients_own_credentials_never_reach_the_upstream() {
    let mut sim_config = qbproxy_sim::SimConfig::demo();
    sim_config.api_keys.push("stolen-key".into());
    let sim = qbproxy_sim::Sim::start(sim_config).await.unwrap();
    let h = setup()
        .sim(sim.clone())
        .identity(super::DEMO)
        .identity(SVC)
        .start()
        .await;
    h.ready().await;
    let token = h.token();
    let spelt = [
        ("authorization", "apikey stolen-key"),
        ("AUTHORIZATION", "ApiKey stolen-key"),
        ("On-Behalf-Of", "1002"),
        ("on-behalf-of", "1003"),
        ("QB-Token", "clients-own-token"),
        ("qb-token", "another-one"),
    ];
    for identity in ["demo", "svc"] {
        let mut headers = spelt.to_vec();
        headers.push(("QBProxy-Identity", identity));
        let a = raw(h.proxy, &request("GET", "/users.json", &headers, "")).await;
        assert_eq!(a.status, 200, "{identity}: {}", a.head);
        let (tokens, keys, users) = (
            last_received(&sim, "qb-token"),
            last_received(&sim, "authorization"),
            last_received(&sim, "on-behalf-of"),
        );
        if identity == "demo" {
            assert_eq!(tokens, vec![token.as_str()]);
            assert!(keys.is_empty() && users.is_empty(), "{keys:?} {users:?}");
        } else {
            assert!(tokens.is_empty(), "{tokens:?}");
            assert_eq!(keys, ["ApiKey demo-api-key"]);
            assert_eq!(users, ["1001"]);
        }
    }
    // The same over HTTP/2.
    let (mut send, _conn) = h2(h.proxy, ::h2::client::Builder::new()).await;
    let mut headers: Vec<(&str, &str)> = spelt
        .iter()
        .map(|(k, v)| (*k, *v))
        .filter(|(k, _)| k.bytes().all(|b| !b.is_ascii_uppercase()))
        .collect();
    headers.push(("qbproxy-identity", "svc"));
    let (status, _, _) = h2_send(&mut send, h.proxy, "GET", "/users.json", &headers).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        last_received(&sim, "authorization"),
        ["ApiKey demo-api-key"]
    );
    assert_eq!(last_received(&sim, "on-behalf-of"), ["1001"]);
    // Counted as replaced, like a legacy client's token.
    assert_eq!(
        h.metric("qbproxy_client_tokens_replaced_total{identity=\"svc\",pool=\"\"}"),
        2
    );
    assert_eq!(
        h.metric("qbproxy_client_tokens_replaced_total{identity=\"demo\",pool=\"\"}"),
        1
    );
}

/// With `client_token = "keep"` a client may send its own API key (and
/// act as whom it names), never the key qbproxy holds, however spelt or
/// hidden among other values; an `On-Behalf-Of` alone is no credential.
#[tokio::test]
async fn in_keep_mode_an_api_key_qbproxy_holds_is_refused_in_any_spelling() {
    let mut sim_config = qbproxy_sim::SimConfig::demo();
    sim_config.api_keys.push("clients-own-key".into());
    let sim = qbproxy_sim::Sim::start(sim_config).await.unwrap();
    let h = setup()
        .sim(sim.clone())
        .identity(SVC)
        .set("proxy", "client_token", "keep")
        .start()
        .await;
    h.ready().await;
    let held: [&[(&str, &str)]; 5] = [
        &[("Authorization", "ApiKey demo-api-key")],
        &[("authorization", "  APIKEY \t demo-api-key ")],
        &[
            ("Authorization", "ApiKey clients-own-key"),
            ("Authorization", "ApiKey demo-api-key"),
        ],
        &[(
            "Authorization",
            "ApiKey clients-own-key, ApiKey demo-api-key",
        )],
        &[("QB-Token", "demo-api-key")],
    ];
    for headers in held {
        let a = raw(h.proxy, &request("GET", "/users.json", headers, "")).await;
        assert_eq!(a.status, 403, "{headers:?}: {}", a.head);
        assert_eq!(a.error_code(), "held-token", "{headers:?}");
        assert!(!a.body.contains("demo-api-key"));
    }
    let (mut send, _conn) = h2(h.proxy, ::h2::client::Builder::new()).await;
    let (status, resp, _) = h2_send(
        &mut send,
        h.proxy,
        "GET",
        "/users.json",
        &[("authorization", "apikey demo-api-key")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(resp["qbproxy-error"], "held-token");
    assert!(sim.requests().is_empty(), "nothing reached QuickBlox");

    // The client's own key passes untouched, with the user it names.
    let own = [
        ("Authorization", "ApiKey clients-own-key"),
        ("On-Behalf-Of", "1002"),
    ];
    let a = raw(h.proxy, &request("GET", "/users.json", &own, "")).await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(
        last_received(&sim, "authorization"),
        ["ApiKey clients-own-key"]
    );
    assert_eq!(last_received(&sim, "on-behalf-of"), ["1002"]);
    // An On-Behalf-Of alone rides on the identity's key: dropped.
    let a = raw(
        h.proxy,
        &request("GET", "/users.json", &[("On-Behalf-Of", "1002")], ""),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(
        last_received(&sim, "authorization"),
        ["ApiKey demo-api-key"]
    );
    assert_eq!(last_received(&sim, "on-behalf-of"), ["1001"]);
}
