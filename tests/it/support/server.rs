//! A real ghmd in the test's own process: `Server::bind` on port 0, its addresses read back.

use std::net::SocketAddr;

use ghmd::client::{Client, Credentials};
use ghmd::config::ServeConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A real ghmd on an ephemeral loopback port, stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The /metrics, /healthz and /readyz listener.
    pub metrics_addr: SocketAddr,
    /// The server's job registry, for tests that compare its snapshots.
    pub registry: ghmd::jobs::Registry,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The flags of a test server before a test changes them: loopback port 0 for both listeners,
/// and no data dir (a test that wants one sets a temporary one; none writes ./ghmd-data).
pub fn test_config() -> ServeConfig {
    let mut config = ServeConfig::from_env();
    config.listen = "127.0.0.1:0".parse().expect("loopback address");
    config.metrics_listen = "127.0.0.1:0".parse().expect("loopback address");
    config.in_memory = true;
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::try_start_with(configure)
            .await
            .unwrap_or_else(|error| panic!("bind: {error}"))
    }

    /// For the tests of a refused start: the error, as the operator reads it.
    pub async fn try_start_with(configure: impl FnOnce(&mut ServeConfig)) -> Result<Self, String> {
        let mut config = test_config();
        configure(&mut config);
        let server = ghmd::server::Server::bind(config)
            .await
            .map_err(|error| error.to_string())?;
        let addr = server.local_addr();
        let metrics_addr = server.metrics_addr();
        let registry = server.registry();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        Ok(Self {
            addr,
            metrics_addr,
            registry,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.uri()).await.expect("connect")
    }

    /// A client that sends `token` as its bearer token, or none.
    pub async fn client_with_token(&self, token: Option<&str>) -> Client {
        let credentials = match token {
            Some(token) => Credentials::bearer(token).expect("token"),
            None => Credentials::default(),
        };
        Client::with_credentials(self.channel().await, credentials)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.uri())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// Gives the shutdown signal without waiting, as SIGTERM would: the server drains.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals the shutdown and waits until the server has stopped cleanly.
    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
    }
}
