#!/usr/bin/env python3
"""End-to-end benchmark: no-op jobs through a real ``ajs serve`` process.

It starts ``ajs serve`` (in-memory connector by default) on a free 127.0.0.1 port
and measures, from a separate client process (this one):

* pickup latency on an idle server: submit one job, wait for it to end, repeat;
  latency is the server's own clock, from the request's ``create_time`` to its
  PENDING Response (when a handler got it);
* throughput: ``--jobs`` no-op (``echo``) jobs submitted with ``--concurrency``
  calls in flight; jobs/s is counted from the first accept to the last final
  Response, again on the server's clock, and pickup latency under that load.

Each connector named in ``--connectors`` gets a fresh server in the same run,
so their figures can be compared as ratios (the machine's noise hits all alike).

Usage: python scripts/bench_e2e.py [--connectors memory,sqlite,postgres,postgres:2] [--dsn DSN]
                                  [--jobs 5000] [--concurrency 64] [--idle 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.model import RequestState


def start_server(connector: str, max_jobs: int, workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Starts ``ajs serve`` in ``workdir`` (where sqlite keeps its ajs.db); returns it and its address."""
    ajs = shutil.which("ajs", path=str(Path(sys.executable).parent)) or "ajs"
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "serve.log"
    command = [ajs, "serve", "--address", "127.0.0.1:0", "--connector", connector, "--max-jobs", str(max_jobs)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--log-level", "info", "--shutdown-grace", "1", *extra],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"ajs serve exited:\n{log.read_text()}")
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return process, found.group(1)
        time.sleep(0.05)
    process.kill()
    sys.exit("ajs serve did not start")


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def pickup_latency(client: AsyncClient, request_id: str) -> float:
    """Seconds from the request's create_time to its first PENDING Response (server clock)."""
    async for response in client.watch(request_id):
        if response.state is RequestState.PENDING:
            job = await client.get(request_id)
            assert job.request.create_time is not None
            return (response.create_time - job.request.create_time).total_seconds()
    raise RuntimeError(f"{request_id} never ran")


async def idle(client: AsyncClient, count: int) -> list[float]:
    """Pickup latencies of jobs submitted one at a time to an otherwise idle server."""
    latencies = []
    for i in range(count):
        submitted = await client.submit("echo", id=f"idle-{i}")
        async for response in client.watch(submitted.job.request.id):
            if response.is_final:
                break
        latencies.append(await pickup_latency(client, submitted.job.request.id))
    return latencies


async def loaded(client: AsyncClient, jobs: int, concurrency: int) -> tuple[float, float, list[float]]:
    """Submits ``jobs`` no-op jobs, ``concurrency`` at a time; returns jobs/s, submits/s and latencies."""
    ids = [f"load-{i}" for i in range(jobs)]
    queue = iter(ids)

    async def submitter() -> None:
        for request_id in queue:
            await client.submit("echo", {"i": request_id}, id=request_id)

    began = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    submit_rate = jobs / (time.perf_counter() - began)
    # Wait until nothing is queued or running.
    while True:
        open_jobs, _ = await client.list_page(states=[RequestState.CREATED, RequestState.PENDING], page_size=1)
        if not open_jobs:
            break
        await asyncio.sleep(0.01)
    first = await client.get(ids[0])
    finals = [job async for job in client.list(types=["echo"], page_size=1000) if job.request.id.startswith("load-")]
    assert all(job.state is RequestState.FINISHED for job in finals), "some jobs did not finish"
    assert first.request.create_time is not None
    span = (max(job.update_time for job in finals) - first.request.create_time).total_seconds()
    sample = iter(ids[:: max(1, jobs // 500)])
    latencies: list[float] = []

    async def reader() -> None:  # a few watches at a time: the server allows 100 per client address
        for request_id in sample:
            latencies.append(await pickup_latency(client, request_id))

    await asyncio.gather(*(reader() for _ in range(16)))
    return jobs / span, submit_rate, latencies


def report(name: str, latencies: list[float]) -> None:
    """Prints p50/p99 in milliseconds."""
    ms = [1000 * s for s in latencies]
    print(f"{name:<34} p50 {percentile(ms, 0.5):7.2f} ms   p99 {percentile(ms, 0.99):7.2f} ms   (n={len(ms)})")


async def bench(setup: str, args: argparse.Namespace) -> float:
    """Benchmarks one setup (``connector`` or ``connector:N`` for N worker instances); returns its submit rate."""
    connector, _, count = setup.partition(":")
    instances = int(count or 1)
    schema = f"ajs_bench_{uuid.uuid4().hex[:8]}"
    extra: tuple[str, ...] = ("--dsn", args.dsn, "--schema", schema) if connector == "postgres" else ()
    if args.metrics_port:
        extra += ("--metrics-address", f"127.0.0.1:{args.metrics_port}")
    with tempfile.TemporaryDirectory() as tmp:
        first, address = start_server(connector, args.max_jobs, Path(tmp) / "0", *extra)
        # More instances share the queue as workers (postgres); submits go to the first.
        worker_extra = extra[:4] if connector == "postgres" else ()  # the metrics port is the first's
        others = [
            start_server(connector, args.max_jobs, Path(tmp) / str(n), *worker_extra, "--role", "worker")[0]
            for n in range(1, instances)
        ]
        try:
            async with AsyncClient(address) as client:
                await client.submit("echo", id="warm-up")
                workers = f", {instances} worker instances" if instances > 1 else ""
                print(f"\n== ajs serve --connector {connector} --max-jobs {args.max_jobs}{workers}")
                report("pickup latency, idle server", await idle(client, args.idle))
                rate, submit_rate, latencies = await loaded(client, args.jobs, args.concurrency)
                load = f"({args.jobs} jobs, {args.concurrency} in flight)"
                print(f"{'end-to-end no-op jobs':<34} {rate:8.0f} jobs/s   {load}")
                print(f"{'submits':<34} {submit_rate:8.0f} calls/s")
                report("pickup latency under that load", latencies)
                return submit_rate
        finally:
            for process in (first, *others):
                process.terminate()
            for process in (first, *others):
                process.wait(30)
            if connector == "postgres":
                drop_schema(args.dsn, schema)


def drop_schema(dsn: str, schema: str) -> None:
    """Removes a benchmark's schema."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def run(args: argparse.Namespace) -> None:
    """Runs the benchmark for every setup asked for, then compares their submit rates."""
    setups = [name.strip() for name in args.connectors.split(",") if name.strip()]
    if any(s.startswith("postgres") for s in setups) and not args.dsn:
        sys.exit("postgres needs --dsn (or $AJS_POSTGRES_DSN)")
    rates = {setup: await bench(setup, args) for setup in setups}
    if len(rates) > 1:
        base = setups[0]
        print()
        for setup in setups[1:]:
            print(f"submit rate {setup} / {base}: {rates[setup] / rates[base]:.2f}")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connectors",
        default="memory,sqlite",
        help="comma-separated setups; postgres:2 runs two instances (default %(default)s)",
    )
    parser.add_argument("--dsn", default=os.environ.get("AJS_POSTGRES_DSN", ""), help="PostgreSQL for postgres setups")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve the first server's metrics on this port")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--idle", type=int, default=200, help="jobs for the idle pickup measurement")
    parser.add_argument("--max-jobs", type=int, default=64, help="the server's --max-jobs")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
