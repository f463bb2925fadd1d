"""The PostgreSQL connector: one queue shared by many ``ajs serve`` instances.

Built on psycopg 3 (async) and psycopg_pool, the way River, Oban and
Procrastinate use PostgreSQL:

* Claims take due rows with ``FOR UPDATE SKIP LOCKED``, ordered by priority then
  submit order, so instances never wait for each other or share a job.
* Leases expire on the database's clock (``clock_timestamp()``): clock skew
  between instances cannot make a lease look expired early. Any instance
  recovers expired leases. (A connector given a ``clock``, as tests do, uses
  that one instead.)
* Writes are group-committed: a few writer tasks each take every operation
  queued meanwhile and run them in one transaction.
* ``LISTEN/NOTIFY`` on one channel per schema wakes idle dispatchers on
  enqueue and tells every instance "request R has a new Response" and "cancel
  R", so a ``WatchJob`` on one instance streams Responses written by a job on
  another. The listening connection is re-established when it drops, and every
  open watch then re-reads the table from its last sequence: nothing is missed.
* The schema is versioned and migrated forward (``ajs db upgrade``, or at
  start-up), under an advisory lock so instances starting together do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from typing_extensions import override

from ajs_grpc.connectors._pgnames import channel_name, check_schema_name
from ajs_grpc.connectors._sql import Decoding, Dialect, Done, Operation, Outcome, SqlConnector, deliver, load_queries
from ajs_grpc.connectors.base import Clock
from ajs_grpc.core.errors import AjsError, ConnectorError, Internal, ResourceExhausted, Unavailable

try:
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb
    from psycopg_pool import AsyncConnectionPool
except ImportError as missing:  # pragma: no cover - the extra is not installed
    raise ImportError("the postgres connector needs: pip install 'ajs-grpc[postgres]'") from missing


__all__ = ["SCHEMA_VERSION", "PostgresConnector"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256
# Seconds a write or read waits for a pooled connection.
POOL_TIMEOUT = 5.0
# What the server's connections are called in pg_stat_activity.
APPLICATION_NAME = "ajs-grpc"
# New jobs after which the queue's statistics are refreshed (ANALYZE), so claims keep their index.
ANALYZE_AFTER = 10_000
# Seconds the first connection may take (a database that does not answer at all).
PROBE_TIMEOUT = 10
# Seconds between attempts to re-establish the listening connection.
RELISTEN_BACKOFF = 0.5
# Any constant: instances take this advisory lock while they migrate.
MIGRATION_LOCK = 0x414A5331

QUERIES = load_queries("postgres")
SCHEMA_VERSION = sum(name.startswith("migration_") for name in QUERIES)


def _jsonb(record: dict[str, Any] | None) -> Jsonb | None:
    return None if record is None else Jsonb(record)


# psycopg reads timestamptz and jsonb back as datetimes and dicts already.
DIALECT = Dialect(
    name="postgres",
    queries=QUERIES,
    time=lambda at: at,
    mapping=lambda mapping: Jsonb(dict(mapping)),
    record=_jsonb,
    array=list,
    decoding=Decoding(time=lambda value: value, mapping=lambda value: value, record=lambda value: value),
    own_clock=True,
    feed_key=str,
)


def translate(error: psycopg.Error, doing: str) -> AjsError:
    """The project error for a failed PostgreSQL call (the one place driver errors are mapped)."""
    message = f"{doing}: {str(error).strip() or type(error).__name__}"
    if isinstance(error, psycopg.errors.DiskFull | psycopg.errors.OutOfMemory):
        return ResourceExhausted(message, reason="STORAGE_FULL")
    if isinstance(error, psycopg.OperationalError | psycopg.errors.AdminShutdown | psycopg.errors.SerializationFailure):
        return Unavailable(message, reason="STORAGE_UNAVAILABLE")
    return ConnectorError(message, reason="STORAGE_ERROR")


class _Session:
    """Runs named queries on a pooled connection."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection

    async def _run(self, name: str, params: Mapping[str, Any]) -> psycopg.AsyncCursor[Any]:
        cursor = None
        for statement in QUERIES[name]:
            cursor = await self.connection.execute(statement, params)
        assert cursor is not None
        return cursor

    async def fetch(self, name: str, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        rows: list[Sequence[Any]] = await (await self._run(name, params)).fetchall()
        return rows

    async def execute(self, name: str, params: Mapping[str, Any]) -> int:
        return (await self._run(name, params)).rowcount

    async def execute_many(self, name: str, params: Sequence[Mapping[str, Any]]) -> None:
        # psycopg sends them in pipeline mode: one round trip, not one per item.
        async with self.connection.cursor() as cursor:
            for statement in QUERIES[name]:
                await cursor.executemany(statement, params)


_Write = Operation[Done[Any]]


class PostgresConnector(SqlConnector):
    """The shared queue in PostgreSQL.

    Args:
        dsn: a libpq connection string or URL.
        schema: the schema holding the tables (several queues can share a database).
        migrate: migrate the schema forward at open; if False, a database not at
            this version is refused (run ``ajs db upgrade``).
        pool_size: connections at most.
        writers: concurrent write transactions (each group-commits its batch).
        clock: what leases and due times are compared with; None for the database's
            clock (``clock_timestamp()``), which every instance shares.
    """

    name = "postgres"
    dialect = DIALECT

    def __init__(
        self,
        dsn: str,
        schema: str = "ajs",
        *,
        migrate: bool = True,
        pool_size: int = 10,
        writers: int = 4,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock=clock)
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.migrate = migrate
        self.pool_size = max(pool_size, writers + 2)
        self.writers = writers
        self.channel = channel_name(schema)
        self._pool: AsyncConnectionPool[Any] | None = None
        self._queue: asyncio.Queue[tuple[_Write, asyncio.Future[Any]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up (tests wait on it)."""
        self.found_version: int | None = None
        """The schema's version before :meth:`upgrade` ran (0: there was none)."""
        self._unanalyzed = 0
        self._analyzed_rows = 0
        self._analyzing: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def _configure(self, connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.execute(
            sql.SQL("SET search_path TO {}; SET TIME ZONE 'UTC'").format(sql.Identifier(self.schema))
        )

    @override
    async def open(self) -> None:
        await self._probe()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn,
            min_size=2,
            max_size=self.pool_size,
            open=False,
            configure=self._configure,
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            reconnect_timeout=30,
            # Waiting for a connection must stay well below a lease: a stalled
            # database must fail renewals early enough for jobs to be stopped.
            timeout=POOL_TIMEOUT,
            # A connection the server dropped (a restart) is found and replaced before use.
            check=AsyncConnectionPool.check_connection,
        )
        try:
            await pool.open(wait=True, timeout=10)
        except Exception as error:
            await pool.close()
            raise ConnectorError(f"cannot connect to PostgreSQL: {error}", reason="STORAGE_UNREACHABLE") from error
        self._pool = pool
        try:
            await (self.upgrade() if self.migrate else self._check_version())
        except BaseException:
            await self.close()
            raise
        self._tasks = [asyncio.create_task(self._write_loop(), name="ajs-pg-writer") for _ in range(self.writers)]
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="ajs-pg-listener"))

    async def _probe(self) -> None:
        """One connection first: a database that answers with a refusal is reported at once, with its cause.

        (The pool would retry for its whole timeout, warning at each attempt, and then
        hide the cause.)
        """
        try:
            connection = await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=PROBE_TIMEOUT, application_name=APPLICATION_NAME
            )
        except psycopg.Error as error:
            cause = " ".join(str(error).split()) or type(error).__name__
            raise ConnectorError(f"cannot connect to PostgreSQL: {cause}", reason="STORAGE_UNREACHABLE") from None
        await connection.close()

    async def schema_version(self) -> int:
        """The schema's version in the database (0 if it has none)."""
        assert self._pool is not None
        async with self._pool.connection() as connection:
            return await self._version(connection)

    async def _version(self, connection: psycopg.AsyncConnection[Any]) -> int:
        exists = await (
            await connection.execute(
                "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename = 'schema_version'",
                (self.schema,),
            )
        ).fetchone()
        if exists is None:
            return 0
        row = await (
            await connection.execute(
                sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(self.schema))
            )
        ).fetchone()
        return int(row[0] or 0) if row else 0

    async def _check_version(self) -> None:
        version = await self.schema_version()
        if version != SCHEMA_VERSION:
            hint = "run 'ajs db upgrade'" if version < SCHEMA_VERSION else "upgrade ajs-grpc"
            raise ConnectorError(
                f"schema {self.schema!r} is at version {version}, this ajs-grpc needs {SCHEMA_VERSION}: {hint}",
                reason="SCHEMA_MISMATCH",
            )

    async def upgrade(self) -> int:
        """Migrates the schema forward; returns the version it is at.

        Raises:
            ConnectorError: the database has a newer schema than this ajs-grpc knows.
        """
        assert self._pool is not None
        async with self._pool.connection() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            version = await self._version(connection)
            self.found_version = version
            if version > SCHEMA_VERSION:
                raise ConnectorError(
                    f"schema {self.schema!r} is at version {version}, newer than this ajs-grpc knows "
                    f"({SCHEMA_VERSION}); upgrade ajs-grpc",
                    reason="SCHEMA_TOO_NEW",
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in QUERIES[f"migration_{number}"]:
                    await connection.execute(statement)
                await connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                log.info("migrated schema %s to version %d", self.schema, number)
        return max(version, SCHEMA_VERSION)

    # -- statistics --------------------------------------------------------------------

    @override
    def _inserted(self, count: int) -> None:
        # A queue filled faster than autovacuum analyzes it (once a minute at best) leaves the
        # planner thinking it holds a few jobs: it then sorts the whole queue for every claim
        # (72 ms a claim at 20,000 queued, 0.09 ms after ANALYZE). Analyze after every
        # ANALYZE_AFTER new jobs, or a quarter of those counted at the last analyze.
        self._unanalyzed += count
        if self._unanalyzed < max(ANALYZE_AFTER, self._analyzed_rows // 4):
            return
        if self._analyzing is None or self._analyzing.done():
            self._analyzed_rows += self._unanalyzed
            self._unanalyzed = 0
            self._analyzing = asyncio.get_running_loop().create_task(self._analyze(), name="ajs-pg-analyze")

    async def _analyze(self) -> None:
        if self._pool is None:
            return
        try:
            async with self._pool.connection() as connection:
                await connection.execute("ANALYZE jobs")
        except psycopg.Error as error:  # statistics are an optimisation: the next batch tries again
            log.warning("could not analyze the queue: %s", error)

    @override
    async def close(self) -> None:
        if self._analyzing is not None:
            self._analyzing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._analyzing
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- events ----------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """Keeps a LISTEN connection; after each reconnect, watchers catch up from the table."""
        first = True
        while True:
            try:
                connect = psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    application_name=APPLICATION_NAME,
                    # A silently dropped connection is noticed, not waited on forever.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with await connect as connection:
                    await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.listening.set()
                    if not first:
                        log.info("listening again on %s; watchers catch up", self.channel)
                    # Whatever was queued or written before we listened is looked at now.
                    self._catch_up()
                    first = False
                    async for notice in connection.notifies():
                        self._on_event(notice.payload)
            except psycopg.Error as error:
                log.warning("lost the LISTEN connection (%s); reconnecting", error)
            self.listening.clear()
            await asyncio.sleep(RELISTEN_BACKOFF)

    def _catch_up(self) -> None:
        self._notify_feeds()
        for request_id in list(self._watchers):
            self._notify_response(request_id)
        self._notify_work()

    def _on_event(self, payload: str) -> None:
        kind, _, request_id = payload.partition(":")
        if kind == "r":
            self._notify_response(request_id)  # a request nobody here watches: nothing happens
        elif kind == "w":
            self._notify_work()
        elif kind == "c":
            self._notify_cancel(request_id)
        elif kind == "f":
            self._notify_feeds()

    # -- writing -----------------------------------------------------------------------

    @override
    async def _write(self, operation: Operation[Done[T]]) -> T:
        if self._pool is None:
            raise Unavailable("the PostgreSQL connector is not open", reason="STORAGE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((operation, future))
        return await future

    @override
    async def _write_alone(self, operation: Operation[Done[T]]) -> T:
        # A write that waits for a lock other instances hold (the gate's, unique keys) holds
        # nothing else meanwhile (no other write's row or key locks): no deadlock across instances.
        if self._pool is None:
            raise Unavailable("the PostgreSQL connector is not open", reason="STORAGE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            outcomes = await self._commit([(operation, future)])
        except psycopg.Error as error:
            outcomes = [(future, None, translate(error, "could not write to the queue"))]
        deliver(self, outcomes)
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._commit(batch)
            except psycopg.Error as error:
                # The transaction as a whole failed (the connection died, perhaps during
                # COMMIT): whether the batch was stored is unknown, so nothing is run again
                # here. Callers hear UNAVAILABLE and find out: a submit is resent (it is
                # idempotent), a final Response is retried until it is found stored, and an
                # unanswered claim is recovered when its lease expires.
                lost = translate(error, "could not write to the queue")
                outcomes = [(future, None, lost) for _, future in batch]
            except Exception as error:  # keep the loop alive: every caller gets an answer
                log.exception("a PostgreSQL write failed")
                outcomes = [
                    (future, None, Unavailable(f"could not write to the queue: {error}")) for _, future in batch
                ]
            # This instance hears at once; the NOTIFY echo arrives later and is harmless.
            deliver(self, outcomes)

    async def _commit(self, batch: list[tuple[_Write, asyncio.Future[Any]]]) -> list[Outcome]:
        assert self._pool is not None
        outcomes: list[Outcome] = []
        async with self._pool.connection() as connection, connection.transaction():
            events: list[str] = []
            session = _Session(connection)
            for write, future in batch:
                done, error = await self._apply(connection, session, write)
                outcomes.append((future, done, error))
                if done is not None:
                    events += done.events()
            if events:
                await connection.execute(
                    "SELECT pg_notify(%s, e) FROM unnest(%s::text[]) AS e", (self.channel, list(dict.fromkeys(events)))
                )
        return outcomes

    @staticmethod
    async def _apply(
        connection: psycopg.AsyncConnection[Any], session: _Session, write: _Write
    ) -> tuple[Done[Any] | None, AjsError | None]:
        """Runs one write of a batch in a savepoint of its own, so that it fails alone.

        A race with another instance (a unique id taken meanwhile, a deadlock) is run
        again: the next statement sees what the other committed. A broken connection
        is not the write's fault: it fails the whole batch (raised).
        """
        for attempt in range(3):
            try:
                async with connection.transaction():  # a SAVEPOINT inside the batch's transaction
                    return await write(session), None
            except AjsError as error:  # the write's own refusal; its savepoint was rolled back
                return None, error
            except (
                psycopg.errors.IntegrityError,
                psycopg.errors.TransactionRollback,
                psycopg.errors.DeadlockDetected,  # (an OperationalError in psycopg, not a TransactionRollback)
            ) as error:
                if attempt == 2:
                    return None, translate(error, "could not write to the queue")
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except psycopg.Error as error:  # this write's data or statement: only its caller hears
                log.warning("a write to the queue failed alone: %s", error)
                return None, translate(error, "could not write to the queue")
            except Exception as error:  # a bug in one write must not fail the others
                log.exception("a write to the queue failed")
                return None, Internal(f"could not write to the queue: {error}", reason="INTERNAL_ERROR")
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------------

    @override
    async def _read(self, operation: Operation[T]) -> T:
        if self._pool is None:
            raise Unavailable("the PostgreSQL connector is not open", reason="STORAGE_CLOSED")
        for attempt in range(2):
            try:
                async with self._pool.connection() as connection:
                    return await operation(_Session(connection))
            except psycopg.OperationalError as error:
                if attempt:  # the second connection failed too: the database is away
                    raise translate(error, "could not read the queue") from error
            except psycopg.Error as error:
                raise translate(error, "could not read the queue") from error
        raise AssertionError("unreachable")
