//! qbproxy's connections to the upstream (`upstream/pool.rs`), against a
//! real nginx where the behaviour is nginx's (stream limits, GOAWAY after
//! `keepalive_requests`, idle closes, TLS session tickets), and against the
//! simulator where only the count of connections matters. Every test
//! asserts what the upstream received, not only what the client saw.

use crate::common;
use std::time::Duration;

use std::collections::BTreeMap;

use crate::common::edge::{Edge, Options, Server};
use crate::common::relay::Relay;
use crate::common::{bounded, demo_sim, setup, Harness, Setup};
use bytes::Bytes;
use http::Method;

const H2_OPEN: &str = "qbproxy_upstream_connections{protocol=\"h2\"}";
const H1_OPEN: &str = "qbproxy_upstream_connections{protocol=\"http/1.1\"}";
const H2_OPENED: &str = "qbproxy_upstream_connections_opened_total{protocol=\"h2\"}";
const H1_OPENED: &str = "qbproxy_upstream_connections_opened_total{protocol=\"http/1.1\"}";

/// qbproxy in front of `url` (an edge, or a relay in front of one), trusting
/// the edge's CA; the user "demo" is the identity.
fn in_front_of(url: &str, edge: &Edge) -> Setup {
    setup()
        .upstream_url(url)
        .set("upstream", "ca_file", edge.ca_file())
}

async fn nginx(sim: &qbproxy_sim::Sim, options: Options) -> Edge {
    Edge::start(Server::Nginx, sim.addr(), options).await
}

/// The simulator, nginx in front of it set up with `options`, and qbproxy
/// in front of nginx, its first session made.
async fn through_nginx(options: Options) -> (qbproxy_sim::Sim, Edge, Harness) {
    let sim = demo_sim().await;
    let edge = nginx(&sim, options).await;
    let h = in_front_of(&edge.url(), &edge)
        .sim(sim.clone())
        .start()
        .await;
    h.ready().await;
    (sim, edge, h)
}

/// nginx allows 4 streams per connection: ten requests in flight at once
/// take three connections (hyper-util's pool kept one and queued six), and
/// none is refused for going past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_http2_connections_open_when_the_servers_streams_run_out() {
    let (sim, edge, h) = through_nginx(Options {
        max_streams: 4,
        ..Options::default()
    })
    .await;
    assert_eq!(h.metric(H2_OPENED), 1, "the session's connection");
    let gate = sim.gate("/data/Slow");
    let sent: Vec<_> = (0..10)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Slow{i}.json"), &[], ""))
        .collect();
    // Bounded as every wait is; on a timeout, say where the requests are.
    let held =
        tokio::time::timeout(common::BOUND, sim.wait_until(|s| s.held_at_gates() == 10)).await;
    assert!(
        held.is_ok(),
        "ten requests held: {} at the gate; qbproxy: {}; nginx: {}",
        sim.held_at_gates(),
        metrics(&h),
        edge.log()
    );
    assert_eq!(h.metric(H2_OPENED), 3, "{}", edge.log());
    assert_eq!(h.metric(H2_OPEN), 3);
    assert_eq!(h.metric("qbproxy_upstream_in_flight"), 10);
    gate.add_permits(10);
    for s in sent {
        let a = bounded("a held request", s).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(h.metric("qbproxy_upstream_resent_total"), 0);
    assert_eq!(h.metric("qbproxy_upstream_in_flight"), 0);
    // nginx's own record: no connection carried more than four of them.
    let mut per_connection: BTreeMap<String, usize> = BTreeMap::new();
    for line in edge.access_lines() {
        if line.contains("/data/Slow") {
            *per_connection
                .entry(line.split(' ').next().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(per_connection.values().sum::<usize>(), 10);
    assert!(
        per_connection.values().all(|n| *n <= 4),
        "{per_connection:?}"
    );
}

/// nginx sends GOAWAY after every 10 requests on a connection; 300
/// requests (GETs and POSTs) 30 at a time all succeed, each reaches the
/// upstream exactly once, and the refused ones were sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_after_keepalive_requests_loses_no_request_and_sends_none_twice() {
    let (_sim, _edge, h) = through_nginx(Options {
        keepalive_requests: 10,
        ..Options::default()
    })
    .await;
    churn(&h, 0..300, 30).await;
    let m = metrics(&h);
    assert!(h.metric("qbproxy_upstream_goaways_total") >= 29, "{m}");
    assert!(
        h.metric("qbproxy_upstream_goaways_total") >= h.metric(H2_OPENED) - h.metric(H2_OPEN),
        "a GOAWAY for every connection closed: {m}"
    );
    // Refused streams went again; once the budget of 10 requests per
    // connection was learnt, (next to) none is refused any more: without
    // it, every connection would refuse about 20 of the 30 sent to it.
    let resent = h.metric("qbproxy_upstream_resent_total");
    assert!(resent >= 1, "{m}");
    churn(&h, 300..600, 30).await;
    let m = metrics(&h);
    let again = h.metric("qbproxy_upstream_resent_total") - resent;
    assert!(
        again <= 5,
        "{again} sent again after the budget was learnt: {m}"
    );
}

/// Over HTTP/1.1 nginx closes each connection after 10 requests (saying
/// `Connection: close` on the last answer): 300 requests 30 at a time all
/// succeed, each reaching the upstream exactly once, on new connections as
/// the old ones close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_closes_after_keepalive_requests_lose_no_request_and_send_none_twice() {
    let (_sim, _edge, h) = through_nginx(Options {
        keepalive_requests: 10,
        http2: false,
        ..Options::default()
    })
    .await;
    churn(&h, 0..300, 30).await;
    let m = metrics(&h);
    assert!(h.metric(H1_OPENED) >= 30, "{m}");
    assert_eq!(h.metric(H2_OPENED), 0, "{m}");
}

/// Sends the requests numbered `ids`, `at_once` at a time, half of them
/// POSTs; asserts every one succeeded and reached the simulator exactly
/// once.
async fn churn(h: &Harness, ids: std::ops::Range<usize>, at_once: usize) {
    let all = ids.clone();
    let mut ids = ids.peekable();
    let mut running = tokio::task::JoinSet::new();
    while ids.peek().is_some() || !running.is_empty() {
        while running.len() < at_once {
            let Some(i) = ids.next() else { break };
            let (method, body) = if i % 2 == 0 {
                (Method::GET, Bytes::new())
            } else {
                (Method::POST, Bytes::from(format!("{{\"n\":{i}}}")))
            };
            let call = h.spawn_send(
                method,
                format!("/data/Churn.json?n={i}"),
                &[("Content-Type", "application/json")],
                body,
            );
            running.spawn(async move { (i, call.await.unwrap()) });
        }
        if let Some(done) = bounded("a request", running.join_next()).await {
            let (i, a) = done.unwrap();
            assert_eq!(a.status, 200, "request {i}: {}", a.text());
        }
    }
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    for r in h.sim.requests() {
        if let Some(i) = r.path_and_query.strip_prefix("/data/Churn.json?n=") {
            *seen.entry(i.parse().unwrap()).or_default() += 1;
        }
    }
    let wrong: Vec<_> = all.filter(|i| seen.get(i) != Some(&1)).collect();
    assert!(wrong.is_empty(), "not received exactly once: {wrong:?}");
}

fn metrics(h: &Harness) -> String {
    h.handle
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("qbproxy_upstream"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// nginx closes connections idle for a second (HTTP/2 with GOAWAY,
/// HTTP/1.1 with a FIN); qbproxy sees each close, and the next request goes
/// on a new connection without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_idle_close_costs_no_request() {
    for (http2, open) in [(true, H2_OPEN), (false, H1_OPEN)] {
        let (sim, _edge, h) = through_nginx(Options {
            keepalive_timeout: 1,
            http2,
            ..Options::default()
        })
        .await;
        for round in 0..2 {
            let a = h.get("/users.json").await;
            assert_eq!(a.status, 200, "round {round}: {}", a.text());
            // nginx closes the idle connection; nothing was sent on it.
            h.metric_becomes(open, 0).await;
        }
        assert_eq!(sim.requests_to("/users"), 2);
        assert_eq!(h.metric("qbproxy_upstream_resent_total"), 0);
    }
}

/// A load balancer that drops idle connections without a word (AWS ALB, a
/// NAT gateway): HTTP/2 PINGs go unanswered, qbproxy closes the connection
/// before any request meets it, and the next request opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_find_a_connection_a_load_balancer_dropped_silently() {
    let sim = demo_sim().await;
    let edge = nginx(&sim, Options::default()).await;
    let relay = Relay::start(([127, 0, 0, 1], edge.port).into()).await;
    let h = in_front_of(&format!("https://localhost:{}", relay.addr.port()), &edge)
        .set("upstream", "ping_interval", Duration::from_millis(200))
        .set("upstream", "ping_timeout", Duration::from_millis(300))
        .sim(sim.clone())
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, 200);
    assert_eq!(h.metric(H2_OPEN), 1);
    relay.drop_open_connections_silently();
    // The unanswered PING closes it, with no request involved.
    h.metric_becomes(H2_OPEN, 0).await;
    assert_eq!(sim.requests_to("/users"), 1);
    let a = h.get("/users.json").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(relay.accepted(), 2);
    assert_eq!(sim.requests_to("/users"), 2);
}

/// Every connection after the first resumes a TLS session (nginx's session
/// tickets), over HTTP/2 and HTTP/1.1: nginx closes each connection after
/// one request, so each request makes a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_resume_tls_sessions() {
    for http2 in [true, false] {
        let (_sim, _edge, h) = through_nginx(Options {
            keepalive_requests: 1,
            http2,
            ..Options::default()
        })
        .await;
        for _ in 0..3 {
            assert_eq!(h.get("/users.json").await.status, 200);
        }
        let full = h.metric("qbproxy_upstream_tls_handshakes_total{kind=\"full\"}");
        let resumed = h.metric("qbproxy_upstream_tls_handshakes_total{kind=\"resumed\"}");
        // A connection per request (the session's and three), and one more
        // when a request raced nginx's GOAWAY and was sent again: however
        // many, only the first made a full handshake.
        let opened = h.metric("qbproxy_upstream_connections_opened_total");
        assert!(opened >= 4, "http2 {http2}: {}", metrics(&h));
        assert_eq!(full, 1, "http2 {http2}: {}", metrics(&h));
        assert_eq!(resumed, opened - 1, "http2 {http2}: {}", metrics(&h));
    }
}

/// Over HTTP/1.1 a connection carries one request at a time: with
/// `upstream.max_connections = 2`, six requests in flight take two
/// connections, the rest wait their turn, and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_are_capped_and_kept_alive() {
    let h = setup().set("upstream", "max_connections", 2).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let sent: Vec<_> = (0..6)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Slow{i}.json"), &[], ""))
        .collect();
    bounded(
        "two requests held",
        h.sim.wait_until(|s| s.held_at_gates() == 2),
    )
    .await;
    h.metric_reaches("qbproxy_upstream_connection_waits_total", 4)
        .await;
    gate.add_permits(6);
    for s in sent {
        assert_eq!(bounded("a request", s).await.unwrap().status, 200);
    }
    assert_eq!(h.sim.max_held_at_gates(), 2);
    assert_eq!(h.metric(H1_OPENED), 2, "{}", metrics(&h));
    assert!(
        h.sim.connections() <= 2,
        "kept alive: {}",
        h.sim.connections()
    );
}

/// Idle connections are closed after `upstream.pool_idle_timeout`, before
/// the upstream's own idle timeout would close them under a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_pool_idle_timeout() {
    let h = setup()
        .set("upstream", "pool_idle_timeout", Duration::from_secs(1))
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, 200);
    h.metric_becomes(H1_OPEN, 0).await;
    assert_eq!(h.get("/users.json").await.status, 200);
    assert_eq!(h.metric(H1_OPENED), 2);
}

/// What the scripted HTTP/2 server does with each request, in turn.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// `RST_STREAM(REFUSED_STREAM)`: not processed (RFC 9113 §8.7).
    Refuse,
    /// `RST_STREAM(INTERNAL_ERROR)` once the request arrived: it may have
    /// been processed.
    Reset,
    Answer,
}

/// An HTTP/2 server over TLS that treats requests as scripted, recording
/// each (method, path, what it did). A stand-in only for what nginx does
/// not do on demand: refuse or reset one given stream.
async fn scripted_h2(
    script: Vec<Then>,
) -> (
    std::net::SocketAddr,
    common::certs::Ca,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Then)>>>,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = common::certs::Ca::new("scripted");
    let (cert, key) = ca.ecdsa_leaf();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let script = std::sync::Arc::new(std::sync::Mutex::new(script.into_iter()));
    let (log, steps) = (seen.clone(), script.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (log, steps) = (log.clone(), steps.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let then = steps.lock().unwrap().next().unwrap_or(Then::Answer);
                    log.lock()
                        .unwrap()
                        .push((format!("{} {}", req.method(), req.uri().path()), then));
                    match then {
                        Then::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        Then::Reset => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                        Then::Answer => {
                            let resp = http::Response::builder()
                                .header("content-type", "application/json")
                                .body(())
                                .unwrap();
                            let mut body = respond.send_response(resp, false).unwrap();
                            let _ = body.send_data(Bytes::from_static(b"{\"ok\":true}"), true);
                        }
                    }
                }
            });
        }
    });
    (addr, ca, seen)
}

/// A stream the upstream refused unprocessed is sent again and answered;
/// one it reset after taking it is not sent again: the client gets 502,
/// and the upstream saw that request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_and_a_reset_one_is_not() {
    let (addr, ca, seen) = scripted_h2(vec![Then::Refuse, Then::Answer, Then::Reset]).await;
    let dir = common::certs::Dir::new("scripted");
    let h = setup()
        .upstream_url(&format!("https://localhost:{}", addr.port()))
        .set("upstream", "ca_file", dir.write("ca.crt", &ca.pem))
        .identity("name = \"svc\"\napi_key = \"demo-api-key\"\n")
        .start()
        .await;
    h.ready().await;
    let a = h.get("/users.json").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(h.metric("qbproxy_upstream_resent_total"), 1);
    let a = h
        .send(Method::POST, "/chat/Message.json", &[], "{\"body\":\"hi\"}")
        .await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert!(
        a.text().contains("INTERNAL_ERROR") || a.text().contains("internal error"),
        "{}",
        a.text()
    );
    assert_eq!(h.metric("qbproxy_upstream_resent_total"), 1);
    let seen: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(r, t)| format!("{r} {t:?}"))
        .collect();
    assert_eq!(
        seen,
        [
            "GET /users.json Refuse",
            "GET /users.json Answer",
            "POST /chat/Message.json Reset"
        ]
    );
}

/// A client that goes away while its request waits for the upstream does
/// not make qbproxy reset the stream: the upstream finishes the request and
/// qbproxy reads the answer (nginx logs 200, not 499 "client closed
/// request"). A burst of resets looks like an attack to nginx, and a reset
/// stream holds nginx's slot until its handler is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_went_away_is_finished_upstream_not_reset() {
    use tokio::io::AsyncWriteExt;
    let (sim, edge, h) = through_nginx(Options::default()).await;
    let gate = sim.gate("/data/Slow");
    let mut client = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    client
        .write_all(b"GET /data/Slow.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    bounded(
        "the request held",
        sim.wait_until(|s| s.held_at_gates() == 1),
    )
    .await;
    drop(client);
    h.metric_reaches("qbproxy_upstream_abandoned_total", 1)
        .await;
    gate.add_permits(1);
    let line = bounded("nginx's access line", async {
        loop {
            if let Some(l) = edge
                .access_lines()
                .into_iter()
                .find(|l| l.contains("/data/Slow"))
            {
                return l;
            }
            // nginx writes its log line when the request ends: nothing to
            // wait on but the file.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(line.ends_with(" 200"), "{line}\n{}", edge.log());
    assert!(
        !edge.log().contains("client canceled stream"),
        "{}",
        edge.log()
    );
    assert_eq!(h.get("/users.json").await.status, 200);
    assert_eq!(h.metric(H2_OPENED), 1);
}
