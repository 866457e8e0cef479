//! The O(elements) passes over a batch: validating and binning its norms (keeping each
//! element's bin, or only counting), and writing each element's weight from a step's table.

use super::slots::{
    ByteLanes, CHUNK, Checks, CompareTally, Slot, Tally, WideLanes, bin_chunk, byte_lookup, f32_at,
    label_weight_ok, vectorised, weigh_slots,
};
use super::{BatchCounts, BinEdges, BinTable, InputError, InputField, Loss};

/// Elements per validation block: small enough that finding the first bad index again is cheap,
/// large enough that the check after each block costs nothing.
const BLOCK: usize = 4096;

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
    let batch = Batch {
        loss,
        edges,
        norms,
        norms_field,
        label_weights,
    };
    vectorised(
        #[inline(always)]
        || {
            let slots = edges.bins() + 1;
            if slots <= CompareTally::MAX_SLOTS {
                batch.pass_one::<u8, _>(CompareTally::new(slots), None)
            } else if slots <= u8::CAPACITY {
                batch.pass_one::<u8, _>(ByteLanes::new(), None)
            } else {
                batch.pass_one::<u16, _>(WideLanes::new(slots), None)
            }
        },
    )
}

/// Pass one that also keeps every element's bin, so that pass two
/// ([`BinnedBatch::write_weights`]) reads one byte per element instead of the eight of the
/// norms and label weights, and the request's buffers can be let go of before it.
pub fn bin_batch(
    loss: Loss,
    edges: &BinEdges,
    norms: &[[u8; 4]],
    norms_field: InputField,
    label_weights: Option<&[[u8; 4]]>,
) -> Result<BinnedBatch, InputError> {
    let batch = Batch {
        loss,
        edges,
        norms,
        norms_field,
        label_weights,
    };
    vectorised(
        #[inline(always)]
        || {
            let slot_count = edges.bins() + 1;
            if slot_count > u8::CAPACITY {
                let mut slots = Vec::with_capacity(norms.len());
                let counts = batch.pass_one(WideLanes::new(slot_count), Some(&mut slots))?;
                return Ok(BinnedBatch {
                    counts,
                    slots: Slots::Wide(slots),
                });
            }
            let mut slots = Vec::with_capacity(norms.len());
            let counts = if slot_count <= CompareTally::MAX_SLOTS {
                batch.pass_one(CompareTally::new(slot_count), Some(&mut slots))?
            } else {
                batch.pass_one(ByteLanes::new(), Some(&mut slots))?
            };
            Ok(BinnedBatch {
                counts,
                slots: Slots::Byte(slots),
            })
        },
    )
}

/// A validated batch after pass one: its counts, and each element's slot (its bin, or M when
/// its label weight is not > 0).
#[derive(Clone, Debug, PartialEq)]
pub struct BinnedBatch {
    counts: BatchCounts,
    slots: Slots,
}

#[derive(Clone, Debug, PartialEq)]
enum Slots {
    /// M < 256.
    Byte(Vec<u8>),
    Wide(Vec<u16>),
}

impl BinnedBatch {
    pub fn counts(&self) -> &BatchCounts {
        &self.counts
    }

    pub fn len(&self) -> usize {
        match &self.slots {
            Slots::Byte(slots) => slots.len(),
            Slots::Wide(slots) => slots.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pass two: every element gets its bin's weight, or 0 when its label weight is not > 0;
    /// the same bytes as [`write_weights`] on the batch this was binned from.
    pub fn write_weights(&self, table: &BinTable) -> Vec<u8> {
        let lookup = table.lookup_with_invalid_slot();
        let mut out = Vec::with_capacity(self.len());
        vectorised(
            #[inline(always)]
            || match &self.slots {
                Slots::Byte(slots) => weigh_slots(&byte_lookup(lookup), slots, &mut out),
                Slots::Wide(slots) => weigh_slots(lookup, slots, &mut out),
            },
        );
        out.into_flattened()
    }
}

/// A request's arrays and what they are checked against.
struct Batch<'a> {
    loss: Loss,
    edges: &'a BinEdges,
    norms: &'a [[u8; 4]],
    norms_field: InputField,
    label_weights: Option<&'a [[u8; 4]]>,
}

impl Batch<'_> {
    /// Validates, bins and counts, block by block; keeps the slots in `keep` if given.
    #[inline(always)]
    fn pass_one<S: Slot, T: Tally<S>>(
        &self,
        mut tally: T,
        mut keep: Option<&mut Vec<S>>,
    ) -> Result<BatchCounts, InputError> {
        let Self {
            loss,
            edges,
            norms,
            norms_field,
            label_weights,
        } = *self;
        let mut scratch = [S::default(); CHUNK];
        let mut label_weight_sum = 0.0f64;
        for (block_index, block) in norms.chunks(BLOCK).enumerate() {
            let start = block_index * BLOCK;
            let block_weights = label_weights.map(|weights| &weights[start..start + block.len()]);
            let mut checks = Checks::default();
            for (chunk_index, chunk) in block.chunks(CHUNK).enumerate() {
                let offset = chunk_index * CHUNK;
                let chunk_weights =
                    block_weights.map(|weights| &weights[offset..offset + chunk.len()]);
                let slots = &mut scratch[..chunk.len()];
                checks.merge(bin_chunk::<S, true>(edges, chunk, chunk_weights, slots));
                tally.add(slots);
                if let Some(keep) = keep.as_deref_mut() {
                    keep.extend_from_slice(slots);
                }
            }
            tally.flush();
            if let Some(weights) = block_weights {
                if checks.weights_bad {
                    let (offset, w) = first_bad(weights, label_weight_ok);
                    return Err(InputError::BadValue {
                        field: InputField::LabelWeights,
                        index: start + offset,
                        value: w,
                        expected: LABEL_WEIGHT_EXPECTED,
                    });
                }
                if loss == Loss::GhmR {
                    // In element order, one f64 per block, whatever the loops above do: the tot
                    // must not depend on how they are arranged.
                    label_weight_sum += weights
                        .iter()
                        .fold(0.0f64, |sum, w| sum + f64::from(f32_at(w)));
                }
            }
            if checks.norms_bad {
                let (offset, g) = first_bad(block, |g| edges.accepts(g));
                return Err(InputError::BadValue {
                    field: norms_field,
                    index: start + offset,
                    value: g,
                    expected: norm_expected(loss),
                });
            }
        }
        let counts = tally.counts(edges.bins());
        let tot = match (loss, label_weights) {
            (Loss::GhmC, _) => counts.iter().sum::<u64>() as f64,
            (Loss::GhmR, None) => norms.len() as f64,
            (Loss::GhmR, Some(_)) => label_weight_sum,
        };
        Ok(BatchCounts { counts, tot })
    }
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
/// Returns the little-endian float32 bytes of the weights, ready to be sent. Bins again what
/// [`count_batch`] binned; [`bin_batch`] keeps the bins instead.
pub fn write_weights(
    edges: &BinEdges,
    table: &BinTable,
    norms: &[[u8; 4]],
    label_weights: Option<&[[u8; 4]]>,
) -> Vec<u8> {
    let lookup = table.lookup_with_invalid_slot();
    vectorised(
        #[inline(always)]
        || {
            if edges.bins() < u8::CAPACITY {
                rebin_and_weigh::<u8>(edges, &byte_lookup(lookup), norms, label_weights)
            } else {
                rebin_and_weigh::<u16>(edges, lookup, norms, label_weights)
            }
        },
    )
}

#[inline(always)]
fn rebin_and_weigh<S: Slot>(
    edges: &BinEdges,
    lookup: &[f32],
    norms: &[[u8; 4]],
    label_weights: Option<&[[u8; 4]]>,
) -> Vec<u8> {
    // Not zeroed: every weight is written once, below, and zeroing 64 MB costs about as much as
    // weighing it.
    let mut out = Vec::with_capacity(norms.len());
    let mut scratch = [S::default(); CHUNK];
    for (chunk_index, chunk) in norms.chunks(CHUNK).enumerate() {
        let start = chunk_index * CHUNK;
        let chunk_weights = label_weights.map(|w| &w[start..start + chunk.len()]);
        let slots = &mut scratch[..chunk.len()];
        bin_chunk::<S, false>(edges, chunk, chunk_weights, slots);
        weigh_slots(lookup, slots, &mut out);
    }
    out.into_flattened()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ghm::Density;

    // The seeded generator shared by the repo's tests and benches, so that every run checks
    // the same batches.
    use crate::synthetic::SplitMix as Rng;

    /// Norms that hit every path: tiny ones, a spread, the ends, edges and their neighbours.
    fn norms(edges: &BinEdges, len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let g = match rng.next_u64() % 6 {
                    0 => rng.unit() * 1e-3,
                    1 | 2 => rng.unit() * edges.max_norm().min(1.5),
                    3 => {
                        let e = edges.edges()[(rng.next_u64() as usize) % edges.edges().len()];
                        let ulps = (rng.next_u64() % 9) as i64 - 4;
                        f32::from_bits((i64::from(e.to_bits()) + ulps).max(0) as u32)
                    }
                    4 => [0.0, 1.0, edges.max_norm()][(rng.next_u64() % 3) as usize],
                    _ => rng.unit(),
                };
                g.min(edges.max_norm())
            })
            .collect()
    }

    fn label_weights(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len)
            .map(|_| match rng.next_u64() % 5 {
                0 => 0.0,
                1 => rng.unit() * 3.0,
                _ => 1.0,
            })
            .collect()
    }

    fn le(values: &[f32]) -> Vec<[u8; 4]> {
        values.iter().map(|v| v.to_le_bytes()).collect()
    }

    /// The reference's loop, one element at a time.
    fn reference(
        loss: Loss,
        edges: &BinEdges,
        norms: &[f32],
        label_weights: Option<&[f32]>,
    ) -> BatchCounts {
        let mut counts = vec![0u64; edges.bins()];
        let mut weight_sum = 0.0f64;
        for (i, &g) in norms.iter().enumerate() {
            let w = label_weights.map_or(1.0, |w| w[i]);
            weight_sum += f64::from(w);
            if w > 0.0 {
                counts[edges.bin_of(g)] += 1;
            }
        }
        let tot = match (loss, label_weights) {
            (Loss::GhmC, _) => counts.iter().sum::<u64>() as f64,
            (Loss::GhmR, None) => norms.len() as f64,
            (Loss::GhmR, Some(_)) => weight_sum,
        };
        BatchCounts { counts, tot }
    }

    #[test]
    fn both_passes_match_the_element_by_element_reference_at_every_vector_level() {
        use crate::ghm::slots::{LEVEL_CAP, Level};
        for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
            LEVEL_CAP.with(|cap| cap.set(level));
            both_passes_match_the_element_by_element_reference();
        }
    }

    fn both_passes_match_the_element_by_element_reference() {
        let mut rng = Rng(7);
        // Sizes around the chunk (512), block (4096) and vector widths; bin counts on each
        // side of the byte and compare-tally limits.
        let sizes = [0, 1, 7, 63, 64, 65, 511, 512, 513, 4095, 4096, 4097, 9000];
        let all_bins = [1, 2, 10, 30, 31, 32, 100, 254, 255, 256, 4096];
        for loss in [Loss::GhmC, Loss::GhmR] {
            for bins in all_bins {
                let edges = BinEdges::new(loss, bins);
                for len in sizes {
                    let g = norms(&edges, len, &mut rng);
                    let w = label_weights(len, &mut rng);
                    for weights in [None, Some(w.as_slice())] {
                        let context =
                            format!("{loss:?} M={bins} len={len} weights={}", weights.is_some());
                        let expected = reference(loss, &edges, &g, weights);
                        let (norms_le, weights_le) = (le(&g), weights.map(le));
                        let weights_le = weights_le.as_deref();
                        let field = InputField::GradientNorms;
                        let counts = count_batch(loss, &edges, &norms_le, field, weights_le)
                            .expect("valid batch");
                        assert_eq!(counts, expected, "{context}: count_batch");
                        let binned = bin_batch(loss, &edges, &norms_le, field, weights_le)
                            .expect("valid batch");
                        assert_eq!(binned.counts(), &expected, "{context}: bin_batch");
                        assert_eq!(binned.len(), len);

                        let table = Density::new(bins).step(0.75, &expected);
                        let lookup = table.lookup_with_invalid_slot();
                        let expected_weights: Vec<u8> = g
                            .iter()
                            .enumerate()
                            .flat_map(|(i, &g)| {
                                let valid = weights.is_none_or(|w| w[i] > 0.0);
                                let weight = if valid { lookup[edges.bin_of(g)] } else { 0.0 };
                                weight.to_le_bytes()
                            })
                            .collect();
                        assert_eq!(
                            write_weights(&edges, &table, &norms_le, weights_le),
                            expected_weights,
                            "{context}: write_weights"
                        );
                        assert_eq!(
                            binned.write_weights(&table),
                            expected_weights,
                            "{context}: BinnedBatch::write_weights"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_bad_element_is_named_wherever_it_is() {
        let edges = BinEdges::new(Loss::GhmC, 30);
        let field = InputField::GradientNorms;
        for index in [0, 63, 64, 511, 512, 4095, 4096, 8191, 9999] {
            for bad in [f32::NAN, -0.5, 1.5, f32::INFINITY] {
                let mut g = vec![0.25f32; 10_000];
                g[index] = bad;
                // A second bad value later in the same block must not be the one reported.
                if index + 1 < g.len() {
                    g[index + 1] = -1.0;
                }
                for result in [
                    count_batch(Loss::GhmC, &edges, &le(&g), field, None).map(|_| ()),
                    bin_batch(Loss::GhmC, &edges, &le(&g), field, None).map(|_| ()),
                ] {
                    match result {
                        Err(InputError::BadValue {
                            field: InputField::GradientNorms,
                            index: reported,
                            value,
                            ..
                        }) => {
                            assert_eq!(reported, index, "{bad}");
                            assert_eq!(value.to_bits(), bad.to_bits());
                        }
                        other => panic!("{bad} at {index}: {other:?}"),
                    }
                }
            }
            let g = vec![0.25f32; 10_000];
            let mut w = vec![1.0f32; 10_000];
            w[index] = -1.0;
            let result = bin_batch(Loss::GhmC, &edges, &le(&g), field, Some(&le(&w)));
            match result {
                Err(InputError::BadValue {
                    field: InputField::LabelWeights,
                    index: reported,
                    ..
                }) => assert_eq!(reported, index),
                other => panic!("label weight -1 at {index}: {other:?}"),
            }
        }
    }
}
