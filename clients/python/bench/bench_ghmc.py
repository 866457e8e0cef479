"""GHM-C on a 1M-element batch: ghmd's two paths against mmdetection's in-process loop.

    cargo build --release
    PYTHONPATH=clients/python/src \
      python clients/python/bench/bench_ghmc.py --ghmd target/release/ghmd --threads 1

Times, on the same data and from the same state (bins 30, momentum 0.75, as mmdetection's GHM
RetinaNet config), the median of --repeat calls of:
  weights only
    - reference: the per-bin loop of mmdetection's GHMC (tests/mmdet_port.py), in PyTorch
    - Client.harmonize, raw: pack g and the label weights, one RPC, unpack the weights
    - histogram path: bin on the tensor's device, one RPC with M counts, apply the table
  the whole loss forward (weights and BCE)
    - reference: mmdetection's GHMC forward
    - ghmd.torch.GHMC, mode="histogram" and mode="raw"
and prints each with its ratio to the reference measured in the same run (> 1: faster than
the reference). Then a training step's loss, forward and backward, against the loss without
GHM at all, plain ``binary_cross_entropy_with_logits`` (mean) forward and backward on the same
logits, and prints what GHM costs as a multiple of it (issue 14's goal: <= 3). It also checks
that every path gave the reference's weights bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from ghmd import Client  # noqa: E402
from ghmd.local import scratch_server  # noqa: E402
from ghmd.torch import GHMC  # noqa: E402
from mmdet_port import PortGHMC  # noqa: E402


def median_seconds(fn, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running ghmd, host:port")
    parser.add_argument("--ghmd", default="target/release/ghmd", help="or a binary to start")
    parser.add_argument("--elements", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--bins", type=int, default=30)
    parser.add_argument("--momentum", type=float, default=0.75)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    with scratch_server(args.ghmd, args.address) as args.address:
        run(args)


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.elements // args.classes
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(rows, args.classes, generator=generator) * 3 - 2
    target = (torch.rand(rows, args.classes, generator=generator) < 0.02).float()
    label_weight = (torch.rand(rows, args.classes, generator=generator) > 0.1).float()
    g = torch.abs(pred.sigmoid() - target)
    valid = label_weight > 0
    tot = max(valid.float().sum().item(), 1.0)
    g_np, lw_np = g.numpy(), label_weight.numpy()
    run_id = uuid.uuid4().hex[:8]
    client = Client(args.address)

    def job(name: str) -> str:
        job_id = f"bench/{run_id}/{name}"
        client.create_job(job_id, "ghm_c", args.bins, args.momentum)
        return job_id

    # Each path runs warmup + repeat steps from a fresh density; the checks compare the first.
    reference = PortGHMC(bins=args.bins, momentum=args.momentum)
    first = {}

    def reference_weights():
        weights = reference.weights(g, valid, tot, pred)
        first.setdefault("reference", weights)

    raw_job = job("raw")

    def raw_weights():
        result = client.harmonize(raw_job, g_np, label_weights=lw_np)
        first.setdefault("raw", torch.from_numpy(result.weights).reshape(g.shape))

    # The histogram path exactly as ghmd.torch.GHMC takes it (weights only, no BCE).
    hist_module = GHMC(bins=args.bins, momentum=args.momentum, client=client,
                       job_id=f"bench/{run_id}/histogram", mode="histogram")

    def histogram_weights():
        weights, _ = hist_module._weigh(g, label_weight)
        first.setdefault("histogram", weights)

    loss_reference = PortGHMC(bins=args.bins, momentum=args.momentum)
    loss_hist = GHMC(bins=args.bins, momentum=args.momentum, client=client,
                     job_id=f"bench/{run_id}/loss-histogram", mode="histogram")
    loss_raw = GHMC(bins=args.bins, momentum=args.momentum, client=client,
                    job_id=f"bench/{run_id}/loss-raw", mode="raw")

    def plain_bce(logits, target, label_weight):
        return F.binary_cross_entropy_with_logits(logits, target)

    def forward_backward(loss_fn):
        logits = pred.detach().requires_grad_()
        loss_fn(logits, target, label_weight).backward()

    print(f"GHM-C, {rows * args.classes:,} elements ({rows:,} x {args.classes}), "
          f"bins {args.bins}, momentum {args.momentum}, median of {args.repeat} "
          f"after {args.warmup} warm-up, torch {torch.__version__} on {torch.get_num_threads()} "
          f"threads, ghmd at {args.address}")
    results = {}
    for group, timed in (
        ("weights", [("mmdetection loop (reference)", reference_weights),
                     ("Client.harmonize, raw", raw_weights),
                     ("histogram path", histogram_weights)]),
        ("loss forward", [("mmdetection GHMC (reference)",
                           lambda: loss_reference(pred, target, label_weight)),
                          ("ghmd.torch.GHMC, histogram",
                           lambda: loss_hist(pred, target, label_weight)),
                          ("ghmd.torch.GHMC, raw", lambda: loss_raw(pred, target, label_weight))]),
    ):
        print(f"\n{group}:")
        baseline = None
        for name, fn in timed:
            seconds = median_seconds(fn, args.repeat, args.warmup)
            results[(group, name)] = seconds
            baseline = baseline or seconds
            print(f"  {name:<32} {seconds * 1e3:9.2f} ms   x{baseline / seconds:6.1f}")

    print("\nloss forward + backward (wall time; CPU time of this process):")
    # BCE and GHM-C alternate within each round, and each ratio is the median of the rounds'
    # ratios: on a shared machine the load changes between rounds more than within one. CPU time
    # (this process's threads, gRPC's included) does not count waiting for a core, so it is the
    # steadier figure on a loaded machine; wall time is the one a user sees on a quiet one.
    def timed(loss_fn):
        wall, cpu = time.perf_counter(), time.process_time()
        forward_backward(loss_fn)
        return time.perf_counter() - wall, time.process_time() - cpu

    rounds = []
    for round_ in range(args.warmup + args.repeat):
        pair = timed(plain_bce), timed(loss_hist)
        if round_ >= args.warmup:
            rounds.append(pair)
    bce_wall = statistics.median(bce[0] for bce, _ in rounds)
    bce_cpu = statistics.median(bce[1] for bce, _ in rounds)
    ghm_wall = statistics.median(ghm[0] for _, ghm in rounds)
    ghm_cpu = statistics.median(ghm[1] for _, ghm in rounds)
    wall_ratio = statistics.median(ghm[0] / bce[0] for bce, ghm in rounds)
    cpu_ratio = statistics.median(ghm[1] / max(bce[1], 1e-9) for bce, ghm in rounds)
    reference = median_seconds(lambda: forward_backward(loss_reference), args.repeat, args.warmup)
    print(f"  {'plain BCE (the baseline)':<32} {bce_wall * 1e3:9.2f} ms {bce_cpu * 1e3:9.2f} ms")
    print(f"  {'ghmd.torch.GHMC, histogram':<32} {ghm_wall * 1e3:9.2f} ms {ghm_cpu * 1e3:9.2f} ms"
          f"   {wall_ratio:4.1f} / {cpu_ratio:4.1f} x BCE")
    print(f"  {'mmdetection GHMC (reference)':<32} {reference * 1e3:9.2f} ms"
          f"   {reference / bce_wall:15.1f} x BCE")
    print(f"\nghmd.torch.GHMC histogram forward + backward / plain BCE forward + backward: "
          f"{wall_ratio:.2f} wall, {cpu_ratio:.2f} CPU (medians of {args.repeat} rounds that time "
          "both; goal <= 3)")

    same = all(torch.equal(first["reference"], first[path]) for path in ("raw", "histogram"))
    print(f"\nweights of every path equal to the reference bit for bit: {'yes' if same else 'NO'}")
    for module in (hist_module, loss_hist, loss_raw):
        module.close()
    client.close()
    if not same:
        raise SystemExit(1)
    # The same density reached by every path after the same number of steps.
    assert np.array_equal(loss_hist.acc_sum.numpy(), loss_reference.acc_sum.numpy())


if __name__ == "__main__":
    main()
