"""Two DDP processes (gloo, CPU) on one step-synchronous job: both ranks get the same table, the
table, the weights and the EMA are those of one process on the concatenated batch (bit for bit),
the losses and gradients are those of the global batch, and a checkpoint restores the job for
every rank."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import ddp_worker
from ghmd.torch import bin_edges, bin_indices
from mmdet_port import PortGHMC

WORLD = 2


@pytest.mark.parametrize("modes", [("histogram", "histogram"), ("histogram", "raw")],
                         ids=["histograms", "mixed"])
def test_two_ranks_weigh_the_global_batch(address, job_id, tmp_path, modes):
    mp.spawn(
        ddp_worker.run,
        args=(WORLD, str(tmp_path / "init"), address, job_id, modes, str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    reference = PortGHMC(bins=30, momentum=0.75)
    edges = bin_edges("ghm_c", 30)

    for index in range(ddp_worker.STEPS):
        records = [rank["records"][index] for rank in ranks]
        assert [r["step"] for r in records] == [index] * WORLD, "one step per call on every rank"
        assert torch.equal(records[0]["table"], records[1]["table"]), f"tables differ at {index}"
        assert records[0]["tot"] == records[1]["tot"]

        # One process on the concatenated batch, from exactly the predictions the ranks made.
        _, labels, label_weight = ddp_worker.global_batch(index)
        pred = torch.cat([r["pred"] for r in records]).requires_grad_()
        loss = reference(pred, labels, label_weight)
        loss.backward()
        assert torch.equal(reference.acc_sum, records[0]["acc_sum"]), f"EMA differs at {index}"
        assert records[0]["tot"] == max(float((label_weight > 0).sum()) * 5, 1.0)

        for rank, record in enumerate(records):
            shard = ddp_worker.SHARDS[rank]
            # The rank's weights are the reference's weights of its rows, bit for bit.
            targets = torch.nn.functional.one_hot(labels[shard], 6)[:, :5].float()
            g = torch.abs(record["pred"].sigmoid() - targets)
            valid = (label_weight[shard] > 0).reshape(-1, 1).expand_as(g)
            weights = torch.where(valid, record["table"][bin_indices(g, edges).clamp(0, 29)], 0.0)
            assert torch.equal(weights, reference.last_weights[shard]), (index, rank)
            # loss_rank = W * sum(w * L) / tot: its gradient is W times the global one (to an
            # ulp: PyTorch's vectorised sigmoid rounds a tensor's tail elements differently).
            torch.testing.assert_close(
                record["pred_grad"] / WORLD, pred.grad[shard], rtol=1e-6, atol=0
            )

        # DDP averages the rank losses' gradients: the global-batch loss and gradient (up to the
        # order in which float sums are taken).
        mean_loss = sum(r["loss"] for r in records) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=0)
        weight_grad = pred.grad.T @ torch.cat([ddp_worker.global_batch(index)[0][s]
                                               for s in ddp_worker.SHARDS])
        bias_grad = pred.grad.sum(0)
        for record in records:
            torch.testing.assert_close(record["grads"][0], weight_grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(record["grads"][1], bias_grad, rtol=1e-5, atol=1e-7)

    # The checkpoint restored the job for both ranks: the steps after it replay to the same bits.
    for rank in ranks:
        assert rank["checkpoint_next_step"] == ddp_worker.STEPS
        for before, again in zip(rank["after"], rank["replayed"]):
            assert before["step"] == again["step"]
            for key in ("loss", "table", "acc_sum", "pred_grad"):
                assert torch.equal(before[key], again[key]), key
