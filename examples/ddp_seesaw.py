"""DDP training with ghmd's Seesaw loss: every rank weighs with the samples per class all ranks saw.

    cargo build --release
    python examples/ddp_seesaw.py --ghmd target/release/ghmd --nproc 2     # starts its own ghmd
    python examples/ddp_seesaw.py --address 127.0.0.1:50051 --nproc 4      # or uses a running one

Trains a small classifier on CPU (gloo backend) on a long-tailed problem: class c is drawn about
twice as often as class c + 1, and each rank draws from a distribution of its own (rank r sees the
classes shifted by r), as the shards of a real sampler differ. The loss is
``ghmd.torch.SeesawLoss`` on one step-synchronous job. At every step rank 0 gathers the
``cum_samples`` every rank weighs with and prints whether they are the same, next to the counts
that mmdetection's SeesawLoss, which counts only the samples of its own GPU, would have had on
each rank.

Needs the ghmd-client package (``pip install clients/python`` or PYTHONPATH=clients/python/src)
and torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ghmd.local import scratch_server
from ghmd.torch import SeesawLoss

CLASSES = 6
FEATURES = 4


def shard(step: int, rank: int, size: int):
    """A rank's batch: long-tailed labels (rank r's head class is r), a third background."""
    generator = torch.Generator().manual_seed(step * 1009 + rank)
    tail = torch.tensor([0.5 ** c for c in range(CLASSES)])
    drawn = torch.multinomial(tail, size, replacement=True, generator=generator)
    labels = (drawn + rank) % CLASSES
    labels[torch.rand(size, generator=generator) < 0.33] = CLASSES  # background
    centres = torch.randn(CLASSES + 1, FEATURES, generator=torch.Generator().manual_seed(7)) * 2
    x = centres[labels] + torch.randn(size, FEATURES, generator=generator)
    return x, labels


def counts(values) -> str:
    return " ".join(f"{int(v):6d}" for v in values)


def train(rank: int, world_size: int, args) -> None:
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{args.init_file}", rank=rank, world_size=world_size
        )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES + 2))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    # The shared statistic: one step-synchronous job for all ranks (world size from DDP).
    seesaw = SeesawLoss(num_classes=CLASSES, job_id=args.job_id, address=args.address)
    # What mmdetection's SeesawLoss keeps on each GPU: this rank's own counts.
    local = torch.zeros(CLASSES + 1)

    for step in range(args.steps):
        x, labels = shard(step, rank, args.batch)
        losses = seesaw(ddp(x), labels)
        local += torch.bincount(labels, minlength=CLASSES + 1).float()
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        gathered = [None] * world_size
        dist.all_gather_object(gathered, (seesaw.cum_samples.tolist(), local.tolist(),
                                          loss.item()))
        if rank == 0:
            shared = gathered[0][0]
            same = all(g[0] == shared for g in gathered)
            mean_loss = sum(g[2] for g in gathered) / world_size
            print(f"step {step:3d}  loss (mean of ranks) {mean_loss:.4f}"
                  f"  every rank weighs with the same counts: {'yes' if same else 'NO'}")
            print(f"  ghmd, every rank : {counts(shared)}")
            for other, (_, own, _) in enumerate(gathered):
                print(f"  local, rank {other:<4} : {counts(own)}")
            sys.stdout.flush()
            if not same:
                raise SystemExit(f"step {step}: the ranks weigh with different counts")
    seesaw.close()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running ghmd, host:port")
    parser.add_argument("--ghmd", help="or: a ghmd binary to start on a free port")
    parser.add_argument("--nproc", type=int, default=2, help="processes (2 to 4)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="samples per rank and step")
    parser.add_argument("--job-id", default=f"examples/ddp_seesaw/{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()

    if args.address is None and args.ghmd is None:
        parser.error("give --address of a running ghmd, or --ghmd to start one")
    with scratch_server(args.ghmd, args.address) as args.address:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
            dist.init_process_group("gloo")
            train(dist.get_rank(), dist.get_world_size(), args)
            return
        with tempfile.TemporaryDirectory() as scratch:
            args.init_file = os.path.join(scratch, "init")
            print(f"{args.nproc} ranks, Seesaw job {args.job_id} on ghmd at {args.address}")
            print(f"  counts per label 0..{CLASSES - 1}, then the background")
            mp.spawn(train, args=(args.nproc, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
