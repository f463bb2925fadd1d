"""What only the PostgreSQL connector does: several instances on one queue, NOTIFY, reconnects.

The queue behaviour itself is the shared contract suite's (tests/contract).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from ajs_grpc.connectors._sql import Done, load_queries
from ajs_grpc.connectors.base import FeedItem, JobFilter
from ajs_grpc.connectors.postgres import SCHEMA_VERSION, PostgresConnector
from ajs_grpc.core.errors import ConnectorError, NotFound
from ajs_grpc.core.model import Request, RequestState, Update
from tests.conftest import drop_schema, postgres_dsn, unique_schema
from tests.helpers import FakeClock, eventually

S = RequestState


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    postgres_dsn()
    name = unique_schema()
    yield name
    drop_schema(name)


async def test_a_schema_1_queue_is_upgraded_with_its_jobs(schema: str) -> None:
    # A queue made before queues and flow control (schema 1), with a job waiting in it.
    with psycopg.connect(postgres_dsn(), autocommit=True) as db:
        db.execute(psycopg.sql.SQL("CREATE SCHEMA {0}; SET search_path TO {0}").format(psycopg.sql.Identifier(schema)))
        for statement in load_queries("postgres")["migration_1"]:
            db.execute(statement)  # type: ignore[arg-type]
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute(
            "INSERT INTO jobs (id, parent_id, type, creator, create_time, data, priority, max_attempts, state, "
            "attempt, cancel_requested, update_time, due_time, last_sequence) "
            "VALUES ('old', '', 'echo', '', now(), '{}', 0, 1, %s, 0, false, now(), now(), 1)",
            (int(S.CREATED),),
        )
        db.execute(
            "INSERT INTO responses (position, sequence, create_time, state, is_final, data) "
            "SELECT position, 1, now(), %s, false, '{}' FROM jobs",
            (int(S.CREATED),),
        )
    connector = PostgresConnector(postgres_dsn(), schema)
    await connector.open()
    try:
        assert connector.found_version == 1
        job = await connector.get("old")
        assert job.request.queue == "default"
        assert not job.flow.gated
        [claim] = await connector.claim("w", queues=["default"])
        assert claim.job.request.id == "old"
    finally:
        await connector.close()


@pytest.fixture
async def two(schema: str) -> AsyncIterator[tuple[PostgresConnector, PostgresConnector]]:
    """Two connectors on one schema, as two `ajs serve` instances would be."""
    first = PostgresConnector(postgres_dsn(), schema, writers=2)
    second = PostgresConnector(postgres_dsn(), schema, writers=2)
    await first.open()
    await second.open()
    await first.listening.wait()
    await second.listening.wait()
    yield first, second
    await first.close()
    await second.close()


async def test_two_instances_racing_for_jobs_never_share_one(two: tuple[PostgresConnector, PostgresConnector]) -> None:
    first, second = two
    for i in range(40):
        await first.enqueue(Request(id=f"r{i}", type="t"))
    batches = await asyncio.gather(*(c.claim(f"w{n}", limit=3) for n in range(10) for c in (first, second)))
    ids = [claim.job.request.id for batch in batches for claim in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_a_watch_on_one_instance_streams_what_another_writes(
    two: tuple[PostgresConnector, PostgresConnector],
) -> None:
    first, second = two
    await first.enqueue(Request(id="a", type="t"))
    watching = asyncio.create_task(_collect(second, "a"))
    await eventually(lambda: second.watcher_count == 1)
    claim = (await first.claim("w"))[0]
    await first.respond("a", Update(S.PENDING), claim.lease_token)
    await first.respond("a", Update(S.FINISHED), claim.lease_token)
    responses = await asyncio.wait_for(watching, 5)
    assert [r.sequence for r in responses] == [1, 2, 3, 4]


async def test_an_enqueue_on_one_instance_wakes_the_other(two: tuple[PostgresConnector, PostgresConnector]) -> None:
    first, second = two
    woken = asyncio.Event()

    class Listener:
        def work_available(self) -> None:
            woken.set()

        def cancel_requested(self, request_id: str) -> None:
            pass

    second.add_listener(Listener())
    await first.enqueue(Request(id="a", type="t"))
    await asyncio.wait_for(woken.wait(), 5)


async def test_watchers_catch_up_after_the_listening_connection_is_lost(
    two: tuple[PostgresConnector, PostgresConnector],
) -> None:
    first, second = two
    await first.enqueue(Request(id="a", type="t"))
    watching = asyncio.create_task(_collect(second, "a"))
    await eventually(lambda: second.watcher_count == 1)
    # Every ajs connection is cut, as a PostgreSQL restart would; meanwhile the job ends.
    await _terminate_ajs_connections()
    await eventually(lambda: not second.listening.is_set())
    claim = await _retry(lambda: first.claim("w"))
    await _retry(lambda: first.respond("a", Update(S.FINISHED), claim[0].lease_token))
    responses = await asyncio.wait_for(watching, 10)
    assert [r.sequence for r in responses] == [1, 2, 3]
    assert second.listening.is_set()


async def test_a_notice_about_an_unknown_request_is_harmless(two: tuple[PostgresConnector, PostgresConnector]) -> None:
    first, _ = two
    async with await psycopg.AsyncConnection.connect(postgres_dsn(), autocommit=True) as connection:
        await connection.execute("SELECT pg_notify(%s, %s)", (first.channel, "r:no-such-request"))
        await connection.execute("SELECT pg_notify(%s, %s)", (first.channel, "garbage"))
    await first.enqueue(Request(id="still-fine", type="t"))
    assert (await first.get("still-fine")).state is S.CREATED


async def test_a_wrong_dsn_is_a_clear_error() -> None:
    connector = PostgresConnector("postgresql://nobody@127.0.0.1:1/none", unique_schema())
    with pytest.raises(ConnectorError, match="cannot connect to PostgreSQL"):
        await connector.open()


async def test_a_newer_schema_is_refused_and_an_old_one_without_migrate(schema: str) -> None:
    connector = PostgresConnector(postgres_dsn(), schema, migrate=False)
    with pytest.raises(ConnectorError, match="run 'ajs db upgrade'"):
        await connector.open()
    connector = PostgresConnector(postgres_dsn(), schema)
    await connector.open()
    await connector.close()
    async with await psycopg.AsyncConnection.connect(postgres_dsn(), autocommit=True) as connection:
        await connection.execute(
            psycopg.sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(
                psycopg.sql.Identifier(schema)
            ),
            (SCHEMA_VERSION + 1,),
        )
    with pytest.raises(ConnectorError, match="newer than this ajs-grpc knows"):
        await PostgresConnector(postgres_dsn(), schema).open()


async def _collect(connector: PostgresConnector, request_id: str) -> list[object]:
    return [r async for r in connector.watch(request_id)]


async def _terminate_ajs_connections() -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn(), autocommit=True) as connection:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'ajs-grpc' AND pid <> pg_backend_pid()"
        )


async def _retry(call):  # type: ignore[no-untyped-def]
    """The pool notices dead connections on use: a write may fail once, then succeed."""
    for _ in range(50):
        try:
            return await call()
        except Exception:
            await asyncio.sleep(0.1)
    return await call()


async def test_a_write_the_database_refuses_fails_alone_in_its_group_commit(schema: str) -> None:
    # PostgreSQL's text and jsonb cannot hold U+0000 (the service refuses it first; the store
    # must not rely on that). Writes committed in one transaction with it must not fail with it.
    connector = PostgresConnector(postgres_dsn(), schema, writers=1)  # one writer: one batch for all
    await connector.open()
    try:
        for i in range(4):
            await connector.enqueue(Request(id=f"running-{i}", type="t"))
        claims = await connector.claim("w", limit=4)
        writes = [
            *(connector.enqueue(Request(id=f"good-{i}", type="t", data={"n": str(i)})) for i in range(10)),
            connector.enqueue(Request(id="bad-data", type="t", data={"k": "v\x00"})),
            connector.enqueue(Request(id="bad\x00id", type="t")),
            *(connector.respond(c.job.request.id, Update(S.PENDING), c.lease_token) for c in claims[:2]),
            *(connector.respond(c.job.request.id, Update(S.FINISHED), c.lease_token) for c in claims[2:]),
            connector.enqueue(Request(id="bad-type", type="t\x00")),
            *(connector.enqueue(Request(id=f"later-{i}", type="t")) for i in range(10)),
        ]
        results = await asyncio.gather(*writes, return_exceptions=True)
    finally:
        await connector.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 3
    assert all(isinstance(error, ConnectorError) for error in failed)
    connector = PostgresConnector(postgres_dsn(), schema)
    await connector.open()
    try:
        for i in range(10):
            assert (await connector.get(f"good-{i}")).state is S.CREATED
            assert (await connector.get(f"later-{i}")).state is S.CREATED
        assert [(await connector.get(c.job.request.id)).state for c in claims] == [S.PENDING] * 2 + [S.FINISHED] * 2
        with pytest.raises(NotFound):
            await connector.get("bad-data")
    finally:
        await connector.close()


@pytest.mark.parametrize("kind", ["mixed-case", "longest"])
async def test_any_valid_schema_name_migrates_once_and_carries_notifications(kind: str) -> None:
    suffix = unique_schema().removeprefix("ajs_test_")
    schema = f"AjsMixed_{suffix}" if kind == "mixed-case" else f"ajs_{suffix}".ljust(63, "x")
    try:
        for opening in range(2):  # the second open finds the schema at its version: nothing to migrate
            first = PostgresConnector(postgres_dsn(), schema, writers=1)
            second = PostgresConnector(postgres_dsn(), schema, writers=1)
            await first.open()
            await second.open()
            try:
                assert await first.schema_version() == SCHEMA_VERSION
                await second.listening.wait()
                woken = asyncio.Event()
                second.add_listener(_WakeListener(woken))
                await first.enqueue(Request(id=f"opening-{opening}", type="t"))
                await asyncio.wait_for(woken.wait(), 5)
            finally:
                await first.close()
                await second.close()
    finally:
        drop_schema(schema)


@pytest.mark.parametrize("name", ["bad-name", "x" * 64, "pg_catalog", "1abc", "", "a b", "ajs\x00"])
def test_a_schema_name_postgresql_cannot_take_is_refused_at_once(name: str) -> None:
    with pytest.raises(ValueError, match="is not a schema name"):
        PostgresConnector(postgres_dsn(), name)


class _WakeListener:
    def __init__(self, woken: asyncio.Event) -> None:
        self.woken = woken

    def work_available(self) -> None:
        self.woken.set()

    def cancel_requested(self, request_id: str) -> None:
        pass


async def test_a_cancel_waiting_for_a_claims_commit_finds_the_job(schema: str) -> None:
    # Another instance's transaction claims the job (new state, new Response) and holds its
    # lock; a cancel waits for it. Once it commits, the cancel must see the claimed job:
    # FOR UPDATE re-checked a join with the old Response and found no row (NOT_FOUND).
    connector = PostgresConnector(postgres_dsn(), schema, writers=1)
    await connector.open()
    try:
        await connector.enqueue(Request(id="a", type="t"))
        async with await psycopg.AsyncConnection.connect(postgres_dsn()) as other:
            await other.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(schema)))
            await other.execute(
                "UPDATE jobs SET state = 2, attempt = 1, last_sequence = 2, lease_token = 'other' WHERE id = 'a'"
            )
            await other.execute(
                "INSERT INTO responses SELECT position, 2, now(), 2, false, '{}'::jsonb, NULL, NULL, NULL, NULL, NULL "
                "FROM jobs WHERE id = 'a'"
            )
            cancelling = asyncio.create_task(connector.cancel("a"))
            await eventually(_waiting_for_a_lock)
            assert not cancelling.done()
            await other.commit()
        job = await asyncio.wait_for(cancelling, 10)
        assert (job.state, job.cancel_requested, job.last_response.sequence) == (S.PENDING, True, 2)
    finally:
        await connector.close()


def _waiting_for_a_lock() -> bool:
    with psycopg.connect(postgres_dsn(), autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ajs-grpc' AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


async def test_a_queue_filled_in_bulk_is_analyzed_so_claims_keep_their_index(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ajs_grpc.connectors import postgres

    monkeypatch.setattr(postgres, "ANALYZE_AFTER", 300)
    connector = PostgresConnector(postgres_dsn(), schema)
    await connector.open()
    try:

        def analyzed() -> int:
            with psycopg.connect(postgres_dsn(), autocommit=True) as connection:
                row = connection.execute(
                    "SELECT analyze_count FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
                    (schema,),
                ).fetchone()
                return int(row[0]) if row else 0

        await connector.enqueue_many([(Request(id=f"a{i}", type="t"), 1) for i in range(200)])
        assert analyzed() == 0  # below the threshold: left to autovacuum
        await connector.enqueue_many([(Request(id=f"b{i}", type="t"), 1) for i in range(200)])
        await eventually(lambda: analyzed() == 1, within=10)
    finally:
        await connector.close()


async def test_the_feed_never_passes_over_a_response_committed_late(
    two: tuple[PostgresConnector, PostgresConnector],
) -> None:
    # Instance 1's transaction stores a Response and stays open while instance 2 stores and
    # commits more. Read in id or sequence order, a reader would yield instance 2's and then,
    # resuming after them, never see instance 1's. The feed holds back what follows the open
    # transaction, and yields it all in one order once it commits.
    first, second = two
    start = (await second.feed("", JobFilter(), 0)).token
    await first.enqueue(Request(id="a", type="t"))
    with psycopg.connect(postgres_dsn()) as slow:
        slow.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(first.schema)))
        slow.execute(
            "INSERT INTO responses (position, sequence, create_time, state, is_final, data) "
            "SELECT position, 2, now(), %s, false, '{}' FROM jobs WHERE id = 'a'",
            (int(S.PENDING),),
        )
        await second.enqueue(Request(id="b", type="t"))
        page = await second.feed(start, JobFilter(), 10)
        assert [(i.response.request_id, i.response.sequence) for i in page.items] == [("a", 1)]
        assert page.pending  # b is stored, behind the open transaction
        held = page.token
        assert (await first.feed(held, JobFilter(), 10)).items == []
        slow.commit()
    page = await first.feed(held, JobFilter(), 10)
    assert [(i.response.request_id, i.response.sequence) for i in page.items] == [("a", 2), ("b", 1)]
    assert not page.pending


async def test_a_feed_follows_what_another_instance_writes(two: tuple[PostgresConnector, PostgresConnector]) -> None:
    first, second = two
    got: list[FeedItem | str] = []

    async def follow() -> None:
        async for event in second.watch_jobs(JobFilter()):
            got.append(event)

    task = asyncio.create_task(follow())
    try:
        await eventually(lambda: len(got) == 1)
        for index in range(3):
            await first.enqueue(Request(id=f"r{index}", type="t"))
        await eventually(lambda: len(got) == 4)
        assert [e.response.request_id for e in got[1:] if isinstance(e, FeedItem)] == ["r0", "r1", "r2"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_feed_keeps_each_jobs_responses_in_stored_order_when_writers_race(schema: str) -> None:
    # Instance 1's transaction takes its id, then instance 2 requeues J (its lease ran out) and
    # commits, then instance 1 cancels J in that older transaction. By transaction id alone the
    # cancel (sequence 4) would come before the requeue (sequence 3) it follows.
    clock = FakeClock()
    first = PostgresConnector(postgres_dsn(), schema, writers=1, clock=clock)
    second = PostgresConnector(postgres_dsn(), schema, writers=1, clock=clock)
    await first.open()
    await second.open()
    try:
        await _race_a_requeue_and_a_cancel(first, second, clock)
    finally:
        await first.close()
        await second.close()


async def _race_a_requeue_and_a_cancel(first: PostgresConnector, second: PostgresConnector, clock: FakeClock) -> None:
    start = (await first.feed("", JobFilter(), 0)).token
    await first.enqueue(Request(id="J", type="t"), max_attempts=2)
    await first.claim("w", limit=1, lease=5)
    clock.advance(10)  # the worker hung: its lease ran out
    began, go_on = asyncio.Event(), asyncio.Event()

    async def earlier_write(session: Any) -> Done[None]:  # a write ahead of the cancel in one group commit
        await session.connection.execute("SELECT pg_current_xact_id()")
        began.set()
        await go_on.wait()
        return Done(None)

    writing = asyncio.create_task(first._write(earlier_write))
    cancelling = asyncio.create_task(first.cancel("J"))
    await began.wait()
    assert await second.recover_expired() == 1  # J's sequence 3 (CREATED), committed first
    go_on.set()
    await writing
    assert (await cancelling).state is S.CANCELLED  # sequence 4, in the older transaction
    fed = [(i.response.sequence, i.response.state) for i in (await second.feed(start, JobFilter(), 100)).items]
    assert fed == [(1, S.CREATED), (2, S.PENDING), (3, S.CREATED), (4, S.CANCELLED)]


async def test_a_transaction_open_in_another_database_does_not_hold_the_feed_back(
    two: tuple[PostgresConnector, PostgresConnector],
) -> None:
    first, _ = two
    start = (await first.feed("", JobFilter(), 0)).token
    other_database = psycopg.conninfo.make_conninfo(postgres_dsn(), dbname="postgres")
    with psycopg.connect(other_database) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")  # an id, held until the end of this block
        await first.enqueue(Request(id="a", type="t"))
        page = await first.feed(start, JobFilter(), 10)
        assert [i.response.request_id for i in page.items] == ["a"]
        assert not page.pending
