use super::BatchCounts;

/// The EMA gradient density of one job: mmdetection's `acc_sum` buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Density {
    acc_sum: Vec<f32>,
}

/// What one step yields for every element of every rank: the weight of a valid element per bin.
#[derive(Clone, Debug, PartialEq)]
pub struct BinTable {
    /// M + 1 entries: the last one is the weight of an invalid element, 0, so that the weight
    /// pass can look every element up without a branch.
    lookup: Vec<f32>,
    /// `max(tot, 1)`, as the reference uses it.
    pub tot: f64,
    /// n: bins with at least one valid element this step.
    pub nonempty_bins: u32,
}

impl BinTable {
    /// M entries: 0 for a bin with no valid element this step.
    pub fn bin_weights(&self) -> &[f32] {
        &self.lookup[..self.lookup.len() - 1]
    }

    pub(super) fn lookup_with_invalid_slot(&self) -> &[f32] {
        &self.lookup
    }
}

impl Density {
    pub fn new(bins: usize) -> Self {
        Self {
            acc_sum: vec![0.0; bins],
        }
    }

    /// A density restored from a checkpoint; the caller checks the length and values.
    pub fn from_acc_sum(acc_sum: Vec<f32>) -> Self {
        Self { acc_sum }
    }

    pub fn acc_sum(&self) -> &[f32] {
        &self.acc_sum
    }

    /// Applies one step's counts and returns the weights of that step, in the reference's exact
    /// float32 operation order (see tests/data/conformance/README.md). With momentum 0 the
    /// density is left untouched: such a job has no state.
    pub fn step(&mut self, momentum: f64, counts: &BatchCounts) -> BinTable {
        let bins = self.acc_sum.len();
        let tot = counts.tot.max(1.0);
        let mut lookup = vec![0.0f32; bins + 1];
        let mut nonempty_bins = 0u32;
        for (bin, &count) in counts.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            nonempty_bins += 1;
            lookup[bin] = if momentum > 0.0 {
                let acc = &mut self.acc_sum[bin];
                *acc = (momentum as f32) * *acc + ((1.0 - momentum) * count as f64) as f32;
                (1.0f32 / *acc) * (tot as f32)
            } else {
                (tot / count as f64) as f32
            };
        }
        if nonempty_bins > 0 {
            let n = nonempty_bins as f32;
            for weight in &mut lookup[..bins] {
                *weight /= n;
            }
        }
        BinTable {
            lookup,
            tot,
            nonempty_bins,
        }
    }
}
