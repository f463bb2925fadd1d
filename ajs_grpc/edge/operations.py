"""The ``google.longrunning.Operations`` facade: every job is an Operation.

Clients written for Google-style APIs poll, wait for, list, cancel and delete
long-running operations through this standard service; here each operation is a
job. ``Operation.name`` is ``operations/`` followed by the request id as the caller
names it (everything after the prefix is the id, which may hold ``/`` and ``@``);
``metadata`` is the ``ajs.v1.Job``, ``done`` is true once it ended, ``response`` its
typed output (or its final Response) and ``error`` the ``google.rpc.Status`` of a
FAILED or CANCELLED job (:func:`~ajs_grpc.edge.convert.operation_from_job`).

Each rpc is answered by the JobService call that does the same thing, so the rules
are those of JobService, kept in one place: who sees which job and the per-principal
namespaces (:mod:`~ajs_grpc.edge.ownership`), errors and their statuses, page
tokens, watch slots. The calls pass the same pipeline (authentication, error to
status, metrics, logging) as JobService's.

- ``CancelOperation`` of an operation that is already done fails with
  FAILED_PRECONDITION, as ``CancelJob`` does: the google.longrunning contract leaves
  the case open, and a caller learns that its cancel came too late.
- ``DeleteOperation`` deletes an ended job as ``DeleteJob`` does (with its
  descendants); it does not cancel, so a job not yet ended is FAILED_PRECONDITION.
- ``WaitOperation`` waits until the job ends or ``timeout`` passes (60 s when unset,
  at most 300 s), or until just before the call's deadline if that comes first, then
  answers its latest state (``done`` tells which happened).
- ``ListOperations`` takes an AIP-160 ``filter`` over ``state``, ``type``, ``done`` and
  ``parent_id`` (see :func:`parse_filter`) and pages as ``ListJobs`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
from google.longrunning import operations_proto_pb2 as lro
from google.protobuf import empty_pb2

from ajs_grpc.core.errors import FieldViolation, InvalidArgument
from ajs_grpc.core.logs import current_request_id
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge import convert
from ajs_grpc.edge.pipeline import Caller
from ajs_grpc.edge.service import JobService
from ajs_grpc.edge.validation import check_id, check_type, invalid
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = [
    "DEFAULT_WAIT",
    "MAX_WAIT",
    "SERVICE",
    "SERVICE_NAME",
    "OperationFilter",
    "Operations",
    "parse_filter",
    "request_id_of",
]

SERVICE = lro.DESCRIPTOR.services_by_name["Operations"]
SERVICE_NAME = SERVICE.full_name
# Seconds WaitOperation waits when its request sets no timeout, and at most.
DEFAULT_WAIT = 60.0
MAX_WAIT = 300.0
# Seconds before the call's deadline at which WaitOperation answers, so that its reply arrives in time.
DEADLINE_MARGIN = 0.25
# The longest ListOperations filter taken.
MAX_FILTER_LENGTH = 2000
# The parent a ListOperations call may name (google.longrunning's "operations" collection).
COLLECTION = "operations"


def request_id_of(name: str, field: str = "name") -> str:
    """The request id an operation name (``operations/{id}``) stands for.

    Raises:
        InvalidArgument: ``name`` does not start with ``operations/`` or holds no valid id.
    """
    if not name.startswith(convert.OPERATION_PREFIX):
        raise invalid([FieldViolation(field, f"must be {convert.OPERATION_PREFIX}{{request id}}")])
    request_id = name[len(convert.OPERATION_PREFIX) :]
    violations: list[FieldViolation] = []
    check_id(request_id, field, violations, required=True)
    if violations:
        raise invalid(
            [FieldViolation(field, f"the id after {convert.OPERATION_PREFIX!r} {v.description}") for v in violations]
        )
    return request_id


# Seconds the current call has left before its deadline (None: no deadline); set by _DeadlineAware.
_time_remaining: contextvars.ContextVar[float | None] = contextvars.ContextVar("time_remaining", default=None)


class _DeadlineAware(grpc.GenericRpcHandler):
    """Serves ``inner``'s unary calls, telling each of them the time its call has left (:data:`_time_remaining`)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]

        async def timed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _time_remaining.set(context.time_remaining())
            return await behavior(raw, context)

        return grpc.unary_unary_rpc_method_handler(timed, handler.request_deserializer, handler.response_serializer)


class Operations:
    """Implements ``google.longrunning.Operations`` over the jobs of a JobService."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler that serves this service on a ``grpc.aio`` server (JobService's pipeline)."""
        return _DeadlineAware(self.jobs.pipeline.handler(SERVICE, self))

    def _named(self, name: str, caller: Caller) -> str:
        """The request id of an operation name; the call's log lines carry its stored id."""
        request_id = request_id_of(name)
        current_request_id.set(caller.principal.qualify(request_id))
        return request_id

    async def _job(self, request_id: str, caller: Caller) -> pb.Job:
        reply = await self.jobs.get_job(pb.GetJobRequest(request_id=request_id, view=pb.JOB_VIEW_FULL), caller)
        return reply.job

    async def get_operation(self, message: lro.GetOperationRequest, caller: Caller) -> lro.Operation:
        """The latest state of an operation."""
        return convert.operation_from_job(await self._job(self._named(message.name, caller), caller))

    async def list_operations(self, message: lro.ListOperationsRequest, caller: Caller) -> lro.ListOperationsResponse:
        """A page of the caller's operations (an admin's: all) matching ``filter``, in submit order."""
        if message.name not in ("", COLLECTION):
            raise invalid([FieldViolation("name", f'must be "{COLLECTION}" or empty')])
        wanted = parse_filter(message.filter)
        if wanted.matches_nothing:
            return lro.ListOperationsResponse()
        request = pb.ListJobsRequest(
            page_size=message.page_size,
            page_token=message.page_token,
            states=sorted(int(state) for state in wanted.states),  # type: ignore[misc]
            types=sorted(wanted.types),
            parent_id=wanted.parent_id,
            view=pb.JOB_VIEW_FULL,
        )
        # Cut to fit the reply as Operations, which are a little larger than their Jobs.
        operations, next_page_token = await self.jobs.list_page(request, caller, convert.operation_from_job)
        return lro.ListOperationsResponse(operations=operations, next_page_token=next_page_token)

    async def cancel_operation(self, message: lro.CancelOperationRequest, caller: Caller) -> empty_pb2.Empty:
        """Cancels the job: at once if queued, when it stops if running; FAILED_PRECONDITION once done."""
        request_id = self._named(message.name, caller)
        await self.jobs.cancel_job(pb.CancelJobRequest(request_id=request_id), caller)
        return empty_pb2.Empty()

    async def delete_operation(self, message: lro.DeleteOperationRequest, caller: Caller) -> empty_pb2.Empty:
        """Deletes a done operation's job (and its descendants); FAILED_PRECONDITION while not done."""
        request_id = self._named(message.name, caller)
        await self.jobs.delete_job(pb.DeleteJobRequest(request_id=request_id), caller)
        return empty_pb2.Empty()

    async def wait_operation(self, message: lro.WaitOperationRequest, caller: Caller) -> lro.Operation:
        """The operation once done, or its latest state when ``timeout`` passed first."""
        request_id = self._named(message.name, caller)
        timeout = _wait_seconds(message)
        remaining = _time_remaining.get()
        if remaining is not None:  # the call's deadline caps the wait (google.longrunning's rule)
            timeout = min(timeout, max(remaining - DEADLINE_MARGIN, 0.0))
        job = await self._job(request_id, caller)
        if not RequestState(job.state).is_final and timeout > 0:
            # Followed as WatchJob follows it (the same ownership and watch slots), from the newest Response.
            watch = pb.WatchJobRequest(request_id=request_id, after_sequence=job.last_response.sequence)
            responses = self.jobs.watch_job(watch, caller)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    try:
                        async for reply in responses:
                            if reply.response.is_final:
                                break
                    finally:
                        if isinstance(responses, AsyncGenerator):
                            await responses.aclose()  # its watch slot is freed now, not when collected
            job = await self._job(request_id, caller)
        return convert.operation_from_job(job)


def _wait_seconds(message: lro.WaitOperationRequest) -> float:
    """Seconds a WaitOperation call waits at most: its timeout, capped (unset: the default)."""
    if not message.HasField("timeout"):
        return DEFAULT_WAIT
    timeout = message.timeout
    if timeout.seconds < 0 or timeout.nanos < 0 or timeout.nanos >= 1_000_000_000:
        raise invalid([FieldViolation("timeout", "must be a duration of 0 or more")])
    return min(timeout.seconds + timeout.nanos / 1e9, MAX_WAIT)


# -- the ListOperations filter (a subset of AIP-160) ----------------------------------------------

_FINAL = frozenset(state for state in RequestState if state.is_final)
_ALL_STATES = frozenset(RequestState) - {RequestState.UNSPECIFIED}
_FIELDS = {
    "state": "state",
    "metadata.state": "state",
    "done": "done",
    "type": "type",
    "metadata.request.type": "type",
    "parent_id": "parent_id",
    "metadata.request.parent_id": "parent_id",
}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<paren>[()])
      | (?P<op>!=|=)
      | "(?P<string>(?:[^"\\]|\\.)*)"
      | (?P<word>[A-Za-z0-9_.:/@~\-]+)
      | (?P<other>\S)
    )""",
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class OperationFilter:
    """What a ListOperations filter keeps.

    Attributes:
        states: the states kept (empty: every state).
        types: the job types kept (empty: every type).
        parent_id: only children of this request (empty: any).
        matches_nothing: the filter contradicts itself (``state = FAILED AND done = false``).
    """

    states: frozenset[RequestState] = frozenset()
    types: frozenset[str] = frozenset()
    parent_id: str = ""
    matches_nothing: bool = False


@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str  # paren, op, string, word
    text: str
    at: int  # where it starts in the filter, from 1


@dataclasses.dataclass(frozen=True)
class _Comparison:
    field: str  # state (done is a set of states), type or parent_id
    states: frozenset[RequestState] = frozenset()
    texts: frozenset[str] = frozenset()


def _bad(description: str) -> InvalidArgument:
    return invalid([FieldViolation("filter", description)])


def parse_filter(text: str) -> OperationFilter:
    """The jobs a ListOperations ``filter`` keeps: a subset of AIP-160.

    Comparisons ``FIELD = VALUE`` (and ``!=`` for ``state`` and ``done``) on the fields
    ``state`` (``FAILED`` or ``REQUEST_STATE_FAILED``, any case), ``done`` (``true`` or
    ``false``), ``type`` and ``parent_id`` (a bare word or a "quoted string"), also named
    as the Operation's fields (``metadata.state``, ``metadata.request.type``,
    ``metadata.request.parent_id``), joined by ``AND``; comparisons of one field may be
    joined by ``OR`` (which binds tighter than ``AND``, as in AIP-160), optionally in
    parentheses: ``(state = FAILED OR state = CANCELLED) AND type = "countdown"``.

    Raises:
        InvalidArgument: anything else, with a field violation on ``filter``.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise _bad(f"must be at most {MAX_FILTER_LENGTH} characters")
    return _Parser(_tokens(text)).parse()


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while (match := _TOKEN.match(text, position)) is not None and match.lastgroup is not None:
        position = match.end()
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "other":
            raise _bad(f"unexpected {value!r} at {match.start(kind) + 1}")
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value)
        tokens.append(_Token(kind, value, match.start(kind) + 1))
    return tokens


class _Parser:
    """filter := group (AND group)*; group := "(" any ")" | any; any := comparison (OR comparison)*."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0

    def parse(self) -> OperationFilter:
        states = _ALL_STATES
        types: frozenset[str] | None = None
        parents: frozenset[str] | None = None
        while self.tokens:
            group = self._group()
            if group.field == "state":
                states &= group.states
            elif group.field == "type":
                types = group.texts if types is None else types & group.texts
            else:
                if len(group.texts) > 1:
                    raise _bad("parent_id takes one value (no OR)")
                parents = group.texts if parents is None else parents & group.texts
            token = self._peek()
            if token is None:
                break
            if not self._keyword("AND"):
                raise _bad(f"expected AND at {token.at}, found {token.text!r} (other operators are not supported)")
        return OperationFilter(
            states=frozenset() if states == _ALL_STATES else states,
            types=types or frozenset(),
            parent_id=next(iter(parents)) if parents else "",
            matches_nothing=not states or types == frozenset() or parents == frozenset(),
        )

    def _peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self, kinds: tuple[str, ...], what: str) -> _Token:
        token = self._peek()
        if token is None:
            raise _bad(f"ends where {what} was expected")
        if token.kind not in kinds:
            raise _bad(f"expected {what} at {token.at}, found {token.text!r}")
        self.index += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token is not None and token.kind == "word" and token.text == word:
            self.index += 1
            return True
        return False

    def _group(self) -> _Comparison:
        token = self._peek()
        opened = token is not None and token.kind == "paren" and token.text == "("
        if opened:
            self.index += 1
        group = self._comparison()
        while self._keyword("OR"):
            other = self._comparison()
            if other.field != group.field:
                raise _bad(f"OR joins comparisons of one field, not {group.field} and {other.field}")
            group = _Comparison(group.field, group.states | other.states, group.texts | other.texts)
        if opened:
            closing = self._take(("paren",), "')'")
            if closing.text != ")":
                raise _bad(f"expected ')' at {closing.at}")
        return group

    def _comparison(self) -> _Comparison:
        name = self._take(("word",), "a field (state, type, done or parent_id)")
        field = _FIELDS.get(name.text)
        if field is None:
            raise _bad(f"unknown field {name.text!r} at {name.at}: state, type, done and parent_id are supported")
        equal = self._take(("op",), "= or !=").text == "="
        token = self._take(("string", "word"), "a value")
        value = token.text
        if field == "state":
            state = _state(value, token.at)
            return _Comparison("state", frozenset({state}) if equal else _ALL_STATES - {state})
        if field == "done":
            if value.lower() not in ("true", "false"):
                raise _bad(f"done is true or false, not {value!r}")
            done = (value.lower() == "true") == equal
            return _Comparison("state", _FINAL if done else _ALL_STATES - _FINAL)
        if not equal:
            raise _bad(f"{field} supports = only")
        violations: list[FieldViolation] = []
        if field == "type":
            check_type(value, "filter", violations)
        else:
            check_id(value, "filter", violations, required=True)
        if violations:
            raise _bad(f"{field} {value!r} {violations[0].description}")
        return _Comparison(field, texts=frozenset({value}))


def _state(value: str, at: int) -> RequestState:
    state = RequestState.__members__.get(value.upper().removeprefix("REQUEST_STATE_"), RequestState.UNSPECIFIED)
    if state is RequestState.UNSPECIFIED:
        names = ", ".join(state.name for state in sorted(_ALL_STATES))
        raise _bad(f"unknown state {value!r} at {at}: one of {names}")
    return state
