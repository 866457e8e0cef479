import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Loss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_UNSPECIFIED: _ClassVar[Loss]
    LOSS_GHM_C: _ClassVar[Loss]
    LOSS_GHM_R: _ClassVar[Loss]
LOSS_UNSPECIFIED: Loss
LOSS_GHM_C: Loss
LOSS_GHM_R: Loss

class JobSpec(_message.Message):
    __slots__ = ("loss", "bins", "momentum", "mu", "world_size", "step_timeout", "allow_partial_steps", "seesaw", "eqlv2")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEESAW_FIELD_NUMBER: _ClassVar[int]
    EQLV2_FIELD_NUMBER: _ClassVar[int]
    loss: Loss
    bins: int
    momentum: float
    mu: float
    world_size: int
    step_timeout: _duration_pb2.Duration
    allow_partial_steps: bool
    seesaw: SeesawSpec
    eqlv2: Eqlv2Spec
    def __init__(self, loss: _Optional[_Union[Loss, str]] = ..., bins: _Optional[int] = ..., momentum: _Optional[float] = ..., mu: _Optional[float] = ..., world_size: _Optional[int] = ..., step_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., allow_partial_steps: _Optional[bool] = ..., seesaw: _Optional[_Union[SeesawSpec, _Mapping]] = ..., eqlv2: _Optional[_Union[Eqlv2Spec, _Mapping]] = ...) -> None: ...

class SeesawSpec(_message.Message):
    __slots__ = ("num_classes", "p", "q", "eps")
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    num_classes: int
    p: float
    q: float
    eps: float
    def __init__(self, num_classes: _Optional[int] = ..., p: _Optional[float] = ..., q: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class Eqlv2Spec(_message.Message):
    __slots__ = ("num_classes", "gamma", "mu", "alpha")
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    num_classes: int
    gamma: float
    mu: float
    alpha: float
    def __init__(self, num_classes: _Optional[int] = ..., gamma: _Optional[float] = ..., mu: _Optional[float] = ..., alpha: _Optional[float] = ...) -> None: ...

class JobState(_message.Message):
    __slots__ = ("acc_sum", "steps", "elements", "next_step", "generation", "seesaw", "eqlv2")
    ACC_SUM_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEESAW_FIELD_NUMBER: _ClassVar[int]
    EQLV2_FIELD_NUMBER: _ClassVar[int]
    acc_sum: _containers.RepeatedScalarFieldContainer[float]
    steps: int
    elements: int
    next_step: int
    generation: int
    seesaw: SeesawState
    eqlv2: Eqlv2State
    def __init__(self, acc_sum: _Optional[_Iterable[float]] = ..., steps: _Optional[int] = ..., elements: _Optional[int] = ..., next_step: _Optional[int] = ..., generation: _Optional[int] = ..., seesaw: _Optional[_Union[SeesawState, _Mapping]] = ..., eqlv2: _Optional[_Union[Eqlv2State, _Mapping]] = ...) -> None: ...

class SeesawState(_message.Message):
    __slots__ = ("cum_samples",)
    CUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    cum_samples: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, cum_samples: _Optional[_Iterable[float]] = ...) -> None: ...

class Eqlv2State(_message.Message):
    __slots__ = ("pos_grad", "neg_grad", "pos_neg")
    POS_GRAD_FIELD_NUMBER: _ClassVar[int]
    NEG_GRAD_FIELD_NUMBER: _ClassVar[int]
    POS_NEG_FIELD_NUMBER: _ClassVar[int]
    pos_grad: _containers.RepeatedScalarFieldContainer[float]
    neg_grad: _containers.RepeatedScalarFieldContainer[float]
    pos_neg: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, pos_grad: _Optional[_Iterable[float]] = ..., neg_grad: _Optional[_Iterable[float]] = ..., pos_neg: _Optional[_Iterable[float]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "create_time", "update_time", "run_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    run_id: str
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job_id", "spec", "run_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    run_id: str
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateJobRequest(_message.Message):
    __slots__ = ("job_id", "world_size", "from_step", "step_timeout", "allow_partial_steps")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    world_size: int
    from_step: int
    step_timeout: _duration_pb2.Duration
    allow_partial_steps: bool
    def __init__(self, job_id: _Optional[str] = ..., world_size: _Optional[int] = ..., from_step: _Optional[int] = ..., step_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., allow_partial_steps: _Optional[bool] = ...) -> None: ...

class RestoreJobRequest(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, _Mapping]] = ...) -> None: ...

class AppliedStep(_message.Message):
    __slots__ = ("step", "bin_weights", "tot", "nonempty_bins", "acc_sum", "missing_ranks", "seesaw", "eqlv2")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BIN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOT_FIELD_NUMBER: _ClassVar[int]
    NONEMPTY_BINS_FIELD_NUMBER: _ClassVar[int]
    ACC_SUM_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    SEESAW_FIELD_NUMBER: _ClassVar[int]
    EQLV2_FIELD_NUMBER: _ClassVar[int]
    step: int
    bin_weights: _containers.RepeatedScalarFieldContainer[float]
    tot: float
    nonempty_bins: int
    acc_sum: _containers.RepeatedScalarFieldContainer[float]
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    seesaw: SeesawState
    eqlv2: Eqlv2State
    def __init__(self, step: _Optional[int] = ..., bin_weights: _Optional[_Iterable[float]] = ..., tot: _Optional[float] = ..., nonempty_bins: _Optional[int] = ..., acc_sum: _Optional[_Iterable[float]] = ..., missing_ranks: _Optional[_Iterable[int]] = ..., seesaw: _Optional[_Union[SeesawState, _Mapping]] = ..., eqlv2: _Optional[_Union[Eqlv2State, _Mapping]] = ...) -> None: ...

class ReseedJobRequest(_message.Message):
    __slots__ = ("job_id", "spec", "run_id", "state", "last_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    run_id: str
    state: JobState
    last_step: AppliedStep
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., run_id: _Optional[str] = ..., state: _Optional[_Union[JobState, _Mapping]] = ..., last_step: _Optional[_Union[AppliedStep, _Mapping]] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("counts", "tot")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOT_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    tot: float
    def __init__(self, counts: _Optional[_Iterable[int]] = ..., tot: _Optional[float] = ...) -> None: ...

class HarmonizeRequest(_message.Message):
    __slots__ = ("job_id", "step", "rank", "gradient_norms", "residuals", "histogram", "seesaw", "eqlv2", "label_weights", "expected_generation", "expected_steps")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NORMS_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    SEESAW_FIELD_NUMBER: _ClassVar[int]
    EQLV2_FIELD_NUMBER: _ClassVar[int]
    LABEL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    rank: int
    gradient_norms: bytes
    residuals: bytes
    histogram: Histogram
    seesaw: SeesawContribution
    eqlv2: Eqlv2Contribution
    label_weights: bytes
    expected_generation: int
    expected_steps: int
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., gradient_norms: _Optional[bytes] = ..., residuals: _Optional[bytes] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ..., seesaw: _Optional[_Union[SeesawContribution, _Mapping]] = ..., eqlv2: _Optional[_Union[Eqlv2Contribution, _Mapping]] = ..., label_weights: _Optional[bytes] = ..., expected_generation: _Optional[int] = ..., expected_steps: _Optional[int] = ...) -> None: ...

class SeesawContribution(_message.Message):
    __slots__ = ("label_counts", "labels")
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, label_counts: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class Eqlv2Contribution(_message.Message):
    __slots__ = ("pos_grad", "neg_grad")
    POS_GRAD_FIELD_NUMBER: _ClassVar[int]
    NEG_GRAD_FIELD_NUMBER: _ClassVar[int]
    pos_grad: bytes
    neg_grad: bytes
    def __init__(self, pos_grad: _Optional[bytes] = ..., neg_grad: _Optional[bytes] = ...) -> None: ...

class HarmonizeResponse(_message.Message):
    __slots__ = ("job_id", "step", "weights", "bin_weights", "tot", "nonempty_bins", "acc_sum", "missing_ranks", "steps", "elements", "next_step", "generation", "seesaw", "eqlv2")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BIN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TOT_FIELD_NUMBER: _ClassVar[int]
    NONEMPTY_BINS_FIELD_NUMBER: _ClassVar[int]
    ACC_SUM_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEESAW_FIELD_NUMBER: _ClassVar[int]
    EQLV2_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    weights: bytes
    bin_weights: _containers.RepeatedScalarFieldContainer[float]
    tot: float
    nonempty_bins: int
    acc_sum: _containers.RepeatedScalarFieldContainer[float]
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    elements: int
    next_step: int
    generation: int
    seesaw: SeesawState
    eqlv2: Eqlv2State
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., weights: _Optional[bytes] = ..., bin_weights: _Optional[_Iterable[float]] = ..., tot: _Optional[float] = ..., nonempty_bins: _Optional[int] = ..., acc_sum: _Optional[_Iterable[float]] = ..., missing_ranks: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ..., elements: _Optional[int] = ..., next_step: _Optional[int] = ..., generation: _Optional[int] = ..., seesaw: _Optional[_Union[SeesawState, _Mapping]] = ..., eqlv2: _Optional[_Union[Eqlv2State, _Mapping]] = ...) -> None: ...
