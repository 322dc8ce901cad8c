//! Listeners: accept connections, serve HTTP/1.1 and HTTP/2 (detected per
//! connection) with a handler, and on shutdown stop accepting and drain the
//! open connections under a grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Open connections at most; past it, new ones wait in the kernel's
    /// accept queue rather than being accepted and starved.
    pub max_connections: usize,
    /// Time to send a request's headers; also how long an idle HTTP/1
    /// keep-alive connection is kept. Cuts off slowloris clients.
    pub header_read_timeout: Duration,
    /// The header limit the handler enforces (431 in JSON); hyper's own
    /// buffers are sized above it so the handler gets to answer.
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
}

/// Serves `handler` on `listener` until `shutdown` turns true, then drains
/// for at most the grace period. `name` labels the log lines. With a TLS
/// config in `tls` (read per connection, so a reload can swap it), every
/// connection is TLS; the handshake must finish within the header timeout.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    options: Arc<ArcSwap<Options>>,
    tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut current = **options.load();
    let mut builder = connection_builder(&current);
    let permits = Arc::new(Semaphore::new(current.max_connections));
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listener = name, %addr, "listening");
    }
    loop {
        // Reloaded settings apply to the connections accepted from now on.
        let latest = **options.load();
        if latest != current {
            builder = connection_builder(&latest);
            if latest.max_connections > current.max_connections {
                permits.add_permits(latest.max_connections - current.max_connections);
            } else {
                // Only free slots can be taken back; busy ones close in time.
                permits.forget_permits(current.max_connections - latest.max_connections);
            }
            current = latest;
        }
        // A connection slot first, then accept: beyond the limit, clients
        // wait in the kernel's queue.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Latency over batching: responses are small and many.
                    let _ = stream.set_nodelay(true);
                    let handler = handler.clone();
                    let service = service_fn(move |req| {
                        let response = handler(req, peer);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    let tls = tls.load_full();
                    let handshake_timeout = current.header_read_timeout;
                    tokio::spawn(async move {
                        let _permit = permit;
                        let result = match tls {
                            None => {
                                let conn = builder.serve_connection(TokioIo::new(stream), service);
                                watcher.watch(conn.into_owned()).await
                            }
                            Some(config) => {
                                let accept = TlsAcceptor::from(config).accept(stream);
                                let stream = match tokio::time::timeout(handshake_timeout, accept).await {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(e)) => {
                                        tracing::info!(listener = name, %peer, error = %e, "TLS handshake refused");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::info!(listener = name, %peer, "TLS handshake timed out");
                                        return;
                                    }
                                };
                                let conn = builder.serve_connection(TokioIo::new(stream), service);
                                watcher.watch(conn.into_owned()).await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(listener = name, %peer, error = %e, "connection closed with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning; established connections go on.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    let grace = options.load().shutdown_grace;
    tracing::info!(
        listener = name,
        grace_s = grace.as_secs_f64(),
        "stopped accepting; draining connections"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!(listener = name, "all connections drained"),
        Err(_) => tracing::warn!(
            listener = name,
            "grace period over with requests still in flight; closing them"
        ),
    }
}

/// HTTP/1.1 and HTTP/2 settings for new connections.
fn connection_builder(options: &Options) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request line and headers, with room above the handler's limit.
    let buffer = (options.max_header_bytes + 16 * 1024).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(buffer);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(options.header_read_timeout))
        .keep_alive_timeout(options.header_read_timeout);
    builder
}
