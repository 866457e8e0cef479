"""Seesaw and EQLv2 under DDP: two processes (gloo, CPU) on one step-synchronous job each. Both
ranks hold one statistic, that of one process that saw the global batch: Seesaw's cum_samples
those of mmdetection's SeesawLoss fed every rank's labels, EQLv2's state the rank-order sum of
the ranks' contributions (what mmdetection's EQLV2Loss with use_distributed=True computes). A
checkpoint every rank loads restores the job, and the steps after it replay to the same bits."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
import mmdet_support  # noqa: F401  (real mmdetection, without mmcv's compiled ops)
from mmdet.models.losses.cross_entropy_loss import cross_entropy
from mmdet.models.losses.eqlv2_loss import EQLV2Loss as MmdetEQLV2Loss
from mmdet.models.losses.seesaw_loss import SeesawLoss as MmdetSeesawLoss
from mmdet.models.losses.seesaw_loss import seesaw_ce_loss

import ddp_methods_worker as worker

WORLD = 2


def spawn(target, tmp_path, address, job_id, name):
    mp.spawn(target, args=(WORLD, str(tmp_path / "init"), address, job_id, str(tmp_path)),
             nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{name}{rank}.pt") for rank in range(WORLD)]


def assert_replayed(ranks):
    """Every rank loaded the checkpoint into a new loss: the steps after it gave the same bits
    as the first time."""
    for rank in ranks:
        assert len(rank["after"]) == len(rank["replayed"]) == worker.REPLAYED
        for (loss, state), (again, state_again) in zip(rank["after"], rank["replayed"]):
            if isinstance(loss, dict):
                assert all(torch.equal(loss[key], again[key]) for key in loss)
            else:
                assert torch.equal(loss, again)
            assert torch.equal(state, state_again)


def test_seesaw_two_ranks_share_the_counts_of_the_global_batch(address, job_id, tmp_path):
    ranks = spawn(worker.seesaw, tmp_path, address, job_id, "seesaw")
    classes = worker.CLASSES
    one_process = MmdetSeesawLoss(num_classes=classes)
    for index in range(worker.STEPS):
        records = [rank["records"][index] for rank in ranks]
        assert [record["step"] for record in records] == [index] * WORLD
        _, labels, label_weights = worker.global_batch(index, classes + 2)
        # One process on the concatenated batch: its cum_samples are every rank's.
        scores = torch.cat([record["scores"] for record in records])
        one_process(scores, labels, label_weights)
        for rank, record in enumerate(records):
            assert torch.equal(record["cum_samples"], one_process.cum_samples), (index, rank)
            # The rank's loss is mmdetection's Seesaw on its shard with the shared counts.
            shard = worker.SHARDS[rank]
            own, weights = labels[shard], label_weights[shard]
            foreground = own < classes
            expected = seesaw_ce_loss(record["scores"][:, :-2][foreground], own[foreground],
                                      weights[foreground], one_process.cum_samples[:classes],
                                      classes, 0.8, 2.0, 1e-2)
            assert torch.equal(record["losses"]["loss_cls_classes"], expected), (index, rank)
            objectness = cross_entropy(record["scores"][:, -2:], (own == classes).long(),
                                       weights)
            assert torch.equal(record["losses"]["loss_cls_objectness"], objectness)
    # What each rank alone would have counted differs from the shared counts.
    first_shard = worker.global_batch(0, classes + 2)[1][worker.SHARDS[0]]
    local = torch.bincount(first_shard, minlength=classes + 1).float()
    assert not torch.equal(local, ranks[0]["records"][0]["cum_samples"])
    for rank in ranks:
        assert torch.equal(rank["saved"]["cum_samples"], one_process.cum_samples)
        assert int(rank["saved"]["steps"]) == worker.STEPS == int(rank["saved"]["next_step"])
    assert_replayed(ranks)


def test_eqlv2_two_ranks_share_the_rank_order_sum(address, job_id, tmp_path):
    ranks = spawn(worker.eqlv2, tmp_path, address, job_id, "eqlv2")
    classes = worker.CLASSES
    one_process = MmdetEQLV2Loss(num_classes=classes)
    for index in range(worker.STEPS):
        records = [rank["records"][index] for rank in ranks]
        assert [record["step"] for record in records] == [index] * WORLD
        for rank, record in enumerate(records):
            where = f"step {index} rank {rank}"
            assert torch.equal(record["loss"], record["their_loss"]), where
            assert torch.equal(record["grad"], record["their_grad"]), where
            for name, value in record["state"].items():
                assert torch.equal(value, record["their_state"][name]), f"{where} {name}"
                assert torch.equal(value, records[0]["state"][name]), f"{where}: ranks differ"
        # One process on the concatenated batch: the same statistic, up to the order of the
        # float sums (one over all rows, against one per rank then their sum).
        _, labels, _ = worker.global_batch(index, classes + 1)
        one_process(torch.cat([record["scores"] for record in records]), labels)
        for name in ("pos_grad", "neg_grad"):
            torch.testing.assert_close(records[0]["state"][name], getattr(one_process, name),
                                       rtol=1e-5, atol=1e-6)
    for rank in ranks:  # saved with a step in flight: the checkpoint holds it
        assert int(rank["saved"]["steps"]) == worker.STEPS + 1 == int(rank["saved"]["next_step"])
    assert_replayed(ranks)
