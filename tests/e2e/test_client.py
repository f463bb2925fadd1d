"""The Python client (asyncio and blocking) against a real server, including watch resumption."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ajs_grpc.client import AsyncClient, Client, channel_target
from ajs_grpc.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import AjsServer
from tests.helpers import eventually
from tests.proxy import CuttableProxy

S = RequestState


@pytest.fixture
async def client(server: AjsServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=10) as opened:
        yield opened


async def test_submit_watch_get_list_cancel(client: AsyncClient) -> None:
    submitted = await client.submit("steps", {"n": "2"}, id="s1")
    assert submitted.created
    assert submitted.job.state is S.CREATED
    responses = [r async for r in client.watch("s1")]
    assert [r.sequence for r in responses] == [1, 2, 3, 4, 5]
    assert responses[-1].state is S.FINISHED
    job = await client.get("s1")
    assert job.state is S.FINISHED
    assert job.attempt == 1
    assert job.request.creator == "anonymous"
    again = await client.submit("steps", {"n": "2"}, id="s1")
    assert not again.created

    await client.submit("block", id="b1")
    await client.submit("echo", parent_id="b1", id="c1")
    listed = [job.request.id async for job in client.list(page_size=1)]
    assert listed == ["s1", "b1", "c1"]
    children = [job.request.id async for job in client.list(parent_id="b1")]
    assert children == ["c1"]
    async for response in client.watch("b1"):
        if response.state is S.PENDING:
            break  # running now
    cancelled = await client.cancel("b1")
    assert cancelled.cancel_requested
    final = [r async for r in client.watch("b1")][-1]
    assert final.state is S.CANCELLED


async def test_errors_are_project_exceptions(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as not_found:
        await client.get("ghost")
    assert not_found.value.reason == "REQUEST_NOT_FOUND"
    with pytest.raises(InvalidArgument) as invalid:
        await client.submit("")
    assert [v.field for v in invalid.value.violations] == ["request.type"]
    await client.submit("echo", {"a": "1"}, id="x")
    with pytest.raises(AlreadyExists):
        await client.submit("echo", {"a": "2"}, id="x")
    [r async for r in client.watch("x")]
    with pytest.raises(FailedPrecondition):
        await client.cancel("x")
    with pytest.raises(NotFound):
        [r async for r in client.watch("ghost")]


async def test_health(client: AsyncClient) -> None:
    assert await client.health() == "SERVING"
    assert await client.health("ajs.v1.JobService") == "SERVING"


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(Unavailable):
            await client.get("x")


async def test_watch_resumes_after_a_dropped_connection(server: AjsServer) -> None:
    proxy = CuttableProxy(server.port)
    await proxy.start()
    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10) as client:
            await client.submit("steps", {"n": "6", "sleep": "0.05"}, id="long")
            seen = []
            async for response in client.watch("long"):
                seen.append(response.sequence)
                if response.sequence in (2, 5):
                    proxy.cut()
        assert seen == list(range(1, 10))  # every Response once, in order
        assert proxy.connections >= 3
    finally:
        await proxy.stop()


async def test_watch_gives_up_after_resume_for(server: AjsServer) -> None:
    proxy = CuttableProxy(server.port)
    await proxy.start()
    async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10, resume_for=0.3) as client:
        await client.submit("block", id="stuck")
        watching = client.watch("stuck")
        assert (await anext(watching)).sequence == 1
        await proxy.stop()  # the server is now unreachable for good
        with pytest.raises(Unavailable):
            async for _ in watching:
                pass
    async with AsyncClient(server.address) as direct:
        await direct.cancel("stuck")


async def test_blocking_client(server: AjsServer) -> None:
    def use_blocking_client() -> None:
        with Client(server.address) as client:
            submitted = client.submit("steps", {"n": "2"})
            request_id = submitted.job.request.id
            states = [r.state for r in client.watch(request_id)]
            assert states == [S.CREATED, S.PENDING, S.PENDING, S.PENDING, S.FINISHED]
            assert client.get(request_id).state is S.FINISHED
            assert [job.request.id for job in client.list()] == [request_id]
            assert client.health() == "SERVING"
            with pytest.raises(NotFound):
                client.get("ghost")

    # The server runs on this test's event loop; the blocking client gets a thread.
    await asyncio.to_thread(use_blocking_client)


async def test_leaving_a_blocking_watch_early_closes_its_stream(server: AjsServer) -> None:
    def watch_one_then_leave() -> None:
        with Client(server.address) as client:
            client.submit("block", id="endless")
            for response in client.watch("endless"):
                assert response.sequence == 1
                break

    await asyncio.to_thread(watch_one_then_leave)
    # The job still runs, so only the client's leaving can have closed the watch.
    await eventually(lambda: server.connector.watcher_count == 0)
    assert (await server.connector.get("endless")).state is RequestState.PENDING
    await server.connector.cancel("endless")


def test_several_addresses_make_one_balanced_target() -> None:
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("localhost:7,127.0.0.1:8").startswith("ipv")
    assert "127.0.0.1:7" in channel_target("localhost:7,127.0.0.1:8")
    assert channel_target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
