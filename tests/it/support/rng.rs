//! The seeded generator of the tests: a failure reproduces from its seed.

/// splitmix64.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1], 1 included.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() % ((1 << 24) + 1)) as f32 / (1u32 << 24) as f32
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `range` (its end excluded).
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.below(range.end - range.start)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A gradient norm in [0, 1] as a detector makes them: mostly easy examples near 0, as in
    /// its flood of negatives.
    pub fn detector_norm(&mut self) -> f32 {
        let u = self.unit();
        if self.chance(0.7) { u.powi(4) } else { u }
    }
}
