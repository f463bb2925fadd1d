"""Flow control as users see it: real `ajs serve` processes, three of them on one PostgreSQL queue.

The job types come from tests/flow_plugins/flow_jobs.py. Starts and ends are read from each
job's Responses (the PENDING Response of a claim, the Response that ends the attempt), which
every instance writes with the time of the machine they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.model import Request, RequestState, Response
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.serve_process import Served, start_server

S = RequestState
PLUGINS = Path(__file__).resolve().parents[1] / "flow_plugins"


@dataclass
class Instances:
    """`ajs serve` processes on one queue: one on SQLite, or several on one PostgreSQL schema."""

    backend: str
    tmp_path: Path
    schema: str = field(default_factory=unique_schema)
    served: list[Served] = field(default_factory=list)

    def start(self, *args: str, home: str = "") -> Served:
        where = self.tmp_path / (home or f"instance{len(self.served)}")
        where.mkdir(exist_ok=True)
        store = ["--connector", "postgres", "--dsn", postgres_dsn(), "--schema", self.schema]
        served = start_server(
            where, "--jobs-dir", str(PLUGINS), "--max-jobs", "8", *(store if self.backend == "postgres" else []), *args
        )
        self.served.append(served)
        return served

    def start_all(self, *args: str) -> list[Served]:
        count = 3 if self.backend == "postgres" else 1
        return [self.start(*args) for _ in range(count)]

    def stop(self, served: Served) -> None:
        if served.process.poll() is None:
            served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(30)
        except subprocess.TimeoutExpired:
            served.process.kill()

    def close(self) -> None:
        for served in self.served:
            self.stop(served)
        if self.backend == "postgres":
            drop_schema(self.schema)


@pytest.fixture(params=["sqlite", "postgres"])
def instances(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Instances]:
    made = Instances(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture
def pg_instances(tmp_path: Path) -> Iterator[Instances]:
    made = Instances("postgres", tmp_path)
    yield made
    made.close()


@contextlib.asynccontextmanager
async def clients(served: list[Served]) -> AsyncIterator[list[AsyncClient]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(AsyncClient(s.target)) for s in served]


def batch(kind: str, count: int, **data: str) -> list[Request]:
    tag = uuid.uuid4().hex[:8]
    return [Request(id=f"{kind}-{tag}-{i:04}", type=kind, data=data) for i in range(count)]


@dataclass(frozen=True)
class Attempt:
    request_id: str
    worker: str
    start: datetime
    end: datetime
    ended: S


async def attempts(client: AsyncClient, request_id: str) -> list[Attempt]:
    """Each run of a job: from its claim's PENDING Response to the Response that ended it."""
    found: list[Attempt] = []
    start: Response | None = None
    async for response in client.watch(request_id):
        if response.state is S.PENDING and "worker" in response.data:
            start = response
        elif start is not None and (response.state is S.CREATED or response.is_final):
            worker = start.data["worker"]
            found.append(Attempt(request_id, worker, start.create_time, response.create_time, response.state))
            start = None
    return found


async def all_finished(client: AsyncClient, ids: list[str], within: float = 120) -> None:
    async with asyncio.timeout(within):
        for request_id in ids:
            [*_, last] = [r async for r in client.watch(request_id)]
            assert last.state is S.FINISHED, f"{request_id} ended {last.state.name}"


def most_at_once(runs: list[Attempt]) -> int:
    """The most attempts running at the same time (an end at the same instant as a start comes first)."""
    events = sorted([(run.start, 1) for run in runs] + [(run.end, -1) for run in runs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# -- concurrency -------------------------------------------------------------------------------


async def test_three_instances_never_run_more_than_the_concurrency_limit(pg_instances: Instances) -> None:
    served = pg_instances.start_all()
    requests = batch("per-tenant", 200, tenant="acme", seconds="0.03")
    ids = [r.id for r in requests]
    samples: list[int] = []
    query = f'SELECT count(*) FROM "{pg_instances.schema}".jobs WHERE state = %s AND type = %s'

    async def sample(done: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn(), autocommit=True) as connection:
            while not done.is_set():
                row = await (await connection.execute(query, (int(S.PENDING), "per-tenant"))).fetchone()
                assert row is not None
                samples.append(int(row[0]))
                await asyncio.sleep(0.005)  # pacing: the instances share two cores with this loop

    async with clients(served) as (first, *others):
        done = asyncio.Event()
        sampler = asyncio.create_task(sample(done))
        for start in range(0, 200, 50):
            await first.submit_many(requests[start : start + 50])
        await all_finished(others[0], ids)
        done.set()
        await sampler
        runs = [run for request_id in ids for run in await attempts(first, request_id)]
    assert len(samples) > 100  # sampled all along (each sample is one query)
    assert max(samples) == 2, f"PENDING count peaked at {max(samples)}"
    assert most_at_once(runs) == 2
    assert len(runs) == 200
    assert len({run.worker for run in runs}) > 1  # the instances shared the work


# -- rate limit ---------------------------------------------------------------------------------


async def test_rate_limited_starts_never_exceed_the_bucket(instances: Instances) -> None:
    served = instances.start_all()
    requests = batch("api-call", 200, endpoint="pay", seconds="0")
    rate, burst = 20.0, 20
    async with clients(served) as (first, *_):
        await first.submit_many(requests)
        await all_finished(first, [r.id for r in requests])
        starts = sorted([run.start for r in requests for run in await attempts(first, r.id)])
    assert len(starts) == 200
    # Any stretch of time holds at most the burst plus what the rate adds over it. The
    # starts are stamped with the time the claim read the bucket (the database's clock on
    # PostgreSQL, the process's on SQLite: the same machine's); a stretch is given 20 ms more.
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            window = (starts[j] - starts[i]).total_seconds()
            assert j - i + 1 <= burst + rate * (window + 0.02), (
                f"{j - i + 1} starts in {window:.3f}s (at most {burst} + {rate:g}/s)"
            )
    per_second: dict[int, int] = {}
    for start in starts:
        second = int((start - starts[0]).total_seconds())
        per_second[second] = per_second.get(second, 0) + 1
    assert max(per_second.values()) <= burst + rate
    # And the limit did not starve it: 200 starts at 20/s after a burst of 20 take about 9 s.
    assert (starts[-1] - starts[0]).total_seconds() >= (200 - burst) / rate - 0.5


# -- order ------------------------------------------------------------------------------------


async def test_ordered_jobs_start_in_submit_order_one_at_a_time_per_key(instances: Instances) -> None:
    served = instances.start_all()
    requests = [
        Request(
            id=f"ledger-{uuid.uuid4().hex[:8]}-{i:03}",
            type="ledger",
            data={"account": f"acct{i % 10}", "seconds": "0.01", "fail_once": "yes" if i % 7 == 3 else "no"},
        )
        for i in range(100)
    ]
    async with clients(served) as (first, *_):
        await first.submit_many(requests)
        await all_finished(first, [r.id for r in requests])
        runs = {r.id: await attempts(first, r.id) for r in requests}
    retried = [request_id for request_id, found in runs.items() if len(found) == 2]
    assert len(retried) == len([r for r in requests if r.data["fail_once"] == "yes"]) > 0
    for account in {r.data["account"] for r in requests}:
        in_order = [run for r in requests if r.data["account"] == account for run in runs[r.id]]
        for before, after in itertools.pairwise(in_order):
            # Submit order (a retried job's second attempt before the next job), never overlapping.
            assert before.end <= after.start, f"{account}: {after.request_id} started before {before.request_id} ended"


# -- unique -------------------------------------------------------------------------------------


async def test_concurrent_submits_of_one_unique_key_create_one_job(instances: Instances) -> None:
    served = instances.start_all()
    async with clients(served) as connected:
        answers = await asyncio.gather(
            *(
                connected[n % len(connected)].submit("report", {"report": "q3", "seconds": "2"}, id=f"report-{n}")
                for n in range(50)
            )
        )
    assert sum(answer.created for answer in answers) == 1
    assert len({answer.job.request.id for answer in answers}) == 1


# -- pause --------------------------------------------------------------------------------------


async def test_a_paused_queue_holds_its_jobs_across_a_restart_until_resumed(instances: Instances) -> None:
    served = instances.start_all()
    held = [Request(id=f"held-{uuid.uuid4().hex[:8]}-{i}", type="plain", queue="reports") for i in range(10)]
    other = [Request(id=f"other-{uuid.uuid4().hex[:8]}-{i}", type="plain", queue="mail") for i in range(10)]
    async with clients(served) as (first, *_):
        paused = await first.pause_queue("reports")
        assert paused.paused
        await first.submit_many(held)
        await first.submit_many(other)
        await all_finished(first, [r.id for r in other])
        loop = asyncio.get_running_loop()
        until = loop.time() + 5
        while loop.time() < until:  # five seconds of the other queue's jobs running and done
            states = {(await first.get(r.id)).state for r in held}
            assert states == {S.CREATED}
            await asyncio.sleep(0.25)
    # The pause is in the store: a restarted instance (every instance) sees it.
    for instance in list(instances.served):
        instances.stop(instance)
        instances.served.remove(instance)
    restarted = instances.start(home="instance0")
    async with AsyncClient(restarted.target) as client:
        [reports] = [q for q in await client.list_queues() if q.name == "reports"]
        assert reports.paused
        assert reports.queued == 10
        assert {(await client.get(r.id)).state for r in held} == {S.CREATED}
        resumed = await client.resume_queue("reports")
        assert not resumed.paused
        await all_finished(client, [r.id for r in held], within=30)
