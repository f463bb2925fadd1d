"""The Python client of JobService, for asyncio (:class:`AsyncClient`) and plain code (:class:`Client`).

Both speak the core model: they return :class:`~ajs_grpc.core.model.Job`,
:class:`~ajs_grpc.core.model.Response` and :class:`~ajs_grpc.core.model.JobType`
objects (never ``ajs.v1`` messages) and raise the project's exceptions
(:class:`~ajs_grpc.core.errors.NotFound`, :class:`~ajs_grpc.core.errors.Unavailable`, ...)
instead of ``grpc.RpcError``. :meth:`AsyncClient.watch` survives dropped streams:
it reconnects and resumes after the last sequence it saw, so the caller sees
every Response exactly once.

Example::

    with Client("127.0.0.1:50051") as client:
        submitted = client.submit("countdown", {"steps": "3"})
        for response in client.watch(submitted.job.request.id):
            print(response.sequence, response.state.name)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import socket
import threading
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from ajs_grpc.connectors.base import QueueInfo
from ajs_grpc.core import errors
from ajs_grpc.core.model import Job, JobType, Request, RequestState, Response
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule
from ajs_grpc.edge import convert
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Client",
    "ScheduleInfo",
    "Submitted",
    "TlsOptions",
    "Watched",
    "channel_options",
    "channel_target",
    "is_local",
]

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

T = TypeVar("T")
M = TypeVar("M")

# UNAVAILABLE (an instance draining or gone) and CANCELLED (a stream a proxy or a stopping
# server reset; a call the client itself cancels is never retried) are retried, on another
# instance when there are several. Retrying SubmitRequest is safe because the client
# always names its requests.
RETRY_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "ajs.v1.JobService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}
# Several instances: spread calls with round_robin and skip instances whose JobService
# is not SERVING (draining, or workers).
BALANCED_CONFIG = {
    **RETRY_CONFIG,
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "ajs.v1.JobService"},
}


def channel_target(target: str) -> str:
    """A gRPC target for ``target``.

    A comma-separated list of HOST:PORT becomes an ``ipv4:`` (or ``ipv6:``) list,
    host names resolved now (gRPC lists take addresses only).
    """
    if target.startswith(("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:")):
        return target
    if "," not in target:
        return _host_port(target)
    addresses = []
    for entry in target.split(","):
        host, _, port = _host_port(entry.strip()).rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            addresses.append((host, port))
        except ValueError:  # a name: every address it has
            for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                addresses.append((str(sockaddr[0]), port))
    family = "ipv6" if any(":" in host for host, _ in addresses) else "ipv4"
    listed = dict.fromkeys(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    return f"{family}:{','.join(listed)}"


def _host_port(target: str) -> str:
    """``target`` as HOST:PORT, the port 50051 when it names none.

    Raises:
        ValueError: it is no HOST[:PORT].
    """
    bad = ValueError(
        f"invalid target {target!r}: expected HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051 (several: comma-separated)"
    )
    if target.startswith("["):  # [v6] or [v6]:port
        host, closing, rest = target[1:].partition("]")
        if not closing or (rest and not rest.startswith(":")):
            raise bad
        port = rest[1:] if rest else str(DEFAULT_PORT)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        host = f"[{host}]"
    else:
        host, colon, port = target.partition(":")
        if not colon:
            port = str(DEFAULT_PORT)
        if not host or ":" in port or any(c.isspace() or c in "/[]" for c in host):
            raise bad
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    return f"{host}:{port}"


def channel_options(target: str) -> list[tuple[str, object]]:
    """Channel options: keepalive always; load balancing and retries for several addresses."""
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    options.append(("grpc.service_config", json.dumps(BALANCED_CONFIG if "," in target else RETRY_CONFIG)))
    return options


def error_from_rpc(error: grpc.aio.AioRpcError) -> errors.AjsError:
    """The project exception for a failed call, with the server's reason and details.

    Every status code maps to its class through the one table of :mod:`ajs_grpc.core.errors`.
    """
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    model_status = convert.status_from_proto(status) if status is not None else None
    return errors.from_status(
        errors.Code(error.code().value[0]),
        error.details() or error.code().name,
        reason=model_status.reason if model_status is not None else "",
        metadata=model_status.metadata if model_status is not None else None,
        field_violations=convert.field_violations(status) if status is not None else (),
        quota_violations=convert.quota_violations(status) if status is not None else (),
    )


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """How a client connects with TLS.

    Attributes:
        ca_file: CA certificates (PEM) to verify the server with; empty uses the system's.
        cert_file, key_file: the client's certificate and key (PEM), for mutual TLS.
        server_name: the name to verify in the server's certificate, if not the target's host.
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these options describe."""

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def channel_options(self) -> list[tuple[str, object]]:
        """Channel options these settings need: the name the server's certificate must prove."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _refuse_plaintext_token(target: str, token: str | None, tls: TlsOptions | None, insecure: bool) -> None:
    if token and tls is None and not insecure and not is_local(target):
        raise ValueError(
            f"refusing to send a token in plain text to {target}: connect with TLS (--tls), "
            "or pass --insecure (insecure=True) if the network is trusted"
        )


def is_local(target: str) -> bool:
    """True when every address of ``target`` is on this machine (loopback, or a unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    body = target.partition(":")[2] if target.startswith(("ipv4:", "ipv6:")) else target
    body = body.removeprefix("dns:///").removeprefix("dns:")
    for entry in body.split(","):
        host = entry.strip().rpartition(":")[0].strip("[]") if ":" in entry else entry.strip()
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False  # a name: it may resolve anywhere
    return True


@dataclasses.dataclass(frozen=True)
class Submitted:
    """The answer to a submit: the job, and whether this call created it."""

    job: Job
    created: bool


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as the server reports it.

    Attributes:
        schedule: the stored schedule (its id as the caller names it).
        next_run_time: the server's reckoning of its next occurrence; None while paused.
    """

    schedule: Schedule
    next_run_time: datetime | None


@dataclasses.dataclass(frozen=True)
class Watched:
    """One message of :meth:`AsyncClient.watch_jobs`.

    Attributes:
        response: the next matching Response; None on a bookmark (a place with nothing new).
        token: resume after this message with ``watch_jobs(after_token=token)``.
        type: the job's type ("" on a bookmark).
        queue: the job's queue ("" on a bookmark).
    """

    response: Response | None
    token: str
    type: str = ""
    queue: str = ""


def _schedule_info(message: pb.Schedule) -> ScheduleInfo:
    schedule, next_run_time = convert.schedule_from_proto(message)
    return ScheduleInfo(schedule, next_run_time)


class AsyncClient:
    """An asyncio client of JobService.

    Args:
        target: a gRPC target, e.g. ``127.0.0.1:50051``.
        timeout: seconds for each unary call; None waits forever.
        resume_for: seconds :meth:`watch` keeps reconnecting a dropped stream.
        channel: use this channel instead of opening one (it is not closed).
        token: a bearer token sent with every call.
        tls: TLS settings; None for a plaintext connection.
        insecure: allow a token over a plaintext connection to another machine
            (refused otherwise: anyone on the path could read it).

    Raises:
        ValueError: a token would cross the network in plain text.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        resume_for: float = 30.0,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
        insecure: bool = False,
    ) -> None:
        if channel is None:
            _refuse_plaintext_token(target, token, tls, insecure)
        self.target = channel_target(target)
        self.timeout = timeout
        self.resume_for = resume_for
        self.tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._own_channel = channel is None
        self._channel = channel or self._open_channel(channel_options(self.target))
        self._stub = pb_grpc.JobServiceStub(self._channel)

    def _open_channel(self, options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        options = [*(options or []), *self.tls.channel_options()]
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (if the client opened it)."""
        if self._own_channel:
            await self._channel.close()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None

    async def submit(
        self,
        type: str,  # noqa: A002 - the contract's name
        data: Mapping[str, str] | None = None,
        *,
        id: str = "",  # noqa: A002 - the contract's name
        parent_id: str = "",
        input: Message | None = None,  # noqa: A002 - the contract's name
        priority: int = 0,
        run_after: datetime | None = None,
        queue: str = "",
        depends_on: Sequence[str] = (),
        expire_time: datetime | None = None,
        max_attempts: int = 0,
        attempt_timeout: float | None = None,
    ) -> Submitted:
        """Submits a request; idempotent on ``id`` (empty: the server assigns one).

        Args:
            type: the job type.
            data: string parameters.
            id: the request id.
            parent_id: the request that created this one.
            input: a typed payload (packed into ``Any`` unless it is one).
            priority: higher runs first (may be negative).
            run_after: not run before this time (timezone-aware).
            queue: the queue it waits in (empty: ``default``).
            depends_on: ids of requests that must end first (one that fails cancels this one,
                unless its type allows that); to submit several that depend on each other,
                use :meth:`submit_many`.
            expire_time: if not started by then, it ends CANCELLED (reason ``EXPIRED``).
            max_attempts: claims allowed in all, at most the type's; 0 for the type's.
            attempt_timeout: seconds one attempt may run, at most the type's; None for the
                type's (``Request.timeout``; not the call's timeout).
        """
        # The client names the request, so a retried submit is recognised as the same one.
        request = convert.request_to_proto(
            Request(
                id=id or str(uuid.uuid4()),
                type=type,
                data=data or {},
                parent_id=parent_id,
                priority=priority,
                run_after=run_after,
                queue=queue,
                depends_on=tuple(depends_on),
                expire_time=expire_time,
                max_attempts=max_attempts,
                timeout=attempt_timeout,
            )
        )
        if input is not None:
            if isinstance(input, any_pb2.Any):
                request.input.CopyFrom(input)
            else:
                request.input.Pack(input)
        reply = await self._call(
            self._stub.SubmitRequest(
                pb.SubmitRequestRequest(request=request), timeout=self.timeout, metadata=self._metadata
            )
        )
        return Submitted(convert.job_from_proto(reply.job), reply.created)

    async def submit_many(self, requests: Iterable[Request]) -> list[Submitted]:
        """Submits several requests in one call, atomically: all are queued, or none is.

        Each is idempotent on its id as :meth:`submit` (an empty id gets a fresh one here,
        so a retried call is recognised); the answers are in request order. The server
        takes at most ``limits.max_batch_requests`` (1,000 by default) per call.

        Requests may depend on each other (``depends_on``), in any order within the call:
        a whole DAG goes in one call.

        Raises:
            InvalidArgument: a request is malformed; its field names where, such as
                ``requests[3].request.type``. Any other refusal has the position in
                ``metadata["index"]``. Nothing was queued.
        """
        batch = pb.BatchSubmitRequestsRequest(
            requests=[
                pb.SubmitRequestRequest(
                    request=convert.request_to_proto(dataclasses.replace(r, id=r.id or str(uuid.uuid4())))
                )
                for r in requests
            ]
        )
        reply = await self._call(self._stub.BatchSubmitRequests(batch, timeout=self.timeout, metadata=self._metadata))
        return [Submitted(convert.job_from_proto(item.job), item.created) for item in reply.responses]

    async def get(self, request_id: str, *, full: bool = True) -> Job:
        """Returns the job of ``request_id`` (without its payloads unless ``full``)."""
        view = pb.JOB_VIEW_FULL if full else pb.JOB_VIEW_BASIC
        reply = await self._call(
            self._stub.GetJob(
                pb.GetJobRequest(request_id=request_id, view=view), timeout=self.timeout, metadata=self._metadata
            )
        )
        return convert.job_from_proto(reply.job)

    async def cancel(self, request_id: str) -> Job:
        """Cancels a job; returns it as the server left it."""
        reply = await self._call(
            self._stub.CancelJob(
                pb.CancelJobRequest(request_id=request_id), timeout=self.timeout, metadata=self._metadata
            )
        )
        return convert.job_from_proto(reply.job)

    async def retry(self, request_id: str) -> Job:
        """Runs an ended FAILED or CANCELLED job again (same id; its Responses go on); returns it queued.

        Raises:
            FailedPrecondition: it has not ended (``REQUEST_NOT_ENDED``), it FINISHED
                (``REQUEST_FINISHED``), or a dependency failed (``DEPENDENCY_FAILED``).
        """
        reply = await self._call(
            self._stub.RetryJob(
                pb.RetryJobRequest(request_id=request_id), timeout=self.timeout, metadata=self._metadata
            )
        )
        return convert.job_from_proto(reply.job)

    async def delete(self, request_id: str) -> int:
        """Deletes an ended job, its Responses and its descendants; returns how many jobs went.

        Raises:
            FailedPrecondition: it or a descendant has not ended (``REQUEST_NOT_ENDED``).
        """
        reply = await self._call(
            self._stub.DeleteJob(
                pb.DeleteJobRequest(request_id=request_id), timeout=self.timeout, metadata=self._metadata
            )
        )
        return reply.deleted_count

    async def create_schedule(
        self,
        id: str,  # noqa: A002 - the contract's name
        cron: str,
        type: str,  # noqa: A002 - the contract's name
        data: Mapping[str, str] | None = None,
        *,
        time_zone: str = "UTC",
        input: Message | None = None,  # noqa: A002 - the contract's name
        priority: int = 0,
        queue: str = "",
        max_attempts: int = 0,
        attempt_timeout: float | None = None,
        overlap: Overlap = Overlap.SKIP,
        catchup: Catchup = Catchup.SKIP,
    ) -> ScheduleInfo:
        """Creates a schedule submitting a request of ``type`` at every occurrence of ``cron``.

        Idempotent: the same definition again answers the stored schedule.

        Args:
            id: the schedule's id; its jobs' ids are derived from it and the occurrence time.
            cron: 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first.
            type: the job type each occurrence submits.
            data: its string parameters.
            time_zone: the IANA zone ``cron`` is read in.
            input: its typed payload.
            priority: its priority.
            queue: its queue (empty: ``default``).
            max_attempts: its claims allowed in all, at most the type's; 0 for the type's.
            attempt_timeout: seconds one attempt may run, at most the type's; None for the type's.
            overlap: what an occurrence does while the previous job has not ended.
            catchup: what occurrences missed while no server ran come to.

        Raises:
            AlreadyExists: ``id`` is taken by another definition (``SCHEDULE_ID_TAKEN``).
            InvalidArgument: a bad cron expression, time zone or template field.
        """
        template = convert.request_to_proto(
            Request(
                id="",
                type=type,
                data=data or {},
                priority=priority,
                queue=queue,
                max_attempts=max_attempts,
                timeout=attempt_timeout,
            )
        )
        if input is not None:
            if isinstance(input, any_pb2.Any):
                template.input.CopyFrom(input)
            else:
                template.input.Pack(input)
        schedule = pb.Schedule(
            id=id,
            cron=cron,
            time_zone=time_zone,
            template=template,
            overlap_policy=int(overlap),  # type: ignore[arg-type]
            catchup_policy=int(catchup),  # type: ignore[arg-type]
        )
        reply = await self._call(
            self._stub.CreateSchedule(
                pb.CreateScheduleRequest(schedule=schedule), timeout=self.timeout, metadata=self._metadata
            )
        )
        return _schedule_info(reply.schedule)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Returns one of the caller's schedules (any, for an admin)."""
        reply = await self._call(
            self._stub.GetSchedule(pb.GetScheduleRequest(id=schedule_id), timeout=self.timeout, metadata=self._metadata)
        )
        return _schedule_info(reply.schedule)

    async def list_schedules_page(self, *, page_size: int = 0, page_token: str = "") -> tuple[list[ScheduleInfo], str]:
        """Returns one page of the caller's schedules (all, for an admin) by id, and the next page's token."""
        reply = await self._call(
            self._stub.ListSchedules(
                pb.ListSchedulesRequest(page_size=page_size, page_token=page_token),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        )
        return [_schedule_info(schedule) for schedule in reply.schedules], reply.next_page_token

    async def list_schedules(self) -> list[ScheduleInfo]:
        """Every schedule of the caller (all, for an admin), by id, fetched page after page."""
        found: list[ScheduleInfo] = []
        token = ""
        while True:
            page, token = await self.list_schedules_page(page_token=token)
            found.extend(page)
            if not token:
                return found

    async def delete_schedule(self, schedule_id: str) -> None:
        """Deletes a schedule; the jobs it submitted stay."""
        await self._call(
            self._stub.DeleteSchedule(
                pb.DeleteScheduleRequest(id=schedule_id), timeout=self.timeout, metadata=self._metadata
            )
        )

    async def pause_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Pauses a schedule: no occurrence is submitted until it is resumed."""
        reply = await self._call(
            self._stub.PauseSchedule(
                pb.PauseScheduleRequest(id=schedule_id), timeout=self.timeout, metadata=self._metadata
            )
        )
        return _schedule_info(reply.schedule)

    async def resume_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Resumes a paused schedule from now (occurrences passed while paused are skipped)."""
        reply = await self._call(
            self._stub.ResumeSchedule(
                pb.ResumeScheduleRequest(id=schedule_id), timeout=self.timeout, metadata=self._metadata
            )
        )
        return _schedule_info(reply.schedule)

    async def job_types(self) -> list[JobType]:
        """The job types the server runs, with their typed contracts (see :mod:`ajs_grpc.edge.dynamic`)."""
        reply = await self._call(
            self._stub.ListJobTypes(pb.ListJobTypesRequest(), timeout=self.timeout, metadata=self._metadata)
        )
        return [convert.job_type_from_proto(job_type) for job_type in reply.job_types]

    async def list_queues(self) -> list[QueueInfo]:
        """Every queue with unfinished jobs or paused, by name, with its counts (admins only)."""
        reply = await self._call(
            self._stub.ListQueues(pb.ListQueuesRequest(), timeout=self.timeout, metadata=self._metadata)
        )
        return [convert.queue_from_proto(queue) for queue in reply.queues]

    async def pause_queue(self, name: str) -> QueueInfo:
        """Pauses a queue: its jobs are accepted but none starts until it is resumed (admins only)."""
        reply = await self._call(
            self._stub.PauseQueue(pb.PauseQueueRequest(name=name), timeout=self.timeout, metadata=self._metadata)
        )
        return convert.queue_from_proto(reply.queue)

    async def resume_queue(self, name: str) -> QueueInfo:
        """Resumes a paused queue: its jobs may start again (admins only)."""
        reply = await self._call(
            self._stub.ResumeQueue(pb.ResumeQueueRequest(name=name), timeout=self.timeout, metadata=self._metadata)
        )
        return convert.queue_from_proto(reply.queue)

    async def health(self, service: str = "") -> str:
        """The server's ``grpc.health.v1`` status (SERVING, NOT_SERVING, ...) for ``service``."""
        # A plain channel: the balanced one would refuse to reach an instance that is not SERVING.
        async with self._open_channel() as channel:
            check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await self._call(check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def list_page(
        self,
        *,
        states: Collection[RequestState] = (),
        types: Collection[str] = (),
        parent_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        full: bool = False,
        newest_first: bool = False,
    ) -> tuple[list[Job], str]:
        """Returns one page of jobs and the token of the next ("" on the last).

        Jobs come in submit order (``newest_first``: reversed), without their
        payloads (data, input, output) unless ``full``.
        """
        message = pb.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[int(s) for s in states],  # type: ignore[misc]
            types=list(types),
            parent_id=parent_id,
            view=pb.JOB_VIEW_FULL if full else pb.JOB_VIEW_BASIC,
            order_by="create_time desc" if newest_first else "",
        )
        reply = await self._call(self._stub.ListJobs(message, timeout=self.timeout, metadata=self._metadata))
        return [convert.job_from_proto(job) for job in reply.jobs], reply.next_page_token

    async def list(
        self,
        *,
        states: Collection[RequestState] = (),
        types: Collection[str] = (),
        parent_id: str = "",
        page_size: int = 0,
        full: bool = False,
        newest_first: bool = False,
    ) -> AsyncIterator[Job]:
        """Yields every matching job, fetching page after page (see :meth:`list_page`)."""
        token = ""
        while True:
            jobs, token = await self.list_page(
                states=states,
                types=types,
                parent_id=parent_id,
                page_size=page_size,
                page_token=token,
                full=full,
                newest_first=newest_first,
            )
            for job in jobs:
                yield job
            if not token:
                return

    async def watch(self, request_id: str, after_sequence: int = 0) -> AsyncIterator[Response]:
        """Yields the job's Responses after ``after_sequence`` until the final one.

        A stream that drops (UNAVAILABLE) is reopened after the last sequence
        seen, for up to ``resume_for`` seconds without progress.
        """
        seen = after_sequence

        def reopen() -> grpc.aio.UnaryStreamCall[pb.WatchJobRequest, pb.WatchJobResponse]:
            request = pb.WatchJobRequest(request_id=request_id, after_sequence=seen)
            return self._stub.WatchJob(request, metadata=self._metadata)

        async with contextlib.aclosing(self._resuming(reopen)) as messages:  # a caller's break cancels the call
            async for message in messages:
                response = convert.response_from_proto(message.response)
                seen = response.sequence
                yield response

    async def _resuming(self, reopen: Callable[[], grpc.aio.UnaryStreamCall[Any, M]]) -> AsyncGenerator[M, None]:
        """The messages of the stream ``reopen()`` opens, until it ends; reopened after it drops.

        A stream that fails UNAVAILABLE (a restarted server, a drained instance) is opened
        again after a backoff, with what ``reopen`` reads then (the caller's place), for up
        to ``resume_for`` seconds without a message. Any other error is raised.
        """
        loop = asyncio.get_running_loop()
        delay = 0.05
        give_up_at: float | None = None
        while True:
            call = reopen()
            try:
                async for message in call:
                    give_up_at, delay = None, 0.05
                    yield message
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(error) from None
                give_up_at = give_up_at or loop.time() + self.resume_for
                if loop.time() >= give_up_at:
                    raise error_from_rpc(error) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def watch_jobs(
        self,
        *,
        states: Iterable[RequestState] = (),
        types: Iterable[str] = (),
        queues: Iterable[str] = (),
        parent_id: str = "",
        after_token: str = "",
    ) -> AsyncIterator[Watched]:
        """Yields the Responses of every matching job as they are stored, and bookmarks (WatchJobs).

        Starts after ``after_token`` (empty: now). Never ends by itself. A stream that
        drops (UNAVAILABLE: a restarted server, another instance behind a balancer) is
        reopened after the last token seen, for up to ``resume_for`` seconds without
        progress, so nothing is missed or repeated.
        """
        request = pb.WatchJobsRequest(
            states=[int(state) for state in states],  # type: ignore[misc]
            types=list(types),
            queues=list(queues),
            parent_id=parent_id,
            after_token=after_token,
        )
        reopen = lambda: self._stub.WatchJobs(request, metadata=self._metadata)  # noqa: E731 - reads the place now
        async with contextlib.aclosing(self._resuming(reopen)) as messages:
            async for message in messages:
                request.after_token = message.resume_token
                response = convert.response_from_proto(message.response) if message.HasField("response") else None
                yield Watched(response, message.resume_token, message.type, message.queue)


class Client:
    """A blocking client of JobService with the methods of :class:`AsyncClient`.

    It runs an :class:`AsyncClient` on a private event loop in a background
    thread. Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        resume_for: float = 30.0,
        token: str | None = None,
        tls: TlsOptions | None = None,
        insecure: bool = False,
    ) -> None:
        _refuse_plaintext_token(target, token, tls, insecure)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ajs-client", daemon=True)
        self._thread.start()

        async def connect() -> AsyncClient:
            return AsyncClient(target, timeout=timeout, resume_for=resume_for, token=token, tls=tls, insecure=insecure)

        self._client = self._run(connect())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl+C): stop the coroutine too, and wait until it has, so
            # nothing of it is left running on the background loop.
            future.cancel()
            concurrent.futures.wait([future], timeout=5)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the background loop."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def submit(
        self,
        type: str,  # noqa: A002
        data: Mapping[str, str] | None = None,
        *,
        id: str = "",  # noqa: A002
        parent_id: str = "",
        input: Message | None = None,  # noqa: A002
        priority: int = 0,
        run_after: datetime | None = None,
        queue: str = "",
        depends_on: Sequence[str] = (),
        expire_time: datetime | None = None,
        max_attempts: int = 0,
        attempt_timeout: float | None = None,
    ) -> Submitted:
        """See :meth:`AsyncClient.submit`."""
        return self._run(
            self._client.submit(
                type,
                data,
                id=id,
                parent_id=parent_id,
                input=input,
                priority=priority,
                run_after=run_after,
                queue=queue,
                depends_on=depends_on,
                expire_time=expire_time,
                max_attempts=max_attempts,
                attempt_timeout=attempt_timeout,
            )
        )

    def submit_many(self, requests: Iterable[Request]) -> list[Submitted]:
        """See :meth:`AsyncClient.submit_many`."""
        return self._run(self._client.submit_many(requests))

    def get(self, request_id: str, *, full: bool = True) -> Job:
        """See :meth:`AsyncClient.get`."""
        return self._run(self._client.get(request_id, full=full))

    def cancel(self, request_id: str) -> Job:
        """See :meth:`AsyncClient.cancel`."""
        return self._run(self._client.cancel(request_id))

    def retry(self, request_id: str) -> Job:
        """See :meth:`AsyncClient.retry`."""
        return self._run(self._client.retry(request_id))

    def delete(self, request_id: str) -> int:
        """See :meth:`AsyncClient.delete`."""
        return self._run(self._client.delete(request_id))

    def create_schedule(
        self,
        id: str,  # noqa: A002
        cron: str,
        type: str,  # noqa: A002
        data: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ScheduleInfo:
        """See :meth:`AsyncClient.create_schedule` (the same keyword options)."""
        return self._run(self._client.create_schedule(id, cron, type, data, **options))

    def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        """See :meth:`AsyncClient.get_schedule`."""
        return self._run(self._client.get_schedule(schedule_id))

    def list_schedules(self) -> list[ScheduleInfo]:
        """See :meth:`AsyncClient.list_schedules`."""
        return self._run(self._client.list_schedules())

    def delete_schedule(self, schedule_id: str) -> None:
        """See :meth:`AsyncClient.delete_schedule`."""
        self._run(self._client.delete_schedule(schedule_id))

    def pause_schedule(self, schedule_id: str) -> ScheduleInfo:
        """See :meth:`AsyncClient.pause_schedule`."""
        return self._run(self._client.pause_schedule(schedule_id))

    def resume_schedule(self, schedule_id: str) -> ScheduleInfo:
        """See :meth:`AsyncClient.resume_schedule`."""
        return self._run(self._client.resume_schedule(schedule_id))

    def job_types(self) -> list[JobType]:
        """See :meth:`AsyncClient.job_types`."""
        return self._run(self._client.job_types())

    def list_queues(self) -> list[QueueInfo]:
        """See :meth:`AsyncClient.list_queues`."""
        return self._run(self._client.list_queues())

    def pause_queue(self, name: str) -> QueueInfo:
        """See :meth:`AsyncClient.pause_queue`."""
        return self._run(self._client.pause_queue(name))

    def resume_queue(self, name: str) -> QueueInfo:
        """See :meth:`AsyncClient.resume_queue`."""
        return self._run(self._client.resume_queue(name))

    def health(self, service: str = "") -> str:
        """See :meth:`AsyncClient.health`."""
        return self._run(self._client.health(service))

    def list_page(self, **kwargs: object) -> tuple[list[Job], str]:
        """See :meth:`AsyncClient.list_page`."""
        return self._run(self._client.list_page(**kwargs))  # type: ignore[arg-type]

    def list(self, **kwargs: object) -> Iterator[Job]:
        """See :meth:`AsyncClient.list`."""
        return self._iterate(self._client.list(**kwargs))  # type: ignore[arg-type]

    def watch(self, request_id: str, after_sequence: int = 0) -> Iterator[Response]:
        """See :meth:`AsyncClient.watch`."""
        return self._iterate(self._client.watch(request_id, after_sequence))

    def watch_jobs(self, **kwargs: Any) -> Iterator[Watched]:
        """See :meth:`AsyncClient.watch_jobs`."""
        return self._iterate(self._client.watch_jobs(**kwargs))

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(iterator)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None and not self._loop.is_closed():
                self._run(close())
