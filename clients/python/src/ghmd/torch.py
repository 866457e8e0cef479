"""Drop-in replacements for mmdetection's ``GHMC``, ``GHMR``, ``SeesawLoss`` and ``EQLV2Loss``
whose running statistic lives in ghmd, shared by every rank of a run. GHM's, below; Seesaw's and
EQLv2's at their classes.

The constructors take mmdetection's arguments (``bins``, ``momentum``, ``use_sigmoid``,
``loss_weight``, ``reduction``; ``mu`` for GHMR) plus the job's ``job_id`` and server
``address``, and ``forward`` has mmdetection's signature. With one process they return the same
loss, bit for bit in float32, as mmdetection's classes on the same inputs and state.

By default (``mode="histogram"``) the bin counts are computed on the tensor's own device with
the server's float32 half-open edges, only the M counts and the raw tot travel, and the returned
bin table is applied locally: a batch of millions of anchors costs one small RPC.
``mode="raw"`` sends the gradient norms (4 bytes per element) and receives per-element weights.

Under ``torch.distributed`` the rank and world size W come from the process group, the job is
step-synchronous (every rank gets the table of the global batch), steps are numbered per call,
and the mean loss is multiplied by W: DDP averages gradients over ranks, so the averaged
gradient is that of ``sum(w * L) / tot_global`` over the global batch.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import uuid
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .binning import bin_edges, bin_indices, bin_slots, slot_count, upper_edges
from .client import Client, Harmonized, TLSConfig, method_state_arrays

__all__ = [
    "EQLV2Loss",
    "GHMC",
    "GHMR",
    "MMDET_NAMES",
    "SeesawLoss",
    "bin_edges",
    "bin_indices",
    "expand_onehot_labels",
    "register_mmdet",
    "run_identity",
]

_REDUCTIONS = ("none", "mean", "sum")
_MODES = ("histogram", "raw")
# mmdetection's weight_reduce_loss adds this to avg_factor; kept so the mean is the same bits.
_EPS = torch.finfo(torch.float32).eps
# The job state a checkpoint carries beside mmdetection's own buffers (edges, acc_sum).
_STATE_KEYS = ("steps", "elements", "next_step")
# A checkpoint's run identity, as UTF-8 bytes in a uint8 tensor (state dicts hold tensors), so
# that a run resumed from it is the same run to the server, not a second live one.
_RUN_KEY = "run_id"


_RUN: Optional[str] = None


def _resume_run(run_id: str) -> None:
    """A checkpoint names the run it belongs to: this process resumes that run (every rank
    loads the same checkpoint, so every rank agrees without a collective)."""
    global _RUN
    _RUN = run_id


def _run_without_collective() -> Optional[str]:
    """The run identity where it can be had without the collective: already drawn, or a
    process alone. A call on one rank only (CheckpointHook's state_dict on rank 0) before the
    first step of a distributed run has none (the job is then created without one)."""
    dist = torch.distributed
    alone = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    return _RUN if _RUN is not None or not alone else run_identity()


def run_identity() -> str:
    """This training run's identity: drawn once per process at random by rank 0 and shared over
    the default process group (a collective: every rank must call it, as every rank calls the
    loss), so that all ranks of a run name the same run and two runs never do.

    The losses send it with CreateJob when the contract carries one (``Client.create_job``'s
    ``run_id``), so that a server that tells runs apart can start a fresh run from an empty
    density and refuse a second live run on the same job; a plain Client can do the same.
    """
    global _RUN
    if _RUN is None:
        drawn = uuid.uuid4().hex
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [drawn if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            drawn = shared[0]
        _RUN = drawn
    return _RUN


def expand_onehot_labels(
    labels: torch.Tensor, label_weights: torch.Tensor, label_channels: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer labels to mmdetection's binary targets.

    A label c in [0, C) becomes a one-hot row; any other value (the background index C, or a
    negative one) an all-zero row. Each label weight is repeated across the C columns.
    """
    targets = labels.new_zeros((labels.size(0), label_channels))
    rows = torch.nonzero((labels >= 0) & (labels < label_channels), as_tuple=True)[0]
    targets[rows, labels[rows]] = 1
    weights = label_weights.reshape(-1, 1).expand(label_weights.size(0), label_channels)
    return targets, weights


# What mmengine merges into a loss dict from a base config's loss_cls of another type: the keys of
# mmdetection's FocalLoss (RetinaNet), CrossEntropyLoss and SmoothL1Loss that GHM does not take.
_FOREIGN_KEYS = {"gamma", "alpha", "activated", "use_mask", "class_weight", "avg_non_ignore",
                 "ignore_index", "beta", "eps", "pos_weight"}


def _unknown_arguments_message(name: str, unknown: Dict[str, Any]) -> str:
    listed = ", ".join(f"{key}={value!r}" for key, value in sorted(unknown.items()))
    message = f"{name} got arguments it does not take: {listed}."
    if _FOREIGN_KEYS.intersection(unknown):
        message += (
            " They look like another loss's (FocalLoss has gamma and alpha): mmengine merges a"
            " base config's loss dict into the one that replaces it, so write"
            f" dict(_delete_=True, type='Remote{name}', ...) to replace it instead."
        )
    return message


class _JobMirror:
    """What a loss module knows of its job's state without asking the server.

    ``buffers`` (the job's state by mmdetection's buffer names: GHM's ``acc_sum``, Seesaw's
    ``cum_samples``, EQLv2's ``pos_grad``, ``neg_grad``, ``pos_neg``) and ``counters`` (steps,
    elements, next_step) come together from one answer: a step whose response carries the
    counters, RestoreJob's Job, GetJob's or CreateJob's Job. ``complete`` says the counters are
    those of the state beside them; after a step whose response lacks them (a server before they
    joined the contract) only GetJob can tell. ``next_call`` numbers the module's own calls. A
    module and its deep copies share one mirror (mmengine's EMAHook copies the model every
    iteration and never steps the copy): the copy reports the job's live state, as the original
    does. A pickled copy starts blank and asks the server.
    """

    def __init__(self) -> None:
        self.buffers: Dict[str, np.ndarray] = {}
        self.counters: Optional[Tuple[int, int, int]] = None
        self.next_call: Optional[int] = None
        #: The last step's answer, whichever copy of the module collected it.
        self.last: Optional[Harmonized] = None
        #: A step sent and not yet answered, (step, future): EQLv2's, which travels while the
        #: next forward runs. Here so that a copy's state_dict waits for it too.
        self.in_flight: Optional[Tuple[int, concurrent.futures.Future]] = None

    def __deepcopy__(self, memo: Any) -> "_JobMirror":
        return self

    def __reduce__(self) -> Any:
        return (_JobMirror, ())

    @property
    def complete(self) -> bool:
        return self.counters is not None

    def saw_state(self, state: Any) -> None:
        """A JobState, or the mapping a checkpoint restores (``Client.restore_job``'s form)."""
        if isinstance(state, dict):
            methods = [value for value in state.values() if isinstance(value, dict)]
            if methods:
                self.buffers = {name: np.asarray(values, dtype=np.float32)
                                for name, values in methods[0].items()}
            else:
                self.buffers = {"acc_sum": np.asarray(state["acc_sum"], dtype=np.float32)}
            self.counters = tuple(int(state[name]) for name in _STATE_KEYS)
        else:
            self.buffers = method_state_arrays(state) or {
                "acc_sum": np.array(state.acc_sum, dtype=np.float32)
            }
            self.counters = (state.steps, state.elements, state.next_step)

    def saw_step(self, result: Harmonized) -> None:
        self.buffers = dict(result.method_state) or {"acc_sum": result.acc_sum}
        self.counters = result.counters
        self.last = result


class _RemoteJob(nn.Module):
    """What every ghmd loss shares: the job (created on first use), the step numbering, the
    torch.distributed world and rank, the run identity, the transport, and the checkpoint
    (mmdetection's buffers plus the job's counters, restored with RestoreJob on load).

    A subclass names its job (``_job_spec``) and its state buffers (``_state_buffers``,
    registered under mmdetection's names) and says how a checkpoint's buffers become a job state
    (``_restore_payload``)."""

    def __init__(
        self,
        *,
        job_id: str,
        address: Optional[str] = None,
        client: Optional[Client] = None,
        token: Optional[str] = None,
        tls: Union[None, bool, TLSConfig] = None,
        stream: bool = True,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        step_timeout: Union[float, datetime.timedelta, None] = None,
        allow_partial_steps: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if unknown:
            raise TypeError(_unknown_arguments_message(name, unknown))
        if not job_id:
            raise ValueError(f"{name}: job_id is required: the ghmd job this loss weighs with")
        if address is None and client is None:
            address = "127.0.0.1:50051"
        self.job_id = job_id
        self.address = address if address is not None else client.target
        self.stream = stream
        self.world_size = world_size
        self.rank = rank
        self.step_timeout = step_timeout
        self.allow_partial_steps = allow_partial_steps
        self._token = token
        self._tls = tls
        #: The last step's answer (GHM: bin table, tot, EMA state; Seesaw, EQLv2: the job's
        #: state after the step), for logging and inspection.
        self.last_result: Optional[Harmonized] = None
        self._client = client
        self._session: Any = None
        self._job: Any = None
        self._mirror = _JobMirror()
        self._pending_restore: Optional[Dict[str, Any]] = None

    # -- what a method says about itself -------------------------------------------------------

    def _job_spec(self) -> Dict[str, Any]:
        """Client.create_job's arguments that describe the job's method."""
        raise NotImplementedError

    def _state_buffers(self) -> Tuple[str, ...]:
        """The registered buffers that mirror the job's state, by mmdetection's names."""
        raise NotImplementedError

    def _restore_payload(self, buffers: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """Client.restore_job's state (without the counters) from a checkpoint's buffers."""
        raise NotImplementedError

    def _job_created(self, job: Any) -> None:
        """Called once the job exists (created, or found with the same spec)."""

    def _collect(self) -> None:
        """Waits for a step still in flight (EQLv2 sends its contribution without waiting)."""

    # A gRPC channel cannot be pickled or deep-copied (mmdetection deep-copies models for EMA);
    # a copy reconnects on first use.
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _session=None, _job=None)
        return state

    def close(self) -> None:
        """Closes the stream and the connection; the next call reconnects."""
        try:
            self._collect()
        finally:
            if self._session is not None:
                self._session.close()
            if self._client is not None:
                self._client.close()
            self._session = None
            self._client = None

    # -- connection, job, steps ----------------------------------------------------------------

    def _world(self) -> Tuple[int, int]:
        if self.world_size is not None:
            return self.world_size, self.rank or 0
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _connection(self) -> Client:
        if self._client is None:
            self._client = Client(self.address, token=self._token, tls=self._tls)
        return self._client

    def _transport(self) -> Any:
        if not self.stream:
            return self._connection()
        if self._session is None:
            self._session = self._connection().stream()
        return self._session

    def _run_id(self) -> Optional[str]:
        return run_identity() if self._job is None else None

    def _ensure_job(self, run_id: Optional[str] = None) -> Any:
        if self._job is None:
            if run_id is None:
                run_id = _run_without_collective()
            world_size, _ = self._world()
            self._job = self._connection().create_job(
                self.job_id,
                world_size=world_size if world_size > 1 else 0,
                step_timeout=self.step_timeout,
                allow_partial_steps=self.allow_partial_steps,
                run_id=run_id,
                **self._job_spec(),
            )
            self._job_created(self._job)
        return self._job

    def _next_step(self) -> int:
        # Every rank gets here at the same call, where run_identity's collective is safe; a
        # state_dict on rank 0 alone (CheckpointHook) may create the job too, without it.
        job = self._ensure_job(self._run_id())
        if self._pending_restore is not None:
            # Every rank loaded the same checkpoint; one restore, then a barrier so that no rank
            # sends its step before the job is back (a restore aborts pending steps).
            state, self._pending_restore = self._pending_restore, None
            if self._world()[1] == 0:
                self._connection().restore_job(self.job_id, state)
            torch.distributed.barrier()
            if self._world()[1] != 0:
                # The restore advanced the job's generation; a rank that stepped before must
                # take the new lineage, or its next fenced step would put the old state back.
                self._connection().resync_job(self.job_id)
        if self._mirror.next_call is None:
            self._mirror.next_call = self._first_call(job.state.steps, job.state.next_step)
        return self._mirror.next_call

    def _first_call(self, steps: int, next_step: int) -> int:
        # A step-synchronous job numbers its steps; an asynchronous one does not (next_step 0),
        # and this module numbers its calls from the steps applied so far.
        return next_step if self._ensure_job().spec.world_size > 1 else steps

    def _mirror_to_buffers(self) -> None:
        """Copies the job's state, as last seen, into the module's buffers (in place: a buffer
        keeps its device and the tensors others hold)."""
        for name in self._state_buffers():
            values = self._mirror.buffers.get(name)
            if values is not None and values.size:
                buffer = getattr(self, name)
                buffer.copy_(torch.from_numpy(values).reshape(buffer.shape))

    def _reduction(self, reduction_override: Optional[str]) -> str:
        if reduction_override not in (None,) + _REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: reduction_override = {reduction_override!r}: "
                f"use None or one of {_REDUCTIONS}"
            )
        return reduction_override or self.reduction

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """mmdetection's buffers plus the job's counters, from the mirror: no RPC once the
        module has seen its job's full state (a restore, or a step whose answer carries the
        counters), GetJob otherwise. The state saved is the job's, also for an EMA copy."""
        self._collect()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        mirror = self._mirror
        if not mirror.complete:
            self._ensure_job()
            mirror.saw_state(self._connection().get_job(self.job_id).state)
        steps, elements, job_next_step = mirror.counters
        for name in self._state_buffers():
            # A copy: averaging hooks (EMAHook) write into the tensors state_dict returns.
            destination[prefix + name] = torch.tensor(
                mirror.buffers[name], device=getattr(self, name).device
            ).reshape(getattr(self, name).shape)
        next_call = mirror.next_call
        if next_call is None:
            next_call = self._first_call(steps, job_next_step)
        destination[prefix + "steps"] = torch.tensor(steps, dtype=torch.int64)
        destination[prefix + "elements"] = torch.tensor(elements, dtype=torch.int64)
        destination[prefix + "next_step"] = torch.tensor(next_call, dtype=torch.int64)
        run_id = self._job.run_id if self._job is not None else ""
        if run_id:
            destination[prefix + _RUN_KEY] = torch.tensor(list(run_id.encode()), dtype=torch.uint8)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: Any,
        unexpected_keys: Any,
        error_msgs: Any,
    ) -> None:
        # steps, elements and next_step are optional, so that a checkpoint of mmdetection's own
        # class (its buffers only) resumes here too, from step 0.
        self._collect()
        ours = {prefix + name for name in (*_STATE_KEYS, _RUN_KEY)}
        inner = {key: value for key, value in state_dict.items() if key not in ours}
        errors_before = len(error_msgs)
        missing_before = len(missing_keys)
        super()._load_from_state_dict(
            inner, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) > errors_before or len(missing_keys) > missing_before:
            return  # load_state_dict raises (strict) or the checkpoint has no state to restore

        def counter(name: str) -> Optional[int]:
            value = state_dict.get(prefix + name)
            return None if value is None else int(value)

        run = state_dict.get(prefix + _RUN_KEY)
        if run is not None and self._job is None:
            _resume_run(bytes(run.tolist()).decode())
        # Copies: creating the job below may write the job's current state into the buffers.
        buffers = {
            name: getattr(self, name).detach().float().cpu().numpy().reshape(-1).copy()
            for name in self._state_buffers()
        }
        state = self._restore_payload(buffers)
        state.update(
            steps=counter("steps") or 0,
            elements=counter("elements"),
            next_step=counter("next_step") or 0,
        )
        if state["elements"] is None:
            state["elements"] = self._elements_of(buffers)
        self._mirror.next_call = state["next_step"]
        world_size, _ = self._world()
        if world_size > 1:
            self._pending_restore = state
            self._mirror.saw_state(state)  # what rank 0 restores before the first step
        else:
            # An asynchronous job has no next step of its own; the counter above only numbers
            # (and echoes) this module's calls. Every rank loads the checkpoint: run_identity's
            # collective is safe here too.
            job = self._ensure_job(self._run_id())
            if job.spec.world_size <= 1:
                state["next_step"] = 0
            self._mirror.saw_state(self._connection().restore_job(self.job_id, state).state)
            self._mirror_to_buffers()

    def _elements_of(self, buffers: Dict[str, np.ndarray]) -> int:
        """The job's element counter for a checkpoint that does not carry one (mmdetection's)."""
        return 0


class _RemoteGHM(_RemoteJob):
    """What GHMC and GHMR share: the bins, the binning, the exchange of a step."""

    _loss = ""

    def __init__(
        self,
        *,
        bins: int,
        momentum: float,
        mu: float,
        loss_weight: float,
        reduction: str,
        mode: str = "histogram",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        name = type(self).__name__
        if mode not in _MODES:
            raise ValueError(f"{name}: mode = {mode!r}: use 'histogram' or 'raw'")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: reduction = {reduction!r}: use one of {_REDUCTIONS}")
        self.bins = bins
        self.momentum = momentum
        self.mu = mu
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.mode = mode
        self.register_buffer("edges", bin_edges(self._loss, bins))
        if momentum > 0:
            # Mirrors the job's density after every step, as mmdetection's buffer of this name.
            self.register_buffer("acc_sum", torch.zeros(bins))

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, "
            f"job_id={self.job_id!r}, address={self.address!r}, mode={self.mode!r}"
        )

    def _job_spec(self) -> Dict[str, Any]:
        return dict(loss=self._loss, bins=self.bins, momentum=self.momentum, mu=self.mu)

    def _state_buffers(self) -> Tuple[str, ...]:
        return ("acc_sum",) if self.momentum > 0 else ()

    def _restore_payload(self, buffers: Dict[str, np.ndarray]) -> Dict[str, Any]:
        return {"acc_sum": buffers.get("acc_sum", np.zeros(self.bins, dtype=np.float32))}

    def _weigh(self, g: torch.Tensor, label_weight: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """The GHM weight of every element of g (float32, >= 0), and the step's tot (global,
        clamped to 1); the elements with ``label_weight`` <= 0 weigh 0."""
        bins = self.bins
        upper = upper_edges(self.edges.to(g.device))
        slots = bin_slots(g, upper, label_weight <= 0)
        tally = torch.bincount(slots, minlength=slot_count(bins))
        # The sum is NaN exactly when some g is, wherever bin_slots put it; GHM-R's tot is the
        # label weights' float32 sum, as in mmdetection.
        sums = [g.sum()] + ([label_weight.sum()] if self._loss == "ghm_r" else [])
        summary = torch.cat([tally.double(), torch.stack(sums).double()]).tolist()
        if summary[bins] or summary[-len(sums)] != summary[-len(sums)]:
            self._refuse_unbinnable(g, label_weight, upper[-1])  # the one device-to-host copy
        counts = np.array(summary[:bins], dtype=np.int64)
        tot = float(counts.sum()) if self._loss == "ghm_c" else summary[-1]

        step = self._next_step()
        _, rank = self._world()
        transport = self._transport()
        if self.mode == "histogram":
            result = transport.harmonize_histogram(self.job_id, counts, tot, step=step, rank=rank)
            # Slots past the bins (valid but unbinnable: refused above; invalid) weigh 0.
            table = torch.zeros(slot_count(bins), dtype=torch.float32)
            table[:bins] = torch.from_numpy(result.bin_weights)
            weights = table.to(g.device).index_select(0, slots).reshape(g.shape)
        else:
            # An ignored element weighs 0 whatever its g, as in the reference; the server
            # rejects any non-finite norm, so an ignored one is sent as 0.
            valid = label_weight > 0
            norms = torch.where(valid, g, 0.0).reshape(-1).cpu().numpy()
            label_weights = label_weight.reshape(-1).cpu().numpy()
            result = transport.harmonize(
                self.job_id, norms, label_weights=label_weights, step=step, rank=rank
            )
            weights = torch.from_numpy(result.weights).to(g.device).reshape(g.shape)
        self._mirror.next_call = step + 1
        self._mirror.saw_step(result)
        self.last_result = result
        if self.momentum > 0 and result.acc_sum.size:
            self.acc_sum.copy_(torch.from_numpy(result.acc_sum))
        return weights, result.tot

    def _refuse_unbinnable(
        self, g: torch.Tensor, label_weight: torch.Tensor, last_edge: torch.Tensor
    ) -> None:
        """Raises for the first valid element whose g lies in no bin (NaN or past the last
        edge), which the server would reject; NaNs in ignored elements pass, as in mmdetection."""
        unbinnable = (label_weight > 0) & ~((g >= 0) & (g < last_edge))
        if unbinnable.any():
            bad = torch.nonzero(unbinnable.reshape(-1))[0].item()
            raise ValueError(
                f"{type(self).__name__}: element {bad} (flattened) is valid but its gradient "
                f"norm {g.reshape(-1)[bad].item()} lies in no bin [0, {last_edge.item()}): "
                "pred or target is not finite"
            )

    def _reduce(
        self, loss: torch.Tensor, weights: torch.Tensor, reduction: str, tot: float
    ) -> torch.Tensor:
        # In place: the element losses are this module's own tensor, and neither BCE's nor
        # GHM-R's backward reads it.
        loss = loss.mul_(weights)
        if reduction == "mean":
            loss = loss.sum() / (tot + _EPS)
            world_size, _ = self._world()
            if world_size > 1:
                loss = loss * world_size
        elif reduction == "sum":
            # mmdetection raises here too: the loss is always normalised by tot.
            raise ValueError(
                f"{type(self).__name__}: reduction 'sum' cannot be used: GHM losses average by "
                "tot ('mean') or return the weighted loss per element ('none')"
            )
        return loss * self.loss_weight


class GHMC(_RemoteGHM):
    """GHM-C, mmdetection's ``GHMC`` with its density in a ghmd job.

    Args:
        bins, momentum, use_sigmoid, loss_weight, reduction: as mmdetection's GHMC.
        job_id: the ghmd job; every rank of a run uses the same one, and a resumed run too.
        address: the ghmd server, ``host:port``. Ignored when ``client`` is given.
        client: a :class:`ghmd.Client` to share instead of opening a connection.
        token, tls: passed to the Client this loss opens.
        mode: ``"histogram"`` (default: send M bin counts) or ``"raw"`` (send every norm).
        stream: keep one HarmonizeStream open (default) instead of one call per step.
        world_size, rank: override what torch.distributed says (world_size=1: an
            asynchronous job of this process alone).
        step_timeout, allow_partial_steps: the step-synchronous job's settings.

    Any other keyword is refused with a TypeError that names it (and, for FocalLoss's
    ``gamma``/``alpha``, says to replace the base config's dict with ``_delete_=True``).
    """

    _loss = "ghm_c"

    def __init__(
        self,
        bins: int = 10,
        momentum: float = 0,
        use_sigmoid: bool = True,
        loss_weight: float = 1.0,
        reduction: str = "mean",
        **options: Any,
    ) -> None:
        if not use_sigmoid:
            raise NotImplementedError("GHMC supports only use_sigmoid=True, as mmdetection's")
        super().__init__(
            bins=bins,
            momentum=momentum,
            mu=0.0,
            loss_weight=loss_weight,
            reduction=reduction,
            **options,
        )
        self.use_sigmoid = use_sigmoid

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        label_weight: torch.Tensor,
        reduction_override: Optional[str] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The GHM-C loss of logits ``pred`` [N, C] against binary ``target`` [N, C] (or
        integer labels [N], expanded to one-hot), ``label_weight`` > 0 marking valid entries.

        Whatever pred's dtype (float16, bfloat16 under autocast), g, the weights and the loss
        are float32, so that a weight tot / acc_sum above 65504 cannot overflow."""
        reduction = self._reduction(reduction_override)
        if pred.dim() != target.dim():
            target, label_weight = expand_onehot_labels(target, label_weight, pred.size(-1))
        with _float32(pred):
            pred, target, label_weight = pred.float(), target.float(), label_weight.float()
            # mmdetection's abs(sigmoid(pred) - target), in place: the same bits, one buffer.
            g = pred.detach().sigmoid().sub_(target).abs_()
            weights, tot = self._weigh(g, label_weight)
            loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
            return self._reduce(loss, weights, reduction, tot)


class GHMR(_RemoteGHM):
    """GHM-R, mmdetection's ``GHMR`` (Authentic Smooth L1) with its density in a ghmd job.

    Args:
        mu, bins, momentum, loss_weight, reduction: as mmdetection's GHMR.
        The others: as :class:`GHMC`.
    """

    _loss = "ghm_r"

    def __init__(
        self,
        mu: float = 0.02,
        bins: int = 10,
        momentum: float = 0,
        loss_weight: float = 1.0,
        reduction: str = "mean",
        **options: Any,
    ) -> None:
        super().__init__(
            bins=bins,
            momentum=momentum,
            mu=mu,
            loss_weight=loss_weight,
            reduction=reduction,
            **options,
        )

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        label_weight: torch.Tensor,
        avg_factor: Optional[float] = None,
        reduction_override: Optional[str] = None,
    ) -> torch.Tensor:
        """The GHM-R loss of box deltas ``pred`` against ``target`` (same shape), in float32
        whatever their dtype (see GHMC.forward).

        ``avg_factor`` is accepted and ignored, as mmdetection's GHMR does: the loss is always
        averaged by tot.
        """
        reduction = self._reduction(reduction_override)
        mu = self.mu
        with _float32(pred):
            diff = pred.float() - target.float()
            loss = torch.sqrt(diff * diff + mu * mu) - mu
            # g is computed as the reference does, so it lands in the same bins; the server's own
            # derivation from residuals uses a correctly rounded sqrt and may differ by an ulp.
            g = torch.abs(diff / torch.sqrt(mu * mu + diff * diff)).detach()
            weights, tot = self._weigh(g, label_weight.float())
            return self._reduce(loss, weights, reduction, tot)


class _RemoteMethod(_RemoteJob):
    """A loss whose running statistic is a method's state on the server (Seesaw, EQLv2): the
    module's buffers, under mmdetection's names, mirror the job's state after every answer; the
    loss is computed here, with torch, from them."""

    _method = ""

    def __init__(
        self, *, num_classes: int, reduction: str, loss_weight: float, **options: Any
    ) -> None:
        super().__init__(**options)
        name = type(self).__name__
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"{name}: num_classes = {num_classes!r}: must be an int >= 1")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: reduction = {reduction!r}: use one of {_REDUCTIONS}")
        self.num_classes = num_classes
        self.reduction = reduction
        self.loss_weight = loss_weight

    def _method_spec(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _job_spec(self) -> Dict[str, Any]:
        return {self._method: self._method_spec()}

    def _restore_payload(self, buffers: Dict[str, np.ndarray]) -> Dict[str, Any]:
        return {self._method: buffers}

    def _job_created(self, job: Any) -> None:
        # The job may hold a state already (the run resumed without a checkpoint, or another
        # rank created it): the buffers start from it, unless a checkpoint was loaded first.
        if not self._mirror.complete:
            self._mirror.saw_state(job.state)
            self._mirror_to_buffers()

    def _send(self, step: int, contribution: Dict[str, Any]) -> Harmonized:
        _, rank = self._world()
        return self._transport().harmonize_method(
            self.job_id, self._method, contribution, step=step, rank=rank
        )

    def _saw(self, result: Harmonized) -> None:
        self._mirror.saw_step(result)
        self.last_result = result
        self._mirror_to_buffers()

    def extra_repr(self) -> str:
        spec = ", ".join(f"{key}={value!r}" for key, value in self._method_spec().items())
        return f"{spec}, job_id={self.job_id!r}, address={self.address!r}"


def _weight_reduce(
    loss: torch.Tensor, weight: Optional[torch.Tensor], reduction: str,
    avg_factor: Optional[float],
) -> torch.Tensor:
    """mmdetection's weight_reduce_loss: element weights, then the mean over avg_factor (plus
    float32's eps, against a zero factor) or the plain reduction."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is not None:
        if reduction == "mean":
            return loss.sum() / (avg_factor + _EPS)
        if reduction == "sum":
            raise ValueError('avg_factor can not be used with reduction="sum"')
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmdetection's top-1 accuracy in percent, a 1-element tensor (0 for no sample)."""
    if scores.size(0) == 0:
        return scores.new_tensor(0.0)
    best = scores.topk(1, dim=1)[1].t()
    correct = best.eq(labels.view(1, -1).expand_as(best))
    return correct[:1].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / scores.size(0))


class SeesawLoss(_RemoteMethod):
    """Seesaw loss (Wang et al., CVPR 2021), mmdetection's ``SeesawLoss`` with its
    ``cum_samples`` in a ghmd job: every rank of a run weighs with the samples per class that
    all ranks have seen, not its own.

    Args:
        use_sigmoid, p, q, num_classes, eps, reduction, loss_weight, return_dict: as
            mmdetection's SeesawLoss (``use_sigmoid`` must be False, as there).
        job_id, address, client, token, tls, stream, world_size, rank, step_timeout,
            allow_partial_steps: as :class:`GHMC`.

    A step counts the batch's labels on the tensor's device (every sample, whatever its
    weight, as the reference), sends the C + 1 counts, and weighs the loss with the job's
    ``cum_samples`` after the step, which the answer carries and the buffer of that name
    mirrors. Seesaw needs the step's counts in its own loss, so the step waits for the answer.
    """

    _method = "seesaw"

    def __init__(
        self,
        use_sigmoid: bool = False,
        p: float = 0.8,
        q: float = 2.0,
        num_classes: int = 1203,
        eps: float = 1e-2,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        return_dict: bool = True,
        **options: Any,
    ) -> None:
        if use_sigmoid:
            raise NotImplementedError(
                "SeesawLoss supports only use_sigmoid=False, as mmdetection's"
            )
        super().__init__(num_classes=num_classes, reduction=reduction, loss_weight=loss_weight,
                         **options)
        self.use_sigmoid = False
        self.p = p
        self.q = q
        self.eps = eps
        self.return_dict = return_dict
        # The job's samples per label after the last step, index C the background.
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float))
        # What mmdetection's heads look for on their loss: the classifier has C + 2 outputs,
        # and the head takes its scores and accuracy from this loss.
        self.custom_cls_channels = True
        self.custom_activation = True
        self.custom_accuracy = True

    def _method_spec(self) -> Dict[str, Any]:
        return dict(num_classes=self.num_classes, p=self.p, q=self.q, eps=self.eps)

    def _state_buffers(self) -> Tuple[str, ...]:
        return ("cum_samples",)

    def _elements_of(self, buffers: Dict[str, np.ndarray]) -> int:
        # A Seesaw job's elements are the samples it counted: what cum_samples sums to.
        return int(buffers["cum_samples"].astype(np.float64).sum())

    # -- what mmdetection's heads call -----------------------------------------------------------

    def _split(self, cls_score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The C class scores and the 2 objectness scores (object, background)."""
        if cls_score.size(-1) != self.num_classes + 2:
            raise ValueError(
                f"SeesawLoss: cls_score has {cls_score.size(-1)} columns: with num_classes = "
                f"{self.num_classes} it needs {self.num_classes + 2} (C classes, then object "
                "and background)"
            )
        return cls_score[..., :-2], cls_score[..., -2:]

    def get_cls_channels(self, num_classes: int) -> int:
        if num_classes != self.num_classes:
            raise ValueError(f"SeesawLoss has num_classes = {self.num_classes}, the head "
                             f"{num_classes}")
        return num_classes + 2

    def get_activation(self, cls_score: torch.Tensor) -> torch.Tensor:
        """C + 1 scores: each class's softmax times the object score, then the background's."""
        classes, objectness = self._split(cls_score)
        class_scores = F.softmax(classes, dim=-1)
        objectness_scores = F.softmax(objectness, dim=-1)
        return torch.cat(
            [class_scores * objectness_scores[..., [0]], objectness_scores[..., [1]]], dim=-1
        )

    def get_accuracy(
        self, cls_score: torch.Tensor, labels: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Top-1 accuracy of the objectness (all samples) and of the classes (foreground)."""
        classes, objectness = self._split(cls_score)
        foreground = labels < self.num_classes
        return {
            "acc_objectness": _topk_accuracy(objectness, (labels == self.num_classes).long()),
            "acc_classes": _topk_accuracy(classes[foreground], labels[foreground]),
        }

    # -- the loss ----------------------------------------------------------------------------------

    def _label_counts(self, labels: torch.Tensor) -> np.ndarray:
        """Samples per label 0..C, counted on the labels' device, with one copy to the host.
        A label outside 0..C is refused, naming the first (the count shifts labels by one so
        that the negative ones land in slot 0 and those above C past the end)."""
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"SeesawLoss: labels must be integers, got {labels.dtype}")
        classes = self.num_classes
        flat = labels.reshape(-1).long()
        slots = torch.bincount((flat + 1).clamp_(min=0), minlength=classes + 2).cpu().numpy()
        if slots[0] or slots.size > classes + 2:
            bad = torch.nonzero((flat < 0) | (flat > classes))[0].item()
            raise ValueError(
                f"SeesawLoss: labels[{bad}] = {flat[bad].item()}: labels are 0 to {classes} "
                f"({classes} is the background)"
            )
        return slots[1:]

    def _seesaw_cross_entropy(
        self, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
        cum_samples: torch.Tensor, reduction: str, avg_factor: Optional[float],
    ) -> torch.Tensor:
        """Cross-entropy of the foreground samples with each negative logit shifted by the log
        of its Seesaw factor: mitigation (a rarer class's negatives count less, by the ratio of
        samples to the p) times compensation (a negative scored above the true class counts
        more, by the ratio of scores to the q). The reference's operations in its order, on
        its shapes: the bits depend on it."""
        classes = self.num_classes
        onehot = F.one_hot(labels, classes)
        factor = scores.new_ones(onehot.size())
        if self.p > 0:
            ratio = cum_samples[None, :].clamp(min=1) / cum_samples[:, None].clamp(min=1)
            below = (ratio < 1.0).float()
            mitigation = ratio.pow(self.p) * below + (1 - below)
            factor = factor * mitigation[labels, :]
        if self.q > 0:
            probabilities = F.softmax(scores.detach(), dim=1)
            own = probabilities[torch.arange(0, len(probabilities)).to(scores.device), labels]
            ratio = probabilities / own[:, None].clamp(min=self.eps)
            above = (ratio > 1.0).float()
            factor = factor * (ratio.pow(self.q) * above + (1 - above))
        shifted = scores + (factor.log() * (1 - onehot))
        loss = F.cross_entropy(shifted, labels, weight=None, reduction="none")
        return _weight_reduce(loss, weights, reduction, avg_factor)

    def forward(
        self,
        cls_score: torch.Tensor,
        labels: torch.Tensor,
        label_weights: Optional[torch.Tensor] = None,
        avg_factor: Optional[float] = None,
        reduction_override: Optional[str] = None,
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """The Seesaw loss of ``cls_score`` [N, C + 2] against ``labels`` [N] (0 to C, C the
        background), as mmdetection's: a dict of ``loss_cls_objectness`` and
        ``loss_cls_classes`` (or their sum, ``return_dict=False``)."""
        reduction = self._reduction(reduction_override)
        classes_score, objectness_score = self._split(cls_score)
        labels = labels.long()
        counts = self._label_counts(labels)
        step = self._next_step()
        result = self._send(step, {"label_counts": counts})
        self._mirror.next_call = step + 1
        self._saw(result)

        foreground = labels < self.num_classes
        objectness_labels = (labels == self.num_classes).long()
        if label_weights is not None:
            weights = label_weights.float()
        else:
            weights = labels.new_ones(labels.size(), dtype=torch.float)
        if counts[: self.num_classes].sum() > 0:
            loss_classes = self.loss_weight * self._seesaw_cross_entropy(
                classes_score[foreground], labels[foreground], weights[foreground],
                self.cum_samples[: self.num_classes], reduction, avg_factor,
            )
        else:
            loss_classes = classes_score[foreground].sum()
        loss_objectness = self.loss_weight * _weight_reduce(
            F.cross_entropy(objectness_score, objectness_labels, reduction="none"),
            weights, reduction, avg_factor,
        )
        if self.return_dict:
            return {"loss_cls_objectness": loss_objectness, "loss_cls_classes": loss_classes}
        return loss_classes + loss_objectness


class EQLV2Loss(_RemoteMethod):
    """Equalization loss v2 (Tan et al., CVPR 2021), mmdetection's ``EQLV2Loss`` with its
    ``pos_grad``, ``neg_grad`` and ``pos_neg`` in a ghmd job: every rank weighs with the
    gradients all ranks have accumulated, in every case (``use_distributed`` is accepted and
    changes nothing: the statistic is always shared, and one process needs no process group).

    Args:
        use_sigmoid, reduction, class_weight, loss_weight, num_classes, use_distributed, mu,
            alpha, gamma, vis_grad, test_with_obj: as mmdetection's EQLV2Loss.
        overlap: send a step's gradients without waiting for the answer (default), which the
            next step's weights need; False waits in the forward, as a local loss would.
        The others: as :class:`GHMC`.

    The weights of step t come from ``pos_neg`` before step t, and step t's gradients exist
    only after its loss: so the forward computes the loss from the buffers, hands the step's
    contribution to a background thread and returns; the answer is collected at the next
    forward (or ``collect()``, ``state_dict()``, ``close()``), where a failed step raises.
    """

    _method = "eqlv2"

    def __init__(
        self,
        use_sigmoid: bool = True,
        reduction: str = "mean",
        class_weight: Optional[torch.Tensor] = None,
        loss_weight: float = 1.0,
        num_classes: int = 1203,
        use_distributed: bool = False,
        mu: float = 0.8,
        alpha: float = 4.0,
        gamma: float = 12,
        vis_grad: bool = False,
        test_with_obj: bool = True,
        overlap: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, reduction=reduction, loss_weight=loss_weight,
                         **options)
        self.use_sigmoid = True
        self.class_weight = class_weight
        self.use_distributed = use_distributed
        self.mu = mu
        self.alpha = alpha
        self.gamma = gamma
        self.vis_grad = vis_grad
        self.test_with_obj = test_with_obj
        self.overlap = overlap
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        # 100 before any step, the reference's start: every weight is then 1.
        self.register_buffer("pos_neg", torch.ones(num_classes) * 100)
        self._sender: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def _method_spec(self) -> Dict[str, Any]:
        return dict(num_classes=self.num_classes, gamma=self.gamma, mu=self.mu, alpha=self.alpha)

    def _state_buffers(self) -> Tuple[str, ...]:
        return ("pos_grad", "neg_grad", "pos_neg")

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update(_sender=None)
        return state

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._sender is not None:
                self._sender.shutdown(wait=True)
            self._sender = None

    def get_channel_num(self, num_classes: int) -> int:
        return num_classes + 1

    def get_activation(self, pred: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores; with ``test_with_obj``, each class's times 1 - the last channel's."""
        scores = torch.sigmoid(pred)
        if self.test_with_obj:
            scores[:, :-1] *= 1 - scores[:, -1].view(scores.size(0), 1)
        return scores

    # -- the step in flight ------------------------------------------------------------------------

    def collect(self) -> Optional[Harmonized]:
        """Waits for the step in flight, if any, and takes the job's state from its answer into
        the buffers; raises that step's error. Returns the last answer."""
        self._collect()
        return self.last_result

    def _collect(self) -> None:
        # The step in flight is the mirror's, shared with deep copies (EMAHook's): whichever
        # copy collects it, every copy then takes the state from the mirror.
        mirror = self._mirror
        in_flight, mirror.in_flight = mirror.in_flight, None
        if in_flight is not None:
            step, answer = in_flight
            try:
                result = answer.result()
            except BaseException:
                mirror.next_call = step  # the step did not happen: the next call is it again
                raise
            mirror.saw_step(result)
        if mirror.last is not None:
            self.last_result = mirror.last
        self._mirror_to_buffers()

    def _send_in_background(self, step: int, gradients: torch.Tensor) -> None:
        if gradients.is_cuda:
            # Copied while the next kernels run; the sender waits for the copy, not the forward.
            host = torch.empty(gradients.shape, dtype=gradients.dtype, pin_memory=True)
            host.copy_(gradients, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = gradients, None

        def send() -> Harmonized:
            if copied is not None:
                copied.synchronize()
            values = host.numpy()
            return self._send(step, {"pos_grad": values[0], "neg_grad": values[1]})

        if self._sender is None:
            self._sender = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ghmd-eqlv2"
            )
        self._mirror.in_flight = (step, self._sender.submit(send))

    # -- the loss ----------------------------------------------------------------------------------

    def forward(
        self,
        cls_score: torch.Tensor,
        label: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float] = None,
        reduction_override: Optional[str] = None,
    ) -> torch.Tensor:
        """The EQLv2 loss of ``cls_score`` [N, C + 1] against ``label`` [N] (0 to C): the
        weighted binary cross-entropy summed and divided by N. As in mmdetection, ``weight``,
        ``avg_factor`` and ``reduction_override`` are accepted and not used."""
        rows, channels = cls_score.size()
        if channels != self.num_classes + 1:
            raise ValueError(
                f"EQLV2Loss: cls_score has {channels} columns: with num_classes = "
                f"{self.num_classes} it needs {self.num_classes + 1} (the last is objectness)"
            )
        self._collect()
        step = self._next_step()
        target = cls_score.new_zeros(rows, channels)
        target[torch.arange(rows, device=cls_score.device), label] = 1

        # Each class's weights from the job's pos_neg before this step; 1 for objectness.
        negative = torch.cat([
            1 / (1 + torch.exp(-self.gamma * (self.pos_neg - self.mu))), cls_score.new_ones(1)
        ])
        positive = 1 + self.alpha * (1 - negative)
        negative = negative.view(1, -1).expand(rows, channels)
        positive = positive.view(1, -1).expand(rows, channels)
        weights = positive * target + negative * (1 - target)
        loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        loss = torch.sum(loss * weights) / rows

        # This step's contribution: the gradient magnitudes of the positives and the
        # negatives, weighted, per class (objectness left out).
        probability = torch.sigmoid(cls_score.detach())
        gradient = torch.abs(target * (probability - 1) + (1 - target) * probability)
        pos_grad = torch.sum(gradient * target * weights, dim=0)[:-1]
        neg_grad = torch.sum(gradient * (1 - target) * weights, dim=0)[:-1]
        self._mirror.next_call = step + 1
        self._send_in_background(step, torch.stack([pos_grad, neg_grad]))
        if not self.overlap:
            self._collect()
        return self.loss_weight * loss


def _float32(like: torch.Tensor) -> Any:
    """Autocast off for the loss's own arithmetic: every tensor in it is made float32 on purpose,
    and autocast would turn some of it back to float16 or bfloat16."""
    return torch.autocast(device_type=like.device.type, enabled=False)


#: What ``register_mmdet`` registers: mmdetection's name for each of ghmd's losses.
MMDET_NAMES = {
    "RemoteGHMC": GHMC,
    "RemoteGHMR": GHMR,
    "RemoteSeesawLoss": SeesawLoss,
    "RemoteEQLV2Loss": EQLV2Loss,
}


def register_mmdet(registry: Any = None) -> Any:
    """Registers ghmd's losses in mmdetection's registry under ``MMDET_NAMES``: GHMC and GHMR
    as ``RemoteGHMC`` and ``RemoteGHMR``, SeesawLoss and EQLV2Loss as ``RemoteSeesawLoss`` and
    ``RemoteEQLV2Loss``.

    ``registry`` defaults to ``mmdet.registry.MODELS`` (mmdetection 3) or, failing that,
    ``mmdet.models.builder.LOSSES`` (mmdetection 2). Registering again replaces the entries, so
    calling this twice is harmless. Returns the registry.
    """
    if registry is None:
        try:
            from mmdet.registry import MODELS as registry  # noqa: N811
        except ImportError:
            try:
                from mmdet.models.builder import LOSSES as registry  # noqa: N811
            except ImportError as error:
                raise ImportError(
                    "register_mmdet needs mmdetection (mmdet.registry.MODELS or "
                    "mmdet.models.builder.LOSSES), which is not importable here"
                ) from error
    for name, module in MMDET_NAMES.items():
        registry.register_module(name=name, module=module, force=True)
    return registry
