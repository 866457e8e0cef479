use super::Loss;

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
        Self {
            edges: edges.into_boxed_slice(),
            scale,
            max_norm,
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
        g >= 0.0 && g <= self.max_norm
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
}
