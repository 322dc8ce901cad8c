//! The parameters of a session request, as QuickBlox reads them.

use http::{header, HeaderMap};

/// The parameters of a session request, flattened to `key` / `key[field]`,
/// from a JSON body (nested objects or flat keys) or a form body. Values
/// are the decoded strings, as QuickBlox signs them.
pub(super) fn parse_params(headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
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
