"""The process-pool handler: runs CPU-bound plain-function jobs in worker processes.

Each worker is a ``spawn``-ed process (never ``fork``: gRPC's threads do not
survive a fork) that runs one job at a time and is reused. The server and a
worker talk over a pipe:

* server -> worker: ``run`` (the job's plugin, the request, the attempt),
  ``cancel`` (naming the request), ``ack`` (a progress Response was stored);
* worker -> server: ``progress`` (blocks the job until acknowledged, so progress
  is stored in order and at the job's pace), then ``result`` or ``error``.

The job's ``ctx.dependencies`` cross the pipe with the request. ``ctx.submit`` and
``ctx.wait_for_children`` are not available in a worker process: they raise
FAILED_PRECONDITION (``NOT_IN_WORKER_PROCESS``); a job that makes children runs on
the internal handler (and may hand CPU-bound work to children run here).

A cancelled or timed-out job first gets its cancel signal (``ctx.cancelled``);
if the dispatcher then cancels the handler's task, the worker is terminated
(SIGTERM, then SIGKILL) and replaced. A worker that dies mid-job fails the job
with :class:`WorkerCrashed`, which the job's retry policy may retry; the server
and the other workers carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
from datetime import datetime
from typing import Any

from google.protobuf import any_pb2
from typing_extensions import override

from ajs_grpc.core.errors import Code, WorkerCrashed
from ajs_grpc.core.jobs import CancelSignal, JobContext, JobPlugin, JobReturn, Result, SyncJobContext, to_update
from ajs_grpc.core.model import ErrorStatus, Progress, Request, RequestState, Response, Update
from ajs_grpc.engine.handlers.base import RequestHandler

__all__ = ["ProcessPoolRequestHandler", "WorkerCrashed"]

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


# -- what crosses the pipe ------------------------------------------------------------


def _plugin_reference(plugin: JobPlugin) -> tuple[str, str, str | None]:
    """How a worker finds the plugin's function: module, qualified name, module file."""
    module = plugin.function.__module__
    file = getattr(sys.modules.get(module), "__file__", None)
    return module, plugin.function.__qualname__, file


def _request_to_wire(request: Request) -> dict[str, Any]:
    payload = request.input
    return {
        "id": request.id,
        "type": request.type,
        "data": dict(request.data),
        "input": (payload.type_url, payload.value) if payload is not None else None,
        "parent_id": request.parent_id,
        "creator": request.creator,
        "create_time": request.create_time,
        "priority": request.priority,
        "run_after": request.run_after,
        "queue": request.queue,
        "depends_on": request.depends_on,
        "expire_time": request.expire_time,
        "max_attempts": request.max_attempts,
        "timeout": request.timeout,
    }


def _request_from_wire(wire: dict[str, Any]) -> Request:
    payload = wire.pop("input")
    created: datetime | None = wire.pop("create_time")
    run_after: datetime | None = wire.pop("run_after")
    expire_time: datetime | None = wire.pop("expire_time")
    return Request(
        input=any_pb2.Any(type_url=payload[0], value=payload[1]) if payload else None,
        create_time=created,
        run_after=run_after,
        expire_time=expire_time,
        **wire,
    )


def _response_to_wire(response: Response) -> tuple[Any, ...]:
    """A Response in plain values (protobuf messages and read-only mappings do not pickle)."""
    output, progress, error = response.output, response.progress, response.error
    return (
        response.request_id,
        response.sequence,
        response.create_time,
        int(response.state),
        response.is_final,
        dict(response.data),
        (output.type_url, output.value) if output is not None else None,
        (progress.fraction, progress.message) if progress is not None else None,
        (int(error.code), error.message, error.reason, dict(error.metadata)) if error is not None else None,
    )


def _response_from_wire(wire: tuple[Any, ...]) -> Response:
    request_id, sequence, created, state, is_final, data, output, progress, error = wire
    return Response(
        request_id,
        sequence,
        created,
        RequestState(state),
        is_final,
        data,
        any_pb2.Any(type_url=output[0], value=output[1]) if output is not None else None,
        Progress(*progress) if progress is not None else None,
        ErrorStatus(Code(error[0]), error[1], error[2], error[3]) if error is not None else None,
    )


# -- the worker process -----------------------------------------------------------------


def _load_function(module_name: str, qualname: str, file: str | None) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if file is None:
            raise
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part)
    return found  # the JobPlugin (what @job left under the function's name) or the function


def _worker_main(connection: multiprocessing.connection.Connection) -> None:
    """The loop of a worker process: run one job after the other."""
    # Ctrl+C reaches the whole process group; the server decides when jobs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send_lock = threading.Lock()
    acks: queue.SimpleQueue[object] = queue.SimpleQueue()
    runs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    # The run in progress: a cancel names its request, so a late one cannot hit the next job.
    current: dict[str, Any] = {"id": None, "cancel": CancelSignal()}

    def send(message: object) -> None:
        with send_lock:
            connection.send(message)

    def deliver(update: Update) -> None:
        """A progress Update to the server; blocks until it was stored."""
        progress = update.progress
        assert progress is not None
        send(("progress", progress.fraction, progress.message, dict(update.data)))
        answer = acks.get()
        if isinstance(answer, BaseException):
            raise answer

    def listen() -> None:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server is gone
            kind = message[0]
            if kind == "cancel" and message[1] == current["id"]:
                current["cancel"].set()
            elif kind == "ack":
                acks.put(message[1] if len(message) > 1 else None)
            elif kind == "run":
                runs.put(message)

    threading.Thread(target=listen, name="ajs-worker-listener", daemon=True).start()
    plugins: dict[tuple[str, str, str | None], Any] = {}
    while True:
        _, reference, wire, attempt, dependencies = runs.get()
        cancel = current["cancel"] = CancelSignal()
        current["id"] = wire["id"]
        try:
            found = plugins.get(reference) or _load_function(*reference)
            plugins[reference] = found
            request = _request_from_wire(wire)
            # Message classes do not pickle: the worker decodes the input with its own copy of the plugin.
            decoded = found.decode_input(request.input) if isinstance(found, JobPlugin) else None
            function = found.function if isinstance(found, JobPlugin) else found
            read = {request_id: _response_from_wire(r) for request_id, r in dependencies.items()}
            ctx = SyncJobContext(request, attempt, cancel, decoded, deliver, dependencies=read)
            update = to_update(function(request, ctx))
            output = update.output
            send(("result", dict(update.data), (output.type_url, output.value) if output is not None else None))
        except BaseException as error:  # reported to the server, which decides the job's end
            try:
                pickled: bytes | None = pickle.dumps(error)
            except Exception:
                pickled = None
            send(("error", pickled, type(error).__name__, str(error)))


# -- the server side ------------------------------------------------------------------------


class _Worker:
    """A worker process as the server sees it."""

    def __init__(self) -> None:
        parent, child = _SPAWN.Pipe()
        self.connection = parent
        self.process = _SPAWN.Process(target=_worker_main, args=(child,), name="ajs-job-worker", daemon=True)
        self.process.start()
        child.close()
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(parent.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _readable(self) -> None:
        try:
            while self.connection.poll():
                self.inbox.put_nowait(self.connection.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self.connection.fileno())
            self.inbox.put_nowait(None)  # the worker died

    def send(self, message: object) -> None:
        with contextlib.suppress(OSError):  # it died: its reader reports so
            self.connection.send(message)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def run(self, ctx: JobContext, plugin: JobPlugin) -> JobReturn:
        dependencies = {request_id: _response_to_wire(r) for request_id, r in ctx.dependencies.items()}
        self.send(("run", _plugin_reference(plugin), _request_to_wire(ctx.request), ctx.attempt, dependencies))
        forward = asyncio.create_task(self._forward_cancel(ctx))
        try:
            while True:
                message = await self.inbox.get()
                if message is None:
                    await asyncio.to_thread(self.process.join, 5)
                    raise WorkerCrashed(f"the worker process died (exit code {self.process.exitcode})")
                assert isinstance(message, tuple)
                kind = message[0]
                if kind == "progress":
                    try:
                        await ctx.progress(message[1], message[2], message[3])
                    except Exception as error:  # e.g. the job ended meanwhile: the job hears it
                        self.send(("ack", error))
                    else:
                        self.send(("ack",))
                elif kind == "result":
                    output = any_pb2.Any(type_url=message[2][0], value=message[2][1]) if message[2] else None
                    return Result(data=message[1], output=output)
                elif kind == "error":
                    raise _unpickle(message[1]) or RuntimeError(f"{message[2]}: {message[3]}")
        finally:
            forward.cancel()

    async def _forward_cancel(self, ctx: JobContext) -> None:
        await ctx.wait_cancelled()
        self.send(("cancel", ctx.request.id))

    async def stop(self, grace: float) -> None:
        """Terminates the process: SIGTERM, then SIGKILL after ``grace`` seconds."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.connection.fileno())
        if self.process.is_alive():
            self.process.terminate()
            await asyncio.to_thread(self.process.join, grace)
            if self.process.is_alive():
                self.process.kill()
                await asyncio.to_thread(self.process.join, grace)
        self.connection.close()


def _unpickle(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        error = pickle.loads(data)
    except Exception:
        return None
    return error if isinstance(error, BaseException) else None


class ProcessPoolRequestHandler(RequestHandler):
    """Runs plain-function jobs in a pool of worker processes.

    Args:
        max_workers: worker processes at most (default: the number of CPUs).
        stop_grace: seconds a worker gets to exit on SIGTERM before SIGKILL.
    """

    name = "process"

    def __init__(self, max_workers: int | None = None, stop_grace: float = 2.0) -> None:
        super().__init__()
        self.max_workers = max_workers or os.cpu_count() or 1
        self.stop_grace = stop_grace
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots: asyncio.Semaphore | None = None

    @override
    def register(self, plugin: JobPlugin) -> None:
        if plugin.is_async:
            raise TypeError(f"the process handler runs plain functions; job {plugin.type!r} is async")
        super().register(plugin)

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the workers running a job now (for operators and tests)."""
        return [worker.pid for worker in self._busy if worker.pid is not None]

    @override
    async def handle(self, ctx: JobContext) -> JobReturn:
        plugin = self._jobs[ctx.request.type]
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_workers)
        async with self._slots:
            worker = self._take()
            self._busy.add(worker)
            clean = False
            try:
                result = await worker.run(ctx, plugin)
                clean = True
                return result
            except WorkerCrashed:
                raise
            except asyncio.CancelledError:
                log.info("stopping the worker process of request %s", ctx.request.id)
                raise
            except Exception:
                clean = True  # the job raised; the worker is fine
                raise
            finally:
                self._busy.discard(worker)
                if clean and worker.alive:
                    self._idle.append(worker)
                else:
                    await asyncio.shield(worker.stop(self.stop_grace))

    def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
        return _Worker()

    @override
    async def close(self) -> None:
        workers = [*self._idle, *self._busy]
        self._idle, self._busy = [], set()
        await asyncio.gather(*(worker.stop(self.stop_grace) for worker in workers))
