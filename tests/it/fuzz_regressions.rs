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
        if name.starts_with("seed-bad-") {
            assert_eq!(
                outcome,
                harness::Outcome::Refused(tonic::Code::InvalidArgument)
            );
        } else if name.starts_with("seed-") {
            assert_eq!(outcome, harness::Outcome::Weighed, "{name}");
        }
    }
}

/// Seeds of Seesaw's and EQLv2's messages, each member of every new oneof: the two new inputs of
/// a HarmonizeRequest, the two new specs of a CreateJobRequest (decoded by spec index 7) and the
/// two new states of a RestoreJobRequest (selector bit 0x20). Written here as messages, so that
/// what a seed holds is read in code; `GHMD_WRITE_FUZZ_SEEDS=1` writes the files, else the test
/// checks that the committed files are these bytes.
fn method_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use ghmd::client::f32s_to_bytes;
    use ghmd::proto::harmonize_request::Input;
    use ghmd::proto::{
        CreateJobRequest, Eqlv2Contribution, Eqlv2Spec, Eqlv2State, HarmonizeRequest, JobSpec,
        JobState, RestoreJobRequest, SeesawContribution, SeesawSpec, SeesawState, job_spec,
        job_state,
    };
    use prost::Message;

    let request = |rank: u32, input: Input| HarmonizeRequest {
        rank,
        input: Some(input),
        ..Default::default()
    };
    let counts = |label_counts: Vec<u64>| {
        Input::Seesaw(SeesawContribution {
            label_counts,
            labels: Vec::new(),
        })
    };
    let labels = |labels: Vec<i64>| {
        Input::Seesaw(SeesawContribution {
            label_counts: Vec::new(),
            labels,
        })
    };
    let grads = |pos_grad: &[f32], neg_grad: &[f32]| {
        Input::Eqlv2(Eqlv2Contribution {
            pos_grad: f32s_to_bytes(pos_grad),
            neg_grad: f32s_to_bytes(neg_grad),
        })
    };
    let seed = |selector: u8, prefix: Option<Vec<u8>>, request: HarmonizeRequest| {
        let mut bytes = vec![selector];
        if let Some(prefix) = prefix {
            bytes.push(u8::try_from(prefix.len()).expect("a prefix of at most 255 bytes"));
            bytes.extend(prefix);
        }
        bytes.extend(request.encode_to_vec());
        bytes
    };
    let created = |method: job_spec::Method| {
        CreateJobRequest {
            spec: Some(JobSpec {
                method: Some(method),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let restored = |method_state: job_state::MethodState| {
        RestoreJobRequest {
            state: Some(JobState {
                steps: 2,
                method_state: Some(method_state),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let lvis_labels: Vec<i64> = (0..512).map(|i| (i * 467) % 1204).collect();
    let lvis_pos: Vec<f32> = (0..1203).map(|i| (i % 7) as f32 * 0.25).collect();
    let lvis_neg: Vec<f32> = (0..1203).map(|i| (i % 11) as f32 * 1.5).collect();
    let (pos, neg) = (
        [0.5f32, 0.0, 1.25, 3.0, 0.125],
        [2.0f32, 4.5, 0.0, 1.0, 7.0],
    );
    vec![
        (
            "seed-seesaw-counts",
            seed(0x10, None, request(0, counts(vec![3, 0, 1, 0, 2, 10]))),
        ),
        (
            "seed-seesaw-lvis-labels",
            seed(0x11, None, request(0, labels(lvis_labels))),
        ),
        (
            "seed-eqlv2-grads",
            seed(0x12, None, request(0, grads(&pos, &neg))),
        ),
        (
            "seed-eqlv2-lvis",
            seed(0x13, None, request(0, grads(&lvis_pos, &lvis_neg))),
        ),
        (
            "seed-sync-seesaw",
            seed(0x14, None, request(0, labels(vec![0, 5, 5, 2]))),
        ),
        (
            "seed-sync-eqlv2",
            seed(0x15, None, request(1, grads(&pos, &neg))),
        ),
        (
            "seed-fuzzed-spec-seesaw",
            seed(
                0x07,
                Some(created(job_spec::Method::Seesaw(SeesawSpec {
                    num_classes: 3,
                    p: Some(0.5),
                    q: Some(0.0),
                    eps: Some(0.1),
                }))),
                request(0, counts(vec![1, 2, 0, 40])),
            ),
        ),
        (
            "seed-fuzzed-spec-eqlv2",
            seed(
                0x07,
                Some(created(job_spec::Method::Eqlv2(Eqlv2Spec {
                    num_classes: 3,
                    gamma: Some(6.0),
                    mu: Some(0.5),
                    alpha: Some(2.0),
                }))),
                request(0, grads(&pos[..3], &neg[..3])),
            ),
        ),
        (
            "seed-restore-seesaw",
            seed(
                0x30,
                Some(restored(job_state::MethodState::Seesaw(SeesawState {
                    cum_samples: vec![16_777_216.0, 3.0, 0.0, 1.0, 0.0, 500.0],
                }))),
                request(0, counts(vec![1, 0, 0, 0, 0, 2])),
            ),
        ),
        (
            "seed-restore-eqlv2",
            seed(
                0x32,
                Some(restored(job_state::MethodState::Eqlv2(Eqlv2State {
                    pos_grad: pos.to_vec(),
                    neg_grad: neg.to_vec(),
                    pos_neg: pos.iter().zip(&neg).map(|(p, n)| p / (n + 1e-10)).collect(),
                }))),
                request(0, grads(&neg, &pos)),
            ),
        ),
        (
            "seed-bad-another-method",
            seed(0x10, None, request(0, grads(&pos, &neg))),
        ),
        (
            "seed-bad-eqlv2-negative",
            seed(
                0x12,
                None,
                request(0, grads(&pos, &[1.0, 1.0, -1.0, 1.0, 1.0])),
            ),
        ),
    ]
}

#[test]
fn the_method_seeds_are_the_messages_they_name() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/harmonize_request");
    let write = std::env::var_os("GHMD_WRITE_FUZZ_SEEDS").is_some();
    for (name, bytes) in method_seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).expect("write the seed");
        }
        let saved = std::fs::read(&path).unwrap_or_else(|_| panic!("{path:?} is missing"));
        assert_eq!(
            saved, bytes,
            "{name}: GHMD_WRITE_FUZZ_SEEDS=1 writes it again"
        );
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
            // tests/data/state-v3.ghmd: a Seesaw and an EQLv2 job, and a step-synchronous one.
            "seed-methods-v3" | "seed-methods-v3-whole-file" => Some(2),
            _ => None,
        };
        if let Some(weighed) = expected {
            assert_eq!(outcome, snapshot::Outcome::Loaded { weighed }, "{name}");
        }
    }
}
