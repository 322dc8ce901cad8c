//! Method overrides hidden in parameters: `_method`, which Rack's
//! `MethodOverride` (and so Rails, and so QuickBlox) reads from a POST
//! form body as the request's real method.
//!
//! `POST /users/5.json` with a form body `_method=delete` is a `DELETE
//! /users/5.json` to a Rails application. qbproxy refuses such requests
//! rather than decide on one method while the upstream acts on another.
//!
//! The rule has no parser in it, so there is no parser to differ from
//! Rack's: a POST whose body is not JSON (Rack reads forms, multipart of any
//! kind, and a body with no `Content-Type` as parameters) is refused if its
//! bytes spell `_method` anywhere, in any case, with any of its characters
//! percent-encoded or escaped with a backslash: in a form key or value, in
//! a multipart part's headers (`name=`, `name*=`, `Content-ID`) or its
//! content. Rack decodes a form key once and unescapes a quoted part name,
//! so whatever key it reads as `_method` is spelt in the body in one of
//! those ways; Rack 3 reads no other way (SECURITY.md). The cost: a form or
//! multipart POST whose text contains `_method` for another reason is
//! refused too; JSON bodies are never scanned. The query is checked the
//! same way (some frameworks read `_method` there).
//!
//! [`Scanner`] reads a body chunk by chunk as it passes, with a few bytes
//! of state, so a body too large to buffer is inspected too, whatever its
//! size.
//!
//! Pure; no I/O.

use http::{header, HeaderMap, Method};

/// What a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// `_method`, spelt one way or another.
    MethodParam,
}

/// Where a method override was found; each is refused (400
/// `method-override`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Override {
    /// A header such as `X-HTTP-Method-Override`, as sent.
    Header(String),
    /// `_method` in the query.
    Query,
    /// `_method` in a POST body that is not JSON.
    Body,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Override::Header(name) => write!(f, "the {name} header"),
            Override::Query => f.write_str("a _method parameter in the query"),
            Override::Body => f.write_str(
                "_method in a POST body that is not JSON (Rack reads it as the method; \
                 send JSON, or the method itself)",
            ),
        }
    }
}

/// True if a query string spells `_method` anywhere.
pub fn query_has_method(query: &str) -> bool {
    let mut scan = Scanner::new();
    scan.feed(query.as_bytes());
    scan.finish().is_some()
}

/// The scanner for a request's body, if Rack could read a `_method` from
/// it: a POST whose body is not JSON. The one `Content-Type` (two are
/// refused before this, `headers::inbound`) is JSON only if it is exactly
/// `application/json`, with parameters after a `;` and no `,` (Rack's media
/// type ends at the first `;` or `,`); anything else is scanned.
pub fn body_scanner(method: &Method, headers: &HeaderMap) -> Option<Scanner> {
    if method != Method::POST {
        return None;
    }
    match headers.get(header::CONTENT_TYPE) {
        Some(value) if is_json(value.as_bytes()) => None,
        _ => Some(Scanner::new()),
    }
}

fn is_json(content_type: &[u8]) -> bool {
    if content_type.contains(&b',') {
        return false;
    }
    let media = content_type.split(|b| *b == b';').next().unwrap_or(b"");
    media.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

/// The letters looked for, lower case.
const NEEDLE: &[u8; 7] = b"_method";

/// Looks for `_method` in a body fed chunk by chunk: bytes are read as
/// percent-decoded (an escape that is not one stays as it is), with
/// backslashes dropped and letters in lower case, and the needle is looked
/// for in what that gives.
#[derive(Debug, Default)]
pub struct Scanner {
    /// A `%` and the hex digits after it so far (`escape[0]` is `%`).
    escape: [u8; 3],
    escaped: usize,
    /// How many of the needle's bytes the decoded stream ends with.
    matched: usize,
    found: Option<Found>,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// What was found so far.
    pub fn found(&self) -> Option<Found> {
        self.found
    }

    /// Scans the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Found> {
        for &b in chunk {
            if self.found.is_some() {
                break;
            }
            self.raw(b);
        }
        self.found
    }

    /// The body has ended: an escape cut short stands as it was.
    pub fn finish(&mut self) -> Option<Found> {
        let pending = std::mem::take(&mut self.escaped);
        for i in 0..pending {
            self.decoded(self.escape[i]);
        }
        self.found
    }

    /// One byte as sent.
    fn raw(&mut self, b: u8) {
        match (self.escaped, b) {
            (0, b'%') => {
                self.escape[0] = b;
                self.escaped = 1;
            }
            (0, _) => self.decoded(b),
            (1, _) if b.is_ascii_hexdigit() => {
                self.escape[1] = b;
                self.escaped = 2;
            }
            (2, _) if b.is_ascii_hexdigit() => {
                self.escaped = 0;
                self.decoded(hex(self.escape[1]) << 4 | hex(b));
            }
            _ => {
                // Not an escape: the bytes stand for themselves, and this
                // one may open the next.
                let pending = std::mem::take(&mut self.escaped);
                for i in 0..pending {
                    self.decoded(self.escape[i]);
                }
                self.raw(b);
            }
        }
    }

    /// One byte as a parser may read it.
    fn decoded(&mut self, b: u8) {
        if b == b'\\' {
            return;
        }
        let b = b.to_ascii_lowercase();
        if b == NEEDLE[self.matched] {
            self.matched += 1;
            if self.matched == NEEDLE.len() {
                self.found = Some(Found::MethodParam);
                self.matched = 0;
            }
        } else {
            // The needle repeats none of its letters, so a mismatch can only
            // begin a new match at its first letter.
            self.matched = usize::from(b == NEEDLE[0]);
        }
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn found(body: &[u8]) -> bool {
        let mut s = Scanner::new();
        s.feed(body);
        s.finish().is_some()
    }

    /// Every spelling a parser could read as `_method`, each class the
    /// issue found getting through, and none of the bodies without it.
    #[test]
    fn method_is_found_however_it_is_spelt_and_wherever_it_stands() {
        let bodies: [&[u8]; 16] = [
            b"_method=delete",
            b"a=1&_method=delete",
            b"a=1& _method=delete",
            b"a=1;_method=delete",
            b"%5Fmethod=delete",
            b"%5f%6D%65%74%68%6f%64=delete",
            b"_METHOD=delete",
            b"_method[]=delete",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[_method=delete",
            b"%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B%5B_method=x",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\ndelete\r\n--XyZ--",
            b"--XyZ\r\nContent-ID: _method\r\n\r\ndelete\r\n--XyZ--",
            b"--XyZ\r\nContent-Disposition: form-data; name*=UTF-8''%5Fmethod\r\n\r\ndelete",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"\\_m\\ethod\"\r\n\r\ndelete",
            b"--XyZ\r\nContent-Disposition: form-data;\x0bname=_method,x\r\n\r\ndelete",
            b"%%5Fmethod=delete",
        ];
        for body in bodies {
            assert!(found(body), "{:?}", String::from_utf8_lossy(body));
        }
        let clean: [&[u8]; 6] = [
            b"",
            b"method=delete",
            b"_metho=d",
            b"name=_meth%6",
            b"%5Gmethod=x",
            b"{\"_m\":\"ethod\"}",
        ];
        for body in clean {
            assert!(!found(body), "{:?}", String::from_utf8_lossy(body));
        }
    }

    /// The scan gives the same answer however the body is cut into chunks,
    /// including inside an escape.
    #[test]
    fn chunks_do_not_change_the_answer() {
        let body = b"a=1&%5f%6D%65%74%68%6f%64=delete";
        for size in 1..body.len() {
            let mut s = Scanner::new();
            for chunk in body.chunks(size) {
                s.feed(chunk);
            }
            assert_eq!(s.finish(), Some(Found::MethodParam), "chunks of {size}");
        }
    }

    #[test]
    fn only_non_json_posts_are_scanned() {
        let with = |ct: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            body_scanner(&Method::POST, &h).is_some()
        };
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ",
        ] {
            assert!(!with(Some(json)), "{json}");
        }
        for not_json in [
            None,
            Some(""),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=XyZ"),
            Some("multipart/mixed"),
            Some("multipart/related; boundary=\"\""),
            Some("text/plain"),
            Some("application/json, application/x-www-form-urlencoded"),
            Some("application/jsonx"),
        ] {
            assert!(with(not_json), "{not_json:?}");
        }
        let form = HeaderMap::new();
        for method in [Method::PUT, Method::PATCH, Method::DELETE, Method::GET] {
            assert!(body_scanner(&method, &form).is_none(), "{method}");
        }
    }

    #[test]
    fn queries_are_checked_the_same_way() {
        assert!(query_has_method("a=1&_method=delete"));
        assert!(query_has_method("x=%5Fmethod"));
        assert!(!query_has_method("per_page=10&method=x"));
    }
}
