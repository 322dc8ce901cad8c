//! Inbound TLS and mTLS, and the upstream's extra roots. Certificates are
//! made here at run time (rcgen; RSA keys with the openssl command).

use crate::common;
use std::time::Duration;

use std::path::Path;
use std::sync::Arc;

use crate::common::certs::{Ca, Dir};
use crate::common::{bounded, setup};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
    KeyPair::generate_for(alg).unwrap()
}

/// An RSA key from the openssl command (ring cannot generate RSA keys).
fn rsa_key(dir: &Dir) -> KeyPair {
    let path = dir.0.path().join("rsa.key");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command (.ci/run installs it)")
        .success();
    assert!(ok);
    KeyPair::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An HTTPS client trusting `ca`, presenting `identity` (cert, key PEM) if given.
fn https_client(
    ca: &Ca,
    identity: Option<&(String, String)>,
) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_all_versions()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

async fn https_get(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: String,
) -> Result<(u16, http::Version, String), String> {
    let resp = bounded("an HTTPS response", client.get(url.parse().unwrap()))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (resp.status().as_u16(), resp.version());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
}

fn tls_setup(dir: &Dir, cert: &(String, String), client_ca: Option<&Ca>) -> common::Setup {
    let mut s = setup()
        .set("listen", "tls_cert", dir.write("server.crt", &cert.0))
        .set("listen", "tls_key", dir.write("server.key", &cert.1));
    if let Some(ca) = client_ca {
        s = s.set("listen", "client_ca", dir.write("client-ca.crt", &ca.pem));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_rsa_ecdsa_and_ed25519_keys_and_alpn() {
    let dir = Dir::new("kinds");
    let ca = Ca::new("test CA");
    let kinds = [
        ("ecdsa", key(&rcgen::PKCS_ECDSA_P256_SHA256)),
        ("ed25519", key(&rcgen::PKCS_ED25519)),
        ("rsa", rsa_key(&dir)),
    ];
    for (kind, key) in kinds {
        let cert = ca.leaf(key);
        let h = tls_setup(&dir, &cert, None).start().await;
        h.ready().await;
        let client = https_client(&ca, None);
        let (status, version, body) = https_get(
            &client,
            format!("https://localhost:{}/users.json", h.proxy.port()),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(status, 200, "{kind}: {body}");
        // ALPN offered h2 and http/1.1; the client asked for both: h2.
        assert_eq!(version, http::Version::HTTP_2, "{kind}");
        // Plain HTTP on the TLS port gets nowhere.
        let plain = common::client()
            .get(
                format!("http://127.0.0.1:{}/users.json", h.proxy.port())
                    .parse()
                    .unwrap(),
            )
            .await;
        assert!(plain.is_err(), "{kind}: plain HTTP was answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_certificates_from_the_client_ca() {
    let dir = Dir::new("mtls");
    let ca = Ca::new("server and client CA");
    let other = Ca::new("some other CA");
    let server = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let h = tls_setup(&dir, &server, Some(&ca)).start().await;
    h.ready().await;
    let url = format!("https://localhost:{}/users.json", h.proxy.port());

    let good = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let (status, _, _) = https_get(&https_client(&ca, Some(&good)), url.clone())
        .await
        .unwrap();
    assert_eq!(status, 200);

    let none = https_get(&https_client(&ca, None), url.clone()).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let wrong = other.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let refused = https_get(&https_client(&ca, Some(&wrong)), url.clone()).await;
    assert!(
        refused.is_err(),
        "certificate from the wrong CA: {refused:?}"
    );
    // The refused handshakes cost nobody else anything.
    let (status, _, _) = https_get(&https_client(&ca, Some(&good)), url)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        h.sim.requests().len(),
        2,
        "only the good client got through"
    );
}

#[test]
fn check_refuses_a_key_that_does_not_fit_the_certificate() {
    let dir = Dir::new("mismatch");
    let ca = Ca::new("test CA");
    let (cert, _) = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let (_, other_key) = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let text = format!(
        "[listen]\ntls_cert = {:?}\ntls_key = {:?}\n[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret = \"s\"\n",
        dir.write("c.crt", &cert),
        dir.write("k.key", &other_key)
    );
    let e = qbproxy::Config::from_toml(&text, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listen.tls_key") && e.contains("does not fit"),
        "{e}"
    );
    let text = text.replace("k.key", "missing.key");
    let e = qbproxy::Config::from_toml(&text, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen.tls_key"), "{e}");
}

/// An HTTPS upstream signed by a private CA: trusted with `ca_file`, refused
/// without. The upstream is a second qbproxy serving TLS in front of the
/// simulator and passing tokens through (`client_token = "keep"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ca_file_trusts_a_private_upstream() {
    let dir = Dir::new("upstream");
    let ca = Ca::new("private upstream CA");
    let cert = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let edge = tls_setup(&dir, &cert, None)
        .set("proxy", "client_token", "keep")
        .start()
        .await;
    edge.ready().await;
    let upstream = format!("https://localhost:{}", edge.proxy.port());

    let trusting = setup()
        .sim(edge.sim.clone())
        .upstream_url(&upstream)
        .set("upstream", "ca_file", dir.write("ca.crt", &ca.pem))
        .start()
        .await;
    trusting.ready().await;
    let a = trusting.get("/users.json").await;
    assert_eq!(a.status, http::StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["echo"]["user_id"], 1001);

    let untrusting = setup()
        .sim(edge.sim.clone())
        .upstream_url(&upstream)
        .start()
        .await;
    let a = untrusting.get("/users.json").await;
    // The TLS handshake to the upstream fails: a gateway error that says why.
    assert_eq!(a.status, http::StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(
        a.error_message()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        a.text()
    );
}

/// A reload swaps the certificate for new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_certificate() {
    let dir = Dir::new("rotate");
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let old = old_ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let h = tls_setup(&dir, &old, None).start().await;
    h.ready().await;
    let url = format!("https://localhost:{}/users.json", h.proxy.port());
    assert!(https_get(&https_client(&new_ca, None), url.clone())
        .await
        .is_err());

    let new_dir = Dir::new("rotate-new");
    let new = new_ca.leaf(key(&rcgen::PKCS_ED25519));
    let text = tls_setup(&new_dir, &new, None).config_text(&h.sim);
    h.handle
        .reload(qbproxy::Config::from_toml(&text, Path::new("t.toml")).unwrap())
        .await
        .unwrap();
    let (status, _, _) = https_get(&https_client(&new_ca, None), url.clone())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(https_get(&https_client(&old_ca, None), url).await.is_err());
}

/// An HTTPS client pointed at a plain listener (the official JS SDK speaks
/// HTTPS only) fails; the log says why, and plain clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_on_a_plain_listener_is_named_in_the_log() {
    let logs = common::capture_logs();
    let h = setup().start().await;
    h.ready().await;
    let client = https_client(&Ca::new("unused"), None);
    let tried = https_get(&client, format!("https://{}/users.json", h.proxy)).await;
    assert!(tried.is_err(), "{tried:?}");
    assert!(
        logs.has_line(&[
            "a TLS handshake (ClientHello) arrived on a plain HTTP listener",
            "listener=\"proxy\"",
        ]),
        "{}",
        logs.text()
    );
    assert_eq!(h.get("/users.json").await.status, http::StatusCode::OK);
}

/// Over TLS as over plain TCP, an idle HTTP/1 connection is kept past the
/// header timeout (until `keepalive_timeout`), and a head trickled on it is
/// cut off `header_read_timeout` after its first byte: the bytes are
/// watched above the TLS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_idle_connections_are_kept_and_trickled_heads_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = Dir::new("keepalive");
    let ca = Ca::new("test CA");
    let cert = ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256));
    let h = tls_setup(&dir, &cert, None)
        .set("limits", "header_read_timeout", Duration::from_millis(150))
        .set("limits", "keepalive_timeout", Duration::from_secs(3600))
        .start()
        .await;
    h.ready().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or("").to_owned();
    let first = common::keep_alive_get(&mut conn, "/users.json?first").await;
    assert_eq!(status(&first), "200");
    // Idle for four header timeouts (the idleness is what is tested).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let second = common::keep_alive_get(&mut conn, "/users.json?second").await;
    assert_eq!(status(&second), "200");
    // Then a head that never ends, a header every 50 ms.
    conn.write_all(b"GET /users.json?trickled HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed = bounded("the trickled head to be cut off", async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                read = conn.read(&mut buf) => break read,
                () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                    if conn.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break Ok(0);
                    }
                }
            }
        }
    })
    .await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(
        h.sim.requests_to("/users"),
        2,
        "only the two whole requests"
    );
}

/// A client that does not trust qbproxy's certificate (the official JS SDK
/// then reports `err=null` and nothing else), or hangs up mid-handshake as
/// Node.js does, and plain HTTP sent to the TLS port: each gets a log line
/// that says what to do. Clients that trust the CA go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_is_logged_with_what_to_do() {
    use tokio::io::AsyncWriteExt;
    let logs = common::capture_logs();
    let dir = Dir::new("hints");
    let ca = Ca::new("test CA");
    let h = tls_setup(&dir, &ca.leaf(key(&rcgen::PKCS_ECDSA_P256_SHA256)), None)
        .start()
        .await;
    h.ready().await;
    let url = format!("https://localhost:{}/users.json", h.proxy.port());

    // Trusting another CA: rustls refuses the certificate with an alert.
    let stranger = https_client(&Ca::new("another CA"), None);
    assert!(https_get(&stranger, url.clone()).await.is_err());
    const UNTRUSTED: &str = "the client probably does not trust qbproxy's certificate";
    let wait = |fragments: &'static [&'static str]| {
        let logs = &logs;
        bounded("the hint", async move {
            while !logs.has_line(fragments) {
                tokio::task::yield_now().await;
            }
        })
    };
    wait(&["TLS handshake refused", UNTRUSTED, "NODE_EXTRA_CA_CERTS"]).await;
    // A client that hangs up mid-handshake.
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01])
        .await
        .unwrap();
    drop(s);
    wait(&["tls handshake eof", UNTRUSTED]).await;
    // Plain HTTP on the TLS port.
    let plain = common::raw(h.proxy, b"GET /users.json HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    wait(&["plain HTTP arrived on a TLS listener", "https://"]).await;

    let (status, _, _) = https_get(&https_client(&ca, None), url).await.unwrap();
    assert_eq!(status, 200);
}
