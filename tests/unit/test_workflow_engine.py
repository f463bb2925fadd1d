"""The engine side of workflows: per-request attempts and timeout, dependencies' outputs, children.

A real Dispatcher over the in-memory connector; the job types are those of
tests/flow_plugins/workflow_jobs.py and a few below.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from ajs_grpc.connectors.base import JobFilter
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import Code, ConfigError, FailedPrecondition, JobCancelled
from ajs_grpc.core.model import ErrorStatus, Job, Progress, Request, RequestState, Response, Update, now
from ajs_grpc.edge.config import load
from ajs_grpc.engine.dispatcher import ChildJobs, Dispatcher, attempt_timeout
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.process import ProcessPoolRequestHandler, _response_from_wire, _response_to_wire
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.engine.plugins import Plugins
from ajs_grpc.jobs import (
    MAX_CHILD_ID_LENGTH,
    NO_RETRY,
    CancelSignal,
    JobContext,
    JobPlugin,
    RetryPolicy,
    SyncJobContext,
    child_id,
    job,
)
from tests.flow_plugins import workflow_jobs
from tests.helpers import eventually_reads

S = RequestState
AGAIN_AT_ONCE = RetryPolicy(max_attempts=2, initial_backoff=0, max_backoff=0, jitter=0)


@job("always-fails", retry=RetryPolicy(max_attempts=5, initial_backoff=0, max_backoff=0, jitter=0))
async def always_fails(request: Request, ctx: JobContext) -> None:
    """Fails every attempt; its type allows five."""
    raise ConnectionError(f"attempt {ctx.attempt} failed")


@job("sleeper", timeout=5.0, retry=NO_RETRY)
async def sleeper(request: Request, ctx: JobContext) -> None:
    """Sleeps data 'seconds' (honouring cancellation); its type allows 5 s."""
    await ctx.sleep(float(request.data.get("seconds", "30")))


@job("short-leash", timeout=0.2, retry=NO_RETRY)
async def short_leash(request: Request, ctx: JobContext) -> None:
    """Sleeps 30 s; its type allows 0.2 s."""
    await ctx.sleep(30)


@job("fan-then-fail", retry=AGAIN_AT_ONCE)
async def fan_then_fail(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Submits three wf.step children (the third after the other two); fails its first attempt after them."""
    first = await ctx.submit("wf.step", data={"value": "one"})
    second = await ctx.submit("wf.step", data={"value": "two"})
    third = await ctx.submit("wf.step", depends_on=(first, second.request.id))
    if ctx.attempt == 1:
        raise ConnectionError("failing after the children, as asked")
    children = await ctx.wait_for_children()
    return {"ids": ",".join(c.request.id for c in (first, second, third)), "ended": str(len(children))}


@job("sync-fan", retry=NO_RETRY)
def sync_fan(request: Request, ctx: SyncJobContext) -> Mapping[str, str]:
    """A plain function (a thread): submits two children with keys and waits for them."""
    ctx.submit("wf.child", key="left", data={"seconds": "0"})
    ctx.submit("wf.child", key="right", data={"seconds": "0"})
    children = ctx.wait_for_children()
    return {"states": ",".join(c.state.name for c in children)}


@job("fan-unknown", retry=RetryPolicy(max_attempts=3, initial_backoff=0, jitter=0))
async def fan_unknown(request: Request, ctx: JobContext) -> None:
    """Submits a child of a type nobody here runs."""
    await ctx.submit("nobody-runs-this")


@job("fan-bad-input", retry=NO_RETRY)
async def fan_bad_input(request: Request, ctx: JobContext) -> None:
    """Submits a child with a typed input its type does not take."""
    await ctx.submit("wf.child", input=wrappers_pb2.StringValue(value="x"))


@job("fan-on-another", retry=NO_RETRY)
async def fan_on_another(request: Request, ctx: JobContext) -> None:
    """Submits a child depending on the job named by data ``other``."""
    await ctx.submit("wf.child", depends_on=[request.data["other"]])


@job("read-deps", retry=NO_RETRY)
async def read_deps(request: Request, ctx: JobContext) -> Mapping[str, str]:
    """Reports which dependencies' Responses it got."""
    return {"got": ",".join(sorted(ctx.dependencies))}


def read_deps_in_process(request: Request, ctx: SyncJobContext) -> Mapping[str, str]:
    """In a worker process: reports its dependencies' values, and what ctx.submit says there."""
    got = ";".join(f"{i}={r.state.name}:{r.data.get('value', '')}" for i, r in sorted(ctx.dependencies.items()))
    try:
        ctx.submit("wf.child")
    except FailedPrecondition as error:
        refused = error.reason
    return {"got": got, "submit": refused}


read_deps_process = JobPlugin("read-deps-process", read_deps_in_process, retry=NO_RETRY, handler="process")

LOCAL = [
    always_fails,
    sleeper,
    short_leash,
    fan_then_fail,
    sync_fan,
    fan_unknown,
    fan_bad_input,
    fan_on_another,
    read_deps,
]
SHARED = [workflow_jobs.step, workflow_jobs.join, workflow_jobs.fail, workflow_jobs.parent, workflow_jobs.child]


def make_chain() -> HandlerChain:
    handler = InternalAsyncRequestHandler()
    for plugin in [*LOCAL, *SHARED]:
        handler.register(plugin)
    return HandlerChain([handler], RejectRequestHandler())


@pytest.fixture
def connector() -> MemoryConnector:
    return MemoryConnector()


@pytest.fixture
def chain() -> HandlerChain:
    return make_chain()


@pytest.fixture
async def dispatcher(connector: MemoryConnector, chain: HandlerChain) -> AsyncIterator[Dispatcher]:
    running = Dispatcher(connector, chain, max_concurrent_jobs=8, cancel_grace=0.5, shutdown_grace=0.5)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def submit(connector: MemoryConnector, chain: HandlerChain, request: Request) -> Job:
    """Enqueues ``request`` as the service does: resolved by the chain."""
    resolved = chain.submit(request)
    job, _ = await connector.enqueue(
        resolved.request,
        resolved.max_attempts,
        resolved.flow,
        allow_failed_dependencies=resolved.allow_failed_dependencies,
    )
    return job


async def submit_all(connector: MemoryConnector, chain: HandlerChain, *requests: Request) -> None:
    """Enqueues ``requests`` in one atomic batch."""
    await connector.enqueue_many([chain.submit(request) for request in requests])


async def history(connector: MemoryConnector, request_id: str) -> list[Response]:
    """Every Response of a request, waiting for its final one."""
    async with asyncio.timeout(20):
        return [r async for r in connector.watch(request_id)]


async def final(connector: MemoryConnector, request_id: str) -> Response:
    return (await history(connector, request_id))[-1]


async def children_of(connector: MemoryConnector, parent_id: str) -> list[Job]:
    page = await connector.list_jobs(JobFilter(parent_id=parent_id), 1000)
    assert page.next_cursor is None
    return page.jobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- per-request attempts ------------------------------------------------------------------


def test_the_chain_caps_a_requests_attempts_by_its_types(chain: HandlerChain) -> None:
    def attempts(request_type: str, asked: int) -> int:
        return chain.submit(Request(id="x", type=request_type, max_attempts=asked)).max_attempts

    assert [attempts("always-fails", asked) for asked in (0, 1, 2, 5, 9)] == [5, 1, 2, 5, 5]
    # A type nobody here runs: what the request asks, or one attempt.
    assert [attempts("elsewhere", asked) for asked in (0, 3)] == [1, 3]


def test_the_chain_carries_the_types_dependency_rule(chain: HandlerChain) -> None:
    assert chain.submit(Request(id="x", type="wf.join")).allow_failed_dependencies is True
    assert chain.submit(Request(id="x", type="wf.step")).allow_failed_dependencies is False
    assert chain.submit(Request(id="x", type="elsewhere")).allow_failed_dependencies is False


def test_a_toml_override_may_allow_failed_dependencies(tmp_path: Path) -> None:
    file = tmp_path / "ajs.toml"
    file.write_text("[jobs.'wf.step']\nallow_failed_dependencies = true\n[jobs.'wf.join']\ntimeout = \"3s\"\n")
    policies = load(file, environ={}).job_policies
    plugins = Plugins({}, {}, {"wf.step": workflow_jobs.step, "wf.join": workflow_jobs.join})
    overridden = plugins.with_policies(policies).jobs
    assert overridden["wf.step"].allow_failed_dependencies is True
    assert (overridden["wf.join"].allow_failed_dependencies, overridden["wf.join"].timeout) == (True, 3.0)
    file.write_text("[jobs.'wf.step']\nallow_failed_dependencies = 2\n")
    with pytest.raises(ConfigError, match="allow_failed_dependencies"):
        load(file, environ={})


@pytest.mark.parametrize(("asked", "ran"), [(2, 2), (0, 5), (9, 5)])
async def test_a_request_runs_at_most_its_own_attempts_within_its_types(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher, asked: int, ran: int
) -> None:
    request_id = new_id("capped")
    await submit(connector, chain, Request(id=request_id, type="always-fails", max_attempts=asked))
    responses = await history(connector, request_id)
    assert responses[-1].state is S.FAILED
    claims = [r for r in responses if r.state is S.PENDING and r.progress is None]
    assert len(claims) == ran
    assert (await connector.get(request_id)).attempt == ran


# -- per-request timeout --------------------------------------------------------------------


def test_the_smaller_timeout_applies() -> None:
    assert attempt_timeout(sleeper, Request(id="x", type="sleeper")) == (5.0, "type")
    assert attempt_timeout(sleeper, Request(id="x", type="sleeper", timeout=0.5)) == (0.5, "request")
    assert attempt_timeout(sleeper, Request(id="x", type="sleeper", timeout=9.0)) == (5.0, "type")
    assert attempt_timeout(workflow_jobs.step, Request(id="x", type="wf.step", timeout=2.0)) == (2.0, "request")
    assert attempt_timeout(workflow_jobs.step, Request(id="x", type="wf.step")) is None
    assert attempt_timeout(None, Request(id="x", type="elsewhere")) is None


async def test_a_requests_shorter_timeout_stops_the_attempt(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    request_id = new_id("short")
    await submit(connector, chain, Request(id=request_id, type="sleeper", timeout=0.2))
    last = await final(connector, request_id)
    assert last.state is S.FAILED
    assert last.error is not None
    assert (last.error.code, last.error.reason) == (Code.DEADLINE_EXCEEDED, "JOB_TIMEOUT")
    assert "the request's timeout of 0.2s" in last.error.message
    assert last.error.metadata["timeout_of"] == "request"


async def test_a_types_shorter_timeout_stops_the_attempt(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    request_id = new_id("leash")
    await submit(connector, chain, Request(id=request_id, type="short-leash", timeout=30))
    last = await final(connector, request_id)
    assert last.state is S.FAILED
    assert last.error is not None
    assert "its type's timeout of 0.2s" in last.error.message
    assert last.error.metadata == {"timeout_seconds": "0.2", "timeout_of": "type"}


async def test_a_request_within_its_timeout_finishes(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    request_id = new_id("in-time")
    await submit(connector, chain, Request(id=request_id, type="sleeper", data={"seconds": "0.01"}, timeout=10))
    assert (await final(connector, request_id)).state is S.FINISHED


# -- dependencies -----------------------------------------------------------------------------


async def test_a_diamond_runs_in_order_and_d_reads_b_and_c(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    def step(name: str, *depends_on: str) -> Request:
        return Request(id=name, type="wf.step", data={"value": name.lower()}, depends_on=depends_on)

    await submit_all(connector, chain, step("D", "B", "C"), step("B", "A"), step("C", "A"), step("A"))
    ends = {name: await final(connector, name) for name in "ABCD"}
    assert all(end.state is S.FINISHED for end in ends.values()), ends
    d = ends["D"]
    assert dict(d.data) == {"id": "D", "value": "d", "seen": "B,C", "got": "B=b;C=c", "states": "B=FINISHED,C=FINISHED"}
    assert (ends["B"].data["got"], ends["C"].data["got"]) == ("A=a", "A=a")
    assert d.output is not None
    assert d.output.Is(wrappers_pb2.StringValue.DESCRIPTOR)
    # D was claimed only after B and C ended, and they after A.
    d_claim = next(r for r in await history(connector, "D") if r.state is S.PENDING)
    assert d_claim.create_time >= max(ends["B"].create_time, ends["C"].create_time)
    b_claim = next(r for r in await history(connector, "B") if r.state is S.PENDING)
    assert b_claim.create_time >= ends["A"].create_time


async def test_a_failed_dependency_cancels_a_step_but_not_a_join(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    await submit_all(
        connector,
        chain,
        Request(id="F", type="wf.fail"),
        Request(id="OK", type="wf.step", data={"value": "fine"}),
        Request(id="STEP", type="wf.step", depends_on=("F",)),
        Request(id="JOIN", type="wf.join", depends_on=("F", "OK")),
    )
    step = await final(connector, "STEP")
    assert step.state is S.CANCELLED
    assert step.error is not None
    assert step.error.reason == "DEPENDENCY_FAILED"
    join = await final(connector, "JOIN")
    assert join.state is S.FINISHED
    assert (join.data["seen"], join.data["states"]) == ("F,OK", "F=FAILED,OK=FINISHED")
    assert join.data["got"] == "F=;OK=fine"


async def test_a_dependency_deleted_before_the_start_is_absent(connector: MemoryConnector, chain: HandlerChain) -> None:
    await submit(connector, chain, Request(id="gone", type="wf.step"))
    await submit(connector, chain, Request(id="kept", type="wf.step"))
    for _ in range(2):
        [claim] = await connector.claim("test", types=["wf.step"])
        await connector.respond(claim.job.request.id, Update(S.FINISHED, data={"value": "v"}), claim.lease_token)
    await submit(connector, chain, Request(id="reader", type="read-deps", depends_on=("gone", "kept")))
    assert await connector.delete("gone") == 1
    running = Dispatcher(connector, chain, cancel_grace=0.5, shutdown_grace=0.5)
    await running.start()
    try:
        last = await final(connector, "reader")
    finally:
        await running.stop()
    assert (last.state, dict(last.data)) == (S.FINISHED, {"got": "kept"})


async def test_a_job_in_a_worker_process_reads_its_dependencies_and_may_not_submit(
    connector: MemoryConnector,
) -> None:
    processes = ProcessPoolRequestHandler(max_workers=1)
    processes.register(read_deps_process)
    internal = InternalAsyncRequestHandler()
    internal.register(workflow_jobs.step)
    chain = HandlerChain([internal, processes], RejectRequestHandler())
    running = Dispatcher(connector, chain, cancel_grace=0.5, shutdown_grace=0.5)
    await running.start()
    try:
        await submit_all(
            connector,
            chain,
            Request(id="first", type="wf.step", data={"value": "1st"}),
            Request(id="in-process", type="read-deps-process", depends_on=("first",)),
        )
        last = await final(connector, "in-process")
    finally:
        await running.stop()
        await chain.close()
    assert last.state is S.FINISHED, last
    assert dict(last.data) == {"got": "first=FINISHED:1st", "submit": "NOT_IN_WORKER_PROCESS"}


def test_a_response_crosses_the_pipe_whole() -> None:
    output = any_pb2.Any()
    output.Pack(wrappers_pb2.StringValue(value="out"))
    error = ErrorStatus(Code.CANCELLED, "why", "REASON", {"m": "1"})
    for response in (
        Response("r", 4, now(), S.FINISHED, True, {"k": "v"}, output),
        Response("r", 5, now(), S.CANCELLED, True, error=error),
        Response("r", 2, now(), S.PENDING, progress=Progress(0.5, "half")),
    ):
        assert _response_from_wire(_response_to_wire(response)) == response


# -- children -------------------------------------------------------------------------------


def test_child_ids_are_derived_and_bounded() -> None:
    assert child_id("parent", "1") == "parent/1"
    assert child_id("~alice/parent", "left") == "~alice/parent/left"
    long_parent = "~alice/" + "p" * 130
    long_id = child_id(long_parent, "7")
    assert long_id == child_id(long_parent, "7")  # stable
    assert long_id != child_id(long_parent, "8")
    assert len(long_id) <= MAX_CHILD_ID_LENGTH
    assert long_id.startswith("~alice/ppp")  # still in its parent's namespace
    assert child_id("q" * 127, "1") != child_id("q" * 127, "2")


async def test_a_retried_parent_makes_the_same_children_once(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("parent")
    await submit(connector, chain, Request(id=parent_id, type="fan-then-fail"))
    responses = await history(connector, parent_id)
    last = responses[-1]
    assert last.state is S.FINISHED, last
    assert (await connector.get(parent_id)).attempt == 2
    expected = [f"{parent_id}/1", f"{parent_id}/2", f"{parent_id}/3"]
    assert last.data["ids"] == ",".join(expected)
    children = await children_of(connector, parent_id)
    assert [c.request.id for c in children] == expected
    assert last.data["ended"] == "3"
    for child in children:
        assert child.request.creator == ""  # the parent's
        assert child.state is S.FINISHED
        assert child.attempt == 1  # made once, run once
    third = await final(connector, expected[2])
    assert third.data["seen"] == f"{expected[0]},{expected[1]}"
    assert third.data["got"] == f"{expected[0]}=one;{expected[1]}=two"


async def test_children_inherit_the_parents_creator(connector: MemoryConnector, chain: HandlerChain) -> None:
    await submit(connector, chain, Request(id="owned", type="wf.parent", creator="alice"))
    [claim] = await connector.claim("test", types=["wf.parent"])
    children = ChildJobs(connector, chain, claim.job, CancelSignal())

    async def report(update: Update) -> None:
        pass

    ctx = JobContext(claim.job.request, 1, report, CancelSignal(), children=children)
    made = await ctx.submit("wf.child", data={"seconds": "0"}, priority=3, queue="side")
    again = await JobContext(claim.job.request, 2, report, CancelSignal(), children=children).submit(
        "wf.child", data={"seconds": "0"}, priority=3, queue="side"
    )
    assert made == again
    request = made.request
    assert (request.id, request.parent_id, request.creator) == ("owned/1", "owned", "alice")
    assert (request.priority, request.queue) == (3, "side")
    with pytest.raises(ValueError, match="key"):
        await ctx.submit("wf.child", key="a/b")


async def test_a_parent_waits_for_its_children_and_ends_after_them(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("waiting")
    data = {"children": "12", "child_seconds": "0.02"}
    await submit(connector, chain, Request(id=parent_id, type="wf.parent", data=data))
    last = await final(connector, parent_id)
    assert last.state is S.FINISHED
    assert (last.data["children"], last.data["finished"]) == ("12", "12")
    children = await children_of(connector, parent_id)
    assert [c.request.id for c in children] == [f"{parent_id}/{i}" for i in range(1, 13)]
    assert all(c.is_final for c in children)
    assert last.create_time >= max(c.last_response.create_time for c in children)


async def test_a_parent_may_leave_its_children_running(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("leaving")
    data = {"children": "3", "child_seconds": "0.5", "wait": "no"}
    await submit(connector, chain, Request(id=parent_id, type="wf.parent", data=data))
    assert (await final(connector, parent_id)).state is S.FINISHED
    children = await children_of(connector, parent_id)
    assert len(children) == 3
    assert not all(c.is_final for c in children)  # the parent ended first
    for child in children:
        assert (await final(connector, child.request.id)).state is S.FINISHED


async def test_cancelling_a_waiting_parent_cancels_it_and_its_children(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("cancelled")
    data = {"children": "3", "child_seconds": "30"}
    await submit(connector, chain, Request(id=parent_id, type="wf.parent", data=data))
    await eventually_reads(lambda: children_of(connector, parent_id), lambda found: len(found) == 3)
    await connector.cancel(parent_id)
    last = await final(connector, parent_id)
    assert last.state is S.CANCELLED
    assert last.error is not None
    assert last.error.reason == "CANCELLED_BY_CLIENT"
    for child in await children_of(connector, parent_id):
        assert (await final(connector, child.request.id)).state is S.CANCELLED


async def test_a_child_made_after_its_parent_was_cancelled_is_cancelled(
    connector: MemoryConnector, chain: HandlerChain
) -> None:
    await submit(connector, chain, Request(id="late", type="wf.parent"))
    [claim] = await connector.claim("test", types=["wf.parent"])
    await connector.cancel("late")  # marked; its dispatcher has not heard yet
    children = ChildJobs(connector, chain, claim.job, CancelSignal())
    with pytest.raises(JobCancelled):
        await children.submit(Request(id="late/1", type="wf.child", parent_id="late"))
    assert (await connector.get("late/1")).state is S.CANCELLED


async def test_a_thread_job_submits_and_waits(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("sync")
    await submit(connector, chain, Request(id=parent_id, type="sync-fan"))
    last = await final(connector, parent_id)
    assert (last.state, dict(last.data)) == (S.FINISHED, {"states": "FINISHED,FINISHED"})
    ids = [c.request.id for c in await children_of(connector, parent_id)]
    assert ids == [f"{parent_id}/left", f"{parent_id}/right"]


async def test_a_child_of_a_type_nobody_runs_fails_the_parent_at_once(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("unknown")
    await submit(connector, chain, Request(id=parent_id, type="fan-unknown"))
    last = await final(connector, parent_id)
    assert last.state is S.FAILED
    assert last.error is not None
    assert (last.error.code, last.error.reason) == (Code.FAILED_PRECONDITION, "TYPE_NOT_SUPPORTED")
    assert "nobody-runs-this" in last.error.message
    assert (await connector.get(parent_id)).attempt == 1  # not retried: it cannot get better
    assert await children_of(connector, parent_id) == []


async def test_a_childs_typed_input_is_checked(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    parent_id = new_id("bad-input")
    await submit(connector, chain, Request(id=parent_id, type="fan-bad-input"))
    last = await final(connector, parent_id)
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.reason == "INVALID_INPUT"
    assert await children_of(connector, parent_id) == []


async def test_a_context_without_a_dispatcher_says_so() -> None:
    async def report(update: Update) -> None:
        pass

    ctx = JobContext(Request(id="x", type="t"), 1, report, CancelSignal())
    with pytest.raises(RuntimeError, match="dispatcher"):
        await ctx.submit("wf.child")
    assert dict(ctx.dependencies) == {}
    in_process = SyncJobContext(Request(id="x", type="t"), 1, CancelSignal(), None, lambda update: None)
    with pytest.raises(FailedPrecondition, match="worker process"):
        in_process.wait_for_children()


async def test_a_child_may_depend_only_on_its_owners_jobs(
    connector: MemoryConnector, chain: HandlerChain, dispatcher: Dispatcher
) -> None:
    others = new_id("bobs")
    await submit(connector, chain, Request(id=others, type="wf.child", creator="bob"))
    parent_id = new_id("alices")
    await submit(
        connector, chain, Request(id=parent_id, type="fan-on-another", creator="alice", data={"other": others})
    )
    last = await final(connector, parent_id)
    assert last.state is S.FAILED
    assert last.error is not None
    assert last.error.reason == "DEPENDENCY_NOT_FOUND"
    assert await children_of(connector, parent_id) == []
