//! Seesaw and EQLv2 through the pure math (`ghmd::seesaw`, `ghmd::eqlv2`, the `Method` engine):
//! for one process every state of the conformance vectors (mmdetection 3.3's own classes) bit
//! for bit; for W workers, property tests that the step's statistic depends on the ranks'
//! contributions in rank order only, never on the order they arrive in, and that it is the
//! statistic of one process that saw the global batch.

use std::collections::BTreeMap;

use ghmd::eqlv2::{self, Eqlv2, GradContribution};
use ghmd::method::Method;
use ghmd::seesaw::{self, LabelCounts, Seesaw};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::support::bits;
use crate::support::vectors::{Eqlv2Case, Eqlv2Step, SeesawCase, cases_named, f32s};

fn seesaw_cases() -> Vec<SeesawCase> {
    let cases: Vec<SeesawCase> = cases_named("seesaw_");
    assert!(cases.len() >= 2, "Seesaw conformance vectors missing");
    cases
}

fn eqlv2_cases() -> Vec<Eqlv2Case> {
    let cases: Vec<Eqlv2Case> = cases_named("eqlv2_");
    assert!(!cases.is_empty(), "EQLv2 conformance vectors missing");
    cases
}

fn seesaw_of(case: &SeesawCase) -> Seesaw {
    Seesaw::new(case.num_classes, case.p, case.q, case.eps).unwrap()
}

fn eqlv2_of(case: &Eqlv2Case) -> Eqlv2 {
    Eqlv2::new(case.num_classes, case.gamma, case.mu, case.alpha).unwrap()
}

/// Values compared to the reference within the README's 2 ulp for what goes through `exp`,
/// with a count of how many came out bit for bit, which the tests print.
#[derive(Default)]
struct UlpTally {
    compared: usize,
    exact: usize,
    worst: u32,
}

impl UlpTally {
    /// Finite values of one sign (weights and gradient sums are >= 0), so bits order them.
    fn compare(&mut self, what: &str, actual: &[f32], reference: &[f32]) {
        assert_eq!(actual.len(), reference.len(), "{what}");
        for (index, (&a, &b)) in actual.iter().zip(reference).enumerate() {
            let off = a.to_bits().abs_diff(b.to_bits());
            assert!(
                off <= 2,
                "{what}[{index}] = {a:e}, reference {b:e} ({off} ulp)"
            );
            self.compared += 1;
            self.exact += usize::from(off == 0);
            self.worst = self.worst.max(off);
        }
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {} of {} bit for bit, the worst {} ulp off",
            self.exact, self.compared, self.worst
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Seesaw, one process.

/// The counts of a step: from the samples' labels where the case has them (checked against the
/// listed counts), else the listed counts. `seesaw_c5_counts_large` lists C counts, leaving out
/// the background that none of its steps has; its `cum_samples` (C + 1 entries, the last 0
/// throughout) show it, and the background count is then 0.
fn seesaw_counts(method: &Seesaw, case: &SeesawCase, index: usize) -> LabelCounts {
    let step = &case.steps[index];
    let mut listed = step.expected.label_counts.clone();
    if listed.len() == method.num_classes() {
        assert!(
            step.labels.is_empty(),
            "{}: only counts-only cases",
            case.name
        );
        assert_eq!(step.expected.cum_samples[method.num_classes()], 0.0);
        listed.push(0);
    }
    if step.labels.is_empty() {
        return LabelCounts { counts: listed };
    }
    let counted = method.count_labels(&step.labels).unwrap();
    assert_eq!(
        counted.counts, listed,
        "{} step {index}: label counts",
        case.name
    );
    counted
}

#[test]
fn seesaw_cum_samples_come_out_bit_for_bit() {
    for case in seesaw_cases() {
        let method = seesaw_of(&case);
        let mut state = method.initial_state();
        for index in 0..case.steps.len() {
            let counts = seesaw_counts(&method, &case, index);
            let table = method.step(&mut state, vec![counts]).unwrap();
            let expected = f32s(&case.steps[index].expected.cum_samples);
            let where_ = format!("{} step {index}", case.name);
            assert_eq!(bits(&table), bits(&expected), "{where_}: cum_samples");
            assert_eq!(
                bits(state.cum_samples()),
                bits(&expected),
                "{where_}: state"
            );
        }
    }
}

/// The vectors must exercise what they claim: a sample of label weight 0 still counts, and the
/// large case's float32 sums round (an exact integer sum would give other values).
#[test]
fn the_seesaw_vectors_count_zero_weight_samples_and_round_past_2_24() {
    let cases = seesaw_cases();
    let sequence = cases
        .iter()
        .find(|c| c.name == "seesaw_c20_sequence")
        .unwrap();
    let zero_weight_samples: usize = sequence
        .steps
        .iter()
        .map(|step| step.label_weights.iter().filter(|&&w| w == 0.0).count())
        .sum();
    assert!(zero_weight_samples > 0);
    let total_counted: u64 = sequence
        .steps
        .iter()
        .map(|step| step.expected.label_counts.iter().sum::<u64>())
        .sum();
    let total_samples: usize = sequence.steps.iter().map(|step| step.labels.len()).sum();
    assert_eq!(total_counted, total_samples as u64);

    let large = cases
        .iter()
        .find(|c| c.name == "seesaw_c5_counts_large")
        .unwrap();
    let mut exact = vec![0u64; large.num_classes as usize + 1];
    let mut rounded = false;
    for step in &large.steps {
        for (sum, count) in exact.iter_mut().zip(&step.expected.label_counts) {
            *sum += count;
        }
        rounded |= exact
            .iter()
            .zip(&step.expected.cum_samples)
            .any(|(&sum, &cum)| sum as f64 != cum);
    }
    assert!(rounded, "the large case no longer rounds");
    assert!(exact.iter().any(|&sum| sum > 1 << 24));
}

// ---------------------------------------------------------------------------------------------
// EQLv2, one process.

fn listed_contribution(step: &Eqlv2Step) -> GradContribution {
    GradContribution {
        pos_grad: f32s(&step.expected.pos_grad_contribution),
        neg_grad: f32s(&step.expected.neg_grad_contribution),
    }
}

#[test]
fn eqlv2_states_come_out_bit_for_bit() {
    for case in eqlv2_cases() {
        let method = eqlv2_of(&case);
        let mut state = method.initial_state();
        for (index, step) in case.steps.iter().enumerate() {
            let expected = &step.expected;
            let where_ = format!("{} step {index}", case.name);
            let before = f32s(&expected.pos_neg_before);
            assert_eq!(
                bits(state.pos_neg()),
                bits(&before),
                "{where_}: pos_neg before"
            );

            let table = method
                .step(&mut state, vec![listed_contribution(step)])
                .unwrap();
            assert_eq!(
                table, state,
                "{where_}: the table is the state after the step"
            );
            for (name, actual, listed) in [
                ("pos_grad", state.pos_grad(), &expected.pos_grad),
                ("neg_grad", state.neg_grad(), &expected.neg_grad),
                ("pos_neg", state.pos_neg(), &expected.pos_neg),
                ("table pos_neg", table.pos_neg(), &expected.pos_neg),
            ] {
                assert_eq!(bits(actual), bits(&f32s(listed)), "{where_}: {name}");
            }
        }
    }
}

/// The weights from `pos_neg` before each step, with Rust's `exp`: within 2 ulp of torch's.
#[test]
fn eqlv2_weights_from_the_table_are_within_2_ulp_of_the_reference() {
    for case in eqlv2_cases() {
        let method = eqlv2_of(&case);
        let mut tally = UlpTally::default();
        for (index, step) in case.steps.iter().enumerate() {
            let weights = method.class_weights(&f32s(&step.expected.pos_neg_before));
            let where_ = format!("{} step {index}", case.name);
            tally.compare(
                &format!("{where_}: neg_w"),
                &weights.neg_w,
                &f32s(&step.expected.neg_w),
            );
            tally.compare(
                &format!("{where_}: pos_w"),
                &weights.pos_w,
                &f32s(&step.expected.pos_w),
            );
        }
        tally.report(&format!("{} weights", case.name));
    }
}

/// torch's CPU `sum(dim=0)` of a row-major [N, K] float32 tensor (`cascade_sum` in ATen's
/// SumKernel.cpp: `row_sum` over each column): the rows in four interleaved partial sums, each a
/// cascade of levels of 16 rows, the leftover rows into the first, then the partials in order.
/// Written here from that algorithm to reproduce the reference's contribution, not as ghmd code.
fn torch_column_sum(rows: usize, value: impl Fn(usize) -> f32) -> f32 {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let groups = rows / ILP;
    let ceil_log2 = |x: usize| {
        if x <= 2 {
            1
        } else {
            usize::BITS - (x - 1).leading_zeros()
        }
    };
    let level_power = (ceil_log2(groups) / LEVELS as u32).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[0f32; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= groups {
        for _ in 0..level_step {
            for (k, sum) in acc[0].iter_mut().enumerate() {
                *sum += value(i * ILP + k);
            }
            i += 1;
        }
        for level in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(level);
            for (sum, below) in upper[0].iter_mut().zip(&mut lower[level - 1]) {
                *sum += *below;
                *below = 0.0;
            }
            if i & (level_mask << (level as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    for group in i..groups {
        for (k, sum) in acc[0].iter_mut().enumerate() {
            *sum += value(group * ILP + k);
        }
    }
    let mut partial = acc[0];
    for level in &acc[1..] {
        for (sum, value) in partial.iter_mut().zip(level) {
            *sum += value;
        }
    }
    for row in groups * ILP..rows {
        partial[0] += value(row);
    }
    partial[1..].iter().fold(partial[0], |sum, &p| sum + p)
}

/// A port of the reference's `collect_grad` for one step, in float32: `prob = sigmoid(x)`,
/// `grad = |y * (prob - 1) + (1 - y) * prob|`, then the column sums of `grad * y * weight` and
/// `grad * (1 - y) * weight`, first C columns. The weights are the reference's own (the listed
/// `pos_w`/`neg_w`), so that only `exp` inside the sigmoid can differ from torch's.
fn reference_contribution(num_classes: usize, step: &Eqlv2Step) -> GradContribution {
    let channels = num_classes + 1;
    let rows = step.labels.len();
    let logits = f32s(&step.cls_score);
    assert_eq!(logits.len(), rows * channels);
    let (pos_w, neg_w) = (f32s(&step.expected.pos_w), f32s(&step.expected.neg_w));
    let target = |row: usize, column: usize| f32::from(step.labels[row] == column as i64);
    let grad = |row: usize, column: usize| {
        let prob = 1.0 / (1.0 + (-logits[row * channels + column]).exp());
        let y = target(row, column);
        (y * (prob - 1.0) + (1.0 - y) * prob).abs()
    };
    let weight = |row: usize, column: usize| {
        let y = target(row, column);
        pos_w[column] * y + neg_w[column] * (1.0 - y)
    };
    let columns = |positive: bool| -> Vec<f32> {
        (0..num_classes)
            .map(|column| {
                torch_column_sum(rows, |row| {
                    let y = target(row, column);
                    let side = if positive { y } else { 1.0 - y };
                    grad(row, column) * side * weight(row, column)
                })
            })
            .collect()
    };
    GradContribution {
        pos_grad: columns(true),
        neg_grad: columns(false),
    }
}

/// The contributions from `cls_score` and `labels`, summed in torch's order: within 2 ulp of
/// torch's, the README's bound for `exp` (the sigmoid's, here), and most bit for bit. A plain
/// sequential sum would be 5 ulp and more off: the order of a column sum is part of the result.
#[test]
fn eqlv2_contributions_from_the_logits_match_the_reference() {
    for case in eqlv2_cases() {
        let method = eqlv2_of(&case);
        let mut tally = UlpTally::default();
        for (index, step) in case.steps.iter().enumerate() {
            let computed = reference_contribution(method.num_classes(), step);
            method.check(&computed).unwrap();
            let listed = listed_contribution(step);
            let where_ = format!("{} step {index}", case.name);
            tally.compare(
                &format!("{where_}: pos_grad"),
                &computed.pos_grad,
                &listed.pos_grad,
            );
            tally.compare(
                &format!("{where_}: neg_grad"),
                &computed.neg_grad,
                &listed.neg_grad,
            );
        }
        tally.report(&format!("{} contributions", case.name));
    }
}

// ---------------------------------------------------------------------------------------------
// W workers.

/// What the step barrier does with a step's contributions: it files each under its rank as it
/// arrives (a map keyed by rank) and hands them over in rank order.
fn in_rank_order_after_arrival<C: Clone>(contributions: &[C], arrival: &[usize]) -> Vec<C> {
    let filed: BTreeMap<usize, C> = arrival
        .iter()
        .map(|&rank| (rank, contributions[rank].clone()))
        .collect();
    filed.into_values().collect()
}

/// A random order of `0..ranks`, from proptest's shuffle.
fn arrival(ranks: usize) -> impl Strategy<Value = Vec<usize>> {
    Just((0..ranks).collect::<Vec<_>>()).prop_shuffle()
}

/// Contributions of every magnitude a column sum can have, so that float32 rounding in the
/// reduction is the rule, not the exception.
fn grad_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        (0u32..1 << 23).prop_map(|m| m as f32 / (1 << 23) as f32),
        (1e-6f32..1e6f32),
    ]
}

fn grad_contribution(classes: usize) -> impl Strategy<Value = GradContribution> {
    (vec(grad_value(), classes), vec(grad_value(), classes))
        .prop_map(|(pos_grad, neg_grad)| GradContribution { pos_grad, neg_grad })
}

/// A step of 1 to 8 ranks with one arrival order.
fn eqlv2_step(classes: usize) -> impl Strategy<Value = (Vec<GradContribution>, Vec<usize>)> {
    vec(grad_contribution(classes), 1..8).prop_flat_map(|ranks| {
        let order = arrival(ranks.len());
        (Just(ranks), order)
    })
}

/// Per-rank counts large enough that a per-rank float32 update would round differently from
/// one update with the exact sum.
fn seesaw_step(labels: usize) -> impl Strategy<Value = (Vec<LabelCounts>, Vec<usize>)> {
    let counts = vec(
        prop_oneof![0u64..4, (1u64 << 23)..(1u64 << 26), 0u64..(1 << 40)],
        labels,
    )
    .prop_map(|counts| LabelCounts { counts });
    vec(counts, 1..8).prop_flat_map(|ranks| {
        let order = arrival(ranks.len());
        (Just(ranks), order)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// EQLv2: the arrival order changes nothing; the reduction is exactly the float32 left fold
    /// in rank order, `((c_0 + c_1) + c_2) + ...`, and the state follows it bit for bit.
    #[test]
    fn eqlv2_depends_on_rank_order_only(
        steps in (1usize..6).prop_flat_map(|classes| vec(eqlv2_step(classes), 1..5)
            .prop_map(move |steps| (classes, steps)))
    ) {
        let (classes, steps) = steps;
        let method = Eqlv2::new(classes as u32, 12.0, 0.8, 4.0).unwrap();
        let mut state = method.initial_state();
        let (mut pos_grad, mut neg_grad) = (vec![0f32; classes], vec![0f32; classes]);
        for (ranks, order) in &steps {
            let arrived = in_rank_order_after_arrival(ranks, order);
            let table = method.step(&mut state, arrived).unwrap();
            let mut total = ranks[0].clone();
            for rank in &ranks[1..] {
                for j in 0..classes {
                    total.pos_grad[j] += rank.pos_grad[j];
                    total.neg_grad[j] += rank.neg_grad[j];
                }
            }
            prop_assert_eq!(bits(&method.reduce(ranks.clone()).unwrap().pos_grad), bits(&total.pos_grad));
            for j in 0..classes {
                pos_grad[j] += total.pos_grad[j];
                neg_grad[j] += total.neg_grad[j];
            }
            let pos_neg: Vec<f32> = (0..classes).map(|j| pos_grad[j] / (neg_grad[j] + 1e-10)).collect();
            prop_assert_eq!(bits(state.pos_grad()), bits(&pos_grad));
            prop_assert_eq!(bits(state.neg_grad()), bits(&neg_grad));
            prop_assert_eq!(bits(table.pos_neg()), bits(&pos_neg));
        }
    }

    /// EQLv2 with W workers is one process that saw the global batch, whenever the global
    /// batch's column sums are the ranks' sums: contributions that are small multiples of
    /// 2^-10 add exactly, in any order, so the W-rank state is the one-process state.
    #[test]
    fn eqlv2_of_w_ranks_is_one_process_when_sums_are_exact(
        steps in vec((vec((vec(0u32..4096, 3), vec(0u32..4096, 3)), 1..8), arrival(8)), 1..6)
    ) {
        let method = Eqlv2::new(3, 12.0, 0.8, 4.0).unwrap();
        let dyadic = |v: &[u32]| -> Vec<f32> { v.iter().map(|&k| k as f32 / 1024.0).collect() };
        let (mut shared, mut alone) = (method.initial_state(), method.initial_state());
        for (ranks, order) in &steps {
            let ranks: Vec<GradContribution> = ranks
                .iter()
                .map(|(pos, neg)| GradContribution { pos_grad: dyadic(pos), neg_grad: dyadic(neg) })
                .collect();
            let order: Vec<usize> = order.iter().copied().filter(|&r| r < ranks.len()).collect();
            method.step(&mut shared, in_rank_order_after_arrival(&ranks, &order)).unwrap();
            let mut global = GradContribution { pos_grad: vec![0.0; 3], neg_grad: vec![0.0; 3] };
            for rank in ranks.iter().rev() {
                for j in 0..3 {
                    global.pos_grad[j] += rank.pos_grad[j];
                    global.neg_grad[j] += rank.neg_grad[j];
                }
            }
            method.step(&mut alone, vec![global]).unwrap();
            prop_assert_eq!(&shared, &alone);
        }
    }

    /// Seesaw: exact integer sums, so neither arrival order nor rank order matters, and W ranks
    /// give the state of one process that counted the global batch: its counts summed, then one
    /// float32 update per label.
    #[test]
    fn seesaw_of_w_ranks_is_one_process_on_the_global_counts(
        steps in (1u32..6).prop_flat_map(|classes| vec(seesaw_step(classes as usize + 1), 1..5)
            .prop_map(move |steps| (classes, steps)))
    ) {
        let (classes, steps) = steps;
        let method = Seesaw::new(classes, 0.8, 2.0, 0.01).unwrap();
        let labels = method.labels();
        let (mut shared, mut alone) = (method.initial_state(), method.initial_state());
        for (ranks, order) in &steps {
            let arrived = in_rank_order_after_arrival(ranks, order);
            let reversed: Vec<LabelCounts> = ranks.iter().rev().cloned().collect();
            prop_assert_eq!(method.reduce(reversed).unwrap(), method.reduce(arrived.clone()).unwrap());
            method.step(&mut shared, arrived).unwrap();
            let global: Vec<u64> = (0..labels).map(|u| ranks.iter().map(|r| r.counts[u]).sum()).collect();
            method.step(&mut alone, vec![LabelCounts { counts: global }]).unwrap();
            prop_assert_eq!(&shared, &alone);
        }
    }

    /// Seesaw from labels: the ranks' shards of a batch counted apart and reduced give the
    /// counts of the concatenated batch, and the same state.
    #[test]
    fn seesaw_shards_of_a_batch_count_as_the_batch(
        shards in vec(vec(0i64..=7, 0..200), 1..8),
    ) {
        let method = Seesaw::new(7, 0.8, 2.0, 0.01).unwrap();
        let per_rank: Vec<LabelCounts> =
            shards.iter().map(|labels| method.count_labels(labels).unwrap()).collect();
        let concatenated: Vec<i64> = shards.concat();
        let whole = method.count_labels(&concatenated).unwrap();
        prop_assert_eq!(&method.reduce(per_rank.clone()).unwrap(), &whole);
        let (mut shared, mut alone) = (method.initial_state(), method.initial_state());
        method.step(&mut shared, per_rank).unwrap();
        method.step(&mut alone, vec![whole]).unwrap();
        prop_assert_eq!(shared, alone);
    }
}

/// Applying each rank's counts as its own float32 update, what W local Seesaw losses summed
/// after the fact would amount to, is not the shared statistic: past 2^24 the exact sum makes a
/// difference.
#[test]
fn seesaw_sums_a_steps_counts_before_the_float32_update() {
    let method = Seesaw::new(1, 0.8, 2.0, 0.01).unwrap();
    let ranks = [
        LabelCounts {
            counts: vec![1 << 24, 0],
        },
        LabelCounts { counts: vec![1, 0] },
        LabelCounts { counts: vec![1, 0] },
    ];
    let mut shared = method.initial_state();
    method.step(&mut shared, ranks.to_vec()).unwrap();
    let mut one_by_one = method.initial_state();
    for rank in &ranks {
        method.step(&mut one_by_one, vec![rank.clone()]).unwrap();
    }
    // 2^24 + 2 is a float32; 2^24 + 1 is a tie that rounds back to 2^24, twice.
    assert_eq!(shared.cum_samples()[0], 16_777_218.0);
    assert_eq!(one_by_one.cum_samples()[0], 16_777_216.0);
}

/// A contribution meant for another job's class count is refused by field and index, the
/// state untouched, through the engine's whole step as the job core will run it.
#[test]
fn a_contribution_for_another_class_count_changes_nothing() {
    let seesaw = Seesaw::new(20, 0.8, 2.0, 0.01).unwrap();
    let mut state = seesaw.initial_state();
    seesaw
        .step(&mut state, vec![seesaw.count_labels(&[0, 20, 3]).unwrap()])
        .unwrap();
    let before = state.clone();
    let other = Seesaw::new(19, 0.8, 2.0, 0.01).unwrap();
    let counts = other.count_labels(&[0, 19]).unwrap();
    let err = seesaw
        .step(&mut state, vec![seesaw.count_labels(&[1]).unwrap(), counts])
        .unwrap_err();
    assert_eq!(
        err,
        seesaw::Error::Length {
            field: seesaw::Field::LabelCounts,
            expected: 21,
            got: 20
        }
    );
    assert_eq!(state, before);

    let eqlv2 = Eqlv2::new(20, 12.0, 0.8, 4.0).unwrap();
    let mut state = eqlv2.initial_state();
    let before = state.clone();
    let wrong = GradContribution {
        pos_grad: vec![0.5; 20],
        neg_grad: vec![0.5; 21],
    };
    let err = eqlv2.step(&mut state, vec![wrong]).unwrap_err();
    assert!(
        matches!(
            err,
            eqlv2::Error::Length {
                field: eqlv2::Field::NegGrad,
                expected: 20,
                got: 21
            }
        ),
        "{err}"
    );
    assert_eq!(state, before);
}
