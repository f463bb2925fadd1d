"""Schedules over gRPC: the six rpcs, ownership, validation, a per-second schedule's jobs, the ajs commands."""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from ajs_grpc.client import AsyncClient, Catchup, Overlap, Schedule
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from ajs_grpc.core.model import Job, Request, RequestState, now
from ajs_grpc.core.schedules import occurrence_id
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.limits import Limits
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.faces import cli
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.e2e.test_service import bad_request, error_info
from tests.helpers import eventually_reads

EVERY_SECOND = "* * * * * *"
# An occurrence's job id: the schedule's, "@", the occurrence's UTC time to the second.
OCCURRENCE = re.compile(r"@\d{8}T\d{6}Z")


async def start(**settings: object) -> AjsServer:
    config = ServerConfig(address="127.0.0.1:0", shutdown_grace=0.5, cancel_grace=0.5, **settings)  # type: ignore[arg-type]
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
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


async def jobs_of(client: AsyncClient, schedule_id: str) -> list[Job]:
    """The jobs an occurrence of ``schedule_id`` submitted (as the caller names them)."""
    return [job async for job in client.list(full=True) if job.request.id.startswith(f"{schedule_id}@")]


# -- the six rpcs -----------------------------------------------------------------------------


async def test_create_get_list_pause_resume_delete(client: AsyncClient) -> None:
    created = await client.create_schedule(
        "nightly",
        "0 3 * * *",
        "echo",
        {"report": "daily"},
        time_zone="Europe/Berlin",
        priority=2,
        queue="reports",
        max_attempts=1,
        attempt_timeout=60,
        overlap=Overlap.CANCEL_PREVIOUS,
        catchup=Catchup.ONE,
    )
    schedule = created.schedule
    assert (schedule.id, schedule.cron, schedule.time_zone) == ("nightly", "0 3 * * *", "Europe/Berlin")
    assert (schedule.overlap, schedule.catchup, schedule.paused) == (Overlap.CANCEL_PREVIOUS, Catchup.ONE, False)
    template = schedule.template
    assert (template.type, dict(template.data), template.priority, template.queue) == (
        "echo",
        {"report": "daily"},
        2,
        "reports",
    )
    assert (template.max_attempts, template.timeout) == (1, 60.0)
    assert schedule.creator == "anonymous"
    assert schedule.create_time is not None
    assert (schedule.last_time, schedule.last_job_id) == (None, "")
    # 03:00 in Berlin is 01:00 or 02:00 UTC: the next one within a day, on the hour
    assert created.next_run_time is not None
    assert now() < created.next_run_time <= now() + timedelta(days=1)
    assert created.next_run_time.minute == 0
    assert created.next_run_time.hour in (1, 2)

    again = await client.create_schedule(
        "nightly",
        "0 3 * * *",
        "echo",
        {"report": "daily"},
        time_zone="Europe/Berlin",
        priority=2,
        queue="reports",
        max_attempts=1,
        attempt_timeout=60,
        overlap=Overlap.CANCEL_PREVIOUS,
        catchup=Catchup.ONE,
    )
    assert again.schedule == schedule  # the same definition again: the stored one, idempotent
    with pytest.raises(AlreadyExists) as taken:
        await client.create_schedule("nightly", "0 4 * * *", "echo")
    assert taken.value.reason == "SCHEDULE_ID_TAKEN"

    got = await client.get_schedule("nightly")
    assert got.schedule == schedule
    assert "nightly" in [info.schedule.id for info in await client.list_schedules()]

    paused = await client.pause_schedule("nightly")
    assert (paused.schedule.paused, paused.next_run_time) == (True, None)
    assert (await client.pause_schedule("nightly")).schedule.paused  # twice is fine
    assert (await client.get_schedule("nightly")).schedule.paused
    resumed = await client.resume_schedule("nightly")
    assert not resumed.schedule.paused
    assert resumed.next_run_time == created.next_run_time

    await client.delete_schedule("nightly")
    for call in (client.get_schedule("nightly"), client.delete_schedule("nightly"), client.pause_schedule("nightly")):
        with pytest.raises(NotFound) as gone:
            await call
        assert gone.value.reason == "SCHEDULE_NOT_FOUND"
    assert "nightly" not in [info.schedule.id for info in await client.list_schedules()]


async def test_list_schedules_pages_by_id(served: AjsServer, client: AsyncClient) -> None:
    for name in ("e", "c", "a", "d", "b"):
        await client.create_schedule(name, "0 0 1 1 *", "echo")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = await client.list_schedules_page(page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [info.schedule.id for info in page]
        pages += 1
        if not token:
            break
    assert (seen, pages) == (["a", "b", "c", "d", "e"], 3)
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        for bad in (pb.ListSchedulesRequest(page_token="nonsense"), pb.ListSchedulesRequest(page_size=-1)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListSchedules(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- validation -------------------------------------------------------------------------------


def schedule_message(**fields: object) -> pb.Schedule:
    base: dict[str, object] = {"id": "s", "cron": "* * * * *", "template": pb.Request(type="echo")}
    base.update(fields)
    return pb.Schedule(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (schedule_message(cron="61 * * * *"), "schedule.cron"),
        (schedule_message(cron="* * *"), "schedule.cron"),
        (schedule_message(cron=""), "schedule.cron"),
        (schedule_message(time_zone="Mars/Olympus_Mons"), "schedule.time_zone"),
        (schedule_message(id=""), "schedule.id"),
        (schedule_message(id="with space"), "schedule.id"),
        (schedule_message(id="x" * 200), "schedule.id"),
        (schedule_message(template=pb.Request()), "schedule.template.type"),
        (schedule_message(template=pb.Request(type="echo", id="fixed")), "schedule.template.id"),
        (schedule_message(template=pb.Request(type="echo", depends_on=["a"])), "schedule.template.depends_on"),
        (schedule_message(template=pb.Request(type="echo", max_attempts=-2)), "schedule.template.max_attempts"),
        (schedule_message(overlap_policy=9), "schedule.overlap_policy"),
        (schedule_message(catchup_policy=9), "schedule.catchup_policy"),
        (pb.Schedule(id="s", cron="* * * * *"), "schedule.template"),
    ],
)
async def test_a_bad_schedule_is_invalid_argument_naming_the_field(
    served: AjsServer, message: pb.Schedule, field: str
) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.JobServiceStub(channel).CreateSchedule(pb.CreateScheduleRequest(schedule=message))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [name for name, _ in bad_request(refused.value)]
    assert error_info(refused.value).reason == "INVALID_FIELDS"


async def test_a_schedule_of_a_type_no_handler_runs_is_refused(client: AsyncClient) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        await client.create_schedule("s", EVERY_SECOND, "no-such-type")
    assert refused.value.reason == "TYPE_NOT_SUPPORTED"
    with pytest.raises(NotFound):
        await client.get_schedule("s")


async def test_the_ids_of_get_pause_resume_delete_are_checked(served: AjsServer) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        calls = (
            stub.GetSchedule(pb.GetScheduleRequest()),
            stub.DeleteSchedule(pb.DeleteScheduleRequest(id="a b")),
            stub.PauseSchedule(pb.PauseScheduleRequest()),
            stub.ResumeSchedule(pb.ResumeScheduleRequest(id="\x01")),
        )
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [name for name, _ in bad_request(refused.value)] == ["id"]


# -- occurrences ------------------------------------------------------------------------------


async def test_a_schedule_every_second_submits_one_job_per_occurrence_with_derived_ids(client: AsyncClient) -> None:
    await client.create_schedule("tick", EVERY_SECOND, "echo", {"from": "tick"}, overlap=Overlap.ALLOW)
    jobs = await eventually_reads(lambda: jobs_of(client, "tick"), lambda found: len(found) >= 3, within=10)
    await client.delete_schedule("tick")
    ids = [job.request.id for job in jobs]
    assert len(set(ids)) == len(ids)
    for job in jobs:
        assert OCCURRENCE.fullmatch(job.request.id.removeprefix("tick"))
        assert (job.request.type, dict(job.request.data)) == ("echo", {"from": "tick"})
        assert job.request.creator == "anonymous"
    # one job per second, none missing: each id is the occurrence_id of the second after the last
    times = sorted(datetime.strptime(i.removeprefix("tick@"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) for i in ids)
    assert [occurrence_id("tick", at) for at in times] == sorted(ids)
    assert all(later - earlier == timedelta(seconds=1) for earlier, later in itertools.pairwise(times))
    remaining = await jobs_of(client, "tick")
    assert len(remaining) >= len(jobs)  # deleting the schedule leaves its jobs
    final = await eventually_reads(lambda: client.get(ids[0]), lambda job: job.state is RequestState.FINISHED, within=5)
    assert dict(final.last_response.data) == {"from": "tick"}


async def test_a_paused_schedule_submits_nothing_until_resumed(client: AsyncClient) -> None:
    await client.create_schedule("paused-tick", EVERY_SECOND, "echo")
    await eventually_reads(lambda: jobs_of(client, "paused-tick"), lambda found: len(found) >= 1, within=10)
    paused = await client.pause_schedule("paused-tick")
    assert paused.schedule.paused
    # a job may still be submitted by a round that read the schedule before the pause
    count = len(await jobs_of(client, "paused-tick"))
    last = (await client.get_schedule("paused-tick")).schedule.last_job_id
    resumed = await client.resume_schedule("paused-tick")
    assert resumed.next_run_time is not None
    after = await eventually_reads(
        lambda: client.get_schedule("paused-tick"),
        lambda info: info.schedule.last_job_id not in ("", last),
        within=10,
    )
    assert after.schedule.last_time is not None
    assert len(await jobs_of(client, "paused-tick")) > count
    await client.delete_schedule("paused-tick")


# -- ownership --------------------------------------------------------------------------------


TOKENS = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[tokens]]
sha256 = "{bob}"
principal = "bob"
types = ["noop"]

[[tokens]]
sha256 = "{root}"
principal = "root"
roles = ["admin"]
"""

CONFIGURED = Schedule(id="from-config", cron="0 0 1 1 *", template=Request(id="", type="echo"))


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[AjsServer]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root")}))
    server = await start(tokens_file=str(tokens), schedules=(CONFIGURED,))
    try:
        yield server
    finally:
        await server.stop()


async def test_a_principal_sees_and_manages_only_its_own_schedules(guarded: AjsServer) -> None:
    async with (
        AsyncClient(guarded.address, timeout=10, token="alice-token") as alice,
        AsyncClient(guarded.address, timeout=10, token="bob-token") as bob,
        AsyncClient(guarded.address, timeout=10, token="root-token") as root,
    ):
        mine = await alice.create_schedule("mine", "0 0 1 1 *", "echo")
        assert (mine.schedule.id, mine.schedule.creator) == ("mine", "alice")
        for name in ("~alice/mine", "from-config", "nope"):
            for call in (bob.get_schedule(name), bob.pause_schedule(name), bob.delete_schedule(name)):
                with pytest.raises(NotFound) as hidden:
                    await call
                assert hidden.value.reason == "SCHEDULE_NOT_FOUND"
        # Each principal has its own namespace: bob's "mine" is another schedule.
        bobs = await bob.create_schedule("mine", "0 0 1 1 *", "noop")
        assert bobs.schedule.id == "mine"
        assert [info.schedule.id for info in await bob.list_schedules()] == ["mine"]
        assert [info.schedule.id for info in await alice.list_schedules()] == ["mine"]
        with pytest.raises(InvalidArgument) as elsewhere:
            await bob.create_schedule("~alice/other", "0 0 1 1 *", "noop")
        assert [v.field for v in elsewhere.value.violations] == ["schedule.id"]
        # A principal may schedule only the types it may submit.
        with pytest.raises(PermissionDenied) as denied:
            await bob.create_schedule("echoes", "0 0 1 1 *", "echo")
        assert denied.value.reason == "TYPE_NOT_ALLOWED"
        # An admin sees every schedule, by its stored id; the configuration's are the admin's own.
        listed = {info.schedule.id: info.schedule.creator for info in await root.list_schedules()}
        assert listed == {"from-config": "", "~alice/mine": "alice", "~bob/mine": "bob"}
        assert (await root.pause_schedule("~alice/mine")).schedule.paused
        assert (await alice.get_schedule("mine")).schedule.paused
        await root.delete_schedule("~bob/mine")
        assert await bob.list_schedules() == []
        # A page token is bound to its caller.
        _, token = await root.list_schedules_page(page_size=1)
        with pytest.raises(InvalidArgument):
            await alice.list_schedules_page(page_token=token)


async def test_a_principals_schedule_submits_jobs_as_that_principal(guarded: AjsServer) -> None:
    async with (
        AsyncClient(guarded.address, timeout=10, token="alice-token") as alice,
        AsyncClient(guarded.address, timeout=10, token="bob-token") as bob,
    ):
        await alice.create_schedule("tick", EVERY_SECOND, "echo")
        [job, *_] = await eventually_reads(lambda: jobs_of(alice, "tick"), lambda found: len(found) >= 1, within=10)
        await alice.delete_schedule("tick")
        assert OCCURRENCE.fullmatch(job.request.id.removeprefix("tick"))
        assert job.request.creator == "alice"
        with pytest.raises(NotFound):
            await bob.get(f"~alice/{job.request.id}")


async def test_a_principals_schedules_are_bounded_by_a_quota(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root")}))
    server = await start(tokens_file=str(tokens), limits=Limits(max_schedules_per_principal=2))
    try:
        async with (
            AsyncClient(server.address, timeout=10, token="alice-token") as alice,
            AsyncClient(server.address, timeout=10, token="root-token") as root,
        ):
            await alice.create_schedule("one", "0 0 1 1 *", "echo")
            await alice.create_schedule("two", "0 0 1 1 *", "echo")
            await alice.create_schedule("two", "0 0 1 1 *", "echo")  # the same again: answered, not counted
            with pytest.raises(ResourceExhausted) as refused:
                await alice.create_schedule("three", "0 0 1 1 *", "echo")
            assert refused.value.reason == "SCHEDULES_QUOTA"
            await root.create_schedule("three", "0 0 1 1 *", "echo")  # admins are exempt
            await alice.delete_schedule("one")
            await alice.create_schedule("three", "0 0 1 1 *", "echo")
    finally:
        await server.stop()


# -- server wiring ----------------------------------------------------------------------------


async def test_configured_schedules_are_stored_at_start_and_only_instances_running_jobs_schedule() -> None:
    server = await start(schedules=(CONFIGURED,), scheduler=False)
    try:
        assert server.scheduler is None
        stored = await server.connector.get_schedule("from-config")
        assert stored.same_definition(CONFIGURED)
        assert stored.creator == ""
    finally:
        await server.stop()
    frontend = AjsServer(ServerConfig(address="127.0.0.1:0", role="frontend"), connector=MemoryConnector())
    assert frontend.scheduler is None
    assert AjsServer(ServerConfig(address="127.0.0.1:0"), connector=MemoryConnector()).scheduler is not None


# -- the ajs command --------------------------------------------------------------------------


async def ajs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs the ``ajs`` command in a thread (it runs an event loop of its own); returns its code, stdout, stderr."""
    code = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def ajs_process(*argv: str) -> tuple[int, str, str]:
    """Runs ``ajs`` as a separate process, as a user would."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ajs_grpc.faces.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_ajs_schedules_commands(served: AjsServer, capsys: pytest.CaptureFixture[str]) -> None:
    target = ("--target", served.address)
    code, out, err = await ajs_process(
        *("schedules", "create", "report", "--cron", "30 6 * * 1-5", "--type", "echo", "--tz", "Europe/Berlin"),
        *("--data", "kind=weekly", "--overlap", "allow", "--catchup", "one", "--attempt-timeout", "5m", *target),
    )
    assert (code, err) == (cli.EXIT_OK, "")
    assert re.fullmatch(r"schedule report: 30 6 \* \* 1-5 in Europe/Berlin, next run \S+\n", out)

    code, out, _ = await ajs_process("schedules", *target)
    assert code == cli.EXIT_OK
    header, row = [line.split("\t") for line in out.splitlines()]
    assert header == ["ID", "CRON", "ZONE", "TYPE", "OVERLAP", "CATCHUP", "PAUSED", "NEXT RUN", "LAST JOB"]
    assert row[:7] == ["report", "30 6 * * 1-5", "Europe/Berlin", "echo", "allow", "one", "no"]

    code, out, _ = await ajs(capsys, "schedules", "get", "report", *target)
    assert code == cli.EXIT_OK
    assert '"kind": "weekly"' in out
    assert '"timeout": 300.0' in out
    assert await ajs(capsys, "schedules", "pause", "report", *target) == (cli.EXIT_OK, "schedule report paused\n", "")
    code, out, _ = await ajs(capsys, "schedules", "list", *target)
    assert out.splitlines()[1].split("\t")[6:8] == ["yes", "-"]
    code, out, _ = await ajs(capsys, "schedules", "resume", "report", *target)
    assert (code, out.startswith("schedule report resumed, next run ")) == (cli.EXIT_OK, True)
    assert await ajs(capsys, "schedules", "delete", "report", *target) == (
        cli.EXIT_OK,
        "deleted schedule report (the jobs it submitted stay)\n",
        "",
    )
    code, _, err = await ajs(capsys, "schedules", "get", "report", *target)
    assert code == cli.EXIT_REFUSED
    assert "NOT_FOUND" in err
    code, _, err = await ajs(capsys, "schedules", "create", "bad", "--cron", "every day", "--type", "echo", *target)
    assert code == cli.EXIT_REFUSED
    assert "schedule.cron" in err
