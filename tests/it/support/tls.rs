//! Certificates made at test time (rcgen): nothing secret is checked in, nothing expires.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::TempDir;

/// A certificate authority made for one test.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key, in PEM.
    pub fn leaf(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, "leaf");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A client configuration that trusts this CA for `localhost`, with a client certificate
    /// (PEM cert and key) when given one.
    pub fn client_config(&self, identity: Option<(&str, &str)>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}

/// Server side of a TLS test: a CA, a server certificate for localhost, files on disk.
pub struct ServerTls {
    pub dir: TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerTls {
    pub fn new() -> Self {
        let dir = TempDir::new("tls");
        let ca = Ca::new("ghmd test server CA");
        let (cert, key) = ca.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let ca_file = dir.write("ca.pem", &ca.pem);
        let cert = dir.write("server.pem", &cert);
        let key = dir.write("server.key", &key);
        Self {
            dir,
            ca,
            ca_file,
            cert,
            key,
        }
    }

    /// The server flags that serve these files.
    pub fn configure(&self, config: &mut ghmd::config::ServeConfig) {
        config.tls_cert = Some(self.cert.clone());
        config.tls_key = Some(self.key.clone());
    }
}
