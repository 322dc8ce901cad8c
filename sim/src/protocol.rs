//! QuickBlox's headers and formats, spelt here from the API facts
//! (`quickblox-api.md`), not taken from qbproxy: the stand-in must not
//! share a mistake with what it tests.

use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use http::HeaderName;
use sha1::Sha1;

pub(crate) const QB_TOKEN: HeaderName = HeaderName::from_static("qb-token");
pub(crate) const QB_TOKEN_EXPIRATION: HeaderName =
    HeaderName::from_static("qb-token-expirationdate");
/// With an API key, the user the request acts as.
pub(crate) const ON_BEHALF_OF: HeaderName = HeaderName::from_static("on-behalf-of");
pub(crate) const API_KEY_SCHEME: &str = "ApiKey";

/// A session lives this long after the last request that used it.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// The key of `Authorization: ApiKey <key>` (the scheme in any case, as
/// HTTP reads it).
pub(crate) fn api_key(authorization: &[u8]) -> Option<&[u8]> {
    let value = authorization.trim_ascii();
    let (scheme, rest) = value.split_at_checked(API_KEY_SCHEME.len())?;
    let separated = matches!(rest.first(), Some(b' ' | b'\t'));
    let key = rest.trim_ascii();
    (scheme.eq_ignore_ascii_case(API_KEY_SCHEME.as_bytes()) && separated && !key.is_empty())
        .then_some(key)
}

/// `QB-Token-ExpirationDate`: `2026-12-01 10:00:00 UTC`.
pub(crate) fn format_expiration(t: SystemTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(t)
        .format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01 00:00:00 UTC"))
}

/// The signature of `POST /session.json`: HMAC-SHA1 of every other
/// parameter as sorted `key=value` pairs (flattened: `user[login]=...`)
/// joined with `&`, keyed with the auth secret, in hex.
pub(crate) fn signature(auth_secret: &str, params: &[(String, String)]) -> String {
    let mut signed: Vec<String> = params
        .iter()
        .filter(|(k, _)| k != "signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    signed.sort();
    hmac_sha1_hex(auth_secret, &signed.join("&"))
}

fn hmac_sha1_hex(key: &str, message: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What the echo shows of a secret: its first six characters.
pub(crate) fn token_prefix(token: &str) -> String {
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
        assert_eq!(api_key(b"ApiKeyabc"), None);
        assert_eq!(api_key(b"ApiKey "), None);
        assert_eq!(api_key(b"Bearer abc"), None);
    }

    /// The simulator checks signatures as the official SDK makes them:
    /// every vector it computed (`../shared/signature-vectors.jsonl`, copied
    /// into qbproxy's `tests/data/`), read from a JSON body as a session
    /// request carries it.
    #[test]
    fn every_sdk_vector_is_accepted() {
        let text = include_str!("../../tests/data/signature-vectors.jsonl");
        let mut json = http::HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let body = serde_json::to_vec(&v["params"]).unwrap();
            let params = crate::params::parse_params(&json, &body);
            let secret = v["auth_secret"].as_str().unwrap();
            assert_eq!(
                signature(secret, &params),
                v["signature"].as_str().unwrap(),
                "case {}",
                v["case"]
            );
            n += 1;
        }
        assert!(n >= 5, "only {n} vectors");
    }

    #[test]
    fn the_hmac_is_rfc_2202s() {
        // RFC 2202, test case 2.
        assert_eq!(
            hmac_sha1_hex("Jefe", "what do ya want for nothing?"),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }
}
