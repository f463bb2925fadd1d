"""Input no store can keep, and numbers no store can hold, on every connector behind a real server.

The answer is INVALID_ARGUMENT naming the field, the same on every connector, and
a bad request never fails another caller's request.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ajs_grpc.edge.paging import encode_page_token
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.conftest import CONNECTORS, drop_schema

State = pb.RequestState


@pytest.fixture
async def stub(connector_name: str, tmp_path: Path) -> AsyncIterator[pb_grpc.JobServiceStub]:
    """A real server on each connector (the contract suite's, unopened: the server opens it)."""
    connector = CONNECTORS[connector_name](tmp_path)
    config = ServerConfig(address="127.0.0.1:0", max_concurrent_jobs=4, cancel_grace=0.5, shutdown_grace=0.5)
    server = AjsServer(config, connector=connector, chain=jobs_for_tests.chain())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield pb_grpc.JobServiceStub(channel)
    finally:
        await server.stop()
        schema = getattr(connector, "schema", None)
        if connector_name == "postgres" and schema:
            drop_schema(schema)


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            return [v.field for v in found.field_violations]
    raise AssertionError("no BadRequest detail")


def hostile_requests() -> dict[str, pb.Request]:
    typed = pb.Request(type="echo")
    typed.input.type_url = "type.googleapis.com/evil\x00"
    return {
        "request.data": pb.Request(type="echo", data={"key": "va\x00lue"}),
        "request.data ": pb.Request(type="echo", data={"k\x00ey": "value"}),
        "request.input.type_url": typed,
        "request.type": pb.Request(type="ec\x00ho"),
        "request.id": pb.Request(type="echo", id="a\x00b"),
        "request.parent_id": pb.Request(type="echo", parent_id="p\x00"),
    }


async def test_nul_is_refused_naming_the_field_and_fails_no_other_submit(stub: pb_grpc.JobServiceStub) -> None:
    bad = hostile_requests()

    async def submit(request: pb.Request) -> pb.SubmitRequestResponse | grpc.aio.AioRpcError:
        try:
            return await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
        except grpc.aio.AioRpcError as error:
            return error

    good = [pb.Request(type="echo", id=f"good-{i}", data={"n": str(i)}) for i in range(24)]
    # Bad and good requests together, so that a store committing writes in groups gets both at once.
    answers = await asyncio.gather(*(submit(r) for r in [*good[:12], *bad.values(), *good[12:]]))
    bad_answers = answers[12 : 12 + len(bad)]
    good_answers = answers[:12] + answers[12 + len(bad) :]
    for field, answer in zip(bad, bad_answers, strict=True):
        assert isinstance(answer, grpc.aio.AioRpcError), field
        assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, answer.details())
        assert violations(answer) == [field.strip()]
    assert all(isinstance(answer, pb.SubmitRequestResponse) and answer.created for answer in good_answers)
    for request in good:
        finals = [m.response async for m in stub.WatchJob(pb.WatchJobRequest(request_id=request.id))]
        assert finals[-1].state == State.REQUEST_STATE_FINISHED


async def test_reads_refuse_what_no_store_can_hold(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(pb.SubmitRequestRequest(request=pb.Request(type="echo", id="known")))
    calls = {
        "types[0]": stub.ListJobs(pb.ListJobsRequest(types=["ec\x00ho"])),
        "parent_id": stub.ListJobs(pb.ListJobsRequest(parent_id="known\x00")),
        "after_sequence": stub.WatchJob(pb.WatchJobRequest(request_id="known", after_sequence=2**63)).read(),
        "request_id": stub.GetJob(pb.GetJobRequest(request_id="kno\x00wn")),
        "view": stub.GetJob(pb.GetJobRequest(request_id="known", view=7)),  # type: ignore[arg-type]
        "order_by": stub.ListJobs(pb.ListJobsRequest(order_by="priority desc")),
    }
    for field, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, raised.value.details())
        assert violations(raised.value) == [field]
    # The largest sequence a store holds is a valid (empty) resume point.
    assert [m async for m in stub.WatchJob(pb.WatchJobRequest(request_id="known", after_sequence=2**63 - 1))] == []


async def test_a_forged_page_token_cursor_is_invalid_argument(stub: pb_grpc.JobServiceStub) -> None:
    from ajs_grpc.connectors.base import JobFilter

    honest = encode_page_token(1, JobFilter())
    body = json.loads(base64.urlsafe_b64decode(honest + "=" * (-len(honest) % 4)))
    for cursor in (2**63, 2**64 + 5, -1, 1.5, True):
        body["c"] = cursor
        forged = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListJobs(pb.ListJobsRequest(page_token=forged))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, cursor
        assert violations(raised.value) == ["page_token"]
