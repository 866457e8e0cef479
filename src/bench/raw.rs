//! `raw`: large Harmonize requests (1M gradient norms each) against a plain TCP echo of the
//! same bytes on loopback, started by the bench in the same run.
//!
//! The request carries norms only, so that ghmd and the echo move the same bytes each way
//! (4 bytes per element in, 4 out); the echo copies them into a buffer and back, which is the
//! least any server that answers with as much data must do.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::stats::{Call, Latency, Run, closed_loop};
use super::target::Target;
use super::{BenchError, JobNames, create_job, rpc};
use ghmd::client::{Transport, f32s_to_bytes};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::harmonizer_client::HarmonizerClient;
use ghmd::proto::{HarmonizeRequest, Loss};

/// Connection counts measured, as the issue asks.
pub const CONNECTIONS: [usize; 2] = [1, 4];

#[derive(Clone, Debug, Serialize)]
pub struct RawPoint {
    pub connections: usize,
    pub elements_per_request: usize,
    pub ghmd: Throughput,
    pub echo: Throughput,
    /// ghmd's elements per second over the echo's.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub elements_per_second: f64,
    pub requests: u64,
    pub latency: Latency,
    /// CPU time the server spent per request (only for a server the bench started): a figure
    /// that, unlike the rates, does not depend on what else the machine is doing.
    pub server_cpu_ms_per_request: Option<f64>,
}

impl Throughput {
    fn of(run: &Run, elements_per_request: usize, server_cpu: Option<Duration>) -> Self {
        Self {
            elements_per_second: run.per_second() * elements_per_request as f64,
            requests: run.requests,
            latency: run.latency.clone(),
            server_cpu_ms_per_request: server_cpu
                .map(|cpu| cpu.as_secs_f64() * 1e3 / run.requests.max(1) as f64),
        }
    }
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    elements: usize,
    duration: Duration,
) -> Result<Vec<RawPoint>, BenchError> {
    let norms = f32s_to_bytes(&super::data::realistic_norms(elements, 1));
    let echo = EchoServer::start().await?;
    let mut points = Vec::new();
    for connections in CONNECTIONS {
        let mut workers = Vec::new();
        for index in 0..connections {
            let mut client = target.harmonizer(target.connect().await?);
            let job_id = names.job(&format!("raw-{connections}-{index}"));
            create_job(&mut client, &job_id, Loss::GhmC, 30, 0).await?;
            workers.push(RawWorker {
                client,
                job_id,
                norms: norms.clone(),
            });
        }
        for worker in &mut workers {
            worker.call().await?;
        }
        let cpu_before = target.server_cpu()?;
        let ghmd = closed_loop(workers, duration).await?;
        let server_cpu = cpu_used(cpu_before, target.server_cpu()?);

        let mut echoes = Vec::new();
        for _ in 0..connections {
            echoes.push(EchoWorker::connect(echo.addr, norms.clone()).await?);
        }
        for worker in &mut echoes {
            worker.call().await?;
        }
        let baseline = closed_loop(echoes, duration).await?;

        let (ghmd, echo) = (
            Throughput::of(&ghmd, elements, server_cpu),
            Throughput::of(&baseline, elements, None),
        );
        points.push(RawPoint {
            connections,
            elements_per_request: elements,
            ratio: ghmd.elements_per_second / echo.elements_per_second,
            ghmd,
            echo,
        });
    }
    Ok(points)
}

/// The CPU time a started server used between two readings.
pub fn cpu_used(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    Some(after?.saturating_sub(before?))
}

struct RawWorker {
    client: HarmonizerClient<Transport>,
    job_id: String,
    norms: Bytes,
}

impl Call for RawWorker {
    async fn call(&mut self) -> Result<(), BenchError> {
        let request = HarmonizeRequest {
            job_id: self.job_id.clone(),
            input: Some(Input::GradientNorms(self.norms.clone())),
            ..Default::default()
        };
        let response = rpc("Harmonize", self.client.harmonize(request).await)?;
        if response.weights.len() != self.norms.len() {
            return Err(BenchError::Answer(format!(
                "Harmonize returned {} bytes of weights for {} bytes of norms",
                response.weights.len(),
                self.norms.len()
            )));
        }
        Ok(())
    }
}

/// A length-prefixed echo: reads a u32 length and that many bytes into a buffer, writes them
/// back. Aborted when dropped.
struct EchoServer {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> Result<Self, BenchError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // A connection ends when the bench drops its end.
                    let _ = echo(socket).await;
                });
            }
        });
        Ok(Self { addr, accept })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn echo(mut socket: TcpStream) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut buffer = Vec::new();
    loop {
        let len = socket.read_u32().await? as usize;
        buffer.resize(len, 0);
        socket.read_exact(&mut buffer).await?;
        socket.write_all(&buffer).await?;
    }
}

struct EchoWorker {
    socket: TcpStream,
    payload: Bytes,
    back: Vec<u8>,
}

impl EchoWorker {
    async fn connect(addr: SocketAddr, payload: Bytes) -> Result<Self, BenchError> {
        let socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let back = vec![0; payload.len()];
        Ok(Self {
            socket,
            payload,
            back,
        })
    }
}

impl Call for EchoWorker {
    async fn call(&mut self) -> Result<(), BenchError> {
        let len = u32::try_from(self.payload.len())
            .map_err(|_| BenchError::Answer("the echo payload is over 4 GiB".to_owned()))?;
        self.socket.write_u32(len).await?;
        self.socket.write_all(&self.payload).await?;
        self.socket.read_exact(&mut self.back).await?;
        Ok(())
    }
}
