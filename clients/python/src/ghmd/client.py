"""A typed client for the ghm.v1.Harmonizer service.

Float arrays cross the wire as little-endian float32 packed in ``bytes`` (see the proto), so every
array here is converted with one ``numpy`` call each way (``tobytes`` / ``frombuffer``), never
with a per-element Python loop: a million-element batch costs two memcpys, not a million boxings.
"""

from __future__ import annotations

import datetime
import logging
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, TypeVar, Union,
)

import grpc
import numpy as np
from google.protobuf import duration_pb2

from ._proto import ghm_pb2, ghm_pb2_grpc
from .errors import GhmdError, HealingError, RunLostError

__all__ = [
    "METHODS", "Client", "Harmonized", "HarmonizeSession", "TLSConfig", "method_state_arrays",
    "pack_f32", "unpack_f32",
]

_T = TypeVar("_T")
_log = logging.getLogger("ghmd")

# Little-endian float32, whatever the host's byte order: the contract's wire format.
_F32 = np.dtype("<f4")

_LOSSES = {
    "ghm_c": ghm_pb2.LOSS_GHM_C,
    "ghmc": ghm_pb2.LOSS_GHM_C,
    "ghm-c": ghm_pb2.LOSS_GHM_C,
    "ghm_r": ghm_pb2.LOSS_GHM_R,
    "ghmr": ghm_pb2.LOSS_GHM_R,
    "ghm-r": ghm_pb2.LOSS_GHM_R,
}

Seconds = Union[float, int, datetime.timedelta]
StateLike = Union[ghm_pb2.JobState, ghm_pb2.Job, Mapping[str, Any]]


def pack_f32(values: Any) -> bytes:
    """Packs an array-like (flattened in C order) as the contract's little-endian float32 bytes."""
    return np.ascontiguousarray(values, dtype=_F32).tobytes()


def unpack_f32(data: bytes) -> np.ndarray:
    """Unpacks little-endian float32 bytes into a writable native float32 array (one copy)."""
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes is not a whole number of float32 values")
    return np.frombuffer(data, dtype=_F32).astype(np.float32)


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel. Each field is PEM, as bytes or a path to a file.

    ``ca`` verifies the server (None: the system roots); ``cert`` and ``key`` are the client's
    own certificate for mutual TLS; ``server_name`` overrides the name checked against the
    server's certificate (for example when connecting by IP address).
    """

    ca: Union[bytes, str, Path, None] = None
    cert: Union[bytes, str, Path, None] = None
    key: Union[bytes, str, Path, None] = None
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca),
            private_key=_read_pem(self.key),
            certificate_chain=_read_pem(self.cert),
        )


def _read_pem(value: Union[bytes, str, Path, None]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Harmonized:
    """One step's answer, with the contract's packed floats unpacked into float32 arrays."""

    job_id: str
    step: int
    #: One weight per input element (0 for an invalid one); empty for a histogram input.
    weights: np.ndarray
    #: M entries: the weight of a valid element in each bin; 0 for a bin empty this step.
    bin_weights: np.ndarray
    #: The step's tot after max(tot, 1), summed over every rank of the step.
    tot: float
    #: The number of bins with a valid element this step.
    nonempty_bins: int
    #: The EMA state after the step, M entries; empty when momentum is 0.
    acc_sum: np.ndarray
    #: Partial steps only: the ranks the step was applied without.
    missing_ranks: Tuple[int, ...]
    #: The job's counters and lineage right after the step (JobState's fields of these names).
    steps: int = 0
    elements: int = 0
    next_step: int = 0
    generation: int = 0
    #: Seesaw and EQLv2 jobs: the method ("seesaw", "eqlv2") and its whole state right after the
    #: step, by buffer name (``cum_samples``; ``pos_grad``, ``neg_grad``, ``pos_neg``), float32.
    #: GHM: "" and empty.
    method: str = ""
    method_state: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def counters(self) -> Tuple[int, int, int]:
        """(steps, elements, next_step): what a checkpoint of the job's state needs."""
        return (self.steps, self.elements, self.next_step)

    @classmethod
    def from_proto(cls, response: ghm_pb2.HarmonizeResponse) -> "Harmonized":
        return cls(
            job_id=response.job_id,
            step=response.step,
            weights=unpack_f32(response.weights),
            bin_weights=np.array(response.bin_weights, dtype=np.float32),
            tot=response.tot,
            nonempty_bins=response.nonempty_bins,
            acc_sum=np.array(response.acc_sum, dtype=np.float32),
            missing_ranks=tuple(response.missing_ranks),
            steps=response.steps,
            elements=response.elements,
            next_step=response.next_step,
            generation=response.generation,
            method=response.WhichOneof("method_state") or "",
            method_state=method_state_arrays(response),
        )


def method_state_arrays(message: Any) -> Dict[str, np.ndarray]:
    """The method state a JobState, HarmonizeResponse or AppliedStep carries, as float32 arrays
    by field name (every method state is a few float vectors: a new method needs nothing here);
    empty for GHM."""
    which = message.WhichOneof("method_state")
    if which is None:
        return {}
    state = getattr(message, which)
    return {
        descriptor.name: np.array(getattr(state, descriptor.name), dtype=np.float32)
        for descriptor in state.DESCRIPTOR.fields
    }


def _copy_method_state(source: Any, destination: Any) -> None:
    """Copies the method_state oneof between two messages that both have one (they share its
    field names: seesaw, eqlv2)."""
    which = source.WhichOneof("method_state")
    if which is not None:
        getattr(destination, which).CopyFrom(getattr(source, which))


#: The methods besides GHM, as JobSpec's ``method`` oneof names them (seesaw, eqlv2): each has a
#: member of that name in JobSpec.method, HarmonizeRequest.input and the method_state oneofs.
METHODS = tuple(field.name for field in ghm_pb2.JobSpec.DESCRIPTOR.oneofs_by_name["method"].fields)


def _message_class(container: Any, method: str) -> Any:
    """The message class of a method's field of ``container`` (``JobSpec.seesaw``: SeesawSpec);
    a name that is not a method is refused, naming the ones there are."""
    if method not in METHODS:
        raise ValueError(f"{method!r} is not a method: use one of {', '.join(METHODS)}")
    return getattr(ghm_pb2, container.DESCRIPTOR.fields_by_name[method].message_type.name)


def _method_spec(method: str, values: Any) -> Any:
    """A method's spec message from a mapping of its fields (or the message itself); an unknown
    key is refused here, naming it, rather than dropped."""
    message_type = _message_class(ghm_pb2.JobSpec, method)
    if isinstance(values, message_type):
        return values
    known = {descriptor.name for descriptor in message_type.DESCRIPTOR.fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{method}: unknown field(s) {unknown}; a {method} job takes {sorted(known)}"
        )
    return message_type(**{key: value for key, value in values.items() if value is not None})


def _method_contribution(method: str, values: Mapping[str, Any]) -> Any:
    """A method's HarmonizeRequest input from arrays by field name: a bytes field is packed as
    little-endian float32, a repeated integer field sent as is (1-D, whole numbers)."""
    message_type = _message_class(ghm_pb2.HarmonizeRequest, method)
    fields = {descriptor.name: descriptor for descriptor in message_type.DESCRIPTOR.fields}
    contribution = message_type()
    for name, value in values.items():
        if value is None:
            continue
        descriptor = fields.get(name)
        if descriptor is None:
            raise ValueError(f"{method}: unknown field {name!r}; use {sorted(fields)}")
        if descriptor.type == descriptor.TYPE_BYTES:
            setattr(contribution, name, pack_f32(value))
            continue
        array = np.asarray(value)
        if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
            raise ValueError(
                f"{method}.{name} must be a 1-D array of integers, got shape {array.shape} "
                f"of {array.dtype}"
            )
        if descriptor.type == descriptor.TYPE_UINT64 and array.size and array.min() < 0:
            index = int(np.argmin(array))
            raise ValueError(f"{method}.{name}[{index}] = {array[index]}: cannot be negative")
        getattr(contribution, name).extend(array.tolist())
    return contribution


def _duration(value: Optional[Seconds], field: str):
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{field} = {value!r}: must be a positive number of seconds")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _loss(loss: Union[str, int]) -> int:
    if isinstance(loss, str):
        try:
            return _LOSSES[loss.lower()]
        except KeyError:
            raise ValueError(f"loss = {loss!r}: use 'ghm_c' or 'ghm_r'") from None
    if loss in (ghm_pb2.LOSS_GHM_C, ghm_pb2.LOSS_GHM_R):
        return int(loss)
    raise ValueError(f"loss = {loss!r}: use 'ghm_c', 'ghm_r' or a ghm_pb2.Loss value")


def _state(state: StateLike) -> ghm_pb2.JobState:
    if isinstance(state, ghm_pb2.Job):
        return state.state
    if isinstance(state, ghm_pb2.JobState):
        return state
    acc_sum = np.asarray(state.get("acc_sum", ()), dtype=np.float32)
    job_state = ghm_pb2.JobState(
        acc_sum=acc_sum.tolist(),
        steps=int(state.get("steps", 0)),
        elements=int(state.get("elements", 0)),
        next_step=int(state.get("next_step", 0)),
    )
    # A method's state as {"seesaw": {"cum_samples": ...}} or {"eqlv2": {"pos_grad": ...}}.
    for method in METHODS:
        buffers = state.get(method)
        if buffers is not None:
            target = getattr(job_state, method)
            for name, values in buffers.items():
                getattr(target, name).extend(np.asarray(values, dtype=np.float32).ravel().tolist())
            target.SetInParent()
    return job_state


def _histogram(counts: Any, tot: float) -> ghm_pb2.Histogram:
    counts = np.asarray(counts)
    if counts.ndim != 1 or not (counts.dtype.kind in "iu" or counts.size == 0):
        raise ValueError(
            f"counts must be a 1-D array of integers, got shape {counts.shape} of {counts.dtype}"
        )
    if counts.size and counts.min() < 0:
        index = int(np.argmin(counts))
        raise ValueError(f"counts[{index}] = {counts[index]}: bin counts cannot be negative")
    return ghm_pb2.Histogram(counts=counts.tolist(), tot=float(tot))


def _request(
    job_id: str,
    step: Optional[int],
    rank: int,
    *,
    gradient_norms: Any = None,
    residuals: Any = None,
    histogram: Optional[ghm_pb2.Histogram] = None,
    label_weights: Any = None,
) -> ghm_pb2.HarmonizeRequest:
    request = ghm_pb2.HarmonizeRequest(job_id=job_id, step=step or 0, rank=rank)
    if gradient_norms is not None:
        request.gradient_norms = pack_f32(gradient_norms)
    elif residuals is not None:
        request.residuals = pack_f32(residuals)
    else:
        request.histogram.CopyFrom(histogram)
    if label_weights is not None:
        request.label_weights = pack_f32(label_weights)
    return request


#: The metadata header a proxy routes each job by (see the proto, above HarmonizeRequest).
JOB_HEADER = "x-ghmd-job"

# The server's ErrorInfo reasons (domain ghm.v1) the client acts on.
_JOB_NOT_HERE = "JOB_NOT_HERE"
_STALE_COPY = "STALE_COPY"
_RUN_LOST = ("RUN_ACTIVE", "RUN_REPLACED")
# What a dead replica, a proxy that lost its upstream (502/503/504), or a stream a proxy cut
# (nginx: INTERNAL, HAProxy: CANCELLED) look like to grpcio.
_TRANSPORT_FAILURES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
)


class _StillWaiting(Exception):
    """A step-synchronous step not answered within the attempt's wait. Not a failure (its other
    ranks may be slow), but a call or stream is routed once, when it starts: after the proxy's
    ring changed (a replica came back) it may wait on a copy the other ranks no longer reach."""


class _JobMemory:
    """What a client needs to put a job back where it last saw it, on whichever replica it
    reaches: the spec and run of CreateJob, and the counters, lineage and table of the last
    acknowledged response. Shared by a Client and its stream sessions, under the client's lock.
    """

    __slots__ = ("spec", "run_id", "state", "fenced", "last_step")

    def __init__(self, spec: Optional[ghm_pb2.JobSpec], run_id: str, state: ghm_pb2.JobState):
        #: None for a job this client did not create: it is fenced but cannot be reseeded.
        self.spec = spec
        self.run_id = run_id
        self.state = state
        #: Whether ``state`` came from an acknowledged step, and so fences the next one. The
        #: state CreateJob or RestoreJob returned only reseeds: between it and the first step
        #: another process may restore the job (the checkpoint pattern: rank 0 restores, every
        #: rank steps), and fencing with what came before would put the job back.
        self.fenced = False
        #: Step-synchronous jobs: the last acknowledged step, so that a reseeded copy answers a
        #: rank whose answer to it was lost with the same table.
        self.last_step: Optional[ghm_pb2.AppliedStep] = None

    def acknowledge(self, response: ghm_pb2.HarmonizeResponse) -> None:
        # Ranks sharing one client acknowledge the same step in any order; a lineage never goes
        # back, so the older of two answers is ignored.
        lineage = (self.state.generation, self.state.steps)
        if self.fenced and (response.generation, response.steps) < lineage:
            return
        self.fenced = True
        self.state = ghm_pb2.JobState(
            acc_sum=response.acc_sum,
            steps=response.steps,
            elements=response.elements,
            next_step=response.next_step,
            generation=response.generation,
        )
        # Seesaw and EQLv2: the response carries the job's whole state, which a reseed needs.
        _copy_method_state(response, self.state)
        synchronous = self.spec is not None and self.spec.world_size > 1
        self.last_step = None
        if synchronous:
            self.last_step = ghm_pb2.AppliedStep(
                step=response.step,
                bin_weights=response.bin_weights,
                tot=response.tot,
                nonempty_bins=response.nonempty_bins,
                acc_sum=response.acc_sum,
                missing_ranks=response.missing_ranks,
            )
            _copy_method_state(response, self.last_step)

    def reseed_request(self, job_id: str) -> ghm_pb2.ReseedJobRequest:
        request = ghm_pb2.ReseedJobRequest(
            job_id=job_id, spec=self.spec, run_id=self.run_id, state=self.state
        )
        if self.last_step is not None:
            request.last_step.CopyFrom(self.last_step)
        return request


class _Steps:
    """The three Harmonize requests and their healing, written once for the unary client and the
    stream session.

    Each builds its request here; ``_heal`` fences it with the job's memory, hands it to
    ``_attempt`` (a unary call, or a message on the session's open stream: the one thing that
    differs) and, when the server side failed, reconnects, reseeds and sends it again.
    """

    _client: "Client"

    def _attempt(
        self, request: ghm_pb2.HarmonizeRequest, wait: Optional[float], started: float
    ) -> ghm_pb2.HarmonizeResponse:
        """Sends ``request`` once; raises _StillWaiting if ``wait`` (not None) passes first."""
        raise NotImplementedError

    def _reconnect(self) -> None:
        raise NotImplementedError

    def _send(self, request: ghm_pb2.HarmonizeRequest) -> Harmonized:
        return Harmonized.from_proto(self._heal(request))

    def _heal(self, request: ghm_pb2.HarmonizeRequest) -> ghm_pb2.HarmonizeResponse:
        client = self._client
        job_id = request.job_id
        what = f"step {request.step} of rank {request.rank}"
        started = time.monotonic()
        first_failure: Optional[float] = None
        attempts = 0
        needs_reseed = False
        memory = client._memory(job_id)
        synchronous = memory is not None and memory.spec is not None and memory.spec.world_size > 1
        wait = client.step_rehome_after if synchronous else None
        while True:
            attempts += 1
            try:
                if needs_reseed:
                    client._reseed(job_id)
                    _log.info("job %r %s: reseeded, sending it again", job_id, what)
                    needs_reseed = False
                memory = client._memory(job_id)
                if memory is not None and memory.fenced:
                    request.expected_generation = memory.state.generation
                    request.expected_steps = memory.state.steps
                response = self._attempt(request, wait, started)
                client._acknowledge(job_id, response)
                if first_failure is not None:
                    _log.info("job %r %s: healed after %.3f s, %d attempts", job_id, what,
                              time.monotonic() - first_failure, attempts)
                return response
            except _StillWaiting:
                # Sent again on a fresh call or stream, which the proxy routes anew; the server
                # keeps the rank's contribution and the step's timer, so a rank really missing
                # still ends the step with ABORTED after the step timeout.
                self._reconnect()
                wait = min(wait * 2, client.step_rehome_max)
                continue
            except GhmdError as error:
                failure = error
            if failure.reason in _RUN_LOST:
                raise RunLostError(
                    failure.code,
                    f"job {job_id!r} belongs to another training run ({failure.reason}): "
                    f"{failure.message}",
                    failure.method,
                    failure.reason,
                    failure.details,
                )
            healing = first_failure is not None
            if failure.reason in (_JOB_NOT_HERE, _STALE_COPY):
                if client._memory(job_id) is None or client._memory(job_id).spec is None:
                    raise GhmdError(
                        failure.code,
                        f"{failure.message}; this client did not create job {job_id!r}, so it "
                        "cannot reseed it: call create_job first",
                        failure.method,
                        failure.reason,
                        failure.details,
                    )
                needs_reseed = True
            elif failure.code in _TRANSPORT_FAILURES:
                self._reconnect()
            elif not (healing and failure.code == grpc.StatusCode.ABORTED):
                # ABORTED once the job has moved: a rank still on its way to the new replica
                # outlasted the step timeout; the step did not happen, so it is sent again.
                raise failure
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                _log.warning("job %r %s: %s; healing for up to %s s", job_id, what, failure,
                             client.heal_deadline)
            else:
                _log.debug("job %r %s: attempt %d: %s", job_id, what, attempts, failure)
            left = client.heal_deadline - (now - first_failure)
            if left <= 0:
                raise HealingError(failure, job_id, what, client.heal_deadline, attempts)
            client._pause(attempts - 1, left)

    def harmonize(
        self,
        job_id: str,
        gradient_norms: Any,
        label_weights: Any = None,
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """Weighs one batch of gradient norms g (any array-like, flattened; sent as float32)."""
        return self._send(
            _request(job_id, step, rank, gradient_norms=gradient_norms, label_weights=label_weights)
        )

    def harmonize_residuals(
        self,
        job_id: str,
        residuals: Any,
        label_weights: Any = None,
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """GHM-R only: weighs residuals d = pred - target; the server derives g from them."""
        return self._send(
            _request(job_id, step, rank, residuals=residuals, label_weights=label_weights)
        )

    def harmonize_histogram(
        self,
        job_id: str,
        counts: Any,
        tot: float,
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """Weighs a batch the caller binned itself: M counts of valid elements and the raw tot.

        The answer has no per-element weights: apply ``bin_weights`` to the elements locally.
        """
        return self._send(_request(job_id, step, rank, histogram=_histogram(counts, tot)))

    def harmonize_method(
        self,
        job_id: str,
        method: str,
        contribution: Mapping[str, Any],
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """One step of a Seesaw or EQLv2 job (``method`` "seesaw" or "eqlv2"): this rank's
        contribution by field name. The answer's ``method_state`` is the job's state after the
        step (for a step-synchronous job, after every rank's contribution)."""
        request = ghm_pb2.HarmonizeRequest(job_id=job_id, step=step or 0, rank=rank)
        getattr(request, method).CopyFrom(_method_contribution(method, contribution))
        return self._send(request)

    def harmonize_seesaw(
        self,
        job_id: str,
        label_counts: Any = None,
        labels: Any = None,
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """A Seesaw step: C + 1 samples per label (the last the background), or the labels
        themselves (0 to C) for the server to count. ``method_state["cum_samples"]`` is the
        job's cum_samples after the step, which the step's loss uses."""
        return self.harmonize_method(
            job_id, "seesaw", {"label_counts": label_counts, "labels": labels}, step, rank
        )

    def harmonize_eqlv2(
        self,
        job_id: str,
        pos_grad: Any,
        neg_grad: Any,
        step: Optional[int] = None,
        rank: int = 0,
    ) -> Harmonized:
        """An EQLv2 step: this rank's C positive and negative gradient sums (sent as float32).
        ``method_state`` holds pos_grad, neg_grad and pos_neg after the step; the next step's
        weights come from that pos_neg."""
        return self.harmonize_method(
            job_id, "eqlv2", {"pos_grad": pos_grad, "neg_grad": neg_grad}, step, rank
        )


class Client(_Steps):
    """A connection to one ghmd server. Thread-safe; one per process is enough.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. ``tls`` is None
    (plaintext), True (TLS with the system roots), a :class:`TLSConfig`, or ready
    ``grpc.ChannelCredentials``.

    Every call has a deadline (``timeout`` seconds; ``harmonize_timeout`` for Harmonize, which on a
    step-synchronous job waits for the other ranks, up to the job's step timeout). Calls other
    than Harmonize are retried with exponential backoff and jitter on UNAVAILABLE, up to
    ``retries`` times. Every job-scoped call carries the job id in the ``x-ghmd-job`` header, by
    which a proxy routes each job to one of N replicas.

    Steps heal themselves (see the README, "What a client sees during a failover"): the client
    remembers, per job it created, the spec, the run and the last acknowledged response, and
    fences every step with that lineage, so that a stale copy of the job refuses instead of
    answering. When a step fails on the server side (UNAVAILABLE; INTERNAL, CANCELLED or UNKNOWN
    from a proxy that lost its replica; the job not on this replica; a stale copy), the client
    reconnects, reseeds the job from its memory (ReseedJob) and sends the step again, for up to
    ``heal_deadline`` seconds from the first failure, then raises :class:`ghmd.HealingError`.
    A job taken over by another run raises :class:`ghmd.RunLostError` at once.

    Resending is safe: a step of a step-synchronous job is identified by (job, step, rank) and
    answered again from the server's kept table (a reseeded copy included). Two visible effects
    remain: a DeleteJob whose first answer was lost reports NOT_FOUND, and an asynchronous job
    (world_size 0 or 1), where every request is a step of its own, applies a step twice if the
    connection broke after the server applied it but before the answer arrived.
    """

    def __init__(
        self,
        target: str,
        token: Optional[str] = None,
        tls: Union[None, bool, TLSConfig, grpc.ChannelCredentials] = None,
        *,
        timeout: float = 30.0,
        harmonize_timeout: float = 900.0,
        retries: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        heal_deadline: float = 30.0,
        heal_backoff: float = 0.02,
        heal_max_backoff: float = 0.5,
        step_rehome_after: float = 1.0,
        step_rehome_max: float = 4.0,
        options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        if not heal_deadline > 0:
            raise ValueError(f"heal_deadline = {heal_deadline!r}: must be a positive number of "
                             "seconds")
        self.target = target
        self.timeout = timeout
        self.harmonize_timeout = harmonize_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.heal_deadline = float(heal_deadline)
        self.heal_backoff = heal_backoff
        self.heal_max_backoff = heal_max_backoff
        self.step_rehome_after = step_rehome_after
        self.step_rehome_max = step_rehome_max
        self._jobs: Dict[str, _JobMemory] = {}
        self._lock = threading.Lock()
        # grpcio's default 4 MiB receive limit is a million weights; the server enforces its own.
        # Its reconnect backoff starts at 1 s and grows to 120 s: a server that restarted on its
        # port would be reached only that late, so the healing pace is kept instead.
        channel_options = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", int(heal_max_backoff * 1000)),
        ]
        if isinstance(tls, TLSConfig) and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel_options.extend(options)
        if tls is None or tls is False:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            if tls is True:
                credentials = grpc.ssl_channel_credentials()
            elif isinstance(tls, TLSConfig):
                credentials = tls.credentials()
            else:
                credentials = tls
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = ghm_pb2_grpc.HarmonizerStub(self._channel)
        # Closed when the client is collected or, at the latest, at interpreter exit: a channel
        # with calls still open (a stream to a server that was killed) must not hold the exit.
        self._closer = weakref.finalize(self, self._channel.close)
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _sleep_before_retry(self, attempt: int) -> None:
        # Full jitter: ranks that lost the server together do not come back in lockstep.
        delay = min(self.max_backoff, self.backoff * (2**attempt))
        time.sleep(random.uniform(delay / 2, delay))

    def _pause(self, attempt: int, left: float) -> None:
        """The pause between two healing attempts, shorter than ``_sleep_before_retry``'s: a
        failover is over in about a health check's interval, and every pause adds to it."""
        delay = min(self.heal_max_backoff, self.heal_backoff * (2**attempt), left)
        time.sleep(random.uniform(delay / 2, delay))

    def _job_metadata(self, job_id: str) -> Tuple[Tuple[str, str], ...]:
        return self._metadata + ((JOB_HEADER, job_id),)

    # -- the per-job memory that healing reseeds from ------------------------------------------

    def _memory(self, job_id: str) -> Optional[_JobMemory]:
        with self._lock:
            return self._jobs.get(job_id)

    def _remember(self, job: ghm_pb2.Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = _JobMemory(job.spec, job.run_id, job.state)

    def _relearn(self, job: ghm_pb2.Job) -> None:
        """Takes a job's state as the server put it in place, to reseed from (not to fence)."""
        with self._lock:
            memory = self._jobs.get(job.job_id)
            if memory is not None:
                memory.state = job.state
                memory.fenced = False
                memory.last_step = None

    def _acknowledge(self, job_id: str, response: ghm_pb2.HarmonizeResponse) -> None:
        with self._lock:
            memory = self._jobs.get(job_id)
            if memory is None:
                # Not created here: fenced from now on, so a stale copy is caught, not obeyed.
                memory = self._jobs[job_id] = _JobMemory(None, "", ghm_pb2.JobState())
            memory.acknowledge(response)

    def acknowledged(self, job_id: str) -> Optional[ghm_pb2.JobState]:
        """The counters and lineage of the last response this client acknowledged for the job
        (or of the job as CreateJob / RestoreJob returned it); None for a job it never saw."""
        memory = self._memory(job_id)
        if memory is None:
            return None
        state = ghm_pb2.JobState()
        state.CopyFrom(memory.state)
        return state

    def _reseed(self, job_id: str) -> ghm_pb2.Job:
        with self._lock:
            request = self._jobs[job_id].reseed_request(job_id)
        return self._call_once("ReseedJob", request, self.timeout, job_id)

    def _with_retries(self, method: str, call: Callable[[], _T]) -> _T:
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                failure = GhmdError.from_rpc_error(error, method)
            except GhmdError as error:
                failure = error
            if failure.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                raise failure
            self._sleep_before_retry(attempt)
            attempt += 1

    def _call_once(self, method: str, request: Any, deadline: float, job_id: str = "") -> Any:
        """One call, its failure as a GhmdError; ``job_id`` routes it (empty: not job-scoped)."""
        rpc = getattr(self._stub, method)
        metadata = self._job_metadata(job_id) if job_id else self._metadata
        started = time.monotonic()
        try:
            return rpc(request, timeout=deadline, metadata=metadata)
        except grpc.RpcError as error:
            failure = GhmdError.from_rpc_error(error, method)
        # A tonic server answers a request whose grpc-timeout passed with CANCELLED, and
        # that can arrive before the client's own DEADLINE_EXCEEDED: report what happened.
        if failure.code == grpc.StatusCode.CANCELLED and time.monotonic() - started >= deadline:
            failure = GhmdError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {deadline}s (server: {failure.message})",
                method,
            )
        raise failure

    def _unary(self, method: str, request: Any, job_id: str = "") -> Any:
        return self._with_retries(
            method, lambda: self._call_once(method, request, self.timeout, job_id)
        )

    # -- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        loss: Union[str, int, None] = None,
        bins: Optional[int] = None,
        momentum: Optional[float] = None,
        mu: Optional[float] = None,
        *,
        world_size: int = 0,
        step_timeout: Optional[Seconds] = None,
        allow_partial_steps: bool = False,
        run_id: Optional[str] = None,
        **method: Optional[Mapping[str, Any]],
    ) -> ghm_pb2.Job:
        """Creates a job, or returns the existing one if it has the same spec (idempotent).

        A GHM job takes ``loss`` (default "ghm_c"), ``bins`` (10), ``momentum`` (0) and ``mu``
        (0). Another method is one keyword, named as in JobSpec's ``method``, with its spec's
        fields: ``seesaw=dict(num_classes=C, p=, q=, eps=)`` or ``eqlv2=dict(num_classes=C,
        gamma=, mu=, alpha=)`` (absent or None parameters: mmdetection's defaults, which the
        server fills in); GHM's four are GHM's alone.

        ``run_id`` names one training run (chosen once, e.g. a UUID, and shared by its ranks): a
        new run that reuses the job id starts fresh instead of inheriting an old density, and a
        job another live run uses raises :class:`ghmd.RunLostError`. The returned job is what
        this client heals the job from until its first step is acknowledged.
        """
        methods = {name: values for name, values in method.items() if values is not None}
        if len(methods) > 1:
            raise ValueError(f"{' and '.join(sorted(methods))}: a job runs one method, not both")
        if methods:
            ghm_arguments = {"loss": loss, "bins": bins, "momentum": momentum, "mu": mu}
            given = sorted(name for name, value in ghm_arguments.items() if value is not None)
            if given:
                raise ValueError(f"{', '.join(given)}: GHM's parameters, not taken by a "
                                 f"{next(iter(methods))} job")
            spec = ghm_pb2.JobSpec(world_size=world_size, allow_partial_steps=allow_partial_steps)
            for name, values in methods.items():
                spec_of_method = _method_spec(name, values)  # refuses a name that is no method
                getattr(spec, name).CopyFrom(spec_of_method)
        else:
            spec = ghm_pb2.JobSpec(
                loss=_loss("ghm_c" if loss is None else loss),
                bins=10 if bins is None else bins,
                momentum=momentum or 0.0,
                mu=mu or 0.0,
                world_size=world_size,
                allow_partial_steps=allow_partial_steps,
            )
        duration = _duration(step_timeout, "step_timeout")
        if duration is not None:
            spec.step_timeout.CopyFrom(duration)
        request = ghm_pb2.CreateJobRequest(job_id=job_id, spec=spec, run_id=run_id or "")
        try:
            job = self._unary("CreateJob", request, job_id)
        except GhmdError as error:
            if error.reason in _RUN_LOST:
                raise RunLostError(
                    error.code, error.message, error.method, error.reason, error.details
                ) from None
            raise
        self._remember(job)
        return job

    def get_job(self, job_id: str) -> ghm_pb2.Job:
        return self._unary("GetJob", ghm_pb2.GetJobRequest(job_id=job_id), job_id)

    def list_jobs(self, prefix: str = "", page_size: int = 0) -> Iterator[ghm_pb2.Job]:
        """Every job whose id starts with ``prefix``, in id order, fetching page after page."""
        token = ""
        while True:
            page = self._unary(
                "ListJobs",
                ghm_pb2.ListJobsRequest(prefix=prefix, page_size=page_size, page_token=token),
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def delete_job(self, job_id: str) -> None:
        self._unary("DeleteJob", ghm_pb2.DeleteJobRequest(job_id=job_id), job_id)
        with self._lock:
            self._jobs.pop(job_id, None)

    def update_job(
        self,
        job_id: str,
        *,
        world_size: int = 0,
        from_step: int = 0,
        step_timeout: Optional[Seconds] = None,
        allow_partial_steps: Optional[bool] = None,
    ) -> ghm_pb2.Job:
        request = ghm_pb2.UpdateJobRequest(
            job_id=job_id, world_size=world_size, from_step=from_step
        )
        duration = _duration(step_timeout, "step_timeout")
        if duration is not None:
            request.step_timeout.CopyFrom(duration)
        if allow_partial_steps is not None:
            request.allow_partial_steps = allow_partial_steps
        job = self._unary("UpdateJob", request, job_id)
        with self._lock:
            memory = self._jobs.get(job_id)
            if memory is not None:
                # A reseed must name the spec the job has now (ReseedJob refuses another).
                memory.spec = job.spec
        return job

    def restore_job(self, job_id: str, state: StateLike) -> ghm_pb2.Job:
        """Puts a job back to a state GetJob returned (a Job, a JobState or a mapping).

        The job's generation advances, and this client's memory of it becomes the restored
        state. Other processes that stepped the job before must learn the new lineage too
        (``resync_job``, after the restore), or their next step would put the job back where
        they saw it.
        """
        job = self._unary(
            "RestoreJob", ghm_pb2.RestoreJobRequest(job_id=job_id, state=_state(state)), job_id
        )
        self._relearn(job)
        return job

    def resync_job(self, job_id: str) -> ghm_pb2.Job:
        """Takes the job's lineage from the server (GetJob) instead of this client's memory, for
        a process that did not restore the job itself after another one did (or the next
        fenced step would see the restored copy as stale and put the job back)."""
        job = self.get_job(job_id)
        self._relearn(job)
        return job

    # -- steps ---------------------------------------------------------------------------------

    def _attempt(
        self, request: ghm_pb2.HarmonizeRequest, wait: Optional[float], started: float
    ) -> ghm_pb2.HarmonizeResponse:
        left = self.harmonize_timeout - (time.monotonic() - started)
        if left <= 0:
            raise GhmdError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within harmonize_timeout = {self.harmonize_timeout}s",
                "Harmonize",
            )
        rehome = wait is not None and wait < left
        try:
            return self._call_once(
                "Harmonize", request, wait if rehome else left, request.job_id
            )
        except GhmdError as error:
            if rehome and error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _StillWaiting() from None
            raise

    def _reconnect(self) -> None:
        # The channel reconnects by itself (with the short backoff set above); a proxy in front
        # keeps its connection and picks another replica.
        pass

    @property
    def _client(self) -> "Client":
        return self

    def stream(self) -> "HarmonizeSession":
        """A session that keeps one HarmonizeStream open, for a training loop."""
        return HarmonizeSession(self)


_CLOSE = object()
_END = object()


def _end_stream(requests: queue.SimpleQueue, responses: Any) -> None:
    requests.put(_CLOSE)
    responses.cancel()


class HarmonizeSession(_Steps):
    """One HarmonizeStream kept open across many steps: one request, then its response.

    A step costs one message each way on an open HTTP/2 stream instead of a new call. Not
    thread-safe: one session per training loop. The stream has no deadline of its own: on a
    step-synchronous job the job's step timeout bounds each wait. A stream carries one job's
    steps (its ``x-ghmd-job`` header routes it); a step of another job opens a new stream. The
    server ends a stream at the first rejected request; the session then raises that request's
    GhmdError and opens a new stream for the next one. A stream that breaks (UNAVAILABLE, or
    INTERNAL / CANCELLED / UNKNOWN from a proxy), and a refusal for a missing or stale copy, are
    healed as the Client heals a unary step, from the memory the session shares with its Client.
    A proxy routes a stream once, when it opens: a step-synchronous step still unanswered after
    the client's ``step_rehome_after`` seconds is sent again on a fresh stream (doubling up to
    ``step_rehome_max``), so that a stream left on a replica the job no longer hashes to does
    not hold the step until its timeout.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._requests: Optional[queue.SimpleQueue] = None
        self._answers: Optional[queue.SimpleQueue] = None
        self._responses: Any = None
        self._closer: Optional[weakref.finalize] = None
        self._job_id: Optional[str] = None

    def _open(self, job_id: str) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        answers: queue.SimpleQueue = queue.SimpleQueue()

        def outgoing() -> Iterator[ghm_pb2.HarmonizeRequest]:
            while True:
                item = requests.get()
                if item is _CLOSE:
                    return
                yield item

        responses = self._client._stub.HarmonizeStream(
            outgoing(), metadata=self._client._job_metadata(job_id)
        )
        # An open stream is ended when the session is collected or at interpreter exit, whichever
        # comes first: left to grpc's own __del__ at exit, a stream to a killed server once hung
        # the process. The callback holds the stream, not the session, so that it can be freed.
        self._closer = weakref.finalize(self, _end_stream, requests, responses)

        # Read on a thread of its own so that a wait can end (rehoming) without ending the
        # stream's iterator; each stream has its own queue, so a dropped stream's last words
        # (CANCELLED) never reach the next one.
        def incoming() -> None:
            try:
                for response in responses:
                    answers.put(response)
                answers.put(_END)
            except grpc.RpcError as error:
                answers.put(error)

        threading.Thread(target=incoming, name="ghmd-stream", daemon=True).start()
        self._requests = requests
        self._answers = answers
        self._responses = responses
        self._job_id = job_id

    def _drop(self) -> None:
        if self._closer is not None:
            self._closer()
        self._closer = None
        self._requests = None
        self._answers = None
        self._responses = None
        self._job_id = None

    def _attempt(
        self, request: ghm_pb2.HarmonizeRequest, wait: Optional[float], started: float
    ) -> ghm_pb2.HarmonizeResponse:
        if self._requests is not None and self._job_id != request.job_id:
            self._drop()
        if self._requests is None:
            self._open(request.job_id)
        self._requests.put(request)
        try:
            answer = self._answers.get(timeout=wait)
        except queue.Empty:
            raise _StillWaiting() from None
        if isinstance(answer, ghm_pb2.HarmonizeResponse):
            return answer
        self._drop()
        if isinstance(answer, grpc.RpcError):
            raise GhmdError.from_rpc_error(answer, "HarmonizeStream")
        raise GhmdError(
            grpc.StatusCode.UNAVAILABLE, "the server closed the stream", "HarmonizeStream"
        )

    def _reconnect(self) -> None:
        self._drop()

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "HarmonizeSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
