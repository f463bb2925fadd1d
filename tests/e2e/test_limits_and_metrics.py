"""Limits against abuse, and the Prometheus metrics, on a real server."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.errors import AjsError, InvalidArgument, ResourceExhausted
from ajs_grpc.model import RequestState
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from ajs_grpc.server import AjsServer, ServerConfig
from ajs_grpc.service import Limits
from tests import jobs_for_tests
from tests.helpers import eventually

S = RequestState


async def serve(limits: Limits, **settings: object) -> AjsServer:
    config = ServerConfig(address="127.0.0.1:0", limits=limits, shutdown_grace=0.5, cancel_grace=0.5, **settings)  # type: ignore[arg-type]
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    return server


@pytest.fixture
async def observed() -> AsyncIterator[AjsServer]:
    server = await serve(Limits(), metrics_address="127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def limited() -> AsyncIterator[AjsServer]:
    limits = Limits(
        max_data_entries=100,
        max_data_bytes=10_000,
        max_queue_depth=5,
        max_watches=3,
        max_watches_per_principal=2,
        watch_send_timeout=0.5,
    )
    server = await serve(limits, max_message_bytes=256 * 1024)
    try:
        yield server
    finally:
        await server.stop()


async def test_too_many_data_entries_are_invalid(limited: AjsServer) -> None:
    async with AsyncClient(limited.address) as client:
        with pytest.raises(InvalidArgument) as raised:
            await client.submit("echo", {f"k{i}": "v" for i in range(10_000)})
        assert [v.field for v in raised.value.violations] == ["request.data"]
        with pytest.raises(InvalidArgument, match="bytes"):
            await client.submit("echo", {"big": "x" * 20_000})


async def test_an_oversize_message_is_resource_exhausted(limited: AjsServer) -> None:
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        request = pb.Request(type="echo", data={"k": "x" * 300_000})
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(limited: AjsServer) -> None:
    async with AsyncClient(limited.address) as client:
        for i in range(5):
            await client.submit("echo", id=f"later-{i}", run_after=_far_future())
        await asyncio.sleep(0.3)  # the cached depth expires
        with pytest.raises(ResourceExhausted) as raised:
            await client.submit("echo")
        assert raised.value.reason == "QUEUE_FULL"
        assert raised.value.metadata["retry_after_seconds"] == "1"


async def test_watches_are_limited_in_all(limited: AjsServer) -> None:
    async with AsyncClient(limited.address) as client:
        await client.submit("block", id="long")
        watches = [client.watch("long") for _ in range(3)]
        for watch in watches:
            assert (await anext(watch)).sequence == 1
        with pytest.raises(ResourceExhausted) as raised:
            await anext(client.watch("long"))
        assert raised.value.reason == "TOO_MANY_WATCHES"
        for watch in watches:
            await watch.aclose()  # type: ignore[attr-defined]
        await eventually(lambda: not limited.service.watches)
        assert (await anext(client.watch("long"))).sequence == 1
        await client.cancel("long")


async def test_a_watcher_that_never_reads_is_dropped_and_memory_is_freed(limited: AjsServer) -> None:
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        chatty = pb.Request(type="chatty", data={"n": "400", "size": "20000"})
        reply = await stub.SubmitRequest(pb.SubmitRequestRequest(request=chatty))
        request_id = reply.job.request.id
        # Big Responses fill the transport's window while nobody reads.
        call = stub.WatchJob(pb.WatchJobRequest(request_id=request_id))
        await eventually(lambda: limited.connector.watcher_count == 1)
        await eventually(lambda: limited.connector.watcher_count == 0, within=20)
        assert not limited.service.watches
        # (A status cannot reach a client that reads nothing: it waits behind the unread data.)
        call.cancel()


async def test_a_deadline_ends_a_watch_and_frees_it(limited: AjsServer) -> None:
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        reply = await stub.SubmitRequest(pb.SubmitRequestRequest(request=pb.Request(type="block")))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.WatchJob(pb.WatchJobRequest(request_id=reply.job.request.id), timeout=0.3):
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: limited.connector.watcher_count == 0)
        assert not limited.service.watches


async def test_metrics_count_jobs_calls_and_the_queue(observed: AjsServer) -> None:
    async with AsyncClient(observed.address) as client:
        for _ in range(3):
            done = await client.submit("echo")
            [r async for r in client.watch(done.job.request.id)]
        failed = await client.submit("boom")
        [r async for r in client.watch(failed.job.request.id)]
        flaky = await client.submit("flaky", {"succeed_on": "2"})
        [r async for r in client.watch(flaky.job.request.id)]
        with pytest.raises(AjsError):
            await client.get("ghost")
        await client.submit("echo", id="waiting", run_after=_far_future())
    await asyncio.sleep(2.5)  # the queue depth gauge is refreshed every 2 s
    url = f"http://127.0.0.1:{observed.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert _value(text, 'ajs_jobs_submitted_total{type="echo"}') == 4
    assert _value(text, 'ajs_jobs_ended_total{state="FINISHED",type="echo"}') == 3
    assert _value(text, 'ajs_jobs_ended_total{state="FAILED",type="boom"}') == 1
    assert _value(text, 'ajs_jobs_ended_total{state="FINISHED",type="flaky"}') == 1
    assert _value(text, 'ajs_jobs_retried_total{type="flaky"}') == 1
    assert _value(text, 'ajs_grpc_calls_total{code="OK",method="SubmitRequest"}') == 6
    assert _value(text, 'ajs_grpc_calls_total{code="NOT_FOUND",method="GetJob"}') == 1
    assert _value(text, 'ajs_job_duration_seconds_count{type="echo"}') == 3
    assert _value(text, 'ajs_job_queue_wait_seconds_count{type="echo"}') == 3
    assert _value(text, "ajs_queue_depth") == 1
    assert _value(text, "ajs_jobs_running") == 0
    assert _value(text, "ajs_watchers") == 0


def _value(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert found, f"{sample} not in:\n{text}"
    return float(found.group(1))


def _far_future():  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from ajs_grpc.model import now

    return now() + timedelta(days=1)


async def test_a_burst_of_submits_cannot_slip_past_the_queue_limit(limited: AjsServer) -> None:
    async with AsyncClient(limited.address) as client:
        later = _far_future()
        results = await asyncio.gather(
            *(client.submit("echo", id=f"burst-{i}", run_after=later) for i in range(20)), return_exceptions=True
        )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(accepted) == 5  # max_queue_depth
    assert len(refused) == 15
