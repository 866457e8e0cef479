"""DDP training with ghmd's GHM-C: every rank weighs its shard with the table of the global batch.

    cargo build --release
    python examples/ddp_ghm.py --ghmd target/release/ghmd --nproc 2      # starts its own ghmd
    python examples/ddp_ghm.py --address 127.0.0.1:50051 --nproc 4       # or uses a running one

Trains a small classifier on CPU (gloo backend) on a strongly imbalanced problem: about 2% of
the anchors belong to one of three classes, the rest are background. Each of the N processes
draws its own shard, so the shards' gradient densities differ. The loss is
``ghmd.torch.GHMC`` on one step-synchronous job. At every step rank 0 gathers the bin tables
the ranks received and prints whether they are the same, next to the table that per-rank local
GHM (what mmdetection's GHMC does on each GPU) would have given each rank for its shard alone,
computed by a job that only that rank feeds.

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
from ghmd.torch import GHMC

CLASSES = 3
FEATURES = 2


def shard(step: int, rank: int, size: int):
    """A rank's batch: background everywhere but a few anchors near three class centres."""
    generator = torch.Generator().manual_seed(step * 1009 + rank)
    labels = torch.full((size,), CLASSES)
    positive = torch.rand(size, generator=generator) < 0.02 * (1 + rank)  # ranks differ
    labels[positive] = torch.randint(0, CLASSES, (int(positive.sum()),), generator=generator)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7], [0.0, 0.0]])
    x = centres[labels] + torch.randn(size, FEATURES, generator=generator) * 0.9
    return x, labels, torch.ones(size)


def table(values) -> str:
    return " ".join(f"{v:6.3f}" for v in values)


def train(rank: int, world_size: int, args) -> None:
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{args.init_file}", rank=rank, world_size=world_size
        )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
    # The shared density: one step-synchronous job for all ranks (world size from DDP).
    ghm = GHMC(bins=args.bins, momentum=0.75, job_id=args.job_id, address=args.address)
    # What mmdetection does today, for comparison: each rank's own density, here a job that
    # only this rank feeds (world_size=1), so it sees this shard alone.
    local = GHMC(bins=args.bins, momentum=0.75, job_id=f"{args.job_id}/local-rank{rank}",
                 address=args.address, world_size=1)

    for step in range(args.steps):
        x, labels, label_weight = shard(step, rank, args.batch)
        pred = ddp(x)
        loss = ghm(pred, labels, label_weight)
        with torch.no_grad():
            local(pred.detach(), labels, label_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        received = ghm.last_result.bin_weights.tolist()
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (received, local.last_result.bin_weights.tolist(),
                                          loss.item() / world_size))
        if rank == 0:
            same = all(g[0] == received for g in gathered)
            print(f"step {step:3d}  loss {sum(g[2] for g in gathered):.4f}  "
                  f"tot {ghm.last_result.tot:.0f}  every rank got the same table: "
                  f"{'yes' if same else 'NO'}")
            print(f"  ghmd, every rank : {table(received)}")
            for other, (_, own, _) in enumerate(gathered):
                print(f"  local, rank {other:<4} : {table(own)}")
            sys.stdout.flush()
            if not same:
                raise SystemExit(f"step {step}: the ranks received different tables")
    ghm.close()
    local.close()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running ghmd, host:port")
    parser.add_argument("--ghmd", help="or: a ghmd binary to start on a free port")
    parser.add_argument("--nproc", type=int, default=2, help="processes (2 to 4)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512, help="anchors per rank and step")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--job-id", default=f"examples/ddp_ghm/{uuid.uuid4().hex[:8]}")
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
            print(f"{args.nproc} ranks, job {args.job_id} on ghmd at {args.address}")
            mp.spawn(train, args=(args.nproc, args), nprocs=args.nproc, join=True)

if __name__ == "__main__":
    main()
