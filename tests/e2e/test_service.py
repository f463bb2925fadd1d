"""JobService end to end: a real grpc.aio server on 127.0.0.1:0 driven through the generated stubs."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.helpers import eventually

State = pb.RequestState


def submit_request(type_: str = "echo", request_id: str = "", **data: str) -> pb.SubmitRequestRequest:
    return pb.SubmitRequestRequest(request=pb.Request(id=request_id, type=type_, data=data))


async def watch(stub: pb_grpc.JobServiceStub, request_id: str, after: int = 0) -> list[pb.Response]:
    return [m.response async for m in stub.WatchJob(pb.WatchJobRequest(request_id=request_id, after_sequence=after))]


def details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    return status


def bad_request(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    for detail in details(error).details:
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            return [(v.field, v.description) for v in found.field_violations]
    raise AssertionError("no BadRequest detail")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for detail in details(error).details:
        found = error_details_pb2.ErrorInfo()
        if detail.Unpack(found):
            return found
    raise AssertionError("no ErrorInfo detail")


# -- the happy path ------------------------------------------------------------


async def test_submit_then_watch_to_the_final_response(stub: pb_grpc.JobServiceStub) -> None:
    reply = await stub.SubmitRequest(submit_request("steps", n="3"))
    assert reply.created
    job = reply.job
    assert job.request.id  # server-assigned UUID
    assert job.request.create_time.seconds > 0
    assert job.state == State.REQUEST_STATE_CREATED
    responses = await watch(stub, job.request.id)
    assert [r.sequence for r in responses] == [1, 2, 3, 4, 5, 6]
    assert [r.is_final for r in responses] == [False] * 5 + [True]
    assert responses[-1].state == State.REQUEST_STATE_FINISHED
    assert responses[-1].data == {"steps": "3", "attempt": "1"}
    assert [round(r.progress.fraction, 3) for r in responses[2:5]] == [0.333, 0.667, 1.0]


async def test_typed_input_is_decoded_for_the_job_and_its_output_returned(stub: pb_grpc.JobServiceStub) -> None:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value="hello"))
    request = pb.Request(id="typed", type="shout", input=payload)
    reply = await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    assert reply.job.request.input == payload
    final = (await watch(stub, "typed"))[-1]
    assert final.state == State.REQUEST_STATE_FINISHED
    output = wrappers_pb2.StringValue()
    assert final.output.Unpack(output)
    assert output.value == "HELLO"


def packed(message: Message) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(message)
    return payload


@pytest.mark.parametrize(
    ("type_", "payload", "says"),
    [
        ("shout", None, "is required"),
        ("shout", packed(wrappers_pb2.Int64Value(value=1)), "must hold a google.protobuf.StringValue"),
        (
            "shout",
            any_pb2.Any(type_url="type.googleapis.com/google.protobuf.StringValue", value=b"\x0a\x05ab"),
            "not a valid",
        ),
        ("echo", packed(wrappers_pb2.StringValue(value="x")), "takes no typed input"),
    ],
)
async def test_a_wrong_input_is_invalid_argument_naming_request_input(
    stub: pb_grpc.JobServiceStub, type_: str, payload: any_pb2.Any | None, says: str
) -> None:
    request = pb.Request(type=type_)
    if payload is not None:
        request.input.CopyFrom(payload)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(raised.value)
    assert [field for field, _ in violations] == ["request.input"]
    assert says in violations[0][1]
    assert list((await stub.ListJobs(pb.ListJobsRequest())).jobs) == []


async def test_an_input_over_the_limit_is_invalid_argument(server: AjsServer, stub: pb_grpc.JobServiceStub) -> None:
    server.service.limits = dataclasses.replace(server.service.limits, max_input_bytes=100)
    request = pb.Request(type="shout", input=packed(wrappers_pb2.StringValue(value="x" * 200)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "INPUT_TOO_LARGE"
    assert "more than the limit of 100" in bad_request(raised.value)[0][1]


async def test_an_output_of_the_wrong_type_fails_the_job(stub: pb_grpc.JobServiceStub) -> None:
    reply = await stub.SubmitRequest(submit_request("wrong_output"))
    final = (await watch(stub, reply.job.request.id))[-1]
    assert final.state == State.REQUEST_STATE_FAILED
    assert "not the google.protobuf.StringValue it declares" in final.error.message


async def test_watching_a_finished_job_replays_and_ends(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("echo", "done", k="v"))
    first = await watch(stub, "done")
    assert first[-1].is_final
    assert await watch(stub, "done") == first
    assert await watch(stub, "done", after=first[-1].sequence) == []
    assert await watch(stub, "done", after=1) == first[1:]


async def test_submit_is_idempotent_on_id(stub: pb_grpc.JobServiceStub) -> None:
    first = await stub.SubmitRequest(submit_request("steps", "same", n="1"))
    again = await stub.SubmitRequest(submit_request("steps", "same", n="1"))
    assert first.created
    assert not again.created
    assert again.job.request.id == "same"
    assert again.job.request.create_time == first.job.request.create_time


async def test_get_and_list_with_filters_and_paging(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("echo", "parent"))
    for i in range(5):
        request = pb.Request(id=f"child{i}", type="echo" if i % 2 else "boom", parent_id="parent")
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    for i in range(5):
        await watch(stub, f"child{i}")
    got = await stub.GetJob(pb.GetJobRequest(request_id="child1"))
    assert got.job.state == State.REQUEST_STATE_FINISHED
    assert got.job.attempt == 1
    assert got.job.last_response.is_final

    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token, parent_id="parent"))
        assert len(page.jobs) <= 2
        ids += [job.request.id for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert ids == [f"child{i}" for i in range(5)]

    failed = await stub.ListJobs(pb.ListJobsRequest(states=[State.REQUEST_STATE_FAILED]))
    assert [job.request.id for job in failed.jobs] == ["child0", "child2", "child4"]
    echo = await stub.ListJobs(pb.ListJobsRequest(types=["echo"], parent_id="parent"))
    assert [job.request.id for job in echo.jobs] == ["child1", "child3"]


async def test_cancel_a_queued_and_a_running_job(server: AjsServer, stub: pb_grpc.JobServiceStub) -> None:
    # Fill every slot so the last job stays queued.
    for i in range(server.config.max_concurrent_jobs):
        await stub.SubmitRequest(submit_request("block", f"running{i}"))
    await stub.SubmitRequest(submit_request("block", "queued"))
    await eventually(lambda: len(server.dispatcher.running) == server.config.max_concurrent_jobs)

    queued = await stub.CancelJob(pb.CancelJobRequest(request_id="queued"))
    assert queued.job.state == State.REQUEST_STATE_CANCELLED
    assert queued.job.last_response.error.code == grpc.StatusCode.CANCELLED.value[0]

    running = await stub.CancelJob(pb.CancelJobRequest(request_id="running0"))
    assert running.job.state == State.REQUEST_STATE_PENDING
    assert running.job.cancel_requested
    responses = await watch(stub, "running0")
    assert responses[-1].state == State.REQUEST_STATE_CANCELLED
    for i in range(1, server.config.max_concurrent_jobs):
        await stub.CancelJob(pb.CancelJobRequest(request_id=f"running{i}"))


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.Request(type=""), "request.type"),
        (pb.Request(type="x" * 129), "request.type"),
        (pb.Request(type="has space"), "request.type"),
        (pb.Request(type="echo", id="i" * 129), "request.id"),
        (pb.Request(type="echo", id="with space"), "request.id"),
        (pb.Request(type="echo", id="self", parent_id="self"), "request.parent_id"),
    ],
)
async def test_invalid_requests_name_the_bad_field(
    stub: pb_grpc.JobServiceStub, request_: pb.Request, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request_))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(raised.value)] == [field]
    listed = await stub.ListJobs(pb.ListJobsRequest())
    assert list(listed.jobs) == []  # nothing half-written


async def test_run_after_out_of_range_is_invalid(stub: pb_grpc.JobServiceStub) -> None:
    request = pb.Request(type="echo")
    request.run_after.seconds = 10**12  # year 33658
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(raised.value)] == ["request.run_after"]


async def test_priority_run_after_and_max_attempts_round_trip(stub: pb_grpc.JobServiceStub) -> None:
    request = pb.Request(id="p", type="echo", priority=-7)
    request.run_after.FromSeconds(4_000_000_000)
    reply = await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))
    job = (await stub.GetJob(pb.GetJobRequest(request_id="p"))).job
    assert job.request.priority == -7
    assert job.request.run_after.seconds == 4_000_000_000
    assert job.due_time == job.request.run_after
    assert job.max_attempts == reply.job.max_attempts == 3  # the echo job's default retry policy
    again = pb.Request(id="p", type="echo", priority=1, run_after=request.run_after)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=again))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_missing_request_is_invalid(stub: pb_grpc.JobServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value) == [("request", "is required")]


async def test_a_type_no_handler_runs_is_refused_at_submit(server: AjsServer, stub: pb_grpc.JobServiceStub) -> None:
    # Made-up types are not queued: each would also grow the metric series without bound.
    for made_up in ("nobody.runs.this", "another.one"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SubmitRequest(submit_request(made_up))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(raised.value)
        assert info.reason == "TYPE_NOT_SUPPORTED"
        assert info.metadata["type"] == made_up
        assert "echo" in info.metadata["known_types"].split(",")
    assert await server.connector.count_jobs(RequestState.CREATED) == 0


async def test_a_frontend_queues_types_it_does_not_know(server_config: ServerConfig) -> None:
    # Its workers may run types it has no plugin for: it cannot know, so it queues them.
    config = dataclasses.replace(server_config, role="frontend")
    frontend = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await frontend.start()
    try:
        async with grpc.aio.insecure_channel(frontend.address) as channel:
            reply = await pb_grpc.JobServiceStub(channel).SubmitRequest(submit_request("runs.on.a.worker"))
        assert reply.created
        assert reply.job.state == State.REQUEST_STATE_CREATED
    finally:
        await frontend.stop()


async def test_a_raising_job_fails_with_its_message(stub: pb_grpc.JobServiceStub) -> None:
    reply = await stub.SubmitRequest(submit_request("boom", message="out of cheese"))
    final = (await watch(stub, reply.job.request.id))[-1]
    assert final.state == State.REQUEST_STATE_FAILED
    assert final.error.message == "out of cheese"


async def test_same_id_different_content_is_already_exists(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("echo", "dup", k="1"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(submit_request("echo", "dup", k="2"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(raised.value)
    assert info.reason == "REQUEST_ID_TAKEN"
    assert info.domain == "ajs.v1"
    assert info.metadata["request_id"] == "dup"


async def test_unknown_parent_is_not_found(stub: pb_grpc.JobServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(pb.SubmitRequestRequest(request=pb.Request(type="echo", parent_id="ghost")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "PARENT_NOT_FOUND"


async def test_unknown_ids_are_not_found(stub: pb_grpc.JobServiceStub) -> None:
    calls = [
        stub.GetJob(pb.GetJobRequest(request_id="ghost")),
        stub.CancelJob(pb.CancelJobRequest(request_id="ghost")),
        watch(stub, "ghost"),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(raised.value).reason == "REQUEST_NOT_FOUND"


async def test_empty_ids_are_invalid(stub: pb_grpc.JobServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetJob(pb.GetJobRequest(request_id=""))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(raised.value) == [("request_id", "must not be empty")]


async def test_cancel_finished_job_is_failed_precondition(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("echo", "over"))
    await watch(stub, "over")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CancelJob(pb.CancelJobRequest(request_id="over"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "REQUEST_ALREADY_FINAL"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListJobsRequest(page_size=-1), "page_size"),
        (pb.ListJobsRequest(page_token="not a token"), "page_token"),
        (pb.ListJobsRequest(page_token="eyJ2IjoxLCJjIjotMSwiZiI6IngifQ"), "page_token"),
        (pb.ListJobsRequest(states=[99]), "states"),  # type: ignore[list-item]
        (pb.ListJobsRequest(states=[State.REQUEST_STATE_UNSPECIFIED]), "states"),
        # A deeply nested JSON document in the token must not crash the parser.
        (pb.ListJobsRequest(page_token=base64.urlsafe_b64encode(b"[" * 200_000).decode()), "page_token"),
    ],
)
async def test_bad_list_arguments_are_invalid(
    stub: pb_grpc.JobServiceStub, request_: pb.ListJobsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListJobs(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(raised.value)] == [field]


async def test_page_token_is_bound_to_its_filters(stub: pb_grpc.JobServiceStub) -> None:
    for i in range(3):
        await stub.SubmitRequest(submit_request("echo", f"r{i}"))
    page = await stub.ListJobs(pb.ListJobsRequest(page_size=1, types=["echo"]))
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=page.next_page_token, types=["other"]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different filters" in (raised.value.details() or "")


async def test_page_size_is_capped_not_refused(stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("echo", "one"))
    page = await stub.ListJobs(pb.ListJobsRequest(page_size=1_000_000))
    assert len(page.jobs) == 1
    assert not page.next_page_token


async def test_undecodable_bytes_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    raw = channel.unary_unary("/ajs.v1.JobService/SubmitRequest")
    for garbage in (b"\xff\xff\xff", b"\x0a\x05\x0a\x10ab"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw(garbage)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(raised.value).reason == "UNDECODABLE_REQUEST"


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    raw = channel.unary_unary("/ajs.v1.JobService/GetJob")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x0a\x02\xc3\x28")  # request_id = invalid UTF-8
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- streams, health, reflection --------------------------------------------------


async def test_a_dropped_watch_is_cleaned_up(server: AjsServer, stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("block", "long"))
    calls = [stub.WatchJob(pb.WatchJobRequest(request_id="long")) for _ in range(5)]
    for call in calls:
        assert (await call.read()).response.sequence == 1
    assert server.connector.watcher_count == 5
    for call in calls:
        call.cancel()
    await eventually(lambda: server.connector.watcher_count == 0)
    await stub.CancelJob(pb.CancelJobRequest(request_id="long"))


async def test_health_check_and_watch(server: AjsServer, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "ajs.v1.JobService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))  # type: ignore[attr-defined]
        assert reply.status == serving
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))  # type: ignore[attr-defined]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    statuses = health.Watch(health_pb2.HealthCheckRequest(service="ajs.v1.JobService"))  # type: ignore[attr-defined]
    assert (await statuses.read()).status == serving
    stopping = asyncio.create_task(server.stop())
    assert (await statuses.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    statuses.cancel()  # an open watch would hold the server for its RPC grace period
    await stopping


async def test_submits_are_refused_while_draining(server: AjsServer, stub: pb_grpc.JobServiceStub) -> None:
    await stub.SubmitRequest(submit_request("stubborn", "busy"))
    await eventually(lambda: "busy" in server.dispatcher.running)
    stopping = asyncio.create_task(server.stop())
    await eventually(lambda: not server.service.accepting)  # draining
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitRequest(submit_request("echo"))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(raised.value).reason == "DRAINING"
    got = await stub.GetJob(pb.GetJobRequest(request_id="busy"))  # reads still work
    assert got.job.state == State.REQUEST_STATE_PENDING
    await stopping


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))  # type: ignore[attr-defined]
    names = {service.name async for reply in replies for service in reply.list_services_response.service}
    assert {"ajs.v1.JobService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
