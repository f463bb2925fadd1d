"""Remote workers: WorkerService sessions, the remote handler and the Python worker, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import AjsError, Code, PermanentError, Retry
from ajs_grpc.core.jobs import JobContext, JobPlugin, Result, RetryPolicy
from ajs_grpc.core.model import Request, RequestState, Response
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.engine.handlers.remote import RemoteRequestHandler
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import worker_service_pb2 as wpb
from ajs_grpc.proto.ajs.v1 import worker_service_pb2_grpc as wpb_grpc
from ajs_grpc.worker import Worker
from tests import jobs_for_tests
from tests.helpers import eventually, eventually_reads

S = RequestState
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, jitter=0)


@dataclasses.dataclass
class Gate:
    """What the test jobs report and wait for."""

    started: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)  # (request id, attempt, worker)
    running: int = 0
    most_running: int = 0
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancel_reasons: list[str] = dataclasses.field(default_factory=list)
    deadlines: list[object] = dataclasses.field(default_factory=list)


GATE = Gate()


@pytest.fixture(autouse=True)
def gate() -> Gate:
    global GATE
    GATE = Gate()
    return GATE


async def reverse(request: Request, ctx: JobContext) -> wrappers_pb2.StringValue:
    assert isinstance(ctx.input, wrappers_pb2.StringValue)
    for step in (1, 2, 3):
        await ctx.progress(step / 3, f"step {step}")
    return wrappers_pb2.StringValue(value=ctx.input.value[::-1])


def held(worker_name: str) -> JobPlugin:
    """A job that runs until the test releases it (or it is cancelled), counting how many run at once."""

    async def run(request: Request, ctx: JobContext) -> Result:
        GATE.started.append((request.id, ctx.attempt, worker_name))
        GATE.deadlines.append(ctx.deadline)
        GATE.running += 1
        GATE.most_running = max(GATE.most_running, GATE.running)
        try:
            release = asyncio.ensure_future(GATE.release.wait())
            cancelled = asyncio.ensure_future(ctx.wait_cancelled())
            await asyncio.wait({release, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            release.cancel()
            cancelled.cancel()
            if ctx.cancelled:
                GATE.cancel_reasons.append(ctx.cancel_signal.reason)
                ctx.raise_if_cancelled()
            return Result({"worker": worker_name, "attempt": str(ctx.attempt)})
        finally:
            GATE.running -= 1

    return JobPlugin("held", run, "waits for the test", retry=FAST)


async def flaky(request: Request, ctx: JobContext) -> dict[str, str]:
    if ctx.attempt < 2:
        raise RuntimeError("first attempts fail")
    return {"attempt": str(ctx.attempt)}


async def refuses(request: Request, ctx: JobContext) -> None:
    raise PermanentError("bad data", reason="BAD_DATA", metadata={"field": "x"})


async def later(request: Request, ctx: JobContext) -> None:
    raise Retry("not yet", delay=0.3)


REVERSE = JobPlugin(
    "reverse", reverse, "reverses a string", input_type=wrappers_pb2.StringValue, output_type=wrappers_pb2.StringValue
)
FLAKY = JobPlugin("flaky", flaky, retry=FAST)
REFUSES = JobPlugin("refuses", refuses, retry=FAST)
LATER = JobPlugin("later", later, retry=RetryPolicy(max_attempts=2, initial_backoff=10, jitter=0))


def remote_chain(expected: Iterable[str] = ()) -> HandlerChain:
    internal = InternalAsyncRequestHandler()
    internal.register(jobs_for_tests.echo)
    remote = RemoteRequestHandler()
    for name in expected:
        remote.expect(name)
    return HandlerChain([internal, remote], RejectRequestHandler())


@contextlib.asynccontextmanager
async def serving(config: ServerConfig | None = None, chain: HandlerChain | None = None) -> AsyncIterator[AjsServer]:
    config = config or ServerConfig(address="127.0.0.1:0", cancel_grace=0.5, shutdown_grace=0.5, worker_heartbeat=1.0)
    server = AjsServer(config, connector=MemoryConnector(), chain=chain or remote_chain())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def working(
    server: AjsServer, plugins: list[JobPlugin], *, name: str = "w1", max_concurrent: int = 4, token: str | None = None
) -> AsyncIterator[Worker]:
    """A Python remote worker running ``plugins``, registered before the block starts."""
    worker = Worker(plugins, server.address, name=name, max_concurrent=max_concurrent, token=token, cancel_grace=0.5)
    task = asyncio.create_task(worker.run())
    registered = asyncio.create_task(worker.registered.wait())
    await asyncio.wait({task, registered}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        registered.cancel()
        task.result()  # raises why it could not register
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def server() -> AsyncIterator[AjsServer]:
    async with serving() as started:
        yield started


@pytest.fixture
async def client(server: AjsServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=10) as opened:
        yield opened


async def ended(client: AsyncClient, request_id: str) -> list[Response]:
    return [r async for r in client.watch(request_id)]


# -- running jobs remotely --------------------------------------------------------------


async def test_a_typed_job_runs_in_a_remote_worker_with_progress_watched(
    server: AjsServer, client: AsyncClient
) -> None:
    async with working(server, [REVERSE]):
        submitted = await client.submit("reverse", input=wrappers_pb2.StringValue(value="stressed"))
        responses = await ended(client, submitted.job.request.id)
    assert [r.progress.message for r in responses if r.progress] == ["step 1", "step 2", "step 3"]
    final = responses[-1]
    assert final.state is S.FINISHED
    assert final.is_final
    output = wrappers_pb2.StringValue()
    assert isinstance(final.output, any_pb2.Any)
    assert final.output.Unpack(output)
    assert output.value == "desserts"


async def test_list_job_types_shows_remote_types_with_their_contract(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [REVERSE]):
        types = {t.name: t for t in await client.job_types()}
    assert types["reverse"].handler == "remote"
    assert types["reverse"].input_type == "google.protobuf.StringValue"
    assert types["reverse"].output_type == "google.protobuf.StringValue"
    assert types["reverse"].file_descriptor_set
    assert types["echo"].handler == "internal"


async def test_typed_input_of_a_remote_type_is_checked_at_submit(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [REVERSE]):
        with pytest.raises(AjsError) as refused:
            await client.submit("reverse", input=wrappers_pb2.Int32Value(value=3))
    assert refused.value.code is Code.INVALID_ARGUMENT
    assert "google.protobuf.StringValue" in refused.value.message


async def test_a_job_waits_queued_while_no_worker_runs_its_type() -> None:
    async with serving(chain=remote_chain(expected=["held"])) as server, AsyncClient(server.address) as client:
        submitted = await client.submit("held")
        request_id = submitted.job.request.id
        await asyncio.sleep(0.3)  # a claim would come within milliseconds; nothing may claim it
        job = await client.get(request_id)
        assert job.state is S.CREATED
        assert job.attempt == 0
        async with working(server, [held("w1")]):
            await eventually(lambda: len(GATE.started) == 1)
            GATE.release.set()
            final = (await ended(client, request_id))[-1]
    assert final.state is S.FINISHED
    assert final.data["attempt"] == "1"


async def test_a_type_no_worker_declared_is_refused_at_submit(client: AsyncClient) -> None:
    with pytest.raises(AjsError) as refused:
        await client.submit("held")
    assert refused.value.code is Code.FAILED_PRECONDITION
    assert refused.value.reason == "TYPE_NOT_SUPPORTED"


# -- credits, fairness and slots ----------------------------------------------------------


async def test_the_server_never_assigns_more_than_the_credit(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [held("w1")], max_concurrent=2):
        ids = [(await client.submit("held")).job.request.id for _ in range(6)]
        await eventually(lambda: GATE.running == 2)
        await asyncio.sleep(0.2)
        queued = [job for job in [await client.get(i) for i in ids] if job.state is S.CREATED]
        assert GATE.running == 2
        assert len(queued) == 4
        GATE.release.set()
        finals = [(await ended(client, i))[-1] for i in ids]
    assert all(f.state is S.FINISHED for f in finals)
    assert GATE.most_running == 2


async def test_jobs_are_shared_fairly_between_workers(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [held("w1")], name="w1"), working(server, [held("w2")], name="w2"):
        for _ in range(6):
            await client.submit("held")
        await eventually(lambda: len(GATE.started) == 6)
        by_worker = [worker for _, _, worker in GATE.started]
        GATE.release.set()
    assert by_worker.count("w1") == 3
    assert by_worker.count("w2") == 3


async def test_remote_jobs_do_not_take_the_servers_own_slots() -> None:
    config = ServerConfig(address="127.0.0.1:0", max_concurrent_jobs=1, cancel_grace=0.5, shutdown_grace=0.5)
    async with (
        serving(config) as server,
        AsyncClient(server.address) as client,
        working(server, [held("w1")], max_concurrent=3),
    ):
        for _ in range(3):
            await client.submit("held")
        await eventually(lambda: GATE.running == 3)
        echo = await client.submit("echo", data={"a": "b"})  # the server's one slot is still free
        assert (await ended(client, echo.job.request.id))[-1].state is S.FINISHED
        GATE.release.set()


# -- cancel, timeouts, failures -------------------------------------------------------------


async def test_a_cancel_reaches_the_remote_job(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [held("w1")]):
        submitted = await client.submit("held")
        await eventually(lambda: GATE.running == 1)
        await client.cancel(submitted.job.request.id)
        final = (await ended(client, submitted.job.request.id))[-1]
        await eventually(lambda: GATE.running == 0)
    assert final.state is S.CANCELLED
    assert final.error is not None
    assert final.error.reason == "CANCELLED_BY_CLIENT"
    assert GATE.cancel_reasons == ["CANCELLED_BY_CLIENT"]


async def test_a_remote_job_past_its_timeout_is_stopped_and_fails(server: AjsServer, client: AsyncClient) -> None:
    timed = dataclasses.replace(held("w1"), timeout=0.3, retry=RetryPolicy(max_attempts=1))
    async with working(server, [timed]):
        submitted = await client.submit("held")
        final = (await ended(client, submitted.job.request.id))[-1]
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.code is Code.DEADLINE_EXCEEDED
    assert GATE.cancel_reasons == ["JOB_TIMEOUT"]
    assert GATE.deadlines[0] is not None  # the worker was told when the attempt must end


async def test_a_failed_remote_attempt_is_retried_by_the_declared_policy(
    server: AjsServer, client: AsyncClient
) -> None:
    async with working(server, [FLAKY]):
        submitted = await client.submit("flaky")
        responses = await ended(client, submitted.job.request.id)
    assert responses[-1].state is S.FINISHED
    assert responses[-1].data == {"attempt": "2"}
    retried = [r for r in responses if r.state is S.CREATED and r.error is not None]
    assert len(retried) == 1
    assert "first attempts fail" in retried[0].error.message


async def test_a_permanent_remote_error_fails_at_once_with_its_details(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [REFUSES]):
        submitted = await client.submit("refuses")
        final = (await ended(client, submitted.job.request.id))[-1]
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.reason == "BAD_DATA"
    assert final.error.metadata["field"] == "x"
    assert (await client.get(submitted.job.request.id)).attempt == 1


async def test_a_remote_retry_keeps_the_delay_the_worker_asked_for(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [LATER]):
        submitted = await client.submit("later")
        request_id = submitted.job.request.id
        job = await eventually_reads(lambda: client.get(request_id), lambda j: j.state is S.CREATED and j.attempt == 1)
    assert job.due_time is not None
    assert job.last_response.create_time is not None
    waited = (job.due_time - job.last_response.create_time).total_seconds()
    assert 0.2 < waited < 1.0  # the worker's 0.3 s, not the policy's 10 s


# -- a worker that goes away -------------------------------------------------------------


async def test_a_broken_stream_hands_its_jobs_back_at_once(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [held("w1")], name="w1"):
        submitted = await client.submit("held")
        request_id = submitted.job.request.id
        await eventually(lambda: len(GATE.started) == 1)
    # w1's stream is gone (its task was cancelled): the job is queued again at once, not after its lease.
    job = await eventually_reads(lambda: client.get(request_id), lambda j: j.state is S.CREATED, within=2.0)
    assert job.last_response.error is not None
    assert job.last_response.error.reason == "WORKER_LOST"
    async with working(server, [held("w2")], name="w2"):
        await eventually(lambda: len(GATE.started) == 2)
        GATE.release.set()
        responses = await ended(client, request_id)
    assert [r.is_final for r in responses].count(True) == 1
    assert responses[-1].state is S.FINISHED
    assert responses[-1].data == {"worker": "w2", "attempt": "2"}


async def test_a_silent_worker_is_dropped_after_three_heartbeats(server: AjsServer, client: AsyncClient) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = wpb_grpc.WorkerServiceStub(channel).Work()
        await call.write(register("held"))
        assert (await call.read()).WhichOneof("kind") == "registered"
        submitted = await client.submit("held")
        assignment = await call.read()
        assert assignment.assignment.request.id == submitted.job.request.id
        # No heartbeat: after three intervals (1 s each here) the session ends and the job is back.
        with pytest.raises(grpc.aio.AioRpcError) as ended_call:
            await asyncio.wait_for(call.read(), 10)
    assert ended_call.value.code() is grpc.StatusCode.UNAVAILABLE
    assert reason_of(ended_call.value) == "HEARTBEAT_MISSED"
    job = await client.get(submitted.job.request.id)
    assert job.state is S.CREATED
    assert job.last_response.error is not None


async def test_a_draining_worker_finishes_its_job_and_takes_no_more(server: AjsServer, client: AsyncClient) -> None:
    async with working(server, [held("w1")], max_concurrent=2) as worker:
        first = await client.submit("held")
        await eventually(lambda: GATE.running == 1)
        worker.drain()
        await asyncio.sleep(0.1)
        second = await client.submit("held")
        GATE.release.set()
        assert (await ended(client, first.job.request.id))[-1].state is S.FINISHED
        await eventually(lambda: not worker.registered.is_set())
    await asyncio.sleep(0.2)
    assert (await client.get(second.job.request.id)).state is S.CREATED


async def test_a_server_that_stops_hands_remote_jobs_back_without_counting_the_attempt() -> None:
    async with serving() as server, AsyncClient(server.address) as client, working(server, [held("w1")]):
        submitted = await client.submit("held")
        await eventually(lambda: GATE.running == 1)
        await server.stop()
        await eventually(lambda: GATE.running == 0)
        job = await server.connector.get(submitted.job.request.id)
    assert job.state is S.CREATED
    assert job.attempt == 0
    assert GATE.cancel_reasons == ["SERVER_SHUTDOWN"]


# -- what a worker may declare ---------------------------------------------------------------


def register(*names: str, max_concurrent: int = 1, **fields: object) -> wpb.WorkRequest:
    return wpb.WorkRequest(
        register=wpb.RegisterWorker(
            worker_name="raw",
            job_types=[pb.JobType(name=name, **fields) for name in names],  # type: ignore[arg-type]
            max_concurrent=max_concurrent,
        )
    )


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def violations_of(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    return [v.field for v in convert.field_violations(status)]


async def refusal(server: AjsServer, *messages: wpb.WorkRequest, metadata: object = None) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = wpb_grpc.WorkerServiceStub(channel).Work(metadata=metadata)  # type: ignore[arg-type]
        for message in messages:
            await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(read_until_refused(call), 10)
    return refused.value


async def read_until_refused(call: grpc.aio.StreamStreamCall[wpb.WorkRequest, wpb.WorkResponse]) -> None:
    while True:
        read = await call.read()
        assert read is not grpc.aio.EOF, "the session was not refused"


async def test_registration_must_come_first(server: AjsServer) -> None:
    error = await refusal(server, wpb.WorkRequest(heartbeat=wpb.Heartbeat()))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(error) == ["register"]


async def test_a_registration_is_checked_field_by_field(server: AjsServer) -> None:
    error = await refusal(server, register("bad name", "ok", max_concurrent=0))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(error) == ["register.max_concurrent", "register.job_types[0].name"]
    error = await refusal(server, register("typed", input_type="no.such.Message"))
    assert violations_of(error) == ["register.job_types[0].input_type"]
    error = await refusal(server, register())
    assert violations_of(error) == ["register.job_types"]


async def test_a_type_the_server_runs_itself_cannot_be_registered(server: AjsServer) -> None:
    error = await refusal(server, register("echo"))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "TYPE_RUNS_LOCALLY"


async def test_workers_of_a_type_must_declare_it_alike(server: AjsServer) -> None:
    async with working(server, [REVERSE]):
        error = await refusal(server, register("reverse"))  # no typed input: not what the first declared
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "TYPE_DECLARED_DIFFERENTLY"


async def test_a_bad_message_mid_session_ends_it_and_hands_back_its_jobs(
    server: AjsServer, client: AsyncClient
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = wpb_grpc.WorkerServiceStub(channel).Work()
        await call.write(register("held"))
        await call.read()
        submitted = await client.submit("held")
        assignment = (await call.read()).assignment
        await call.write(
            wpb.WorkRequest(
                progress=wpb.ReportProgress(
                    request_id=assignment.request.id, attempt=assignment.attempt, progress=pb.Progress(fraction=2)
                )
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as ended_call:
            await asyncio.wait_for(call.read(), 10)
    assert ended_call.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(ended_call.value) == ["progress.progress.fraction"]
    job = await eventually_reads(lambda: client.get(submitted.job.request.id), lambda j: j.state is S.CREATED)
    assert job.last_response.error is not None
    assert job.last_response.error.reason == "WORKER_LOST"


WORKER_TOKENS = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[tokens]]
sha256 = "{runner}"
principal = "runner"
roles = ["worker"]
types = ["held"]
"""


async def test_workers_need_the_worker_role_and_run_only_their_types(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(WORKER_TOKENS.format(alice=token_hash("alice-token"), runner=token_hash("runner-token")))
    config = ServerConfig(address="127.0.0.1:0", tokens_file=str(tokens), cancel_grace=0.5, shutdown_grace=0.5)
    async with serving(config) as server:
        alice = (("authorization", "Bearer alice-token"),)
        runner = (("authorization", "Bearer runner-token"),)
        error = await refusal(server, register("held"), metadata=alice)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "WORKER_ROLE_NEEDED"
        error = await refusal(server, register("other"), metadata=runner)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "TYPE_NOT_ALLOWED"
        error = await refusal(server, register("held"))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        async with (
            working(server, [held("w1")], token="runner-token"),
            AsyncClient(server.address, token="alice-token") as client,
        ):
            submitted = await client.submit("held")
            await eventually(lambda: GATE.running == 1)
            GATE.release.set()
            assert (await ended(client, submitted.job.request.id))[-1].state is S.FINISHED
