//! Many callers at once: eight tasks on one job apply every request as one whole step, and a
//! 16M-element batch does not stop other jobs from being answered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ghmd::client::{Client, bytes_to_f32s, f32s_to_bytes};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{HarmonizeResponse, Loss};

use crate::support::fixture::fingerprint;
use crate::support::request::request;
use crate::support::weights::{big_norms, scan_bin, spot_check_big};
use crate::support::{Draw, SplitMix, TestServer, bits, ghm_c};

/// `weights[i] == bin_weights[bin(g_i)]` for every valid element, 0 for the others.
fn assert_weights_follow_bin_weights(
    loss: Loss,
    bins: u32,
    norms: &[f32],
    label_weights: Option<&[f32]>,
    response: &HarmonizeResponse,
    context: &str,
) {
    let weights = bytes_to_f32s(&response.weights);
    assert_eq!(
        weights.len(),
        norms.len(),
        "{context}: one weight per element"
    );
    assert_eq!(
        response.bin_weights.len(),
        bins as usize,
        "{context}: M bin weights"
    );
    for (i, (&g, &w)) in norms.iter().zip(&weights).enumerate() {
        let valid = label_weights.is_none_or(|lw| lw[i] > 0.0);
        let expected = if valid {
            response.bin_weights[scan_bin(loss, bins, g).expect("valid norm")]
        } else {
            0.0
        };
        assert_eq!(
            w.to_bits(),
            expected.to_bits(),
            "{context}: weights[{i}] (g = {g:e})"
        );
    }
}

/// mmdetection's EMA update of the bins a step touches (tests/data/conformance/README.md).
fn ema(acc_sum: &[f32], counts: &[u64], momentum: f64) -> Vec<f32> {
    acc_sum
        .iter()
        .zip(counts)
        .map(|(&acc, &count)| {
            if count == 0 {
                acc
            } else {
                ((momentum as f32) * acc) + (((1.0 - momentum) * count as f64) as f32)
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_tasks_hammering_one_job_apply_every_request_as_one_whole_step() {
    const TASKS: u64 = 8;
    const REQUESTS: u64 = 50;
    const BINS: u32 = 10;
    const MOMENTUM: f64 = 0.75;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("hammer", ghm_c(BINS, MOMENTUM))
        .await
        .expect("create");

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let uri = server.uri();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(uri).await.expect("own connection");
            let mut rng = SplitMix(1000 + task);
            let mut done = Vec::new();
            for i in 0..REQUESTS {
                let len = 1 + rng.below(300) as usize;
                let norms: Vec<f32> = (0..len).map(|_| rng.unit_closed()).collect();
                let label_weights: Vec<f32> = (0..len)
                    .map(|_| [0.0, 1.0, 0.5, 2.0][rng.below(4) as usize])
                    .collect();
                let (response, _) = client
                    .harmonize_norms(
                        "hammer",
                        task * REQUESTS + i,
                        0,
                        &norms,
                        Some(&label_weights),
                    )
                    .await
                    .expect("harmonize");
                done.push((norms, label_weights, response));
            }
            done
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }

    let valid: u64 = all
        .iter()
        .map(|(_, lw, _)| lw.iter().filter(|&&w| w > 0.0).count() as u64)
        .sum();
    let state = fingerprint(&mut client, "hammer").await;
    assert_eq!(state.steps, TASKS * REQUESTS, "every request is one step");
    assert_eq!(state.elements, valid, "every valid element counted once");

    // Each response is whole: its weights follow its own bin table, and that table is the one
    // its own acc_sum gives for its own counts (a mixed update would break either).
    let mut steps = Vec::new();
    for (norms, label_weights, response) in &all {
        let context = format!("step {}", response.step);
        assert_weights_follow_bin_weights(
            Loss::GhmC,
            BINS,
            norms,
            Some(label_weights),
            response,
            &context,
        );
        let mut counts = vec![0u64; BINS as usize];
        for (&g, &w) in norms.iter().zip(label_weights) {
            if w > 0.0 {
                counts[scan_bin(Loss::GhmC, BINS, g).expect("in range")] += 1;
            }
        }
        let tot = (counts.iter().sum::<u64>() as f64).max(1.0);
        let n = counts.iter().filter(|&&c| c > 0).count() as u32;
        assert_eq!(response.tot, tot, "{context}: tot");
        assert_eq!(response.nonempty_bins, n, "{context}: n");
        for (bin, &count) in counts.iter().enumerate() {
            let expected = if count > 0 {
                ((1.0f32 / response.acc_sum[bin]) * (tot as f32)) / n as f32
            } else {
                0.0
            };
            assert_eq!(
                response.bin_weights[bin].to_bits(),
                expected.to_bits(),
                "{context}: bin {bin} weight vs its acc_sum"
            );
        }
        steps.push((counts, bits(&response.acc_sum)));
    }

    // And the responses chain: starting from zeros, some order applies them one after another,
    // each response's acc_sum being the previous one's with its counts folded in. Equal
    // candidates give equal states, so taking the first that fits is enough.
    let mut acc = vec![0.0f32; BINS as usize];
    let mut left: Vec<usize> = (0..steps.len()).collect();
    while !left.is_empty() {
        let position = left
            .iter()
            .position(|&s| bits(&ema(&acc, &steps[s].0, MOMENTUM)) == steps[s].1);
        let Some(position) = position else {
            panic!(
                "after {} steps, no response continues the EMA from {acc:?}",
                steps.len() - left.len()
            );
        };
        let next = left.swap_remove(position);
        acc = ema(&acc, &steps[next].0, MOMENTUM);
    }
    assert_eq!(
        bits(&acc),
        state.acc_sum_bits,
        "the chain ends in the job's state"
    );
    server.stop().await;
}

/// One thread runs both the server and the clients here, so small requests can only be answered
/// while the big batch is weighed if the server weighs it off the async runtime. Counting them
/// is not enough (they are also answered while the 64 MB travel each way), so the test also
/// bounds the longest wait between two small answers by a third of the big request's time:
/// weighing on the runtime thread stalls it for more than half of that in a debug build, while
/// weighing on the blocking pool leaves gaps of a few percent. The bound is relative to the same
/// run, so a slow machine scales both sides.
#[tokio::test(flavor = "current_thread")]
async fn a_16m_element_request_succeeds_while_other_jobs_keep_answering() {
    const LEN: usize = 16_000_000;
    let server = TestServer::start().await;
    let mut small = server.client().await;
    small
        .create_job("big", ghm_c(30, 0.0))
        .await
        .expect("create");
    small
        .create_job("small", ghm_c(10, 0.75))
        .await
        .expect("create");
    let norms = big_norms(LEN);
    let request = request(
        "big",
        Some(Input::GradientNorms(f32s_to_bytes(&norms))),
        Bytes::new(),
    );

    let mut big_client = server.client().await;
    let started = Instant::now();
    let big = tokio::spawn(async move { big_client.harmonize(request).await });
    let mut answered_meanwhile = 0u32;
    let mut last_answer = Instant::now();
    let mut longest_wait = Duration::ZERO;
    while !big.is_finished() {
        let (response, weights) = small
            .harmonize_norms("small", 0, 0, &[0.05, 0.5, 0.95], None)
            .await
            .expect("a small request during the big one");
        assert_eq!(weights.len(), 3);
        assert_eq!(response.nonempty_bins, 3);
        if !big.is_finished() {
            answered_meanwhile += 1;
            longest_wait = longest_wait.max(last_answer.elapsed());
            last_answer = Instant::now();
        }
    }
    let response = big.await.expect("task").expect("the big request succeeds");
    let elapsed = started.elapsed();
    eprintln!(
        "{answered_meanwhile} small requests answered during the {elapsed:?} of the big one; \
         the longest wait between two was {longest_wait:?}"
    );
    assert!(
        answered_meanwhile >= 5,
        "only {answered_meanwhile} small requests were answered during the big one"
    );
    assert!(
        longest_wait < elapsed / 3,
        "the small requests waited {longest_wait:?} at once during the {elapsed:?} big request"
    );
    spot_check_big(&norms, &response, 30);
    let state = fingerprint(&mut small, "big").await;
    assert_eq!((state.steps, state.elements), (1, LEN as u64));
    server.stop().await;
}
