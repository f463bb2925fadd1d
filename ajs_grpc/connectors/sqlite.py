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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import override

from ajs_grpc.connectors._sql import (
    Decoding,
    Dialect,
    Done,
    Operation,
    Outcome,
    SqlConnector,
    deliver,
    load_queries,
    run_to_completion,
)
from ajs_grpc.connectors.base import Clock
from ajs_grpc.core.errors import (
    AjsError,
    ConnectorError,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from ajs_grpc.core.model import now

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

QUERIES = load_queries("sqlite")
SCHEMA_VERSION = sum(name.startswith("migration_") for name in QUERIES)

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


DIALECT = Dialect(
    name="sqlite",
    queries=QUERIES,
    time=_us,
    mapping=lambda mapping: json.dumps(dict(mapping)),
    record=_json,
    array=lambda items: json.dumps(list(items)),
    decoding=Decoding(time=_time, mapping=json.loads, record=_record),
)


def translate(error: sqlite3.Error, doing: str) -> AjsError:
    """The project error for a failed SQLite call (the one place driver errors are mapped)."""
    name = getattr(error, "sqlite_errorname", "")
    message = f"{doing}: {error}"
    if name == "SQLITE_FULL":
        return ResourceExhausted(f"{doing}: the database's disk is full", reason="STORAGE_FULL")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return Unavailable(message, reason="STORAGE_UNAVAILABLE")
    return ConnectorError(message, reason="STORAGE_ERROR")


class _Session:
    """Runs named queries on a connection, synchronously (its operations never really await)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def _run(self, name: str, params: Mapping[str, Any]) -> sqlite3.Cursor:
        cursor = None
        for statement in QUERIES[name]:
            cursor = self.connection.execute(statement, params)
        assert cursor is not None
        return cursor

    async def fetch(self, name: str, params: Mapping[str, Any]) -> list[Sequence[Any]]:
        rows: list[Sequence[Any]] = self._run(name, params).fetchall()
        return rows

    async def execute(self, name: str, params: Mapping[str, Any]) -> int:
        return self._run(name, params).rowcount

    async def execute_many(self, name: str, params: Sequence[Mapping[str, Any]]) -> None:
        for statement in QUERIES[name]:
            self.connection.executemany(statement, params)


# -- threads -------------------------------------------------------------------------


_Write = Operation[Done[Any]]


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
            session = _Session(connection)
            for write, future in batch:
                connection.execute("SAVEPOINT op")
                try:
                    done = run_to_completion(write(session))
                except Exception as error:  # handed to the caller, who raises it
                    connection.execute("ROLLBACK TO op")
                    outcomes.append((future, None, _translated(error)))
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

    async def run(self, read: Operation[T]) -> T:
        def call() -> T:
            try:
                return run_to_completion(read(_Session(self._connection())))
            except sqlite3.Error as error:
                raise translate(error, "could not read the queue") from error
            except OverflowError as error:  # a number SQLite cannot hold (64-bit)
                raise ConnectorError(f"could not read the queue: {error}", reason="STORAGE_ERROR") from error

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        def close_all() -> None:
            for connection in self._connections:
                connection.close()

        self._pool.submit(close_all).result()
        self._pool.shutdown()


# -- the connector ---------------------------------------------------------------------


class SqliteConnector(SqlConnector):
    """The durable embedded queue.

    Args:
        path: the database file; created (with its schema) if missing.
        synchronous: ``FULL`` (default: a commit survives power loss) or
            ``NORMAL`` (survives a killed server; faster).
        clock: what leases and due times are compared with; None for the process's clock.
    """

    name = "sqlite"
    dialect = DIALECT

    def __init__(
        self, path: str | os.PathLike[str] = "ajs.db", synchronous: str = "FULL", *, clock: Clock | None = None
    ) -> None:
        super().__init__(clock=clock)
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
        # Every running job belonged to the previous server (the file lock proves it gone).
        recovered = await self._write(lambda session: self._expire_rows(session, "orphaned_jobs"))
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
                for statement in QUERIES[f"migration_{number}"]:
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

    @override
    async def _write(self, operation: Operation[Done[T]]) -> T:
        if self._writer is None:
            raise Unavailable("the SQLite connector is not open", reason="STORAGE_CLOSED")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.queue.put((operation, future))
        return await future

    @override
    async def _read(self, operation: Operation[T]) -> T:
        if self._reader is None:
            raise Unavailable("the SQLite connector is not open", reason="STORAGE_CLOSED")
        return await self._reader.run(operation)


def _translated(error: Exception) -> Exception:
    """A write's error as its caller gets it: the driver's translated, the project's as it is."""
    if isinstance(error, sqlite3.Error):
        return translate(error, "could not write to the queue")
    if isinstance(error, OverflowError):  # a number SQLite cannot hold (64-bit)
        return ConnectorError(f"could not write to the queue: {error}", reason="STORAGE_ERROR")
    return error
