//! What is wrong with a batch, naming the request field and the index, as clients spell them.

use std::fmt;

/// The request field an [`InputError`] is about, named as clients spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputField {
    GradientNorms,
    Residuals,
    LabelWeights,
}

impl fmt::Display for InputField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::GradientNorms => "gradient_norms",
            Self::Residuals => "residuals",
            Self::LabelWeights => "label_weights",
        })
    }
}

/// A batch the reference would weigh silently but wrongly (it gives out-of-range norms weight
/// 0, and NaN poisons its sums); the service rejects it instead, since it is a client bug.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("{field} has {len} bytes, not a multiple of 4: expected little-endian float32")]
    NotFloat32 { field: InputField, len: usize },
    #[error("label_weights has {got} elements but {field} has {expected}")]
    LengthMismatch {
        field: InputField,
        expected: usize,
        got: usize,
    },
    #[error("{field}[{index}] = {value:e}: must be {expected}")]
    BadValue {
        field: InputField,
        index: usize,
        value: f32,
        expected: &'static str,
    },
    #[error("histogram.counts has {got} entries: the job has {expected} bins")]
    HistogramLength { expected: usize, got: usize },
    #[error("histogram.counts sum past 2^64")]
    HistogramOverflow,
    #[error("histogram.tot = {tot}: must be finite and >= 0")]
    HistogramTot { tot: f64 },
    #[error(
        "histogram.tot = {tot}: a GHM-C tot is the number of valid elements, so it must equal the sum of histogram.counts ({count})"
    )]
    HistogramTotMismatch { tot: f64, count: u64 },
}
