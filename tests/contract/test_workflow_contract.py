"""Workflows in the connector contract: dependencies, retry by hand, expiry, delete, schedules' storage.

Every connector passes this suite unchanged (``tests/contract`` runs it per connector).
Time is a :class:`~tests.helpers.FakeClock` where expiry is measured, so nothing sleeps.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from google.protobuf import any_pb2

from ajs_grpc.connectors.base import Claim, Connector, Submit
from ajs_grpc.core.errors import AlreadyExists, Code, FailedPrecondition, InvalidArgument, NotFound
from ajs_grpc.core.flow import FlowPolicy, Unique
from ajs_grpc.core.model import ErrorStatus, Request, RequestState, Update, now
from ajs_grpc.core.schedules import Catchup, Overlap, Schedule
from tests.helpers import FakeClock

S = RequestState


async def claim_all(connector: Connector) -> dict[str, Claim]:
    """What a claim takes now, by id."""
    return {c.job.request.id: c for c in await connector.claim("w", limit=50)}


async def end(connector: Connector, claim: Claim, state: RequestState = S.FINISHED, **data: str) -> None:
    error = ErrorStatus(Code.INTERNAL, "broke") if state is S.FAILED else None
    await connector.respond(claim.job.request.id, Update(state, data=data, error=error), claim.lease_token)


async def run(connector: Connector, request_id: str, state: RequestState = S.FINISHED) -> None:
    """Claims ``request_id`` (it must be the only claimable job) and ends it in ``state``."""
    claims = await claim_all(connector)
    assert sorted(claims) == [request_id]
    await end(connector, claims[request_id], state)


def diamond() -> list[Submit]:
    return [
        Submit(Request(id="D", type="t", depends_on=("B", "C"))),  # before its dependencies: allowed in a batch
        Submit(Request(id="A", type="t")),
        Submit(Request(id="B", type="t", depends_on=("A",))),
        Submit(Request(id="C", type="t", depends_on=("A",))),
    ]


# -- dependencies ----------------------------------------------------------------------------


async def test_a_diamond_runs_in_dependency_order(connector: Connector) -> None:
    results = await connector.enqueue_many(diamond())
    assert [created for _, created in results] == [True] * 4
    assert results[0][0].waiting
    assert (await connector.get("D")).request.depends_on == ("B", "C")
    await run(connector, "A")
    claims = await claim_all(connector)
    assert sorted(claims) == ["B", "C"]
    await end(connector, claims["B"])
    assert await claim_all(connector) == {}  # D still waits for C
    assert (await connector.get("D")).waiting
    await end(connector, claims["C"])
    await run(connector, "D")
    assert (await connector.get("D")).state is S.FINISHED


async def test_a_waiting_job_is_not_due(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t", run_after=now() + timedelta(days=1)))
    await connector.enqueue(Request(id="B", type="t", depends_on=("A",)))
    due = await connector.next_due_time()
    assert due is not None
    assert due > now() + timedelta(hours=23)


async def test_a_failed_dependency_cancels_its_dependents_down_the_graph(connector: Connector) -> None:
    await connector.enqueue_many(diamond())
    await run(connector, "A")
    claims = await claim_all(connector)
    await end(connector, claims["B"], S.FAILED)
    d = await connector.get("D")
    assert d.state is S.CANCELLED
    assert d.last_response.error is not None
    assert d.last_response.error.reason == "DEPENDENCY_FAILED"
    assert d.last_response.error.metadata["dependency_id"] == "B"
    assert d.last_response.error.metadata["dependency_state"] == "FAILED"
    await end(connector, claims["C"])
    assert (await connector.get("D")).state is S.CANCELLED  # stays as it ended
    assert await claim_all(connector) == {}


async def test_a_cancelled_dependency_cancels_a_chain(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t"))
    await connector.enqueue(Request(id="B", type="t", depends_on=("A",)))
    await connector.enqueue(Request(id="C", type="t", depends_on=("B",)))
    await connector.cancel("A")
    for request_id, cause in (("B", "A"), ("C", "B")):
        job = await connector.get(request_id)
        assert job.state is S.CANCELLED
        assert job.last_response.error is not None
        assert job.last_response.error.metadata["dependency_id"] == cause


async def test_a_type_may_run_after_failed_dependencies(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t"))
    await connector.enqueue(Request(id="B", type="t", depends_on=("A",)), allow_failed_dependencies=True)
    await run(connector, "A", S.FAILED)
    await run(connector, "B")


async def test_dependencies_that_already_ended_release_the_job_at_submit(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t"))
    await run(connector, "A")
    job, _ = await connector.enqueue(Request(id="B", type="t", depends_on=("A",)))
    assert not job.waiting
    await run(connector, "B")
    await connector.enqueue(Request(id="F", type="t"))
    await run(connector, "F", S.FAILED)
    late, _ = await connector.enqueue(Request(id="G", type="t", depends_on=("F",)))
    assert late.state is S.CANCELLED
    assert late.last_response.sequence == 2


async def test_an_unknown_dependency_is_refused_and_nothing_is_stored(connector: Connector) -> None:
    batch = [Submit(Request(id="x", type="t")), Submit(Request(id="y", type="t", depends_on=("x", "nope")))]
    with pytest.raises(NotFound) as refused:
        await connector.enqueue_many(batch)
    assert refused.value.reason == "DEPENDENCY_NOT_FOUND"
    assert refused.value.metadata["index"] == "1"
    with pytest.raises(NotFound):
        await connector.get("x")


async def test_a_cycle_is_refused_and_nothing_is_stored(connector: Connector) -> None:
    await connector.enqueue(Request(id="stored", type="t"))
    batch = [
        Submit(Request(id="a", type="t", depends_on=("stored", "c"))),
        Submit(Request(id="b", type="t", depends_on=("a",))),
        Submit(Request(id="c", type="t", depends_on=("b",))),
    ]
    with pytest.raises(InvalidArgument) as refused:
        await connector.enqueue_many(batch)
    assert refused.value.reason == "DEPENDENCY_CYCLE"
    assert "a -> c -> b -> a" in refused.value.message or "->" in refused.value.message
    for request_id in "abc":
        with pytest.raises(NotFound):
            await connector.get(request_id)
    with pytest.raises(InvalidArgument):
        await connector.enqueue(Request(id="self", type="t", depends_on=("self",)))


async def test_request_fields_of_issue_14_are_stored(connector: Connector) -> None:
    expire = now() + timedelta(hours=1)
    request = Request(id="r", type="t", expire_time=expire, max_attempts=2, timeout=1.5)
    await connector.enqueue(request, 3)
    stored = (await connector.get("r")).request
    assert stored.expire_time == expire
    assert stored.max_attempts == 2
    assert stored.timeout == 1.5
    # Resubmitting it is idempotent; another expire time is other content.
    assert not (await connector.enqueue(request, 3))[1]
    with pytest.raises(AlreadyExists):
        await connector.enqueue(dataclasses.replace(request, expire_time=expire + timedelta(seconds=1)), 3)


# -- retry by hand ------------------------------------------------------------------------------


async def test_a_failed_job_is_retried_by_hand_with_its_responses_going_on(connector: Connector) -> None:
    await connector.enqueue(Request(id="f", type="t"), 2)
    claims = await claim_all(connector)  # attempt 1 fails and is retried, attempt 2 fails for good
    await connector.respond("f", Update(S.CREATED, error=ErrorStatus(Code.INTERNAL, "again")), claims["f"].lease_token)
    await run(connector, "f", S.FAILED)
    failed = await connector.get("f")
    assert failed.state is S.FAILED
    assert failed.attempt == 2
    retried = await connector.retry("f")
    assert retried.state is S.CREATED
    assert retried.attempt == 0
    assert retried.last_response.sequence == failed.last_response.sequence + 1
    assert retried.last_response.data["reason"] == "MANUAL_RETRY"
    assert not retried.last_response.is_final
    claims = await claim_all(connector)
    assert claims["f"].job.attempt == 1
    await end(connector, claims["f"])
    responses = await connector.responses("f", 0, 100)
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert [r.state for r in responses][-3:] == [S.CREATED, S.PENDING, S.FINISHED]
    assert sum(r.is_final for r in responses) == 2  # one per run
    # A watch from the start goes past the first run's end to the second's.
    assert [r.sequence async for r in connector.watch("f")] == [r.sequence for r in responses]
    assert [r.sequence async for r in connector.watch("f", failed.last_response.sequence)] == [
        r.sequence for r in responses[failed.last_response.sequence :]
    ]


async def test_only_a_failed_or_cancelled_job_is_retried(connector: Connector) -> None:
    await connector.enqueue(Request(id="q", type="t"))
    with pytest.raises(FailedPrecondition) as queued:
        await connector.retry("q")
    assert queued.value.reason == "REQUEST_NOT_ENDED"
    await run(connector, "q")
    with pytest.raises(FailedPrecondition) as finished:
        await connector.retry("q")
    assert finished.value.reason == "REQUEST_FINISHED"
    with pytest.raises(NotFound):
        await connector.retry("nope")
    await connector.enqueue(Request(id="c", type="t"))
    await connector.cancel("c")
    assert (await connector.retry("c")).state is S.CREATED
    await run(connector, "c")


async def test_a_dependent_is_retried_only_after_its_failed_dependency(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t"))
    await connector.enqueue(Request(id="B", type="t", depends_on=("A",)))
    await run(connector, "A", S.FAILED)
    with pytest.raises(FailedPrecondition) as refused:
        await connector.retry("B")
    assert refused.value.reason == "DEPENDENCY_FAILED"
    await connector.retry("A")
    retried = await connector.retry("B")
    assert retried.waiting  # A runs again first
    await run(connector, "A")
    await run(connector, "B")


# -- expiry ----------------------------------------------------------------------------------


async def test_a_job_not_started_by_its_expire_time_ends_expired(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(Request(id="e", type="t", expire_time=clock() + timedelta(seconds=10)))
    await connector.enqueue(Request(id="later", type="t", depends_on=("e",)))
    await connector.enqueue(Request(id="fresh", type="t", expire_time=clock() + timedelta(hours=1)))
    clock.advance(11)
    assert sorted(await claim_all(connector)) == ["fresh"]
    expired = await connector.get("e")
    assert expired.state is S.CANCELLED
    assert expired.last_response.error is not None
    assert expired.last_response.error.reason == "EXPIRED"
    assert expired.last_response.error.code is Code.DEADLINE_EXCEEDED
    assert (await connector.get("later")).state is S.CANCELLED  # its dependency expired


async def test_expired_jobs_nobody_claims_are_ended_by_recovery(connector: Connector, clock: FakeClock) -> None:
    await connector.set_paused("slow", True)
    await connector.enqueue(Request(id="e", type="t", queue="slow", expire_time=clock() + timedelta(seconds=5)))
    assert await connector.recover_expired() == 0
    clock.advance(6)
    assert await connector.recover_expired() == 1
    assert (await connector.get("e")).last_response.error.reason == "EXPIRED"  # type: ignore[union-attr]
    assert await connector.recover_expired() == 0


async def test_a_started_job_does_not_expire(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(Request(id="e", type="t", expire_time=clock() + timedelta(seconds=5)))
    claims = await claim_all(connector)
    clock.advance(6)
    await connector.recover_expired()
    assert (await connector.get("e")).state is S.PENDING
    await end(connector, claims["e"])


# -- delete ----------------------------------------------------------------------------------


async def test_delete_removes_an_ended_job_and_its_descendants(connector: Connector) -> None:
    await connector.enqueue(Request(id="p", type="t"))
    await connector.enqueue(Request(id="c1", type="t", parent_id="p"))
    await connector.enqueue(Request(id="g1", type="t", parent_id="c1"))
    await connector.enqueue(Request(id="other", type="t"))
    with pytest.raises(FailedPrecondition) as running:
        await connector.delete("p")
    assert running.value.reason == "REQUEST_NOT_ENDED"
    await connector.cancel("p")  # the tree ends CANCELLED
    assert await connector.delete("p") == 3
    for request_id in ("p", "c1", "g1"):
        with pytest.raises(NotFound):
            await connector.get(request_id)
        with pytest.raises(NotFound):
            await connector.responses(request_id, 0, 10)
    assert (await connector.get("other")).state is S.CREATED
    with pytest.raises(NotFound):
        await connector.delete("p")
    job, created = await connector.enqueue(Request(id="p", type="t"))  # the id is free again
    assert created
    assert job.last_response.sequence == 1


async def test_delete_keeps_dependents_running(connector: Connector) -> None:
    await connector.enqueue(Request(id="A", type="t"))
    await connector.enqueue(Request(id="B", type="t", depends_on=("A",)))
    await run(connector, "A")
    assert await connector.delete("A") == 1
    await run(connector, "B")
    assert (await connector.get("B")).state is S.FINISHED


# -- schedules' storage --------------------------------------------------------------------------


def schedule(schedule_id: str = "nightly", **changes: object) -> Schedule:
    template = Request(
        id="", type="report", data={"k": "v"}, input=any_pb2.Any(type_url="x/y.Z", value=b"\x01"), priority=3
    )
    made = Schedule(id=schedule_id, cron="0 3 * * *", template=template, time_zone="Europe/Berlin")
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


async def test_a_schedule_is_created_once(connector: Connector) -> None:
    stored, created = await connector.create_schedule(schedule(creator="alice"))
    assert created
    assert stored.create_time is not None
    assert stored.last_time is None
    assert not stored.paused
    again, created = await connector.create_schedule(schedule(creator="alice"))
    assert not created
    assert again == stored
    got = await connector.get_schedule("nightly")
    assert got == stored
    assert got.template.input == any_pb2.Any(type_url="x/y.Z", value=b"\x01")
    assert got.template.data == {"k": "v"}
    assert got.template.priority == 3
    assert got.overlap is Overlap.SKIP
    assert got.catchup is Catchup.SKIP
    with pytest.raises(AlreadyExists) as taken:
        await connector.create_schedule(schedule(cron="0 4 * * *"))
    assert taken.value.reason == "SCHEDULE_ID_TAKEN"


async def test_a_replaced_schedule_keeps_its_progress(connector: Connector) -> None:
    stored, _ = await connector.create_schedule(schedule())
    at = now().replace(microsecond=0)
    assert await connector.advance_schedule("nightly", None, at, "nightly@1")
    replaced, created = await connector.create_schedule(
        schedule(cron="0 4 * * *", overlap=Overlap.ALLOW, catchup=Catchup.ONE), replace=True
    )
    assert created
    assert replaced.cron == "0 4 * * *"
    assert replaced.overlap is Overlap.ALLOW
    assert replaced.catchup is Catchup.ONE
    assert replaced.last_time == at
    assert replaced.last_job_id == "nightly@1"
    assert replaced.create_time == stored.create_time


async def test_advancing_a_schedule_is_a_compare_and_set(connector: Connector) -> None:
    await connector.create_schedule(schedule())
    first = now().replace(microsecond=0)
    second = first + timedelta(seconds=1)
    assert await connector.advance_schedule("nightly", None, first, "nightly@a")
    assert not await connector.advance_schedule("nightly", None, second, "nightly@b")  # another instance was first
    assert await connector.advance_schedule("nightly", first, second, "")
    got = await connector.get_schedule("nightly")
    assert got.last_time == second
    assert got.last_job_id == "nightly@a"
    assert not await connector.advance_schedule("gone", None, second, "")


async def test_pausing_a_schedule_stops_it_and_resuming_skips_what_passed(connector: Connector) -> None:
    await connector.create_schedule(schedule())
    paused = await connector.pause_schedule("nightly", True)
    assert paused.paused
    assert not await connector.advance_schedule("nightly", None, now(), "")
    before = now()
    resumed = await connector.pause_schedule("nightly", False)
    assert not resumed.paused
    assert resumed.last_time is not None
    assert resumed.last_time >= before - timedelta(seconds=1)
    with pytest.raises(NotFound) as missing:
        await connector.pause_schedule("gone", True)
    assert missing.value.reason == "SCHEDULE_NOT_FOUND"


async def test_schedules_are_listed_by_id_and_creator_and_deleted(connector: Connector) -> None:
    for schedule_id, creator in (("c", "bob"), ("a", "alice"), ("b", "alice")):
        await connector.create_schedule(schedule(schedule_id, creator=creator))
    assert [s.id for s in await connector.list_schedules()] == ["a", "b", "c"]
    assert [s.id for s in await connector.list_schedules(creator="alice")] == ["a", "b"]
    assert [s.id for s in await connector.list_schedules(after="a", limit=1)] == ["b"]
    await connector.delete_schedule("b")
    assert [s.id for s in await connector.list_schedules()] == ["a", "c"]
    with pytest.raises(NotFound):
        await connector.get_schedule("b")
    with pytest.raises(NotFound):
        await connector.delete_schedule("b")


# -- found by review ----------------------------------------------------------------------------


async def test_a_dependency_on_a_later_job_of_its_ordered_key_is_refused(connector: Connector) -> None:
    policy = FlowPolicy(ordered_by="account")
    first, second = (
        Request(id="D", type="t", data={"account": "k"}, depends_on=("E",)),
        Request(id="E", type="t", data={"account": "k"}),
    )
    with pytest.raises(InvalidArgument) as refused:
        await connector.enqueue_many([Submit(first, 1, policy.flow(first)), Submit(second, 1, policy.flow(second))])
    assert refused.value.reason == "DEPENDENCY_ORDER"
    # The other way round is the order the key gives anyway: it runs.
    later = dataclasses.replace(first, id="D2", depends_on=("E2",))
    earlier = dataclasses.replace(second, id="E2")
    await connector.enqueue_many([Submit(earlier, 1, policy.flow(earlier)), Submit(later, 1, policy.flow(later))])
    await run(connector, "E2")
    await run(connector, "D2")


async def test_a_dependency_on_a_batch_item_answered_by_its_unique_key_is_refused(connector: Connector) -> None:
    policy = FlowPolicy(unique=Unique(key="report"))
    stored = Request(id="r1", type="t", data={"report": "q3"})
    await connector.enqueue(stored, 1, policy.flow(stored))
    twin = Request(id="r2", type="t", data={"report": "q3"})
    after = Request(id="after", type="t", depends_on=("r2",))
    with pytest.raises(NotFound) as refused:
        await connector.enqueue_many([Submit(twin, 1, policy.flow(twin)), Submit(after)])
    assert refused.value.reason == "DEPENDENCY_NOT_FOUND"
    assert refused.value.metadata["index"] == "1"


async def test_a_job_past_its_expire_time_is_not_retried(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(Request(id="e", type="t", expire_time=clock() + timedelta(seconds=5)))
    clock.advance(6)
    await connector.recover_expired()
    with pytest.raises(FailedPrecondition) as refused:
        await connector.retry("e")
    assert refused.value.reason == "EXPIRE_TIME_PASSED"
