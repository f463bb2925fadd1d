#!/usr/bin/env python3
"""The benchmark suite (issue 12): every figure as a ratio to a raw grpc.aio echo server measured in the same run.

Usage:
    scripts/bench [--connectors memory,sqlite,postgres] [--dsn postgresql://127.0.0.1:5432/test]
                  [--jobs 5000] [--queued 1000000] [--fanout 1000] [--quick] [--json FILE]
    scripts/bench --quick                      # a smoke run, under two minutes
    scripts/bench --dsn postgresql://127.0.0.1:5432/test --json bench.jsonl   # the full suite

One process per server, the client (this process) in another, one server after the other:

* the echo: a raw grpc.aio server (no ajs code) answering ``/ajs.v1.JobService/SubmitRequest``
  with the request echoed in a SubmitRequestResponse, and ``WatchJob`` with a server-streaming
  no-op (pre-serialized Responses); the ceiling every figure is divided by. It runs before the
  first connector, between connectors and after the last; a connector's figures are divided by
  the mean of the two echo runs around it (the table shows both);
* per connector, ``ajs serve`` three times, each on a fresh store (a new SQLite file, a new
  PostgreSQL schema dropped afterwards):
  1. no-op ``echo`` jobs: pickup latency on an idle server; end-to-end jobs/s with one
     SubmitRequest per job (64 in flight) and with BatchSubmitRequests of 500; pickup latency
     under an open-loop load at 50 % of that end-to-end rate;
  2. WatchJob fan-out: ``--fanout`` streams on one ``countdown`` job, messages/s delivered, and
     submit p99 with that many streams open against none;
  3. a queue held still: ``--max-jobs`` long ``countdown`` jobs (the gates) fill every slot, so
     what is submitted stays queued; unary submits and the drain of ``--jobs`` jobs (claims) on
     an empty queue, then again with ``--queued`` jobs queued behind them (batches of 500),
     the server's RSS at that depth, and the burn-down of the whole queue once the gates are
     cancelled (River's bench).

Pickup latency is on the server's clock (request create_time to its PENDING Response's
create_time); submit latencies and streaming rates are on the client's; end-to-end, claim and
burn-down rates use the server's timestamps. The job types come from plugins/examples
(``pip install -e plugins/examples``). scripts/bench_e2e.py stays for setups this one has not:
several PostgreSQL instances (``postgres:2``) and a metrics endpoint during the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2

from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ajs_grpc.proto.ajs.v1.job_service_pb2_grpc import JobServiceAsyncStub

INFLIGHT = 64
BATCH = 500
# The concurrency policy of run_policy: jobs spread over this many keys, this many of a key at once.
POLICY_KEYS = 100
POLICY_LIMIT = 2
BATCHES_IN_FLIGHT = 4
SERVICE = "ajs.v1.JobService"
OPEN = [pb.REQUEST_STATE_CREATED, pb.REQUEST_STATE_PENDING]
GATE_PRIORITY = 100
PROBE_PRIORITY = 1
TIMES = "\N{MULTIPLICATION SIGN}"


# ---------------------------------------------------------------------------------------------
# Small helpers


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """A Timestamp as seconds since the epoch."""
    return stamp.seconds + stamp.nanos / 1e9


def rss_mb(pid: int) -> float:
    """A process's resident set (VmRSS) in MB."""
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) / 1024 if found else math.nan


def request(
    request_id: str,
    request_type: str = "echo",
    data: dict[str, str] | None = None,
    *,
    priority: int = 0,
    run_after: float | None = None,
) -> pb.SubmitRequestRequest:
    """A SubmitRequestRequest; ``echo`` jobs get ``{"i": id}`` as data, the no-op of bench_e2e.py."""
    message = pb.Request(id=request_id, type=request_type, data={"i": request_id} if data is None else data)
    message.priority = priority
    if run_after is not None:
        message.run_after.FromNanoseconds(int(run_after * 1e9))
    return pb.SubmitRequestRequest(request=message)


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The echo server (this file with --serve-echo, in its own process)


def _stream_messages(count: int) -> list[bytes]:
    """``count`` pre-serialized WatchJobResponses shaped like a countdown's (CREATED, progress ..., final)."""
    messages = []
    for sequence in range(1, count + 1):
        response = pb.Response(request_id="fanout", sequence=sequence, state=pb.REQUEST_STATE_PENDING)
        response.create_time.GetCurrentTime()
        if sequence == count:
            response.state, response.is_final = pb.REQUEST_STATE_FINISHED, True
            response.data["steps"] = str(count - 2)
        elif sequence > 2:
            remaining = count - 1 - sequence
            response.progress.fraction = (sequence - 2) / max(1, count - 2)
            response.progress.message = f"{remaining} to go"
            response.data["remaining"] = str(remaining)
        messages.append(pb.WatchJobResponse(response=response).SerializeToString())
    return messages


async def serve_echo() -> None:
    """Serves the echo on a free port until SIGTERM; prints ``serving on HOST:PORT``."""
    cache: dict[int, list[bytes]] = {}

    async def submit(message: pb.SubmitRequestRequest, context: Any) -> pb.SubmitRequestResponse:
        job = pb.Job(request=message.request, state=pb.REQUEST_STATE_CREATED, attempt=0)
        job.request.create_time.GetCurrentTime()
        return pb.SubmitRequestResponse(job=job, created=True)

    async def watch(message: pb.WatchJobRequest, context: Any) -> AsyncIterator[bytes]:
        # after_sequence: how many messages; request_id: when (time.time()) to send all but the first.
        count = int(message.after_sequence)
        messages = cache.get(count) or cache.setdefault(count, _stream_messages(count))
        yield messages[0]
        delay = float(message.request_id or 0) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for item in messages[1:]:
            yield item

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "SubmitRequest": grpc.unary_unary_rpc_method_handler(
                submit,
                request_deserializer=pb.SubmitRequestRequest.FromString,
                response_serializer=pb.SubmitRequestResponse.SerializeToString,
            ),
            "WatchJob": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=pb.WatchJobRequest.FromString, response_serializer=None
            ),
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(0.5)


# ---------------------------------------------------------------------------------------------
# Servers


@dataclasses.dataclass
class Server:
    """A server process (ajs serve or the echo) and where it listens."""

    process: subprocess.Popen[bytes]
    address: str
    workdir: Path
    schema: str = ""
    dsn: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Terminates the process, waits for it, and drops its PostgreSQL schema."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.schema:
            drop_schema(self.dsn, self.schema)


def launch(command: list[str], workdir: Path, env: dict[str, str] | None = None) -> Server:
    """Starts ``command`` in ``workdir`` and waits for its ``serving on HOST:PORT`` line."""
    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / "serve.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{command[0]} exited:\n{output.read_text()}")
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", output.read_text())
        if found:
            return Server(process, found.group(1), workdir)
        time.sleep(0.05)
    process.kill()
    sys.exit(f"{' '.join(command)} did not start:\n{output.read_text()}")


def start_echo(workdir: Path) -> Server:
    """The echo server, in its own process."""
    return launch([sys.executable, str(Path(__file__).resolve()), "--serve-echo"], workdir / "echo")


def start_ajs(connector: str, args: argparse.Namespace, workdir: Path, name: str, config: str = "") -> Server:
    """``ajs serve`` on a fresh store: a new SQLite file in ``workdir``, or a new PostgreSQL schema.

    ``config``: the text of a TOML configuration file to start it with.
    """
    ajs = shutil.which("ajs", path=str(Path(sys.executable).parent)) or shutil.which("ajs") or "ajs"
    command = [ajs, "serve", "--address", "127.0.0.1:0", "--connector", connector]
    if config:
        (workdir / f"{connector}-{name}").mkdir(parents=True, exist_ok=True)
        path = workdir / f"{connector}-{name}" / "ajs.toml"
        path.write_text(config)
        command += ["--config", str(path)]
    command += ["--max-jobs", str(args.max_jobs), "--log-level", "info", "--shutdown-grace", "1"]
    schema = ""
    if connector == "postgres":
        schema = f"ajs_bench_{uuid.uuid4().hex[:10]}"
        command += ["--dsn", args.dsn, "--schema", schema]
    watches = str(max(1000, args.fanout + 10))
    env = {"AJS_LIMITS_MAX_WATCHES": watches, "AJS_LIMITS_MAX_WATCHES_PER_PRINCIPAL": watches}
    server = launch(command, workdir / f"{connector}-{name}", env)
    server.schema, server.dsn = schema, args.dsn
    return server


def start_worker(server: Server, max_concurrent: int) -> subprocess.Popen[bytes]:
    """``ajs worker`` running the no-op ``remote_noop`` for ``server``, in a directory beside its log."""
    worker_dir = server.workdir / "worker"
    worker_dir.mkdir(exist_ok=True)
    (worker_dir / "bench_remote.py").write_text(REMOTE_WORKER)
    ajs = shutil.which("ajs", path=str(Path(sys.executable).parent)) or shutil.which("ajs") or "ajs"
    command = [ajs, "worker", "--target", server.address, "bench_remote:remote_noop"]
    with (worker_dir / "worker.log").open("wb") as sink:
        return subprocess.Popen(
            [*command, "--max-concurrent", str(max_concurrent), "--name", "bench"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=worker_dir,
        )


REMOTE_WORKER = """\
async def remote_noop(request, ctx):
    return {"i": request.data.get("i", "")}
"""


def drop_schema(dsn: str, schema: str) -> None:
    """Removes a benchmark's PostgreSQL schema."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextlib.asynccontextmanager
async def connected(server: Server) -> AsyncIterator[JobServiceAsyncStub]:
    """A stub on a fresh channel to ``server``."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        yield pb_grpc.JobServiceStub(channel)


# ---------------------------------------------------------------------------------------------
# Measurements (the same code for the echo and for ajs)


@dataclasses.dataclass
class Calls:
    """What a run of unary calls measured."""

    rate: float
    """Calls per second, first call to last reply (client clock)."""
    latencies: list[float]
    """Seconds per call (client clock)."""
    replies: list[pb.SubmitRequestResponse]


async def unary(stub: JobServiceAsyncStub, messages: Sequence[pb.SubmitRequestRequest], inflight: int) -> Calls:
    """Sends ``messages`` as SubmitRequest calls, ``inflight`` at a time."""
    replies: list[pb.SubmitRequestResponse | None] = [None] * len(messages)
    latencies = [0.0] * len(messages)
    indexes = iter(range(len(messages)))

    async def caller() -> None:
        for index in indexes:
            began = time.perf_counter()
            replies[index] = await stub.SubmitRequest(messages[index])
            latencies[index] = time.perf_counter() - began

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(inflight)))
    elapsed = time.perf_counter() - began
    return Calls(len(messages) / elapsed, latencies, [reply for reply in replies if reply is not None])


async def batches(
    stub: JobServiceAsyncStub, make: Callable[[int], pb.SubmitRequestRequest], count: int, inflight: int
) -> tuple[float, float]:
    """Submits ``make(0 .. count-1)`` in batches of 500; returns accepted jobs/s and the first create_time."""
    starts = iter(range(0, count, BATCH))
    first = math.inf

    async def caller() -> None:
        nonlocal first
        for start in starts:
            batch = pb.BatchSubmitRequestsRequest(requests=[make(i) for i in range(start, min(count, start + BATCH))])
            reply = await stub.BatchSubmitRequests(batch)
            first = min(first, seconds(reply.responses[0].job.request.create_time))

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(inflight)))
    return count / (time.perf_counter() - began), first


async def stream_rate(
    stub: JobServiceAsyncStub, streams: int, messages: Sequence[pb.WatchJobRequest], expected: int
) -> tuple[float, float]:
    """Opens one WatchJob per message; returns messages/s after the first (client clock), and when (time.time())
    the last stream received its first message.

    The clock starts when any stream receives its second message and stops when the last stream ends.
    """
    first_after: list[float] = []
    received = 0
    all_open = 0.0

    async def follow(message: pb.WatchJobRequest) -> None:
        nonlocal received, all_open
        count = 0
        async for _ in stub.WatchJob(message):
            count += 1
            if count == 1:
                all_open = max(all_open, time.time())
            elif count == 2 and not first_after:
                first_after.append(time.perf_counter())
        received += count - 1

    tasks = [asyncio.create_task(follow(message)) for message in messages]
    await asyncio.gather(*tasks)
    ended = time.perf_counter()
    if received != streams * (expected - 1):
        log(f"streams received {received} messages after the first, expected {streams * (expected - 1)}")
    return received / (ended - first_after[0]), all_open


async def follow_to_pending(stub: JobServiceAsyncStub, request_id: str) -> float:
    """The create_time of the request's PENDING Response (replayed or live), in seconds."""
    async for item in stub.WatchJob(pb.WatchJobRequest(request_id=request_id, after_sequence=1)):
        if item.response.state == pb.REQUEST_STATE_PENDING:
            return seconds(item.response.create_time)
    raise RuntimeError(f"{request_id} ended without running")


async def follow_to_end(stub: JobServiceAsyncStub, request_id: str) -> pb.Response:
    """Waits for the request's final Response."""
    async for item in stub.WatchJob(pb.WatchJobRequest(request_id=request_id)):
        if item.response.is_final:
            return item.response
    raise RuntimeError(f"{request_id}: the stream ended without a final Response")


async def open_jobs(stub: JobServiceAsyncStub) -> int:
    """Whether any job is queued or running: 0 or 1."""
    page = await stub.ListJobs(pb.ListJobsRequest(states=OPEN, page_size=1, view=pb.JOB_VIEW_BASIC))
    return len(page.jobs)


async def drained(stub: JobServiceAsyncStub, last_id: str, poll: float = 0.05) -> None:
    """Waits until ``last_id`` ended and nothing is queued or running (polls: no stream outlives a connection)."""
    while True:
        job = (await stub.GetJob(pb.GetJobRequest(request_id=last_id, view=pb.JOB_VIEW_BASIC))).job
        if job.state not in OPEN and not await open_jobs(stub):
            return
        await asyncio.sleep(poll)


async def update_times(stub: JobServiceAsyncStub, ids: Sequence[str]) -> list[float]:
    """The update_time of each job (GetJob, 64 at a time)."""
    times = [0.0] * len(ids)
    indexes = iter(range(len(ids)))

    async def getter() -> None:
        for index in indexes:
            reply = await stub.GetJob(pb.GetJobRequest(request_id=ids[index], view=pb.JOB_VIEW_BASIC))
            if reply.job.state not in (pb.REQUEST_STATE_FINISHED, pb.REQUEST_STATE_CANCELLED):
                raise RuntimeError(f"{ids[index]} ended {pb.RequestState.Name(reply.job.state)}")
            times[index] = seconds(reply.job.update_time)

    await asyncio.gather(*(getter() for _ in range(INFLIGHT)))
    return times


async def last_update(stub: JobServiceAsyncStub, prefix: str) -> float:
    """The latest update_time of the jobs whose id starts with ``prefix`` (ListJobs, BASIC)."""
    latest, token = 0.0, ""
    while True:
        page = await stub.ListJobs(pb.ListJobsRequest(page_size=1000, page_token=token, view=pb.JOB_VIEW_BASIC))
        for job in page.jobs:
            if job.request.id.startswith(prefix):
                if job.state != pb.REQUEST_STATE_FINISHED:
                    raise RuntimeError(f"{job.request.id} ended {pb.RequestState.Name(job.state)}")
                latest = max(latest, seconds(job.update_time))
        token = page.next_page_token
        if not token:
            return latest


def sample(count: int, size: int) -> list[int]:
    """At most ``size`` indexes spread evenly over ``range(count)``."""
    return list(range(0, count, max(1, count // size)))


async def pickups(stub: JobServiceAsyncStub, replies: Sequence[pb.SubmitRequestResponse]) -> list[float]:
    """Pickup latencies (server clock) of submitted jobs, from their replies' create_time."""
    indexes = iter(sample(len(replies), 1000))
    latencies: list[float] = []

    async def reader() -> None:
        for index in indexes:
            job = replies[index].job
            pending = await follow_to_pending(stub, job.request.id)
            latencies.append(pending - seconds(job.request.create_time))

    await asyncio.gather(*(reader() for _ in range(16)))
    return latencies


# ---------------------------------------------------------------------------------------------
# Figures


@dataclasses.dataclass(frozen=True)
class Figure:
    """A row of the table."""

    key: str
    label: str
    unit: str
    basis: str
    """The echo figure its ratio divides by ("" for none)."""
    targets: dict[str, tuple[str, float, str]] = dataclasses.field(default_factory=dict)
    """connector -> (">=" or "<=", threshold, what the threshold applies to: "ratio" or "value")."""


def figures(args: argparse.Namespace) -> list[Figure]:
    """The rows, in order, with the issue's targets."""
    n, q, k, r = f"{args.fanout:,}", f"{args.queued:,}", f"{args.jobs:,}", f"{args.remote_jobs:,}"
    return [
        Figure(
            "submit",
            "unary SubmitRequest, 64 in flight (no job running)",
            "calls/s",
            "unary",
            {"sqlite": (">=", 0.8, "ratio")},
        ),
        Figure(
            "e2e",
            f"end-to-end no-op jobs, one SubmitRequest per job ({k} jobs)",
            "jobs/s",
            "unary",
            {"sqlite": (">=", 0.75, "ratio")},
        ),
        Figure(
            "e2e_batch",
            f"end-to-end no-op jobs, BatchSubmitRequests of {BATCH}",
            "jobs/s",
            "unary",
            {"sqlite": (">=", 3.0, "ratio"), "postgres": (">=", 1.0, "ratio")},
        ),
        Figure(
            "e2e_concurrency",
            f"end-to-end no-op jobs, one SubmitRequest per job, Concurrency(limit={POLICY_LIMIT}) over "
            f"{POLICY_KEYS} keys",
            "jobs/s",
            "unary",
        ),
        Figure(
            "e2e_concurrency_vs",
            "end-to-end with a concurrency policy / without",
            TIMES,
            "",
            {"sqlite": (">=", 0.8, "value"), "postgres": (">=", 0.8, "value"), "memory": (">=", 0.8, "value")},
        ),
        Figure(
            "e2e_vs_sqlite",
            "end-to-end (one per job), this connector / sqlite",
            TIMES,
            "",
            {"postgres": (">=", 0.6, "value")},
        ),
        Figure(
            "batch_accepted",
            f"BatchSubmitRequests of {BATCH}, {BATCHES_IN_FLIGHT} in flight, accepted",
            "jobs/s",
            "unary",
        ),
        Figure(
            "pickup_idle_p50", "pickup latency, idle server, p50", "ms", "rtt_p50", {"sqlite": ("<=", 1.0, "value")}
        ),
        Figure(
            "pickup_idle_p99", "pickup latency, idle server, p99", "ms", "rtt_p99", {"sqlite": ("<=", 5.0, "value")}
        ),
        Figure("load_rate", "open-loop load: 50 % of end-to-end, achieved", "jobs/s", "unary"),
        Figure("pickup_load_p50", "pickup latency under that load, p50", "ms", "rtt_p50"),
        Figure(
            "pickup_load_p99", "pickup latency under that load, p99", "ms", "rtt_p99", {"sqlite": ("<=", 20.0, "value")}
        ),
        Figure(
            "fanout",
            f"WatchJob fan-out, {n} streams on one job, delivered",
            "msgs/s",
            "stream",
            {"sqlite": (">=", 0.7, "ratio")},
        ),
        Figure("submit_p99", "submit p99, 64 in flight, no stream open", "ms", "p99_64"),
        Figure("submit_p99_streams", f"submit p99, 64 in flight, {n} idle WatchJob streams open", "ms", "p99_64"),
        Figure(
            "submit_p99_streams_vs",
            f"submit p99 with {n} streams / without",
            TIMES,
            "",
            {"sqlite": ("<=", 2.0, "value")},
        ),
        Figure(
            "e2e_local", f"end-to-end no-op jobs, in-process ({r} jobs, alternating with the next)", "jobs/s", "unary"
        ),
        Figure("e2e_remote", f"end-to-end no-op jobs through one Python remote worker ({r} jobs)", "jobs/s", "unary"),
        Figure(
            "e2e_remote_vs",
            "end-to-end, one remote worker / in-process",
            TIMES,
            "",
            {"sqlite": (">=", 0.5, "value"), "postgres": (">=", 0.5, "value"), "memory": (">=", 0.5, "value")},
        ),
        Figure("fill", f"BatchSubmitRequests filling the queue to {q}", "jobs/s", "unary"),
        Figure("submit_queued", f"unary SubmitRequest with {q} queued", "calls/s", "unary"),
        Figure(
            "submit_queued_vs",
            f"unary SubmitRequest, {q} queued / empty queue",
            TIMES,
            "",
            {"sqlite": (">=", 0.8, "value")},
        ),
        Figure("claim", f"claims: drain of {k} queued no-op jobs, empty queue", "jobs/s", "unary"),
        Figure("claim_queued", f"claims: drain of {k} jobs ahead of {q} queued", "jobs/s", "unary"),
        Figure("claim_queued_vs", f"claims, {q} queued / empty queue", TIMES, "", {"sqlite": (">=", 0.8, "value")}),
        Figure("burn_down", f"burn-down of {q} queued jobs", "jobs/s", "unary", {"sqlite": (">=", 3.0, "ratio")}),
        Figure("rss_empty", "server RSS, empty queue", "MB", "rss"),
        Figure("rss_queued", f"server RSS, {q} queued", "MB", "rss", {"sqlite": ("<=", 250.0, "value")}),
    ]


# ---------------------------------------------------------------------------------------------
# The runs


async def measure_echo(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """The ceiling, on a fresh echo process: unary calls/s (64 in flight), round-trip latency, streaming msgs/s, RSS."""
    log("echo: measuring the raw grpc.aio ceiling")
    server = start_echo(workdir)
    try:
        echo = await _measure_echo(server, args)
    finally:
        server.stop()
    log(f"echo: unary {echo['unary']:,.0f} calls/s, streaming {echo['stream']:,.0f} msgs/s")
    return echo


async def _measure_echo(server: Server, args: argparse.Namespace) -> dict[str, float]:
    echo: dict[str, float] = {}
    count, sequential = (2000, 500) if args.quick else (max(args.jobs, 5000), 2000)
    async with connected(server) as stub:
        await unary(stub, [request(f"warm-{i}") for i in range(200)], INFLIGHT)
        single = await unary(stub, [request(f"one-{i}") for i in range(sequential)], 1)
        echo["rtt_p50"], echo["rtt_p99"] = percentile(single.latencies, 0.5), percentile(single.latencies, 0.99)
        calls = await unary(stub, [request(f"rate-{i}") for i in range(count)], INFLIGHT)
        echo["unary"], echo["p99_64"] = calls.rate, percentile(calls.latencies, 0.99)
        expected = args.fanout_steps + 3  # CREATED, PENDING, the steps, the final
        start_at = time.time() + 1.0 + args.fanout * 0.002
        messages = [pb.WatchJobRequest(request_id=str(start_at), after_sequence=expected)] * args.fanout
        echo["stream"], _ = await stream_rate(stub, args.fanout, messages, expected)
    echo["rss"] = rss_mb(server.pid)
    for key in ("rtt_p50", "rtt_p99", "p99_64"):
        echo[key] *= 1000
    return echo


async def run_jobs(connector: str, args: argparse.Namespace, workdir: Path, out: dict[str, float]) -> None:
    """Pickup latency (idle, loaded) and end-to-end rates, single and batched."""
    server = start_ajs(connector, args, workdir, "jobs")
    try:
        async with connected(server) as stub:
            types = {t.name for t in (await stub.ListJobTypes(pb.ListJobTypesRequest())).job_types}
            if not {"echo", "countdown"} <= types:
                sys.exit(
                    f"ajs serve runs {sorted(types)}; the bench needs echo and countdown: "
                    "pip install -e plugins/examples"
                )
            await unary(stub, [request(f"warm-{i}") for i in range(200)], INFLIGHT)
            await drained(stub, "warm-199")

            latencies = []
            for i in range(args.idle):
                reply = await stub.SubmitRequest(request(f"idle-{i}"))
                pending = await follow_to_pending(stub, f"idle-{i}")
                await follow_to_end(stub, f"idle-{i}")
                latencies.append(pending - seconds(reply.job.request.create_time))
            out["pickup_idle_p50"] = 1000 * percentile(latencies, 0.5)
            out["pickup_idle_p99"] = 1000 * percentile(latencies, 0.99)

            calls = await unary(stub, [request(f"one-{i}") for i in range(args.jobs)], INFLIGHT)
            await drained(stub, f"one-{args.jobs - 1}")
            first = min(seconds(reply.job.request.create_time) for reply in calls.replies)
            out["e2e"] = args.jobs / (await last_update(stub, "one-") - first)
            log(f"{connector}: end-to-end {out['e2e']:,.0f} jobs/s (submits {calls.rate:,.0f} calls/s)")

            accepted, first = await batches(stub, lambda i: request(f"batch-{i}"), args.jobs, BATCHES_IN_FLIGHT)
            await drained(stub, f"batch-{args.jobs - 1}")
            out["batch_accepted"] = accepted
            out["e2e_batch"] = args.jobs / (await last_update(stub, "batch-") - first)
            log(f"{connector}: end-to-end, batched {out['e2e_batch']:,.0f} jobs/s")

            rate = out["e2e"] / 2
            total = max(1, int(rate * args.load_seconds))
            tasks = []
            began = time.perf_counter()
            for i in range(total):
                delay = began + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(stub.SubmitRequest(request(f"load-{i}"))))
            replies = await asyncio.gather(*tasks)
            out["load_rate"] = total / (time.perf_counter() - began)
            await drained(stub, f"load-{total - 1}")
            latencies = await pickups(stub, replies)
            out["pickup_load_p50"] = 1000 * percentile(latencies, 0.5)
            out["pickup_load_p99"] = 1000 * percentile(latencies, 0.99)
    finally:
        server.stop()


async def run_policy(connector: str, args: argparse.Namespace, workdir: Path, out: dict[str, float]) -> None:
    """End-to-end no-op jobs as in run_jobs, with a concurrency policy on their type (issue 13)."""
    config = f'[jobs.echo]\nconcurrency = {{ key = "tenant", limit = {POLICY_LIMIT} }}\n'
    server = start_ajs(connector, args, workdir, "policy", config)
    try:
        async with connected(server) as stub:

            def gated(request_id: str, i: int) -> pb.SubmitRequestRequest:
                return request(request_id, data={"i": request_id, "tenant": str(i % POLICY_KEYS)})

            await unary(stub, [gated(f"warm-{i}", i) for i in range(200)], INFLIGHT)
            await drained(stub, "warm-199")
            calls = await unary(stub, [gated(f"one-{i}", i) for i in range(args.jobs)], INFLIGHT)
            await drained(stub, f"one-{args.jobs - 1}")
            first = min(seconds(reply.job.request.create_time) for reply in calls.replies)
            out["e2e_concurrency"] = args.jobs / (await last_update(stub, "one-") - first)
            if "e2e" in out:
                out["e2e_concurrency_vs"] = out["e2e_concurrency"] / out["e2e"]
            log(f"{connector}: end-to-end with a concurrency policy {out['e2e_concurrency']:,.0f} jobs/s")
    finally:
        server.stop()


async def run_fanout(connector: str, args: argparse.Namespace, workdir: Path, out: dict[str, float]) -> None:
    """WatchJob fan-out, and submit p99 with that many streams open against none."""
    server = start_ajs(connector, args, workdir, "fanout")
    count = min(args.jobs, 2000)
    try:
        async with connected(server) as stub:
            await unary(stub, [request(f"warm-{i}") for i in range(200)], INFLIGHT)
            await drained(stub, "warm-199")
            without = await unary(stub, [request(f"plain-{i}") for i in range(count)], INFLIGHT)
            out["submit_p99"] = 1000 * percentile(without.latencies, 0.99)
            await drained(stub, f"plain-{count - 1}")

            # Streams on a job that waits (run_after an hour ahead), open while submits run.
            idle = request("idle-target", "countdown", {"steps": "1", "interval": "0"}, run_after=time.time() + 3600)
            await stub.SubmitRequest(idle)
            began = time.perf_counter()
            opened = 0
            all_open = asyncio.Event()

            async def hold() -> None:
                nonlocal opened
                first = True
                async for _ in stub.WatchJob(pb.WatchJobRequest(request_id="idle-target")):
                    if first:
                        first, opened = False, opened + 1
                        if opened == args.fanout:
                            all_open.set()

            holders = [asyncio.create_task(hold()) for _ in range(args.fanout)]
            await asyncio.wait_for(all_open.wait(), 120)
            open_time = time.perf_counter() - began
            with_streams = await unary(stub, [request(f"open-{i}") for i in range(count)], INFLIGHT)
            out["submit_p99_streams"] = 1000 * percentile(with_streams.latencies, 0.99)
            out["submit_p99_streams_vs"] = out["submit_p99_streams"] / out["submit_p99"]
            await stub.CancelJob(pb.CancelJobRequest(request_id="idle-target"))
            await asyncio.gather(*holders)
            await drained(stub, f"open-{count - 1}")

            # Fan-out: a countdown that starts once every stream is open, its steps as fast as it can.
            steps = {"steps": str(args.fanout_steps), "interval": "0"}
            start_at = time.time() + 1.0 + 2 * open_time
            await stub.SubmitRequest(request("fanout", "countdown", steps, run_after=start_at))
            messages = [pb.WatchJobRequest(request_id="fanout")] * args.fanout
            out["fanout"], last_open = await stream_rate(stub, args.fanout, messages, args.fanout_steps + 3)
            if last_open > start_at:
                log(f"{connector}: the fan-out job was due before every stream was open (the late ones replayed)")
    finally:
        server.stop()


async def gates(stub: JobServiceAsyncStub, args: argparse.Namespace, name: str) -> list[str]:
    """Fills every slot with a long countdown job; returns their ids once all run."""
    ids = [f"{name}-{i}" for i in range(args.max_jobs)]
    hold = {"steps": "1", "interval": "3600"}
    await unary(stub, [request(i, "countdown", hold, priority=GATE_PRIORITY) for i in ids], INFLIGHT)
    await asyncio.gather(*(follow_to_pending(stub, i) for i in ids))
    return ids


async def release(stub: JobServiceAsyncStub, ids: Sequence[str]) -> None:
    """Cancels the gates: their slots free up."""
    await asyncio.gather(*(stub.CancelJob(pb.CancelJobRequest(request_id=i)) for i in ids))


async def run_queue(connector: str, args: argparse.Namespace, workdir: Path, out: dict[str, float]) -> None:
    """Submits and claims on an empty queue and with ``--queued`` jobs queued; the burn-down; RSS."""
    server = start_ajs(connector, args, workdir, "queue")
    k, n = args.jobs, args.queued
    try:
        async with connected(server) as stub:
            await unary(stub, [request(f"warm-{i}") for i in range(200)], INFLIGHT)
            await drained(stub, "warm-199")

            # Empty queue: submits with every slot taken, then the drain once the gates go.
            held = await gates(stub, args, "gate-a")
            out["rss_empty"] = rss_mb(server.pid)
            probes = [request(f"p-{i}", priority=PROBE_PRIORITY) for i in range(k)]
            out["submit"] = (await unary(stub, probes, INFLIGHT)).rate
            await release(stub, held)
            await drained(stub, f"p-{k - 1}")
            released = min(await update_times(stub, held))
            out["claim"] = k / (max(await update_times(stub, [f"p-{i}" for i in range(k)])) - released)
            log(f"{connector}: empty queue: submits {out['submit']:,.0f} calls/s, claims {out['claim']:,.0f} jobs/s")

            # The same with n jobs queued behind (priority 0 < the probes' 1).
            held = await gates(stub, args, "gate-b")
            log(f"{connector}: queueing {n:,} jobs")
            out["fill"], _ = await batches(stub, lambda i: request(f"q-{i}"), n, BATCHES_IN_FLIGHT)
            out["rss_queued"] = rss_mb(server.pid)
            log(f"{connector}: {n:,} queued at {out['fill']:,.0f} jobs/s, RSS {out['rss_queued']:,.0f} MB")
            probes = [request(f"r-{i}", priority=PROBE_PRIORITY) for i in range(k)]
            out["submit_queued"] = (await unary(stub, probes, INFLIGHT)).rate
            out["submit_queued_vs"] = out["submit_queued"] / out["submit"]
            await release(stub, held)
            log(f"{connector}: burning down {n:,} jobs")
            last = f"q-{n - 1}" if n else f"r-{k - 1}"
            await drained(stub, last, poll=0.5)
            released = min(await update_times(stub, held))
            probes_done = max(await update_times(stub, [f"r-{i}" for i in range(k)]))
            out["claim_queued"] = k / (probes_done - released)
            out["claim_queued_vs"] = out["claim_queued"] / out["claim"]
            if n:
                tail = [f"q-{i}" for i in range(max(0, n - BATCH * BATCHES_IN_FLIGHT - args.max_jobs), n)]
                out["burn_down"] = (n + k) / (max(await update_times(stub, tail)) - released)
    finally:
        server.stop()


async def run_remote(connector: str, args: argparse.Namespace, workdir: Path, out: dict[str, float]) -> None:
    """End-to-end no-op jobs through one Python remote worker (``ajs worker``) against the in-process handler.

    One server runs both: ``echo`` in-process and ``remote_noop`` in a worker process with as
    many jobs at once as the server's ``--max-jobs``. The two alternate, twice each, and each
    figure is the mean of its two runs, so that drift hits both alike (issue 16).
    """
    server = start_ajs(connector, args, workdir, "remote")
    worker = start_worker(server, args.max_jobs)
    try:
        async with connected(server) as stub:
            while "remote_noop" not in {t.name for t in (await stub.ListJobTypes(pb.ListJobTypesRequest())).job_types}:
                if worker.poll() is not None:
                    raise RuntimeError(f"ajs worker exited: {(server.workdir / 'worker' / 'worker.log').read_text()}")
                await asyncio.sleep(0.05)
            rates: dict[str, list[float]] = {"echo": [], "remote_noop": []}
            for round_ in range(3):  # the first round warms both up and is not counted
                for job_type in ("echo", "remote_noop"):
                    prefix = f"{job_type}-{round_}-"
                    calls = await unary(
                        stub, [request(f"{prefix}{i}", job_type) for i in range(args.remote_jobs)], INFLIGHT
                    )
                    await drained(stub, f"{prefix}{args.remote_jobs - 1}")
                    first = min(seconds(reply.job.request.create_time) for reply in calls.replies)
                    if round_:
                        rates[job_type].append(args.remote_jobs / (await last_update(stub, prefix) - first))
            out["e2e_local"] = sum(rates["echo"]) / len(rates["echo"])
            out["e2e_remote"] = sum(rates["remote_noop"]) / len(rates["remote_noop"])
            out["e2e_remote_vs"] = out["e2e_remote"] / out["e2e_local"]
            log(
                f"{connector}: {args.remote_jobs:,} no-op jobs, in-process {out['e2e_local']:,.0f} jobs/s, "
                f"one remote worker {out['e2e_remote']:,.0f} jobs/s ({out['e2e_remote_vs']:.2f}{TIMES})"
            )
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        server.stop()


RUNS = (run_jobs, run_policy, run_fanout, run_queue, run_remote)


async def run(args: argparse.Namespace) -> None:
    """Measures the echo, then every connector; prints the table and writes the JSON lines."""
    connectors = [name.strip() for name in args.connectors.split(",") if name.strip()]
    if "postgres" in connectors and not args.dsn:
        sys.exit("postgres needs --dsn (or $AJS_POSTGRES_DSN)")
    began = time.monotonic()
    results: dict[str, dict[str, float]] = {}
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="ajs-bench-") as tmp:
        workdir = Path(tmp)
        # The echo before the first connector, between connectors and after the last: each connector's
        # figures are divided by the mean of the echo runs just before and just after it (the machine drifts).
        rounds = [await measure_echo(args, workdir)]
        for connector in connectors:
            await run_connector(connector, args, workdir, results, failures)
            rounds.append(await measure_echo(args, workdir))
    echoes = {
        connector: {key: (rounds[i][key] + rounds[i + 1][key]) / 2 for key in rounds[i]}
        for i, connector in enumerate(connectors)
    }
    bracket = {connector: (rounds[i], rounds[i + 1]) for i, connector in enumerate(connectors)}
    if "sqlite" in results and "e2e" in results["sqlite"]:
        for out in results.values():
            if "e2e" in out:
                out["e2e_vs_sqlite"] = out["e2e"] / results["sqlite"]["e2e"]
    report(args, echoes, bracket, results, failures, time.monotonic() - began)


async def run_connector(
    connector: str,
    args: argparse.Namespace,
    workdir: Path,
    results: dict[str, dict[str, float]],
    failures: dict[str, list[str]],
) -> None:
    """Every run for one connector, each on a fresh server; a failed run leaves the others' figures."""
    out: dict[str, float] = {}
    results[connector] = out
    for step in RUNS:
        if args.runs and step.__name__.removeprefix("run_") not in args.runs:
            continue
        log(f"{connector}: {step.__name__}")
        try:
            await step(connector, args, workdir, out)
        except Exception as error:
            log(f"{connector}: {step.__name__} failed: {error!r}")
            failures.setdefault(connector, []).append(f"{step.__name__}: {error!r}")


# ---------------------------------------------------------------------------------------------
# The report


def number(value: float) -> str:
    """A figure with sensible precision."""
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def verdict(figure: Figure, connector: str, value: float, ratio: float | None) -> tuple[str, bool | None] | None:
    """The target for this cell as text, and whether it is met (None: not measured); None if it has no target."""
    if connector not in figure.targets:
        return None
    op, threshold, on = figure.targets[connector]
    unit = f" {TIMES}" if on == "ratio" or figure.unit == TIMES else f" {figure.unit}"
    text = f"{connector} {'≥' if op == '>=' else '≤'} {number(threshold)}{unit}"
    measured = ratio if on == "ratio" else value
    if measured is None or math.isnan(measured):
        return text, None
    return text, measured >= threshold if op == ">=" else measured <= threshold


ECHO_ROWS = (
    ("unary", "echo: unary calls/s, 64 in flight", "calls/s"),
    ("p99_64", "echo: unary p99, 64 in flight", "ms"),
    ("rtt_p50", "echo: round trip p50, 1 in flight", "ms"),
    ("rtt_p99", "echo: round trip p99, 1 in flight", "ms"),
    ("stream", "echo: server-streaming msgs/s", "msgs/s"),
    ("rss", "echo: server RSS", "MB"),
)
BASIS_NAMES = {key: label.removeprefix("echo: ") for key, label, _ in ECHO_ROWS}


def report(
    args: argparse.Namespace,
    echoes: dict[str, dict[str, float]],
    bracket: dict[str, tuple[dict[str, float], dict[str, float]]],
    results: dict[str, dict[str, float]],
    failures: dict[str, list[str]],
    elapsed: float,
) -> None:
    """Prints the table (markdown) and writes one JSON line per figure."""
    connectors = list(results)
    lines: list[dict[str, Any]] = []
    print()
    print(f"## ajs-grpc bench: {', '.join(connectors)}{' (--quick)' if args.quick else ''}")
    print()
    print(
        f"{os.cpu_count()} cores, Python {platform.python_version()}, grpcio {grpc.__version__}. The client (one "
        "process) and each server (its own process) share this machine; one server at a time, each `ajs serve` "
        f"with --max-jobs {args.max_jobs} on a fresh store. {args.jobs:,} jobs per throughput run, "
        f"{args.queued:,} queued, {args.fanout:,} WatchJob streams {TIMES} {args.fanout_steps + 3} messages."
    )
    print()
    print(
        "Each cell: value (ratio to the raw grpc.aio echo's figure named in the unit column). The echo rows show "
        "what the echo measured for that column: the mean of its runs just before and just after that connector "
        "(each run in parentheses). Pickup latency: server clock, request create_time to its PENDING Response. "
        "Submit latencies and streaming rates: client clock. End-to-end, claim and burn-down rates: server "
        "timestamps (first create_time, or the gates' release, to the last job's end)."
    )
    print()
    header = ["figure", "unit (ratio to the echo's)", *connectors, "target", "met"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, label, unit in ECHO_ROWS:
        cells = []
        for connector in connectors:
            before, after = bracket[connector]
            cells.append(f"{number(echoes[connector][key])} ({number(before[key])} / {number(after[key])})")
            lines.append(
                {
                    "connector": "echo",
                    "column": connector,
                    "figure": key,
                    "value": echoes[connector][key],
                    "unit": unit,
                    "ratio": 1.0,
                    "runs": [before[key], after[key]],
                    "target": None,
                    "met": None,
                }
            )
        print(f"| {label} | {unit} | " + " | ".join(cells) + " |  |  |")
    for figure in figures(args):
        cells, targets, mets = [], [], []
        for connector in connectors:
            value = results[connector].get(figure.key, math.nan)
            ratio = value / echoes[connector][figure.basis] if figure.basis and not math.isnan(value) else None
            cells.append(number(value) + (f" ({ratio:.2f} {TIMES})" if ratio is not None else ""))
            judged = verdict(figure, connector, value, ratio)
            if judged:
                targets.append(judged[0])
                mets.append(f"{connector}: {'n/a' if judged[1] is None else 'yes' if judged[1] else 'no'}")
            if not math.isnan(value):
                lines.append(
                    {
                        "connector": connector,
                        "figure": figure.key,
                        "label": figure.label,
                        "value": value,
                        "unit": figure.unit,
                        "ratio": ratio,
                        "basis": figure.basis or None,
                        "target": judged[0] if judged else None,
                        "met": judged[1] if judged else None,
                    }
                )
        if all(cell == "n/a" for cell in cells):
            continue
        basis = f" ({BASIS_NAMES[figure.basis]})" if figure.basis else ""
        print(
            f"| {figure.label} | {figure.unit}{basis} | " + " | ".join(cells) + f" | {'; '.join(targets)} | "
            f"{'; '.join(mets)} |"
        )
    print()
    for connector, errors in failures.items():
        for error in errors:
            print(f"{connector}: FAILED {error}")
    print(f"Run time {elapsed:,.0f} s.")
    if args.json:
        with Path(args.json).open("w") as sink:
            for line in lines:
                sink.write(json.dumps(line) + "\n")
        print(f"JSON lines: {args.json}")


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--connectors", help="comma-separated (default memory,sqlite, and postgres when there is a --dsn)"
    )
    parser.add_argument("--dsn", default=os.environ.get("AJS_POSTGRES_DSN", ""), help="PostgreSQL for postgres")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run and claim drain (default 5000)")
    parser.add_argument("--queued", type=int, help="jobs queued for the large-queue runs (default 1,000,000)")
    parser.add_argument("--fanout", type=int, help="WatchJob streams on one job (default 1000)")
    parser.add_argument("--fanout-steps", type=int, help="progress Responses of the fan-out job (default 50)")
    parser.add_argument("--remote-jobs", type=int, help="jobs per run of the remote-worker comparison (default 1000)")
    parser.add_argument("--idle", type=int, help="jobs for the idle pickup latency (default 200)")
    parser.add_argument("--load-seconds", type=float, help="length of the open-loop load (default 10)")
    parser.add_argument("--max-jobs", type=int, default=64, help="the server's --max-jobs (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (under two minutes)")
    parser.add_argument(
        "--runs",
        type=lambda value: {name.strip() for name in value.split(",") if name.strip()},
        default=set(),
        help="only these runs: jobs, policy, fanout, queue, remote (default all; figures of the others are left blank)",
    )
    parser.add_argument("--json", metavar="FILE", help="write one JSON object per figure to FILE")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        asyncio.run(serve_echo())
        return
    if args.connectors is None:
        args.connectors = "memory,sqlite,postgres" if args.dsn else "memory,sqlite"
    sizes = {
        "jobs": (5000, 500),
        "queued": (1_000_000, 5000),
        "fanout": (1000, 100),
        "fanout_steps": (50, 20),
        "idle": (200, 30),
        "remote_jobs": (1000, 300),
        "load_seconds": (10.0, 2.0),
    }
    for name, (full, quick) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
