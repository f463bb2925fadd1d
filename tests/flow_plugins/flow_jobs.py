"""Job types with flow-control policies, loaded by `ajs serve --jobs-dir` in tests/acceptance/test_flow_control.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ajs_grpc.core.model import Request
from ajs_grpc.jobs import Concurrency, JobContext, RateLimit, RetryPolicy, Unique, job


async def _work(request: Request) -> Mapping[str, str]:
    await asyncio.sleep(float(request.data.get("seconds", "0.02")))
    return {"done": "yes"}


@job("per-tenant", concurrency=Concurrency(key="tenant", limit=2))
async def per_tenant(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """At most two jobs of a tenant at once."""
    return await _work(request)


@job("api-call", rate_limit=RateLimit(key="endpoint", rate=20, per="1s", burst=20))
async def api_call(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Twenty starts a second per endpoint."""
    return await _work(request)


@job(
    "ledger",
    ordered_by="account",
    retry=RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.2, jitter=0),
)
async def ledger(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """One at a time per account, in submit order; fails its first attempt when asked to."""
    await asyncio.sleep(float(request.data.get("seconds", "0.02")))
    if request.data.get("fail_once") == "yes" and ctx.attempt == 1:
        raise RuntimeError("failing the first attempt, as asked")
    return {"done": "yes"}


@job("report", unique=Unique(key="report"))
async def report(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """One report per key while one is queued or running."""
    return await _work(request)


@job("plain")
async def plain(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """No policy (the pause test's jobs)."""
    return await _work(request)
