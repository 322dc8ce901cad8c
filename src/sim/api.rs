//! Calls made with a session token: the dead-token 401, the session and
//! login endpoints, gates, and the echo every other call gets.

use bytes::Bytes;
use http::{Method, Response, StatusCode};

use crate::body::Body;
use crate::qb;

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
}
