//! Bodies past the replay limit stream: qbproxy forwards what it has
//! before the sender has finished, in both directions. The upstream here is
//! scripted by the test (it answers `POST /session.json` with a canned
//! session) so that it can observe and pace the bytes.

use crate::common;

use std::convert::Infallible;
use std::path::Path;

use crate::common::{bounded, setup};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Channel, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use qbproxy::Config;
use qbproxy_sim::{Sim, SimConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Mutex};

type Body = http_body_util::Either<Full<Bytes>, Channel<Bytes, Infallible>>;

/// What the scripted upstream reports and what the test feeds it.
struct Script {
    /// Each request-body chunk as it arrives at the upstream.
    chunks: mpsc::UnboundedSender<Bytes>,
    /// The response body the upstream streams for `GET /stream`.
    response: Mutex<Option<Channel<Bytes, Infallible>>>,
}

async fn upstream(req: Request<Incoming>, script: std::sync::Arc<Script>) -> Response<Body> {
    match req.uri().path() {
        "/session.json" => Response::builder()
            .status(201)
            .body(Body::Left(Full::new(Bytes::from_static(
                br#"{"session":{"token":"scripted-token","user_id":1001}}"#,
            ))))
            .unwrap(),
        "/upload" => {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    let _ = script.chunks.send(data);
                }
            }
            Response::new(Body::Left(Full::new(Bytes::from_static(b"stored"))))
        }
        "/stream" => {
            let body = script
                .response
                .lock()
                .await
                .take()
                .expect("one streaming response");
            Response::new(Body::Right(body))
        }
        _ => Response::builder()
            .status(404)
            .body(Body::Left(Full::default()))
            .unwrap(),
    }
}

async fn start_upstream(script: std::sync::Arc<Script>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let script = script.clone();
            let service = service_fn(move |req| {
                let script = script.clone();
                async move { Ok::<_, Infallible>(upstream(req, script).await) }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_through() {
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel();
    let (mut response_tx, response_body) = Channel::<Bytes, Infallible>::new(1);
    let script = std::sync::Arc::new(Script {
        chunks: chunks_tx,
        response: Mutex::new(Some(response_body)),
    });
    let url = start_upstream(script).await;
    // The simulator only lends its credentials to the config.
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let text = setup()
        .upstream_url(&url)
        .set("proxy", "replay_body_limit", 1024)
        .config_text(&sim);
    let h = common::start_app(sim, Config::from_toml(&text, Path::new("t")).unwrap()).await;
    h.ready().await;

    // Request: 4 KiB (past the 1 KiB limit), then hold the rest back. The
    // upstream receives those bytes while the client is still sending.
    let (mut sender, body) = Channel::<Bytes, Infallible>::new(1);
    let client: hyper_util::client::legacy::Client<_, Channel<Bytes, Infallible>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = Request::post(format!("http://{}/upload", h.proxy))
        .body(body)
        .unwrap();
    let (done_tx, done) = oneshot::channel();
    let c = client.clone();
    tokio::spawn(async move {
        let _ = done_tx.send(c.request(req).await.map(|r| r.status()));
    });
    let first = vec![b'a'; 4096];
    sender.send_data(Bytes::from(first.clone())).await.unwrap();
    let mut arrived = 0;
    while arrived < first.len() {
        arrived += bounded("the head to reach the upstream", chunks.recv())
            .await
            .unwrap()
            .len();
    }
    sender.send_data(Bytes::from_static(b"tail")).await.unwrap();
    drop(sender);
    let status = bounded("the upload response", done).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        bounded("the tail", chunks.recv()).await.unwrap(),
        Bytes::from_static(b"tail")
    );

    // Response: the first chunk reaches the client before the upstream has
    // produced the second.
    let get_client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let resp_fut = get_client.get(format!("http://{}/stream", h.proxy).parse().unwrap());
    response_tx
        .send_data(Bytes::from_static(b"first;"))
        .await
        .unwrap();
    let resp = bounded("the streaming response", resp_fut).await.unwrap();
    let mut body = resp.into_body();
    let chunk = bounded("the first chunk", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chunk.into_data().unwrap(), Bytes::from_static(b"first;"));
    response_tx
        .send_data(Bytes::from_static(b"second"))
        .await
        .unwrap();
    drop(response_tx);
    let rest = bounded("the rest", body.collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, Bytes::from_static(b"second"));
}
