//! qbproxy in front of real servers that nobody here wrote: Debian's nginx
//! and HAProxy terminating TLS, over HTTP/2 and over HTTP/1.1, in front of
//! the simulator, as QuickBlox (and most Rails deployments) are fronted.
//! Session creation, forwarding, expiry with replay, API keys and large
//! bodies, each asserted on what the simulator received behind the edge.

use crate::common::edge::{Edge, Options, Server};
use crate::common::{bounded, demo_sim, last_received, setup, Harness};
use bytes::Bytes;
use http::Method;

/// qbproxy (`upstream.http2 = http2`) in front of `edge`, the simulator
/// behind it; identities: the user "demo" (default) and the API key "svc".
async fn through(edge: &Edge, sim: qbproxy_sim::Sim, http2: bool) -> Harness {
    let h = setup()
        .sim(sim)
        .upstream_url(&edge.url())
        .set("upstream", "ca_file", edge.ca_file())
        .set("upstream", "http2", http2)
        .identity("name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n")
        .identity("name = \"svc\"\napi_key = \"demo-api-key\"\non_behalf_of = 1001\n")
        .start()
        .await;
    h.ready().await;
    h
}

/// Every flow qbproxy has, through `server` (offering HTTP/2 by ALPN if
/// `edge_h2`), with qbproxy's `upstream.http2 = qb_h2`; `protocol` is what
/// the edge must have been spoken to with.
async fn every_flow_through(server: Server, edge_h2: bool, qb_h2: bool, protocol: &str) {
    let sim = demo_sim().await;
    let edge = Edge::start(
        server,
        sim.addr(),
        Options {
            http2: edge_h2,
            ..Options::default()
        },
    )
    .await;
    let h = through(&edge, sim.clone(), qb_h2).await;
    let log = || edge.log();

    // The session was created through the edge.
    assert_eq!(sim.creations(), 1, "{}", log());

    // Forwarding: the token reached the simulator, over `protocol`.
    let a = h.get("/users.json?per_page=2").await;
    assert_eq!(a.status, 200, "{}\n{}", a.text(), log());
    assert_eq!(last_received(&sim, "x-edge-protocol"), [protocol]);
    assert_eq!(last_received(&sim, "qb-token"), [h.token()]);
    // One Host reached the simulator, the one the edge was asked for.
    assert_eq!(
        last_received(&sim, "host"),
        [format!("localhost:{}", edge.port)]
    );

    // Expiry: QuickBlox's 401 through the edge, one renewal, the replay.
    let expired = h.token();
    assert!(sim.expire_all() >= 1);
    let a = h.get("/users.json").await;
    assert_eq!(a.status, 200, "{}\n{}", a.text(), log());
    assert_eq!(sim.creations(), 2);
    assert_eq!(sim.refusals(), 1);
    assert_ne!(h.token(), expired);
    assert_eq!(last_received(&sim, "qb-token"), [h.token()]);
    assert_eq!(
        h.metric("qbproxy_replays_total{identity=\"demo\",pool=\"\"}"),
        1
    );

    // An API key identity: its key and user, no session.
    let a = h
        .send(
            Method::GET,
            "/users/1001.json",
            &[("QBProxy-Identity", "svc")],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, 200, "{}\n{}", a.text(), log());
    assert_eq!(
        last_received(&sim, "authorization"),
        ["ApiKey demo-api-key"]
    );
    assert_eq!(last_received(&sim, "on-behalf-of"), ["1001"]);
    assert_eq!(sim.creations(), 2, "an API key creates no session");

    // Bodies: one buffered for a replay, one past replay_body_limit that
    // streams; each arrives whole.
    for len in [300 * 1024, 5 * 1024 * 1024] {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
        let a = h
            .send(
                Method::POST,
                "/data/Note.json",
                &[("Content-Type", "application/octet-stream")],
                body,
            )
            .await;
        assert_eq!(a.status, 200, "{}\n{}", a.text(), log());
        let echo = &a.json()["echo"];
        assert_eq!(echo["body_bytes"], len, "{len} bytes");
        assert_eq!(echo["body_sha256"], sha, "{len} bytes");
        assert_eq!(last_received(&sim, "x-edge-protocol"), [protocol]);
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_through_nginx_over_http2() {
    every_flow_through(Server::Nginx, true, true, "HTTP/2.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_through_nginx_over_http1_when_it_offers_only_that() {
    every_flow_through(Server::Nginx, false, true, "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_through_nginx_over_http1_with_http2_turned_off() {
    every_flow_through(Server::Nginx, true, false, "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_through_haproxy_over_http2() {
    every_flow_through(Server::Haproxy, true, true, "HTTP/2.0").await;
}

/// Many POSTs in flight at once over HTTP/2 to nginx, whose writes qbproxy
/// gathers (`upstream/coalesce.rs`): bodies from none to past the
/// gathering limit, each received whole behind nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_over_http2_arrive_whole() {
    let sim = demo_sim().await;
    let edge = Edge::start(Server::Nginx, sim.addr(), Options::default()).await;
    let h = through(&edge, sim.clone(), true).await;
    let sizes = [0usize, 1, 255, 256, 2048, 16_384, 16_385, 70_000];
    let calls: Vec<_> = (0..64usize)
        .map(|i| {
            let len = sizes[i % sizes.len()];
            let body: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
            let call = h.spawn_send(
                Method::POST,
                format!("/data/Note{i}.json"),
                &[("Content-Type", "application/octet-stream")],
                body,
            );
            (i, len, sha, call)
        })
        .collect();
    for (i, len, sha, call) in calls {
        let a = bounded("a POST", call).await.unwrap();
        assert_eq!(a.status, 200, "{}\n{}", a.text(), edge.log());
        let echo = &a.json()["echo"];
        assert_eq!(echo["path"], format!("/data/Note{i}.json"));
        assert_eq!(echo["body_bytes"], len, "POST {i}");
        assert_eq!(echo["body_sha256"], sha, "POST {i}");
    }
    assert_eq!(
        h.metric("qbproxy_upstream_connections_opened_total{protocol=\"h2\"}"),
        1,
        "64 streams fit on one connection"
    );
}

/// A client's HTTP/2 request may carry one `cookie` field per cookie (RFC
/// 9113 §8.2.3); an HTTP/1.1 upstream gets them joined into one header,
/// where it would keep only the last of several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_cookie_fields_reach_an_http1_upstream_as_one_header() {
    let h = setup().start().await;
    h.ready().await;
    let tcp = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let (mut client, conn) = bounded("an h2 handshake", h2::client::handshake(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/users.json", h.proxy))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = bounded("the h2 answer", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(last_received(&h.sim, "cookie"), ["a=1; b=2; c=3"]);
}
