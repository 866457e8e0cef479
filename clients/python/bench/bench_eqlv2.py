"""EQLv2's training step on ghmd, with and without the overlapped round trip (issue 11).

    cargo build --release
    PYTHONPATH=clients/python/src \
      python clients/python/bench/bench_eqlv2.py --ghmd target/release/ghmd --threads 1

A realistic step on CPU: an RoI head's classifier (two shared 1024-wide layers, then C + 1
outputs, C = 1203 as LVIS) on --rois RoIs, the EQLv2 loss, backward and an SGD step. Timed,
alternating within each round so that the machine's load hits them alike:
  - mmdetection's own EQLV2Loss (local; the baseline a user has today),
  - ghmd.torch.EQLV2Loss with overlap=False: the forward waits for the step's answer,
  - ghmd.torch.EQLV2Loss with overlap=True (the default): the step's gradients travel while
    backward, the optimizer and the next forward run; the next forward collects the answer.
Prints, per variant, the medians of the forward (with the loss) and of the whole step, the
step's ratio to the baseline and how much longer its forward took (medians over the rounds),
the overlapped step against the waiting one, and one round trip alone. All three run the same
steps on the same inputs, and the bench checks they end with the same state bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import mmdet_support  # noqa: E402,F401  (real mmdetection, without mmcv's compiled ops)
from mmdet.models.losses.eqlv2_loss import EQLV2Loss as MmdetEQLV2Loss  # noqa: E402

from ghmd.local import scratch_server  # noqa: E402
from ghmd.torch import EQLV2Loss  # noqa: E402


def head(classes: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, classes + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running ghmd, host:port")
    parser.add_argument("--ghmd", default="target/release/ghmd", help="or a binary to start")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--rois", type=int, default=512, help="RoIs per step")
    parser.add_argument("--width", type=int, default=256, help="RoI feature width")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    with scratch_server(args.ghmd, args.address) as args.address:
        run(args)


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_id = uuid.uuid4().hex[:8]
    classes = args.classes
    losses = {
        "mmdetection EQLV2Loss (local)": MmdetEQLV2Loss(num_classes=classes),
        "ghmd, waiting for the answer": EQLV2Loss(
            num_classes=classes, job_id=f"bench/{run_id}/waiting", address=args.address,
            overlap=False),
        "ghmd, overlapped (default)": EQLV2Loss(
            num_classes=classes, job_id=f"bench/{run_id}/overlapped", address=args.address),
    }
    models = {name: head(classes, args.width) for name in losses}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01)
                  for name, model in models.items()}
    generator = torch.Generator().manual_seed(1)
    steps = args.warmup + args.repeat
    inputs = [(torch.randn(args.rois, args.width, generator=generator),
               torch.randint(0, classes + 1, (args.rois,), generator=generator))
              for _ in range(steps)]

    def step(name: str, index: int) -> Tuple[float, float]:
        """(forward and loss, the whole step) in seconds."""
        features, labels = inputs[index]
        started = time.perf_counter()
        optimizer = optimizers[name]
        optimizer.zero_grad()
        value = losses[name](models[name](features), labels)
        forward = time.perf_counter() - started
        value.backward()
        optimizer.step()
        return forward, time.perf_counter() - started

    rounds = []
    for index in range(steps):
        times = {name: step(name, index) for name in losses}
        if index >= args.warmup:
            rounds.append(times)
    names = list(losses)
    baseline = names[0]
    print(f"EQLv2 training step: {args.rois} RoIs x {args.width} features -> 1024 -> 1024 -> "
          f"{classes + 1}, forward + loss + backward + SGD; median of {args.repeat} rounds after "
          f"{args.warmup} warm-up, torch {torch.__version__} on {torch.get_num_threads()} "
          f"threads, ghmd at {args.address}")
    print(f"  {'':<32} {'forward+loss':>12} {'whole step':>12}   step / local   forward - local")
    for name in names:
        forward = statistics.median(times[name][0] for times in rounds)
        whole = statistics.median(times[name][1] for times in rounds)
        ratio = statistics.median(times[name][1] / times[baseline][1] for times in rounds)
        waits = statistics.median(times[name][0] - times[baseline][0] for times in rounds)
        print(f"  {name:<32} {forward * 1e3:9.2f} ms {whole * 1e3:9.2f} ms   {ratio:9.3f}"
              f"   {waits * 1e3:+10.2f} ms")
    waiting, overlapped = names[1], names[2]
    saving = statistics.median(times[overlapped][1] / times[waiting][1] for times in rounds)
    print(f"\noverlapped step / waiting step: {saving:.3f} (median of the rounds' ratios)")

    # The round trip alone, on a stream as the loss sends it: what overlapping can hide.
    round_trip = EQLV2Loss(num_classes=classes, job_id=f"bench/{run_id}/round-trip",
                           address=args.address)
    round_trip._ensure_job()
    session = round_trip._transport()
    zeros = np.zeros(classes, dtype=np.float32)
    seconds = [0.0] * (args.warmup + args.repeat)
    for index in range(len(seconds)):
        started = time.perf_counter()
        session.harmonize_eqlv2(round_trip.job_id, zeros, zeros, step=index)
        seconds[index] = time.perf_counter() - started
    print(f"one EQLv2 round trip alone (C = {classes}, stream): "
          f"{statistics.median(seconds[args.warmup:]) * 1e3:.2f} ms median")
    round_trip.close()

    for name in names[1:]:
        losses[name].collect()
    same = all(torch.equal(getattr(losses[name], buffer), getattr(losses[baseline], buffer))
               for name in names[1:] for buffer in ("pos_grad", "neg_grad", "pos_neg"))
    print(f"every variant ends with mmdetection's state bit for bit: {'yes' if same else 'NO'}")
    for name in names[1:]:
        losses[name].close()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
