"""The example jobs: ``echo``, ``countdown`` and ``fail``."""

from __future__ import annotations

from collections.abc import Mapping

from ajs_grpc import Request
from ajs_grpc.jobs import NO_RETRY, JobContext, PermanentError, RetryPolicy, job


@job("echo")
async def echo(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Returns the request's data unchanged."""
    return request.data


def _number(request: Request, key: str, default: float, *, minimum: float, maximum: float) -> float:
    text = request.data.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise PermanentError(f"data {key!r} must be a number, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise PermanentError(f"data {key!r} must be between {minimum:g} and {maximum:g}, got {text!r}")
    return value


# A long job: it survives several server restarts (each interrupted run is an attempt).
@job("countdown", retry=RetryPolicy(max_attempts=10))
async def countdown(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Counts down data 'steps' (default 5) every 'interval' seconds (default 0.5), one progress Response per step."""
    steps = int(_number(request, "steps", 5, minimum=0, maximum=100_000))
    interval = _number(request, "interval", 0.5, minimum=0, maximum=3600)
    for step in range(1, steps + 1):
        await ctx.sleep(interval)  # raises JobCancelled when the job is cancelled
        await ctx.progress(step / steps, f"{steps - step} to go", {"remaining": str(steps - step)})
    return {"steps": str(steps)}


@job("fail", retry=NO_RETRY)
async def fail(request: Request, ctx: JobContext) -> None:
    """Always fails, with data 'message' (default "failed as asked") as the error."""
    raise RuntimeError(request.data.get("message", "failed as asked"))
