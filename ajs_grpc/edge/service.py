"""The JobService servicer: a thin gRPC face over the connector.

Requests arrive as raw bytes and are parsed here, after the caller is
authenticated (an unauthenticated caller learns nothing of the parser), so that
undecodable input is answered INVALID_ARGUMENT (grpc.aio would answer UNKNOWN if
it parsed them). Project errors become a ``google.rpc.Status`` with details in
one place, :func:`abort`.

Who sees what: each principal names requests in a namespace of its own
(:meth:`~ajs_grpc.edge.auth.Principal.qualify`), and a job the caller may not see is
answered NOT_FOUND exactly as an unknown id is (AIP-211), so ids cannot be probed.
Quotas per principal (queued jobs, a priority ceiling, a ``run_after`` horizon,
a share of the watch slots) are refused with RESOURCE_EXHAUSTED and a
``QuotaFailure`` detail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import dataclasses
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from ajs_grpc.connectors.base import Connector, JobFilter
from ajs_grpc.core.errors import (
    AjsError,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ajs_grpc.core.logs import current_request_id
from ajs_grpc.core.model import Job, Request, RequestState, now
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import ANONYMOUS, Authenticator, PeerCertificate, Principal
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = ["SERVICE_NAME", "Caller", "JobService", "Limits", "ServiceObserver", "abort"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name

MAX_ID_LENGTH = 128
MAX_TYPE_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
# The largest typed input accepted by default (gRPC's own receive limit is 4 MiB).
MAX_INPUT_BYTES = 1024 * 1024
MAX_PAGE_SIZE = 1000
# Stores keep sequences and cursors as signed 64-bit integers.
MAX_SEQUENCE = 2**63 - 1
# Room a reply keeps for what is not a job (the page token, framing).
REPLY_OVERHEAD = 4096
# Ids: printable ASCII without spaces. Types: names such as "echo" or "images.resize".
_ID = re.compile(r"[!-~]+")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
_TOKEN_VERSION = 1
# How many known types an unsupported-type error lists in its metadata.
KNOWN_TYPES_LISTED = 50

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


def _check_text(value: str, field: str, violations: list[FieldViolation], what: str = "") -> None:
    """PostgreSQL's text and jsonb cannot hold U+0000: no store takes it, whatever the connector."""
    if "\x00" in value:
        violations.append(FieldViolation(field, f"{what}must not contain U+0000 (NUL): no store can keep it"))


def _quoted(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut short: errors travel in trailers, which are small."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _check_id(value: str, field: str, violations: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > MAX_ID_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_ID_LENGTH} characters"))
    elif not _ID.fullmatch(value):
        violations.append(FieldViolation(field, "must be printable ASCII without spaces"))


def _check_type(value: str, field: str, violations: list[FieldViolation]) -> None:
    if not value:
        violations.append(FieldViolation(field, "must not be empty"))
    elif len(value) > MAX_TYPE_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_TYPE_LENGTH} characters"))
    elif not _TYPE.fullmatch(value):
        violations.append(
            FieldViolation(field, "must start with a letter or digit and hold only letters, digits and _.:/-")
        )


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
    else:
        for key, value in message.data.items():
            _check_text(key + value, "request.data", violations, f"entry {_quoted(key)} ")
    _check_id(message.id, "request.id", violations, required=False)
    _check_id(message.parent_id, "request.parent_id", violations, required=False)
    if message.id and message.parent_id == message.id:
        violations.append(FieldViolation("request.parent_id", "a request cannot be its own parent"))
    _check_type(message.type, "request.type", violations)
    if message.HasField("input"):
        _check_text(message.input.type_url, "request.input.type_url", violations)
    try:
        request = convert.request_from_proto(message)
    except (ValueError, OverflowError) as error:  # a Timestamp out of range
        violations.append(FieldViolation("request.run_after", f"is not a valid time: {error}"))
    if violations:
        raise _invalid(violations)
    return dataclasses.replace(request, id=request.id or str(uuid.uuid4()), creator=ANONYMOUS.name, create_time=None)


def _filter_digest(job_filter: JobFilter, newest_first: bool = False) -> str:
    fields: list[object] = [
        sorted(int(s) for s in job_filter.states),
        sorted(job_filter.types),
        job_filter.parent_id,
        job_filter.creator,
    ]
    if newest_first:  # (tokens of the default order are as they always were)
        fields.append("desc")
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def encode_page_token(cursor: int, job_filter: JobFilter, newest_first: bool = False) -> str:
    """An opaque token for the page after ``cursor``, bound to the filter and order (AIP-158)."""
    digest = _filter_digest(job_filter, newest_first)
    body = json.dumps({"v": _TOKEN_VERSION, "c": cursor, "f": digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _newest_first(order_by: str) -> bool:
    """Whether ``order_by`` (AIP-132) asks for the newest jobs first."""
    words = order_by.split()
    if not words:
        return False
    if words[0] == "create_time" and len(words) <= 2 and words[1:] in ([], ["asc"], ["desc"]):
        return words[1:] == ["desc"]
    raise _invalid([FieldViolation("order_by", 'must be "create_time" or "create_time desc"')])


def decode_page_token(token: str, job_filter: JobFilter, newest_first: bool = False) -> int:
    """The cursor of a page token.

    Raises:
        InvalidArgument: the token is malformed or was made for other filters.
    """
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        valid = isinstance(body, dict) and body.get("v") == _TOKEN_VERSION and type(body.get("c")) is int
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        valid = False
    if not valid or not 0 <= body["c"] <= MAX_SEQUENCE:
        raise InvalidArgument(
            "page_token is not a token this service issued",
            [FieldViolation("page_token", "malformed")],
            reason="INVALID_PAGE_TOKEN",
        )
    if body.get("f") != _filter_digest(job_filter, newest_first):
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
    """Open WatchJob streams of one principal (without authentication: of one client address)."""
    watch_send_timeout: float = 30.0
    """Seconds a watcher may leave a Response unread before it is dropped."""
    max_queued_per_principal: int = 0
    """Queued (CREATED) jobs one principal may have; 0 for no limit. Admins are exempt."""
    max_priority: int = 100
    """The highest priority a principal may give; admins are exempt."""
    max_run_after: float = 90 * 86400.0
    """How far ahead (seconds) a principal may set ``run_after``; admins are exempt."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who makes a call: the authenticated principal and the key its watches count under."""

    principal: Principal
    watch_key: str


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


# How long a measured count (queue depth, a principal's queued jobs) is trusted.
COUNT_TTL = 0.2
QUEUE_DEPTH_TTL = COUNT_TTL
# How many parents up a job's owner is looked for (a child of an owned job is owned too).
OWNER_DEPTH = 8


class _Count:
    """A count read from the store, trusted for :data:`COUNT_TTL`; admissions in between add to it.

    One count at a time, so a burst of submits cannot slip past a limit on an old count.
    """

    def __init__(self, count: Callable[[], Awaitable[int]]) -> None:
        self._count = count
        self._value = (0, -1.0)
        self._lock = asyncio.Lock()

    async def admit(self, limit: int) -> int | None:
        """Counts one more and returns None while below ``limit``; else the count found."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            count, measured = self._value
            if loop.time() - measured > COUNT_TTL:
                count, measured = await self._count(), loop.time()
            if count >= limit:
                self._value = (count, measured)
                return count
            self._value = (count + 1, measured)
            return None


class JobService:
    """Implements ``ajs.v1.JobService`` over a connector.

    Args:
        connector: the queue.
        chain: the handler chain, which knows each type's plugin and its contract.
        limits: what a client may ask.
        authenticator: checks each call's credentials; None lets everyone do everything.
        observer: told of submits and calls (metrics).
        accept_unknown_types: queue types no handler here runs (a frontend, whose
            workers may run more types than it knows).
        max_reply_bytes: the largest reply (a page of ListJobs ends early before it).
    """

    def __init__(
        self,
        connector: Connector,
        chain: HandlerChain,
        limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        observer: ServiceObserver | None = None,
        *,
        accept_unknown_types: bool = False,
        max_reply_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.connector = connector
        self.chain = chain
        self.limits = limits or Limits()
        self.authenticator = authenticator
        self.observer = observer or _NoObserver()
        self.accept_unknown_types = accept_unknown_types
        self.max_reply_bytes = max_reply_bytes
        self.accepting = True
        """False once the server drains: submits are then UNAVAILABLE."""
        self.watches: dict[str, int] = {}
        """Open WatchJob streams per principal (without authentication: per client address)."""
        self._depth = _Count(lambda: self.connector.count_jobs(RequestState.CREATED))
        self._queued: dict[str, _Count] = {}

    # -- who may do what -----------------------------------------------------------

    def principal(self, context: Context) -> Principal:
        """The caller of ``context``, authenticated."""
        if self.authenticator is None:
            return ANONYMOUS
        pairs = [(key, value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]
        if sum(key == "authorization" for key, _ in pairs) > 1:
            raise Unauthenticated("a call may carry one authorization header", reason="MALFORMED_TOKEN")
        auth = context.auth_context()
        subjects = list(auth.get("x509_subject") or [])
        certificate = None
        if subjects:
            names = tuple(name.decode(errors="replace") for name in auth.get("x509_subject_alternative_name") or [])
            certificate = PeerCertificate(subjects[0].decode(errors="replace"), names)
        return self.authenticator.authenticate(dict(pairs), certificate)

    def caller(self, context: Context) -> Caller:
        """The authenticated caller of ``context``."""
        principal = self.principal(context)
        if principal is ANONYMOUS:
            # Without authentication everyone is one principal: one client address is
            # then what may hold only its share of the watch slots.
            host = (context.peer() or "").rpartition(":")[0]
            return Caller(principal, f"{principal.name}@{host}")
        return Caller(principal, principal.name)

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

    async def _visible_job(self, principal: Principal, request_id: str) -> Job:
        """The job of a stored id, if the caller may see it; NOT_FOUND as for an unknown id if not."""
        current_request_id.set(request_id)  # this call's log lines carry it
        job = await self.connector.get(request_id)
        if not await self._owns(principal, job):
            log.warning("denied %s access to request %s", principal.name, request_id)
            raise self.connector._not_found(request_id)
        return job

    @staticmethod
    def _as_seen_by(principal: Principal, job: Job) -> Job:
        """``job`` with its ids in the caller's names."""
        if principal.admin:
            return job
        request = dataclasses.replace(
            job.request, id=principal.unqualify(job.request.id), parent_id=principal.unqualify(job.request.parent_id)
        )
        response = dataclasses.replace(job.last_response, request_id=request.id)
        return dataclasses.replace(job, request=request, last_response=response)

    # -- the methods -----------------------------------------------------------------

    async def submit_request(self, message: pb.SubmitRequestRequest, caller: Caller) -> pb.SubmitRequestResponse:
        """Validates and enqueues a request (idempotent on its id)."""
        principal = caller.principal
        if not self.accepting:
            raise Unavailable("the server is shutting down; submit to another instance", reason="DRAINING")
        if not message.HasField("request"):
            raise _invalid([FieldViolation("request", "is required")])
        request = validate_request(message.request, self.limits)
        stored_id = principal.qualify(request.id)
        if not principal.admin and not principal.owns_name(stored_id):
            raise _invalid([FieldViolation("request.id", "names another principal's namespace ('~name/...')")])
        request = dataclasses.replace(
            request, id=stored_id, parent_id=principal.qualify(request.parent_id), creator=principal.name
        )
        current_request_id.set(request.id)
        if principal.types is not None and request.type not in principal.types and not principal.admin:
            log.warning("denied %s a submit of type %s", principal.name, request.type)
            raise PermissionDenied(
                f"{principal.name} may not submit requests of type {request.type!r}",
                reason="TYPE_NOT_ALLOWED",
                metadata={"type": request.type},
            )
        self._check_type_supported(request.type)
        self._check_input(request)
        if not principal.admin:
            self._check_request_quotas(principal, request)
        if request.parent_id:  # children go only under one's own jobs
            try:
                await self._visible_job(principal, request.parent_id)
            except NotFound:
                raise NotFound(
                    f"parent request {message.request.parent_id!r} does not exist",
                    reason="PARENT_NOT_FOUND",
                    metadata={"parent_id": message.request.parent_id},
                ) from None
            current_request_id.set(request.id)
        await self._check_queue_depth()
        if not principal.admin and self.limits.max_queued_per_principal:
            await self._check_queued_quota(principal)
        taken = AlreadyExists(f"request id {principal.unqualify(request.id)!r} is taken", reason="REQUEST_ID_TAKEN")
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
        return pb.SubmitRequestResponse(job=convert.job_to_proto(self._as_seen_by(principal, job)), created=created)

    def _check_type_supported(self, request_type: str) -> None:
        """Refuses a type no handler here runs, unless this instance cannot know (a frontend)."""
        if self.accept_unknown_types or self.chain.plugin_for(request_type) is not None:
            return
        known = sorted(name for name, _ in self.chain.types)
        listed = ",".join(known[:KNOWN_TYPES_LISTED]) + (",..." if len(known) > KNOWN_TYPES_LISTED else "")
        raise FailedPrecondition(
            f"no handler here runs requests of type {request_type!r}; the known types are listed in the "
            "error's metadata (ajs types)",
            reason="TYPE_NOT_SUPPORTED",
            metadata={"type": request_type, "known_types": listed},
        )

    def _check_request_quotas(self, principal: Principal, request: Request) -> None:
        subject = f"principal:{principal.name}"
        if request.priority > self.limits.max_priority:
            raise ResourceExhausted(
                f"priority {request.priority} is above the ceiling of {self.limits.max_priority} for {principal.name}",
                [QuotaViolation(subject, f"priority at most {self.limits.max_priority}")],
                reason="PRIORITY_QUOTA",
                metadata={"max_priority": str(self.limits.max_priority)},
            )
        horizon = now() + timedelta(seconds=self.limits.max_run_after)
        if request.run_after is not None and request.run_after > horizon:
            raise ResourceExhausted(
                f"run_after is more than {self.limits.max_run_after:g}s ahead, beyond what {principal.name} may ask",
                [QuotaViolation(subject, f"run_after at most {self.limits.max_run_after:g}s ahead")],
                reason="RUN_AFTER_QUOTA",
                metadata={"max_run_after_seconds": f"{self.limits.max_run_after:g}"},
            )

    async def _check_queued_quota(self, principal: Principal) -> None:
        counter = self._queued.get(principal.name)
        if counter is None:
            name = principal.name
            counter = self._queued[name] = _Count(lambda: self.connector.count_jobs(RequestState.CREATED, name))
        limit = self.limits.max_queued_per_principal
        found = await counter.admit(limit)
        if found is not None:
            raise ResourceExhausted(
                f"{principal.name} has {found} queued jobs, its quota is {limit}; retry later",
                [QuotaViolation(f"principal:{principal.name}", f"at most {limit} queued jobs")],
                reason="QUEUED_JOBS_QUOTA",
                metadata={"retry_after_seconds": "1", "limit": str(limit)},
            )

    async def _check_queue_depth(self) -> None:
        limit = self.limits.max_queue_depth
        if not limit:
            return
        depth = await self._depth.admit(limit)
        if depth is not None:
            raise ResourceExhausted(
                f"the queue holds {depth} jobs, its limit is {limit}; retry later",
                [QuotaViolation("queue", f"at most {limit} queued jobs")],
                reason="QUEUE_FULL",
                metadata={"retry_after_seconds": "1"},
            )

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
        if plugin is not None:  # a type only workers know is checked when it runs
            plugin.decode_input(request.input)

    async def list_job_types(self, message: pb.ListJobTypesRequest, caller: Caller) -> pb.ListJobTypesResponse:
        """Describes every runnable job type with its typed contract."""
        types = [
            convert.job_type_to_proto(plugin, handler.name)
            for name, handler in sorted(self.chain.types, key=lambda pair: pair[0])
            if (plugin := handler.plugin(name)) is not None
        ]
        return pb.ListJobTypesResponse(job_types=types)

    async def watch_job(self, message: pb.WatchJobRequest, caller: Caller) -> AsyncIterator[pb.WatchJobResponse]:
        """Streams a request's Responses after ``after_sequence``, ending after the final one."""
        principal = caller.principal
        request_id = principal.qualify(_required_id(message.request_id))
        if message.after_sequence > MAX_SEQUENCE:
            raise _invalid([FieldViolation("after_sequence", f"must be at most {MAX_SEQUENCE}")])
        await self._visible_job(principal, request_id)
        key = caller.watch_key
        mine = self.watches.get(key, 0)
        per_principal = self.limits.max_watches_per_principal
        if mine >= per_principal or sum(self.watches.values()) >= self.limits.max_watches:
            share = mine >= per_principal
            raise ResourceExhausted(
                "too many open WatchJob streams; close some or retry later",
                [
                    QuotaViolation(f"principal:{key}", f"at most {per_principal} open WatchJob streams")
                    if share
                    else QuotaViolation("server", f"at most {self.limits.max_watches} open WatchJob streams")
                ],
                reason="TOO_MANY_WATCHES",
                metadata={"limit_per_principal": str(per_principal)},
            )
        self.watches[key] = mine + 1
        try:
            async for response in self.connector.watch(request_id, message.after_sequence):
                if not principal.admin:
                    response = dataclasses.replace(response, request_id=principal.unqualify(request_id))
                yield pb.WatchJobResponse(response=convert.response_to_proto(response))
        finally:
            self.watches[key] -= 1
            if not self.watches[key]:
                del self.watches[key]

    async def get_job(self, message: pb.GetJobRequest, caller: Caller) -> pb.GetJobResponse:
        """Returns one job (FULL unless asked for BASIC)."""
        principal = caller.principal
        view = _view(message.view, pb.JOB_VIEW_FULL)
        job = await self._visible_job(principal, principal.qualify(_required_id(message.request_id)))
        return pb.GetJobResponse(job=convert.job_to_proto(self._as_seen_by(principal, job), view))

    async def list_jobs(self, message: pb.ListJobsRequest, caller: Caller) -> pb.ListJobsResponse:
        """Returns a page of jobs in submit order (only the caller's own, unless an admin)."""
        principal = caller.principal
        violations: list[FieldViolation] = []
        if message.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        for index, request_type in enumerate(message.types):
            _check_type(request_type, f"types[{index}]", violations)
        _check_id(message.parent_id, "parent_id", violations, required=False)
        if violations:
            raise _invalid(violations)
        view = _view(message.view, pb.JOB_VIEW_BASIC)
        newest_first = _newest_first(message.order_by)
        states = frozenset(convert.state_from_proto(value, "states") for value in message.states)
        if RequestState.UNSPECIFIED in states:
            raise _invalid([FieldViolation("states", "REQUEST_STATE_UNSPECIFIED is no state a job can be in")])
        parent_id = principal.qualify(message.parent_id)
        creator = ""
        if not principal.admin:
            # Children of one's own job are one's own too, whoever submitted them. A parent
            # one may not see lists like an unknown one: only one's own jobs (none).
            creator = principal.name
            if parent_id:
                try:
                    parent = await self.connector.get(parent_id)
                except NotFound:
                    parent = None
                if parent is not None and await self._owns(principal, parent):
                    creator = ""
        job_filter = JobFilter(states=states, types=frozenset(message.types), parent_id=parent_id, creator=creator)
        after = decode_page_token(message.page_token, job_filter, newest_first) if message.page_token else 0
        page_size = min(message.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = await self.connector.list_jobs(job_filter, page_size, after, newest_first=newest_first)
        reply = pb.ListJobsResponse()
        budget = self.max_reply_bytes - REPLY_OVERHEAD
        next_cursor = page.next_cursor
        for index, job in enumerate(page.jobs):
            item = convert.job_to_proto(self._as_seen_by(principal, job), view)
            # A page ends early rather than outgrow the message size limit (it holds one job at least).
            budget -= item.ByteSize() + 8
            if budget < 0 and reply.jobs:
                next_cursor = page.cursors[index - 1]
                break
            reply.jobs.append(item)
        if next_cursor is not None:
            reply.next_page_token = encode_page_token(next_cursor, job_filter, newest_first)
        return reply

    async def cancel_job(self, message: pb.CancelJobRequest, caller: Caller) -> pb.CancelJobResponse:
        """Cancels a queued job, or signals a running one."""
        principal = caller.principal
        request_id = principal.qualify(_required_id(message.request_id))
        await self._visible_job(principal, request_id)
        job = await self.connector.cancel(request_id)
        log.debug("cancel of request %s: now %s", job.request.id, job.state.name)
        return pb.CancelJobResponse(job=convert.job_to_proto(self._as_seen_by(principal, job)))

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
        self, name: str, message_type: type[In], method: Callable[[In, Caller], Awaitable[Out]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        async def handle(raw: bytes, context: Context) -> Out | None:
            caller: Caller | None = None
            try:
                caller = self.caller(context)  # before the bytes are looked at
                reply = await method(_parse(message_type, raw), caller)
            except Exception as error:  # every failure gets a status with details
                failure = _in_names_of(caller, _as_ajs_error(error))
                self.observer.call_ended(name, failure.code.name)
                await abort(context, failure)
                return None
            self.observer.call_ended(name, "OK")
            return reply

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=_serialize)

    def _stream(
        self, name: str, message_type: type[In], method: Callable[[In, Caller], AsyncIterator[Out]]
    ) -> grpc.RpcMethodHandler[bytes, Message]:
        async def handle(raw: bytes, context: Context) -> AsyncIterator[Out]:
            # A client gone cancels this task; let it propagate (catching it leaks: grpc #43360).
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            slow = False
            caller: Caller | None = None

            def drop() -> None:
                nonlocal slow
                slow = True
                task.cancel()

            try:
                caller = self.caller(context)  # before the bytes are looked at
                async for message in method(_parse(message_type, raw), caller):
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
                failure = _in_names_of(caller, _as_ajs_error(error))
                self.observer.call_ended(name, failure.code.name)
                await abort(context, failure)
            else:
                self.observer.call_ended(name, "OK")

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=_serialize)


Context = grpc.aio.ServicerContext[bytes, Message]


def _view(value: int, default: int) -> int:
    if value == pb.JOB_VIEW_UNSPECIFIED:
        return default
    if value not in (pb.JOB_VIEW_BASIC, pb.JOB_VIEW_FULL):
        raise _invalid([FieldViolation("view", f"unknown job view {value}")])
    return value


def _in_names_of(caller: Caller | None, error: AjsError) -> AjsError:
    """``error`` with stored ids written as the caller names them (its own namespace left out)."""
    if caller is None or caller.principal.admin:
        return error
    own = f"~{caller.principal.name}/"
    if own not in error.message and not any(own in value for value in error.metadata.values()):
        return error
    renamed = copy.copy(error)  # the same error object may answer several callers
    renamed.message = error.message.replace(own, "")
    renamed.args = (renamed.message,)
    renamed.metadata = {key: value.replace(own, "") for key, value in error.metadata.items()}
    return renamed


def _as_ajs_error(error: Exception) -> AjsError:
    """``error`` itself if it is the project's; else logged and reported as INTERNAL."""
    if isinstance(error, AjsError):
        return error
    log.exception("unexpected error in a JobService call")
    return Internal("internal error; the server logged the details", reason="INTERNAL_ERROR")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
