"""JobType: the model's description of a job type, and its one mapping to the wire."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import descriptor_pb2, wrappers_pb2

from ajs_grpc.core.jobs import JobPlugin, RetryPolicy, job
from ajs_grpc.core.model import JobType, RetrySchedule
from ajs_grpc.edge import convert


@job(
    "shout",
    description="Upper-cases a string.",
    retry=RetryPolicy(max_attempts=4, initial_backoff=0.5, max_backoff=8.0, multiplier=3.0, jitter=0.1),
    timeout=90.0,
    input_type=wrappers_pb2.StringValue,
    output_type=wrappers_pb2.StringValue,
)
async def shout(request: object, ctx: object) -> None:
    return None


@job("plain")
async def plain(request: object, ctx: object) -> None:
    return None


def test_a_plugin_is_described_with_its_typed_contract() -> None:
    described = convert.job_type_from_plugin(shout, "internal")
    assert described.name == "shout"
    assert described.handler == "internal"
    assert described.description == "Upper-cases a string."
    assert described.input_type == described.output_type == "google.protobuf.StringValue"
    assert described.retry_policy == RetrySchedule(4, 0.5, 8.0, 3.0, 0.1)
    assert described.timeout == 90.0
    files = descriptor_pb2.FileDescriptorSet.FromString(described.file_descriptor_set)
    assert [f.name for f in files.file] == ["google/protobuf/wrappers.proto"]


@pytest.mark.parametrize("plugin", [shout, plain])
def test_a_job_type_survives_the_wire(plugin: JobPlugin) -> None:
    described = convert.job_type_from_plugin(plugin, "process")
    message = convert.job_type_to_proto(described)
    assert convert.job_type_from_proto(message) == described


def test_a_type_without_contract_or_limit() -> None:
    described = convert.job_type_from_plugin(plain, "internal")
    assert (described.input_type, described.output_type, described.file_descriptor_set) == ("", "", b"")
    assert described.timeout is None
    assert not convert.job_type_to_proto(described).HasField("timeout")


def test_job_type_is_a_frozen_value() -> None:
    described = JobType("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        described.name = "y"  # type: ignore[misc]
