//! Replays every input saved under `fuzz/regressions/` through the fuzz target's own harness:
//! the seeds, and every crash the fuzzer ever found (saved there once fixed), so that a
//! regression fails `cargo test` on stable without a fuzzer.

#[path = "../../fuzz/harness/harmonize.rs"]
mod harness;

#[path = "../../fuzz/harness/snapshot.rs"]
mod snapshot;

#[test]
fn every_saved_harmonize_request_input_passes_the_harness() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/harmonize_request");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions/harmonize_request")
        .map(|entry| entry.expect("entry").path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 8, "the seeds are missing from {dir:?}");
    for path in inputs {
        let data = std::fs::read(&path).expect("read");
        let outcome = std::panic::catch_unwind(|| harness::run(&data))
            .unwrap_or_else(|_| panic!("{path:?} crashes the harness again"));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // The seeds are valid requests (but one), so the harness must reach the kernels with
        // them; a harness that skips everything would fuzz nothing.
        if name == "seed-bad-nan" {
            assert_eq!(
                outcome,
                harness::Outcome::Refused(tonic::Code::InvalidArgument)
            );
        } else if name.starts_with("seed-") {
            assert_eq!(outcome, harness::Outcome::Weighed, "{name}");
        }
    }
}

#[test]
fn every_saved_snapshot_load_input_passes_the_harness() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/snapshot_load");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions/snapshot_load")
        .map(|entry| entry.expect("entry").path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 6, "the seeds are missing from {dir:?}");
    for path in inputs {
        let data = std::fs::read(&path).expect("read");
        let outcome = std::panic::catch_unwind(|| snapshot::run(&data))
            .unwrap_or_else(|_| panic!("{path:?} crashes the harness again"));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // The seeds are real state files: they load, and their asynchronous jobs are weighed.
        let expected = match name {
            "seed-no-jobs" | "seed-no-jobs-whole-file" => Some(0),
            "seed-one-job" | "seed-one-job-whole-file" => Some(1),
            "seed-three-jobs" | "seed-three-jobs-whole-file" => Some(2),
            _ => None,
        };
        if let Some(weighed) = expected {
            assert_eq!(outcome, snapshot::Outcome::Loaded { weighed }, "{name}");
        }
    }
}
