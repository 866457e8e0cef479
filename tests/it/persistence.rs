//! Durable state through the real binary: SIGTERM and restart, kill -9 after a snapshot,
//! corrupt and truncated state files, and `--in-memory`.

use std::time::{Duration, Instant};

use ghmd::client::Client;
use ghmd::proto::{Job, JobSpec, UpdateJobRequest};

use crate::support::fixture::list_all;
use crate::support::http::{sample, scrape_until};
use crate::support::{
    Draw, Ghmd, SplitMix, TempDir, TestServer, bits, ghm_c, ghm_r, step_synchronous,
};

/// Deterministic gradient norms in [0, 1].
fn norms(seed: u64, count: usize) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    (0..count).map(|_| rng.unit_closed()).collect()
}

/// Every job, two to a page.
async fn all_jobs(uri: String) -> Vec<Job> {
    let mut client = Client::connect(uri).await.expect("connect");
    list_all(&mut client, "", 2).await
}

/// Several jobs of both losses, each with a few steps, so that every field has a value
/// worth comparing.
async fn populate(client: &mut Client) {
    let jobs = [
        ("team-a/ghmc", ghm_c(10, 0.75)),
        ("team-a/ghmc-30", ghm_c(30, 0.7)),
        ("team-b/ghmr", ghm_r(10, 0.9)),
        (
            "team-b/ghmr-mu",
            JobSpec {
                mu: 0.05,
                ..ghm_r(17, 0.5)
            },
        ),
        ("no-ema", ghm_c(10, 0.0)),
        ("untouched", ghm_c(4, 0.25)),
    ];
    for (index, (id, spec)) in jobs.into_iter().enumerate() {
        client.create_job(id, spec).await.expect("create");
        if id == "untouched" {
            continue;
        }
        for step in 0..3u64 {
            let seed = index as u64 * 100 + step;
            client
                .harmonize_norms(id, step, 0, &norms(seed, 1000 + 37 * step as usize), None)
                .await
                .expect("harmonize");
        }
    }
}

fn acc_bits(jobs: &[Job]) -> Vec<(String, Vec<u32>)> {
    jobs.iter()
        .map(|job| {
            let state = job.state.as_ref().expect("state");
            (job.job_id.clone(), bits(&state.acc_sum))
        })
        .collect()
}

#[tokio::test]
async fn sigterm_then_restart_brings_back_every_job_bit_for_bit() {
    let dir = TempDir::new("sigterm");
    // An hour: the only snapshot is the one taken at shutdown.
    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "1h"]);
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    populate(&mut client).await;
    let before = all_jobs(ghmd.uri()).await;
    assert_eq!(before.len(), 6);
    drop(client);

    let (status, log) = ghmd.sigterm().await;
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(dir.path().join(ghmd::persist::STATE_FILE).exists());

    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "1h"]);
    let after = all_jobs(ghmd.uri()).await;
    assert_eq!(acc_bits(&after), acc_bits(&before));
    assert_eq!(after, before, "specs, states and timestamps");

    // The restored densities go on exactly as the originals would: the next step's weights
    // depend on them bit for bit, so compare against a fresh job fed the same history.
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    let (_, restored) = client
        .harmonize_norms("team-a/ghmc", 3, 0, &norms(7, 500), None)
        .await
        .expect("harmonize after restart");
    client
        .create_job("replay", ghm_c(10, 0.75))
        .await
        .expect("create");
    for step in 0..3u64 {
        client
            .harmonize_norms(
                "replay",
                step,
                0,
                &norms(step, 1000 + 37 * step as usize),
                None,
            )
            .await
            .expect("replay");
    }
    let (_, replayed) = client
        .harmonize_norms("replay", 3, 0, &norms(7, 500), None)
        .await
        .expect("replay");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&restored), bits(&replayed));
}

#[tokio::test]
async fn after_a_snapshot_kill_9_and_restart_give_that_snapshot() {
    let dir = TempDir::new("kill9");
    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "100ms"]);
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    populate(&mut client).await;
    let served = all_jobs(ghmd.uri()).await;

    // Wait for a snapshot holding every step: the file's jobs agree with what the API serves.
    let state_file = dir.path().join(ghmd::persist::STATE_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    let on_disk = loop {
        if let Ok(mut jobs) = ghmd::persist::read_file(&state_file) {
            jobs.sort_by(|a, b| a.id.cmp(&b.id));
            let summary: Vec<(String, Vec<u32>, u64)> = jobs
                .iter()
                .map(|job| (job.id.clone(), ghm_acc_sum_bits(job), job.steps))
                .collect();
            let served_summary: Vec<(String, Vec<u32>, u64)> = acc_bits(&served)
                .into_iter()
                .zip(&served)
                .map(|((id, bits), job)| (id, bits, job.state.as_ref().map_or(0, |s| s.steps)))
                .collect();
            if summary == served_summary {
                break jobs;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete snapshot:\n{}",
            ghmd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The snapshot task records a snapshot once its file is in place, a moment after the file
    // can be read.
    let written = |metrics: &str| sample(metrics, "ghmd_snapshots_written_total", &[]);
    let last_success =
        |metrics: &str| sample(metrics, "ghmd_snapshot_last_success_timestamp_seconds", &[]);
    let metrics = scrape_until(ghmd.metrics_addr, |metrics| {
        written(metrics).unwrap_or(0.0) >= 1.0 && last_success(metrics).unwrap_or(0.0) > 0.0
    })
    .await;
    assert!(written(&metrics).unwrap_or(0.0) >= 1.0, "{metrics}");
    assert!(last_success(&metrics).unwrap_or(0.0) > 0.0, "{metrics}");
    drop(client);
    ghmd.kill9().await;

    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "100ms"]);
    let restored = all_jobs(ghmd.uri()).await;
    assert_eq!(restored, served);
    assert_eq!(restored.len(), on_disk.len());
}

/// A state file written by a real ghmd: one job with a step.
async fn write_real_state(dir: &TempDir) -> Vec<u8> {
    let ghmd = Ghmd::start(dir.path(), &[]);
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    client
        .create_job("kept", ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .harmonize_norms("kept", 0, 0, &norms(1, 100), None)
        .await
        .expect("harmonize");
    drop(client);
    let (status, log) = ghmd.sigterm().await;
    assert!(status.success(), "{log}");
    std::fs::read(dir.path().join(ghmd::persist::STATE_FILE)).expect("state file")
}

#[tokio::test]
async fn a_corrupt_or_truncated_state_file_stops_ghmd_naming_it_and_stays() {
    let dir = TempDir::new("corrupt");
    let good = write_real_state(&dir).await;
    let state_file = dir.path().join(ghmd::persist::STATE_FILE);

    let mut flipped = good.clone();
    let middle = ghmd::persist::HEADER_LEN + (good.len() - ghmd::persist::HEADER_LEN) / 2;
    flipped[middle] ^= 0x10;
    let mut other_version = good.clone();
    other_version[8..12].copy_from_slice(&9u32.to_le_bytes());
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("a flipped bit", flipped, "checksum mismatch"),
        (
            "half the file",
            good[..good.len() / 2].to_vec(),
            "truncated",
        ),
        ("the header only", good[..10].to_vec(), "truncated"),
        ("another version", other_version, "format version 9"),
    ];
    for (what, bytes, reason) in cases {
        std::fs::write(&state_file, &bytes).expect("write the bad file");
        let (status, stderr) = Ghmd::run_to_exit(dir.path(), &[]);
        assert!(!status.success(), "{what}: ghmd started");
        assert!(
            stderr.contains(&state_file.display().to_string()),
            "{what}: the message does not name the file:\n{stderr}"
        );
        assert!(
            stderr.contains(reason),
            "{what}: no {reason:?} in:\n{stderr}"
        );
        assert_eq!(
            std::fs::read(&state_file).expect("the file is still there"),
            bytes,
            "{what}: the file changed"
        );
    }

    // Told to, ghmd moves the file aside (keeping it) and starts empty.
    let bad = std::fs::read(&state_file).expect("bad file");
    let ghmd = Ghmd::start(dir.path(), &["--discard-corrupt-state"]);
    assert!(all_jobs(ghmd.uri()).await.is_empty());
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list the data dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("state.ghmd.corrupt-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).expect("kept"), bad);
    assert!(ghmd.log().contains("moved aside"), "{}", ghmd.log());
}

#[tokio::test]
async fn a_second_ghmd_on_the_same_data_dir_is_refused() {
    let dir = TempDir::new("locked");
    let _first = Ghmd::start(dir.path(), &[]);
    let (status, stderr) = Ghmd::run_to_exit(dir.path(), &[]);
    assert!(!status.success());
    assert!(stderr.contains("in use by another ghmd"), "{stderr}");
}

#[tokio::test]
async fn in_memory_touches_no_data_dir() {
    let dir = TempDir::new("in-memory");
    let never = dir.path().join("never-created");
    let never_config = never.clone();
    let server = TestServer::start_with(move |config| {
        config.in_memory = true;
        config.data_dir = never_config;
    })
    .await;
    server
        .client()
        .await
        .create_job("x", ghm_c(10, 0.75))
        .await
        .expect("create");
    server.stop().await;
    assert!(!never.exists());
}

fn sorted_snapshots(registry: &ghmd::jobs::Registry) -> Vec<ghmd::jobs::JobSnapshot> {
    let mut jobs = registry.snapshots();
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    jobs
}

#[tokio::test]
async fn every_field_of_every_job_survives_a_restart_step_synchronous_ones_included() {
    let dir = TempDir::new("in-process");
    let data = dir.path().join("data");
    let start = |data: std::path::PathBuf| {
        TestServer::start_with(move |config| {
            config.in_memory = false;
            config.data_dir = data;
            config.snapshot_interval = Duration::from_secs(3600);
        })
    };
    let server = start(data.clone()).await;
    let mut client = server.client().await;
    populate(&mut client).await;
    // A step-synchronous job of two ranks with two steps applied, then grown to three ranks
    // from step 5: its next step and world-size schedule must come back too.
    let sync_spec = JobSpec {
        allow_partial_steps: true,
        ..step_synchronous(ghm_r(12, 0.8), 2, Duration::from_millis(7250))
    };
    client.create_job("sync", sync_spec).await.expect("create");
    for step in 0..2u64 {
        let mut rank1 = server.client().await;
        let other = tokio::spawn(async move {
            rank1
                .harmonize_norms("sync", step, 1, &norms(step + 50, 300), None)
                .await
                .expect("rank 1")
        });
        client
            .harmonize_norms("sync", step, 0, &norms(step + 60, 200), None)
            .await
            .expect("rank 0");
        other.await.expect("rank 1 task");
    }
    client
        .raw()
        .update_job(UpdateJobRequest {
            job_id: "sync".into(),
            world_size: 3,
            from_step: 5,
            ..Default::default()
        })
        .await
        .expect("update");
    let before = sorted_snapshots(&server.registry);
    let sync = before
        .iter()
        .find(|job| job.id == "sync")
        .expect("sync job");
    assert_eq!(sync.next_step, 2);
    assert!(!sync.world_size_schedule.is_empty());
    let before_api = all_jobs(server.uri()).await;
    drop(client);
    server.stop().await;

    let server = start(data).await;
    let after = sorted_snapshots(&server.registry);
    assert_eq!(after, before);
    let bits = |jobs: &[ghmd::jobs::JobSnapshot]| -> Vec<Vec<u32>> {
        jobs.iter().map(ghm_acc_sum_bits).collect()
    };
    assert_eq!(bits(&after), bits(&before));
    assert_eq!(all_jobs(server.uri()).await, before_api);
    server.stop().await;
}

/// A GHM job's density by its bits.
fn ghm_acc_sum_bits(job: &ghmd::jobs::JobSnapshot) -> Vec<u32> {
    job.state
        .ghm_density()
        .map(|density| density.acc_sum().iter().map(|v| v.to_bits()).collect())
        .unwrap_or_default()
}
