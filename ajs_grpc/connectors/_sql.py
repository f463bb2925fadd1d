"""The SQL core: every rule of the SQL connectors, written once, over named queries per dialect.

SQLite and PostgreSQL keep the same rows and follow the same rules; what differs is
the text of their statements, how values are encoded (times as microseconds or
``timestamptz``, maps as JSON text or ``jsonb``), how writes are scheduled (a writer
thread, an async pool) and how driver errors translate. So:

* each store's statements live in ``connectors/queries/<dialect>.sql``, under a
  name with one line of why (as procrastinate keeps ``sql/queries.sql``); states are
  written ``${CREATED}``, ``${FINISHED}`` ... and filled in from
  :class:`~ajs_grpc.core.model.RequestState`, so no SQL holds a state number of its own;
* a :class:`Dialect` says how values are encoded and decoded;
* :class:`SqlConnector` implements the Connector contract once, as operations on a
  :class:`Session` (run one named query); a subclass only schedules them
  (:meth:`SqlConnector._write` in a group-committed transaction, each operation in a
  savepoint of its own; :meth:`SqlConnector._read`).

The operations are ``async`` so that PostgreSQL's can await the driver. SQLite's
driver is synchronous: its session never awaits, so its writer thread runs each
operation to completion with :func:`run_to_completion`, without an event loop.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import re
import string
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf import any_pb2
from typing_extensions import override

from ajs_grpc.connectors.base import (
    Claim,
    Connector,
    FeedItem,
    FeedPage,
    JobFilter,
    Page,
    QueueInfo,
    Renewal,
    Submit,
    not_ended,
    plan_submits,
    schedule_not_found,
    schedule_taken,
)
from ajs_grpc.core.errors import AjsError, Code
from ajs_grpc.core.flow import HELD_BACK_CAUSES, Bucket, Gate
from ajs_grpc.core.model import (
    NO_FLOW,
    ErrorStatus,
    Flow,
    Job,
    Progress,
    Request,
    RequestState,
    Response,
    Update,
)
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule, template_from_json, template_to_json

__all__ = [
    "JOB_WIDTH",
    "MAX_POSITION",
    "Decoding",
    "Dialect",
    "Done",
    "Outcome",
    "Session",
    "SqlConnector",
    "deliver",
    "load_queries",
    "run_to_completion",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

JOB_COLUMNS = (
    "j.position, j.id, j.parent_id, j.type, j.creator, j.create_time, j.data, j.input_type_url, j.input_value, "
    "j.priority, j.run_after, j.max_attempts, j.state, j.attempt, j.cancel_requested, j.update_time, j.due_time, "
    "j.queue, j.concurrency_key, j.concurrency_limit, j.rate_key, j.rate, j.burst, j.ordered_key, j.unique_key, "
    "j.depends_on, j.allow_failed_deps, j.expire_time, j.request_max_attempts, j.timeout, j.has_dependents"
)
RESPONSE_COLUMNS = (
    "r.sequence, r.create_time, r.state, r.is_final, r.data, r.output_type_url, r.output_value, "
    "r.progress_fraction, r.progress_message, r.error"
)
# A job, its last Response, and its lease token (the row's last column): ${JOB} in the queries.
SELECT_JOBS = (
    f"SELECT {JOB_COLUMNS}, {RESPONSE_COLUMNS}, j.lease_token FROM jobs j "
    "JOIN responses r ON r.position = j.position AND r.sequence = j.last_sequence"
)
JOB_WIDTH = JOB_COLUMNS.count(",") + 1
# Where a row of ${JOB} says whether the job has dependents (to resolve when it ends).
HAS_DEPENDENTS = JOB_WIDTH - 1
RESPONSE_WIDTH = RESPONSE_COLUMNS.count(",") + 1
# Above every job's position: the cursor of a newest-first listing's first page.
MAX_POSITION = 2**63 - 1
# Above and below every priority (an int32): where a claim's pages of gated candidates start
# and, with no plain job to stop at, end.
ABOVE_PRIORITIES = 2**31
BELOW_PRIORITIES = -(2**31) - 1
# Gated candidates a claim reads per round trip.
GATED_PAGE = 64

S = RequestState
# The final states are the highest: "state >= ${FINISHED}" is "ended" (as the indexes of
# databases made before states were named in the queries say it too).
assert {state for state in S if state.is_final} == {state for state in S if state >= S.FINISHED}
# What ${NAME} stands for in the query files.
SUBSTITUTIONS = {
    **{state.name: str(int(state)) for state in RequestState},
    "JOB": SELECT_JOBS,
    "RESPONSE_COLUMNS": RESPONSE_COLUMNS,
    # SQLite: the highest feed number given so far (kept in feed_floor once Responses are deleted).
    "FEED_END": "max(coalesce((SELECT max(feed) FROM responses), 0), (SELECT n FROM feed_floor))",
    # PostgreSQL: the label of a job's next Response (in a statement that saves the job as "saved"):
    # the writer's transaction id, or the job's previous Response's label if that is higher.
    "FEED_XID": "GREATEST(pg_current_xact_id(), (SELECT p.xid FROM responses p "
    "WHERE p.position = saved.position AND p.sequence = %(sequence)s - 1))",
}
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(dialect: str) -> dict[str, tuple[str, ...]]:
    """The named queries of ``connectors/queries/<dialect>.sql``, each as its statements.

    Raises:
        ValueError: a query refers to a ``${NAME}`` that is not defined.
    """
    text = resources.files("ajs_grpc.connectors").joinpath(f"queries/{dialect}.sql").read_text()
    parts = _NAME.split(text)  # [preamble, name, body, name, body, ...]
    queries: dict[str, tuple[str, ...]] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        try:
            filled = string.Template("\n".join(lines)).substitute(SUBSTITUTIONS)
        except KeyError as unknown:
            raise ValueError(f"query {name} of {dialect}.sql refers to an unknown ${{{unknown.args[0]}}}") from None
        queries[name] = tuple(statement.strip() for statement in filled.split(";") if statement.strip())
    return queries


# -- rows ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a connector's stored values read back: times, string maps, error records."""

    time: Callable[[Any], datetime | None]
    mapping: Callable[[Any], dict[str, str]]
    record: Callable[[Any], dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class Dialect:
    """One store's statements and encodings.

    Attributes:
        name: the dialect's name (``sqlite``, ``postgres``).
        queries: its named queries (:func:`load_queries`).
        time: a datetime (or None) as a query parameter.
        mapping: a string map (Request or Response data) as a query parameter.
        record: an error record (a dict, or None) as a query parameter.
        array: a list (states, types, positions) as a query parameter.
        decoding: how stored values read back.
        own_clock: the store compares leases and due times with a clock of its own
            when the connector was given none: its queries then get ``now`` as NULL
            (PostgreSQL's ``clock_timestamp()``, so clock skew between instances
            cannot expire a lease early).
    """

    name: str
    queries: Mapping[str, tuple[str, ...]]
    time: Callable[[datetime | None], Any]
    mapping: Callable[[Mapping[str, str]], Any]
    record: Callable[[dict[str, Any] | None], Any]
    array: Callable[[Sequence[Any]], Any]
    decoding: Decoding
    own_clock: bool = False
    feed_key: Callable[[int], Any] = int
    """A feed place's first part as a query parameter (PostgreSQL's transaction ids go as text)."""


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


def _feed_place(token: str, prefix: str) -> tuple[str, int, int, int] | None:
    """The store and place a feed token of :meth:`SqlConnector.feed` names; None if it is none."""
    if not token.startswith(prefix):
        return None
    store, *parts = token[len(prefix) :].split(".")
    if len(parts) != 3 or not all(part.isascii() and part.isdigit() and len(part) <= 19 for part in parts):
        return None
    k, position, sequence = (int(part) for part in parts)
    if max(k, position, sequence) >= 2**63:
        return None
    return store, k, position, sequence


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
    """A Job from a row of ``${JOB}``."""
    (_, request_id, parent_id, type_, creator, created, data, type_url, value, priority, run_after, max_attempts,
     state, attempt, cancel_requested, updated, due, queue, c_key, c_limit, r_key, rate, burst, o_key,
     u_key, depends_on, allow_failed, expire, request_attempts, timeout, _) = row[:JOB_WIDTH]  # fmt: skip
    flow = NO_FLOW
    if c_key is not None or r_key is not None or o_key is not None or u_key is not None:
        flow = Flow(c_key, c_limit, r_key, rate, burst, o_key, u_key)
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
        queue=queue,
        depends_on=tuple(depends_on.split()),
        expire_time=decoding.time(expire),
        max_attempts=request_attempts,
        timeout=timeout,
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
        flow=flow,
        allow_failed_dependencies=bool(allow_failed),
    )


# -- running operations -----------------------------------------------------------------


class Session(Protocol):
    """Runs a dialect's named queries inside the current transaction."""

    async def fetch(self, name: str, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        """The rows of query ``name`` (of its last statement)."""

    async def execute(self, name: str, params: Mapping[str, Any]) -> int:
        """Runs query ``name``; how many rows its last statement changed."""

    async def execute_many(self, name: str, params: Sequence[Mapping[str, Any]]) -> None:
        """Runs query ``name`` once per item of ``params``, each statement for all of them at once."""


@dataclasses.dataclass
class Done(Generic[T]):
    """What a write did: its result, and whom to tell once it is committed."""

    result: T
    responses: list[str] = dataclasses.field(default_factory=list)
    work: bool = False
    cancels: list[str] = dataclasses.field(default_factory=list)
    fed: bool = False
    """New jobs were stored (their first Responses are in the feed, though nobody watches them)."""

    def events(self) -> list[str]:
        """The notices other instances get: ``r:<id>`` new Response, ``w:`` work, ``c:<id>`` cancel, ``f:`` feed."""
        return (
            [f"r:{i}" for i in self.responses]
            + (["w:"] if self.work else [])
            + [f"c:{i}" for i in self.cancels]
            + (["f:"] if self.fed and not self.responses else [])
        )


Operation = Callable[[Session], Coroutine[Any, Any, T]]
"""A read, or a write (returning :class:`Done`), on a session."""

Outcome = tuple["asyncio.Future[Any]", Done[Any] | None, BaseException | None]
"""A write's caller, what the committed write did (None if it failed), and its error."""


def run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs an operation whose session never awaits (SQLite's) to its end, in this thread, without a loop.

    Raises:
        RuntimeError: the operation awaited something that would need an event loop.
    """
    try:
        coroutine.send(None)
    except StopIteration as finished:
        result: T = finished.value
        return result
    coroutine.close()
    raise RuntimeError("an operation on a synchronous store awaited something else")


def deliver(connector: Connector, outcomes: Iterable[Outcome]) -> None:
    """After a commit: tells watchers and listeners, then answers each caller."""
    for future, done, error in outcomes:
        if done is not None:
            for request_id in done.responses:
                connector._notify_response(request_id)
            if done.fed:
                connector._notify_feeds()
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


# -- the rules, once ----------------------------------------------------------------------


class SqlConnector(Connector, abc.ABC):
    """The Connector contract over a dialect's named queries; subclasses schedule the operations."""

    dialect: Dialect

    @abc.abstractmethod
    async def _write(self, operation: Operation[Done[T]]) -> T:
        """Runs a write in a transaction (group-committed, in a savepoint of its own); answers after the commit."""

    async def _write_alone(self, operation: Operation[Done[T]]) -> T:
        """Runs a write that takes a lock other instances wait on, in a transaction of its own.

        A store whose writes never wait for other instances (SQLite's one writer) group-commits it.
        """
        return await self._write(operation)

    @abc.abstractmethod
    async def _read(self, operation: Operation[T]) -> T:
        """Runs a read."""

    # -- rows and parameters -------------------------------------------------------------

    def _job(self, row: Sequence[Any]) -> Job:
        return job_from_row(row, self.dialect.decoding)

    def _store_now(self, at: datetime) -> Any:
        """``at`` as a query's ``now``: NULL when the store keeps its own clock and no clock was given."""
        if self._clock is None and self.dialect.own_clock:
            return None
        return self.dialect.time(at)

    def _response_params(self, response: Response) -> dict[str, Any]:
        d, output = self.dialect, response.output
        return {
            "sequence": response.sequence,
            "r_create_time": d.time(response.create_time),
            "r_state": int(response.state),
            "r_is_final": response.is_final,
            "r_data": d.mapping(response.data),
            "r_output_type_url": output.type_url if output is not None else None,
            "r_output_value": output.value if output is not None else None,
            "r_progress_fraction": response.progress.fraction if response.progress else None,
            "r_progress_message": response.progress.message if response.progress else None,
            "r_error": d.record(error_fields(response.error)),
        }

    def _state_params(self, job: Job) -> dict[str, Any]:
        return {
            "state": int(job.state),
            "attempt": job.attempt,
            "cancel_requested": job.cancel_requested,
            "update_time": self.dialect.time(job.update_time),
            "due_time": self.dialect.time(job.due_time),
        }

    async def _save(
        self, session: Session, position: int, job: Job, response: Response, lease: Mapping[str, Any] | None = None
    ) -> None:
        """Stores a job's new state and its new Response.

        ``lease`` (``lease_token``, ``lease_seconds``, ``worker``, ``now``) starts a new
        lease (a claim); without it a running job keeps its lease and any other releases it.
        """
        if lease is not None:
            query = "save_job_claimed"
        else:
            query = "save_job" if job.state is S.PENDING else "save_job_released"
        await session.execute(query, self._save_params(position, job, response, lease))

    def _save_params(
        self, position: int, job: Job, response: Response, lease: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"position": position, **self._state_params(job), **self._response_params(response), **(lease or {})}

    async def _locked(self, session: Session, positions: list[int]) -> list[Sequence[Any]]:
        return await session.fetch("jobs_at", {"positions": self.dialect.array(positions)})

    async def _find_locked(self, session: Session, request_id: str) -> Sequence[Any] | None:
        """The row of a job about to change, locked (None if there is none)."""
        rows = await session.fetch("find_job_locked", {"id": request_id})
        return rows[0] if rows else None

    async def _expire_rows(self, session: Session, query: str) -> Done[int]:
        """Applies :meth:`~ajs_grpc.core.model.Job.expire` to the jobs ``query`` finds."""
        at = self._now()
        rows = await session.fetch(query, {"now": self._store_now(at)})
        done: Done[int] = Done(len(rows))
        for row in rows:
            job, response = self._job(row).expire(at)
            await self._save(session, row[0], job, response)
            done.responses.append(job.request.id)
            done.work = done.work or job.state is S.CREATED or job.flow.gated
            if job.is_final:
                await self._ended(session, row, done, at)
        return done

    async def _lapse(self, session: Session, row: Sequence[Any], done: Done[Any], at: datetime) -> None:
        """Ends a queued job (locked) past its expire_time: :meth:`~ajs_grpc.core.model.Job.lapse`."""
        job, response = self._job(row).lapse(at)
        await self._save(session, row[0], job, response)
        done.responses.append(job.request.id)
        done.work = done.work or job.flow.gated
        await self._ended(session, row, done, at)

    # -- dependencies ------------------------------------------------------------------------

    async def _ended(self, session: Session, row: Sequence[Any], done: Done[Any], at: datetime) -> None:
        """Told that the job of ``row`` just ended in this write: resolves the jobs waiting for it, and on down."""
        if not row[HAS_DEPENDENTS]:
            return
        ended = [row[1]]
        while ended:
            rows = await session.fetch("waiting_dependents", {"id": ended.pop()})
            ended += await self._resolve_rows(session, rows, done, at)

    async def _resolve_rows(
        self, session: Session, rows: Sequence[Sequence[Any]], done: Done[Any], at: datetime
    ) -> list[str]:
        """Applies :meth:`~ajs_grpc.core.model.Job.resolve` to waiting jobs (locked).

        Returns:
            The ids of those it ended (cancelled) that have dependents in turn.
        """
        ended: list[str] = []
        for row in rows:
            job = self._job(row)
            dependencies = await self._find(session, list(job.request.depends_on))
            resolved, response = job.resolve(dependencies, at)
            if response is not None:
                await self._save(session, row[0], resolved, response)
                done.responses.append(job.request.id)
                done.work = done.work or resolved.flow.gated
                if row[HAS_DEPENDENTS]:
                    ended.append(job.request.id)
            elif not resolved.waiting:
                await session.execute(
                    "release_job", {"position": row[0], "due_time": self.dialect.time(resolved.due_time)}
                )
                done.work = True
        return ended

    async def _find(self, session: Session, request_ids: list[str]) -> dict[str, Job]:
        """The stored jobs of some ids, by id (those not stored left out)."""
        if not request_ids:
            return {}
        if len(request_ids) == 1:
            rows = await session.fetch("find_job", {"id": request_ids[0]})
        else:
            rows = await session.fetch("find_jobs", {"ids": self.dialect.array(request_ids)})
        return {job.request.id: job for job in map(self._job, rows)}

    # -- the queue -------------------------------------------------------------------------

    @override
    async def enqueue(
        self, request: Request, max_attempts: int = 1, flow: Flow = NO_FLOW, *, allow_failed_dependencies: bool = False
    ) -> tuple[Job, bool]:
        [result] = await self._enqueue([Submit(request, max_attempts, flow, allow_failed_dependencies)], indexed=False)
        return result

    @override
    async def enqueue_many(self, submits: Sequence[Submit | tuple[Request, int]]) -> list[tuple[Job, bool]]:
        # One write: its savepoint makes the batch all or nothing inside the group commit.
        return await self._enqueue([Submit.of(item) for item in submits], indexed=True)

    async def _enqueue(self, submits: list[Submit], *, indexed: bool) -> list[tuple[Job, bool]]:
        d = self.dialect

        async def write(session: Session) -> Done[list[tuple[Job, bool]]]:
            async def find(request_ids: list[str]) -> dict[str, Job]:
                return await self._find(session, request_ids)

            async def exists(request_id: str) -> bool:
                return bool(await session.fetch("job_exists", {"id": request_id}))

            async def find_unique(key: str, states: frozenset[RequestState], since: datetime | None) -> Job | None:
                params = {"key": key, "states": d.array(sorted(int(s) for s in states)), "since": d.time(since)}
                rows = await session.fetch("find_unique", params)
                return self._job(rows[0]) if rows else None

            for key in unique_keys:  # all at once and in one order: two submits cannot wait for each other
                await session.fetch("lock_unique", {"key": key})
            at = self._now()
            plan = await plan_submits(submits, find, exists, find_unique, indexed=indexed, at=at)
            added = [self._insert_params(p.job, p.first) for p in plan if p.created and p.first is not None]
            if added:
                await session.execute_many("insert_job", added)
                self._inserted(len(added))
            done: Done[list[tuple[Job, bool]]] = Done([], work=any(p.created for p in plan), fed=bool(added))
            waiting = [p.job for p in plan if p.created and p.job.waiting]
            if waiting:
                # The edges first: their marks lock what they name, then the states are read.
                edges = [
                    {"depends_on": dep, "request_id": j.request.id} for j in waiting for dep in j.request.depends_on
                ]
                await session.execute_many("add_dependencies", edges)
                rows = await session.fetch("find_jobs", {"ids": d.array([j.request.id for j in waiting])})
                await self._resolve_rows(session, rows, done, at)
                resolved = await self._find(session, [j.request.id for j in waiting])
            else:
                resolved = {}
            done.result = [(resolved.get(p.job.request.id, p.job) if p.created else p.job, p.created) for p in plan]
            return done

        unique_keys = sorted({s.flow.unique_key for s in submits if s.flow.unique_key is not None})
        # Unique keys are locked until the commit: in a transaction of their own they wait for
        # nothing else while held (no deadlock with another write's row or key locks).
        return await (self._write_alone(write) if unique_keys else self._write(write))

    def _inserted(self, count: int) -> None:
        """Told of ``count`` new jobs being stored (a store whose planner needs fresh statistics counts them)."""

    def _insert_params(self, job: Job, first: Response) -> dict[str, Any]:
        stored, d = job.request, self.dialect
        return {
            "id": stored.id,
            "parent_id": stored.parent_id,
            "type": stored.type,
            "creator": stored.creator,
            "create_time": d.time(stored.create_time),
            "data": d.mapping(stored.data),
            "input_type_url": stored.input.type_url if stored.input is not None else None,
            "input_value": stored.input.value if stored.input is not None else None,
            "priority": stored.priority,
            "run_after": d.time(stored.run_after),
            "max_attempts": job.max_attempts,
            "queue": stored.queue,
            "gated": job.flow.gated,
            "concurrency_key": job.flow.concurrency_key,
            "concurrency_limit": job.flow.concurrency_limit,
            "rate_key": job.flow.rate_key,
            "rate": job.flow.rate,
            "burst": job.flow.burst,
            "ordered_key": job.flow.ordered_key,
            "unique_key": job.flow.unique_key,
            "depends_on": " ".join(stored.depends_on),
            "allow_failed_deps": job.allow_failed_dependencies,
            "expire_time": d.time(stored.expire_time),
            "request_max_attempts": stored.max_attempts,
            "timeout": stored.timeout,
            **self._state_params(job),
            **self._response_params(first),
        }

    def _scope(self, types: Collection[str] | None, queues: Collection[str] | None) -> dict[str, Any]:
        return {
            "any_type": types is None,
            "types": self.dialect.array(sorted(types or ())),
            "any_queue": queues is None,
            "queues": self.dialect.array(sorted(queues or ())),
        }

    @override
    async def claim(
        self,
        worker: str,
        *,
        limit: int = 1,
        lease: float = 30.0,
        types: Collection[str] | None = None,
        queues: Collection[str] | None = None,
    ) -> list[Claim]:
        scope = self._scope(types, queues)

        async def first(session: Session) -> Done[tuple[list[Claim], tuple[int, int] | None]]:
            # Without due jobs with flow policies (the common case) this is the whole claim.
            at = self._now()
            params = {**scope, "now": self._store_now(at), "limit": limit}
            if not await session.fetch("gated_due", params):
                done = await self._take(session, await session.fetch("claim_due", params), worker, lease, at)
                return Done((done.result, None), done.responses)
            cut = await session.fetch("plain_cutoff", params)
            return Done(([], (cut[0][0], cut[0][1]) if cut else (BELOW_PRIORITIES, MAX_POSITION)))

        claims, cutoff = await self._write(first)
        if cutoff is None:
            return claims

        # The gate first, for the jobs with policies that come before where the plain claim
        # would stop (so neither kind starves the other, and priority holds across both);
        # on PostgreSQL one claim at a time across instances. Then the plain jobs.
        async def gated_claim(session: Session) -> Done[list[Claim]]:
            return await self._claim_gated(session, scope, cutoff, limit, worker, lease)

        try:
            claims = await self._write_alone(gated_claim)
        except AjsError as error:
            log.warning("claiming jobs with flow policies failed (%s); jobs without them are claimed", error)

        async def plain(session: Session) -> Done[list[Claim]]:
            at = self._now()
            params = {**scope, "now": self._store_now(at), "limit": limit - len(claims)}
            return await self._take(session, await session.fetch("claim_due", params), worker, lease, at)

        if len(claims) < limit:
            claims = claims + await self._write(plain)
        return sorted(claims, key=lambda claim: -claim.job.request.priority)

    async def _claim_gated(
        self,
        session: Session,
        scope: Mapping[str, Any],
        cutoff: tuple[int, int],
        limit: int,
        worker: str,
        lease: float,
    ) -> Done[list[Claim]]:
        d = self.dialect
        await session.fetch("claim_gate_lock", {})
        at = self._now()
        gate: Gate | None = None
        chosen: list[int] = []
        after = (ABOVE_PRIORITIES, 0)
        while len(chosen) < limit:
            params = {
                **scope,
                "now": self._store_now(at),
                "after_priority": after[0],
                "after_position": after[1],
                "cut_priority": cutoff[0],
                "cut_position": cutoff[1],
                "full_c": d.array(sorted(gate.full_concurrency) if gate else []),
                "full_r": d.array(sorted(gate.full_rate) if gate else []),
                "page": GATED_PAGE,
            }
            rows = await session.fetch("gated_candidates", params)
            for position, _, c_key, c_limit, r_key, rate, burst, o_key, running, tokens, filled, store_now in rows:
                if gate is None:  # buckets are measured on the store's clock
                    gate = Gate(d.decoding.time(store_now) or at)
                flow = Flow(c_key, c_limit, r_key, rate, burst, o_key)
                bucket = None if tokens is None else Bucket(tokens, d.decoding.time(filled) or gate.at)
                if gate.hold(flow, running=running, bucket=bucket) is None:
                    chosen.append(position)
                    if len(chosen) == limit:
                        break
            if len(rows) < GATED_PAGE:
                break
            after = (rows[-1][1], rows[-1][0])
        if not chosen or gate is None:
            return Done([])
        # Stamped with the time of the decision (the store's, read by the statement that saw the
        # jobs before these end): a time taken before it may come before the end of the job an
        # ordered one waited for, as if they had overlapped (seen in CI, 21 ms apart).
        locked = await session.fetch("lock_created", {"positions": d.array(chosen)})
        done = await self._take(session, locked, worker, lease, gate.at)
        buckets = [
            {"key": k, "tokens": b.tokens, "update_time": d.time(b.update_time)} for k, b in gate.buckets.items()
        ]
        if buckets:
            await session.execute_many("save_bucket", buckets)
        return done

    async def _take(
        self, session: Session, rows: Sequence[Sequence[Any]], worker: str, lease: float, at: datetime
    ) -> Done[list[Claim]]:
        """Claims the queued jobs of ``rows`` (locked): PENDING under a new lease each."""
        done: Done[list[Claim]] = Done([])
        saves = []
        store_now = self._store_now(at)
        for row in rows:
            queued = self._job(row)
            if queued.expired(at):
                await self._lapse(session, row, done, at)
                continue
            job, response = queued.advance(Update(S.PENDING, data={"worker": worker}), at)
            token = uuid.uuid4().hex
            held = {"lease_token": token, "lease_seconds": lease, "worker": worker, "now": store_now}
            saves.append(self._save_params(row[0], job, response, held))
            done.result.append(Claim(job, token))
            done.responses.append(job.request.id)
        if saves:  # every claimed job's PENDING Response, each statement once for all of them
            await session.execute_many("save_job_claimed", saves)
        return done

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        async def write(session: Session) -> Done[Response]:
            found = await self._find_locked(session, request_id)
            if found is None:
                raise self._not_found(request_id)
            self._check_lease(request_id, found[-1], lease_token)
            at = self._now()
            job, response = self._job(found).advance(update, at)
            await self._save(session, found[0], job, response)
            # Requeued, or ended holding back others (its concurrency key, its ordered key).
            done = Done(response, [request_id], work=job.state is S.CREATED or (job.is_final and job.flow.gated))
            if job.is_final:
                await self._ended(session, found, done, at)
            return done

        return await self._write(write)

    @override
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        held = dict(leases)

        async def write(session: Session) -> Done[Renewal]:
            params = {"leases": self.dialect.mapping(held), "lease_seconds": lease, "now": self._store_now(self._now())}
            rows = await session.fetch("renew_leases", params)
            kept = {row[0] for row in rows}
            cancelled = frozenset(row[0] for row in rows if row[1])
            return Done(Renewal(frozenset(set(held) - kept), cancelled))

        return await self._write(write)

    @override
    async def recover_expired(self) -> int:
        async def write(session: Session) -> Done[int]:
            done = await self._expire_rows(session, "expired_jobs")
            at = self._now()
            for row in await session.fetch("lapsed_jobs", {"now": self._store_now(at)}):
                if row[1] not in done.responses:  # (not one a cascade ended meanwhile)
                    await self._lapse(session, row, done, at)
                    done.result += 1
            return done

        return await self._write(write)

    @override
    async def next_due_time(
        self, types: Collection[str] | None = None, queues: Collection[str] | None = None
    ) -> datetime | None:
        scope = self._scope(types, queues)

        async def read(session: Session) -> datetime | None:
            # Claims compare due times with the store's clock: say how far away the next
            # one is by that clock, then put it on ours.
            at = self._now()
            rows = await session.fetch("next_due", {**scope, "now": self._store_now(at)})
            *dues, store_now = (self.dialect.decoding.time(value) for value in rows[0])
            found = [due for due in dues if due is not None]
            if not found or store_now is None:
                return None
            due = min(found)
            try:  # (a store that compares with our clock answers at: due itself)
                return at + (due - store_now)
            except OverflowError:  # due near the end of the calendar (9999-12-31): no clock matters there
                return due

        return await self._read(read)

    @override
    async def cancel(self, request_id: str) -> Job:
        async def write(session: Session) -> Done[Job]:
            found = await self._find_locked(session, request_id)
            if found is None:
                raise self._not_found(request_id)
            self._job(found).cancel()  # raises if it already ended, before anything changes
            tree = await session.fetch("cancel_tree", {"id": request_id})
            done: Done[Job] = Done(self._job(found))
            at = self._now()
            for row in await self._locked(session, [row[0] for row in tree]):
                if row[1] in done.responses:  # ended meanwhile: a dependency's cancel cancelled it
                    continue
                job, response = self._job(row).cancel(at)
                if response is not None:
                    await self._save(session, row[0], job, response)
                    done.responses.append(job.request.id)
                    done.work = done.work or job.flow.gated  # it held back others
                    await self._ended(session, row, done, at)
                else:
                    await session.execute("mark_cancel_requested", {"position": row[0]})
                    done.cancels.append(job.request.id)
                if job.request.id == request_id:
                    done.result = job
            return done

        return await self._write(write)

    @override
    async def prune(self, before: datetime) -> int:
        async def write(session: Session) -> Done[int]:
            # Leaves first, again and again: a job with a child left keeps its id taken.
            total = 0
            while deleted := await session.execute("delete_ended", {"before": self.dialect.time(before)}):
                total += deleted
            if total:
                await session.execute("forget_dependencies", {})
            return Done(total)

        return await self._write(write)

    @override
    async def retry(self, request_id: str) -> Job:
        async def write(session: Session) -> Done[Job]:
            found = await self._find_locked(session, request_id)
            if found is None:
                raise self._not_found(request_id)
            job = self._job(found)
            for dependency in sorted(job.request.depends_on):
                await session.execute("lock_dependency", {"depends_on": dependency})
            job, response = job.retry(await self._find(session, list(job.request.depends_on)), self._now())
            await self._save(session, found[0], job, response)
            return Done(job, [request_id], work=True)

        return await self._write(write)

    @override
    async def delete(self, request_id: str) -> int:
        async def write(session: Session) -> Done[int]:
            tree = await session.fetch("job_tree", {"id": request_id})
            if not tree:
                raise self._not_found(request_id)
            for _, tree_id, state in tree:
                if not S(state).is_final:
                    job = await self._find(session, [tree_id])
                    raise not_ended(job[tree_id], "deleted (with its descendants)")
            await session.execute("delete_jobs", {"positions": self.dialect.array([row[0] for row in tree])})
            return Done(len(tree))

        return await self._write(write)

    # -- schedules ---------------------------------------------------------------------------

    def _schedule(self, row: Sequence[Any]) -> Schedule:
        (schedule_id, cron, time_zone, template, overlap, catchup, paused, creator, created, updated, last,
         last_job_id) = row  # fmt: skip
        time = self.dialect.decoding.time
        return Schedule(
            id=schedule_id,
            cron=cron,
            template=template_from_json(template),
            time_zone=time_zone,
            overlap=Overlap(overlap),
            catchup=Catchup(catchup),
            paused=bool(paused),
            creator=creator,
            create_time=time(created),
            update_time=time(updated),
            last_time=time(last),
            last_job_id=last_job_id,
        )

    def _schedule_params(self, schedule: Schedule) -> dict[str, Any]:
        d = self.dialect
        return {
            "id": schedule.id,
            "cron": schedule.cron,
            "time_zone": schedule.time_zone,
            "template": template_to_json(schedule.template),
            "overlap": int(schedule.overlap),
            "catchup": int(schedule.catchup),
            "paused": schedule.paused,
            "creator": schedule.creator,
            "create_time": d.time(schedule.create_time),
            "update_time": d.time(schedule.update_time),
            "last_time": d.time(schedule.last_time),
            "last_job_id": schedule.last_job_id,
        }

    async def _find_schedule(self, session: Session, schedule_id: str) -> Schedule:
        rows = await session.fetch("find_schedule", {"id": schedule_id})
        if not rows:
            raise schedule_not_found(schedule_id)
        return self._schedule(rows[0])

    @override
    async def create_schedule(self, schedule: Schedule, *, replace: bool = False) -> tuple[Schedule, bool]:
        at = self._now()
        new = dataclasses.replace(schedule, create_time=at, update_time=at, last_time=None, last_job_id="")

        async def write(session: Session) -> Done[tuple[Schedule, bool]]:
            if await session.execute("insert_schedule", self._schedule_params(new)):
                return Done((new, True))
            stored = await self._find_schedule(session, schedule.id)
            if stored.same_definition(schedule):
                return Done((stored, False))
            if not replace:
                raise schedule_taken(schedule.id)
            await session.execute("replace_schedule", self._schedule_params(new))
            return Done((await self._find_schedule(session, schedule.id), True))

        return await self._write(write)

    @override
    async def get_schedule(self, schedule_id: str) -> Schedule:
        return await self._read(lambda session: self._find_schedule(session, schedule_id))

    @override
    async def list_schedules(self, *, creator: str = "", after: str = "", limit: int = 1000) -> list[Schedule]:
        async def read(session: Session) -> list[Schedule]:
            rows = await session.fetch("list_schedules", {"creator": creator, "after": after, "limit": limit})
            return [self._schedule(row) for row in rows]

        return await self._read(read)

    @override
    async def delete_schedule(self, schedule_id: str) -> None:
        async def write(session: Session) -> Done[None]:
            if not await session.execute("delete_schedule", {"id": schedule_id}):
                raise schedule_not_found(schedule_id)
            return Done(None)

        await self._write(write)

    @override
    async def pause_schedule(self, schedule_id: str, paused: bool) -> Schedule:
        async def write(session: Session) -> Done[Schedule]:
            params = {"id": schedule_id, "paused": paused, "now": self.dialect.time(self._now())}
            await session.execute("pause_schedule", params)
            return Done(await self._find_schedule(session, schedule_id))

        return await self._write(write)

    @override
    async def advance_schedule(
        self, schedule_id: str, last_time: datetime | None, new_last_time: datetime, last_job_id: str
    ) -> bool:
        d = self.dialect
        params = {
            "id": schedule_id,
            "last_time": d.time(last_time),
            "new_last_time": d.time(new_last_time),
            "last_job_id": last_job_id,
        }

        async def write(session: Session) -> Done[bool]:
            return Done(bool(await session.execute("advance_schedule", params)))

        return await self._write(write)

    # -- queues ------------------------------------------------------------------------------

    @override
    async def set_paused(self, queue: str, paused: bool) -> QueueInfo:
        async def write(session: Session) -> Done[None]:
            await session.execute(
                "set_paused", {"name": queue, "paused": paused, "now": self.dialect.time(self._now())}
            )
            return Done(None, work=not paused)

        await self._write(write)
        return next((info for info in await self.list_queues() if info.name == queue), QueueInfo(queue, paused=paused))

    @override
    async def list_queues(self) -> list[QueueInfo]:
        async def read(session: Session) -> list[QueueInfo]:
            rows = await session.fetch("list_queues", {})
            time = self.dialect.decoding.time
            return [QueueInfo(n, int(q), int(r), bool(p), time(oldest)) for n, q, r, p, oldest in rows]

        return await self._read(read)

    @override
    async def held_back(self) -> dict[str, int]:
        async def read(session: Session) -> dict[str, int]:
            [row] = await session.fetch("held_back", {"now": self._store_now(self._now())})
            return {cause: int(count or 0) for cause, count in zip(HELD_BACK_CAUSES, row, strict=True)}

        return await self._read(read)

    # -- reading -----------------------------------------------------------------------------

    @override
    async def get(self, request_id: str) -> Job:
        async def read(session: Session) -> Job:
            rows = await session.fetch("find_job", {"id": request_id})
            if not rows:
                raise self._not_found(request_id)
            return self._job(rows[0])

        return await self._read(read)

    @override
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        d = self.dialect
        params = {
            "after": (after or MAX_POSITION) if newest_first else after,
            "states": d.array(sorted(int(state) for state in job_filter.states)),
            "types": d.array(sorted(job_filter.types)),
            "parent_id": job_filter.parent_id,
            "creator": job_filter.creator,
            "limit": page_size + 1,
        }
        query = "list_jobs_newest_first" if newest_first else "list_jobs"

        async def read(session: Session) -> Page:
            rows = await session.fetch(query, params)
            more = len(rows) > page_size
            rows = rows[:page_size]
            return Page([self._job(row) for row in rows], rows[-1][0] if more else None, [row[0] for row in rows])

        return await self._read(read)

    @override
    async def feed(self, after: str, job_filter: JobFilter, limit: int) -> FeedPage:
        # A place is (k, position, sequence): k the transaction id (PostgreSQL) or the feed
        # number (SQLite), below "bound" once every transaction that could store there ended.
        prefix = self.name[0]
        parsed = _feed_place(after, prefix) if after else None
        if after and parsed is None:
            raise self._bad_token(after)
        d = self.dialect

        async def read(session: Session) -> FeedPage:
            bound_text, newest_text, store, next_text = (await session.fetch("feed_horizon", {}))[0]
            bound, newest = int(bound_text), int(newest_text or 0)

            def token(k: int, position: int, sequence: int) -> str:
                return f"{prefix}{store}.{k}.{position}.{sequence}"

            if parsed is None:
                return FeedPage([], token(bound, 0, 0))
            made_by, *place = parsed
            if made_by != store or place[0] > int(next_text):  # another store's, or from ahead of this one
                raise self._bad_token(after)
            if not limit:
                return FeedPage([], after)
            params = {
                "k": d.feed_key(place[0]),
                "position": place[1],
                "sequence": place[2],
                "bound": d.feed_key(bound),
                "states": d.array(sorted(int(state) for state in job_filter.states)),
                "types": d.array(sorted(job_filter.types)),
                "queues": d.array(sorted(job_filter.queues)),
                "parent_id": job_filter.parent_id,
                "creator": job_filter.creator,
                "limit": limit,
            }
            rows = await session.fetch("feed", params)
            items = [
                FeedItem(
                    response_from_row(row[2], row[7:], d.decoding),
                    token(int(row[0]), row[1], row[7]),
                    *row[3:7],
                )
                for row in rows
            ]
            if len(rows) == limit:
                return FeedPage(items, items[-1].token, more=True)
            end = max((place[0], place[1], place[2]), (bound, 0, 0))
            return FeedPage(items, token(*end), pending=newest >= bound)

        return await self._read(read)

    @override
    def _feed_order(self, token: str) -> tuple[int, ...]:
        place = _feed_place(token, self.name[0])
        assert place is not None, "a token checked by feed()"
        return place[1:]

    @override
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        async def read(session: Session) -> int:
            rows = await session.fetch("count_jobs", {"state": int(state), "creator": creator})
            return int(rows[0][0])

        return await self._read(read)

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        async def read(session: Session) -> list[Response]:
            params = {"id": request_id, "after": after_sequence, "limit": limit}
            rows = await session.fetch("responses_after", params)
            if not rows and not await session.fetch("job_exists", {"id": request_id}):
                raise self._not_found(request_id)
            return [response_from_row(request_id, row, self.dialect.decoding) for row in rows]

        return await self._read(read)
