//! The simulator's HTTP server: HTTP/1.1 and HTTP/2 (prior knowledge) on
//! one port, through hyper-util's auto builder. Its own on purpose: a
//! stand-in served by qbproxy's server would share that server's mistakes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{Body, Shared, Sim};

/// What a listener serves.
#[derive(Clone, Copy)]
pub(crate) enum Serves {
    /// QuickBlox's API and the `/_sim/*` controls.
    Api,
    /// The S3 stand-in.
    S3,
}

/// Serves until every [`Sim`] handle is gone (`stopping` then closes);
/// open connections are then shut down gracefully.
pub(crate) async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    serves: Serves,
    shared: Weak<Shared>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, or a connection reset before it was
                // accepted: try again shortly rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopping.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        let mut stop = stopping.clone();
        tokio::spawn(async move {
            let first = AtomicBool::new(true);
            let service = service_fn(move |req| {
                let sim = shared.upgrade().map(|shared| Sim { shared, addr });
                let first = first.swap(false, Ordering::Relaxed);
                async move {
                    let Some(sim) = sim else {
                        let mut gone = Response::new(Body::from("simulator stopped"));
                        *gone.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        return Ok::<_, Infallible>(gone);
                    };
                    Ok(match serves {
                        Serves::Api => {
                            if first {
                                sim.connected();
                            }
                            sim.handle(req).await
                        }
                        Serves::S3 => sim.handle_s3(req).await,
                    })
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
