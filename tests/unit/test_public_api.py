"""The public names of the package: changing them is a breaking change, on purpose only."""

from __future__ import annotations

import ajs_grpc
from ajs_grpc import client, connectors, jobs


def test_top_level_names() -> None:
    assert sorted(ajs_grpc.__all__) == sorted(
        [
            "NO_RETRY",
            "AjsError",
            "AlreadyExists",
            "Code",
            "ErrorStatus",
            "FailedPrecondition",
            "InvalidArgument",
            "Job",
            "JobCancelled",
            "JobContext",
            "JobPlugin",
            "NotFound",
            "PermanentError",
            "Progress",
            "Request",
            "RequestState",
            "ResourceExhausted",
            "Response",
            "Result",
            "Retry",
            "RetryPolicy",
            "SyncJobContext",
            "Unavailable",
            "__version__",
            "job",
        ]
    )
    for name in ajs_grpc.__all__:
        assert getattr(ajs_grpc, name) is not None


def test_module_names_resolve() -> None:
    for module in (client, connectors, jobs):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
