"""Job types for README's "Schedules and workflows" examples (``ajs serve --jobs-dir examples/workflows``)."""

from __future__ import annotations

from collections.abc import Mapping

from ajs_grpc.jobs import JobContext, job


@job("fetch")
async def fetch(request, ctx: JobContext) -> Mapping[str, str]:
    """Pretends to fetch a part: returns its name as ``part``."""
    await ctx.sleep(0.2)
    return {"part": request.data.get("part", request.id)}


@job("merge")
async def merge(request, ctx: JobContext) -> Mapping[str, str]:
    """Joins the ``part`` outputs of its dependencies (``depends_on``), in order."""
    parts = [ctx.dependencies[i].data.get("part", "") for i in request.depends_on if i in ctx.dependencies]
    return {"merged": "+".join(parts)}


@job("fan-out")
async def fan_out(request, ctx: JobContext) -> Mapping[str, str]:
    """Submits ``count`` fetch children (the same ids on a retry), then finishes after them."""
    count = int(request.data.get("count", "10"))
    for n in range(count):
        await ctx.submit("fetch", key=f"part-{n}", data={"part": f"p{n}"})
    children = await ctx.wait_for_children()
    return {"children": str(len(children))}
