//! The body of the `snapshot_load` fuzz target, shared with `tests/it/fuzz_regressions.rs`.
//!
//! One input is: a selector byte, then bytes. With an even selector the bytes are a payload and
//! the harness puts a valid header (magic, version, CRC, length) in front, so that the fuzzer
//! explores the job decoder instead of failing the checksum; with an odd one they are the whole
//! file. What decodes is re-encoded (it must decode to the same jobs), loaded into a registry as
//! the server does at start-up, and every loaded job is then read and weighed once.
//!
//! A crash is a panic, an internal error, a round trip that changes a job, or a weight that is
//! not a finite number >= 0.

use ghmd::jobs::{BatchInput, JobError, Registry, RegistryLimits, StepInput};
use ghmd::method::{AnyTable, MethodSpec};
use ghmd::persist::{HEADER_LEN, MAGIC, VERSION, decode, encode};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes were refused by the decoder or by the registry.
    Refused,
    /// Jobs were loaded; this many were weighed afterwards.
    Loaded { weighed: usize },
}

fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&VERSION.to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(payload);
    file
}

fn check(error: &JobError) {
    assert!(
        !matches!(error, JobError::Internal(_)),
        "a server bug: {error}"
    );
}

pub fn run(data: &[u8]) -> Outcome {
    let Some((&selector, rest)) = data.split_first() else {
        return Outcome::Refused;
    };
    let bytes = if selector & 1 == 0 {
        with_header(rest)
    } else {
        rest.to_vec()
    };
    let Ok(jobs) = decode(&bytes) else {
        return Outcome::Refused;
    };
    // Compared as bytes: a NaN in a density (which the registry refuses below) is not equal to
    // itself, but its bits must survive.
    let encoded = encode(&jobs);
    let again = decode(&encoded).map(|jobs| encode(&jobs));
    assert_eq!(
        again.as_ref().ok(),
        Some(&encoded),
        "a round trip changed the jobs"
    );

    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
    else {
        return Outcome::Refused;
    };
    runtime.block_on(async move {
        let registry = Registry::new(RegistryLimits::default());
        let mut loaded = Vec::new();
        for job in jobs {
            let id = job.id.clone();
            let spec = job.spec.clone();
            let next_step = job.next_step;
            match registry.insert_snapshot(job) {
                Ok(()) => loaded.push((id, spec, next_step)),
                Err(error) => {
                    check(&error);
                    return Outcome::Refused;
                }
            }
        }
        let mut weighed = 0;
        for (id, spec, next_step) in loaded {
            let job = match registry.get(&id) {
                Ok(job) => job,
                Err(error) => {
                    check(&error);
                    continue;
                }
            };
            let _ = job.snapshot();
            // Step-synchronous jobs wait for their other ranks until step_timeout, which the
            // paused clock skips; an asynchronous one is weighed at once.
            let input = StepInput {
                step: next_step,
                rank: 0,
                batch: contribution_of(&spec.method),
                label_weights: None,
            };
            match registry.harmonize(&id, input).await {
                Ok(outcome) => {
                    if let AnyTable::Ghm(table) = &outcome.applied.table {
                        for w in table.bin_weights() {
                            assert!(w.is_finite() && *w >= 0.0, "{id}: bin weight {w}");
                        }
                    }
                    weighed += 1;
                }
                Err(error) => check(&error),
            }
        }
        Outcome::Loaded { weighed }
    })
}

/// A small valid contribution to a job of `method`.
fn contribution_of(method: &MethodSpec) -> BatchInput {
    match method {
        MethodSpec::Ghm(ghm) => {
            let bins = ghm.spec.bins();
            let mut counts = vec![0u64; bins];
            counts[bins / 2] = 3;
            BatchInput::Histogram { counts, tot: 3.0 }
        }
        MethodSpec::Seesaw(seesaw) => {
            let mut counts = vec![0u64; seesaw.labels()];
            counts[0] = 3;
            BatchInput::SeesawCounts(counts)
        }
        MethodSpec::Eqlv2(eqlv2) => {
            let ones: Vec<u8> = std::iter::repeat_n(1.0f32.to_le_bytes(), eqlv2.num_classes())
                .flatten()
                .collect();
            BatchInput::Eqlv2 {
                pos_grad: ones.clone().into(),
                neg_grad: ones.into(),
            }
        }
    }
}
