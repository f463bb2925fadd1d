"""The PostgreSQL connector: one queue shared by many ``ajs serve`` instances.

Built on psycopg 3 (async) and psycopg_pool, the way River, Oban and
Procrastinate use PostgreSQL:

* Claims take due rows with ``FOR UPDATE SKIP LOCKED``, ordered by priority then
  submit order, so instances never wait for each other or share a job.
* Leases expire on the database's clock (``clock_timestamp()``): clock skew
  between instances cannot make a lease look expired early. Any instance
  recovers expired leases.
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
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from typing_extensions import override

from ajs_grpc.connectors._pgnames import channel_name, check_schema_name
from ajs_grpc.connectors._sql import (
    MAX_POSITION,
    RESPONSE_COLUMNS,
    SELECT_JOBS,
    Decoding,
    Done,
    Outcome,
    deliver,
    error_fields,
    job_from_row,
    response_from_row,
)
from ajs_grpc.connectors.base import Claim, Connector, JobFilter, Page, Renewal
from ajs_grpc.errors import (
    AjsError,
    AlreadyExists,
    ConnectorError,
    Internal,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ajs_grpc.model import Job, Request, RequestState, Response, Update, now

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
# Seconds the first connection may take (a database that does not answer at all).
PROBE_TIMEOUT = 10
# Seconds between attempts to re-establish the listening connection.
RELISTEN_BACKOFF = 0.5
# Any constant: instances take this advisory lock while they migrate.
MIGRATION_LOCK = 0x414A5331

MIGRATIONS: list[str] = [
    # 1: jobs and their Responses.
    """
    CREATE TABLE schema_version (
        version      integer PRIMARY KEY,
        applied_time timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE jobs (
        position         bigserial PRIMARY KEY,
        id               text        NOT NULL UNIQUE,
        parent_id        text        NOT NULL,
        type             text        NOT NULL,
        creator          text        NOT NULL,
        create_time      timestamptz NOT NULL,
        data             jsonb       NOT NULL,
        input_type_url   text,
        input_value      bytea,
        priority         integer     NOT NULL,
        run_after        timestamptz,
        max_attempts     integer     NOT NULL,
        state            smallint    NOT NULL,
        attempt          integer     NOT NULL,
        cancel_requested boolean     NOT NULL,
        update_time      timestamptz NOT NULL,
        due_time         timestamptz,
        last_sequence    integer     NOT NULL,
        lease_token      text,
        lease_expires    timestamptz,
        worker           text
    );
    CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = 1;
    CREATE INDEX jobs_due ON jobs (due_time) WHERE state = 1;
    CREATE INDEX jobs_leases ON jobs (lease_expires) WHERE state = 2;
    CREATE INDEX jobs_ended ON jobs (update_time) WHERE state >= 3;
    CREATE INDEX jobs_parent ON jobs (parent_id, position) WHERE parent_id <> '';
    CREATE INDEX jobs_state ON jobs (state, position);
    CREATE TABLE responses (
        position          bigint      NOT NULL REFERENCES jobs (position) ON DELETE CASCADE,
        sequence          integer     NOT NULL,
        create_time       timestamptz NOT NULL,
        state             smallint    NOT NULL,
        is_final          boolean     NOT NULL,
        data              jsonb       NOT NULL,
        output_type_url   text,
        output_value      bytea,
        progress_fraction double precision,
        progress_message  text,
        error             jsonb,
        PRIMARY KEY (position, sequence)
    )
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _jsonb(record: dict[str, Any] | None) -> Jsonb | None:
    return None if record is None else Jsonb(record)


_RESPONSE_VALUES = "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s"


def _response_values(response: Response) -> tuple[Any, ...]:
    """A Response's columns after ``position``, in table order."""
    output = response.output
    return (
        response.sequence,
        response.create_time,
        int(response.state),
        response.is_final,
        Jsonb(dict(response.data)),
        output.type_url if output is not None else None,
        output.value if output is not None else None,
        response.progress.fraction if response.progress else None,
        response.progress.message if response.progress else None,
        _jsonb(error_fields(response.error)),
    )


# psycopg reads timestamptz and jsonb back as datetimes and dicts already.
_DECODING = Decoding(time=lambda value: value, mapping=lambda value: value, record=lambda value: value)


def _job(row: Sequence[Any]) -> Job:
    return job_from_row(row, _DECODING)


def _response(request_id: str, row: Sequence[Any]) -> Response:
    return response_from_row(request_id, row, _DECODING)


def translate(error: psycopg.Error, doing: str) -> AjsError:
    """The project error for a failed PostgreSQL call (the one place driver errors are mapped)."""
    message = f"{doing}: {str(error).strip() or type(error).__name__}"
    if isinstance(error, psycopg.errors.DiskFull | psycopg.errors.OutOfMemory):
        return ResourceExhausted(message, reason="STORAGE_FULL")
    if isinstance(error, psycopg.OperationalError | psycopg.errors.AdminShutdown | psycopg.errors.SerializationFailure):
        return Unavailable(message, reason="STORAGE_UNAVAILABLE")
    return ConnectorError(message, reason="STORAGE_ERROR")


_Write = Callable[[psycopg.AsyncConnection[Any]], Awaitable[Done[Any]]]


class PostgresConnector(Connector):
    """The shared queue in PostgreSQL.

    Args:
        dsn: a libpq connection string or URL.
        schema: the schema holding the tables (several queues can share a database).
        migrate: migrate the schema forward at open; if False, a database not at
            this version is refused (run ``ajs db upgrade``).
        pool_size: connections at most.
        writers: concurrent write transactions (each group-commits its batch).
    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        schema: str = "ajs",
        *,
        migrate: bool = True,
        pool_size: int = 10,
        writers: int = 4,
    ) -> None:
        super().__init__()
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
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        await connection.execute(statement)
                await connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                log.info("migrated schema %s to version %d", self.schema, number)
        return max(version, SCHEMA_VERSION)

    @override
    async def close(self) -> None:
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

    # -- writing -----------------------------------------------------------------------

    async def _write(self, write: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Done[T]]]) -> T:
        if self._pool is None:
            raise Unavailable("the PostgreSQL connector is not open", reason="STORAGE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, future))
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
            for write, future in batch:
                done, error = await self._apply(connection, write)
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
        connection: psycopg.AsyncConnection[Any], write: _Write
    ) -> tuple[Done[Any] | None, AjsError | None]:
        """Runs one write of a batch in a savepoint of its own, so that it fails alone.

        A race with another instance (a unique id taken meanwhile, a deadlock) is run
        again: the next statement sees what the other committed. A broken connection
        is not the write's fault: it fails the whole batch (raised).
        """
        for attempt in range(3):
            try:
                async with connection.transaction():  # a SAVEPOINT inside the batch's transaction
                    return await write(connection), None
            except AjsError as error:  # the write's own refusal; its savepoint was rolled back
                return None, error
            except (psycopg.errors.IntegrityError, psycopg.errors.TransactionRollback) as error:
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

    @staticmethod
    async def _find(connection: psycopg.AsyncConnection[Any], request_id: str, lock: bool = True) -> Any:
        """The row of :data:`SELECT_JOBS` for ``request_id`` (None if none), locked unless ``lock`` is False."""
        if not lock:
            return await (await connection.execute(f"{SELECT_JOBS} WHERE j.id = %s", (request_id,))).fetchone()
        locked = await (
            await connection.execute("SELECT position FROM jobs WHERE id = %s FOR UPDATE", (request_id,))
        ).fetchone()
        if locked is None:
            return None
        return await PostgresConnector._read_locked(connection, [locked[0]], one=True)

    @staticmethod
    async def _read_locked(connection: psycopg.AsyncConnection[Any], positions: list[int], *, one: bool = False) -> Any:
        """The rows of jobs this transaction has locked, read after the lock.

        Locking and reading are two statements on purpose: a ``FOR UPDATE`` that waits
        for another transaction re-checks only the locked table's row against its
        conditions (EvalPlanQual), with the *old* joined Response, so a join with the
        job's last Response fails once that transaction committed a new one, and the job
        looked missing (a cancel racing a claim answered NOT_FOUND). A new statement
        sees what the other transaction committed.
        """
        cursor = await connection.execute(f"{SELECT_JOBS} WHERE j.position = ANY(%s) ORDER BY j.position", (positions,))
        return await (cursor.fetchone() if one else cursor.fetchall())

    @staticmethod
    async def _save(
        connection: psycopg.AsyncConnection[Any],
        position: int,
        job: Job,
        response: Response,
        lease: tuple[str, float, str] | None = None,
    ) -> None:
        """Stores a job's new state and Response in one statement; ``lease`` is (token, seconds, worker)."""
        if lease is not None:
            token, seconds, worker = lease
            lease_sql = ", lease_token = %s, lease_expires = clock_timestamp() + %s * interval '1 second', worker = %s"
            lease_args: tuple[Any, ...] = (token, seconds, worker)
        elif job.state is RequestState.PENDING:
            lease_sql, lease_args = "", ()
        else:
            lease_sql, lease_args = ", lease_token = NULL, lease_expires = NULL, worker = NULL", ()
        await connection.execute(
            "WITH saved AS (UPDATE jobs SET state = %s, attempt = %s, cancel_requested = %s, update_time = %s, "
            f"due_time = %s, last_sequence = %s{lease_sql} WHERE position = %s RETURNING position) "
            f"INSERT INTO responses SELECT saved.position, {_RESPONSE_VALUES} FROM saved",
            (
                int(job.state),
                job.attempt,
                job.cancel_requested,
                job.update_time,
                job.due_time,
                response.sequence,
                *lease_args,
                position,
                *_response_values(response),
            ),
        )

    # -- the queue -------------------------------------------------------------------------

    @override
    async def enqueue(self, request: Request, max_attempts: int = 1) -> tuple[Job, bool]:
        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[tuple[Job, bool]]:
            found = await self._find(connection, request.id, lock=False)
            if found is not None:
                existing = _job(found)
                if existing.request.same_content(request):
                    return Done((existing, False))
                raise AlreadyExists(
                    f"request {request.id!r} exists with different content",
                    reason="REQUEST_ID_TAKEN",
                    metadata={"request_id": request.id},
                )
            if (
                request.parent_id
                and not await (
                    await connection.execute("SELECT 1 FROM jobs WHERE id = %s", (request.parent_id,))
                ).fetchone()
            ):
                raise NotFound(
                    f"parent request {request.parent_id!r} does not exist",
                    reason="PARENT_NOT_FOUND",
                    metadata={"parent_id": request.parent_id},
                )
            job, first = Job.create(request, max_attempts)
            stored = job.request
            await connection.execute(
                "WITH added AS (INSERT INTO jobs (id, parent_id, type, creator, create_time, data, input_type_url, "
                "input_value, priority, run_after, max_attempts, state, attempt, cancel_requested, update_time, "
                "due_time, last_sequence) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, false, %s, %s, 1) "
                f"RETURNING position) INSERT INTO responses SELECT added.position, {_RESPONSE_VALUES} FROM added",
                (
                    stored.id,
                    stored.parent_id,
                    stored.type,
                    stored.creator,
                    stored.create_time,
                    Jsonb(dict(stored.data)),
                    stored.input.type_url if stored.input is not None else None,
                    stored.input.value if stored.input is not None else None,
                    stored.priority,
                    stored.run_after,
                    max_attempts,
                    int(job.state),
                    job.update_time,
                    job.due_time,
                    *_response_values(first),
                ),
            )
            return Done((job, True), work=True)

        return await self._write(write)

    @override
    async def claim(
        self, worker: str, *, limit: int = 1, lease: float = 30.0, types: Collection[str] | None = None
    ) -> list[Claim]:
        type_list = list(types) if types is not None else None

        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[list[Claim]]:
            condition = "j.state = 1 AND j.due_time <= clock_timestamp()"
            args: list[Any] = []
            if type_list is not None:
                condition += " AND j.type = ANY(%s)"
                args.append(type_list)
            rows = await (
                await connection.execute(
                    f"{SELECT_JOBS} WHERE {condition} ORDER BY j.priority DESC, j.position LIMIT %s "
                    "FOR UPDATE OF j SKIP LOCKED",
                    (*args, limit),
                )
            ).fetchall()
            done: Done[list[Claim]] = Done([])
            at = now()
            for row in rows:
                job, response = _job(row).advance(Update(RequestState.PENDING, data={"worker": worker}), at)
                token = uuid.uuid4().hex
                await self._save(connection, row[0], job, response, (token, lease, worker))
                done.result.append(Claim(job, token))
                done.responses.append(job.request.id)
            return done

        return await self._write(write)

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[Response]:
            found = await self._find(connection, request_id)
            if found is None:
                raise self._not_found(request_id)
            self._check_lease(request_id, found[-1], lease_token)
            job, response = _job(found).advance(update)
            await self._save(connection, found[0], job, response)
            return Done(response, [request_id], work=job.state is RequestState.CREATED)

        return await self._write(write)

    @override
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        ids, tokens = list(leases), [leases[i] for i in leases]

        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[Renewal]:
            rows = await (
                await connection.execute(
                    "UPDATE jobs j SET lease_expires = clock_timestamp() + %s * interval '1 second' "
                    "FROM unnest(%s::text[], %s::text[]) AS held(id, token) "
                    "WHERE j.id = held.id AND j.lease_token = held.token AND j.state = 2 "
                    "RETURNING j.id, j.cancel_requested",
                    (lease, ids, tokens),
                )
            ).fetchall()
            held = {row[0] for row in rows}
            cancelled = frozenset(row[0] for row in rows if row[1])
            return Done(Renewal(frozenset(set(ids) - held), cancelled))

        return await self._write(write)

    @override
    async def recover_expired(self) -> int:
        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[int]:
            rows = await (
                await connection.execute(
                    f"{SELECT_JOBS} WHERE j.state = 2 AND j.lease_expires <= clock_timestamp() "
                    "FOR UPDATE OF j SKIP LOCKED"
                )
            ).fetchall()
            done: Done[int] = Done(len(rows))
            at = now()
            for row in rows:
                job, response = _job(row).expire(at)
                await self._save(connection, row[0], job, response)
                done.responses.append(job.request.id)
                done.work = done.work or job.state is RequestState.CREATED
            return done

        return await self._write(write)

    @override
    async def next_due_time(self) -> datetime | None:
        async def read(connection: psycopg.AsyncConnection[Any]) -> datetime | None:
            # Claims compare due times with the database's clock: say how far away the
            # next one is by that clock, then put it on ours.
            row = await (
                await connection.execute("SELECT min(due_time), clock_timestamp() FROM jobs WHERE state = 1")
            ).fetchone()
            if row is None or row[0] is None:
                return None
            due: datetime = row[0]
            database_now: datetime = row[1]
            try:
                return now() + (due - database_now)
            except OverflowError:  # due near the end of the calendar (9999-12-31): no clock matters there
                return due

        return await self._read(read)

    @override
    async def cancel(self, request_id: str) -> Job:
        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[Job]:
            found = await self._find(connection, request_id)
            if found is None:
                raise self._not_found(request_id)
            _job(found).cancel()  # raises if it already ended, before anything changes
            locked = await (
                await connection.execute(
                    "WITH RECURSIVE tree(id) AS (SELECT %s::text UNION "
                    "SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id) "
                    "SELECT position FROM jobs WHERE id IN (SELECT id FROM tree) AND state IN (1, 2) "
                    "ORDER BY position FOR UPDATE",
                    (request_id,),
                )
            ).fetchall()
            rows = await self._read_locked(connection, [row[0] for row in locked])
            done: Done[Job] = Done(_job(found))
            for row in rows:
                job, response = _job(row).cancel()
                if response is not None:
                    await self._save(connection, row[0], job, response)
                    done.responses.append(job.request.id)
                else:
                    await connection.execute("UPDATE jobs SET cancel_requested = true WHERE position = %s", (row[0],))
                    done.cancels.append(job.request.id)
                if job.request.id == request_id:
                    done.result = job
            return done

        return await self._write(write)

    @override
    async def prune(self, before: datetime) -> int:
        async def write(connection: psycopg.AsyncConnection[Any]) -> Done[int]:
            # Leaves first, again and again: a job with a child left keeps its id taken.
            total = 0
            while True:
                cursor = await connection.execute(
                    "DELETE FROM jobs j WHERE state >= 3 AND update_time < %s "
                    "AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id)",
                    (before,),
                )
                if not cursor.rowcount:
                    return Done(total)
                total += cursor.rowcount

        return await self._write(write)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        if self._pool is None:
            raise Unavailable("the PostgreSQL connector is not open", reason="STORAGE_CLOSED")
        for attempt in range(2):
            try:
                async with self._pool.connection() as connection:
                    return await read(connection)
            except psycopg.OperationalError as error:
                if attempt:  # the second connection failed too: the database is away
                    raise translate(error, "could not read the queue") from error
            except psycopg.Error as error:
                raise translate(error, "could not read the queue") from error
        raise AssertionError("unreachable")

    @override
    async def get(self, request_id: str) -> Job:
        async def read(connection: psycopg.AsyncConnection[Any]) -> Job:
            row = await self._find(connection, request_id, lock=False)
            if row is None:
                raise self._not_found(request_id)
            return _job(row)

        return await self._read(read)

    @override
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        condition = f"j.position {'<' if newest_first else '>'} %s"
        args: list[Any] = [after or MAX_POSITION if newest_first else after]
        if job_filter.states:
            condition += " AND j.state = ANY(%s)"
            args.append([int(state) for state in job_filter.states])
        if job_filter.types:
            condition += " AND j.type = ANY(%s)"
            args.append(list(job_filter.types))
        if job_filter.parent_id:
            condition += " AND j.parent_id = %s"
            args.append(job_filter.parent_id)
        if job_filter.creator:
            condition += " AND j.creator = %s"
            args.append(job_filter.creator)

        order = "DESC" if newest_first else "ASC"

        async def read(connection: psycopg.AsyncConnection[Any]) -> Page:
            rows = await (
                await connection.execute(
                    f"{SELECT_JOBS} WHERE {condition} ORDER BY j.position {order} LIMIT %s", (*args, page_size + 1)
                )
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            return Page([_job(row) for row in rows], rows[-1][0] if more else None, [row[0] for row in rows])

        return await self._read(read)

    @override
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        async def read(connection: psycopg.AsyncConnection[Any]) -> int:
            row = await (
                await connection.execute(
                    "SELECT count(*) FROM jobs WHERE state = %s AND (%s = '' OR creator = %s)",
                    (int(state), creator, creator),
                )
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._read(read)

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        async def read(connection: psycopg.AsyncConnection[Any]) -> list[Response]:
            found = await (
                await connection.execute("SELECT position FROM jobs WHERE id = %s", (request_id,))
            ).fetchone()
            if found is None:
                raise self._not_found(request_id)
            rows = await (
                await connection.execute(
                    f"SELECT {RESPONSE_COLUMNS} FROM responses r WHERE r.position = %s AND r.sequence > %s "
                    "ORDER BY r.sequence LIMIT %s",
                    (found[0], after_sequence, limit),
                )
            ).fetchall()
            return [_response(request_id, row) for row in rows]

        return await self._read(read)
