"""Errors raised by the fx client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # the site library (fx.site) runs without grpc
    import grpc


class FXError(Exception):
    """An error from the director or from the client's checks.

    ``code`` is the gRPC status code (a :class:`grpc.StatusCode`) when the error
    came from a call, else ``None``; ``details`` is the server's message.
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None, details: str = ""):
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    def __str__(self) -> str:
        if self.code is not None:
            return f"{self.message} ({self.code.name})"
        return self.message


class FXTimeout(FXError, TimeoutError):
    """A bounded wait ran out (connecting, waiting for an experiment, a call's deadline)."""


class ExperimentEnded(FXError):
    """An experiment ended FAILED, CANCELLED or REJECTED while it was awaited.

    ``state`` is the final state's name, ``reason`` the director's reason and
    ``status`` the final :class:`fx.ExperimentStatus`.
    """

    def __init__(self, message: str, state: str, reason: str, status: Any):
        super().__init__(message)
        self.state = state
        self.reason = reason
        self.status = status


def from_rpc(err: grpc.RpcError, what: str) -> FXError:
    """Turns a grpc.RpcError into an FXError that says what was being done."""
    import grpc

    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    details = details or ""
    msg = f"{what}: {details}" if details else what
    cls = FXTimeout if code == grpc.StatusCode.DEADLINE_EXCEEDED else FXError
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not details.strip():
        msg = f"{what}: no answer before the deadline"
    return cls(msg, code=code, details=details)
