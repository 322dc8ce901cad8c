//! A QuickBlox simulator on loopback, for `qbproxy demo` and the tests.
//!
//! It behaves like the real API where qbproxy depends on it: it checks
//! signatures (with its own flatten-and-sort code, not the signer's),
//! timestamps within an hour of its clock, and single-use nonces; it keeps
//! sessions with a sliding two-hour expiry and answers 401 "Required
//! session does not exist" (alternating both body shapes) for dead tokens.
//! Tests can script it: expire every session, skew its clock, fail, delay
//! or hang session creation, hold requests to a path, and read back every
//! request it accepted.
//!
//! Control endpoints (no token needed): `POST /_sim/expire` expires every
//! session (for the demo's curl lines); `GET /_sim/stats` reports counts as
//! JSON (for `bench/`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::body::Body;
use crate::qb;
use crate::signer;

/// The application and users the simulator knows.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub application_id: String,
    pub auth_key: String,
    pub auth_secret: String,
    pub users: Vec<SimUser>,
    /// How long a session lives after its last use.
    pub session_lifetime: Duration,
    /// Social-provider tokens the simulator accepts (more can be added
    /// while it runs, as real ones rotate).
    pub provider_tokens: Vec<ProviderToken>,
}

/// A Facebook or Firebase token and the user it logs in.
#[derive(Debug, Clone)]
pub struct ProviderToken {
    /// `facebook` or `firebase_phone`.
    pub provider: String,
    /// For Firebase: the project id the token belongs to.
    pub project_id: Option<String>,
    pub token: String,
    pub user_id: u64,
}

#[derive(Debug, Clone)]
pub struct SimUser {
    pub id: u64,
    pub login: String,
    pub email: String,
    pub password: String,
}

impl SimConfig {
    /// The application and users of `qbproxy demo`, also handy in tests.
    pub fn demo() -> SimConfig {
        SimConfig {
            application_id: "76730".into(),
            auth_key: "demo-auth-key".into(),
            auth_secret: "demo-auth-secret".into(),
            users: vec![
                SimUser {
                    id: 1001,
                    login: "demo".into(),
                    email: "demo@example.com".into(),
                    password: "demo-password".into(),
                },
                SimUser {
                    id: 1002,
                    login: "other".into(),
                    email: "other@example.com".into(),
                    password: "other-password".into(),
                },
            ],
            session_lifetime: qb::SESSION_LIFETIME,
            provider_tokens: Vec::new(),
        }
    }

    /// Adds users `login_pattern` / `password_pattern` with `{n}` replaced
    /// by each of `numbers`; user ids are `100_000 + n`. Emails are
    /// `{login}@example.com`.
    pub fn with_users(
        mut self,
        login_pattern: &str,
        password_pattern: &str,
        numbers: std::ops::RangeInclusive<u64>,
    ) -> SimConfig {
        for n in numbers {
            let login = login_pattern.replace("{n}", &n.to_string());
            self.users.push(SimUser {
                id: 100_000 + n,
                email: format!("{login}@example.com"),
                login,
                password: password_pattern.replace("{n}", &n.to_string()),
            });
        }
        self
    }
}

/// A successful session creation, as the simulator saw it.
#[derive(Debug, Clone)]
pub struct Creation {
    pub user_id: u64,
    /// Every parameter, flattened (`user[login]`, `keys[token]`, ...).
    pub params: Vec<(String, String)>,
}

/// What the next session creation attempt does instead of succeeding.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and body.
    Status(u16, String),
    /// Wait this long, then proceed normally.
    Delay(Duration),
    /// Never answer.
    Hang,
    /// Wait until the test adds a permit to this semaphore, then proceed
    /// normally: holds an attempt exactly as long as a test needs.
    Wait(Arc<Semaphore>),
}

/// A request held at a gate; counted out when dropped.
struct Held<'a>(&'a Sim);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.state().held -= 1;
        self.0.changed();
    }
}

/// A request the simulator accepted (valid token).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Exactly as received.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub token: String,
    pub user_id: u64,
}

/// A handle on a running simulator.
#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

struct Shared {
    config: SimConfig,
    state: Mutex<State>,
    /// Seconds added to the real clock: the simulator's idea of "now".
    clock_offset: AtomicI64,
    /// Bumped on every event tests may wait for.
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Passwords changed since start, by login.
    passwords: HashMap<String, String>,
    provider_tokens: Vec<ProviderToken>,
    creation_log: Vec<Creation>,
    /// Session creations being handled right now, and the most at once.
    creating: u64,
    max_creating: u64,
    /// Added to every session creation.
    creation_delay: Duration,
    sessions: HashMap<String, SimSession>,
    nonces: HashSet<(String, String)>,
    faults: VecDeque<Fault>,
    /// Every successful creation is preceded by this many failing attempts
    /// (500), counted in `failing_streak`.
    fail_before_success: u32,
    failing_streak: u32,
    attempts: u64,
    creations: u64,
    connections: u64,
    refusals: u64,
    requests: VecDeque<Recorded>,
    gates: Vec<(String, Arc<Semaphore>)>,
    /// Requests held at a gate right now, and the most at once.
    held: u64,
    max_held: u64,
    next_id: u64,
}

struct SimSession {
    id: u64,
    user_id: u64,
    expires_at: SystemTime,
    created_at: SystemTime,
}

/// The simulator keeps at most this many recorded requests (the demo may
/// run for a long time).
const MAX_RECORDED: usize = 10_000;

impl Sim {
    /// Starts a simulator on `127.0.0.1:0`.
    pub async fn start(config: SimConfig) -> std::io::Result<Sim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Sim::start_on(listener, config)
    }

    /// Starts a simulator on an already bound listener. It serves until the
    /// runtime stops.
    pub fn start_on(listener: TcpListener, config: SimConfig) -> std::io::Result<Sim> {
        let addr = listener.local_addr()?;
        let state = State {
            provider_tokens: config.provider_tokens.clone(),
            ..State::default()
        };
        let sim = Sim {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(state),
                clock_offset: AtomicI64::new(0),
                changes: watch::channel(0).0,
            }),
            addr,
        };
        tokio::spawn(accept_loop(listener, sim.clone()));
        Ok(sim)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Ends every session now; their tokens get 401 from here on.
    pub fn expire_all(&self) -> usize {
        let n = {
            let mut st = self.state();
            let n = st.sessions.len();
            st.sessions.clear();
            n
        };
        self.changed();
        n
    }

    /// Session creation attempts, successful or not.
    pub fn attempts(&self) -> u64 {
        self.state().attempts
    }

    /// Sessions created.
    pub fn creations(&self) -> u64 {
        self.state().creations
    }

    /// Counts for benchmarks: creations (in all and per user), attempts,
    /// 401 refusals, peak concurrent creations, live sessions.
    pub fn stats(&self) -> serde_json::Value {
        let st = self.state();
        let mut per_user: HashMap<u64, u64> = HashMap::new();
        for c in &st.creation_log {
            *per_user.entry(c.user_id).or_default() += 1;
        }
        serde_json::json!({
            "attempts": st.attempts,
            "creations": st.creations,
            "refusals": st.refusals,
            "max_concurrent_creations": st.max_creating,
            "live_sessions": st.sessions.len(),
            "creations_per_user": per_user.iter().map(|(u, n)| (u.to_string(), serde_json::Value::from(*n))).collect::<serde_json::Map<String, serde_json::Value>>(),
        })
    }

    /// Every successful session creation, oldest first.
    pub fn creation_log(&self) -> Vec<Creation> {
        self.state().creation_log.clone()
    }

    /// Sessions created for `user_id`.
    pub fn creations_for(&self, user_id: u64) -> usize {
        self.state()
            .creation_log
            .iter()
            .filter(|c| c.user_id == user_id)
            .count()
    }

    /// The most session creations the simulator handled at once.
    pub fn max_concurrent_creations(&self) -> u64 {
        self.state().max_creating
    }

    /// From now on, every session creation succeeds only after `n` attempts
    /// in a row have failed with 500 Internal Server Error.
    pub fn set_fail_before_success(&self, n: u32) {
        let mut st = self.state();
        st.fail_before_success = n;
        st.failing_streak = 0;
    }

    /// Makes every session creation take at least this long.
    pub fn set_creation_delay(&self, delay: Duration) {
        self.state().creation_delay = delay;
    }

    /// Changes a user's password from now on (existing sessions stay).
    pub fn set_password(&self, login: &str, password: &str) {
        self.state()
            .passwords
            .insert(login.to_owned(), password.to_owned());
    }

    /// Accepts another social-provider token from now on.
    pub fn add_provider_token(&self, token: ProviderToken) {
        self.state().provider_tokens.push(token);
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.state().connections
    }

    /// 401 "Required session does not exist" answers given.
    pub fn refusals(&self) -> u64 {
        self.state().refusals
    }

    /// Queues a fault for the next session creation attempt.
    pub fn push_fault(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// Sets the simulator's clock `seconds` ahead of the real one.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.shared.clock_offset.store(seconds, Ordering::Relaxed);
    }

    /// Every accepted request, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.iter().cloned().collect()
    }

    /// Accepted requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.path_and_query.starts_with(prefix))
            .count()
    }

    /// Holds accepted requests whose path starts with `prefix` (after
    /// recording them) until permits are added to the returned semaphore.
    pub fn gate(&self, prefix: &str) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.state().gates.push((prefix.to_owned(), gate.clone()));
        gate
    }

    /// Requests held at gates now.
    pub fn held_at_gates(&self) -> u64 {
        self.state().held
    }

    /// The most requests held at gates at once.
    pub fn max_held_at_gates(&self) -> u64 {
        self.state().max_held
    }

    /// Resolves when `condition` holds, re-checking after every event.
    pub async fn wait_until(&self, mut condition: impl FnMut(&Sim) -> bool) {
        let mut rx = self.shared.changes.subscribe();
        while !condition(self) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in
        // a way that matters to a simulator; keep serving.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.shared.changes.send_modify(|n| *n += 1);
    }

    fn now(&self) -> SystemTime {
        let offset = self.shared.clock_offset.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if offset >= 0 {
            now + Duration::from_secs(offset as u64)
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.error(StatusCode::BAD_REQUEST, r#"{"errors":["bad body"]}"#),
        };
        match (&parts.method, parts.uri.path()) {
            (&Method::POST, "/_sim/expire") => {
                let n = self.expire_all();
                self.json(StatusCode::OK, format!(r#"{{"expired":{n}}}"#), None)
            }
            (&Method::GET, "/_sim/stats") => {
                self.json(StatusCode::OK, self.stats().to_string(), None)
            }
            (&Method::POST, "/session.json") | (&Method::POST, "/session") => {
                self.create_session(&parts.headers, &body).await
            }
            _ => self.authenticated(parts, body).await,
        }
    }

    async fn create_session(&self, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
        let delay = {
            let mut st = self.state();
            st.creating += 1;
            st.max_creating = st.max_creating.max(st.creating);
            st.creation_delay
        };
        // Counted down however the request ends (a client may hang up).
        struct Creating<'a>(&'a Sim);
        impl Drop for Creating<'_> {
            fn drop(&mut self) {
                self.0.state().creating -= 1;
            }
        }
        let _creating = Creating(self);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.create_session_now(headers, body).await
    }

    async fn create_session_now(&self, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
        let fault = {
            let mut st = self.state();
            st.attempts += 1;
            match st.faults.pop_front() {
                Some(fault) => Some(fault),
                None if st.failing_streak < st.fail_before_success => {
                    st.failing_streak += 1;
                    Some(Fault::Status(
                        500,
                        r#"{"errors":["Internal Server Error"]}"#.into(),
                    ))
                }
                None => {
                    st.failing_streak = 0;
                    None
                }
            }
        };
        self.changed();
        match fault {
            Some(Fault::Status(code, body)) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return self.error(status, body);
            }
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::Wait(gate)) => {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            None => {}
        }
        let params = parse_params(headers, body);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let cfg = &self.shared.config;
        if get("application_id") != Some(cfg.application_id.as_str())
            || get("auth_key") != Some(cfg.auth_key.as_str())
        {
            return self.error(StatusCode::UNAUTHORIZED, r#"{"errors":["Unauthorized"]}"#);
        }
        let mut signed: Vec<String> = params
            .iter()
            .filter(|(k, _)| k != "signature")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        signed.sort();
        let expected = signer::hmac_sha1_hex(&cfg.auth_secret, &signed.join("&"));
        if get("signature") != Some(expected.as_str()) {
            return self.error(
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"errors":{"base":["Unexpected signature"]}}"#,
            );
        }
        let now = self.now();
        let now_unix = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let timestamp = get("timestamp").and_then(|t| t.parse::<i64>().ok());
        match timestamp {
            Some(ts) if (ts - now_unix).abs() <= 3600 => {}
            _ => {
                return self.error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    r#"{"errors":{"base":["Bad timestamp"]}}"#,
                )
            }
        }
        let user_id = match get("provider") {
            None => match self.user_for(&get) {
                Some(id) => id,
                None => {
                    return self.error(StatusCode::UNAUTHORIZED, r#"{"errors":["Unauthorized"]}"#)
                }
            },
            Some(provider) => match self.provider_user(provider, &get) {
                Some(id) => id,
                None => {
                    return self.error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        r#"{"errors":["Bad Authentication data"]}"#,
                    )
                }
            },
        };
        let nonce = (
            get("timestamp").unwrap_or("").to_owned(),
            get("nonce").unwrap_or("").to_owned(),
        );
        let token = random_token();
        let (id, expires_at) = {
            let mut st = self.state();
            if !st.nonces.insert(nonce) {
                drop(st);
                return self.error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    r#"{"errors":{"base":["Nonce has already been used"]}}"#,
                );
            }
            st.next_id += 1;
            st.creations += 1;
            if st.creation_log.len() < MAX_RECORDED {
                st.creation_log.push(Creation {
                    user_id,
                    params: params.clone(),
                });
            }
            let id = st.next_id;
            let expires_at = now + cfg.session_lifetime;
            st.sessions.insert(
                token.clone(),
                SimSession {
                    id,
                    user_id,
                    expires_at,
                    created_at: now,
                },
            );
            (id, expires_at)
        };
        self.changed();
        let body = session_json(id, &cfg.application_id, &token, user_id, now);
        self.json(StatusCode::CREATED, body, Some(expires_at))
    }

    /// The user named by `user[login]`/`user[email]` + `user[password]`:
    /// `Some(0)` for an application session, `None` for wrong credentials.
    fn user_for<'a>(&self, get: &impl Fn(&str) -> Option<&'a str>) -> Option<u64> {
        let login = get("user[login]");
        let email = get("user[email]");
        if login.is_none() && email.is_none() {
            return Some(0);
        }
        let password = get("user[password]");
        let changed = self.state().passwords.clone();
        self.shared
            .config
            .users
            .iter()
            .find(|u| {
                let current = changed.get(&u.login).unwrap_or(&u.password);
                (login == Some(u.login.as_str()) || email == Some(u.email.as_str()))
                    && password == Some(current.as_str())
            })
            .map(|u| u.id)
    }

    /// The user a social-provider token logs in, if the simulator knows it.
    fn provider_user<'a>(
        &self,
        provider: &str,
        get: &impl Fn(&str) -> Option<&'a str>,
    ) -> Option<u64> {
        let (token, project) = match provider {
            "facebook" => (get("keys[token]")?, None),
            "firebase_phone" => (
                get("firebase_phone[access_token]")?,
                Some(get("firebase_phone[project_id]")?),
            ),
            _ => return None,
        };
        self.state()
            .provider_tokens
            .iter()
            .find(|t| {
                t.provider == provider && t.token == token && t.project_id.as_deref() == project
            })
            .map(|t| t.user_id)
    }

    async fn authenticated(&self, parts: http::request::Parts, body: Bytes) -> Response<Body> {
        let Some(token) = parts
            .headers
            .get(qb::QB_TOKEN)
            .and_then(|t| t.to_str().ok())
        else {
            return self.error(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":["Token is required"]}"#,
            );
        };
        let token = token.to_owned();
        let now = self.now();
        let path = parts.uri.path();
        let lifetime = self.shared.config.session_lifetime;
        let (user_id, session_body, gate, expires_at) = {
            let mut st = self.state();
            let alive = st.sessions.get(&token).is_some_and(|s| s.expires_at > now);
            if !alive {
                st.sessions.remove(&token);
                st.refusals += 1;
                let shape = st.refusals % 2;
                drop(st);
                self.changed();
                let body = if shape == 0 {
                    r#"{"errors":{"base":["Required session does not exist"]}}"#
                } else {
                    r#"{"errors":["Required session does not exist"]}"#
                };
                return self.error(StatusCode::UNAUTHORIZED, body);
            }
            let Some(session) = st.sessions.get_mut(&token) else {
                return self.error(StatusCode::INTERNAL_SERVER_ERROR, r#"{"errors":["sim"]}"#);
            };
            session.expires_at = now + lifetime;
            let expires_at = session.expires_at;
            match (&parts.method, path) {
                (&Method::DELETE, "/session.json") => {
                    st.sessions.remove(&token);
                }
                (&Method::POST, "/login.json") => {
                    let user = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            let who = v["login"].as_str().or(v["email"].as_str())?.to_owned();
                            let pw = v["password"].as_str()?.to_owned();
                            self.shared
                                .config
                                .users
                                .iter()
                                .find(|u| (u.login == who || u.email == who) && u.password == pw)
                                .map(|u| u.id)
                        });
                    match (user, st.sessions.get_mut(&token)) {
                        (Some(id), Some(s)) => s.user_id = id,
                        _ => {
                            drop(st);
                            return self
                                .error(StatusCode::UNAUTHORIZED, r#"{"errors":["Unauthorized"]}"#);
                        }
                    }
                }
                (&Method::DELETE, "/login.json") => {
                    if let Some(s) = st.sessions.get_mut(&token) {
                        s.user_id = 0;
                    }
                }
                _ => {}
            }
            let session = st.sessions.get(&token);
            let user_id = session.map_or(0, |s| s.user_id);
            let session_body = session.map(|s| {
                session_json(
                    s.id,
                    &self.shared.config.application_id,
                    &token,
                    s.user_id,
                    s.created_at,
                )
            });
            let is_write = parts.method != Method::GET && parts.method != Method::HEAD;
            if is_write
                && user_id == 0
                && !path.starts_with("/session")
                && !path.starts_with("/login")
            {
                drop(st);
                return self.json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    r#"{"errors":{"base":["Forbidden. Need user."]}}"#.to_owned(),
                    Some(expires_at),
                );
            }
            st.requests.push_back(Recorded {
                method: parts.method.clone(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| path.to_owned(), |pq| pq.as_str().to_owned()),
                headers: parts.headers.clone(),
                body: body.clone(),
                token: token.clone(),
                user_id,
            });
            if st.requests.len() > MAX_RECORDED {
                st.requests.pop_front();
            }
            let gate = st
                .gates
                .iter()
                .find(|(p, _)| path.starts_with(p.as_str()))
                .map(|(_, g)| g.clone());
            if gate.is_some() {
                st.held += 1;
                st.max_held = st.max_held.max(st.held);
            }
            (user_id, session_body, gate, expires_at)
        };
        self.changed();
        if let Some(gate) = gate {
            // Counted out when the wait ends, or when the request is dropped
            // while held (its client went away).
            let _held = Held(self);
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        let body = match (&parts.method, path, session_body) {
            (&Method::GET, "/session.json", Some(s)) => s,
            _ => serde_json::json!({
                "echo": {
                    "method": parts.method.as_str(),
                    "path": parts.uri.path_and_query().map_or(path, |pq| pq.as_str()),
                    "user_id": user_id,
                    "body_bytes": body.len(),
                }
            })
            .to_string(),
        };
        self.json(StatusCode::OK, body, Some(expires_at))
    }

    fn json(
        &self,
        status: StatusCode,
        body: String,
        expires_at: Option<SystemTime>,
    ) -> Response<Body> {
        let mut resp = Response::new(Body::full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(self.now())) {
            h.insert(header::DATE, date);
        }
        if let Some(exp) =
            expires_at.and_then(|t| HeaderValue::from_str(&qb::format_expiration(t)).ok())
        {
            h.insert(qb::QB_TOKEN_EXPIRATION, exp);
        }
        resp
    }

    fn error(&self, status: StatusCode, body: impl Into<String>) -> Response<Body> {
        self.json(status, body.into(), None)
    }
}

async fn accept_loop(listener: TcpListener, sim: Sim) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        sim.state().connections += 1;
        let sim = sim.clone();
        let service = service_fn(move |req| {
            let sim = sim.clone();
            async move { Ok::<_, Infallible>(sim.handle(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

/// The parameters of a session request, flattened to `key` / `key[field]`,
/// from a JSON body (nested objects or flat keys) or a form body. Values
/// are the decoded strings, as QuickBlox signs them.
fn parse_params(headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return form_urlencoded::parse(body).into_owned().collect();
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut out = Vec::new();
    for (k, v) in &map {
        match v {
            serde_json::Value::Object(fields) => {
                for (f, fv) in fields {
                    if let Some(s) = scalar(fv) {
                        out.push((format!("{k}[{f}]"), s));
                    }
                }
            }
            other => {
                if let Some(s) = scalar(other) {
                    out.push((k.clone(), s));
                }
            }
        }
    }
    out
}

fn random_token() -> String {
    let bytes: [u8; 20] = rand::rng().random();
    hex::encode(bytes)
}

fn session_json(
    id: u64,
    application_id: &str,
    token: &str,
    user_id: u64,
    created: SystemTime,
) -> String {
    let ts = created
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "session": {
            "application_id": application_id.parse::<u64>().unwrap_or(0),
            "created_at": time::OffsetDateTime::from(created)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "id": id,
            "nonce": 0,
            "token": token,
            "ts": ts,
            "user_id": user_id,
            "_id": id.to_string(),
        }
    })
    .to_string()
}
