"""The gRPC client of scripts/container-test.sh, run with the Python tests' venv
(scripts/python-venv.sh) and the committed stubs of clients/python.

  health ADDR                          exit 0 once ghm.v1.Harmonizer is SERVING (30 s at most)
  steps ADDR JOB N                     create JOB, apply N histogram steps, print GetJob as JSON
  get-job ADDR JOB                     print GetJob as JSON
  route PROXY JOB REPLICA              wait until PROXY sends JOB's calls to REPLICA, promptly
  train PROXY REFERENCE JOB FIRST LAST LEDGER
                                       steps FIRST..LAST of JOB through PROXY, each checked bit for
                                       bit against REFERENCE, a ghmd that never fails

Every job-scoped call carries the job id in the `x-ghmd-job` metadata header, by which the proxy
routes it. `train` keeps what it acknowledged in LEDGER (JSON) between its invocations, so that the
test can kill a replica between them. Until ghmd fences stale copies and the clients heal
themselves (issue 10), `train` does both itself: before each step it asks the replica for the
job's state, and when the job is not there (NOT_FOUND) or the copy is not the acknowledged state
(a replica restarted from an older snapshot), it puts the acknowledged state there with CreateJob
and RestoreJob.
"""

import base64
import json
import random
import struct
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients" / "python" / "src"))
from ghmd._proto import ghm_pb2, ghm_pb2_grpc  # noqa: E402

BINS = 10
SPEC = ghm_pb2.JobSpec(loss=ghm_pb2.LOSS_GHM_C, bins=BINS, momentum=0.75)
# A request through a proxy whose replica just died may fail while the proxy's health check
# catches up (HAProxy: 2 checks 500 ms apart); retried for this long.
UNAVAILABLE_BUDGET_S = 10.0


def fail(message: str) -> None:
    print(f"container_client: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def stub(addr: str) -> ghm_pb2_grpc.HarmonizerStub:
    return ghm_pb2_grpc.HarmonizerStub(grpc.insecure_channel(addr))


def routed(job_id: str) -> tuple:
    return (("x-ghmd-job", job_id),)


def histogram(job_id: str, step: int) -> ghm_pb2.Histogram:
    """The same counts for the same (job, step) in every process, so that the proxy's client and
    the reference see identical inputs."""
    rng = random.Random(f"{job_id}/{step}")
    counts = [rng.randrange(0, 5000) for _ in range(BINS)]
    return ghm_pb2.Histogram(counts=counts, tot=float(sum(counts)))


def state_json(job: ghm_pb2.Job) -> dict:
    return json_format.MessageToDict(job.state, preserving_proto_field_name=True)


def f32_bits(values) -> list:
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


def health(addr: str) -> None:
    checker = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        try:
            answer = checker.Check(health_pb2.HealthCheckRequest(service="ghm.v1.Harmonizer"), timeout=2)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                print(f"health: {addr} SERVING")
                return
            last = answer.status
        except grpc.RpcError as error:
            last = error.code()
        time.sleep(0.2)
    fail(f"{addr} never answered SERVING; last: {last}")


def steps(addr: str, job_id: str, count: str) -> None:
    harmonizer = stub(addr)
    harmonizer.CreateJob(ghm_pb2.CreateJobRequest(job_id=job_id, spec=SPEC), metadata=routed(job_id))
    for step in range(int(count)):
        harmonizer.Harmonize(
            ghm_pb2.HarmonizeRequest(job_id=job_id, step=step, histogram=histogram(job_id, step)),
            metadata=routed(job_id),
        )
    get_job(addr, job_id)


def get_job(addr: str, job_id: str) -> None:
    job = stub(addr).GetJob(ghm_pb2.GetJobRequest(job_id=job_id), metadata=routed(job_id))
    print(json.dumps(state_json(job), sort_keys=True))


def with_retry(call):
    """The call, retried while the proxy answers UNAVAILABLE (its replica is gone)."""
    deadline = time.monotonic() + UNAVAILABLE_BUDGET_S
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def replica_of(call) -> str:
    # A call that ends with an error in its headers (gRPC's trailers-only response) carries the
    # proxy's header among the trailing metadata.
    metadata = dict(call.initial_metadata() or ()) | dict(call.trailing_metadata() or ())
    return metadata.get("x-ghmd-replica", "?")


def route(proxy: str, job_id: str, replica: str) -> None:
    """Waits until the proxy sends the job's calls to `replica` and they answer at once, so that
    a step does not start while the route is still changing."""
    harmonizer = stub(proxy)
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            _, call = harmonizer.GetJob.with_call(
                ghm_pb2.GetJobRequest(job_id=job_id), metadata=routed(job_id), timeout=1)
        except grpc.RpcError as error:
            call = error
        last = (replica_of(call), call.code().name, round(time.monotonic() - began, 3))
        if last[0] == replica and last[1] in ("OK", "NOT_FOUND") and last[2] < 0.5:
            print(f"route: {job_id} goes to {replica}")
            return
        time.sleep(0.1)
    fail(f"the proxy never sent {job_id} to {replica} promptly; last: {last}")


def train(proxy: str, reference: str, job_id: str, first: str, last: str, ledger_path: str) -> None:
    ledger_file = Path(ledger_path)
    if ledger_file.exists() and ledger_file.stat().st_size > 0:
        ledger = json.loads(ledger_file.read_text())
    else:
        ledger = {"state": None, "replicas": [], "reseeds": {"not_found": 0, "stale": 0}}
    harmonizer = stub(proxy)
    truth = stub(reference)
    metadata = routed(job_id)
    if ledger["state"] is None:
        with_retry(lambda: harmonizer.CreateJob(
            ghm_pb2.CreateJobRequest(job_id=job_id, spec=SPEC), metadata=metadata))
        truth.CreateJob(ghm_pb2.CreateJobRequest(job_id=job_id, spec=SPEC))
    trail = []
    for step in range(int(first), int(last)):
        checked_on = reseed_if_needed(harmonizer, job_id, ledger) if ledger["state"] is not None else "-"
        request = ghm_pb2.HarmonizeRequest(job_id=job_id, step=step, histogram=histogram(job_id, step))
        began = time.monotonic()
        answer, call = with_retry(lambda: harmonizer.Harmonize.with_call(request, metadata=metadata))
        trail.append(f"{step}:{checked_on}/{replica_of(call)}/{time.monotonic() - began:.3f}s")
        expected = truth.Harmonize(request)
        if f32_bits(answer.bin_weights) != f32_bits(expected.bin_weights):
            fail(f"step {step}: weights {list(answer.bin_weights)} from {replica_of(call)}, "
                 f"the reference gave {list(expected.bin_weights)}; steps as step:checked on/"
                 f"answered by/took: {' '.join(trail)}")
        if f32_bits(answer.acc_sum) != f32_bits(expected.acc_sum):
            fail(f"step {step}: acc_sum differs from the reference's")
        replica = replica_of(call)
        if not ledger["replicas"] or ledger["replicas"][-1] != replica:
            ledger["replicas"].append(replica)
        # What reseeding needs (the counters too, which Harmonize responses do not carry yet): the
        # reference's state, which the step just proved equal; serialized, so that no float is
        # rounded on its way through JSON.
        reference_state = truth.GetJob(ghm_pb2.GetJobRequest(job_id=job_id)).state
        ledger["state"] = base64.b64encode(reference_state.SerializeToString()).decode()
    ledger_file.write_text(json.dumps(ledger, sort_keys=True))
    print(f"train: steps {first}..{last} of {job_id} bit-identical to the reference; replicas "
          f"{' -> '.join(ledger['replicas'])}; reseeds {ledger['reseeds']}")


def reseed_if_needed(harmonizer, job_id: str, ledger: dict) -> str:
    """Where the step will go, as far as the proxy tells."""
    metadata = routed(job_id)
    acknowledged = ghm_pb2.JobState.FromString(base64.b64decode(ledger["state"]))
    try:
        job, call = with_retry(lambda: harmonizer.GetJob.with_call(
            ghm_pb2.GetJobRequest(job_id=job_id), metadata=metadata))
        if job.state == acknowledged:
            return replica_of(call)
        ledger["reseeds"]["stale"] += 1
        print(f"reseed: a stale copy at step {job.state.steps} (acknowledged {acknowledged.steps})",
              file=sys.stderr)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        ledger["reseeds"]["not_found"] += 1
        print(f"reseed: {job_id} not found at step {acknowledged.steps}", file=sys.stderr)
        with_retry(lambda: harmonizer.CreateJob(
            ghm_pb2.CreateJobRequest(job_id=job_id, spec=SPEC), metadata=metadata))
    _, call = with_retry(lambda: harmonizer.RestoreJob.with_call(
        ghm_pb2.RestoreJobRequest(job_id=job_id, state=acknowledged), metadata=metadata))
    return f"reseeded on {replica_of(call)}"


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"health": health, "steps": steps, "get-job": get_job, "train": train, "route": route}[command](*args)
