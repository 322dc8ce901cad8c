//! `POST /session.json`: signatures, timestamps, nonces, users and social
//! providers, checked as QuickBlox does; faults a test scripted.

use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Response, StatusCode};
use rand::Rng;

use crate::protocol;
use crate::Body;

use super::params::parse_params;
use super::*;

impl Sim {
    pub(super) async fn create_session(&self, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
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
        let expected = protocol::signature(&cfg.auth_secret, &params);
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
        if self.state().failing_users.contains(&user_id) {
            return self.error(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"errors":["Internal Server Error"]}"#,
            );
        }
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
        let (changed, deleted) = {
            let st = self.state();
            (st.passwords.clone(), st.resources.deleted_users())
        };
        self.shared
            .config
            .users
            .iter()
            .filter(|u| !deleted.contains(&u.id))
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
}

fn random_token() -> String {
    let bytes: [u8; 20] = rand::rng().random();
    hex::encode(bytes)
}

pub(super) fn session_json(
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
