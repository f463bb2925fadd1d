"""The project's exceptions, one tree, each carrying a canonical status code.

::

    AjsError                      (code: the canonical status for the edge)
     ├── InvalidArgument          bad input, with field violations
     ├── NotFound                 no such request
     ├── AlreadyExists            same id, different content
     ├── FailedPrecondition       e.g. cancelling a finished job
     ├── ResourceExhausted        a limit or quota was reached, with quota violations
     ├── Unavailable              the queue cannot be reached now
     ├── Unimplemented            not served here (a worker's JobService)
     ├── Unauthenticated          no valid credentials
     ├── PermissionDenied         not the caller's job, or type
     ├── Internal                 a bug or an unexpected failure
     └── ConnectorError           a connector's driver failed (Internal)

Nothing here imports gRPC: the gRPC edge maps ``AjsError`` to a ``google.rpc.Status``
in one place (``ajs_grpc.edge.service``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

__all__ = [
    "AjsError",
    "AlreadyExists",
    "Code",
    "ConnectorError",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]


class Code(enum.IntEnum):
    """Canonical status codes; the numbers are those of ``google.rpc.Code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class AjsError(Exception):
    """The root of the project's exceptions.

    Attributes:
        message: what went wrong, for humans.
        reason: UPPER_SNAKE_CASE, for ``google.rpc.ErrorInfo``.
        metadata: facts for ``ErrorInfo.metadata``.
    """

    code = Code.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})


class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    __slots__ = ("description", "field")

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description

    def __repr__(self) -> str:
        return f"FieldViolation({self.field!r}, {self.description!r})"


class InvalidArgument(AjsError):
    """The request is malformed, whatever the server's state."""

    code = Code.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)


class NotFound(AjsError):
    """No such request."""

    code = Code.NOT_FOUND


class AlreadyExists(AjsError):
    """A request with this id exists with different content."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(AjsError):
    """The request is valid but the job's state does not allow it."""

    code = Code.FAILED_PRECONDITION


class QuotaViolation:
    """One quota a call would exceed (``google.rpc.QuotaFailure.Violation``)."""

    __slots__ = ("description", "subject")

    def __init__(self, subject: str, description: str) -> None:
        self.subject = subject
        self.description = description

    def __repr__(self) -> str:
        return f"QuotaViolation({self.subject!r}, {self.description!r})"


class ResourceExhausted(AjsError):
    """A limit or a quota was reached; retrying later may succeed."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        violations: Sequence[QuotaViolation] = (),
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)


class Unavailable(AjsError):
    """The service cannot serve now (shutting down, queue unreachable); retry."""

    code = Code.UNAVAILABLE


class Unimplemented(AjsError):
    """This server does not serve the call (a worker's JobService)."""

    code = Code.UNIMPLEMENTED


class Unauthenticated(AjsError):
    """The call carries no valid credentials."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(AjsError):
    """The caller may not do this."""

    code = Code.PERMISSION_DENIED


class Internal(AjsError):
    """Something failed that should not have; the server logs the details."""

    code = Code.INTERNAL


class ConnectorError(AjsError):
    """A connector's storage failed; raised ``from`` the driver's exception."""

    code = Code.INTERNAL
