"""Checkpoints: a module's state_dict carries the job's density and step, as mmdetection's acc_sum
buffer does, so that a resumed run replays the same bits; and a checkpoint of mmdetection's own
GHMC resumes on ghmd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghmd.torch import GHMC, GHMR
from mmdet_port import PortGHMC
from test_torch_losses import batches_c, batches_r


def losses(module, batches):
    out = []
    for pred, target, label_weight in batches:
        pred = pred.clone().requires_grad_()
        loss = module(pred, target, label_weight)
        loss.backward()
        out.append((loss.detach(), pred.grad, module.acc_sum.clone()))
    return out


def assert_replayed(first, second):
    assert len(first) == len(second)
    for step, (a, b) in enumerate(zip(first, second)):
        for x, y, what in zip(a, b, ("loss", "gradient", "acc_sum")):
            assert torch.equal(x, y), f"{what} at replayed step {step}"


@pytest.mark.parametrize("mode", ["histogram", "raw"])
def test_checkpoint_round_trip(address, job_id, tmp_path, mode):
    batches = list(batches_c(seed=11, steps=7))
    head = nn.Sequential(nn.Identity())
    head.loss_cls = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address, mode=mode)
    losses(head.loss_cls, batches[:4])
    torch.save(head.state_dict(), tmp_path / "epoch_1.pth")
    saved = torch.load(tmp_path / "epoch_1.pth")
    assert set(saved) == {f"loss_cls.{key}" for key in
                          ("edges", "acc_sum", "steps", "elements", "next_step")}
    assert int(saved["loss_cls.steps"]) == 4 and int(saved["loss_cls.next_step"]) == 4
    elements = sum(int((w > 0).sum()) for _, _, w in batches[:4])
    assert int(saved["loss_cls.elements"]) == elements
    first = losses(head.loss_cls, batches[4:])
    head.loss_cls.close()

    # A new process resumes: a new module, the same job, the checkpoint loaded strictly.
    resumed = nn.Sequential(nn.Identity())
    resumed.loss_cls = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address, mode=mode)
    resumed.load_state_dict(torch.load(tmp_path / "epoch_1.pth"))
    job = resumed.loss_cls._connection().get_job(job_id)
    assert job.state.steps == 4 and job.state.elements == elements
    assert torch.equal(torch.tensor(list(job.state.acc_sum)), saved["loss_cls.acc_sum"])
    second = losses(resumed.loss_cls, batches[4:])
    assert_replayed(first, second)
    assert resumed.loss_cls.last_result.step == 6
    resumed.loss_cls.close()


def test_momentum_zero_checkpoint(address, job_id):
    module = GHMR(bins=10, momentum=0, job_id=job_id, address=address)
    batches = list(batches_r(seed=2, steps=3))
    for pred, target, label_weight in batches:
        module(pred, target, label_weight)
    state = module.state_dict()
    assert "acc_sum" not in state, "momentum 0 keeps no density, as in mmdetection"
    assert int(state["steps"]) == 3
    other = GHMR(bins=10, momentum=0, job_id=job_id + "-copy", address=address)
    other.load_state_dict(state)
    assert other._connection().get_job(job_id + "-copy").state.steps == 3


def test_a_checkpoint_of_mmdetections_own_ghmc_resumes_on_ghmd(address, job_id):
    """mmdetection's checkpoints hold edges and acc_sum only: loading one restores the density,
    and from there ghmd and the reference give the same bits."""
    batches = list(batches_c(seed=12, steps=6))
    reference = PortGHMC(bins=30, momentum=0.75)
    losses(reference, batches[:3])
    checkpoint = reference.state_dict()
    assert set(checkpoint) == {"edges", "acc_sum"}

    ours = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    ours.load_state_dict(checkpoint)  # strict: steps and next_step are optional
    assert_replayed(losses(reference, batches[3:]), losses(ours, batches[3:]))
    ours.close()


def test_a_checkpoint_for_another_spec_is_refused_and_leaves_the_job(address, job_id):
    ours = GHMC(bins=10, momentum=0.75, job_id=job_id, address=address)
    ours(*next(batches_c(seed=1, steps=1)))
    before = ours._connection().get_job(job_id).state
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_state_dict(PortGHMC(bins=30, momentum=0.75).state_dict())
    assert ours._connection().get_job(job_id).state == before
    ours.close()


def test_a_deep_copy_reconnects(address, job_id):
    """mmdetection deep-copies models (EMA); a gRPC channel cannot be copied, so the copy opens
    its own connection on first use, to the same job."""
    ours = GHMC(bins=10, momentum=0.75, job_id=job_id, address=address)
    ours(*next(batches_c(seed=1, steps=1)))
    twin = copy.deepcopy(ours)
    assert twin._client is None and twin._connection() is not ours._connection()
    twin(*next(batches_c(seed=2, steps=1)))
    assert ours._connection().get_job(job_id).state.steps == 2
    ours.close()
    twin.close()
