"""The handler chain: first match wins, the reject handler is always last."""

from __future__ import annotations

import pytest

from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.handlers.reject import RejectRequestHandler
from ajs_grpc.plugins import HandlerSpec, PluginError, build_chain, load_handlers, load_jobs
from tests import jobs_for_tests


def test_first_handler_that_runs_a_type_wins() -> None:
    first, second = InternalAsyncRequestHandler(), InternalAsyncRequestHandler()
    first.register(jobs_for_tests.echo)
    second.register(jobs_for_tests.echo)
    second.register(jobs_for_tests.noop)
    chain = HandlerChain([first, second], RejectRequestHandler())
    assert chain.handler_for("echo") is first
    assert chain.handler_for("noop") is second
    assert isinstance(chain.handler_for("unknown"), RejectRequestHandler)
    assert [(t, h) for t, h in chain.types] == [("echo", first), ("noop", second)]


def test_built_in_handlers_and_example_jobs_are_found_through_entry_points() -> None:
    assert {"internal", "reject"} <= set(load_handlers())
    assert {"echo", "countdown", "fail"} <= set(load_jobs())


def test_default_chain_runs_every_job_on_one_internal_handler() -> None:
    chain = build_chain(None)
    assert [type(h) for h in chain.handlers] == [InternalAsyncRequestHandler, RejectRequestHandler]
    assert {"echo", "countdown", "fail"} <= {t for t, _ in chain.types}


def test_configured_chain_keeps_order_and_types() -> None:
    chain = build_chain([HandlerSpec("internal", ("echo",)), HandlerSpec("internal", ("countdown", "echo"))])
    assert chain.handler_for("echo") is chain.handlers[0]
    assert chain.handler_for("countdown") is chain.handlers[1]
    assert isinstance(chain.handler_for("fail"), RejectRequestHandler)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([HandlerSpec("nope", ())], "no handler named 'nope'"),
        ([HandlerSpec("internal", ("missing",))], "job type 'missing'"),
        ([HandlerSpec("reject", ())], "always last"),
    ],
)
def test_bad_chain_configuration_is_a_clear_error(specs: list[HandlerSpec], message: str) -> None:
    with pytest.raises(PluginError, match=message):
        build_chain(specs)
