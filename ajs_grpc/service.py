"""The JobService servicer: a thin gRPC face over the connector.

Requests arrive as raw bytes and are parsed here, so that undecodable input is
answered INVALID_ARGUMENT (grpc.aio would answer UNKNOWN if it parsed them).
Project errors become a ``google.rpc.Status`` with details in one place,
:func:`abort`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from ajs_grpc import convert
from ajs_grpc.auth import ANONYMOUS, Authenticator, PermissionDenied, Principal
from ajs_grpc.connectors.base import Connector, JobFilter
from ajs_grpc.errors import (
    AjsError,
    AlreadyExists,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.logs import current_request_id
from ajs_grpc.model import Job, Request, RequestState
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["SERVICE_NAME", "JobService", "Limits", "ServiceObserver", "abort"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name

MAX_ID_LENGTH = 128
MAX_TYPE_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
# The largest typed input accepted by default (gRPC's own receive limit is 4 MiB).
MAX_INPUT_BYTES = 1024 * 1024
MAX_PAGE_SIZE = 1000
# Ids: printable ASCII without spaces. Types: names such as "echo" or "images.resize".
_ID = re.compile(r"[!-~]+")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
_TOKEN_VERSION = 1

In = TypeVar("In", bound=Message)
Out = TypeVar("Out", bound=Message)


async def abort(context: grpc.aio.ServicerContext[bytes, Message], error: AjsError) -> None:
    """Ends the call with ``error`` as a ``google.rpc.Status`` with details."""
    await context.abort_with_status(rpc_status.to_status(convert.error_to_status(error)))


def _parse(message_type: type[In], raw: bytes) -> In:
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError as error:
        raise InvalidArgument(
            f"the {message_type.DESCRIPTOR.name} could not be decoded: {error}",
            reason="UNDECODABLE_REQUEST",
        ) from None
    return message


def _check_id(value: str, field: str, violations: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > MAX_ID_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_ID_LENGTH} characters"))
    elif not _ID.fullmatch(value):
        violations.append(FieldViolation(field, "must be printable ASCII without spaces"))


def _invalid(violations: list[FieldViolation]) -> InvalidArgument:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid request: {summary}", violations, reason="INVALID_FIELDS")


def _required_id(value: str, field: str = "request_id") -> str:
    violations: list[FieldViolation] = []
    _check_id(value, field, violations, required=True)
    if violations:
        raise _invalid(violations)
    return value


def validate_request(message: pb.Request, limits: Limits | None = None) -> Request:
    """The model Request for a submitted one, server-set fields filled in.

    Raises:
        InvalidArgument: listing every bad field.
    """
    limits = limits or Limits()
    violations: list[FieldViolation] = []
    if len(message.data) > limits.max_data_entries:
        violations.append(
            FieldViolation("request.data", f"has {len(message.data)} entries, more than {limits.max_data_entries}")
        )
    elif (size := sum(len(k.encode()) + len(v.encode()) for k, v in message.data.items())) > limits.max_data_bytes:
        violations.append(FieldViolation("request.data", f"holds {size} bytes, more than {limits.max_data_bytes}"))
    _check_id(message.id, "request.id", violations, required=False)
    _check_id(message.parent_id, "request.parent_id", violations, required=False)
    if message.id and message.parent_id == message.id:
        violations.append(FieldViolation("request.parent_id", "a request cannot be its own parent"))
    if not message.type:
        violations.append(FieldViolation("request.type", "must not be empty"))
    elif len(message.type) > MAX_TYPE_LENGTH:
        violations.append(FieldViolation("request.type", f"must be at most {MAX_TYPE_LENGTH} characters"))
    elif not _TYPE.fullmatch(message.type):
        violations.append(
            FieldViolation("request.type", "must start with a letter or digit and hold only letters, digits and _.:/-")
        )
    try:
        request = convert.request_from_proto(message)
    except (ValueError, OverflowError) as error:  # a Timestamp out of range
        violations.append(FieldViolation("request.run_after", f"is not a valid time: {error}"))
    if violations:
        raise _invalid(violations)
    return dataclasses.replace(request, id=request.id or str(uuid.uuid4()), creator=ANONYMOUS.name, create_time=None)


def _filter_digest(job_filter: JobFilter) -> str:
    key = json.dumps(
        [sorted(int(s) for s in job_filter.states), sorted(job_filter.types), job_filter.parent_id, job_filter.creator]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_page_token(cursor: int, job_filter: JobFilter) -> str:
    """An opaque token for the page after ``cursor``, bound to the filter (AIP-158)."""
    body = json.dumps({"v": _TOKEN_VERSION, "c": cursor, "f": _filter_digest(job_filter)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(token: str, job_filter: JobFilter) -> int:
    """The cursor of a page token.

    Raises:
        InvalidArgument: the token is malformed or was made for other filters.
    """
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        valid = isinstance(body, dict) and body.get("v") == _TOKEN_VERSION and isinstance(body.get("c"), int)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        valid = False
    if not valid or body["c"] < 0:
        raise InvalidArgument(
            "page_token is not a token this service issued",
            [FieldViolation("page_token", "malformed")],
            reason="INVALID_PAGE_TOKEN",
        )
    if body.get("f") != _filter_digest(job_filter):
        raise InvalidArgument(
            "page_token was issued for different filters; repeat the filters of the first call",
            [FieldViolation("page_token", "does not match the filters")],
            reason="INVALID_PAGE_TOKEN",
        )
    cursor: int = body["c"]
    return cursor


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the service (all configurable, see ``[limits]``)."""

    max_data_entries: int = 256
    max_data_bytes: int = 64 * 1024
    max_input_bytes: int = MAX_INPUT_BYTES
    max_queue_depth: int = 0
    """Queued (CREATED) jobs at most; 0 for no limit."""
    max_watches: int = 1000
    max_watches_per_principal: int = 100
    watch_send_timeout: float = 30.0
    """Seconds a watcher may leave a Response unread before it is dropped."""


class ServiceObserver(Protocol):
    """What the service reports (metrics)."""

    def submitted_type(self, request_type: str) -> None:
        """A new request was queued."""

    def call_ended(self, method: str, code: str) -> None:
        """A call ended with status ``code`` (a name such as OK or NOT_FOUND)."""


class _NoObserver:
    def submitted_type(self, request_type: str) -> None:
        pass

    def call_ended(self, method: str, code: str) -> None:
        pass


# How long a measured queue depth is trusted before it is counted again.
QUEUE_DEPTH_TTL = 0.2
# How many parents up a job's owner is looked for (a child of an owned job is owned too).
OWNER_DEPTH = 8


class JobService:
    """Implements ``ajs.v1.JobService`` over a connector.

    Args:
        connector: the queue.
        chain: the handler chain, which knows each type's plugin and its contract.
        limits: what a client may ask.
        authenticator: checks each call's credentials; None lets everyone do everything.
        observer: told of submits and calls (metrics).
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        observer: ServiceObserver | None = None,
    ) -> None:
        self.connector = connector
        self.chain = chain
        self.limits = limits or Limits()
        self.authenticator = authenticator
        self.observer = observer or _NoObserver()
        self.accepting = True
        """False once the server drains: submits are then UNAVAILABLE."""
        self.watches: dict[str, int] = {}
        """Open WatchJob streams per principal."""
        self._depth = (0, -1.0)
        self._depth_lock = asyncio.Lock()

    # -- who may do what -----------------------------------------------------------

    def principal(self, context: Context) -> Principal:
        """The caller of ``context``, authenticated."""
        if self.authenticator is None:
            return ANONYMOUS
        pairs = [(key, value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]
        if sum(key == "authorization" for key, _ in pairs) > 1:
            raise Unauthenticated("a call may carry one authorization header", reason="MALFORMED_TOKEN")
        metadata = dict(pairs)
        names = list(context.auth_context().get("x509_common_name") or [])
        common_name = names[0].decode() if names else None
        return self.authenticator.authenticate(metadata, common_name)

    async def _owns(self, principal: Principal, job: Job) -> bool:
        if principal.admin or job.request.creator == principal.name:
            return True
        parent_id = job.request.parent_id
        for _ in range(OWNER_DEPTH):
            if not parent_id:
                return False
            try:
                parent = await self.connector.get(parent_id)
            except NotFound:
                return False
            if parent.request.creator == principal.name:
                return True
            parent_id = parent.request.parent_id
        return False

    async def _owned_job(self, principal: Principal, request_id: str) -> Job:
        current_request_id.set(request_id)  # this call's log lines carry it
        job = await self.connector.get(request_id)
        if not await self._owns(principal, job):
            log.warning("denied %s access to request %s", principal.name, request_id)
            raise PermissionDenied(
                f"request {request_id!r} belongs to another principal",
                reason="NOT_OWNER",
                metadata={"request_id": request_id},
            )
        return job

    # -- the methods -----------------------------------------------------------------

    async def submit_request(self, message: pb.SubmitRequestRequest, principal: Principal) -> pb.SubmitRequestResponse:
        """Validates and enqueues a request (idempotent on its id)."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; submit to another instance", reason="DRAINING")
        if not message.HasField("request"):
            raise _invalid([FieldViolation("request", "is required")])
        request = validate_request(message.request, self.limits)
        request = dataclasses.replace(request, creator=principal.name)
        current_request_id.set(request.id)
        if principal.types is not None and request.type not in principal.types and not principal.admin:
            log.warning("denied %s a submit of type %s", principal.name, request.type)
            raise PermissionDenied(
                f"{principal.name} may not submit requests of type {request.type!r}",
                reason="TYPE_NOT_ALLOWED",
                metadata={"type": request.type},
            )
        self._check_input(request)
        if request.parent_id:  # children go only under one's own jobs
            try:
                await self._owned_job(principal, request.parent_id)
            except NotFound:
                raise NotFound(
                    f"parent request {request.parent_id!r} does not exist",
                    reason="PARENT_NOT_FOUND",
                    metadata={"parent_id": request.parent_id},
                ) from None
            current_request_id.set(request.id)
        await self._check_queue_depth()
        taken = AlreadyExists(f"request id {request.id!r} is taken", reason="REQUEST_ID_TAKEN")
        try:
            job, created = await self.connector.enqueue(request, self.chain.max_attempts(request.type))
        except AlreadyExists:
            if principal.admin or await self._owns(principal, await self.connector.get(request.id)):
                raise
            raise taken from None  # the same answer whatever another's job holds
        if not created and not await self._owns(principal, job):
            raise taken
        if created:
            self.observer.submitted_type(request.type)
            log.debug("queued request %s of type %s", job.request.id, job.request.type)
        return pb.SubmitRequestResponse(job=convert.job_to_proto(job), created=created)

    async def _check_queue_depth(self) -> None:
        limit = self.limits.max_queue_depth
        if not limit:
            return
        loop = asyncio.get_running_loop()
        # One count at a time; submits in between add to it, so a burst cannot slip
        # past the limit on an old count.
        async with self._depth_lock:
            depth, measured = self._depth
            if loop.time() - measured > QUEUE_DEPTH_TTL:
                depth = await self.connector.count_jobs(RequestState.CREATED)
                measured = loop.time()
            if depth >= limit:
                self._depth = (depth, measured)
                raise ResourceExhausted(
                    f"the queue holds {depth} jobs, its limit is {limit}; retry later",
                    reason="QUEUE_FULL",
                    metadata={"retry_after_seconds": "1"},
                )
            self._depth = (depth + 1, measured)

    def _check_input(self, request: Request) -> None:
        """Checks the typed input against the size limit and the job type's contract."""
        size = request.input.ByteSize() if request.input is not None else 0
        if size > self.limits.max_input_bytes:
            description = f"is {size} bytes, more than the limit of {self.limits.max_input_bytes}"
            raise InvalidArgument(
                f"invalid request: request.input: {description}",
                [FieldViolation("request.input", description)],
                reason="INPUT_TOO_LARGE",
            )
        plugin = self.chain.plugin_for(request.type)
        if plugin is not None:  # types nobody runs fail later, through the reject handler
            plugin.decode_input(request.input)

    async def list_job_types(self, message: pb.ListJobTypesRequest, principal: Principal) -> pb.ListJobTypesResponse:
        """Describes every runnable job type with its typed contract."""
        types = [
            convert.job_type_to_proto(plugin, handler.name)
            for name, handler in sorted(self.chain.types, key=lambda pair: pair[0])
            if (plugin := handler.plugin(name)) is not None
        ]
        return pb.ListJobTypesResponse(job_types=types)

    async def watch_job(self, message: pb.WatchJobRequest, principal: Principal) -> AsyncIterator[pb.WatchJobResponse]:
        """Streams a request's Responses after ``after_sequence``, ending after the final one."""
        request_id = _required_id(message.request_id)
        await self._owned_job(principal, request_id)
        mine = self.watches.get(principal.name, 0)
        # Without authentication every caller is one principal: only the total counts then.
        per_principal = self.limits.max_watches_per_principal if principal is not ANONYMOUS else self.limits.max_watches
        if mine >= per_principal or sum(self.watches.values()) >= self.limits.max_watches:
            raise ResourceExhausted(
                "too many open WatchJob streams; close some or retry later",
                reason="TOO_MANY_WATCHES",
                metadata={"limit_per_principal": str(self.limits.max_watches_per_principal)},
            )
        self.watches[principal.name] = mine + 1
        try:
            async for response in self.connector.watch(request_id, message.after_sequence):
                yield pb.WatchJobResponse(response=convert.response_to_proto(response))
        finally:
            self.watches[principal.name] -= 1
            if not self.watches[principal.name]:
                del self.watches[principal.name]

    async def get_job(self, message: pb.GetJobRequest, principal: Principal) -> pb.GetJobResponse:
        """Returns one job."""
        job = await self._owned_job(principal, _required_id(message.request_id))
        return pb.GetJobResponse(job=convert.job_to_proto(job))

    async def list_jobs(self, message: pb.ListJobsRequest, principal: Principal) -> pb.ListJobsResponse:
        """Returns a page of jobs in submit order (only the caller's own, unless an admin)."""
        if message.page_size < 0:
            raise _invalid([FieldViolation("page_size", "must not be negative")])
        states = frozenset(convert.state_from_proto(value, "states") for value in message.states)
        if RequestState.UNSPECIFIED in states:
            raise _invalid([FieldViolation("states", "REQUEST_STATE_UNSPECIFIED is no state a job can be in")])
        creator = ""
        if not principal.admin:
            # Children of one's own job are one's own too, whoever submitted them.
            owns_parent = message.parent_id and await self._owns(principal, await self.connector.get(message.parent_id))
            creator = "" if owns_parent else principal.name
        job_filter = JobFilter(
            states=states, types=frozenset(message.types), parent_id=message.parent_id, creator=creator
        )
        after = decode_page_token(message.page_token, job_filter) if message.page_token else 0
        page_size = min(message.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = await self.connector.list_jobs(job_filter, page_size, after)
        token = encode_page_token(page.next_cursor, job_filter) if page.next_cursor is not None else ""
        return pb.ListJobsResponse(jobs=[convert.job_to_proto(job) for job in page.jobs], next_page_token=token)

    async def cancel_job(self, message: pb.CancelJobRequest, principal: Principal) -> pb.CancelJobResponse:
        """Cancels a queued job, or signals a running one."""
        request_id = _required_id(message.request_id)
        await self._owned_job(principal, request_id)
        job = await self.connector.cancel(request_id)
        log.debug("cancel of request %s: now %s", job.request.id, job.state.name)
        return pb.CancelJobResponse(job=convert.job_to_proto(job))

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves this service on a ``grpc.aio`` server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "SubmitRequest": self._unary("SubmitRequest", pb.SubmitRequestRequest, self.submit_request),
                "WatchJob": self._stream("WatchJob", pb.WatchJobRequest, self.watch_job),
                "GetJob": self._unary("GetJob", pb.GetJobRequest, self.get_job),
                "ListJobs": self._unary("ListJobs", pb.ListJobsRequest, self.list_jobs),
                "CancelJob": self._unary("CancelJob", pb.CancelJobRequest, self.cancel_job),
                "ListJobTypes": self._unary("ListJobTypes", pb.ListJobTypesRequest, self.list_job_types),
            },
        )

    def _unary(
        self, name: str, message_type: type[In], method: Callable[[In, Principal], Awaitable[Out]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        async def handle(raw: bytes, context: Context) -> Out | None:
            try:
                reply = await method(_parse(message_type, raw), self.principal(context))
            except Exception as error:  # every failure gets a status with details
                failure = _as_ajs_error(error)
                self.observer.call_ended(name, failure.code.name)
                await abort(context, failure)
                return None
            self.observer.call_ended(name, "OK")
            return reply

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=_serialize)

    def _stream(
        self, name: str, message_type: type[In], method: Callable[[In, Principal], AsyncIterator[Out]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        async def handle(raw: bytes, context: Context) -> AsyncIterator[Out]:
            # A client gone cancels this task; let it propagate (catching it leaks: grpc #43360).
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            slow = False

            def drop() -> None:
                nonlocal slow
                slow = True
                task.cancel()

            try:
                async for message in method(_parse(message_type, raw), self.principal(context)):
                    # gRPC resumes us once the client's window took the message: a client
                    # that reads nothing is dropped instead of holding the stream forever.
                    watchdog = loop.call_later(self.limits.watch_send_timeout, drop)
                    try:
                        yield message
                    finally:
                        watchdog.cancel()
            except asyncio.CancelledError:
                if slow:
                    # The stream ends at once; its status cannot reach a client that reads nothing anyway.
                    log.warning(
                        "dropped a %s stream whose client read nothing for %gs", name, self.limits.watch_send_timeout
                    )
                    self.observer.call_ended(name, "RESOURCE_EXHAUSTED")
                raise
            except Exception as error:  # every failure gets a status with details
                failure = _as_ajs_error(error)
                self.observer.call_ended(name, failure.code.name)
                await abort(context, failure)
            else:
                self.observer.call_ended(name, "OK")

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=_serialize)


Context = grpc.aio.ServicerContext[bytes, Message]


def _as_ajs_error(error: Exception) -> AjsError:
    """``error`` itself if it is the project's; else logged and reported as INTERNAL."""
    if isinstance(error, AjsError):
        return error
    log.exception("unexpected error in a JobService call")
    return Internal("internal error; the server logged the details", reason="INTERNAL_ERROR")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
