//! The admin listener: `/healthz`, `/readyz` and `/metrics`, never on the
//! proxy port. It shows state, never a token or a secret.

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::Body;
use crate::metrics::Metrics;
use crate::session::Identity;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// The default identity: the proxy is ready once it holds a session.
    pub identity: Identity,
    pub metrics: Metrics,
    /// True once shutdown began: readiness turns false so that load
    /// balancers stop sending traffic during the drain.
    pub shutting_down: watch::Receiver<bool>,
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n", "text/plain; charset=utf-8"),
            "/readyz" => self.readyz(),
            "/metrics" => text(
                StatusCode::OK,
                self.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                "not found; try /healthz, /readyz or /metrics",
            ),
        }
    }

    fn readyz(&self) -> Response<Body> {
        if *self.shutting_down.borrow() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting down\n",
                "text/plain; charset=utf-8",
            );
        }
        if self.identity.current().is_some() {
            return text(StatusCode::OK, "ready\n", "text/plain; charset=utf-8");
        }
        let why = match self.identity.last_failure() {
            Some(e) => format!("no session yet: {e}\n"),
            None => "no session yet: creating one\n".to_owned(),
        };
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            why,
            "text/plain; charset=utf-8",
        )
    }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errors": [format!("qbproxy admin: {message}")] }).to_string();
    text(status, body, "application/json")
}
