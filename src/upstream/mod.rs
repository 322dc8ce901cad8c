//! The way to QuickBlox: the connections qbproxy keeps to the upstream
//! (`pool`: HTTP/2 connections that each carry as many streams as the
//! server allows, more opened when every one is full; HTTP/1.1 connections
//! kept alive), how they are made (`connect`: TCP, TLS with session
//! resumption, ALPN), and [`SessionCreator`], the real source of sessions
//! (`creator`: a signed `POST /session.json`, with clock-skew correction).
//!
//! A request the upstream did not process (refused by GOAWAY or
//! `REFUSED_STREAM`, or never written to a connection that closed) is
//! sent again on another connection; one it may have processed never is.

pub(crate) mod fair;
pub(crate) mod rate;

mod coalesce;
mod connect;
mod creator;
mod pool;

use std::sync::Arc;

pub use creator::{ClockOffset, Endpoint, SessionCreator, Throttled};
pub use pool::{Client, Lease};

use crate::config::UpstreamConfig;
use crate::telemetry::metrics::UpstreamMetrics;

/// Why no connection to the upstream could be made (nothing was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP (hyper-util's connector, whose error type is not public: DNS,
    /// connect).
    #[error("{}", describe(&**.0))]
    Tcp(Box<dyn std::error::Error + Send + Sync>),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("no connection within {0:?} (upstream.connect_timeout)")]
    Timeout(std::time::Duration),
    #[error("{}", describe(.0))]
    Handshake(hyper::Error),
    #[error("no HTTP handshake within {0:?} (upstream.connect_timeout)")]
    HandshakeTimeout(std::time::Duration),
}

/// Why a request got no answer from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (nothing was sent).
    #[error(transparent)]
    Connect(ConnectError),
    /// Every connection this worker may open (`upstream.max_connections`)
    /// stayed busy until the request's deadline (nothing was sent).
    #[error("every upstream connection stayed busy")]
    Busy,
    /// The exchange failed after the request may have reached the
    /// upstream: it is not sent again.
    #[error("{}", describe(.0))]
    Failed(hyper::Error),
}

/// The upstream clients of every proxy worker, built from one
/// `[upstream]`: a [`Client`] each (`Live::client` picks the running
/// worker's), sharing one TLS configuration and so one cache of TLS
/// sessions to resume.
pub fn pools(
    cfg: &UpstreamConfig,
    workers: usize,
    metrics: &UpstreamMetrics,
) -> Result<Arc<[Client]>, std::io::Error> {
    let workers = workers.max(1);
    let tls = connect::tls_config(cfg)?;
    let settings = pool::Settings::share_of(cfg, workers);
    Ok((0..workers)
        .map(|_| {
            Client::new(
                connect::Connector::new(cfg, tls.clone(), metrics.clone()),
                cfg,
                settings.clone(),
                metrics.clone(),
            )
        })
        .collect())
}

/// An error and its causes as one line, e.g. `tcp connect error:
/// Connection refused (os error 111)`.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // hyper repeats its cause in its own message at times.
        if !msg.ends_with(&s_text) {
            msg.push_str(": ");
            msg.push_str(&s_text);
        }
        source = s.source();
    }
    msg
}
