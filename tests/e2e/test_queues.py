"""Queues and flow policies over gRPC: Request.queue, ListQueues, PauseQueue, ResumeQueue, JobType policies."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import InvalidArgument, PermissionDenied
from ajs_grpc.core.flow import FlowPolicy
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.faces import cli
from ajs_grpc.jobs import Concurrency, JobContext, JobStates, RateLimit, Unique, job
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.helpers import eventually_reads

S = RequestState


@job(
    "tenant-work",
    concurrency=Concurrency(key="tenant", limit=1),
    rate_limit=RateLimit(key="endpoint", rate=100, per="1s", burst=50),
    ordered_by="account",
)
async def tenant_work(request: Request, ctx: JobContext) -> None:
    """Waits until cancelled (one at a time per tenant)."""
    await ctx.wait_cancelled()
    ctx.raise_if_cancelled()


@job("report", unique=Unique(key="report", states=JobStates.QUEUED | JobStates.RUNNING, ttl="1h"))
async def report(request: Request, ctx: JobContext) -> None:
    """Waits until cancelled (one per report key)."""
    await ctx.wait_cancelled()
    ctx.raise_if_cancelled()


async def start(**settings: object) -> AjsServer:
    config = ServerConfig(address="127.0.0.1:0", shutdown_grace=0.5, cancel_grace=0.5, **settings)  # type: ignore[arg-type]
    chain = jobs_for_tests.chain([*jobs_for_tests.ALL, tenant_work, report])
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


async def state_of(client: AsyncClient, request_id: str, state: RequestState) -> None:
    await eventually_reads(lambda: client.get(request_id), lambda job: job.state is state)


async def test_list_job_types_shows_each_types_policies(served: AjsServer, client: AsyncClient) -> None:
    described = {t.name: t for t in await client.job_types()}
    assert described["tenant-work"].flow == tenant_work.flow
    assert described["report"].flow == report.flow
    assert described["echo"].flow == FlowPolicy()
    async with grpc.aio.insecure_channel(served.address) as channel:
        reply = await pb_grpc.JobServiceStub(channel).ListJobTypes(pb.ListJobTypesRequest())
    wire = {t.name: t for t in reply.job_types}
    assert (wire["tenant-work"].concurrency.key, wire["tenant-work"].concurrency.limit) == ("tenant", 1)
    assert (wire["tenant-work"].rate_limit.rate, wire["tenant-work"].rate_limit.burst) == (100, 50)
    assert wire["tenant-work"].ordered_by == "account"
    assert list(wire["report"].unique.states) == [pb.REQUEST_STATE_CREATED, pb.REQUEST_STATE_PENDING]
    assert wire["report"].unique.ttl.seconds == 3600
    assert not wire["echo"].HasField("concurrency")


async def test_a_job_shows_its_queue_default_when_none_is_named(served: AjsServer, client: AsyncClient) -> None:
    named = await client.submit("echo", queue="images")
    plain = await client.submit("echo")
    assert named.job.request.queue == "images"
    assert (await client.get(named.job.request.id)).request.queue == "images"
    assert (await client.get(plain.job.request.id)).request.queue == "default"
    async with grpc.aio.insecure_channel(served.address) as channel:
        reply = await pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(request_id=named.job.request.id))
    assert reply.job.request.queue == "images"


async def test_a_bad_queue_name_is_invalid_argument_naming_the_field(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as submitted:
        await client.submit("echo", queue="no spaces")
    assert [v.field for v in submitted.value.violations] == ["request.queue"]
    for name in ("", "-x", "x" * 129):
        with pytest.raises(InvalidArgument) as paused:
            await client.pause_queue(name)
        assert [v.field for v in paused.value.violations] == ["name"]
    with pytest.raises(InvalidArgument) as resumed:
        await client.resume_queue("a b")
    assert [v.field for v in resumed.value.violations] == ["name"]


async def test_a_paused_queue_keeps_its_jobs_queued_while_others_run_until_resumed(client: AsyncClient) -> None:
    paused = await client.pause_queue("slow")
    assert (paused.name, paused.paused) == ("slow", True)
    held = await client.submit("echo", {"n": "1"}, queue="slow")
    other = await client.submit("echo", {"n": "2"}, queue="fast")
    await state_of(client, other.job.request.id, S.FINISHED)
    assert (await client.get(held.job.request.id)).state is S.CREATED
    queues = {q.name: q for q in await client.list_queues()}
    assert queues["slow"].paused
    assert (queues["slow"].queued, queues["slow"].running) == (1, 0)
    assert queues["slow"].oldest_queued_time == held.job.request.create_time
    resumed = await client.resume_queue("slow")
    assert (resumed.name, resumed.paused) == ("slow", False)
    await state_of(client, held.job.request.id, S.FINISHED)
    queues = {q.name: q for q in await client.list_queues()}
    assert "slow" not in queues or not queues["slow"].paused


async def test_pausing_twice_and_resuming_a_queue_never_paused_are_fine(client: AsyncClient) -> None:
    assert (await client.pause_queue("q")).paused
    assert (await client.pause_queue("q")).paused
    assert not (await client.resume_queue("never-paused")).paused


async def test_a_running_job_of_a_paused_queue_goes_on(client: AsyncClient) -> None:
    running = await client.submit("block", queue="busy")
    await state_of(client, running.job.request.id, S.PENDING)
    await client.pause_queue("busy")
    queues = {q.name: q for q in await client.list_queues()}
    assert (queues["busy"].running, queues["busy"].paused) == (1, True)
    await client.cancel(running.job.request.id)
    await state_of(client, running.job.request.id, S.CANCELLED)


async def test_a_unique_submit_answers_the_job_already_queued(client: AsyncClient) -> None:
    first = await client.submit("report", {"report": "monthly"}, id="r1")
    again = await client.submit("report", {"report": "monthly"}, id="r2")
    other = await client.submit("report", {"report": "weekly"}, id="r3")
    assert first.created
    assert (again.created, again.job.request.id) == (False, first.job.request.id)
    assert other.created
    for submitted in (first, other):
        await client.cancel(submitted.job.request.id)


async def test_a_concurrency_policy_holds_the_second_job_of_a_key_over_grpc(client: AsyncClient) -> None:
    # each on an account of its own: the type also orders jobs per account
    first = await client.submit("tenant-work", {"tenant": "acme", "account": "1"})
    second = await client.submit("tenant-work", {"tenant": "acme", "account": "2"})
    elsewhere = await client.submit("tenant-work", {"tenant": "globex", "account": "3"})
    await state_of(client, first.job.request.id, S.PENDING)
    await state_of(client, elsewhere.job.request.id, S.PENDING)
    assert (await client.get(second.job.request.id)).state is S.CREATED
    await client.cancel(first.job.request.id)
    await state_of(client, second.job.request.id, S.PENDING)
    for submitted in (second, elsewhere):
        await client.cancel(submitted.job.request.id)


async def test_an_instance_starts_only_the_jobs_of_its_queues() -> None:
    server = await start(queues=("mine",))
    try:
        async with AsyncClient(server.address, timeout=10) as client:
            theirs = await client.submit("echo", queue="theirs")
            default = await client.submit("echo")
            mine = await client.submit("echo", queue="mine")
            await state_of(client, mine.job.request.id, S.FINISHED)
            assert (await client.get(theirs.job.request.id)).state is S.CREATED
            assert (await client.get(default.job.request.id)).state is S.CREATED
    finally:
        await server.stop()


# -- only admins manage queues ----------------------------------------------------------------


TOKENS = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[tokens]]
sha256 = "{root}"
principal = "root"
roles = ["admin"]
"""


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[AjsServer]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(alice=token_hash("alice-token"), root=token_hash("root-token")))
    server = await start(tokens_file=str(tokens))
    try:
        yield server
    finally:
        await server.stop()


async def test_only_an_admin_may_list_pause_or_resume_queues(guarded: AjsServer) -> None:
    async with (
        AsyncClient(guarded.address, timeout=10, token="alice-token") as alice,
        AsyncClient(guarded.address, timeout=10, token="root-token") as root,
    ):
        await alice.submit("echo", queue="shared")
        for call in (alice.list_queues(), alice.pause_queue("shared"), alice.resume_queue("shared")):
            with pytest.raises(PermissionDenied) as refused:
                await call
            assert refused.value.reason == "NOT_ADMIN"
        # a non-admin learns nothing from the name either: refused before it is checked
        with pytest.raises(PermissionDenied):
            await alice.pause_queue("not a name")
        assert (await root.pause_queue("shared")).paused
        assert "shared" in {q.name for q in await root.list_queues()}
        assert not (await root.resume_queue("shared")).paused


async def test_a_non_admin_gets_permission_denied_as_a_grpc_status(guarded: AjsServer) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.PauseQueue(pb.PauseQueueRequest(name="q"), metadata=(("authorization", "Bearer alice-token"),))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- metrics ----------------------------------------------------------------------------------


def _sample(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert found, f"{sample} not in:\n{text}"
    return float(found.group(1))


async def test_metrics_count_paused_queues_and_the_jobs_held_back_by_cause() -> None:
    server = await start(metrics_address="127.0.0.1:0", queue_depth_every=0.05)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"

    async def scrape() -> str:
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    try:
        text = await scrape()
        assert _sample(text, "ajs_queues_paused") == 0
        for cause in ("paused", "concurrency", "ordered", "rate_limit"):
            assert _sample(text, f'ajs_jobs_held_back{{cause="{cause}"}}') == 0
        async with AsyncClient(server.address, timeout=10) as client:
            await client.pause_queue("stopped")
            await client.submit("echo", queue="stopped")
            running = await client.submit("tenant-work", {"tenant": "acme", "account": "1"})
            waiting = await client.submit("tenant-work", {"tenant": "acme", "account": "2"})
            await state_of(client, running.job.request.id, S.PENDING)
            text = await eventually_reads(
                scrape,
                lambda text: (
                    _sample(text, "ajs_queues_paused") == 1
                    and _sample(text, 'ajs_jobs_held_back{cause="concurrency"}') == 1
                ),
            )
            assert _sample(text, 'ajs_jobs_held_back{cause="paused"}') == 1
            await client.resume_queue("stopped")
            await eventually_reads(scrape, lambda text: _sample(text, "ajs_queues_paused") == 0)
            for submitted in (running, waiting):
                await client.cancel(submitted.job.request.id)
    finally:
        await server.stop()


# -- the ajs command --------------------------------------------------------------------------


async def ajs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs the ``ajs`` command in a thread (it runs an event loop of its own); returns its code, stdout, stderr."""
    code = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_ajs_queues_pause_and_resume(
    served: AjsServer, client: AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", served.address)
    held = await client.submit("echo", queue="images")
    assert await ajs(capsys, "pause", "images", *target) == (
        cli.EXIT_OK,
        "queue images paused (0 queued wait; 0 running go on)\n",
        "",
    )
    queued = await client.submit("echo", queue="images")
    code, out, _ = await ajs(capsys, "queues", *target)
    assert code == cli.EXIT_OK
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0] == ["QUEUE", "QUEUED", "RUNNING", "PAUSED", "OLDEST"]
    images = next(row for row in rows if row[0] == "images")
    assert images[1:4] == ["1", "0", "yes"]
    assert re.fullmatch(r"\d+[smhd]", images[4])
    code, out, _ = await ajs(capsys, "resume", "images", *target)
    assert (code, out) == (cli.EXIT_OK, "queue images resumed (1 queued, 0 running)\n")
    for submitted in (held, queued):
        await state_of(client, submitted.job.request.id, S.FINISHED)


async def test_ajs_pause_of_a_bad_name_exits_refused(served: AjsServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await ajs(capsys, "pause", "not a name", "--target", served.address)
    assert code == cli.EXIT_REFUSED
    assert "name" in err


async def test_ajs_submit_queue_puts_the_job_in_that_queue(
    served: AjsServer, client: AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await ajs(capsys, "submit", "echo", "--queue", "reports", "--target", served.address)
    assert code == cli.EXIT_OK
    assert (await client.get(out.strip())).request.queue == "reports"


async def test_ajs_types_shows_the_policies(served: AjsServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await ajs(capsys, "types", "--target", served.address)
    assert code == cli.EXIT_OK
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["TYPE"][6] == "FLOW"
    assert rows["report"][6] == "unique report [queued,running] ttl 1h"
    assert rows["echo"][6] == "-"
