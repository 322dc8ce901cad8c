//! QuickBlox protocol facts, as pure functions: header names, how an expired
//! session is recognised, the date formats, which client calls would touch
//! the shared session, and how to read QuickBlox's error bodies.
//!
//! Nothing here does I/O; `proxy`, `upstream` and `sim` all build on it.

pub mod credentials;
pub mod signer;

use std::time::{Duration, SystemTime};

use http::{HeaderName, Method};

use crate::gateway::canonical;

pub const QB_TOKEN: HeaderName = HeaderName::from_static("qb-token");
/// With an API key (`Authorization: ApiKey <key>`), the user the request
/// acts as.
pub const ON_BEHALF_OF: HeaderName = HeaderName::from_static("on-behalf-of");
/// The `Authorization` scheme of QuickBlox's API keys.
pub const API_KEY_SCHEME: &str = "ApiKey";

/// The key of an `Authorization: ApiKey <key>` value (the scheme in any
/// case, as HTTP reads it), or `None` for another scheme.
pub fn api_key(authorization: &[u8]) -> Option<&[u8]> {
    let scheme = API_KEY_SCHEME.len();
    let value = authorization.trim_ascii();
    if value.len() <= scheme
        || !value[..scheme].eq_ignore_ascii_case(API_KEY_SCHEME.as_bytes())
        || !matches!(value[scheme], b' ' | b'\t')
    {
        return None;
    }
    Some(value[scheme..].trim_ascii())
}

pub const QB_TOKEN_EXPIRATION: HeaderName = HeaderName::from_static("qb-token-expirationdate");
/// Set on every response that qbproxy itself produced, with a short code.
pub const QBPROXY_ERROR: HeaderName = HeaderName::from_static("qbproxy-error");
/// Request headers with this prefix are addressed to qbproxy and never
/// forwarded.
pub const QBPROXY_HEADER_PREFIX: &str = "qbproxy-";
/// Set on an answer qbproxy gave in QuickBlox's place (`session` for
/// `GET /session.json`).
pub const QBPROXY_ANSWERED: HeaderName = HeaderName::from_static("qbproxy-answered");

/// A session lives this long after the last request that used it.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// The part of a 401 body that means the token is dead. Matched without
/// regard to case, wherever it stands in the body, so both
/// `{"errors":[...]}` and `{"errors":{"base":[...]}}` are recognised.
const EXPIRED_MARKER: &[u8] = b"required session does not exist";

/// True when a 401 body says the session does not exist (expired or
/// destroyed). The caller checks the status.
pub fn is_session_expired(body: &[u8]) -> bool {
    body.windows(EXPIRED_MARKER.len())
        .any(|w| w.eq_ignore_ascii_case(EXPIRED_MARKER))
}

/// Parses `QB-Token-ExpirationDate: 2018-01-31 12:20:03 UTC`.
pub fn parse_expiration(value: &[u8]) -> Option<SystemTime> {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    let s = std::str::from_utf8(value).ok()?;
    let t = time::PrimitiveDateTime::parse(s.trim(), &fmt).ok()?;
    Some(t.assume_utc().into())
}

/// Formats a time as `QB-Token-ExpirationDate` does (for the tests' answers).
#[cfg(test)]
pub fn format_expiration(t: SystemTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(t)
        .format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01 00:00:00 UTC"))
}

/// Parses an HTTP `Date` header (IMF-fixdate and the obsolete forms).
pub fn parse_http_date(value: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(value).ok()?).ok()
}

/// How long a session has left according to the upstream's own headers:
/// `expiration - date` when the upstream sent its `Date`, which makes the
/// answer immune to a wrong local clock; otherwise against `now`. Never
/// more than [`SESSION_LIFETIME`]: a garbled or far-future date must not
/// make a session look good for years (and postpone its renewal forever).
pub fn remaining_lifetime(
    expiration: Option<&[u8]>,
    date: Option<&[u8]>,
    now: SystemTime,
) -> Option<Duration> {
    let expires = parse_expiration(expiration?)?;
    let reference = date.and_then(parse_http_date).unwrap_or(now);
    Some(
        expires
            .duration_since(reference)
            .unwrap_or(Duration::ZERO)
            .min(SESSION_LIFETIME),
    )
}

/// The one spelling of a client creating its own session, forwarded
/// untouched (no token added) when it is a plain `POST`.
pub const SESSION_CREATE_PATH: &str = "/session.json";
/// The route key of the session endpoints (`/session.json`, `.xml`, ...).
pub const SESSION_KEY: &str = "/session";
/// The route key of the login endpoints, which upgrade or downgrade the
/// session they carry.
pub const LOGIN_KEY: &str = "/login";

/// Calls that would destroy, upgrade, downgrade or otherwise change the
/// session they carry: any method but `GET`, `HEAD` and `OPTIONS` on the
/// session or login endpoints, in any spelling (`path` is canonical; the
/// route key folds case and the format suffix). The caller lets the plain
/// `POST /session.json` through first, without a token. Returns what the
/// call would do, for the 403 message.
pub fn shared_session_call(method: &Method, path: &str) -> Option<&'static str> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if canonical::key_is(path, SESSION_KEY) {
        return Some(if method == Method::DELETE {
            "destroy the shared session (DELETE /session.json)"
        } else {
            "change the shared session (only a plain POST /session.json, which creates the client's own session, goes through)"
        });
    }
    if canonical::key_is(path, LOGIN_KEY) {
        return Some(match *method {
            Method::DELETE => "log the shared session out (DELETE /login.json)",
            Method::POST => "log the shared session in as another user (POST /login.json)",
            _ => "change the shared session's login",
        });
    }
    None
}

/// A session object (`{"session":{...}}` JSON) as QuickBlox's XML format
/// writes it: `<session><user-id type="integer">5</user-id>...</session>`.
pub fn session_xml(json: &[u8]) -> String {
    let fields = serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("session").and_then(|s| s.as_object()).cloned())
        .unwrap_or_default();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<session>\n");
    for (key, value) in &fields {
        let tag = key.replace('_', "-");
        let (attr, text) = match value {
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => {
                (" type=\"integer\"", n.to_string())
            }
            serde_json::Value::Null => (" nil=\"true\"", String::new()),
            serde_json::Value::String(s) => ("", s.clone()),
            other => ("", other.to_string()),
        };
        let text = text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        out.push_str(&format!("  <{tag}{attr}>{text}</{tag}>\n"));
    }
    out.push_str("</session>\n");
    out
}

/// The human message in a QuickBlox error body:
/// `{"errors":["X"]}` → `X`; `{"errors":{"base":["X"]}}` → `X`;
/// `{"errors":{"field":["is bad"]}}` → `field is bad`. Anything else is
/// returned as text, cut to 200 characters; an empty body gives `None`.
pub fn error_message(body: &[u8]) -> Option<String> {
    fn strings(v: &serde_json::Value) -> Vec<String> {
        match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a.iter().flat_map(strings).collect(),
            _ => Vec::new(),
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let messages: Vec<String> = match &v["errors"] {
            serde_json::Value::Object(map) => map
                .iter()
                .flat_map(|(field, msgs)| {
                    strings(msgs).into_iter().map(move |m| {
                        if field == "base" {
                            m
                        } else {
                            format!("{field} {m}")
                        }
                    })
                })
                .collect(),
            other => strings(other),
        };
        if !messages.is_empty() {
            return Some(messages.join("; "));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(text.chars().take(200).collect())
}

/// At most the first six characters of a token, for logs and errors.
pub fn token_prefix(token: &str) -> String {
    let prefix: String = token.chars().take(6).collect();
    format!("{prefix}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_read_in_any_scheme_case_and_spacing() {
        assert_eq!(api_key(b"ApiKey abc"), Some(&b"abc"[..]));
        assert_eq!(api_key(b"  apikey \t abc  "), Some(&b"abc"[..]));
        assert_eq!(api_key(b"APIKEY abc"), Some(&b"abc"[..]));
        assert_eq!(api_key(b"ApiKeyabc"), None);
        assert_eq!(api_key(b"Bearer abc"), None);
        assert_eq!(api_key(b"ApiKey"), None);
    }

    #[test]
    fn expiry_is_detected_in_both_shapes_and_any_case() {
        assert!(is_session_expired(
            br#"{"errors":["Required session does not exist"]}"#
        ));
        assert!(is_session_expired(
            br#"{"errors":{"base":["Required session does not exist"]}}"#
        ));
        assert!(is_session_expired(b"REQUIRED SESSION DOES NOT EXIST"));
        assert!(!is_session_expired(br#"{"errors":["Token is required"]}"#));
        assert!(!is_session_expired(br#"{"errors":["Unauthorized"]}"#));
        assert!(!is_session_expired(b""));
    }

    #[test]
    fn expiration_header_round_trips() {
        let t = parse_expiration(b"2018-01-31 12:20:03 UTC").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1517401203
        );
        assert_eq!(format_expiration(t), "2018-01-31 12:20:03 UTC");
        assert_eq!(parse_expiration(b"2018-01-31T12:20:03Z"), None);
        assert_eq!(parse_expiration(b"\xff"), None);
    }

    #[test]
    fn remaining_lifetime_uses_the_upstream_date() {
        let far_future = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        let left = remaining_lifetime(
            Some(b"2018-01-31 12:20:03 UTC"),
            Some(b"Wed, 31 Jan 2018 10:20:03 GMT"),
            far_future,
        );
        assert_eq!(left, Some(Duration::from_secs(7200)));
        // Without Date: against the local clock, never negative.
        let left = remaining_lifetime(Some(b"2018-01-31 12:20:03 UTC"), None, far_future);
        assert_eq!(left, Some(Duration::ZERO));
        assert_eq!(remaining_lifetime(None, None, far_future), None);
    }

    #[test]
    fn remaining_lifetime_is_capped_at_a_sessions_lifetime() {
        // Found by the `dates` fuzz target (fuzz/regressions/dates/).
        let left = remaining_lifetime(
            Some(b"9999-12-31 23:59:59 UTC"),
            Some(b"Wed, 31 Jan 2018 10:20:03 GMT"),
            SystemTime::now(),
        );
        assert_eq!(left, Some(SESSION_LIFETIME));
    }

    #[test]
    fn guard_refuses_every_write_to_the_session_and_login_endpoints() {
        // Paths here are canonical (the caller canonicalises first).
        for path in [
            "/session.json",
            "/session",
            "/Session.JSON/",
            "/session.xml",
        ] {
            for method in [Method::DELETE, Method::PUT, Method::PATCH, Method::POST] {
                assert!(
                    shared_session_call(&method, path).is_some(),
                    "{method} {path}"
                );
            }
            assert!(shared_session_call(&Method::GET, path).is_none());
            assert!(shared_session_call(&Method::OPTIONS, path).is_none());
        }
        assert!(shared_session_call(&Method::POST, "/login.json").is_some());
        assert!(shared_session_call(&Method::DELETE, "/LOGIN").is_some());
        assert!(shared_session_call(&Method::PUT, "/login.xml").is_some());
        assert!(shared_session_call(&Method::DELETE, "/users/1.json").is_none());
        assert!(shared_session_call(&Method::DELETE, "/sessions.json").is_none());
        assert!(shared_session_call(&Method::DELETE, "/x/session.json").is_none());
    }

    #[test]
    fn session_objects_render_as_quickblox_xml() {
        let xml = session_xml(
            br#"{"session":{"user_id":5,"created_at":"2019-09-01T14:55:56Z","_id":"9"}}"#,
        );
        assert!(
            xml.contains("<user-id type=\"integer\">5</user-id>"),
            "{xml}"
        );
        assert!(
            xml.contains("<created-at>2019-09-01T14:55:56Z</created-at>"),
            "{xml}"
        );
        assert!(xml.contains("<-id>9</-id>"), "{xml}");
        assert!(!xml.contains("token"));
    }

    #[test]
    fn error_messages_are_extracted() {
        assert_eq!(
            error_message(br#"{"errors":["Unauthorized"]}"#).unwrap(),
            "Unauthorized"
        );
        assert_eq!(
            error_message(br#"{"errors":{"base":["Unexpected signature"]}}"#).unwrap(),
            "Unexpected signature"
        );
        assert_eq!(
            error_message(br#"{"errors":{"login":["is invalid"]}}"#).unwrap(),
            "login is invalid"
        );
        assert_eq!(
            error_message(b"<html>Bad Gateway</html>").unwrap(),
            "<html>Bad Gateway</html>"
        );
        assert_eq!(error_message(b"  "), None);
    }

    #[test]
    fn token_prefix_is_short() {
        assert_eq!(
            token_prefix("c56f382b402fb482086db956064592d3cd012bba"),
            "c56f38…"
        );
        assert_eq!(token_prefix("ab"), "ab…");
    }
}
