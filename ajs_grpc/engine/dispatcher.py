"""The dispatcher: claims queued requests and runs them through the handler chain.

Claiming: it claims as many due requests as it has free slots
(``max_concurrent_jobs``), then sleeps until the connector reports new work, a
job ends, or the next delayed request falls due. There is no poll loop, so a
request submitted to an idle server starts within a few event-loop turns.

Leases: every claim holds a lease that a heartbeat renews while the job runs.
A job whose lease is lost (another server recovered it) is stopped without a
final Response of its own. Housekeeping recovers jobs whose lease expired (their
server died) and prunes ended jobs older than the retention period.

Ending: returning ends a job FINISHED; an error ends it FAILED unless its retry
policy sends it back to the queue (CREATED) with a backoff. A job that runs past
its timeout (its type's or its request's, whichever is smaller) is stopped and
fails with DEADLINE_EXCEEDED (then is retried if its policy says so).

Workflows: before an attempt starts, the final Response of each of the request's
dependencies is read from the store into ``ctx.dependencies``; ``ctx.submit`` and
``ctx.wait_for_children`` go through :class:`ChildJobs`, which resolves a child with
the handler chain and enqueues it with the connector.

Stopping a job escalates in three steps: its cancel signal is set; after
``cancel_grace`` seconds its task is cancelled (an ``asyncio.CancelledError`` in an
async job; a thread-pool job is detached); if it still has not stopped a moment
later it is abandoned. Whatever the job does, the dispatcher writes the one final
Response itself.

On :meth:`Dispatcher.stop`, claiming stops, running jobs get ``shutdown_grace``
seconds to end, and those still running are stopped the same way and handed
back to the queue (PENDING -> CREATED), to run again on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from ajs_grpc.connectors.base import Claim, Connector, JobFilter, dependency_not_found
from ajs_grpc.core.errors import (
    AjsError,
    Code,
    FailedPrecondition,
    JobCancelled,
    JobTimeout,
    NotFound,
    NotStarted,
    PermanentError,
    Retry,
    Unavailable,
)
from ajs_grpc.core.jobs import (
    NO_RETRY,
    CancelSignal,
    JobContext,
    JobPlugin,
    JobReturn,
    error_status,
    to_update,
)
from ajs_grpc.core.logs import current_request_id
from ajs_grpc.core.model import ErrorStatus, Job, Request, RequestState, Response, Update, now
from ajs_grpc.engine.handlers.base import HandlerChain

__all__ = ["ChildJobs", "Dispatcher", "JobObserver", "attempt_timeout"]

log = logging.getLogger(__name__)

# How long a job whose task was cancelled may take to unwind before it is abandoned.
ABANDON_AFTER = 1.0
# Pause after a connector error in a background loop, so a broken store is not hammered.
ERROR_BACKOFF = 0.5
# Cancellations of jobs not running here that are remembered, in case their claim
# arrives just after (ids of other servers' jobs pass through too, hence the bound).
RECENT_CANCELS = 1024


class _StopReason(enum.Enum):
    CLIENT = "cancelled by client"
    SHUTDOWN = "server shutting down"
    TIMEOUT = "timed out"
    LEASE_LOST = "lease lost"


# Each stop reason as the job's cancel signal (and a remote worker) is told it.
_STOP_CODES = {
    _StopReason.CLIENT: "CANCELLED_BY_CLIENT",
    _StopReason.SHUTDOWN: "SERVER_SHUTDOWN",
    _StopReason.TIMEOUT: "JOB_TIMEOUT",
    _StopReason.LEASE_LOST: "LEASE_LOST",
}


@dataclasses.dataclass(eq=False)
class _Execution:
    claim: Claim
    cancel: CancelSignal
    task: asyncio.Task[JobReturn] | None = None
    stop_reason: _StopReason | None = None
    # Resolved when the job is given up on (a plain future: no task per job).
    abandoned: asyncio.Future[None] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    timers: list[asyncio.TimerHandle] = dataclasses.field(default_factory=list)
    runner: asyncio.Task[None] | None = None
    # An earlier run of the same job on this server, still stopping.
    after: asyncio.Task[None] | None = None
    # The limit of this attempt's time and whose it is ("type" or "request"), see attempt_timeout.
    timeout: tuple[float, str] | None = None
    # Claimed for a handler's offer (a remote worker's credit), outside max_concurrent_jobs.
    offered: bool = False

    @property
    def request_id(self) -> str:
        return self.claim.job.request.id


class JobObserver(Protocol):
    """What the dispatcher reports (metrics)."""

    def job_started(self, request_type: str, waited: float) -> None:
        """A first attempt began ``waited`` seconds after its request was due."""

    def job_ended(self, request_type: str, state: RequestState, seconds: float) -> None:
        """An attempt that ran ``seconds`` ended in ``state`` (CREATED: it runs again)."""


class _NoObserver:
    def job_started(self, request_type: str, waited: float) -> None:
        pass

    def job_ended(self, request_type: str, state: RequestState, seconds: float) -> None:
        pass


def attempt_timeout(plugin: JobPlugin | None, request: Request) -> tuple[float, str] | None:
    """The seconds one attempt of ``request`` may run, and whose limit that is (``type`` or ``request``).

    The smaller of its type's ``timeout`` and the request's own (either may be unset; the
    type's when equal); None for no limit.
    """
    limits = []
    if plugin is not None and plugin.timeout is not None:
        limits.append((plugin.timeout, "type"))
    if request.timeout is not None and request.timeout > 0:
        limits.append((request.timeout, "request"))
    return min(limits, key=lambda limit: limit[0]) if limits else None


# Children listed per read while a parent waits for them.
CHILDREN_PAGE = 500


class ChildJobs:
    """Submits the children of one running job and waits for them.

    What a job's ``ctx.submit`` and ``ctx.wait_for_children`` call (see
    :class:`~ajs_grpc.core.jobs.Children`).

    Args:
        connector: the queue.
        chain: the handler chain that resolves a child's attempts, flow and dependency rule.
        parent: the running job.
        cancel: the running job's cancel signal.
    """

    def __init__(self, connector: Connector, chain: HandlerChain, parent: Job, cancel: CancelSignal) -> None:
        self._connector = connector
        self._chain = chain
        self._parent = parent
        self._cancel = cancel

    async def submit(self, request: Request) -> Job:
        """Enqueues a child (idempotent: a stored one with the same content is answered).

        Raises:
            FailedPrecondition: no handler of the chain runs its type (``TYPE_NOT_SUPPORTED``).
            InvalidArgument: its input is not what its type takes.
            AlreadyExists: its id is taken by a request with other content.
            NotFound: a dependency is not stored, or is another owner's (``DEPENDENCY_NOT_FOUND``).
            JobCancelled: the parent was cancelled; a child just made is cancelled too.
        """
        plugin = self._chain.plugin_for(request.type)
        if plugin is None:
            raise FailedPrecondition(
                f"cannot submit a child of type {request.type!r}: no handler of this server runs it",
                reason="TYPE_NOT_SUPPORTED",
                metadata={"type": request.type},
            )
        plugin.decode_input(request.input)
        for dependency_id in request.depends_on:  # only the owner's own jobs, as at the edge
            try:
                dependency = await self._connector.get(dependency_id)
            except NotFound:
                raise dependency_not_found(dependency_id) from None
            if dependency.request.creator != self._parent.request.creator:
                raise dependency_not_found(dependency_id)
        submit = self._chain.submit(request)
        job, created = await self._connector.enqueue(
            submit.request, submit.max_attempts, submit.flow, allow_failed_dependencies=submit.allow_failed_dependencies
        )
        if created and await self._parent_cancelled():
            # The parent's cancellation cancels the children stored when it was asked for:
            # one stored after it is cancelled here.
            with contextlib.suppress(FailedPrecondition, NotFound):
                job = await self._connector.cancel(job.request.id)
            raise JobCancelled(f"request {self._parent.request.id!r} was cancelled")
        return job

    async def _parent_cancelled(self) -> bool:
        if self._cancel.is_set():
            return True
        try:
            parent = await self._connector.get(self._parent.request.id)
        except NotFound:
            return True
        return parent.cancel_requested or parent.is_final

    async def wait_for_children(self, parent_id: str) -> list[Job]:
        """The children of ``parent_id`` in submit order, once every one has ended.

        Lists them, follows each unfinished one's Responses until its final one, and
        lists again until a listing finds all ended (children may be added meanwhile).
        """
        while True:
            children = await self._list(parent_id)
            unfinished = [child for child in children if not child.is_final]
            if not unfinished:
                return children
            for child in unfinished:
                await self._ended(child)

    async def _list(self, parent_id: str) -> list[Job]:
        children: list[Job] = []
        cursor = 0
        while True:
            page = await self._connector.list_jobs(JobFilter(parent_id=parent_id), CHILDREN_PAGE, cursor)
            children.extend(page.jobs)
            if page.next_cursor is None:
                return children
            cursor = page.next_cursor

    async def _ended(self, child: Job) -> None:
        try:
            async for response in self._connector.watch(child.request.id, child.last_response.sequence):
                if response.is_final:
                    return
        except NotFound:
            return  # deleted, hence ended


def default_worker_id() -> str:
    """``host:pid``: who claimed a job, as shown in its PENDING Response."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    """Claims requests and runs them, at most ``max_concurrent_jobs`` at a time.

    Args:
        connector: the queue.
        chain: the handler chain.
        max_concurrent_jobs: jobs running at once (the seed's MaximumJobCount).
        cancel_grace: seconds a signalled job has to stop before its task is cancelled.
        shutdown_grace: seconds running jobs have to finish on :meth:`stop`.
        lease: seconds a claim's lease lasts; renewed every third of it.
        housekeeping_interval: seconds between recoveries of expired leases.
        retention: seconds ended jobs are kept; None keeps them forever.
        worker_id: who claims; defaults to ``host:pid``.
        observer: told of started and ended attempts (metrics).
        max_result_bytes: the largest result (data and output of the final
            Response) a job may return; a larger one fails the job, so every reply
            that carries it stays within the message size limit.
        queues: the queues it claims from; None for every queue.
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        *,
        max_concurrent_jobs: int = 8,
        cancel_grace: float = 10.0,
        shutdown_grace: float = 30.0,
        lease: float = 30.0,
        housekeeping_interval: float | None = None,
        retention: float | None = None,
        worker_id: str | None = None,
        observer: JobObserver | None = None,
        max_result_bytes: int = 2 * 1024 * 1024,
        queues: Collection[str] | None = None,
    ) -> None:
        if max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be at least 1")
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.connector = connector
        self.chain = chain
        self.max_concurrent_jobs = max_concurrent_jobs
        self.cancel_grace = cancel_grace
        self.shutdown_grace = shutdown_grace
        self.lease = lease
        self.housekeeping_interval = housekeeping_interval or lease / 2
        self.retention = retention
        self.worker_id = worker_id or default_worker_id()
        self.observer = observer or _NoObserver()
        self.max_result_bytes = max_result_bytes
        self.types = sorted(name for name, handler in chain.types if handler.offers() is None)
        """The types this dispatcher claims into its slots: those its chain runs (another instance may
        run others), but for those of handlers that make offers (remote workers), claimed per offer."""
        self._offering = [handler for handler in chain.handlers if handler.offers() is not None]
        self.queues = sorted(queues) if queues is not None else None
        """The queues this dispatcher claims from; None for all."""
        self._running: dict[str, _Execution] = {}
        self._recent_cancels: dict[str, None] = {}  # insertion-ordered, bounded
        self._renewed_at = 0.0
        self.abandoned: set[asyncio.Task[JobReturn]] = set()
        """Tasks of jobs that ignored cancellation and were given up on; they may still run."""
        self._runners: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._claimer: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._give_up_at: float | None = None

    @property
    def running(self) -> frozenset[str]:
        """The ids of the requests running now."""
        return frozenset(self._running)

    @property
    def abandoned_count(self) -> int:
        """Jobs given up on whose work still runs (tasks and threads); they hold slots of ``max_concurrent_jobs``."""
        return len(self.abandoned) + sum(handler.abandoned for handler in self.chain.handlers)

    async def start(self) -> None:
        """Recovers expired leases, then starts claiming and the background loops."""
        self.connector.add_listener(self)
        for handler in self.chain.handlers:
            handler.on_released = self._wake.set
        self._renewed_at = asyncio.get_running_loop().time()
        await self._housekeep()
        self._claimer = asyncio.create_task(self._claim_loop(), name="ajs-claim")
        self._background = [
            asyncio.create_task(self._every(self.lease / 3, self._heartbeat), name="ajs-heartbeat"),
            asyncio.create_task(self._every(self.housekeeping_interval, self._housekeep), name="ajs-housekeeping"),
        ]

    async def stop(self) -> None:
        """Stops claiming, lets running jobs finish within the grace periods, then returns."""
        self._stopping = True
        self._wake.set()
        # A final Response that cannot be stored (the store is away) is retried until then.
        self._give_up_at = asyncio.get_running_loop().time() + self.shutdown_grace + self.cancel_grace + ABANDON_AFTER
        if self._claimer is not None:
            await self._claimer
        if self._runners:
            log.info("waiting up to %.1fs for %d running job(s)", self.shutdown_grace, len(self._runners))
            await asyncio.wait(self._runners, timeout=self.shutdown_grace)
        for execution in list(self._running.values()):
            self._stop_job(execution, _StopReason.SHUTDOWN)
        if self._runners:
            await asyncio.wait(self._runners)
        # Leases were renewed until the last job ended; now the loops may go.
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connector.remove_listener(self)

    # -- ConnectorListener ---------------------------------------------------

    def work_available(self) -> None:
        """Wakes the claim loop."""
        self._wake.set()

    def cancel_requested(self, request_id: str) -> None:
        """Signals a running job that a client cancelled it."""
        execution = self._running.get(request_id)
        if execution is not None:
            self._stop_job(execution, _StopReason.CLIENT)
        else:  # perhaps claimed by us in the same commit, and not started yet
            self._recent_cancels[request_id] = None
            while len(self._recent_cancels) > RECENT_CANCELS:
                del self._recent_cancels[next(iter(self._recent_cancels))]

    # -- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            # Cleared before looking: a wake-up that arrives while we claim is kept.
            self._wake.clear()
            sleep: float | None = None
            try:
                if await self._claim_round():
                    continue
                sleep = await self._until_next_due()
            except Exception:  # the loop must survive a broken store
                log.exception("claiming failed; retrying in %.1fs", ERROR_BACKOFF)
                sleep = ERROR_BACKOFF
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel (a stop)
            # that comes in the loop turn the wake-up is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wake.wait()

    async def _claim_round(self) -> bool:
        """Claims what there is room for; True when a claim was full (there may be more)."""
        full = False
        # Jobs given up on whose work still runs hold their slots until it ends.
        local = sum(not execution.offered for execution in self._running.values())
        free = self.max_concurrent_jobs - local - self.abandoned_count
        if free > 0 and self.types:
            claims = await self._claim(self.types, free)
            for claim in claims:
                self._start_job(claim)
            full = len(claims) == free
        for handler in self._offering:
            for types, count in handler.offers() or []:
                if count <= 0 or self._stopping:
                    continue
                claims = await self._claim(types, count)
                for claim in claims:  # reserved before anything else can claim for the same offer
                    handler.reserve(claim.job, types)
                    self._start_job(claim, offered=True)
                full = full or len(claims) == count
        return full

    async def _claim(self, types: list[str], limit: int) -> list[Claim]:
        return await self.connector.claim(
            self.worker_id, limit=limit, lease=self.lease, types=types, queues=self.queues
        )

    def _claimable_types(self) -> list[str]:
        """The types a claim could take now: the slots' and those of the handlers' offers."""
        offered = {t for handler in self._offering for types, count in handler.offers() or [] if count for t in types}
        return sorted(set(self.types) | offered)

    async def _until_next_due(self) -> float | None:
        types = self._claimable_types()
        if not types:
            return None
        due = await self.connector.next_due_time(types, self.queues)
        if due is None:
            return None
        # At least a millisecond: a request due "now" that could not be claimed
        # (a race with another claimer) must not spin the loop.
        return max((due - now()).total_seconds(), 0.001)

    def _start_job(self, claim: Claim, *, offered: bool = False) -> None:
        execution = _Execution(claim, CancelSignal(), offered=offered)
        request_id = execution.request_id
        earlier = self._running.get(request_id)
        if earlier is not None:
            # Our own earlier run lost its lease (renewals failed) and the job was
            # recovered and claimed again: the earlier run must stop, and the new
            # one waits for it, so one server never runs a job twice at once.
            self._stop_job(earlier, _StopReason.LEASE_LOST)
            execution.after = earlier.runner
        self._running[request_id] = execution
        runner = asyncio.create_task(self._run(execution), name=f"ajs-job-{request_id}")
        execution.runner = runner
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        if request_id in self._recent_cancels:
            # Its cancellation was delivered before the claim was (one commit held both).
            self._stop_job(execution, _StopReason.CLIENT)

    # -- background loops ----------------------------------------------------

    async def _every(self, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception:  # the loop must survive a broken store
                log.exception("%s failed; trying again in %.1fs", step.__name__, seconds)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._running:
            self._renewed_at = loop.time()
            return
        running = dict(self._running)
        leases = {request_id: e.claim.lease_token for request_id, e in running.items()}
        try:
            # A stalled store must not hold the heartbeat past the point where the
            # jobs have to stop.
            renewal = await asyncio.wait_for(self.connector.renew(leases, self.lease), self.lease / 3)
        except Exception:
            if loop.time() - self._renewed_at < self.lease * 2 / 3:
                raise
            # The leases run out before the next heartbeat: another server may then
            # run these jobs, so they stop now.
            log.error("could not renew leases; stopping %d job(s) before they run out", len(running))
            for execution in running.values():
                self._stop_job(execution, _StopReason.LEASE_LOST)
            raise
        self._renewed_at = loop.time()
        for request_id in renewal.lost:
            execution = running[request_id]
            if execution.task is not None and execution.task.done():
                # It ended while the renewal was in flight: its final Response (stored, or
                # being stored and retried) released the lease. Nothing to stop or report.
                continue
            log.warning("lost the lease on request %s; stopping it", request_id)
            self._stop_job(execution, _StopReason.LEASE_LOST)
        for request_id in renewal.cancel_requested:
            self._stop_job(running[request_id], _StopReason.CLIENT)

    async def _housekeep(self) -> None:
        recovered = await self.connector.recover_expired()
        if recovered:
            log.info("recovered %d job(s) whose server stopped", recovered)
            self._wake.set()
        if self.retention is not None:
            pruned = await self.connector.prune(now() - timedelta(seconds=self.retention))
            if pruned:
                log.info("pruned %d ended job(s) older than %.0fs", pruned, self.retention)

    # -- running -------------------------------------------------------------

    async def _report(self, execution: _Execution, update: Update) -> None:
        await self.connector.respond(execution.request_id, update, execution.claim.lease_token)

    async def _run(self, execution: _Execution) -> None:
        if execution.after is not None:
            await asyncio.wait({execution.after})
        job = execution.claim.job
        current_request_id.set(job.request.id)  # every log line of this job carries it
        handler = self.chain.handler_for(job.request.type)
        plugin = self.chain.plugin_for(job.request.type)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if job.attempt == 1 and job.request.create_time is not None:
            due = max(job.request.create_time, job.request.run_after or job.request.create_time)
            self.observer.job_started(job.request.type, (job.last_response.create_time - due).total_seconds())
        execution.timeout = attempt_timeout(plugin, job.request)
        deadline = None
        if execution.timeout is not None:
            seconds = execution.timeout[0]
            execution.timers.append(loop.call_later(seconds, self._stop_job, execution, _StopReason.TIMEOUT))
            deadline = _later(seconds)

        async def report(update: Update) -> None:
            await self._report(execution, update)

        try:
            decoded = plugin.decode_input(job.request.input) if plugin is not None else None
            dependencies = await self._dependencies(job.request)
        except AjsError as error:  # the input was checked at submit: the plugin changed since, or the store is away
            handler.unreserve(job.request.id)
            handle = _raise(error)
        else:
            context = JobContext(
                job.request,
                job.attempt,
                report,
                execution.cancel,
                decoded,
                dependencies=dependencies,
                children=ChildJobs(self.connector, self.chain, job, execution.cancel),
                deadline=deadline,
            )
            handle = handler.handle(context)
        task = asyncio.create_task(handle)
        execution.task = task
        try:
            either: set[asyncio.Future[Any]] = {task, execution.abandoned}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                update = self._outcome(execution, task)
            else:
                log.warning("request %s did not stop when cancelled; abandoning it", execution.request_id)
                self.abandoned.add(task)
                task.add_done_callback(self._forget_abandoned)
                update = self._stopped(execution, None, "the job did not stop and was abandoned")
            if update is not None:
                await self._report_final(execution, update)
                self.observer.job_ended(job.request.type, update.state, loop.time() - started)
        finally:
            for timer in execution.timers:
                timer.cancel()
            if self._running.get(execution.request_id) is execution:
                del self._running[execution.request_id]
            self._wake.set()

    async def _dependencies(self, request: Request) -> dict[str, Response]:
        """The final Response of each of ``request.depends_on`` (one deleted since it ended is left out)."""
        found = {}
        for dependency_id in request.depends_on:
            try:
                found[dependency_id] = (await self.connector.get(dependency_id)).last_response
            except NotFound:
                continue
        return found

    async def _report_final(self, execution: _Execution, update: Update) -> None:
        """Stores the final Update: retried until it is stored or found stored, never dropped silently.

        A store that is away (UNAVAILABLE) may have stored the Update before the
        connection died: each retry either stores it or finds the job ended. An
        Update the store refuses for what it holds ends the job FAILED instead.
        Only a lease taken by another server (the job runs again there) or a
        shutdown past its grace ends the retries without a final Response here.
        """
        delay = 0.05
        loop = asyncio.get_running_loop()
        uncertain = False
        while True:
            try:
                await self._report(execution, update)
                return
            except Unavailable as error:
                uncertain = True
                if self._give_up_at is not None and loop.time() > self._give_up_at:
                    log.error(
                        "could not store the end of request %s before shutdown (%s); it runs again after its lease",
                        execution.request_id,
                        error,
                    )
                    return
                if delay >= 0.4:
                    log.warning("could not store the end of request %s yet: %s", execution.request_id, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except FailedPrecondition as error:
                if uncertain and await self._ended(execution.request_id):
                    log.info("the end of request %s was stored by an earlier try", execution.request_id)
                else:  # another server holds the job now: it ends there
                    log.warning("could not store the end of request %s: %s", execution.request_id, error)
                return
            except AjsError as error:
                if (
                    update.state is RequestState.FAILED
                    and update.error is not None
                    and update.error.reason == ("RESULT_NOT_STORED")
                ):
                    log.error("could not store the end of request %s: %s", execution.request_id, error)
                    return
                log.error("the store refused the end of request %s (%s); it ends FAILED", execution.request_id, error)
                status = ErrorStatus(Code.INTERNAL, f"the job's result could not be stored: {error.message}")
                update = Update(RequestState.FAILED, error=dataclasses.replace(status, reason="RESULT_NOT_STORED"))

    async def _ended(self, request_id: str) -> bool:
        """True once the job is found ended (the store is asked until it answers, or the shutdown's grace ends)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return (await self.connector.get(request_id)).is_final
            except Unavailable:
                if self._give_up_at is not None and loop.time() > self._give_up_at:
                    return False
                await asyncio.sleep(0.5)
            except AjsError:
                return False

    def _outcome(self, execution: _Execution, task: asyncio.Task[JobReturn]) -> Update | None:
        """The Update that ends an attempt whose task is done; None if it is not ours to write."""
        reason = execution.stop_reason
        if task.cancelled():
            if reason is None:  # cancelled from within, by nobody here
                return self._failed(execution, RuntimeError("the job's task was cancelled from within"))
            return self._stopped(execution, None, "the job stopped")
        error = task.exception()
        # Once told to stop, a job that returns has most likely given up early:
        # its end is the stop's (cancelled, timed out, handed back), not FINISHED.
        if reason is not None:
            return self._stopped(execution, error, "the job stopped")
        if isinstance(error, NotStarted):  # handed back before it began: the attempt does not count
            return Update(RequestState.CREATED, data={"reason": error.message}, refund_attempt=True)
        if error is None:
            try:
                update = to_update(task.result())
                plugin = self.chain.plugin_for(execution.claim.job.request.type)
                if plugin is not None:
                    plugin.check_output(update.output)
                size = sum(len(k.encode()) + len(v.encode()) for k, v in update.data.items())
                size += update.output.ByteSize() if update.output is not None else 0
                if size > self.max_result_bytes:
                    raise ValueError(f"the job returned {size} bytes, more than the limit of {self.max_result_bytes}")
                return update
            except Exception as bad_return:  # what the job returned cannot be stored
                error = PermanentError(str(bad_return))
        return self._failed(execution, error)

    def _stopped(self, execution: _Execution, error: BaseException | None, detail: str) -> Update | None:
        reason = execution.stop_reason
        if error is not None:
            detail = f"{detail}: {error}"
        if reason is _StopReason.LEASE_LOST:
            return None  # another server owns the job now
        if reason is _StopReason.SHUTDOWN:
            # Handed back: a durable connector runs it again after restart.
            return Update(RequestState.CREATED, data={"reason": f"{reason.value}; {detail}"}, refund_attempt=True)
        if reason is _StopReason.TIMEOUT:
            seconds, whose = execution.timeout or (0.0, "type")
            words = "the request's" if whose == "request" else "its type's"
            message = f"attempt {execution.claim.job.attempt} ran past {words} timeout of {seconds:g}s"
            metadata = {"timeout_seconds": f"{seconds:g}", "timeout_of": whose}
            return self._failed(execution, JobTimeout(message, metadata=metadata))
        status = ErrorStatus(Code.CANCELLED, f"{_StopReason.CLIENT.value}; {detail}", reason="CANCELLED_BY_CLIENT")
        return Update(RequestState.CANCELLED, error=status)

    def _failed(self, execution: _Execution, error: BaseException) -> Update:
        """FAILED, or CREATED again after a backoff if the retry policy allows."""
        job = execution.claim.job
        plugin = self.chain.plugin_for(job.request.type)
        policy = plugin.retry if plugin is not None else NO_RETRY
        status = error_status(error)
        if policy.retries(error) and job.attempts_left:
            explicit = error.delay if isinstance(error, Retry) else None
            delay = explicit if explicit is not None else policy.backoff(job.attempt)
            log.info(
                "request %s attempt %d failed (%s); retrying in %.2fs",
                job.request.id,
                job.attempt,
                status.message,
                delay,
            )
            data = {"retry_in_seconds": f"{delay:.3f}"}
            return Update(RequestState.CREATED, data=data, error=status, run_after=_later(delay))
        log.info("request %s failed: %s", job.request.id, status.message)
        return Update(RequestState.FAILED, error=status)

    def _forget_abandoned(self, task: asyncio.Task[JobReturn]) -> None:
        self.abandoned.discard(task)
        self._wake.set()  # its slot is free again
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved

    # -- stopping ------------------------------------------------------------

    def _stop_job(self, execution: _Execution, reason: _StopReason) -> None:
        if execution.stop_reason is not None:
            # Already stopping; a client's cancel still decides how it ends.
            if reason is _StopReason.CLIENT and execution.stop_reason is _StopReason.SHUTDOWN:
                execution.stop_reason = reason
            return
        execution.stop_reason = reason
        execution.cancel.set(_STOP_CODES[reason])
        loop = asyncio.get_running_loop()
        execution.timers.append(loop.call_later(self.cancel_grace, self._force_stop, execution))

    def _force_stop(self, execution: _Execution) -> None:
        if execution.task is not None and not execution.task.done():
            log.info(
                "request %s ignored cancellation for %.1fs; cancelling its task",
                execution.request_id,
                self.cancel_grace,
            )
            execution.task.cancel()
            loop = asyncio.get_running_loop()
            execution.timers.append(loop.call_later(ABANDON_AFTER, _resolve, execution.abandoned))


def _later(seconds: float) -> datetime:
    """``seconds`` from now; the end of time for a span past it (a request's timeout may be centuries)."""
    try:
        return now() + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC)


async def _raise(error: BaseException) -> JobReturn:
    raise error


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
