//! The floor: the least a hyper-based proxy can do per request, for
//! `bench/compare.sh`. It listens where qbproxy does in the bench
//! (127.0.0.1:19100), sets a fixed `QB-Token` and forwards to
//! `bench/fast_upstream.rs` on 127.0.0.1:19000, plain HTTP/1.1, on a
//! current-thread runtime, and does nothing else: no routing, no limits,
//! no timeouts, no metrics, no logging, no replay.
//!
//!   cargo build --release --example floor
//!   bench/compare.sh target/release/qbproxy bench/out/floor-pool bench/out/floor-bound
//!
//! (`bench/compare.sh` passes `--config FILE`, which the floor ignores; the
//! mode comes from `FLOOR_MODE`, so wrap it in a two-line script.)
//!
//! `FLOOR_MODE=pool` (default): hyper-util's pooled client, as qbproxy uses.
//! `FLOOR_MODE=bound`: one upstream connection per client connection,
//! polled in the client connection's own task (no pool checkout, no
//! hand-off to another task).

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

type Body = BoxBody<Bytes, hyper::Error>;

fn main() -> std::io::Result<()> {
    let bound = std::env::var("FLOOR_MODE").is_ok_and(|m| m == "bound");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(bound))
}

fn bad_gateway() -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

async fn serve(bound: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(LISTEN).await?;
    let token = HeaderValue::from_static("0123456789abcdef0123456789abcdef01234567");
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, Incoming>(HttpConnector::new());
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
            let uri: Option<Uri> = format!("http://{UPSTREAM}{pq}").parse().ok();
            async move {
                let Some(uri) = uri else {
                    return Ok::<_, Infallible>(bad_gateway());
                };
                *req.uri_mut() = uri;
                Ok(match client.request(req).await {
                    Ok(resp) => resp.map(BodyExt::boxed),
                    Err(_) => bad_gateway(),
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
