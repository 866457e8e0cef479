//! `ghmd health`: one call to a server's `grpc.health.v1.Health/Check`, so that a container's
//! HEALTHCHECK or an exec probe needs nothing but the ghmd binary.

use std::time::Duration;

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::HealthConfig;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("--addr {addr:?} is not a valid URI: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{addr} answered the health check with {code:?}: {message}")]
    Status {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(tonic::transport::Error),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, HealthError> {
    std::fs::read(path).map_err(|source| HealthError::TlsFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The client side of --tls-ca (and --tls-cert/--tls-key for mutual TLS), if asked for.
fn tls_config(config: &HealthConfig) -> Result<Option<ClientTlsConfig>, HealthError> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca)?));
    if let Some(domain) = &config.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read_pem("--tls-cert", cert)?,
            read_pem("--tls-key", key)?,
        ));
    }
    Ok(Some(tls))
}

/// `host:port` is taken as `http://host:port` (`https://` with TLS), so that probes can pass
/// the listen address.
fn uri(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// The status the server reports for `config.service`.
pub async fn check(config: &HealthConfig) -> Result<ServingStatus, HealthError> {
    let tls = tls_config(config)?;
    let addr = uri(&config.addr, tls.is_some());
    let call = async {
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|source| HealthError::Address {
                addr: config.addr.clone(),
                source,
            })?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(HealthError::Tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| HealthError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: config.service.clone(),
            })
            .await
            .map_err(|status| HealthError::Status {
                addr: addr.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            })?;
        Ok(match response.into_inner().status() {
            WireStatus::Serving => ServingStatus::Serving,
            WireStatus::NotServing => ServingStatus::NotServing,
            WireStatus::Unknown | WireStatus::ServiceUnknown => ServingStatus::Unknown,
        })
    };
    tokio::time::timeout(config.timeout, call)
        .await
        .map_err(|_| HealthError::Timeout {
            addr: addr.clone(),
            timeout: config.timeout,
        })?
}
