"""The dispatcher: claiming without polling, the concurrency limit, outcomes, cancellation, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.dispatcher import Dispatcher
from ajs_grpc.errors import Code
from ajs_grpc.model import Request, RequestState, Response
from tests import jobs_for_tests
from tests.helpers import eventually

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
    await submit(connector, "a", "noop")
    # No timer may be involved: yielding to the loop a few times must be enough.
    for _ in range(10):
        if "a" in jobs_for_tests.started:
            break
        await asyncio.sleep(0)
    assert "a" in jobs_for_tests.started


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


async def test_unknown_type_is_rejected_by_the_last_handler(connector: MemoryConnector, dispatcher: Dispatcher) -> None:
    await submit(connector, "a", "no-such-type")
    last = await final(connector, "a")
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.message == "requests of type 'no-such-type' are not supported"
    assert last.error.code is Code.UNIMPLEMENTED


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
    await asyncio.sleep(0.05)
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
    await asyncio.sleep(0.01)
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
