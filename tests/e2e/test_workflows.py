"""Workflows over gRPC: RetryJob, DeleteJob, expire_time, per-request attempts and timeout, DAGs in one batch.

The DAG job types come from tests/flow_plugins/workflow_jobs.py (``wf.step`` reports what
its dependencies returned, ``wf.fail`` fails, ``wf.join`` runs after failed dependencies).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ajs_grpc.core.model import Request, RequestState, Response, now
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.faces import cli
from ajs_grpc.jobs import NO_RETRY, JobContext, PermanentError, job
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.e2e.test_service import bad_request, error_info
from tests.flow_plugins import workflow_jobs
from tests.helpers import eventually_reads

S = RequestState

runs: dict[str, int] = {}
"""Request id -> how many times ``fail_once`` ran it."""


@job("fail_once", retry=NO_RETRY)
async def fail_once(request: Request, ctx: JobContext) -> dict[str, str]:
    """Fails on its first run, FINISHES on the next (a manual retry's) with the run's number."""
    runs[request.id] = runs.get(request.id, 0) + 1
    if runs[request.id] == 1:
        raise PermanentError("the first run fails")
    return {"run": str(runs[request.id])}


WORKFLOW_JOBS = [workflow_jobs.step, workflow_jobs.join, workflow_jobs.fail, workflow_jobs.parent, workflow_jobs.child]


async def start(**settings: object) -> AjsServer:
    # A short lease: housekeeping (which ends expired queued jobs) runs every half lease.
    config = ServerConfig(address="127.0.0.1:0", shutdown_grace=0.5, cancel_grace=0.5, lease=1.0, **settings)  # type: ignore[arg-type]
    chain = jobs_for_tests.chain([*jobs_for_tests.ALL, fail_once, *WORKFLOW_JOBS])
    server = AjsServer(config, connector=MemoryConnector(), chain=chain)
    await server.start()
    return server


@pytest.fixture
async def served() -> AsyncIterator[AjsServer]:
    server = await start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(served: AjsServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(served.address, timeout=10) as opened:
        yield opened


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def ended(client: AsyncClient, request_id: str) -> Response:
    """The final Response of a job, once it ended (watched from the start)."""
    responses = [response async for response in client.watch(request_id)]
    assert responses[-1].is_final
    return responses[-1]


async def state_of(client: AsyncClient, request_id: str, state: RequestState) -> None:
    await eventually_reads(lambda: client.get(request_id), lambda found: found.state is state)


# -- RetryJob ---------------------------------------------------------------------------------


async def test_a_failed_job_retried_by_hand_runs_again_and_its_responses_go_on(client: AsyncClient) -> None:
    request_id = fresh("r")
    await client.submit("fail_once", id=request_id)
    first_run = [response async for response in client.watch(request_id)]
    assert [r.state for r in first_run] == [S.CREATED, S.PENDING, S.FAILED]
    final = first_run[-1].sequence

    retried = await client.retry(request_id)
    assert (retried.request.id, retried.state, retried.attempt) == (request_id, S.CREATED, 0)
    assert retried.last_response.sequence == final + 1
    assert dict(retried.last_response.data) == {"reason": "MANUAL_RETRY"}

    # A watch resumed after the first run's final Response sees the second run, gapless.
    second_run = [response async for response in client.watch(request_id, after_sequence=final)]
    assert [r.sequence for r in second_run] == list(range(final + 1, final + 1 + len(second_run)))
    assert [r.state for r in second_run] == [S.CREATED, S.PENDING, S.FINISHED]
    assert dict(second_run[0].data) == {"reason": "MANUAL_RETRY"}
    assert dict(second_run[-1].data) == {"run": "2"}
    # From the start, a watch shows both runs and ends after the last final Response.
    everything = [response async for response in client.watch(request_id)]
    assert [r.sequence for r in everything] == list(range(1, final + len(second_run) + 1))
    job = await client.get(request_id)
    assert (job.state, job.attempt) == (S.FINISHED, 1)


async def test_a_cancelled_job_retried_by_hand_is_queued_and_runs_again(client: AsyncClient) -> None:
    request_id = fresh("c")
    await client.submit("block", id=request_id)
    await state_of(client, request_id, S.PENDING)
    await client.cancel(request_id)
    await state_of(client, request_id, S.CANCELLED)
    await client.retry(request_id)
    await state_of(client, request_id, S.PENDING)
    await client.cancel(request_id)
    await state_of(client, request_id, S.CANCELLED)


async def test_only_a_failed_or_cancelled_job_can_be_retried(client: AsyncClient) -> None:
    running = fresh("running")
    await client.submit("block", id=running)
    await state_of(client, running, S.PENDING)
    with pytest.raises(FailedPrecondition) as not_ended:
        await client.retry(running)
    assert not_ended.value.reason == "REQUEST_NOT_ENDED"
    await client.cancel(running)

    done = fresh("done")
    await client.submit("echo", id=done)
    assert (await ended(client, done)).state is S.FINISHED
    with pytest.raises(FailedPrecondition) as finished:
        await client.retry(done)
    assert finished.value.reason == "REQUEST_FINISHED"

    with pytest.raises(NotFound):
        await client.retry(fresh("never-submitted"))


async def test_retry_and_delete_validate_the_id(served: AjsServer) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        for call in (stub.RetryJob(pb.RetryJobRequest()), stub.DeleteJob(pb.DeleteJobRequest(request_id="a b"))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [field for field, _ in bad_request(refused.value)] == ["request_id"]


# -- DeleteJob --------------------------------------------------------------------------------


async def test_a_deleted_job_is_gone_with_its_responses_and_descendants(client: AsyncClient) -> None:
    parent, child = fresh("parent"), fresh("child")
    await client.submit("echo", id=parent)
    await client.submit("echo", id=child, parent_id=parent)
    for request_id in (parent, child):
        await ended(client, request_id)
    assert await client.delete(parent) == 2
    for request_id in (parent, child):
        with pytest.raises(NotFound):
            await client.get(request_id)
        with pytest.raises(NotFound):
            [response async for response in client.watch(request_id)]
    with pytest.raises(NotFound):
        await client.delete(parent)


async def test_a_job_that_has_not_ended_is_not_deleted(client: AsyncClient) -> None:
    parent, child = fresh("parent"), fresh("child")
    await client.submit("echo", id=parent)
    await ended(client, parent)
    await client.submit("block", id=child, parent_id=parent)
    await state_of(client, child, S.PENDING)
    for request_id in (child, parent):  # the job itself, or a descendant, still running
        with pytest.raises(FailedPrecondition) as refused:
            await client.delete(request_id)
        assert refused.value.reason == "REQUEST_NOT_ENDED"
    assert (await client.get(parent)).state is S.FINISHED  # nothing was deleted
    await client.cancel(child)
    await state_of(client, child, S.CANCELLED)
    assert await client.delete(parent) == 2


# -- expire_time, max_attempts, timeout -------------------------------------------------------


async def test_a_job_not_started_by_its_expire_time_ends_cancelled_expired(client: AsyncClient) -> None:
    await client.pause_queue("held")
    try:
        request_id = fresh("expiring")
        expire = now() + timedelta(seconds=0.5)
        submitted = await client.submit("echo", id=request_id, queue="held", expire_time=expire)
        assert submitted.job.request.expire_time == expire
        final = await ended(client, request_id)
        assert final.state is S.CANCELLED
        assert final.error is not None
        assert final.error.reason == "EXPIRED"
        assert final.create_time >= expire
    finally:
        await client.resume_queue("held")


async def test_a_job_started_before_its_expire_time_runs(client: AsyncClient) -> None:
    request_id = fresh("in-time")
    await client.submit("echo", {"k": "v"}, id=request_id, expire_time=now() + timedelta(minutes=5))
    final = await ended(client, request_id)
    assert (final.state, dict(final.data)) == (S.FINISHED, {"k": "v"})


async def test_per_request_max_attempts_and_timeout_round_trip_capped_by_the_type(client: AsyncClient) -> None:
    # flaky: 3 attempts at most (FAST_RETRY); no timeout of its own
    fewer = await client.submit("flaky", {"succeed_on": "99"}, id=fresh("fewer"), max_attempts=2, attempt_timeout=30)
    assert (fewer.job.request.max_attempts, fewer.job.request.timeout, fewer.job.max_attempts) == (2, 30.0, 2)
    got = await client.get(fewer.job.request.id)
    assert (got.request.max_attempts, got.request.timeout, got.max_attempts) == (2, 30.0, 2)
    assert (await ended(client, fewer.job.request.id)).state is S.FAILED
    assert (await client.get(fewer.job.request.id)).attempt == 2

    more = await client.submit("flaky", {"succeed_on": "99"}, id=fresh("more"), max_attempts=10)
    assert (more.job.request.max_attempts, more.job.max_attempts) == (10, 3)  # capped by the type's
    default = await client.submit("flaky", {"succeed_on": "99"}, id=fresh("default"))
    assert (default.job.request.max_attempts, default.job.request.timeout, default.job.max_attempts) == (0, None, 3)
    for submitted in (more, default):
        await ended(client, submitted.job.request.id)


async def test_a_per_request_timeout_stops_an_attempt(client: AsyncClient) -> None:
    request_id = fresh("timed")
    await client.submit("steps", {"n": "1", "sleep": "30"}, id=request_id, max_attempts=1, attempt_timeout=0.2)
    final = await ended(client, request_id)
    assert final.state is S.FAILED
    assert final.error is not None
    assert final.error.reason == "JOB_TIMEOUT"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"depends_on": ["a", "a"]}, "request.depends_on[1]"),
        ({"id": "x", "depends_on": ["x"]}, "request.depends_on[0]"),
        ({"depends_on": ["has space"]}, "request.depends_on[0]"),
        ({"depends_on": [f"d{i}" for i in range(101)]}, "request.depends_on"),
        ({"max_attempts": -1}, "request.max_attempts"),
        ({"max_attempts": 1_000_000}, "request.max_attempts"),
        ({"timeout": {"seconds": 0}}, "request.timeout"),
        ({"timeout": {"seconds": -5}}, "request.timeout"),
        ({"expire_time": {"seconds": 10**13}}, "request.expire_time"),
    ],
)
async def test_bad_workflow_fields_are_invalid_argument_with_field_violations(
    served: AjsServer, request_fields: dict[str, object], field: str
) -> None:
    message = pb.Request(type="echo", **request_fields)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.JobServiceStub(channel).SubmitRequest(pb.SubmitRequestRequest(request=message))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [name for name, _ in bad_request(refused.value)]


# -- dependencies: a DAG in one batch ---------------------------------------------------------


def node(request_id: str, job_type: str = "wf.step", depends_on: Sequence[str] = (), **data: str) -> Request:
    return Request(id=request_id, type=job_type, depends_on=tuple(depends_on), data=data)


async def responses(client: AsyncClient, request_id: str) -> list[Response]:
    return [response async for response in client.watch(request_id)]


async def test_a_diamond_submitted_in_one_batch_runs_in_order_and_the_join_sees_both_outputs(
    client: AsyncClient,
) -> None:
    a, b, c, d = (fresh(name) for name in "ABCD")
    # In any order: D names B and C before they appear in the batch.
    submitted = await client.submit_many(
        [
            node(d, depends_on=[b, c]),
            node(b, depends_on=[a], value="b", seconds="0.1"),
            node(c, depends_on=[a], value="c"),
            node(a, value="a"),
        ]
    )
    assert all(s.created for s in submitted)
    assert [s.job.request.depends_on for s in submitted] == [(b, c), (a,), (a,), ()]
    runs_of = {request_id: await responses(client, request_id) for request_id in (a, b, c, d)}
    assert all(found[-1].state is S.FINISHED for found in runs_of.values())

    def started(request_id: str) -> datetime:
        return next(r.create_time for r in runs_of[request_id] if r.state is S.PENDING)

    def finished(request_id: str) -> datetime:
        return runs_of[request_id][-1].create_time

    assert started(b) >= finished(a)
    assert started(c) >= finished(a)
    assert started(d) >= max(finished(b), finished(c))
    joined = dict(runs_of[d][-1].data)
    assert joined["seen"] == ",".join(sorted([b, c]))
    assert joined["got"] == ";".join(sorted([f"{b}=b", f"{c}=c"]))
    assert joined["states"] == ",".join(sorted([f"{b}=FINISHED", f"{c}=FINISHED"]))
    assert dict(runs_of[b][-1].data)["got"] == f"{a}=a"


async def test_a_failing_branch_cancels_the_join_with_dependency_failed(client: AsyncClient) -> None:
    a, b, c, d = (fresh(name) for name in "ABCD")
    await client.submit_many(
        [node(a), node(b, "wf.fail", [a]), node(c, depends_on=[a], seconds="0.2"), node(d, depends_on=[b, c])]
    )
    final = await ended(client, d)
    assert final.state is S.CANCELLED
    assert final.error is not None
    assert final.error.reason == "DEPENDENCY_FAILED"
    assert final.error.metadata["dependency_id"] == b
    assert [r.state for r in await responses(client, d)] == [S.CREATED, S.CANCELLED]  # it never ran
    assert (await ended(client, c)).state is S.FINISHED
    # Retrying the join alone cannot help while its dependency stays failed.
    with pytest.raises(FailedPrecondition) as refused:
        await client.retry(d)
    assert refused.value.reason == "DEPENDENCY_FAILED"


async def test_a_type_that_allows_failed_dependencies_runs_after_them(client: AsyncClient) -> None:
    a, b = fresh("A"), fresh("B")
    await client.submit_many([node(a, "wf.fail"), node(b, "wf.join", [a])])
    final = await ended(client, b)
    assert final.state is S.FINISHED
    assert dict(final.data)["states"] == f"{a}=FAILED"
    types = {t.name: t for t in await client.job_types()}
    assert types["wf.join"].allow_failed_dependencies
    assert not types["wf.step"].allow_failed_dependencies


async def test_a_dependency_on_a_stored_job_waits_for_it(client: AsyncClient) -> None:
    first, second = fresh("first"), fresh("second")
    await client.submit("block", id=first)
    await client.submit("wf.step", id=second, depends_on=[first])
    await state_of(client, first, S.PENDING)
    assert (await client.get(second)).state is S.CREATED
    await client.cancel(first)
    final = await ended(client, second)
    assert (final.state, final.error.reason if final.error else "") == (S.CANCELLED, "DEPENDENCY_FAILED")


async def test_a_cycle_is_refused_and_nothing_is_stored(served: AjsServer, client: AsyncClient) -> None:
    x, y, z = fresh("X"), fresh("Y"), fresh("Z")
    with pytest.raises(InvalidArgument) as refused:
        await client.submit_many([node(z), node(x, depends_on=[y, z]), node(y, depends_on=[x])])
    assert refused.value.reason == "DEPENDENCY_CYCLE"
    assert refused.value.metadata["index"] in ("1", "2")
    assert [v.field for v in refused.value.violations] == [
        f"requests[{refused.value.metadata['index']}].request.depends_on"
    ]
    for request_id in (x, y, z):
        with pytest.raises(NotFound):
            await client.get(request_id)
    # on the wire: INVALID_ARGUMENT with the reason in ErrorInfo
    message = pb.BatchSubmitRequestsRequest(
        requests=[
            pb.SubmitRequestRequest(request=pb.Request(id=x, type="wf.step", depends_on=[y])),
            pb.SubmitRequestRequest(request=pb.Request(id=y, type="wf.step", depends_on=[x])),
        ]
    )
    async with grpc.aio.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await pb_grpc.JobServiceStub(channel).BatchSubmitRequests(message)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raw.value).reason == "DEPENDENCY_CYCLE"


async def test_an_unknown_dependency_is_refused(client: AsyncClient) -> None:
    missing = fresh("missing")
    with pytest.raises(NotFound) as alone:
        await client.submit("wf.step", id=fresh("alone"), depends_on=[missing])
    assert (alone.value.reason, alone.value.metadata["dependency_id"]) == ("DEPENDENCY_NOT_FOUND", missing)
    a, b = fresh("A"), fresh("B")
    with pytest.raises(NotFound) as batched:
        await client.submit_many([node(a), node(b, depends_on=[a, missing])])
    assert batched.value.reason == "DEPENDENCY_NOT_FOUND"
    assert batched.value.metadata["index"] == "1"
    assert batched.value.message.startswith("requests[1]: ")
    with pytest.raises(NotFound):
        await client.get(a)  # the batch stored nothing


# -- ownership ---------------------------------------------------------------------------------


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


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[AjsServer]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root")}))
    server = await start(tokens_file=str(tokens))
    try:
        yield server
    finally:
        await server.stop()


async def test_another_principals_job_cannot_be_retried_deleted_or_waited_on(guarded: AjsServer) -> None:
    async with (
        AsyncClient(guarded.address, timeout=10, token="alice-token") as alice,
        AsyncClient(guarded.address, timeout=10, token="bob-token") as bob,
        AsyncClient(guarded.address, timeout=10, token="root-token") as root,
    ):
        await alice.submit("fail_once", id="mine")
        assert (await ended(alice, "mine")).state is S.FAILED
        for call in (bob.retry("~alice/mine"), bob.delete("~alice/mine")):
            with pytest.raises(NotFound):
                await call
        with pytest.raises(NotFound) as waited:
            await bob.submit("wf.step", id="theirs", depends_on=["~alice/mine"])
        assert waited.value.reason == "DEPENDENCY_NOT_FOUND"
        # Dependencies are named in one's own namespace, as parents are.
        step = await alice.submit("wf.join", id="after", depends_on=["mine"])
        assert step.job.request.depends_on == ("mine",)
        assert (await ended(alice, "after")).state is S.FINISHED
        assert (await alice.retry("mine")).state is S.CREATED
        assert (await ended(alice, "mine")).state is S.FINISHED
        assert await root.delete("~alice/after") == 1
        assert await alice.delete("mine") == 1


# -- the ajs command --------------------------------------------------------------------------


async def ajs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs the ``ajs`` command in a thread (it runs an event loop of its own); returns its code, stdout, stderr."""
    code = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_ajs_submit_with_dependencies_then_retry_and_delete(
    served: AjsServer, client: AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", served.address)
    first, second = fresh("first"), fresh("second")
    await client.submit("fail_once", id=first)
    await ended(client, first)
    code, out, _ = await ajs(
        capsys,
        *("submit", "wf.join", "--id", second, "--depends-on", first, "--expire-in", "1h"),
        *("--max-attempts", "1", "--attempt-timeout", "1m", *target),
    )
    assert (code, out) == (cli.EXIT_OK, f"{second}\n")
    job = await client.get(second)
    assert (job.request.depends_on, job.request.max_attempts, job.request.timeout) == ((first,), 1, 60.0)
    assert job.request.expire_time is not None
    assert job.request.expire_time > now() + timedelta(minutes=59)
    await ended(client, second)

    code, out, err = await ajs(capsys, "retry", first, "--watch", *target)
    assert code == cli.EXIT_OK
    assert err.startswith(f"{first} queued again (CREATED, Response 4)")
    assert out.startswith(f"{first} FINISHED")
    code, out, _ = await ajs(capsys, "retry", first, *target)
    assert code == cli.EXIT_REFUSED

    assert await ajs(capsys, "delete", first, *target) == (cli.EXIT_OK, f"deleted {first}\n", "")
    code, _, err = await ajs(capsys, "delete", first, *target)
    assert code == cli.EXIT_REFUSED
    assert "NOT_FOUND" in err
