"""Plain-function jobs for the process-pool handler tests (imported by the worker processes too)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from google.protobuf import wrappers_pb2

from ajs_grpc.core.model import Request
from ajs_grpc.jobs import NO_RETRY, RetryPolicy, job


@job("proc_steps", handler="process", retry=NO_RETRY)
def proc_steps(request: Request, ctx: object) -> Mapping[str, str]:
    """Reports three progress steps from a worker process; returns its pid."""
    for i in range(1, 4):
        ctx.progress(i / 3, f"step {i}")  # type: ignore[attr-defined]
    return {"pid": str(os.getpid()), "attempt": str(ctx.attempt)}  # type: ignore[attr-defined]


@job("proc_sleep", handler="process", retry=RetryPolicy(max_attempts=2, initial_backoff=0.01))
def proc_sleep(request: Request, ctx: object) -> Mapping[str, str]:
    """Sleeps data 'sleep' seconds on its first attempt (waking when cancelled), briefly after."""
    seconds = float(request.data.get("sleep", "30")) if ctx.attempt == 1 else 0.01  # type: ignore[attr-defined]
    ctx.progress(0.0, "sleeping")  # type: ignore[attr-defined]
    ctx.sleep(seconds)  # type: ignore[attr-defined]
    return {"attempt": str(ctx.attempt)}  # type: ignore[attr-defined]


@job("proc_deaf", handler="process", retry=NO_RETRY)
def proc_deaf(request: Request, ctx: object) -> None:
    """Ignores cancellation: only terminating its process stops it."""
    ctx.progress(0.0, "not listening")  # type: ignore[attr-defined]
    time.sleep(60)


@job("proc_fail", handler="process", retry=NO_RETRY)
def proc_fail(request: Request, ctx: object) -> None:
    """Raises in the worker; the server sees the very exception."""
    raise LookupError("nothing here")


@job(
    "proc_typed",
    handler="process",
    retry=NO_RETRY,
    input_type=wrappers_pb2.StringValue,
    output_type=wrappers_pb2.StringValue,
)
def proc_typed(request: Request, ctx: object) -> wrappers_pb2.StringValue:
    """Reverses its StringValue input in a worker process."""
    value = ctx.input  # type: ignore[attr-defined]
    assert isinstance(value, wrappers_pb2.StringValue)
    return wrappers_pb2.StringValue(value=value.value[::-1])


ALL = [proc_steps, proc_sleep, proc_deaf, proc_fail, proc_typed]
