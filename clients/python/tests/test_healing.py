"""The Python client heals itself against a real ghmd killed, restarted and taken over: each
branch of its healing (reconnect, reseed a missing copy, reseed a stale one, resend, give up,
another run) with every acknowledged step checked against a server that never failed."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest

from ghmd import Client, GhmdError, HealingError, RunLostError, ghm_pb2
from topology import Replica

BINS = 12


def histograms(seed: int, steps: int, ranks: int):
    rng = np.random.default_rng(seed)
    batches = [[rng.integers(0, 50, BINS) for _ in range(ranks)] for _ in range(steps)]
    # GHM-C: tot is the number of valid elements, the sum of the counts.
    return [[(counts, float(counts.sum())) for counts in ranks] for ranks in batches]


def reference_tables(address: str, job_id: str, batches, world_size: int):
    """What a server that never failed answers for the same histograms, per step."""
    tables = []
    with Client(address) as client:
        client.create_job(job_id + "-reference", "ghm_c", bins=BINS, momentum=0.75,
                          world_size=world_size, step_timeout=30)
        for step, ranks in enumerate(batches):
            answers = [None] * len(ranks)

            def send(rank):
                counts, tot = ranks[rank]
                answers[rank] = client.harmonize_histogram(
                    job_id + "-reference", counts, tot, step=step, rank=rank)

            threads = [threading.Thread(target=send, args=(rank,)) for rank in range(len(ranks))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            tables.append(answers[0])
    return tables


class Rank(threading.Thread):
    """One rank's training loop on its own client: a step, then the next, recording answers."""

    def __init__(self, address, job_id, rank, batches, world_size, stream, **options):
        super().__init__(daemon=True)
        self.client = Client(address, **options)
        self.job_id, self.rank, self.batches = job_id, rank, batches
        self.world_size, self.stream = world_size, stream
        self.answers = []
        self.error = None

    def run(self):
        try:
            self.client.create_job(self.job_id, "ghm_c", bins=BINS, momentum=0.75,
                                   world_size=self.world_size, step_timeout=30)
            transport = self.client.stream() if self.stream else self.client
            for step, ranks in enumerate(self.batches):
                counts, tot = ranks[self.rank]
                self.answers.append(transport.harmonize_histogram(
                    self.job_id, counts, tot, step=step, rank=self.rank))
                time.sleep(0.01)  # a training step's compute, so the kills land mid-run
        except Exception as error:  # reported by the test, not lost in a thread
            self.error = error
        finally:
            self.client.close()


def assert_same_as_reference(ranks, reference):
    for rank in ranks:
        assert rank.error is None, f"rank {rank.rank}: {rank.error!r}"
        assert [answer.step for answer in rank.answers] == list(range(len(reference)))
        for answer, expected in zip(rank.answers, reference):
            np.testing.assert_array_equal(answer.bin_weights, expected.bin_weights)
            np.testing.assert_array_equal(answer.acc_sum, expected.acc_sum)
            assert answer.tot == expected.tot and answer.steps == expected.steps


@pytest.fixture
def reference_server(tmp_path):
    replica = Replica(tmp_path, "reference", "--in-memory").start()
    yield replica
    replica.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_kill_9_and_restart_of_a_single_server_loses_no_acknowledged_step(
        tmp_path, job_id, reference_server, stream):
    # Snapshots every 1 s. The first kill comes before the first snapshot: the restarted server
    # has no copy (JOB_NOT_HERE). The second comes 1.5 s after the restart: the copy it comes
    # back with is the snapshot's, about 0.5 s of steps behind what the ranks saw (STALE_COPY).
    server = Replica(tmp_path, "single", "--require-job-header", snapshot_interval="1s").start()
    steps, world_size = 250, 2
    batches = histograms(1, steps, world_size)
    try:
        ranks = [Rank(server.address, job_id, rank, batches, world_size, stream)
                 for rank in range(world_size)]
        for rank in ranks:
            rank.start()
        while min(len(rank.answers) for rank in ranks) < 10:
            time.sleep(0.001)
        server.kill()
        server.start()
        time.sleep(1.5)
        assert server.counter("ghmd_fenced_refusals", reason="job_not_here") >= 1
        assert server.counter("ghmd_reseeds", outcome="created") == 1, "W ranks, one copy"
        assert min(len(rank.answers) for rank in ranks) < steps - 20, "killed mid-run"
        server.kill()
        server.start()
        for rank in ranks:
            rank.join(timeout=120)
        assert_same_as_reference(ranks, reference_tables(
            reference_server.address, job_id, batches, world_size))
        with Client(server.address) as client:
            state = client.get_job(job_id).state
        assert state.steps == steps and state.next_step == steps, "no step lost or doubled"
        assert server.counter("ghmd_fenced_refusals", reason="stale_copy") >= 1
        # One replacement, or two when the kill fell between two ranks' answers to one step
        # (the rank that saw one step fewer may reseed first; the other then replaces that).
        assert 1 <= server.counter("ghmd_reseeds", outcome="replaced") <= 2
    finally:
        server.stop()


def test_a_job_created_but_never_stepped_is_recreated_from_its_spec(tmp_path, job_id):
    server = Replica(tmp_path, "fresh", "--in-memory").start()
    try:
        with Client(server.address, heal_deadline=20) as client:
            created = client.create_job(job_id, "ghm_c", bins=BINS, momentum=0.75, run_id="run-a")
            server.kill()
            server.start()  # in memory: the job is gone
            answer = client.harmonize_histogram(job_id, np.arange(BINS), 66.0)
            assert answer.steps == 1
            job = client.get_job(job_id)
            assert job.spec == created.spec and job.run_id == "run-a"
            assert server.counter("ghmd_reseeds", outcome="created") == 1
    finally:
        server.stop()


def test_a_server_that_stays_down_raises_one_healing_error_after_the_deadline(tmp_path, job_id):
    server = Replica(tmp_path, "gone", "--in-memory").start()
    with Client(server.address, heal_deadline=1.5) as client:
        client.create_job(job_id, "ghm_c", bins=BINS)
        client.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0)
        server.kill()
        started = time.monotonic()
        with pytest.raises(HealingError) as error:
            client.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0)
    assert time.monotonic() - started >= 1.5, "it kept trying for the whole deadline"
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and error.value.attempts > 2
    assert "heal_deadline = 1.5 s" in str(error.value) and job_id in str(error.value)


def test_another_run_raises_at_once(tmp_path, job_id):
    server = Replica(tmp_path, "runs", "--in-memory", "--run-takeover-after", "1s").start()
    try:
        with Client(server.address) as old, Client(server.address) as new:
            old.create_job(job_id, "ghm_c", bins=BINS, run_id="run-1")
            old.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0)
            with pytest.raises(RunLostError) as active:
                new.create_job(job_id, "ghm_c", bins=BINS, run_id="run-2")
            assert active.value.reason == "RUN_ACTIVE"
            time.sleep(1.2)
            assert new.create_job(job_id, "ghm_c", bins=BINS, run_id="run-2").state.steps == 0
            started = time.monotonic()
            for transport in (old, old.stream()):
                with pytest.raises(RunLostError) as replaced:
                    transport.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0)
                assert replaced.value.reason == "RUN_REPLACED"
                assert "another training run" in str(replaced.value)
            assert time.monotonic() - started < old.heal_deadline, "not retried until the deadline"
            assert new.get_job(job_id).state.steps == 0, "the old run changed nothing"
    finally:
        server.stop()


def test_every_job_scoped_call_names_its_job_in_the_header(tmp_path, job_id):
    # With --require-job-header a call without x-ghmd-job is refused: every call succeeding is
    # the proof that each one sends it, for the stream too.
    server = Replica(tmp_path, "header", "--in-memory", "--require-job-header").start()
    try:
        with Client(server.address) as client:
            client.create_job(job_id, "ghm_c", bins=BINS, world_size=2, step_timeout=10)
            client.update_job(job_id, world_size=1, from_step=0)
            client.get_job(job_id)
            client.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0, step=0)
            other = job_id + "-other"
            client.create_job(other, "ghm_c", bins=BINS)
            with client.stream() as session:
                for each in (job_id, other, job_id):  # one stream per job
                    session.harmonize_histogram(each, np.ones(BINS, np.int64), 12.0)
            client.restore_job(job_id, client.get_job(job_id))
            client.delete_job(other)

            # The header that names another job is refused with its machine-readable reason,
            # read from grpc-status-details-bin.
            with pytest.raises(grpc.RpcError) as raw:
                client._stub.GetJob(ghm_pb2.GetJobRequest(job_id=job_id),
                                    metadata=(("x-ghmd-job", other),), timeout=5)
            error = GhmdError.from_rpc_error(raw.value, "GetJob")
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.reason == "JOB_HEADER_MISMATCH"
            assert server.counter("ghmd_job_header_refusals", reason="missing") == 0
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_step_sent_again_on_a_fresh_call_keeps_its_timeout(address, job_id, stream):
    # A waiting step is sent again every 0.2 to 0.4 s (a call or stream is routed once; the
    # proxy may have moved the job since). The server keeps the rank's contribution and the
    # step's timer: a rank that never comes still ends the step with ABORTED, naming it.
    with Client(address, step_rehome_after=0.2, step_rehome_max=0.4) as client:
        client.create_job(job_id, "ghm_c", bins=BINS, world_size=2, step_timeout=2)
        transport = client.stream() if stream else client
        outcome = []

        def lonely_rank():
            try:
                transport.harmonize_histogram(job_id, np.ones(BINS, np.int64), 12.0, step=0)
            except GhmdError as error:
                outcome.append(error)

        thread = threading.Thread(target=lonely_rank, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the step's timeout was lost by sending it again"
        (error,) = outcome
        assert error.code == grpc.StatusCode.ABORTED and "1" in error.message
        assert client.get_job(job_id).state.steps == 0


def test_status_details_that_do_not_parse_are_no_reason():
    from ghmd.errors import error_info

    assert error_info(None) == ("", {})
    assert error_info((("grpc-status-details-bin", b"\xff\xff\xff"),)) == ("", {})
    assert error_info((("other-bin", b"\x08\x05"),)) == ("", {})


def test_a_step_aborted_while_healing_is_sent_again(tmp_path, job_id, caplog):
    # Rank 0 heals first (the restarted server lost the job) and waits; rank 1 takes longer than
    # the step timeout to come back, so rank 0's step is ABORTED. Once the job has moved that
    # means "not yet", not "a rank is missing": rank 0 sends it again and the step completes.
    server = Replica(tmp_path, "slow-heal", "--in-memory").start()
    try:
        ranks = [Client(server.address) for _ in range(2)]
        for client in ranks:
            client.create_job(job_id, "ghm_c", bins=BINS, momentum=0.75, world_size=2,
                              step_timeout=1)
        counts = np.ones(BINS, np.int64)
        answers = {}

        def step(rank, number, delay=0.0):
            time.sleep(delay)
            answers[rank, number] = ranks[rank].harmonize_histogram(
                job_id, counts, 12.0, step=number, rank=rank)

        both = [threading.Thread(target=step, args=(rank, 0)) for rank in range(2)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join()
        server.kill()
        server.start()
        late = threading.Thread(target=step, args=(1, 1, 2.5))
        late.start()
        with caplog.at_level(logging.DEBUG, logger="ghmd"):
            step(0, 1)  # raises if the ABORTED after 1 s reached the caller
        late.join()
        healed = [record.getMessage() for record in caplog.records]
        assert any("JOB_NOT_HERE" in message for message in healed), healed
        assert any("ABORTED" in message for message in healed), healed
        assert answers[0, 1].bin_weights.tolist() == answers[1, 1].bin_weights.tolist()
        assert answers[0, 1].steps == 2
        assert server.counter("ghmd_reseeds", outcome="created") == 1
        for client in ranks:
            client.close()
    finally:
        server.stop()


def test_a_rank_that_did_not_restore_resyncs_and_replays_the_same_bits(address, job_id):
    # The checkpoint pattern mid-run: every rank stepped; one restores the job to a checkpoint
    # (a new generation, fewer steps); the others take the restored lineage with resync_job, so
    # that their fenced steps do not see the restored copy as stale and put the job back.
    ranks = [Client(address) for _ in range(2)]
    for client in ranks:
        client.create_job(job_id, "ghm_c", bins=BINS, momentum=0.75, world_size=2,
                          step_timeout=10)
    batches = histograms(7, 6, 2)

    def run(steps):
        answers = {}

        def rank_loop(rank):
            for step in steps:
                counts, tot = batches[step][rank]
                answers[rank, step] = ranks[rank].harmonize_histogram(
                    job_id, counts, tot, step=step, rank=rank)

        threads = [threading.Thread(target=rank_loop, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    run(range(3))
    checkpoint = ranks[0].get_job(job_id)
    first = run(range(3, 6))
    restored = ranks[0].restore_job(job_id, checkpoint)
    ranks[1].resync_job(job_id)
    again = run(range(3, 6))
    for key, answer in first.items():
        np.testing.assert_array_equal(again[key].bin_weights, answer.bin_weights)
        np.testing.assert_array_equal(again[key].acc_sum, answer.acc_sum)
    state = ranks[0].get_job(job_id).state
    assert state.steps == 6 and state.generation == restored.state.generation
    for client in ranks:
        client.close()


#: Per method: its spec and a draw of one rank's contribution.
METHODS = {
    "seesaw": (dict(num_classes=6), lambda rng: {"label_counts": rng.integers(0, 40, 7)}),
    "eqlv2": (dict(num_classes=6), lambda rng: {
        "pos_grad": rng.random(6).astype(np.float32),
        "neg_grad": (rng.random(6) * 3).astype(np.float32),
    }),
}


def one_process_sum(contributions):
    """What one process that saw every rank's batch sends: Seesaw's counts summed, EQLv2's
    gradient sums added in float32 (two ranks: in either order, the same bits)."""
    return {name: np.sum(np.stack([c[name] for c in contributions]), axis=0)
            for name in contributions[0]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_seesaw_or_eqlv2_job_heals_with_its_state(tmp_path, job_id, reference_server, method):
    """Two ranks step a Seesaw or EQLv2 job; the server is killed with SIGKILL and comes back
    empty (in memory): the ranks reseed it from their last answer (its whole method state, and
    the last step for a rank whose answer was lost), and every answer is what a server that
    never failed gives one process fed the global batch."""
    spec, draw = METHODS[method]
    rng = np.random.default_rng(3)
    steps, world = 150, 2
    contributions = [[draw(rng) for _ in range(world)] for _ in range(steps)]
    server = Replica(tmp_path, method, "--in-memory").start()
    answers = [[] for _ in range(world)]
    errors = []

    def rank_loop(rank):
        try:
            with Client(server.address) as client:
                client.create_job(job_id, world_size=world, step_timeout=30, **{method: spec})
                for step in range(steps):
                    answers[rank].append(client.harmonize_method(
                        job_id, method, contributions[step][rank], step=step, rank=rank))
                    time.sleep(0.005)
        except Exception as error:  # reported by the test, not lost in a thread
            errors.append(error)

    try:
        threads = [threading.Thread(target=rank_loop, args=(rank,), daemon=True)
                   for rank in range(world)]
        for thread in threads:
            thread.start()
        while min(len(answer) for answer in answers) < 10 and not errors:
            time.sleep(0.001)
        server.kill()
        server.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert min(len(answer) for answer in answers) == steps
        assert server.counter("ghmd_reseeds", outcome="created") == 1, "W ranks, one copy"
    finally:
        server.stop()
    with Client(reference_server.address) as client:
        client.create_job(job_id + "-reference", **{method: spec})
        for step in range(steps):
            expected = client.harmonize_method(job_id + "-reference", method,
                                               one_process_sum(contributions[step]))
            for rank in range(world):
                got = answers[rank][step]
                assert got.step == step and got.steps == step + 1
                for name, values in expected.method_state.items():
                    np.testing.assert_array_equal(got.method_state[name], values,
                                                  err_msg=f"step {step} rank {rank} {name}")
