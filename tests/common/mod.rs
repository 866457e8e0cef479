//! Shared by the integration tests: the conformance vectors and a real server on port 0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use ghmd::client::Client;
use ghmd::config::ServeConfig;
use ghmd::proto::{self, JobSpec};
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    pub loss: String,
    pub bins: u32,
    pub momentum: f64,
    #[serde(default)]
    pub mu: f64,
    pub steps: Vec<Step>,
}

#[derive(Deserialize, Debug)]
pub struct Step {
    pub gradient_norms: Vec<f64>,
    #[serde(default)]
    pub residuals: Vec<f64>,
    pub label_weights: Vec<f64>,
    pub expected: Expected,
}

#[derive(Deserialize, Debug)]
pub struct Expected {
    pub weights: Vec<f64>,
    pub tot: f64,
    pub nonempty_bins: u32,
    #[serde(default)]
    pub acc_sum: Vec<f64>,
}

/// Every JSON number in the vectors is the shortest decimal of a float32.
pub fn f32s(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

impl Case {
    pub fn is_ghm_r(&self) -> bool {
        self.loss == "ghm_r"
    }

    pub fn loss(&self) -> ghmd::ghm::Loss {
        if self.is_ghm_r() {
            ghmd::ghm::Loss::GhmR
        } else {
            ghmd::ghm::Loss::GhmC
        }
    }

    pub fn proto_spec(&self) -> JobSpec {
        JobSpec {
            loss: if self.is_ghm_r() {
                proto::Loss::GhmR
            } else {
                proto::Loss::GhmC
            }
            .into(),
            bins: self.bins,
            momentum: self.momentum,
            mu: self.mu,
            ..Default::default()
        }
    }
}

pub fn conformance_cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 5, "conformance vectors missing from {dir:?}");
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("readable case");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
        })
        .collect()
}

pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

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

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = ServeConfig::from_env();
        config.listen = "127.0.0.1:0".parse().expect("loopback address");
        config.metrics_listen = "127.0.0.1:0".parse().expect("loopback address");
        // Tests that want a data dir set one (a temporary one); none writes ./ghmd-data.
        config.in_memory = true;
        configure(&mut config);
        let server = ghmd::server::Server::bind(config).await.expect("bind");
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
        Self {
            addr,
            metrics_addr,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.uri()).await.expect("connect")
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.uri())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
