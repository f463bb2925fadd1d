"""Typed contracts end to end: ListJobTypes, dynamic clients, reflection, the hash job."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ajs_grpc.client import AsyncClient
from ajs_grpc.core.errors import InvalidArgument
from ajs_grpc.core.model import RequestState
from ajs_grpc.edge import dynamic
from ajs_grpc.edge.server import AjsServer, ServerConfig

S = RequestState


@pytest.fixture
async def installed_server() -> AsyncIterator[AjsServer]:
    """A server with the installed plugins (the examples), as `ajs serve --connector memory` runs."""
    config = ServerConfig(address="127.0.0.1:0", connector="memory", connector_options={}, shutdown_grace=1)
    server = AjsServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(installed_server: AjsServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(installed_server.address, timeout=30) as opened:
        yield opened


async def test_list_job_types_describes_every_type(client: AsyncClient) -> None:
    types = {t.name: t for t in await client.job_types()}
    assert {"echo", "countdown", "fail", "hash"} <= set(types)
    hash_type = types["hash"]
    assert hash_type.handler == "process"
    assert hash_type.input_type == "ajs.examples.v1.HashRequest"
    assert hash_type.output_type == "ajs.examples.v1.HashResponse"
    assert hash_type.retry_policy.max_attempts == 2
    assert hash_type.description.startswith("Hashes data")
    files = descriptor_pb2.FileDescriptorSet.FromString(hash_type.file_descriptor_set)
    assert [f.name for f in files.file] == ["ajs/examples/v1/hash.proto"]
    echo = types["echo"]
    assert echo.input_type == ""
    assert echo.file_descriptor_set == b""
    assert echo.handler == "internal"


async def test_a_client_with_only_the_descriptors_builds_a_valid_hash_request(client: AsyncClient) -> None:
    described = {t.name: t for t in await client.job_types()}["hash"]
    # A class built from the descriptor set alone, in a pool of its own: no generated code.
    request_class = dynamic.message_class(described.file_descriptor_set, described.input_type)
    request = request_class()
    json_format.ParseDict({"data": "aGVsbG8=", "algorithm": "ALGORITHM_BLAKE2B", "rounds": 3}, request)
    submitted = await client.submit("hash", input=request)
    responses = [r async for r in client.watch(submitted.job.request.id)]
    assert responses[-1].state is S.FINISHED, responses[-1]
    assert [r.progress.fraction for r in responses if r.progress] == pytest.approx([1 / 3, 2 / 3, 1.0])
    output = responses[-1].output
    assert output is not None
    result = json_format.MessageToDict(
        dynamic.message_class(described.file_descriptor_set, output.TypeName())().FromString(output.value)
    )
    expected = b"hello"
    for _ in range(3):
        expected = hashlib.blake2b(expected).digest()
    assert result == {"hexDigest": expected.hex()}


async def test_a_bad_hash_algorithm_fails_without_retries(client: AsyncClient) -> None:
    described = {t.name: t for t in await client.job_types()}["hash"]
    payload = dynamic.from_json(described.file_descriptor_set, described.input_type, '{"data": "eA=="}')
    submitted = await client.submit("hash", input=payload)
    responses = [r async for r in client.watch(submitted.job.request.id)]
    assert responses[-1].state is S.FAILED
    assert responses[-1].error is not None
    assert "algorithm must be one of ALGORITHM_SHA256" in responses[-1].error.message
    assert sum(r.state is S.PENDING and r.progress is None for r in responses) == 1  # one attempt


async def test_a_wrong_payload_is_rejected_at_submit(client: AsyncClient) -> None:
    described = {t.name: t for t in await client.job_types()}["hash"]
    wrong = dynamic.message_class(described.file_descriptor_set, described.output_type)()
    with pytest.raises(InvalidArgument) as raised:
        await client.submit("hash", input=wrong)
    assert [v.field for v in raised.value.violations] == ["request.input"]
    assert "must hold a ajs.examples.v1.HashRequest" in raised.value.violations[0].description


async def test_reflection_serves_the_plugin_messages(installed_server: AjsServer) -> None:
    async with grpc.aio.insecure_channel(installed_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="ajs.examples.v1.HashRequest")
        replies = [reply async for reply in stub.ServerReflectionInfo(iter([ask]))]  # type: ignore[attr-defined]
    files = replies[0].file_descriptor_response.file_descriptor_proto
    names = [descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files]
    assert "ajs/examples/v1/hash.proto" in names
