"""google.longrunning.Operations over the jobs, against a real server, through the generated stubs alone.

Jobs are submitted with the Python client; every Operations call goes through the
``OperationsStub`` googleapis-common-protos ships, over a plain ``grpc.aio`` channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from ajs_examples.jobs import countdown
from google.longrunning import operations_pb2_grpc, operations_proto_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.model import Request
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from tests import jobs_for_tests
from tests.e2e.test_service import bad_request, error_info
from tests.helpers import eventually_reads

TOKENS = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[tokens]]
sha256 = "{bob}"
principal = "bob"

[[tokens]]
sha256 = "{root}"
principal = "root"
roles = ["admin"]
"""

# Long enough never to end by itself during a test; cancelled at its end.
FOREVER = {"steps": "100000", "interval": "1"}


@dataclasses.dataclass
class Served:
    server: AjsServer
    channel: grpc.aio.Channel

    def stub(self) -> operations_pb2_grpc.OperationsStub:
        return operations_pb2_grpc.OperationsStub(self.channel)

    def client(self, who: str) -> AsyncClient:
        return AsyncClient(self.server.address, timeout=10, token=f"{who}-token")


def auth(who: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {who}-token"),)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root")}))
    config = ServerConfig(address="127.0.0.1:0", tokens_file=str(tokens), shutdown_grace=0.5, cancel_grace=0.5)
    chain = jobs_for_tests.chain([*jobs_for_tests.ALL, countdown])
    server = AjsServer(config, connector=MemoryConnector(), chain=chain)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Served(server, channel)
    finally:
        await server.stop()


def job_of(operation: operations_proto_pb2.Operation) -> pb.Job:
    job = pb.Job()
    assert operation.metadata.Unpack(job)
    return job


async def fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(int(value * 1000))
    return duration


# -- one operation's life ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_running_countdown_is_got_then_waited_for_until_done(served: Served) -> None:
    stub = served.stub()
    async with served.client("alice") as alice:
        await alice.submit("countdown", {"steps": "3", "interval": "0.2"}, id="count/1@v2")
        name = "operations/count/1@v2"  # everything after the prefix is the id, '/' and '@' included
        running = await eventually_reads(
            lambda: stub.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), metadata=auth("alice")),
            lambda operation: job_of(operation).state == pb.REQUEST_STATE_PENDING,
        )
        assert running.name == name
        assert not running.done
        assert running.WhichOneof("result") is None
        job = job_of(running)
        assert job.request.id == "count/1@v2"  # in the caller's names
        assert job.request.type == "countdown"
        assert job.request.data["steps"] == "3"  # the whole Job: its request's payloads too

        done = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name=name, timeout=seconds(30)), metadata=auth("alice")
        )
        assert done.done
        assert done.WhichOneof("result") == "response"
        final = pb.Response()
        assert done.response.Unpack(final)  # no typed output: the final Response itself
        assert final.state == pb.REQUEST_STATE_FINISHED
        assert final.is_final
        assert final.data["steps"] == "3"
        assert final.request_id == "count/1@v2"
        job = job_of(done)
        assert job.state == pb.REQUEST_STATE_FINISHED
        assert job.last_response.sequence == final.sequence
        assert not job.last_response.data  # carried by response, not repeated

        again = await stub.WaitOperation(operations_proto_pb2.WaitOperationRequest(name=name), metadata=auth("alice"))
        assert again == done  # a done operation is answered at once


async def test_a_typed_output_is_the_response_and_a_failure_the_error(served: Served) -> None:
    stub = served.stub()
    async with served.client("alice") as alice:
        await alice.submit("shout", input=wrappers_pb2.StringValue(value="hi"), id="loud")
        await alice.submit("boom", id="broken")
        loud = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/loud"), metadata=auth("alice")
        )
        assert loud.done
        output = wrappers_pb2.StringValue()
        assert loud.response.Unpack(output)
        assert output.value == "HI"
        assert not job_of(loud).last_response.HasField("output")

        broken = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/broken"), metadata=auth("alice")
        )
        assert broken.done
        assert broken.WhichOneof("result") == "error"
        assert broken.error.code == grpc.StatusCode.UNKNOWN.value[0]
        assert broken.error.message
        assert job_of(broken).state == pb.REQUEST_STATE_FAILED


async def test_a_wait_that_times_out_answers_the_latest_state(served: Served) -> None:
    stub = served.stub()
    async with served.client("alice") as alice:
        await alice.submit("countdown", FOREVER, id="long")
        waited = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/long", timeout=seconds(0.2)),
            metadata=auth("alice"),
        )
        assert not waited.done
        assert job_of(waited).state in (pb.REQUEST_STATE_CREATED, pb.REQUEST_STATE_PENDING)
        # A zero timeout answers at once, as GetOperation does.
        now = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/long", timeout=seconds(0)),
            metadata=auth("alice"),
        )
        assert not now.done
        # Without a timeout (60 s), the call's deadline bounds the wait: the latest state comes before it.
        before_deadline = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/long"), metadata=auth("alice"), timeout=1.5
        )
        assert not before_deadline.done
        await alice.cancel("long")


async def test_cancel_ends_the_operation_cancelled_and_delete_removes_it_once_done(served: Served) -> None:
    stub = served.stub()
    name = "operations/long"
    async with served.client("alice") as alice:
        await alice.submit("countdown", FOREVER, id="long")
        await eventually_reads(
            lambda: stub.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), metadata=auth("alice")),
            lambda operation: job_of(operation).state == pb.REQUEST_STATE_PENDING,
        )
        # Deleting does not cancel: an operation not done cannot be deleted.
        refused = await fails(
            stub.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name), metadata=auth("alice"))
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused).reason == "REQUEST_NOT_ENDED"

        await stub.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name), metadata=auth("alice"))
        cancelled = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name=name, timeout=seconds(30)), metadata=auth("alice")
        )
        assert cancelled.done
        assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]  # 1, as google.longrunning has it
        assert job_of(cancelled).state == pb.REQUEST_STATE_CANCELLED

        # Cancelling a done operation fails, as CancelJob does.
        late = await fails(
            stub.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name), metadata=auth("alice"))
        )
        assert late.code() == grpc.StatusCode.FAILED_PRECONDITION

        await stub.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name), metadata=auth("alice"))
        gone = await fails(
            stub.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), metadata=auth("alice"))
        )
        assert gone.code() == grpc.StatusCode.NOT_FOUND


# -- lists ---------------------------------------------------------------------------


async def list_all(
    stub: operations_pb2_grpc.OperationsStub, who: str, filter_text: str = "", page_size: int = 0
) -> list[list[str]]:
    """The names of every page of a ListOperations call (each page's names in a list)."""
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await stub.ListOperations(
            operations_proto_pb2.ListOperationsRequest(
                name="operations", filter=filter_text, page_size=page_size, page_token=token
            ),
            metadata=auth(who),
        )
        pages.append([operation.name for operation in reply.operations])
        token = reply.next_page_token
        if not token:
            return pages


@pytest.mark.timeout(60)
async def test_list_filters_on_state_type_and_done_and_pages(served: Served) -> None:
    stub = served.stub()
    async with served.client("alice") as alice:
        for index in range(5):
            await alice.submit("echo", {"n": str(index)}, id=f"echo-{index}")
        await alice.submit("boom", id="broken")
        await alice.submit("countdown", FOREVER, id="long")
        await alice.cancel((await alice.submit("countdown", FOREVER, id="dropped")).job.request.id)
        await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/broken"), metadata=auth("alice")
        )
        for index in range(5):
            await stub.WaitOperation(
                operations_proto_pb2.WaitOperationRequest(name=f"operations/echo-{index}"), metadata=auth("alice")
            )

        echoes = [f"operations/echo-{index}" for index in range(5)]
        assert await list_all(stub, "alice", 'type = "echo"', page_size=2) == [echoes[0:2], echoes[2:4], echoes[4:]]
        assert await list_all(stub, "alice", "metadata.request.type = echo AND done = true") == [echoes]
        assert await list_all(stub, "alice", "state = FAILED") == [["operations/broken"]]
        assert await list_all(stub, "alice", "state = REQUEST_STATE_CANCELLED") == [["operations/dropped"]]
        assert await list_all(stub, "alice", "done = false") == [["operations/long"]]
        assert await list_all(stub, "alice", "(state = FAILED OR state = cancelled) AND type = boom") == [
            ["operations/broken"]
        ]
        # OR binds tighter than AND (AIP-160): the same as with the parentheses.
        assert await list_all(stub, "alice", "state = FAILED OR state = CANCELLED AND type = countdown") == [
            ["operations/dropped"]
        ]
        assert await list_all(stub, "alice", "type = echo AND state != FINISHED") == [[]]
        assert await list_all(stub, "alice", "done = true AND state = PENDING") == [[]]  # matches nothing
        everything = (await list_all(stub, "alice"))[0]
        assert everything == [*echoes, "operations/broken", "operations/long", "operations/dropped"]
        listed = await stub.ListOperations(
            operations_proto_pb2.ListOperationsRequest(filter="state = FAILED"), metadata=auth("alice")
        )
        assert listed.operations[0].error.code == grpc.StatusCode.UNKNOWN.value[0]  # a whole Operation

        # A page token belongs to its filter.
        first = await stub.ListOperations(
            operations_proto_pb2.ListOperationsRequest(filter="type = echo", page_size=2), metadata=auth("alice")
        )
        mixed = await fails(
            stub.ListOperations(
                operations_proto_pb2.ListOperationsRequest(filter="type = boom", page_token=first.next_page_token),
                metadata=auth("alice"),
            )
        )
        assert mixed.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in bad_request(mixed)] == ["page_token"]
        await alice.cancel("long")


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "long", "jobs/long", "operations/", "operations/has space", "operations"])
async def test_a_bad_name_is_invalid_argument_naming_the_field(served: Served, name: str) -> None:
    stub = served.stub()
    for call in (
        stub.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), metadata=auth("alice")),
        stub.WaitOperation(operations_proto_pb2.WaitOperationRequest(name=name), metadata=auth("alice")),
        stub.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name), metadata=auth("alice")),
        stub.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name), metadata=auth("alice")),
    ):
        error = await fails(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in bad_request(error)] == ["name"]


@pytest.mark.parametrize(
    "text",
    [
        "state = RUNNING",
        "state = UNSPECIFIED",
        "status = FAILED",
        "type != echo",
        "type = echo OR state = FAILED",
        "type = echo state = FAILED",
        "NOT state = FAILED",
        "state = FAILED AND",
        "(state = FAILED",
        'type = "unterminated',
        "done = maybe",
        "type = 'echo'",
        "type = echo$",
        "state < FAILED",
        "parent_id = a OR parent_id = b",
        "type = " + "x" * 3000,
    ],
)
async def test_a_bad_filter_is_invalid_argument_on_filter(served: Served, text: str) -> None:
    error = await fails(
        served.stub().ListOperations(operations_proto_pb2.ListOperationsRequest(filter=text), metadata=auth("alice"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in bad_request(error)] == ["filter"]


async def test_other_bad_requests(served: Served) -> None:
    stub = served.stub()
    unknown = await fails(
        stub.GetOperation(operations_proto_pb2.GetOperationRequest(name="operations/nope"), metadata=auth("alice"))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown).reason == "REQUEST_NOT_FOUND"
    collection = await fails(
        stub.ListOperations(operations_proto_pb2.ListOperationsRequest(name="jobs"), metadata=auth("alice"))
    )
    assert [field for field, _ in bad_request(collection)] == ["name"]
    negative = duration_pb2.Duration(seconds=-1)
    async with served.client("alice") as alice:
        await alice.submit("echo", id="here")
    backwards = await fails(
        stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/here", timeout=negative), metadata=auth("alice")
        )
    )
    assert [field for field, _ in bad_request(backwards)] == ["timeout"]
    size = await fails(
        stub.ListOperations(operations_proto_pb2.ListOperationsRequest(page_size=-1), metadata=auth("alice"))
    )
    assert [field for field, _ in bad_request(size)] == ["page_size"]
    anonymous = await fails(stub.GetOperation(operations_proto_pb2.GetOperationRequest(name="operations/here")))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


# -- ownership -------------------------------------------------------------------------


async def test_another_principals_operation_is_unknown_but_an_admin_sees_all(served: Served) -> None:
    stub = served.stub()
    async with served.client("alice") as alice, served.client("bob") as bob:
        await alice.submit("countdown", FOREVER, id="mine")
        await bob.submit("echo", id="his")
        for name in ("operations/mine", "operations/~alice/mine"):
            for call in (
                stub.GetOperation(operations_proto_pb2.GetOperationRequest(name=name), metadata=auth("bob")),
                stub.WaitOperation(
                    operations_proto_pb2.WaitOperationRequest(name=name, timeout=seconds(0.1)), metadata=auth("bob")
                ),
                stub.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name), metadata=auth("bob")),
                stub.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name), metadata=auth("bob")),
            ):
                error = await fails(call)
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert error_info(error).reason == "REQUEST_NOT_FOUND"
        assert await list_all(stub, "bob") == [["operations/his"]]
        assert await list_all(stub, "alice") == [["operations/mine"]]
        # The admin sees every namespace and names each operation by its stored id.
        assert await list_all(stub, "root") == [["operations/~alice/mine", "operations/~bob/his"]]
        seen = await stub.GetOperation(
            operations_proto_pb2.GetOperationRequest(name="operations/~alice/mine"), metadata=auth("root")
        )
        assert job_of(seen).request.creator == "alice"
        await stub.CancelOperation(
            operations_proto_pb2.CancelOperationRequest(name="operations/~alice/mine"), metadata=auth("root")
        )
        ended = await stub.WaitOperation(
            operations_proto_pb2.WaitOperationRequest(name="operations/mine", timeout=seconds(30)),
            metadata=auth("alice"),
        )
        assert ended.done
        assert ended.error.code == grpc.StatusCode.CANCELLED.value[0]


# -- discovery -------------------------------------------------------------------------


async def test_the_service_is_in_health_and_reflection(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="google.longrunning.Operations"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    await call.done_writing()
    assert isinstance(answer, reflection_pb2.ServerReflectionResponse)
    assert "google.longrunning.Operations" in {service.name for service in answer.list_services_response.service}


async def test_a_worker_answers_operations_with_where_to_go() -> None:
    config = ServerConfig(address="127.0.0.1:0", role="worker", shutdown_grace=0.5)
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = operations_pb2_grpc.OperationsStub(channel)
            error = await fails(stub.GetOperation(operations_proto_pb2.GetOperationRequest(name="operations/x")))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert error_info(error).reason == "WORKER_ONLY"
    finally:
        await server.stop()


async def test_a_page_of_operations_ends_before_its_reply_outgrows_the_message_limit() -> None:
    limit = 40_000
    config = ServerConfig(address="127.0.0.1:0", max_message_bytes=limit, shutdown_grace=0.5)
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        async with AsyncClient(server.address, timeout=10) as client:
            await client.submit_many([Request(id=f"n-{index:03}", type="noop") for index in range(400)])
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = operations_pb2_grpc.OperationsStub(channel)
            names: list[str] = []
            token = ""
            while True:
                # An Operation is larger than its Job (it names it, and a done one repeats its final Response).
                reply = await stub.ListOperations(
                    operations_proto_pb2.ListOperationsRequest(page_size=1000, page_token=token)
                )
                assert reply.ByteSize() <= limit
                names += [operation.name for operation in reply.operations]
                token = reply.next_page_token
                if not token:
                    break
            assert names == [f"operations/n-{index:03}" for index in range(400)]
    finally:
        await server.stop()
