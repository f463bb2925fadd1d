"""Children from a job, the hard way: a parent of 100 children on a real ``ajs serve``, SIGKILLed mid-way.

The parent (``wf.parent`` of tests/flow_plugins/workflow_jobs.py) submits its children one by
one, then waits for them. The server is killed while it is still submitting them, and started
again on the same store with a short lease: the parent's second attempt submits the same
children again (their ids are derived from the parent's), which the idempotent submit answers
with those already stored. Done when: exactly 100 children, the derived ids, each ended once,
and the parent FINISHED after the last of them.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import Unavailable
from ajs_grpc.core.model import Job, RequestState, Response
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.helpers import eventually_reads
from tests.serve_process import Served, start_server

S = RequestState
PLUGINS = Path(__file__).resolve().parents[1] / "flow_plugins"
CHILDREN = 100


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[str, ...]]:
    """The ``ajs serve`` flags of the store: the default SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield ()
        return
    schema = unique_schema()
    yield ("--connector", "postgres", "--dsn", postgres_dsn(), "--schema", schema)
    drop_schema(schema)


def stop(served: Served, sig: signal.Signals = signal.SIGTERM) -> None:
    if served.process.poll() is None:
        served.process.send_signal(sig)
    try:
        served.process.wait(30)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait(10)


async def children_of(client: AsyncClient, parent_id: str) -> list[Job]:
    return [job async for job in client.list(parent_id=parent_id, page_size=1000)]


async def final_responses(client: AsyncClient, request_id: str) -> list[Response]:
    """Every Response of a request, waiting (through restarts) for its final one."""
    for _ in range(200):
        try:
            return [r async for r in client.watch(request_id)]
        except Unavailable:
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not follow {request_id}")


@pytest.mark.timeout(180)
async def test_a_parent_of_100_children_survives_a_sigkill_midway(tmp_path: Path, store: tuple[str, ...]) -> None:
    args = ("--jobs-dir", str(PLUGINS), "--lease", "1s", "--max-jobs", "8", "--shutdown-grace", "1", *store)
    server = start_server(tmp_path, *args)
    parent_id = "parent-of-100"
    try:
        async with AsyncClient(server.target, timeout=10) as client:
            data = {"children": str(CHILDREN), "pause": "0.03", "child_seconds": "0.2"}
            await client.submit("wf.parent", data, id=parent_id)
            # Mid-way: some children stored, the parent still submitting (so not all of them ended).
            before = await eventually_reads(
                lambda: children_of(client, parent_id), lambda found: len(found) >= 20, within=60
            )
            assert (await client.get(parent_id)).state is S.PENDING
        stop(server, signal.SIGKILL)
        assert len(before) < CHILDREN
        assert sum(child.is_final for child in before) < CHILDREN

        server = start_server(tmp_path, *args, address=server.target)
        async with AsyncClient(server.target, timeout=10, resume_for=30) as client:
            async with asyncio.timeout(120):
                parent = await final_responses(client, parent_id)
            children = await children_of(client, parent_id)
            child_ends = {child.request.id: await final_responses(client, child.request.id) for child in children}
    finally:
        stop(server)

    last = parent[-1]
    assert last.state is S.FINISHED, last
    # It ran again after the kill: its first attempt's lease expired.
    assert [r.error.reason for r in parent if r.error is not None] == ["LEASE_EXPIRED"]
    assert dict(last.data) == {"children": str(CHILDREN), "finished": str(CHILDREN), "attempt": "2"}

    ids = [child.request.id for child in children]
    assert len(ids) == CHILDREN
    assert len(set(ids)) == CHILDREN
    assert ids == [f"{parent_id}/{i}" for i in range(1, CHILDREN + 1)]
    assert {child.request.id for child in before} <= set(ids)
    for child_id, responses in child_ends.items():
        assert [r.sequence for r in responses] == list(range(1, len(responses) + 1)), child_id
        assert [r.is_final for r in responses].count(True) == 1, child_id
        assert responses[-1].state is S.FINISHED, (child_id, responses[-1])
        # The parent ended after every child.
        assert last.create_time >= responses[-1].create_time, child_id
