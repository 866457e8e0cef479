//! The state a step folds into: a batch's bin counts, the job's EMA density, and the table of
//! bin weights a step yields.

/// One batch's contribution to a step: what the EMA needs, nothing per element.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchCounts {
    /// Valid elements (label weight > 0) per bin, M entries.
    pub counts: Vec<u64>,
    /// The raw tot, before the reference's `max(tot, 1)`: GHM-C, the number of valid elements;
    /// GHM-R, the sum of all label weights. Summed over ranks before it is clamped.
    pub tot: f64,
}

impl BatchCounts {
    pub fn empty(bins: usize) -> Self {
        Self {
            counts: vec![0; bins],
            tot: 0.0,
        }
    }

    /// Adds another rank's counts. Integer counts make the sum independent of arrival order;
    /// the tots of GHM-R are sums of float32 label weights in f64, exact for any realistic batch.
    pub fn add(&mut self, other: &BatchCounts) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.tot += other.tot;
    }

    pub fn valid_elements(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |sum, &c| sum.saturating_add(c))
    }
}

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

    /// A table as a response reported it (a reseed's last step), so that a retry of that step
    /// is weighed exactly as the original was.
    pub fn from_bin_weights(bin_weights: &[f32], tot: f64, nonempty_bins: u32) -> Self {
        let mut lookup = Vec::with_capacity(bin_weights.len() + 1);
        lookup.extend_from_slice(bin_weights);
        lookup.push(0.0);
        Self {
            lookup,
            tot,
            nonempty_bins,
        }
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
