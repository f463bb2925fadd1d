"""The dispatcher: claiming without polling, the concurrency limit, outcomes, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import pytest

from ajs_grpc.connectors.base import Claim, Renewal
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import Code, ConnectorError, Unavailable
from ajs_grpc.core.flow import Concurrency, FlowPolicy
from ajs_grpc.core.model import Request, RequestState, Response, Update, now
from ajs_grpc.edge.metrics import Metrics
from ajs_grpc.engine.dispatcher import Dispatcher
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from tests import jobs_for_tests
from tests.helpers import FakeClock, eventually

S = RequestState


@pytest.fixture
async def connector() -> MemoryConnector:
    return MemoryConnector()


@pytest.fixture
async def dispatcher(connector: MemoryConnector) -> AsyncIterator[Dispatcher]:
    running = Dispatcher(connector, jobs_for_tests.chain(), max_concurrent_jobs=2, cancel_grace=0.2, shutdown_grace=0.2)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def submit(connector: MemoryConnector, request_id: str, type_: str, **data: str) -> None:
    await connector.enqueue(Request(id=request_id, type=type_, data=data))


async def final(connector: MemoryConnector, request_id: str) -> Response:
    responses = [r async for r in connector.watch(request_id)]
    return responses[-1]


async def wait_running(dispatcher: Dispatcher, request_id: str) -> None:
    await eventually(lambda: request_id in dispatcher.running)


async def test_a_job_starts_within_a_few_loop_turns_no_poll(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await asyncio.sleep(0)  # let the dispatcher go idle
    request_id = f"quick-{uuid.uuid4()}"
    await submit(connector, request_id, "noop")
    # No timer may be involved: yielding to the loop a few times must be enough.
    for _ in range(10):
        if request_id in jobs_for_tests.started:
            break
        await asyncio.sleep(0)
    assert request_id in jobs_for_tests.started


async def test_returned_data_finishes_the_job(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "echo", k="v")
    last = await final(connector, "a")
    assert last.state is S.FINISHED
    assert dict(last.data) == {"k": "v"}


async def test_progress_becomes_intermediate_responses(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "steps", n="3")
    responses = [r async for r in connector.watch("a")]
    assert [r.state for r in responses] == [S.CREATED, S.PENDING, S.PENDING, S.PENDING, S.PENDING, S.FINISHED]
    assert [r.progress.fraction for r in responses[2:5] if r.progress] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert dict(responses[-1].data) == {"steps": "3", "attempt": "1"}


async def test_a_raising_job_fails_with_its_message(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "boom", message="disk on fire")
    last = await final(connector, "a")
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.message == "disk on fire"
    assert last.error.reason == "JOB_FAILED"
    assert last.error.metadata["exception"] == "ValueError"


async def test_a_bad_return_value_fails_clearly(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "bad_return")
    last = await final(connector, "a")
    assert last.state is S.FAILED
    assert last.error is not None
    assert "str to str" in last.error.message


async def test_a_type_the_chain_does_not_run_is_left_for_a_dispatcher_that_does(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    # Instances share a queue: a worker without a type's plugin must not claim (and fail) its jobs.
    await submit(connector, "elsewhere", "runs-on-another-worker")
    await submit(connector, "here", "echo", k="v")
    assert (await final(connector, "here")).state is S.FINISHED
    job = await connector.get("elsewhere")
    assert (job.state, job.attempt) == (S.CREATED, 0)
    assert "runs-on-another-worker" not in dispatcher.types
    [claim] = await connector.claim("another-worker", types=["runs-on-another-worker"])
    assert claim.job.request.id == "elsewhere"


async def test_plain_functions_run_in_threads_and_report_progress(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit(connector, "a", "sync_steps")
    responses = [r async for r in connector.watch("a")]
    assert [r.progress.message for r in responses if r.progress] == ["sync step 1", "sync step 2", "sync step 3"]
    assert responses[-1].state is S.FINISHED
    assert responses[-1].data["thread"].startswith("ajs-job")


async def test_never_more_than_max_concurrent_jobs(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    for i in range(5):
        await submit(connector, f"b{i}", "block")
    await eventually(lambda: len(dispatcher.running) == 2)
    assert len(dispatcher.running) == 2
    assert [(await connector.get(f"b{i}")).state for i in range(5)] == [S.PENDING] * 2 + [S.CREATED] * 3
    # Ending one job frees a slot for the next in line.
    await connector.cancel("b0")
    await final(connector, "b0")
    await wait_running(dispatcher, "b2")
    assert len(dispatcher.running) == 2
    for i in range(1, 5):
        await connector.cancel(f"b{i}")


async def test_cancel_signals_a_running_job_which_ends_cancelled(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit(connector, "a", "block")
    await wait_running(dispatcher, "a")
    await connector.cancel("a")
    last = await final(connector, "a")
    assert last.state is S.CANCELLED
    assert last.error is not None
    assert last.error.code is Code.CANCELLED


async def test_cancel_reaches_a_thread_job(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "sync_block")
    await wait_running(dispatcher, "a")
    await connector.cancel("a")
    assert (await final(connector, "a")).state is S.CANCELLED


async def test_a_job_ignoring_cancellation_is_stopped_after_the_grace_period(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit(connector, "a", "stubborn")
    await wait_running(dispatcher, "a")
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await connector.cancel("a")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.CANCELLED
    assert loop.time() - asked >= dispatcher.cancel_grace
    assert "a" not in dispatcher.running


async def test_a_job_swallowing_cancellation_is_abandoned(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "immortal")
    await wait_running(dispatcher, "a")
    await connector.cancel("a")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.CANCELLED
    assert last.error is not None
    assert "abandoned" in last.error.message
    assert "a" not in dispatcher.running
    # Its slot is free again.
    await submit(connector, "b", "echo")
    assert (await asyncio.wait_for(final(connector, "b"), 5)).state is S.FINISHED
    # The abandoned task is still known to the dispatcher; let it end now.
    assert len(dispatcher.abandoned) == 1
    jobs_for_tests.mortal_again.set()
    for task in list(dispatcher.abandoned):
        task.cancel()
    await eventually(lambda: not dispatcher.abandoned)
    assert not dispatcher.abandoned


async def test_stop_hands_unfinished_jobs_back_to_the_queue(connector: MemoryConnector) -> None:
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), cancel_grace=0.1, shutdown_grace=0.1)
    await dispatcher.start()
    await submit(connector, "stubborn", "stubborn")
    await submit(connector, "steps", "steps", n="2", sleep="0.01")
    await wait_running(dispatcher, "stubborn")
    await dispatcher.stop()
    assert not dispatcher.running
    assert (await connector.get("steps")).state is S.FINISHED  # finished within the grace period
    handed_back = await connector.get("stubborn")
    assert handed_back.state is S.CREATED
    assert not handed_back.is_final
    assert "shutting down" in handed_back.last_response.data["reason"]
    # Nothing is claimed after stop.
    await submit(connector, "late", "echo")
    await asyncio.sleep(0.02)
    assert (await connector.get("late")).state is S.CREATED


async def test_max_concurrent_jobs_must_be_positive(connector: MemoryConnector) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Dispatcher(connector, jobs_for_tests.chain(), max_concurrent_jobs=0)


# -- retries, timeouts, scheduling, leases ------------------------------------------


async def submit_with_policy(connector: MemoryConnector, request_id: str, type_: str, **data: str) -> None:
    attempts = jobs_for_tests.chain().max_attempts(type_)
    await connector.enqueue(Request(id=request_id, type=type_, data=data), attempts)


async def test_a_failing_job_is_retried_with_backoff_until_it_succeeds(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit_with_policy(connector, "a", "flaky", succeed_on="3")
    responses = [r async for r in connector.watch("a")]
    states = [r.state for r in responses]
    assert states == [S.CREATED, S.PENDING, S.CREATED, S.PENDING, S.CREATED, S.PENDING, S.FINISHED]
    retries = [r for r in responses if r.state is S.CREATED and r.sequence > 1]
    assert [r.error.message for r in retries if r.error] == ["attempt 1 failed", "attempt 2 failed"]
    waits = [float(r.data["retry_in_seconds"]) for r in retries]
    assert waits == [0.05, 0.1]  # exponential, no jitter in this policy
    # Each retry waited its backoff before the next claim.
    for retry, next_claim in zip(retries, [responses[3], responses[5]], strict=True):
        assert (next_claim.create_time - retry.create_time).total_seconds() >= float(retry.data["retry_in_seconds"])
    assert dict(responses[-1].data) == {"attempt": "3"}
    assert (await connector.get("a")).attempt == 3


async def test_a_job_fails_once_it_used_its_attempts(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit_with_policy(connector, "a", "flaky", succeed_on="10")
    responses = [r async for r in connector.watch("a")]
    assert responses[-1].state is S.FAILED
    assert responses[-1].error is not None
    assert responses[-1].error.message == "attempt 3 failed"
    assert sum(r.state is S.PENDING for r in responses) == 3


async def test_permanent_errors_and_unlisted_errors_are_not_retried(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit_with_policy(connector, "p", "permanent")
    await submit_with_policy(connector, "k", "only_value_errors", error="KeyError")
    await submit_with_policy(connector, "v", "only_value_errors", error="ValueError")
    for request_id, attempts in (("p", 1), ("k", 1), ("v", 3)):
        last = await final(connector, request_id)
        assert last.state is S.FAILED
        assert (await connector.get(request_id)).attempt == attempts, request_id


async def test_a_job_may_ask_for_a_retry_with_its_own_delay(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit_with_policy(connector, "a", "ask_retry", delay="0.2")
    responses = [r async for r in connector.watch("a")]
    retry = responses[2]
    assert retry.state is S.CREATED
    assert retry.error is not None
    assert retry.error.reason == "RETRY_REQUESTED"
    assert retry.data["retry_in_seconds"] == "0.200"
    assert (responses[3].create_time - retry.create_time).total_seconds() >= 0.2
    assert responses[-1].state is S.FINISHED


async def test_a_job_past_its_timeout_fails_deadline_exceeded_and_is_retried(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit_with_policy(connector, "a", "slow", fast_on="2")
    responses = [r async for r in connector.watch("a")]
    timed_out = responses[2]
    assert timed_out.state is S.CREATED
    assert timed_out.error is not None
    assert timed_out.error.code is Code.DEADLINE_EXCEEDED
    assert "timeout" in timed_out.error.message
    assert responses[-1].state is S.FINISHED
    assert dict(responses[-1].data) == {"attempt": "2"}


async def test_a_timed_out_job_with_no_attempts_left_fails(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit_with_policy(connector, "a", "slow")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.code is Code.DEADLINE_EXCEEDED
    assert (await connector.get("a")).attempt == 3


async def test_a_timed_out_job_that_ignores_the_signal_is_still_stopped(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit_with_policy(connector, "a", "slow_stubborn")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.code is Code.DEADLINE_EXCEEDED


async def test_delayed_job_runs_when_due_without_polling(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    due = now() + timedelta(seconds=0.3)
    await connector.enqueue(Request(id="later", type="noop", run_after=due))
    await asyncio.sleep(0.1)
    assert (await connector.get("later")).state is S.CREATED
    responses = [r async for r in connector.watch("later")]
    started = responses[1].create_time
    assert started >= due
    assert (started - due).total_seconds() < 1.0  # woken by its due time, not by a later event


async def test_priorities_decide_the_order_when_slots_are_scarce(connector: MemoryConnector) -> None:
    for name, priority in (("low", -1), ("normal", 0), ("high", 5)):
        await connector.enqueue(Request(id=name, type="noop", priority=priority))
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), max_concurrent_jobs=1)
    await dispatcher.start()
    try:
        for name in ("low", "normal", "high"):
            await final(connector, name)
    finally:
        await dispatcher.stop()
    starts = {name: jobs_for_tests.started[name] for name in ("low", "normal", "high")}
    assert sorted(starts, key=starts.__getitem__) == ["high", "normal", "low"]


async def test_leases_are_renewed_while_a_job_runs(connector: MemoryConnector) -> None:
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), lease=0.15, cancel_grace=0.1, shutdown_grace=0.1)
    await dispatcher.start()
    try:
        await submit_with_policy(connector, "a", "block")
        await wait_running(dispatcher, "a")
        await asyncio.sleep(0.5)  # several lease periods
        assert await connector.recover_expired() == 0
        assert (await connector.get("a")).state is S.PENDING
        await connector.cancel("a")
        assert (await final(connector, "a")).state is S.CANCELLED
    finally:
        await dispatcher.stop()


async def test_a_job_whose_lease_was_lost_is_stopped_without_writing(connector: MemoryConnector) -> None:
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), lease=0.15, cancel_grace=0.1, shutdown_grace=0.1)
    await dispatcher.start()
    try:
        await submit_with_policy(connector, "a", "block")
        await wait_running(dispatcher, "a")
        # Another server took the job over: its lease token is no longer ours.
        connector._entries["a"].lease_token = "another-servers-token"
        await eventually(lambda: "a" not in dispatcher.running, within=2)
        job = await connector.get("a")
        assert job.state is S.PENDING  # the dispatcher wrote nothing: the job is not its own
        assert job.last_response.sequence == 2
    finally:
        await dispatcher.stop()


async def test_start_recovers_jobs_whose_server_died(clock: FakeClock) -> None:
    connector = MemoryConnector(clock=clock)
    await connector.enqueue(Request(id="orphan", type="echo"), max_attempts=2)
    await connector.claim("dead-server", lease=0.01)
    clock.advance(0.02)
    dispatcher = Dispatcher(connector, jobs_for_tests.chain())
    await dispatcher.start()
    try:
        responses = [r async for r in connector.watch("orphan")]
        assert [r.state for r in responses] == [S.CREATED, S.PENDING, S.CREATED, S.PENDING, S.FINISHED]
        assert responses[3].data["worker"] == dispatcher.worker_id
    finally:
        await dispatcher.stop()


async def test_retention_prunes_old_ended_jobs(connector: MemoryConnector) -> None:
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), retention=0.05, housekeeping_interval=0.05)
    await dispatcher.start()
    try:
        await submit(connector, "old", "echo")
        await final(connector, "old")
        await submit(connector, "open", "block")
        await eventually(lambda: "old" not in connector._entries, within=2)
        assert (await connector.get("open")).state is S.PENDING
        await connector.cancel("open")
    finally:
        await dispatcher.stop()


# -- what the review found ------------------------------------------------------------


async def test_an_unstorable_result_fails_the_job(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "bad_output")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.FAILED
    assert last.error is not None
    assert "protobuf message" in last.error.message


async def test_a_task_cancelled_from_within_fails_rather_than_passing_for_a_client_cancel(
    connector: MemoryConnector, dispatcher: Dispatcher
) -> None:
    await submit(connector, "a", "self_cancel")
    last = await asyncio.wait_for(final(connector, "a"), 5)
    assert last.state is S.FAILED
    assert last.error is not None
    assert "cancelled from within" in last.error.message


async def test_a_client_cancel_during_shutdown_wins_over_handing_back(connector: MemoryConnector) -> None:
    dispatcher = Dispatcher(connector, jobs_for_tests.chain(), cancel_grace=0.3, shutdown_grace=0.05)
    await dispatcher.start()
    await connector.enqueue(Request(id="a", type="stubborn"), max_attempts=5)
    await wait_running(dispatcher, "a")
    stopping = asyncio.create_task(dispatcher.stop())
    await asyncio.sleep(0.1)  # the shutdown grace is over: the job is being stopped
    await connector.cancel("a")
    await stopping
    job = await connector.get("a")
    assert job.state is S.CANCELLED
    assert await connector.claim("next-life") == []


async def test_an_abandoned_thread_does_not_hold_up_later_thread_jobs(connector: MemoryConnector) -> None:
    handler = InternalAsyncRequestHandler(max_threads=1)
    for plugin in (jobs_for_tests.sync_deaf, jobs_for_tests.sync_steps):
        handler.register(plugin)
    chain = HandlerChain([handler], RejectRequestHandler())
    dispatcher = Dispatcher(connector, chain, cancel_grace=0.05, shutdown_grace=0.1)
    await dispatcher.start()
    try:
        await submit(connector, "deaf", "sync_deaf")
        await wait_running(dispatcher, "deaf")
        await connector.cancel("deaf")
        assert (await asyncio.wait_for(final(connector, "deaf"), 5)).state is S.CANCELLED
        await submit(connector, "next", "sync_steps")
        assert (await asyncio.wait_for(final(connector, "next"), 2)).state is S.FINISHED
    finally:
        jobs_for_tests.deaf_release.set()
        await dispatcher.stop()
        await chain.close()


async def test_abandoned_threads_hold_their_slots_until_they_end(connector: MemoryConnector) -> None:
    # A thread cannot be stopped: repeated cancels of a job that ignores them must not
    # grow threads without bound. Each abandoned thread holds a slot of max_jobs.
    jobs_for_tests.deaf_release.clear()
    observed = Metrics(known_types=["sync_deaf", "echo"])
    chain = jobs_for_tests.chain([jobs_for_tests.sync_deaf, jobs_for_tests.echo])
    dispatcher = Dispatcher(connector, chain, max_concurrent_jobs=2, cancel_grace=0.05, shutdown_grace=0.1)
    observed.watch(lambda: len(dispatcher.running), lambda: 0, lambda: dispatcher.abandoned_count)
    threads_before = threading.active_count()
    await dispatcher.start()
    try:
        for name in ("deaf-1", "deaf-2"):
            await submit(connector, name, "sync_deaf")
        await eventually(lambda: len(dispatcher.running) == 2)
        for name in ("deaf-1", "deaf-2"):
            await connector.cancel(name)
            assert (await asyncio.wait_for(final(connector, name), 5)).state is S.CANCELLED
        assert dispatcher.abandoned_count == 2
        assert observed.registry.get_sample_value("ajs_jobs_abandoned") == 2
        # Both slots are held: more deaf jobs and an echo wait in the queue.
        for name in ("deaf-3", "deaf-4"):
            await submit(connector, name, "sync_deaf")
        await submit(connector, "later", "echo")
        await asyncio.sleep(0.2)
        assert [(await connector.get(n)).state for n in ("deaf-3", "deaf-4", "later")] == [S.CREATED] * 3
        assert threading.active_count() - threads_before <= 2
        # The threads end: their slots are free, and the queue moves on by itself.
        jobs_for_tests.deaf_release.set()
        assert (await asyncio.wait_for(final(connector, "later"), 5)).state is S.FINISHED
        await eventually(lambda: dispatcher.abandoned_count == 0)
    finally:
        jobs_for_tests.deaf_release.set()
        await dispatcher.stop()
        await chain.close()


class StoreAwayForFinals(MemoryConnector):
    """A store whose final writes fail UNAVAILABLE for a while, before or after they are stored.

    "After" is a connection that died during COMMIT: the write was stored, its caller cannot know.
    """

    def __init__(self, away_for: float, stored_anyway: bool) -> None:
        super().__init__()
        self.away_for = away_for
        self.stored_anyway = stored_anyway
        self.failed = 0
        self._since: float | None = None

    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        loop = asyncio.get_running_loop()
        if update.state.is_final:
            self._since = self._since or loop.time()
            if loop.time() - self._since < self.away_for:
                self.failed += 1
                if self.stored_anyway:
                    await super().respond(request_id, update, lease_token)
                raise Unavailable("the connection died during COMMIT", reason="STORAGE_UNAVAILABLE")
        return await super().respond(request_id, update, lease_token)


@pytest.mark.parametrize("stored_anyway", [False, True], ids=["store-away", "reply-lost"])
async def test_a_final_response_is_retried_until_stored_or_found_stored(stored_anyway: bool) -> None:
    # The store is away for longer than half a lease: the final Response must not be
    # dropped (the job would run again after its lease), nor stored twice.
    store = StoreAwayForFinals(away_for=1.5, stored_anyway=stored_anyway)
    dispatcher = Dispatcher(store, jobs_for_tests.chain(), lease=1.0, cancel_grace=0.2, shutdown_grace=0.2)
    await dispatcher.start()
    try:
        await submit(store, "once", "steps", n="1")
        responses = await asyncio.wait_for(_all_responses(store, "once"), 10)
        # Long enough for a dropped final to have been recovered and run again.
        await asyncio.sleep(1.5)
        job = await store.get("once")
    finally:
        await dispatcher.stop()
    assert store.failed >= (1 if stored_anyway else 3)
    assert [r.state for r in responses] == [S.CREATED, S.PENDING, S.PENDING, S.FINISHED]
    assert job.state is S.FINISHED
    assert job.attempt == 1
    assert len(await store.responses("once", 0, 100)) == 4


class RefusesFinished(MemoryConnector):
    """A store that refuses a FINISHED Response for what it holds (as PostgreSQL refuses some data)."""

    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        if update.state is S.FINISHED:
            raise ConnectorError("could not write to the queue: invalid byte sequence", reason="STORAGE_ERROR")
        return await super().respond(request_id, update, lease_token)


async def test_a_result_the_store_refuses_ends_the_job_failed_not_again() -> None:
    store = RefusesFinished()
    dispatcher = Dispatcher(store, jobs_for_tests.chain(), lease=1.0)
    await dispatcher.start()
    try:
        await submit(store, "refused", "echo", k="v")
        last = await asyncio.wait_for(final(store, "refused"), 5)
    finally:
        await dispatcher.stop()
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.reason == "RESULT_NOT_STORED"
    assert "invalid byte sequence" in last.error.message


async def _all_responses(connector: MemoryConnector, request_id: str) -> list[Response]:
    return [r async for r in connector.watch(request_id)]


class SlowFinalReplies(MemoryConnector):
    """A store whose reply to a final Response comes only after a lease renewal ran (a slow commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.final_stored = asyncio.Event()
        self.renewed_after = asyncio.Event()

    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        response = await super().respond(request_id, update, lease_token)
        if update.state.is_final:
            self.final_stored.set()
            await asyncio.wait_for(self.renewed_after.wait(), 5)
        return response

    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        renewal = await super().renew(leases, lease)
        if self.final_stored.is_set():
            self.renewed_after.set()
        return renewal


async def test_a_job_ending_while_its_lease_is_renewed_is_not_reported_lost(caplog: pytest.LogCaptureFixture) -> None:
    store = SlowFinalReplies()
    dispatcher = Dispatcher(store, jobs_for_tests.chain(), lease=0.3)
    await dispatcher.start()
    try:
        await submit(store, "ends", "echo")
        last = await asyncio.wait_for(final(store, "ends"), 5)
        await eventually(lambda: "ends" not in dispatcher.running)
    finally:
        await dispatcher.stop()
    assert last.state is S.FINISHED
    assert store.renewed_after.is_set()  # the renewal did find the lease released
    assert not [r for r in caplog.records if "lost the lease" in r.getMessage()]


async def test_jobs_held_back_by_a_policy_wait_without_claiming_in_a_loop(connector: MemoryConnector) -> None:
    # Two slots, one key at concurrency 1: the second job waits for the first to end,
    # and the dispatcher sleeps meanwhile (a held-back job is not due until the end wakes it).
    claims = 0
    claim = connector.claim

    async def counted(*args: object, **kwargs: object) -> list[Claim]:
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)  # type: ignore[arg-type]

    connector.claim = counted  # type: ignore[method-assign]
    running = Dispatcher(connector, jobs_for_tests.chain(), max_concurrent_jobs=2, cancel_grace=0.2)
    await running.start()
    try:
        policy = FlowPolicy(concurrency=Concurrency("tenant", limit=1))
        for name in ("first", "second"):
            request = Request(id=name, type="block", data={"tenant": "t"})
            await connector.enqueue(request, 1, policy.flow(request))
        await wait_running(running, "first")
        settled = claims
        await asyncio.sleep(0.3)  # a negative: nothing may happen during it
        assert claims <= settled + 1
        assert running.running == {"first"}
        await connector.cancel("first")
        await eventually(lambda: "second" in running.running)
        await connector.cancel("second")
    finally:
        await running.stop()
