//! Wiring: the listener, the Harmonizer, health and reflection services, and an orderly stop.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::HarmonizerService;
use crate::config::ServeConfig;
use crate::jobs::{Registry, RegistryLimits};
use crate::proto::harmonizer_server::HarmonizerServer;

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
}

/// A server that has bound its port but not started serving, so that a caller (a test binding
/// port 0) can learn the address first.
pub struct Server {
    config: ServeConfig,
    listener: TcpListener,
    registry: Registry,
}

impl Server {
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
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
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish
    /// for at most `--shutdown-grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Self {
            config,
            listener,
            registry,
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
        let harmonizer =
            HarmonizerServer::new(HarmonizerService::new(registry, config.max_step_timeout))
                .max_decoding_message_size(config.max_recv_message_bytes)
                .max_encoding_message_size(config.max_send_message_bytes);

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

        tracing::info!(%addr, "ghmd serving gRPC");
        let serve = tonic::transport::Server::builder()
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
        tracing::info!("ghmd stopped");
        Ok(())
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
