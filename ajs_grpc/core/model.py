"""The core model: Request, Response, RequestState, Job, JobType, and the rules between them.

Every state rule of the project lives here, in :meth:`Job.advance`: Responses of a
request are numbered 1, 2, 3 ... without gaps, a request has exactly one final
Response, and nothing is appended after it but a retry by hand (:meth:`Job.retry`,
which starts a new run). Dependencies are resolved by :meth:`Job.resolve`, expiry by
:meth:`Job.lapse`. Connectors store what these return; they never decide a state
themselves.

This module knows nothing of gRPC. ``google.protobuf.Any`` is the only protobuf
type it carries, for typed payloads.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from ajs_grpc.core.errors import Code, FailedPrecondition

if TYPE_CHECKING:  # flow builds on this module
    from ajs_grpc.core.flow import FlowPolicy

__all__ = [
    "DEFAULT_QUEUE",
    "NO_FLOW",
    "ErrorStatus",
    "Flow",
    "Job",
    "JobType",
    "Progress",
    "Request",
    "RequestState",
    "Response",
    "RetrySchedule",
    "Update",
    "now",
]


DEFAULT_QUEUE = "default"
"""The queue of a request that names none."""


def now() -> datetime:
    """The current time, timezone-aware UTC (the only kind of time the model holds)."""
    return datetime.now(UTC)


class RequestState(enum.IntEnum):
    """The state of a request; the numbers are those of ``ajs.v1.RequestState``."""

    UNSPECIFIED = 0
    CREATED = 1
    PENDING = 2
    FINISHED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_final(self) -> bool:
        """True for FINISHED, FAILED and CANCELLED: nothing follows them."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})

# Which state may follow which. PENDING -> PENDING is a progress report;
# PENDING -> CREATED hands a claimed job back to the queue (retry, shutdown).
_NEXT_STATES: Mapping[RequestState, frozenset[RequestState]] = {
    RequestState.CREATED: frozenset({RequestState.PENDING, RequestState.CANCELLED}),
    RequestState.PENDING: frozenset(
        {
            RequestState.PENDING,
            RequestState.CREATED,
            RequestState.FINISHED,
            RequestState.FAILED,
            RequestState.CANCELLED,
        }
    ),
}


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _frozen(data: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(data or {}))


# The longest error message kept; longer ones are cut (a job's exception may say anything).
MAX_ERROR_MESSAGE = 4096


def _storable(text: str) -> str:
    """``text`` as every store keeps it: U+0000 (which PostgreSQL cannot hold) written out as an escape."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _check_storable(data: Mapping[str, str], what: str) -> None:
    for key, value in data.items():
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"{what} entry {key!r} holds U+0000 (NUL), which no store can keep")


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far a running job has come: ``fraction`` in [0, 1] and a note."""

    fraction: float
    message: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"progress fraction must be between 0 and 1, got {self.fraction}")
        if "\x00" in self.message:
            raise ValueError("a progress message must not hold U+0000 (NUL), which no store can keep")


@dataclasses.dataclass(frozen=True)
class ErrorStatus:
    """Why a job FAILED or was CANCELLED (a ``google.rpc.Status`` at the edge).

    Attributes:
        code: the canonical status code.
        message: a human-readable explanation.
        reason: an UPPER_SNAKE_CASE reason for ``google.rpc.ErrorInfo``.
        metadata: extra facts for ``ErrorInfo.metadata``.
    """

    code: Code
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Errors carry what jobs raised: kept readable, storable and bounded.
        message = _storable(self.message)
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "…"
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "reason", _storable(self.reason))
        object.__setattr__(self, "metadata", {_storable(key): _storable(value) for key, value in self.metadata.items()})


@dataclasses.dataclass(frozen=True)
class Request:
    """A request for work, as submitted (the seed's Request).

    Attributes:
        id: unique id; the key of idempotent submits.
        type: the job type, matched against job plugins.
        data: untyped parameters.
        input: a typed payload, or None.
        parent_id: the id of the request that created this one, or "".
        creator: who submitted it (set by the server).
        create_time: when the server accepted it (set by the server).
        priority: higher runs first; FIFO within a priority; may be negative.
        run_after: not claimed before this time; None (or a past time) is now.
        queue: the queue it waits in (``"default"`` when given empty); an instance
            claims only from the queues it runs.
        depends_on: ids of requests that must end before it starts (see :meth:`Job.resolve`).
        expire_time: if it has not started by then, it ends CANCELLED (reason ``EXPIRED``); None: never.
        max_attempts: claims allowed in all, at most its type's; 0 for its type's.
        timeout: seconds one attempt may run, at most its type's; None for its type's.
    """

    id: str
    type: str
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)
    input: any_pb2.Any | None = None
    parent_id: str = ""
    creator: str = ""
    create_time: datetime | None = None
    priority: int = 0
    run_after: datetime | None = None
    queue: str = DEFAULT_QUEUE
    depends_on: tuple[str, ...] = ()
    expire_time: datetime | None = None
    max_attempts: int = 0
    timeout: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _frozen(self.data))
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if not self.queue:
            object.__setattr__(self, "queue", DEFAULT_QUEUE)

    def same_content(self, other: Request) -> bool:
        """True when ``other`` asks for the same work (server-set fields aside)."""
        return (
            self.id == other.id
            and self.type == other.type
            and self.parent_id == other.parent_id
            and dict(self.data) == dict(other.data)
            and (self.input or any_pb2.Any()) == (other.input or any_pb2.Any())
            and self.priority == other.priority
            and self.run_after == other.run_after
            and self.queue == other.queue
            and self.depends_on == other.depends_on
            and self.expire_time == other.expire_time
            and self.max_attempts == other.max_attempts
            and self.timeout == other.timeout
        )


@dataclasses.dataclass(frozen=True)
class Update:
    """What a handler or the dispatcher reports; :meth:`Job.advance` makes it a Response."""

    state: RequestState
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)
    output: any_pb2.Any | None = None
    progress: Progress | None = None
    error: ErrorStatus | None = None
    run_after: datetime | None = None
    """For a job handed back to the queue (CREATED): not claimed before this time."""
    refund_attempt: bool = False
    """For a job handed back to the queue (CREATED) by its server, not by a failure
    (a shutdown): the attempt does not count against ``max_attempts``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _frozen(self.data))
        _check_storable(self.data, "data")
        if self.output is not None and "\x00" in self.output.type_url:
            raise ValueError("an output's type_url must not hold U+0000 (NUL)")


@dataclasses.dataclass(frozen=True)
class Response:
    """One step in the life of a request (the seed's Response).

    Attributes:
        request_id: the request it belongs to.
        sequence: 1, 2, 3 ... without gaps within a request.
        create_time: when it was stored.
        state: the request's state after it.
        is_final: True on the one final Response.
        data, output, progress, error: see :class:`Update`.
    """

    request_id: str
    sequence: int
    create_time: datetime
    state: RequestState
    is_final: bool = False
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)
    output: any_pb2.Any | None = None
    progress: Progress | None = None
    error: ErrorStatus | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _frozen(self.data))

    def as_dict(self) -> dict[str, Any]:
        """Its JSON form, as ``ajs get`` shows a job's last Response (``json.dumps`` takes it).

        States and error codes by name; the typed ``output`` is left out.
        """
        return {
            "sequence": self.sequence,
            "state": self.state.name,
            "is_final": self.is_final,
            "data": dict(self.data),
            "progress": {"fraction": self.progress.fraction, "message": self.progress.message}
            if self.progress
            else None,
            "error": {"code": self.error.code.name, "message": self.error.message} if self.error else None,
        }


@dataclasses.dataclass(frozen=True)
class Flow:
    """One job's flow-control policies, resolved for it (None keys: the policy does not apply).

    Made by :class:`ajs_grpc.core.flow.FlowPolicy` at submit and stored with the job.

    Attributes:
        concurrency_key, concurrency_limit: see :class:`~ajs_grpc.core.flow.Concurrency`.
        rate_key, rate, burst: see :class:`~ajs_grpc.core.flow.RateLimit`; ``rate`` in tokens per second.
        ordered_key: see ``ordered_by``.
        unique_key, unique_states, unique_ttl: see :class:`~ajs_grpc.core.flow.Unique` (checked at submit only).
    """

    concurrency_key: str | None = None
    concurrency_limit: int = 0
    rate_key: str | None = None
    rate: float = 0.0
    burst: int = 0
    ordered_key: str | None = None
    unique_key: str | None = None
    unique_states: frozenset[RequestState] = frozenset()
    unique_ttl: float | None = None

    @property
    def gated(self) -> bool:
        """True when a claim must ask the :class:`~ajs_grpc.core.flow.Gate` before starting the job."""
        return self.concurrency_key is not None or self.rate_key is not None or self.ordered_key is not None

    def unique_since(self, at: datetime) -> datetime | None:
        """The earliest create time a job may have to match within the ttl (None: no ttl)."""
        return None if self.unique_ttl is None else at - timedelta(seconds=self.unique_ttl)


NO_FLOW = Flow()


@dataclasses.dataclass(frozen=True)
class Job:
    """A request with its current state: what connectors store and return.

    Attributes:
        request: the request.
        state: its current state.
        attempt: how many times it was claimed to run.
        last_response: the newest Response (every stored job has one).
        update_time: when it last changed.
        cancel_requested: cancellation was asked for while it ran.
        max_attempts: how many times it may be claimed in all (its retry policy's).
        due_time: while CREATED, when it may be claimed (``run_after``, or a retry's backoff);
            None while it waits for its dependencies (:attr:`waiting`).
        flow: its flow-control policies (set at submit).
        allow_failed_dependencies: it runs once its dependencies ended, whatever their end
            (its type's choice); otherwise one that ends FAILED or CANCELLED cancels it.
    """

    request: Request
    state: RequestState
    attempt: int
    last_response: Response
    update_time: datetime
    cancel_requested: bool = False
    max_attempts: int = 1
    due_time: datetime | None = None
    flow: Flow = NO_FLOW
    allow_failed_dependencies: bool = False

    @classmethod
    def create(
        cls,
        request: Request,
        max_attempts: int = 1,
        at: datetime | None = None,
        flow: Flow = NO_FLOW,
        *,
        allow_failed_dependencies: bool = False,
    ) -> tuple[Job, Response]:
        """A new queued job and its first Response (sequence 1, CREATED).

        A request with dependencies starts :attr:`waiting`: its store applies :meth:`resolve`
        once they are stored (and each time one of them ends).
        """
        at = at or now()
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        request = dataclasses.replace(request, create_time=at)
        first = Response(request.id, 1, at, RequestState.CREATED)
        due = None if request.depends_on else max(request.run_after or at, at)
        job = cls(
            request,
            RequestState.CREATED,
            0,
            first,
            at,
            max_attempts=max_attempts,
            due_time=due,
            flow=flow,
            allow_failed_dependencies=allow_failed_dependencies,
        )
        return job, first

    @property
    def waiting(self) -> bool:
        """True while it is queued waiting for its dependencies to end (no claim takes it)."""
        return self.state is RequestState.CREATED and self.due_time is None

    def expired(self, at: datetime) -> bool:
        """True when it is queued and its ``expire_time`` has come: :meth:`lapse` ends it."""
        expire = self.request.expire_time
        return self.state is RequestState.CREATED and expire is not None and expire <= at

    def lapse(self, at: datetime | None = None) -> tuple[Job, Response]:
        """Ends a queued job that was not started by its ``expire_time``: CANCELLED, reason ``EXPIRED``."""
        expire = self.request.expire_time
        error = ErrorStatus(
            Code.DEADLINE_EXCEEDED,
            f"not started by its expire_time {_iso(expire)}",
            "EXPIRED",
            {"expire_time": _iso(expire) or ""},
        )
        return self.advance(Update(RequestState.CANCELLED, error=error), at)

    def resolve(self, dependencies: Mapping[str, Job], at: datetime | None = None) -> tuple[Job, Response | None]:
        """Applies its dependencies' states to a :attr:`waiting` job (the one rule of dependencies).

        Args:
            dependencies: the stored jobs of ``request.depends_on`` by id; one missing was
                deleted after it ended, and counts as FINISHED.
            at: now.

        Returns:
            The job CANCELLED (reason ``DEPENDENCY_FAILED``) and its final Response as soon
            as one ended FAILED or CANCELLED, unless its type allows that; else ``(self,
            None)`` while one has not ended; else the job due now (or at ``run_after``) and None.
        """
        if not self.waiting:
            return self, None
        states = {}
        for dependency_id in self.request.depends_on:
            dependency = dependencies.get(dependency_id)
            states[dependency_id] = dependency.state if dependency is not None else RequestState.FINISHED
        failed = [(i, state) for i, state in states.items() if state.is_final and state is not RequestState.FINISHED]
        if failed and not self.allow_failed_dependencies:  # at once, whatever the others do
            dependency_id, state = failed[0]
            error = ErrorStatus(
                Code.CANCELLED,
                f"dependency {dependency_id!r} ended {state.name}",
                "DEPENDENCY_FAILED",
                {"dependency_id": dependency_id, "dependency_state": state.name},
            )
            return self.advance(Update(RequestState.CANCELLED, error=error), at)
        if not all(state.is_final for state in states.values()):
            return self, None
        at = at or now()
        return dataclasses.replace(self, due_time=max(self.request.run_after or at, at)), None

    def retry(self, dependencies: Mapping[str, Job], at: datetime | None = None) -> tuple[Job, Response]:
        """Queues an ended FAILED or CANCELLED job again by hand (``RetryJob``): the one way past a final Response.

        The same id; its Responses go on from the final one with a CREATED Response
        (``data["reason"]`` ``MANUAL_RETRY``); its attempts count from 0 again. A job
        with dependencies waits for those not ended, as when submitted.

        Args:
            dependencies: as for :meth:`resolve`.
            at: now.

        Raises:
            FailedPrecondition: it has not ended (``REQUEST_NOT_ENDED``), it FINISHED
                (``REQUEST_FINISHED``), its ``expire_time`` passed (``EXPIRE_TIME_PASSED``), or
                a dependency ended FAILED or CANCELLED and its type does not allow that
                (``DEPENDENCY_FAILED``: retry that one first).
        """
        request_id = self.request.id
        metadata = {"request_id": request_id, "state": self.state.name}
        if not self.is_final:
            raise FailedPrecondition(
                f"request {request_id!r} is {self.state.name}: only an ended job can be retried",
                reason="REQUEST_NOT_ENDED",
                metadata=metadata,
            )
        if self.state is RequestState.FINISHED:
            raise FailedPrecondition(
                f"request {request_id!r} FINISHED: only a FAILED or CANCELLED job can be retried",
                reason="REQUEST_FINISHED",
                metadata=metadata,
            )
        at = at or now()
        expire = self.request.expire_time
        if expire is not None and expire <= at:
            raise FailedPrecondition(
                f"request {request_id!r} cannot be retried: its expire_time {_iso(expire)} has passed; "
                "submit it again with a later one",
                reason="EXPIRE_TIME_PASSED",
                metadata={**metadata, "expire_time": _iso(expire) or ""},
            )
        response = Response(
            request_id, self.last_response.sequence + 1, at, RequestState.CREATED, data={"reason": "MANUAL_RETRY"}
        )
        job = dataclasses.replace(
            self,
            state=RequestState.CREATED,
            attempt=0,
            last_response=response,
            update_time=at,
            cancel_requested=False,
            due_time=None if self.request.depends_on else max(self.request.run_after or at, at),
        )
        resolved, cancelled = job.resolve(dependencies, at)
        if cancelled is not None:
            assert cancelled.error is not None
            raise FailedPrecondition(
                f"request {request_id!r} cannot be retried: {cancelled.error.message}; retry that one first",
                reason="DEPENDENCY_FAILED",
                metadata={**metadata, **cancelled.error.metadata},
            )
        return resolved, response

    def as_dict(self) -> dict[str, Any]:
        """Its JSON form, as ``ajs get`` prints it (``json.dumps`` takes it).

        Times in ISO 8601 (None when unset), states by name, the last Response as
        :meth:`Response.as_dict`; the typed ``input`` is left out.
        """
        request = self.request
        return {
            "id": request.id,
            "type": request.type,
            "queue": request.queue,
            "state": self.state.name,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "priority": request.priority,
            "run_after": _iso(request.run_after),
            "due_time": _iso(self.due_time),
            "parent_id": request.parent_id,
            "depends_on": list(request.depends_on),
            "expire_time": _iso(request.expire_time),
            "timeout": request.timeout,
            "creator": request.creator,
            "create_time": _iso(request.create_time),
            "update_time": self.update_time.isoformat(),
            "cancel_requested": self.cancel_requested,
            "data": dict(request.data),
            "last_response": self.last_response.as_dict(),
        }

    @property
    def attempts_left(self) -> bool:
        """True while another claim is allowed by ``max_attempts``."""
        return self.attempt < self.max_attempts

    @property
    def is_final(self) -> bool:
        """True once the job ended."""
        return self.state.is_final

    def advance(self, update: Update, at: datetime | None = None) -> tuple[Job, Response]:
        """Applies ``update``: the next Response and the job after it.

        Raises:
            FailedPrecondition: the job already ended, or the state may not follow.
        """
        self._check_not_final()
        if update.state is RequestState.CREATED and self.cancel_requested:
            # A job a client cancelled never goes back to the queue.
            error = ErrorStatus(Code.CANCELLED, "cancelled by client", "CANCELLED_BY_CLIENT")
            update = Update(RequestState.CANCELLED, error=error)
        if update.state not in _NEXT_STATES.get(self.state, frozenset()):
            raise FailedPrecondition(
                f"request {self.request.id!r} cannot go from {self.state.name} to {update.state.name}",
                reason="INVALID_TRANSITION",
                metadata={"request_id": self.request.id, "state": self.state.name},
            )
        at = at or now()
        response = Response(
            request_id=self.request.id,
            sequence=self.last_response.sequence + 1,
            create_time=at,
            state=update.state,
            is_final=update.state.is_final,
            data=update.data,
            output=update.output,
            progress=update.progress,
            error=update.error,
        )
        attempt = self.attempt
        if self.state is RequestState.CREATED and update.state is RequestState.PENDING:
            attempt += 1  # a claim
        elif update.state is RequestState.CREATED and update.refund_attempt:
            attempt -= 1
        queued = update.state is RequestState.CREATED
        job = dataclasses.replace(
            self,
            state=update.state,
            attempt=attempt,
            last_response=response,
            update_time=at,
            due_time=max(update.run_after or at, at) if queued else None,
        )
        return job, response

    def cancel(self, at: datetime | None = None) -> tuple[Job, Response | None]:
        """Applies a client's cancellation.

        Returns:
            A queued job: the job ended CANCELLED and its final Response. A running
            job: the job marked ``cancel_requested`` and None (its dispatcher stops
            it and reports the final Response).

        Raises:
            FailedPrecondition: the job already ended.
        """
        self._check_not_final()
        if self.state is RequestState.CREATED:
            error = ErrorStatus(Code.CANCELLED, "cancelled while queued", reason="CANCELLED_BY_CLIENT")
            return self.advance(Update(RequestState.CANCELLED, error=error), at)
        return dataclasses.replace(self, cancel_requested=True), None

    def expire(self, at: datetime | None = None) -> tuple[Job, Response]:
        """Applies the loss of a running job's lease (its server died or hung).

        The job goes back to the queue to run at once if its attempts allow,
        else it ends FAILED (a job whose cancellation was asked for ends CANCELLED).
        """
        if self.cancel_requested:
            error = ErrorStatus(Code.CANCELLED, "cancelled by client; its server stopped first", "CANCELLED_BY_CLIENT")
            return self.advance(Update(RequestState.CANCELLED, error=error), at)
        message = f"the server running attempt {self.attempt} stopped (its lease expired)"
        if self.attempts_left:
            error = ErrorStatus(Code.ABORTED, message, "LEASE_EXPIRED")
            return self.advance(Update(RequestState.CREATED, error=error), at)
        error = ErrorStatus(Code.ABORTED, f"{message}; no attempts left of {self.max_attempts}", "LEASE_EXPIRED")
        return self.advance(Update(RequestState.FAILED, error=error), at)

    def _check_not_final(self) -> None:
        if self.is_final:
            raise FailedPrecondition(
                f"request {self.request.id!r} already ended {self.state.name}",
                reason="REQUEST_ALREADY_FINAL",
                metadata={"request_id": self.request.id, "state": self.state.name},
            )


@dataclasses.dataclass(frozen=True)
class RetrySchedule:
    """How a job type's failed attempts run again, as a server publishes it.

    The published part of a plugin's :class:`~ajs_grpc.core.jobs.RetryPolicy`: which
    errors retry stays with the plugin. Durations are in seconds.

    Attributes:
        max_attempts: claims allowed in all; 1 means never retried.
        initial_backoff: the wait before the second attempt.
        max_backoff: the longest wait between attempts.
        multiplier: how much the wait grows per attempt.
        jitter: the random spread of each wait, as a fraction of it.
    """

    max_attempts: int = 1
    initial_backoff: float = 0.0
    max_backoff: float = 0.0
    multiplier: float = 1.0
    jitter: float = 0.0


@dataclasses.dataclass(frozen=True)
class JobType:
    """A job type a server runs, with its typed contract (an entry of ``ListJobTypes``).

    Attributes:
        name: the request type, as in :attr:`Request.type`.
        description: one line for humans.
        handler: the request handler that runs it.
        input_type: the full name of the message :attr:`Request.input` must hold; "" for none.
        output_type: the full name of the message the final :attr:`Response.output` holds; "" for none.
        retry_policy: when a failed attempt runs again.
        timeout: seconds one attempt may run; None for no limit.
        file_descriptor_set: a serialized ``FileDescriptorSet`` defining ``input_type`` and
            ``output_type`` with their dependencies (empty when the type declares neither);
            :mod:`ajs_grpc.edge.dynamic` builds their message classes from it.
        flow: its flow-control policies (per-key concurrency, rate limit, order,
            uniqueness); None when not told (a JobType made without them).
        allow_failed_dependencies: its jobs run once their dependencies ended, whatever
            their end (see :meth:`Job.resolve`).
    """

    name: str
    description: str = ""
    handler: str = ""
    input_type: str = ""
    output_type: str = ""
    retry_policy: RetrySchedule = dataclasses.field(default_factory=RetrySchedule)
    timeout: float | None = None
    file_descriptor_set: bytes = b""
    flow: FlowPolicy | None = None
    allow_failed_dependencies: bool = False
