//! Wiring: the listeners, the Harmonizer, health and reflection services, metrics, the state
//! loaded at start and snapshotted while running, and an orderly stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::HarmonizerService;
use crate::auth::{AuthInterceptor, Authenticator, TokensError};
use crate::config::ServeConfig;
use crate::http::Readiness;
use crate::jobs::{Registry, RegistryLimits};
use crate::limit::ConcurrencyLimitLayer;
use crate::metrics::{Exposition, GrpcMetricsLayer, JobDensity, Metrics};
use crate::persist::{PersistError, Snapshotter, Store};
use crate::proto::harmonizer_server::HarmonizerServer;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] PersistError),
    #[error("the state file {path} holds a job that cannot be restored: {reason}")]
    Restore { path: String, reason: String },
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
        let registry = Registry::with_observer(
            RegistryLimits {
                offload_elements: config.offload_elements,
                kept_steps: config.kept_steps,
                max_pending_steps: config.max_pending_steps,
                max_jobs: usize::try_from(config.max_jobs).unwrap_or(usize::MAX),
                max_elements_per_request: config.max_elements_per_request,
            },
            Arc::new(metrics.clone()),
        );
        let snapshotter = if config.in_memory {
            tracing::info!("--in-memory: no data dir; every job is lost when ghmd stops");
            None
        } else {
            Some(load_state(&config, &registry, &metrics).await?)
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

        let readiness = Readiness::default();
        let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let http = tokio::spawn(crate::http::serve(
            metrics_listener,
            exposition,
            readiness.clone(),
            async {
                let _ = http_stop_rx.await;
            },
        ));
        tracing::info!(addr = %metrics_addr, "ghmd serving /metrics, /healthz and /readyz");

        let (snapshot_stop_tx, snapshot_stop_rx) = watch::channel(false);
        let snapshot_task = snapshotter.map(|snapshotter| {
            let snapshotter =
                snapshotter.with_readiness(readiness.clone(), config.max_snapshot_failures);
            tokio::spawn(snapshotter.run(config.snapshot_interval, snapshot_stop_rx))
        });

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<HarmonizerServer<HarmonizerService>>()
            .await;
        let _health_follows_readiness = AbortOnDrop(tokio::spawn(crate::http::mirror_readiness::<
            HarmonizerServer<HarmonizerService>,
        >(
            readiness.clone(),
            health_reporter.clone(),
        )));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let registry_for_reaper = registry.clone();
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
        let reaper = AbortOnDrop(tokio::spawn(reap_idle_jobs(
            registry_for_reaper,
            config.job_ttl,
        )));

        let (stopping_tx, mut stopping_rx) = watch::channel(false);
        let signal_readiness = readiness.clone();
        let signal = async move {
            shutdown.await;
            signal_readiness.set(false);
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

        let connection_limits = crate::transport::ConnectionLimits::from_config(&config);
        let connection_metrics = metrics.clone();
        tracing::info!(%addr, tls = tls.is_some(), "ghmd serving gRPC");
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(config.max_streams_per_connection)
            .http2_keepalive_interval(Some(config.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(config.http2_keepalive_timeout));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
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
            // TCP_NODELAY, keepalive, the connection cap and the handshake timeout: transport.rs.
            .serve_with_incoming_shutdown(
                crate::transport::incoming(listener, connection_limits, connection_metrics),
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

        // The last snapshot comes after the last request, so that a planned restart loses
        // nothing; it is written even if serving failed.
        let mut snapshot_result = Ok(());
        if let Some(task) = snapshot_task {
            let _ = snapshot_stop_tx.send(true);
            match task.await {
                Ok(mut snapshotter) => match snapshotter.snapshot().await {
                    Ok(wrote) => tracing::info!(wrote, "final snapshot done"),
                    Err(error) => snapshot_result = Err(ServeError::State(error)),
                },
                Err(error) => tracing::error!(%error, "the snapshot task failed"),
            }
        }
        drop(reloader);
        drop(reaper);
        let _ = http_stop_tx.send(());
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the metrics listener failed"),
            Err(error) => tracing::error!(%error, "the metrics listener task failed"),
        }
        served?;
        snapshot_result?;
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
        .timeout(config.handshake_timeout);
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

/// Deletes jobs idle longer than `ttl`, looking a few times per TTL (at most once a minute, at
/// least every 10 ms), so that a job outlives its TTL by a quarter of it at most.
async fn reap_idle_jobs(registry: Registry, ttl: Duration) {
    let period = (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let registry = registry.clone();
        let reaped = tokio::task::spawn_blocking(move || {
            registry.reap_idle(ttl, std::time::SystemTime::now())
        })
        .await;
        match reaped {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(job_id = %id, ?ttl, "job deleted: idle longer than --job-ttl");
                }
            }
            Err(error) => tracing::error!(%error, "the job reaper failed"),
        }
    }
}

/// Opens (and locks) the data dir and puts its jobs into `registry`. Runs on the blocking pool:
/// reading and decoding a large state is file I/O and CPU.
async fn load_state(
    config: &ServeConfig,
    registry: &Registry,
    metrics: &Metrics,
) -> Result<Snapshotter, ServeError> {
    let dir = config.data_dir.clone();
    let discard = config.discard_corrupt_state;
    let (store, loaded) = tokio::task::spawn_blocking(move || Store::open(&dir, discard))
        .await
        .map_err(|error| {
            ServeError::State(PersistError::Read {
                path: config.data_dir.clone(),
                source: std::io::Error::other(format!("loading task failed: {error}")),
            })
        })??;
    if let Some((aside, reason)) = &loaded.set_aside {
        tracing::warn!(
            path = %aside.display(),
            %reason,
            "the state file failed its checks: moved aside, starting with no jobs"
        );
    }
    let count = loaded.jobs.len();
    for job in loaded.jobs {
        let id = job.id.clone();
        registry
            .insert_snapshot(job)
            .map_err(|error| ServeError::Restore {
                path: store.state_path().display().to_string(),
                reason: format!("job {id:?}: {error}"),
            })?;
    }
    tracing::info!(jobs = count, path = %store.state_path().display(), "state loaded");
    if count as u64 > config.max_jobs {
        tracing::warn!(
            jobs = count,
            max_jobs = config.max_jobs,
            "more jobs were loaded than --max-jobs allows: all are kept, CreateJob is refused \
             until some are deleted"
        );
    }
    Ok(Snapshotter::new(
        store,
        registry.clone(),
        metrics.clone(),
        loaded.bytes,
    ))
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
