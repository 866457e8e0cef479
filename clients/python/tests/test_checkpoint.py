"""Checkpoints: a module's state_dict carries the job's density and step, as mmdetection's acc_sum
buffer does, so that a resumed run replays the same bits; and a checkpoint of mmdetection's own
GHMC resumes on ghmd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import Server
from ghmd import ghm_pb2
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
                          ("edges", "acc_sum", "steps", "elements", "next_step", "run_id")}
    assert bytes(saved["loss_cls.run_id"].tolist()).decode() == head.loss_cls._job.run_id != ""
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


# -- the mirrored state (issue 13): checkpoints without round trips -----------------------------

COUNTERS_IN_RESPONSES = "steps" in ghm_pb2.HarmonizeResponse.DESCRIPTOR.fields_by_name


def count_get_job(module):
    calls = []
    client = module._connection()
    original = client.get_job

    def spy(job_id):
        calls.append(job_id)
        return original(job_id)

    client.get_job = spy
    return calls


def test_state_dict_after_a_restore_needs_no_server(tmp_path, job_id):
    """A resumed run knows its job's whole state from RestoreJob's answer: saving it again needs
    no RPC, so it works with the server stopped."""
    server = Server(tmp_path / "ghmd.log")
    try:
        server.wait_serving()
        first = GHMC(bins=30, momentum=0.75, job_id=job_id, address=server.address)
        losses(first, list(batches_c(seed=13, steps=3)))
        saved = first.state_dict()
        first.close()
        resumed = GHMC(bins=30, momentum=0.75, job_id=job_id, address=server.address)
        resumed.load_state_dict(saved)
    finally:
        assert server.stop() == 0
    again = resumed.state_dict()  # the server is gone: any RPC would fail with UNAVAILABLE
    assert again.keys() == saved.keys()
    for key in saved:
        assert torch.equal(again[key], saved[key]), key
    resumed.close()


def test_state_dict_asks_the_server_only_what_it_cannot_know(address, job_id):
    module = GHMC(bins=10, momentum=0.75, job_id=job_id, address=address)
    calls = count_get_job(module)
    module.state_dict()  # no step seen: the job's state is on the server only
    assert len(calls) == 1
    module.load_state_dict(module.state_dict())
    calls.clear()
    module.state_dict()
    assert calls == [], "after a restore the mirror is complete"
    module(*next(batches_c(seed=14, steps=1)))
    state = module.state_dict()
    # The counters in HarmonizeResponse complete the mirror: no GetJob.
    assert calls == []
    assert int(state["steps"]) == 1 and torch.equal(state["acc_sum"], module.acc_sum)
    module.close()


@pytest.mark.skipif(not COUNTERS_IN_RESPONSES,
                    reason="waits for the server: HarmonizeResponse carrying steps, elements, "
                           "next_step (the failover issue)")
def test_state_dict_after_steps_needs_no_server(tmp_path, job_id):
    server = Server(tmp_path / "ghmd.log")
    batches = list(batches_c(seed=15, steps=3))
    try:
        server.wait_serving()
        module = GHMC(bins=30, momentum=0.75, job_id=job_id, address=server.address)
        losses(module, batches)
        job = module._connection().get_job(job_id)
    finally:
        assert server.stop() == 0
    state = module.state_dict()
    assert int(state["steps"]) == job.state.steps == 3
    assert int(state["elements"]) == job.state.elements
    assert torch.equal(state["acc_sum"], torch.tensor(list(job.state.acc_sum)))
    module.close()


def test_an_ema_copy_reports_the_jobs_live_density(address, job_id):
    """mmengine's EMAHook(update_buffers=True) keeps an averaged deep copy of the model and
    averages every floating state_dict entry in place. The loss's density is not a weight: the
    copy (which never steps) reports the job's live density, as the original does, and the
    averaging touches neither the original's buffer nor the job."""
    from mmengine.model import ExponentialMovingAverage

    batches = list(batches_c(seed=16, steps=4))
    reference = PortGHMC(bins=30, momentum=0.75)
    model = nn.Sequential(nn.Identity())
    model.loss_cls = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address)
    ema = ExponentialMovingAverage(model, momentum=0.5, update_buffers=True)
    for batch in batches:
        assert_replayed(losses(reference, [batch]), losses(model.loss_cls, [batch]))
        ema.update_parameters(model)
    copy_state = ema.module.loss_cls.state_dict()
    assert torch.equal(copy_state["acc_sum"], reference.acc_sum)
    assert torch.equal(model.loss_cls.acc_sum, reference.acc_sum)
    assert int(copy_state["steps"]) == len(batches) == int(copy_state["next_step"])
    job = model.loss_cls._connection().get_job(job_id)
    assert torch.equal(torch.tensor(list(job.state.acc_sum)), reference.acc_sum)
    model.loss_cls.close()
    ema.module.loss_cls.close()
