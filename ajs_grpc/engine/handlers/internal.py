"""The internal handler: runs jobs inside the server process.

``async def`` jobs run as asyncio tasks on the server's event loop; plain
functions run in a thread pool so they cannot block it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from ajs_grpc.core.jobs import JobContext, JobReturn, SyncJobContext
from ajs_grpc.engine.handlers.base import RequestHandler

__all__ = ["InternalAsyncRequestHandler"]

log = logging.getLogger(__name__)


class InternalAsyncRequestHandler(RequestHandler):
    """Runs async jobs as tasks and plain functions in threads.

    Args:
        max_threads: size of the thread pool for plain-function jobs.
    """

    name = "internal"

    def __init__(self, max_threads: int = 8) -> None:
        super().__init__()
        self._max_threads = max_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._abandoned: dict[concurrent.futures.Future[Any], str] = {}

    @property
    @override
    def abandoned(self) -> int:
        return len(self._abandoned)

    @override
    async def handle(self, ctx: JobContext) -> JobReturn:
        plugin = self._jobs[ctx.request.type]
        if plugin.is_async:
            result: JobReturn = await plugin.function(ctx.request, ctx)
            return result
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._max_threads, thread_name_prefix="ajs-job")
        loop = asyncio.get_running_loop()
        sync_ctx = SyncJobContext.in_thread(ctx, loop)
        work = self._pool.submit(plugin.function, ctx.request, sync_ctx)
        try:
            returned: JobReturn = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            if work.running():
                # A thread cannot be stopped: the job is given up on but its thread runs
                # on (its reports are refused once the final Response is written). It
                # counts against max_jobs until it ends, so cancels cannot pile up threads.
                log.warning(
                    "request %s ignored cancellation; its thread runs on and counts against max_jobs until it ends",
                    ctx.request.id,
                )
                self._abandoned[work] = ctx.request.id
                work.add_done_callback(lambda done: _call_soon(loop, self._thread_ended, done))
                # Retire the pool so the thread it holds does not delay the jobs that come next.
                self._retire_pool()
            raise
        return returned

    def _thread_ended(self, work: concurrent.futures.Future[Any]) -> None:
        request_id = self._abandoned.pop(work, None)
        if request_id is not None:
            log.info("the abandoned thread of request %s ended", request_id)
            self.on_released()

    def _retire_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    @override
    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hands ``callback`` to ``loop`` from any thread; nothing happens once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
