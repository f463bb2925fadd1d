"""Remote workers as processes: `ajs worker` killed mid-job, instances claiming only what their workers run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.model import RequestState, Response
from tests.acceptance.test_cluster import Cluster, worker_pid
from tests.helpers import eventually_reads
from tests.serve_process import AJS, Served, WorkerProcess, start_server

S = RequestState

JOBS = '''
import os


async def slow(request, ctx):
    """Reports its pid with each step, so a test knows which worker runs it."""
    steps = int(request.data.get("steps", "50"))
    for step in range(steps):
        await ctx.progress((step + 1) / steps, f"step {step + 1}", {"pid": str(os.getpid())})
        await ctx.sleep(0.1)
    return {"pid": str(os.getpid()), "attempt": str(ctx.attempt)}
'''


class RemoteWorker(WorkerProcess):
    """An `ajs worker` process, registered."""

    def __init__(self, home: Path, target: str, *jobs: str) -> None:
        command = [AJS, "worker", "--target", target, *jobs]
        super().__init__(command, home, home / f"worker-{time.monotonic_ns()}.log", "registered as")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "slow_jobs.py").write_text(JOBS)
    return tmp_path


def step_pid(response: Response) -> int:
    return int(response.data["pid"])


async def test_a_remote_worker_killed_mid_job_has_it_run_again_on_another_and_end_once(home: Path) -> None:
    # A long lease: were the job handed back only when its lease ran out, this test would wait a minute.
    served = start_server(home, "--lease", "60s")
    workers = [RemoteWorker(home, served.target, "slow_jobs:slow") for _ in range(2)]
    try:
        async with AsyncClient(served.target) as client:
            submitted = await client.submit("slow", data={"steps": "30"})
            request_id = submitted.job.request.id
            seen: list[Response] = []
            async for response in client.watch(request_id):
                seen.append(response)
                if response.progress is not None:
                    break
            victim = next(w for w in workers if w.process.pid == step_pid(seen[-1]))
            survivor = next(w for w in workers if w is not victim)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
            responses = [r async for r in client.watch(request_id)]
        final = responses[-1]
        assert [r.is_final for r in responses].count(True) == 1
        assert final.state is S.FINISHED
        assert final.data == {"pid": str(survivor.process.pid), "attempt": "2"}
        handed_back = [r for r in responses if r.state is S.CREATED and r.error is not None]
        assert [r.error.reason for r in handed_back if r.error] == ["WORKER_LOST"]
        # The job's steps ran on the victim until the kill, then only on the survivor.
        pids = [step_pid(r) for r in responses if r.progress is not None]
        assert set(pids) == {victim.process.pid, survivor.process.pid}
        assert pids[pids.index(survivor.process.pid) :] == [survivor.process.pid] * (
            len(pids) - pids.index(survivor.process.pid)
        )
    finally:
        for worker in workers:
            worker.stop()
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "slow_jobs.py").write_text(JOBS)
    made = Cluster(tmp_path)
    yield made
    made.stop()


async def test_an_instance_claims_only_the_remote_types_its_own_workers_run(cluster: Cluster) -> None:
    # Both instances accept submits of "slow" (the configuration names it); only b has a worker for it.
    a: Served = cluster.start("all", "--handler", "internal", "--handler", "remote=slow")
    b: Served = cluster.start("all", "--handler", "internal", "--handler", "remote=slow")
    worker = RemoteWorker(cluster.tmp_path, b.target, "slow_jobs:slow")
    try:
        async with AsyncClient(a.target) as client:
            ids = [(await client.submit("slow", data={"steps": "1"})).job.request.id for _ in range(5)]
            for request_id in ids:
                responses = [r async for r in client.watch(request_id)]
                assert responses[-1].state is S.FINISHED
                claims = [r for r in responses if r.state is S.PENDING and r.progress is None]
                assert [worker_pid(r) for r in claims] == [b.process.pid]
                assert responses[-1].data["pid"] == str(worker.process.pid)
            # With b's worker gone, a job waits queued on both instances rather than fail on a.
            worker.stop()
            waiting = await client.submit("slow", data={"steps": "1"})
            job = await eventually_reads(
                lambda: client.get(waiting.job.request.id), lambda j: j.state is S.CREATED, within=5
            )
            assert job.attempt == 0
            again = RemoteWorker(cluster.tmp_path, a.target, "slow_jobs:slow")
            try:
                responses = [r async for r in client.watch(waiting.job.request.id)]
            finally:
                again.stop()
        claims = [r for r in responses if r.state is S.PENDING and r.progress is None]
        assert [worker_pid(r) for r in claims] == [a.process.pid]
        assert os.getpid() not in {a.process.pid, b.process.pid}
    finally:
        worker.stop()


def test_ajs_worker_says_what_is_wrong_with_its_arguments(home: Path) -> None:
    for args, message in (
        (["nosuch_module:job"], "No module named 'nosuch_module'"),
        (["slow_jobs:missing"], "has no attribute 'missing'"),
        (["slow_jobs"], "name a job as MODULE:NAME"),
        (["slow_jobs:os"], "is not a JobPlugin, a list of them, or a job function"),
    ):
        run = subprocess.run(
            [AJS, "worker", "--target", "127.0.0.1:1", *args], cwd=home, capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 2, run.stderr
        assert message in run.stderr


def test_ajs_worker_stops_when_the_server_refuses_its_types_for_good(home: Path) -> None:
    served = start_server(home)
    (home / "clash.py").write_text("async def echo(request, ctx):\n    return None\n")
    try:
        run = subprocess.run(
            [AJS, "worker", "--target", served.target, "clash:echo"],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 5
        assert "FAILED_PRECONDITION" in run.stderr
        assert "runs in this server's 'internal' handler" in run.stderr
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(30)
