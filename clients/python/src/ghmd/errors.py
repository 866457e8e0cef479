"""The one exception type every ghmd call raises for a failed RPC."""

from __future__ import annotations

import grpc


class GhmdError(Exception):
    """A ghmd call that failed, with the gRPC status code and the server's message.

    The server's messages name the offending field and index (``gradient_norms[17] = nan ...``),
    so the message is meant to be shown as is. Callers branch on ``code``:
    ``grpc.StatusCode.INVALID_ARGUMENT`` for a bad request, ``NOT_FOUND`` for an unknown job,
    ``ABORTED`` for a step whose ranks did not all arrive in time, ``UNAVAILABLE`` once retries
    are exhausted, and so on.
    """

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {message}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str) -> "GhmdError":
        # Every RpcError raised by a call is also a grpc.Call; a bare RpcError (never seen from
        # grpcio's own calls) is reported as UNKNOWN rather than lost.
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", method)
