"""The dispatcher: claims queued requests and runs them through the handler chain.

It claims while fewer than ``max_concurrent_jobs`` jobs run, and sleeps until
the connector reports new work or a job ends: there is no poll loop, so a request
submitted to an idle server starts within a few event-loop turns.

Cancellation escalates in three steps: the job's cancel signal is set; after
``cancel_grace`` seconds its task is cancelled (an ``asyncio.CancelledError`` in
an async job; a thread-pool job is detached); if it still has not stopped a
moment later it is abandoned. Whatever the job does, the dispatcher writes the
one final Response itself.

On :meth:`Dispatcher.stop`, claiming stops, running jobs get ``shutdown_grace``
seconds to end, and those still running are cancelled the same way and handed
back to the queue (PENDING -> CREATED), to run again on the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import socket
from typing import Any

from ajs_grpc.connectors.base import Claim, Connector
from ajs_grpc.errors import AjsError, Code
from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.jobs import CancelSignal, JobContext, JobReturn, failure, to_update
from ajs_grpc.model import ErrorStatus, RequestState, Update

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# How long a job whose task was cancelled may take to unwind before it is abandoned.
ABANDON_AFTER = 1.0
# Pause after a connector error while claiming, so a broken store is not hammered.
CLAIM_ERROR_BACKOFF = 0.5


class _StopReason(enum.Enum):
    CLIENT = "cancelled by client"
    SHUTDOWN = "server shutting down"


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

    @property
    def request_id(self) -> str:
        return self.claim.job.request.id


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
        worker_id: who claims; defaults to ``host:pid``.
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        *,
        max_concurrent_jobs: int = 8,
        cancel_grace: float = 10.0,
        shutdown_grace: float = 30.0,
        worker_id: str | None = None,
    ) -> None:
        if max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be at least 1")
        self.connector = connector
        self.chain = chain
        self.max_concurrent_jobs = max_concurrent_jobs
        self.cancel_grace = cancel_grace
        self.shutdown_grace = shutdown_grace
        self.worker_id = worker_id or default_worker_id()
        self._running: dict[str, _Execution] = {}
        self.abandoned: set[asyncio.Task[JobReturn]] = set()
        """Tasks of jobs that ignored cancellation and were given up on; they may still run."""
        self._runners: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> frozenset[str]:
        """The ids of the requests running now."""
        return frozenset(self._running)

    async def start(self) -> None:
        """Starts claiming."""
        self.connector.add_listener(self)
        self._loop_task = asyncio.create_task(self._claim_loop(), name="ajs-dispatcher")

    async def stop(self) -> None:
        """Stops claiming, lets running jobs finish within the grace periods, then returns."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._runners:
            log.info("waiting up to %.1fs for %d running job(s)", self.shutdown_grace, len(self._runners))
            await asyncio.wait(self._runners, timeout=self.shutdown_grace)
        for execution in list(self._running.values()):
            self._stop_job(execution, _StopReason.SHUTDOWN)
        if self._runners:
            await asyncio.wait(self._runners)
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

    # -- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            # Cleared before looking: a wake-up that arrives while we claim is kept.
            self._wake.clear()
            if len(self._running) < self.max_concurrent_jobs:
                try:
                    claim = await self.connector.claim(self.worker_id)
                except AjsError:
                    log.exception("claiming failed; retrying in %.1fs", CLAIM_ERROR_BACKOFF)
                    await asyncio.sleep(CLAIM_ERROR_BACKOFF)
                    continue
                if claim is not None:
                    self._start_job(claim)
                    continue
            await self._wake.wait()

    def _start_job(self, claim: Claim) -> None:
        execution = _Execution(claim, CancelSignal())
        self._running[execution.request_id] = execution
        runner = asyncio.create_task(self._run(execution), name=f"ajs-job-{execution.request_id}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)

    # -- running -------------------------------------------------------------

    async def _report(self, execution: _Execution, update: Update) -> None:
        await self.connector.respond(execution.request_id, update, execution.claim.lease_token)

    async def _run(self, execution: _Execution) -> None:
        job = execution.claim.job
        handler = self.chain.handler_for(job.request.type)

        async def report(update: Update) -> None:
            await self._report(execution, update)

        ctx = JobContext(job.request, job.attempt, report, execution.cancel)
        task = asyncio.create_task(handler.handle(ctx))
        execution.task = task
        try:
            either: set[asyncio.Future[Any]] = {task, execution.abandoned}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                update = self._final_update(execution, task)
            else:
                log.warning("request %s did not stop when cancelled; abandoning it", execution.request_id)
                self.abandoned.add(task)
                task.add_done_callback(self._forget_abandoned)
                update = self._stopped_update(execution, "the job did not stop and was abandoned")
            try:
                await self._report(execution, update)
            except AjsError as error:
                log.error("could not store the final Response of request %s: %s", execution.request_id, error)
        finally:
            for timer in execution.timers:
                timer.cancel()
            del self._running[execution.request_id]
            self._wake.set()

    def _final_update(self, execution: _Execution, task: asyncio.Task[JobReturn]) -> Update:
        if task.cancelled():
            return self._stopped_update(execution, "the job was stopped")
        error = task.exception()
        # A client's cancellation wins whatever the job did; at shutdown a job that
        # still finished keeps its result.
        if execution.stop_reason is _StopReason.CLIENT or (execution.stop_reason and error):
            return self._stopped_update(execution, f"the job stopped: {error}" if error else "the job stopped")
        if error is None:
            try:
                return to_update(task.result())
            except TypeError as bad_return:
                error = bad_return
        if isinstance(error, AjsError):
            status = ErrorStatus(error.code, error.message, reason=error.reason, metadata=error.metadata)
        else:
            status = failure(error)
            log.info("request %s failed: %s", execution.request_id, status.message)
        return Update(RequestState.FAILED, error=status)

    @staticmethod
    def _stopped_update(execution: _Execution, detail: str) -> Update:
        if execution.stop_reason is _StopReason.SHUTDOWN:
            # Handed back to the queue: a durable connector runs it again after restart.
            return Update(RequestState.CREATED, data={"reason": f"{_StopReason.SHUTDOWN.value}; {detail}"})
        status = ErrorStatus(Code.CANCELLED, f"{_StopReason.CLIENT.value}; {detail}", reason="CANCELLED_BY_CLIENT")
        return Update(RequestState.CANCELLED, error=status)

    # -- stopping ------------------------------------------------------------

    def _stop_job(self, execution: _Execution, reason: _StopReason) -> None:
        if execution.stop_reason is not None:
            return
        execution.stop_reason = reason
        execution.cancel.set()
        loop = asyncio.get_running_loop()
        execution.timers.append(loop.call_later(self.cancel_grace, self._force_stop, execution))

    def _forget_abandoned(self, task: asyncio.Task[JobReturn]) -> None:
        self.abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
