//! [`SessionCreator`], the real [`Source`] of sessions: a signed `POST
//! /session.json` over the worker's [`Client`], with clock-skew correction;
//! and what every identity's creator shares ([`Endpoint`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use super::{describe, Client, SendError};
use crate::config::{QuickbloxConfig, UpstreamConfig};
use crate::net::body::Body;
use crate::quickblox;
use crate::quickblox::credentials::Secret;
use crate::quickblox::credentials::{Credentials, SecretSource};
use crate::quickblox::signer::{self, Params};
use crate::session::{ApiKeyHeaders, Attempt, BoxFuture, NewSession, SessionError, Source};
use crate::telemetry::metrics::Metrics;
use crate::upstream::rate::UpstreamRate;

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
    /// Worker 0's pool (the renewal tasks run on its runtime).
    pub client: Client,
    pub upstream: Arc<UpstreamConfig>,
    pub quickblox: Arc<QuickbloxConfig>,
    pub clock: Arc<ClockOffset>,
    /// `upstream.rate`: session creations count against it.
    pub rate: Option<Arc<UpstreamRate>>,
    pub metrics: Metrics,
}

impl Endpoint {
    /// Sends one of qbproxy's own requests (a session creation, an API
    /// key's check) and reads the answer whole: they are small. `make`
    /// builds the request, again if the upstream did not process it.
    async fn exchange(
        &self,
        make: impl Fn() -> Request<Body> + Send + Sync,
        deadline: Instant,
    ) -> Result<Answer, SessionError> {
        let mut again = || Some(make());
        let (resp, lease) = self
            .client
            .send(make(), deadline, &mut again, None)
            .await
            .map_err(|e| match e {
                SendError::Connect(e) => SessionError::Unreachable(e.to_string()),
                SendError::Busy => SessionError::Unreachable(
                    "every upstream connection stayed busy (upstream.max_connections)".into(),
                ),
                SendError::Failed(e) => SessionError::BadResponse(describe(&e)),
            })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_SESSION_ANSWER)
            .collect()
            .await
            .map_err(|e| SessionError::BadResponse(format!("reading the answer: {e}")))?
            .to_bytes();
        lease.complete();
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
                    hint: None,
                });
            }
        }
        let body = self.params().await?.to_json().to_string();
        let uri = e
            .upstream
            .uri_for(crate::quickblox::SESSION_CREATE_PATH, None)
            .map_err(|e| SessionError::BadResponse(e.to_string()))?;
        let body = Bytes::from(body);
        // No `Host`: the URI carries the upstream's host, which the pool
        // sends as HTTP/1.1's `Host` or HTTP/2's `:authority`.
        let make = || {
            let mut req = Request::new(Body::full(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(
                "quickblox-rest-api-version",
                HeaderValue::from_static("0.1.1"),
            );
            req
        };
        e.exchange(make, deadline).await
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
            let message = quickblox::error_message(&answer.body).unwrap_or_else(|| {
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
                .and_then(|d| quickblox::parse_http_date(d.as_bytes()));
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
                    let hint =
                        (answer.status == StatusCode::UNAUTHORIZED).then(|| self.explain_refusal());
                    return Err(SessionError::Refused {
                        status: answer.status.as_u16(),
                        message,
                        hint,
                    });
                }
            }
        }
    }

    /// QuickBlox says only "Unauthorized", for a wrong application id, auth
    /// key, login or password alike: name the values sent (the auth key's
    /// first characters only) and what else to check.
    fn explain_refusal(&self) -> String {
        let q = &self.endpoint.quickblox;
        let key: String = q.auth_key.chars().take(4).collect();
        let who = match &self.credentials {
            Credentials::Login { login, .. } => format!(" and user login {login:?}"),
            Credentials::Email { email, .. } => format!(" and user email {email:?}"),
            _ => String::new(),
        };
        format!(
            "QuickBlox refused application_id {:?}, auth_key {key}…{who}; check \
             quickblox.application_id, auth_key and auth_secret (the application's, from its \
             Overview page), the user's password, and that upstream.url ({}) is the account's \
             API host (Enterprise accounts have their own)",
            q.application_id, self.endpoint.upstream.authority,
        )
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
        let headers = ApiKeyHeaders::new(key.expose().as_bytes(), on_behalf_of.unwrap_or(0))
            .ok_or_else(|| {
                SessionError::Credentials("the API key is not a valid header value".into())
            })?;
        let make = || {
            let mut req = Request::new(Body::empty());
            *req.uri_mut() = uri.clone();
            headers.apply(req.headers_mut());
            req
        };
        let deadline = Instant::now() + budget;
        let Answer { status, body, .. } = timeout_at(deadline, e.exchange(make, deadline))
            .await
            .map_err(|_| SessionError::Timeout(budget))??;
        if status.is_success() {
            return Ok(on_behalf_of.unwrap_or(0));
        }
        let message = quickblox::error_message(&body)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no message").to_owned());
        Err(SessionError::Refused {
            status: status.as_u16(),
            message,
            hint: None,
        })
    }
}

impl Source for SessionCreator {
    fn create(&self, _attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        Box::pin(self.create_session())
    }
}

async fn read_token(
    source: &SecretSource,
) -> Result<crate::quickblox::credentials::Secret, SessionError> {
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
    let lifetime = quickblox::remaining_lifetime(
        answer
            .headers
            .get(quickblox::QB_TOKEN_EXPIRATION)
            .map(HeaderValue::as_bytes),
        answer.headers.get(header::DATE).map(HeaderValue::as_bytes),
        SystemTime::now(),
    )
    .unwrap_or(quickblox::SESSION_LIFETIME);
    let user_id = env.session.user_id.unwrap_or(0);
    let mut public = crate::session::public_fields(&env.session.rest);
    public.insert("user_id".into(), user_id.into());
    Ok(NewSession {
        token: Secret::new(env.session.token),
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
