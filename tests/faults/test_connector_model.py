"""A property-based state machine over the Connector contract, checked against one reference model.

Every connector (memory, SQLite, PostgreSQL) runs random programs of submits
(new ids, resubmits with the same and with different content, children,
priorities, ``run_after`` in the past or far future), claims (limits, type
filters), responds with the lease (progress, FINISHED, FAILED, CANCELLED, hand
backs with and without ``refund_attempt``), responds with a stale or wrong lease,
cancels of queued and running trees, lease expiries (a claim with a negative
lease is expired on every connector's clock at once), renewals, prunes and, on
the stores that keep anything, restarts. Every call's result is checked against
:class:`Reference`, a plain model of dictionaries written here and independent
of :mod:`ajs_grpc.core.model`'s rules, and after every step the connector's whole
queue (every job, the counts per state, the Responses of every job that
changed) must equal the model's.

Restarts: SQLite holds a lock while open, so a restart proves the previous
server gone and every PENDING job is recovered at open; PostgreSQL recovers
nothing at open (leases expire on their own); the memory connector keeps
nothing across a real restart, so it gets no restart rule.

Times: every connector call is one numbered step with a bracket (wall-clock
before and after, the next step strictly later), so the model knows which step
wrote each Response, checks its ``create_time`` against that bracket and can
prune "what ended before step k" exactly.

``next_due_time`` is a rule, not part of the invariant: answering it may tidy a
connector's internals (the memory connector drops stale heap items at the
head), and a check after every step must not hide what it is there to find.

Programs the machine once found failing are kept in :data:`FOUND` and replayed
on every connector by name, so they fail the same way every run until fixed.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf import any_pb2
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ajs_grpc.connectors.base import Connector, JobFilter, Renewal
from ajs_grpc.core.errors import AjsError, AlreadyExists, Code, FailedPrecondition, NotFound
from ajs_grpc.core.model import ErrorStatus, Job, Progress, Request, RequestState, Response, Update, now
from tests.conftest import CONNECTORS, postgres_dsn, unique_schema
from tests.faults import report, scale

S = RequestState
T = TypeVar("T")

# A small id pool, so resubmits, children, cancels of trees and reuse of pruned ids happen often.
IDS = ("a", "b", "c", "d")
# Real job types (the example plugins), so the edge's TYPE_NOT_SUPPORTED check never matters here.
TYPES = ("echo", "countdown", "hash")
CREATORS = ("alice", "bob")
PAST = datetime(2001, 1, 1, tzinfo=UTC)
FUTURE = (datetime(2100, 1, 1, tzinfo=UTC), datetime(2150, 6, 1, 12, 30, tzinfo=UTC))
RUN_AFTER = (None, PAST, *FUTURE)
DATA: tuple[dict[str, str], ...] = ({}, {"k": "v"}, {"k": "w", "n": "1"})
INPUT = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.StringValue", value=b"\n\x02hi")
OUTPUT = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Int64Value", value=b"\x08\x2a")
LEASE = 300.0  # never runs out during a test
EXPIRED = -1.0  # already over when granted, on every connector's clock
MICROSECOND = timedelta(microseconds=1)
# How far next_due_time of PostgreSQL may be from the stored due time: it is moved from the
# database's clock to ours. A generous bound; the alternatives it tells apart are decades apart.
PG_CLOCK_SLACK = timedelta(seconds=60)
WAIT = 10.0  # seconds a watch of an ended job may take before the test calls it hung

SCALE = scale()
EXAMPLES = {"memory": 50 * SCALE, "sqlite": 25 * SCALE, "postgres": 10 * SCALE}
STEPS = {"memory": 50, "sqlite": 40, "postgres": 30}


# -- the reference model -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Want:
    """One Response the model expects: what it says, and the step that wrote it."""

    state: RequestState
    step: int
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    fraction: float | None = None
    output: any_pb2.Any | None = None


@dataclasses.dataclass
class Model:
    """One job as the reference sees it."""

    request: Request  # as submitted (no create_time)
    max_attempts: int
    position: int  # submit order
    created: int  # the step that stored it
    responses: list[Want]
    state: RequestState = S.CREATED
    attempt: int = 0
    lease: str | None = None  # the current lease token while PENDING
    lease_expired: bool = False
    cancel_requested: bool = False
    due: datetime | None = None  # while CREATED: None when due now, else its (future) due time

    @property
    def changed(self) -> int:
        """The step of the last change of state (its last Response)."""
        return self.responses[-1].step


def same_content(a: Request, b: Request) -> bool:
    """The model's own idea of "the same request": the client's fields, not the server's."""
    return (a.type, a.parent_id, dict(a.data), a.input, a.priority, a.run_after) == (
        b.type,
        b.parent_id,
        dict(b.data),
        b.input,
        b.priority,
        b.run_after,
    )


def in_future(at: datetime | None) -> bool:
    return at is not None and at > now()


class Reference:
    """The queue as a plain dictionary of :class:`Model`; the rules are written out here.

    Checks (``check_*``) raise the error the connector must raise and change nothing;
    the other methods apply a call the connector answered.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Model] = {}
        self.submitted = 0

    # -- reading the model --

    def ordered(self) -> list[Model]:
        return sorted(self.jobs.values(), key=lambda m: m.position)

    def children(self, request_id: str) -> list[Model]:
        return [m for m in self.ordered() if m.request.parent_id == request_id]

    def descendants(self, request_id: str) -> list[Model]:
        """The job and everything below it (through ended jobs too)."""
        found = [self.jobs[request_id]]
        for m in found:
            found += self.children(m.request.id)  # no cycles: a parent exists before its child
        return found

    def claimable(self, types: Collection[str] | None) -> list[Model]:
        due = [
            m
            for m in self.jobs.values()
            if m.state is S.CREATED and m.due is None and (types is None or m.request.type in types)
        ]
        return sorted(due, key=lambda m: (-m.request.priority, m.position))

    def matching(self, job_filter: JobFilter) -> list[str]:
        return [
            m.request.id
            for m in self.ordered()
            if (not job_filter.states or m.state in job_filter.states)
            and (not job_filter.types or m.request.type in job_filter.types)
            and (not job_filter.parent_id or m.request.parent_id == job_filter.parent_id)
            and (not job_filter.creator or m.request.creator == job_filter.creator)
        ]

    def count(self, state: RequestState) -> int:
        return sum(1 for m in self.jobs.values() if m.state is state)

    def holds(self, request_id: str, token: str) -> bool:
        m = self.jobs.get(request_id)
        return m is not None and m.lease is not None and m.lease == token

    # -- changing it --

    def _append(self, m: Model, want: Want) -> None:
        m.responses.append(want)
        m.state = want.state
        if want.state is not S.PENDING:
            m.lease, m.lease_expired = None, False
        if want.state is not S.CREATED:
            m.due = None

    def check_submit(self, request: Request) -> Model | None:
        """The stored job a submit returns unchanged, or None when it creates one."""
        existing = self.jobs.get(request.id)
        if existing is not None:
            if same_content(existing.request, request):
                return existing
            raise AlreadyExists("the id is taken by other content")
        if request.parent_id and request.parent_id not in self.jobs:
            raise NotFound("no such parent")
        return None

    def submit(self, request: Request, max_attempts: int, step: int) -> Model:
        self.submitted += 1
        m = Model(request, max_attempts, self.submitted, step, [Want(S.CREATED, step)])
        m.due = request.run_after if in_future(request.run_after) else None
        self.jobs[request.id] = m
        return m

    def claim(self, m: Model, token: str, worker: str, lease: float, step: int) -> None:
        m.attempt += 1
        self._append(m, Want(S.PENDING, step, {"worker": worker}))
        m.lease, m.lease_expired = token, lease <= 0

    def check_respond(self, request_id: str, token: str) -> Model:
        m = self.jobs.get(request_id)
        if m is None:
            raise NotFound("no such request")
        if not self.holds(request_id, token):
            raise FailedPrecondition("the lease is not held")
        return m

    def respond(self, m: Model, update: Update, step: int) -> Want:
        if update.state is S.CREATED and m.cancel_requested:
            # A job whose cancellation was asked for never goes back to the queue.
            want = Want(S.CANCELLED, step, reason="CANCELLED_BY_CLIENT")
        else:
            want = Want(
                update.state,
                step,
                dict(update.data),
                update.error.reason if update.error else None,
                update.progress.fraction if update.progress else None,
                update.output,
            )
        self._append(m, want)
        if want.state is S.CREATED:
            if update.refund_attempt:
                m.attempt -= 1
            m.due = update.run_after if in_future(update.run_after) else None
        return want

    def check_cancel(self, request_id: str) -> Model:
        m = self.jobs.get(request_id)
        if m is None:
            raise NotFound("no such request")
        if m.state.is_final:
            raise FailedPrecondition("the request already ended")
        return m

    def cancel(self, request_id: str, step: int) -> list[str]:
        """Cancels the tree; returns the running jobs whose dispatcher must be told."""
        told: list[str] = []
        for m in self.descendants(request_id):
            if m.state is S.CREATED:
                self._append(m, Want(S.CANCELLED, step, reason="CANCELLED_BY_CLIENT"))
            elif m.state is S.PENDING:
                m.cancel_requested = True
                told.append(m.request.id)
        return told

    def renew(self, leases: dict[str, str], lease: float) -> Renewal:
        lost = {rid for rid, token in leases.items() if not self.holds(rid, token)}
        held = [self.jobs[rid] for rid in leases if rid not in lost]
        for m in held:
            m.lease_expired = lease <= 0
        return Renewal(frozenset(lost), frozenset(m.request.id for m in held if m.cancel_requested))

    def expire(self, m: Model, step: int) -> None:
        """A running job's lease ran out (or its server is known to be gone)."""
        if m.cancel_requested:
            self._append(m, Want(S.CANCELLED, step, reason="CANCELLED_BY_CLIENT"))
        elif m.attempt < m.max_attempts:
            self._append(m, Want(S.CREATED, step, reason="LEASE_EXPIRED"))
        else:
            self._append(m, Want(S.FAILED, step, reason="LEASE_EXPIRED"))

    def recover(self, step: int, everything: bool = False) -> int:
        running = [m for m in self.ordered() if m.state is S.PENDING and (everything or m.lease_expired)]
        for m in running:
            self.expire(m, step)
        return len(running)

    def prune(self, last_step: int) -> int:
        """Deletes ended jobs last changed at or before ``last_step``, leaves first."""
        doomed: set[str] = set()
        while True:
            leaves = {
                rid
                for rid, m in self.jobs.items()
                if rid not in doomed
                and m.state.is_final
                and m.changed <= last_step
                and all(c.request.id in doomed for c in self.children(rid))
            }
            if not leaves:
                break
            doomed |= leaves
        for rid in doomed:
            del self.jobs[rid]
        return len(doomed)


# -- what the machine draws ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lease:
    """A lease a claim handed out (it may be stale by the time a rule uses it)."""

    request_id: str
    token: str

    def __repr__(self) -> str:
        return f"Lease({self.request_id!r}, {self.token[:8]!r}...)"


def update_for(kind: str, fraction: float, refund: bool, run_after: datetime | None) -> Update:
    if kind == "progress":
        return Update(S.PENDING, data={"note": "working"}, progress=Progress(fraction, "so far"))
    if kind == "finish":
        return Update(S.FINISHED, data={"result": "ok"}, output=OUTPUT)
    if kind == "fail":
        return Update(S.FAILED, error=ErrorStatus(Code.INTERNAL, "boom", "JOB_FAILED", {"exception": "ValueError"}))
    if kind == "cancelled":
        return Update(S.CANCELLED, error=ErrorStatus(Code.CANCELLED, "stopped", "CANCELLED_BY_CLIENT"))
    assert kind == "hand back"
    return Update(
        S.CREATED,
        data={"reason": "retry"},
        error=ErrorStatus(Code.UNAVAILABLE, "later", "RETRYING"),
        run_after=run_after,
        refund_attempt=refund,
    )


UPDATE_KINDS = ("progress", "finish", "fail", "cancelled", "hand back")


class Listener:
    """Records what a connector tells its dispatcher."""

    def __init__(self) -> None:
        self.cancels: list[str] = []

    def work_available(self) -> None:
        pass

    def cancel_requested(self, request_id: str) -> None:
        self.cancels.append(request_id)


# -- one connector's storage, per test -----------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What one test gives its machines: how to make a fresh store, and the counts to report."""

    name: str
    tmp: Path
    schema: str = ""
    admin: Any = None  # a psycopg connection to clear the PostgreSQL tables between examples
    examples: int = 0
    steps: int = 0
    acknowledged: int = 0

    @property
    def restarts(self) -> bool:
        """The store keeps its queue across a restart (the memory connector keeps nothing)."""
        return self.name != "memory"

    def fresh(self) -> Callable[[], Connector]:
        """A new, empty store for one example; the factory reopens that same store."""
        self.examples += 1
        if self.name == "postgres":
            from psycopg import sql

            self.admin.execute(
                sql.SQL("TRUNCATE {}.responses, {}.jobs RESTART IDENTITY CASCADE").format(
                    sql.Identifier(self.schema), sql.Identifier(self.schema)
                )
            )
            return self._postgres
        if self.name == "sqlite":
            where = self.tmp / f"example-{self.examples}"
            where.mkdir()
            return lambda: CONNECTORS["sqlite"](where)
        return lambda: CONNECTORS[self.name](self.tmp)

    def _postgres(self) -> Connector:
        from ajs_grpc.connectors.postgres import PostgresConnector

        # The schema was migrated once for the test; each example only checks its version.
        return PostgresConnector(postgres_dsn(), schema=self.schema, migrate=False, writers=1)


# -- the machine ---------------------------------------------------------------------------------


class ConnectorMachine(RuleBasedStateMachine):
    """One example: a fresh connector on its own event loop, driven by the rules below."""

    env: Env  # set by each test on a subclass
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.model = Reference()
        self.listener = Listener()
        self.tokens: set[str] = set()
        self.step = 0
        t0 = self._tick()
        self.times: list[tuple[datetime, datetime]] = [(t0, t0)]
        self.rule_starts: list[int] = []
        self.touched: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.connector: Connector | None = None
        try:
            self.make = self.env.fresh()
            self._open()
        except BaseException:
            self.teardown()
            raise

    # -- plumbing --

    @staticmethod
    def _tick() -> datetime:
        """The time now, after waiting for the clock to move on, so the next reading is later."""
        at = now()
        while now() <= at:
            pass
        return at

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Runs one connector call as one numbered step, bracketed by the wall clock."""
        self.step += 1
        before = now()
        try:
            return self.loop.run_until_complete(make())  # type: ignore[arg-type]
        finally:
            self.times.append((before, self._tick()))

    def expect_error(self, wanted: AjsError, make: Callable[[], Awaitable[Any]]) -> None:
        """The call must raise the same kind of error as the model did."""
        with pytest.raises(AjsError) as raised:
            self.call(make)
        assert raised.value.code == wanted.code, f"{raised.value!r} where the model says {wanted!r}"
        assert type(raised.value) is type(wanted)

    def begin(self) -> None:
        self.rule_starts.append(self.step + 1)
        self.env.steps += 1

    @property
    def db(self) -> Connector:
        assert self.connector is not None
        return self.connector

    def _open(self) -> None:
        connector = self.make()
        self.connector = connector  # closed in teardown even if open fails half-way
        self.call(connector.open)
        connector.add_listener(self.listener)

    def _close(self) -> None:
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.remove_listener(self.listener)
            self.call(connector.close)

    def _close_loop(self) -> None:
        loop = self.loop
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def teardown(self) -> None:
        try:
            self._close()
        finally:
            self._close_loop()

    # -- checks --

    def within(self, at: datetime | None, step: int) -> bool:
        before, after = self.times[step]
        return at is not None and before <= at <= after

    def check_response(self, response: Response, request_id: str, sequence: int, want: Want) -> None:
        got = (
            response.request_id,
            response.sequence,
            response.state.name,
            response.is_final,
            dict(response.data),
            response.error.reason if response.error else None,
            response.progress.fraction if response.progress else None,
            response.output,
        )
        expected = (
            request_id,
            sequence,
            want.state.name,
            want.state.is_final,
            want.data,
            want.reason,
            want.fraction,
            want.output,
        )
        assert got == expected, f"Response {request_id}#{sequence}"
        assert self.within(response.create_time, want.step), f"Response {request_id}#{sequence} time"

    def check_job(self, job: Job, m: Model) -> None:
        r, w = job.request, m.request
        rid = w.id
        assert (r.id, r.type, dict(r.data), r.input, r.parent_id, r.creator, r.priority, r.run_after) == (
            w.id,
            w.type,
            dict(w.data),
            w.input,
            w.parent_id,
            w.creator,
            w.priority,
            w.run_after,
        ), f"request of {rid}"
        assert self.within(r.create_time, m.created), f"create_time of {rid}"
        got = (job.state.name, job.attempt, job.max_attempts, job.cancel_requested)
        assert got == (m.state.name, m.attempt, m.max_attempts, m.cancel_requested), f"job {rid}"
        self.check_response(job.last_response, rid, len(m.responses), m.responses[-1])
        assert self.within(job.update_time, m.changed), f"update_time of {rid}"
        if m.state is not S.CREATED:
            assert job.due_time is None, f"due_time of {rid}"
        elif m.due is None:
            assert job.due_time is not None, f"due_time of {rid}"
            assert job.due_time <= now(), f"due_time of {rid}"
        else:
            assert job.due_time == m.due, f"due_time of {rid}"

    def check_responses(self, request_id: str) -> None:
        """Every stored Response of a job: gapless 1..n, one final and last, each as the model says."""
        m = self.model.jobs[request_id]
        stored = self.call(lambda: self.db.responses(request_id, 0, 10_000))
        assert [r.sequence for r in stored] == list(range(1, len(m.responses) + 1)), f"sequences of {request_id}"
        finals = [r.sequence for r in stored if r.is_final]
        assert finals == ([len(stored)] if m.state.is_final else []), f"final Responses of {request_id}"
        for sequence, (response, want) in enumerate(zip(stored, m.responses, strict=True), 1):
            self.check_response(response, request_id, sequence, want)

    @invariant()
    def the_whole_queue_matches(self) -> None:
        if self.connector is None:
            return
        page = self.call(lambda: self.db.list_jobs(JobFilter(), 10_000))
        assert page.next_cursor is None
        assert [j.request.id for j in page.jobs] == [m.request.id for m in self.model.ordered()], "jobs"
        for job in page.jobs:
            self.check_job(job, self.model.jobs[job.request.id])
        for request_id in sorted(self.touched & set(self.model.jobs)):
            self.check_responses(request_id)
        self.touched.clear()
        for state in (S.CREATED, S.PENDING, S.FINISHED, S.FAILED, S.CANCELLED):
            assert self.call(lambda state=state: self.db.count_jobs(state)) == self.model.count(state), state.name

    # next_due_time is a rule, not part of the invariant: a connector may tidy up while it answers
    # (the memory connector drops stale heap items), and an invariant must not change what it watches.
    @rule()
    def next_due_time(self) -> None:
        """None with nothing queued; now (or before) with a due job queued; else the earliest future one."""
        self.begin()
        got = self.call(self.db.next_due_time)
        queued = [m for m in self.model.jobs.values() if m.state is S.CREATED]
        if not queued:
            assert got is None, "next_due_time with nothing queued"
        elif any(m.due is None for m in queued):
            slack = PG_CLOCK_SLACK if self.env.name == "postgres" else timedelta(0)
            assert got is not None, "next_due_time with a due job queued"
            assert got <= now() + slack, "next_due_time with a due job queued"
        else:
            earliest = min(m.due for m in queued if m.due is not None)
            assert got is not None, "next_due_time with jobs queued for later"
            if self.env.name == "postgres":
                assert abs(got - earliest) <= PG_CLOCK_SLACK, "next_due_time with jobs queued for later"
            else:
                assert got == earliest, "next_due_time with jobs queued for later"

    # -- submits --

    def _submit(self, request: Request, max_attempts: int) -> None:
        try:
            existing = self.model.check_submit(request)
        except AjsError as wanted:
            self.expect_error(wanted, lambda: self.db.enqueue(request, max_attempts))
            return
        job, created = self.call(lambda: self.db.enqueue(request, max_attempts))
        assert created == (existing is None)
        if existing is None:
            existing = self.model.submit(request, max_attempts, self.step)
            self.touched.add(request.id)
            self.env.acknowledged += 1
        self.check_job(job, existing)

    @initialize(
        seed=st.lists(
            st.tuples(
                st.sampled_from(TYPES),
                st.integers(-2, 2),
                st.sampled_from(RUN_AFTER),
                st.sampled_from(("", *IDS[:-1])),
                st.integers(1, 3),
            ),
            max_size=len(IDS),
        )
    )
    def seed_the_queue(self, seed: list[tuple[str, int, datetime | None, str, int]]) -> None:
        """Submits to ids a, b, c ... in turn: (type, priority, run_after, parent_id, max_attempts).

        A parent_id not submitted before is refused (NOT_FOUND), as it must be."""
        self.begin()
        for request_id, (type_, priority, run_after, parent_id, max_attempts) in zip(IDS, seed, strict=False):
            request = Request(
                id=request_id,
                type=type_,
                data=DATA[len(self.model.jobs) % len(DATA)],
                parent_id=parent_id,
                creator=CREATORS[priority % 2],
                priority=priority,
                run_after=run_after,
            )
            self._submit(request, max_attempts)

    @rule(
        request_id=st.sampled_from(IDS),
        type_=st.sampled_from(TYPES),
        data=st.sampled_from(DATA),
        with_input=st.booleans(),
        priority=st.integers(-2, 2),
        run_after=st.sampled_from(RUN_AFTER),
        parent_id=st.sampled_from(("", "", *IDS)),  # half of them without a parent
        creator=st.sampled_from(CREATORS),
        max_attempts=st.integers(1, 3),
    )
    def submit(
        self,
        request_id: str,
        type_: str,
        data: dict[str, str],
        with_input: bool,
        priority: int,
        run_after: datetime | None,
        parent_id: str,
        creator: str,
        max_attempts: int,
    ) -> None:
        self.begin()
        request = Request(
            id=request_id,
            type=type_,
            data=data,
            input=INPUT if with_input else None,
            parent_id=parent_id,
            creator=creator,
            priority=priority,
            run_after=run_after,
        )
        self._submit(request, max_attempts)

    @rule(
        request_id=st.sampled_from(IDS),
        change=st.sampled_from((None, "type", "data", "input", "priority", "run_after", "parent_id")),
        creator=st.sampled_from(CREATORS),
        max_attempts=st.integers(1, 3),
    )
    def resubmit(self, request_id: str, change: str | None, creator: str, max_attempts: int) -> None:
        """A stored request again: the same content (creator and max_attempts are not content) returns
        the stored job unchanged; a change under the taken id is ALREADY_EXISTS and changes nothing."""
        self.begin()
        m = self.model.jobs.get(request_id)
        request = m.request if m is not None else Request(id=request_id, type="echo")
        changed: dict[str, Any] = {
            None: {},
            "type": {"type": "hash" if request.type != "hash" else "echo"},
            "data": {"data": {**request.data, "changed": "yes"}},
            "input": {"input": None if request.input is not None else INPUT},
            "priority": {"priority": request.priority + 7},
            "run_after": {"run_after": FUTURE[1] if request.run_after != FUTURE[1] else PAST},
            # a parent that does not exist: the taken id is what a resubmit hears of first
            "parent_id": {"parent_id": "nobody"},
        }[change]
        self._submit(dataclasses.replace(request, creator=creator, **changed), max_attempts)

    # -- claims and leases --

    @rule(
        target=leases,
        worker=st.sampled_from(("w1", "w2")),
        limit=st.integers(0, 3),
        types=st.one_of(st.none(), st.lists(st.sampled_from(TYPES), unique=True, max_size=2)),
        lease=st.sampled_from((LEASE, EXPIRED)),
    )
    def claim(self, worker: str, limit: int, types: list[str] | None, lease: float) -> Any:
        self.begin()
        expected = self.model.claimable(types)[:limit]
        claims = self.call(lambda: self.db.claim(worker, limit=limit, lease=lease, types=types))
        assert [c.job.request.id for c in claims] == [m.request.id for m in expected], "claim order"
        for claim, m in zip(claims, expected, strict=True):
            assert claim.lease_token, "a lease token"
            assert claim.lease_token not in self.tokens, "a new lease token"
            self.tokens.add(claim.lease_token)
            self.model.claim(m, claim.lease_token, worker, lease, self.step)
            self.touched.add(m.request.id)
            self.check_job(claim.job, m)
        return multiple(*(Lease(c.job.request.id, c.lease_token) for c in claims))

    def _respond(self, request_id: str, token: str, update: Update) -> None:
        try:
            m = self.model.check_respond(request_id, token)
        except AjsError as wanted:
            self.expect_error(wanted, lambda: self.db.respond(request_id, update, token))
            return
        response = self.call(lambda: self.db.respond(request_id, update, token))
        want = self.model.respond(m, update, self.step)
        self.touched.add(request_id)
        self.check_response(response, request_id, len(m.responses), want)

    @rule(
        lease=leases,
        kind=st.sampled_from(UPDATE_KINDS),
        fraction=st.sampled_from((0.0, 0.25, 1.0)),
        refund=st.booleans(),
        run_after=st.sampled_from((None, PAST, FUTURE[0])),
    )
    def respond(self, lease: Lease, kind: str, fraction: float, refund: bool, run_after: datetime | None) -> None:
        """With a lease a claim gave: accepted while it is the current one, else FAILED_PRECONDITION."""
        self.begin()
        self._respond(lease.request_id, lease.token, update_for(kind, fraction, refund, run_after))

    @rule(
        request_id=st.sampled_from(IDS),
        lease=st.one_of(st.none(), leases),
        kind=st.sampled_from(UPDATE_KINDS),
    )
    def respond_with_a_wrong_lease(self, request_id: str, lease: Lease | None, kind: str) -> None:
        """Another job's lease, or a made-up one: refused, and nothing changes."""
        self.begin()
        token = lease.token if lease is not None else "0123456789abcdef0123456789abcdef"
        self._respond(request_id, token, update_for(kind, 0.5, False, None))

    @rule(
        held=st.lists(leases, max_size=3),
        unknown=st.one_of(st.none(), st.sampled_from(IDS)),
        lease=st.sampled_from((LEASE, EXPIRED)),
    )
    def renew(self, held: list[Lease], unknown: str | None, lease: float) -> None:
        self.begin()
        leases = {item.request_id: item.token for item in held}
        if unknown is not None:
            leases.setdefault(unknown, "not-a-lease")
        renewal = self.call(lambda: self.db.renew(leases, lease))
        assert renewal == self.model.renew(leases, lease)

    @rule()
    def recover_expired(self) -> None:
        self.begin()
        recovered = self.call(self.db.recover_expired)
        before = {rid for rid, m in self.model.jobs.items() if m.state is S.PENDING}
        assert recovered == self.model.recover(self.step)
        self.touched |= {rid for rid in before if self.model.jobs[rid].state is not S.PENDING}

    @precondition(lambda self: self.env.restarts)
    @rule()
    def restart(self) -> None:
        """Close and reopen the same store: SQLite recovers every PENDING job, PostgreSQL none."""
        self.begin()
        self._close()
        self._open()
        running = {rid for rid, m in self.model.jobs.items() if m.state is S.PENDING}
        if self.env.name == "sqlite":
            self.model.recover(self.step, everything=True)
            self.touched |= running

    # -- cancel and prune --

    @rule(request_id=st.sampled_from(IDS))
    def cancel(self, request_id: str) -> None:
        self.begin()
        try:
            self.model.check_cancel(request_id)
        except AjsError as wanted:
            self.expect_error(wanted, lambda: self.db.cancel(request_id))
            return
        heard = len(self.listener.cancels)
        job = self.call(lambda: self.db.cancel(request_id))
        told = self.model.cancel(request_id, self.step)
        self.touched |= {m.request.id for m in self.model.descendants(request_id)}
        self.check_job(job, self.model.jobs[request_id])
        # A listener may hear a thing twice (a shared queue echoes); it must hear each running job.
        assert set(told) <= set(self.listener.cancels[heard:]), "running jobs whose dispatcher was not told"

    @rule(when=st.one_of(st.sampled_from(("long ago", "far ahead")), st.integers(1, 8)))
    def prune(self, when: str | int) -> None:
        """Ended jobs last changed before a time: long ago (none), far ahead (all), or before an earlier rule."""
        self.begin()
        if when == "long ago":
            before, last_step = PAST, 0
        elif when == "far ahead":
            before, last_step = FUTURE[1] + timedelta(days=1), self.step
        else:
            assert isinstance(when, int)
            # Everything before the rule ``when`` rules back began; the clock moved on after each step.
            last_step = self.rule_starts[-when] - 1 if len(self.rule_starts) >= when else 0
            before = self.times[last_step][1] + MICROSECOND
        deleted = self.call(lambda: self.db.prune(before))
        assert deleted == self.model.prune(last_step)

    # -- reading --

    @rule(
        request_id=st.sampled_from(IDS),
        read=st.sampled_from(("get", "responses", "watch")),
        after=st.integers(-1, 7),
        limit=st.integers(0, 4),
    )
    def read_a_job(self, request_id: str, read: str, after: int, limit: int) -> None:
        """``get``; ``responses`` after a sequence, up to a limit; ``watch`` of an ended job."""
        self.begin()
        m = self.model.jobs.get(request_id)
        if read == "get":
            if m is None:
                self.expect_error(NotFound("no such request"), lambda: self.db.get(request_id))
            else:
                self.check_job(self.call(lambda: self.db.get(request_id)), m)
            return
        if read == "responses":
            if m is None:
                self.expect_error(NotFound("no such request"), lambda: self.db.responses(request_id, after, limit))
                return
            got = self.call(lambda: self.db.responses(request_id, after, limit))
            start = max(after, 0)
            wanted = list(enumerate(m.responses, 1))[start : start + limit]
            assert [r.sequence for r in got] == [sequence for sequence, _ in wanted]
            for response, (sequence, want) in zip(got, wanted, strict=True):
                self.check_response(response, request_id, sequence, want)
            return
        # A watch of a job that ended yields its stored Responses after ``after`` and ends;
        # one of a live job waits for more (the rest of the suite covers that).
        if m is not None and not m.state.is_final:
            return
        after = max(after, 0)

        async def collect() -> list[Response]:
            stream = self.db.watch(request_id, after)
            try:
                return [response async for response in stream]
            finally:
                await stream.aclose()

        if m is None:
            self.expect_error(NotFound("no such request"), lambda: asyncio.wait_for(collect(), WAIT))
            return
        got = self.call(lambda: asyncio.wait_for(collect(), WAIT))
        assert [r.sequence for r in got] == list(range(after + 1, len(m.responses) + 1))
        for response in got:
            self.check_response(response, request_id, response.sequence, m.responses[response.sequence - 1])

    @rule(
        page_size=st.integers(1, 4),
        states=st.frozensets(st.sampled_from((S.CREATED, S.PENDING, S.FINISHED, S.FAILED, S.CANCELLED)), max_size=2),
        types=st.frozensets(st.sampled_from(TYPES), max_size=2),
        parent_id=st.one_of(st.just(""), st.sampled_from(IDS)),
        creator=st.sampled_from(("", *CREATORS)),
    )
    def list_pages(
        self, page_size: int, states: frozenset[RequestState], types: frozenset[str], parent_id: str, creator: str
    ) -> None:
        """Every page full but the last, in submit order, the last without a cursor: the model's list."""
        self.begin()
        job_filter = JobFilter(states=states, types=types, parent_id=parent_id, creator=creator)
        seen: list[str] = []
        after = 0
        for _ in range(len(self.model.jobs) + 2):
            page = self.call(lambda after=after: self.db.list_jobs(job_filter, page_size, after))
            assert len(page.jobs) <= page_size
            for job in page.jobs:
                assert job_filter.matches(job)
                self.check_job(job, self.model.jobs[job.request.id])
            seen += [job.request.id for job in page.jobs]
            if page.next_cursor is None:
                break
            assert len(page.jobs) == page_size, "a page that is not the last is full"
            after = page.next_cursor
        else:
            raise AssertionError("list_jobs kept handing out cursors")
        assert seen == self.model.matching(job_filter)


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    name = request.param
    if name != "postgres":
        yield Env(name, tmp_path)
        return
    import psycopg

    from ajs_grpc.connectors.postgres import PostgresConnector
    from tests.conftest import drop_schema

    dsn = postgres_dsn()
    schema = unique_schema()

    async def migrate() -> None:
        connector = PostgresConnector(dsn, schema=schema, writers=1)
        await connector.open()
        await connector.close()

    try:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(migrate())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            yield Env(name, tmp_path, schema=schema, admin=admin)
    finally:
        drop_schema(schema)


# A passing run takes well under a minute at scale 1; a failing one lets Hypothesis shrink the
# example (it gives up shrinking after 5 minutes), so the minimal program is printed, not cut off.
@pytest.mark.timeout(120 * SCALE + 360)
@pytest.mark.parametrize("env", ["memory", "sqlite", "postgres"], indirect=True)
def test_connector_follows_the_reference_model(env: Env) -> None:
    machine = type(f"ConnectorMachine_{env.name}", (ConnectorMachine,), {"env": env})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES[env.name],
            stateful_step_count=STEPS[env.name],
            deadline=None,
            # The examples database would be written into the checkout; runs are random anyway.
            database=None,
        ),
    )
    report(
        f"connector state machine ({env.name})",
        acknowledged=env.acknowledged,
        lost=0,
        duplicated=0,
        unexpected=0,
        steps=env.steps,
        examples=env.examples,
    )


# -- programs the machine found, replayed on every connector ---------------------------------------


def _submit(request_id: str, **changes: Any) -> tuple[str, dict[str, Any]]:
    kwargs: dict[str, Any] = {
        "request_id": request_id,
        "type_": "echo",
        "data": {},
        "with_input": False,
        "priority": 0,
        "run_after": None,
        "parent_id": "",
        "creator": "alice",
        "max_attempts": 1,
    }
    return "submit", {**kwargs, **changes}


FOUND: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # The memory connector claimed "a" before "b": the heap item left by the first, cancelled
    # "a" (queued once, like the new one) passed for the new job's, with the old place in line.
    # ("c" stays at the head of the queue, so no next_due_time tidies the stale item away.)
    "a reused id keeps its new place in the claim order": [
        ("seed_the_queue", {"seed": []}),
        _submit("c", priority=2),
        _submit("a"),
        ("cancel", {"request_id": "a"}),
        _submit("b"),
        ("prune", {"when": "far ahead"}),
        _submit("a"),
        ("claim", {"worker": "w1", "limit": 3, "types": None, "lease": LEASE}),
    ],
    # The same stale item makes a job queued for 2100 due at once.
    "a reused id waits for its run_after": [
        ("seed_the_queue", {"seed": []}),
        _submit("c", priority=2),
        _submit("a"),
        ("cancel", {"request_id": "a"}),
        ("prune", {"when": "far ahead"}),
        _submit("a", run_after=FUTURE[0]),
        ("claim", {"worker": "w1", "limit": 2, "types": None, "lease": LEASE}),
    ],
}


@pytest.mark.parametrize("program", list(FOUND))
@pytest.mark.parametrize("env", ["memory", "sqlite", "postgres"], indirect=True)
def test_found_programs_replay(env: Env, program: str) -> None:
    """Each program the state machine once found failing, step by step, with the invariant after each."""
    machine = type(f"ConnectorMachine_{env.name}", (ConnectorMachine,), {"env": env})()
    try:
        machine.the_whole_queue_matches()
        for name, kwargs in FOUND[program]:
            getattr(machine, name)(**kwargs)
            machine.the_whole_queue_matches()
    finally:
        machine.teardown()
