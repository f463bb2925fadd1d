"""Remote workers at the edges: races around registration, drain and credit, wild outcomes (from a review)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.flow import Concurrency, FlowPolicy
from ajs_grpc.core.jobs import JobContext, JobPlugin, RetryPolicy
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import ANONYMOUS
from ajs_grpc.edge.pipeline import Caller
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.engine.handlers.remote import WorkerSession, runs_remotely
from ajs_grpc.proto.ajs.v1 import worker_service_pb2 as wpb
from ajs_grpc.proto.ajs.v1 import worker_service_pb2_grpc as wpb_grpc
from ajs_grpc.proto.ajs.v1.job_service_pb2 import WatchJobRequest
from ajs_grpc.proto.ajs.v1.job_service_pb2_grpc import JobServiceStub
from tests.e2e import test_remote_workers as shared
from tests.e2e.test_remote_workers import (
    REVERSE,
    Gate,
    client,
    ended,
    gate,
    held,
    reason_of,
    register,
    remote_chain,
    server,
    serving,
    working,
)
from tests.helpers import eventually

__all__ = ["client", "gate", "server"]  # the shared fixtures (gate: autouse)


def GATE_OF() -> Gate:  # noqa: N802 - the shared jobs' gate, reset per test by the fixture
    return shared.GATE


async def settle(read: Callable[[], Awaitable[T]], check: Callable[[T], bool], within: float = 5.0) -> T:
    """Reads until ``check`` holds or ``within`` passed; returns the last read (the test asserts on it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check(value := await read()) and loop.time() < deadline:  # noqa: ASYNC110 - polls a store
        await asyncio.sleep(0.01)
    return value


S = RequestState
T = TypeVar("T")


async def _now(value: T) -> T:
    return value


async def test_a_request_timeout_near_the_duration_limit_still_runs(server: AjsServer, client: AsyncClient) -> None:
    # The edge accepts timeouts up to 315,576,000,000 s; the dispatcher now computes a deadline
    # (now + timeout) for every job, which overflows datetime: _run raises before its try, the job
    # stays PENDING forever (its lease renewed, its slot held), no final Response.
    submitted = await client.submit("echo", {"a": "b"}, attempt_timeout=300_000_000_000.0)
    job = await settle(lambda: client.get(submitted.job.request.id), lambda j: j.is_final, within=3.0)
    assert job.state is S.FINISHED


async def _one(*messages: object) -> AsyncIterator[object]:
    for message in messages:
        yield message
    await asyncio.Event().wait()  # the worker's side stays open


async def test_a_session_closed_right_after_registering_is_disconnected() -> None:
    # grpc closes the servicer's generator when the call ends while the WorkerRegistered
    # reply is being sent (the worker went away right after registering). WorkerService.work
    # connects the session before that first yield but only enters its try/finally after it:
    # the session stays connected with its credit, jobs are claimed for it and never end.
    async with serving() as server:
        remote = server.workers.remote
        assert remote is not None
        caller = Caller(ANONYMOUS, "anonymous")
        replies = server.workers.work(_one(register("held", max_concurrent=2)), caller)
        first = await anext(replies)
        assert first.WhichOneof("kind") == "registered"
        await replies.aclose()  # what grpc does to a handler whose call ended
        assert remote.sessions == []


async def test_a_session_closed_right_after_registering_is_disconnected_over_grpc() -> None:
    # The same over a real socket: workers that cancel their call just after registering.
    # Probabilistic (about 2% of the calls leak a session on a 2-core machine), hence 300 tries.
    async with serving() as server, grpc.aio.insecure_channel(server.address) as channel:
        remote = server.workers.remote
        assert remote is not None
        stub = wpb_grpc.WorkerServiceStub(channel)
        for i in range(300):
            call = stub.Work()
            await call.write(register("held"))
            await asyncio.sleep(0.0005 * (i % 10))
            call.cancel()
        await asyncio.sleep(1.0)
        gc.collect()
        left = await settle(lambda: _now(len(remote.sessions)), lambda n: n == 0, within=2.0)
    assert left == 0


async def test_an_assignment_crossing_an_idle_workers_drain_is_not_lost(
    server: AjsServer, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An assignment the server sent before it read DrainWorker arrives after the worker drained:
    # the worker runs it, and the server ends the session once its outcome is in (a worker that
    # closed its side at once would lose it: WORKER_LOST, its one attempt counted).
    GATE_OF().release.set()
    once = dataclasses.replace(held("w1"), retry=RetryPolicy(max_attempts=1))
    async with working(server, [once], max_concurrent=1) as worker:
        assign = WorkerSession._assign

        def drain_then_assign(session: WorkerSession, ctx: JobContext) -> object:
            worker.drain()  # the worker drains while the assignment is on its way
            return assign(session, ctx)

        monkeypatch.setattr(WorkerSession, "_assign", drain_then_assign)
        submitted = await client.submit("held")
        request_id = submitted.job.request.id
        await eventually(lambda: not worker.registered.is_set(), within=3.0)  # the session ended
        job = await settle(lambda: client.get(request_id), lambda j: j.state is not S.PENDING)
    assert job.state is not S.FAILED, job.last_response.error
    assert job.attempt == 0 or job.state is S.FINISHED


async def test_a_claim_for_one_group_of_types_does_not_spend_another_groups_credit() -> None:
    # Offers are grouped by the exact set of types a session runs, but reserve() picks among
    # every session that runs the job's type. Worker A runs x (credit 1), worker B runs x and y
    # (credit 2). The {x} offer claims x1 and reserve gives it to B (more credit left); the
    # {x,y} offer then claims y1 and y2 for B's 2 credits, but B has one left: y2 is claimed,
    # handed back NOT_STARTED (a spurious PENDING then CREATED that watchers see) and waits,
    # while A stays idle.
    async with serving(chain=remote_chain(expected=["x", "y"])) as server, AsyncClient(server.address) as client:
        remote = server.workers.remote
        assert remote is not None
        ids = [(await client.submit(t)).job.request.id for t in ("x", "y", "y")]
        plugin = {t: JobPlugin(t, runs_remotely, handler="remote") for t in ("x", "y")}
        a = remote.connect("a", [plugin["x"]], 1)
        b = remote.connect("b", [plugin["x"], plugin["y"]], 2)
        await eventually(lambda: a.running + b.running == 3 or a.running + b.running == 2, within=2.0)
        await asyncio.sleep(0.3)
        histories = [await server.connector.responses(i, 0, 100) for i in ids]
        running = (a.running, b.running)
        remote.disconnect(a)
        remote.disconnect(b)
    refunds = [
        r
        for history in histories
        for r in history
        if r.state is S.CREATED and "before it started" in r.data.get("reason", "")
    ]
    assert refunds == []
    assert running == (1, 2)


@contextlib.asynccontextmanager
async def raw_session(server: AjsServer, *types: str) -> AsyncIterator[grpc.aio.StreamStreamCall]:  # type: ignore[type-arg]
    """A hand-driven worker session (registered) running ``types``."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = wpb_grpc.WorkerServiceStub(channel).Work()
        await call.write(register(*types, max_concurrent=1))
        assert (await call.read()).WhichOneof("kind") == "registered"
        try:
            yield call
        finally:
            call.cancel()


def failed_with(assignment: wpb.Assignment, code: int, *details: Message) -> wpb.WorkRequest:
    error = status_pb2.Status(code=code, message="no")
    for detail in details:
        error.details.add().Pack(detail)
    return wpb.WorkRequest(
        outcome=wpb.ReportOutcome(request_id=assignment.request.id, attempt=assignment.attempt, error=error)
    )


async def test_a_retry_delay_past_the_datetime_range_still_ends_the_attempt(
    server: AjsServer, client: AsyncClient
) -> None:
    # A RetryInfo of the largest valid Duration: _failed computes now() + delay, which overflows;
    # the runner task dies with OverflowError, no Response is written for the attempt, and the job
    # sits PENDING until its lease expires (then runs again, and again...).
    async with raw_session(server, "raw") as call:
        submitted = await client.submit("raw")
        assignment = (await call.read()).assignment
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=315_576_000_000))
        await call.write(failed_with(assignment, code_pb2.UNAVAILABLE, info))
        job = await settle(lambda: client.get(submitted.job.request.id), lambda j: j.state is not S.PENDING, within=2.0)
    assert job.state in (S.CREATED, S.FAILED)


async def test_out_of_range_from_a_worker_is_retried_as_in_process(server: AjsServer, client: AsyncClient) -> None:
    # The codes never retried are those of the in-process retry policy (OUT_OF_RANGE is not one).
    async with raw_session(server, "raw") as call:
        submitted = await client.submit("raw")
        assignment = (await call.read()).assignment
        await call.write(failed_with(assignment, code_pb2.OUT_OF_RANGE))
        job = await settle(lambda: client.get(submitted.job.request.id), lambda j: j.state is not S.PENDING, within=2.0)
    assert job.state is S.CREATED


async def test_a_permanent_code_with_retry_info_is_not_retried(server: AjsServer, client: AsyncClient) -> None:
    # A RetryInfo detail turns any code into Retry, which RetryPolicy.retries() always retries:
    # INVALID_ARGUMENT (listed as never retried) runs again.
    async with raw_session(server, "raw") as call:
        submitted = await client.submit("raw")
        assignment = (await call.read()).assignment
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        await call.write(failed_with(assignment, code_pb2.INVALID_ARGUMENT, info))
        job = await settle(lambda: client.get(submitted.job.request.id), lambda j: j.state is not S.PENDING, within=2.0)
    assert job.state is S.FAILED


async def test_an_oversized_remote_result_fails_its_job_alone(server: AjsServer, client: AsyncClient) -> None:
    # In-process, a result above max_result_bytes ends the job FAILED. A Python worker sends any
    # outcome: one above the server's max_message_bytes (4 MiB) kills the whole stream
    # (RESOURCE_EXHAUSTED), so every job of that worker is handed back WORKER_LOST, its attempt
    # counted, and the big job, run again, kills the next session too.
    async def big(request: Request, ctx: JobContext) -> dict[str, str]:
        return {"x": "a" * 5_000_000}

    plugins = [held("w1"), JobPlugin("big", big, retry=RetryPolicy(max_attempts=1))]
    async with working(server, plugins, max_concurrent=2):
        other = await client.submit("held")
        await eventually(lambda: GATE_OF().running == 1)
        submitted = await client.submit("big")
        final = (await ended(client, submitted.job.request.id))[-1]
        neighbour = await client.get(other.job.request.id)
        GATE_OF().release.set()
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.reason != "WORKER_LOST"
    assert neighbour.attempt == 1  # the job running beside it was not handed back


async def test_an_undecodable_outcome_detail_ends_the_session_as_invalid(
    server: AjsServer, client: AsyncClient
) -> None:
    # A RetryInfo detail whose bytes do not parse raises DecodeError in _outcome(); _read() takes
    # it for a broken stream and the call ends OK, so the worker learns nothing and reconnects.
    async with raw_session(server, "raw") as call:
        await client.submit("raw")
        assignment = (await call.read()).assignment
        outcome = failed_with(assignment, code_pb2.UNAVAILABLE)
        outcome.outcome.error.details.add(type_url="type.googleapis.com/google.rpc.RetryInfo", value=b"\xff\xff\xff")
        await call.write(outcome)
        code = None
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (await asyncio.wait_for(call.read(), 5)) is not grpc.aio.EOF:
                pass
        code = await call.code()
    assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_an_error_with_code_ok_ends_the_session_as_invalid(server: AjsServer, client: AsyncClient) -> None:
    async with raw_session(server, "raw") as call:
        submitted = await client.submit("raw")
        assignment = (await call.read()).assignment
        await call.write(failed_with(assignment, code_pb2.OK))
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (await asyncio.wait_for(call.read(), 5)) is not grpc.aio.EOF:
                pass
        code = await call.code()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    job = await settle(lambda: client.get(submitted.job.request.id), lambda j: j.state is S.CREATED)
    assert job.state is S.CREATED  # handed back with the session, not failed


async def test_a_credit_queued_before_drain_is_not_sent_after_it(server: AjsServer, client: AsyncClient) -> None:
    # The Python worker's writer coalesces GrantCredit and sends it once its outbox is empty: a
    # credit queued for a job that ended just before drain() goes out after DrainWorker, the server
    # adds it back (grant() after drain()) and assigns a new job to the draining worker.
    async def quick(request: Request, ctx: JobContext) -> None:
        return None

    async with working(server, [held("w1"), JobPlugin("quick", quick)], max_concurrent=2) as worker:
        await client.submit("held")
        await eventually(lambda: GATE_OF().running == 1)
        outbox = worker._outbox
        assert outbox is not None
        put = outbox.put_nowait

        def put_then_drain(message: wpb.WorkRequest | None) -> None:
            put(message)
            if message is not None and message.WhichOneof("kind") == "credit":
                worker.drain()  # SIGTERM right after the job ended

        outbox.put_nowait = put_then_drain  # type: ignore[method-assign]
        quick_job = await client.submit("quick")
        assert (await ended(client, quick_job.job.request.id))[-1].state is S.FINISHED
        await asyncio.sleep(0.2)
        late = await client.submit("held")
        await asyncio.sleep(0.3)
        started = [request_id for request_id, _, _ in GATE_OF().started]
        GATE_OF().release.set()
    assert late.job.request.id not in started  # a draining worker takes no more jobs


async def test_a_remote_output_of_another_type_than_declared_fails_the_job(
    server: AjsServer, client: AsyncClient
) -> None:
    reverse = wpb.WorkRequest(
        register=wpb.RegisterWorker(
            worker_name="raw",
            job_types=[convert.job_type_to_proto(convert.job_type_from_plugin(REVERSE, "remote"))],
            max_concurrent=1,
        )
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = wpb_grpc.WorkerServiceStub(channel).Work()
        await call.write(reverse)
        await call.read()
        submitted = await client.submit("reverse", input=wrappers_pb2.StringValue(value="x"))
        assignment = (await call.read()).assignment
        wrong = any_pb2.Any()
        wrong.Pack(wrappers_pb2.Int32Value(value=1))
        await call.write(
            wpb.WorkRequest(
                outcome=wpb.ReportOutcome(request_id=assignment.request.id, attempt=assignment.attempt, output=wrong)
            )
        )
        final = (await ended(client, submitted.job.request.id))[-1]
        call.cancel()
    assert final.state is S.FAILED
    assert final.error is not None
    assert "google.protobuf.Int32Value" in final.error.message


async def test_a_remote_job_reads_its_dependencies_results(server: AjsServer, client: AsyncClient) -> None:
    seen: dict[str, dict[str, str]] = {}

    async def joins(request: Request, ctx: JobContext) -> dict[str, str]:
        seen.update({key: dict(response.data) for key, response in ctx.dependencies.items()})
        return {"joined": ",".join(sorted(ctx.dependencies))}

    async with working(server, [JobPlugin("joins", joins)]):
        first = await client.submit("echo", data={"part": "a"})
        second = await client.submit("echo", data={"part": "b"})
        last = await client.submit("joins", depends_on=[first.job.request.id, second.job.request.id])
        final = (await ended(client, last.job.request.id))[-1]
    assert final.state is S.FINISHED
    assert seen == {first.job.request.id: {"part": "a"}, second.job.request.id: {"part": "b"}}


async def test_a_flow_policy_declared_by_workers_holds_across_them(server: AjsServer, client: AsyncClient) -> None:
    limited = dataclasses.replace(held("w"), flow=FlowPolicy(concurrency=Concurrency("tenant", 1)))
    async with working(server, [limited], name="w1"), working(server, [limited], name="w2"):
        for _ in range(4):
            await client.submit("held", data={"tenant": "acme"})
        await eventually(lambda: GATE_OF().running == 1)
        await asyncio.sleep(0.3)
        assert GATE_OF().running == 1  # one of the tenant's jobs at a time, across both workers
        GATE_OF().release.set()
        await eventually(lambda: len(GATE_OF().started) == 4)
    assert GATE_OF().most_running == 1


async def test_metrics_show_remote_workers_their_credit_and_their_types() -> None:
    config = ServerConfig(address="127.0.0.1:0", metrics_address="127.0.0.1:0", cancel_grace=0.5, shutdown_grace=0.5)
    async with serving(config) as server, AsyncClient(server.address) as client:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"

        async def scrape() -> str:
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

        async with working(server, [held("w1")], max_concurrent=3):
            submitted = await client.submit("held")
            await eventually(lambda: GATE_OF().running == 1)
            text = await scrape()
            assert "ajs_remote_workers 1.0" in text
            assert "ajs_remote_credit 2.0" in text
            GATE_OF().release.set()
            await ended(client, submitted.job.request.id)
            text = await scrape()
        assert 'ajs_jobs_ended_total{state="FINISHED",type="held"} 1.0' in text


async def test_connection_age_renews_watch_streams_but_never_cuts_a_worker_session() -> None:
    # Connections are asked to go away after max_connection_age; one holding a call lives on until
    # the call ends. A worker's session (and the job it runs) goes on; the watch streams end
    # themselves UNAVAILABLE (STREAM_RENEWED) at that age and the clients resume them.
    config = ServerConfig(address="127.0.0.1:0", max_connection_age=1.0, cancel_grace=0.5, shutdown_grace=0.5)
    async with serving(config) as server, AsyncClient(server.address) as client:
        async with working(server, [held("w1")]):
            submitted = await client.submit("held")
            request_id = submitted.job.request.id
            await eventually(lambda: GATE_OF().running == 1)
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = JobServiceStub(channel).WatchJob(WatchJobRequest(request_id=request_id))
                with pytest.raises(grpc.aio.AioRpcError) as renewed:
                    async for _ in call:
                        pass
            assert renewed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert reason_of(renewed.value) == "STREAM_RENEWED"
            seen = []
            async for response in client.watch(request_id):  # resumed across renewals
                seen.append(response)
                if len(seen) == 2:  # the stored CREATED and PENDING: now let 3 connection ages pass
                    await asyncio.sleep(3.0)
                    GATE_OF().release.set()
        assert [r.sequence for r in seen] == [1, 2, 3]
        assert seen[-1].state is S.FINISHED
        assert seen[-1].data == {"worker": "w1", "attempt": "1"}  # never handed back (no WORKER_LOST)
