//! The floor: the least a hyper-based proxy can do per request, for
//! `bench/compare.sh`. It listens where qbproxy does in the bench
//! (127.0.0.1:19100), sets a fixed `QB-Token` and forwards to
//! `bench/fast_upstream.rs` on 127.0.0.1:19000, plain HTTP/1.1, on a
//! current-thread runtime, and does nothing else: no routing, no limits,
//! no timeouts, no metrics, no logging, no replay.
//!
//!   cargo build --release --example floor
//!   bench/compare.sh target/release/qbproxy target/release/examples/floor \
//!       "FLOOR_MODE=bound target/release/examples/floor"
//!
//! (`bench/compare.sh` passes `--config FILE`, which the floor ignores; its
//! settings come from the environment, which an argument may start with.)
//!
//! `FLOOR_MODE=pool` (default): hyper-util's pooled client, as qbproxy uses.
//! `FLOOR_MODE=bound`: one upstream connection per client connection,
//! polled in the client connection's own task (no pool checkout, no
//! hand-off to another task).
//!
//! `FLOOR_CA=FILE` (`pool` only): the upstream is the fast upstream behind
//! TLS (`https://127.0.0.1:19443`, as `UPSTREAM=https bench/compare.sh`
//! starts it, FILE its CA), reached the way qbproxy reaches QuickBlox:
//! hyper-rustls over rustls with ring, HTTP/2 by ALPN unless
//! `FLOOR_H1=1`. What the hyper stack costs for the real case, before
//! qbproxy adds anything.
//!
//! `FLOOR_LISTEN=ADDR` and `FLOOR_UPSTREAM=HOST:PORT` (`pool` only) move
//! it, as `bench/far.sh` does to put it in front of its far upstream.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

const LISTEN: &str = "127.0.0.1:19100";
const UPSTREAM: &str = "127.0.0.1:19000";
const TLS_UPSTREAM: &str = "127.0.0.1:19443";

type Body = BoxBody<Bytes, hyper::Error>;

fn main() -> std::io::Result<()> {
    let bound = std::env::var("FLOOR_MODE").is_ok_and(|m| m == "bound");
    let tls = match std::env::var_os("FLOOR_CA") {
        Some(ca) => Some(tls_connector(
            &std::fs::read(ca)?,
            std::env::var("FLOOR_H1").is_ok_and(|v| v == "1"),
        )?),
        None => None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(bound, tls))
}

type Tls = hyper_rustls::HttpsConnector<HttpConnector>;

/// The upstream connector for `FLOOR_CA`: the CA in `pem` as the only root.
fn tls_connector(pem: &[u8], h1_only: bool) -> std::io::Result<Tls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    Ok(match h1_only {
        true => builder.enable_http1().wrap_connector(http),
        false => builder.enable_all_versions().wrap_connector(http),
    })
}

fn bad_gateway() -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

async fn serve(bound: bool, tls: Option<Tls>) -> std::io::Result<()> {
    let listen = std::env::var("FLOOR_LISTEN").unwrap_or_else(|_| LISTEN.to_owned());
    let listener = TcpListener::bind(listen).await?;
    let token = HeaderValue::from_static("0123456789abcdef0123456789abcdef01234567");
    let upstream = std::env::var("FLOOR_UPSTREAM").ok();
    let base = match tls {
        Some(_) => format!("https://{}", upstream.as_deref().unwrap_or(TLS_UPSTREAM)),
        None => format!("http://{}", upstream.as_deref().unwrap_or(UPSTREAM)),
    };
    let base: &'static str = Box::leak(base.into_boxed_str());
    let client = Client::new(tls);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        let token = token.clone();
        if bound {
            tokio::spawn(bound_connection(io, token));
            continue;
        }
        let client = client.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let client = client.clone();
            req.headers_mut().insert("qb-token", token.clone());
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let uri: Option<Uri> = format!("{base}{pq}").parse().ok();
            async move {
                let Some(uri) = uri else {
                    return Ok::<_, Infallible>(bad_gateway());
                };
                *req.uri_mut() = uri;
                Ok(match client.request(req).await {
                    Some(resp) => resp.map(BodyExt::boxed),
                    None => bad_gateway(),
                })
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// hyper-util's pooled client, to the plain or the TLS upstream.
#[derive(Clone)]
enum Client {
    Plain(hyper_util::client::legacy::Client<HttpConnector, Incoming>),
    Tls(hyper_util::client::legacy::Client<Tls, Incoming>),
}

impl Client {
    fn new(tls: Option<Tls>) -> Client {
        let builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
        match tls {
            Some(tls) => Client::Tls(builder.build(tls)),
            None => Client::Plain(builder.build(HttpConnector::new())),
        }
    }

    async fn request(&self, req: Request<Incoming>) -> Option<Response<Incoming>> {
        match self {
            Client::Plain(c) => c.request(req).await.ok(),
            Client::Tls(c) => c.request(req).await.ok(),
        }
    }
}

/// A client connection with its own upstream connection, both driven by
/// this one task.
async fn bound_connection(io: TokioIo<TcpStream>, token: HeaderValue) {
    let Ok(upstream) = TcpStream::connect(UPSTREAM).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let Ok((sender, connection)) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream)).await
    else {
        return;
    };
    // HTTP/1.1 without pipelining: one request at a time per connection,
    // so the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        req.headers_mut().insert("qb-token", token.clone());
        async move {
            let mut sender = sender.lock().await;
            Ok::<_, Infallible>(match sender.send_request(req).await {
                Ok(resp) => resp.map(BodyExt::boxed),
                Err(_) => bad_gateway(),
            })
        }
    });
    let server = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        _ = server => {}
        _ = connection => {}
    }
}
