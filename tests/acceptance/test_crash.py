"""Crash tests: a real ``ajs serve`` on the default SQLite queue, killed with SIGKILL.

They check DESIGN.md's guarantees the hard way: an acknowledged submit is never
lost, every acknowledged request ends with exactly one final Response, and a
watcher that resumes from its last sequence misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import Unavailable
from ajs_grpc.core.model import RequestState, Response, now
from tests.serve_process import Served, free_port, start_server

S = RequestState


def kill(server: Served) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


async def submit_until_acknowledged(
    client: AsyncClient, request_id: str, data: dict[str, str], request_type: str = "countdown"
) -> None:
    """Submits with a fixed id until the server says yes; idempotence makes retries safe."""
    for _ in range(400):
        try:
            await client.submit(request_type, data, id=request_id)
            return
        except Unavailable:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{request_id} was never acknowledged")


async def test_sigkill_right_after_the_reply_loses_nothing(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    later = now() + timedelta(days=1)
    async with AsyncClient(server.target, timeout=10) as client:
        ids = [f"kept-{i}" for i in range(200)]
        # Due tomorrow: they stay queued, so only what reached the disk is left after the kill.
        submits = [client.submit("countdown", {"steps": "1"}, id=i, run_after=later) for i in ids]
        await asyncio.gather(*submits)
    kill(server)  # at once after the last reply
    server = start_server(tmp_path, address=server.target)
    try:
        async with AsyncClient(server.target, timeout=10) as client:
            for request_id in ids:
                job = await client.get(request_id)
                assert job.state is S.CREATED
                assert job.due_time == later
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)


@pytest.mark.timeout(240)
async def test_repeated_sigkills_lose_nothing_and_finish_each_job_once(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    args = ("--max-jobs", "8", "--shutdown-grace", "1")
    server = start_server(tmp_path, *args, address=target)
    jobs = 60
    clients = 4
    seen: dict[str, list[Response]] = {}

    async def watch(client: AsyncClient, request_id: str) -> None:
        seen[request_id] = [r async for r in client.watch(request_id)]

    async def producer(number: int) -> None:
        async with AsyncClient(target, timeout=5, resume_for=60) as client:
            watchers = []
            for i in range(number, jobs, clients):
                request_id = f"job-{i}"
                await submit_until_acknowledged(client, request_id, {"steps": "4", "interval": "0.1"})
                watchers.append(asyncio.create_task(watch(client, request_id)))
                await asyncio.sleep(0.02)
            await asyncio.gather(*watchers)

    async def killer() -> None:
        nonlocal server
        for pause in (0.5, 0.8, 1.2):
            await asyncio.sleep(pause)
            kill(server)
            await asyncio.sleep(0.2)  # down for a moment: clients see UNAVAILABLE
            server = await asyncio.to_thread(start_server, tmp_path, *args, address=target)

    try:
        await asyncio.wait_for(asyncio.gather(killer(), *(producer(n) for n in range(clients))), 200)
        async with AsyncClient(target, timeout=10) as client:
            for i in range(jobs):
                request_id = f"job-{i}"
                stored = [r async for r in client.watch(request_id)]
                # Exactly one final Response, and it is the last; sequences 1..n without gaps.
                assert [r.sequence for r in stored] == list(range(1, len(stored) + 1)), request_id
                assert [r.is_final for r in stored].count(True) == 1, request_id
                assert stored[-1].is_final
                assert stored[-1].state is S.FINISHED, (request_id, stored[-1])
                # The live watcher, resuming across the kills, saw the same Responses once each.
                assert [r.sequence for r in seen[request_id]] == [r.sequence for r in stored], request_id
            restarts = sum(
                1 for i in range(jobs) for r in seen[f"job-{i}"] if r.error and r.error.reason == "LEASE_EXPIRED"
            )
        assert restarts > 0, "no job was running when the server was killed: the test proved nothing"
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)


async def test_sigterm_then_restart_continues_interrupted_jobs(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--shutdown-grace", "0.2", "--cancel-grace", "0.2")
    async with AsyncClient(server.target, timeout=10) as client:
        await client.submit("countdown", {"steps": "20", "interval": "0.05"}, id="long")
        async for response in client.watch("long"):
            if response.progress is not None:
                break  # it is running
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    server = start_server(tmp_path, address=server.target)
    try:
        async with AsyncClient(server.target, timeout=10) as client:
            responses = [r async for r in client.watch("long")]
        assert responses[-1].state is S.FINISHED
        handed_back = [r for r in responses if r.state is S.CREATED and r.sequence > 1]
        assert handed_back
        assert "shutting down" in handed_back[0].data["reason"]
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
