//! Which headers go on, in each direction, decided in one place.
//!
//! A request's headers are made forwardable before anything is decided on
//! them ([`inbound`]): the connection's own headers (hop-by-hop, RFC 9110
//! §7.6.1) are removed first, so every later decision sees the request as
//! it will be forwarded. A `Connection` header may name only such headers:
//! naming an end-to-end one (`Content-Type`, `QB-Token`, ...) would have
//! qbproxy drop it after deciding with it, so the upstream would read
//! another request than the one decided on (a JSON body, once its
//! `Content-Type` is gone, is a form to Rack). Such a request, and one with
//! two `Content-Type` headers (which servers resolve differently), is
//! refused.
//!
//! After the decision, [`outbound_request`] drops what is addressed to
//! qbproxy (`QBProxy-*`, `Expect`) and the client's `Host`, and joins
//! `Cookie` fields; [`outbound_response`] keeps hop-by-hop headers and
//! tokens from a client.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::gateway::canonical;
use crate::quickblox;

/// Headers that describe one connection, not the message; never forwarded
/// in either direction (RFC 9110 §7.6.1), plus `Expect`'s kin that hyper
/// answers itself.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Connection options a `Connection` header may carry besides the
/// hop-by-hop header names: `close`, and HTTP/2's upgrade settings.
const CONNECTION_OPTIONS: [&str; 2] = ["close", "http2-settings"];

/// Why a request's headers cannot be forwarded as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "the Connection header names {0:?}, which is not a connection's own header: \
         qbproxy decides on a request as it will be forwarded and does not drop an \
         end-to-end header at a client's word; send Connection with close or keep-alive only"
    )]
    ConnectionNames(String),
    #[error(
        "{0} Content-Type headers: servers keep different ones of several, so the request \
         would be read as another than the one decided on; send one"
    )]
    ContentTypes(usize),
}

/// Makes a client's request headers forwardable, before any decision:
/// refuses a `Connection` header that names an end-to-end header and more
/// than one `Content-Type`, then removes the hop-by-hop headers.
pub fn inbound(headers: &mut HeaderMap) -> Result<(), HeaderError> {
    let content_types = headers.get_all(header::CONTENT_TYPE).iter().count();
    if content_types > 1 {
        return Err(HeaderError::ContentTypes(content_types));
    }
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return Ok(());
    }
    for value in headers.get_all(header::CONNECTION) {
        for option in value.as_bytes().split(|b| *b == b',') {
            let option = String::from_utf8_lossy(option).trim().to_ascii_lowercase();
            let known = option.is_empty()
                || CONNECTION_OPTIONS.contains(&option.as_str())
                || HOP_BY_HOP.iter().any(|h| h.as_str() == option);
            if !known {
                return Err(HeaderError::ConnectionNames(option));
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    Ok(())
}

/// After the decision: `Expect`, headers addressed to qbproxy itself
/// (`QBProxy-*`), and the client's `Host` are dropped; `Cookie` fields are
/// joined into one.
///
/// The upstream's host travels in the URI: the pool writes it as `Host` on
/// an HTTP/1.1 connection and as `:authority` alone on an HTTP/2 one (a
/// `host` field beside it is a duplicate that nginx before 1.29 refuses
/// with 400).
pub fn outbound_request(headers: &mut HeaderMap) {
    let ours = |k: &HeaderName| {
        k == header::EXPECT || k.as_str().starts_with(quickblox::QBPROXY_HEADER_PREFIX)
    };
    if headers.keys().any(ours) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| ours(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    headers.remove(header::HOST);
    join_cookies(headers);
}

/// A response's headers: hop-by-hop ones removed, including any its
/// `Connection` names, and a `QB-Token` (in any spelling) never reaches a
/// client: it could be one qbproxy holds.
pub fn outbound_response(headers: &mut HeaderMap) {
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        if let Some(listed) = headers.get(header::CONNECTION) {
            let named: Vec<HeaderName> = listed
                .to_str()
                .unwrap_or("")
                .split(',')
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
    let token =
        |k: &HeaderName| canonical::same_header_name(k.as_str(), quickblox::QB_TOKEN.as_str());
    if headers.keys().any(token) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| token(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Headers with `_` in their names are dropped once decided on, as nginx
/// does by default: some servers read `Content_Type` as `Content-Type`.
pub fn strip_underscored(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in &names {
        headers.remove(name);
    }
    tracing::debug!(headers = ?names, "dropped request headers with '_' in their names");
}

/// An HTTP/2 client may split `Cookie` into one field per cookie (RFC 9113
/// §8.2.3); an HTTP/1.1 server reads one `Cookie` line and keeps the last
/// of several. Joined with "; " they reach either protocol whole.
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Each part was a valid value, and "; " is too.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed_before_any_decision() {
        let mut h = map(&[
            ("connection", "keep-alive, TE"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("content-type", "application/json"),
            ("x-keep", "yes"),
        ]);
        inbound(&mut h).unwrap();
        assert_eq!(names(&h), ["content-type", "x-keep"]);
    }

    /// A `Connection` header may name connection options and hop-by-hop
    /// headers only; one that names an end-to-end header is refused rather
    /// than obeyed after the decision.
    #[test]
    fn a_connection_header_naming_an_end_to_end_header_is_refused() {
        for named in [
            "Content-Type",
            "content-length",
            "QB-Token",
            "Authorization",
            "On-Behalf-Of",
            "Host",
            "Cookie",
            "X-Custom",
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONNECTION,
                HeaderValue::from_str(&format!("keep-alive, {named}")).unwrap(),
            );
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let e = inbound(&mut h).unwrap_err();
            assert_eq!(e, HeaderError::ConnectionNames(named.to_ascii_lowercase()));
            assert!(h.contains_key(header::CONTENT_TYPE), "nothing removed");
        }
        for fine in [
            "close",
            "Keep-Alive",
            "keep-alive, Upgrade",
            "TE, close",
            "",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(fine));
            assert_eq!(inbound(&mut h), Ok(()), "{fine:?}");
            assert!(!h.contains_key(header::CONNECTION));
        }
    }

    #[test]
    fn two_content_types_are_refused() {
        let mut h = map(&[
            ("content-type", "application/json"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(inbound(&mut h), Err(HeaderError::ContentTypes(2)));
    }

    #[test]
    fn outbound_drops_what_is_ours_and_the_clients_host_and_joins_cookies() {
        let mut h = map(&[
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
            ("host", "client.example"),
            ("expect", "100-continue"),
            ("qbproxy-identity", "bot"),
            ("x-keep", "yes"),
        ]);
        outbound_request(&mut h);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        assert!(!h.contains_key(header::HOST));
        assert_eq!(h.len(), 2, "{h:?}");

        let mut one = map(&[("cookie", "a=1; b=2")]);
        outbound_request(&mut one);
        assert_eq!(one[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_what_connection_names_and_tokens() {
        let mut h = map(&[
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("qb-token", "held"),
            ("x-keep", "yes"),
        ]);
        outbound_response(&mut h);
        assert_eq!(names(&h), ["x-keep"]);
    }
}
