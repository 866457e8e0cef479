"""ghmd.Client against a real ghmd (jobs, steps, errors, streams, step-synchronous jobs), and
against an in-test fake server where the behaviour under test is the client's own (retries,
the token, TLS)."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import free_port, ghmd_binary
from ghmd import Client, GhmdError, TLSConfig, ghm_pb2, ghm_pb2_grpc, pack_f32, unpack_f32


def codes(error: pytest.ExceptionInfo) -> grpc.StatusCode:
    return error.value.code


# -- jobs ---------------------------------------------------------------------------------------


def test_job_lifecycle(client, job_id):
    job = client.create_job(job_id, "ghm_c", bins=30, momentum=0.75)
    assert job.job_id == job_id
    assert job.spec.loss == ghm_pb2.LOSS_GHM_C and job.spec.bins == 30
    assert job.spec.momentum == 0.75
    assert list(job.state.acc_sum) == [0.0] * 30 and job.state.steps == 0

    again = client.create_job(job_id, "ghm_c", bins=30, momentum=0.75)
    assert again.create_time == job.create_time, "CreateJob with the same spec is idempotent"
    with pytest.raises(GhmdError) as error:
        client.create_job(job_id, "ghm_c", bins=10, momentum=0.75)
    assert codes(error) == grpc.StatusCode.ALREADY_EXISTS

    assert client.get_job(job_id).spec.bins == 30
    client.delete_job(job_id)
    with pytest.raises(GhmdError) as error:
        client.get_job(job_id)
    assert codes(error) == grpc.StatusCode.NOT_FOUND
    assert job_id in error.value.message


def test_list_jobs_walks_every_page(client, job_id):
    ids = [f"{job_id}/{index}" for index in (3, 0, 4, 1, 2)]
    for each in ids:
        client.create_job(each, "ghm_r", bins=5)
    listed = [job.job_id for job in client.list_jobs(prefix=job_id + "/", page_size=2)]
    assert listed == sorted(ids)
    assert [job.job_id for job in client.list_jobs(prefix=job_id + "/0")] == [ids[1]]


def test_bad_arguments_are_named(client, job_id):
    client.create_job(job_id, "ghm_c")
    with pytest.raises(GhmdError) as error:
        client.harmonize(job_id, [0.1, float("nan"), 0.3])
    assert codes(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "gradient_norms" in error.value.message and "1" in error.value.message
    assert error.value.method == "Harmonize"
    assert "INVALID_ARGUMENT" in str(error.value)

    with pytest.raises(GhmdError) as error:
        client.harmonize(job_id, [0.1, 0.2], label_weights=[1.0])
    assert codes(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "label_weights" in error.value.message

    with pytest.raises(GhmdError) as error:
        client.harmonize("pytest/no-such-job", [0.5])
    assert codes(error) == grpc.StatusCode.NOT_FOUND

    with pytest.raises(ValueError, match="loss"):
        client.create_job(job_id + "x", "focal")
    with pytest.raises(ValueError, match="step_timeout"):
        client.create_job(job_id + "x", "ghm_c", world_size=2, step_timeout=0)
    assert client.get_job(job_id).state.steps == 0, "rejected requests leave the job as it was"


# -- arrays -------------------------------------------------------------------------------------


def test_float_arrays_are_packed_little_endian_float32():
    values = np.random.default_rng(1).random(1000)
    assert pack_f32(values) == values.astype("<f4").tobytes()
    assert pack_f32(values[::2]) == values[::2].astype("<f4").tobytes()
    unpacked = unpack_f32(pack_f32(values))
    assert unpacked.dtype == np.float32 and unpacked.flags.writeable
    np.testing.assert_array_equal(unpacked, values.astype(np.float32))
    with pytest.raises(ValueError, match="float32"):
        unpack_f32(b"\x00" * 6)


def test_harmonize_takes_any_array_like(client, job_id):
    client.create_job(job_id, "ghm_c", bins=10)
    rng = np.random.default_rng(2)
    g64 = rng.random((40, 5))  # float64, 2-D
    lw = (rng.random((40, 5)) > 0.2).astype(np.float32)
    reference = client.harmonize(job_id, g64.astype(np.float32).ravel(), lw.ravel())
    for g, w in [
        (g64, lw),  # float64 and 2-D: converted and flattened in C order
        (g64.tolist(), lw.tolist()),  # nested lists
        (np.asfortranarray(g64), np.asfortranarray(lw)),  # another memory order
    ]:
        result = client.harmonize(job_id, g, label_weights=w)
        np.testing.assert_array_equal(result.weights, reference.weights)
    assert reference.weights.shape == (200,) and reference.weights.dtype == np.float32
    assert np.all(reference.weights[lw.ravel() == 0] == 0)


def test_histogram_variant(client, job_id):
    client.create_job(job_id, "ghm_c", bins=4)
    raw_twin = job_id + "-raw"
    client.create_job(raw_twin, "ghm_c", bins=4)
    g = np.array([0.1, 0.1, 0.3, 0.9, 1.0], dtype=np.float32)
    raw = client.harmonize(raw_twin, g)
    hist = client.harmonize_histogram(job_id, np.array([2, 1, 0, 2]), 5.0)
    assert hist.weights.size == 0
    np.testing.assert_array_equal(hist.bin_weights, raw.bin_weights)
    assert (hist.tot, hist.nonempty_bins) == (raw.tot, raw.nonempty_bins) == (5.0, 3)

    with pytest.raises(GhmdError) as error:
        client.harmonize_histogram(job_id, [2, 1, 0, 2], 4.0)  # GHM-C: tot = sum(counts)
    assert codes(error) == grpc.StatusCode.INVALID_ARGUMENT and "tot" in error.value.message
    with pytest.raises(GhmdError) as error:
        client.harmonize_histogram(job_id, [1, 1, 1], 3.0)
    assert codes(error) == grpc.StatusCode.INVALID_ARGUMENT and "counts" in error.value.message
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        client.harmonize_histogram(job_id, [1, -1, 1, 1], 2.0)
    with pytest.raises(ValueError, match="integers"):
        client.harmonize_histogram(job_id, [0.5, 1, 1, 1], 3.5)


def test_residuals_variant(client, job_id):
    client.create_job(job_id, "ghm_r", bins=10, mu=0.02)
    result = client.harmonize_residuals(job_id, [0.0, 0.001, 5.0], label_weights=[1, 1, 1])
    # g = |d| / sqrt(d^2 + mu^2): 0, about 0.0499 and about 1 land in bins 0, 0 and 9.
    assert result.nonempty_bins == 2 and result.weights.shape == (3,)
    assert result.weights[0] == result.weights[1] != result.weights[2]


# -- streams ------------------------------------------------------------------------------------


def test_stream_session_matches_unary_and_survives_a_rejected_request(client, job_id):
    twin = job_id + "-unary"
    for each in (job_id, twin):
        client.create_job(each, "ghm_c", bins=30, momentum=0.75)
    rng = np.random.default_rng(3)
    with client.stream() as session:
        for step in range(5):
            g = rng.random(500, dtype=np.float32)
            lw = (rng.random(500) > 0.3).astype(np.float32)
            streamed = session.harmonize(job_id, g, label_weights=lw, step=step)
            unary = client.harmonize(twin, g, label_weights=lw, step=step)
            np.testing.assert_array_equal(streamed.weights, unary.weights)
            np.testing.assert_array_equal(streamed.acc_sum, unary.acc_sum)
            assert streamed.step == step

        with pytest.raises(GhmdError) as error:
            session.harmonize(job_id, [2.0])  # outside [0, 1]: ends that stream
        assert codes(error) == grpc.StatusCode.INVALID_ARGUMENT
        after = session.harmonize_histogram(job_id, [1] + [0] * 29, 1.0, step=5)
        assert after.nonempty_bins == 1, "the session opened a new stream for the next step"
    assert client.get_job(job_id).state.steps == 6


# -- step-synchronous jobs ----------------------------------------------------------------------


def test_step_synchronous_job_gives_every_rank_the_global_table(client, job_id):
    client.create_job(job_id, "ghm_c", bins=10, momentum=0.5, world_size=2, step_timeout=20)
    shards = [np.array([0.05, 0.05, 0.95], np.float32), np.array([0.55], np.float32)]
    with futures.ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda rank: client.harmonize(job_id, shards[rank], step=0, rank=rank), (0, 1))
        )
    np.testing.assert_array_equal(results[0].bin_weights, results[1].bin_weights)
    assert results[0].tot == results[1].tot == 4.0
    assert results[0].weights[0] == results[0].weights[1]
    job = client.get_job(job_id)
    assert job.state.next_step == 1 and job.state.steps == 1 and job.state.elements == 4


def test_missing_rank_aborts_or_is_named(client, job_id):
    client.create_job(job_id, "ghm_c", world_size=2, step_timeout=0.3)
    with pytest.raises(GhmdError) as error:
        client.harmonize(job_id, [0.5], step=0, rank=0)
    assert codes(error) == grpc.StatusCode.ABORTED and "1" in error.value.message

    partial = job_id + "-partial"
    client.create_job(partial, "ghm_c", world_size=2, step_timeout=0.3, allow_partial_steps=True)
    result = client.harmonize(partial, [0.5], step=0, rank=0)
    assert result.missing_ranks == (1,)


def test_deadline_exceeded_is_a_ghmd_error(address, job_id):
    with Client(address, harmonize_timeout=0.3) as impatient:
        impatient.create_job(job_id, "ghm_c", world_size=2, step_timeout=30)
        started = time.monotonic()
        with pytest.raises(GhmdError) as error:
            impatient.harmonize(job_id, [0.5], step=0, rank=0)  # rank 1 never comes
        assert codes(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5, "DEADLINE_EXCEEDED is not retried"


def test_update_and_restore_job(client, job_id):
    client.create_job(job_id, "ghm_c", bins=3, momentum=0.5, world_size=2, step_timeout=20)
    updated = client.update_job(job_id, world_size=3, from_step=0, allow_partial_steps=True)
    assert updated.spec.allow_partial_steps
    state = {"acc_sum": [1.5, 0.0, 2.25], "steps": 7, "elements": 40, "next_step": 7}
    restored = client.restore_job(job_id, state)
    assert list(restored.state.acc_sum) == [1.5, 0.0, 2.25]
    assert (restored.state.steps, restored.state.elements, restored.state.next_step) == (7, 40, 7)
    again = client.restore_job(job_id, client.get_job(job_id)).state
    # A restore advances the generation (fencing copies from before it), and nothing else.
    assert again.generation == restored.state.generation + 1
    again.generation = restored.state.generation
    assert again == restored.state


# -- the client's own behaviour, against a fake server ------------------------------------------


class FlakyHarmonizer(ghm_pb2_grpc.HarmonizerServicer):
    """GetJob fails with UNAVAILABLE `failures` times, then answers; records every call."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.calls = []

    def GetJob(self, request, context):
        self.calls.append((time.monotonic(), dict(context.invocation_metadata())))
        if len(self.calls) <= self.failures:
            context.abort(self.code, f"failure {len(self.calls)}")
        return ghm_pb2.Job(job_id=request.job_id)


def serve(servicer, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ghm_pb2_grpc.add_HarmonizerServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def test_unavailable_is_retried_with_growing_backoff():
    servicer = FlakyHarmonizer(failures=3)
    server, port = serve(servicer)
    try:
        with Client(f"127.0.0.1:{port}", retries=5, backoff=0.05) as client:
            assert client.get_job("j").job_id == "j"
        times = [at for at, _ in servicer.calls]
        assert len(times) == 4
        gaps = np.diff(times)
        # Jittered in [delay/2, delay] with delay 0.05, 0.1, 0.2.
        assert gaps[0] >= 0.025 and gaps[2] >= 0.1 and gaps[2] > gaps[0]

        servicer.calls.clear()
        servicer.failures = 10
        with Client(f"127.0.0.1:{port}", retries=2, backoff=0.01) as client:
            with pytest.raises(GhmdError) as error:
                client.get_job("j")
        assert codes(error) == grpc.StatusCode.UNAVAILABLE and len(servicer.calls) == 3
    finally:
        server.stop(None)


def test_other_codes_are_not_retried():
    servicer = FlakyHarmonizer(failures=1, code=grpc.StatusCode.FAILED_PRECONDITION)
    server, port = serve(servicer)
    try:
        with Client(f"127.0.0.1:{port}", retries=5, backoff=0.01) as client:
            with pytest.raises(GhmdError) as error:
                client.get_job("j")
        assert codes(error) == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.message == "failure 1" and len(servicer.calls) == 1
    finally:
        server.stop(None)


def test_a_server_that_comes_up_late_is_reached_by_retrying(job_id):
    port = free_port()
    started = {}

    def launch():
        time.sleep(0.5)
        started["process"] = subprocess.Popen(
            [str(ghmd_binary()), "serve", "--listen", f"127.0.0.1:{port}",
             "--shutdown-grace", "1s", "--in-memory", "--metrics-listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    launcher = threading.Thread(target=launch)
    launcher.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=30, backoff=0.1, max_backoff=0.5) as client:
            assert client.create_job(job_id, "ghm_c").job_id == job_id
    finally:
        launcher.join()
        started["process"].terminate()
        assert started["process"].wait(timeout=15) == 0


def test_token_is_sent_as_bearer_metadata():
    servicer = FlakyHarmonizer(failures=0)
    server, port = serve(servicer)
    try:
        with Client(f"127.0.0.1:{port}", token="s3cret") as client:
            client.get_job("j")
        with Client(f"127.0.0.1:{port}") as client:
            client.get_job("j")
        assert servicer.calls[0][1].get("authorization") == "Bearer s3cret"
        assert "authorization" not in servicer.calls[1][1]
    finally:
        server.stop(None)


def self_signed(directory: Path) -> tuple:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_tls_with_a_private_ca(tmp_path):
    key, cert = self_signed(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    servicer = FlakyHarmonizer(failures=0)
    server, port = serve(servicer, credentials)
    try:
        with Client(f"localhost:{port}", tls=TLSConfig(ca=cert), retries=0) as client:
            assert client.get_job("j").job_id == "j"
        with Client(f"127.0.0.1:{port}", tls=TLSConfig(ca=cert.read_bytes()), token="t") as client:
            assert client.get_job("k").job_id == "k"
        assert servicer.calls[1][1]["authorization"] == "Bearer t"
        # Without the CA the server's certificate is not trusted; plaintext gets no answer.
        for tls in (True, None):
            with Client(f"localhost:{port}", tls=tls, retries=0, timeout=5) as client:
                with pytest.raises(GhmdError) as error:
                    client.get_job("j")
            assert codes(error) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
