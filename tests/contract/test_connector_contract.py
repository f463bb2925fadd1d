"""The connector contract: every connector must pass this suite unchanged.

Run one connector only with ``pytest tests/contract --connector memory``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from ajs_grpc.connectors.base import Claim, Connector, JobFilter, Renewal
from ajs_grpc.core.errors import AlreadyExists, Code, FailedPrecondition, NotFound
from ajs_grpc.core.model import ErrorStatus, Progress, Request, RequestState, Response, Update, now
from tests.helpers import FakeClock, eventually

S = RequestState


class Listener:
    def __init__(self) -> None:
        self.work = 0
        self.cancels: list[str] = []

    def work_available(self) -> None:
        self.work += 1

    def cancel_requested(self, request_id: str) -> None:
        self.cancels.append(request_id)


def request(request_id: str, type_: str = "echo", **data: str) -> Request:
    return Request(id=request_id, type=type_, data=data)


async def claim_one(connector: Connector, worker: str = "w1", **kwargs: Any) -> Claim | None:
    claims = await connector.claim(worker, **kwargs)
    assert len(claims) <= 1
    return claims[0] if claims else None


async def collect(connector: Connector, request_id: str, after: int = 0) -> list[Response]:
    return [r async for r in connector.watch(request_id, after)]


# -- enqueue -----------------------------------------------------------------


async def test_enqueue_stores_a_created_job(connector: Connector) -> None:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value="typed"))
    job, created = await connector.enqueue(Request(id="a", type="echo", data={"k": "v"}, input=payload))
    assert created
    assert job.state is S.CREATED
    assert job.attempt == 0
    assert job.last_response.sequence == 1
    stored = await connector.get("a")
    assert stored == job
    assert stored.request.input == payload
    assert dict(stored.request.data) == {"k": "v"}


async def test_enqueue_is_idempotent_on_id(connector: Connector) -> None:
    first, _ = await connector.enqueue(request("a", k="v"))
    again, created = await connector.enqueue(request("a", k="v"))
    assert not created
    assert again == first


async def test_same_id_different_content_is_already_exists(connector: Connector) -> None:
    await connector.enqueue(request("a", k="v"))
    with pytest.raises(AlreadyExists):
        await connector.enqueue(request("a", k="other"))
    assert dict((await connector.get("a")).request.data) == {"k": "v"}


async def test_unknown_parent_is_not_found_and_nothing_is_stored(connector: Connector) -> None:
    with pytest.raises(NotFound):
        await connector.enqueue(Request(id="child", type="echo", parent_id="nobody"))
    with pytest.raises(NotFound):
        await connector.get("child")


# -- enqueue_many (an atomic batch) -------------------------------------------------------


async def test_a_batch_is_stored_in_order_with_each_result(connector: Connector) -> None:
    await connector.enqueue(request("old", k="v"))
    results = await connector.enqueue_many([(request("b1"), 1), (request("old", k="v"), 1), (request("b2"), 3)])
    assert [(job.request.id, created) for job, created in results] == [("b1", True), ("old", False), ("b2", True)]
    assert (await connector.get("b2")).max_attempts == 3
    page = await connector.list_jobs(JobFilter(), 10, 0)
    assert [job.request.id for job in page.jobs] == ["old", "b1", "b2"]
    assert await connector.count_jobs(S.CREATED) == 3


async def test_an_id_repeated_in_a_batch_is_one_job(connector: Connector) -> None:
    results = await connector.enqueue_many([(request("x", k="v"), 1), (request("x", k="v"), 1)])
    assert [created for _, created in results] == [True, False]
    assert results[0][0] == results[1][0]
    assert await connector.count_jobs(S.CREATED) == 1


@pytest.mark.parametrize(
    ("batch", "error", "index"),
    [
        ([request("ok1"), request("stored", k="other"), request("ok2")], AlreadyExists, 1),
        ([request("ok1"), request("ok2"), request("ok1", k="other")], AlreadyExists, 2),
        ([request("ok1"), Request(id="orphan", type="echo", parent_id="nobody")], NotFound, 1),
    ],
    ids=["taken by a stored job", "taken earlier in the batch", "unknown parent"],
)
async def test_a_refused_request_stores_nothing_of_its_batch(
    connector: Connector, batch: list[Request], error: type[Exception], index: int
) -> None:
    await connector.enqueue(request("stored", k="v"))
    with pytest.raises(error) as raised:
        await connector.enqueue_many([(r, 1) for r in batch])
    assert raised.value.metadata["index"] == str(index)  # type: ignore[attr-defined]
    for r in batch:
        if r.id != "stored":
            with pytest.raises(NotFound):
                await connector.get(r.id)
    assert await connector.count_jobs(S.CREATED) == 1


async def test_a_parent_may_come_earlier_in_the_batch(connector: Connector) -> None:
    results = await connector.enqueue_many([(request("p"), 1), (Request(id="c", type="echo", parent_id="p"), 1)])
    assert [created for _, created in results] == [True, True]
    assert (await connector.get("c")).request.parent_id == "p"


async def test_a_batch_wakes_listeners_and_its_jobs_are_claimed(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    await connector.enqueue_many([(request(f"j{i}"), 1) for i in range(5)])
    await eventually(lambda: listener.work > 0)
    claims = await connector.claim("w1", limit=10)
    assert sorted(c.job.request.id for c in claims) == [f"j{i}" for i in range(5)]


async def test_an_empty_batch_stores_nothing(connector: Connector) -> None:
    assert await connector.enqueue_many([]) == []
    assert await connector.count_jobs(S.CREATED) == 0


async def test_enqueue_wakes_listeners(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    await connector.enqueue(request("a"))
    assert listener.work >= 1


# -- claim -------------------------------------------------------------------


async def test_claim_takes_the_oldest_first_and_marks_it_pending(connector: Connector) -> None:
    for name in ("a", "b", "c"):
        await connector.enqueue(request(name))
    claims = [await claim_one(connector, "w1") for _ in range(3)]
    assert [c.job.request.id for c in claims if c] == ["a", "b", "c"]
    assert await claim_one(connector, "w1") is None
    first = claims[0]
    assert first is not None
    assert first.job.state is S.PENDING
    assert first.job.attempt == 1
    assert first.job.last_response.sequence == 2
    assert len({c.lease_token for c in claims if c}) == 3


async def test_claim_on_empty_queue_is_none(connector: Connector) -> None:
    assert await claim_one(connector, "w1") is None


async def test_claim_by_type(connector: Connector) -> None:
    await connector.enqueue(request("a", "x"))
    await connector.enqueue(request("b", "y"))
    claim = await claim_one(connector, types=["y"])
    assert claim is not None
    assert claim.job.request.id == "b"
    claim = await claim_one(connector, "w1")
    assert claim is not None
    assert claim.job.request.id == "a"


async def test_concurrent_claims_never_share_a_job(connector: Connector) -> None:
    for i in range(20):
        await connector.enqueue(request(f"r{i}"))
    claims = await asyncio.gather(*(connector.claim(f"w{i}", limit=2) for i in range(15)))
    ids = [c.job.request.id for batch in claims for c in batch]
    assert sorted(ids) == sorted(f"r{i}" for i in range(20))


# -- respond -----------------------------------------------------------------


async def test_respond_appends_gapless_responses_until_the_final_one(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    progress = await connector.respond("a", Update(S.PENDING, progress=Progress(0.5, "half")), claim.lease_token)
    final = await connector.respond("a", Update(S.FINISHED, data={"r": "1"}), claim.lease_token)
    assert (progress.sequence, final.sequence) == (3, 4)
    assert final.is_final
    job = await connector.get("a")
    assert job.state is S.FINISHED
    assert job.last_response == final
    with pytest.raises(FailedPrecondition):
        await connector.respond("a", Update(S.PENDING), claim.lease_token)
    assert [r.sequence for r in await connector.responses("a", 0, 100)] == [1, 2, 3, 4]


async def test_respond_needs_the_current_lease(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    with pytest.raises(FailedPrecondition):
        await connector.respond("a", Update(S.FINISHED), "not-the-lease")
    assert (await connector.get("a")).state is S.PENDING


async def test_respond_to_unknown_request_is_not_found(connector: Connector) -> None:
    with pytest.raises(NotFound):
        await connector.respond("nobody", Update(S.FINISHED), "lease")


async def test_handing_back_requeues_and_a_new_claim_gets_a_new_lease(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    first = await claim_one(connector, "w1")
    assert first is not None
    back = await connector.respond("a", Update(S.CREATED, data={"reason": "shutdown"}), first.lease_token)
    assert back.state is S.CREATED
    assert back.sequence == 3
    second = await claim_one(connector, "w2")
    assert second is not None
    assert second.job.attempt == 2
    assert second.lease_token != first.lease_token
    with pytest.raises(FailedPrecondition):
        await connector.respond("a", Update(S.FINISHED), first.lease_token)


async def test_responses_keep_what_was_stored(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    output = any_pb2.Any()
    output.Pack(wrappers_pb2.Int64Value(value=42))
    error = ErrorStatus(Code.UNKNOWN, "bad", reason="JOB_FAILED", metadata={"exception": "ValueError"})
    await connector.respond(
        "a", Update(S.PENDING, data={"d": "1"}, progress=Progress(0.25, "quarter")), claim.lease_token
    )
    await connector.respond("a", Update(S.FAILED, output=output, error=error), claim.lease_token)
    stored = await connector.responses("a", 2, 100)
    assert stored[0].progress == Progress(0.25, "quarter")
    assert dict(stored[0].data) == {"d": "1"}
    assert stored[1].output == output
    assert stored[1].error == error
    assert stored[1].create_time >= stored[0].create_time


# -- cancel ------------------------------------------------------------------


async def test_cancel_queued_job_ends_it_cancelled_and_it_is_never_claimed(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    job = await connector.cancel("a")
    assert job.state is S.CANCELLED
    assert job.last_response.is_final
    assert job.last_response.error is not None
    assert job.last_response.error.code is Code.CANCELLED
    assert await claim_one(connector, "w1") is None


async def test_cancel_running_job_marks_it_and_tells_listeners(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    job = await connector.cancel("a")
    assert job.state is S.PENDING
    assert job.cancel_requested
    assert set(listener.cancels) == {"a"}  # told at least once (a shared queue may echo)
    assert (await connector.get("a")).cancel_requested
    again = await connector.cancel("a")  # asking twice is harmless, and tells the dispatcher again
    assert again.state is S.PENDING
    assert set(listener.cancels) == {"a"}


async def test_a_cancelled_running_job_never_goes_back_to_the_queue(connector: Connector) -> None:
    await connector.enqueue(request("a"), max_attempts=3)
    claim = await claim_one(connector)
    assert claim is not None
    await connector.cancel("a")
    handed_back = await connector.respond("a", Update(S.CREATED, data={"reason": "shutdown"}), claim.lease_token)
    assert handed_back.state is S.CANCELLED
    assert handed_back.is_final
    assert await claim_one(connector) is None


async def test_cancel_finished_job_is_failed_precondition(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    await connector.respond("a", Update(S.FINISHED), claim.lease_token)
    with pytest.raises(FailedPrecondition):
        await connector.cancel("a")


async def test_cancel_unknown_is_not_found(connector: Connector) -> None:
    with pytest.raises(NotFound):
        await connector.cancel("nobody")


# -- get and list --------------------------------------------------------------


async def test_get_unknown_is_not_found(connector: Connector) -> None:
    with pytest.raises(NotFound):
        await connector.get("nobody")


async def test_list_pages_in_submit_order(connector: Connector) -> None:
    for i in range(7):
        await connector.enqueue(request(f"r{i}"))
    seen: list[str] = []
    cursor = 0
    pages = 0
    while True:
        page = await connector.list_jobs(JobFilter(), 3, cursor)
        seen += [job.request.id for job in page.jobs]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"r{i}" for i in range(7)]
    assert pages == 3


async def test_list_filters_by_state_type_and_parent(connector: Connector) -> None:
    await connector.enqueue(request("p", "parent"))
    await connector.enqueue(Request(id="c1", type="child", parent_id="p"))
    await connector.enqueue(Request(id="c2", type="child", parent_id="p"))
    await connector.enqueue(request("x", "other"))
    await connector.cancel("c2")

    async def ids(job_filter: JobFilter) -> list[str]:
        return [job.request.id for job in (await connector.list_jobs(job_filter, 100)).jobs]

    assert await ids(JobFilter(parent_id="p")) == ["c1", "c2"]
    assert await ids(JobFilter(types=frozenset({"child", "other"}))) == ["c1", "c2", "x"]
    assert await ids(JobFilter(states=frozenset({S.CANCELLED}))) == ["c2"]
    assert await ids(JobFilter(states=frozenset({S.CREATED}), parent_id="p")) == ["c1"]
    assert await ids(JobFilter(types=frozenset({"none"}))) == []


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest-first", "newest-first"])
async def test_list_pages_in_either_order_with_filters_and_early_ends(connector: Connector, newest_first: bool) -> None:
    for i in range(9):
        await connector.enqueue(request(f"r{i}", "odd" if i % 2 else "even"))
    expected = [f"r{i}" for i in range(0, 9, 2)]
    expected = expected[::-1] if newest_first else expected
    seen: list[str] = []
    cursor = 0
    while True:
        page = await connector.list_jobs(JobFilter(types=frozenset({"even"})), 2, cursor, newest_first=newest_first)
        assert len(page.cursors) == len(page.jobs)
        seen += [job.request.id for job in page.jobs]
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.cursors[-1]
        cursor = page.next_cursor
    assert seen == expected
    # A caller may end a page early at any job: the cursor of that job starts the rest.
    whole = await connector.list_jobs(JobFilter(), 9, newest_first=newest_first)
    rest = await connector.list_jobs(JobFilter(), 9, whole.cursors[3], newest_first=newest_first)
    assert [job.request.id for job in rest.jobs] == [job.request.id for job in whole.jobs[4:]]


async def test_a_full_last_page_has_no_next_cursor(connector: Connector) -> None:
    for i in range(3):
        await connector.enqueue(request(f"r{i}"))
    page = await connector.list_jobs(JobFilter(), 3)
    assert len(page.jobs) == 3
    assert page.next_cursor is None


# -- watch ---------------------------------------------------------------------


async def finish(connector: Connector, request_id: str, progress_steps: int = 1) -> None:
    claim = await claim_one(connector, "w1")
    assert claim is not None
    assert claim.job.request.id == request_id
    for i in range(progress_steps):
        await connector.respond(
            request_id, Update(S.PENDING, progress=Progress((i + 1) / progress_steps)), claim.lease_token
        )
    await connector.respond(request_id, Update(S.FINISHED), claim.lease_token)


async def test_watch_finished_job_replays_and_ends(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    await finish(connector, "a", 2)
    responses = await collect(connector, "a")
    assert [r.sequence for r in responses] == [1, 2, 3, 4, 5]
    assert responses[-1].is_final
    assert [r.sequence for r in await collect(connector, "a", after=3)] == [4, 5]
    assert await collect(connector, "a", after=5) == []
    assert connector.watcher_count == 0


async def test_watch_streams_live_responses_until_final(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    watching = asyncio.create_task(collect(connector, "a"))
    await eventually(lambda: connector.watcher_count == 1)
    assert connector.watcher_count == 1
    await finish(connector, "a", 3)
    responses = await asyncio.wait_for(watching, 5)
    assert [r.sequence for r in responses] == [1, 2, 3, 4, 5, 6]
    assert [r.state for r in responses] == [S.CREATED, S.PENDING, S.PENDING, S.PENDING, S.PENDING, S.FINISHED]
    assert connector.watcher_count == 0


async def test_many_watchers_see_the_same_responses(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    watchers = [asyncio.create_task(collect(connector, "a", after=i % 2)) for i in range(10)]
    await eventually(lambda: connector.watcher_count == 10)
    await finish(connector, "a", 2)
    results = await asyncio.wait_for(asyncio.gather(*watchers), 5)
    for i, responses in enumerate(results):
        assert [r.sequence for r in responses] == list(range(1 + i % 2, 6))


async def test_resuming_a_watch_misses_nothing_and_repeats_nothing(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, "w1")
    assert claim is not None
    seen: list[int] = []
    async for response in connector.watch("a"):
        seen.append(response.sequence)
        if response.sequence == 2:
            break  # the client drops the stream
    await connector.respond("a", Update(S.PENDING, progress=Progress(0.5)), claim.lease_token)
    await eventually(lambda: connector.watcher_count == 0)  # the dropped stream is closed
    resumed = asyncio.create_task(collect(connector, "a", after=seen[-1]))
    await eventually(lambda: connector.watcher_count == 1)
    await connector.respond("a", Update(S.FINISHED), claim.lease_token)
    seen += [r.sequence for r in await asyncio.wait_for(resumed, 5)]
    assert seen == [1, 2, 3, 4]
    assert connector.watcher_count == 0


async def test_watch_unknown_is_not_found(connector: Connector) -> None:
    with pytest.raises(NotFound):
        await collect(connector, "nobody")
    assert connector.watcher_count == 0


async def test_cancelled_watch_leaves_no_watcher(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    watching = asyncio.create_task(collect(connector, "a"))
    await eventually(lambda: connector.watcher_count == 1)
    assert connector.watcher_count == 1
    watching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watching
    assert connector.watcher_count == 0


# -- scheduling ------------------------------------------------------------------


async def test_claim_many_at_once_in_order(connector: Connector) -> None:
    for i in range(5):
        await connector.enqueue(request(f"r{i}"))
    claims = await connector.claim("w1", limit=3)
    assert [c.job.request.id for c in claims] == ["r0", "r1", "r2"]
    assert [c.job.request.id for c in await connector.claim("w1", limit=10)] == ["r3", "r4"]


async def test_higher_priority_first_fifo_within_a_priority(connector: Connector) -> None:
    await connector.enqueue(Request(id="low", type="t", priority=-5))
    await connector.enqueue(Request(id="mid1", type="t"))
    await connector.enqueue(Request(id="high", type="t", priority=10))
    await connector.enqueue(Request(id="mid2", type="t"))
    claims = await connector.claim("w1", limit=10)
    assert [c.job.request.id for c in claims] == ["high", "mid1", "mid2", "low"]


async def test_run_after_delays_the_claim(connector: Connector, clock: FakeClock) -> None:
    later = now() + timedelta(seconds=0.3)
    job, _ = await connector.enqueue(Request(id="later", type="t", run_after=later))
    await connector.enqueue(Request(id="past", type="t", run_after=now() - timedelta(days=365)))
    assert job.due_time == later
    assert [c.job.request.id for c in await connector.claim("w1", limit=10)] == ["past"]
    due = await connector.next_due_time()
    assert due is not None
    assert abs((due - later).total_seconds()) < 0.05  # a shared queue translates the database's clock
    clock.advance(0.31)
    assert [c.job.request.id for c in await connector.claim("w1", limit=10)] == ["later"]
    assert await connector.next_due_time() is None


async def test_next_due_time(connector: Connector) -> None:
    assert await connector.next_due_time() is None
    await connector.enqueue(request("a"))
    due = await connector.next_due_time()
    assert due is not None
    assert due <= now()
    await connector.cancel("a")
    assert await connector.next_due_time() is None


async def test_handing_back_with_run_after_delays_the_next_claim(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector)
    assert claim is not None
    retry_at = now() + timedelta(seconds=0.2)
    await connector.respond("a", Update(S.CREATED, run_after=retry_at), claim.lease_token)
    assert (await connector.get("a")).due_time == retry_at
    assert await claim_one(connector) is None
    clock.advance(0.25)
    again = await claim_one(connector)
    assert again is not None
    assert again.job.attempt == 2


# -- leases ------------------------------------------------------------------------


async def test_renew_keeps_a_lease_alive(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector, lease=0.2)
    assert claim is not None
    for _ in range(3):
        clock.advance(0.1)
        assert await connector.renew({"a": claim.lease_token}, 0.2) == Renewal()
    assert await connector.recover_expired() == 0
    assert (await connector.get("a")).state is S.PENDING


async def test_renew_reports_leases_not_held(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    claim = await claim_one(connector)
    assert claim is not None
    assert (await connector.renew({"a": "stolen", "ghost": "x"}, 30)).lost == {"a", "ghost"}


async def test_renew_reports_cancellations_of_held_jobs(connector: Connector) -> None:
    await connector.enqueue(request("a"))
    await connector.enqueue(request("b"))
    claims = {c.job.request.id: c.lease_token for c in await connector.claim("w1", limit=2)}
    await connector.cancel("a")
    renewal = await connector.renew(claims, 30)
    assert renewal == Renewal(lost=frozenset(), cancel_requested=frozenset({"a"}))


async def test_an_expired_lease_requeues_the_job_for_another_attempt(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(request("a"), max_attempts=2)
    first = await claim_one(connector, lease=0.05)
    assert first is not None
    clock.advance(0.1)
    assert await connector.recover_expired() == 1
    job = await connector.get("a")
    assert job.state is S.CREATED
    assert job.last_response.error is not None
    assert job.last_response.error.reason == "LEASE_EXPIRED"
    second = await claim_one(connector)
    assert second is not None
    assert second.job.attempt == 2
    # The old holder can no longer write.
    with pytest.raises(FailedPrecondition):
        await connector.respond("a", Update(S.FINISHED), first.lease_token)
    assert (await connector.renew({"a": first.lease_token}, 30)).lost == {"a"}


async def test_an_expired_lease_without_attempts_left_fails_the_job(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(request("a"), max_attempts=1)
    await claim_one(connector, lease=0.05)
    clock.advance(0.1)
    assert await connector.recover_expired() == 1
    job = await connector.get("a")
    assert job.state is S.FAILED
    assert job.last_response.is_final
    assert job.last_response.error is not None
    assert "no attempts left" in job.last_response.error.message
    assert [r.sequence for r in await connector.responses("a", 0, 10)] == [1, 2, 3]


async def test_an_expired_lease_of_a_cancelled_job_ends_it_cancelled(connector: Connector, clock: FakeClock) -> None:
    await connector.enqueue(request("a"), max_attempts=5)
    await claim_one(connector, lease=0.05)
    await connector.cancel("a")
    clock.advance(0.1)
    assert await connector.recover_expired() == 1
    assert (await connector.get("a")).state is S.CANCELLED


async def test_max_attempts_is_kept(connector: Connector) -> None:
    job, _ = await connector.enqueue(request("a"), max_attempts=4)
    assert job.max_attempts == 4
    assert (await connector.get("a")).max_attempts == 4


# -- cancel cascade and retention --------------------------------------------------


async def test_cancelling_a_parent_cancels_its_unfinished_descendants(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    await connector.enqueue(request("parent"))
    await connector.enqueue(Request(id="done", type="t", parent_id="parent"))
    await connector.enqueue(Request(id="running", type="t", parent_id="parent"))
    await connector.enqueue(Request(id="queued", type="t", parent_id="parent"))
    await connector.enqueue(Request(id="grandchild", type="t", parent_id="queued"))
    await connector.enqueue(request("unrelated"))
    claims = {c.job.request.id: c for c in await connector.claim("w1", limit=3)}
    assert set(claims) == {"parent", "done", "running"}
    await connector.respond("done", Update(S.FINISHED), claims["done"].lease_token)

    parent = await connector.cancel("parent")
    assert parent.cancel_requested
    assert sorted(set(listener.cancels)) == ["parent", "running"]
    assert (await connector.get("done")).state is S.FINISHED
    assert (await connector.get("running")).cancel_requested
    assert (await connector.get("queued")).state is S.CANCELLED
    assert (await connector.get("grandchild")).state is S.CANCELLED
    assert (await connector.get("unrelated")).state is S.CREATED


async def test_prune_deletes_old_ended_jobs_only(connector: Connector) -> None:
    for name in ("old1", "old2", "open"):
        await connector.enqueue(request(name))
    await connector.cancel("old1")
    await connector.cancel("old2")
    cutoff = now() + timedelta(seconds=1)
    assert await connector.prune(cutoff) == 2
    with pytest.raises(NotFound):
        await connector.get("old1")
    with pytest.raises(NotFound):
        await connector.responses("old2", 0, 10)
    page = await connector.list_jobs(JobFilter(), 10)
    assert [job.request.id for job in page.jobs] == ["open"]
    assert await connector.prune(now() - timedelta(days=1)) == 0


async def test_listing_pages_across_pruned_jobs(connector: Connector) -> None:
    for i in range(6):
        await connector.enqueue(request(f"r{i}"))
    first = await connector.list_jobs(JobFilter(), 2)
    assert first.next_cursor is not None
    for name in ("r2", "r3"):
        await connector.cancel(name)
    await connector.prune(now() + timedelta(seconds=1))
    second = await connector.list_jobs(JobFilter(), 10, first.next_cursor)
    assert [job.request.id for job in second.jobs] == ["r4", "r5"]


async def test_list_filters_by_creator_and_count_jobs(connector: Connector) -> None:
    await connector.enqueue(Request(id="a1", type="t", creator="alice"))
    await connector.enqueue(Request(id="b1", type="t", creator="bob"))
    await connector.enqueue(Request(id="a2", type="t", creator="alice"))
    page = await connector.list_jobs(JobFilter(creator="alice"), 10)
    assert [job.request.id for job in page.jobs] == ["a1", "a2"]
    assert await connector.count_jobs(S.CREATED) == 3
    await connector.cancel("b1")
    assert await connector.count_jobs(S.CREATED) == 2
    assert await connector.count_jobs(S.CANCELLED) == 1


async def test_prune_keeps_an_old_parent_while_a_child_is_left(connector: Connector) -> None:
    await connector.enqueue(request("parent"))
    await connector.enqueue(Request(id="child", type="t", parent_id="parent"))
    await connector.enqueue(Request(id="grandchild", type="t", parent_id="child"))
    await connector.enqueue(request("lonely"))
    claims = {c.job.request.id: c for c in await connector.claim("w", limit=4)}
    for name in ("parent", "child", "lonely"):
        await connector.respond(name, Update(S.FINISHED), claims[name].lease_token)
    later = now() + timedelta(seconds=1)
    assert await connector.prune(later) == 1  # only "lonely": the grandchild still runs
    assert (await connector.get("parent")).state is S.FINISHED
    await connector.respond("grandchild", Update(S.FINISHED), claims["grandchild"].lease_token)
    assert await connector.prune(now() + timedelta(seconds=1)) == 3  # leaves first, then up
    with pytest.raises(NotFound):
        await connector.get("parent")


async def test_watchers_at_the_same_place_share_one_read_of_each_new_response(connector: Connector) -> None:
    await connector.enqueue(request("shared"))
    claim = await claim_one(connector)
    assert claim is not None
    watchers = [connector.watch("shared") for _ in range(20)]
    for watch in watchers:
        assert (await anext(watch)).sequence == 1
        assert (await anext(watch)).sequence == 2
    reads: list[int] = []
    original = connector.responses

    async def counted(request_id: str, after_sequence: int, limit: int) -> list[Response]:
        reads.append(after_sequence)
        return await original(request_id, after_sequence, limit)

    connector.responses = counted  # type: ignore[method-assign]
    pending = [asyncio.ensure_future(anext(watch)) for watch in watchers]
    await eventually(lambda: bool(reads))  # they look for what follows 2 (together)
    await connector.respond("shared", Update(S.PENDING, progress=Progress(0.5, "half")), claim.lease_token)
    got = await asyncio.gather(*pending)
    assert [r.sequence for r in got] == [3] * 20
    # Each watcher alone read twice (40 reads): nothing new, then the new Response. Shared,
    # a read serves every watcher at the same place (a newer one starts if a notice came meanwhile).
    assert len(reads) <= 4, reads
    for watch in watchers:
        await watch.aclose()
