//! Step-synchronous jobs over gRPC: every rank of a step gets the weights one process would
//! give the concatenated batch, whatever the arrival order; timeouts, partial steps, retries,
//! elastic world sizes, restores, and many jobs at once.

use std::time::{Duration, Instant};

use ghmd::client::{Client, bytes_to_f32s, norms_request};
use ghmd::ghm::{self, BinEdges, Density, InputField, Loss};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{
    self, GetJobRequest, HarmonizeRequest, HarmonizeResponse, Histogram, JobSpec, JobState,
    RestoreJobRequest, UpdateJobRequest,
};
use tonic::Code;

use crate::support::request::job_state;
use crate::support::spec::{of_loss, with_world};
use crate::support::{Draw, SplitMix, TestServer, bits, ghm_c, le, step_synchronous};

#[derive(Clone, Debug)]
struct Shard {
    norms: Vec<f32>,
    label_weights: Vec<f32>,
}

fn random_shard(rng: &mut SplitMix, loss: Loss) -> Shard {
    let len = if rng.chance(0.15) {
        0
    } else {
        rng.range(1..400)
    };
    let norms = (0..len).map(|_| rng.detector_norm()).collect();
    let label_weights = (0..len)
        .map(|_| match (loss, rng.below(10)) {
            (_, 0) => 0.0,
            (Loss::GhmR, 1) => 0.5,
            (Loss::GhmR, 2) => 2.0,
            _ => 1.0,
        })
        .collect();
    Shard {
        norms,
        label_weights,
    }
}

/// The pure module run on the concatenation of a step's shards: what one process would give.
struct Reference {
    loss: Loss,
    momentum: f64,
    edges: BinEdges,
    density: Density,
}

struct ReferenceStep {
    weights_per_shard: Vec<Vec<f32>>,
    bin_weights: Vec<f32>,
    tot: f64,
    acc_sum: Vec<f32>,
}

impl Reference {
    fn new(loss: Loss, bins: usize, momentum: f64) -> Self {
        Self {
            loss,
            momentum,
            edges: BinEdges::new(loss, bins),
            density: Density::new(bins),
        }
    }

    fn step(&mut self, shards: &[&Shard]) -> ReferenceStep {
        let norms: Vec<f32> = shards
            .iter()
            .flat_map(|s| s.norms.iter().copied())
            .collect();
        let label_weights: Vec<f32> = shards
            .iter()
            .flat_map(|s| s.label_weights.iter().copied())
            .collect();
        let (norms, label_weights) = (le(&norms), le(&label_weights));
        let counts = ghm::count_batch(
            self.loss,
            &self.edges,
            &norms,
            InputField::GradientNorms,
            Some(&label_weights),
        )
        .expect("valid shards");
        let table = self.density.step(self.momentum, &counts);
        let all = bytes_to_f32s(&ghm::write_weights(
            &self.edges,
            &table,
            &norms,
            Some(&label_weights),
        ));
        let mut weights_per_shard = Vec::new();
        let mut start = 0;
        for shard in shards {
            weights_per_shard.push(all[start..start + shard.norms.len()].to_vec());
            start += shard.norms.len();
        }
        ReferenceStep {
            weights_per_shard,
            bin_weights: table.bin_weights().to_vec(),
            tot: table.tot,
            acc_sum: if self.momentum > 0.0 {
                self.density.acc_sum().to_vec()
            } else {
                Vec::new()
            },
        }
    }
}

/// A rank's own bin counts, as a client that sends histograms computes them.
fn histogram_request(
    job_id: &str,
    step: u64,
    rank: u32,
    loss: Loss,
    bins: usize,
    shard: &Shard,
) -> HarmonizeRequest {
    let edges = BinEdges::new(loss, bins);
    let counts = ghm::count_batch(
        loss,
        &edges,
        &le(&shard.norms),
        InputField::GradientNorms,
        Some(&le(&shard.label_weights)),
    )
    .expect("valid shard");
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        rank,
        input: Some(Input::Histogram(Histogram {
            counts: counts.counts,
            tot: counts.tot,
        })),
        label_weights: Default::default(),
        ..Default::default()
    }
}

/// What a histogram-sending client does with the answer: looks up each element's bin.
fn apply_table_locally(loss: Loss, bins: usize, shard: &Shard, bin_weights: &[f32]) -> Vec<f32> {
    let edges = BinEdges::new(loss, bins);
    shard
        .norms
        .iter()
        .zip(&shard.label_weights)
        .map(|(&g, &w)| {
            if w > 0.0 {
                bin_weights[edges.bin_of(g)]
            } else {
                0.0
            }
        })
        .collect()
}

fn shard_request(job_id: &str, step: u64, rank: u32, shard: &Shard) -> HarmonizeRequest {
    norms_request(job_id, step, rank, &shard.norms, Some(&shard.label_weights))
}

/// W ranks on their own connections send `steps` steps with random delays; every rank's answer
/// is compared bit for bit with the reference run on the concatenated batch.
async fn run_distributed(world_size: u32, loss: Loss, histogram_ranks: u32, seed: u64) {
    const STEPS: usize = 24;
    const BINS: usize = 30;
    let momentum = 0.75;
    let server = TestServer::start().await;
    let job_id = format!("dist/w{world_size}/h{histogram_ranks}/{loss:?}");
    let mut rng = SplitMix(seed);
    let shards: Vec<Vec<Shard>> = (0..STEPS)
        .map(|_| {
            (0..world_size)
                .map(|_| random_shard(&mut rng, loss))
                .collect()
        })
        .collect();
    server
        .client()
        .await
        .create_job(
            &job_id,
            with_world(of_loss(loss, BINS as u32, momentum), world_size),
        )
        .await
        .expect("create");

    let mut tasks = Vec::new();
    for rank in 0..world_size {
        let mut client = server.client().await;
        let shards: Vec<Shard> = shards
            .iter()
            .map(|step| step[rank as usize].clone())
            .collect();
        let job_id = job_id.clone();
        let mut delays = SplitMix(seed * 1000 + u64::from(rank));
        let sends_histograms = rank < histogram_ranks;
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for (step, shard) in shards.iter().enumerate() {
                tokio::time::sleep(Duration::from_micros(delays.below(3000))).await;
                let request = if sends_histograms {
                    histogram_request(&job_id, step as u64, rank, loss, BINS, shard)
                } else {
                    shard_request(&job_id, step as u64, rank, shard)
                };
                let response = client.harmonize(request).await.expect("step applies");
                let weights = if sends_histograms {
                    assert!(response.weights.is_empty());
                    apply_table_locally(loss, BINS, shard, &response.bin_weights)
                } else {
                    bytes_to_f32s(&response.weights)
                };
                answers.push((response, weights));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("rank task"));
    }

    let mut reference = Reference::new(loss, BINS, momentum);
    for (step, step_shards) in shards.iter().enumerate() {
        let expected = reference.step(&step_shards.iter().collect::<Vec<_>>());
        for (rank, rank_answers) in answers.iter().enumerate() {
            let (response, weights) = &rank_answers[step];
            let context = format!("W={world_size} step {step} rank {rank}");
            assert_eq!(response.step, step as u64, "{context}");
            assert_eq!(
                bits(weights),
                bits(&expected.weights_per_shard[rank]),
                "{context}: weights"
            );
            assert_eq!(
                bits(&response.bin_weights),
                bits(&expected.bin_weights),
                "{context}: table"
            );
            assert_eq!(response.tot, expected.tot, "{context}: tot");
            assert_eq!(
                bits(&response.acc_sum),
                bits(&expected.acc_sum),
                "{context}: acc_sum"
            );
            assert!(response.missing_ranks.is_empty());
        }
    }
    let job = server.client().await.get_job(&job_id).await.expect("get");
    let state = job.state.expect("state");
    assert_eq!(state.steps, STEPS as u64);
    assert_eq!(state.next_step, STEPS as u64);
    assert_eq!(bits(&state.acc_sum), bits(reference.density.acc_sum()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_get_the_global_batch_weights() {
    run_distributed(2, Loss::GhmR, 0, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_ranks_get_the_global_batch_weights() {
    run_distributed(4, Loss::GhmC, 0, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_ranks_get_the_global_batch_weights() {
    run_distributed(8, Loss::GhmC, 0, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_may_mix_histograms_and_raw_norms() {
    run_distributed(2, Loss::GhmR, 1, 20).await;
    run_distributed(4, Loss::GhmC, 2, 40).await;
    run_distributed(8, Loss::GhmC, 4, 80).await;
}

fn small_shard(seed: u64) -> Shard {
    random_shard(&mut SplitMix(seed), Loss::GhmC)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_rank_aborts_the_step_naming_it_and_the_job_takes_the_next_attempt() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let timeout = Duration::from_millis(400);
    let spec = step_synchronous(ghm_c(10, 0.5), 3, timeout);
    client.create_job("abort", spec).await.expect("create");
    let shards: Vec<Shard> = (0..3).map(small_shard).collect();

    let started = Instant::now();
    let mut waiting = Vec::new();
    for rank in 0..2u32 {
        let mut client = server.client().await;
        let request = shard_request("abort", 0, rank, &shards[rank as usize]);
        waiting.push(tokio::spawn(async move { client.harmonize(request).await }));
    }
    for task in waiting {
        let status = task.await.expect("task").expect_err("rank 2 never sent");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(
            status.message().contains("rank(s) 2 "),
            "{}",
            status.message()
        );
        let elapsed = started.elapsed();
        assert!(
            elapsed >= timeout,
            "aborted after {elapsed:?}, before the timeout"
        );
        assert!(
            elapsed < timeout + Duration::from_secs(2),
            "aborted only after {elapsed:?}"
        );
    }
    let state = job_state(&mut client, "abort").await;
    assert_eq!((state.steps, state.next_step, state.elements), (0, 0, 0));
    assert!(
        state.acc_sum.iter().all(|&a| a == 0.0),
        "the job is unchanged"
    );

    // The next attempt at step 0, with every rank, is applied.
    let mut tasks = Vec::new();
    for rank in 0..3u32 {
        let mut client = server.client().await;
        let request = shard_request("abort", 0, rank, &shards[rank as usize]);
        tasks.push(tokio::spawn(async move { client.harmonize(request).await }));
    }
    let mut reference = Reference::new(Loss::GhmC, 10, 0.5);
    let expected = reference.step(&shards.iter().collect::<Vec<_>>());
    for (rank, task) in tasks.into_iter().enumerate() {
        let response = task.await.expect("task").expect("applied");
        assert_eq!(
            bits(&bytes_to_f32s(&response.weights)),
            bits(&expected.weights_per_shard[rank])
        );
    }
    assert_eq!(job_state(&mut client, "abort").await.next_step, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_partial_steps_the_step_applies_without_the_missing_rank_and_says_so() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let timeout = Duration::from_millis(300);
    let spec = JobSpec {
        allow_partial_steps: true,
        ..step_synchronous(ghm_c(10, 0.5), 3, timeout)
    };
    client.create_job("partial", spec).await.expect("create");
    let shards: Vec<Shard> = (0..2).map(|s| small_shard(s + 10)).collect();
    let mut tasks = Vec::new();
    for rank in 0..2u32 {
        let mut client = server.client().await;
        let request = shard_request("partial", 0, rank, &shards[rank as usize]);
        tasks.push(tokio::spawn(async move { client.harmonize(request).await }));
    }
    let mut reference = Reference::new(Loss::GhmC, 10, 0.5);
    let expected = reference.step(&shards.iter().collect::<Vec<_>>());
    for (rank, task) in tasks.into_iter().enumerate() {
        let response = task.await.expect("task").expect("applied partially");
        assert_eq!(response.missing_ranks, vec![2]);
        assert_eq!(
            bits(&bytes_to_f32s(&response.weights)),
            bits(&expected.weights_per_shard[rank])
        );
        assert_eq!(bits(&response.acc_sum), bits(&expected.acc_sum));
    }
    let state = job_state(&mut client, "partial").await;
    assert_eq!((state.steps, state.next_step), (1, 1));

    // The late rank gets the stored table of the step it missed.
    let late = small_shard(99);
    let response = client
        .harmonize(shard_request("partial", 0, 2, &late))
        .await
        .expect("answered from the kept table");
    assert_eq!(response.missing_ranks, vec![2]);
    assert_eq!(bits(&response.bin_weights), bits(&expected.bin_weights));
    assert_eq!(
        job_state(&mut client, "partial").await.steps,
        1,
        "not applied twice"
    );
    server.stop().await;
}

async fn run_full_step(
    server: &TestServer,
    job_id: &str,
    step: u64,
    shards: &[Shard],
) -> Vec<HarmonizeResponse> {
    let mut tasks = Vec::new();
    for (rank, shard) in shards.iter().enumerate() {
        let mut client = server.client().await;
        let request = shard_request(job_id, step, rank as u32, shard);
        tasks.push(tokio::spawn(async move { client.harmonize(request).await }));
    }
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await.expect("task").expect("step applies"));
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_success_gets_the_identical_answer_until_its_table_is_dropped() {
    let server = TestServer::start_with(|config| config.kept_steps = 2).await;
    let mut client = server.client().await;
    client
        .create_job("retry", with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    let steps: Vec<Vec<Shard>> = (0..4)
        .map(|s| vec![small_shard(2 * s), small_shard(2 * s + 1)])
        .collect();
    let first = run_full_step(&server, "retry", 0, &steps[0]).await;
    let again = client
        .harmonize(shard_request("retry", 0, 1, &steps[0][1]))
        .await
        .expect("resend");
    assert_eq!(again, first[1], "a resend gets the identical response");
    assert_eq!(
        job_state(&mut client, "retry").await.steps,
        1,
        "not applied twice"
    );

    for (step, shards) in steps.iter().enumerate().skip(1) {
        run_full_step(&server, "retry", step as u64, shards).await;
    }
    // Steps 2 and 3 are kept; 0 and 1 are not.
    let status = client
        .harmonize(shard_request("retry", 0, 0, &steps[0][0]))
        .await
        .expect_err("too old");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("--kept-steps"),
        "{}",
        status.message()
    );
    client
        .harmonize(shard_request("retry", 2, 0, &steps[2][0]))
        .await
        .expect("step 2 is still kept");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_while_pending_replaces_the_earlier_contribution() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("replace", with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    let (lost, resent, other) = (small_shard(1), small_shard(2), small_shard(3));
    let mut first_client = server.client().await;
    let lost_request = shard_request("replace", 0, 0, &lost);
    let first = tokio::spawn(async move { first_client.harmonize(lost_request).await });
    // Let the first contribution arrive before the resend replaces it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second_client = server.client().await;
    let resent_request = shard_request("replace", 0, 0, &resent);
    let second = tokio::spawn(async move { second_client.harmonize(resent_request).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other_response = client
        .harmonize(shard_request("replace", 0, 1, &other))
        .await
        .expect("rank 1");

    let superseded = first.await.expect("task").expect_err("replaced");
    assert_eq!(superseded.code(), Code::Aborted);
    assert!(
        superseded.message().contains("sent this step again"),
        "{}",
        superseded.message()
    );
    let second = second.await.expect("task").expect("applied");
    let mut reference = Reference::new(Loss::GhmC, 10, 0.75);
    let expected = reference.step(&[&resent, &other]);
    assert_eq!(
        bits(&bytes_to_f32s(&second.weights)),
        bits(&expected.weights_per_shard[0])
    );
    assert_eq!(
        bits(&bytes_to_f32s(&other_response.weights)),
        bits(&expected.weights_per_shard[1])
    );
    let state = job_state(&mut client, "replace").await;
    assert_eq!(state.steps, 1);
    let valid = |s: &Shard| s.label_weights.iter().filter(|&&w| w > 0.0).count() as u64;
    assert_eq!(
        state.elements,
        valid(&resent) + valid(&other),
        "the lost contribution is gone"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_step_waits_for_the_earlier_one_and_steps_apply_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("order", with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    let steps: Vec<Vec<Shard>> = (0..2)
        .map(|s| vec![small_shard(2 * s), small_shard(2 * s + 1)])
        .collect();
    // Step 1 complete first, from both ranks; step 0 comes afterwards.
    let mut later = Vec::new();
    for rank in 0..2u32 {
        let mut client = server.client().await;
        let request = shard_request("order", 1, rank, &steps[1][rank as usize]);
        later.push(tokio::spawn(async move { client.harmonize(request).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        job_state(&mut client, "order").await.steps,
        0,
        "step 1 waits for step 0"
    );
    let first = run_full_step(&server, "order", 0, &steps[0]).await;
    let mut reference = Reference::new(Loss::GhmC, 10, 0.75);
    let expected0 = reference.step(&[&steps[0][0], &steps[0][1]]);
    let expected1 = reference.step(&[&steps[1][0], &steps[1][1]]);
    assert_eq!(bits(&first[0].acc_sum), bits(&expected0.acc_sum));
    for (rank, task) in later.into_iter().enumerate() {
        let response = task.await.expect("task").expect("applied after step 0");
        assert_eq!(
            bits(&bytes_to_f32s(&response.weights)),
            bits(&expected1.weights_per_shard[rank])
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_rank_outside_the_world_is_invalid_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("ranks", with_world(ghm_c(10, 0.75), 4))
        .await
        .expect("create");
    let status = client
        .harmonize(shard_request("ranks", 0, 4, &small_shard(1)))
        .await
        .expect_err("rank 4 of 4");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("rank = 4"),
        "{}",
        status.message()
    );
    let status = client
        .harmonize(shard_request("ranks", u64::MAX, 0, &small_shard(1)))
        .await
        .expect_err("the last step number is reserved");
    assert_eq!(status.code(), Code::InvalidArgument);
    let state = job_state(&mut client, "ranks").await;
    assert_eq!((state.steps, state.next_step), (0, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_job_changes_the_world_size_from_a_step_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("elastic", with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    let mut reference = Reference::new(Loss::GhmC, 10, 0.75);
    let two: Vec<Shard> = (0..2).map(small_shard).collect();
    run_full_step(&server, "elastic", 0, &two).await;
    reference.step(&two.iter().collect::<Vec<_>>());

    let update = |world_size, from_step| UpdateJobRequest {
        job_id: "elastic".into(),
        world_size,
        from_step,
        ..Default::default()
    };
    let status = client
        .raw()
        .update_job(update(3, 0))
        .await
        .expect_err("step 0 is applied");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let job = client
        .raw()
        .update_job(update(3, 2))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(job.spec.expect("spec").world_size, 3);

    // Step 1 still has two ranks, step 2 has three.
    let one: Vec<Shard> = (2..4).map(small_shard).collect();
    run_full_step(&server, "elastic", 1, &one).await;
    reference.step(&one.iter().collect::<Vec<_>>());
    let three: Vec<Shard> = (4..7).map(small_shard).collect();
    let responses = run_full_step(&server, "elastic", 2, &three).await;
    let expected = reference.step(&three.iter().collect::<Vec<_>>());
    for (rank, response) in responses.iter().enumerate() {
        assert_eq!(
            bits(&bytes_to_f32s(&response.weights)),
            bits(&expected.weights_per_shard[rank])
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_a_checkpoint_replays_the_same_bits() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("restore", with_world(ghm_c(30, 0.75), 2))
        .await
        .expect("create");
    let steps: Vec<Vec<Shard>> = (0..8)
        .map(|s| vec![small_shard(2 * s), small_shard(2 * s + 1)])
        .collect();
    for (step, shards) in steps.iter().enumerate().take(3) {
        run_full_step(&server, "restore", step as u64, shards).await;
    }
    let checkpoint = client
        .raw()
        .get_job(GetJobRequest {
            job_id: "restore".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .state
        .expect("state");
    assert_eq!(checkpoint.next_step, 3);
    let mut first_run = Vec::new();
    for (step, shards) in steps.iter().enumerate().skip(3) {
        first_run.push(run_full_step(&server, "restore", step as u64, shards).await);
    }
    let restored = client
        .raw()
        .restore_job(RestoreJobRequest {
            job_id: "restore".into(),
            state: Some(checkpoint.clone()),
        })
        .await
        .expect("restore")
        .into_inner()
        .state
        .expect("state");
    // The same bits, in a new generation (a restore fences copies from before it).
    assert_eq!(restored.generation, checkpoint.generation + 1);
    assert_eq!(
        restored,
        JobState {
            generation: restored.generation,
            ..checkpoint.clone()
        },
        "the same bits"
    );
    for (i, (step, shards)) in steps.iter().enumerate().skip(3).enumerate() {
        let mut replay = run_full_step(&server, "restore", step as u64, shards).await;
        for response in &mut replay {
            response.generation = first_run[i][0].generation;
        }
        assert_eq!(replay, first_run[i], "step {step} replays identically");
    }
    // A bad checkpoint is refused and changes nothing.
    let before = job_state(&mut client, "restore").await;
    let mut bad = checkpoint.clone();
    bad.acc_sum[3] = f32::NAN;
    let status = client
        .raw()
        .restore_job(RestoreJobRequest {
            job_id: "restore".into(),
            state: Some(bad),
        })
        .await
        .expect_err("NaN density");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("acc_sum[3]"),
        "{}",
        status.message()
    );
    assert_eq!(job_state(&mut client, "restore").await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_does_not_hold_up_other_jobs_and_deleting_it_releases_its_ranks() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("stalled", with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    client
        .create_job("free", with_world(ghm_c(10, 0.75), 0))
        .await
        .expect("create");
    let mut waiting_client = server.client().await;
    let request = shard_request("stalled", 0, 0, &small_shard(1));
    let waiting = tokio::spawn(async move { waiting_client.harmonize(request).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for step in 0..20 {
        client
            .harmonize(shard_request("free", step, 0, &small_shard(step)))
            .await
            .expect("other jobs are served");
    }
    assert!(!waiting.is_finished());
    client.delete_job("stalled").await.expect("delete");
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released at once")
        .expect("task")
        .expect_err("deleted");
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("deleted"), "{}", status.message());
    server.stop().await;
}

/// 64 jobs x 8 ranks x 100 steps at once, each rank on a stream: no deadlock, every job ends
/// with 100 steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_jobs_of_eight_ranks_run_a_hundred_steps_at_once() {
    const JOBS: usize = 64;
    const RANKS: u32 = 8;
    const STEPS: u64 = 100;
    const BINS: usize = 30;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for job in 0..JOBS {
        client
            .create_job(
                &format!("stress/{job}"),
                with_world(ghm_c(BINS as u32, 0.75), RANKS),
            )
            .await
            .expect("create");
    }
    // A few connections shared by all streams, as a handful of hosts would.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(server.channel().await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for job in 0..JOBS {
        for rank in 0..RANKS {
            let channel = channels[(job + rank as usize) % channels.len()].clone();
            tasks.push(tokio::spawn(async move {
                let job_id = format!("stress/{job}");
                let (sender, receiver) = tokio::sync::mpsc::channel(1);
                let mut client = Client::from_channel(channel);
                let mut responses = client
                    .raw()
                    .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
                    .await
                    .expect("stream")
                    .into_inner();
                for step in 0..STEPS {
                    let mut counts = vec![0u64; BINS];
                    counts[(step as usize + rank as usize) % BINS] = u64::from(rank) + 1;
                    let tot = (u64::from(rank) + 1) as f64;
                    sender
                        .send(HarmonizeRequest {
                            job_id: job_id.clone(),
                            step,
                            rank,
                            input: Some(Input::Histogram(Histogram { counts, tot })),
                            label_weights: Default::default(),
                            ..Default::default()
                        })
                        .await
                        .expect("send");
                    let response = responses.message().await.expect("ok").expect("a response");
                    assert_eq!(response.step, step);
                    assert_eq!(response.tot, 36.0, "the sum of all 8 ranks' tots");
                }
            }));
        }
    }
    let all = join_all(tasks);
    tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .expect("no deadlock");
    eprintln!("64 jobs x 8 ranks x 100 steps took {:?}", started.elapsed());
    for job in 0..JOBS {
        let state = job_state(&mut client, &format!("stress/{job}")).await;
        assert_eq!((state.steps, state.next_step), (STEPS, STEPS));
    }
    server.stop().await;
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        task.await.expect("rank task");
    }
}

#[tokio::test]
async fn asynchronous_jobs_reject_a_world_size_update_and_a_next_step() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("async", with_world(ghm_c(10, 0.75), 1))
        .await
        .expect("create");
    let status = client
        .raw()
        .update_job(UpdateJobRequest {
            job_id: "async".into(),
            world_size: 4,
            from_step: 0,
            ..Default::default()
        })
        .await
        .expect_err("asynchronous");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = client
        .raw()
        .restore_job(RestoreJobRequest {
            job_id: "async".into(),
            state: Some(proto::JobState {
                acc_sum: vec![0.0; 10],
                steps: 1,
                elements: 1,
                next_step: 5,
                ..Default::default()
            }),
        })
        .await
        .expect_err("no next step");
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}
