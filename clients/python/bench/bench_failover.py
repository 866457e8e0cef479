"""What HAProxy in front of 3 ghmd replicas costs, and how long a failover takes (issue 10).

    cargo build --release
    PYTHONPATH=clients/python/src python clients/python/bench/bench_failover.py \
        --ghmd target/release/ghmd

Starts 3 release replicas (data dirs, --require-job-header) and Debian's haproxy from the
shipped deploy/haproxy/haproxy.cfg (ports substituted; the harness's own config without it,
see tests/topology.py), then measures, through the Python client, in one run:
  - small histogram requests (10 bins, one unary Harmonize each, one client): p50 and p99
    latency through HAProxy and direct to the replica holding the job, and their ratio;
  - the saturating rate of the same requests from --threads threads, each on its own job,
    through HAProxy against direct (the ratio: > 1 is HAProxy faster);
  - 1M-element raw requests (4 MB of gradient norms in, 4 MB of weights out): throughput
    through HAProxy against direct;
  - failover, --kills times: kill -9 of the replica holding a 2-rank step-synchronous job
    while both ranks step as fast as they can, and the time from the kill to the next step
    applied (answered) after it; the replica is restarted on its port between kills (so half
    the failovers are back onto a stale copy); p50 and max;
  - a rolling SIGTERM restart of the 3 replicas while the ranks step (each: SIGTERM, wait for
    its exit, start it, wait until HAProxy has it UP), --rolls times: the total and the longest
    SIGTERM-to-exit.
Nothing here passes or fails: the figures are printed with their ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from ghmd import Client  # noqa: E402

BINS = 10


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def small_latency(address, job_id, count):
    counts = np.arange(BINS, dtype=np.int64)
    with Client(address) as client:
        client.create_job(job_id, "ghm_c", bins=BINS, momentum=0.75)
        for _ in range(50):  # warm the connection and the job
            client.harmonize_histogram(job_id, counts, float(counts.sum()))
        times = []
        for _ in range(count):
            started = time.perf_counter()
            client.harmonize_histogram(job_id, counts, float(counts.sum()))
            times.append(time.perf_counter() - started)
    return percentile(times, 50), percentile(times, 99)


def saturating_rate(address, prefix, threads, per_thread):
    counts = np.arange(BINS, dtype=np.int64)
    clients = [Client(address) for _ in range(threads)]
    jobs = [f"{prefix}/{index}" for index in range(threads)]
    for client, job in zip(clients, jobs):
        client.create_job(job, "ghm_c", bins=BINS, momentum=0.75)
        client.harmonize_histogram(job, counts, float(counts.sum()))
    go = threading.Barrier(threads + 1)

    def load(client, job):
        go.wait()
        for _ in range(per_thread):
            client.harmonize_histogram(job, counts, float(counts.sum()))

    workers = [threading.Thread(target=load, args=pair) for pair in zip(clients, jobs)]
    for worker in workers:
        worker.start()
    go.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    took = time.perf_counter() - started
    for client in clients:
        client.close()
    return threads * per_thread / took


def big_throughput(address, job_id, count):
    rng = np.random.default_rng(0)
    norms = rng.random(1_000_000, dtype=np.float32)
    with Client(address) as client:
        client.create_job(job_id, "ghm_c", bins=30, momentum=0.75)
        client.harmonize(job_id, norms)
        started = time.perf_counter()
        for _ in range(count):
            client.harmonize(job_id, norms)
        took = time.perf_counter() - started
    return count * norms.size / took / 1e6  # million elements per second


class SteppingRanks:
    """Two ranks of one step-synchronous job stepping through the proxy as fast as they can,
    each on its own client and stream; records when each step was answered."""

    def __init__(self, address, job_id):
        self.job_id = job_id
        self.answered = []  # (time, step, generation) of rank 0's answers
        self.stop = threading.Event()
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(address, rank), daemon=True)
                        for rank in range(2)]
        for thread in self.threads:
            thread.start()

    def run(self, address, rank):
        counts = np.arange(BINS, dtype=np.int64)
        try:
            with Client(address, heal_deadline=60) as client:
                client.create_job(self.job_id, "ghm_c", bins=BINS, momentum=0.75, world_size=2,
                                  step_timeout=30, run_id="bench")
                with client.stream() as session:
                    step = 0
                    while not self.stop.is_set():
                        answer = session.harmonize_histogram(
                            self.job_id, counts, float(counts.sum()), step=step, rank=rank)
                        if rank == 0:
                            self.answered.append((time.monotonic(), step, answer.generation))
                        step += 1
        except Exception as error:  # reported by the benchmark
            self.errors.append(error)

    def steps(self):
        return self.answered[-1][1] + 1 if self.answered else 0

    def wait_steps(self, more, timeout=60):
        target = self.steps() + more
        deadline = time.monotonic() + timeout
        while self.steps() < target:
            if self.errors or time.monotonic() > deadline:
                raise RuntimeError(f"ranks stalled: {self.errors}")
            time.sleep(0.001)

    def generation(self):
        return self.answered[-1][2]

    def first_answer_of_generation_above(self, generation):
        """When the first step applied by a reseeded copy was answered: an answer that arrives
        just after the kill may still come from the killed replica (it was on the wire)."""
        for at, _, answered_generation in self.answered:
            if answered_generation > generation:
                return at
        return None

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def holder(replicas, job_id):
    best, best_steps = None, -1
    for replica in replicas:
        if replica.process.poll() is not None:
            continue
        try:
            with Client(replica.address, retries=0, timeout=2) as client:
                steps = client.get_job(job_id).state.steps
        except Exception:  # no copy there: not the holder
            continue
        if steps > best_steps:
            best, best_steps = replica, steps
    return best


def wait_until(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ghmd", required=True)
    parser.add_argument("--small", type=int, default=3000, help="small requests for latency")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--per-thread", type=int, default=1500)
    parser.add_argument("--big", type=int, default=15, help="1M-element requests")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rolls", type=int, default=3)
    args = parser.parse_args()
    os.environ["GHMD_BIN"] = str(Path(args.ghmd).resolve())
    # The client logs a warning per failure it heals; here the failures are the point.
    logging.getLogger("ghmd").setLevel(logging.ERROR)
    from topology import HAProxy, Replica  # needs GHMD_BIN

    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    replicas = [Replica(workdir, f"ghmd-{index}", "--require-job-header").start()
                for index in range(3)]
    proxy = HAProxy(workdir, replicas).start()
    config = "deploy/haproxy/haproxy.cfg" if proxy.shipped else "the harness's own config"
    print(f"HAProxy from {config}; 3 replicas; workdir {workdir}")
    ranks = None
    try:
        job = f"bench/small/{uuid.uuid4().hex[:8]}"
        via_p50, via_p99 = small_latency(proxy.address, job, args.small)
        direct = holder(replicas, job)
        direct_p50, direct_p99 = small_latency(direct.address, job + "-direct", args.small)
        print(f"small histogram requests, {args.small} sequential unary calls:")
        print(f"  direct   p50 {direct_p50 * 1e6:8.0f} us  p99 {direct_p99 * 1e6:8.0f} us")
        print(f"  haproxy  p50 {via_p50 * 1e6:8.0f} us  p99 {via_p99 * 1e6:8.0f} us")
        print(f"  ratio haproxy/direct: p50 x{via_p50 / direct_p50:.2f} "
              f"(+{(via_p50 - direct_p50) * 1e6:.0f} us), p99 x{via_p99 / direct_p99:.2f}")

        prefix = f"bench/rate/{uuid.uuid4().hex[:8]}"
        # Direct: every thread's job on the one replica (the proxy would spread them).
        direct_rate = saturating_rate(direct.address, prefix + "-direct", args.threads,
                                      args.per_thread)
        via_rate = saturating_rate(proxy.address, prefix, args.threads, args.per_thread)
        print(f"saturating rate, {args.threads} threads x {args.per_thread} small requests:")
        print(f"  direct {direct_rate:8.0f}/s  haproxy {via_rate:8.0f}/s  "
              f"ratio haproxy/direct {via_rate / direct_rate:.2f}")

        job = f"bench/big/{uuid.uuid4().hex[:8]}"
        via_big = big_throughput(proxy.address, job, args.big)
        direct_big = big_throughput(holder(replicas, job).address, job + "-direct", args.big)
        print(f"1M-element raw requests, {args.big} sequential unary calls:")
        print(f"  direct {direct_big:6.1f} M elements/s  haproxy {via_big:6.1f} M elements/s  "
              f"ratio haproxy/direct {via_big / direct_big:.2f}")

        job = f"bench/failover/{uuid.uuid4().hex[:8]}"
        ranks = SteppingRanks(proxy.address, job)
        ranks.wait_steps(50)
        failovers = []
        for _ in range(args.kills):
            victim = holder(replicas, job)
            generation = ranks.generation()
            killed_at = time.monotonic()
            victim.kill()
            ranks.wait_steps(5)
            failovers.append(ranks.first_answer_of_generation_above(generation) - killed_at)
            victim.start()
            wait_until(lambda: proxy.routes_to(victim))
            ranks.wait_steps(20)
        print(f"failover, {args.kills} kill -9 of the holder (500 ms health checks, fall 2), "
              f"kill to the next applied step:")
        print(f"  p50 {statistics.median(failovers) * 1e3:.0f} ms  "
              f"max {max(failovers) * 1e3:.0f} ms  "
              f"(all: {' '.join(f'{t * 1e3:.0f}' for t in failovers)})")

        rolls, exits = [], []
        for _ in range(args.rolls):
            started = time.monotonic()
            for replica in replicas:
                term = time.monotonic()
                replica.terminate()
                exits.append(time.monotonic() - term)
                replica.start()
                wait_until(lambda: proxy.routes_to(replica))
            rolls.append(time.monotonic() - started)
            ranks.wait_steps(20)
        print(f"rolling SIGTERM restart of 3 replicas with 2 ranks streaming, {args.rolls} times:")
        print(f"  total {' '.join(f'{t:.2f}' for t in rolls)} s; "
              f"SIGTERM to exit: max {max(exits) * 1e3:.0f} ms, "
              f"median {statistics.median(exits) * 1e3:.0f} ms")
        ranks.close()
        if ranks.errors:
            print(f"ERRORS reached the ranks: {ranks.errors}")
        with Client(proxy.address) as client:
            state = client.get_job(job).state
        print(f"  the job's steps {state.steps} == steps answered {ranks.steps()}")
    finally:
        if ranks is not None:
            ranks.stop.set()
        proxy.stop()
        for replica in replicas:
            replica.stop()


if __name__ == "__main__":
    main()
