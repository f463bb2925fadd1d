"""WatchJobs over gRPC: one stream of many jobs' Responses, filtered, resumable, owned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from ajs_grpc.client import AsyncClient, Watched
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.e2e.test_security import Secured, client, secured
from tests.e2e.test_service import bad_request, error_info

S = RequestState
__all__ = ["secured"]  # the fixture, used here


async def take(stream: AsyncIterator[Watched], count: int) -> list[Watched]:
    """The next ``count`` messages that carry a Response (bookmarks are left out)."""
    got: list[Watched] = []
    while len(got) < count:
        item = await anext(stream)
        if item.response is not None:
            got.append(item)
    return got


def ids(items: list[Watched]) -> list[tuple[str, int, RequestState]]:
    return [(i.response.request_id, i.response.sequence, i.response.state) for i in items if i.response]


async def test_one_stream_follows_every_matching_job_live(server: AjsServer) -> None:
    async with AsyncClient(server.address, timeout=5) as ajs:
        stream = ajs.watch_jobs(types=["steps"])
        bookmark = await anext(stream)
        assert bookmark.response is None
        assert bookmark.token
        await ajs.submit("echo", {"k": "v"}, id="skipped")
        await ajs.submit("steps", {"n": "2"}, id="a")
        await ajs.submit("steps", {"n": "2"}, id="b")
        got = await take(stream, 2 * 5)  # each: CREATED, PENDING, 2 x progress, FINISHED
        await stream.aclose()
        for request_id in ("a", "b"):
            mine = [(seq, state) for rid, seq, state in ids(got) if rid == request_id]
            assert mine == [(1, S.CREATED), (2, S.PENDING), (3, S.PENDING), (4, S.PENDING), (5, S.FINISHED)]
        assert {(i.type, i.queue) for i in got} == {("steps", "default")}
        # The first bookmark's token replays the same, from any new stream.
        replay = ajs.watch_jobs(types=["steps"], after_token=bookmark.token)
        assert ids(await take(replay, 10)) == ids(got)
        await replay.aclose()
        # And an item's token resumes right after it.
        resumed = ajs.watch_jobs(types=["steps"], after_token=got[6].token)
        assert ids(await take(resumed, 3)) == ids(got[7:])
        await resumed.aclose()


async def test_filters_on_states_queues_and_parent(server: AjsServer) -> None:
    async with AsyncClient(server.address, timeout=5) as ajs:
        finals = ajs.watch_jobs(states=[S.FINISHED, S.FAILED, S.CANCELLED])
        children = ajs.watch_jobs(parent_id="p")
        queued = ajs.watch_jobs(queues=["slow"])
        for stream in (finals, children, queued):
            assert (await anext(stream)).response is None
        await ajs.submit("echo", id="p")
        await ajs.submit("echo", id="c", parent_id="p")
        await ajs.submit("echo", id="q", queue="slow")
        ended = await take(finals, 3)
        assert sorted(i.response.request_id for i in ended if i.response) == ["c", "p", "q"]
        assert all(i.response and i.response.is_final for i in ended)
        assert {i.response.request_id for i in await take(children, 3) if i.response} == {"c"}
        assert {(i.response.request_id, i.queue) for i in await take(queued, 3) if i.response} == {("q", "slow")}
        for stream in (finals, children, queued):
            await stream.aclose()


async def test_a_principal_sees_only_its_own_jobs_and_an_admin_all(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob, client(secured, "root") as root:
        streams = {
            name: who.watch_jobs(types=["echo"]) for name, who in (("alice", alice), ("bob", bob), ("root", root))
        }
        for stream in streams.values():
            assert (await anext(stream)).response is None
        await alice.submit("echo", id="mine")
        await bob.submit("echo", id="mine")
        await bob.submit("echo", id="bobs")
        assert {(rid, seq) for rid, seq, _ in ids(await take(streams["alice"], 3))} == {
            ("mine", 1),
            ("mine", 2),
            ("mine", 3),
        }
        bobs = ids(await take(streams["bob"], 6))
        assert {rid for rid, _, _ in bobs} == {"mine", "bobs"}  # in his own names
        everything = ids(await take(streams["root"], 9))
        assert {rid for rid, _, _ in everything} == {"~alice/mine", "~bob/mine", "~bob/bobs"}
        for stream in streams.values():
            await stream.aclose()


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.WatchJobsRequest(after_token="no-such-token"), "after_token"),
        (pb.WatchJobsRequest(after_token="x" * 201), "after_token"),
        (pb.WatchJobsRequest(states=[pb.REQUEST_STATE_UNSPECIFIED]), "states"),
        (pb.WatchJobsRequest(states=[42]), "states"),
        (pb.WatchJobsRequest(types=["bad type"]), "types[0]"),
        (pb.WatchJobsRequest(queues=["", "ok"]), "queues[0]"),
        (pb.WatchJobsRequest(parent_id="with space"), "parent_id"),
        (pb.WatchJobsRequest(types=["t"] * 101), "types"),
        (pb.WatchJobsRequest(queues=["q"] * 101), "queues"),
        (pb.WatchJobsRequest(states=[pb.REQUEST_STATE_CREATED] * 101), "states"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.JobServiceStub, request_message: pb.WatchJobsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.WatchJobs(request_message):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [name for name, _ in bad_request(refused.value)]
    if field == "after_token" and len(request_message.after_token) < 100:
        assert error_info(refused.value).reason == "BAD_RESUME_TOKEN"


async def test_list_jobs_refuses_a_filter_of_more_than_100_types(stub: pb_grpc.JobServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListJobs(pb.ListJobsRequest(types=[f"t{i}" for i in range(101)]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(refused.value) == [("types", "must list at most 100 values")]
    assert (await stub.ListJobs(pb.ListJobsRequest(types=[f"t{i}" for i in range(100)]))).jobs == []


async def test_a_draining_server_ends_the_streams_so_clients_resume_elsewhere() -> None:
    # A job runs past the drain's start (shutdown grace): the streams still end at once, so a
    # client moves on with its token instead of holding the drain until rpc_grace.
    config = ServerConfig(address="127.0.0.1:0", shutdown_grace=30, cancel_grace=0.5, rpc_grace=30)
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.JobServiceStub(channel)
    try:
        stream = aiter(stub.WatchJobs(pb.WatchJobsRequest()))
        assert not (await anext(stream)).HasField("response")  # the bookmark: open
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=pb.Request(type="block", id="long")))
        while (await anext(stream)).response.state != pb.REQUEST_STATE_PENDING:
            pass  # until the job runs
        stopping = asyncio.create_task(server.stop())
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(ended.value).reason == "DRAINING"
        assert not stopping.done()  # the running job still holds the drain; the stream did not
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchJobs(pb.WatchJobsRequest()):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await stub.CancelJob(pb.CancelJobRequest(request_id="long"))
        await stopping
    finally:
        await channel.close()
        await server.stop()
