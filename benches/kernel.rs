//! The GHM-C kernel on one core: validate + bin + weigh a batch, against a plain copy of the same
//! norm bytes measured in the same run, so that the ratio survives a noisy, shared machine.
//!
//! `cargo bench --bench kernel` measures and then prints a table of elements per second and the
//! ratio to the copy (medians), by the wall clock and by the thread's CPU time: on a machine
//! shared with other work the wall clock also counts the time the thread waited for a core,
//! which says nothing about the kernel. `cargo test --all-targets` runs every routine once, as a
//! smoke test.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use ghmd::ghm::{self, BinEdges, Density, InputField, Loss};

const BINS: usize = 30;
const MOMENTUM: f64 = 0.75;
/// 1M and 16M elements: one typical batch of a detector's anchors, and the largest the server
/// accepts by default.
const SIZES: [usize; 2] = [1_000_000, 16_000_000];
/// The targets: elements per second at 1M, and the ratio to the copy at 16M.
const TARGET_ELEMENTS_PER_SECOND_1M: f64 = 1e9;
const TARGET_COPY_RATIO_16M: f64 = 0.33;

/// A batch as a request carries it: little-endian float32 bytes.
struct Batch {
    norms: Vec<u8>,
    label_weights: Vec<u8>,
}

#[path = "../src/synthetic.rs"]
mod synthetic;

use synthetic::{SplitMix, realistic_norm};

/// What a single-stage detector's GHM-C sees (see [`realistic_norm`]); 3% of the anchors are
/// ignored (label weight 0).
fn realistic_batch(elements: usize) -> Batch {
    let mut rng = SplitMix(0x6768_6d64);
    let mut norms = Vec::with_capacity(elements * 4);
    let mut label_weights = Vec::with_capacity(elements * 4);
    for _ in 0..elements {
        let g = realistic_norm(&mut rng);
        let weight = if rng.unit() < 0.03 { 0.0f32 } else { 1.0 };
        norms.extend_from_slice(&g.to_le_bytes());
        label_weights.extend_from_slice(&weight.to_le_bytes());
    }
    Batch {
        norms,
        label_weights,
    }
}

/// One request's worth of kernel work, as the server does it: views, pass one keeping the
/// bins, the O(bins) density update, pass two from the bins.
fn weigh(edges: &BinEdges, density: &mut Density, batch: &Batch) -> Vec<u8> {
    let (norms, label_weights) = ghm::float32_views(
        &batch.norms,
        InputField::GradientNorms,
        Some(&batch.label_weights),
    )
    .expect("the batch is well formed");
    let binned = ghm::bin_batch(
        Loss::GhmC,
        edges,
        norms,
        InputField::GradientNorms,
        label_weights,
    )
    .expect("the batch is valid");
    let table = density.step(MOMENTUM, binned.counts());
    binned.write_weights(&table)
}

/// The same with the two stateless passes, which bin every element twice.
fn weigh_binning_twice(edges: &BinEdges, density: &mut Density, batch: &Batch) -> Vec<u8> {
    let (norms, label_weights) = ghm::float32_views(
        &batch.norms,
        InputField::GradientNorms,
        Some(&batch.label_weights),
    )
    .expect("the batch is well formed");
    let counts = ghm::count_batch(
        Loss::GhmC,
        edges,
        norms,
        InputField::GradientNorms,
        label_weights,
    )
    .expect("the batch is valid");
    let table = density.step(MOMENTUM, &counts);
    ghm::write_weights(edges, &table, norms, label_weights)
}

/// The server's work split over two threads: each half is binned and weighed on its own
/// core, the counts added in between. What splitting a large batch across cores could gain;
/// timed by the wall clock only (CPU time is per thread).
fn weigh_on_two_threads(edges: &BinEdges, density: &mut Density, batch: &Batch) -> Vec<u8> {
    let half = batch.norms.len() / 8 * 4;
    let (norms, weights) = (
        batch.norms.split_at(half),
        batch.label_weights.split_at(half),
    );
    let bin = |norms: &[u8], weights: &[u8]| {
        let (norms, weights) =
            ghm::float32_views(norms, InputField::GradientNorms, Some(weights)).expect("valid");
        ghm::bin_batch(Loss::GhmC, edges, norms, InputField::GradientNorms, weights)
            .expect("the batch is valid")
    };
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| bin(norms.0, weights.0));
        let second = bin(norms.1, weights.1);
        (first.join().expect("no panic"), second)
    });
    let mut counts = first.counts().clone();
    counts.add(second.counts());
    let table = density.step(MOMENTUM, &counts);
    let (mut out, rest) = std::thread::scope(|scope| {
        let rest = scope.spawn(|| second.write_weights(&table));
        (first.write_weights(&table), rest.join().expect("no panic"))
    });
    out.extend_from_slice(&rest);
    out
}

/// Per-iteration wall and CPU times of every routine, kept beside criterion's own report so
/// that the ratios can be printed at the end.
#[derive(Default)]
struct Samples {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

static TIMES: Mutex<BTreeMap<(usize, &'static str), Samples>> = Mutex::new(BTreeMap::new());

/// The CPU time this thread has run for.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live, owned one.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "CLOCK_THREAD_CPUTIME_ID is available on Linux");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Runs `body` `iters` times; records the wall and CPU time per iteration and returns the
/// wall time, which is what criterion reports.
fn timed(
    size: usize,
    routine: &'static str,
    iters: u64,
    mut body: impl FnMut() -> Vec<u8>,
) -> Duration {
    let (start, cpu_start) = (Instant::now(), thread_cpu_time());
    for _ in 0..iters {
        black_box(body());
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu_time() - cpu_start);
    let iterations = iters.max(1) as u32;
    let mut times = TIMES
        .lock()
        .expect("no routine panics while holding the lock");
    let samples = times.entry((size, routine)).or_default();
    samples.wall.push(wall / iterations);
    samples.cpu.push(cpu / iterations);
    wall
}

/// `sizes` are [`SIZES`] when measuring; `cargo test` runs every routine once on small
/// batches, since it builds without optimisations.
fn kernel_benches(c: &mut Criterion, sizes: [usize; 2]) {
    let edges = BinEdges::new(Loss::GhmC, BINS);
    for size in sizes {
        let batch = realistic_batch(size);
        let mut density = Density::new(BINS);
        let mut group = c.benchmark_group(format!("ghm_c_{}", size));
        group.throughput(Throughput::Elements(size as u64));
        if size > SIZES[0] {
            group.sample_size(20);
            group.measurement_time(Duration::from_secs(8));
        }
        group.bench_function(BenchmarkId::new("copy", size), |b| {
            b.iter_custom(|iters| timed(size, "copy", iters, || black_box(&batch.norms).to_vec()))
        });
        group.bench_function(BenchmarkId::new("kernel", size), |b| {
            b.iter_custom(|iters| {
                timed(size, "kernel", iters, || {
                    weigh(&edges, &mut density, black_box(&batch))
                })
            })
        });
        group.bench_function(BenchmarkId::new("two_threads", size), |b| {
            b.iter_custom(|iters| {
                timed(size, "two_threads", iters, || {
                    weigh_on_two_threads(&edges, &mut density, black_box(&batch))
                })
            })
        });
        if size == sizes[0] {
            group.bench_function(BenchmarkId::new("binning_twice", size), |b| {
                b.iter_custom(|iters| {
                    timed(size, "binning_twice", iters, || {
                        weigh_binning_twice(&edges, &mut density, black_box(&batch))
                    })
                })
            });
        }
        group.finish();
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

fn print_ratios() {
    let times = TIMES.lock().expect("the benchmarks are done");
    println!();
    println!(
        "{:>10} {:>5} {:>14} {:>14} {:>12} {:>8}  target",
        "elements", "clock", "kernel elem/s", "copy elem/s", "kernel/copy", "samples"
    );
    for size in SIZES {
        let (Some(kernel), Some(copy)) = (times.get(&(size, "kernel")), times.get(&(size, "copy")))
        else {
            continue;
        };
        for (clock, kernel, copy) in [
            ("wall", &kernel.wall, &copy.wall),
            ("cpu", &kernel.cpu, &copy.cpu),
        ] {
            let per_second = |d: Duration| size as f64 / d.as_secs_f64();
            let (kernel_rate, copy_rate) = (per_second(median(kernel)), per_second(median(copy)));
            let ratio = kernel_rate / copy_rate;
            let target = if size == SIZES[0] {
                let met = kernel_rate >= TARGET_ELEMENTS_PER_SECOND_1M;
                format!(
                    ">= {TARGET_ELEMENTS_PER_SECOND_1M:.0e} elem/s: {}",
                    if met { "met" } else { "NOT met" }
                )
            } else {
                let met = ratio >= TARGET_COPY_RATIO_16M;
                format!(
                    ">= {TARGET_COPY_RATIO_16M} of copy: {}",
                    if met { "met" } else { "NOT met" }
                )
            };
            println!(
                "{size:>10} {clock:>5} {kernel_rate:>14.3e} {copy_rate:>14.3e} {ratio:>12.3} {:>8}  {target}",
                kernel.len()
            );
        }
    }
    for size in SIZES {
        if let Some(two) = times.get(&(size, "two_threads")) {
            println!(
                "{size:>10} {:>5} {:>14.3e}  split over two threads (wall clock only)",
                "wall",
                size as f64 / median(&two.wall).as_secs_f64()
            );
        }
    }
    if let Some(twice) = times.get(&(SIZES[0], "binning_twice")) {
        println!(
            "{:>10} {:>5} {:>14.3e}  count_batch + write_weights, binning every element twice",
            SIZES[0],
            "cpu",
            SIZES[0] as f64 / median(&twice.cpu).as_secs_f64()
        );
    }
}

/// `GHMD_KERNEL_PROFILE=N` weighs the 1M batch N times and exits, without criterion: a fixed
/// workload for `valgrind --tool=callgrind`, whose instruction counts do not depend on what else
/// the machine is doing.
fn profile(iterations: usize) {
    let edges = BinEdges::new(Loss::GhmC, BINS);
    let batch = realistic_batch(SIZES[0]);
    let mut density = Density::new(BINS);
    for _ in 0..iterations {
        black_box(weigh(&edges, &mut density, black_box(&batch)));
    }
}

fn main() {
    if let Some(iterations) = std::env::var("GHMD_KERNEL_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        profile(iterations);
        return;
    }
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let mut criterion = Criterion::default().configure_from_args();
    kernel_benches(
        &mut criterion,
        if measuring { SIZES } else { [10_000, 160_000] },
    );
    criterion.final_summary();
    // Only a real measurement has numbers worth a ratio.
    if measuring {
        print_ratios();
    }
}
