//! Snapshot and load of 100,000 jobs, as the server does them: `registry.snapshots()`, encode
//! and an atomic write (temp file, fsync, rename, fsync of the dir); then open, read, check,
//! decode and insert every job into a fresh registry. Each is set against a baseline measured in
//! the same run on the same bytes, a plain `fs::write` without fsync and a plain `fs::read`, so
//! that the ratios survive a noisy, shared machine.
//!
//! `cargo bench --bench persist` prints medians of 7 runs; `cargo test --all-targets` runs it
//! once on 1,000 jobs as a smoke test.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use ghmd::ghm::{Density, Loss, Spec};
use ghmd::jobs::{JobSnapshot, JobSpec, Registry, RegistryLimits};
use ghmd::method::{AnyState, Ghm, MethodSpec};
use ghmd::persist::{Store, encode};

/// A registry like a busy server's: mmdetection's 10 and 30 bins, both losses, every job with a
/// density and counters.
fn registry_of(jobs: usize) -> Registry {
    let registry = Registry::new(RegistryLimits {
        max_jobs: jobs,
        ..RegistryLimits::default()
    });
    let now = SystemTime::now();
    for i in 0..jobs {
        let (loss, bins) = match i % 4 {
            0 => (Loss::GhmC, 10),
            1 => (Loss::GhmC, 30),
            2 => (Loss::GhmR, 10),
            _ => (Loss::GhmR, 30),
        };
        let spec = Spec::new(loss, bins, 0.75, 0.0).expect("valid spec");
        registry
            .insert_snapshot(JobSnapshot {
                id: format!("team-{}/run-{i:06}", i % 97),
                spec: JobSpec {
                    method: MethodSpec::Ghm(Ghm { spec }),
                    world_size: 1,
                    step_timeout: Duration::from_secs(60),
                    allow_partial_steps: false,
                },
                state: AnyState::Ghm(Density::from_acc_sum(
                    (0..bins)
                        .map(|b| (i * 31 + b as usize) as f32 * 0.37)
                        .collect(),
                )),
                steps: i as u64,
                elements: i as u64 * 1000,
                next_step: 0,
                world_size_schedule: Vec::new(),
                generation: 1,
                run_id: String::new(),
                create_time: now,
                update_time: now,
            })
            .expect("insert");
    }
    registry
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let (jobs, runs) = if bench { (100_000, 7) } else { (1_000, 1) };
    let dir: PathBuf =
        std::env::temp_dir().join(format!("ghmd-bench-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registry = registry_of(jobs);

    let (store, _) = Store::open(&dir, false).expect("open the data dir");
    let mut bytes = Vec::new();
    let (mut snapshot, mut plain_write) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        bytes = encode(&registry.snapshots());
        store.write(&bytes).expect("write");
        snapshot.push(started.elapsed());

        let started = Instant::now();
        std::fs::write(dir.join("baseline"), &bytes).expect("plain write");
        plain_write.push(started.elapsed());
    }
    drop(store);

    let (mut load, mut plain_read) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let (store, loaded) = Store::open(&dir, false).expect("load");
        let fresh = Registry::new(RegistryLimits {
            max_jobs: jobs,
            ..RegistryLimits::default()
        });
        for job in loaded.jobs {
            fresh.insert_snapshot(job).expect("insert");
        }
        load.push(started.elapsed());
        assert_eq!(fresh.len(), jobs);
        drop(store);

        let started = Instant::now();
        let read = std::fs::read(dir.join("baseline")).expect("plain read");
        plain_read.push(started.elapsed());
        assert_eq!(read.len(), bytes.len());
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (snapshot, plain_write) = (median(snapshot), median(plain_write));
    let (load, plain_read) = (median(load), median(plain_read));
    println!(
        "{jobs} jobs, state file {:.1} MiB, medians of {runs} runs",
        bytes.len() as f64 / (1024.0 * 1024.0)
    );
    println!(
        "snapshot (collect + encode + write + fsync + rename): {:>8.1} ms = {:>5.1} x a plain write ({:.1} ms)",
        snapshot.as_secs_f64() * 1e3,
        snapshot.as_secs_f64() / plain_write.as_secs_f64(),
        plain_write.as_secs_f64() * 1e3
    );
    println!(
        "load (read + check + decode + insert):                {:>8.1} ms = {:>5.1} x a plain read ({:.1} ms)",
        load.as_secs_f64() * 1e3,
        load.as_secs_f64() / plain_read.as_secs_f64(),
        plain_read.as_secs_f64() * 1e3
    );
}
