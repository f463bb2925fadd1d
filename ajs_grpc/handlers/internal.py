"""The internal handler: runs jobs inside the server process.

``async def`` jobs run as asyncio tasks on the server's event loop; plain
functions run in a thread pool so they cannot block it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from typing_extensions import override

from ajs_grpc.handlers.base import RequestHandler
from ajs_grpc.jobs import JobContext, JobReturn, SyncJobContext

__all__ = ["InternalAsyncRequestHandler"]


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
        try:
            returned: JobReturn = await loop.run_in_executor(self._pool, plugin.function, ctx.request, sync_ctx)
        except asyncio.CancelledError:
            # The job is abandoned but its thread runs on (its reports are refused
            # once the final Response is written). Retire the pool so the thread it
            # holds does not delay the jobs that come next.
            self._retire_pool()
            raise
        return returned

    def _retire_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    @override
    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
