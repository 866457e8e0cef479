"""Drop-in replacements for mmdetection's ``GHMC`` and ``GHMR`` whose density lives in ghmd.

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

import datetime
import uuid
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .binning import bin_edges, bin_indices, bin_slots, slot_count, upper_edges
from .client import Client, Harmonized, TLSConfig

__all__ = [
    "GHMC",
    "GHMR",
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

    ``acc_sum`` and ``counters`` (steps, elements, next_step) come together from one answer: a
    step whose response carries the counters, RestoreJob's Job, GetJob's Job. ``complete`` says
    the counters are those of the density beside them; after a step whose response lacks them
    (a server before they joined the contract) only GetJob can tell. ``next_call`` numbers the
    module's own calls. A module and its deep copies share one mirror (mmengine's EMAHook copies
    the model every iteration and never steps the copy): the copy reports the job's live state,
    as the original does. A pickled copy starts blank and asks the server.
    """

    def __init__(self) -> None:
        self.acc_sum = np.zeros(0, dtype=np.float32)
        self.counters: Optional[Tuple[int, int, int]] = None
        self.next_call: Optional[int] = None

    def __deepcopy__(self, memo: Any) -> "_JobMirror":
        return self

    def __reduce__(self) -> Any:
        return (_JobMirror, ())

    @property
    def complete(self) -> bool:
        return self.counters is not None

    def saw_state(self, state: Any) -> None:
        """A JobState, or the mapping a checkpoint restores."""
        if isinstance(state, dict):
            self.acc_sum = np.asarray(state["acc_sum"], dtype=np.float32)
            self.counters = tuple(int(state[name]) for name in _STATE_KEYS)
        else:
            self.acc_sum = np.array(state.acc_sum, dtype=np.float32)
            self.counters = (state.steps, state.elements, state.next_step)

    def saw_step(self, result: Harmonized) -> None:
        self.acc_sum = result.acc_sum
        self.counters = result.counters


class _RemoteGHM(nn.Module):
    """What GHMC and GHMR share: the job, the step numbering, the exchange and the checkpoint."""

    _loss = ""

    def __init__(
        self,
        *,
        bins: int,
        momentum: float,
        mu: float,
        loss_weight: float,
        reduction: str,
        job_id: str,
        address: Optional[str] = None,
        client: Optional[Client] = None,
        token: Optional[str] = None,
        tls: Union[None, bool, TLSConfig] = None,
        mode: str = "histogram",
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
        if mode not in _MODES:
            raise ValueError(f"{name}: mode = {mode!r}: use 'histogram' or 'raw'")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: reduction = {reduction!r}: use one of {_REDUCTIONS}")
        if address is None and client is None:
            address = "127.0.0.1:50051"
        self.bins = bins
        self.momentum = momentum
        self.mu = mu
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.job_id = job_id
        self.address = address if address is not None else client.target
        self.mode = mode
        self.stream = stream
        self.world_size = world_size
        self.rank = rank
        self.step_timeout = step_timeout
        self.allow_partial_steps = allow_partial_steps
        self._token = token
        self._tls = tls
        self.register_buffer("edges", bin_edges(self._loss, bins))
        if momentum > 0:
            # Mirrors the job's density after every step, as mmdetection's buffer of this name.
            self.register_buffer("acc_sum", torch.zeros(bins))
        #: The last step's answer (bin table, tot, EMA state), for logging and inspection.
        self.last_result: Optional[Harmonized] = None
        self._client = client
        self._session: Any = None
        self._job: Any = None
        self._mirror = _JobMirror()
        self._pending_restore: Optional[Dict[str, Any]] = None

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, "
            f"job_id={self.job_id!r}, address={self.address!r}, mode={self.mode!r}"
        )

    # A gRPC channel cannot be pickled or deep-copied (mmdetection deep-copies models for EMA);
    # a copy reconnects on first use.
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _session=None, _job=None)
        return state

    def close(self) -> None:
        """Closes the stream and the connection; the next call reconnects."""
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
                self._loss,
                self.bins,
                self.momentum,
                self.mu,
                world_size=world_size if world_size > 1 else 0,
                step_timeout=self.step_timeout,
                allow_partial_steps=self.allow_partial_steps,
                run_id=run_id,
            )
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

    def _reduction(self, reduction_override: Optional[str]) -> str:
        if reduction_override not in (None,) + _REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: reduction_override = {reduction_override!r}: "
                f"use None or one of {_REDUCTIONS}"
            )
        return reduction_override or self.reduction

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

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """mmdetection's buffers plus the job's counters, from the mirror: no RPC once the
        module has seen its job's full state (a restore, or a step whose answer carries the
        counters), GetJob otherwise. The density saved is the job's, also for an EMA copy."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        mirror = self._mirror
        if not mirror.complete:
            self._ensure_job()
            mirror.saw_state(self._connection().get_job(self.job_id).state)
        steps, elements, job_next_step = mirror.counters
        if self.momentum > 0:
            # A copy: averaging hooks (EMAHook) write into the tensors state_dict returns.
            destination[prefix + "acc_sum"] = torch.tensor(mirror.acc_sum, device=self.edges.device)
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
        # GHMC/GHMR (edges and acc_sum only) resumes here too, from step 0.
        ours = {prefix + name for name in (*_STATE_KEYS, _RUN_KEY)}
        inner = {key: value for key, value in state_dict.items() if key not in ours}
        errors_before = len(error_msgs)
        missing_before = len(missing_keys)
        super()._load_from_state_dict(
            inner, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) > errors_before or len(missing_keys) > missing_before:
            return  # load_state_dict raises (strict) or the checkpoint has no density to restore

        def counter(name: str) -> int:
            value = state_dict.get(prefix + name)
            return 0 if value is None else int(value)

        run = state_dict.get(prefix + _RUN_KEY)
        if run is not None and self._job is None:
            _resume_run(bytes(run.tolist()).decode())
        acc_sum = self.acc_sum if self.momentum > 0 else torch.zeros(self.bins)
        state = {
            "acc_sum": acc_sum.detach().float().cpu().numpy(),
            "steps": counter("steps"),
            "elements": counter("elements"),
            "next_step": counter("next_step"),
        }
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


def _float32(like: torch.Tensor) -> Any:
    """Autocast off for the loss's own arithmetic: every tensor in it is made float32 on purpose,
    and autocast would turn some of it back to float16 or bfloat16."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def register_mmdet(registry: Any = None) -> Any:
    """Registers GHMC and GHMR as ``RemoteGHMC`` and ``RemoteGHMR`` in mmdetection's registry.

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
    registry.register_module(name="RemoteGHMC", module=GHMC, force=True)
    registry.register_module(name="RemoteGHMR", module=GHMR, force=True)
    return registry
