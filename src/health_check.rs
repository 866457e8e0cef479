//! The `ghmd health` command (a module of the binary, not of the library): one call to a
//! server's `grpc.health.v1.Health/Check`, so that a container's HEALTHCHECK or an exec probe
//! needs nothing but the ghmd binary. Not to be confused with the gRPC health service the server
//! runs (wired in `ghmd::server`) or the `/healthz` `/readyz` HTTP probes (`ghmd::probes`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ghmd::tls::TlsError;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser, Debug, Clone)]
pub struct HealthCheckArgs {
    /// The server to ask: a URI or host:port.
    #[arg(
        long,
        env = "GHMD_HEALTH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,

    /// The service whose status to ask for; the empty string asks about the server as a whole.
    #[arg(long, default_value = "ghm.v1.Harmonizer")]
    pub service: String,

    /// How long to wait for the answer, connecting included.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub timeout: Duration,

    /// For a server started with --tls-cert: the PEM CA that signed its certificate. The check
    /// then speaks TLS.
    #[arg(long, env = "GHMD_HEALTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The name the server's certificate holds, when it is not the host of --addr.
    #[arg(long, env = "GHMD_HEALTH_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,

    /// For a server started with --tls-client-ca: this client's PEM certificate...
    #[arg(long, env = "GHMD_HEALTH_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,

    /// ...and its PEM private key.
    #[arg(long, env = "GHMD_HEALTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

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
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// The client side of --tls-ca (and --tls-cert/--tls-key for mutual TLS), if asked for.
fn tls_config(config: &HealthCheckArgs) -> Result<Option<ClientTlsConfig>, TlsError> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    let identity = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
    ghmd::tls::client_config(ca, config.tls_domain.as_deref(), identity).map(Some)
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
async fn check(config: &HealthCheckArgs) -> Result<ServingStatus, HealthError> {
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
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| HealthError::Tls(TlsError::Config(error)))?;
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

/// Runs `ghmd health`: exit 0 if the service serves, 1 if not or if the server cannot be asked.
pub async fn main(config: HealthCheckArgs) -> ExitCode {
    match check(&config).await {
        Ok(ServingStatus::Serving) => {
            println!("{} {:?}: SERVING", config.addr, config.service);
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{} {:?}: {status}", config.addr, config.service);
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("ghmd health: {error}");
            ExitCode::FAILURE
        }
    }
}
