"""Job types of workflows (issue 14): dependencies and children.

Loaded by ``ajs serve --jobs-dir tests/flow_plugins`` (tests/acceptance/test_children.py and
the end-to-end DAG tests) and imported by unit tests. Ids below are stored ids (a
principal's namespace included, ``~alice/A``, when the server authenticates).

``wf.step``
    Sleeps data ``seconds`` (default 0), then FINISHES with data::

        id      its own request id
        value   data "value" if given, else its own id
        seen    the ids of its dependencies, sorted, comma-separated ("B,C")
        got     each dependency's value as "id=value", sorted, ";"-separated ("B=b;C=c"),
                read from the dependency's typed output (a StringValue), else its data "value"
        states  each dependency's final state as "id=STATE", sorted, comma-separated

    and the typed output ``google.protobuf.StringValue(value=<value>)``. Retries: the default.
``wf.join``
    ``wf.step`` with ``allow_failed_dependencies``: it runs once its dependencies ended,
    whatever their end (``states`` tells them).
``wf.fail``
    Always FAILS (never retried), with data "message" or "wf.fail always fails".
``wf.parent``
    Submits data ``children`` (default 100) children of type ``wf.child`` with the default
    keys, so their ids are ``{its id}/1`` ... ``{its id}/{children}``; each child's data is
    ``{"index": "<i>", "seconds": <data "child_seconds", default "0.05">}``. It sleeps data
    ``pause`` seconds (default 0) after each submit. Unless data ``wait`` is "no" it then
    waits for them (``ctx.wait_for_children``) and FINISHES with data ``children`` (how many
    it found), ``finished`` (how many of those FINISHED) and ``attempt``; with ``wait`` "no"
    it FINISHES at once with ``children``. Up to 5 attempts, 0.1 s apart.
``wf.child``
    Sleeps data ``seconds`` (default 0.05), then FINISHES with data ``index`` (its data's)
    and ``attempt``. Up to 5 attempts, 0.1 s apart.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import wrappers_pb2

from ajs_grpc.core.model import Request, RequestState, Response
from ajs_grpc.jobs import NO_RETRY, JobContext, PermanentError, Result, RetryPolicy, job

QUICK_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.1, jitter=0)


def _value_of(response: Response) -> str:
    output = response.output
    if output is not None and output.Is(wrappers_pb2.StringValue.DESCRIPTOR):
        value = wrappers_pb2.StringValue()
        output.Unpack(value)
        return value.value
    return response.data.get("value", "")


async def _step(request: Request, ctx: JobContext) -> Result:
    await ctx.sleep(float(request.data.get("seconds", "0")))
    value = request.data.get("value", request.id)
    dependencies = sorted(ctx.dependencies.items())
    data = {
        "id": request.id,
        "value": value,
        "seen": ",".join(dependency_id for dependency_id, _ in dependencies),
        "got": ";".join(f"{dependency_id}={_value_of(response)}" for dependency_id, response in dependencies),
        "states": ",".join(f"{dependency_id}={response.state.name}" for dependency_id, response in dependencies),
    }
    return Result(data=data, output=wrappers_pb2.StringValue(value=value))


@job("wf.step")
async def step(request: Request, ctx: JobContext) -> Result:
    """Reports its id and what its dependencies returned."""
    return await _step(request, ctx)


@job("wf.join", allow_failed_dependencies=True)
async def join(request: Request, ctx: JobContext) -> Result:
    """wf.step that runs after its dependencies whatever their end."""
    return await _step(request, ctx)


@job("wf.fail", retry=NO_RETRY)
async def fail(request: Request, ctx: JobContext) -> None:
    """Always fails, never retried."""
    raise PermanentError(request.data.get("message", "wf.fail always fails"))


@job("wf.parent", retry=QUICK_RETRY)
async def parent(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Submits wf.child children, then waits for them unless told not to."""
    count = int(request.data.get("children", "100"))
    pause = float(request.data.get("pause", "0"))
    child_seconds = request.data.get("child_seconds", "0.05")
    for index in range(1, count + 1):
        await ctx.submit("wf.child", data={"index": str(index), "seconds": child_seconds})
        if pause:
            await ctx.sleep(pause)
    if request.data.get("wait", "yes") == "no":
        return {"children": str(count)}
    children = await ctx.wait_for_children()
    finished = sum(child.state is RequestState.FINISHED for child in children)
    return {"children": str(len(children)), "finished": str(finished), "attempt": str(ctx.attempt)}


@job("wf.child", retry=QUICK_RETRY)
async def child(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """A short job: sleeps a moment and reports its index."""
    await ctx.sleep(float(request.data.get("seconds", "0.05")))
    return {"index": request.data.get("index", ""), "attempt": str(ctx.attempt)}
