"""Schedules as operators see them: real `ajs serve` processes on one PostgreSQL schema, killed and restarted.

Every instance runs a scheduler. The job of an occurrence has an id derived from the
schedule's id and the occurrence's time, so however many instances find it due, and
whichever of them dies between submitting it and recording it, one job is stored.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest

from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.serve_process import Served, start_server

PLUGINS = Path(__file__).resolve().parents[1] / "flow_plugins"


@dataclass
class Cluster:
    """`ajs serve` processes on one PostgreSQL schema, each in a home directory of its own."""

    tmp_path: Path
    schema: str = field(default_factory=unique_schema)
    served: dict[str, Served] = field(default_factory=dict)

    def start(self, name: str) -> Served:
        home = self.tmp_path / name
        home.mkdir(exist_ok=True)
        store = ["--connector", "postgres", "--dsn", postgres_dsn(), "--schema", self.schema]
        self.served[name] = start_server(home, "--jobs-dir", str(PLUGINS), *store)
        return self.served[name]

    def kill(self, name: str) -> None:
        process = self.served[name].process
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def close(self) -> None:
        for served in self.served.values():
            if served.process.poll() is None:
                served.process.send_signal(signal.SIGTERM)
                try:
                    served.process.wait(30)
                except subprocess.TimeoutExpired:
                    served.process.kill()
        drop_schema(self.schema)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.close()


def occurrence_of(job_id: str, schedule_id: str) -> datetime:
    """The occurrence a scheduled job's id names (``<schedule>@YYYYmmddTHHMMSSZ``)."""
    prefix, stamp = job_id.rsplit("@", 1)
    assert prefix == schedule_id, job_id
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def scheduled_jobs(schema: str, schedule_id: str) -> list[tuple[str, datetime]]:
    """The ids and create times of the schedule's jobs, read from the database itself."""
    with psycopg.connect(postgres_dsn(), autocommit=True) as connection:
        rows = connection.execute(
            f'SELECT id, create_time FROM "{schema}".jobs WHERE id LIKE %s ORDER BY id', (f"{schedule_id}@%",)
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


async def wait_for_jobs(schema: str, schedule_id: str, count: int, within: float = 60) -> None:
    """Returns once the schedule has at least ``count`` jobs (its occurrences pace the test)."""
    deadline = time.monotonic() + within
    while len(scheduled_jobs(schema, schedule_id)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} jobs of {schedule_id} after {within}s"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)  # a minute of occurrences, four process starts
async def test_a_schedule_every_second_gives_one_job_per_occurrence_while_instances_die(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start(name)
    schedule = pb.Schedule(
        id="tick",
        cron="* * * * * *",  # every second
        time_zone="Europe/Berlin",
        template=pb.Request(type="plain"),
        overlap_policy=pb.OVERLAP_POLICY_ALLOW,
        catchup_policy=pb.CATCHUP_POLICY_SKIP,
    )
    async with grpc.aio.insecure_channel(cluster.served["a"].target) as channel:
        created = await pb_grpc.JobServiceStub(channel).CreateSchedule(pb.CreateScheduleRequest(schedule=schedule))
    assert created.schedule.id == "tick"
    assert created.schedule.next_run_time.seconds > 0
    # A minute of it, pacing by the jobs it makes: two of the three instances are killed
    # with SIGKILL (one at a time, so one always runs) and restarted on the same schema.
    await wait_for_jobs(cluster.schema, "tick", 8)
    cluster.kill("b")
    await wait_for_jobs(cluster.schema, "tick", 18)
    cluster.start("b")
    await wait_for_jobs(cluster.schema, "tick", 28)
    cluster.kill("c")
    await wait_for_jobs(cluster.schema, "tick", 38)
    cluster.start("c")
    await wait_for_jobs(cluster.schema, "tick", 60, within=90)
    async with grpc.aio.insecure_channel(cluster.served["b"].target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        await stub.PauseSchedule(pb.PauseScheduleRequest(id="tick"))
        stopped = await stub.GetSchedule(pb.GetScheduleRequest(id="tick"))
    last_handled = stopped.schedule.last_run_time.ToDatetime(tzinfo=UTC)

    jobs = scheduled_jobs(cluster.schema, "tick")
    occurrences = [occurrence_of(job_id, "tick") for job_id, _ in jobs]
    first, last = min(occurrences), max(occurrences)
    assert last <= last_handled
    # Exactly one job per occurrence (the ids are the jobs' primary key: none twice), and no
    # second missing from the first to the last: an instance always ran, nothing was missed.
    expected = [first + timedelta(seconds=n) for n in range(int((last - first).total_seconds()) + 1)]
    missing = sorted(set(expected) - set(occurrences))
    assert not missing, f"no job for {[t.isoformat() for t in missing]}"
    assert len(occurrences) == len(expected) >= 60
    # Each was submitted at its occurrence, or soon after it when the instance about to
    # submit it died (another submitted it then).
    late = [(job_id, (created - occurrence_of(job_id, "tick")).total_seconds()) for job_id, created in jobs]
    assert all(-0.5 <= seconds < 15 for _, seconds in late), late
