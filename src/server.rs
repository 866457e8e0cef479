//! Wiring: the listener, the Harmonizer, health and reflection services, and an orderly stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::HarmonizerService;
use crate::auth::{AuthInterceptor, Authenticator, TokensError};
use crate::config::ServeConfig;
use crate::jobs::{Registry, RegistryLimits};
use crate::limit::ConcurrencyLimitLayer;
use crate::proto::harmonizer_server::HarmonizerServer;

/// A client that opens a TCP connection and never finishes its TLS handshake is dropped after
/// this long, so idle sockets cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tokens(#[from] TokensError),
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(tonic::transport::Error),
}

/// A server that has bound its port but not started serving, so that a caller (a test binding
/// port 0) can learn the address first.
pub struct Server {
    config: ServeConfig,
    listener: TcpListener,
    registry: Registry,
    authenticator: Arc<Authenticator>,
    tls: Option<ServerTlsConfig>,
}

impl Server {
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        // Credentials are read before the port is bound: a server that cannot have them must
        // not come up open.
        let authenticator = Arc::new(match &config.tokens_file {
            Some(path) => Authenticator::from_file(path)?,
            None => Authenticator::open(),
        });
        let tls = tls_config(&config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let registry = Registry::new(RegistryLimits {
            offload_elements: config.offload_elements,
            kept_steps: config.kept_steps,
            max_pending_steps: config.max_pending_steps,
        });
        Ok(Self {
            config,
            listener,
            registry,
            authenticator,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// The server's tokens, for a reload without a signal.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        Arc::clone(&self.authenticator)
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish
    /// for at most `--shutdown-grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Self {
            config,
            listener,
            registry,
            authenticator,
            tls,
        } = self;
        let addr = listener.local_addr().unwrap_or(config.listen);

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<HarmonizerServer<HarmonizerService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let harmonizer = HarmonizerServer::new(
            HarmonizerService::new(registry, config.max_step_timeout)
                .with_max_response_bytes(config.max_send_message_bytes),
        )
        .max_decoding_message_size(config.max_recv_message_bytes)
        .max_encoding_message_size(config.max_send_message_bytes);
        // Health stays open for probes; the Harmonizer and reflection need a token when there
        // is a tokens file (reflection shows only the public contract, but an unknown caller
        // has no use for it).
        let interceptor = AuthInterceptor::new(Arc::clone(&authenticator));
        let harmonizer = InterceptedService::new(harmonizer, interceptor.clone());
        let reflection = InterceptedService::new(reflection, interceptor.clone());
        let reflection_alpha = InterceptedService::new(reflection_alpha, interceptor);
        match authenticator.path() {
            Some(path) => tracing::info!(
                path = %path.display(),
                "bearer tokens required (health checks excepted)"
            ),
            None => tracing::warn!(
                "no --tokens-file: the server is OPEN, anyone who reaches the port may use and \
                 delete every job"
            ),
        }
        if tls.is_none() {
            tracing::warn!("no --tls-cert: requests and tokens travel in plaintext");
        }
        let reloader = AbortOnDrop(tokio::spawn(reload_on_sighup(Arc::clone(&authenticator))));

        let (stopping_tx, mut stopping_rx) = watch::channel(false);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            health_reporter
                .set_not_serving::<HarmonizerServer<HarmonizerService>>()
                .await;
            let _ = stopping_tx.send(true);
        };
        let grace = config.shutdown_grace;
        let grace_expired = async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        };

        tracing::info!(%addr, tls = tls.is_some(), "ghmd serving gRPC");
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(config.max_streams_per_connection);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
        }
        let serve = builder
            .layer(ConcurrencyLimitLayer::new(
                config.max_concurrent_requests as usize,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(harmonizer)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
        tokio::select! {
            result = serve => result?,
            () = grace_expired => {
                tracing::warn!(?grace, "in-flight requests outlived the shutdown grace; exiting anyway");
            }
        }
        drop(reloader);
        tracing::info!("ghmd stopped");
        Ok(())
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::TlsFile {
        what,
        path: path.to_owned(),
        source,
    })
}

fn tls_config(config: &ServeConfig) -> Result<Option<ServerTlsConfig>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
    let mut tls = ServerTlsConfig::new()
        .identity(identity)
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?));
    }
    // Parse the files now, so that a bad certificate or key stops the start-up with its reason
    // instead of failing every handshake later.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(ServeError::Tls)?;
    Ok(Some(tls))
}

/// Aborts a background task when the server that owns it stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rereads the tokens file on every SIGHUP. A bad file keeps the tokens in force and says why.
async fn reload_on_sighup(authenticator: Arc<Authenticator>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; tokens reload needs a restart");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            match authenticator.reload() {
                Ok(Some(count)) => tracing::info!(tokens = count, "SIGHUP: tokens file reloaded"),
                Ok(None) => tracing::info!("SIGHUP: no --tokens-file to reload"),
                Err(error) => {
                    tracing::error!("SIGHUP: {error}; the tokens loaded before stay in force")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = authenticator;
    }
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    Server::bind(config).await?.run(shutdown).await
}

/// Completes on SIGINT or SIGTERM, the signals a terminal and Kubernetes send.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; SIGINT still stops ghmd");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
