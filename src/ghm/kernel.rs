use super::{BinEdges, BinTable, InputError, InputField, Loss};

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

/// Elements per validation block: small enough that finding the first bad index again is cheap,
/// large enough that the check after each block costs nothing.
const BLOCK: usize = 4096;
/// Independent partial histograms, so that runs of equal bins (the flood of easy examples) do
/// not serialise on one counter's store-to-load latency.
const LANES: usize = 4;

fn as_float32s(bytes: &[u8], field: InputField) -> Result<&[[u8; 4]], InputError> {
    let (floats, rest) = bytes.as_chunks::<4>();
    if rest.is_empty() {
        Ok(floats)
    } else {
        Err(InputError::NotFloat32 {
            field,
            len: bytes.len(),
        })
    }
}

/// A batch's norms and optional label weights, as little-endian float32 values.
pub type BatchViews<'a> = (&'a [[u8; 4]], Option<&'a [[u8; 4]]>);

/// Reads the float32 arrays of a request from their little-endian bytes, with no assumption on
/// their alignment, and checks that the label weights match the norms.
pub fn float32_views<'a>(
    norms: &'a [u8],
    norms_field: InputField,
    label_weights: Option<&'a [u8]>,
) -> Result<BatchViews<'a>, InputError> {
    let norms = as_float32s(norms, norms_field)?;
    let label_weights = match label_weights {
        None => None,
        Some(bytes) => {
            let weights = as_float32s(bytes, InputField::LabelWeights)?;
            if weights.len() != norms.len() {
                return Err(InputError::LengthMismatch {
                    field: norms_field,
                    expected: norms.len(),
                    got: weights.len(),
                });
            }
            Some(weights)
        }
    };
    Ok((norms, label_weights))
}

#[inline(always)]
fn f32_at(bytes: &[u8; 4]) -> f32 {
    f32::from_le_bytes(*bytes)
}

/// Label weights are multipliers of a loss: negative, NaN or infinite ones are client bugs.
#[inline(always)]
fn label_weight_ok(w: f32) -> bool {
    (0.0..f32::INFINITY).contains(&w)
}

const LABEL_WEIGHT_EXPECTED: &str = "finite and >= 0";

fn norm_expected(loss: Loss) -> &'static str {
    match loss {
        Loss::GhmC => "in [0, 1] (GHM-C gradient norm)",
        Loss::GhmR => "in [0, 1000) (GHM-R gradient norm)",
    }
}

/// Pass one: validates every element and counts the valid ones per bin.
///
/// `norms_field` names the field errors point at (norms derived from residuals are reported
/// against `residuals`). Nothing is counted anywhere unless the whole batch is valid, so a
/// rejected batch cannot change a job.
pub fn count_batch(
    loss: Loss,
    edges: &BinEdges,
    norms: &[[u8; 4]],
    norms_field: InputField,
    label_weights: Option<&[[u8; 4]]>,
) -> Result<BatchCounts, InputError> {
    let bins = edges.bins();
    // One extra slot per lane takes the invalid elements, so that no element branches on its
    // label weight.
    let stride = bins + 1;
    let mut lanes = vec![0u64; LANES * stride];
    let mut label_weight_sum = 0.0f64;

    for (block_index, block) in norms.chunks(BLOCK).enumerate() {
        let start = block_index * BLOCK;
        let mut norms_ok = true;
        match label_weights {
            None => {
                for (k, g) in block.iter().enumerate() {
                    let g = f32_at(g);
                    norms_ok &= edges.accepts(g);
                    lanes[(k % LANES) * stride + edges.bin_of(g)] += 1;
                }
            }
            Some(weights) => {
                let weights = &weights[start..start + block.len()];
                let mut weights_ok = true;
                let mut block_sum = 0.0f64;
                for (k, (g, w)) in block.iter().zip(weights).enumerate() {
                    let (g, w) = (f32_at(g), f32_at(w));
                    norms_ok &= edges.accepts(g);
                    weights_ok &= label_weight_ok(w);
                    block_sum += f64::from(w);
                    let slot = if w > 0.0 { edges.bin_of(g) } else { bins };
                    lanes[(k % LANES) * stride + slot] += 1;
                }
                if !weights_ok {
                    let (offset, w) = first_bad(weights, label_weight_ok);
                    return Err(InputError::BadValue {
                        field: InputField::LabelWeights,
                        index: start + offset,
                        value: w,
                        expected: LABEL_WEIGHT_EXPECTED,
                    });
                }
                label_weight_sum += block_sum;
            }
        }
        if !norms_ok {
            let (offset, g) = first_bad(block, |g| edges.accepts(g));
            return Err(InputError::BadValue {
                field: norms_field,
                index: start + offset,
                value: g,
                expected: norm_expected(loss),
            });
        }
    }

    let mut counts = vec![0u64; bins];
    for lane in lanes.chunks_exact(stride) {
        for (total, &count) in counts.iter_mut().zip(lane) {
            *total += count;
        }
    }
    let tot = match (loss, label_weights) {
        (Loss::GhmC, _) => counts.iter().sum::<u64>() as f64,
        (Loss::GhmR, None) => norms.len() as f64,
        (Loss::GhmR, Some(_)) => label_weight_sum,
    };
    Ok(BatchCounts { counts, tot })
}

fn first_bad(values: &[[u8; 4]], ok: impl Fn(f32) -> bool) -> (usize, f32) {
    values
        .iter()
        .map(f32_at)
        .enumerate()
        .find(|&(_, v)| !ok(v))
        // Only called once a block is known to hold a bad value.
        .unwrap_or((0, f32::NAN))
}

/// Derives GHM-R gradient norms from residuals `d = pred - target` exactly as mmdetection does in
/// float32: `|d / sqrt(mu * mu + d * d)|`, where `mu * mu` is taken in f64 and rounded once.
pub fn norms_from_residuals(residuals: &[[u8; 4]], mu: f64) -> Result<Vec<[u8; 4]>, InputError> {
    let mu_squared = (mu * mu) as f32;
    let mut norms = Vec::with_capacity(residuals.len());
    for (index, d) in residuals.iter().map(f32_at).enumerate() {
        if !d.is_finite() {
            return Err(InputError::BadValue {
                field: InputField::Residuals,
                index,
                value: d,
                expected: "finite",
            });
        }
        let g = (d / (mu_squared + d * d).sqrt()).abs();
        norms.push(g.to_le_bytes());
    }
    Ok(norms)
}

/// Checks a client-computed histogram and turns it into the batch counts it stands for.
pub fn validate_histogram(
    loss: Loss,
    bins: usize,
    counts: &[u64],
    tot: f64,
) -> Result<BatchCounts, InputError> {
    if counts.len() != bins {
        return Err(InputError::HistogramLength {
            expected: bins,
            got: counts.len(),
        });
    }
    if !(tot.is_finite() && tot >= 0.0) {
        return Err(InputError::HistogramTot { tot });
    }
    let valid = counts
        .iter()
        .try_fold(0u64, |sum, &c| sum.checked_add(c))
        .ok_or(InputError::HistogramOverflow)?;
    if loss == Loss::GhmC && tot != valid as f64 {
        return Err(InputError::HistogramTotMismatch { tot, count: valid });
    }
    Ok(BatchCounts {
        counts: counts.to_vec(),
        tot,
    })
}

/// Pass two: every element gets its bin's weight, or 0 when its label weight is not > 0.
/// Returns the little-endian float32 bytes of the weights, ready to be sent.
pub fn write_weights(
    edges: &BinEdges,
    table: &BinTable,
    norms: &[[u8; 4]],
    label_weights: Option<&[[u8; 4]]>,
) -> Vec<u8> {
    let lookup = table.lookup_with_invalid_slot();
    let invalid = edges.bins();
    let mut out = vec![0u8; norms.len() * 4];
    let (slots, _) = out.as_chunks_mut::<4>();
    match label_weights {
        None => {
            for (slot, g) in slots.iter_mut().zip(norms) {
                *slot = lookup[edges.bin_of(f32_at(g))].to_le_bytes();
            }
        }
        Some(weights) => {
            for ((slot, g), w) in slots.iter_mut().zip(norms).zip(weights) {
                let bin = if f32_at(w) > 0.0 {
                    edges.bin_of(f32_at(g))
                } else {
                    invalid
                };
                *slot = lookup[bin].to_le_bytes();
            }
        }
    }
    out
}
