"""The SQLite connector: the durable, embedded default queue of ``ajs serve``.

One file holds the queue (stdlib ``sqlite3``, WAL mode). What it promises:

* An acknowledged write is on disk: every call that changes the queue returns
  only after its transaction committed (``synchronous`` FULL by default; NORMAL
  survives a killed server but may lose the last commits on power loss).
* Writes never block the event loop, and concurrent writes share one
  transaction (group commit): a writer thread takes every operation queued
  while the previous commit ran and commits them together, one fsync for all.
  Each operation runs in its own savepoint, so one that fails does not undo the
  others.
* Reads run on a reader thread with its own connection (WAL readers do not wait
  for the writer).
* One server per database: an OS lock (``flock``) on the database file itself
  is held while the connector is open, whatever path names the file (a
  symlink, another spelling, a hard link), so jobs left PENDING by the
  previous server are known to be orphaned and are recovered at start-up.
* The schema is versioned (table ``schema_version``) and migrated forward when
  the connector opens; a database from a newer version, or a file that is not
  an ajs-grpc database, is refused with a clear error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import override

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

__all__ = ["SCHEMA_VERSION", "SqliteConnector"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# "AJS1": marks the file as an ajs-grpc database (PRAGMA application_id).
APPLICATION_ID = 0x414A5331
# Operations one transaction takes at most.
MAX_BATCH = 512
# The database files (device, inode) this process holds locked. A second connector
# of the same process on one of them is refused before it opens the file: closing
# any descriptor of a file drops the POSIX locks SQLite holds on it in this process.
_HELD: set[tuple[int, int]] = set()

MIGRATIONS: list[str] = [
    # 1: jobs and their Responses.
    """
    CREATE TABLE schema_version (
        version      INTEGER PRIMARY KEY,
        applied_time INTEGER NOT NULL
    );
    CREATE TABLE jobs (
        position         INTEGER PRIMARY KEY AUTOINCREMENT,
        id               TEXT    NOT NULL UNIQUE,
        parent_id        TEXT    NOT NULL,
        type             TEXT    NOT NULL,
        creator          TEXT    NOT NULL,
        create_time      INTEGER NOT NULL,
        data             TEXT    NOT NULL,
        input_type_url   TEXT,
        input_value      BLOB,
        priority         INTEGER NOT NULL,
        run_after        INTEGER,
        max_attempts     INTEGER NOT NULL,
        state            INTEGER NOT NULL,
        attempt          INTEGER NOT NULL,
        cancel_requested INTEGER NOT NULL,
        update_time      INTEGER NOT NULL,
        due_time         INTEGER,
        last_sequence    INTEGER NOT NULL,
        lease_token      TEXT,
        lease_expires    INTEGER,
        worker           TEXT
    );
    CREATE INDEX jobs_ready ON jobs (priority DESC, position) WHERE state = 1;
    CREATE INDEX jobs_due ON jobs (due_time) WHERE state = 1;
    CREATE INDEX jobs_leases ON jobs (lease_expires) WHERE state = 2;
    CREATE INDEX jobs_ended ON jobs (update_time) WHERE state >= 3;
    CREATE INDEX jobs_parent ON jobs (parent_id, position) WHERE parent_id != '';
    CREATE INDEX jobs_state ON jobs (state, position);
    CREATE TABLE responses (
        position          INTEGER NOT NULL,
        sequence          INTEGER NOT NULL,
        create_time       INTEGER NOT NULL,
        state             INTEGER NOT NULL,
        is_final          INTEGER NOT NULL,
        data              TEXT    NOT NULL,
        output_type_url   TEXT,
        output_value      BLOB,
        progress_fraction REAL,
        progress_message  TEXT,
        error             TEXT,
        PRIMARY KEY (position, sequence)
    ) WITHOUT ROWID;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# -- encoding ------------------------------------------------------------------------


def _us(at: datetime | None) -> int | None:
    """Microseconds since the epoch, exactly (times are stored as integers)."""
    if at is None:
        return None
    return (at - _EPOCH) // _MICROSECOND


def _time(us: int | None) -> datetime | None:
    if us is None:
        return None
    return _EPOCH + us * _MICROSECOND


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _record(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_DECODING = Decoding(time=_time, mapping=json.loads, record=_record)


def _job(row: Sequence[Any]) -> Job:
    return job_from_row(row, _DECODING)


def _response(request_id: str, row: Sequence[Any]) -> Response:
    return response_from_row(request_id, row, _DECODING)


def translate(error: sqlite3.Error, doing: str) -> AjsError:
    """The project error for a failed SQLite call (the one place drivers errors are mapped)."""
    name = getattr(error, "sqlite_errorname", "")
    message = f"{doing}: {error}"
    if name == "SQLITE_FULL":
        return ResourceExhausted(f"{doing}: the database's disk is full", reason="STORAGE_FULL")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return Unavailable(message, reason="STORAGE_UNAVAILABLE")
    return ConnectorError(message, reason="STORAGE_ERROR")


# -- threads -------------------------------------------------------------------------


_Write = Callable[[sqlite3.Connection], Done[Any]]


class _Writer(threading.Thread):
    """Runs writes in batches, one transaction and one commit per batch."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], deliver: Callable[[list[Any]], None]) -> None:
        super().__init__(name="ajs-sqlite-writer", daemon=True)
        self._connect = connect
        self._deliver = deliver
        self.queue: queue.SimpleQueue[tuple[_Write, asyncio.Future[Any]] | None] = queue.SimpleQueue()

    def run(self) -> None:
        try:
            connection: sqlite3.Connection | None = self._connect()
        except sqlite3.Error as error:
            log.error("the SQLite writer cannot connect: %s", error)
            connection, broken = None, translate(error, "could not open the queue for writing")
        try:
            while True:
                first = self.queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self.queue.put(None)  # stop after this batch
                        break
                    batch.append(item)
                if connection is None:
                    self._deliver([(future, None, broken) for _, future in batch])
                    continue
                try:
                    outcomes = self._commit(connection, batch)
                except Exception as error:  # a bug must not kill the writer and hang every caller
                    log.exception("the SQLite writer failed")
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                    outcomes = [
                        (future, None, Internal(f"could not write to the queue: {error}")) for _, future in batch
                    ]
                self._deliver(outcomes)
        finally:
            if connection is not None:
                connection.close()

    @staticmethod
    def _commit(connection: sqlite3.Connection, batch: list[tuple[_Write, asyncio.Future[Any]]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for write, future in batch:
                connection.execute("SAVEPOINT op")
                try:
                    done = write(connection)
                except Exception as error:  # handed to the caller, who raises it
                    connection.execute("ROLLBACK TO op")
                    outcomes.append((future, None, error))
                else:
                    outcomes.append((future, done, None))
                connection.execute("RELEASE op")
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            # Nothing of this batch is stored: every caller hears so.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            failed = translate(error, "could not commit")
            return [(future, None, failed) for _, future in batch]
        return outcomes


class _Reader:
    """One thread with its own connection for reads."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._local = threading.local()
        self._connect = connect
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ajs-sqlite-reader")
        self._connections: list[sqlite3.Connection] = []

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            self._connections.append(connection)
        return connection

    async def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return read(self._connection())
            except sqlite3.Error as error:
                raise translate(error, "could not read the queue") from error

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        def close_all() -> None:
            for connection in self._connections:
                connection.close()

        self._pool.submit(close_all).result()
        self._pool.shutdown()


# -- the connector ---------------------------------------------------------------------


class SqliteConnector(Connector):
    """The durable embedded queue.

    Args:
        path: the database file; created (with its schema) if missing.
        synchronous: ``FULL`` (default: a commit survives power loss) or
            ``NORMAL`` (survives a killed server; faster).
    """

    name = "sqlite"

    def __init__(self, path: str | os.PathLike[str] = "ajs.db", synchronous: str = "FULL") -> None:
        super().__init__()
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self._lock_file: int | None = None
        self._held: tuple[int, int] | None = None
        self._writer: _Writer | None = None
        self._reader: _Reader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        return connection

    @override
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._prepare)
        self._writer = _Writer(self._connect, self._deliver_threadsafe)
        self._writer.start()
        self._reader = _Reader(self._connect)
        recovered = await self._write(self._recover_orphans)
        if recovered:
            log.info("recovered %d job(s) left running by the previous server", recovered)

    def _prepare(self) -> None:
        """Locks the database file, checks it is ours, migrates the schema."""
        where = str(self.path)
        in_use = ConnectorError(
            f"{where} is in use by another ajs server (one server per SQLite database)", reason="STORAGE_IN_USE"
        )
        with contextlib.suppress(OSError):
            if self._file_key(os.stat(self.path)) in _HELD:
                raise in_use
        try:
            # The lock is on the file, not on its name: every path to it meets the same lock.
            self._lock_file = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConnectorError(f"cannot open {where}: {error.strerror}", reason="STORAGE_UNUSABLE") from error
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_lock()
            raise in_use from None
        self._held = self._file_key(os.fstat(self._lock_file))
        _HELD.add(self._held)
        try:
            connection = self._connect()
            try:
                self._migrate(connection)
            finally:
                connection.close()
        except sqlite3.Error as error:
            self._release_lock()
            raise ConnectorError(f"cannot use {where} as the queue: {error}", reason="STORAGE_UNUSABLE") from error
        except ConnectorError:
            self._release_lock()
            raise

    @staticmethod
    def _file_key(stat: os.stat_result) -> tuple[int, int]:
        return stat.st_dev, stat.st_ino

    def _migrate(self, connection: sqlite3.Connection) -> None:
        where = str(self.path)
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id != APPLICATION_ID and (application_id != 0 or tables):
            raise ConnectorError(f"{where} is an SQLite database of another application", reason="FOREIGN_DATABASE")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ConnectorError(f"{where} cannot be put in WAL mode (journal mode {mode})", reason="STORAGE_UNUSABLE")
        version = 0
        if tables:
            version = connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            raise ConnectorError(
                f"{where} has schema version {version}, newer than this ajs-grpc knows ({SCHEMA_VERSION}); "
                "upgrade ajs-grpc",
                reason="SCHEMA_TOO_NEW",
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[number - 1]):
                    connection.execute(statement)
                connection.execute("INSERT INTO schema_version VALUES (?, ?)", (number, _us(now())))
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            log.info("migrated %s to schema version %d", where, number)

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # closing releases the flock
            self._lock_file = None
        if self._held is not None:
            _HELD.discard(self._held)
            self._held = None

    @override
    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            writer.queue.put(None)
            await asyncio.to_thread(writer.join)
        if reader is not None:
            await asyncio.to_thread(reader.close)
        self._release_lock()

    # -- plumbing ----------------------------------------------------------------

    def _deliver_threadsafe(self, outcomes: list[Any]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(self._deliver, outcomes)

    def _deliver(self, outcomes: list[Outcome]) -> None:
        deliver(self, outcomes)

    async def _write(self, write: Callable[[sqlite3.Connection], Done[T]]) -> T:
        if self._writer is None:
            raise Unavailable("the SQLite connector is not open", reason="STORAGE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.queue.put((write, future))
        try:
            return await future
        except sqlite3.Error as error:
            raise translate(error, "could not write to the queue") from error

    async def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise Unavailable("the SQLite connector is not open", reason="STORAGE_CLOSED")
        return await self._reader.run(read)

    # -- row helpers (called on the writer or reader thread) ----------------------

    @staticmethod
    def _find(connection: sqlite3.Connection, request_id: str) -> tuple[int, Job, str | None] | None:
        """(position, job, lease token) of ``request_id``, or None."""
        row = connection.execute(f"{SELECT_JOBS} WHERE j.id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        return row[0], _job(row), row[-1]

    @staticmethod
    def _save(
        connection: sqlite3.Connection,
        position: int,
        job: Job,
        response: Response,
        lease: tuple[str, datetime, str] | None = None,
    ) -> None:
        """Stores a job's new state and its new Response; ``lease`` is (token, expiry, worker)."""
        token, expires, worker = lease if lease is not None else (None, None, None)
        keep_lease = job.state is RequestState.PENDING and lease is None
        connection.execute(
            "UPDATE jobs SET state = ?, attempt = ?, cancel_requested = ?, update_time = ?, due_time = ?, "
            "last_sequence = ?"
            + ("" if keep_lease else ", lease_token = ?, lease_expires = ?, worker = ?")
            + " WHERE position = ?",
            (
                int(job.state),
                job.attempt,
                int(job.cancel_requested),
                _us(job.update_time),
                _us(job.due_time),
                response.sequence,
                *(() if keep_lease else (token, _us(expires), worker)),
                position,
            ),
        )
        SqliteConnector._insert_response(connection, position, response)

    @staticmethod
    def _insert_response(connection: sqlite3.Connection, position: int, response: Response) -> None:
        output = response.output
        connection.execute(
            "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                position,
                response.sequence,
                _us(response.create_time),
                int(response.state),
                int(response.is_final),
                json.dumps(dict(response.data)),
                output.type_url if output is not None else None,
                output.value if output is not None else None,
                response.progress.fraction if response.progress else None,
                response.progress.message if response.progress else None,
                _json(error_fields(response.error)),
            ),
        )

    def _recover_orphans(self, connection: sqlite3.Connection) -> Done[int]:
        """At open: every PENDING job belonged to the previous server (the lock says so)."""
        return self._expire(connection, "state = 2")

    def _expire(self, connection: sqlite3.Connection, condition: str, *args: Any) -> Done[int]:
        rows = connection.execute(f"{SELECT_JOBS} WHERE j.{condition}", args).fetchall()
        done: Done[int] = Done(len(rows))
        at = now()
        for row in rows:
            job, response = _job(row).expire(at)
            self._save(connection, row[0], job, response)
            done.responses.append(job.request.id)
            done.work = done.work or job.state is RequestState.CREATED
        return done

    # -- the queue -------------------------------------------------------------------

    @override
    async def enqueue(self, request: Request, max_attempts: int = 1) -> tuple[Job, bool]:
        def write(connection: sqlite3.Connection) -> Done[tuple[Job, bool]]:
            found = self._find(connection, request.id)
            if found is not None:
                existing = found[1]
                if existing.request.same_content(request):
                    return Done((existing, False))
                raise AlreadyExists(
                    f"request {request.id!r} exists with different content",
                    reason="REQUEST_ID_TAKEN",
                    metadata={"request_id": request.id},
                )
            if (
                request.parent_id
                and not connection.execute("SELECT 1 FROM jobs WHERE id = ?", (request.parent_id,)).fetchone()
            ):
                raise NotFound(
                    f"parent request {request.parent_id!r} does not exist",
                    reason="PARENT_NOT_FOUND",
                    metadata={"parent_id": request.parent_id},
                )
            job, first = Job.create(request, max_attempts)
            stored = job.request
            cursor = connection.execute(
                "INSERT INTO jobs (id, parent_id, type, creator, create_time, data, input_type_url, input_value, "
                "priority, run_after, max_attempts, state, attempt, cancel_requested, update_time, due_time, "
                "last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, 1)",
                (
                    stored.id,
                    stored.parent_id,
                    stored.type,
                    stored.creator,
                    _us(stored.create_time),
                    json.dumps(dict(stored.data)),
                    stored.input.type_url if stored.input is not None else None,
                    stored.input.value if stored.input is not None else None,
                    stored.priority,
                    _us(stored.run_after),
                    max_attempts,
                    int(job.state),
                    _us(job.update_time),
                    _us(job.due_time),
                ),
            )
            assert cursor.lastrowid is not None
            self._insert_response(connection, cursor.lastrowid, first)
            return Done((job, True), work=True)

        return await self._write(write)

    @override
    async def claim(
        self, worker: str, *, limit: int = 1, lease: float = 30.0, types: Collection[str] | None = None
    ) -> list[Claim]:
        type_list = list(types) if types is not None else None

        def write(connection: sqlite3.Connection) -> Done[list[Claim]]:
            at = now()
            condition = "j.state = 1 AND j.due_time <= ?"
            args: list[Any] = [_us(at)]
            if type_list is not None:
                condition += f" AND j.type IN ({', '.join('?' * len(type_list))})"
                args += type_list
            rows = connection.execute(
                f"{SELECT_JOBS} WHERE {condition} ORDER BY j.priority DESC, j.position LIMIT ?", (*args, limit)
            ).fetchall()
            done: Done[list[Claim]] = Done([])
            expires = at + timedelta(seconds=lease)
            for row in rows:
                job, response = _job(row).advance(Update(RequestState.PENDING, data={"worker": worker}), at)
                token = uuid.uuid4().hex
                self._save(connection, row[0], job, response, (token, expires, worker))
                done.result.append(Claim(job, token))
                done.responses.append(job.request.id)
            return done

        return await self._write(write)

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        def write(connection: sqlite3.Connection) -> Done[Response]:
            found = self._find(connection, request_id)
            if found is None:
                raise self._not_found(request_id)
            position, job, held = found
            self._check_lease(request_id, held, lease_token)
            job, response = job.advance(update)
            self._save(connection, position, job, response)
            return Done(response, [request_id], work=job.state is RequestState.CREATED)

        return await self._write(write)

    @override
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        items = dict(leases)

        def write(connection: sqlite3.Connection) -> Done[Renewal]:
            until = _us(now() + timedelta(seconds=lease))
            lost: set[str] = set()
            cancelled: set[str] = set()
            for request_id, token in items.items():
                row = connection.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_token = ? AND state = 2 "
                    "RETURNING cancel_requested",
                    (until, request_id, token),
                ).fetchone()
                if row is None:
                    lost.add(request_id)
                elif row[0]:
                    cancelled.add(request_id)
            return Done(Renewal(frozenset(lost), frozenset(cancelled)))

        return await self._write(write)

    @override
    async def recover_expired(self) -> int:
        return await self._write(
            lambda connection: self._expire(connection, "state = 2 AND j.lease_expires <= ?", _us(now()))
        )

    @override
    async def next_due_time(self) -> datetime | None:
        def read(connection: sqlite3.Connection) -> datetime | None:
            return _time(connection.execute("SELECT min(due_time) FROM jobs WHERE state = 1").fetchone()[0])

        return await self._read(read)

    @override
    async def cancel(self, request_id: str) -> Job:
        def write(connection: sqlite3.Connection) -> Done[Job]:
            found = self._find(connection, request_id)
            if found is None:
                raise self._not_found(request_id)
            found[1].cancel()  # raises if it already ended, before anything changes
            rows = connection.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT c.id FROM jobs c JOIN tree t ON c.parent_id = t.id) "
                f"{SELECT_JOBS} WHERE j.id IN tree AND j.state IN (1, 2)",
                (request_id,),
            ).fetchall()
            done: Done[Job] = Done(found[1])
            for row in rows:
                job, response = _job(row).cancel()
                if response is not None:
                    self._save(connection, row[0], job, response)
                    done.responses.append(job.request.id)
                else:
                    connection.execute("UPDATE jobs SET cancel_requested = 1 WHERE position = ?", (row[0],))
                    done.cancels.append(job.request.id)
                if job.request.id == request_id:
                    done.result = job
            return done

        return await self._write(write)

    @override
    async def prune(self, before: datetime) -> int:
        def write(connection: sqlite3.Connection) -> Done[int]:
            # Leaves first, again and again: a job with a child left keeps its id taken.
            total = 0
            while True:
                positions = [
                    row[0]
                    for row in connection.execute(
                        "SELECT position FROM jobs j WHERE state >= 3 AND update_time < ? "
                        "AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = j.id)",
                        (_us(before),),
                    )
                ]
                if not positions:
                    return Done(total)
                marks = ", ".join("?" * len(positions))
                connection.execute(f"DELETE FROM responses WHERE position IN ({marks})", positions)
                connection.execute(f"DELETE FROM jobs WHERE position IN ({marks})", positions)
                total += len(positions)

        return await self._write(write)

    # -- reading ---------------------------------------------------------------------

    @override
    async def get(self, request_id: str) -> Job:
        def read(connection: sqlite3.Connection) -> Job:
            row = connection.execute(f"{SELECT_JOBS} WHERE j.id = ?", (request_id,)).fetchone()
            if row is None:
                raise self._not_found(request_id)
            return _job(row)

        return await self._read(read)

    @override
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        condition = f"j.position {'<' if newest_first else '>'} ?"
        args: list[Any] = [after or MAX_POSITION if newest_first else after]
        if job_filter.states:
            condition += f" AND j.state IN ({', '.join('?' * len(job_filter.states))})"
            args += [int(state) for state in job_filter.states]
        if job_filter.types:
            condition += f" AND j.type IN ({', '.join('?' * len(job_filter.types))})"
            args += list(job_filter.types)
        if job_filter.parent_id:
            condition += " AND j.parent_id = ?"
            args.append(job_filter.parent_id)
        if job_filter.creator:
            condition += " AND j.creator = ?"
            args.append(job_filter.creator)

        order = "DESC" if newest_first else "ASC"

        def read(connection: sqlite3.Connection) -> Page:
            rows = connection.execute(
                f"{SELECT_JOBS} WHERE {condition} ORDER BY j.position {order} LIMIT ?", (*args, page_size + 1)
            ).fetchall()
            more = len(rows) > page_size
            rows = rows[:page_size]
            return Page([_job(row) for row in rows], rows[-1][0] if more else None, [row[0] for row in rows])

        return await self._read(read)

    @override
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        def read(connection: sqlite3.Connection) -> int:
            count: int = connection.execute(
                "SELECT count(*) FROM jobs WHERE state = ? AND (? = '' OR creator = ?)", (int(state), creator, creator)
            ).fetchone()[0]
            return count

        return await self._read(read)

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        def read(connection: sqlite3.Connection) -> list[Response]:
            found = connection.execute("SELECT position FROM jobs WHERE id = ?", (request_id,)).fetchone()
            if found is None:
                raise self._not_found(request_id)
            rows = connection.execute(
                f"SELECT {RESPONSE_COLUMNS} FROM responses r WHERE r.position = ? AND r.sequence > ? "
                "ORDER BY r.sequence LIMIT ?",
                (found[0], after_sequence, limit),
            ).fetchall()
            return [_response(request_id, row) for row in rows]

        return await self._read(read)


def _statements(script: str) -> list[str]:
    """The statements of a migration script (they hold no semicolons of their own)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
