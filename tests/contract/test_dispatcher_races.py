"""Dispatcher races found in review, run on every connector (they differ in how they deliver events)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

from ajs_grpc.connectors.base import Claim, Connector, Renewal
from ajs_grpc.core.model import Request, RequestState, Response
from ajs_grpc.engine.dispatcher import Dispatcher
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.jobs import JobContext, JobPlugin, RetryPolicy
from tests.helpers import eventually

runs: list[tuple[str, int]] = []


async def polite(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Runs 1.5 s unless cancelled, and then returns (it does not raise)."""
    runs.append((request.id, ctx.attempt))
    for _ in range(30):
        if ctx.cancelled:
            return {"stopped": "yes"}
        await asyncio.sleep(0.05)
    return {"done": "yes"}


def chain(max_attempts: int = 3) -> HandlerChain:
    handler = InternalAsyncRequestHandler()
    handler.register(JobPlugin("polite", polite, retry=RetryPolicy(max_attempts=max_attempts, initial_backoff=0)))
    return HandlerChain([handler], RejectRequestHandler())


async def final(connector: Connector, request_id: str) -> Response:
    return [r async for r in connector.watch(request_id)][-1]


async def test_a_cancel_committed_with_the_claim_still_reaches_the_job(connector: Connector) -> None:
    # When a claim and a cancel of its job share one commit (SQLite and PostgreSQL group
    # commits), the cancel's notice reaches the dispatcher before the claim's reply does.
    # Made certain on every connector: the job is cancelled after its claim is stored and
    # before the dispatcher hears of the claim.
    claim = connector.claim
    cancelled: list[str] = []

    async def claim_then_cancel(
        worker: str,
        *,
        limit: int = 1,
        lease: float = 30.0,
        types: Collection[str] | None = None,
        queues: Collection[str] | None = None,
    ) -> list[Claim]:
        claims = await claim(worker, limit=limit, lease=lease, types=types, queues=queues)
        for held in claims:
            if held.job.request.id == "a" and not cancelled:
                await connector.cancel("a")
                cancelled.append("a")
        return claims

    connector.claim = claim_then_cancel  # type: ignore[method-assign]
    dispatcher = Dispatcher(connector, chain(), cancel_grace=0.2, shutdown_grace=0.2)
    await dispatcher.start()
    try:
        await connector.enqueue(Request(id="a", type="polite"))
        last = await asyncio.wait_for(final(connector, "a"), 5)
        assert cancelled == ["a"]  # the race was staged
        assert last.state is RequestState.CANCELLED
    finally:
        await dispatcher.stop()


async def test_a_job_is_never_run_twice_at_once_by_one_dispatcher(connector: Connector) -> None:
    """Renewals fail for longer than a lease: the job is recovered and claimed again;
    the earlier run must have been stopped by then."""
    runs.clear()

    async def failing_renew(leases: Mapping[str, str], lease: float) -> Renewal:
        raise RuntimeError("storage busy")

    connector.renew = failing_renew  # type: ignore[method-assign]
    dispatcher = Dispatcher(connector, chain(), lease=0.3, cancel_grace=0.1, shutdown_grace=0.1)
    await dispatcher.start()
    try:
        await connector.enqueue(Request(id="a", type="polite"), max_attempts=3)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        most = 0
        while loop.time() < deadline:
            most = max(most, sum(1 for task in dispatcher._runners if not task.done()))
            await asyncio.sleep(0.01)
        assert most == 1, f"{most} runs of one job at once; attempts {runs}"
        assert len(runs) >= 2  # it was recovered and ran again
    finally:
        await dispatcher.stop()


async def test_shutdown_hand_backs_do_not_use_up_attempts(connector: Connector) -> None:
    runs.clear()
    await connector.enqueue(Request(id="a", type="polite"), max_attempts=1)
    for _ in range(3):
        dispatcher = Dispatcher(connector, chain(max_attempts=1), cancel_grace=0.1, shutdown_grace=0.05)
        await dispatcher.start()
        await eventually(lambda: bool(dispatcher.running))  # noqa: B023 - used at once
        await dispatcher.stop()
        job = await connector.get("a")
        assert job.state is RequestState.CREATED
        assert job.attempt == 0
    assert [attempt for _, attempt in runs] == [1, 1, 1]
