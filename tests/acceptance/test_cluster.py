"""Several `ajs serve` instances on one PostgreSQL queue, behind client-side balancing or nginx."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.model import RequestState, Response
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.serve_process import Served, free_port, start_server

S = RequestState
ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    """Instances of one queue (one schema), each in a directory of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.dsn = postgres_dsn()
        self.schema = unique_schema()
        self.instances: list[Served] = []

    def start(self, role: str, *args: str, address: str = "127.0.0.1:0") -> Served:
        home = self.tmp_path / f"instance{len(self.instances)}"
        home.mkdir(exist_ok=True)
        served = start_server(
            home,
            "--connector", "postgres", "--dsn", self.dsn, "--schema", self.schema, "--role", role, *args,
            address=address,
        )  # fmt: skip
        self.instances.append(served)
        return served

    def stop(self) -> None:
        for served in self.instances:
            if served.process.poll() is None:
                served.process.send_signal(signal.SIGTERM)
        for served in self.instances:
            try:
                served.process.wait(30)
            except subprocess.TimeoutExpired:
                served.process.kill()
        drop_schema(self.schema)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.stop()


def worker_pid(response: Response) -> int:
    return int(response.data["worker"].rsplit(":", 1)[1])


async def test_submitted_on_a_frontend_run_on_a_worker_watched_on_another_frontend(cluster: Cluster) -> None:
    a = cluster.start("frontend")
    b = cluster.start("worker")
    c = cluster.start("frontend")
    async with AsyncClient(a.target) as on_a, AsyncClient(c.target) as on_c:
        submitted = await on_a.submit("countdown", {"steps": "5", "interval": "0.05"})
        responses = [r async for r in on_c.watch(submitted.job.request.id)]
    assert [r.sequence for r in responses] == list(range(1, len(responses) + 1))
    assert responses[-1].state is S.FINISHED
    assert len([r for r in responses if r.progress]) == 5
    claimed = [r for r in responses if r.state is S.PENDING and r.progress is None]
    assert [worker_pid(r) for r in claimed] == [b.process.pid]


async def test_a_worker_reports_job_service_not_serving_so_balancers_skip_it(cluster: Cluster) -> None:
    cluster.start("all")
    worker = cluster.start("worker")
    async with AsyncClient(worker.target, timeout=2) as client:
        assert await client.health() == "SERVING"
        assert await client.health("ajs.v1.JobService") == "NOT_SERVING"
        assert await client.health("ajs.dispatcher") == "SERVING"


async def test_sigkill_of_the_worker_mid_job_another_worker_finishes_it(cluster: Cluster) -> None:
    front = cluster.start("frontend")
    workers = {w.process.pid: w for w in (cluster.start("worker", "--lease", "1s") for _ in range(2))}
    async with AsyncClient(front.target, resume_for=30) as client:
        submitted = await client.submit("countdown", {"steps": "30", "interval": "0.1"})
        request_id = submitted.job.request.id
        seen = []
        async for response in client.watch(request_id):
            seen.append(response)
            if response.progress is not None:
                break  # running now
        first = seen[-1]
        victim = worker_pid(next(r for r in seen if r.state is S.PENDING and r.progress is None))
        workers[victim].process.send_signal(signal.SIGKILL)
        workers[victim].process.wait(10)
        responses = [r async for r in client.watch(request_id, first.sequence)]
    assert responses[-1].state is S.FINISHED
    expired = [r for r in responses if r.error is not None and r.error.reason == "LEASE_EXPIRED"]
    assert expired
    reclaims = [r for r in responses if r.state is S.PENDING and r.progress is None]
    assert [worker_pid(r) for r in reclaims] == [pid for pid in workers if pid != victim]


async def steady_submits(target: str, seconds: float, during: asyncio.Event) -> tuple[list[str], list[BaseException]]:
    """Submits echo jobs from 4 clients for ``seconds``; returns the acknowledged ids and any errors."""
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def one_client(number: int) -> None:
        async with AsyncClient(target, timeout=10) as client:
            sent = 0
            while loop.time() < end:
                request_id = f"c{number}-{sent}"
                sent += 1
                try:
                    await client.submit("echo", {"n": request_id}, id=request_id)
                    acknowledged.append(request_id)
                except Exception as error:
                    failures.append(error)
                if len(acknowledged) > 50:
                    during.set()

    await asyncio.gather(*(one_client(n) for n in range(4)))
    return acknowledged, failures


async def drain_under_load(cluster: Cluster, target: str, victim: Served, survivor: Served) -> None:
    async with AsyncClient(victim.target) as on_victim:
        running = [
            (await on_victim.submit("countdown", {"steps": "10", "interval": "0.1"})).job.request.id for _ in range(3)
        ]
    started = asyncio.Event()
    load = asyncio.create_task(steady_submits(target, 4.0, started))
    await started.wait()
    victim.process.send_signal(signal.SIGTERM)
    acknowledged, failures = await load
    assert victim.process.wait(30) == 0
    assert failures == []
    assert len(acknowledged) > 100
    async with AsyncClient(survivor.target, timeout=10) as client:
        for request_id in acknowledged:  # zero lost submits
            assert (await client.get(request_id)).request.id == request_id
        for request_id in running:  # finished during the drain, or handed back and finished by the survivor
            final = [r async for r in client.watch(request_id)][-1]
            assert final.state is S.FINISHED


async def test_draining_one_instance_under_load_loses_no_submit_with_round_robin(cluster: Cluster) -> None:
    x = cluster.start("all", "--shutdown-grace", "1s")
    y = cluster.start("all", "--shutdown-grace", "1s")
    await drain_under_load(cluster, f"{x.target},{y.target}", x, y)


@pytest.fixture
def nginx(tmp_path: Path, cluster: Cluster) -> Iterator[tuple[str, list[Served]]]:
    """deploy/nginx.conf in front of two instances, on ports of this test's own."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed in CI")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    backends = [cluster.start("all", "--shutdown-grace", "1s", address=f"127.0.0.1:{free_port()}") for _ in range(2)]
    front = free_port()
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    config = config.replace("127.0.0.1:50051", backends[0].target).replace("127.0.0.1:50052", backends[1].target)
    config = re.sub(r"listen 127\.0\.0\.1:8080", f"listen 127.0.0.1:{front}", config)
    (tmp_path / "nginx.conf").write_text(config)
    settings = f"daemon off; pid {tmp_path}/nginx.pid;"
    process = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", settings])
    yield f"127.0.0.1:{front}", backends
    process.terminate()
    process.wait(10)


async def test_draining_one_instance_under_load_loses_no_submit_through_nginx(
    nginx: tuple[str, list[Served]], cluster: Cluster
) -> None:
    target, (x, y) = nginx
    async with AsyncClient(target, timeout=5) as client:
        for _ in range(50):  # nginx is up once it answers
            try:
                await client.health()
                break
            except Exception:
                await asyncio.sleep(0.1)
    await drain_under_load(cluster, target, x, y)


async def test_a_worker_claims_only_the_types_its_chain_runs(cluster: Cluster) -> None:
    front = cluster.start("frontend")
    cluster.start("worker", "--handler", "internal=echo")  # runs echo only
    async with AsyncClient(front.target) as client:
        countdown = await client.submit("countdown", {"steps": "2", "interval": "0.01"})
        echo = await client.submit("echo", {"k": "v"})
        # The echo worker ran the later echo job, so it looked at the queue after the countdown job...
        assert [r async for r in client.watch(echo.job.request.id)][-1].state is S.FINISHED
        # ...and left that one, which it cannot run, queued for a worker that can.
        waiting = await client.get(countdown.job.request.id)
        assert (waiting.state, waiting.attempt) == (S.CREATED, 0)
        full = cluster.start("worker")
        responses = [r async for r in client.watch(countdown.job.request.id)]
    assert responses[-1].state is S.FINISHED
    claimed = [r for r in responses if r.state is S.PENDING and r.progress is None]
    assert [worker_pid(r) for r in claimed] == [full.process.pid]


async def test_a_job_cancelled_on_one_instance_stops_on_the_worker_running_it(cluster: Cluster) -> None:
    front = cluster.start("frontend")
    worker = cluster.start("worker", "--cancel-grace", "30s")
    async with AsyncClient(front.target) as client:
        submitted = await client.submit("countdown", {"steps": "600", "interval": "0.05"})
        request_id = submitted.job.request.id
        async for response in client.watch(request_id):
            if response.progress is not None:
                break  # it runs on the worker now
        cancelled = await client.cancel(request_id)
        assert cancelled.state is S.PENDING
        assert cancelled.cancel_requested
        responses = [r async for r in client.watch(request_id)]
    final = responses[-1]
    assert final.state is S.CANCELLED
    assert final.error is not None
    assert final.error.reason == "CANCELLED_BY_CLIENT"
    # The worker heard of it (LISTEN/NOTIFY) and stopped the job long before its 30 s grace or its 30 s of steps.
    progress = [r for r in responses if r.progress is not None]
    assert len(progress) < 300
    assert worker.process.poll() is None
