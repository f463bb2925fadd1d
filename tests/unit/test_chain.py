"""The handler chain: first match wins, the reject handler is always last."""

from __future__ import annotations

import pytest

from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.internal import InternalAsyncRequestHandler
from ajs_grpc.engine.handlers.process import ProcessPoolRequestHandler
from ajs_grpc.engine.handlers.reject import RejectRequestHandler
from ajs_grpc.engine.handlers.remote import RemoteRequestHandler
from ajs_grpc.engine.plugins import HandlerSpec, PluginError, build_chain, discover
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


def test_built_in_plugins_and_example_jobs_are_found_through_entry_points() -> None:
    plugins = discover()
    assert {"internal", "process", "reject"} <= set(plugins.handlers)
    assert {"memory", "sqlite"} <= set(plugins.connectors)
    assert {"echo", "countdown", "fail", "hash"} <= set(plugins.jobs)


def test_default_chain_puts_each_job_on_the_handler_it_asks_for() -> None:
    chain = build_chain(None)
    assert [type(h) for h in chain.handlers] == [
        InternalAsyncRequestHandler,
        ProcessPoolRequestHandler,
        RemoteRequestHandler,
        RejectRequestHandler,
    ]
    assert {"echo", "countdown", "fail"} <= set(chain.handlers[0].types)
    assert chain.handlers[1].types == ["hash"]
    assert chain.handlers[2].types == []  # until a remote worker declares some


def test_the_remote_handler_takes_types_no_plugin_provides_and_is_placed_once() -> None:
    chain = build_chain([HandlerSpec("remote", ("resize", "hash")), HandlerSpec("internal", ("echo",))])
    remote = chain.handlers[0]
    assert isinstance(remote, RemoteRequestHandler)
    assert [type(h) for h in chain.handlers] == [
        RemoteRequestHandler,
        InternalAsyncRequestHandler,
        RejectRequestHandler,
    ]
    assert chain.handler_for("resize") is remote
    # A type a local plugin provides keeps its contract when it runs remotely.
    hash_plugin = remote.plugin("hash")
    assert hash_plugin is not None
    assert hash_plugin.input_type is not None
    assert hash_plugin.input_type.DESCRIPTOR.full_name == "ajs.examples.v1.HashRequest"


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
        ([HandlerSpec("process", ("echo",))], "process handler runs plain functions"),
    ],
)
def test_bad_chain_configuration_is_a_clear_error(specs: list[HandlerSpec], message: str) -> None:
    with pytest.raises(PluginError, match=message):
        build_chain(specs)
