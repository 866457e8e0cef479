//! The inner loops of the two kernel passes, written for the compiler to vectorise.
//!
//! Every element gets a *slot*: its bin, or M when its label weight is not > 0, so that the
//! histogram and the weight lookup need no branch on validity. Slots are bytes when M < 256
//! (every bin count mmdetection uses), 16-bit otherwise. Binning is branch-free, table-free
//! arithmetic ([`BinEdges::fast_bin`]) over a chunk at a time; the histogram (vector compares
//! up to 32 slots, scalar counters beyond) and the weight lookups then read that chunk's slots
//! from L1.

use super::BinEdges;
use super::bins::SHIFT;

/// Elements binned at once into a scratch array on the stack: small enough to stay in L1
/// between the vectorised binning and the histogram and lookups that read it.
pub(super) const CHUNK: usize = 512;
/// Independent partial histograms, so that runs of equal bins (the flood of easy examples) do
/// not serialise on one counter's store-to-load latency.
pub(super) const LANES: usize = 8;

/// A per-element slot index: `u8` or `u16`.
pub(super) trait Slot: Copy + Default {
    /// Distinct slots the type can index; a job needs `bins + 1`.
    const CAPACITY: usize;
    /// The slot from the bits of `index + 2^23` as an f32, whose low mantissa bits hold it.
    fn from_shifted_bits(bits: u32) -> Self;
    fn index(self) -> usize;
}

impl Slot for u8 {
    const CAPACITY: usize = 1 << 8;
    #[inline(always)]
    fn from_shifted_bits(bits: u32) -> Self {
        bits as u8
    }
    #[inline(always)]
    fn index(self) -> usize {
        usize::from(self)
    }
}

impl Slot for u16 {
    const CAPACITY: usize = 1 << 16;
    #[inline(always)]
    fn from_shifted_bits(bits: u32) -> Self {
        bits as u16
    }
    #[inline(always)]
    fn index(self) -> usize {
        usize::from(self)
    }
}

#[inline(always)]
pub(super) fn f32_at(bytes: &[u8; 4]) -> f32 {
    f32::from_le_bytes(*bytes)
}

/// Label weights are multipliers of a loss: negative, NaN or infinite ones are client bugs.
/// Compared with `MAX` rather than `INFINITY`: LLVM turns `< INFINITY` into a class test that
/// it cannot vectorise well.
#[inline(always)]
pub(super) fn label_weight_ok(w: f32) -> bool {
    (0.0..=f32::MAX).contains(&w)
}

/// What binning a chunk found out, for the caller to act on once per validation block.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Checks {
    pub norms_bad: bool,
    pub weights_bad: bool,
}

impl Checks {
    pub fn merge(&mut self, other: Checks) {
        self.norms_bad |= other.norms_bad;
        self.weights_bad |= other.weights_bad;
    }
}

/// Writes each element's slot into `slots` and, when `VALIDATE`, says whether any norm or label
/// weight is out of range. The rare chunk with an element close to an inner edge is binned
/// again exactly, element by element.
#[inline(always)]
pub(super) fn bin_chunk<S: Slot, const VALIDATE: bool>(
    edges: &BinEdges,
    norms: &[[u8; 4]],
    label_weights: Option<&[[u8; 4]]>,
    slots: &mut [S],
) -> Checks {
    let invalid = edges.bins() as f32;
    // Accumulated as integers: LLVM vectorises `|=` over u32 lanes more reliably than over bool.
    let (mut norms_bad, mut weights_bad, mut unsure) = (0u32, 0u32, 0u32);
    match label_weights {
        None => {
            for (slot, g) in slots.iter_mut().zip(norms) {
                let g = f32_at(g);
                if VALIDATE {
                    norms_bad |= u32::from(!edges.accepts(g));
                }
                let (bin, sure) = edges.fast_bin(g);
                unsure |= u32::from(!sure);
                *slot = S::from_shifted_bits((bin + SHIFT).to_bits());
            }
        }
        Some(weights) => {
            for ((slot, g), w) in slots.iter_mut().zip(norms).zip(weights) {
                let (g, w) = (f32_at(g), f32_at(w));
                if VALIDATE {
                    norms_bad |= u32::from(!edges.accepts(g));
                    weights_bad |= u32::from(!label_weight_ok(w));
                }
                let (bin, sure) = edges.fast_bin(g);
                unsure |= u32::from(!sure);
                let index = if w > 0.0 { bin } else { invalid };
                *slot = S::from_shifted_bits((index + SHIFT).to_bits());
            }
        }
    }
    if unsure != 0 {
        rebin_exactly(edges, norms, label_weights, slots);
    }
    Checks {
        norms_bad: norms_bad != 0,
        weights_bad: weights_bad != 0,
    }
}

#[cold]
#[inline(never)]
fn rebin_exactly<S: Slot>(
    edges: &BinEdges,
    norms: &[[u8; 4]],
    label_weights: Option<&[[u8; 4]]>,
    slots: &mut [S],
) {
    for (index, (slot, g)) in slots.iter_mut().zip(norms).enumerate() {
        let valid = label_weights.is_none_or(|weights| f32_at(&weights[index]) > 0.0);
        if valid {
            let bin = edges.bin_of(f32_at(g)) as f32;
            *slot = S::from_shifted_bits((bin + SHIFT).to_bits());
        }
    }
}

/// Counts slots, a chunk at a time; [`Tally::flush`] is called at least every `BLOCK` elements.
pub(super) trait Tally<S: Slot> {
    fn add(&mut self, slots: &[S]);
    fn flush(&mut self) {}
    /// The counts of the first `slots` slots.
    fn counts(self, slots: usize) -> Vec<u64>;
}

/// The general histogram: `LANES` partial counters per slot, element `i` in lane `i % LANES`.
pub(super) struct LaneTally<T> {
    lanes: T,
}

/// With byte slots, 256 entries: the compiler then drops the bounds checks.
pub(super) type ByteLanes = LaneTally<[[u64; LANES]; 256]>;
pub(super) type WideLanes = LaneTally<Vec<[u64; LANES]>>;

impl ByteLanes {
    pub fn new() -> Self {
        Self {
            lanes: [[0; LANES]; 256],
        }
    }
}

impl WideLanes {
    pub fn new(slots: usize) -> Self {
        Self {
            lanes: vec![[0; LANES]; slots],
        }
    }
}

impl<S: Slot, T: AsMut<[[u64; LANES]]> + AsRef<[[u64; LANES]]>> Tally<S> for LaneTally<T> {
    #[inline(always)]
    fn add(&mut self, slots: &[S]) {
        let tally = self.lanes.as_mut();
        let (groups, rest) = slots.as_chunks::<LANES>();
        for group in groups {
            for (lane, &slot) in group.iter().enumerate() {
                tally[slot.index()][lane] += 1;
            }
        }
        for &slot in rest {
            tally[slot.index()][0] += 1;
        }
    }

    fn counts(self, slots: usize) -> Vec<u64> {
        self.lanes.as_ref()[..slots]
            .iter()
            .map(|lanes| lanes.iter().sum())
            .collect()
    }
}

/// Byte lanes of [`CompareTally`]: one vector register's worth.
const WIDTH: usize = 64;

/// The histogram of at most [`CompareTally::MAX_SLOTS`] byte slots without a scalar increment:
/// for every slot value, a pass over the chunk (in L1) compares 64 slots at a time and adds
/// the matches into byte counters. For GHM's 10 to 30 bins that is about one vector
/// instruction per element, against a load, an add and a store per element for [`LaneTally`],
/// and equal bins in a row cost nothing extra.
pub(super) struct CompareTally {
    /// Per slot value, per byte lane: matches since the last flush. A flush comes at least
    /// every `BLOCK` = 4096 elements, so a lane counts at most 4096 / 64 = 64 < 256.
    pending: [[u8; WIDTH]; Self::MAX_SLOTS],
    slots: usize,
    counts: [u64; Self::MAX_SLOTS],
}

impl CompareTally {
    pub const MAX_SLOTS: usize = 32;

    /// For `slots` <= `MAX_SLOTS` distinct values.
    pub fn new(slots: usize) -> Self {
        Self {
            pending: [[0; WIDTH]; Self::MAX_SLOTS],
            slots: slots.min(Self::MAX_SLOTS),
            counts: [0; Self::MAX_SLOTS],
        }
    }
}

impl Tally<u8> for CompareTally {
    #[inline(always)]
    fn add(&mut self, slots: &[u8]) {
        let (vectors, rest) = slots.as_chunks::<WIDTH>();
        for (value, pending) in self.pending[..self.slots].iter_mut().enumerate() {
            let value = value as u8;
            for vector in vectors {
                for (count, &slot) in pending.iter_mut().zip(vector) {
                    *count += u8::from(slot == value);
                }
            }
        }
        for &slot in rest {
            if let Some(count) = self.counts.get_mut(usize::from(slot)) {
                *count += 1;
            }
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        for (count, pending) in self.counts.iter_mut().zip(&mut self.pending[..self.slots]) {
            *count += pending.iter().map(|&c| u64::from(c)).sum::<u64>();
            *pending = [0; WIDTH];
        }
    }

    fn counts(mut self, slots: usize) -> Vec<u64> {
        self.flush();
        self.counts[..slots].to_vec()
    }
}

/// Appends every slot's weight to `out`, as little-endian float32 bytes. Given a 256-entry
/// `lookup`, byte slots index it without a bounds check.
#[inline(always)]
pub(super) fn weigh_slots<S: Slot>(lookup: &[f32], slots: &[S], out: &mut Vec<[u8; 4]>) {
    out.extend(slots.iter().map(|slot| lookup[slot.index()].to_le_bytes()));
}

/// `lookup` (bins + 1 entries, the last the invalid slot's 0) widened to every byte, so that
/// byte slots index it without a bounds check.
pub(super) fn byte_lookup(lookup: &[f32]) -> [f32; 256] {
    let mut full = [0.0f32; 256];
    let used = lookup.len().min(256);
    full[..used].copy_from_slice(&lookup[..used]);
    full
}

/// The vector instructions a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Level {
    /// What the target guarantees: SSE2 on x86-64.
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // BW implies F; the kernels use byte compares.
            if std::arch::is_x86_feature_detected!("avx512bw") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }
}

#[cfg(test)]
thread_local! {
    /// Tests cap the level to check every variant this CPU can run.
    pub(super) static LEVEL_CAP: std::cell::Cell<Level> =
        const { std::cell::Cell::new(Level::Avx512) };
}

/// Runs `kernel` compiled for the widest vector instructions this CPU has. The kernels are
/// plain loops that LLVM vectorises; built for the baseline x86-64 they only get 4-lane SSE2.
/// Measured on the 1M GHM-C batch of `benches/kernel.rs` (CPU seconds for 1000 batches,
/// Zen 5): AVX-512 0.73, AVX2 0.78; callgrind counts 13 instructions per element with AVX2.
#[inline(always)]
pub(super) fn vectorised<R>(kernel: impl FnOnce() -> R) -> R {
    let level = Level::detected();
    #[cfg(test)]
    let level = level.min(LEVEL_CAP.with(|cap| cap.get()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `with_avx512` only requires AVX-512 F and BW, which `detected` checked.
        Level::Avx512 => unsafe { with_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `with_avx2` only requires AVX2, which `detected` checked.
        Level::Avx2 => unsafe { with_avx2(kernel) },
        _ => kernel(),
    }
}

/// `kernel`, inlined into a function that may use AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

/// `kernel`, inlined into a function that may use AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn with_avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}
