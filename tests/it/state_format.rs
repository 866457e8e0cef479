//! Compatibility of the state file: `tests/data/state/format1.ghmd` was written by format
//! version 1 (main at f522e36, before issue 11's methods), and every later ghmd must load it into
//! exactly these jobs. Regenerate it only while `VERSION` is 1:
//! `GHMD_WRITE_STATE_FIXTURE=1 cargo test --test it state_format::`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ghmd::ghm::{Loss, Spec};
use ghmd::jobs::{JobSnapshot, JobSpec, WorldSizeChange};
use ghmd::persist;

use crate::support::{TempDir, TestServer};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/state/format1.ghmd")
}

fn at(seconds: u64, nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos)
}

/// Every kind of job a format-1 file holds, as a running ghmd snapshots them (an asynchronous
/// job's world size reads 1): both losses, with and without EMA, asynchronous and
/// step-synchronous with a world-size schedule, and float bits a short decimal would not keep (a
/// subnormal, the largest float32).
fn format1_jobs() -> Vec<JobSnapshot> {
    let job = |id: &str, spec: Spec, world_size: u32, acc_sum: Vec<f32>| JobSnapshot {
        id: id.to_owned(),
        spec: JobSpec {
            ghm: spec,
            world_size,
            step_timeout: Duration::new(30, 250_000_000),
            allow_partial_steps: world_size > 1,
        },
        acc_sum,
        steps: 17,
        elements: 123_456_789,
        next_step: if world_size > 1 { 18 } else { 0 },
        world_size_schedule: if world_size > 1 {
            vec![
                WorldSizeChange {
                    from_step: 10,
                    world_size: 2,
                },
                WorldSizeChange {
                    from_step: 20,
                    world_size,
                },
            ]
        } else {
            Vec::new()
        },
        create_time: at(1_790_000_000, 1),
        update_time: at(1_790_000_100, 999_999_999),
    };
    vec![
        job(
            "team-a/ghmc-ema",
            Spec::new(Loss::GhmC, 4, 0.75, 0.0).unwrap(),
            1,
            vec![0.0, 1.5, f32::from_bits(1), f32::MAX],
        ),
        job(
            "team-a/ghmc-no-ema",
            Spec::new(Loss::GhmC, 10, 0.0, 0.0).unwrap(),
            1,
            vec![0.0; 10],
        ),
        job(
            "team-b/ghmr-sync",
            Spec::new(Loss::GhmR, 3, 0.7, 0.02).unwrap(),
            4,
            vec![0.1, 0.2, 0.3],
        ),
    ]
}

#[test]
fn a_state_file_of_format_1_loads_into_the_same_jobs() {
    let bytes = std::fs::read(fixture()).expect("the format-1 fixture");
    assert_eq!(&bytes[..8], persist::MAGIC);
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    let jobs = persist::decode(&bytes).expect("format 1 loads");
    assert_eq!(jobs, format1_jobs());
}

/// A ghmd started on a data dir holding the fixture serves those jobs: the registry's checks
/// for a state file accept every one.
#[tokio::test]
async fn a_ghmd_starts_on_a_format_1_state_file_with_its_jobs() {
    let dir = TempDir::new("format1");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(fixture(), data.join(persist::STATE_FILE)).unwrap();
    let server = TestServer::start_with(move |config| {
        config.in_memory = false;
        config.data_dir = data;
        config.snapshot_interval = Duration::from_secs(3600);
    })
    .await;
    let mut jobs = server.registry.snapshots();
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(jobs, format1_jobs());
}

/// Holds only while ghmd writes format 1: it shows the fixture is what format 1 writes, byte for
/// byte. When `VERSION` moves on, delete this test and keep the fixture and the test above.
#[test]
fn the_fixture_is_what_format_1_writes() {
    assert_eq!(persist::VERSION, 1, "see this test's comment");
    let written = persist::encode(&format1_jobs());
    if std::env::var_os("GHMD_WRITE_STATE_FIXTURE").is_some() {
        std::fs::write(fixture(), &written).unwrap();
    }
    assert_eq!(
        written,
        std::fs::read(fixture()).expect("the format-1 fixture")
    );
}
