//! Certificates made at run time for the TLS tests and the real edge
//! servers (nginx, HAProxy): a private CA (rcgen, ECDSA P-256) that signs
//! leaf certificates for `localhost` and 127.0.0.1, written to a temporary
//! directory removed with the test.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A temporary directory for one test's files, removed with it.
pub struct Dir(pub tempfile::TempDir);

impl Dir {
    pub fn new(name: &str) -> Dir {
        Dir(tempfile::Builder::new()
            .prefix(&format!("qbproxy-{name}-"))
            .tempdir()
            .unwrap())
    }

    /// Writes `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A certificate for `localhost` and 127.0.0.1 with `key`: (cert PEM,
    /// key PEM).
    pub fn leaf(&self, key: KeyPair) -> (String, String) {
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf with a new ECDSA P-256 key.
    pub fn ecdsa_leaf(&self) -> (String, String) {
        self.leaf(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
    }

    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()
    }
}
