//! `ghmd health`: one call to a server's `grpc.health.v1.Health/Check`, so that a container's
//! HEALTHCHECK or an exec probe needs nothing but the ghmd binary.

use std::time::Duration;

use tonic::transport::Endpoint;
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
}

/// `host:port` is taken as `http://host:port`, so that probes can pass the listen address.
fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// The status the server reports for `config.service`.
pub async fn check(config: &HealthConfig) -> Result<ServingStatus, HealthError> {
    let addr = uri(&config.addr);
    let call = async {
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|source| HealthError::Address {
                addr: config.addr.clone(),
                source,
            })?
            .connect_timeout(config.timeout)
            .timeout(config.timeout);
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
