//! The conformance vectors of tests/data/conformance, produced by mmdetection's own code.

use std::path::PathBuf;

use ghmd::proto::JobSpec;
use serde::Deserialize;

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

pub fn conformance_cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 5, "conformance vectors missing from {dir:?}");
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("readable case");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
        })
        .collect()
}
