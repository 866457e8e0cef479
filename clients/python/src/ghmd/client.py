"""A typed client for the ghm.v1.Harmonizer service.

Float arrays cross the wire as little-endian float32 packed in ``bytes`` (see the proto), so every
array here is converted with one ``numpy`` call each way (``tobytes`` / ``frombuffer``), never
with a per-element Python loop: a million-element batch costs two memcpys, not a million boxings.
"""

from __future__ import annotations

import datetime
import queue
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc
import numpy as np
from google.protobuf import duration_pb2

from ._proto import ghm_pb2, ghm_pb2_grpc
from .errors import GhmdError

__all__ = ["Client", "Harmonized", "HarmonizeSession", "TLSConfig", "pack_f32", "unpack_f32"]

_T = TypeVar("_T")

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
    #: The job's counters after the step (JobState's steps, elements, next_step), or None from
    #: a server whose responses do not carry them: then only GetJob tells.
    counters: Optional[Tuple[int, int, int]] = None

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
            counters=_counters(response),
        )


_COUNTERS = ("steps", "elements", "next_step")
# The run identity a CreateJob will carry once the server tells runs apart (issue 13, point 1).
_RUN_FIELD = "run_id"


def carries_run_identity() -> bool:
    """Whether this client's contract can send a run identity with CreateJob."""
    return _RUN_FIELD in ghm_pb2.CreateJobRequest.DESCRIPTOR.fields_by_name


def _counters(response: ghm_pb2.HarmonizeResponse) -> Optional[Tuple[int, int, int]]:
    # Read by name so that this client works with the contract before and after the counters
    # joined HarmonizeResponse (a proto3 0 cannot be told from an absent field otherwise).
    fields = response.DESCRIPTOR.fields_by_name
    if not all(name in fields for name in _COUNTERS):
        return None
    return tuple(int(getattr(response, name)) for name in _COUNTERS)


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
    return ghm_pb2.JobState(
        acc_sum=acc_sum.tolist(),
        steps=int(state.get("steps", 0)),
        elements=int(state.get("elements", 0)),
        next_step=int(state.get("next_step", 0)),
    )


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


class _Steps:
    """The three Harmonize requests, written once for the unary client and the stream session.

    Each builds its request here and hands it to ``_send``, the one thing that differs: a unary
    call with retries, or a message on the session's open stream.
    """

    def _send(self, request: ghm_pb2.HarmonizeRequest) -> Harmonized:
        raise NotImplementedError

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


class Client(_Steps):
    """A connection to one ghmd server. Thread-safe; one per process is enough.

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. ``tls`` is None
    (plaintext), True (TLS with the system roots), a :class:`TLSConfig`, or ready
    ``grpc.ChannelCredentials``.

    Every call has a deadline (``timeout`` seconds; ``harmonize_timeout`` for Harmonize, which on a
    step-synchronous job waits for the other ranks, up to the job's step timeout) and is retried
    with exponential backoff and jitter on UNAVAILABLE, up to ``retries`` times. Retrying is safe:
    CreateJob and RestoreJob are idempotent, and so is a step of a step-synchronous job, which the
    server identifies by (job, step, rank) and answers again from its stored table. Two visible
    effects remain: a DeleteJob whose first answer was lost reports NOT_FOUND, and an asynchronous
    job (world_size 0 or 1), where every request is a step of its own, applies a step twice if
    the connection broke after the server applied it but before the answer arrived.
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
        options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.harmonize_timeout = harmonize_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # grpcio's default 4 MiB receive limit is a million weights; the server enforces its own.
        channel_options = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
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

    def _unary(self, method: str, request: Any, timeout: Optional[float] = None) -> Any:
        rpc = getattr(self._stub, method)
        deadline = self.timeout if timeout is None else timeout

        def attempt() -> Any:
            started = time.monotonic()
            try:
                return rpc(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as error:
                failure = GhmdError.from_rpc_error(error, method)
            # A tonic server answers a request whose grpc-timeout passed with CANCELLED, and
            # that can arrive before the client's own DEADLINE_EXCEEDED: report what happened.
            if (
                failure.code == grpc.StatusCode.CANCELLED
                and time.monotonic() - started >= deadline
            ):
                failure = GhmdError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer within {deadline}s (server: {failure.message})",
                    method,
                )
            raise failure

        return self._with_retries(method, attempt)

    # -- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        loss: Union[str, int] = "ghm_c",
        bins: int = 10,
        momentum: float = 0.0,
        mu: float = 0.0,
        *,
        world_size: int = 0,
        step_timeout: Optional[Seconds] = None,
        allow_partial_steps: bool = False,
        run_id: Optional[str] = None,
    ) -> ghm_pb2.Job:
        """Creates a job, or returns the existing one if it has the same spec (idempotent).

        ``run_id`` names the training run that uses the job (one per run, the same on every
        rank: see ``ghmd.torch.run_identity``), for a server that tells runs apart; a contract
        without that field refuses it rather than dropping it.
        """
        spec = ghm_pb2.JobSpec(
            loss=_loss(loss),
            bins=bins,
            momentum=momentum,
            mu=mu,
            world_size=world_size,
            allow_partial_steps=allow_partial_steps,
        )
        duration = _duration(step_timeout, "step_timeout")
        if duration is not None:
            spec.step_timeout.CopyFrom(duration)
        request = ghm_pb2.CreateJobRequest(job_id=job_id, spec=spec)
        if run_id is not None:
            if not carries_run_identity():
                raise ValueError(
                    f"run_id = {run_id!r}: this client's contract (ghm.v1 CreateJobRequest) has "
                    f"no {_RUN_FIELD!r} field yet"
                )
            setattr(request, _RUN_FIELD, run_id)
        return self._unary("CreateJob", request)

    def get_job(self, job_id: str) -> ghm_pb2.Job:
        return self._unary("GetJob", ghm_pb2.GetJobRequest(job_id=job_id))

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
        self._unary("DeleteJob", ghm_pb2.DeleteJobRequest(job_id=job_id))

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
        return self._unary("UpdateJob", request)

    def restore_job(self, job_id: str, state: StateLike) -> ghm_pb2.Job:
        """Puts a job back to a state GetJob returned (a Job, a JobState or a mapping)."""
        return self._unary(
            "RestoreJob", ghm_pb2.RestoreJobRequest(job_id=job_id, state=_state(state))
        )

    # -- steps ---------------------------------------------------------------------------------

    def _send(self, request: ghm_pb2.HarmonizeRequest) -> Harmonized:
        response = self._unary("Harmonize", request, timeout=self.harmonize_timeout)
        return Harmonized.from_proto(response)

    def stream(self) -> "HarmonizeSession":
        """A session that keeps one HarmonizeStream open, for a training loop."""
        return HarmonizeSession(self)


_CLOSE = object()


def _end_stream(requests: queue.SimpleQueue, responses: Any) -> None:
    requests.put(_CLOSE)
    responses.cancel()


class HarmonizeSession(_Steps):
    """One HarmonizeStream kept open across many steps: one request, then its response.

    A step costs one message each way on an open HTTP/2 stream instead of a new call. Not
    thread-safe: one session per training loop. The stream has no deadline of its own: on a
    step-synchronous job the job's step timeout bounds each wait. The server ends a stream at
    the first rejected request; the session then raises that request's GhmdError and opens a
    new stream for the next one. A stream that breaks with UNAVAILABLE is reopened and the
    pending request resent with the client's backoff (see Client on when that is idempotent).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._requests: Optional[queue.SimpleQueue] = None
        self._responses: Any = None
        self._closer: Optional[weakref.finalize] = None

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def outgoing() -> Iterator[ghm_pb2.HarmonizeRequest]:
            while True:
                item = requests.get()
                if item is _CLOSE:
                    return
                yield item

        self._requests = requests
        self._responses = self._client._stub.HarmonizeStream(
            outgoing(), metadata=self._client._metadata
        )
        # An open stream is ended when the session is collected or at interpreter exit, whichever
        # comes first: left to grpc's own __del__ at exit, a stream to a killed server once hung
        # the process. The callback holds the stream, not the session, so that it can be freed.
        self._closer = weakref.finalize(self, _end_stream, requests, self._responses)

    def _drop(self) -> None:
        if self._closer is not None:
            self._closer()
        self._closer = None
        self._requests = None
        self._responses = None

    def _send(self, request: ghm_pb2.HarmonizeRequest) -> Harmonized:
        def once() -> ghm_pb2.HarmonizeResponse:
            if self._requests is None:
                self._open()
            self._requests.put(request)
            try:
                return next(self._responses)
            except grpc.RpcError:
                self._drop()
                raise
            except StopIteration:
                self._drop()
                raise GhmdError(
                    grpc.StatusCode.UNAVAILABLE, "the server closed the stream", "HarmonizeStream"
                ) from None

        return Harmonized.from_proto(self._client._with_retries("HarmonizeStream", once))

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "HarmonizeSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
