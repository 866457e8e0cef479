//! Wiring: the listeners, the Harmonizer, health and reflection services, metrics, the state
//! loaded at start and snapshotted while running, and an orderly stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

use crate::api::{HarmonizerService, Routing};
use crate::auth::{AuthInterceptor, Authenticator, TokensError};
use crate::config::ServeConfig;
use crate::jobs::Registry;
use crate::limit::ConcurrencyLimitLayer;
use crate::linger::Lingerers;
use crate::metrics::{Exposition, GrpcMetricsLayer, JobDensity, Metrics};
use crate::persist::{PersistError, Snapshotter};
use crate::probes::Readiness;
use crate::proto::harmonizer_server::HarmonizerServer;
use crate::share::CallerShareLayer;
use crate::shutdown::Stopper;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] PersistError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tokens(#[from] TokensError),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// A server that has bound its port but not started serving, so that a caller (a test binding
/// port 0) can learn the address first.
pub struct Server {
    config: ServeConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    registry: Registry,
    authenticator: Arc<Authenticator>,
    tls: Option<ServerTlsConfig>,
    metrics: Metrics,
    exposition: Exposition,
    /// `None` with `--in-memory`.
    snapshotter: Option<Snapshotter>,
}

impl Server {
    /// Loads the state from the data dir (refusing a corrupt one) and binds both listeners.
    /// Nothing is served yet, so nothing can report ready before the state is in.
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        // Credentials are read before the port is bound: a server that cannot have them must
        // not come up open.
        let authenticator = Arc::new(match &config.tokens_file {
            Some(path) => Authenticator::from_file(path)?,
            None => Authenticator::open(),
        });
        let tls = tls_config(&config)?;
        let metrics = Metrics::new();
        let registry = Registry::with_observer(config.registry_limits(), Arc::new(metrics.clone()));
        let snapshotter = if config.in_memory {
            tracing::info!("--in-memory: no data dir; every job is lost when ghmd stops");
            None
        } else {
            Some(
                Snapshotter::load(
                    &config.data_dir,
                    config.discard_corrupt_state,
                    config.max_jobs,
                    &registry,
                    &metrics,
                )
                .await?,
            )
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener =
            TcpListener::bind(config.metrics_listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.metrics_listen,
                    source,
                })?;
        let density = config
            .job_metrics
            .then(|| JobDensity::new(registry.clone(), config.job_metrics_max_series));
        let exposition = metrics.exposition(density);
        Ok(Self {
            config,
            listener,
            metrics_listener,
            registry,
            authenticator,
            tls,
            metrics,
            exposition,
            snapshotter,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or(self.config.metrics_listen)
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
            metrics_listener,
            registry,
            authenticator,
            tls,
            metrics,
            exposition,
            snapshotter,
        } = self;
        let addr = listener.local_addr().unwrap_or(config.listen);
        let metrics_addr = metrics_listener
            .local_addr()
            .unwrap_or(config.metrics_listen);

        // The moments of a stop, each one signal for every task it concerns: `draining` when
        // `shutdown` completes (gRPC stops accepting, the grace period starts), `stopped` once
        // gRPC has finished (the background tasks end, the last snapshot is taken), `closed`
        // after that (the HTTP listener, so that /metrics is there until the very end).
        let draining = Stopper::new();
        let stopped = Stopper::new();
        let closed = Stopper::new();

        let readiness = Readiness::default();
        let probes = tokio::spawn(crate::probes::serve(
            metrics_listener,
            exposition,
            readiness.clone(),
            {
                let mut closed = closed.signal();
                async move { closed.recv().await }
            },
        ));
        tracing::info!(addr = %metrics_addr, "ghmd serving /metrics, /healthz and /readyz");

        let snapshotter = snapshotter.map(|snapshotter| {
            let snapshotter =
                snapshotter.with_readiness(readiness.clone(), config.max_snapshot_failures);
            tokio::spawn(snapshotter.run(config.snapshot_interval, stopped.signal()))
        });

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<HarmonizerServer<HarmonizerService>>()
            .await;
        // Ends by itself once the last `Readiness` is gone, after every other task.
        tokio::spawn(crate::probes::mirror_readiness::<
            HarmonizerServer<HarmonizerService>,
        >(readiness.clone(), health_reporter.clone()));
        let reflection = reflection_builder().build_v1()?;
        let reflection_alpha = reflection_builder().build_v1alpha()?;
        let reaper = registry.spawn_reaper(config.job_ttl, stopped.signal());
        // Open streams end at a message boundary once the server drains, after readiness and
        // health have dropped, so that an idle one does not hold the exit.
        let drained = registry.clone();
        let harmonizer = HarmonizerServer::new(
            HarmonizerService::new(registry)
                .with_routing(Routing::new(
                    config.require_job_header,
                    Arc::new(metrics.clone()),
                ))
                .with_run_takeover_after(config.run_takeover_after)
                .with_drain(draining.signal()),
        )
        .max_decoding_message_size(config.max_recv_message_bytes)
        .max_encoding_message_size(config.max_send_message_bytes);
        // Health stays open for probes; the Harmonizer and reflection need a token when there
        // is a tokens file (reflection shows only the public contract, but an unknown caller
        // has no use for it).
        let interceptor = AuthInterceptor::new(Arc::clone(&authenticator));
        // Inside the interceptor, so that each caller's share of the concurrency limit is known.
        let share = CallerShareLayer::new(config.caller_max_concurrent_requests as usize);
        let harmonizer = tower_layer::Layer::layer(&share, harmonizer);
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
        let reloader = authenticator.spawn_reload_on_sighup(stopped.signal());

        let grace = config.shutdown_grace;
        let mut grace_started = draining.signal();
        let grace_expired = async move {
            grace_started.recv().await;
            tokio::time::sleep(grace).await;
        };
        let signal_readiness = readiness.clone();
        let signal = async move {
            shutdown.await;
            signal_readiness.set(false);
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            health_reporter
                .set_not_serving::<HarmonizerServer<HarmonizerService>>()
                .await;
            draining.stop();
            // No rank can reach this server any more: steps still waiting for one end now,
            // instead of at their step timeout, so that their ranks move on.
            drained.drain();
        };

        let connection_limits = crate::transport::ConnectionLimits::from_config(&config);
        let connection_metrics = metrics.clone();
        tracing::info!(%addr, tls = tls.is_some(), "ghmd serving gRPC");
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(config.max_streams_per_connection)
            .http2_keepalive_interval(Some(config.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(config.http2_keepalive_timeout));
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|error| ServeError::Tls(TlsError::Config(error)))?;
        }
        // Outermost, so that what the layers below refuse is counted too.
        let metrics_layer = GrpcMetricsLayer::new(
            metrics,
            &[
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
        );
        readiness.set(true);
        let lingerers = Lingerers::default();
        let serve = builder
            .layer(metrics_layer)
            .layer(
                ConcurrencyLimitLayer::new(config.max_concurrent_requests as usize)
                    .with_idle_timeout(config.stream_idle_timeout)
                    .with_max_health_watches(config.max_health_watches as usize),
            )
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(harmonizer)
            // TCP_NODELAY, keepalive, the connection cap and the handshake timeout: transport.rs;
            // the lingering close after the last response: linger.rs.
            .serve_with_incoming_shutdown(
                crate::linger::lingering(
                    crate::transport::incoming(listener, connection_limits, connection_metrics),
                    lingerers.clone(),
                ),
                signal,
            );
        let served = tokio::select! {
            result = serve => result,
            () = grace_expired => {
                tracing::warn!(?grace, "in-flight requests outlived the shutdown grace; exiting anyway");
                Ok(())
            }
        };
        readiness.set(false);

        let background = Background {
            probes,
            snapshotter,
            reaper,
            reloader,
        };
        let stopped_cleanly = background.stop(stopped, closed).await;
        // The last connections close without cutting off the end of a response.
        lingerers.wait(crate::linger::LINGER).await;
        served?;
        stopped_cleanly?;
        tracing::info!("ghmd stopped");
        Ok(())
    }
}

/// The reflection of the contract and of the health service, once per protocol version.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The tasks that run beside gRPC, until the server's `stopped` signal (the HTTP listener until
/// `closed`).
struct Background {
    probes: JoinHandle<std::io::Result<()>>,
    /// `None` with `--in-memory`.
    snapshotter: Option<JoinHandle<Snapshotter>>,
    reaper: JoinHandle<()>,
    reloader: JoinHandle<()>,
}

impl Background {
    /// Ends every task once gRPC has finished. The last snapshot comes after the last request,
    /// so that a planned restart loses nothing; it is written even if serving failed.
    async fn stop(self, stopped: Stopper, closed: Stopper) -> Result<(), ServeError> {
        stopped.stop();
        let mut snapshot_result = Ok(());
        if let Some(task) = self.snapshotter {
            match task.await {
                Ok(mut snapshotter) => match snapshotter.snapshot().await {
                    Ok(wrote) => tracing::info!(wrote, "final snapshot done"),
                    Err(error) => snapshot_result = Err(ServeError::State(error)),
                },
                Err(error) => tracing::error!(%error, "the snapshot task failed"),
            }
        }
        for (task, what) in [
            (self.reloader, "tokens reload"),
            (self.reaper, "job reaper"),
        ] {
            if let Err(error) = task.await {
                tracing::error!(%error, "the {what} task failed");
            }
        }
        closed.stop();
        match self.probes.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the metrics listener failed"),
            Err(error) => tracing::error!(%error, "the metrics listener task failed"),
        }
        snapshot_result
    }
}

fn tls_config(config: &ServeConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    tls::server_config(
        cert,
        key,
        config.tls_client_ca.as_deref(),
        config.handshake_timeout,
    )
    .map(Some)
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
