//! Property tests of the pure `ghm` module against a deliberately naive reference written here
//! from tests/data/conformance/README.md: every element scans the float32 edges
//! `e_i <= g < e_{i+1}` one by one, and every float operation is spelled out in the README's order.
//! The fast kernels (a guessed bin corrected by two comparisons, lanes of partial counts, blocked
//! validation) must agree with it bit for bit on random jobs and batches.

use ghmd::client::bytes_to_f32s;
use ghmd::ghm::{
    self, BatchCounts, BinEdges, BinTable, Density, InputError, InputField, Loss, MAX_BINS,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use crate::support::bits;

// ---------------------------------------------------------------------------------------------
// The reference: a plain loop over edges.

fn reference_edges(loss: Loss, bins: usize) -> Vec<f32> {
    let mut edges: Vec<f32> = (0..=bins).map(|i| i as f32 / bins as f32).collect();
    match loss {
        Loss::GhmC => edges[bins] += 1e-6f32,
        Loss::GhmR => edges[bins] = 1000.0,
    }
    edges
}

/// The bin whose half-open interval holds `g`, found by scanning; `None` outside every bin.
fn reference_bin(edges: &[f32], g: f32) -> Option<usize> {
    (0..edges.len() - 1).find(|&i| edges[i] <= g && g < edges[i + 1])
}

#[derive(Debug, Clone)]
struct Batch {
    norms: Vec<f32>,
    /// `None`: every element has label weight 1.
    label_weights: Option<Vec<f32>>,
}

impl Batch {
    fn label_weight(&self, i: usize) -> f32 {
        self.label_weights.as_ref().map_or(1.0, |w| w[i])
    }

    fn is_valid(&self, i: usize) -> bool {
        self.label_weight(i) > 0.0
    }

    /// The tot the reference would clamp: GHM-C the valid elements, GHM-R the label weight sum.
    fn raw_tot(&self, loss: Loss) -> f64 {
        match loss {
            Loss::GhmC => (0..self.norms.len()).filter(|&i| self.is_valid(i)).count() as f64,
            Loss::GhmR => (0..self.norms.len())
                .map(|i| f64::from(self.label_weight(i)))
                .fold(0.0, |sum, w| sum + w),
        }
    }

    fn permuted(&self, order: &[usize]) -> Batch {
        Batch {
            norms: order.iter().map(|&i| self.norms[i]).collect(),
            label_weights: self
                .label_weights
                .as_ref()
                .map(|w| order.iter().map(|&i| w[i]).collect()),
        }
    }
}

/// What one reference step yields.
struct Expected {
    weights: Vec<f32>,
    bin_weights: Vec<f32>,
    counts: Vec<u64>,
    tot: f64,
    nonempty_bins: u32,
}

struct Reference {
    loss: Loss,
    momentum: f64,
    edges: Vec<f32>,
    acc_sum: Vec<f32>,
}

impl Reference {
    fn new(loss: Loss, bins: usize, momentum: f64) -> Self {
        Self {
            loss,
            momentum,
            edges: reference_edges(loss, bins),
            acc_sum: vec![0.0; bins],
        }
    }

    fn counts(&self, batch: &Batch) -> Vec<u64> {
        let mut counts = vec![0u64; self.acc_sum.len()];
        for (i, &g) in batch.norms.iter().enumerate() {
            if batch.is_valid(i) {
                let bin = reference_bin(&self.edges, g).expect("generated norms are in range");
                counts[bin] += 1;
            }
        }
        counts
    }

    fn step(&mut self, batch: &Batch) -> Expected {
        let counts = self.counts(batch);
        let tot = batch.raw_tot(self.loss).max(1.0);
        let nonempty_bins = counts.iter().filter(|&&c| c > 0).count() as u32;
        let mut bin_weights = vec![0.0f32; counts.len()];
        for (bin, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            bin_weights[bin] = if self.momentum > 0.0 {
                let acc = &mut self.acc_sum[bin];
                *acc = ((self.momentum as f32) * *acc)
                    + (((1.0 - self.momentum) * count as f64) as f32);
                (1.0f32 / *acc) * (tot as f32)
            } else {
                (tot / count as f64) as f32
            };
        }
        if nonempty_bins > 0 {
            for weight in &mut bin_weights {
                *weight /= nonempty_bins as f32;
            }
        }
        let weights = batch
            .norms
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                if batch.is_valid(i) {
                    bin_weights[reference_bin(&self.edges, g).expect("in range")]
                } else {
                    0.0
                }
            })
            .collect();
        Expected {
            weights,
            bin_weights,
            counts,
            tot,
            nonempty_bins,
        }
    }

    /// The EMA state as a job reports it: empty when the job keeps none.
    fn reported_acc_sum(&self) -> Vec<f32> {
        if self.momentum > 0.0 {
            self.acc_sum.clone()
        } else {
            Vec::new()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The module under test, fed the way the server feeds it: little-endian bytes at an odd address.

/// Little-endian bytes of `values` behind one byte of padding, so that the kernels read them at
/// an address that is not 4-byte aligned, as they may in a received message.
struct Unaligned(Vec<u8>);

impl Unaligned {
    fn new(values: &[f32]) -> Self {
        let mut bytes = vec![0xAB];
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Self(bytes)
    }

    fn bytes(&self) -> &[u8] {
        &self.0[1..]
    }
}

struct Computed {
    counts: BatchCounts,
    table: BinTable,
    weights: Vec<f32>,
}

struct Module {
    loss: Loss,
    momentum: f64,
    edges: BinEdges,
    density: Density,
}

impl Module {
    fn new(loss: Loss, bins: usize, momentum: f64) -> Self {
        Self {
            loss,
            momentum,
            edges: BinEdges::new(loss, bins),
            density: Density::new(bins),
        }
    }

    fn count(&self, batch: &Batch) -> Result<BatchCounts, InputError> {
        let norms = Unaligned::new(&batch.norms);
        let label_weights = batch.label_weights.as_deref().map(Unaligned::new);
        let (norms, label_weights) = ghm::float32_views(
            norms.bytes(),
            InputField::GradientNorms,
            label_weights.as_ref().map(Unaligned::bytes),
        )?;
        ghm::count_batch(
            self.loss,
            &self.edges,
            norms,
            InputField::GradientNorms,
            label_weights,
        )
    }

    fn step(&mut self, batch: &Batch) -> Computed {
        let counts = self.count(batch).expect("generated batches are valid");
        let table = self.density.step(self.momentum, &counts);
        let norms = Unaligned::new(&batch.norms);
        let label_weights = batch.label_weights.as_deref().map(Unaligned::new);
        let (norms, label_weights) = ghm::float32_views(
            norms.bytes(),
            InputField::GradientNorms,
            label_weights.as_ref().map(Unaligned::bytes),
        )
        .expect("valid views");
        let weights = bytes_to_f32s(&ghm::write_weights(
            &self.edges,
            &table,
            norms,
            label_weights,
        ));
        Computed {
            counts,
            table,
            weights,
        }
    }

    fn reported_acc_sum(&self) -> Vec<f32> {
        if self.momentum > 0.0 {
            self.density.acc_sum().to_vec()
        } else {
            Vec::new()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.

#[derive(Debug, Clone)]
struct Scenario {
    loss: Loss,
    bins: usize,
    momentum: f64,
    steps: Vec<Batch>,
}

fn loss() -> impl Strategy<Value = Loss> {
    prop_oneof![Just(Loss::GhmC), Just(Loss::GhmR)]
}

/// Small counts (where every edge is hit often), odd ones, anything up to the maximum.
fn bins() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..=16,
        (0usize..(MAX_BINS as usize) / 2).prop_map(|k| 2 * k + 1),
        1usize..=MAX_BINS as usize,
        Just(MAX_BINS as usize),
    ]
}

fn momentum() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(0.7),
        Just(0.75),
        Just(1.0f64.next_down()),
        0.0f64..1.0,
    ]
}

/// The largest norm a job accepts.
fn max_norm(loss: Loss) -> f32 {
    match loss {
        Loss::GhmC => 1.0,
        Loss::GhmR => 1000.0f32.next_down(),
    }
}

/// Norms in the accepted range, many of them exactly on a float32 edge `i / M` or one ulp from
/// it, where `floor(g * M)` goes wrong.
fn norm(loss: Loss, bins: usize) -> impl Strategy<Value = f32> {
    let max = max_norm(loss);
    let near_edge = (0..=bins, -1i32..=1).prop_map(move |(i, ulps)| {
        let edge = i as f32 / bins as f32;
        let g = match ulps {
            -1 => edge.next_down(),
            0 => edge,
            _ => edge.next_up(),
        };
        g.clamp(0.0, max)
    });
    // Uniform over bit patterns: every exponent, subnormals included.
    let any_in_range = (0u32..=max.to_bits()).prop_map(f32::from_bits);
    let uniform = (0.0f32..=1.0).prop_map(move |g| g.min(max));
    prop_oneof![
        4 => near_edge,
        2 => uniform,
        2 => any_in_range,
        1 => prop_oneof![Just(0.0f32), Just(-0.0f32), Just(1.0f32), Just(max)],
    ]
}

/// Label weights: zeros of both signs, ones, fractions. GHM-R sums them into tot, so its
/// weights are multiples of 2^-10 below 4: their f64 sum is exact in any order, and the reference
/// need not copy the kernel's summation order. GHM-C only asks `w > 0`, so it also gets tiny,
/// subnormal and huge weights.
fn label_weight(loss: Loss) -> BoxedStrategy<f32> {
    let dyadic = (0u32..4096).prop_map(|k| k as f32 / 1024.0);
    match loss {
        Loss::GhmR => prop_oneof![
            2 => Just(0.0f32),
            1 => Just(-0.0f32),
            2 => Just(1.0f32),
            4 => dyadic,
        ]
        .boxed(),
        Loss::GhmC => prop_oneof![
            2 => Just(0.0f32),
            1 => Just(-0.0f32),
            2 => Just(1.0f32),
            2 => dyadic,
            2 => (1u32..f32::INFINITY.to_bits()).prop_map(f32::from_bits),
        ]
        .boxed(),
    }
}

fn batch(loss: Loss, bins: usize, max_len: usize) -> impl Strategy<Value = Batch> {
    vec(norm(loss, bins), 0..=max_len).prop_flat_map(move |norms| {
        let len = norms.len();
        (
            Just(norms),
            proptest::option::of(vec(label_weight(loss), len)),
        )
            .prop_map(|(norms, label_weights)| Batch {
                norms,
                label_weights,
            })
    })
}

fn scenario(max_steps: usize, max_len: usize) -> impl Strategy<Value = Scenario> {
    (loss(), bins(), momentum()).prop_flat_map(move |(loss, bins, momentum)| {
        vec(batch(loss, bins, max_len), 1..=max_steps).prop_map(move |steps| Scenario {
            loss,
            bins,
            momentum,
            steps,
        })
    })
}

fn assert_same_table(a: &BinTable, b: &BinTable, context: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        bits(a.bin_weights()),
        bits(b.bin_weights()),
        "{}: bin_weights",
        context
    );
    prop_assert_eq!(a.tot.to_bits(), b.tot.to_bits(), "{}: tot", context);
    prop_assert_eq!(a.nonempty_bins, b.nonempty_bins, "{}: n", context);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// Few enough cases that the file runs in seconds in a debug build. Failures are not persisted:
/// the minimal failing input is printed, and a fixed case belongs in a named test.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(160))]

    /// count_batch + Density::step + write_weights give, step after step, the weights, bin
    /// weights, tot, n and acc_sum of the naive reference, bit for bit.
    #[test]
    fn kernels_match_a_plain_loop_over_edges(scenario in scenario(4, 200)) {
        let edges = BinEdges::new(scenario.loss, scenario.bins);
        prop_assert_eq!(
            bits(edges.edges()),
            bits(&reference_edges(scenario.loss, scenario.bins))
        );
        let mut module = Module::new(scenario.loss, scenario.bins, scenario.momentum);
        let mut reference = Reference::new(scenario.loss, scenario.bins, scenario.momentum);
        for (index, batch) in scenario.steps.iter().enumerate() {
            let context = format!("step {index}");
            let got = module.step(batch);
            let expected = reference.step(batch);
            prop_assert_eq!(&got.counts.counts, &expected.counts, "{}: counts", context);
            prop_assert_eq!(
                got.counts.tot.to_bits(),
                batch.raw_tot(scenario.loss).to_bits(),
                "{}: raw tot", context
            );
            prop_assert_eq!(bits(&got.weights), bits(&expected.weights), "{}: weights", context);
            prop_assert_eq!(
                bits(got.table.bin_weights()),
                bits(&expected.bin_weights),
                "{}: bin_weights", context
            );
            prop_assert_eq!(got.table.tot.to_bits(), expected.tot.to_bits(), "{}: tot", context);
            prop_assert_eq!(got.table.nonempty_bins, expected.nonempty_bins, "{}: n", context);
            prop_assert_eq!(
                bits(&module.reported_acc_sum()),
                bits(&reference.reported_acc_sum()),
                "{}: acc_sum", context
            );
        }
        // A job with momentum 0 keeps no state at all.
        if scenario.momentum == 0.0 {
            prop_assert!(module.density.acc_sum().iter().all(|&a| a.to_bits() == 0));
        }
    }

    /// Shuffling a batch (norms and label weights together) shuffles its weights the same way
    /// and changes nothing else, step after step.
    #[test]
    fn permuting_the_input_permutes_the_weights(
        (scenario, orders) in scenario(3, 200).prop_flat_map(|scenario| {
            let orders: Vec<_> = scenario
                .steps
                .iter()
                .map(|b| Just((0..b.norms.len()).collect::<Vec<usize>>()).prop_shuffle())
                .collect();
            (Just(scenario), orders)
        })
    ) {
        let mut straight = Module::new(scenario.loss, scenario.bins, scenario.momentum);
        let mut shuffled = Module::new(scenario.loss, scenario.bins, scenario.momentum);
        for (index, (batch, order)) in scenario.steps.iter().zip(&orders).enumerate() {
            let context = format!("step {index}");
            let a = straight.step(batch);
            let b = shuffled.step(&batch.permuted(order));
            let permuted: Vec<f32> = order.iter().map(|&i| a.weights[i]).collect();
            prop_assert_eq!(bits(&b.weights), bits(&permuted), "{}: weights", context);
            assert_same_table(&a.table, &b.table, &context)?;
            prop_assert_eq!(
                bits(straight.density.acc_sum()),
                bits(shuffled.density.acc_sum()),
                "{}: acc_sum", context
            );
        }
    }

    /// A histogram of a batch's valid elements (binned by the reference) with the batch's raw
    /// tot passes validate_histogram and yields the same counts, table and EMA as the batch.
    #[test]
    fn a_histogram_gives_the_table_of_the_batch_it_summarises(scenario in scenario(4, 200)) {
        let mut raw = Module::new(scenario.loss, scenario.bins, scenario.momentum);
        let mut from_histogram = Density::new(scenario.bins);
        let reference = Reference::new(scenario.loss, scenario.bins, scenario.momentum);
        for (index, batch) in scenario.steps.iter().enumerate() {
            let context = format!("step {index}");
            let histogram = ghm::validate_histogram(
                scenario.loss,
                scenario.bins,
                &reference.counts(batch),
                batch.raw_tot(scenario.loss),
            );
            prop_assert!(histogram.is_ok(), "{}: {:?}", context, histogram);
            let histogram = histogram.expect("checked");
            let a = raw.step(batch);
            prop_assert_eq!(&histogram, &a.counts, "{}: counts", context);
            let b = from_histogram.step(scenario.momentum, &histogram);
            assert_same_table(&a.table, &b, &context)?;
            prop_assert_eq!(
                bits(raw.density.acc_sum()),
                bits(from_histogram.acc_sum()),
                "{}: acc_sum", context
            );
        }
    }
}

/// The norm generator must reach the values that make bin lookup hard, or the properties above
/// would pass for a kernel that just computes `floor(g * M)`. (For small M, and powers of two,
/// that floor with a clamp happens to be right next to every edge; for many other M it is not.)
#[test]
fn generated_norms_include_values_that_floor_misplaces() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for loss in [Loss::GhmC, Loss::GhmR] {
        let mut misplaced = 0;
        for bins in [100usize, 337, 1000] {
            let edges = reference_edges(loss, bins);
            let strategy = norm(loss, bins);
            misplaced += (0..2000)
                .map(|_| strategy.new_tree(&mut runner).expect("a norm").current())
                .filter(|&g| {
                    let floor = ((g * bins as f32) as usize).min(bins - 1);
                    reference_bin(&edges, g) != Some(floor)
                })
                .count();
        }
        assert!(
            misplaced >= 20,
            "{loss:?}: only {misplaced} of 6000 norms are misplaced by floor"
        );
    }
}

/// A value the contract rejects in a batch.
#[derive(Debug, Clone, Copy)]
enum Bad {
    Norm(f32),
    LabelWeight(f32),
}

fn bad_norm(loss: Loss) -> impl Strategy<Value = f32> {
    let over = match loss {
        Loss::GhmC => 1.0f32.next_up(),
        Loss::GhmR => 1000.0,
    };
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-f32::from_bits(1)),
        Just(-1.0f32),
        Just(over),
        (over.to_bits()..f32::INFINITY.to_bits()).prop_map(f32::from_bits),
    ]
}

fn bad_label_weight() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-f32::from_bits(1)),
        Just(-1.0f32),
    ]
}

/// A batch longer than any sensible validation block, with a few bad values planted in it.
fn planted_batch() -> impl Strategy<Value = (Loss, usize, Batch)> {
    (loss(), 1usize..=64, 1usize..=10_000, any::<bool>()).prop_flat_map(
        |(loss, bins, len, with_label_weights)| {
            let bad = if with_label_weights {
                prop_oneof![
                    bad_norm(loss).prop_map(Bad::Norm),
                    bad_label_weight().prop_map(Bad::LabelWeight),
                ]
                .boxed()
            } else {
                bad_norm(loss).prop_map(Bad::Norm).boxed()
            };
            vec((any::<Index>(), bad), 1..=4).prop_map(move |planted| {
                let mut batch = Batch {
                    norms: (0..len).map(|i| (i % 997) as f32 / 997.0).collect(),
                    label_weights: with_label_weights.then(|| vec![0.5; len]),
                };
                for (index, value) in planted {
                    let i = index.index(len);
                    match (value, batch.label_weights.as_mut()) {
                        (Bad::Norm(g), _) => batch.norms[i] = g,
                        (Bad::LabelWeight(w), Some(weights)) => weights[i] = w,
                        (Bad::LabelWeight(_), None) => unreachable!("only with label weights"),
                    }
                }
                (loss, bins, batch)
            })
        },
    )
}

proptest! {
    #![proptest_config(config(64))]

    /// Bad values planted anywhere in a long batch are rejected, and the error names a field, an
    /// index where that field really holds a bad value, no earlier bad value of that field, and
    /// the value itself. (Which field is reported when both hold bad values is the kernel's
    /// choice.)
    #[test]
    fn a_bad_value_is_reported_at_the_first_bad_index_of_its_field(
        (loss, bins, batch) in planted_batch()
    ) {
        let edges = reference_edges(loss, bins);
        let norm_ok = |g: f32| reference_bin(&edges, g).is_some() && g <= max_norm(loss);
        let weight_ok = |w: f32| w >= 0.0 && w.is_finite();
        let result = Module::new(loss, bins, 0.5).count(&batch);
        let Err(InputError::BadValue { field, index, value, .. }) = result else {
            return Err(TestCaseError::fail(format!("expected a BadValue, got {result:?}")));
        };
        let (values, ok): (&[f32], &dyn Fn(f32) -> bool) = match field {
            InputField::GradientNorms => (&batch.norms, &norm_ok),
            InputField::LabelWeights => {
                (batch.label_weights.as_deref().expect("present"), &weight_ok)
            }
            InputField::Residuals => {
                return Err(TestCaseError::fail("no residuals were sent"));
            }
        };
        prop_assert_eq!(
            values.iter().position(|&v| !ok(v)),
            Some(index),
            "{} is not the first bad index of {}", index, field
        );
        prop_assert_eq!(value.to_bits(), values[index].to_bits());
    }
}
