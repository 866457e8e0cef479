//! HarmonizeStream: answers in request order, one at a time, and a bad message ends the stream
//! without applying what follows it.

use std::time::Duration;

use ghmd::client::norms_request;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::fixture::fingerprint;
use crate::support::{Draw, SplitMix, TestServer, assert_status, bits, ghm_c};

#[tokio::test]
async fn a_stream_answers_each_request_in_order_and_stops_at_the_first_bad_one() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let streamed = "stream/job";
    let replayed = "stream/replay";
    client
        .create_job(streamed, ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .create_job(replayed, ghm_c(10, 0.75))
        .await
        .expect("create");

    let mut rng = SplitMix(7);
    let batches: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..50 + rng.below(50)).map(|_| rng.unit_closed()).collect())
        .collect();

    // One request at a time: each is answered before the next is sent.
    let (requests, inbound) = tokio::sync::mpsc::channel(1);
    let mut responses = client
        .raw()
        .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = Vec::new();
    for (step, batch) in batches.iter().enumerate().take(3) {
        let good = norms_request(streamed, 100 + step as u64, 0, batch, None);
        requests.send(good).await.expect("send");
        let response = tokio::time::timeout(Duration::from_secs(30), responses.next())
            .await
            .expect("answered without waiting for more requests")
            .expect("a response")
            .expect("ok");
        assert_eq!(response.step, 100 + step as u64, "in request order");
        answered.push(response);
    }
    // A bad message, then a good one that must never be applied.
    requests
        .send(norms_request(streamed, 103, 0, &[0.5, f32::NAN], None))
        .await
        .expect("send");
    let _ = requests
        .send(norms_request(streamed, 104, 0, &batches[3], None))
        .await;
    let end = responses.next().await.expect("a final status");
    assert_status(
        end,
        Code::InvalidArgument,
        &["gradient_norms[1]"],
        "bad message",
    );
    assert!(responses.next().await.is_none(), "nothing after the status");
    drop(requests);

    // The job took exactly the three good steps: the same as replaying them one by one.
    for (step, batch) in batches.iter().enumerate().take(3) {
        let (replay, _) = client
            .harmonize_norms(replayed, step as u64, 0, batch, None)
            .await
            .expect("replay");
        assert_eq!(
            replay.weights, answered[step].weights,
            "step {step}: weights"
        );
        assert_eq!(
            bits(&replay.acc_sum),
            bits(&answered[step].acc_sum),
            "step {step}: acc_sum"
        );
    }
    let streamed_state = fingerprint(&mut client, streamed).await;
    let replayed_state = fingerprint(&mut client, replayed).await;
    assert_eq!(streamed_state.steps, 3);
    assert_eq!(
        streamed_state.elements,
        batches[..3].iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(streamed_state.acc_sum_bits, replayed_state.acc_sum_bits);
    server.stop().await;
}
