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
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

mod api;
mod chat;
mod params;
mod protocol;
mod resources;
mod server;
mod sessions;
mod xml;

pub use chat::{ChatLogin, ChatMessage, Credential};
pub use protocol::SESSION_LIFETIME;

/// Every answer is whole before it is sent.
type Body = http_body_util::Full<Bytes>;

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
    /// API keys it accepts (`Authorization: ApiKey <key>`).
    pub api_keys: Vec<String>,
    /// Where a new file's upload URL points.
    pub uploads: Uploads,
}

/// The two kinds of upload URL QuickBlox answers `POST /blobs.json` with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Uploads {
    /// Its own API host, `/blobs/{id}/upload/`, with the session's token
    /// (QuickBlox's current documentation).
    #[default]
    Api,
    /// An S3 bucket on another host, without a token (older answers): the
    /// simulator's stand-in listens on a port of its own.
    S3,
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
            session_lifetime: SESSION_LIFETIME,
            provider_tokens: Vec::new(),
            api_keys: vec!["demo-api-key".into()],
            uploads: Uploads::Api,
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

/// A request the simulator accepted (valid token or API key).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Exactly as received.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The session token, or `ApiKey <key>` for a call with an API key.
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
    /// The S3 stand-in's URL, with [`Uploads::S3`].
    s3_url: Option<String>,
    /// The chat server's address (XMPP over WebSocket).
    chat_addr: SocketAddr,
    state: Mutex<State>,
    /// Seconds added to the real clock: the simulator's idea of "now".
    clock_offset: AtomicI64,
    /// Bumped on every event tests may wait for.
    changes: watch::Sender<u64>,
    /// The server stops when this is dropped, with the simulator.
    _stop: watch::Sender<bool>,
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
    /// Users whose session creations fail (500) until healed: one pool
    /// member down while the others serve.
    failing_users: HashSet<u64>,
    attempts: u64,
    creations: u64,
    connections: u64,
    refusals: u64,
    /// Calls refused for what the simulator does not implement (404, 405,
    /// 422), and the last few of them.
    unimplemented: u64,
    unimplemented_calls: VecDeque<String>,
    requests: VecDeque<Recorded>,
    gates: Vec<(String, Arc<Semaphore>)>,
    /// Requests held at a gate right now, and the most at once.
    held: u64,
    max_held: u64,
    next_id: u64,
    /// Dialogs, messages, custom objects and files, in QuickBlox's shapes.
    resources: resources::Resources,
    /// Chat: who is online, logins, messages.
    chat: chat::Chat,
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
        let (stop, stopping) = watch::channel(false);
        let s3 = match config.uploads {
            Uploads::Api => None,
            Uploads::S3 => {
                let l = std::net::TcpListener::bind((addr.ip(), 0))?;
                l.set_nonblocking(true)?;
                Some(TcpListener::from_std(l)?)
            }
        };
        let chat = {
            let l = std::net::TcpListener::bind((addr.ip(), 0))?;
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        };
        let chat_addr = chat.local_addr()?;
        let s3_url = match &s3 {
            Some(l) => Some(format!("http://{}", l.local_addr()?)),
            None => None,
        };
        let sim = Sim {
            shared: Arc::new(Shared {
                config,
                s3_url,
                chat_addr,
                state: Mutex::new(state),
                clock_offset: AtomicI64::new(0),
                changes: watch::channel(0).0,
                _stop: stop,
            }),
            addr,
        };
        tokio::spawn(chat::serve(
            chat,
            Arc::downgrade(&sim.shared),
            stopping.clone(),
        ));
        if let Some(s3) = s3 {
            tokio::spawn(server::serve(
                s3,
                addr,
                server::Serves::S3,
                Arc::downgrade(&sim.shared),
                stopping.clone(),
            ));
        }
        tokio::spawn(server::serve(
            listener,
            addr,
            server::Serves::Api,
            Arc::downgrade(&sim.shared),
            stopping,
        ));
        Ok(sim)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The chat server: XMPP over WebSocket, `ws://127.0.0.1:PORT`.
    pub fn chat_url(&self) -> String {
        format!("ws://{}", self.shared.chat_addr)
    }

    /// Every chat login so far.
    pub fn chat_logins(&self) -> Vec<ChatLogin> {
        self.state().chat.logins.clone()
    }

    /// Every one-to-one chat message so far.
    pub fn chat_messages(&self) -> Vec<ChatMessage> {
        self.state().chat.messages.clone()
    }

    /// Resources of `user` connected to chat now.
    pub fn chat_online(&self, user: u64) -> usize {
        self.state().chat.online.get(&user).map_or(0, Vec::len)
    }

    /// IQs the chat server does not implement, answered
    /// `feature-not-implemented`.
    pub fn chat_unimplemented(&self) -> u64 {
        self.state().chat.unimplemented
    }

    /// The S3 stand-in's URL, with [`Uploads::S3`].
    pub fn s3_url(&self) -> Option<&str> {
        self.shared.s3_url.as_deref()
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
    /// 401 refusals, peak concurrent creations, live sessions, and calls
    /// refused as not implemented (with the last few).
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
            "unimplemented": st.unimplemented,
            "unimplemented_calls": st.unimplemented_calls,
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

    /// Makes every session creation for the user with `login` fail (500
    /// Internal Server Error, after its credentials were checked) until
    /// [`Sim::heal`]: one pool member down while the others serve. False
    /// if no user has that login.
    pub fn fail_user(&self, login: &str) -> bool {
        let Some(user) = self.shared.config.users.iter().find(|u| u.login == login) else {
            return false;
        };
        self.state().failing_users.insert(user.id);
        true
    }

    /// Session creations for every user succeed again.
    pub fn heal(&self) {
        self.state().failing_users.clear();
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

    /// Connections that sent a request.
    pub fn connections(&self) -> u64 {
        self.state().connections
    }

    /// Calls refused for what the simulator does not implement.
    pub fn unimplemented(&self) -> u64 {
        self.state().unimplemented
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

    /// A connection's first request: counted, as QuickBlox's balancer would
    /// see a new connection.
    fn connected(&self) {
        self.state().connections += 1;
    }

    /// The S3 stand-in: a form upload to the bucket's root, without a
    /// token, as the SDKs send files to the URL `POST /blobs.json`
    /// answered; anything else is refused as S3 would.
    async fn handle_s3(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let xml = |status: StatusCode, text: String| {
            let mut resp = Response::new(Body::from(text));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/xml"),
            );
            resp
        };
        if parts.uri.path() != "/" {
            return xml(
                StatusCode::NOT_FOUND,
                "<Error><Code>NoSuchKey</Code></Error>".to_owned(),
            );
        }
        if parts.method != Method::POST {
            return xml(
                StatusCode::METHOD_NOT_ALLOWED,
                "<Error><Code>MethodNotAllowed</Code></Error>".to_owned(),
            );
        }
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
            return xml(
                StatusCode::BAD_REQUEST,
                "<Error><Code>IncompleteBody</Code></Error>".to_owned(),
            );
        };
        let query = parts.uri.query().unwrap_or("");
        let (status, text) = self.state().resources.upload(query, &body);
        self.changed();
        xml(status, text)
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

    fn json(
        &self,
        status: StatusCode,
        body: String,
        expires_at: Option<SystemTime>,
    ) -> Response<Body> {
        let mut resp = Response::new(Body::from(body));
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
            expires_at.and_then(|t| HeaderValue::from_str(&protocol::format_expiration(t)).ok())
        {
            h.insert(protocol::QB_TOKEN_EXPIRATION, exp);
        }
        resp
    }

    fn error(&self, status: StatusCode, body: impl Into<String>) -> Response<Body> {
        self.json(status, body.into(), None)
    }
}
