"""The exceptions every ghmd call raises for a failed RPC, and the server's machine-readable
reason (``google.rpc.ErrorInfo``) read from its status details."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import grpc

__all__ = ["GhmdError", "HealingError", "RunLostError", "error_info"]

#: The ErrorInfo domain of ghmd's reasons (see the proto: fencing, routing, run identity).
DOMAIN = "ghm.v1"
_STATUS_DETAILS = "grpc-status-details-bin"


class GhmdError(Exception):
    """A ghmd call that failed, with the gRPC status code and the server's message.

    The server's messages name the offending field and index (``gradient_norms[17] = nan ...``),
    so the message is meant to be shown as is. Callers branch on ``code``:
    ``grpc.StatusCode.INVALID_ARGUMENT`` for a bad request, ``NOT_FOUND`` for an unknown job,
    ``ABORTED`` for a step whose ranks did not all arrive in time, ``UNAVAILABLE`` once retries
    are exhausted, and so on. ``reason`` is the server's ErrorInfo reason when it sent one
    (``STALE_COPY``, ``JOB_NOT_HERE``, ``RUN_ACTIVE``, ...), ``details`` its metadata.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        method: str = "",
        reason: str = "",
        details: Optional[Dict[str, str]] = None,
    ) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.reason = reason
        self.details = dict(details or {})
        where = f"{method}: " if method else ""
        why = f" ({reason})" if reason else ""
        super().__init__(f"{where}{code.name}{why}: {message}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str) -> "GhmdError":
        # Every RpcError raised by a call is also a grpc.Call; a bare RpcError (never seen from
        # grpcio's own calls) is reported as UNKNOWN rather than lost.
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        reason, metadata = error_info(trailers)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", method, reason, metadata)


class HealingError(GhmdError):
    """A step that could not be healed within the client's ``heal_deadline``: every replica the
    proxy offered stayed unreachable, or kept refusing. ``code``, ``message`` and ``reason`` are
    the last failure's; ``attempts`` says how often the step was tried."""

    def __init__(self, last: GhmdError, job_id: str, what: str, deadline: float, attempts: int):
        self.last = last
        self.job_id = job_id
        self.attempts = attempts
        self.deadline = deadline
        super().__init__(
            last.code,
            f"job {job_id!r}: {what} could not be healed within heal_deadline = {deadline} s "
            f"({attempts} attempts); the last failure was {last}",
            last.method,
            last.reason,
            last.details,
        )


class RunLostError(GhmdError):
    """The job belongs to another training run (reason ``RUN_ACTIVE``: one is using it now;
    ``RUN_REPLACED``: a newer run took it over). No retry can help: this run must stop, or use
    another job id."""


# google.rpc.Status {int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3}
# carrying google.rpc.ErrorInfo {string reason = 1; string domain = 2; map<string, string>
# metadata = 3}: decoded with the protobuf runtime alone, from a private pool, so the client needs
# neither googleapis-common-protos nor grpcio-status, and cannot clash with them when present.
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_classes: Optional[Tuple[Any, Any]] = None


def _status_classes() -> Tuple[Any, Any]:
    global _classes
    if _classes is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        package = "ghmd.private.rpc"
        file = descriptor_pb2.FileDescriptorProto(
            name="ghmd/private/rpc_status.proto", package=package, syntax="proto3"
        )

        def message(name: str, *fields: Tuple[str, int, int, int, str]) -> Any:
            proto = file.message_type.add(name=name)
            for field_name, number, kind, label, type_name in fields:
                field = proto.field.add(name=field_name, number=number, type=kind, label=label)
                if type_name:
                    field.type_name = type_name
            return proto

        optional, repeated = F.LABEL_OPTIONAL, F.LABEL_REPEATED
        message("Any", ("type_url", 1, F.TYPE_STRING, optional, ""),
                ("value", 2, F.TYPE_BYTES, optional, ""))
        message("Status", ("code", 1, F.TYPE_INT32, optional, ""),
                ("message", 2, F.TYPE_STRING, optional, ""),
                ("details", 3, F.TYPE_MESSAGE, repeated, f".{package}.Any"))
        info = message("ErrorInfo", ("reason", 1, F.TYPE_STRING, optional, ""),
                       ("domain", 2, F.TYPE_STRING, optional, ""),
                       ("metadata", 3, F.TYPE_MESSAGE, repeated,
                        f".{package}.ErrorInfo.MetadataEntry"))
        entry = info.nested_type.add(name="MetadataEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=optional)
        entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=optional)

        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        _classes = (
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Status")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ErrorInfo")),
        )
    return _classes


def error_info(trailing_metadata: Any) -> Tuple[str, Dict[str, str]]:
    """The reason and metadata of the ghm.v1 ErrorInfo in a call's trailers, ("", {}) without
    one (an older server, a proxy's own error, a status details blob that does not parse)."""
    from google.protobuf.message import DecodeError

    for key, value in trailing_metadata or ():
        if key != _STATUS_DETAILS or not isinstance(value, bytes):
            continue
        status_class, info_class = _status_classes()
        try:
            status = status_class.FromString(value)
            for detail in status.details:
                if detail.type_url == _ERROR_INFO_TYPE:
                    info = info_class.FromString(detail.value)
                    if info.domain == DOMAIN:
                        return info.reason, dict(info.metadata)
        except DecodeError:  # a malformed blob is no reason: the code and message still stand
            return "", {}
    return "", {}
