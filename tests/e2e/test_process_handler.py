"""The process-pool handler: jobs in worker processes, progress across, cancellation and crashes."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import Code
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.process import ProcessPoolRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from tests import jobs_for_tests, process_jobs
from tests.helpers import eventually

S = RequestState


@pytest.fixture
async def pool() -> ProcessPoolRequestHandler:
    handler = ProcessPoolRequestHandler(max_workers=2, stop_grace=1.0)
    for plugin in process_jobs.ALL:
        handler.register(plugin)
    return handler


@pytest.fixture
async def server(pool: ProcessPoolRequestHandler) -> AsyncIterator[AjsServer]:
    internal = InternalAsyncRequestHandler()
    internal.register(jobs_for_tests.echo)
    chain = HandlerChain([internal, pool], RejectRequestHandler())
    config = ServerConfig(address="127.0.0.1:0", cancel_grace=0.5, shutdown_grace=0.5)
    started = AjsServer(config, connector=MemoryConnector(), chain=chain)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def client(server: AjsServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=30) as opened:
        yield opened


async def test_a_job_runs_in_another_process_and_reports_progress(client: AsyncClient) -> None:
    submitted = await client.submit("proc_steps")
    responses = [r async for r in client.watch(submitted.job.request.id)]
    assert [r.progress.message for r in responses if r.progress] == ["step 1", "step 2", "step 3"]
    assert responses[-1].state is S.FINISHED
    assert int(responses[-1].data["pid"]) != os.getpid()


async def test_workers_are_reused(client: AsyncClient) -> None:
    pids = set()
    for _ in range(4):
        submitted = await client.submit("proc_steps")
        pids.add([r async for r in client.watch(submitted.job.request.id)][-1].data["pid"])
    assert len(pids) <= 2  # max_workers


async def test_typed_input_and_output_cross_the_process_boundary(client: AsyncClient) -> None:
    submitted = await client.submit("proc_typed", input=wrappers_pb2.StringValue(value="stressed"))
    final = [r async for r in client.watch(submitted.job.request.id)][-1]
    assert final.state is S.FINISHED
    result = wrappers_pb2.StringValue()
    assert isinstance(final.output, any_pb2.Any)
    assert final.output.Unpack(result)
    assert result.value == "desserts"


async def test_an_exception_in_the_worker_fails_the_job_with_its_message(client: AsyncClient) -> None:
    submitted = await client.submit("proc_fail")
    final = [r async for r in client.watch(submitted.job.request.id)][-1]
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.message == "nothing here"
    assert final.error.metadata["exception"] == "LookupError"


async def test_cancellation_reaches_the_worker(client: AsyncClient, pool: ProcessPoolRequestHandler) -> None:
    submitted = await client.submit("proc_sleep", {"sleep": "30"})
    request_id = submitted.job.request.id
    async for response in client.watch(request_id):
        if response.progress is not None:
            break
    pid = pool.worker_pids[0]
    await client.cancel(request_id)
    final = [r async for r in client.watch(request_id)][-1]
    assert final.state is S.CANCELLED
    # It stopped by itself, so its worker lives on for the next job.
    submitted = await client.submit("proc_steps")
    assert [r async for r in client.watch(submitted.job.request.id)][-1].data["pid"] == str(pid)


async def test_a_worker_that_ignores_cancellation_is_terminated(
    client: AsyncClient, pool: ProcessPoolRequestHandler
) -> None:
    submitted = await client.submit("proc_deaf")
    request_id = submitted.job.request.id
    async for response in client.watch(request_id):
        if response.progress is not None:
            break
    pid = pool.worker_pids[0]
    await client.cancel(request_id)
    final = [r async for r in client.watch(request_id)][-1]
    assert final.state is S.CANCELLED
    await eventually(lambda: not _alive(pid))


async def test_killing_a_worker_mid_job_retries_the_job_and_the_server_keeps_serving(
    client: AsyncClient, pool: ProcessPoolRequestHandler
) -> None:
    submitted = await client.submit("proc_sleep", {"sleep": "30"})
    request_id = submitted.job.request.id
    async for response in client.watch(request_id):
        if response.progress is not None:
            break
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    responses = [r async for r in client.watch(request_id)]
    crashed = [r for r in responses if r.error is not None and "worker process died" in r.error.message]
    assert crashed, responses
    assert crashed[0].state is S.CREATED  # retried, per its policy
    assert responses[-1].state is S.FINISHED
    assert responses[-1].data["attempt"] == "2"
    assert await client.health() == "SERVING"
    echoed = await client.submit("echo", {"still": "here"})
    assert [r async for r in client.watch(echoed.job.request.id)][-1].state is S.FINISHED


async def test_killing_a_worker_of_a_job_without_retries_fails_it(
    client: AsyncClient, pool: ProcessPoolRequestHandler
) -> None:
    submitted = await client.submit("proc_deaf")
    request_id = submitted.job.request.id
    async for response in client.watch(request_id):
        if response.progress is not None:
            break
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    final = [r async for r in client.watch(request_id)][-1]
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.code is Code.UNKNOWN
    assert "exit code -9" in final.error.message


def test_async_jobs_are_refused_by_the_process_handler() -> None:
    with pytest.raises(TypeError, match="runs plain functions"):
        ProcessPoolRequestHandler().register(jobs_for_tests.echo)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
