"""The remote handler: runs jobs in workers connected over the network (any language).

A remote worker opens a session (the edge's ``WorkerService.Work`` stream), declares
the job types it runs and grants credits: how many more jobs it takes. The handler
offers the dispatcher exactly the credits of its sessions, grouped by their types, so
a job is claimed only when a connected worker can take it at once; with no worker
connected, jobs of remote types stay queued. Among the sessions that run a type, a
claimed job goes to the one with the most credit left (the least recently chosen of
equals), which spreads work evenly over equal workers.

Running a job here means: send its assignment to the session, store the progress the
worker reports, and end as the worker's outcome says. A cancel, a timeout, a lost
lease or a shutdown (the job's cancel signal) is pushed to the worker. A session that
ends or breaks hands its jobs back at once (:class:`~ajs_grpc.core.errors.WorkerLost`:
back to the queue to run again, like the jobs of a server that died).

Nothing here speaks gRPC: the edge turns the stream's messages into the calls of
:class:`WorkerSession` and the session's :attr:`~WorkerSession.outbox` into messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from typing_extensions import override

from ajs_grpc.core.errors import AjsError, FailedPrecondition, NotStarted, WorkerLost
from ajs_grpc.core.jobs import JobContext, JobPlugin, JobReturn, Result
from ajs_grpc.core.model import Job, Request, Response
from ajs_grpc.engine.handlers.base import RequestHandler

__all__ = ["Assign", "CancelRun", "RemoteRequestHandler", "WorkerSession", "runs_remotely"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Assign:
    """A job handed to a worker (an ``Assignment``)."""

    request: Request
    attempt: int
    deadline: datetime | None
    dependencies: Mapping[str, Response]


@dataclasses.dataclass(frozen=True)
class CancelRun:
    """A job a worker is to stop (a ``CancelAssignment``)."""

    request_id: str
    attempt: int
    reason: str


Outgoing = Assign | CancelRun


@dataclasses.dataclass(eq=False)
class _Run:
    """One assigned attempt, until its outcome or its end here."""

    ctx: JobContext
    # Progress (fraction, message, data) and the outcome, in the order the worker sent them.
    events: asyncio.Queue[tuple[str, Any]] = dataclasses.field(default_factory=asyncio.Queue)
    cancel_sent: bool = False
    ended: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.ctx.request.id, self.ctx.attempt


class WorkerSession:
    """One connected worker: the types it runs, its credit and the jobs it holds.

    Made by :meth:`RemoteRequestHandler.connect`. The edge calls :meth:`grant`,
    :meth:`drain`, :meth:`progress` and :meth:`outcome` as the worker's messages arrive,
    sends what :attr:`outbox` yields (None: the session is over), and calls
    :meth:`RemoteRequestHandler.disconnect` when the stream ends.
    """

    def __init__(self, handler: RemoteRequestHandler, name: str, types: frozenset[str], credit: int) -> None:
        self.id = f"{name}/{uuid.uuid4().hex[:12]}"
        self.name = name
        self.types = types
        self.credit = credit
        self.outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self.closed = False
        self.draining = False
        self.assigned = 0
        self.reserved = 0  # jobs set aside for it by a claim, not yet assigned
        self._handler = handler
        self._runs: dict[tuple[str, int], _Run] = {}
        self._chosen = 0  # when the handler last chose this session (for fairness among equals)

    @property
    def running(self) -> int:
        """Jobs assigned to the worker and not ended."""
        return len(self._runs)

    def grant(self, count: int) -> None:
        """The worker takes ``count`` more jobs (ignored once it drains)."""
        if self.closed or self.draining:
            return
        self.credit += count
        self._handler.on_released()  # the dispatcher may claim for it now

    def drain(self) -> None:
        """The worker takes no more jobs; the session ends once it holds none."""
        self.draining = True
        self.credit = 0
        self._end_if_drained()

    def _end_if_drained(self) -> None:
        if self.draining and not self._runs and not self.reserved and not self.closed:
            log.info("remote worker %s drained", self.id)
            self.outbox.put_nowait(None)  # the call ends OK; the edge then disconnects it

    def progress(self, request_id: str, attempt: int, fraction: float, message: str, data: Mapping[str, str]) -> bool:
        """Progress of a held job, stored in order before its outcome; False if the job is not held."""
        run = self._runs.get((request_id, attempt))
        if run is None or run.ended:
            return False
        run.events.put_nowait(("progress", (fraction, message, dict(data))))
        return True

    def outcome(self, request_id: str, attempt: int, result: Result | AjsError) -> bool:
        """The end of a held job (what it returned, or why it failed); False if the job is not held."""
        run = self._runs.get((request_id, attempt))
        if run is None or run.ended:
            return False
        run.ended = True
        run.events.put_nowait(("outcome", result))
        return True

    # -- the handler's side -----------------------------------------------------------

    def _assign(self, ctx: JobContext) -> _Run:
        run = _Run(ctx)
        self._runs[run.key] = run
        self.assigned += 1
        self.outbox.put_nowait(Assign(ctx.request, ctx.attempt, ctx.deadline, ctx.dependencies))
        ctx.cancel_signal.add_callback(lambda: self._cancel(run))
        return run

    def _cancel(self, run: _Run) -> None:
        if not run.cancel_sent and not run.ended and not self.closed:
            run.cancel_sent = True
            reason = run.ctx.cancel_signal.reason or "CANCELLED_BY_CLIENT"
            self.outbox.put_nowait(CancelRun(run.ctx.request.id, run.ctx.attempt, reason))

    def _release(self, run: _Run) -> None:
        """The attempt ended here: the worker is told to stop it if it did not end there."""
        if not run.ended:
            self._cancel(run)
            run.ended = True
        self._runs.pop(run.key, None)
        self._end_if_drained()

    def _close(self) -> None:
        self.closed = True
        self.credit = 0
        for run in self._runs.values():
            if not run.ended:
                run.ended = True
                run.events.put_nowait(("lost", None))
        self.outbox.put_nowait(None)


def _signature(plugin: JobPlugin) -> tuple[Any, ...]:
    """What two declarations of a type must share: the typed contract and the policies a JobType carries."""
    retry = plugin.retry
    return (
        plugin.input_type.DESCRIPTOR.full_name if plugin.input_type is not None else "",
        plugin.output_type.DESCRIPTOR.full_name if plugin.output_type is not None else "",
        (retry.max_attempts, retry.initial_backoff, retry.max_backoff, retry.multiplier, retry.jitter),
        plugin.timeout,
        plugin.flow,
        plugin.allow_failed_dependencies,
    )


async def runs_remotely(request: Request, ctx: Any) -> None:
    """The function of a remote type's plugin: never called (the remote handler runs the job)."""
    raise RuntimeError(f"type {request.type!r} runs in remote workers")


class RemoteRequestHandler(RequestHandler):
    """Runs jobs in connected remote workers.

    Its types are those named in the configuration (``--handler remote=TYPE,...``;
    a type a local plugin provides keeps that plugin's contract and policies) and
    those that connected workers declared since the server started.
    """

    name = "remote"

    def __init__(self) -> None:
        super().__init__()
        self._configured: set[str] = set()
        self._sessions: dict[str, WorkerSession] = {}
        self._reserved: dict[str, WorkerSession] = {}
        self._turn = itertools.count(1)

    # -- declarations ------------------------------------------------------------------

    @override
    def register(self, plugin: JobPlugin) -> None:
        """Runs ``plugin.type`` remotely with the plugin's contract and policies (from the configuration)."""
        self._jobs[plugin.type] = plugin
        self._configured.add(plugin.type)

    def expect(self, request_type: str) -> None:
        """Runs ``request_type`` remotely before any worker declared it (from the configuration).

        Until a worker declares it, its submits are taken without an input check.
        """
        self._jobs.setdefault(
            request_type, JobPlugin(request_type, runs_remotely, "runs in remote workers", handler=self.name)
        )

    @property
    def sessions(self) -> list[WorkerSession]:
        """The connected sessions."""
        return list(self._sessions.values())

    def connect(self, name: str, plugins: list[JobPlugin], credit: int) -> WorkerSession:
        """Opens a session for a worker that runs ``plugins``' types and takes ``credit`` jobs.

        A type keeps the first declaration while a worker that made it is connected (or the
        configuration's, if a local plugin provides it): a different one is refused.

        Raises:
            FailedPrecondition: a type is declared otherwise than it is here (``TYPE_DECLARED_DIFFERENTLY``).
        """
        connected = {t for session in self._sessions.values() for t in session.types}

        def binding(request_type: str) -> JobPlugin | None:
            """The declaration a new one must match: the configuration's, or a connected worker's."""
            if request_type in self._configured or request_type in connected:
                return self._jobs.get(request_type)
            return None

        for plugin in plugins:
            known = binding(plugin.type)
            if known is not None and _signature(known) != _signature(plugin):
                whose = "this server's configuration" if plugin.type in self._configured else "a connected worker"
                raise FailedPrecondition(
                    f"job type {plugin.type!r} is declared otherwise by {whose}: the same input_type, output_type, "
                    "retry_policy, timeout, flow policies and allow_failed_dependencies are needed",
                    reason="TYPE_DECLARED_DIFFERENTLY",
                    metadata={"type": plugin.type},
                )
        for plugin in plugins:
            if binding(plugin.type) is None:
                self._jobs[plugin.type] = plugin
        session = WorkerSession(self, name, frozenset(p.type for p in plugins), credit)
        self._sessions[session.id] = session
        log.info(
            "remote worker %s connected: %s, %d at once", session.id, ", ".join(sorted(session.types)), session.credit
        )
        self.on_released()
        return session

    def disconnect(self, session: WorkerSession) -> None:
        """Ends a session: the jobs it holds go back to the queue at once."""
        if self._sessions.pop(session.id, None) is None:
            return
        held = session.running
        session._close()
        log.info("remote worker %s disconnected%s", session.id, f"; handing back {held} job(s)" if held else "")
        self.on_released()

    def close_sessions(self) -> None:
        """Ends every session (the server stops)."""
        for session in list(self._sessions.values()):
            self.disconnect(session)

    # -- what the dispatcher asks ------------------------------------------------------

    @override
    def offers(self) -> list[tuple[list[str], int]]:
        groups: dict[frozenset[str], int] = {}
        for session in self._sessions.values():
            if session.credit > 0:
                groups[session.types] = groups.get(session.types, 0) + session.credit
        return [(sorted(types), credit) for types, credit in groups.items()]

    @override
    def reserve(self, job: Job, offer: list[str]) -> None:
        group = frozenset(offer)  # the credit claimed for is that of the sessions of this group
        candidates = [s for s in self._sessions.values() if s.credit > 0 and s.types == group and not s.closed]
        if not candidates:
            return  # the session went away during the claim: handle() hands the job back
        chosen = max(candidates, key=lambda s: (s.credit, -s._chosen))
        chosen.credit -= 1
        chosen.reserved += 1
        chosen._chosen = next(self._turn)
        self._reserved[job.request.id] = chosen

    def _take(self, request_id: str) -> WorkerSession | None:
        session = self._reserved.pop(request_id, None)
        if session is not None:
            session.reserved -= 1
        return session

    @override
    def unreserve(self, request_id: str) -> None:
        session = self._take(request_id)
        if session is not None and not session.closed:
            if session.draining:
                session._end_if_drained()
            else:
                session.credit += 1
                self.on_released()

    @override
    async def handle(self, ctx: JobContext) -> JobReturn:
        session = self._take(ctx.request.id)
        if session is None or session.closed:
            raise NotStarted("the remote worker it was claimed for went away before it started")
        if session.draining:
            session._end_if_drained()
            raise NotStarted("the remote worker it was claimed for is draining")
        if ctx.cancelled:  # stopped before it was sent: the worker keeps its credit
            session.credit += 1
            self.on_released()
            ctx.raise_if_cancelled()
        run = session._assign(ctx)
        try:
            while True:
                kind, value = await run.events.get()
                if kind == "progress":
                    fraction, message, data = value
                    try:
                        await ctx.progress(fraction, message, data)
                    except (AjsError, ValueError) as error:  # the job goes on; its end is what counts
                        log.warning("could not store progress of request %s: %s", ctx.request.id, error)
                elif kind == "outcome":
                    if isinstance(value, BaseException):
                        raise value
                    result: Result = value
                    return result
                else:
                    raise WorkerLost(f"the remote worker {session.id} went away while running attempt {ctx.attempt}")
        finally:
            session._release(run)
