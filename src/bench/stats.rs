//! Closed-loop drivers and latency percentiles.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::BenchError;

/// Latency samples one worker keeps at most, so that a long run on a fast server stays bounded
/// in memory.
const MAX_SAMPLES_PER_WORKER: usize = 200_000;

/// One request of a closed loop.
pub trait Call: Send + 'static {
    fn call(&mut self) -> impl Future<Output = Result<(), BenchError>> + Send;
}

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

impl Latency {
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e3
        };
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            samples: samples.len(),
        }
    }
}

/// What a closed loop measured.
#[derive(Clone, Debug)]
pub struct Run {
    pub requests: u64,
    pub elapsed: Duration,
    pub latency: Latency,
}

impl Run {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Every worker sends one request at a time, back to back, until `duration` has passed; each
/// runs on its own task so that the runtime spreads them over its threads.
pub async fn closed_loop<W: Call>(workers: Vec<W>, duration: Duration) -> Result<Run, BenchError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut requests = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                worker.call().await?;
                requests += 1;
                if latencies.len() < MAX_SAMPLES_PER_WORKER {
                    latencies.push(sent.elapsed());
                }
            }
            Ok::<_, BenchError>((requests, latencies))
        });
    }
    let mut requests = 0;
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (count, mut samples) = joined.map_err(|e| BenchError::Task(e.to_string()))??;
        requests += count;
        latencies.append(&mut samples);
    }
    Ok(Run {
        requests,
        elapsed: start.elapsed(),
        latency: Latency::of(&mut latencies),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_sample_at_or_above_the_quantile() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let latency = Latency::of(&mut samples);
        assert_eq!(latency.p50_ms, 50.0);
        assert_eq!(latency.p99_ms, 99.0);
        assert_eq!(latency.samples, 100);
        let mut one = vec![Duration::from_micros(1500)];
        assert_eq!(Latency::of(&mut one).p99_ms, 1.5);
        assert!(Latency::of(&mut []).p50_ms.is_nan());
    }
}
