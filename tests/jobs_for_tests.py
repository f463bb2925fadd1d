"""Job plugins the tests run: each exercises one behaviour of the dispatcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.handlers.reject import RejectRequestHandler
from ajs_grpc.jobs import JobContext, JobPlugin, Result, SyncJobContext, job
from ajs_grpc.model import Request

started: dict[str, float] = {}
"""Request id -> time.monotonic() when the job began (for start-latency checks)."""


@job("noop")
async def noop(request: Request, ctx: JobContext) -> None:
    """Does nothing."""
    started[request.id] = time.monotonic()


@job("echo")
async def echo(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Returns its data."""
    return request.data


@job("steps")
async def steps(request: Request, ctx: JobContext) -> Result:
    """Reports data 'n' progress steps, sleeping data 'sleep' seconds before each."""
    n = int(request.data.get("n", "3"))
    pause = float(request.data.get("sleep", "0"))
    for i in range(1, n + 1):
        await ctx.sleep(pause)
        await ctx.progress(i / n, f"step {i}", {"i": str(i)})
    return Result(data={"steps": str(n), "attempt": str(ctx.attempt)})


@job("block")
async def block(request: Request, ctx: JobContext) -> None:
    """Waits until cancelled, then stops (honours cancellation)."""
    await ctx.wait_cancelled()
    ctx.raise_if_cancelled()


@job("stubborn")
async def stubborn(request: Request, ctx: JobContext) -> None:
    """Ignores the cancel signal; stops only when its task is cancelled."""
    await asyncio.sleep(3600)


mortal_again = asyncio.Event()
"""Set by a test to let ``immortal`` jobs end at their next cancellation."""


@job("immortal")
async def immortal(request: Request, ctx: JobContext) -> None:
    """Swallows task cancellation (until ``mortal_again`` is set): must be abandoned."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if mortal_again.is_set():
                raise


@job("boom")
async def boom(request: Request, ctx: JobContext) -> None:
    """Raises with data 'message'."""
    raise ValueError(request.data.get("message", "boom"))


@job("bad_return")
async def bad_return(request: Request, ctx: JobContext) -> object:
    """Returns something a job may not return."""
    return {"n": 1}


thread_names: dict[str, str] = {}
release_sync = threading.Event()


@job("sync_steps")
def sync_steps(request: Request, ctx: SyncJobContext) -> Mapping[str, str]:
    """A plain function: reports progress from its worker thread."""
    thread_names[request.id] = threading.current_thread().name
    for i in range(1, 4):
        ctx.progress(i / 3, f"sync step {i}")
    return {"thread": threading.current_thread().name}


@job("sync_block")
def sync_block(request: Request, ctx: SyncJobContext) -> None:
    """A plain function that polls for cancellation."""
    while not ctx.wait_cancelled(0.01):
        pass
    ctx.raise_if_cancelled()


ALL = [noop, echo, steps, block, stubborn, immortal, boom, bad_return, sync_steps, sync_block]


def chain(plugins: list[JobPlugin] | None = None) -> HandlerChain:
    """One internal handler running ``plugins`` (all test jobs by default), then reject."""
    handler = InternalAsyncRequestHandler()
    for plugin in ALL if plugins is None else plugins:
        handler.register(plugin)
    return HandlerChain([handler], RejectRequestHandler())
