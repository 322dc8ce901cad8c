//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `GET /sessions`
//! and `POST /sessions/{name}/renew`; never on the proxy port. It shows
//! state and token prefixes, never a whole token or a secret. With
//! `[admin] token`, everything but the two probes needs it as a bearer
//! token; a POST is refused when a browser says it comes from elsewhere.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::body::Body;
use crate::net::server::Conn;
use crate::proxy::error::AdminError;
use crate::quickblox::credentials::Secret;
use crate::session::{Reason, SessionState, Status, Unavailable};
use crate::Handle;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub handle: Handle,
    /// True once shutdown began: readiness turns false so that load
    /// balancers stop sending traffic during the drain.
    pub shutting_down: watch::Receiver<bool>,
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let path = req.uri().path();
        let allowed = self.handle.config(|c| c.admin.hosts.clone());
        if let Err(host) = own_host(&req, conn.local(), &allowed) {
            tracing::warn!(peer = %conn.peer(), path, host, "admin request for another host refused (421)");
            return AdminError::MisdirectedHost(conn.local().to_string()).into_response();
        }
        let probe = matches!(path, "/healthz" | "/readyz")
            && matches!(*req.method(), Method::GET | Method::HEAD);
        if !probe {
            if let Some(token) = self.handle.config(|c| c.admin.token.clone()) {
                if !bearer_matches(req.headers(), &token) {
                    tracing::warn!(peer = %conn.peer(), path, "admin request without the admin token");
                    return AdminError::Unauthorized.into_response();
                }
            }
        }
        if req.method() == Method::POST {
            if let Err(why) = same_origin(req.headers(), conn.local()) {
                tracing::warn!(peer = %conn.peer(), path, why, "admin POST refused as cross-site");
                return AdminError::CrossSite(why).into_response();
            }
            return match path
                .strip_prefix("/sessions/")
                .and_then(|rest| rest.strip_suffix("/renew"))
            {
                Some(name) => self.renew(name).await,
                None => AdminError::NoSuchAction.into_response(),
            };
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return AdminError::MethodNotAllowed.into_response();
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n", "text/plain; charset=utf-8"),
            "/readyz" => self.readyz(),
            "/metrics" => text(
                StatusCode::OK,
                self.handle.metrics_text(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            "/sessions" => {
                let statuses: Vec<Status> = self
                    .handle
                    .identities()
                    .iter()
                    .map(|i| i.status())
                    .collect();
                let list: Vec<serde_json::Value> = statuses.iter().map(status_json).collect();
                text(
                    StatusCode::OK,
                    serde_json::json!({ "identities": list, "pools": pools_json(&statuses) })
                        .to_string(),
                    "application/json",
                )
            }
            _ => AdminError::NotFound.into_response(),
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
        match self.handle.is_ready() {
            Ok(()) => text(StatusCode::OK, "ready\n", "text/plain; charset=utf-8"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}\n"),
                "text/plain; charset=utf-8",
            ),
        }
    }

    /// Forces a renewal and reports its outcome.
    async fn renew(&self, name: &str) -> Response<Body> {
        let Some(identity) = self.handle.identity(name) else {
            return AdminError::UnknownIdentity(name.to_owned()).into_response();
        };
        tracing::info!(identity = name, "forced renewal requested on the admin API");
        // The renewal's own budget, and a second to hear its outcome.
        let budget = self.handle.config(|c| c.quickblox.session_timeout);
        let deadline = Instant::now() + budget + Duration::from_secs(1);
        let status = status_json(&identity.status());
        match identity.force_renewal(deadline).await {
            Ok(_) => text(
                StatusCode::OK,
                status_json(&identity.status()).to_string(),
                "application/json",
            ),
            Err(Unavailable::Failed(error)) => AdminError::RenewalFailed {
                error,
                identity: status,
            }
            .into_response(),
            Err(Unavailable::TimedOut) => AdminError::RenewalTimedOut.into_response(),
        }
    }
}

/// True if the request carries `Authorization: Bearer <token>`, compared
/// in constant time (as digests, so neither the value nor its length leaks).
fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    let given: [u8; 20] = Sha1::digest(given).into();
    let want: [u8; 20] = Sha1::digest(token.expose().as_bytes()).into();
    bool::from(given.ct_eq(&want))
}

/// A POST must come from the admin address itself, not from a page a
/// browser loaded elsewhere: a browser must not renew sessions by CSRF.
/// Refused: `Sec-Fetch-Site: cross-site`, and an `Origin` whose host and
/// port are not the address the request arrived on. Tools that send
/// neither (curl, scripts) pass.
/// Whether the request names this listener: its address, `localhost`, or
/// one of `[admin] hosts` (any port; a request with no host at all is not
/// a browser's). A web page that rebinds its own name to this address
/// sends that name, and is refused. Returns the name it sent otherwise.
fn own_host<B>(req: &Request<B>, local: SocketAddr, hosts: &[String]) -> Result<(), String> {
    let named = match req.uri().authority() {
        Some(a) => Some(a.host().to_owned()),
        None => match req.headers().get(header::HOST) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.parse::<http::uri::Authority>().ok())
                    .map(|a| a.host().to_owned())
                    .ok_or_else(|| String::from_utf8_lossy(v.as_bytes()).into_owned())?,
            ),
        },
    };
    let Some(host) = named else { return Ok(()) };
    let host = host.to_ascii_lowercase();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let own_ip = bare
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical() == local.ip().to_canonical());
    if own_ip || host == "localhost" || hosts.contains(&host) {
        Ok(())
    } else {
        Err(host)
    }
}

fn same_origin(headers: &HeaderMap, local: SocketAddr) -> Result<(), &'static str> {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Err("cross-site requests may not POST to the admin API");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let (default_port, rest) = if let Some(r) = origin.strip_prefix("http://") {
        (80, r)
    } else if let Some(r) = origin.strip_prefix("https://") {
        (443, r)
    } else {
        return Err("the Origin is not the admin address");
    };
    let authority: Option<http::uri::Authority> = rest.parse().ok();
    let matches = authority.is_some_and(|a| {
        let host = a.host().trim_start_matches('[').trim_end_matches(']');
        let port = a.port_u16().unwrap_or(default_port);
        host.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical() == local.ip().to_canonical())
            && port == local.port()
    });
    if matches {
        Ok(())
    } else {
        Err("the Origin is not the admin address")
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Each pool at a glance, by name: its members, how many hold a session,
/// and how many are set aside (`/readyz` stays 200 while one serves).
fn pools_json(statuses: &[Status]) -> Vec<serde_json::Value> {
    // By pool: members, ready, set aside.
    let mut pools: std::collections::BTreeMap<&str, [usize; 3]> = Default::default();
    for s in statuses {
        if let Some(pool) = s.pool.as_deref() {
            let counts = pools.entry(pool).or_default();
            counts[0] += 1;
            counts[1] += usize::from(matches!(
                s.state,
                SessionState::Ready | SessionState::ReadyRenewalFailing
            ));
            counts[2] += usize::from(s.state == SessionState::SetAside);
        }
    }
    pools
        .into_iter()
        .map(|(name, [members, ready, set_aside])| {
            serde_json::json!({
                "name": name,
                "members": members,
                "ready": ready,
                "set_aside": set_aside,
            })
        })
        .collect()
}

fn status_json(s: &Status) -> serde_json::Value {
    let renewals: serde_json::Map<String, serde_json::Value> = Reason::ALL
        .iter()
        .zip(s.renewals)
        .map(|(r, n)| (r.as_str().to_owned(), n.into()))
        .collect();
    serde_json::json!({
        "name": s.name,
        "pool": s.pool,
        "kind": s.kind.as_str(),
        "state": s.state.as_str(),
        "user_id": s.session.as_ref().map(|x| x.user_id),
        "token": s.session.as_ref().map(|x| x.token.clone()),
        // Shared with the fleet ([cluster]), or this replica's own.
        "source": s.session.as_ref().map(|x| if x.fleet.is_some() { "cluster" } else { "local" }),
        "created_at": s.session.as_ref().map(|x| rfc3339(x.created_at)),
        "expires_at": s.session.as_ref().and_then(|x| x.expires_at).map(rfc3339),
        "renewals": renewals,
        "last_error": s.last_error,
    })
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
