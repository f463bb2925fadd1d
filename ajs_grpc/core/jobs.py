"""The job plugin API: what a job is, what it gets while it runs, what it returns.

A job is a function of a request and a context, declared with :func:`job`::

    from ajs_grpc.core.jobs import JobContext, job

    @job("countdown", description="Counts down, one progress Response per step.")
    async def countdown(request, ctx: JobContext):
        for step in range(3):
            ctx.raise_if_cancelled()
            await ctx.progress((step + 1) / 3, f"step {step + 1}")
        return {"done": "yes"}

``async def`` jobs run as asyncio tasks and get a :class:`JobContext`; plain
functions run in a thread pool and get a :class:`SyncJobContext`, whose calls
block instead of being awaited. Returning ends the job FINISHED (a mapping of
strings becomes the Response's ``data``, a protobuf message its ``output``,
:class:`Result` gives both); raising ends it FAILED with the error's message.

Workflows: a job reads the final Responses of the requests it depends on from
``ctx.dependencies``, submits children with ``ctx.submit`` (ids derived from its own,
so a retried parent makes the same children again) and may wait for them to end
with ``ctx.wait_for_children``::

    @job("fan-out")
    async def fan_out(request, ctx: JobContext):
        for part in range(10):
            await ctx.submit("resize", data={"part": str(part)})
        children = await ctx.wait_for_children()
        return {"resized": str(sum(c.state is RequestState.FINISHED for c in children))}

Plugins register through the entry-point group ``ajs_grpc.core.jobs``, each entry
naming a :class:`JobPlugin` (what :func:`job` returns).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import hashlib
import inspect
import random
import re
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from ajs_grpc.core.errors import (
    AjsError,
    Code,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobCancelled,
    JobTimeout,
    PermanentError,
    Retry,
)
from ajs_grpc.core.flow import Concurrency, FlowPolicy, JobStates, RateLimit, Unique
from ajs_grpc.core.model import ErrorStatus, Job, Progress, Request, RequestState, Response, Update

__all__ = [
    "MAX_CHILD_ID_LENGTH",
    "NO_RETRY",
    "CancelSignal",
    "Children",
    "Concurrency",
    "FlowPolicy",
    "JobCancelled",
    "JobContext",
    "JobPlugin",
    "JobReturn",
    "JobStates",
    "JobTimeout",
    "PermanentError",
    "RateLimit",
    "Result",
    "Retry",
    "RetryPolicy",
    "SyncJobContext",
    "Unique",
    "child_id",
    "failure",
    "job",
    "to_update",
]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When and how a failed job runs again.

    A job is claimed at most ``max_attempts`` times in all, whether an attempt
    failed with an error or ended because its server died (its lease expired).
    Between attempts that failed with an error the job waits
    ``initial_backoff * multiplier ** (attempt - 1)`` seconds, at most
    ``max_backoff``, spread by +/- ``jitter`` (a fraction).

    Attributes:
        max_attempts: claims allowed in all; 1 means never retry.
        initial_backoff: seconds before the second attempt.
        max_backoff: the longest wait between attempts.
        multiplier: how much the wait grows per attempt.
        jitter: random spread of each wait, as a fraction of it (0 to 1).
        retry_on: the error types that retry; others fail at once.
            :class:`PermanentError` never retries; :class:`Retry` always does.
    """

    max_attempts: int = 3
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative and multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def retries(self, error: BaseException) -> bool:
        """True when ``error`` may be retried (attempts aside)."""
        if isinstance(error, Retry):
            return True
        if isinstance(error, PermanentError) or (isinstance(error, AjsError) and error.code in _PERMANENT_CODES):
            return False
        return isinstance(error, self.retry_on)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(attempt - 1, 0))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


# Project errors whose cause another attempt cannot remove (bad input, a type nobody runs, ...).
_PERMANENT_CODES = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.PERMISSION_DENIED,
        Code.FAILED_PRECONDITION,
        Code.UNIMPLEMENTED,
        Code.UNAUTHENTICATED,
    }
)

NO_RETRY = RetryPolicy(max_attempts=1)
"""The policy of jobs that must never run twice."""


@dataclasses.dataclass(frozen=True)
class Result:
    """What a job may return: ``data`` (strings) and/or a typed ``output``."""

    data: Mapping[str, str] = dataclasses.field(default_factory=dict)
    output: Message | None = None


JobReturn: TypeAlias = Result | Mapping[str, str] | Message | None
Reporter: TypeAlias = Callable[[Update], Coroutine[Any, Any, None]]


class CancelSignal:
    """Set once when the job is to stop: polled from any thread, awaited on the loop."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""
        """Why the job is to stop (``CANCELLED_BY_CLIENT``, ``JOB_TIMEOUT``, ...), once set."""

    def set(self, reason: str = "") -> None:
        """Asks the job to stop, for ``reason``. Call on the event loop."""
        if self._flag.is_set():
            return
        self.reason = reason
        self._flag.set()
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` (on the event loop) when the signal is set; at once if it is."""
        if self._flag.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._flag.is_set()

    async def wait(self) -> None:
        """Returns once :meth:`set` was called."""
        await self._event.wait()

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Blocks a thread until set or ``timeout``; returns whether it was set."""
        return self._flag.wait(timeout)


T = TypeVar("T")

MAX_CHILD_ID_LENGTH = 128
"""The longest child id written out as ``{parent_id}/{key}``; a longer one takes a hashed form."""

# A child's key: printable ASCII without "/" (so "{parent}/{key}" names one parent and one key).
_KEY = re.compile(r"[!-.0-~]+")


def child_id(parent_id: str, key: str) -> str:
    """The id of the child ``key`` of ``parent_id``: the same on every attempt of the parent.

    ``{parent_id}/{key}`` when at most :data:`MAX_CHILD_ID_LENGTH` characters long, else
    ``{namespace}{first characters of the parent's id}/~{sha256 of the long form}``. The
    namespace (``~name/``, see the edge's per-principal ids) is kept, so a child stays in
    its parent's namespace.
    """
    full = f"{parent_id}/{key}"
    if len(full) <= MAX_CHILD_ID_LENGTH:
        return full
    namespace = ""
    if parent_id.startswith("~") and "/" in parent_id:
        namespace = parent_id[: parent_id.index("/") + 1]
    digest = hashlib.sha256(full.encode()).hexdigest()
    room = max(MAX_CHILD_ID_LENGTH - len(namespace) - len(digest) - 2, 0)
    head = parent_id[len(namespace) : len(namespace) + room]
    return f"{namespace}{head}/~{digest}"


class Children(Protocol):
    """What a job's context asks of the engine to submit children and wait for them.

    The dispatcher gives each :class:`JobContext` one; the core knows no connector.
    """

    async def submit(self, request: Request) -> Job:
        """Enqueues a child (idempotent on its id) and returns its job."""
        ...

    async def wait_for_children(self, parent_id: str) -> list[Job]:
        """Returns the children of ``parent_id``, in submit order, once every one has ended."""
        ...


class _BaseContext:
    """What every job context holds."""

    def __init__(
        self,
        request: Request,
        attempt: int,
        cancel: CancelSignal,
        input: Message | None = None,  # noqa: A002 - the contract's name
        dependencies: Mapping[str, Response] | None = None,
    ) -> None:
        self.request = request
        """The request being run."""
        self.attempt = attempt
        """1 on the first run; higher when the job runs again."""
        self.input = input
        """``request.input`` decoded as the job's ``input_type`` (None if it has none)."""
        self.dependencies: Mapping[str, Response] = MappingProxyType(dict(dependencies or {}))
        """The final Response of each of ``request.depends_on``, by request id, read when the attempt
        started: a dependency's result is its ``data`` and typed ``output``. One deleted since it
        ended is absent. (With a type that allows failed dependencies, check each one's ``state``.)"""
        self._cancel = cancel

    @property
    def cancel_signal(self) -> CancelSignal:
        """The job's cancel signal (its :attr:`~CancelSignal.reason` says why, once set)."""
        return self._cancel

    @property
    def cancelled(self) -> bool:
        """True once cancellation was asked for; a long job should then stop."""
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        """Raises :class:`JobCancelled` if cancellation was asked for."""
        if self._cancel.is_set():
            raise JobCancelled(f"request {self.request.id!r} was cancelled")


def _progress_update(fraction: float, message: str, data: Mapping[str, str] | None) -> Update:
    return Update(RequestState.PENDING, data=_check_data(data or {}), progress=Progress(fraction, message))


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"a child's key must be printable ASCII without spaces or '/', not {key!r}")
    return key


def _dependency_id(dependency: str | Job) -> str:
    return dependency.request.id if isinstance(dependency, Job) else dependency


class JobContext(_BaseContext):
    """The context of an ``async def`` job.

    Args:
        request: the request being run.
        attempt: 1 on the first run.
        report: stores an Update (a coroutine function).
        cancel: the job's cancel signal.
        input: the decoded typed input, if the job declares one.
        dependencies: the final Responses of its dependencies (see :attr:`dependencies`).
        children: submits children and waits for them (the dispatcher's); None where
            there is no dispatcher (then :meth:`submit` and :meth:`wait_for_children` raise).
        deadline: when the attempt must have ended; None for no limit.
    """

    def __init__(
        self,
        request: Request,
        attempt: int,
        report: Reporter,
        cancel: CancelSignal,
        input: Message | None = None,  # noqa: A002 - the contract's name
        *,
        dependencies: Mapping[str, Response] | None = None,
        children: Children | None = None,
        deadline: datetime | None = None,
    ) -> None:
        super().__init__(request, attempt, cancel, input, dependencies)
        self.deadline = deadline
        """When the attempt must have ended (its timeout); None for no limit."""
        self._report = report
        self._children = children
        self._submits = 0

    async def progress(self, fraction: float, message: str = "", data: Mapping[str, str] | None = None) -> None:
        """Reports progress as an intermediate Response; returns once it is stored.

        Args:
            fraction: how much is done, from 0 to 1.
            message: a human-readable note.
            data: extra strings for the Response.
        """
        await self._report(_progress_update(fraction, message, data))

    async def wait_cancelled(self) -> None:
        """Returns once cancellation was asked for (use with ``asyncio.wait``)."""
        await self._cancel.wait()

    async def sleep(self, seconds: float) -> None:
        """Sleeps ``seconds``, or raises :class:`JobCancelled` as soon as the job is cancelled."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancel.wait(), seconds)
        self.raise_if_cancelled()

    async def submit(
        self,
        type: str,  # noqa: A002 - the contract's name
        *,
        key: str | None = None,
        data: Mapping[str, str] | None = None,
        input: Message | None = None,  # noqa: A002 - the contract's name
        priority: int = 0,
        queue: str = "",
        depends_on: Iterable[str | Job] = (),
        run_after: datetime | None = None,
        expire_time: datetime | None = None,
        max_attempts: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - the request's timeout, not this call's
    ) -> Job:
        """Submits a child of this job and returns it (queued; it runs like any request).

        The child's ``parent_id`` is this job's id and its creator this job's (its owner
        inherits it). Its id is :func:`child_id` of this job's id and ``key``, so when this
        job runs again (a retry, or after its server died) the same calls name the same
        children: a child already stored with the same content is answered, not made twice.
        For that, give the same arguments on every attempt (a ``run_after`` computed from
        the clock differs; a child with the same id and other content is refused with
        ALREADY_EXISTS).

        Cancelling this job cancels its unfinished children. A child is not waited for
        unless the job calls :meth:`wait_for_children`: children left running keep
        running after this job ends.

        Args:
            type: the child's job type; one a handler of this server runs.
            key: names the child among this job's; default: the number of this call
                among this attempt's calls of ``submit`` (1, 2, 3 ...), which is the same
                on each attempt when the job submits in the same order. Printable ASCII,
                no spaces or ``/``.
            data: untyped parameters.
            input: the typed input: a protobuf message (packed into an ``Any``) or an ``Any``.
            priority: higher runs first.
            queue: its queue; "" is the default queue (not this job's).
            depends_on: requests (ids, or jobs ``submit`` returned) that must end first.
            run_after: not started before this time.
            expire_time: if not started by then, it ends CANCELLED (``EXPIRED``).
            max_attempts: its attempts, at most its type's; 0 for its type's.
            timeout: seconds an attempt may run, at most its type's; None for its type's.

        Raises:
            FailedPrecondition: no handler here runs ``type`` (``TYPE_NOT_SUPPORTED``).
            InvalidArgument: ``input`` is not what the type takes.
            AlreadyExists: the child's id is taken by a request with other content.
            JobCancelled: this job was cancelled (a child made meanwhile is cancelled too).
            ValueError: a malformed ``key`` or ``data``.
        """
        children = self._require_children("submit")
        self._submits += 1
        name = str(self._submits) if key is None else _check_key(key)
        self.raise_if_cancelled()
        request = Request(
            id=child_id(self.request.id, name),
            type=type,
            data=_check_data(data or {}),
            input=_pack(input) if input is not None else None,
            parent_id=self.request.id,
            creator=self.request.creator,
            priority=priority,
            run_after=run_after,
            queue=queue,
            depends_on=tuple(_dependency_id(d) for d in depends_on),
            expire_time=expire_time,
            max_attempts=max_attempts,
            timeout=timeout,
        )
        return await children.submit(request)

    async def wait_for_children(self) -> list[Job]:
        """Waits until every child of this job has ended; returns them in submit order.

        A parent that calls it finishes after its children (it holds its slot of the
        server's ``max_jobs`` meanwhile); one that does not leaves them running. Children
        submitted while it waits (by this job or a client) are waited for too.

        Raises:
            JobCancelled: this job was cancelled while it waited (its unfinished children
                are cancelled with it).
        """
        children = self._require_children("wait_for_children")
        self.raise_if_cancelled()
        waiting = asyncio.ensure_future(children.wait_for_children(self.request.id))
        stop = asyncio.ensure_future(self._cancel.wait())
        try:
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
        if not waiting.cancelled() and waiting.exception() is None:
            return waiting.result()
        self.raise_if_cancelled()
        return waiting.result()  # raises what the wait raised

    def _require_children(self, what: str) -> Children:
        if self._children is None:
            raise RuntimeError(f"ctx.{what} needs a dispatcher: this context was made without one")
        return self._children


class SyncJobContext(_BaseContext):
    """The context of a plain-function job, in a worker thread or a worker process.

    Its calls block instead of being awaited. In a worker process (handler ``process``)
    :meth:`submit` and :meth:`wait_for_children` are not available (they raise
    FAILED_PRECONDITION): run a job that makes children on the internal handler.

    Args:
        request, attempt, cancel, input, dependencies: as for :class:`JobContext`.
        deliver: stores an Update, blocking until it is stored.
        twin: the job's :class:`JobContext` and its event loop, for a job running in a
            thread beside that loop (see :meth:`in_thread`); None in a worker process.
    """

    def __init__(
        self,
        request: Request,
        attempt: int,
        cancel: CancelSignal,
        input: Message | None,  # noqa: A002 - the contract's name
        deliver: Callable[[Update], None],
        *,
        dependencies: Mapping[str, Response] | None = None,
        twin: tuple[JobContext, asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        super().__init__(request, attempt, cancel, input, dependencies)
        self._deliver = deliver
        self._twin = twin

    @classmethod
    def in_thread(cls, context: JobContext, loop: asyncio.AbstractEventLoop) -> SyncJobContext:
        """The blocking twin of ``context``, for a job running in a thread beside ``loop``."""

        def deliver(update: Update) -> None:
            asyncio.run_coroutine_threadsafe(context._report(update), loop).result()

        return cls(
            context.request,
            context.attempt,
            context._cancel,
            context.input,
            deliver,
            dependencies=context.dependencies,
            twin=(context, loop),
        )

    def progress(self, fraction: float, message: str = "", data: Mapping[str, str] | None = None) -> None:
        """Reports progress; blocks until the Response is stored. See :meth:`JobContext.progress`."""
        self._deliver(_progress_update(fraction, message, data))

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleeps until cancellation is asked for or ``timeout`` passes; True if cancelled."""
        return self._cancel.wait_blocking(timeout)

    def sleep(self, seconds: float) -> None:
        """Sleeps ``seconds``, or raises :class:`JobCancelled` as soon as the job is cancelled."""
        self._cancel.wait_blocking(seconds)
        self.raise_if_cancelled()

    def submit(
        self,
        type: str,  # noqa: A002 - the contract's name
        *,
        key: str | None = None,
        data: Mapping[str, str] | None = None,
        input: Message | None = None,  # noqa: A002 - the contract's name
        priority: int = 0,
        queue: str = "",
        depends_on: Iterable[str | Job] = (),
        run_after: datetime | None = None,
        expire_time: datetime | None = None,
        max_attempts: int = 0,
        timeout: float | None = None,
    ) -> Job:
        """Submits a child; blocks until it is stored. See :meth:`JobContext.submit`."""
        return self._on_loop(
            "submit",
            lambda context: context.submit(
                type,
                key=key,
                data=data,
                input=input,
                priority=priority,
                queue=queue,
                depends_on=tuple(depends_on),
                run_after=run_after,
                expire_time=expire_time,
                max_attempts=max_attempts,
                timeout=timeout,
            ),
        )

    def wait_for_children(self) -> list[Job]:
        """Blocks until every child of this job has ended. See :meth:`JobContext.wait_for_children`."""
        return self._on_loop("wait_for_children", lambda context: context.wait_for_children())

    def _on_loop(self, what: str, call: Callable[[JobContext], Coroutine[Any, Any, T]]) -> T:
        if self._twin is None:
            raise FailedPrecondition(
                f"ctx.{what} is not available to a job in a worker process (handler 'process'); "
                "run the job on the internal handler",
                reason="NOT_IN_WORKER_PROCESS",
                metadata={"type": self.request.type},
            )
        context, loop = self._twin
        return asyncio.run_coroutine_threadsafe(call(context), loop).result()


@dataclasses.dataclass(frozen=True)
class JobPlugin:
    """A job type and the function that runs it (the seed's Job plugin).

    Attributes:
        type: the request type this job runs.
        function: ``async def f(request, ctx: JobContext)`` or
            ``def f(request, ctx: SyncJobContext)``.
        description: one line for humans.
        retry: when it runs again after a failure or a crash.
        timeout: seconds an attempt may run before it is cancelled and fails
            with DEADLINE_EXCEEDED; None for no limit.
        input_type: the protobuf message ``Request.input`` must hold (checked at
            submit; the job gets it decoded as ``ctx.input``); None if the job
            takes no typed input.
        output_type: the protobuf message the job returns (packed into the final
            ``Response.output``); None if it returns none.
        handler: the handler that runs it when the configuration names none
            (``internal``, or ``process`` for CPU-bound plain functions).
        flow: its flow-control policies (per-key concurrency, rate limit, order,
            uniqueness); see :mod:`ajs_grpc.core.flow`.
        allow_failed_dependencies: its jobs run once their dependencies
            (``Request.depends_on``) ended, whatever their end; otherwise one that ends
            FAILED or CANCELLED cancels them (reason ``DEPENDENCY_FAILED``).
    """

    type: str
    function: Callable[..., Any]
    description: str = ""
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    input_type: builtins.type[Message] | None = None
    output_type: builtins.type[Message] | None = None
    handler: str = "internal"
    flow: FlowPolicy = dataclasses.field(default_factory=FlowPolicy)
    allow_failed_dependencies: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.allow_failed_dependencies, bool):
            raise TypeError(f"job {self.type!r}: allow_failed_dependencies must be a bool")
        if not isinstance(self.flow, FlowPolicy):
            raise TypeError(f"job {self.type!r}: flow must be a FlowPolicy")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if not callable(self.function):
            raise TypeError(f"job {self.type!r}: its function is not callable")
        try:
            inspect.signature(self.function).bind(None, None)
        except TypeError:
            raise TypeError(f"job {self.type!r}: its function must take (request, ctx)") from None
        except ValueError:  # no signature to inspect (a builtin): trust it
            pass
        for name, declared in (("input_type", self.input_type), ("output_type", self.output_type)):
            if declared is not None and not (isinstance(declared, type) and issubclass(declared, Message)):
                raise TypeError(f"job {self.type!r}: {name} must be a protobuf message class")

    def decode_input(self, payload: any_pb2.Any | None) -> Message | None:
        """Checks a request's ``input`` against ``input_type`` and decodes it.

        Raises:
            InvalidArgument: with a field violation on ``request.input``.
        """
        if self.input_type is None:
            if payload is not None and payload.type_url:
                raise _bad_input(f"job type {self.type!r} takes no typed input (use data)")
            return None
        expected = self.input_type.DESCRIPTOR.full_name
        if payload is None or not payload.type_url:
            raise _bad_input(f"is required: job type {self.type!r} takes a {expected}")
        if payload.TypeName() != expected:
            given = payload.TypeName() or payload.type_url
            given = given if len(given) <= 200 else given[:200] + "..."
            raise _bad_input(f"must hold a {expected}, not a {given!r}")
        message = self.input_type()
        try:
            message.ParseFromString(payload.value)
        except DecodeError as error:
            raise _bad_input(f"is not a valid {expected}: {error}") from None
        return message

    def check_output(self, output: Message | None) -> None:
        """Raises TypeError unless ``output`` is what ``output_type`` declares."""
        if self.output_type is None or output is None:
            return
        name = output.TypeName() if isinstance(output, any_pb2.Any) else output.DESCRIPTOR.full_name
        if name != self.output_type.DESCRIPTOR.full_name:
            raise TypeError(
                f"job {self.type!r} returned a {name}, not the {self.output_type.DESCRIPTOR.full_name} it declares"
            )

    @property
    def is_async(self) -> bool:
        """True for ``async def`` jobs."""
        return inspect.iscoroutinefunction(self.function)


def _bad_input(description: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid request: request.input: {description}",
        [FieldViolation("request.input", description)],
        reason="INVALID_INPUT",
    )


def job(
    type: str,  # noqa: A002
    *,
    description: str = "",
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    input_type: type[Message] | None = None,
    output_type: type[Message] | None = None,
    handler: str = "internal",
    concurrency: Concurrency | None = None,
    rate_limit: RateLimit | None = None,
    ordered_by: str | None = None,
    unique: Unique | None = None,
    allow_failed_dependencies: bool = False,
) -> Callable[[Callable[..., Any]], JobPlugin]:
    """Declares a function as the job plugin for ``type``; the arguments are :class:`JobPlugin`'s.

    ``description`` defaults to the first line of the function's docstring. The flow
    policies make the plugin's :attr:`JobPlugin.flow`; each works per key, the value
    of a named ``Request.data`` entry (requests without it share the empty key)::

        @job("resize", concurrency=Concurrency(key="tenant", limit=2),
             rate_limit=RateLimit(key="endpoint", rate=10, per="1s"),
             ordered_by="account", unique=Unique(key="image", ttl="1h"))

    With ``allow_failed_dependencies`` its jobs run once their dependencies ended,
    whatever their end (a clean-up or a report step); see :attr:`JobContext.dependencies`.

    Raises:
        ValueError: a policy is malformed (``ordered_by`` empty, ...).
    """
    flow = FlowPolicy(concurrency, rate_limit, ordered_by, unique)

    def declare(function: Callable[..., Any]) -> JobPlugin:
        doc = (inspect.getdoc(function) or "").splitlines()
        return JobPlugin(
            type,
            function,
            description or (doc[0] if doc else ""),
            retry or RetryPolicy(),
            timeout,
            input_type,
            output_type,
            handler,
            flow,
            allow_failed_dependencies,
        )

    return declare


def _check_data(data: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(data, Mapping):
        raise TypeError(f"job data must be a mapping of strings, not {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"job data must map str to str; got {key!r}: {type(value).__name__}")
    return dict(data)


def _pack(output: Message) -> any_pb2.Any:
    if isinstance(output, any_pb2.Any):
        return output
    packed = any_pb2.Any()
    packed.Pack(output)
    return packed


def to_update(returned: JobReturn) -> Update:
    """The final FINISHED Update for what a job returned.

    Raises:
        TypeError: the job returned something that is not a :data:`JobReturn`.
    """
    if returned is None:
        return Update(RequestState.FINISHED)
    if isinstance(returned, Result):
        if returned.output is not None and not isinstance(returned.output, Message):
            raise TypeError(f"Result.output must be a protobuf message, not {type(returned.output).__name__}")
        output = _pack(returned.output) if returned.output is not None else None
        return Update(RequestState.FINISHED, data=_check_data(returned.data), output=output)
    if isinstance(returned, Message):
        return Update(RequestState.FINISHED, output=_pack(returned))
    return Update(RequestState.FINISHED, data=_check_data(returned))


def error_status(error: BaseException) -> ErrorStatus:
    """The Status of a failed attempt: the project's errors carry theirs (job signals too)."""
    if isinstance(error, AjsError):
        return ErrorStatus(error.code, error.message, reason=error.reason, metadata=error.metadata)
    return failure(error)


def failure(error: BaseException) -> ErrorStatus:
    """The error of a job that raised ``error``."""
    message = str(error) or type(error).__name__
    return ErrorStatus(Code.UNKNOWN, message, reason="JOB_FAILED", metadata={"exception": type(error).__name__})
