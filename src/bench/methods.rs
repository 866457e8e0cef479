//! Seesaw and EQLv2 at LVIS's C = 1203 (issue 11), measured as the GHM modes are:
//!
//! - `small-methods`: the `small` climb with each method's step instead of a GHM histogram
//!   (Seesaw: 1204 label counts; EQLv2: two vectors of 1203 float32), against the health check
//!   over the same connections, one job per caller;
//! - `jobs-methods`: the resident memory of an idle job of each method, each on a server of its
//!   own;
//! - `eqlv2-overlap`: what EQLv2's round trip adds to a training step when the step waits for
//!   it, and when it travels while the next forward pass runs (`overlap.rs`).

use serde::Serialize;

use super::data::SplitMix;
use super::small::Workload;
use ghmd::client::f32s_to_bytes;
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{
    Eqlv2Contribution, Eqlv2Spec, HarmonizeResponse, JobSpec, SeesawContribution, SeesawSpec,
    harmonize_response, job_spec,
};

/// LVIS v1's class count, what both methods were made for.
pub const CLASSES: u32 = 1203;

/// A method of issue 11, as the bench loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Seesaw,
    Eqlv2,
}

impl Method {
    pub const ALL: [Method; 2] = [Method::Seesaw, Method::Eqlv2];

    pub fn name(self) -> &'static str {
        match self {
            Self::Seesaw => "seesaw",
            Self::Eqlv2 => "eqlv2",
        }
    }

    /// mmdetection's defaults, left for the server to fill in.
    pub fn spec(self, world_size: u32) -> JobSpec {
        let method = match self {
            Self::Seesaw => job_spec::Method::Seesaw(SeesawSpec {
                num_classes: CLASSES,
                ..Default::default()
            }),
            Self::Eqlv2 => job_spec::Method::Eqlv2(Eqlv2Spec {
                num_classes: CLASSES,
                ..Default::default()
            }),
        };
        JobSpec {
            method: Some(method),
            world_size,
            ..Default::default()
        }
    }

    /// One rank's step, deterministic from `seed`.
    pub fn input(self, seed: u64) -> Input {
        let mut rng = SplitMix(seed);
        match self {
            Self::Seesaw => Input::Seesaw(SeesawContribution {
                label_counts: seesaw_counts(&mut rng),
                labels: Vec::new(),
            }),
            Self::Eqlv2 => {
                let (pos_grad, neg_grad) = eqlv2_grads(&mut rng);
                Input::Eqlv2(Eqlv2Contribution {
                    pos_grad: f32s_to_bytes(&pos_grad),
                    neg_grad: f32s_to_bytes(&neg_grad),
                })
            }
        }
    }

    /// A well-formed answer carries the whole state of the job's method at C = 1203.
    pub fn check(self, response: &HarmonizeResponse) -> Result<(), String> {
        // Classes per buffer: cum_samples has the background besides.
        let classes = match (self, &response.method_state) {
            (Self::Seesaw, Some(harmonize_response::MethodState::Seesaw(state))) => {
                vec![state.cum_samples.len().saturating_sub(1)]
            }
            (Self::Eqlv2, Some(harmonize_response::MethodState::Eqlv2(state))) => vec![
                state.pos_grad.len(),
                state.neg_grad.len(),
                state.pos_neg.len(),
            ],
            (_, other) => {
                return Err(format!(
                    "a {} step answered with the state {other:?}",
                    self.name()
                ));
            }
        };
        if classes.iter().all(|&n| n == CLASSES as usize) {
            Ok(())
        } else {
            Err(format!(
                "a {} step answered with a state of {classes:?} classes, not {CLASSES}",
                self.name()
            ))
        }
    }

    pub fn workload(self) -> Workload {
        Workload {
            name: self.name(),
            spec: self.spec(0),
            input: self.input(1),
            check: match self {
                Self::Seesaw => |response| Method::Seesaw.check(response),
                Self::Eqlv2 => |response| Method::Eqlv2.check(response),
            },
        }
    }
}

/// A batch of 512 RoIs as a two-stage detector samples them on LVIS: three quarters
/// background, the rest over a long tail of classes (most of the 1203 absent).
fn seesaw_counts(rng: &mut SplitMix) -> Vec<u64> {
    let mut counts = vec![0u64; CLASSES as usize + 1];
    for _ in 0..512 {
        let label = if rng.unit() < 0.75 {
            CLASSES as usize
        } else {
            // Squared: frequent classes (low ids here) far more often than rare ones.
            let u = rng.unit();
            ((u * u * CLASSES as f32) as usize).min(CLASSES as usize - 1)
        };
        counts[label] += 1;
    }
    counts
}

/// Column sums of |sigmoid(x) - y| over a batch: a positive side that is 0 for absent classes,
/// and a negative side every class has.
fn eqlv2_grads(rng: &mut SplitMix) -> (Vec<f32>, Vec<f32>) {
    (0..CLASSES)
        .map(|_| {
            let positive = if rng.unit() < 0.1 {
                rng.unit() * 4.0
            } else {
                0.0
            };
            (positive, rng.unit() * 20.0)
        })
        .unzip()
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodSmall {
    pub method: Method,
    pub num_classes: u32,
    pub report: super::SmallReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodJobs {
    pub method: Method,
    pub num_classes: u32,
    pub jobs: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_job: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inputs_have_the_sizes_of_c_1203() {
        let Input::Seesaw(seesaw) = Method::Seesaw.input(3) else {
            panic!("a Seesaw input");
        };
        assert_eq!(seesaw.label_counts.len(), 1204);
        assert_eq!(seesaw.label_counts.iter().sum::<u64>(), 512);
        let Input::Eqlv2(eqlv2) = Method::Eqlv2.input(3) else {
            panic!("an EQLv2 input");
        };
        assert_eq!(
            (eqlv2.pos_grad.len(), eqlv2.neg_grad.len()),
            (1203 * 4, 1203 * 4)
        );
    }
}
