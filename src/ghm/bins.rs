//! The bin edges of a job and the two ways to find a norm's bin: the reference's exact
//! comparisons, and the branch-free arithmetic the kernels use, which agrees with them.

use super::Loss;

/// 2^23: a float in [0, 2^22] plus this is rounded to an integer, which then sits in the low
/// bits of the sum's mantissa.
pub(super) const SHIFT: f32 = 8_388_608.0;

/// The reference's float32 bin edges and the exact bin lookup over them.
///
/// Bin `i` is the half-open interval `[e_i, e_{i+1})` with `e_i = (i as f32) / (M as f32)`; the
/// last edge is `1 + 1e-6` for GHM-C (so that g = 1 lands in the last bin) and 1000 for GHM-R.
/// `floor(g * M)` alone misplaces values one ulp from an edge, so the lookup starts from that
/// guess and corrects it by comparing with the two edges around it.
#[derive(Clone, Debug)]
pub struct BinEdges {
    /// M + 1 edges.
    edges: Box<[f32]>,
    scale: f32,
    /// The largest norm that falls in a bin: 1.0 for GHM-C (the contract accepts [0, 1]),
    /// the float just below 1000 for GHM-R.
    max_norm: f32,
    /// How close `g * M` must come to an inner edge before [`Self::fast_bin`] stops vouching
    /// for its guess (see there).
    margin: f32,
}

impl BinEdges {
    pub fn new(loss: Loss, bins: usize) -> Self {
        let scale = bins as f32;
        let mut edges: Vec<f32> = (0..=bins).map(|i| i as f32 / scale).collect();
        let max_norm = match loss {
            Loss::GhmC => {
                edges[bins] += 1e-6f32;
                1.0
            }
            Loss::GhmR => {
                edges[bins] = 1000.0;
                f32::from_bits(1000.0f32.to_bits() - 1)
            }
        };
        // Twice the bound that `fast_bin` derives, so that rounding the margin itself (and
        // `1 - margin`) to f32 cannot matter.
        let margin = (bins + 1) as f32 * 2.0 * f32::EPSILON;
        Self {
            edges: edges.into_boxed_slice(),
            scale,
            max_norm,
            margin,
        }
    }

    pub fn bins(&self) -> usize {
        self.edges.len() - 1
    }

    pub fn edges(&self) -> &[f32] {
        &self.edges
    }

    pub fn max_norm(&self) -> f32 {
        self.max_norm
    }

    /// Whether `g` falls in some bin. False for NaN.
    #[inline(always)]
    pub fn accepts(&self, g: f32) -> bool {
        (g >= 0.0) & (g <= self.max_norm)
    }

    /// The bin of an accepted `g`. Total for any input (NaN and out-of-range values land in the
    /// first or last bin), so that the counting loop needs no branch before it has validated.
    #[inline(always)]
    pub fn bin_of(&self, g: f32) -> usize {
        let last = self.edges.len() - 2;
        // `as usize` saturates: negative and NaN give 0.
        let guess = ((g * self.scale) as usize).min(last);
        let below = (g < self.edges[guess]) & (guess > 0);
        let above = (g >= self.edges[guess + 1]) & (guess < last);
        guess - below as usize + above as usize
    }

    /// The bin of `g` (as an f32 holding an integer) by arithmetic alone, and whether that bin
    /// is certain. Written without a branch, a table lookup or an integer conversion so that
    /// loops over it vectorise (x86 has no vector conversion with Rust's saturating `as`); the
    /// few uncertain elements, within `margin` of an inner edge, are redone with
    /// [`Self::bin_of`].
    ///
    /// Why the guess `k = floor(t)`, `t = fl(g * M)`, is exact away from the edges: with
    /// u = 2^-24, `|t - g M| <= u g M` and the edge `e_k = fl(k / M)` has `|e_k M - k| <= u k`.
    /// If `t >= k + eps` then `g M >= (k + eps) / (1 + u) > k (1 + u) >= e_k M` as soon as
    /// `eps >= k (2u + u^2)`; if `t <= k + 1 - eps` then `g M <= (k + 1 - eps) / (1 - u) <
    /// (k + 1)(1 - u) <= e_{k+1} M` as soon as `eps > (k + 1)(2u - u^2)`. `k <= M`, and `margin`
    /// is `(M + 1) 4u`, twice that. The edge at 0 is exact and the last edge is above every
    /// accepted norm, so neither needs a margin: that keeps the flood of tiny norms certain.
    ///
    /// Total like `bin_of`: NaN and out-of-range values give some bin below M.
    #[inline(always)]
    pub(super) fn fast_bin(&self, g: f32) -> (f32, bool) {
        let bins = self.scale;
        let last = bins - 1.0;
        let t = g * bins;
        // Clamped into [0, M] by selects that send NaN to M.
        let t = if t < bins { t } else { bins };
        let t = if t > 0.0 { t } else { 0.0 };
        let nearest = (t + SHIFT) - SHIFT;
        let offset = t - nearest;
        // The nearest integer j is the only edge within reach; 0 and M need no margin.
        let near_edge = (offset.abs() < self.margin) & (nearest >= 1.0) & (nearest <= last);
        let floor = if offset < 0.0 { nearest - 1.0 } else { nearest };
        let bin = if floor < last { floor } else { last };
        (bin, !near_edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_scan(edges: &BinEdges, g: f32) -> usize {
        let e = edges.edges();
        (0..edges.bins())
            .find(|&i| g >= e[i] && g < e[i + 1])
            .expect("an accepted norm is in a bin")
    }

    #[test]
    fn every_edge_and_its_neighbours_land_in_the_scanned_bin() {
        for loss in [Loss::GhmC, Loss::GhmR] {
            for bins in [1, 2, 3, 7, 10, 30, 100, 4096] {
                let edges = BinEdges::new(loss, bins);
                for &e in edges.edges() {
                    for g in [
                        e,
                        f32::from_bits(e.to_bits().saturating_sub(1)),
                        f32::from_bits(e.to_bits() + 1),
                    ] {
                        if edges.accepts(g) {
                            assert_eq!(
                                edges.bin_of(g),
                                by_scan(&edges, g),
                                "{loss:?} M={bins} g={g:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ghm_c_accepts_exactly_zero_to_one() {
        let edges = BinEdges::new(Loss::GhmC, 10);
        assert!(edges.accepts(0.0) && edges.accepts(1.0));
        assert_eq!(edges.bin_of(1.0), 9);
        for g in [
            0.0f32.next_down(),
            1.0f32.next_up(),
            f32::NAN,
            f32::INFINITY,
        ] {
            assert!(!edges.accepts(g), "{g}");
        }
    }

    #[test]
    fn ghm_r_accepts_up_to_its_last_edge() {
        let edges = BinEdges::new(Loss::GhmR, 10);
        assert!(edges.accepts(999.0));
        assert_eq!(edges.bin_of(999.0), 9);
        assert!(!edges.accepts(1000.0));
    }

    #[test]
    fn out_of_range_values_still_map_inside_the_table() {
        let edges = BinEdges::new(Loss::GhmC, 30);
        for g in [
            f32::NAN,
            -1.0,
            -0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            5.0,
            f32::MAX,
        ] {
            assert!(edges.bin_of(g) < 30, "{g}");
        }
    }

    /// Every accepted value within `radius` ulps of an edge, of `k / M` and of the ends.
    fn near_edges(edges: &BinEdges, radius: u32) -> Vec<f32> {
        let bins = edges.bins();
        let mut centres: Vec<f32> = edges.edges().to_vec();
        centres.extend((0..=bins).map(|k| (k as f64 / bins as f64) as f32));
        centres.extend([0.0, 1.0, edges.max_norm()]);
        let mut values = Vec::new();
        for centre in centres {
            let bits = centre.to_bits();
            for bits in bits.saturating_sub(radius)..=bits.saturating_add(radius) {
                let g = f32::from_bits(bits);
                if edges.accepts(g) {
                    values.push(g);
                }
            }
        }
        values
    }

    fn check_fast_bin(edges: &BinEdges, g: f32) -> bool {
        let (bin, sure) = edges.fast_bin(g);
        assert!(
            bin >= 0.0 && bin < edges.bins() as f32 && bin.fract() == 0.0,
            "g={g:e}"
        );
        if sure {
            assert_eq!(
                bin as usize,
                edges.bin_of(g),
                "M={} g={g:e} ({:#x})",
                edges.bins(),
                g.to_bits()
            );
        }
        sure
    }

    #[test]
    fn the_fast_bin_is_exact_whenever_it_says_so_near_every_edge() {
        for loss in [Loss::GhmC, Loss::GhmR] {
            for bins in [1, 2, 3, 7, 10, 29, 30, 31, 100, 255, 256, 1000, 4096] {
                let edges = BinEdges::new(loss, bins);
                for g in near_edges(&edges, 300) {
                    check_fast_bin(&edges, g);
                }
            }
        }
    }

    #[test]
    fn the_fast_bin_is_sure_of_almost_every_value_away_from_edges() {
        // Values on a fine grid that avoids the edges: the fast path must not quietly become
        // the slow one.
        for bins in [10, 30, 4096] {
            let edges = BinEdges::new(Loss::GhmC, bins);
            let total = 1_000_000;
            let sure = (0..total)
                .map(|i| (i as f32 + 0.37) / total as f32)
                .filter(|&g| check_fast_bin(&edges, g))
                .count();
            assert!(
                sure > total * 99 / 100,
                "M={bins}: only {sure} of {total} sure"
            );
        }
    }

    #[test]
    fn the_fast_bin_stays_in_range_for_values_that_are_rejected() {
        let edges = BinEdges::new(Loss::GhmC, 30);
        for g in [
            f32::NAN,
            -1.0,
            -0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            5.0,
            f32::MAX,
        ] {
            let (bin, _) = edges.fast_bin(g);
            assert!((0.0..30.0).contains(&bin), "{g}: {bin}");
        }
    }

    /// Every float of [0, 1] for the bin counts mmdetection uses: about 10^9 values each, so
    /// run it by hand in release mode:
    /// `cargo test --release --lib exhaustive -- --ignored`.
    #[test]
    #[ignore]
    fn exhaustive_fast_bin_over_every_ghm_c_norm() {
        for bins in [10, 30] {
            let edges = BinEdges::new(Loss::GhmC, bins);
            let mut unsure = 0u64;
            for bits in 0..=1.0f32.to_bits() {
                unsure += u64::from(!check_fast_bin(&edges, f32::from_bits(bits)));
            }
            println!("M={bins}: {unsure} values binned the slow way");
        }
    }
}
