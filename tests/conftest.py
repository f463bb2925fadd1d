"""Shared fixtures: connectors for the contract suite, a real server on port 0."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from ajs_grpc.connectors.base import Connector
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.connectors.sqlite import SqliteConnector
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc
from tests import jobs_for_tests

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


CONNECTORS: dict[str, Callable[[Path], Connector]] = {
    "memory": lambda _: MemoryConnector(),
    "sqlite": lambda tmp: SqliteConnector(tmp / "contract.db", synchronous="NORMAL"),
    "postgres": lambda _: _postgres(),
}


def _postgres() -> Connector:
    from ajs_grpc.connectors.postgres import PostgresConnector

    return PostgresConnector(postgres_dsn(), schema=unique_schema(), writers=2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--connector", action="append", default=[], help="run the contract suite on these connectors only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "connector_name" in metafunc.fixturenames:
        names = metafunc.config.getoption("--connector") or list(CONNECTORS)
        metafunc.parametrize("connector_name", names)


@pytest.fixture
async def connector(connector_name: str, tmp_path: Path) -> AsyncIterator[Connector]:
    """An open connector of each kind (the contract suite runs once per kind)."""
    made = CONNECTORS[connector_name](tmp_path)
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
