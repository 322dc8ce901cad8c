//! Calls made with a session token: the dead-token 401, the session and
//! login endpoints, gates, and the echo every other call gets.

use bytes::Bytes;
use http::{Method, Response, StatusCode};

use crate::protocol;
use crate::Body;

use super::resources::{Call, Routed, UploadTo};
use super::sessions::session_json;
use super::*;

impl Sim {
    pub(super) async fn authenticated(
        &self,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Response<Body> {
        let Some(token) = parts
            .headers
            .get(protocol::QB_TOKEN)
            .and_then(|t| t.to_str().ok())
        else {
            let key = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| protocol::api_key(v.as_bytes()))
                .map(|k| String::from_utf8_lossy(k).into_owned());
            return match key {
                Some(key) => self.with_api_key(parts, body, key).await,
                None => self.error(
                    StatusCode::UNAUTHORIZED,
                    r#"{"errors":["Token is required"]}"#,
                ),
            };
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
            let gate = st.admit(&parts, &body, token.clone(), user_id);
            (user_id, session_body, gate, expires_at)
        };
        self.changed();
        self.pass_gate(gate).await;
        match (&parts.method, path.strip_suffix(".json").unwrap_or(path)) {
            (&Method::GET, "/session") => {
                let s = session_body.unwrap_or_default();
                return self.json(StatusCode::OK, s, Some(expires_at));
            }
            // Ended, or logged out: QuickBlox answers with no body.
            (&Method::DELETE, "/session") | (&Method::DELETE, "/login") => {
                return self.json(StatusCode::OK, String::new(), None);
            }
            (&Method::POST, "/login") => {
                let user = self.shared.config.users.iter().find(|u| u.id == user_id);
                let body = self.state().resources.user_answer(user, self.now());
                return self.json(StatusCode::OK, body, Some(expires_at));
            }
            _ => {}
        }
        self.answer(&parts, &body, user_id, Some(expires_at))
    }

    /// A call made with `Authorization: ApiKey <key>`: no session, no
    /// expiry; `On-Behalf-Of` names the user it acts as (else the
    /// application, with full permissions).
    async fn with_api_key(
        &self,
        parts: http::request::Parts,
        body: Bytes,
        key: String,
    ) -> Response<Body> {
        if !self.shared.config.api_keys.contains(&key) {
            return self.error(StatusCode::UNAUTHORIZED, r#"{"errors":["Unauthorized"]}"#);
        }
        let user_id = match parts.headers.get(protocol::ON_BEHALF_OF) {
            None => 0,
            Some(v) => {
                let id = std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|id| self.shared.config.users.iter().any(|u| u.id == *id));
                match id {
                    Some(id) => id,
                    None => return self.error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        r#"{"errors":{"base":["On-Behalf-Of names no user of this application"]}}"#,
                    ),
                }
            }
        };
        let path = parts.uri.path();
        if path.starts_with("/session") || path.starts_with("/login") {
            return self.error(
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"errors":{"base":["An API key has no session"]}}"#,
            );
        }
        let gate = {
            let mut st = self.state();
            st.admit(
                &parts,
                &body,
                format!("{} {key}", protocol::API_KEY_SCHEME),
                user_id,
            )
        };
        self.changed();
        self.pass_gate(gate).await;
        self.answer(&parts, &body, user_id, None)
    }

    /// Holds a request at its gate, if it has one.
    async fn pass_gate(&self, gate: Option<Arc<tokio::sync::Semaphore>>) {
        if let Some(gate) = gate {
            // Counted out when the wait ends, or when the request is dropped
            // while held (its client went away).
            let _held = Held(self);
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
    }

    /// The answer to an accepted call: a resource in QuickBlox's shape, or
    /// a refusal of what the simulator does not implement (404, 405, 422),
    /// each with the echo; with the session's new expiry, if it has one.
    fn answer(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        user_id: u64,
        expires_at: Option<SystemTime>,
    ) -> Response<Body> {
        let now = self.now();
        let path = parts.uri.path();
        // The API's own host as the call reached it (through an edge, the
        // edge's), as QuickBlox names itself in upload URLs.
        let origin = match parts.headers.get(http::header::HOST) {
            Some(host) => format!(
                "{}://{}",
                if parts.headers.contains_key("x-edge-protocol") {
                    "https"
                } else {
                    "http"
                },
                String::from_utf8_lossy(host.as_bytes())
            ),
            None => self.url(),
        };
        let uploads = match self.s3_url() {
            Some(bucket) => UploadTo::S3(bucket),
            None => UploadTo::Api(&origin),
        };
        let call = Call {
            method: &parts.method,
            path,
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            body,
            user_id,
            now,
            uploads,
        };
        let routed = {
            let mut guard = self.state();
            let st = &mut *guard;
            let routed = st
                .resources
                .route(&self.shared.config, &mut st.passwords, &call);
            if !matches!(routed, Routed::Answered(_)) {
                st.note_unimplemented(&parts.method, path);
            }
            routed
        };
        let echo = echo(parts, body, user_id);
        let (status, shaped) = match routed {
            // A body-less answer stays body-less (the SDKs read it as text).
            Routed::Answered((status, None)) => {
                return self.json(status, String::new(), expires_at)
            }
            Routed::Answered((status, Some(shaped))) => (status, shaped),
            Routed::NotFound => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"errors": {"base": [format!(
                    "the simulator has no endpoint {path} (see `qbproxy sim --help`)"
                )]}}),
            ),
            Routed::MethodNotAllowed(allowed) => {
                let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                let body = serde_json::json!({"errors": {"base": [format!(
                    "the simulator does not implement {} {path}; it takes {}",
                    parts.method,
                    list.join(", ")
                )]}, "echo": echo});
                let mut resp =
                    self.json(StatusCode::METHOD_NOT_ALLOWED, body.to_string(), expires_at);
                if let Ok(allow) = http::HeaderValue::from_str(&list.join(", ")) {
                    resp.headers_mut().insert(http::header::ALLOW, allow);
                }
                return resp;
            }
            Routed::Unimplemented(what) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"errors": {"base": [format!("the simulator: {what}")]}}),
            ),
        };
        let mut shaped = shaped;
        if let serde_json::Value::Object(fields) = &mut shaped {
            fields.insert("echo".into(), echo);
        }
        self.json(status, shaped.to_string(), expires_at)
    }
}

impl State {
    /// Counts a call the simulator refused for not implementing it, and
    /// keeps the last few for `/_sim/stats`.
    fn note_unimplemented(&mut self, method: &Method, path: &str) {
        self.unimplemented += 1;
        if self.unimplemented_calls.len() == 20 {
            self.unimplemented_calls.pop_front();
        }
        self.unimplemented_calls
            .push_back(format!("{method} {path}"));
    }

    /// Records an accepted call; returns its gate, if one holds its path.
    fn admit(
        &mut self,
        parts: &http::request::Parts,
        body: &Bytes,
        token: String,
        user_id: u64,
    ) -> Option<Arc<tokio::sync::Semaphore>> {
        let path = parts.uri.path();
        self.requests.push_back(Recorded {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| path.to_owned(), |pq| pq.as_str().to_owned()),
            headers: parts.headers.clone(),
            body: body.clone(),
            token,
            user_id,
        });
        if self.requests.len() > MAX_RECORDED {
            self.requests.pop_front();
        }
        let gate = self
            .gates
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, g)| g.clone());
        if gate.is_some() {
            self.held += 1;
            self.max_held = self.max_held.max(self.held);
        }
        gate
    }
}

/// What the simulator received, as every answer to a call with a session
/// shows it: method, path and query, the user, the headers (a token or key
/// shown as a prefix only), and the body's length and SHA-256.
fn echo(parts: &http::request::Parts, body: &[u8], user_id: u64) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        let shown = match name.as_str() {
            "qb-token" => protocol::token_prefix(&value),
            "authorization" => match value.split_once(' ') {
                Some((scheme, secret)) => format!("{scheme} {}", protocol::token_prefix(secret)),
                None => protocol::token_prefix(&value),
            },
            _ => value.into_owned(),
        };
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::String(first)) => {
                first.push_str(", ");
                first.push_str(&shown);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), shown.into());
            }
        }
    }
    serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or(parts.uri.path(), |pq| pq.as_str()),
        "user_id": user_id,
        "headers": headers,
        "body_bytes": body.len(),
        "body_sha256": hex::encode(ring::digest::digest(&ring::digest::SHA256, body)),
    })
}
