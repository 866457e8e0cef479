//! TLS material from PEM files, for both ends: the server's `--tls-cert`/`--tls-key`/
//! `--tls-client-ca`, and a client's CA and optional identity (the `ghmd health` command).
//! One reader of the files, so that a missing one is reported the same way on both sides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// The flag that named the file, so that the message says which one to fix.
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Config(tonic::transport::Error),
}

/// Reads a PEM file named by the flag `what`.
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The server's TLS from its certificate chain and key, and, for mutual TLS, the CA its
/// clients' certificates must be signed by.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    handshake_timeout: Duration,
) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
    let mut tls = ServerTlsConfig::new()
        .identity(identity)
        .timeout(handshake_timeout);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?));
    }
    // Parse the files now, so that a bad certificate or key stops the start-up with its reason
    // instead of failing every handshake later.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(TlsError::Config)?;
    Ok(tls)
}

/// A client's TLS: the CA that signed the server's certificate, the name that certificate
/// holds when it is not the host dialled, and this client's certificate and key for mutual TLS.
pub fn client_config(
    ca: &Path,
    domain: Option<&str>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
    if let Some(domain) = domain {
        tls = tls.domain_name(domain.to_owned());
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read_pem("--tls-cert", cert)?,
            read_pem("--tls-key", key)?,
        ));
    }
    Ok(tls)
}
