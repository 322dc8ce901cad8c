//! The `POST /session.json` parameters and their HMAC-SHA1 signature,
//! computed exactly as QuickBlox's official JavaScript SDK does.
//!
//! The signer does no I/O and reads no clock: the caller supplies the
//! timestamp and nonce, so every vector in `signature-vectors.jsonl` can be
//! reproduced.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// One parameter value: a plain string, or a nested object such as
/// `user: {login, password}` (sent as `user[login]=...` when flattened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Map(Vec<(String, String)>),
}

/// The parameters of a session request, in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, Value)>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::new())
    }

    pub fn str(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.push((key.to_owned(), Value::Str(value.into())));
        self
    }

    pub fn map(mut self, key: &str, fields: &[(&str, &str)]) -> Self {
        let fields = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.push((key.to_owned(), Value::Map(fields)));
        self
    }

    /// The string that is signed. As in the SDK: each nested object becomes
    /// its `key[field]=value` pairs sorted and joined with `&`; then all
    /// top-level entries are sorted as strings and joined with `&`. Values
    /// are raw, never URL-encoded.
    pub fn message(&self) -> String {
        let mut parts: Vec<String> = self
            .0
            .iter()
            .filter(|(k, _)| k != "signature")
            .map(|(k, v)| match v {
                Value::Str(s) => format!("{k}={s}"),
                Value::Map(fields) => {
                    let mut inner: Vec<String> = fields
                        .iter()
                        .map(|(f, s)| format!("{k}[{f}]={s}"))
                        .collect();
                    inner.sort();
                    inner.join("&")
                }
            })
            .collect();
        parts.sort();
        parts.join("&")
    }

    /// The JSON body with nested objects, as the SDKs send it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (k, v) in &self.0 {
            let value = match v {
                Value::Str(s) => serde_json::Value::String(s.clone()),
                Value::Map(fields) => serde_json::Value::Object(
                    fields
                        .iter()
                        .map(|(f, s)| (f.clone(), serde_json::Value::String(s.clone())))
                        .collect(),
                ),
            };
            obj.insert(k.clone(), value);
        }
        serde_json::Value::Object(obj)
    }
}

/// Lowercase hex HMAC-SHA1 of `params.message()` keyed with the auth secret.
pub fn sign(auth_secret: &str, params: &Params) -> String {
    hmac_sha1_hex(auth_secret, &params.message())
}

/// Lowercase hex HMAC-SHA1 of `message`.
pub fn hmac_sha1_hex(key: &str, message: &str) -> String {
    // `new_from_slice` accepts keys of any length for HMAC; it cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds `Params` from a vector's JSON `params` object.
    fn params_from_json(v: &serde_json::Value) -> Params {
        let mut p = Params::new();
        for (k, v) in v.as_object().expect("params is an object") {
            p = match v {
                serde_json::Value::String(s) => p.str(k, s.clone()),
                serde_json::Value::Object(m) => {
                    let fields: Vec<(&str, &str)> = m
                        .iter()
                        .map(|(f, s)| (f.as_str(), s.as_str().expect("nested values are strings")))
                        .collect();
                    p.map(k, &fields)
                }
                other => panic!("unexpected value {other}"),
            };
        }
        p
    }

    /// Every line of the official SDK's vectors (copied verbatim from
    /// `../shared/signature-vectors.jsonl` into `tests/data/`).
    #[test]
    fn reproduces_every_sdk_vector() {
        let text = include_str!("../../tests/data/signature-vectors.jsonl");
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let params = params_from_json(&v["params"]);
            let secret = v["auth_secret"].as_str().unwrap();
            assert_eq!(
                sign(secret, &params),
                v["signature"].as_str().unwrap(),
                "case {}",
                v["case"]
            );
            n += 1;
        }
        assert_eq!(n, 5, "all vectors were read");
    }

    #[test]
    fn message_matches_the_documented_example() {
        let p = Params::new()
            .str("application_id", "22")
            .str("auth_key", "wJHd4cQSxpQGWx5")
            .str("timestamp", "1326966962")
            .str("nonce", "33432")
            .map("user", &[("password", "amigo30pass"), ("login", "amigo30")]);
        assert_eq!(
            p.message(),
            "application_id=22&auth_key=wJHd4cQSxpQGWx5&nonce=33432&timestamp=1326966962\
             &user[login]=amigo30&user[password]=amigo30pass"
        );
    }

    #[test]
    fn values_are_signed_raw_and_signature_is_excluded() {
        let p = Params::new()
            .str("b", "a b&c=%20")
            .str("signature", "ignored")
            .str("a", "1");
        assert_eq!(p.message(), "a=1&b=a b&c=%20");
    }

    #[test]
    fn json_body_nests_objects() {
        let p = Params::new()
            .str("nonce", "1")
            .map("user", &[("login", "l")]);
        assert_eq!(
            p.to_json(),
            serde_json::json!({"nonce": "1", "user": {"login": "l"}})
        );
    }
}
