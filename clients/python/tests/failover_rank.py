"""One rank of the fault schedule (test_failover.py), a process of its own, as a training
process would be: it steps one step-synchronous job through the Python client until the driver
names the last step, and lets no exception pass (any error ends the process non-zero).

    python failover_rank.py ADDRESS JOB_ID RUN_ID RANK WORLD MODE TRANSPORT PACE STOP_FILE OUT

MODE is histogram (the client bins, one small message) or raw (gradient norms, the server
bins); TRANSPORT is stream (one HarmonizeStream) or unary. Each step's batch comes from
batch(rank, step), so a reference run replays exactly the same inputs. One line per step on
stdout ("step N seconds") lets the driver follow progress; the answers go to OUT (.npz).
PACE is the seconds of "compute" between two steps.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from ghmd import Client

BINS = 10
RAW_ELEMENTS = 300


def batch(rank: int, step: int, mode: str):
    rng = np.random.default_rng([rank, step])
    if mode == "raw":
        norms = rng.random(RAW_ELEMENTS, dtype=np.float32)
        label_weights = (rng.random(RAW_ELEMENTS) > 0.2).astype(np.float32)
        return norms, label_weights
    counts = rng.integers(0, 40, BINS)
    return counts, float(counts.sum())


def last_step(stop_file: Path):
    """The step count the driver chose, once it has (None until then)."""
    try:
        text = stop_file.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.strip() else None


def main(address, job_id, run_id, rank, world, mode, transport, pace, stop_file, out) -> None:
    rank, world, pace, stop_file = int(rank), int(world), float(pace), Path(stop_file)
    # The client's healing log (ghmd: a warning per failure healed), for the driver's report.
    logging.basicConfig(level=logging.INFO, format=f"%(relativeCreated)d rank {rank} %(message)s")
    client = Client(address, heal_deadline=60)
    client.create_job(job_id, "ghm_c", bins=BINS, momentum=0.75, world_size=world,
                      step_timeout=30, run_id=run_id)
    steps = client.stream() if transport == "stream" else client
    tables, acc_sums, tots, counters, durations, weights = [], [], [], [], [], []
    step = 0
    stop = None
    while stop is None or step < stop:
        first, second = batch(rank, step, mode)
        started = time.monotonic()
        if mode == "raw":
            answer = steps.harmonize(job_id, first, label_weights=second, step=step, rank=rank)
            weights.append(answer.weights)
        else:
            answer = steps.harmonize_histogram(job_id, first, second, step=step, rank=rank)
        took = time.monotonic() - started
        assert answer.step == step, f"asked for step {step}, got {answer.step}"
        tables.append(answer.bin_weights)
        acc_sums.append(answer.acc_sum)
        tots.append(answer.tot)
        counters.append((answer.steps, answer.next_step, answer.generation))
        durations.append(took)
        print(f"step {step} {took:.6f}", flush=True)
        step += 1
        if stop is None:
            stop = last_step(stop_file)
        time.sleep(pace)
    np.savez(
        out,
        tables=np.array(tables),
        acc_sums=np.array(acc_sums),
        tots=np.array(tots),
        counters=np.array(counters),
        durations=np.array(durations),
        weights=np.array(weights) if weights else np.zeros((0, RAW_ELEMENTS), np.float32),
    )
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
