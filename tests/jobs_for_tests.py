"""Job plugins the tests run: each exercises one behaviour of the dispatcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

from google.protobuf import wrappers_pb2

from ajs_grpc.core.model import Request
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.jobs import (
    NO_RETRY,
    JobContext,
    JobPlugin,
    PermanentError,
    Result,
    Retry,
    RetryPolicy,
    SyncJobContext,
    job,
)

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


@job("boom", retry=NO_RETRY)
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


@job("bad_output")
async def bad_output(request: Request, ctx: JobContext) -> Result:
    """Returns an output that is no protobuf message."""
    return Result(output="not a message")  # type: ignore[arg-type]


@job("self_cancel", retry=NO_RETRY)
async def self_cancel(request: Request, ctx: JobContext) -> None:
    """Cancels its own task, as a job awaiting a cancelled shared future would end."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


deaf_release = threading.Event()
"""Set by a test to let ``sync_deaf`` jobs return."""


@job("sync_deaf", retry=NO_RETRY)
def sync_deaf(request: Request, ctx: SyncJobContext) -> None:
    """A plain function that never looks at cancellation."""
    deaf_release.wait(30)


@job("shout", input_type=wrappers_pb2.StringValue, output_type=wrappers_pb2.StringValue, retry=NO_RETRY)
async def shout(request: Request, ctx: JobContext) -> wrappers_pb2.StringValue:
    """A typed job: upper-cases its StringValue input."""
    assert isinstance(ctx.input, wrappers_pb2.StringValue)
    return wrappers_pb2.StringValue(value=ctx.input.value.upper())


@job("wrong_output", output_type=wrappers_pb2.StringValue, retry=NO_RETRY)
async def wrong_output(request: Request, ctx: JobContext) -> wrappers_pb2.Int64Value:
    """Returns another message than the one it declares."""
    return wrappers_pb2.Int64Value(value=1)


@job("chatty", retry=NO_RETRY)
async def chatty(request: Request, ctx: JobContext) -> None:
    """Reports data 'n' progress Responses of data 'size' bytes each, as fast as it can."""
    blob = "x" * int(request.data.get("size", "10000"))
    n = int(request.data.get("n", "100"))
    for i in range(1, n + 1):
        await ctx.progress(i / n, "", {"blob": blob})


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.05, multiplier=2, jitter=0)


@job("flaky", retry=FAST_RETRY)
async def flaky(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Fails until attempt data 'succeed_on' (default 2)."""
    if ctx.attempt < int(request.data.get("succeed_on", "2")):
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return {"attempt": str(ctx.attempt)}


@job("permanent", retry=FAST_RETRY)
async def permanent(request: Request, ctx: JobContext) -> None:
    """Fails with an error marked permanent: never retried."""
    raise PermanentError("bad input, retrying will not help")


@job("ask_retry", retry=FAST_RETRY)
async def ask_retry(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Asks for a retry (delay data 'delay') until attempt 2."""
    if ctx.attempt < 2:
        raise Retry("not yet", delay=float(request.data.get("delay", "0.1")))
    return {"attempt": str(ctx.attempt)}


@job("only_value_errors", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, retry_on=(ValueError,)))
async def only_value_errors(request: Request, ctx: JobContext) -> None:
    """Retries ValueError only; raises data 'error' (ValueError or KeyError)."""
    raise {"ValueError": ValueError, "KeyError": KeyError}[request.data["error"]]("as asked")


@job("slow", timeout=0.1, retry=FAST_RETRY)
async def slow(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Sleeps data 'sleep' seconds (default 10) on attempts before data 'fast_on', past its 0.1s timeout."""
    if ctx.attempt < int(request.data.get("fast_on", "99")):
        await ctx.sleep(float(request.data.get("sleep", "10")))
    return {"attempt": str(ctx.attempt)}


@job("slow_stubborn", timeout=0.1, retry=NO_RETRY)
async def slow_stubborn(request: Request, ctx: JobContext) -> None:
    """Past its timeout and deaf to the cancel signal: stopped by task cancellation."""
    await asyncio.sleep(3600)


@job("big_result", retry=NO_RETRY)
async def big_result(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Returns data of data 'bytes' bytes."""
    return {"blob": "z" * int(request.data["bytes"])}


ALL = [
    big_result,
    noop,
    echo,
    steps,
    block,
    stubborn,
    immortal,
    boom,
    bad_return,
    sync_steps,
    sync_block,
    flaky,
    permanent,
    ask_retry,
    only_value_errors,
    slow,
    slow_stubborn,
    bad_output,
    self_cancel,
    sync_deaf,
    shout,
    wrong_output,
    chatty,
]


def chain(plugins: list[JobPlugin] | None = None) -> HandlerChain:
    """One internal handler running ``plugins`` (all test jobs by default), then reject."""
    handler = InternalAsyncRequestHandler()
    for plugin in ALL if plugins is None else plugins:
        handler.register(plugin)
    return HandlerChain([handler], RejectRequestHandler())
