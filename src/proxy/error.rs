//! The errors qbproxy answers itself, on the proxy port ([`ProxyError`])
//! and the admin port ([`AdminError`]), and the one place that turns them
//! into responses: a status, a `QBProxy-Error` code and a body in
//! QuickBlox's shape, `{"errors":["qbproxy: ..."]}`.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::gateway::access;
use crate::gateway::canonical::{self, BadPath};
use crate::gateway::overrides::Override;
use crate::net::body::Body;
use crate::proxy::headers::HeaderError;
use crate::quickblox;
use crate::session::{pool, SessionError};
use crate::upstream::{describe, ConnectError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not create a QuickBlox session: {0}")]
    Session(Arc<SessionError>),
    #[error("no QuickBlox session became available within {0:?}")]
    SessionTimeout(Duration),
    #[error("QuickBlox is unreachable: {0}")]
    UpstreamUnreachable(ConnectError),
    #[error("QuickBlox did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// The exchange failed after the request may have reached QuickBlox.
    #[error("error talking to QuickBlox: {}", describe(.0))]
    Upstream(hyper::Error),
    /// A 401's body, read to see whether the session expired, broke off.
    #[error("error talking to QuickBlox: reading a 401 answer: {0}")]
    RefusalUnread(hyper::Error),
    #[error("all {limit} {what} stayed busy for {waited:?} ({key})")]
    UpstreamBusy {
        /// What ran out: "requests in flight to QuickBlox", or "connections
        /// to QuickBlox", and the key that sets how many.
        what: &'static str,
        key: &'static str,
        limit: usize,
        waited: Duration,
    },
    #[error("QuickBlox may be called {rate} times a second (upstream.rate) and no turn came within {waited:?}")]
    UpstreamRateLimited { rate: f64, waited: Duration },
    #[error("the session is shared by every client of this proxy; refusing to {0}")]
    SharedSession(&'static str),
    #[error(
        "this QB-Token belongs to a session qbproxy holds; send your own session's token, or none"
    )]
    HeldToken,
    #[error("method {0} is not forwarded; use one of {allow}", allow = canonical::ALLOW)]
    MethodNotAllowed(Method),
    #[error("method overrides are refused ({0}): send the method itself")]
    MethodOverride(Override),
    #[error("bad path: {0}")]
    BadPath(BadPath),
    #[error("the request body did not arrive in time (limits.body_read_timeout is {0:?}, and the whole request must fit in upstream.timeout)")]
    BodyTimeout(Duration),
    #[error("bad request: cannot forward this path: {0}")]
    Unforwardable(http::Error),
    #[error("bad request: could not read the request body: {0}")]
    BodyUnreadable(hyper::Error),
    #[error("unknown identity {name:?}; valid names: {valid}")]
    UnknownIdentity { name: String, valid: String },
    /// Refused by a pool (`session::pool`).
    #[error(transparent)]
    Pool(#[from] pool::Refusal),
    /// Refused at the gate (`gateway::access`).
    #[error(transparent)]
    Access(#[from] access::Refusal),
    #[error("request body is over the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("{0}")]
    Header(#[from] HeaderError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Session(e) => match **e {
                SessionError::Unreachable(_) => StatusCode::BAD_GATEWAY,
                SessionError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                SessionError::Refused { .. }
                | SessionError::BadResponse(_)
                | SessionError::Credentials(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            ProxyError::SessionTimeout(_) | ProxyError::UpstreamTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::Upstream(_)
            | ProxyError::RefusalUnread(_) => StatusCode::BAD_GATEWAY,
            ProxyError::SharedSession(_) | ProxyError::HeldToken => StatusCode::FORBIDDEN,
            ProxyError::Unforwardable(_)
            | ProxyError::BodyUnreadable(_)
            | ProxyError::Header(_)
            | ProxyError::UnknownIdentity { .. }
            | ProxyError::MethodOverride(_)
            | ProxyError::BadPath(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Pool(_) | ProxyError::UpstreamBusy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Access(r) => match r {
                access::Refusal::SourceNotAllowed(_)
                | access::Refusal::Identity { .. }
                | access::Refusal::DeniedPath { .. }
                | access::Refusal::NoAllowedPath { .. } => StatusCode::FORBIDDEN,
                access::Refusal::NoKey { .. } | access::Refusal::BadKey { .. } => {
                    StatusCode::UNAUTHORIZED
                }
                access::Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                access::Refusal::HeaderTooLarge { .. } => {
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                }
            },
            ProxyError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The `QBProxy-Error` header: a stable code a client can branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Session(_) => "session-unavailable",
            ProxyError::SessionTimeout(_) => "session-timeout",
            ProxyError::UpstreamUnreachable(_) => "upstream-unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream-timeout",
            ProxyError::Upstream(_) | ProxyError::RefusalUnread(_) => "upstream-error",
            ProxyError::UpstreamBusy { .. } => "upstream-busy",
            ProxyError::UpstreamRateLimited { .. } => "upstream-rate-limited",
            ProxyError::SharedSession(_) => "shared-session",
            ProxyError::HeldToken => "held-token",
            ProxyError::MethodNotAllowed(_) => "method-not-allowed",
            ProxyError::MethodOverride(_) => "method-override",
            ProxyError::BadPath(_) => "bad-path",
            ProxyError::BodyTimeout(_) => "body-timeout",
            ProxyError::Unforwardable(_) | ProxyError::BodyUnreadable(_) => "bad-request",
            ProxyError::Header(_) => "bad-header",
            ProxyError::UnknownIdentity { .. } => "unknown-identity",
            ProxyError::Pool(pool::Refusal::Busy { .. }) => "pool-busy",
            ProxyError::Pool(pool::Refusal::Unavailable { .. }) => "pool-unavailable",
            ProxyError::Access(r) => match r {
                access::Refusal::SourceNotAllowed(_)
                | access::Refusal::Identity { .. }
                | access::Refusal::DeniedPath { .. }
                | access::Refusal::NoAllowedPath { .. } => "forbidden",
                access::Refusal::NoKey { .. } | access::Refusal::BadKey { .. } => "unauthorized",
                access::Refusal::RateLimited { .. } => "rate-limited",
                access::Refusal::HeaderTooLarge { .. } => "header-too-large",
            },
            ProxyError::BodyTooLarge(_) => "body-too-large",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let retry_after = match &self {
            ProxyError::Access(access::Refusal::RateLimited { retry_after, .. }) => {
                Some(*retry_after)
            }
            ProxyError::UpstreamRateLimited { .. } => Some(1),
            _ => None,
        };
        let mut resp = respond(
            self.status(),
            self.code(),
            &format!("qbproxy: {self}"),
            None,
        );
        let headers = resp.headers_mut();
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, ProxyError::MethodNotAllowed(_)) {
            headers.insert(header::ALLOW, HeaderValue::from_static(canonical::ALLOW));
        }
        resp
    }
}

/// What the admin API answers itself.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("this endpoint needs Authorization: Bearer <admin.token>")]
    Unauthorized,
    #[error("{0}")]
    CrossSite(&'static str),
    #[error(
        "this is the admin listener of {0}, not of the host this request names; \
         add a name it should answer to in [admin] hosts"
    )]
    MisdirectedHost(String),
    #[error("not found; try /healthz, /readyz, /metrics, /sessions")]
    NotFound,
    #[error("POST only to /sessions/{{name}}/renew")]
    NoSuchAction,
    #[error("use GET, or POST /sessions/{{name}}/renew")]
    MethodNotAllowed,
    #[error("no identity named {0:?}")]
    UnknownIdentity(String),
    /// The forced renewal failed; `identity` is its status before.
    #[error("could not create a QuickBlox session: {error}")]
    RenewalFailed {
        error: Arc<SessionError>,
        identity: serde_json::Value,
    },
    #[error("the renewal did not finish in time; see GET /sessions")]
    RenewalTimedOut,
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::CrossSite(_) => StatusCode::FORBIDDEN,
            AdminError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            AdminError::NotFound | AdminError::NoSuchAction | AdminError::UnknownIdentity(_) => {
                StatusCode::NOT_FOUND
            }
            AdminError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::RenewalFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::RenewalTimedOut => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized => "unauthorized",
            AdminError::CrossSite(_) => "forbidden",
            AdminError::MisdirectedHost(_) => "misdirected-host",
            AdminError::NotFound | AdminError::NoSuchAction => "not-found",
            AdminError::UnknownIdentity(_) => "unknown-identity",
            AdminError::MethodNotAllowed => "method-not-allowed",
            AdminError::RenewalFailed { .. } => "session-unavailable",
            AdminError::RenewalTimedOut => "session-timeout",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let message = match &self {
            AdminError::RenewalFailed { .. } => format!("qbproxy: {self}"),
            _ => format!("qbproxy admin: {self}"),
        };
        let extra = match &self {
            AdminError::RenewalFailed { identity, .. } => Some(("identity", identity.clone())),
            _ => None,
        };
        let mut resp = respond(self.status(), self.code(), &message, extra);
        if matches!(self, AdminError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON error in QuickBlox's shape, `{"errors":[message]}` (plus one
/// more field if given), with its status and `QBProxy-Error` code.
fn respond(
    status: StatusCode,
    code: &'static str,
    message: &str,
    extra: Option<(&str, serde_json::Value)>,
) -> Response<Body> {
    let mut body = serde_json::json!({ "errors": [message] });
    if let (Some((key, value)), Some(map)) = (extra, body.as_object_mut()) {
        map.insert(key.to_owned(), value);
    }
    let mut resp = Response::new(Body::full(body.to_string()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(quickblox::QBPROXY_ERROR, HeaderValue::from_static(code));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn session_failures_map_to_status_and_quickblox_shape() {
        let cases = [
            (SessionError::Unreachable("refused".into()), 502),
            (SessionError::Timeout(Duration::from_secs(1)), 504),
            (
                SessionError::Refused {
                    status: 422,
                    message: "Unexpected signature".into(),
                    hint: None,
                },
                503,
            ),
        ];
        for (e, status) in cases {
            let resp = ProxyError::Session(Arc::new(e)).into_response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(
                resp.headers()[quickblox::QBPROXY_ERROR],
                "session-unavailable"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let msg = v["errors"][0].as_str().unwrap();
            assert!(
                msg.starts_with("qbproxy: could not create a QuickBlox session: "),
                "{msg}"
            );
        }
    }
}
