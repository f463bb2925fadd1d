"""What only the SQLite connector does: files, schema, locking, group commit, full disks.

The queue behaviour itself is tested by the shared contract suite (tests/contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ajs_grpc.connectors._sql import load_queries
from ajs_grpc.connectors.base import JobFilter
from ajs_grpc.connectors.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteConnector
from ajs_grpc.core.errors import AlreadyExists, ConnectorError, InvalidArgument, ResourceExhausted
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.serve_process import AJS, start_server

IS_ROOT = os.geteuid() == 0


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` (needs root)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def open_connector(path: Path) -> SqliteConnector:
    connector = SqliteConnector(path, synchronous="NORMAL")
    await connector.open()
    return connector


async def test_a_new_file_gets_the_current_schema(tmp_path: Path) -> None:
    connector = await open_connector(tmp_path / "q.db")
    await connector.close()
    with sqlite3.connect(tmp_path / "q.db") as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version")]
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert mode == "wal"


async def test_a_schema_1_database_is_upgraded_with_its_jobs(tmp_path: Path) -> None:
    # A queue made before queues and flow control (schema 1), with a job waiting in it.
    queries = load_queries("sqlite")
    with sqlite3.connect(tmp_path / "q.db") as db:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in queries["migration_1"]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (1, 0)")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(
            "INSERT INTO jobs (id, parent_id, type, creator, create_time, data, priority, max_attempts, state, "
            "attempt, cancel_requested, update_time, due_time, last_sequence) "
            "VALUES ('old', '', 'echo', '', 0, '{}', 0, 1, ?, 0, 0, 0, 0, 1)",
            (int(RequestState.CREATED),),
        )
        db.execute("INSERT INTO responses (position, sequence, create_time, state, is_final, data) "
                   "VALUES (1, 1, 0, ?, 0, '{}')", (int(RequestState.CREATED),))  # fmt: skip
    db.close()
    connector = await open_connector(tmp_path / "q.db")
    try:
        job = await connector.get("old")
        assert job.request.queue == "default"
        assert not job.flow.gated
        [claim] = await connector.claim("w", queues=["default"])
        assert claim.job.request.id == "old"
    finally:
        await connector.close()


async def test_jobs_survive_reopening(tmp_path: Path) -> None:
    connector = await open_connector(tmp_path / "q.db")
    await connector.enqueue(Request(id="kept", type="echo", data={"k": "v"}, priority=3))
    await connector.close()
    connector = await open_connector(tmp_path / "q.db")
    try:
        job = await connector.get("kept")
        assert job.state is RequestState.CREATED
        assert dict(job.request.data) == {"k": "v"}
        assert job.request.priority == 3
    finally:
        await connector.close()


async def test_jobs_left_running_are_recovered_at_open(tmp_path: Path) -> None:
    connector = await open_connector(tmp_path / "q.db")
    await connector.enqueue(Request(id="again", type="echo"), max_attempts=2)
    await connector.enqueue(Request(id="spent", type="echo"), max_attempts=1)
    await connector.claim("old-server", limit=2, lease=3600)
    await connector.close()  # as if the server died: the leases are still valid
    connector = await open_connector(tmp_path / "q.db")
    try:
        again = await connector.get("again")
        spent = await connector.get("spent")
        assert again.state is RequestState.CREATED
        assert again.last_response.error is not None
        assert again.last_response.error.reason == "LEASE_EXPIRED"
        assert spent.state is RequestState.FAILED
    finally:
        await connector.close()


async def test_one_server_per_database(tmp_path: Path) -> None:
    first = await open_connector(tmp_path / "q.db")
    try:
        with pytest.raises(ConnectorError, match="in use by another ajs server"):
            await open_connector(tmp_path / "q.db")
    finally:
        await first.close()
    second = await open_connector(tmp_path / "q.db")  # released: it opens again
    await second.close()


@pytest.mark.parametrize("spelling", ["symlink", "dotdot", "hardlink"])
async def test_one_server_per_database_whatever_path_names_it(tmp_path: Path, spelling: str) -> None:
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "q.db"
    first = await open_connector(real)
    try:
        other = {
            "symlink": tmp_path / "link.db",
            "dotdot": tmp_path / "data" / ".." / "data" / "q.db",
            "hardlink": tmp_path / "hard.db",
        }[spelling]
        if spelling == "symlink":
            other.symlink_to(real)
        elif spelling == "hardlink":
            os.link(real, other)
        with pytest.raises(ConnectorError, match="in use by another ajs server"):
            await open_connector(other)
    finally:
        await first.close()


def test_a_second_server_through_a_symlink_is_refused_and_runs_nothing_twice(tmp_path: Path) -> None:
    # Another process, another path to the same file: before, it "recovered" the first
    # server's running jobs and ran them again.
    first = start_server(tmp_path, "--database", "q.db")
    try:
        (tmp_path / "alias.db").symlink_to(tmp_path / "q.db")
        second = subprocess.run(
            [AJS, "serve", "--address", "127.0.0.1:0", "--database", "alias.db"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
        assert second.returncode == 6
        assert "alias.db is in use by another ajs server" in second.stderr
        assert first.process.poll() is None
    finally:
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(30)


async def test_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(ConnectorError, match=r"cannot use .* as the queue") as raised:
        await open_connector(path)
    assert raised.value.reason == "STORAGE_UNUSABLE"
    assert path.read_bytes().startswith(b"this is not")  # left as it was


async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(ConnectorError, match="another application") as raised:
        await open_connector(path)
    assert raised.value.reason == "FOREIGN_DATABASE"
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    await (await open_connector(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConnectorError, match="newer than this ajs-grpc knows") as raised:
        await open_connector(path)
    assert raised.value.reason == "SCHEMA_TOO_NEW"


async def test_a_read_only_place_is_refused_at_open(tmp_path: Path) -> None:
    if IS_ROOT:  # root ignores file modes: use a real read-only file system
        place_cm: contextlib.AbstractContextManager[Path] = tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        place = tmp_path / "ro"
        place.mkdir(mode=0o555)
        place_cm = contextlib.nullcontext(place)
    with place_cm as place:
        with pytest.raises(ConnectorError, match="cannot open") as raised:
            await open_connector(place / "q.db")
        assert "Read-only file system" in raised.value.message or "Permission denied" in raised.value.message


async def test_group_commit_stores_every_concurrent_write_and_isolates_failures(tmp_path: Path) -> None:
    connector = await open_connector(tmp_path / "q.db")
    try:
        await connector.enqueue(Request(id="taken", type="echo", data={"v": "1"}))
        writes = [connector.enqueue(Request(id=f"r{i}", type="echo")) for i in range(200)]
        writes.insert(100, connector.enqueue(Request(id="taken", type="echo", data={"v": "2"})))
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert sum(isinstance(r, AlreadyExists) for r in results) == 1
        assert sum(isinstance(r, tuple) and r[1] for r in results) == 200
    finally:
        await connector.close()
    connector = await open_connector(tmp_path / "q.db")
    try:
        for i in range(200):
            assert (await connector.get(f"r{i}")).state is RequestState.CREATED
        assert dict((await connector.get("taken")).request.data) == {"v": "1"}
    finally:
        await connector.close()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tiny tmpfs to fill needs root (CI runs as root)")
async def test_a_full_disk_is_resource_exhausted_and_loses_no_acknowledged_request(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "size=512k") as place:
        connector = await open_connector(place / "q.db")
        acknowledged: list[str] = []
        refused: list[BaseException] = []
        big = {"blob": "x" * 4000}
        try:
            for batch in range(200):
                writes = [connector.enqueue(Request(id=f"r{batch}-{i}", type="echo", data=big)) for i in range(10)]
                for i, result in enumerate(await asyncio.gather(*writes, return_exceptions=True)):
                    if isinstance(result, BaseException):
                        refused.append(result)
                    else:
                        acknowledged.append(f"r{batch}-{i}")
                if refused:
                    break
        finally:
            await connector.close()
        assert refused, "the disk never filled"
        assert all(isinstance(error, ResourceExhausted) for error in refused), refused
        assert refused[0].reason == "STORAGE_FULL"  # type: ignore[attr-defined]
        assert acknowledged
        # Free some space (the WAL is checkpointed on close) and check every acknowledged request.
        connector = await open_connector(place / "q.db")
        try:
            for request_id in acknowledged:
                assert (await connector.get(request_id)).state is RequestState.CREATED
        finally:
            await connector.close()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tiny tmpfs to fill needs root (CI runs as root)")
async def test_a_full_disk_answers_submits_resource_exhausted_with_details(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "size=256k") as place:
        config = ServerConfig(address="127.0.0.1:0", connector_options={"path": str(place / "q.db")})
        server = AjsServer(config, chain=jobs_for_tests.chain())
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.JobServiceStub(channel)
                request = pb.Request(type="echo", data={"blob": "x" * 8000}, run_after=Timestamp(seconds=4_000_000_000))

                async def fill() -> None:
                    for _ in range(1000):
                        await stub.SubmitRequest(pb.SubmitRequestRequest(request=request))

                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await fill()
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
                assert status is not None
                info = error_details_pb2.ErrorInfo()
                assert status.details[0].Unpack(info)
                assert info.reason == "STORAGE_FULL"
        finally:
            await server.stop()


async def test_a_feed_token_from_ahead_of_the_store_or_out_of_range_is_refused(tmp_path: Path) -> None:
    # A database restored from an older backup: a client's token points past what it holds.
    connector = SqliteConnector(tmp_path / "a.db", synchronous="NORMAL")
    await connector.open()
    try:
        await connector.enqueue(Request(id="a", type="t"))
        now = (await connector.feed("", JobFilter(), 0)).token
        store, k, _, _ = now[1:].split(".")
        for bad in (f"s{store}.{int(k) + 5000}.0.0", f"s{store}.1.{2**63}.0", f"s{store}.1.0"):
            with pytest.raises(InvalidArgument) as refused:
                await connector.feed(bad, JobFilter(), 10)
            assert refused.value.reason == "BAD_RESUME_TOKEN"
        assert (await connector.feed(now, JobFilter(), 10)).items == []
    finally:
        await connector.close()
