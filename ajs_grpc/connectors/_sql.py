"""What the SQL connectors share: columns, rows to Jobs, answering a committed batch.

SQLite and PostgreSQL store the same fields; only their encodings differ (times
as microseconds or ``timestamptz``, maps as JSON text or ``jsonb``), so each
connector passes a :class:`Decoding`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from google.protobuf import any_pb2

from ajs_grpc.connectors.base import Connector
from ajs_grpc.errors import Code
from ajs_grpc.model import ErrorStatus, Job, Progress, Request, RequestState, Response

__all__ = [
    "JOB_WIDTH",
    "MAX_POSITION",
    "RESPONSE_COLUMNS",
    "SELECT_JOBS",
    "Decoding",
    "Done",
    "Outcome",
    "deliver",
    "error_fields",
    "job_from_row",
    "response_from_row",
]

T = TypeVar("T")

JOB_COLUMNS = (
    "j.position, j.id, j.parent_id, j.type, j.creator, j.create_time, j.data, j.input_type_url, j.input_value, "
    "j.priority, j.run_after, j.max_attempts, j.state, j.attempt, j.cancel_requested, j.update_time, j.due_time"
)
RESPONSE_COLUMNS = (
    "r.sequence, r.create_time, r.state, r.is_final, r.data, r.output_type_url, r.output_value, "
    "r.progress_fraction, r.progress_message, r.error"
)
# A job, its last Response, and its lease token (the row's last column).
SELECT_JOBS = (
    f"SELECT {JOB_COLUMNS}, {RESPONSE_COLUMNS}, j.lease_token FROM jobs j "
    "JOIN responses r ON r.position = j.position AND r.sequence = j.last_sequence"
)
JOB_WIDTH = JOB_COLUMNS.count(",") + 1
# Above every job's position: the cursor of a newest-first listing's first page.
MAX_POSITION = 2**63 - 1
RESPONSE_WIDTH = RESPONSE_COLUMNS.count(",") + 1


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a connector's stored values read back: times, string maps, error records."""

    time: Callable[[Any], datetime | None]
    mapping: Callable[[Any], dict[str, str]]
    record: Callable[[Any], dict[str, Any] | None]


def error_fields(error: ErrorStatus | None) -> dict[str, Any] | None:
    """An ErrorStatus as a plain record (stored as JSON)."""
    if error is None:
        return None
    return {"code": int(error.code), "message": error.message, "reason": error.reason, "metadata": dict(error.metadata)}


def _error(fields: dict[str, Any] | None) -> ErrorStatus | None:
    if fields is None:
        return None
    try:
        code = Code(fields["code"])
    except ValueError:
        code = Code.UNKNOWN
    return ErrorStatus(code, fields["message"], fields["reason"], fields["metadata"])


def _any(type_url: str | None, value: bytes | None) -> any_pb2.Any | None:
    return None if type_url is None else any_pb2.Any(type_url=type_url, value=bytes(value or b""))


def response_from_row(request_id: str, row: Sequence[Any], decoding: Decoding) -> Response:
    """A Response from the response columns of a row."""
    sequence, created, state, is_final, data, type_url, value, fraction, message, error = row[:RESPONSE_WIDTH]
    return Response(
        request_id=request_id,
        sequence=sequence,
        create_time=decoding.time(created),  # type: ignore[arg-type]
        state=RequestState(state),
        is_final=bool(is_final),
        data=decoding.mapping(data),
        output=_any(type_url, value),
        progress=None if fraction is None else Progress(fraction, message or ""),
        error=_error(decoding.record(error)),
    )


def job_from_row(row: Sequence[Any], decoding: Decoding) -> Job:
    """A Job from a row of :data:`SELECT_JOBS`."""
    (_, request_id, parent_id, type_, creator, created, data, type_url, value, priority, run_after, max_attempts,
     state, attempt, cancel_requested, updated, due) = row[:JOB_WIDTH]  # fmt: skip
    request = Request(
        id=request_id,
        type=type_,
        data=decoding.mapping(data),
        input=_any(type_url, value),
        parent_id=parent_id,
        creator=creator,
        create_time=decoding.time(created),
        priority=priority,
        run_after=decoding.time(run_after),
    )
    return Job(
        request=request,
        state=RequestState(state),
        attempt=attempt,
        last_response=response_from_row(request_id, row[JOB_WIDTH:], decoding),
        update_time=decoding.time(updated),  # type: ignore[arg-type]
        cancel_requested=bool(cancel_requested),
        max_attempts=max_attempts,
        due_time=decoding.time(due),
    )


@dataclasses.dataclass
class Done(Generic[T]):
    """What a write did: its result, and whom to tell once it is committed."""

    result: T
    responses: list[str] = dataclasses.field(default_factory=list)
    work: bool = False
    cancels: list[str] = dataclasses.field(default_factory=list)

    def events(self) -> list[str]:
        """The notices other instances get: ``r:<id>`` new Response, ``w:`` work, ``c:<id>`` cancel."""
        return [f"r:{i}" for i in self.responses] + (["w:"] if self.work else []) + [f"c:{i}" for i in self.cancels]


Outcome = tuple["asyncio.Future[Any]", Done[Any] | None, BaseException | None]
"""A write's caller, what the committed write did (None if it failed), and its error."""


def deliver(connector: Connector, outcomes: Iterable[Outcome]) -> None:
    """After a commit: tells watchers and listeners, then answers each caller."""
    for future, done, error in outcomes:
        if done is not None:
            for request_id in done.responses:
                connector._notify_response(request_id)
            if done.work:
                connector._notify_work()
            for request_id in done.cancels:
                connector._notify_cancel(request_id)
        if future.done():
            continue  # the caller went away; the write stands
        if error is not None:
            future.set_exception(error)
        else:
            assert done is not None
            future.set_result(done.result)
