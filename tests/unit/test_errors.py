"""One error tree: every status code has its class, the client maps back through the same table."""

from __future__ import annotations

import pickle

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import Metadata

from ajs_grpc.core import errors
from ajs_grpc.core.errors import Code
from ajs_grpc.core.jobs import RetryPolicy
from ajs_grpc.faces.client import error_from_rpc

ALL_CODES = [code for code in Code if code is not Code.OK]


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda code: code.name)
def test_every_status_code_comes_back_as_its_class(code: Code) -> None:
    status = status_pb2.Status(code=code.value, message="went wrong")
    info = error_details_pb2.ErrorInfo(reason="SOME_REASON", domain="ajs.v1", metadata={"k": "v"})
    status.details.add().Pack(info)
    rpc = grpc.aio.AioRpcError(
        grpc.StatusCode[code.name],
        Metadata(),
        Metadata(("grpc-status-details-bin", status.SerializeToString())),
        details="went wrong",
    )
    error = error_from_rpc(rpc)
    assert error.code is code
    assert error.message == "went wrong"
    assert error.reason == "SOME_REASON"
    assert error.metadata == {"k": "v"}
    expected = errors.ERRORS.get(code, errors.AjsError)
    assert type(error) is expected
    if code is not Code.UNKNOWN:
        assert expected is not errors.AjsError, f"{code.name} has no class of its own"


def test_details_of_bad_input_and_quotas_come_back() -> None:
    bad = errors.from_status(
        Code.INVALID_ARGUMENT, "bad", field_violations=[errors.FieldViolation("request.type", "empty")]
    )
    assert isinstance(bad, errors.InvalidArgument)
    assert [(v.field, v.description) for v in bad.violations] == [("request.type", "empty")]
    quota = errors.from_status(
        Code.RESOURCE_EXHAUSTED, "full", quota_violations=[errors.QuotaViolation("principal:alice", "100 queued")]
    )
    assert isinstance(quota, errors.ResourceExhausted)
    assert [v.subject for v in quota.violations] == ["principal:alice"]


def test_the_tree_holds_every_project_exception() -> None:
    for cls in (
        errors.NotSupported,
        errors.ConfigError,
        errors.PluginError,
        errors.ConnectorError,
        errors.Retry,
        errors.PermanentError,
        errors.JobCancelled,
        errors.JobTimeout,
        errors.WorkerCrashed,
    ):
        assert issubclass(cls, errors.AjsError), cls
    assert issubclass(errors.ConnectorError, errors.Internal)
    assert issubclass(errors.NotSupported, errors.Unimplemented)
    assert errors.PluginError("job", "broken").code is Code.FAILED_PRECONDITION


class ImageTooLarge(errors.PermanentError):
    pass


def test_job_signals_carry_the_status_an_attempt_ends_with() -> None:
    timeout = errors.JobTimeout("ran past its 1s timeout")
    assert (timeout.code, timeout.reason, timeout.metadata) == (Code.DEADLINE_EXCEEDED, "JOB_TIMEOUT", {})
    retry = errors.Retry("later", delay=2.5)
    assert (retry.code, retry.reason, retry.delay) == (Code.UNAVAILABLE, "RETRY_REQUESTED", 2.5)
    failed = ImageTooLarge()
    assert (failed.code, failed.reason, failed.message) == (Code.UNKNOWN, "JOB_FAILED", "ImageTooLarge")
    assert failed.metadata == {"exception": "ImageTooLarge"}


def test_job_signals_cross_a_process_boundary() -> None:
    retry = pickle.loads(pickle.dumps(errors.Retry("later", delay=2.5)))
    assert (type(retry), retry.message, retry.delay, retry.reason) == (errors.Retry, "later", 2.5, "RETRY_REQUESTED")
    crashed = pickle.loads(pickle.dumps(errors.WorkerCrashed("exit code -9")))
    assert crashed.metadata == {"exception": "WorkerCrashed"}


def test_retry_policy_reads_the_tree() -> None:
    policy = RetryPolicy()
    assert policy.retries(errors.Retry())
    assert policy.retries(errors.JobTimeout("slow"))
    assert policy.retries(errors.WorkerCrashed("died"))
    assert not policy.retries(ImageTooLarge("too big"))
    assert not policy.retries(errors.InvalidArgument("bad"))
    assert policy.retries(errors.Unavailable("later"))
