"""The edge's method table comes from the service descriptor, not from strings."""

from __future__ import annotations

import pytest

from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.edge.pipeline import NoObserver, Pipeline, method_name
from ajs_grpc.edge.service import SERVICE, JobService
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.handlers.reject import RejectRequestHandler


def test_every_rpc_of_the_contract_has_its_method() -> None:
    service = JobService(MemoryConnector(), HandlerChain([], RejectRequestHandler()))
    for method in SERVICE.methods:
        assert callable(getattr(service, method_name(method.name), None)), method.name
    service.rpc_handler()  # builds


def test_an_rpc_without_its_method_fails_when_the_handler_is_built() -> None:
    class Partial(JobService):
        cancel_job = None  # type: ignore[assignment]

    service = Partial(MemoryConnector(), HandlerChain([], RejectRequestHandler()))
    with pytest.raises(TypeError, match=r"ajs\.v1\.JobService\.CancelJob"):
        Pipeline(None, NoObserver(), lambda: 1.0).handler(SERVICE, service)


def test_rpc_names_map_to_snake_case_methods() -> None:
    assert method_name("SubmitRequest") == "submit_request"
    assert method_name("ListJobTypes") == "list_job_types"
    assert method_name("WatchJob") == "watch_job"
