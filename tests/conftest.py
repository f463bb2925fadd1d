"""Shared fixtures: connectors for the contract suite, a real server on port 0."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import grpc
import pytest

from ajs_grpc.connectors.base import Clock, Connector
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.connectors.sqlite import SqliteConnector
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests
from tests.helpers import FakeClock

POSTGRES_DSN = os.environ.get("AJS_TEST_POSTGRES_DSN", "")


def postgres_dsn() -> str:
    """The DSN of the test PostgreSQL; skips the test (with the reason) when none is configured."""
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("AJS_TEST_POSTGRES_DSN is not set in CI")
        pytest.skip("AJS_TEST_POSTGRES_DSN is not set (e.g. postgresql://127.0.0.1:5432/test)")
    return POSTGRES_DSN


def unique_schema() -> str:
    """A schema name of its own for one test, so runs and tests never collide."""
    return f"ajs_test_{uuid.uuid4().hex[:12]}"


def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class MakeConnector(Protocol):
    """Makes a connector of one kind (not yet open), its files under ``tmp``, on ``clock`` if given."""

    def __call__(self, tmp: Path, clock: Clock | None = None) -> Connector: ...


def _memory(tmp: Path, clock: Clock | None = None) -> Connector:
    return MemoryConnector(clock=clock)


def _sqlite(tmp: Path, clock: Clock | None = None) -> Connector:
    return SqliteConnector(tmp / "contract.db", synchronous="NORMAL", clock=clock)


def _postgres(tmp: Path, clock: Clock | None = None) -> Connector:
    from ajs_grpc.connectors.postgres import PostgresConnector

    return PostgresConnector(postgres_dsn(), schema=unique_schema(), writers=2, clock=clock)


CONNECTORS: dict[str, MakeConnector] = {"memory": _memory, "sqlite": _sqlite, "postgres": _postgres}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--connector", action="append", default=[], help="run the contract suite on these connectors only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "connector_name" in metafunc.fixturenames:
        names = metafunc.config.getoption("--connector") or list(CONNECTORS)
        metafunc.parametrize("connector_name", names)


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves forward; a test that asks for it gets a ``connector`` on it."""
    return FakeClock()


@pytest.fixture
async def connector(connector_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Connector]:
    """An open connector of each kind (the contract suite runs once per kind).

    On the ``clock`` fixture if the test uses it, else on the connector's own clock.
    """
    clock: FakeClock | None = request.getfixturevalue("clock") if "clock" in request.fixturenames else None
    made = CONNECTORS[connector_name](tmp_path, clock)
    await made.open()
    try:
        yield made
    finally:
        await made.close()
        schema = getattr(made, "schema", None)
        if connector_name == "postgres" and schema:
            drop_schema(schema)


@pytest.fixture
def server_config() -> ServerConfig:
    """The configuration of the ``server`` fixture; tests may change it first."""
    return ServerConfig(address="127.0.0.1:0", max_concurrent_jobs=4, cancel_grace=0.5, shutdown_grace=0.5)


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[AjsServer]:
    """A real grpc.aio server on an ephemeral port with the memory connector and the test jobs."""
    started = AjsServer(server_config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def channel(server: AjsServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the ``server`` fixture."""
    async with grpc.aio.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.JobServiceStub:
    """The generated JobService stub on ``channel``."""
    return pb_grpc.JobServiceStub(channel)
