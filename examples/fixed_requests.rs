//! A fixed number of one kind of request, one at a time on one connection: what a server run
//! under `valgrind --tool=callgrind` needs so that its instruction count divides into a cost per
//! request (BENCHMARKS.md, "server, instruction counts"). `ghmd bench` runs for a time instead,
//! which under valgrind would measure valgrind.
//!
//! `cargo run --release --example fixed_requests -- http://127.0.0.1:50051 histogram 2000`
//! (kinds: health, histogram, raw; raw sends 1M gradient norms).

use std::process::ExitCode;

use ghmd::client::Client;
use ghmd::proto::{JobSpec, Loss};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const BINS: u32 = 30;
const RAW_ELEMENTS: usize = 1_000_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(kind), Some(count)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: fixed_requests <grpc uri> <health|histogram|raw> <requests>");
        return ExitCode::FAILURE;
    };
    match run(addr.clone(), kind, count).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fixed_requests: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(addr: String, kind: &str, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(addr)?
        .connect()
        .await?;
    if kind == "health" {
        let mut health = HealthClient::new(channel);
        for _ in 0..count {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
        }
        return Ok(());
    }
    let mut client = Client::from_channel(channel);
    let job_id = format!("fixed-requests/{}", std::process::id());
    let spec = JobSpec {
        loss: Loss::GhmC.into(),
        bins: BINS,
        momentum: 0.75,
        ..Default::default()
    };
    client.create_job(&job_id, spec).await?;
    let counts: Vec<u64> = (0..u64::from(BINS)).map(|bin| 1000 + bin * 37).collect();
    let tot = counts.iter().sum::<u64>() as f64;
    let norms: Vec<f32> = (0..RAW_ELEMENTS)
        .map(|i| (i % 1009) as f32 / 1009.0)
        .collect();
    for _ in 0..count {
        match kind {
            "histogram" => {
                client
                    .harmonize_histogram(&job_id, 0, 0, counts.clone(), tot)
                    .await?;
            }
            "raw" => {
                client.harmonize_norms(&job_id, 0, 0, &norms, None).await?;
            }
            other => return Err(format!("unknown kind {other:?}").into()),
        }
    }
    client.delete_job(&job_id).await?;
    Ok(())
}
