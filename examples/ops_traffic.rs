//! Known traffic for the operations checks (scripts/ops-checks.sh): one CreateJob, `N`
//! Harmonize calls and one GetJob of a missing job, so that the checks can ask Prometheus for
//! exactly those counts.
//!
//! `cargo run --example ops_traffic -- http://127.0.0.1:50051 5`

use std::process::ExitCode;

use ghmd::client::Client;
use ghmd::proto::{JobSpec, Loss};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(count)) = (args.next(), args.next().and_then(|n| n.parse::<u64>().ok()))
    else {
        eprintln!("usage: ops_traffic <grpc uri> <harmonize calls>");
        return ExitCode::FAILURE;
    };
    match run(addr, count).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ops_traffic: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(addr: String, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = Client::connect(addr).await?;
    let spec = JobSpec {
        loss: Loss::GhmC.into(),
        bins: 10,
        momentum: 0.75,
        ..Default::default()
    };
    client.create_job("ops-check", spec).await?;
    for step in 0..count {
        let norms: Vec<f32> = (0..100)
            .map(|i| ((i * 7 + step) % 100) as f32 / 100.0)
            .collect();
        client
            .harmonize_norms("ops-check", step, 0, &norms, None)
            .await?;
    }
    match client.get_job("no-such-job").await {
        Err(status) if status.code() == tonic::Code::NotFound => {}
        other => return Err(format!("GetJob of a missing job: {other:?}").into()),
    }
    println!("1 CreateJob, {count} Harmonize, 1 GetJob NOT_FOUND");
    Ok(())
}
