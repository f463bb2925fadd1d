"""Faults of a PostgreSQL cluster: instances SIGKILLed, and PostgreSQL itself restarted, under load.

Several ``ajs serve`` instances share one schema; eight clients submit keyed
``countdown`` jobs through a comma-separated target list (round_robin) and watch
each one live. Then (a) instances are SIGKILLed at random moments and restarted on
their address, or (b) PostgreSQL is really restarted, with the shell command in
``AJS_TEST_POSTGRES_RESTART`` (CI sets it; e.g. ``pg_ctlcluster --skip-systemctl-redirect
15 main restart``). Each ends with the total-queue check of :mod:`tests.faults.ledger`;
(b) also asserts that submits and claims resume within 10 s of the database returning.

The random choices (when to kill, whom) come from a seed the report prints;
``AJS_FAULT_SEED=<seed>`` makes them again (the timing of the load still varies).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.model import RequestState, Response, now
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.faults import scale
from tests.faults.ledger import Ledger, Workload, countdown_expectation, read_back
from tests.serve_process import Served, free_port, start_server

S = RequestState
STEPS = 3
# What the issue promises after the database returns.
RESUME_WITHIN = 10.0


class Instances:
    """``ajs serve`` instances of one queue (one schema), each on a fixed address and in a directory of its own."""

    def __init__(self, tmp_path: Path, count: int, *args: str) -> None:
        self.dsn = postgres_dsn()
        self.schema = unique_schema()
        self.tmp_path = tmp_path
        self.args = ("--connector", "postgres", "--dsn", self.dsn, "--schema", self.schema, "--role", "all", *args)
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        self.served: list[Served | None] = [None] * count

    @property
    def target(self) -> str:
        """All instances, for a round_robin client."""
        return ",".join(self.addresses)

    def start(self, number: int) -> Served:
        home = self.tmp_path / f"instance{number}"
        home.mkdir(exist_ok=True)
        served = start_server(home, *self.args, address=self.addresses[number])
        self.served[number] = served
        return served

    def running_jobs(self) -> list[int]:
        """The instances holding leases now (read from the queue's table: its worker is host:pid)."""
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            workers = connection.execute(
                sql.SQL("SELECT worker FROM {}.jobs WHERE state = %s").format(sql.Identifier(self.schema)),
                (int(S.PENDING),),
            ).fetchall()
        pids = {int(worker.rpartition(":")[2]) for (worker,) in workers if worker}
        return [n for n, served in enumerate(self.served) if served is not None and served.process.pid in pids]

    def kill(self, number: int) -> None:
        served = self.served[number]
        assert served is not None
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(10)

    async def start_all(self) -> None:
        """Starts every instance, at once."""
        await asyncio.gather(*(asyncio.to_thread(self.start, number) for number in range(len(self.addresses))))

    def stop(self) -> None:
        running = [s for s in self.served if s is not None and s.process.poll() is None]
        for served in running:
            served.process.send_signal(signal.SIGTERM)
        for served in running:
            try:
                served.process.wait(30)
            except subprocess.TimeoutExpired:
                served.process.kill()
                served.process.wait(10)

    def logs(self) -> str:
        return "\n".join(
            f"--- instance {n} ---\n{s.log.read_text()[-3000:]}" for n, s in enumerate(self.served) if s is not None
        )


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[list[Instances]]:
    """Made by the test (it chooses how many and how), stopped and dropped afterwards."""
    made: list[Instances] = []
    yield made
    for group in made:
        group.stop()
        drop_schema(group.schema)


def seeded() -> tuple[int, random.Random]:
    seed = int(os.environ.get("AJS_FAULT_SEED", random.randrange(2**32)))
    return seed, random.Random(seed)


def is_claim(before: Response, response: Response) -> bool:
    return before.state is S.CREATED and response.state is S.PENDING


def claim_times(ledger: Ledger) -> list[datetime]:
    """When each stored claim (CREATED -> PENDING) was made, by the claiming instance's clock."""
    return sorted(
        r.create_time
        for responses in ledger.stored.values()
        for before, r in itertools.pairwise(responses)
        if is_claim(before, r)
    )


def errors_with_reason(ledger: Ledger, reason: str) -> int:
    """Stored Responses whose error has ``reason`` (LEASE_EXPIRED: an attempt whose server stopped)."""
    return sum(
        1 for responses in ledger.stored.values() for r in responses if r.error is not None and r.error.reason == reason
    )


@pytest.mark.timeout(120 * scale())
async def test_sigkill_of_instances_under_round_robin_loses_and_repeats_nothing(
    tmp_path: Path, instances: list[Instances]
) -> None:
    seed, rng = seeded()
    kills = 3 * scale()
    group = Instances(tmp_path, 3, "--max-jobs", "4", "--lease", "3s", "--shutdown-grace", "1")
    instances.append(group)
    await group.start_all()
    ledger = Ledger()
    workload = Workload(
        group.target,
        ledger,
        clients=8,
        job=("countdown", {"steps": str(STEPS), "interval": "0.05"}),
        expectation=countdown_expectation(STEPS),
        prefix="pgkill",
        interval=0.4,
    )
    killed: list[int] = []

    async def killer() -> None:
        try:
            for _ in range(kills):
                await workload.acknowledgements(8)  # under load
                await asyncio.sleep(rng.uniform(0.0, 0.8))
                # An instance running jobs, when one is: claims may all go to the quickest
                # instance, and killing an idle one would test nothing.
                busy = await asyncio.to_thread(group.running_jobs)
                victim = rng.choice(busy) if busy else rng.randrange(3)
                group.kill(victim)
                killed.append(victim)
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                await asyncio.to_thread(group.start, victim)
        finally:
            workload.stop.set()

    await asyncio.gather(killer(), workload.run(watch_for=40))
    async with AsyncClient(group.target, timeout=10) as client:
        await read_back(client, ledger, settle=20)
    expired = errors_with_reason(ledger, "LEASE_EXPIRED")
    ledger.check(
        "SIGKILL of ajs serve instances (PostgreSQL, 3 instances, round_robin)",
        kills=kills,
        interrupted_attempts=expired,
        resubmits_found_stored=workload.found_stored,
        retried=sum(workload.retried.values()),
        seed=seed,
    )
    assert expired > 0, f"no job was running on a killed instance (kills {killed}, seed {seed})"


def restart_command() -> str:
    command = os.environ.get("AJS_TEST_POSTGRES_RESTART", "")
    if not command:
        reason = (
            "AJS_TEST_POSTGRES_RESTART is not set (a shell command restarting the PostgreSQL "
            "of AJS_TEST_POSTGRES_DSN, e.g. 'pg_ctlcluster --skip-systemctl-redirect 15 main restart')"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return command


def postmaster_started(dsn: str) -> datetime | None:
    """When the PostgreSQL server started, or None while it does not answer."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as connection:
            row = connection.execute("SELECT pg_postmaster_start_time()").fetchone()
            return row[0] if row else None
    except psycopg.OperationalError:
        return None


@pytest.mark.timeout(120 * scale())
async def test_postgres_restart_under_load_loses_nothing_and_work_resumes_within_10s(
    tmp_path: Path, instances: list[Instances]
) -> None:
    dsn = postgres_dsn()
    command = restart_command()
    seed, rng = seeded()
    restarts = min(scale(), 5)
    group = Instances(tmp_path, 2, "--max-jobs", "4", "--lease", "4s", "--shutdown-grace", "1")
    instances.append(group)
    await group.start_all()
    ledger = Ledger()
    workload = Workload(
        group.target,
        ledger,
        clients=8,
        job=("countdown", {"steps": str(STEPS), "interval": "0.1"}),
        expectation=countdown_expectation(STEPS),
        prefix="pgrestart",
        interval=0.4,
    )
    loop = asyncio.get_running_loop()
    # For each restart: when the database answered again (loop time, and wall clock for stored Responses).
    returned: list[tuple[float, datetime]] = []

    async def restarter() -> None:
        try:
            for _ in range(restarts):
                await workload.acknowledgements(16)  # under load
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                before = await asyncio.to_thread(postmaster_started, dsn)
                done = await asyncio.to_thread(
                    subprocess.run, command, shell=True, capture_output=True, text=True, timeout=60
                )
                assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                after = await asyncio.to_thread(postmaster_started, dsn)
                while after is None:  # not answering yet (the command may return before it does)
                    await asyncio.sleep(0.05)
                    after = await asyncio.to_thread(postmaster_started, dsn)
                returned.append((loop.time(), now()))
                assert after != before, f"{command!r} did not restart PostgreSQL (started {before} both times)"
                # Load goes on after the database returned: submits, claims, runs.
                await workload.acknowledgements(16)
        finally:
            workload.stop.set()

    try:
        await asyncio.gather(restarter(), workload.run(watch_for=60))
        async with AsyncClient(group.target, timeout=10) as client:
            await read_back(client, ledger, settle=30)
    except BaseException:
        print(group.logs())
        raise
    acknowledged = [at for at, _ in workload.acknowledged_at]
    claims = claim_times(ledger)
    submit_delays, claim_delays = [], []
    for back, back_wall in returned:
        submit_delays.append(min((at - back for at in acknowledged if at >= back), default=float("inf")))
        claim_delays.append(
            min(((at - back_wall).total_seconds() for at in claims if at >= back_wall), default=float("inf"))
        )
    ledger.check(
        "PostgreSQL restarted under load (2 instances, round_robin)",
        restarts=restarts,
        submits_resumed_s=round(max(submit_delays), 2),
        claims_resumed_s=round(max(claim_delays), 2),
        interrupted_attempts=errors_with_reason(ledger, "LEASE_EXPIRED"),
        attempts_failed_by_storage=errors_with_reason(ledger, "STORAGE_UNAVAILABLE"),
        resubmits_found_stored=workload.found_stored,
        retried=sum(workload.retried.values()),
        seed=seed,
    )
    assert max(submit_delays) <= RESUME_WITHIN, f"submits resumed {submit_delays}s after PostgreSQL returned"
    assert max(claim_delays) <= RESUME_WITHIN, f"claims resumed {claim_delays}s after PostgreSQL returned"
