"""One rank of the Seesaw and EQLv2 DDP tests (test_ddp_methods.py), run by
torch.multiprocessing.spawn: a linear classifier under DistributedDataParallel (gloo, CPU) on
its shard of a global batch, with ghmd's loss on one step-synchronous job; records what the
test compares with one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mmdet_support  # noqa: F401  (real mmdetection, without mmcv's compiled ops)
from mmdet.models.losses.eqlv2_loss import EQLV2Loss as MmdetEQLV2Loss

from ghmd.torch import EQLV2Loss, SeesawLoss

FEATURES = 8
CLASSES = 12
ROWS = 96
# Uneven shards: ranks need not see the same number of samples.
SHARDS = [slice(0, 60), slice(60, ROWS)]
STEPS = 4
REPLAYED = 2  # steps run after the checkpoint, then replayed after every rank restored it


def global_batch(step: int, channels: int):
    generator = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES + 1, (ROWS,), generator=generator)
    # Rank 0's shard is mostly background, rank 1's mostly the low classes: counts differ.
    labels[:40][torch.rand(40, generator=generator) < 0.7] = CLASSES
    labels[60:] = labels[60:] % 4
    label_weights = (torch.rand(ROWS, generator=generator) > 0.1).float()
    return x, labels, label_weights


def _start(rank: int, world_size: int, init_file: str, channels: int):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(FEATURES, channels))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def seesaw(rank: int, world_size: int, init_file: str, address: str, job_id: str, out: str):
    model, optimizer = _start(rank, world_size, init_file, CLASSES + 2)
    loss = SeesawLoss(num_classes=CLASSES, job_id=job_id, address=address)
    records = []
    for step in range(STEPS):
        x, labels, label_weights = global_batch(step, CLASSES + 2)
        shard = SHARDS[rank]
        scores = model(x[shard])
        scores.retain_grad()
        losses = loss(scores, labels[shard], label_weights[shard])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        records.append({
            "step": loss.last_result.step,
            "scores": scores.detach().clone(),
            "losses": {key: value.detach().clone() for key, value in losses.items()},
            "cum_samples": loss.cum_samples.clone(),
        })
    saved = loss.state_dict()

    def on(module, index):
        x, labels, label_weights = global_batch(index, CLASSES + 2)
        shard = SHARDS[rank]
        losses = module(model(x[shard]).detach(), labels[shard], label_weights[shard])
        return losses, module.cum_samples.clone()

    after = [on(loss, STEPS + index) for index in range(REPLAYED)]
    loss.close()
    # A restarted run: every rank loads the checkpoint; rank 0 restores the job at the first
    # step, behind a barrier, and the steps after it replay to the same bits.
    resumed = SeesawLoss(num_classes=CLASSES, job_id=job_id, address=address)
    resumed.load_state_dict(saved)
    replayed = [on(resumed, STEPS + index) for index in range(REPLAYED)]
    resumed.close()
    torch.save({"records": records, "saved": saved, "after": after, "replayed": replayed},
               f"{out}/seesaw{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def eqlv2(rank: int, world_size: int, init_file: str, address: str, job_id: str, out: str):
    """Beside ghmd's loss, mmdetection's own EQLV2Loss with use_distributed=True on the same
    scores: it all_reduces each step's gradient sums (two ranks: c0 + c1 in float32, which is
    the rank-order sum ghmd makes), so the two must agree bit for bit."""
    model, optimizer = _start(rank, world_size, init_file, CLASSES + 1)
    loss = EQLV2Loss(num_classes=CLASSES, job_id=job_id, address=address)
    theirs = MmdetEQLV2Loss(num_classes=CLASSES, use_distributed=True)
    records = []
    for step in range(STEPS):
        x, labels, _ = global_batch(step, CLASSES + 1)
        shard = SHARDS[rank]
        scores = model(x[shard])
        scores.retain_grad()
        value = loss(scores, labels[shard])
        their_scores = scores.detach().clone().requires_grad_()
        their_value = theirs(their_scores, labels[shard])
        their_value.backward()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        loss.collect()
        records.append({
            "step": loss.last_result.step,
            "scores": scores.detach().clone(),
            "loss": value.detach().clone(),
            "grad": scores.grad.clone(),
            "their_loss": their_value.detach().clone(),
            "their_grad": their_scores.grad.clone(),
            "state": {name: getattr(loss, name).clone() for name in
                      ("pos_grad", "neg_grad", "pos_neg")},
            "their_state": {name: getattr(theirs, name).clone() for name in
                            ("pos_grad", "neg_grad", "pos_neg")},
        })
    # The step of the checkpoint's next iteration is in flight when it is saved.
    x, labels, _ = global_batch(STEPS, CLASSES + 1)
    loss(model(x[SHARDS[rank]]).detach(), labels[SHARDS[rank]])
    saved = loss.state_dict()

    def on(module, index):
        x, labels, _ = global_batch(index, CLASSES + 1)
        value = module(model(x[SHARDS[rank]]).detach(), labels[SHARDS[rank]])
        module.collect()
        return value, module.pos_neg.clone()

    after = [on(loss, STEPS + 1 + index) for index in range(REPLAYED)]
    loss.close()
    resumed = EQLV2Loss(num_classes=CLASSES, job_id=job_id, address=address)
    resumed.load_state_dict(saved)
    replayed = [on(resumed, STEPS + 1 + index) for index in range(REPLAYED)]
    resumed.close()
    torch.save({"records": records, "saved": saved, "after": after, "replayed": replayed},
               f"{out}/eqlv2{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
