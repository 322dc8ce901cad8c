//! TLS settings built from the config: the inbound server config (ALPN
//! h2 and http/1.1, optional client-certificate verification) and the
//! upstream client's roots. rustls with the `ring` provider throughout.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why an inbound TLS configuration cannot be built. One line each, for
/// the config error that names the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Protocols(rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("the key does not fit the certificate, or is of an unsupported kind: {0}")]
    Key(rustls::Error),
}

/// The inbound server config. `client_ca`: require client certificates that
/// chain to one of these (mTLS).
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[CertificateDer<'static>]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?;
    let builder = match client_ca {
        Some(cas) => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca.clone())
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(cert_chain, key)
        .map_err(TlsError::Key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a failed inbound handshake most likely means, for the person
/// reading the log: a client that does not trust qbproxy's certificate (it
/// sent an alert saying so, or hung up mid-handshake, as Node.js does), or
/// plain HTTP sent to a TLS listener.
pub fn handshake_hint(e: &std::io::Error) -> Option<&'static str> {
    use rustls::{AlertDescription as A, Error, InvalidMessage};
    const UNTRUSTED: &str = "the client probably does not trust qbproxy's certificate: give it \
        the CA that signed listen.tls_cert (Node.js and the official JS SDK, which then report \
        err=null and an empty answer: NODE_EXTRA_CA_CERTS=ca.pem; curl: --cacert ca.pem); \
        see the README, \"Using an official SDK\"";
    const PLAIN: &str = "plain HTTP arrived on a TLS listener: the client must use https://";
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return Some(UNTRUSTED);
    }
    match e.get_ref()?.downcast_ref::<Error>()? {
        Error::AlertReceived(
            A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::AccessDenied,
        ) => Some(UNTRUSTED),
        Error::InvalidMessage(InvalidMessage::InvalidContentType) => Some(PLAIN),
        _ => None,
    }
}

/// Roots for the upstream: the system's (for `https://` upstreams) plus
/// `extra` (`[upstream] ca_file`).
pub fn upstream_roots(
    system: bool,
    extra: &[CertificateDer<'static>],
) -> Result<RootCertStore, std::io::Error> {
    let mut roots = RootCertStore::empty();
    if system {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A malformed system certificate is skipped, as browsers do.
            let _ = roots.add(cert);
        }
    }
    for cert in extra {
        roots.add(cert.clone()).map_err(std::io::Error::other)?;
    }
    if system && roots.is_empty() {
        return Err(std::io::Error::other(
            "no root certificates: install the system's CA bundle (ca-certificates) or set upstream.ca_file",
        ));
    }
    Ok(roots)
}

pub fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, std::io::Error> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
