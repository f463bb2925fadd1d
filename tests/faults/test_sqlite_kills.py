"""SIGKILL of a real ``ajs serve`` on SQLite (the default), again and again, while clients submit and jobs run.

Eight clients submit keyed ``countdown`` jobs (each sent again until acknowledged:
submit is idempotent on the id) and watch each one live, resuming across the kills.
The server is killed at random moments under that load and restarted on the same
address and database. In the end every acknowledged id has ended exactly once, with
gapless Responses, and every watcher saw each Response once.

The random choices (when to kill, whom) come from a seed the report prints;
``AJS_FAULT_SEED=<seed>`` makes them again (the timing of the load still varies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import Code
from ajs_grpc.core.model import ErrorStatus, Progress, RequestState, Response
from tests.faults import scale
from tests.faults.ledger import Ledger, Workload, countdown_expectation, read_back
from tests.serve_process import Served, free_port, start_server

S = RequestState
STEPS = 3
KILLS = 3
SERVER_ARGS = ("--max-jobs", "8", "--shutdown-grace", "1")


def kill(served: Served) -> None:
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(10)


@pytest.mark.timeout(60 * scale())
async def test_repeated_sigkill_of_ajs_serve_on_sqlite_loses_and_repeats_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("AJS_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    kills = KILLS * scale()
    target = f"127.0.0.1:{free_port()}"
    server = start_server(tmp_path, *SERVER_ARGS, address=target)
    ledger = Ledger()
    workload = Workload(
        target,
        ledger,
        clients=8,
        job=("countdown", {"steps": str(STEPS), "interval": "0.05"}),
        expectation=countdown_expectation(STEPS),
        prefix="kill",
        interval=0.2,
    )

    async def killer() -> None:
        nonlocal server
        try:
            for _ in range(kills):
                # Under load: some submits acknowledged by this server, then a random moment.
                await workload.acknowledgements(8)
                await asyncio.sleep(rng.uniform(0.0, 0.8))
                kill(server)
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # down for a moment: clients see UNAVAILABLE
                server = await asyncio.to_thread(start_server, tmp_path, *SERVER_ARGS, address=target)
        finally:
            workload.stop.set()

    try:
        await asyncio.gather(killer(), workload.run(watch_for=30))
        async with AsyncClient(target, timeout=10) as client:
            await read_back(client, ledger, settle=20)
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    interrupted = sum(
        1
        for responses in ledger.stored.values()
        for r in responses
        if r.error is not None and r.error.reason == "LEASE_EXPIRED"
    )
    ledger.check(
        "SIGKILL of ajs serve (SQLite) under 8 submitting clients",
        kills=kills,
        interrupted_attempts=interrupted,
        resubmits_found_stored=workload.found_stored,
        retried=sum(workload.retried.values()),
        seed=seed,
    )
    # The kills must have hit running jobs, or the test proved nothing about them.
    assert interrupted > 0, f"no job was running at any of the {kills} kills (seed {seed})"


def test_the_ledger_counts_each_broken_promise() -> None:
    """The checker itself: a run that broke each promise once is counted as such (a check must be able to fail)."""
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def run(*steps: tuple[RequestState, dict[str, str]], request_id: str = "x") -> list[Response]:
        return [
            Response(
                request_id,
                number,
                at,
                state,
                is_final=state.is_final,
                data=data,
                progress=Progress(0.5) if "remaining" in data else None,
            )
            for number, (state, data) in enumerate(steps, 1)
        ]

    good = run(
        (S.CREATED, {}),
        (S.PENDING, {"worker": "w"}),
        (S.PENDING, {"remaining": "0"}),
        (S.FINISHED, {"steps": "1"}),
    )
    ledger = Ledger()
    for request_id in ("good", "lost", "twice", "gap", "seen-twice", "failed", "short", "missing"):
        ledger.expect(request_id, countdown_expectation(1))
        ledger.acknowledge(request_id)
    ledger.stored_all("good", good)
    ledger.watched_all("good", good)
    ledger.stored_all("lost", good[:3])
    ledger.stored_all("twice", [*good, dataclasses.replace(good[-1], sequence=5)])
    ledger.stored_all("gap", [good[0], *(dataclasses.replace(r, sequence=r.sequence + 1) for r in good[1:])])
    ledger.stored_all("seen-twice", good)
    ledger.watched_all("seen-twice", [*good[:2], *good[1:]])
    failed = ErrorStatus(Code.ABORTED, "no attempts left", "LEASE_EXPIRED")
    ledger.stored_all("failed", [*good[:2], Response("failed", 3, at, S.FAILED, is_final=True, error=failed)])
    ledger.stored_all("short", [*good[:2], good[-1]])  # finished without running its step
    ledger.present_ids(["good", "lost", "twice", "gap", "seen-twice", "failed", "short", "stray"])
    tally = ledger.tally()
    assert (tally.acknowledged, tally.lost, tally.duplicated) == (8, 2, 2), tally.problems  # lost, missing; twice
    # twice (final not last), gap, failed, short, stray, and missing from ListJobs is not counted twice
    assert tally.unexpected == 5, tally.problems
