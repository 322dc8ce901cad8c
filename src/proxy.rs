//! Forwarding: the request handler of the proxy listener.
//!
//! For each request: refuse calls that would touch the shared session,
//! strip hop-by-hop headers, set `Host`, inject the session's `QB-Token`,
//! and send it upstream with path and query byte for byte. When QuickBlox
//! answers 401 "Required session does not exist", ask the identity for the
//! single renewal and replay the request once with the new token.
//!
//! This module is the only writer of the `QB-Token` header on forwarded
//! requests. It reads the session lock-free and never waits for a
//! proactive renewal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::access::{Client, Gate};
use crate::body::{self, Body, Buffered};
use crate::config::{ClientToken, Config, UpstreamConfig};
use crate::error::ProxyError;
use crate::metrics::{IdentityMetrics, Metrics};
use crate::qb;
use crate::route::{self, Router, Target};
use crate::session::{Identity, Session, Unavailable};
use crate::upstream;

/// A cheap-to-clone handle on the forwarding state.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Loaded once per request, swapped whole on reload: a request runs
    /// start to end with one consistent configuration.
    live: ArcSwap<Live>,
    /// `upstream.max_connections` slots, one per request in flight upstream,
    /// held until its response body is read. One semaphore for the proxy's
    /// life, resized on reload (its capacity is the `Live`'s), so requests
    /// in flight across a reload count against one cap.
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

/// Takes `slots` from capacity `from` to `to`: grows at once; shrinks by the
/// free slots at once and by the rest as the requests holding them finish.
fn resize(slots: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        slots.add_permits(to - from);
    } else if to < from {
        let excess = from - to;
        let owed = excess - slots.forget_permits(excess);
        if owed > 0 {
            let slots = slots.clone();
            // Config validation keeps max_connections far below u32::MAX.
            let owed = u32::try_from(owed).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(taken) = slots.acquire_many_owned(owed).await {
                    taken.forget();
                }
            });
        }
    }
}

/// What requests are served with.
pub struct Live {
    pub client: upstream::Client,
    pub upstream: UpstreamConfig,
    /// Chooses the identity (or pool) whose session is injected.
    pub router: Router,
    /// Who may send what.
    pub gate: Gate,
    pub client_token: ClientToken,
    pub replay_body_limit: usize,
    /// Budget of a whole request, session wait and replay included.
    pub timeout: Duration,
}

impl Live {
    pub fn new(config: &Config, client: upstream::Client, router: Router, gate: Gate) -> Live {
        Live {
            client,
            upstream: config.upstream.clone(),
            router,
            gate,
            client_token: config.proxy.client_token,
            replay_body_limit: config.proxy.replay_body_limit,
            timeout: config.upstream.timeout,
        }
    }
}

/// Headers that describe one connection, not the message; never forwarded
/// in either direction (RFC 9110 §7.6.1), plus `Expect`, which qbproxy
/// answers itself when it reads the body.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A 401 body longer than this is not QuickBlox's expiry message; it is
/// passed on without being inspected further.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

impl Proxy {
    pub fn new(live: Live, metrics: Metrics) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(live.upstream.max_connections)),
                live: ArcSwap::from_pointee(live),
                metrics,
            }),
        }
    }

    /// Serves requests from now on with `live`; requests in flight finish
    /// with what they started with. Reloads are serialised by the caller.
    pub fn replace(&self, live: Live) {
        let to = live.upstream.max_connections;
        let old = self.inner.live.swap(Arc::new(live));
        resize(&self.inner.slots, old.upstream.max_connections, to);
    }

    /// Answers one client request. Never fails: qbproxy's own errors become
    /// JSON responses in QuickBlox's shape.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let inner = &*self.inner;
        let (mut parts, body) = req.into_parts();
        let live = inner.live.load_full();
        let deadline = Instant::now() + live.timeout;
        let gate = &live.gate;
        let unrouted = inner.metrics.unrouted();
        let client = match gate.admit(peer.ip(), &parts.headers) {
            Ok(client) => client,
            Err(e) => return finish(&parts, Err(e), unrouted, None, None),
        };
        if content_length(&parts.headers).is_some_and(|n| n > gate.max_body_bytes) {
            let e = ProxyError::BodyTooLarge(gate.max_body_bytes);
            return finish(&parts, Err(e), unrouted, None, client);
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let (mut target, stripped) = match live.router.route(&parts.headers, &pq) {
            Ok(routed) => routed,
            Err(e) => return finish(&parts, Err(e), unrouted, None, client),
        };
        // A client limited to some identities acts as its first one unless
        // the request names another.
        if let (true, Some(name)) = (
            stripped.is_none() && !parts.headers.contains_key(route::IDENTITY_HEADER),
            client.and_then(|c| c.default_target()),
        ) {
            target = live.router.named(name).unwrap_or(target);
        }
        let pq = stripped.unwrap_or(pq);
        if let Some(c) = client {
            if let Err(e) = c.permit(target.name(), &parts.method, pq.path()) {
                return finish(&parts, Err(e), unrouted, None, client);
            }
        }
        let ctx = Ctx {
            live: &live,
            deadline,
            max_body: gate.max_body_bytes,
        };
        match target {
            Target::Identity(identity) => {
                identity.start();
                let result = self
                    .forward(&mut parts, body, pq, identity, None, ctx)
                    .await;
                finish(&parts, result, identity.metrics(), Some(identity), client)
            }
            Target::Pool(pool) => {
                let sticky = parts.headers.get(route::CLIENT_HEADER).cloned();
                match pool.acquire_session(sticky.as_ref(), deadline).await {
                    Ok((lease, session)) => {
                        let identity = lease.identity();
                        let result = self
                            .forward(&mut parts, body, pq, identity, Some(session), ctx)
                            .await;
                        finish(&parts, result, identity.metrics(), Some(identity), client)
                    }
                    Err(e) => finish(&parts, Err(e), pool.metrics(), None, client),
                }
            }
        }
    }

    /// Forwards a request as `identity`, with `pq` as its (possibly
    /// prefix-stripped) path and query. `session`: the outcome of asking
    /// for the identity's session, if the caller already did (pools do).
    async fn forward(
        &self,
        parts: &mut Parts,
        body: Incoming,
        pq: PathAndQuery,
        identity: &Identity,
        session: Option<Result<Arc<Session>, Unavailable>>,
        ctx: Ctx<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let Ctx {
            live,
            deadline,
            max_body: body_limit,
        } = ctx;
        let own_token =
            live.client_token == ClientToken::Keep && parts.headers.contains_key(qb::QB_TOKEN);
        if !own_token {
            if let Some(what) = qb::shared_session_call(&parts.method, pq.path()) {
                return Err(ProxyError::SharedSession(what));
            }
        }
        let uri = live
            .upstream
            .uri_for(&pq)
            .map_err(|e| ProxyError::BadRequest(format!("cannot forward this path: {e}")))?;
        let mut headers = std::mem::take(&mut parts.headers);
        strip_request_headers(&mut headers);
        headers.insert(header::HOST, live.upstream.host.clone());

        // The client's own session creation, or its own token: untouched.
        if own_token || qb::is_session_create(&parts.method, pq.path()) {
            let (body, over) = Body::capped(Bytes::new(), body, body_limit);
            let req = upstream_request(&parts.method, uri, headers, body);
            let (resp, slot) = self
                .send(live, req, deadline)
                .await
                .map_err(|e| cut_off(e, &over, body_limit))?;
            return Ok(resp.map(|b| Body::upstream(b, slot)));
        }

        let session = match session {
            Some(s) => s,
            None => identity.session(deadline).await,
        }
        .map_err(|e| unavailable(e, live.timeout))?;
        let replayable = match body::buffer(body, live.replay_body_limit).await {
            Ok(Buffered::Complete(bytes)) if bytes.len() as u64 > body_limit => {
                return Err(ProxyError::BodyTooLarge(body_limit));
            }
            Ok(Buffered::Complete(bytes)) => Some(bytes),
            Ok(Buffered::TooLarge { head, tail }) => {
                let (body, over) = Body::capped(head, tail, body_limit);
                let req = with_token(&parts.method, uri, headers, &session, body);
                let sent = self
                    .send_checked(live, req, identity, &session, deadline)
                    .await;
                return match sent.map_err(|e| cut_off(e, &over, body_limit))? {
                    Checked::Answer(resp) => Ok(resp),
                    Checked::Expired(resp) => {
                        // The body is gone: the client gets the 401, and the
                        // next request gets a new session.
                        tracing::info!(
                            path = parts.uri.path(),
                            limit = live.replay_body_limit,
                            "session expired under a request too large to replay; passing the 401 on"
                        );
                        identity.report_refused(&session);
                        Ok(resp)
                    }
                };
            }
            Err(e) => {
                return Err(ProxyError::BadRequest(format!(
                    "could not read the request body: {e}"
                )));
            }
        };

        let replay_headers = headers.clone();
        let req = with_token(
            &parts.method,
            uri.clone(),
            headers,
            &session,
            body_of(&replayable),
        );
        let refusal = match self
            .send_checked(live, req, identity, &session, deadline)
            .await?
        {
            Checked::Answer(resp) => return Ok(resp),
            Checked::Expired(resp) => resp,
        };
        let fresh = match identity.replacement(&session, deadline).await {
            Ok(fresh) => fresh,
            // Renewal failed: say why, rather than pass on a 401 the client
            // cannot act on.
            Err(e) => {
                drop(refusal);
                return Err(unavailable(e, live.timeout));
            }
        };
        identity.metrics().replay();
        tracing::debug!(
            method = %parts.method,
            path = parts.uri.path(),
            token = %fresh.token_prefix(),
            "replaying with the renewed session"
        );
        let req = with_token(
            &parts.method,
            uri,
            replay_headers,
            &fresh,
            body_of(&replayable),
        );
        match self
            .send_checked(live, req, identity, &fresh, deadline)
            .await?
        {
            Checked::Answer(resp) => Ok(resp),
            Checked::Expired(resp) => {
                // Refused twice in a row: report it and let the client see it.
                identity.report_refused(&fresh);
                Ok(resp)
            }
        }
    }

    /// Sends a request upstream within the deadline, in one of the
    /// upstream's slots; the caller holds it until the response is read.
    async fn send(
        &self,
        live: &Live,
        req: Request<Body>,
        deadline: Instant,
    ) -> Result<(Response<Incoming>, OwnedSemaphorePermit), ProxyError> {
        let slots = &self.inner.slots;
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.inner.metrics.upstream_slot_wait();
                match timeout_at(deadline, slots.clone().acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    // Timed out, or the semaphore is closed (never done).
                    _ => {
                        return Err(ProxyError::UpstreamBusy {
                            limit: live.upstream.max_connections,
                            waited: live.timeout,
                        })
                    }
                }
            }
        };
        let started = Instant::now();
        let result = timeout_at(deadline, live.client.request(req)).await;
        self.inner.metrics.upstream_latency(started.elapsed());
        match result {
            Err(_) => Err(ProxyError::UpstreamTimeout(live.timeout)),
            Ok(Err(e)) if e.is_connect() => {
                Err(ProxyError::UpstreamUnreachable(upstream::describe(&e)))
            }
            Ok(Err(e)) => Err(ProxyError::Upstream(upstream::describe(&e))),
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok((resp, slot))
            }
        }
    }

    /// Sends a request made with `session` and sorts the answer: QuickBlox's
    /// "Required session does not exist", or anything else (which counts as
    /// a use of the session).
    async fn send_checked(
        &self,
        live: &Live,
        req: Request<Body>,
        identity: &Identity,
        session: &Session,
        deadline: Instant,
    ) -> Result<Checked, ProxyError> {
        let (resp, slot) = self.send(live, req, deadline).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            identity.record_use(session, resp.status(), resp.headers());
            return Ok(Checked::Answer(resp.map(|b| Body::upstream(b, slot))));
        }
        let (parts, body) = resp.into_parts();
        let read = timeout_at(deadline, body::buffer(body, MAX_REFUSAL_BODY))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(live.timeout))?
            .map_err(|e| ProxyError::Upstream(format!("reading a 401 answer: {e}")))?;
        Ok(match read {
            Buffered::Complete(bytes) => {
                // Read whole: the connection is free again.
                drop(slot);
                let expired = qb::is_session_expired(&bytes);
                let resp = Response::from_parts(parts, Body::full(bytes));
                if expired {
                    Checked::Expired(resp)
                } else {
                    Checked::Answer(resp)
                }
            }
            Buffered::TooLarge { head, tail } => Checked::Answer(Response::from_parts(
                parts,
                Body::Chain {
                    head: Some(head),
                    tail,
                    slot: Some(slot),
                },
            )),
        })
    }
}

/// A failed send whose request body was cut off at the limit is the
/// client's doing: 413, not 502.
fn cut_off(e: ProxyError, over: &AtomicBool, limit: u64) -> ProxyError {
    if over.load(Ordering::Relaxed) {
        ProxyError::BodyTooLarge(limit)
    } else {
        e
    }
}

/// The declared `Content-Length`, if there is a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Logs and counts the outcome of a request.
fn finish(
    parts: &Parts,
    result: Result<Response<Body>, ProxyError>,
    metrics: &IdentityMetrics,
    identity: Option<&Identity>,
    client: Option<&Client>,
) -> Response<Body> {
    let name = identity.map_or("", |i| i.name());
    let client_name = client.map_or("", |c| c.name.as_str());
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(
                identity = name,
                client = client_name,
                method = %parts.method,
                path = parts.uri.path(),
                status = e.status().as_u16(),
                error = %e,
                "request answered by qbproxy"
            );
            e.into_response()
        }
    };
    let status = resp.status();
    if let Some(identity) = identity {
        // QuickBlox answers writes made with an application session with
        // 422 "Forbidden. Need user."; say which identity was used.
        if status == StatusCode::UNPROCESSABLE_ENTITY
            && identity.info().kind == "application"
            && !matches!(parts.method, Method::GET | Method::HEAD)
        {
            tracing::info!(
                identity = name,
                method = %parts.method,
                path = parts.uri.path(),
                "write through an application identity; QuickBlox needs a user session for it"
            );
        }
    }
    tracing::debug!(identity = name, method = %parts.method, path = parts.uri.path(), status = status.as_u16(), "request");
    metrics.request(status);
    if let Some(c) = client {
        c.metrics.inc(status);
    }
    resp
}

/// One request's configuration and bounds: time and body bytes.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    live: &'a Live,
    deadline: Instant,
    max_body: u64,
}

enum Checked {
    Answer(Response<Body>),
    Expired(Response<Body>),
}

fn unavailable(e: Unavailable, timeout: Duration) -> ProxyError {
    match e {
        Unavailable::Failed(e) => ProxyError::Session(e),
        Unavailable::TimedOut => ProxyError::SessionTimeout(timeout),
    }
}

fn body_of(buffered: &Option<Bytes>) -> Body {
    buffered.clone().map_or_else(Body::empty, Body::full)
}

fn upstream_request(method: &Method, uri: Uri, headers: HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

fn with_token(
    method: &Method,
    uri: Uri,
    mut headers: HeaderMap,
    session: &Session,
    body: Body,
) -> Request<Body> {
    headers.insert(qb::QB_TOKEN, session.token().clone());
    upstream_request(method, uri, headers, body)
}

/// Removes the connection-level headers, including any named in
/// `Connection`. Most messages have none: one pass over the names finds
/// that, without a lookup per hop-by-hop name.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if let Some(listed) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = listed
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Request side: hop-by-hop headers, `Expect`, and headers addressed to
/// qbproxy itself (`QBProxy-*`).
fn strip_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    let ours =
        |k: &HeaderName| k == header::EXPECT || k.as_str().starts_with(qb::QBPROXY_HEADER_PREFIX);
    if headers.keys().any(ours) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| ours(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert("qbproxy-identity", HeaderValue::from_static("bot"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_request_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }
}
