"""Flow control in the connector contract: queues, pause, and the per-key policies.

Every connector passes this suite unchanged (``tests/contract`` runs it per connector).
Time is a :class:`~tests.helpers.FakeClock` where buckets refill, so nothing sleeps.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from ajs_grpc.connectors.base import Claim, Connector, Submit
from ajs_grpc.core.errors import Code
from ajs_grpc.core.flow import Concurrency, FlowPolicy, JobStates, RateLimit, Unique
from ajs_grpc.core.model import ErrorStatus, Request, RequestState, Update
from tests.helpers import FakeClock

S = RequestState


class Listener:
    def __init__(self) -> None:
        self.work = 0

    def work_available(self) -> None:
        self.work += 1

    def cancel_requested(self, request_id: str) -> None:
        pass


async def submit(connector: Connector, request_id: str, policy: FlowPolicy, **data: str) -> tuple[Any, bool]:
    request = Request(id=request_id, type="flow", data=data)
    return await connector.enqueue(request, 3, policy.flow(request))


async def claim_ids(connector: Connector, limit: int = 10, **kwargs: Any) -> list[str]:
    return [c.job.request.id for c in await connector.claim("w", limit=limit, **kwargs)]


async def finish(connector: Connector, claim: Claim) -> None:
    await connector.respond(claim.job.request.id, Update(S.FINISHED), claim.lease_token)


# -- queues and pause ------------------------------------------------------------------


async def test_a_request_without_a_queue_is_in_the_default_queue(connector: Connector) -> None:
    job, _ = await connector.enqueue(Request(id="a", type="t"))
    assert job.request.queue == "default"
    assert (await connector.get("a")).request.queue == "default"
    await connector.enqueue(Request(id="b", type="t", queue="mail"))
    assert (await connector.get("b")).request.queue == "mail"


async def test_a_claim_takes_only_its_queues(connector: Connector) -> None:
    await connector.enqueue(Request(id="a", type="t", queue="mail"))
    await connector.enqueue(Request(id="b", type="t", queue="video"))
    assert await claim_ids(connector, queues=["video"]) == ["b"]
    assert await claim_ids(connector, queues=["other"]) == []
    assert await claim_ids(connector) == ["a"]


async def test_a_paused_queue_accepts_submits_but_starts_nothing_until_resumed(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    paused = await connector.set_paused("mail", True)
    assert paused.paused
    assert paused.name == "mail"
    await connector.enqueue(Request(id="m1", type="t", queue="mail"))
    await connector.enqueue(Request(id="v1", type="t", queue="video"))
    assert await claim_ids(connector) == ["v1"]
    assert await claim_ids(connector) == []
    assert await connector.next_due_time() is None  # nothing to wake up for while paused
    assert (await connector.held_back())["paused"] == 1
    before = listener.work
    resumed = await connector.set_paused("mail", False)
    assert not resumed.paused
    assert resumed.queued == 1
    assert listener.work > before  # resuming wakes the dispatchers
    assert await claim_ids(connector) == ["m1"]


async def test_pausing_does_not_stop_a_running_job(connector: Connector) -> None:
    await connector.enqueue(Request(id="a", type="t", queue="q"))
    [claim] = await connector.claim("w")
    await connector.set_paused("q", True)
    await finish(connector, claim)
    assert (await connector.get("a")).state is S.FINISHED


async def test_list_queues_counts_queued_and_running_and_shows_paused(connector: Connector) -> None:
    await connector.enqueue(Request(id="a", type="t", queue="q"))
    await connector.enqueue(Request(id="b", type="t", queue="q"))
    await connector.enqueue(Request(id="c", type="t"))
    await connector.set_paused("empty", True)
    await connector.claim("w", queues=["q"])
    queues = {info.name: info for info in await connector.list_queues()}
    assert sorted(queues) == ["default", "empty", "q"]
    assert (queues["q"].queued, queues["q"].running, queues["q"].paused) == (1, 1, False)
    assert queues["q"].oldest_queued_time is not None
    assert (queues["empty"].queued, queues["empty"].paused) == (0, True)
    assert queues["empty"].oldest_queued_time is None


async def test_next_due_time_leaves_out_what_the_claim_would_not_take(connector: Connector) -> None:
    await connector.enqueue(Request(id="a", type="other", queue="q"))
    assert await connector.next_due_time(types=["mine"]) is None
    assert await connector.next_due_time(queues=["elsewhere"]) is None
    assert await connector.next_due_time(types=["other"], queues=["q"]) is not None


# -- concurrency -------------------------------------------------------------------------


async def test_concurrency_limits_running_jobs_per_key(connector: Connector) -> None:
    listener = Listener()
    connector.add_listener(listener)
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=2))
    for i in range(5):
        await submit(connector, f"a{i}", policy, tenant="a")
    await submit(connector, "b0", policy, tenant="b")
    await submit(connector, "none", policy)  # no entry: the empty key
    claims = await connector.claim("w", limit=10)
    assert [c.job.request.id for c in claims] == ["a0", "a1", "b0", "none"]
    assert await claim_ids(connector) == []
    assert await connector.next_due_time() is None  # held back: woken by an end, not by time
    assert (await connector.held_back())["concurrency"] == 3
    before = listener.work
    await finish(connector, claims[0])
    assert listener.work > before  # the end of a0 frees a place
    assert await claim_ids(connector) == ["a2"]
    assert (await connector.get("a3")).state is S.CREATED


async def test_a_job_handed_back_frees_its_place(connector: Connector) -> None:
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=1))
    await submit(connector, "a0", policy, tenant="a")
    await submit(connector, "a1", policy, tenant="a")
    [claim] = await connector.claim("w", limit=5)
    error = ErrorStatus(Code.UNAVAILABLE, "try again")
    await connector.respond("a0", Update(S.CREATED, error=error), claim.lease_token)
    assert await claim_ids(connector) == ["a0"]  # still first in submit order


async def test_concurrency_limits_are_per_type(connector: Connector) -> None:
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=1))
    for kind in ("x", "y"):
        request = Request(id=kind, type=kind, data={"tenant": "a"})
        await connector.enqueue(request, 1, policy.flow(request))
    assert sorted(await claim_ids(connector)) == ["x", "y"]


async def test_concurrent_claims_never_pass_the_limit(connector: Connector) -> None:
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=2))
    for i in range(20):
        await submit(connector, f"a{i}", policy, tenant="a")
    results = await asyncio.gather(*(connector.claim(f"w{n}", limit=3) for n in range(6)))
    assert sum(len(claims) for claims in results) == 2


# -- order -------------------------------------------------------------------------------


async def test_ordered_jobs_start_one_at_a_time_in_submit_order(connector: Connector) -> None:
    policy = FlowPolicy(ordered_by="account")
    for i in range(3):
        await submit(connector, f"a{i}", policy, account="a")
        await submit(connector, f"b{i}", policy, account="b")
    claims = await connector.claim("w", limit=10)
    assert [c.job.request.id for c in claims] == ["a0", "b0"]
    assert (await connector.held_back())["ordered"] == 4
    await finish(connector, claims[1])
    assert await claim_ids(connector) == ["b1"]


async def test_a_retried_ordered_job_holds_its_place(connector: Connector, clock: FakeClock) -> None:
    policy = FlowPolicy(ordered_by="account")
    await submit(connector, "a0", policy, account="a")
    await submit(connector, "a1", policy, account="a")
    [claim] = await connector.claim("w", limit=5)
    error = ErrorStatus(Code.UNAVAILABLE, "flaky")
    later = clock() + timedelta(seconds=10)
    await connector.respond("a0", Update(S.CREATED, error=error, run_after=later), claim.lease_token)
    assert await claim_ids(connector) == []  # a1 waits for a0's retry
    clock.advance(11)
    [again] = await connector.claim("w", limit=5)
    assert again.job.request.id == "a0"
    assert again.job.attempt == 2
    await finish(connector, again)
    assert await claim_ids(connector) == ["a1"]


async def test_cancelling_the_first_ordered_job_lets_the_next_start(connector: Connector) -> None:
    policy = FlowPolicy(ordered_by="account")
    await submit(connector, "a0", policy, account="a")
    await submit(connector, "a1", policy, account="a")
    await connector.set_paused("default", True)
    await connector.cancel("a0")
    await connector.set_paused("default", False)
    assert await claim_ids(connector) == ["a1"]


# -- rate --------------------------------------------------------------------------------


async def test_rate_limit_is_a_token_bucket_per_key(connector: Connector, clock: FakeClock) -> None:
    policy = FlowPolicy(rate_limit=RateLimit("endpoint", rate=2, per="1s", burst=3))
    for i in range(10):
        await submit(connector, f"e{i}", policy, endpoint="x")
    await submit(connector, "y0", policy, endpoint="y")
    first = await claim_ids(connector, limit=20)
    assert first == ["e0", "e1", "e2", "y0"]  # the burst, and another key's own bucket
    assert await claim_ids(connector, limit=20) == []
    assert (await connector.held_back())["rate_limit"] == 7
    due = await connector.next_due_time()
    assert due is not None
    assert 0.3 <= (due - clock()).total_seconds() <= 0.6
    clock.advance(0.6)
    refilled = await connector.next_due_time()  # a token is back: due now, not "wait to be told"
    assert refilled is not None
    assert refilled <= clock()
    assert await claim_ids(connector, limit=20) == ["e3"]
    clock.advance(10)  # a long idle time fills the bucket only up to the burst
    assert await claim_ids(connector, limit=20) == ["e4", "e5", "e6"]


# -- unique ------------------------------------------------------------------------------


async def test_unique_answers_the_job_in_the_states(connector: Connector) -> None:
    policy = FlowPolicy(unique=Unique("report"))
    _first, created = await submit(connector, "r1", policy, report="daily")
    assert created
    again, created = await submit(connector, "r2", policy, report="daily")
    assert not created
    assert again.request.id == "r1"
    _other, created = await submit(connector, "r3", policy, report="weekly")
    assert created
    [claim] = [c for c in await connector.claim("w", limit=5) if c.job.request.id == "r1"]
    _, created = await submit(connector, "r4", policy, report="daily")
    assert not created  # still running
    await finish(connector, claim)
    job, created = await submit(connector, "r5", policy, report="daily")
    assert created
    assert job.request.id == "r5"


async def test_unique_ttl_matches_ended_jobs_within_it(connector: Connector, clock: FakeClock) -> None:
    policy = FlowPolicy(unique=Unique("report", states=JobStates(0), ttl="1h"))
    await submit(connector, "r1", policy, report="daily")
    [claim] = await connector.claim("w")
    await finish(connector, claim)
    job, created = await submit(connector, "r2", policy, report="daily")
    assert not created
    assert job.request.id == "r1"
    clock.advance(3601)
    _, created = await submit(connector, "r3", policy, report="daily")
    assert created


async def test_unique_within_a_batch_and_concurrently(connector: Connector) -> None:
    policy = FlowPolicy(unique=Unique("report"))
    requests = [Request(id=f"b{i}", type="flow", data={"report": "x"}) for i in range(3)]
    results = await connector.enqueue_many([Submit(r, 1, policy.flow(r)) for r in requests])
    assert [(job.request.id, created) for job, created in results] == [("b0", True), ("b0", False), ("b0", False)]
    answers = await asyncio.gather(*(submit(connector, f"c{i}", policy, report="y") for i in range(20)))
    assert sum(created for _, created in answers) == 1
    assert len({job.request.id for job, _ in answers}) == 1


async def test_priority_holds_across_jobs_with_and_without_policies(connector: Connector) -> None:
    # A job with a policy is not starved by a stream of plain jobs, nor taken before better plain ones.
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=5))
    for i in range(5):
        await connector.enqueue(Request(id=f"p{i}", type="t"))
    urgent = Request(id="urgent", type="flow", priority=100)
    await connector.enqueue(urgent, 1, policy.flow(urgent))
    assert await claim_ids(connector, limit=1) == ["urgent"]
    late = Request(id="late", type="flow", priority=-1)
    await connector.enqueue(late, 1, policy.flow(late))
    await connector.enqueue(Request(id="top", type="t", priority=50))
    assert await claim_ids(connector, limit=3) == ["top", "p0", "p1"]
    assert sorted(await claim_ids(connector, limit=10)) == ["late", "p2", "p3", "p4"]


async def test_a_held_back_job_leaves_its_place_to_plain_jobs(connector: Connector) -> None:
    policy = FlowPolicy(concurrency=Concurrency("tenant", limit=1))
    for name in ("g0", "g1"):
        request = Request(id=name, type="flow", data={"tenant": "a"}, priority=10)
        await connector.enqueue(request, 1, policy.flow(request))
    await connector.enqueue(Request(id="p0", type="t"))
    assert await claim_ids(connector, limit=1) == ["g0"]
    assert await claim_ids(connector, limit=1) == ["p0"]  # g1 waits for g0; p0 does not wait for g1


async def test_unique_keys_are_per_principal(connector: Connector) -> None:
    policy = FlowPolicy(unique=Unique("report"))
    mine = Request(id="a1", type="flow", data={"report": "x"}, creator="alice")
    theirs = Request(id="b1", type="flow", data={"report": "x"}, creator="bob")
    assert (await connector.enqueue(mine, 1, policy.flow(mine)))[1]
    assert (await connector.enqueue(theirs, 1, policy.flow(theirs)))[1]
