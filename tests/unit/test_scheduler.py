"""The scheduler over the memory connector, with a clock the tests move forward.

One job per occurrence, with the derived id; two schedulers racing; overlap and
catch-up; store errors; wake-ups.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from ajs_grpc.connectors.base import JobFilter, Submit
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import Unavailable
from ajs_grpc.core.model import Job, Request, RequestState, Update
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule, occurrence_id
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.engine.scheduler import Scheduler
from tests.helpers import eventually_reads

# Five seconds past a minute: each step of a minute finds its occurrence 5 s late (on time).
T0 = datetime(2026, 5, 1, 10, 0, 5, tzinfo=UTC)
TEMPLATE = Request(id="", type="report", data={"kind": "minutely"})


def minute(n: int) -> datetime:
    return datetime(2026, 5, 1, 10, n, tzinfo=UTC)


def oid(n: int) -> str:
    return occurrence_id("every-minute", minute(n))


class Clock:
    """A clock that stands still until the test moves it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Yielding(MemoryConnector):
    """A memory connector that lets other tasks run at each call, as a remote store does; it counts calls."""

    def __init__(self, *, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.calls: dict[str, int] = {}
        self.advanced: list[bool] = []
        self.failures: dict[str, int] = {}

    async def _turn(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        await asyncio.sleep(0)
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise Unavailable(f"{name}: the store is away (test)")

    async def list_schedules(self, *, creator: str = "", after: str = "", limit: int = 1000) -> list[Schedule]:
        await self._turn("list_schedules")
        return await super().list_schedules(creator=creator, after=after, limit=limit)

    async def enqueue_many(self, submits: Sequence[Submit | tuple[Request, int]]) -> list[tuple[Job, bool]]:
        await self._turn("enqueue_many")
        return await super().enqueue_many(submits)

    async def get(self, request_id: str) -> Job:
        await self._turn("get")
        return await super().get(request_id)

    async def advance_schedule(
        self, schedule_id: str, last_time: datetime | None, new_last_time: datetime, last_job_id: str
    ) -> bool:
        await self._turn("advance_schedule")
        done = await super().advance_schedule(schedule_id, last_time, new_last_time, last_job_id)
        self.advanced.append(done)
        return done


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def connector(clock: Clock) -> Yielding:
    return Yielding(clock=clock)


def chain() -> HandlerChain:
    return HandlerChain([], RejectRequestHandler())


@pytest.fixture
async def scheduler(connector: Yielding, clock: Clock) -> AsyncIterator[Scheduler]:
    running = Scheduler(connector, chain(), clock=clock, poll=0.01)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def create(connector: MemoryConnector, cron: str = "* * * * *", **fields: object) -> Schedule:
    schedule = Schedule(id="every-minute", cron=cron, template=TEMPLATE, creator="alice", **fields)  # type: ignore[arg-type]
    stored, created = await connector.create_schedule(schedule)
    assert created
    return stored


async def job_ids(connector: MemoryConnector) -> list[str]:
    page = await connector.list_jobs(JobFilter(), page_size=1000)
    return [job.request.id for job in page.jobs]


async def jobs_become(connector: MemoryConnector, expected: list[str]) -> list[str]:
    return await eventually_reads(lambda: job_ids(connector), lambda ids: ids == expected)


async def rounds(connector: Yielding) -> int:
    return connector.calls.get("list_schedules", 0)


async def handled_up_to(connector: MemoryConnector, at: datetime) -> Schedule:
    return await eventually_reads(
        lambda: connector.get_schedule("every-minute"), lambda s: s.last_time is not None and s.last_time >= at
    )


async def test_every_occurrence_gives_exactly_one_job_with_the_derived_id(
    connector: Yielding, clock: Clock, scheduler: Scheduler
) -> None:
    await create(connector, overlap=Overlap.ALLOW)
    expected: list[str] = []
    for n in range(1, 6):
        clock.advance(60)
        expected.append(oid(n))
        await jobs_become(connector, expected)
    stored = await handled_up_to(connector, minute(5))
    assert stored.last_time == minute(5)
    assert stored.last_job_id == oid(5)
    job = await connector.get(oid(3))
    assert (job.request.type, dict(job.request.data), job.request.creator) == ("report", {"kind": "minutely"}, "alice")
    # More rounds at the same time add nothing.
    done = await rounds(connector)
    await eventually_reads(lambda: rounds(connector), lambda n: n >= done + 3)
    assert await job_ids(connector) == expected


async def test_two_schedulers_racing_give_one_job_per_occurrence(connector: Yielding, clock: Clock) -> None:
    await create(connector, overlap=Overlap.ALLOW)
    first, second = (Scheduler(connector, chain(), clock=clock, poll=0.01) for _ in range(2))
    for n in range(1, 4):
        clock.advance(60)
        enqueued = connector.calls.get("enqueue_many", 0)
        await asyncio.gather(first.run_once(), second.run_once())
        # Both read the schedule before either moved it on, both submitted the occurrence:
        assert connector.calls["enqueue_many"] == enqueued + 2
        # one compare-and-set won, the other lost,
        assert sorted(connector.advanced[-2:]) == [False, True]
        # and the store kept one job.
        assert await job_ids(connector) == [oid(i) for i in range(1, n + 1)]


async def test_two_running_schedulers_give_one_job_per_occurrence(connector: Yielding, clock: Clock) -> None:
    await create(connector, overlap=Overlap.ALLOW)
    schedulers = [Scheduler(connector, chain(), clock=clock, poll=0.005) for _ in range(2)]
    for s in schedulers:
        await s.start()
    try:
        for n in range(1, 6):
            clock.advance(60)
            await jobs_become(connector, [oid(i) for i in range(1, n + 1)])
            await handled_up_to(connector, minute(n))
    finally:
        for s in schedulers:
            await s.stop()
    assert await job_ids(connector) == [oid(i) for i in range(1, 6)]


async def test_overlap_skip_submits_nothing_while_the_previous_job_runs(
    connector: Yielding, clock: Clock, scheduler: Scheduler
) -> None:
    await create(connector, overlap=Overlap.SKIP)
    clock.advance(60)
    await jobs_become(connector, [oid(1)])
    [claim] = await connector.claim("worker", types=["report"])
    assert claim.job.request.id == oid(1)
    clock.advance(60)
    stored = await handled_up_to(connector, minute(2))  # handled, without a job: the previous one runs
    assert stored.last_job_id == oid(1)
    assert await job_ids(connector) == [oid(1)]
    await connector.respond(oid(1), Update(RequestState.FINISHED), claim.lease_token)
    clock.advance(60)
    await jobs_become(connector, [oid(1), oid(3)])
    assert (await handled_up_to(connector, minute(3))).last_job_id == oid(3)


async def test_overlap_cancel_previous_cancels_the_unfinished_job(
    connector: Yielding, clock: Clock, scheduler: Scheduler
) -> None:
    await create(connector, overlap=Overlap.CANCEL_PREVIOUS)
    clock.advance(60)
    await jobs_become(connector, [oid(1)])
    clock.advance(60)
    await jobs_become(connector, [oid(1), oid(2)])
    assert (await connector.get(oid(1))).state is RequestState.CANCELLED
    assert (await connector.get(oid(2))).state is RequestState.CREATED


@pytest.mark.parametrize("catchup", [Catchup.SKIP, Catchup.ONE])
async def test_catchup_after_a_gap_longer_than_grace(connector: Yielding, clock: Clock, catchup: Catchup) -> None:
    await create(connector, overlap=Overlap.ALLOW, catchup=catchup)
    scheduler = Scheduler(connector, chain(), clock=clock, poll=0.01)
    await scheduler.start()
    clock.advance(60)
    await jobs_become(connector, [oid(1)])
    await handled_up_to(connector, minute(1))
    await scheduler.stop()
    # Down for ten minutes and a half: minutes 2..11 passed, the latest 35 s ago (> 15 s grace).
    clock.advance(630)
    restarted = Scheduler(connector, chain(), clock=clock, poll=0.01)
    await restarted.start()
    try:
        stored = await handled_up_to(connector, minute(11))
        caught_up = [oid(11)] if catchup is Catchup.ONE else []
        assert await job_ids(connector) == [oid(1), *caught_up]
        assert stored.last_job_id == (oid(11) if catchup is Catchup.ONE else oid(1))
        clock.advance(30)  # 10:12:05: on time again
        await jobs_become(connector, [oid(1), *caught_up, oid(12)])
    finally:
        await restarted.stop()


async def test_store_errors_are_logged_and_retried_never_ending_the_loop(
    connector: Yielding, clock: Clock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ajs_grpc.engine.scheduler")
    await create(connector, overlap=Overlap.ALLOW)
    connector.failures = {"list_schedules": 3, "enqueue_many": 2, "advance_schedule": 1}
    clock.advance(60)
    await jobs_become(connector, [oid(1)])
    await handled_up_to(connector, minute(1))
    assert connector.failures == {"list_schedules": 0, "enqueue_many": 0, "advance_schedule": 0}
    assert sum("the store is away" in r.getMessage() for r in caplog.records) == 6
    clock.advance(60)
    await jobs_become(connector, [oid(1), oid(2)])


async def test_changed_wakes_a_sleeping_scheduler(connector: Yielding, clock: Clock) -> None:
    scheduler = Scheduler(connector, chain(), clock=clock, poll=30)
    await scheduler.start()
    try:
        await eventually_reads(lambda: rounds(connector), lambda n: n >= 1)
        await create(connector, overlap=Overlap.ALLOW)
        clock.advance(60)
        scheduler.changed()  # without it, the next round would be 30 s away (the test gives up after 5)
        await jobs_become(connector, [oid(1)])
    finally:
        await scheduler.stop()


async def test_a_round_sleeps_until_the_next_occurrence_at_most_poll(connector: Yielding, clock: Clock) -> None:
    scheduler = Scheduler(connector, chain(), clock=clock, poll=30)
    assert await scheduler.run_once() == 30  # no schedule
    await create(connector)
    assert await scheduler.run_once() == 30  # next at 10:01:00, 55 s away
    clock.advance(40)
    assert await scheduler.run_once() == pytest.approx(15)  # 10:00:45
    assert await job_ids(connector) == []
    clock.advance(15)
    assert await scheduler.run_once() == 30  # 10:01:00: minute 1 submitted, the next 60 s away
    assert await job_ids(connector) == [oid(1)]
    clock.advance(50)
    assert await scheduler.run_once() == pytest.approx(10)


async def test_a_paused_schedule_gets_no_job_and_resumes_from_now(
    connector: Yielding, clock: Clock, scheduler: Scheduler
) -> None:
    await create(connector, overlap=Overlap.ALLOW, catchup=Catchup.ONE)
    await connector.pause_schedule("every-minute", True)
    clock.advance(180)
    done = await rounds(connector)
    await eventually_reads(lambda: rounds(connector), lambda n: n >= done + 3)
    assert await job_ids(connector) == []
    await connector.pause_schedule("every-minute", False)  # at 10:03:05: 1..3 are skipped
    scheduler.changed()
    clock.advance(60)
    await jobs_become(connector, [oid(4)])


async def test_an_occurrence_taken_by_other_content_is_skipped_and_the_schedule_goes_on(
    connector: Yielding, clock: Clock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    # Another instance submitted minute 1 with the template as it was before a replace.
    await connector.enqueue(Request(id=oid(1), type="report", data={"kind": "old"}, creator="alice"))
    await create(connector, overlap=Overlap.ALLOW)
    clock.advance(60)
    stored = await handled_up_to(connector, minute(1))
    assert stored.last_job_id == ""
    assert dict((await connector.get(oid(1))).request.data) == {"kind": "old"}
    assert any("skipped" in r.getMessage() and oid(1) in r.getMessage() for r in caplog.records)
    clock.advance(60)
    await jobs_become(connector, [oid(1), oid(2)])


async def test_a_schedule_that_cannot_be_read_is_logged_once_and_the_others_go_on(
    connector: Yielding, clock: Clock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    # Stored without check_schedule (a store written by hand, a zone this machine lacks).
    await connector.create_schedule(Schedule(id="broken", cron="* * * * *", template=TEMPLATE, time_zone="Mars/Base"))
    await create(connector, overlap=Overlap.ALLOW)
    clock.advance(60)
    await jobs_become(connector, [oid(1)])
    done = await rounds(connector)
    await eventually_reads(lambda: rounds(connector), lambda n: n >= done + 3)
    logged = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
