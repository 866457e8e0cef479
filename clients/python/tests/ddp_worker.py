"""One rank of the DDP test (test_ddp.py), run by torch.multiprocessing.spawn.

Trains a linear classifier under DistributedDataParallel (gloo, CPU) with ghmd.torch.GHMC on
its shard of a global batch, records what the test compares with a single process, then
checkpoints, runs on, restores and replays.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ghmd.torch import GHMC

FEATURES = 8
CLASSES = 5
# Uneven shards of a 64-row global batch: ranks need not see the same number of elements.
SHARDS = [slice(0, 40), slice(40, 64)]
STEPS = 4  # recorded steps, then a checkpoint
REPLAYED = 2  # steps run after the checkpoint, then replayed after restoring it


def global_batch(step: int):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES + 1, (64,), generator=generator)
    labels[torch.rand(64, generator=generator) < 0.8] = CLASSES  # mostly background
    label_weight = (torch.rand(64, generator=generator) > 0.1).float()
    return x, labels, label_weight


def run(rank: int, world_size: int, init_file: str, address: str, job_id: str, modes, out: str):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)

    def make_loss():
        return GHMC(bins=30, momentum=0.75, job_id=job_id, address=address, mode=modes[rank])

    ghm = make_loss()

    def step(loss_module, index):
        x, labels, label_weight = global_batch(index)
        shard = SHARDS[rank]
        pred = ddp(x[shard])
        pred.retain_grad()
        loss = loss_module(pred, labels[shard], label_weight[shard])
        optimizer.zero_grad()
        loss.backward()
        record = {
            "step": loss_module.last_result.step,
            "loss": loss.detach().clone(),
            "pred": pred.detach().clone(),
            "pred_grad": pred.grad.clone(),
            "table": torch.from_numpy(loss_module.last_result.bin_weights.copy()),
            "tot": loss_module.last_result.tot,
            "acc_sum": loss_module.acc_sum.clone(),
            "grads": [p.grad.clone() for p in model.parameters()],
        }
        optimizer.step()
        return record

    records = [step(ghm, index) for index in range(STEPS)]
    checkpoint = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "ghm": ghm.state_dict(),
    }
    after = [step(ghm, STEPS + index) for index in range(REPLAYED)]
    ghm.close()

    # Resume from the checkpoint, as a restarted job would: every rank loads it.
    resumed = make_loss()
    resumed.load_state_dict(checkpoint["ghm"])
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    replayed = [step(resumed, STEPS + index) for index in range(REPLAYED)]
    resumed.close()

    torch.save(
        {"records": records, "after": after, "replayed": replayed,
         "checkpoint_next_step": int(checkpoint["ghm"]["next_step"])},
        f"{out}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def identity(rank: int, world_size: int, init_file: str, out: str):
    """test_runs.py: the run identity every rank of one run computes (twice: it is drawn once)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    from ghmd.torch import run_identity

    first, again = run_identity(), run_identity()
    torch.save({"first": first, "again": again}, f"{out}/identity{rank}.pt")
    dist.destroy_process_group()
