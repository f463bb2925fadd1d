"""The WorkerService servicer: remote workers' sessions over one bidirectional stream each.

It turns the stream into the calls of a :class:`~ajs_grpc.engine.handlers.remote.WorkerSession`
and the session's outbox into messages. What a session means for the queue (credits,
assignments, hand-backs) is the remote handler's; this module checks who may connect and
what they send. The protocol is written in ``protos/ajs/v1/worker_service.proto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError, Message

from ajs_grpc.core.errors import (
    AjsError,
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    Unavailable,
)
from ajs_grpc.core.jobs import JobPlugin, Result
from ajs_grpc.edge import convert
from ajs_grpc.edge.pipeline import Caller, Pipeline
from ajs_grpc.edge.validation import check_type, invalid
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.remote import (
    Assign,
    CancelRun,
    Outgoing,
    RemoteRequestHandler,
    WorkerSession,
    runs_remotely,
)
from ajs_grpc.proto.ajs.v1 import worker_service_pb2 as wpb

__all__ = ["SERVICE", "SERVICE_NAME", "WORKER_ROLE", "WorkerService"]

log = logging.getLogger(__name__)

SERVICE = wpb.DESCRIPTOR.services_by_name["WorkerService"]
SERVICE_NAME = SERVICE.full_name
WORKER_ROLE = "worker"
"""The role a principal needs to open a worker session (admins need none)."""
MAX_TYPES = 100
"""Job types one worker may declare."""
MAX_CREDIT = 10_000
"""The most credit a session may hold at once."""
MAX_NAME_LENGTH = 128
# A session silent for this many heartbeat intervals is ended.
MISSED_HEARTBEATS = 3


class WorkerService:
    """Implements ``ajs.v1.WorkerService`` over the chain's remote handler.

    Args:
        chain: the handler chain; its remote handler runs the workers' types.
        pipeline: authentication, decoding and errors, shared with JobService.
        heartbeat_interval: seconds a worker may wait between messages (it is told so);
            a session silent for three intervals is ended.
        max_result_bytes: the largest result a job may return (the dispatcher's; workers are told).
    """

    def __init__(
        self,
        chain: HandlerChain,
        pipeline: Pipeline,
        *,
        heartbeat_interval: float = 10.0,
        max_result_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        self.chain = chain
        self.remote = next((h for h in chain.handlers if isinstance(h, RemoteRequestHandler)), None)
        self.pipeline = pipeline
        self.heartbeat_interval = heartbeat_interval
        self.max_result_bytes = max_result_bytes
        self.accepting = True
        """False once the server drains: new sessions are then UNAVAILABLE."""

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves this service on a ``grpc.aio`` server."""
        return self.pipeline.handler(SERVICE, self)

    def close(self) -> None:
        """Ends every session (their workers reconnect elsewhere)."""
        self.accepting = False
        if self.remote is not None:
            self.remote.close_sessions()

    async def work(self, messages: AsyncIterator[Message], caller: Caller) -> AsyncIterator[wpb.WorkResponse]:
        """One worker session: registration, then assignments out and reports in."""
        principal = caller.principal
        if not principal.admin and WORKER_ROLE not in principal.roles:
            raise PermissionDenied(
                f"{principal.name} may not run jobs: a worker needs the {WORKER_ROLE!r} role",
                reason="WORKER_ROLE_NEEDED",
            )
        remote = self.remote
        if remote is None:
            raise FailedPrecondition("this server has no remote handler in its chain", reason="NO_REMOTE_HANDLER")
        if not self.accepting:
            raise Unavailable("the server is shutting down; connect to another instance", reason="DRAINING")
        register = await self._first(messages)
        plugins = self._declarations(register, principal.admin, principal.types)
        session = remote.connect(register.worker_name or "worker", plugins, register.max_concurrent)
        failure: list[AjsError] = []
        reader: asyncio.Task[None] | None = None
        try:  # from here on, however the call ends, the session ends with it
            yield wpb.WorkResponse(
                registered=wpb.WorkerRegistered(
                    worker_id=session.id,
                    heartbeat_interval=convert.duration(self.heartbeat_interval),
                    max_result_bytes=self.max_result_bytes,
                )
            )
            reader = asyncio.create_task(self._read(messages, session, remote, failure), name=f"ajs-{session.id}")
            while (item := await session.outbox.get()) is not None:
                yield _to_proto(item)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            remote.disconnect(session)
        if failure:
            raise failure[0]

    async def _first(self, messages: AsyncIterator[Message]) -> wpb.RegisterWorker:
        try:
            async with asyncio.timeout(self.heartbeat_interval * MISSED_HEARTBEATS):
                first = await anext(messages, None)
        except TimeoutError:
            raise invalid([FieldViolation("register", "must be sent first, at once")]) from None
        if not isinstance(first, wpb.WorkRequest) or first.WhichOneof("kind") != "register":
            raise invalid([FieldViolation("register", "must be the first message of the stream")])
        return first.register

    def _declarations(
        self, register: wpb.RegisterWorker, admin: bool, allowed: frozenset[str] | None
    ) -> list[JobPlugin]:
        """The plugins of the declared types, once each is checked."""
        violations: list[FieldViolation] = []
        if len(register.worker_name) > MAX_NAME_LENGTH or not register.worker_name.isprintable():
            violations.append(FieldViolation("register.worker_name", f"must be printable, at most {MAX_NAME_LENGTH}"))
        if not 1 <= register.max_concurrent <= MAX_CREDIT:
            violations.append(FieldViolation("register.max_concurrent", f"must be between 1 and {MAX_CREDIT}"))
        if not 1 <= len(register.job_types) <= MAX_TYPES:
            violations.append(FieldViolation("register.job_types", f"must list between 1 and {MAX_TYPES} types"))
        plugins = []
        seen: set[str] = set()
        for index, declared in enumerate(register.job_types):
            field = f"register.job_types[{index}]"
            before = len(violations)
            check_type(declared.name, f"{field}.name", violations)
            if declared.name in seen:
                violations.append(FieldViolation(f"{field}.name", "is listed twice"))
            seen.add(declared.name)
            if len(violations) > before:
                continue
            try:
                plugins.append(convert.plugin_from_job_type(declared, runs_remotely, RemoteRequestHandler.name))
            except ValueError as error:
                where, _, what = str(error).partition(": ")
                violations.append(FieldViolation(f"{field}.{where.replace(' ', '_')}", what))
        if violations:
            raise invalid(violations)
        for plugin in plugins:
            if not admin and allowed is not None and plugin.type not in allowed:
                raise PermissionDenied(
                    f"this principal may not run jobs of type {plugin.type!r}",
                    reason="TYPE_NOT_ALLOWED",
                    metadata={"type": plugin.type},
                )
            handler = self.chain.handler_for(plugin.type)
            if handler is not self.remote and handler is not self.chain.handlers[-1]:
                raise FailedPrecondition(
                    f"job type {plugin.type!r} runs in this server's {handler.name!r} handler, not in remote workers",
                    reason="TYPE_RUNS_LOCALLY",
                    metadata={"type": plugin.type, "handler": handler.name},
                )
        return plugins

    async def _read(
        self,
        messages: AsyncIterator[Message],
        session: WorkerSession,
        remote: RemoteRequestHandler,
        failure: list[AjsError],
    ) -> None:
        """Feeds the worker's messages to its session until the stream ends, breaks or goes silent."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self.heartbeat_interval * MISSED_HEARTBEATS):
                        message = await anext(messages, None)
                except TimeoutError:
                    failure.append(
                        Unavailable(
                            f"no message from the worker for {self.heartbeat_interval * MISSED_HEARTBEATS:g}s",
                            reason="HEARTBEAT_MISSED",
                        )
                    )
                    break
                if message is None:
                    break  # the worker closed its side: it is done
                assert isinstance(message, wpb.WorkRequest)
                self._receive(message, session)
        except AjsError as error:  # a message the protocol does not allow
            log.warning("remote worker %s sent a bad message: %s", session.id, error.message)
            failure.append(error)
        except Exception as error:  # the stream broke
            log.info("the stream of remote worker %s broke: %s", session.id, error)
        remote.disconnect(session)

    @staticmethod
    def _receive(message: wpb.WorkRequest, session: WorkerSession) -> None:
        kind = message.WhichOneof("kind")
        if kind == "credit":
            count = message.credit.count
            if not 1 <= count <= MAX_CREDIT - session.credit:
                raise invalid([FieldViolation("credit.count", f"must be at least 1, with at most {MAX_CREDIT} held")])
            session.grant(count)
        elif kind == "progress":
            progress = message.progress
            fraction = progress.progress.fraction
            if not (math.isfinite(fraction) and 0 <= fraction <= 1):
                raise invalid([FieldViolation("progress.progress.fraction", "must be between 0 and 1")])
            session.progress(progress.request_id, progress.attempt, fraction, progress.progress.message, progress.data)
        elif kind == "outcome":
            outcome = message.outcome
            try:
                result = _outcome(outcome)
            except (DecodeError, OverflowError, ValueError) as error:  # an OK error, undecodable details
                raise invalid([FieldViolation("outcome.error", f"cannot be read: {error}")]) from None
            if not session.outcome(outcome.request_id, outcome.attempt, result):
                log.debug("outcome of %s attempt %d came after its end here", outcome.request_id, outcome.attempt)
        elif kind == "heartbeat":
            pass
        elif kind == "drain":
            session.drain()
        elif kind == "register":
            raise invalid([FieldViolation("register", "is sent once, first")])
        else:
            raise invalid([FieldViolation("kind", "must be set")])


def _outcome(outcome: wpb.ReportOutcome) -> Result | AjsError:
    """What a worker's outcome means: what the job returned, or why the attempt failed.

    Raises:
        ValueError: the error is OK, or one of its details cannot be read.
    """
    if not outcome.HasField("error"):
        output = outcome.output if outcome.HasField("output") and outcome.output.type_url else None
        return Result(dict(outcome.data), output)
    return convert.attempt_error_from_proto(outcome.error, non_retryable=outcome.non_retryable)


def _to_proto(item: Outgoing) -> wpb.WorkResponse:
    if isinstance(item, Assign):
        return wpb.WorkResponse(
            assignment=wpb.Assignment(
                request=convert.request_to_proto(item.request),
                attempt=item.attempt,
                deadline=convert.timestamp(item.deadline),
                dependencies=[convert.response_to_proto(r) for r in item.dependencies.values()],
            )
        )
    assert isinstance(item, CancelRun)
    return wpb.WorkResponse(
        cancel=wpb.CancelAssignment(request_id=item.request_id, attempt=item.attempt, reason=item.reason)
    )
