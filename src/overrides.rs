//! Method overrides hidden in parameters: `_method`, which Rack (and so
//! Rails, and so QuickBlox) reads from a POST form body as the request's
//! real method, and which some frameworks read from the query.
//!
//! `POST /session.xml` with a form body `_method=delete` is a
//! `DELETE /session.xml` to a Rails application. qbproxy refuses such
//! requests rather than decide on one method while the upstream acts on
//! another. The query is checked whole; a form body is scanned as it
//! passes, chunk by chunk, with [`Scanner`], so a body too large to buffer
//! is inspected too.
//!
//! The scanner reads bodies the way the most lenient parser would, so that
//! no spelling slips past: keys are percent-decoded, matched without regard
//! to case, split on `&` and `;`, and stripped of the leading brackets old
//! Rack versions ignore; multipart part names are read from
//! `Content-Disposition` quoted or not, plain or `name*=`.
//!
//! Pure; no I/O.

use http::{header, HeaderMap, Method};

/// A multipart part's headers longer than this cannot be inspected; the
/// request is refused rather than passed unread (real part headers are a
/// few hundred bytes).
pub const MAX_PART_HEADERS: usize = 16 * 1024;

/// What a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A `_method` parameter.
    MethodParam,
    /// A multipart part whose headers are too long to read.
    Unreadable,
}

/// True if a query string carries a `_method` parameter.
pub fn query_has_method(query: &str) -> bool {
    let mut scan = Scanner::urlencoded();
    scan.feed(query.as_bytes());
    scan.finish().is_some()
}

/// The scanner for a request's body, if it is a form that Rack would read
/// `_method` from: a POST whose body is form-encoded, multipart, or has no
/// `Content-Type` at all (Rack reads that as a form too).
pub fn body_scanner(method: &Method, headers: &HeaderMap) -> Option<Scanner> {
    if method != Method::POST {
        return None;
    }
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Some(Scanner::urlencoded());
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    // Rack: the media type is what comes before the first ';' or ','.
    let media = text
        .split([';', ','])
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media.is_empty() || media == "application/x-www-form-urlencoded" {
        return Some(Scanner::urlencoded());
    }
    if media.starts_with("multipart/") {
        // Without a boundary no parser reads any part: nothing to find.
        return boundary(&text).map(Scanner::multipart);
    }
    None
}

/// The `boundary` parameter of a multipart content type, quoted or not.
fn boundary(content_type: &str) -> Option<Vec<u8>> {
    let lower = content_type.to_ascii_lowercase();
    let at = lower.find("boundary=")? + "boundary=".len();
    let rest = &content_type[at..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next()?,
        None => rest.split([';', ',', ' ']).next()?,
    };
    (!value.is_empty()).then(|| value.as_bytes().to_vec())
}

/// Scans a body chunk by chunk for a `_method` parameter.
pub struct Scanner {
    kind: Kind,
    found: Option<Found>,
}

enum Kind {
    UrlEncoded {
        /// The current key's first bytes (a longer key cannot be `_method`).
        key: Vec<u8>,
        in_value: bool,
    },
    Multipart {
        /// `--` and the boundary.
        delimiter: Vec<u8>,
        /// The unsearched tail of the last chunk (a delimiter may straddle
        /// two chunks), or the part headers read so far.
        pending: Vec<u8>,
        in_headers: bool,
    },
}

/// A key longer than this (encoded) is not `_method`, even fully
/// percent-encoded and followed by brackets.
const MAX_KEY: usize = 64;

impl Scanner {
    pub fn urlencoded() -> Scanner {
        Scanner {
            kind: Kind::UrlEncoded {
                key: Vec::new(),
                in_value: false,
            },
            found: None,
        }
    }

    pub fn multipart(boundary: Vec<u8>) -> Scanner {
        let mut delimiter = b"--".to_vec();
        delimiter.extend_from_slice(&boundary);
        Scanner {
            kind: Kind::Multipart {
                delimiter,
                pending: Vec::new(),
                in_headers: false,
            },
            found: None,
        }
    }

    /// What was found so far.
    pub fn found(&self) -> Option<Found> {
        self.found
    }

    /// Scans the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Found> {
        if self.found.is_some() {
            return self.found;
        }
        self.found = match &mut self.kind {
            Kind::UrlEncoded { key, in_value } => feed_urlencoded(key, in_value, chunk),
            Kind::Multipart {
                delimiter,
                pending,
                in_headers,
            } => feed_multipart(delimiter, pending, in_headers, chunk),
        };
        self.found
    }

    /// The body has ended.
    pub fn finish(&mut self) -> Option<Found> {
        if self.found.is_some() {
            return self.found;
        }
        if let Kind::UrlEncoded { key, in_value } = &mut self.kind {
            if !*in_value && is_method_key(key) {
                self.found = Some(Found::MethodParam);
            }
        }
        self.found
    }
}

fn feed_urlencoded(key: &mut Vec<u8>, in_value: &mut bool, chunk: &[u8]) -> Option<Found> {
    for &b in chunk {
        match b {
            b'&' | b';' => {
                if !*in_value && is_method_key(key) {
                    return Some(Found::MethodParam);
                }
                key.clear();
                *in_value = false;
            }
            b'=' if !*in_value => {
                if is_method_key(key) {
                    return Some(Found::MethodParam);
                }
                *in_value = true;
            }
            _ if !*in_value && key.len() <= MAX_KEY => key.push(b),
            _ => {}
        }
    }
    None
}

/// True if a form key (as sent) names `_method`: percent- and `+`-decoded,
/// leading brackets dropped, any case, alone or followed by `[`.
fn is_method_key(raw: &[u8]) -> bool {
    if raw.len() > MAX_KEY {
        return false;
    }
    let plus: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    let decoded: Vec<u8> = percent_encoding::percent_decode(&plus).collect();
    names_method(&decoded)
}

/// True if a decoded parameter name is `_method` as a lenient parser reads
/// it: leading `[` `]` skipped, any case, ended or followed by a bracket.
fn names_method(name: &[u8]) -> bool {
    let start = name
        .iter()
        .position(|b| *b != b'[' && *b != b']')
        .unwrap_or(name.len());
    let name = &name[start..];
    const METHOD: &[u8] = b"_method";
    name.len() >= METHOD.len()
        && name[..METHOD.len()].eq_ignore_ascii_case(METHOD)
        && matches!(name.get(METHOD.len()), None | Some(b'[' | b']'))
}

fn feed_multipart(
    delimiter: &[u8],
    pending: &mut Vec<u8>,
    in_headers: &mut bool,
    chunk: &[u8],
) -> Option<Found> {
    pending.extend_from_slice(chunk);
    loop {
        if *in_headers {
            // Part headers end at the first empty line.
            let end = find(pending, b"\r\n\r\n")
                .map(|i| (i, 4))
                .into_iter()
                .chain(find(pending, b"\n\n").map(|i| (i, 2)))
                .min();
            let Some((end, sep)) = end else {
                if pending.len() > MAX_PART_HEADERS {
                    return Some(Found::Unreadable);
                }
                return None;
            };
            if part_is_method(&pending[..end]) {
                return Some(Found::MethodParam);
            }
            pending.drain(..end + sep);
            *in_headers = false;
        }
        match find(pending, delimiter) {
            Some(i) => {
                pending.drain(..i + delimiter.len());
                *in_headers = true;
            }
            None => {
                // Keep what could be the start of a delimiter.
                let keep = delimiter.len().saturating_sub(1).min(pending.len());
                pending.drain(..pending.len() - keep);
                return None;
            }
        }
    }
}

/// True if a part's header block names the part `_method`.
fn part_is_method(headers: &[u8]) -> bool {
    let text = String::from_utf8_lossy(headers);
    let lower = text.to_ascii_lowercase();
    for (at, _) in lower.match_indices("name") {
        // `name=` or `name*=`, as a parameter (after ';' or at the start of
        // a line), not the tail of `filename=`.
        let before = lower[..at].trim_end_matches([' ', '\t']);
        if !(before.ends_with(';') || before.is_empty() || before.ends_with('\n')) {
            continue;
        }
        let rest = text[at + 4..].trim_start_matches([' ', '\t']);
        let (value, extended) = match (rest.strip_prefix('='), rest.strip_prefix("*=")) {
            (Some(v), _) => (v, false),
            (_, Some(v)) => (v, true),
            _ => continue,
        };
        let value = value.trim_start_matches([' ', '\t']);
        let name = if let Some(quoted) = value.strip_prefix('"') {
            unquote(quoted)
        } else {
            value
                .split([';', ' ', '\t', '\r', '\n'])
                .next()
                .unwrap_or("")
                .to_owned()
        };
        // RFC 5987: charset'language'value, percent-encoded.
        let name = if extended {
            name.rsplit('\'').next().unwrap_or("").to_owned()
        } else {
            name
        };
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(&name).collect();
        if names_method(name.as_bytes()) || names_method(&decoded) {
            return true;
        }
    }
    false
}

/// A quoted-string's content (after the opening quote), `\x` read as `x`.
fn unquote(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn scan_in_chunks(mut s: Scanner, body: &[u8], size: usize) -> Option<Found> {
        for chunk in body.chunks(size.max(1)) {
            if let Some(f) = s.feed(chunk) {
                return Some(f);
            }
        }
        s.finish()
    }

    fn every_split(make: impl Fn() -> Scanner, body: &[u8]) -> Option<Found> {
        let whole = scan_in_chunks(make(), body, body.len());
        for size in 1..=body.len().min(40) {
            assert_eq!(
                scan_in_chunks(make(), body, size),
                whole,
                "chunks of {size}"
            );
        }
        whole
    }

    #[test]
    fn urlencoded_method_params_are_found_in_any_spelling() {
        for body in [
            "_method=delete",
            "a=1&_method=DELETE",
            "a=1;_method=delete",
            "_METHOD=delete",
            "%5Fmethod=delete",
            "%5f%6d%65%74%68%6f%64=delete",
            "_method[]=delete",
            "[_method]=delete",
            "]]_method=delete",
            "_method",
            "a=1&_method",
            "_method&a=1",
        ] {
            assert_eq!(
                every_split(Scanner::urlencoded, body.as_bytes()),
                Some(Found::MethodParam),
                "{body}"
            );
        }
        for body in [
            "",
            "a=_method",
            "text=use+_method%3Ddelete",
            "_methods=1",
            "x_method=1",
            "method=delete",
            "a=1&b=2",
        ] {
            assert_eq!(
                every_split(Scanner::urlencoded, body.as_bytes()),
                None,
                "{body}"
            );
        }
        assert!(query_has_method("per_page=5&_method=delete"));
        assert!(!query_has_method("per_page=5&order=_method"));
    }

    fn multipart(name_line: &str) -> Vec<u8> {
        format!(
            "preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
             Content-Type: text/plain\r\n\r\nsome _method= content\r\n--XyZ\r\n{name_line}\r\n\r\ndelete\r\n--XyZ--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn multipart_method_parts_are_found_in_any_spelling() {
        let make = || Scanner::multipart(b"XyZ".to_vec());
        for line in [
            "Content-Disposition: form-data; name=\"_method\"",
            "content-disposition: form-data;name=_method",
            "Content-Disposition: form-data; name=\"_METHOD\"",
            "Content-Disposition: form-data; name=\"%5Fmethod\"",
            "Content-Disposition: form-data; name*=UTF-8''_method",
            "Content-Disposition: form-data; name=\"_method[]\"",
            "Content-Disposition: form-data; name=\"\\_method\"",
            "Content-Disposition: form-data; name = \"_method\"",
        ] {
            assert_eq!(
                every_split(make, &multipart(line)),
                Some(Found::MethodParam),
                "{line}"
            );
        }
        for line in [
            "Content-Disposition: form-data; name=\"method\"",
            "Content-Disposition: form-data; filename=\"_method\"; name=\"upload\"",
            "Content-Disposition: form-data; name=\"_methods\"",
        ] {
            assert_eq!(every_split(make, &multipart(line)), None, "{line}");
        }
        // Part headers that never end cannot be inspected.
        let mut endless = b"--XyZ\r\nContent-Disposition: form-data; x=\"".to_vec();
        endless.extend(std::iter::repeat_n(b'a', MAX_PART_HEADERS + 10));
        assert_eq!(
            scan_in_chunks(make(), &endless, 1000),
            Some(Found::Unreadable)
        );
    }

    #[test]
    fn only_post_forms_are_scanned() {
        let mut h = HeaderMap::new();
        assert!(
            body_scanner(&Method::POST, &h).is_some(),
            "no content type: a form to Rack"
        );
        assert!(body_scanner(&Method::PUT, &h).is_none());
        for (ct, scanned) in [
            ("application/x-www-form-urlencoded", true),
            ("Application/X-WWW-Form-Urlencoded; charset=utf-8", true),
            ("multipart/form-data; boundary=abc", true),
            ("multipart/form-data; boundary=\"a b\"", true),
            ("multipart/mixed; boundary=abc", true),
            ("multipart/form-data", false),
            ("application/json", false),
            ("text/plain", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            assert_eq!(body_scanner(&Method::POST, &h).is_some(), scanned, "{ct}");
        }
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\""),
            Some(b"a b".to_vec())
        );
        assert_eq!(
            boundary("multipart/form-data; BOUNDARY=abc; x=y"),
            Some(b"abc".to_vec())
        );
    }
}
