//! Forwarding: the request handler of the proxy listener.
//!
//! For each request: make its headers what will be forwarded
//! (`headers::inbound`: hop-by-hop ones removed, a `Connection` naming an
//! end-to-end header or two `Content-Type`s refused), admit it (the gate),
//! decide on its canonical form (`canonical`: method, overrides, path,
//! identity, the client's rules, the guard on calls that would touch the
//! shared session), read its body within its limits, then strip the
//! client's own credentials (`QB-Token`, `Authorization`, `On-Behalf-Of`)
//! and `Host`, inject the session's `QB-Token` (or an API key identity's
//! `Authorization: ApiKey` and `On-Behalf-Of`), and send the canonical path
//! (query as sent) upstream. When QuickBlox answers 401 "Required session does not exist",
//! ask the identity for the single renewal and replay the request once
//! with the new token. `GET /session.json` is answered here, without the
//! token; a `QB-Token` response header never reaches a client.
//!
//! This module is the only writer of the credential headers on forwarded
//! requests. It reads the session lock-free and never waits for a
//! proactive renewal.

pub(crate) mod access_log;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod headers;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::request::Parts;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use hyper::body::Incoming;
use tokio::time::{timeout_at, Instant};

use crate::config::{ClientToken, TargetId};
use crate::gateway::access::{self, ApiClient};
use crate::gateway::canonical;
use crate::net::body::{
    self, Body, BodyLimits, Budget, Buffered, ClientBody, ClientRead, Cut, CutFlag, ReadError,
    Reservation,
};
use crate::proxy::access_log::{Outcome, Trace, Who};
use crate::proxy::error::ProxyError;
use crate::proxy::files::FileCall;
use crate::quickblox::credentials::IdentityKind;
use crate::upstream::fair::{FairSlots, Holder};

use crate::app::live::Live;
use crate::app::worker;
use crate::gateway::overrides::{self, Found, Override};
use crate::gateway::route::{self, Target};
use crate::net::server::{Conn, OncePerConnection};
use crate::quickblox;
use crate::session::pool::Pool;
use crate::session::{HeldTokens, Identity, Scheme, Session, Unavailable};
use crate::telemetry::metrics::{IdentityMetrics, Metrics};
use crate::upstream::{Lease, SendError};

/// A client sent credentials of its own, which were replaced: logged once
/// per connection.
const TOKEN_REPLACED: OncePerConnection = OncePerConnection::nth(0);

/// A cheap-to-clone handle on the forwarding state.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Loaded once per request, published whole by the reloader: a request
    /// runs start to end with one consistent configuration.
    live: Arc<ArcSwap<Live>>,
    /// `upstream.max_in_flight` slots, one per request in flight upstream,
    /// shared fairly between API clients (`fair.rs`),
    /// held until its response body is read. One limit for the proxy's
    /// life, resized on reload, so requests in flight across a reload
    /// count against one cap.
    slots: FairSlots,
    metrics: Metrics,
    /// Every token the identities hold or held recently, to refuse one a
    /// client sends back (`client_token = "keep"`).
    held: HeldTokens,
    /// Request body bytes held for replays, across every request.
    budget: Arc<Budget>,
    /// `qbproxy_worker_requests_total`, by worker (`worker.rs`).
    worker_requests: Vec<prometheus::IntCounter>,
}

/// Replays of one request at most: one, and with a pool one more for each
/// member moved to whose session had lapsed too. The last waits for its
/// member's own renewal rather than move again (`Pool::replacement`).
const MAX_REPLAYS: usize = 3;

/// A 401 body longer than this is not QuickBlox's expiry message; it is
/// passed on without being inspected further.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

impl Proxy {
    /// Serves with whatever `live` holds at each request's start.
    pub fn new(
        live: Arc<ArcSwap<Live>>,
        metrics: Metrics,
        held: HeldTokens,
        workers: usize,
    ) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                slots: FairSlots::new(live.load().upstream().max_in_flight),
                worker_requests: metrics.worker_requests(workers),
                live,
                metrics,
                held,
                budget: Arc::new(Budget::default()),
            }),
        }
    }

    /// Moves the upstream cap (a reload, before it publishes).
    pub fn resize_slots(&self, max_in_flight: usize) {
        self.inner.slots.resize(max_in_flight);
    }

    /// Bytes of request bodies held for replays right now.
    pub fn buffered_bytes(&self) -> usize {
        self.inner.budget.used()
    }

    /// Answers one client request. Never fails: qbproxy's own errors become
    /// JSON responses in QuickBlox's shape.
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let inner = &*self.inner;
        if let Some(counter) = inner.worker_requests.get(worker::current()) {
            counter.inc();
        }
        let (mut parts, body) = req.into_parts();
        // The headers as sent count against the size limit; then, before
        // anything is decided, they become what will be forwarded.
        let sent_bytes = access::header_bytes(&parts.headers);
        let forwardable = headers::inbound(&mut parts.headers);
        let live = inner.live.load_full();
        let started = Instant::now();
        let deadline = started + live.timeout();
        let unrouted = inner.metrics.unrouted();
        // The request's record. With the access log on it keeps the peer
        // and the URI (a few reference counts), and if this future is
        // dropped before `finish` (the client went away), it writes the
        // access event all the same.
        let access = live
            .config
            .log
            .access
            .then(|| (conn.peer(), parts.uri.clone()));
        let trace = Trace::new(started, parts.method.clone(), access);
        // One logging phase: every request, answered or refused at any
        // stage, ends in the one `finish` below, with the path as sent
        // until a plan exists and the canonical path after.
        let (path, counted, client, result) =
            match self.admit_and_decide(&live, &conn, &parts, sent_bytes, forwardable, unrouted) {
                Err(refused) => {
                    let Refused {
                        error,
                        counted,
                        client,
                    } = *refused;
                    (None, counted, client, Err(error))
                }
                Ok((client, plan)) => {
                    let mut counted = counted_as(&plan.target);
                    let deadline = match plan.file {
                        Some(FileCall::Upload) => started + live.config.limits.upload_timeout,
                        _ => deadline,
                    };
                    let ctx = Ctx {
                        live: &live,
                        conn: &conn,
                        client,
                        trace: &trace,
                        deadline,
                        share: Share::of(client),
                    };
                    // Where this client reaches qbproxy, for the upload URL
                    // of a file it creates.
                    let public = (plan.file == Some(FileCall::Create))
                        .then(|| files::public_base(&live.config.listen, &parts, &plan.prefix))
                        .flatten();
                    let result = self
                        .respond(&ctx, &mut parts, body, &plan, &mut counted)
                        .await;
                    let result = match (public, result) {
                        (Some(public), Ok(resp)) => {
                            files::rewrite_answer(resp, &public, live.upstream(), deadline).await
                        }
                        (_, result) => result,
                    };
                    (Some(plan.path), counted, client, result)
                }
            };
        finish(&trace, parts.uri.path(), path, result, counted, client)
    }

    /// The gate, then every decision: the client (if keys are configured)
    /// and the plan, or the refusal with who it counts under.
    fn admit_and_decide<'l>(
        &self,
        live: &'l Live,
        conn: &Conn,
        parts: &Parts,
        sent_bytes: usize,
        forwardable: Result<(), headers::HeaderError>,
        unrouted: &'l IdentityMetrics,
    ) -> Result<(Option<&'l ApiClient>, Plan<'l>), Box<Refused<'l>>> {
        let client = match live
            .gate
            .admit(conn.peer().ip(), &parts.headers, sent_bytes)
        {
            Ok(client) => client,
            Err(e) => {
                if matches!(e, access::Refusal::SourceNotAllowed(_)) {
                    // Nothing else will be served on this connection.
                    conn.close();
                }
                return Err(Refused::new(e.into(), Counted::nobody(unrouted), None));
            }
        };
        // Counted and logged under the client its key named from here on.
        if let Some(Err(e)) = client.map(ApiClient::within_rate) {
            return Err(Refused::new(e.into(), Counted::nobody(unrouted), client));
        }
        if let Err(e) = forwardable {
            return Err(Refused::new(e.into(), Counted::nobody(unrouted), client));
        }
        match self.decide(live, parts, client) {
            Ok(plan) => Ok((client, plan)),
            // Counted under the identity or pool it was refused for, if it
            // got that far.
            Err((e, target)) => {
                let counted = target
                    .as_ref()
                    .map_or(Counted::nobody(unrouted), counted_as);
                Err(Refused::new(e, counted, client))
            }
        }
    }

    /// A decided request: its body, its session, the exchange. `counted`
    /// becomes the pool member that served it.
    async fn respond<'l>(
        &self,
        ctx: &Ctx<'l>,
        parts: &mut Parts,
        body: Incoming,
        plan: &Plan<'l>,
        counted: &mut Counted<'l>,
    ) -> Result<Response<Body>, ProxyError> {
        let Ctx {
            live,
            conn,
            client,
            trace,
            deadline,
            ..
        } = *ctx;
        // Decided on; now nothing spelt with '_' goes any further.
        headers::strip_underscored(&mut parts.headers);
        let upload = plan.file == Some(FileCall::Upload);
        let limits = BodyLimits {
            max_bytes: max_body_bytes(live, plan.file),
            idle: live.body_read_timeout(),
            deadline,
        };
        trace.known(client.map(|c| &c.name), || counted.who());
        if let (Kind::Forward, Some(header)) = (plan.kind, client_credential(&parts.headers)) {
            // A client that made its own session (a legacy client), or
            // sends its own key, acts as the shared identity from here on:
            // make that visible.
            counted.metrics.client_token_replaced();
            if conn.first(TOKEN_REPLACED) {
                tracing::info!(
                    peer = %conn.peer(),
                    client = client.map_or("", |c| &*c.name),
                    target = plan.target.name(),
                    header = header.as_str(),
                    "the client sent credentials of its own; qbproxy replaces them with the shared identity's \
                     (proxy.client_token = \"replace\"), so the client acts as that identity. Logged once per connection"
                );
            }
        }
        // The client's own session or token: no identity is involved.
        if matches!(plan.kind, Kind::OwnSessionCreate | Kind::OwnToken) {
            let scanner = overrides::body_scanner(&parts.method, &parts.headers);
            let (body, cut) = ClientBody::stream(Vec::new(), body, limits, scanner, None);
            trace.body_streams(&cut);
            return self.pass_through(ctx, parts, plan, body, &cut).await;
        }
        // The body first: a client slow to send it holds no session, no
        // pool member and no upstream slot meanwhile.
        let body = match plan.kind {
            Kind::SessionRead => Prepared::Whole(Bytes::new(), None),
            // A file's bytes stream, never held for a replay: if the
            // session expired under it, the client gets the 401.
            _ if upload => {
                let scanner = overrides::body_scanner(&parts.method, &parts.headers);
                let (body, cut) = ClientBody::stream(Vec::new(), body, limits, scanner, None);
                Prepared::Stream(body, cut)
            }
            _ => self.read_body(live, parts, body, limits).await?,
        };
        match &body {
            Prepared::Whole(bytes, _) => trace.body_read(bytes.len()),
            Prepared::Stream(_, cut) => trace.body_streams(cut),
        }
        match plan.target {
            Target::Identity(identity) => {
                identity.start();
                *counted = Counted::identity(identity);
                self.exchange(ctx, parts, plan, body, identity, None).await
            }
            Target::Pool(pool) => {
                let sticky = parts.headers.get(route::CLIENT_HEADER).cloned();
                let (lease, session) = pool.acquire_session(sticky.as_ref(), deadline).await?;
                let identity = lease.member_of(pool);
                *counted = Counted::identity(identity);
                let member = Member {
                    pool,
                    lease: &lease,
                    client: sticky.as_ref(),
                    session,
                    counted,
                };
                let answer = self
                    .exchange(ctx, parts, plan, body, identity, Some(member))
                    .await;
                // Held until the exchange is over.
                drop(lease);
                answer
            }
        }
    }

    /// Takes every decision about a request on its canonical form: method,
    /// overrides, path, identity, the client's rules, the guard. What it
    /// returns is what will be forwarded. A refusal comes with the target
    /// it was refused for, once one was chosen.
    fn decide<'a>(
        &self,
        live: &'a Live,
        parts: &Parts,
        client: Option<&ApiClient>,
    ) -> Result<Plan<'a>, (ProxyError, Option<Target<'a>>)> {
        let Routed {
            target: id,
            prefix,
            rest,
            query,
            file,
        } = self.route(live, parts, client).map_err(|e| (e, None))?;
        let target = live.target(id);
        let refuse = |e: ProxyError| (e, Some(target));
        if let Some(c) = client {
            c.permit(id, target.name(), &parts.method, &rest)
                .map_err(|e| refuse(e.into()))?;
        }
        let method = &parts.method;
        let own_token = match live.client_token() {
            ClientToken::Keep => {
                if self.holds_any(&parts.headers) {
                    return Err(refuse(ProxyError::HeldToken));
                }
                // The client's own session token or API key; an
                // `On-Behalf-Of` alone is no credential (and is dropped).
                parts.headers.contains_key(quickblox::QB_TOKEN)
                    || parts
                        .headers
                        .get_all(header::AUTHORIZATION)
                        .iter()
                        .any(|v| quickblox::api_key(v.as_bytes()).is_some())
            }
            ClientToken::Replace => false,
        };
        let kind = if method == Method::POST && rest == quickblox::SESSION_CREATE_PATH {
            Kind::OwnSessionCreate
        } else if own_token {
            Kind::OwnToken
        } else if let Some(what) = quickblox::shared_session_call(method, &rest) {
            return Err(refuse(ProxyError::SharedSession(what)));
        } else if matches!(*method, Method::GET | Method::HEAD)
            && canonical::key_is(&rest, quickblox::SESSION_KEY)
        {
            Kind::SessionRead
        } else {
            Kind::Forward
        };
        let uri = live
            .upstream()
            .uri_for(&rest, query)
            .map_err(|e| refuse(ProxyError::Unforwardable(e)))?;
        Ok(Plan {
            file,
            target,
            path: rest,
            uri,
            kind,
            prefix,
        })
    }

    /// True if any credential header of the request (every value of
    /// `QB-Token` and `Authorization`, every word of each) is a token or
    /// API key qbproxy holds or held: a client may keep its own
    /// credentials, never borrow qbproxy's, however it spells them.
    fn holds_any(&self, headers: &HeaderMap) -> bool {
        let held = &self.inner.held;
        CLIENT_CREDENTIALS[..2]
            .iter()
            .flat_map(|name| headers.get_all(name))
            .flat_map(|value| {
                value
                    .as_bytes()
                    .split(|b| matches!(b, b' ' | b'\t' | b','))
                    .filter(|word| !word.is_empty())
            })
            .any(|word| held.contains(word))
    }

    /// The request's canonical path and who it acts as: checks the method
    /// and overrides, canonicalises the path, and routes it.
    fn route<'p>(
        &self,
        live: &Live,
        parts: &'p Parts,
        client: Option<&ApiClient>,
    ) -> Result<Routed<'p>, ProxyError> {
        let method = &parts.method;
        if !canonical::method_allowed(method) {
            return Err(ProxyError::MethodNotAllowed(method.clone()));
        }
        if let Some(name) = canonical::override_header(&parts.headers) {
            return Err(ProxyError::MethodOverride(Override::Header(
                name.to_owned(),
            )));
        }
        let query = parts.uri.query();
        if query.is_some_and(overrides::query_has_method) {
            return Err(ProxyError::MethodOverride(Override::Query));
        }
        let path = canonical::path(parts.uri.path()).map_err(ProxyError::BadPath)?;
        let named = parts.headers.get(route::IDENTITY_HEADER);
        let (mut target, rest) =
            live.router
                .route(named, &path)
                .map_err(|e| ProxyError::UnknownIdentity {
                    // The names a restricted client may use, not every name.
                    valid: client.and_then(|c| c.allowed_names()).unwrap_or(e.valid),
                    name: e.name,
                })?;
        let file = FileCall::of(method, rest);
        let max_bytes = max_body_bytes(live, file);
        if content_length(&parts.headers).is_some_and(|n| n > max_bytes) {
            return Err(ProxyError::BodyTooLarge(max_bytes));
        }
        let prefixed = rest.len() != path.len();
        // A client limited to some identities acts as its first one unless
        // the request names another.
        if let (false, None, Some(own)) = (prefixed, named, client.and_then(|c| c.default_target()))
        {
            target = own;
        }
        Ok(Routed {
            target,
            // Kept only for a file's creation (its upload URL keeps it): no
            // allocation for every other request.
            prefix: match file {
                Some(FileCall::Create) => path[..path.len() - rest.len()].to_owned(),
                _ => String::new(),
            },
            rest: rest.to_owned(),
            query,
            file,
        })
    }

    /// Reads a body to forward: whole for a replay when it fits, else its
    /// head and the rest to stream.
    async fn read_body(
        &self,
        live: &Live,
        parts: &Parts,
        body: Incoming,
        limits: BodyLimits,
    ) -> Result<Prepared, ProxyError> {
        let scanner = overrides::body_scanner(&parts.method, &parts.headers);
        let read = body::read_client(
            body,
            live.replay_body_limit(),
            &self.inner.budget,
            live.max_buffered_bytes(),
            limits,
            scanner,
        )
        .await;
        match read {
            Ok(ClientRead::Complete(bytes, reserved)) => Ok(Prepared::Whole(bytes, Some(reserved))),
            Ok(ClientRead::Partial {
                head,
                tail,
                scanner,
                reserved,
                budget_full,
            }) => {
                if budget_full {
                    self.inner.metrics.buffer_full();
                    tracing::debug!(
                        limit = live.max_buffered_bytes(),
                        "limits.max_buffered_bytes in use; this body streams without a replay buffer"
                    );
                }
                let (body, cut) = ClientBody::stream(head, tail, limits, scanner, Some(reserved));
                Ok(Prepared::Stream(body, cut))
            }
            Err(e) => Err(read_error(e, live)),
        }
    }

    /// Forwards the client's own session creation, or a request with its
    /// own token (`client_token = "keep"`), untouched: no token is added,
    /// nothing is renewed.
    async fn pass_through(
        &self,
        ctx: &Ctx<'_>,
        parts: &mut Parts,
        plan: &Plan<'_>,
        body: Body,
        cut: &CutFlag,
    ) -> Result<Response<Body>, ProxyError> {
        let mut headers = std::mem::take(&mut parts.headers);
        headers::outbound_request(&mut headers);
        let req = upstream_request(&parts.method, plan.uri.clone(), headers, body);
        // A streaming body goes again only if it never left (hyper's copy).
        let (resp, slot) = self
            .send(ctx, req, &mut || None)
            .await
            .map_err(|e| cut_off(e, cut, ctx.live))?;
        Ok(resp.map(|b| Body::upstream(b, slot)))
    }

    /// Serves a request as `identity`: answers a session read itself, or
    /// forwards with the session's token and replays once if QuickBlox says
    /// the session does not exist. `member`: for a pool's member, the pool,
    /// its lease and the session the pool found (a replay may move on to
    /// another member); else the identity's session is asked for here.
    async fn exchange(
        &self,
        ctx: &Ctx<'_>,
        parts: &mut Parts,
        plan: &Plan<'_>,
        body: Prepared,
        identity: &Identity,
        member: Option<Member<'_, '_>>,
    ) -> Result<Response<Body>, ProxyError> {
        let (live, trace, deadline) = (ctx.live, ctx.trace, ctx.deadline);
        let (session, mut member) = match member {
            Some(Member {
                pool,
                lease,
                client,
                session,
                counted,
            }) => (session, Some((pool, lease, client, counted))),
            None => (identity.session(deadline).await, None),
        };
        let session = session.map_err(|e| unavailable(e, live.timeout()))?;
        if plan.kind == Kind::SessionRead {
            return Ok(session_answer(&parts.method, &plan.path, &session));
        }
        let mut headers = std::mem::take(&mut parts.headers);
        headers::outbound_request(&mut headers);
        // The request acts as the identity, with its credential alone.
        for name in &CLIENT_CREDENTIALS {
            headers.remove(name);
        }
        let uri = plan.uri.clone();

        let (replayable, _reserved) = match body {
            Prepared::Whole(bytes, reserved) => (bytes, reserved),
            Prepared::Stream(body, cut) => {
                let req = with_token(&parts.method, uri, headers, &session, body);
                let sent = self
                    .send_checked(ctx, req, &mut || None, identity, &session)
                    .await;
                return match sent.map_err(|e| cut_off(e, &cut, live))? {
                    Checked::Answer(resp) => Ok(resp),
                    Checked::Expired(resp) => {
                        // The body is gone: the client gets the 401, and the
                        // next request gets a new session.
                        tracing::info!(
                            path = plan.path,
                            limit = live.replay_body_limit(),
                            "session expired under a request not buffered for a replay; passing the 401 on"
                        );
                        identity.report_dead(&session);
                        Ok(resp)
                    }
                };
            }
        };

        let replay_headers = headers.clone();
        let req = with_token(
            &parts.method,
            uri.clone(),
            headers,
            &session,
            Body::full(replayable.clone()),
        );
        // The same request again, should the upstream not process it.
        let mut again = || {
            Some(with_token(
                &parts.method,
                uri.clone(),
                replay_headers.clone(),
                &session,
                Body::full(replayable.clone()),
            ))
        };
        let sent = self
            .send_checked(ctx, req, &mut again, identity, &session)
            .await?;
        let mut refusal = match sent {
            Checked::Answer(resp) => return Ok(resp),
            Checked::Expired(resp) => resp,
        };
        // The newest session the refusing identity held when the refusal
        // came: a "fresh" session no newer was not made after it, and what
        // ended this request's session (every session expiring at once) may
        // have ended that one too.
        let mut held_then = identity.current().map_or(0, |s| s.generation());
        // One replay with the renewed session. A pool's member that cannot
        // renew while another can serve hands the replay to that other (its
        // lease held to the end, like the first's); that member's own
        // session may have lapsed too (every session expires at once after
        // two idle hours), and is then renewed and replayed with in turn.
        let mut dead = session;
        let mut moved_to: Vec<crate::session::pool::Lease> = Vec::new();
        let mut round = 0;
        loop {
            round += 1;
            let (moved, fresh) = match &mut member {
                Some((pool, first, client, counted)) => {
                    let (moved, fresh) = pool
                        .replacement(
                            moved_to.last().unwrap_or(first),
                            &dead,
                            *client,
                            deadline,
                            round < MAX_REPLAYS,
                        )
                        .await
                        .map_err(ProxyError::from)?;
                    if let Some(lease) = &moved {
                        // Counted under the member that answers.
                        **counted = Counted::identity(lease.member_of(pool));
                    }
                    (moved, fresh)
                }
                None => (None, identity.replacement(&dead, deadline).await),
            };
            let fresh = match fresh {
                Ok(fresh) => fresh,
                // Renewal failed: say why, rather than pass on a 401 the
                // client cannot act on.
                Err(e) => {
                    drop(refusal);
                    return Err(unavailable(e, live.timeout()));
                }
            };
            let was_moved = moved.is_some();
            moved_to.extend(moved);
            let identity = moved_to.last().map_or(identity, |lease| lease.identity());
            identity.metrics().replay();
            trace.replayed();
            tracing::debug!(
                method = %parts.method,
                path = plan.path,
                token = %fresh.token_prefix(),
                moved = was_moved,
                "replaying with the renewed session"
            );
            let replay = |headers| {
                with_token(
                    &parts.method,
                    uri.clone(),
                    headers,
                    &fresh,
                    Body::full(replayable.clone()),
                )
            };
            let req = replay(replay_headers.clone());
            let mut again = || Some(replay(replay_headers.clone()));
            match self
                .send_checked(ctx, req, &mut again, identity, &fresh)
                .await?
            {
                Checked::Answer(resp) => return Ok(resp),
                // Another member's session, lapsed as well, or a session
                // made before the refusal and ended with the refused one:
                // its turn.
                Checked::Expired(resp)
                    if round < MAX_REPLAYS && (was_moved || fresh.generation() <= held_then) =>
                {
                    held_then = identity.current().map_or(0, |s| s.generation());
                    refusal = resp;
                    dead = fresh;
                }
                Checked::Expired(resp) => {
                    // A session renewed after the refusal, refused at once:
                    // report it and let the client see it.
                    identity.report_dead(&fresh);
                    return Ok(resp);
                }
            }
        }
    }

    /// Sends a request upstream within the deadline, in one of the
    /// upstream's slots; the caller holds it until the response is read.
    /// `again` makes the request anew if the upstream did not process it
    /// (`upstream::Pool::send`).
    async fn send(
        &self,
        ctx: &Ctx<'_>,
        req: Request<Body>,
        again: &mut (dyn FnMut() -> Option<Request<Body>> + Send),
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        let (live, trace, deadline) = (ctx.live, ctx.trace, ctx.deadline);
        // QuickBlox's rate first (fleet-wide with [cluster]): a request
        // waits for its turn only so long.
        if let Some(rate) = &live.rate {
            if rate.acquire(deadline).await.is_err() {
                self.inner.metrics.upstream_rate_limited();
                return Err(ProxyError::UpstreamRateLimited {
                    rate: rate.rate().per_second,
                    waited: rate.rate().wait,
                });
            }
        }
        let slots = &self.inner.slots;
        let share = &ctx.share;
        let permit = match slots.try_acquire(&share.holder, share.cap) {
            Some(slot) => slot,
            None => {
                self.inner.metrics.upstream_slot_wait();
                match slots.acquire(&share.holder, share.cap, deadline).await {
                    Ok(slot) => slot,
                    Err(_) => {
                        return Err(ProxyError::UpstreamBusy {
                            what: "requests in flight to QuickBlox",
                            key: "upstream.max_in_flight, or the client's max_in_flight",
                            limit: share.cap.min(live.upstream().max_in_flight),
                            waited: live.timeout(),
                        })
                    }
                }
            }
        };
        let started = Instant::now();
        let sent = live.client().send(req, deadline, again, Some(permit));
        let result = timeout_at(deadline, sent).await;
        let took = started.elapsed();
        self.inner.metrics.upstream_latency(took);
        trace.upstream(took);
        match result {
            Err(_) => Err(ProxyError::UpstreamTimeout(live.timeout())),
            Ok(Err(SendError::Connect(e))) => Err(ProxyError::UpstreamUnreachable(e)),
            Ok(Err(SendError::Busy)) => Err(ProxyError::UpstreamBusy {
                what: "connections to QuickBlox",
                key: "upstream.max_connections",
                limit: live.upstream().max_connections,
                waited: live.timeout(),
            }),
            Ok(Err(SendError::Failed(e))) => Err(ProxyError::Upstream(e)),
            Ok(Ok((mut resp, lease))) => {
                if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                    self.inner.metrics.upstream_429();
                }
                headers::outbound_response(resp.headers_mut());
                Ok((resp, lease))
            }
        }
    }

    /// Sends a request made with `session` and sorts the answer: QuickBlox's
    /// "Required session does not exist", or anything else (which counts as
    /// a use of the session).
    async fn send_checked(
        &self,
        ctx: &Ctx<'_>,
        req: Request<Body>,
        again: &mut (dyn FnMut() -> Option<Request<Body>> + Send),
        identity: &Identity,
        session: &Session,
    ) -> Result<Checked, ProxyError> {
        let (live, deadline) = (ctx.live, ctx.deadline);
        let (resp, slot) = self.send(ctx, req, again).await?;
        // An API key has no session to expire: its 401s are the client's.
        if resp.status() != StatusCode::UNAUTHORIZED || session.scheme() == Scheme::ApiKey {
            identity.record_use(session, resp.status(), resp.headers());
            return Ok(Checked::Answer(resp.map(|b| Body::upstream(b, slot))));
        }
        let (parts, body) = resp.into_parts();
        let read = timeout_at(deadline, body::buffer(body, MAX_REFUSAL_BODY))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(live.timeout()))?
            .map_err(ProxyError::RefusalUnread)?;
        Ok(match read {
            Buffered::Complete(bytes) => {
                // Read whole: the connection is free again.
                slot.complete();
                let expired = quickblox::is_session_expired(&bytes);
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

/// A failed send whose request body was cut off is the client's doing:
/// answered for what it was (413, 408, 400), not as an upstream error.
fn cut_off(e: ProxyError, cut: &CutFlag, live: &Live) -> ProxyError {
    match cut.get() {
        None => e,
        Some(Cut::TooLarge(limit)) => ProxyError::BodyTooLarge(limit),
        Some(Cut::TimedOut) => ProxyError::BodyTimeout(live.body_read_timeout()),
        Some(Cut::Override(found)) => override_error(found),
    }
}

fn override_error(found: Found) -> ProxyError {
    match found {
        Found::MethodParam => ProxyError::MethodOverride(Override::Body),
    }
}

fn read_error(e: ReadError, live: &Live) -> ProxyError {
    match e {
        ReadError::TimedOut => ProxyError::BodyTimeout(live.body_read_timeout()),
        ReadError::TooLarge(limit) => ProxyError::BodyTooLarge(limit),
        ReadError::Override(found) => override_error(found),
        ReadError::Body(e) => ProxyError::BodyUnreadable(e),
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

/// Whose series a request is counted in, and who it acted as.
#[derive(Clone, Copy)]
struct Counted<'a> {
    metrics: &'a IdentityMetrics,
    identity: Option<&'a Identity>,
    pool: Option<&'a Arc<Pool>>,
}

impl<'a> Counted<'a> {
    fn nobody(metrics: &'a IdentityMetrics) -> Self {
        Counted {
            metrics,
            identity: None,
            pool: None,
        }
    }

    fn identity(identity: &'a Identity) -> Self {
        Counted {
            metrics: identity.metrics(),
            identity: Some(identity),
            pool: None,
        }
    }

    fn pool(pool: &'a Arc<Pool>) -> Self {
        Counted {
            metrics: pool.metrics(),
            identity: None,
            pool: Some(pool),
        }
    }

    fn who(&self) -> Who {
        match (self.identity, self.pool) {
            (Some(i), _) => Who::Identity(i.clone()),
            (None, Some(p)) => Who::Pool(p.clone()),
            (None, None) => Who::Nobody,
        }
    }
}

/// Logs and counts the outcome of a request; with the access log on, its
/// response body writes the request's event when it is done. `sent`: the
/// path as sent; `path`: the canonical one, once decided.
fn finish(
    trace: &Trace,
    sent: &str,
    path: Option<String>,
    result: Result<Response<Body>, ProxyError>,
    counted: Counted<'_>,
    client: Option<&ApiClient>,
) -> Response<Body> {
    let Counted {
        metrics, identity, ..
    } = counted;
    let name = identity.map_or("", |i| i.name());
    let method = trace.method();
    let logged = path.as_deref().unwrap_or(sent);
    let (resp, reason) = match result {
        Ok(resp) => (resp, None),
        Err(e) => {
            // One line per refusal: the access line when the access log
            // is on (it carries the code and this reason), else this one.
            let reason = if trace.on() {
                Some(e.to_string())
            } else {
                tracing::warn!(
                    identity = name,
                    client = client.map_or("", |c| &*c.name),
                    method = %method,
                    path = logged,
                    status = e.status().as_u16(),
                    error = %e,
                    "request answered by qbproxy"
                );
                None
            };
            (e.into_response(), reason)
        }
    };
    let status = resp.status();
    if let Some(identity) = identity {
        // QuickBlox answers writes made with an application session with
        // 422 "Forbidden. Need user."; say which identity was used.
        if status == StatusCode::UNPROCESSABLE_ENTITY
            && identity.info().kind == IdentityKind::Application
            && !matches!(*method, Method::GET | Method::HEAD)
        {
            tracing::info!(
                identity = name,
                method = %method,
                path = logged,
                "write through an application identity; QuickBlox needs a user session for it"
            );
        }
    }
    metrics.request(status);
    if let Some(c) = client {
        c.metrics.inc(status);
    }
    trace.answer(resp, || Outcome {
        client: client.map(|c| c.name.clone()),
        who: counted.who(),
        path,
        reason,
    })
}

/// What qbproxy does with a request, decided on its canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Forwarded with the identity's token; replayed once on expiry.
    Forward,
    /// The client's own `POST /session.json`: forwarded untouched.
    OwnSessionCreate,
    /// `client_token = "keep"` and the client's own token: untouched.
    OwnToken,
    /// `GET`/`HEAD /session.json`: answered by qbproxy, token left out.
    SessionRead,
}

/// A request refused before it was decided: why, and who it counts under.
/// Boxed: refusals are the rare path, and the error is large.
struct Refused<'a> {
    error: ProxyError,
    counted: Counted<'a>,
    client: Option<&'a ApiClient>,
}

impl<'a> Refused<'a> {
    fn new(error: ProxyError, counted: Counted<'a>, client: Option<&'a ApiClient>) -> Box<Self> {
        Box::new(Refused {
            error,
            counted,
            client,
        })
    }
}

/// What every stage of one decided request reads: who sent it, on what,
/// under which configuration, and by when.
struct Ctx<'a> {
    /// The configuration it started with.
    live: &'a Live,
    /// The client connection it came on.
    conn: &'a Conn,
    /// Its API client, when keys are configured.
    client: Option<&'a ApiClient>,
    /// Its record, for the access event.
    trace: &'a Trace,
    /// The whole request's: session wait, upstream, replay.
    deadline: Instant,
    /// Whose share of the upstream's slots it takes.
    share: Share,
}

/// A pool's member serving a request: the pool, the member's lease, the
/// client's sticky key (what a replay needs to move to another member),
/// the session the pool found for it, and the series it counts in.
struct Member<'a, 'l> {
    pool: &'l Arc<Pool>,
    lease: &'a crate::session::pool::Lease,
    client: Option<&'a HeaderValue>,
    session: Result<Arc<Session>, Unavailable>,
    /// Whose series the request counts in: the member that answered it.
    counted: &'a mut Counted<'l>,
}

/// A request's client and its cap on slots in flight (`fair.rs`).
struct Share {
    holder: Holder,
    cap: usize,
}

impl Share {
    /// An API client's share, or the one of requests without a client (no
    /// cap of their own: there is nobody to be fair to).
    fn of(client: Option<&ApiClient>) -> Share {
        match client {
            Some(c) => Share {
                holder: Some(c.name.clone()),
                cap: c.max_in_flight,
            },
            None => Share {
                holder: None,
                cap: usize::MAX,
            },
        }
    }
}

/// A request body's limit: a file's upload has `limits.max_upload_bytes`,
/// every other request `limits.max_body_bytes`.
fn max_body_bytes(live: &Live, file: Option<FileCall>) -> u64 {
    match file {
        Some(FileCall::Upload) => live.config.limits.max_upload_bytes,
        _ => live.gate.max_body_bytes,
    }
}

/// The series a request for `target` is counted in, and who it acts as.
fn counted_as<'a>(target: &Target<'a>) -> Counted<'a> {
    match *target {
        Target::Identity(i) => Counted::identity(i),
        Target::Pool(p) => Counted::pool(p),
    }
}

/// A request, decided.
struct Plan<'a> {
    target: Target<'a>,
    /// The canonical path, without a matched identity prefix: what the
    /// decisions compared and what is forwarded.
    path: String,
    /// The upstream URI: its base, `path`, and the query as sent.
    uri: Uri,
    kind: Kind,
    /// For a file's creation, the identity prefix the path began with
    /// (empty without one, and for every other request).
    prefix: String,
    /// A file's creation or upload.
    file: Option<FileCall>,
}

/// A routed request: who it acts as, the identity prefix its canonical
/// path began with (for a file's creation), the path without it, the query
/// as sent, and whether it is a file's creation or upload.
struct Routed<'p> {
    target: TargetId,
    prefix: String,
    rest: String,
    query: Option<&'p str>,
    file: Option<FileCall>,
}

/// A request body ready to send.
enum Prepared {
    /// Whole, replayable; its share of the buffer budget is held while it
    /// may be replayed.
    Whole(Bytes, Option<Reservation>),
    /// Streams; the flag says why if it is cut off.
    Stream(Body, Arc<CutFlag>),
}

/// The answer to `GET`/`HEAD /session.json`: the identity's session as
/// QuickBlox describes it, without its token, in the format asked for.
fn session_answer(method: &Method, path: &str, session: &Session) -> Response<Body> {
    let xml = path.to_ascii_lowercase().ends_with(".xml");
    let (body, content_type) = if xml {
        (
            Bytes::from(quickblox::session_xml(session.public_json())),
            "application/xml",
        )
    } else {
        (session.public_json().clone(), "application/json")
    };
    let len = body.len();
    let mut resp = Response::new(if method == Method::HEAD {
        Body::empty()
    } else {
        Body::full(body)
    });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        quickblox::QBPROXY_ANSWERED,
        HeaderValue::from_static("session"),
    );
    resp
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

fn upstream_request(method: &Method, uri: Uri, headers: HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

/// `headers` (the client's credentials removed) with the session's.
fn with_token(
    method: &Method,
    uri: Uri,
    mut headers: HeaderMap,
    session: &Session,
    body: Body,
) -> Request<Body> {
    session.authorize(&mut headers);
    upstream_request(method, uri, headers, body)
}

/// The request headers that carry QuickBlox credentials: a session token,
/// an API key (`Authorization`), and the user an API key acts as. A
/// forwarded request carries the identity's alone; with `client_token =
/// "keep"` a client's own pass through untouched (never one qbproxy holds).
static CLIENT_CREDENTIALS: [HeaderName; 3] = [
    quickblox::QB_TOKEN,
    header::AUTHORIZATION,
    quickblox::ON_BEHALF_OF,
];

/// The first credential header the client sent, if any.
fn client_credential(headers: &HeaderMap) -> Option<&'static HeaderName> {
    CLIENT_CREDENTIALS.iter().find(|h| headers.contains_key(*h))
}
