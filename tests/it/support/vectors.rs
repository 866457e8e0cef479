//! The conformance vectors of tests/data/conformance, produced by mmdetection's own code.

use std::path::PathBuf;

use ghmd::proto::{Eqlv2Spec, JobSpec, SeesawSpec};
use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    pub loss: String,
    pub bins: u32,
    pub momentum: f64,
    #[serde(default)]
    pub mu: f64,
    pub steps: Vec<Step>,
}

#[derive(Deserialize, Debug)]
pub struct Step {
    pub gradient_norms: Vec<f64>,
    #[serde(default)]
    pub residuals: Vec<f64>,
    pub label_weights: Vec<f64>,
    pub expected: Expected,
}

#[derive(Deserialize, Debug)]
pub struct Expected {
    pub weights: Vec<f64>,
    pub tot: f64,
    pub nonempty_bins: u32,
    #[serde(default)]
    pub acc_sum: Vec<f64>,
}

/// Every JSON number in the vectors is the shortest decimal of a float32.
pub fn f32s(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

impl Case {
    pub fn is_ghm_r(&self) -> bool {
        self.loss == "ghm_r"
    }

    pub fn loss(&self) -> ghmd::ghm::Loss {
        if self.is_ghm_r() {
            ghmd::ghm::Loss::GhmR
        } else {
            ghmd::ghm::Loss::GhmC
        }
    }

    pub fn proto_spec(&self) -> JobSpec {
        let spec = if self.is_ghm_r() {
            super::ghm_r(self.bins, self.momentum)
        } else {
            super::ghm_c(self.bins, self.momentum)
        };
        JobSpec {
            mu: self.mu,
            ..spec
        }
    }
}

/// The GHM cases (`ghm*.json`); the other methods' vectors beside them have their own shapes.
pub fn conformance_cases() -> Vec<Case> {
    let cases = cases_named("ghm");
    assert!(cases.len() >= 5, "GHM conformance vectors missing");
    cases
}

/// Every case of tests/data/conformance whose file name starts with `prefix`, in name order.
pub fn cases_named<T: DeserializeOwned>(prefix: &str) -> Vec<T> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(prefix))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("readable case");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
        })
        .collect()
}

/// A `seesaw_*.json` case: mmdetection's `SeesawLoss` over a sequence of steps.
#[derive(Deserialize, Debug)]
pub struct SeesawCase {
    pub name: String,
    pub num_classes: u32,
    pub p: f64,
    pub q: f64,
    pub eps: f64,
    pub steps: Vec<SeesawStep>,
}

/// The counts-only case has no samples, only `expected`.
#[derive(Deserialize, Debug)]
pub struct SeesawStep {
    #[serde(default)]
    pub labels: Vec<i64>,
    #[serde(default)]
    pub label_weights: Vec<f64>,
    pub expected: SeesawExpected,
}

#[derive(Deserialize, Debug)]
pub struct SeesawExpected {
    pub label_counts: Vec<u64>,
    pub cum_samples: Vec<f64>,
}

/// An `eqlv2_*.json` case: mmdetection's `EQLV2Loss` over a sequence of steps.
#[derive(Deserialize, Debug)]
pub struct Eqlv2Case {
    pub name: String,
    pub num_classes: u32,
    pub gamma: f64,
    pub mu: f64,
    pub alpha: f64,
    pub steps: Vec<Eqlv2Step>,
}

#[derive(Deserialize, Debug)]
pub struct Eqlv2Step {
    /// N rows of C + 1 logits, row-major.
    pub cls_score: Vec<f64>,
    pub labels: Vec<i64>,
    pub expected: Eqlv2Expected,
}

#[derive(Deserialize, Debug)]
pub struct Eqlv2Expected {
    pub pos_neg_before: Vec<f64>,
    pub pos_w: Vec<f64>,
    pub neg_w: Vec<f64>,
    pub pos_grad_contribution: Vec<f64>,
    pub neg_grad_contribution: Vec<f64>,
    pub pos_grad: Vec<f64>,
    pub neg_grad: Vec<f64>,
    pub pos_neg: Vec<f64>,
}

pub fn seesaw_cases() -> Vec<SeesawCase> {
    let cases: Vec<SeesawCase> = cases_named("seesaw_");
    assert!(cases.len() >= 2, "Seesaw conformance vectors missing");
    cases
}

pub fn eqlv2_cases() -> Vec<Eqlv2Case> {
    let cases: Vec<Eqlv2Case> = cases_named("eqlv2_");
    assert!(!cases.is_empty(), "EQLv2 conformance vectors missing");
    cases
}

impl SeesawCase {
    /// The case's parameters, each given, so that no default of the server's is assumed.
    pub fn proto_spec(&self) -> JobSpec {
        super::spec::with_seesaw(SeesawSpec {
            num_classes: self.num_classes,
            p: Some(self.p),
            q: Some(self.q),
            eps: Some(self.eps),
        })
    }
}

impl Eqlv2Case {
    pub fn proto_spec(&self) -> JobSpec {
        super::spec::with_eqlv2(Eqlv2Spec {
            num_classes: self.num_classes,
            gamma: Some(self.gamma),
            mu: Some(self.mu),
            alpha: Some(self.alpha),
        })
    }
}
