"""WatchJobs across faults: resumed streams miss nothing and repeat nothing.

Real ``ajs serve`` processes: one on SQLite killed with SIGKILL and restarted while a
client follows every countdown job through one WatchJobs stream; two on one PostgreSQL
schema, where the stream moves from one instance (killed) to the other with its last
resume token. Each time the Responses the stream delivered are compared with what the
store holds, job by job.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient, Watched
from ajs_grpc.core.model import RequestState
from tests.acceptance.test_cluster import Cluster
from tests.acceptance.test_crash import kill, submit_until_acknowledged
from tests.helpers import eventually
from tests.serve_process import free_port, start_server

S = RequestState
COUNTDOWN = {"steps": "4", "interval": "0.1"}


async def stored(client: AsyncClient, request_ids: list[str]) -> dict[str, list[tuple[int, RequestState]]]:
    """Each job's stored Responses, replayed by WatchJob."""
    return {i: [(r.sequence, r.state) async for r in client.watch(i)] for i in request_ids}


def delivered(items: list[Watched]) -> dict[str, list[tuple[int, RequestState]]]:
    """The Responses a WatchJobs stream delivered, per job, in the order delivered."""
    per_job: dict[str, list[tuple[int, RequestState]]] = {}
    for item in items:
        if item.response is not None:
            per_job.setdefault(item.response.request_id, []).append((item.response.sequence, item.response.state))
    return per_job


def finals(items: list[Watched]) -> set[str]:
    return {item.response.request_id for item in items if item.response is not None and item.response.is_final}


def check_exactly_once(items: list[Watched], expected: dict[str, list[tuple[int, RequestState]]]) -> None:
    got = delivered(items)
    pairs = Counter((i.response.request_id, i.response.sequence) for i in items if i.response is not None)
    assert [pair for pair, count in pairs.items() if count > 1] == [], "a Response came twice"
    assert set(got) == set(expected), "the stream held other jobs, or missed some"
    for request_id, responses in expected.items():
        assert got[request_id] == responses, request_id
        assert responses[-1][1] is S.FINISHED, request_id


@pytest.mark.timeout(240)
async def test_a_resumed_stream_spans_sigkills_of_the_sqlite_server(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    args = ("--max-jobs", "8", "--lease", "2s", "--shutdown-grace", "1s")
    server = start_server(tmp_path, *args, address=target)
    ids = [f"job-{i}" for i in range(30)]
    items: list[Watched] = []
    marks: list[int] = []  # how many items had come when each kill happened

    async def follow() -> None:
        async with AsyncClient(target, timeout=10, resume_for=60) as client:
            async for item in client.watch_jobs(types=["countdown"]):
                items.append(item)

    async def produce() -> None:
        async with AsyncClient(target, timeout=5, resume_for=60) as client:
            for index, request_id in enumerate(ids):
                await submit_until_acknowledged(client, request_id, COUNTDOWN)
                if index % 3 == 0:  # another type, which the stream must leave out
                    # (retried like the countdowns: the server may be down at that moment)
                    await submit_until_acknowledged(client, f"other-{index}", {"n": str(index)}, "echo")
                await asyncio.sleep(0.03)

    async def killer() -> None:
        nonlocal server
        for pause in (0.6, 0.9):
            await asyncio.sleep(pause)
            marks.append(len(items))
            kill(server)
            await asyncio.sleep(0.2)  # down for a moment: the stream sees UNAVAILABLE
            server = await asyncio.to_thread(start_server, tmp_path, *args, address=target)

    follower = asyncio.create_task(follow())
    try:
        await eventually(lambda: len(items) >= 1, within=20)
        assert items[0].response is None  # a bookmark first
        await asyncio.wait_for(asyncio.gather(produce(), killer()), 120)
        await eventually(lambda: finals(items) >= set(ids), within=120)
        async with AsyncClient(target, timeout=10) as client:
            expected = await stored(client, ids)
        check_exactly_once(items, expected)
        # The stream really spanned the kills: Responses came before the first and after the last.
        assert marks[0] > 0
        assert marks[-1] < len(items)
        restarted = [i for i in items if i.response and i.response.error and i.response.error.reason == "LEASE_EXPIRED"]
        assert restarted, "no job was running at a kill: the test proved nothing"
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)


@pytest.mark.timeout(240)
async def test_a_stream_moves_between_postgres_instances_with_its_token(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        first = cluster.start("all", "--lease", "2s", "--max-jobs", "4")
        second = cluster.start("all", "--lease", "2s", "--max-jobs", "4")
        ids = [f"job-{i}" for i in range(24)]
        items: list[Watched] = []

        async with AsyncClient(first.target, timeout=10) as on_first:
            stream = on_first.watch_jobs(types=["countdown"])
            items.append(await anext(stream))  # the bookmark: the stream is open
            async with AsyncClient(second.target, timeout=10) as on_second:
                # Submits go to both instances, so both commit Responses at once.
                for index, request_id in enumerate(ids):
                    await (on_first if index % 2 else on_second).submit("countdown", COUNTDOWN, id=request_id)
                while len([i for i in items if i.response is not None]) < 15:
                    items.append(await asyncio.wait_for(anext(stream), 30))
            await stream.aclose()
        kill(first)  # its running jobs are taken over by the second when their leases run out
        token = items[-1].token
        async with AsyncClient(second.target, timeout=10) as on_second:
            stream = on_second.watch_jobs(types=["countdown"], after_token=token)
            while not finals(items) >= set(ids):
                items.append(await asyncio.wait_for(anext(stream), 30))
            await stream.aclose()
            expected = await stored(on_second, ids)
        check_exactly_once(items, expected)
    finally:
        cluster.stop()
