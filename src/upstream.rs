//! The connection to QuickBlox: one pooled, keep-alive HTTP client shared by
//! forwarding and session creation, and [`SessionCreator`], the real
//! [`Source`] of sessions (signed `POST /session.json`, with clock-skew
//! correction).

use std::error::Error as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use crate::body::Body;
use crate::coalesce::Coalescing;
use crate::config::{QuickbloxConfig, UpstreamConfig};
use crate::credentials::{Credentials, SecretSource};
use crate::metrics::Metrics;
use crate::qb;
use crate::rate::UpstreamRate;
use crate::session::{ApiKeyHeaders, Attempt, BoxFuture, NewSession, SessionError, Source};
use crate::signer::{self, Params};

/// The pooled HTTP client to the upstream.
pub type HttpClient =
    hyper_util::client::legacy::Client<Coalescing<HttpsConnector<HttpConnector>>, Body>;

/// Builds the upstream client: HTTP/1.1 or HTTP/2 (by ALPN, unless
/// `upstream.http2` is off) over rustls for `https://`, plain HTTP/1.1 for
/// `http://`; pooled and kept alive.
/// An `https://` upstream needs the system's root certificates.
pub fn client(cfg: &UpstreamConfig) -> Result<HttpClient, std::io::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    // The system's roots for an https:// upstream (a plain-HTTP upstream,
    // the simulator or a sidecar, needs none), plus upstream.ca_file.
    let https = cfg.scheme == http::uri::Scheme::HTTPS;
    let roots = crate::tls::upstream_roots(https, cfg.ca.as_deref().unwrap_or(&[]))?;
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::tls::client_config(roots)?);
    let connector = if cfg.http2 {
        tls.https_or_http()
            .enable_all_versions()
            .wrap_connector(http)
    } else {
        tls.https_or_http().enable_http1().wrap_connector(http)
    };
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(Coalescing(connector)),
    )
}

/// A client error as one line: the error and its causes, e.g.
/// `client error (Connect): tcp connect error: Connection refused`.
pub fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The offset between QuickBlox's clock and ours, in seconds, learnt from a
/// "Bad timestamp" answer. Shared by every identity: it is a property of
/// the two clocks, not of a session.
#[derive(Debug, Default)]
pub struct ClockOffset(AtomicI64);

impl ClockOffset {
    pub fn seconds(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Unix time as QuickBlox sees it.
    fn unix_now(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now + self.seconds()
    }

    /// Learns the offset from the upstream's `Date` header.
    fn learn(&self, upstream_date: SystemTime) -> i64 {
        let theirs = upstream_date
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let ours = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let offset = theirs - ours;
        self.0.store(offset, Ordering::Relaxed);
        offset
    }
}

/// Creates sessions for one identity by a signed `POST /session.json`.
pub struct SessionCreator {
    /// Shared by every identity's creator, not copied into each.
    endpoint: Arc<Endpoint>,
    credentials: Credentials,
}

/// What every identity's creator shares: the client, the configuration,
/// QuickBlox's clock, the rate it may be called at.
pub struct Endpoint {
    pub client: HttpClient,
    pub upstream: Arc<UpstreamConfig>,
    pub quickblox: Arc<QuickbloxConfig>,
    pub clock: Arc<ClockOffset>,
    /// `upstream.rate`: session creations count against it.
    pub rate: Option<Arc<UpstreamRate>>,
    pub metrics: Metrics,
}

impl Endpoint {
    /// Sends one of qbproxy's own requests (a session creation, an API
    /// key's check) and reads the answer whole: they are small.
    async fn exchange(&self, req: Request<Body>) -> Result<Answer, SessionError> {
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                SessionError::Unreachable(describe(&e))
            } else {
                SessionError::BadResponse(describe(&e))
            }
        })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_SESSION_ANSWER)
            .collect()
            .await
            .map_err(|e| SessionError::BadResponse(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A session endpoint's answer, body read whole (it is small).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Session answers are a few hundred bytes; anything past this is not one.
const MAX_SESSION_ANSWER: usize = 64 * 1024;

impl SessionCreator {
    pub fn new(endpoint: Arc<Endpoint>, credentials: Credentials) -> Self {
        SessionCreator {
            endpoint,
            credentials,
        }
    }

    /// The signed parameters for one attempt: a fresh nonce every time, and
    /// provider tokens read afresh (they expire on their own).
    async fn params(&self) -> Result<Params, SessionError> {
        let q = &self.endpoint.quickblox;
        let nonce: u32 = rand::rng().random_range(1..=i32::MAX as u32);
        let params = Params::new()
            .str("application_id", q.application_id.as_str())
            .str("auth_key", q.auth_key.as_str())
            .str("timestamp", self.endpoint.clock.unix_now().to_string())
            .str("nonce", nonce.to_string());
        let params = match &self.credentials {
            Credentials::Application => params,
            Credentials::Login { login, password } => params.map(
                "user",
                &[("login", login.as_str()), ("password", password.expose())],
            ),
            Credentials::Email { email, password } => params.map(
                "user",
                &[("email", email.as_str()), ("password", password.expose())],
            ),
            Credentials::Facebook { token, secret } => {
                let token = read_token(token).await?;
                let secret = match secret {
                    Some(s) => Some(read_token(s).await?),
                    None => None,
                };
                let mut keys = vec![("token", token.expose())];
                if let Some(secret) = &secret {
                    keys.push(("secret", secret.expose()));
                }
                params.str("provider", "facebook").map("keys", &keys)
            }
            Credentials::FirebasePhone {
                project_id,
                access_token,
            } => {
                let access_token = read_token(access_token).await?;
                params.str("provider", "firebase_phone").map(
                    "firebase_phone",
                    &[
                        ("project_id", project_id.as_str()),
                        ("access_token", access_token.expose()),
                    ],
                )
            }
            // Its source is an `ApiKeySource`; nothing is signed for it.
            Credentials::ApiKey { .. } => {
                return Err(SessionError::Credentials(
                    "an API key identity has no session to create".into(),
                ))
            }
        };
        let signature = signer::sign(q.auth_secret.expose(), &params);
        Ok(params.str("signature", signature))
    }

    async fn post(&self, deadline: Instant) -> Result<Answer, SessionError> {
        let e = &self.endpoint;
        // QuickBlox counts session creations against the plan's rate.
        if let Some(rate) = &e.rate {
            if rate.acquire(deadline).await.is_err() {
                e.metrics.upstream_rate_limited();
                return Err(SessionError::Refused {
                    status: 429,
                    message: "upstream.rate has no room for a session creation".into(),
                });
            }
        }
        let body = self.params().await?.to_json().to_string();
        let uri = e
            .upstream
            .uri_for(crate::qb::SESSION_CREATE_PATH, None)
            .map_err(|e| SessionError::BadResponse(e.to_string()))?;
        let mut req = Request::new(Body::full(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        // No `Host`: the URI carries the upstream's host (see
        // `proxy::strip_request_headers`).
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "quickblox-rest-api-version",
            HeaderValue::from_static("0.1.1"),
        );

        e.exchange(req).await
    }

    async fn create_session(&self) -> Result<NewSession, SessionError> {
        let budget = self.endpoint.quickblox.session_timeout;
        let deadline = Instant::now() + budget;
        let mut corrected = false;
        loop {
            let answer = timeout_at(deadline, self.post(deadline))
                .await
                .map_err(|_| SessionError::Timeout(budget))??;
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                self.endpoint.metrics.upstream_429();
            }
            if answer.status.is_success() {
                return parse_session(&answer);
            }
            let message = qb::error_message(&answer.body).unwrap_or_else(|| {
                answer
                    .status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_owned()
            });
            let bad_timestamp = answer.status == StatusCode::UNPROCESSABLE_ENTITY
                && message.to_ascii_lowercase().contains("bad timestamp");
            let upstream_date = answer
                .headers
                .get(header::DATE)
                .and_then(|d| qb::parse_http_date(d.as_bytes()));
            match upstream_date {
                Some(date) if bad_timestamp && !corrected => {
                    let offset = self.endpoint.clock.learn(date);
                    tracing::warn!(
                        offset_s = offset,
                        "QuickBlox refused our timestamp (Bad timestamp); using the clock offset from its Date header"
                    );
                    corrected = true;
                }
                _ => {
                    return Err(SessionError::Refused {
                        status: answer.status.as_u16(),
                        message,
                    })
                }
            }
        }
    }
}

impl SessionCreator {
    /// Makes one read with an API key identity's headers, for `check
    /// --probe`: `GET /users/{on_behalf_of}.json`, or `GET
    /// /users.json?per_page=1` for a key that acts as the application.
    /// Returns the user it acts as (0: the application).
    pub async fn verify_api_key(&self) -> Result<u64, SessionError> {
        let Credentials::ApiKey { key, on_behalf_of } = &self.credentials else {
            return Err(SessionError::Credentials("not an API key identity".into()));
        };
        let e = &self.endpoint;
        let budget = e.quickblox.session_timeout;
        let (path, query) = match on_behalf_of {
            Some(user) => (format!("/users/{user}.json"), None),
            None => ("/users.json".to_owned(), Some("per_page=1")),
        };
        let uri = e
            .upstream
            .uri_for(&path, query)
            .map_err(|e| SessionError::BadResponse(e.to_string()))?;
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        ApiKeyHeaders::new(key.expose().as_bytes(), on_behalf_of.unwrap_or(0))
            .ok_or_else(|| {
                SessionError::Credentials("the API key is not a valid header value".into())
            })?
            .apply(h);
        let Answer { status, body, .. } = timeout_at(Instant::now() + budget, e.exchange(req))
            .await
            .map_err(|_| SessionError::Timeout(budget))??;
        if status.is_success() {
            return Ok(on_behalf_of.unwrap_or(0));
        }
        let message = qb::error_message(&body)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no message").to_owned());
        Err(SessionError::Refused {
            status: status.as_u16(),
            message,
        })
    }
}

impl Source for SessionCreator {
    fn create(&self, _attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        Box::pin(self.create_session())
    }
}

async fn read_token(source: &SecretSource) -> Result<crate::credentials::Secret, SessionError> {
    source
        .read()
        .await
        .map_err(|e| SessionError::Credentials(e.to_string()))
}

fn parse_session(answer: &Answer) -> Result<NewSession, SessionError> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        session: Fields,
    }
    #[derive(serde::Deserialize)]
    struct Fields {
        token: String,
        #[serde(default)]
        user_id: Option<u64>,
        /// Everything else, for the client's `GET /session.json`.
        #[serde(flatten)]
        rest: serde_json::Map<String, serde_json::Value>,
    }
    let env: Envelope = serde_json::from_slice(&answer.body).map_err(|e| {
        SessionError::BadResponse(format!(
            "session answer is not {{\"session\":{{\"token\":...}}}}: {e}"
        ))
    })?;
    if env.session.token.is_empty() {
        return Err(SessionError::BadResponse("empty token".into()));
    }
    let lifetime = qb::remaining_lifetime(
        answer
            .headers
            .get(qb::QB_TOKEN_EXPIRATION)
            .map(HeaderValue::as_bytes),
        answer.headers.get(header::DATE).map(HeaderValue::as_bytes),
        SystemTime::now(),
    )
    .unwrap_or(qb::SESSION_LIFETIME);
    let user_id = env.session.user_id.unwrap_or(0);
    let mut public = crate::session::public_fields(&env.session.rest);
    public.insert("user_id".into(), user_id.into());
    Ok(NewSession {
        token: env.session.token,
        user_id,
        lifetime,
        public,
        ..NewSession::default()
    })
}

/// A [`Source`] that waits for a permit before each creation: a pool's
/// members share one semaphore, so at most `create_concurrency` of their
/// sessions are created at once (QuickBlox rate-limits session creation).
pub struct Throttled<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S: Source> Throttled<S> {
    pub fn new(inner: S, permits: Arc<Semaphore>) -> Self {
        Throttled { inner, permits }
    }
}

impl<S: Source> Source for Throttled<S> {
    fn create(&self, attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        Box::pin(async move {
            // The semaphore is never closed; a closed one would only mean
            // no limit.
            let _permit = self.permits.acquire().await.ok();
            self.inner.create(attempt).await
        })
    }
}
