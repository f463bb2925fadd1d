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
from ajs_grpc.core.errors import AjsError, InvalidArgument, ResourceExhausted
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.edge.service import Limits
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.helpers import eventually, eventually_reads

S = RequestState


async def serve(limits: Limits, **settings: object) -> AjsServer:
    config = ServerConfig(address="127.0.0.1:0", limits=limits, shutdown_grace=0.5, cancel_grace=0.5, **settings)  # type: ignore[arg-type]
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    return server


@pytest.fixture
async def observed() -> AsyncIterator[AjsServer]:
    server = await serve(Limits(), metrics_address="127.0.0.1:0", queue_depth_every=0.05)
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
        # Each admission adds to the cached count: the sixth is refused without waiting for a recount.
        with pytest.raises(ResourceExhausted) as raised:
            await client.submit("echo")
        assert raised.value.reason == "QUEUE_FULL"
        assert raised.value.metadata["retry_after_seconds"] == "1"


async def test_one_anonymous_client_holds_only_its_share_of_the_watches(limited: AjsServer) -> None:
    # Without authentication everyone is the anonymous principal: one client address
    # may hold max_watches_per_principal (2) of the server's 3 slots, not all of them.
    async with AsyncClient(limited.address) as client:
        await client.submit("block", id="long")
        watches = [client.watch("long") for _ in range(2)]
        for watch in watches:
            assert (await anext(watch)).sequence == 1
        with pytest.raises(ResourceExhausted) as raised:
            await anext(client.watch("long"))
        assert raised.value.reason == "TOO_MANY_WATCHES"
        [quota] = raised.value.violations
        assert quota.subject == "principal:anonymous@ipv4:127.0.0.1"
        assert "at most 2" in quota.description
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
    url = f"http://127.0.0.1:{observed.metrics_port}/metrics"

    async def scrape() -> str:
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    # The queue depth gauge is counted every queue_depth_every (0.05 s here).
    text = await eventually_reads(scrape, lambda text: _value(text, "ajs_queue_depth") == 1)
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
    assert _value(text, "ajs_jobs_abandoned") == 0


async def test_made_up_types_share_one_metric_series() -> None:
    # A frontend queues types it does not know (its workers may run them); a client that
    # makes up thousands of types must not make thousands of series that are never freed.
    frontend = await serve(Limits(), metrics_address="127.0.0.1:0", role="frontend")
    try:
        async with AsyncClient(frontend.address) as client:
            for number in range(50):
                await client.submit(f"made.up.{number}")
            await client.submit("echo")
        url = f"http://127.0.0.1:{frontend.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        await frontend.stop()
    assert _value(text, 'ajs_jobs_submitted_total{type="other"}') == 50
    assert _value(text, 'ajs_jobs_submitted_total{type="echo"}') == 1
    assert "made.up" not in text


def _value(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert found, f"{sample} not in:\n{text}"
    return float(found.group(1))


def _far_future():  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from ajs_grpc.core.model import now

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


@pytest.fixture
async def small_messages() -> AsyncIterator[AjsServer]:
    server = await serve(Limits(max_data_bytes=10_000), max_message_bytes=256 * 1024)
    try:
        yield server
    finally:
        await server.stop()


async def test_list_replies_stay_within_the_message_limit_and_leave_payloads_out_by_default(
    small_messages: AjsServer,
) -> None:
    # 60 jobs of ~9 KB data each, done (their final Responses echo the data): ~1 MB in all,
    # four times the server's 256 KiB message limit.
    limited = small_messages
    async with AsyncClient(limited.address) as client:
        ids = [f"big-{i:02}" for i in range(60)]
        await asyncio.gather(*(client.submit("echo", {"blob": "x" * 9000}, id=i) for i in ids))
        for request_id in ids:
            [r async for r in client.watch(request_id)]
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        basic = await stub.ListJobs(pb.ListJobsRequest(page_size=1000))
        order = [job.request.id for job in basic.jobs]  # submit order
        assert sorted(order) == ids
        assert not any(job.request.data or job.last_response.data for job in basic.jobs)
        assert basic.ByteSize() < 64 * 1024
        listed: list[str] = []
        token = ""
        pages = 0
        while True:
            full = await stub.ListJobs(pb.ListJobsRequest(page_size=1000, page_token=token, view=pb.JOB_VIEW_FULL))
            assert full.ByteSize() <= 256 * 1024
            assert all(job.request.data["blob"] == "x" * 9000 for job in full.jobs)
            listed += [job.request.id for job in full.jobs]
            pages += 1
            token = full.next_page_token
            if not token:
                break
        assert listed == order
        assert pages >= 4
        one = await stub.GetJob(pb.GetJobRequest(request_id="big-00"))
        assert one.job.request.data["blob"] == "x" * 9000  # FULL by default for one job
        lean = await stub.GetJob(pb.GetJobRequest(request_id="big-00", view=pb.JOB_VIEW_BASIC))
        assert not lean.job.request.data


async def test_a_job_result_too_large_for_a_reply_fails_the_job(small_messages: AjsServer) -> None:
    # With 256 KiB messages, 1 MiB inputs and 10 kB of data allowed, a result gets 64 KiB at most:
    # any larger one would make GetJob and WatchJob replies outgrow the limit.
    async with AsyncClient(small_messages.address) as client:
        fits = await client.submit("big_result", {"bytes": str(60_000)})
        too_big = await client.submit("big_result", {"bytes": str(70_000)})
        fits_final = [r async for r in client.watch(fits.job.request.id)][-1]
        final = [r async for r in client.watch(too_big.job.request.id)][-1]
    assert fits_final.state is S.FINISHED
    assert final.state is S.FAILED
    assert final.error is not None
    assert "more than the limit of 65536" in final.error.message
