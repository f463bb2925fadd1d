"""The Python remote worker: runs job plugins in another process (or machine) than ``ajs serve``.

A :class:`Worker` connects to a server's ``WorkerService.Work`` stream, declares its job
plugins' types (with their typed contracts and policies, as ``ListJobTypes`` shows
them) and runs the jobs the server hands it, exactly as the in-process handler would:
``async def`` jobs as tasks, plain functions in a thread pool, the same
:class:`~ajs_grpc.core.jobs.JobContext` (progress, cancellation, dependencies, deadline;
children cannot be submitted from a remote worker).

It reconnects with exponential backoff when the stream breaks (the server hands the
jobs of a broken stream back to the queue, so they are stopped here), sends heartbeats,
stops a job when the server cancels it, and on :meth:`Worker.drain` takes no more jobs,
finishes those it holds and ends its session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Iterable
from datetime import UTC

import grpc

from ajs_grpc.core import errors
from ajs_grpc.core.errors import AjsError, Code
from ajs_grpc.core.jobs import CancelSignal, JobContext, JobPlugin, error_status, to_update
from ajs_grpc.core.model import Update
from ajs_grpc.edge import convert
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.faces.client import (
    DEFAULT_TARGET,
    TlsOptions,
    _refuse_plaintext_token,
    channel_options,
    channel_target,
    error_from_rpc,
)
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import worker_service_pb2 as wpb

__all__ = ["Worker"]

log = logging.getLogger(__name__)

WORK_METHOD = "/ajs.v1.WorkerService/Work"
# Seconds a drained worker holding no job waits for the server to end its session.
DRAIN_WAIT = 10.0
Call = grpc.aio.StreamStreamCall[wpb.WorkRequest, wpb.WorkResponse]
Work = grpc.aio.StreamStreamMultiCallable[wpb.WorkRequest, wpb.WorkResponse]

# Registration errors another try cannot fix: the worker stops with them.
PERMANENT = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.PERMISSION_DENIED,
        Code.FAILED_PRECONDITION,
        Code.UNAUTHENTICATED,
        Code.UNIMPLEMENTED,
    }
)


class _Running:
    """A job this worker runs: its task and its cancel signal."""

    def __init__(self, task: asyncio.Task[None], cancel: CancelSignal) -> None:
        self.task = task
        self.cancel = cancel


class Worker:
    """Runs job plugins for a server, over one ``WorkerService.Work`` session at a time.

    Args:
        plugins: the job plugins it runs (their types are declared to the server).
        target: the server, e.g. ``127.0.0.1:50051``.
        name: how the server's logs name it; ``host:pid`` by default.
        max_concurrent: jobs it runs at once (its credit).
        token: a bearer token (of a principal with the ``worker`` role).
        tls: TLS settings; None for plaintext.
        insecure: allow a token over plaintext to another machine.
        cancel_grace: seconds a cancelled job has to stop before its task is cancelled.
        max_backoff: the longest wait between reconnects.
        max_threads: threads for plain-function jobs.

    Raises:
        ValueError: no plugins, two of one type, or a token would cross the network in plain text.
    """

    def __init__(
        self,
        plugins: Iterable[JobPlugin],
        target: str = DEFAULT_TARGET,
        *,
        name: str | None = None,
        max_concurrent: int = 8,
        token: str | None = None,
        tls: TlsOptions | None = None,
        insecure: bool = False,
        cancel_grace: float = 10.0,
        max_backoff: float = 5.0,
        max_threads: int = 8,
    ) -> None:
        _refuse_plaintext_token(target, token, tls, insecure)
        listed = list(plugins)
        self.plugins = {plugin.type: plugin for plugin in listed}
        if not self.plugins:
            raise ValueError("a worker needs at least one job plugin")
        if len(self.plugins) < len(listed):
            raise ValueError("two job plugins of one type")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.target = channel_target(target)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.max_concurrent = max_concurrent
        self.tls = tls
        self.cancel_grace = cancel_grace
        self.max_backoff = max_backoff
        self.worker_id = ""
        """The server's id of the current session ("" between sessions)."""
        self.max_result_bytes = 0
        """The largest result a job may return, as the server said (0: not said)."""
        self.registered = asyncio.Event()
        """Set while a session is registered."""
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._handler = InternalAsyncRequestHandler(max_threads)
        for plugin in self.plugins.values():
            self._handler.register(plugin)
        self._running: dict[tuple[str, int], _Running] = {}
        self._outbox: asyncio.Queue[wpb.WorkRequest | None] | None = None
        self._draining = False
        self._drained = asyncio.Event()

    # -- the life of the worker ------------------------------------------------------

    async def run(self) -> None:
        """Runs sessions until :meth:`drain` (reconnecting with backoff); returns once drained.

        Raises:
            AjsError: the server refused the registration for good (a bad declaration,
                a missing role, an unknown token...).
        """
        channel = self._open_channel()
        work: Work = channel.stream_stream(
            WORK_METHOD,
            request_serializer=wpb.WorkRequest.SerializeToString,
            response_deserializer=wpb.WorkResponse.FromString,
        )
        delay = 0.1
        try:
            while not self._draining:
                try:
                    await self._session(work)
                    delay = 0.1
                except AjsError as error:
                    if error.code in PERMANENT:
                        raise
                    log.warning("worker session ended: %s; reconnecting in %.1fs", error.message, delay)
                except (grpc.aio.AioRpcError, OSError) as error:
                    log.warning("worker session broke: %s; reconnecting in %.1fs", error, delay)
                self._abandon_all()
                if self._draining:
                    break
                # asyncio.wait, not a timeout: it never swallows a cancel of run() that comes meanwhile.
                waiter = asyncio.ensure_future(self._drained.wait())
                try:
                    await asyncio.wait({waiter}, timeout=delay * random.uniform(0.8, 1.2))
                finally:
                    waiter.cancel()
                delay = min(delay * 2, self.max_backoff)
        finally:
            self._abandon_all()
            await self._handler.close()
            await channel.close()

    def drain(self) -> None:
        """Takes no more jobs; :meth:`run` returns once the running ones ended and the server ended the session.

        The server ends it once the worker holds no job; an assignment that crossed the
        drain on the wire is still run. Should the server not end it within
        ``DRAIN_WAIT`` seconds of the last job's end, the worker ends it itself.
        """
        if self._draining:
            return
        self._draining = True
        self._drained.set()
        if self._outbox is not None:
            self._outbox.put_nowait(wpb.WorkRequest(drain=wpb.DrainWorker()))

    def _open_channel(self) -> grpc.aio.Channel:
        options = channel_options(self.target)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(
            self.target, self.tls.credentials(), options=[*options, *self.tls.channel_options()]
        )

    # -- one session ---------------------------------------------------------------------

    async def _session(self, work: Work) -> None:
        call: Call = work(metadata=self._metadata)
        outbox: asyncio.Queue[wpb.WorkRequest | None] = asyncio.Queue()
        register = wpb.RegisterWorker(
            worker_name=self.name,
            job_types=[
                convert.job_type_to_proto(convert.job_type_from_plugin(p, "remote")) for p in self.plugins.values()
            ],
            max_concurrent=self.max_concurrent,
        )
        writer: asyncio.Task[None] | None = None
        try:
            await call.write(wpb.WorkRequest(register=register))
            first = await call.read()  # a refusal raises here
            if not isinstance(first, wpb.WorkResponse) or first.WhichOneof("kind") != "registered":
                raise errors.Unavailable("the server ended the session without registering it")
            self.worker_id = first.registered.worker_id
            interval = convert.seconds(first.registered.heartbeat_interval) or 10.0
            self._outbox = outbox
            self.registered.set()
            log.info("registered as %s: %s", self.worker_id, ", ".join(sorted(self.plugins)))
            writer = asyncio.create_task(self._write(call, outbox, interval), name="ajs-worker-writer")
            self.max_result_bytes = first.registered.max_result_bytes
            if self._draining:
                outbox.put_nowait(wpb.WorkRequest(drain=wpb.DrainWorker()))
            while True:
                try:
                    async with asyncio.timeout(DRAIN_WAIT if self._draining and not self._running else None):
                        message = await call.read()  # a failed session raises here
                except TimeoutError:
                    log.warning("the server did not end the drained session; ending it")
                    call.cancel()
                    break
                if not isinstance(message, wpb.WorkResponse):
                    break  # the server ended the session (we drained)
                kind = message.WhichOneof("kind")
                if kind == "assignment":
                    self._start(message.assignment, outbox)
                elif kind == "cancel":
                    self._cancel(message.cancel.request_id, message.cancel.attempt, message.cancel.reason)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        finally:
            self.registered.clear()
            self.worker_id = ""
            self._outbox = None
            if writer is not None:
                writer.cancel()
                await asyncio.wait({writer})  # (a cancel of this task still propagates)

    async def _write(self, call: Call, outbox: asyncio.Queue[wpb.WorkRequest | None], interval: float) -> None:
        """The one writer of the stream; a write that fails ends the session (the reader sees it)."""
        try:
            await self._write_messages(call, outbox, interval)
        except Exception as error:  # the call is broken: ending it makes the reading side raise
            log.warning("writing to the session failed: %s", error)
            call.cancel()

    async def _write_messages(self, call: Call, outbox: asyncio.Queue[wpb.WorkRequest | None], interval: float) -> None:
        """Queued messages, credits coalesced (none after a drain), heartbeats when quiet."""
        credit = 0
        while True:
            try:
                async with asyncio.timeout(interval / 2):
                    message = await outbox.get()
            except TimeoutError:
                await call.write(wpb.WorkRequest(heartbeat=wpb.Heartbeat()))
                continue
            if message is None:
                await call.done_writing()
                return
            kind = message.WhichOneof("kind")
            if kind == "credit":
                credit += message.credit.count
            else:
                if kind == "drain":
                    credit = 0  # what was held back is never granted
                await call.write(message)
            if credit and outbox.empty():  # one grant for the outcomes sent together
                await call.write(wpb.WorkRequest(credit=wpb.GrantCredit(count=credit)))
                credit = 0

    # -- jobs ----------------------------------------------------------------------------

    def _start(self, assignment: wpb.Assignment, outbox: asyncio.Queue[wpb.WorkRequest | None]) -> None:
        request = convert.request_from_proto(assignment.request)
        key = (request.id, assignment.attempt)
        cancel = CancelSignal()
        deadline = assignment.deadline.ToDatetime(tzinfo=UTC) if assignment.HasField("deadline") else None

        async def report(update: Update) -> None:
            progress = update.progress
            outbox.put_nowait(
                wpb.WorkRequest(
                    progress=wpb.ReportProgress(
                        request_id=request.id,
                        attempt=assignment.attempt,
                        progress=pb.Progress(fraction=progress.fraction, message=progress.message)
                        if progress is not None
                        else None,
                        data=dict(update.data),
                    )
                )
            )

        async def run() -> None:
            outcome = wpb.ReportOutcome(request_id=request.id, attempt=assignment.attempt)
            try:
                plugin = self.plugins[request.type]
                dependencies = {r.request_id: convert.response_from_proto(r) for r in assignment.dependencies}
                context = JobContext(
                    request,
                    assignment.attempt,
                    report,
                    cancel,
                    plugin.decode_input(request.input),
                    dependencies=dependencies,
                    deadline=deadline,
                )
                update = to_update(await self._handler.handle(context))
                plugin.check_output(update.output)
                size = sum(len(k.encode()) + len(v.encode()) for k, v in update.data.items())
                size += update.output.ByteSize() if update.output is not None else 0
                if self.max_result_bytes and size > self.max_result_bytes:
                    raise errors.ResourceExhausted(
                        f"the job returned {size} bytes, more than the server's limit of {self.max_result_bytes}",
                        reason="RESULT_TOO_LARGE",
                    )
                outcome.data.update(update.data)
                if update.output is not None:
                    outcome.output.CopyFrom(update.output)
            except asyncio.CancelledError:
                outcome.error.CopyFrom(
                    convert.status_to_proto(error_status(errors.JobCancelled(cancel.reason or "stopped")))
                )
                raise
            except Exception as error:  # the job failed: its status goes to the server
                outcome.error.CopyFrom(convert.attempt_error_to_proto(error))
                # What the plugin's own policy never retries (PermanentError, errors outside retry_on).
                known = self.plugins.get(request.type)
                too_large = isinstance(error, errors.ResourceExhausted) and error.reason == "RESULT_TOO_LARGE"
                outcome.non_retryable = too_large or known is None or not known.retry.retries(error)
            finally:
                if self._running.pop(key, None) is not None and self._outbox is outbox:
                    outbox.put_nowait(wpb.WorkRequest(outcome=outcome))
                    if not self._draining:
                        outbox.put_nowait(wpb.WorkRequest(credit=wpb.GrantCredit(count=1)))

        task = asyncio.create_task(run(), name=f"ajs-remote-{request.id}")
        self._running[key] = _Running(task, cancel)

    def _cancel(self, request_id: str, attempt: int, reason: str) -> None:
        running = self._running.get((request_id, attempt))
        if running is None:
            return
        log.info("request %s: the server cancels it (%s)", request_id, reason)
        running.cancel.set(reason)
        loop = asyncio.get_running_loop()
        loop.call_later(self.cancel_grace, _cancel_task, running.task)

    def _abandon_all(self) -> None:
        """Stops every job (their session is gone: the server has handed them back)."""
        running, self._running = self._running, {}
        for job in running.values():
            job.cancel.set("WORKER_LOST")
            job.task.cancel()


def _cancel_task(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
