//! The canonical view of a request: the one form every decision is taken
//! on, and the form that is forwarded.
//!
//! A client can spell one QuickBlox call many ways: `//users/5.json`,
//! `/x/../users/5.json`, `/%75sers/5.json`, `/Users/5.xml`. The servers
//! behind qbproxy (a Rails router, a normalising hop) read them all as the
//! same call. So qbproxy reduces the path to its canonical form (unreserved
//! characters decoded, dot segments removed, repeated slashes merged),
//! decides on that, and forwards exactly that: what the upstream acts on is
//! what was decided on. Paths that cannot be made safe (an encoded `/` or
//! `\`, dot segments that climb above the root) are refused.
//!
//! Decisions compare the *route key* of the canonical path: fully
//! percent-decoded, ASCII-lowercased, without a trailing slash and without
//! the format suffix. Rails routes `/users/5`, `/users/5.json` and
//! `/users/5.xml` to one action, and a case-insensitive server would route
//! `/USERS/5.json` there too, so a rule or the guard must match all of them.
//!
//! Pure functions; no I/O.

use std::borrow::Cow;

use http::{HeaderMap, Method};

/// The methods qbproxy forwards, in exactly this spelling. Anything else
/// (`delete`, `CONNECT`, `TRACE`, extension methods) is refused with 405.
pub const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The `Allow` header of a 405.
pub const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// True for one of [`METHODS`] (compared case-sensitively: `delete` is an
/// extension method to HTTP, and some servers upper-case it).
pub fn method_allowed(method: &Method) -> bool {
    METHODS.contains(method)
}

/// Why a path cannot be made canonical; answered with 400 `bad-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("the request target is not a path starting with '/'")]
    NotAPath,
    #[error("the path has an encoded '/' (%2F), which servers disagree about")]
    EncodedSlash,
    #[error("the path has an encoded '\\' (%5C), which servers disagree about")]
    EncodedBackslash,
    #[error("the path has a '\\', which some servers read as '/'")]
    Backslash,
    #[error("the path has a '%' that does not start a %XX escape")]
    BadEscape,
    #[error("the path's '..' segments climb above the root")]
    AboveRoot,
}

/// RFC 3986 §2.3: characters that mean the same encoded or not.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True if `path` is already canonical, checked without allocating: no
/// escapes, no backslash, no empty segment but a trailing one, no dot
/// segment. The common case.
fn already_canonical(path: &str) -> bool {
    if path.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == "." || segment == ".." {
            return false;
        }
    }
    true
}

/// The canonical form of a request path (without its query):
/// unreserved characters percent-decoded (other escapes kept byte for
/// byte), repeated slashes merged, then dot segments removed (RFC 3986
/// §5.2.4). A trailing slash is kept. It is a fixed point: normalising it
/// again, by any of those steps, changes nothing.
pub fn path(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    if !raw.starts_with('/') {
        return Err(BadPath::NotAPath);
    }
    if already_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    // 1. Decode what is unreserved; refuse what no two servers agree on.
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(BadPath::BadEscape),
                };
                let value = match (hex(hi), hex(lo)) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(BadPath::BadEscape),
                };
                match value {
                    b'/' => return Err(BadPath::EncodedSlash),
                    b'\\' => return Err(BadPath::EncodedBackslash),
                    v if unreserved(v) => decoded.push(char::from(v)),
                    _ => decoded.push_str(&raw[i..i + 3]),
                }
                i += 3;
            }
            b'\\' => return Err(BadPath::Backslash),
            _ => {
                // Copy the run up to the next '%' or '\' in one go (it is
                // valid UTF-8: `raw` is a str and the run ends on ASCII).
                let end = raw[i..].find(['%', '\\']).map_or(raw.len(), |n| i + n);
                decoded.push_str(&raw[i..end]);
                i = end;
            }
        }
    }
    // 2. Merge slashes (empty segments go), then resolve dot segments.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = decoded.ends_with('/');
    for segment in decoded[1..].split('/') {
        match segment {
            "" => {}
            "." => trailing = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
                trailing = true;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    // A path ending in a real segment has no trailing slash, whatever came
    // before it; "/a/b/" and "/a/b/." keep theirs.
    trailing |= decoded.ends_with('/');
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// The route key of a canonical path: fully percent-decoded, ASCII
/// lowercase, with the format suffix (from the first `.` of the last
/// segment, as Rails' `(.:format)` reads it) and trailing slashes removed.
/// Decoding cannot add segments: encoded `/` and `\` were refused.
pub fn route_key(canonical: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(canonical).decode_utf8_lossy();
    key_of(&decoded).to_ascii_lowercase()
}

/// `path` without its trailing slashes and format suffix (not lowercased).
fn key_of(path: &str) -> &str {
    let trimmed = trim_slashes(path);
    let last = trimmed.rfind('/').map_or(0, |i| i + 1);
    let stem = match trimmed[last..].find('.') {
        Some(dot) => &trimmed[..last + dot],
        None => trimmed,
    };
    trim_slashes(stem)
}

/// Trailing slashes off, but the root stays `/`.
fn trim_slashes(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() {
        "/"
    } else {
        t
    }
}

/// True if the canonical path's route key is `key` (lowercase). Without
/// allocating when the path has no escapes (an escape left in a canonical
/// path is never an ASCII letter, so it could not match a lowercase key
/// of letters; it still takes the full way, to stay exact).
pub fn key_is(canonical: &str, key: &str) -> bool {
    if canonical.contains('%') {
        return route_key(canonical) == key;
    }
    key_of(canonical).eq_ignore_ascii_case(key)
}

/// The names under which clients ask a server to take another method.
const OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// A method-override header, in any spelling (`_` read as `-`, as CGI and
/// Rack do): the name the client used.
pub fn override_header(headers: &HeaderMap) -> Option<&str> {
    headers.keys().map(|k| k.as_str()).find(|name| {
        OVERRIDE_HEADERS
            .iter()
            .any(|o| name.len() == o.len() && same_header_name(name, o))
    })
}

/// True if two lowercase header names are the same once `_` is read as
/// `-` (how CGI, Rack and PHP turn headers into variables).
pub fn same_header_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || matches!((x, y), (b'_', b'-') | (b'-', b'_')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> Result<String, BadPath> {
        path(p).map(Cow::into_owned)
    }

    #[test]
    fn canonical_paths_are_kept_as_they_are() {
        for p in [
            "/",
            "/users.json",
            "/users/5.json",
            "/chat/Dialog.json",
            "/users/",
            "/a.b/c..d/...",
            "/users/%C3%A9.json",
            "/x/%3a%40",
            "/blobs/a+b",
        ] {
            assert!(
                matches!(path(p), Ok(Cow::Borrowed(_))) || canon(p).unwrap() == p,
                "{p}"
            );
            assert_eq!(canon(p).unwrap(), p);
        }
    }

    #[test]
    fn spellings_of_one_path_become_one() {
        for p in [
            "//users/5.json",
            "/./users/5.json",
            "/x/../users/5.json",
            "/%75sers/5.json",
            "/%75%73%65%72%73/5.json",
            "/users//5.json",
            "/users/./5.json",
            "/users/6/../5.json",
            "/%2e/users/5.json",
            "/%2E%2e/users/5.json"
                .replacen("%2E%2e", "a/%2E%2e", 1)
                .as_str(),
            "/users/5%2ejson",
            "///users///5.json",
            "/a//../users/5.json",
        ] {
            assert_eq!(canon(p).unwrap(), "/users/5.json", "{p}");
        }
        assert_eq!(canon("/users/5/.").unwrap(), "/users/5/");
        assert_eq!(canon("/users/5/..").unwrap(), "/users/");
        assert_eq!(canon("/users/5/").unwrap(), "/users/5/");
        assert_eq!(canon("//").unwrap(), "/");
        assert_eq!(canon("/.").unwrap(), "/");
        assert_eq!(canon("/a/..").unwrap(), "/");
        // Other escapes stay exactly as sent (QuickBlox refuses re-encoded
        // URLs), lowercase hex included.
        assert_eq!(canon("/x/%c3%a9//y").unwrap(), "/x/%c3%a9/y");
    }

    #[test]
    fn paths_that_cannot_be_made_safe_are_refused() {
        for (p, why) in [
            ("/users%2F5.json", BadPath::EncodedSlash),
            ("/users%2f5.json", BadPath::EncodedSlash),
            ("/users%5C5.json", BadPath::EncodedBackslash),
            ("/users\\5.json", BadPath::Backslash),
            ("/..", BadPath::AboveRoot),
            ("/../session.json", BadPath::AboveRoot),
            ("/a/../../session.json", BadPath::AboveRoot),
            ("/%2e%2e/session.json", BadPath::AboveRoot),
            ("/users%2", BadPath::BadEscape),
            ("/users%zz", BadPath::BadEscape),
            ("*", BadPath::NotAPath),
            ("users.json", BadPath::NotAPath),
        ] {
            assert_eq!(canon(p), Err(why), "{p}");
        }
    }

    #[test]
    fn route_keys_fold_case_format_and_trailing_slashes() {
        for (p, key) in [
            ("/session.json", "/session"),
            ("/Session.JSON", "/session"),
            ("/session.xml", "/session"),
            ("/session", "/session"),
            ("/session/", "/session"),
            ("/session.json/", "/session"),
            ("/session.json.xml", "/session"),
            ("/users/5.json", "/users/5"),
            ("/users/.json", "/users"),
            ("/a.b/c.json", "/a.b/c"),
            ("/", "/"),
            ("/x/%C3%A9.json", "/x/é"),
        ] {
            assert_eq!(route_key(p), key, "{p}");
            if key.is_ascii() {
                assert!(key_is(p, key), "{p}");
            }
        }
        assert!(!key_is("/sessions.json", "/session"));
        assert!(!key_is("/x/session.json", "/session"));
    }

    #[test]
    fn methods_are_the_seven_in_upper_case() {
        for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(method_allowed(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
        for m in ["delete", "Get", "CONNECT", "TRACE", "PROPFIND", "PURGE"] {
            assert!(
                !method_allowed(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn override_headers_are_found_in_any_spelling() {
        for name in [
            "x-http-method-override",
            "x_http_method_override",
            "x-http-method",
            "x-method-override",
            "x_method-override",
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "DELETE".parse().unwrap(),
            );
            assert_eq!(override_header(&h), Some(name));
        }
        let mut h = HeaderMap::new();
        h.insert("x-http-method-overrides", "x".parse().unwrap());
        assert_eq!(override_header(&h), None);
    }
}
