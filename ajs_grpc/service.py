"""The JobService servicer: a thin gRPC face over the connector.

Requests arrive as raw bytes and are parsed here, so that undecodable input is
answered INVALID_ARGUMENT (grpc.aio would answer UNKNOWN if it parsed them).
Project errors become a ``google.rpc.Status`` with details in one place,
:func:`abort`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from ajs_grpc import convert
from ajs_grpc.connectors.base import Connector, JobFilter
from ajs_grpc.errors import AjsError, FieldViolation, Internal, InvalidArgument, Unavailable
from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.model import Request, RequestState
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["SERVICE_NAME", "JobService", "abort"]

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
# The creator of requests until authentication sets a principal.
ANONYMOUS = "anonymous"

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


def validate_request(message: pb.Request) -> Request:
    """The model Request for a submitted one, server-set fields filled in.

    Raises:
        InvalidArgument: listing every bad field.
    """
    violations: list[FieldViolation] = []
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
    return dataclasses.replace(request, id=request.id or str(uuid.uuid4()), creator=ANONYMOUS, create_time=None)


def _filter_digest(job_filter: JobFilter) -> str:
    key = json.dumps([sorted(int(s) for s in job_filter.states), sorted(job_filter.types), job_filter.parent_id])
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


class JobService:
    """Implements ``ajs.v1.JobService`` over a connector.

    Args:
        connector: the queue.
        chain: the handler chain, which knows each type's plugin and its contract.
        max_input_bytes: the largest ``Request.input`` accepted.
    """

    def __init__(self, connector: Connector, chain: HandlerChain, *, max_input_bytes: int = MAX_INPUT_BYTES) -> None:
        self.connector = connector
        self.chain = chain
        self.max_input_bytes = max_input_bytes
        self.accepting = True
        """False once the server drains: submits are then UNAVAILABLE."""

    async def submit_request(self, message: pb.SubmitRequestRequest) -> pb.SubmitRequestResponse:
        """Validates and enqueues a request (idempotent on its id)."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; submit to another instance", reason="DRAINING")
        if not message.HasField("request"):
            raise _invalid([FieldViolation("request", "is required")])
        request = validate_request(message.request)
        self._check_input(request)
        job, created = await self.connector.enqueue(request, self.chain.max_attempts(request.type))
        if created:
            log.debug("queued request %s of type %s", job.request.id, job.request.type)
        return pb.SubmitRequestResponse(job=convert.job_to_proto(job), created=created)

    def _check_input(self, request: Request) -> None:
        """Checks the typed input against the size limit and the job type's contract."""
        size = request.input.ByteSize() if request.input is not None else 0
        if size > self.max_input_bytes:
            description = f"is {size} bytes, more than the limit of {self.max_input_bytes}"
            raise InvalidArgument(
                f"invalid request: request.input: {description}",
                [FieldViolation("request.input", description)],
                reason="INPUT_TOO_LARGE",
            )
        plugin = self.chain.plugin_for(request.type)
        if plugin is not None:  # types nobody runs fail later, through the reject handler
            plugin.decode_input(request.input)

    async def list_job_types(self, message: pb.ListJobTypesRequest) -> pb.ListJobTypesResponse:
        """Describes every runnable job type with its typed contract."""
        types = [
            convert.job_type_to_proto(plugin, handler.name)
            for name, handler in sorted(self.chain.types, key=lambda pair: pair[0])
            if (plugin := handler.plugin(name)) is not None
        ]
        return pb.ListJobTypesResponse(job_types=types)

    async def watch_job(self, message: pb.WatchJobRequest) -> AsyncIterator[pb.WatchJobResponse]:
        """Streams a request's Responses after ``after_sequence``, ending after the final one."""
        request_id = _required_id(message.request_id)
        async for response in self.connector.watch(request_id, message.after_sequence):
            yield pb.WatchJobResponse(response=convert.response_to_proto(response))

    async def get_job(self, message: pb.GetJobRequest) -> pb.GetJobResponse:
        """Returns one job."""
        job = await self.connector.get(_required_id(message.request_id))
        return pb.GetJobResponse(job=convert.job_to_proto(job))

    async def list_jobs(self, message: pb.ListJobsRequest) -> pb.ListJobsResponse:
        """Returns a page of jobs in submit order."""
        if message.page_size < 0:
            raise _invalid([FieldViolation("page_size", "must not be negative")])
        states = frozenset(convert.state_from_proto(value, "states") for value in message.states)
        if RequestState.UNSPECIFIED in states:
            raise _invalid([FieldViolation("states", "REQUEST_STATE_UNSPECIFIED is no state a job can be in")])
        job_filter = JobFilter(states=states, types=frozenset(message.types), parent_id=message.parent_id)
        after = decode_page_token(message.page_token, job_filter) if message.page_token else 0
        page_size = min(message.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = await self.connector.list_jobs(job_filter, page_size, after)
        token = encode_page_token(page.next_cursor, job_filter) if page.next_cursor is not None else ""
        return pb.ListJobsResponse(jobs=[convert.job_to_proto(job) for job in page.jobs], next_page_token=token)

    async def cancel_job(self, message: pb.CancelJobRequest) -> pb.CancelJobResponse:
        """Cancels a queued job, or signals a running one."""
        job = await self.connector.cancel(_required_id(message.request_id))
        log.debug("cancel of request %s: now %s", job.request.id, job.state.name)
        return pb.CancelJobResponse(job=convert.job_to_proto(job))

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves this service on a ``grpc.aio`` server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "SubmitRequest": _unary(pb.SubmitRequestRequest, self.submit_request),
                "WatchJob": _stream(pb.WatchJobRequest, self.watch_job),
                "GetJob": _unary(pb.GetJobRequest, self.get_job),
                "ListJobs": _unary(pb.ListJobsRequest, self.list_jobs),
                "CancelJob": _unary(pb.CancelJobRequest, self.cancel_job),
                "ListJobTypes": _unary(pb.ListJobTypesRequest, self.list_job_types),
            },
        )


Context = grpc.aio.ServicerContext[bytes, Message]


def _unary(message_type: type[In], method: Callable[[In], Awaitable[Out]]) -> grpc.RpcMethodHandler[bytes, Message]:
    async def handle(raw: bytes, context: Context) -> Out | None:
        try:
            return await method(_parse(message_type, raw))
        except Exception as error:  # every failure gets a status with details
            await abort(context, _as_ajs_error(error))
            return None

    return grpc.unary_unary_rpc_method_handler(handle, response_serializer=_serialize)


def _stream(
    message_type: type[In], method: Callable[[In], AsyncIterator[Out]]
) -> grpc.RpcMethodHandler[bytes, Message]:
    async def handle(raw: bytes, context: Context) -> AsyncIterator[Out]:
        # A client gone cancels this task; let it propagate (catching it leaks: grpc #43360).
        try:
            async for message in method(_parse(message_type, raw)):
                yield message
        except Exception as error:  # every failure gets a status with details
            await abort(context, _as_ajs_error(error))

    return grpc.unary_stream_rpc_method_handler(handle, response_serializer=_serialize)


def _as_ajs_error(error: Exception) -> AjsError:
    """``error`` itself if it is the project's; else logged and reported as INTERNAL."""
    if isinstance(error, AjsError):
        return error
    log.exception("unexpected error in a JobService call")
    return Internal("internal error; the server logged the details", reason="INTERNAL_ERROR")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
