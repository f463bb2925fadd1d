"""The project's exceptions, one tree, each carrying a canonical status code.

::

    AjsError                      (code: the canonical status; UNKNOWN here)
     ├── Cancelled                CANCELLED: the call was cancelled
     ├── InvalidArgument          INVALID_ARGUMENT: bad input, with field violations
     │    ├── ConfigError         the configuration is invalid (startup)
     │    └── UsageError          the ajs command line is wrong (exit 2)
     ├── DeadlineExceeded         DEADLINE_EXCEEDED: the call ran out of time
     ├── NotFound                 NOT_FOUND: no such request
     ├── AlreadyExists            ALREADY_EXISTS: same id, different content
     ├── PermissionDenied         PERMISSION_DENIED: not the caller's job, or type
     ├── ResourceExhausted        RESOURCE_EXHAUSTED: a limit or quota, with quota violations
     ├── FailedPrecondition       FAILED_PRECONDITION: e.g. cancelling a finished job
     │    └── PluginError         a plugin is missing, broken or in conflict (startup)
     ├── Aborted                  ABORTED: a concurrency conflict; retry the sequence
     ├── OutOfRange               OUT_OF_RANGE
     ├── Unimplemented            UNIMPLEMENTED: not served here (a worker's JobService)
     │    └── NotSupported        no handler of the chain runs the request's type
     ├── Internal                 INTERNAL: a bug or an unexpected failure
     │    └── ConnectorError      a connector's driver failed
     ├── Unavailable              UNAVAILABLE: the queue cannot be reached now; retry
     ├── DataLoss                 DATA_LOSS
     ├── Unauthenticated          UNAUTHENTICATED: no valid credentials
     └── JobSignal                how one attempt of a job ends, raised by the job or for it
          ├── Retry               UNAVAILABLE, RETRY_REQUESTED: run again (within max_attempts)
          ├── JobTimeout          DEADLINE_EXCEEDED, JOB_TIMEOUT: ran past the type's timeout
          ├── PermanentError      UNKNOWN, JOB_FAILED: fail now, never retry
          ├── JobCancelled        UNKNOWN, JOB_FAILED: raised once cancellation was asked for
          └── WorkerCrashed       UNKNOWN, JOB_FAILED: the worker process running it died

Every status code has its class (:data:`ERRORS`); the client turns a status back into
an exception through the same table (:func:`from_status`). Nothing here imports gRPC:
the gRPC edge maps ``AjsError`` to a ``google.rpc.Status`` in one place
(``ajs_grpc.edge.pipeline``).
"""

from __future__ import annotations

import copy as _copy
import enum
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, Self

__all__ = [
    "ERRORS",
    "Aborted",
    "AjsError",
    "AlreadyExists",
    "Cancelled",
    "Code",
    "ConfigError",
    "ConnectorError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "JobCancelled",
    "JobSignal",
    "JobTimeout",
    "NotFound",
    "NotSupported",
    "OutOfRange",
    "PermanentError",
    "PermissionDenied",
    "PluginError",
    "PluginKind",
    "QuotaViolation",
    "ResourceExhausted",
    "Retry",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UsageError",
    "WorkerCrashed",
    "from_status",
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

    def restated(self, message: str, metadata: Mapping[str, str] | None = None) -> Self:
        """A copy saying ``message`` (and ``metadata``, if given): the same error may answer several callers."""
        copy = _copy.copy(self)
        copy.message = message
        copy.args = (message,)
        if metadata is not None:
            copy.metadata = dict(metadata)
        return copy


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


class ConnectorError(Internal):
    """A connector's storage failed; raised ``from`` the driver's exception."""


class Cancelled(AjsError):
    """The call was cancelled (by its caller, or a proxy or stopping server reset it)."""

    code = Code.CANCELLED


class DeadlineExceeded(AjsError):
    """The call did not complete before its deadline."""

    code = Code.DEADLINE_EXCEEDED


class Aborted(AjsError):
    """A concurrency conflict; retry the whole sequence."""

    code = Code.ABORTED


class OutOfRange(AjsError):
    """A value past the valid range."""

    code = Code.OUT_OF_RANGE


class DataLoss(AjsError):
    """Unrecoverable data loss or corruption."""

    code = Code.DATA_LOSS


# -- raised at startup --------------------------------------------------------------


class ConfigError(InvalidArgument):
    """The configuration is invalid; the message names the key."""


PluginKind = Literal["config", "connector", "handler", "job"]


class PluginError(FailedPrecondition):
    """A plugin is missing, broken, or in conflict with another.

    Attributes:
        kind: ``config``, ``connector``, ``handler`` or ``job``: what failed.
    """

    def __init__(self, kind: PluginKind, message: str) -> None:
        super().__init__(message, reason=f"{kind.upper()}_PLUGIN_ERROR")
        self.kind = kind


class NotSupported(Unimplemented):
    """No handler runs the request's type."""


class UsageError(InvalidArgument):
    """The ``ajs`` command line asks for something the client can tell is wrong (exit 2)."""


# -- how a job's attempt ends ---------------------------------------------------------


class JobSignal(AjsError):
    """How one attempt of a job ends in error, raised by the job or by the engine for it.

    Its ``code`` and ``reason`` become the attempt's ``google.rpc.Status``. Those that
    say only "the job failed" (UNKNOWN, ``JOB_FAILED``) name their class in
    ``metadata["exception"]``, as the Status of any other exception a job raises does.

    Args:
        message: what happened, for the attempt's Response; the class name when empty.
    """

    code = Code.UNKNOWN
    default_reason: ClassVar[str] = "JOB_FAILED"

    def __init__(self, message: str = "", *, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        named = {"exception": type(self).__name__} if self.code is Code.UNKNOWN else {}
        super().__init__(
            message or type(self).__name__, reason=reason or self.default_reason, metadata={**named, **(metadata or {})}
        )


class Retry(JobSignal):
    """Raised by a job to ask to run again later (within its ``max_attempts``).

    Args:
        message: why, for the retry's Response.
        delay: seconds to wait before the next attempt; None uses the policy's backoff.
    """

    code = Code.UNAVAILABLE
    default_reason = "RETRY_REQUESTED"

    def __init__(self, message: str = "the job asked to be retried", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class JobTimeout(JobSignal):
    """The job ran longer than its type's ``timeout``; retried like any error by default."""

    code = Code.DEADLINE_EXCEEDED
    default_reason = "JOB_TIMEOUT"


class PermanentError(JobSignal):
    """Raised by a job (or a base class of its errors) to fail without retries."""


class JobCancelled(JobSignal):
    """Raised by ``JobContext.raise_if_cancelled`` once cancellation was asked for."""


class WorkerCrashed(JobSignal):
    """The worker process running the job died; retried like any error by default."""


class WorkerLost(Retry):
    """The remote worker running the attempt went away (its stream broke or ended).

    The job goes back to the queue at once, like a job whose server died: it runs
    again if attempts are left, else it ends FAILED.
    """

    code = Code.ABORTED
    default_reason = "WORKER_LOST"

    def __init__(self, message: str = "the remote worker running the job went away") -> None:
        super().__init__(message, delay=0.0)


class NotStarted(JobSignal):
    """The attempt was handed back before it started: it runs again without counting."""

    code = Code.ABORTED
    default_reason = "NOT_STARTED"


# -- status codes back to exceptions ------------------------------------------------------

ERRORS: Mapping[Code, type[AjsError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
"""The canonical class of each status code (UNKNOWN, and OK, are plain :class:`AjsError`)."""


def from_status(
    code: Code,
    message: str,
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[FieldViolation] = (),
    quota_violations: Sequence[QuotaViolation] = (),
) -> AjsError:
    """The exception of a status: its code's class, with the details it carries."""
    cls = ERRORS.get(code, AjsError)
    if cls is InvalidArgument:
        return InvalidArgument(message, field_violations, reason=reason, metadata=metadata)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, quota_violations, reason=reason, metadata=metadata)
    error = cls(message, reason=reason, metadata=metadata)
    if cls is AjsError:
        error.code = code
    return error
