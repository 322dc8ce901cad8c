//! Files through qbproxy. Creating a file (`POST /blobs.json`) answers
//! with the URL its bytes go to (`blob_object_access.params`); the SDKs
//! post the file there with their own `QB-Token` unless the URL is on S3.
//! An upload URL on the upstream's own host (QuickBlox's current answers,
//! `/blobs/{id}/upload/`) is rewritten to where clients reach qbproxy, so
//! the upload comes through qbproxy and goes out with the identity's token;
//! an S3 URL is left alone (the client then needs to reach S3).
//!
//! The upload itself (`POST /blobs/{id}/upload`) streams, never held for a
//! replay, under `limits.max_upload_bytes` and `limits.upload_timeout`
//! rather than the limits of other requests.

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{header, Method, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{timeout_at, Instant};

use crate::config::{ListenConfig, UpstreamConfig};
use crate::gateway::canonical;
use crate::net::body::{Body, Slot};
use crate::proxy::error::ProxyError;

/// The calls about files that qbproxy treats apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCall {
    /// `POST /blobs` (`.json`, `.xml`): its answer names the upload URL.
    Create,
    /// `POST /blobs/{id}/upload`: a file's bytes, to the API's own host.
    Upload,
}

impl FileCall {
    /// What `method` on the canonical `path` (an identity prefix removed)
    /// is, if it is one of these.
    pub fn of(method: &Method, path: &str) -> Option<FileCall> {
        // Every POST asks: most are answered without decoding the path. A
        // canonical path has its unreserved letters decoded already, so
        // only a first segment that reads "blobs" in some case can be one.
        let first = path.trim_start_matches('/').as_bytes();
        if method != Method::POST
            || !first
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"blobs"))
        {
            return None;
        }
        let key = canonical::route_key(path);
        let mut segments = key.trim_start_matches('/').split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("blobs"), None, _, _) => Some(FileCall::Create),
            (Some("blobs"), Some(id), Some("upload"), None) if !id.is_empty() => {
                Some(FileCall::Upload)
            }
            _ => None,
        }
    }
}

/// The answers read to rewrite their upload URL are this long at most; a
/// longer one passes untouched (a file's answer is under 1 KiB).
const MAX_ANSWER: usize = 64 * 1024;

/// Where this request's client reaches qbproxy: `listen.public_url`, else
/// the listener's scheme and the host the request named, with `prefix`
/// (the identity prefix the request's path began with).
pub fn public_base(listen: &ListenConfig, parts: &Parts, prefix: &str) -> Option<String> {
    let base = match &listen.public_url {
        Some(url) => url.clone(),
        None => {
            let host = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    let h = parts.headers.get(header::HOST)?.to_str().ok()?;
                    Some(h.to_owned())
                })
                .filter(|h| h.parse::<http::uri::Authority>().is_ok())?;
            let scheme = if listen.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{host}")
        }
    };
    Some(format!("{base}{}", prefix.trim_end_matches('/')))
}

/// The answer to a file's creation, its upload URL rewritten to `public`
/// when it names the upstream's own host. Read whole (by `deadline`) if
/// it is short enough; a longer one, or one naming another host, passes
/// on as it came. An answer that breaks off or comes too late is an
/// error, as any other would be.
pub async fn rewrite_answer(
    resp: Response<Body>,
    public: &str,
    upstream: &UpstreamConfig,
    deadline: Instant,
) -> Result<Response<Body>, ProxyError> {
    if !resp.status().is_success() {
        return Ok(resp);
    }
    let format = match resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if t.contains("json") => Format::Json,
        Some(t) if t.contains("xml") => Format::Xml,
        _ => return Ok(resp),
    };
    let (mut parts, body) = resp.into_parts();
    // An upstream's answer streams; anything else is not one to rewrite.
    let Body::Stream { body, slot } = body else {
        return Ok(Response::from_parts(parts, body));
    };
    let whole = match timeout_at(deadline, read_up_to(body, slot, MAX_ANSWER)).await {
        Ok(Read::Whole(whole)) => whole,
        // Too long to be a file's answer: on as it came.
        Ok(Read::Longer(rest)) => return Ok(Response::from_parts(parts, rest)),
        Ok(Read::Failed(e)) => return Err(ProxyError::Upstream(e)),
        Err(_) => return Err(ProxyError::UpstreamTimeout(upstream.timeout)),
    };
    let origin = Origin::of(upstream);
    let rewritten = match format {
        Format::Json => rewrite_json(&whole, &origin, public),
        Format::Xml => rewrite_xml(&whole, &origin, public),
    };
    Ok(match rewritten {
        Some(body) => {
            tracing::debug!(public, "the new file's upload URL now names qbproxy");
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::ETAG);
            Response::from_parts(parts, Body::full(body))
        }
        None => Response::from_parts(parts, Body::full(whole)),
    })
}

enum Format {
    Json,
    Xml,
}

enum Read {
    Whole(Bytes),
    /// Longer than the limit: what was read, then the rest.
    Longer(Body),
    Failed(hyper::Error),
}

/// Reads an upstream answer up to `limit` bytes, its slot given back when
/// it ends.
async fn read_up_to(mut body: Incoming, mut slot: Slot, limit: usize) -> Read {
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                    if read.len() > limit {
                        return Read::Longer(Body::Chain {
                            head: Some(read.freeze()),
                            tail: body,
                            slot,
                        });
                    }
                }
            }
            Some(Err(e)) => return Read::Failed(e),
            None => {
                if let Some(lease) = slot.take() {
                    lease.complete();
                }
                return Read::Whole(read.freeze());
            }
        }
    }
}

/// The upstream's host and port, as an upload URL on it names them.
struct Origin {
    host: String,
    port: u16,
}

impl Origin {
    fn of(upstream: &UpstreamConfig) -> Origin {
        Origin {
            host: upstream.authority.host().to_ascii_lowercase(),
            port: port_of(upstream.scheme.as_str(), upstream.authority.port_u16()),
        }
    }

    /// `url` with its scheme and host replaced by `public`, if it is on
    /// this origin.
    fn rewrite(&self, url: &str, public: &str) -> Option<String> {
        let uri: Uri = url.parse().ok()?;
        let authority = uri.authority()?;
        let port = port_of(uri.scheme_str()?, authority.port_u16());
        if !authority.host().eq_ignore_ascii_case(&self.host) || port != self.port {
            return None;
        }
        let rest = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(format!("{public}{rest}"))
    }
}

fn port_of(scheme: &str, port: Option<u16>) -> u16 {
    port.unwrap_or(if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    })
}

/// `{"blob": {"blob_object_access": {"params": URL}}}`.
fn rewrite_json(body: &[u8], origin: &Origin, public: &str) -> Option<Bytes> {
    let mut answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let params = answer
        .get_mut("blob")?
        .get_mut("blob_object_access")?
        .get_mut("params")?;
    let url = origin.rewrite(params.as_str()?, public)?;
    *params = serde_json::Value::String(url);
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// `<blob>…<blob-object-access>…<params>URL</params>…`, the URL
/// XML-escaped.
fn rewrite_xml(body: &[u8], origin: &Origin, public: &str) -> Option<Bytes> {
    let text = std::str::from_utf8(body).ok()?;
    let access = text.find("<blob-object-access")?;
    let open = access + text[access..].find("<params>")? + "<params>".len();
    let close = open + text[open..].find("</params>")?;
    let url = unescape_xml(&text[open..close]);
    let rewritten = origin.rewrite(&url, public)?;
    let mut out = String::with_capacity(text.len() + public.len());
    out.push_str(&text[..open]);
    out.push_str(&escape_xml(&rewritten));
    out.push_str(&text[close..]);
    Some(Bytes::from(out))
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn escape_xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            host: "api.quickblox.com".into(),
            port: 443,
        }
    }

    const UPLOAD: &str = "https://api.quickblox.com/blobs/7/upload/?acl=authenticated-read&key=abc&policy=p%2Bq&x-amz-signature=00";

    #[test]
    fn the_calls_about_files() {
        let post = Method::POST;
        for create in [
            "/blobs.json",
            "/blobs",
            "/blobs.xml",
            "/Blobs/",
            "//blobs.json",
            "/%62LOBS.json",
        ] {
            let path = canonical::path(create).unwrap();
            assert_eq!(
                FileCall::of(&post, &path),
                Some(FileCall::Create),
                "{create}"
            );
        }
        for upload in [
            "/blobs/7/upload/",
            "/blobs/7/upload",
            "/blobs/7/upload.json",
        ] {
            let path = canonical::path(upload).unwrap();
            assert_eq!(
                FileCall::of(&post, &path),
                Some(FileCall::Upload),
                "{upload}"
            );
        }
        for other in [
            "/blobs/7.json",
            "/blobs/7/complete.json",
            "/blobs/7/upload/x",
            "/users.json",
        ] {
            let path = canonical::path(other).unwrap();
            assert_eq!(FileCall::of(&post, &path), None, "{other}");
        }
        assert_eq!(FileCall::of(&Method::GET, "/blobs.json"), None);
        assert_eq!(FileCall::of(&Method::PUT, "/blobs/7/upload/"), None);
    }

    #[test]
    fn an_upload_url_on_the_upstreams_host_is_rewritten_and_no_other() {
        let o = origin();
        let public = "https://qbproxy.internal:8443";
        assert_eq!(
            o.rewrite(UPLOAD, public).as_deref(),
            Some("https://qbproxy.internal:8443/blobs/7/upload/?acl=authenticated-read&key=abc&policy=p%2Bq&x-amz-signature=00")
        );
        assert!(o
            .rewrite("https://API.QuickBlox.com:443/blobs/7/upload/", public)
            .is_some());
        for elsewhere in [
            "https://qbprod.s3.amazonaws.com/?key=abc",
            "https://api.quickblox.com.evil.example/blobs/7/upload/",
            "https://api.quickblox.com:8443/blobs/7/upload/",
            "http://api.quickblox.com/blobs/7/upload/",
            "not a url",
        ] {
            assert_eq!(o.rewrite(elsewhere, public), None, "{elsewhere}");
        }
    }

    #[test]
    fn a_json_answer_keeps_everything_but_the_url() {
        let body = serde_json::json!({"blob": {"id": 7, "uid": "abc", "name": "a&b.txt",
            "blob_object_access": {"id": 7, "blob_id": 7, "params": UPLOAD}}});
        let out = rewrite_json(
            body.to_string().as_bytes(),
            &origin(),
            "http://127.0.0.1:8080/bot",
        )
        .unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let mut want = body.clone();
        want["blob"]["blob_object_access"]["params"] = serde_json::Value::String(
            UPLOAD.replace("https://api.quickblox.com", "http://127.0.0.1:8080/bot"),
        );
        assert_eq!(out, want);
        let s3 = body.to_string().replace(
            "https://api.quickblox.com/blobs/7/upload/",
            "https://qbprod.s3.amazonaws.com/",
        );
        assert_eq!(rewrite_json(s3.as_bytes(), &origin(), "http://x"), None);
    }

    #[test]
    fn an_xml_answer_keeps_everything_but_the_url() {
        let escaped = UPLOAD.replace('&', "&amp;");
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<blob>\n  <id type=\"integer\">7</id>\n  <name>a &amp; b</name>\n  \
             <blob-object-access>\n    <id type=\"integer\">7</id>\n    <params>{escaped}</params>\n  </blob-object-access>\n</blob>\n"
        );
        let out = rewrite_xml(body.as_bytes(), &origin(), "http://127.0.0.1:8080").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            body.replace("https://api.quickblox.com", "http://127.0.0.1:8080")
        );
    }
}
