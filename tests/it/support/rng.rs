//! The seeded generator of the tests: a failure reproduces from its seed. The generator itself
//! is the repo's one SplitMix (`src/synthetic.rs`); what only tests draw is added here.

// The bench command, which tests/it/bench.rs compiles from its source, brings its own copy.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "../../../src/synthetic.rs"]
mod synthetic;

pub use synthetic::SplitMix;

/// Draws the tests need beyond the generator's own.
pub trait Draw {
    /// Uniform in [0, 1], 1 included, so that the last bin's edge is exercised.
    fn unit_closed(&mut self) -> f32;
    fn below(&mut self, n: u64) -> u64;
    /// Uniform in `range` (its end excluded).
    fn range(&mut self, range: std::ops::Range<u64>) -> u64;
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool;
    /// A gradient norm in [0, 1] as a detector makes them: mostly easy examples near 0, as in
    /// its flood of negatives.
    fn detector_norm(&mut self) -> f32;
}

impl Draw for SplitMix {
    fn unit_closed(&mut self) -> f32 {
        (self.next_u64() % ((1 << 24) + 1)) as f32 / (1u32 << 24) as f32
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.below(range.end - range.start)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn detector_norm(&mut self) -> f32 {
        let u = self.unit_closed();
        if self.chance(0.7) { u.powi(4) } else { u }
    }
}
