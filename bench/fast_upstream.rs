//! A fast stand-in for QuickBlox, for `bench/run.sh`: it answers like the
//! real API where a proxy can tell (a small JSON body with
//! `QB-Token-ExpirationDate`, 401 without a `QB-Token`, `POST /session.json`)
//! and does nothing else, so the proxy in front is what gets measured.
//!
//!   cargo run --release --example fast-upstream -- 127.0.0.1:19000 [CA_PEM_OUT]
//!
//! With a second argument it serves HTTPS with a certificate for 127.0.0.1
//! and localhost, signed by a CA it writes to that path.
//!
//! With `SESSIONS_URL` set (e.g. `http://127.0.0.1:19081`, a `qbproxy sim`),
//! `POST /session.json` is passed on there, so sessions are created, and
//! their signatures checked, by the simulator; without it, any credentials
//! get a fixed session.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const SMALL: &str = r#"{"current_page":1,"per_page":10,"total_entries":1,"items":[{"user":{"id":1001,"login":"demo","full_name":"Demo User","created_at":"2026-01-01T00:00:00Z"}}]}"#;
const SESSION: &str = r#"{"session":{"application_id":76730,"id":1,"nonce":1,"token":"0123456789abcdef0123456789abcdef01234567","ts":1,"user_id":1001,"_id":"1"}}"#;

fn json(status: StatusCode, body: Bytes, expires: &HeaderValue) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("qb-token-expirationdate", expires.clone());
    resp
}

/// Where `POST /session.json` goes, if not answered here.
struct Sessions {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

impl Sessions {
    /// Passes a session creation on, body and headers as received.
    async fn create(&self, parts: http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method;
        *req.headers_mut() = parts.headers;
        req.headers_mut().remove(header::HOST);
        let uri = format!("{}/session.json", self.url);
        *req.uri_mut() = match uri.parse() {
            Ok(uri) => uri,
            Err(_) => return status(StatusCode::BAD_GATEWAY),
        };
        let Ok(resp) = self.client.request(req).await else {
            return status(StatusCode::BAD_GATEWAY);
        };
        let (parts, body) = resp.into_parts();
        match body.collect().await {
            Ok(body) => Response::from_parts(parts, Full::new(body.to_bytes())),
            Err(_) => status(StatusCode::BAD_GATEWAY),
        }
    }
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    req: Request<Incoming>,
    big: Bytes,
    expires: HeaderValue,
    sessions: Option<Arc<Sessions>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Read any body whole, as QuickBlox would.
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if parts.method == Method::POST && parts.uri.path() == "/session.json" {
        if let Some(sessions) = sessions {
            return sessions.create(parts, body).await;
        }
        return json(
            StatusCode::CREATED,
            Bytes::from_static(SESSION.as_bytes()),
            &expires,
        );
    }
    if !parts.headers.contains_key("qb-token") {
        let body = Bytes::from_static(br#"{"errors":["Token is required"]}"#);
        return json(StatusCode::UNAUTHORIZED, body, &expires);
    }
    if parts.uri.path().starts_with("/big") {
        return json(StatusCode::OK, big, &expires);
    }
    json(
        StatusCode::OK,
        Bytes::from_static(SMALL.as_bytes()),
        &expires,
    )
}

fn tls(ca_out: &str) -> Arc<rustls::ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).expect("CA cert").pem();
    std::fs::write(ca_out, ca_pem).expect("write the CA");
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params");
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .expect("cert");
    let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der_key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:19000", String::as_str);
    let acceptor = args
        .get(2)
        .map(|ca| tokio_rustls::TlsAcceptor::from(tls(ca)));
    let listener = TcpListener::bind(addr).await.expect("bind");
    let big = Bytes::from(vec![b'x'; 256 * 1024]);
    let sessions = std::env::var("SESSIONS_URL").ok().map(|url| {
        Arc::new(Sessions {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url,
        })
    });
    let expires = HeaderValue::from_static("2099-01-01 00:00:00 UTC");
    eprintln!(
        "fast-upstream on {addr}{}{}",
        if acceptor.is_some() { " (TLS)" } else { "" },
        sessions
            .as_ref()
            .map_or(String::new(), |s| format!(", sessions from {}", s.url))
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (big, expires, acceptor) = (big.clone(), expires.clone(), acceptor.clone());
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (big, expires, sessions) = (big.clone(), expires.clone(), sessions.clone());
                async move { Ok::<_, Infallible>(handle(req, big, expires, sessions).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = match acceptor {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(a) => match a.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                    Err(_) => return,
                },
            };
        });
    }
}
