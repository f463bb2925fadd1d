"""Flow policies and queues where a client sees them: the JobType on the wire, ``ajs types``, ``ajs serve --queues``."""

from __future__ import annotations

from ajs_grpc.core.flow import FlowPolicy
from ajs_grpc.core.model import Request, RequestState
from ajs_grpc.edge import convert
from ajs_grpc.faces import cli
from ajs_grpc.jobs import Concurrency, JobContext, JobStates, RateLimit, Unique, job


async def _run(request: Request, ctx: JobContext) -> None:
    """Does nothing."""


def test_the_jobtype_carries_the_policies_over_the_wire_and_back() -> None:
    declared = job(
        "resize",
        concurrency=Concurrency("tenant", 2),
        rate_limit=RateLimit("endpoint", 2.5, "1m", 4),
        ordered_by="account",
        unique=Unique("image", JobStates.QUEUED | JobStates.FINISHED, "1h"),
    )(_run)
    described = convert.job_type_from_plugin(declared, "internal")
    message = convert.job_type_to_proto(described)
    assert (message.concurrency.key, message.concurrency.limit, message.ordered_by) == ("tenant", 2, "account")
    assert (message.rate_limit.rate, message.rate_limit.period.seconds, message.rate_limit.burst) == (2.5, 60, 4)
    assert list(message.unique.states) == [RequestState.CREATED, RequestState.FINISHED]
    assert message.unique.ttl.seconds == 3600
    assert convert.job_type_from_proto(message).flow == declared.flow


def test_a_jobtype_without_policies_has_none_on_the_wire() -> None:
    message = convert.job_type_to_proto(convert.job_type_from_plugin(job("plain")(_run), "internal"))
    assert [message.HasField(name) for name in ("concurrency", "rate_limit", "unique")] == [False, False, False]
    assert message.ordered_by == ""
    assert convert.job_type_from_proto(message).flow == FlowPolicy()


def test_ajs_types_shows_a_types_policies_in_one_cell() -> None:
    flow = FlowPolicy(
        Concurrency("tenant", 2), RateLimit("endpoint", 10, "1s", 10), "account", Unique("r", JobStates.QUEUED, "1h")
    )
    assert cli._describe_flow(flow) == (
        "concurrency tenant<=2; rate_limit endpoint 10/1s burst 10; ordered_by account; unique r [queued] ttl 1h"
    )
    assert cli._describe_flow(FlowPolicy()) == "-"


def test_ajs_serve_takes_queues_as_a_comma_separated_flag() -> None:
    args = cli._parser().parse_args(["serve", "--queues", "images,default"])
    assert cli._settings(args)["server.queues"] == ["images", "default"]
