"""BatchSubmitRequests (AIP-233) through a real server: atomic, idempotent, bounded, errors with the index."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import wrappers_pb2

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import AlreadyExists, Code, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.edge.service import Limits
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.e2e.test_service import bad_request, error_info

S = RequestState


@pytest.fixture
async def small() -> AsyncIterator[AjsServer]:
    """A server that takes batches of 5 at most."""
    config = ServerConfig(address="127.0.0.1:0", limits=Limits(max_batch_requests=5), shutdown_grace=0.5)
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def item(type_: str = "echo", request_id: str = "", **data: str) -> pb.SubmitRequestRequest:
    return pb.SubmitRequestRequest(request=pb.Request(id=request_id, type=type_, data=data))


async def stored_ids(stub: pb_grpc.JobServiceStub) -> list[str]:
    return [job.request.id for job in (await stub.ListJobs(pb.ListJobsRequest())).jobs]


async def test_a_batch_queues_every_request_in_order_and_they_run(server: AjsServer) -> None:
    async with AsyncClient(server.address) as client:
        submitted = await client.submit_many([Request(id=f"b{i}", type="echo", data={"n": str(i)}) for i in range(20)])
        assert [s.job.request.id for s in submitted] == [f"b{i}" for i in range(20)]
        assert all(s.created for s in submitted)
        for s in submitted:
            final = [r async for r in client.watch(s.job.request.id)][-1]
            assert final.state is S.FINISHED
            assert dict(final.data) == {"n": s.job.request.data["n"]}


async def test_ids_are_idempotent_inside_a_batch_and_against_stored_jobs(server: AjsServer) -> None:
    async with AsyncClient(server.address) as client:
        await client.submit("block", {"k": "v"}, id="stored")
        submitted = await client.submit_many(
            [
                Request(id="stored", type="block", data={"k": "v"}),
                Request(id="twice", type="block"),
                Request(id="twice", type="block"),
                Request(id="", type="block"),  # the client names it
            ]
        )
        assert [s.created for s in submitted] == [False, True, False, True]
        assert submitted[1].job == submitted[2].job
        assert submitted[3].job.request.id
        for request_id in {s.job.request.id for s in submitted}:
            await client.cancel(request_id)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (pb.Request(type=""), "requests[3].request.type"),
        (pb.Request(type="echo", id="with space"), "requests[3].request.id"),
        (pb.Request(type="echo", data={"k": "\x00"}), "requests[3].request.data"),
    ],
)
async def test_a_malformed_request_fails_the_call_naming_its_index_and_nothing_is_queued(
    stub: pb_grpc.JobServiceStub, bad: pb.Request, field: str
) -> None:
    batch = [item(request_id=f"ok{i}") for i in range(3)] + [pb.SubmitRequestRequest(request=bad), item()]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.BatchSubmitRequests(pb.BatchSubmitRequestsRequest(requests=batch))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(raised.value)] == [field]
    assert (raised.value.details() or "").startswith("requests[3]: ")
    assert await stored_ids(stub) == []


async def test_a_refusal_of_the_store_fails_the_whole_batch(server: AjsServer) -> None:
    async with AsyncClient(server.address) as client:
        await client.submit("block", {"k": "v"}, id="stored")
        batch = [Request(id="new1", type="echo"), Request(id="stored", type="block", data={"k": "other"})]
        with pytest.raises(AlreadyExists) as taken:
            await client.submit_many(batch)
        assert taken.value.metadata["index"] == "1"
        orphan = [Request(id="new2", type="echo"), Request(id="orphan", type="echo", parent_id="nobody")]
        with pytest.raises(NotFound) as unknown:
            await client.submit_many(orphan)
        assert unknown.value.metadata["index"] == "1"
        assert unknown.value.reason == "PARENT_NOT_FOUND"
        unsupported = [Request(id="new3", type="echo"), Request(id="x", type="no.such.type")]
        with pytest.raises(FailedPrecondition) as refused:
            await client.submit_many(unsupported)
        assert refused.value.metadata["index"] == "1"
        assert refused.value.reason == "TYPE_NOT_SUPPORTED"
        assert [job.request.id async for job in client.list()] == ["stored"]
        await client.cancel("stored")


async def test_a_parent_may_come_earlier_in_the_same_batch(server: AjsServer) -> None:
    async with AsyncClient(server.address) as client:
        submitted = await client.submit_many(
            [Request(id="parent", type="echo"), Request(id="child", type="echo", parent_id="parent")]
        )
        assert submitted[1].job.request.parent_id == "parent"


async def test_more_requests_than_the_limit_is_invalid_argument(small: AjsServer) -> None:
    async with AsyncClient(small.address) as client:
        with pytest.raises(InvalidArgument) as raised:
            await client.submit_many([Request(id=f"r{i}", type="echo") for i in range(6)])
        assert [(v.field, v.description) for v in raised.value.violations] == [
            ("requests", "has 6 requests, more than 5")
        ]
        assert [job async for job in client.list()] == []
        assert len(await client.submit_many([Request(id=f"r{i}", type="echo") for i in range(5)])) == 5


async def test_an_empty_batch_is_an_empty_answer(stub: pb_grpc.JobServiceStub) -> None:
    reply = await stub.BatchSubmitRequests(pb.BatchSubmitRequestsRequest())
    assert list(reply.responses) == []


async def test_typed_inputs_are_checked_per_request(stub: pb_grpc.JobServiceStub) -> None:
    good = pb.Request(id="typed", type="shout")
    good.input.Pack(wrappers_pb2.StringValue(value="hi"))
    wrong = pb.Request(id="wrong", type="shout")
    wrong.input.Pack(wrappers_pb2.Int32Value(value=1))
    batch = [pb.SubmitRequestRequest(request=good), pb.SubmitRequestRequest(request=wrong)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.BatchSubmitRequests(pb.BatchSubmitRequestsRequest(requests=batch))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(raised.value)] == ["requests[1].request.input"]
    assert error_info(raised.value).metadata["index"] == "1"
    assert await stored_ids(stub) == []


def test_the_error_of_an_index_keeps_its_code() -> None:
    from ajs_grpc.edge.validation import at_index

    original = NotFound("parent request 'p' does not exist", reason="PARENT_NOT_FOUND")
    moved = at_index(7, original)
    assert moved.code is Code.NOT_FOUND
    assert moved.message == "requests[7]: parent request 'p' does not exist"
    assert moved.metadata == {"index": "7"}
    assert original.metadata == {}  # the original is left as it was


class StoreAway(MemoryConnector):
    """A queue whose store refuses a whole batch (as a lost database does)."""

    async def enqueue_many(self, submits: object) -> list[tuple[object, bool]]:  # type: ignore[override]
        raise Unavailable("could not write to the queue: the database is away", reason="STORAGE_UNAVAILABLE")


async def test_a_store_failing_the_whole_batch_names_no_request() -> None:
    config = ServerConfig(address="127.0.0.1:0", shutdown_grace=0.5)
    server = AjsServer(config, connector=StoreAway(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        async with AsyncClient(server.address) as client:
            with pytest.raises(Unavailable) as raised:
                await client.submit_many([Request(id="a", type="echo"), Request(id="b", type="echo")])
        assert raised.value.message == "could not write to the queue: the database is away"
        assert "index" not in raised.value.metadata
    finally:
        await server.stop()
