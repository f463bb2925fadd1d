"""TLS, mutual TLS, bearer tokens and ownership, against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ajs_grpc.auth import token_hash
from ajs_grpc.client import AsyncClient, TlsOptions
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.errors import AjsError, AlreadyExists, Code, Unavailable
from ajs_grpc.model import RequestState
from ajs_grpc.server import AjsServer, ServerConfig
from tests import jobs_for_tests
from tests.certs import Authority

S = RequestState

TOKENS = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[tokens]]
sha256 = "{bob}"
principal = "bob"
types = ["echo"]

[[tokens]]
sha256 = "{root}"
principal = "root"
roles = ["admin"]

[[tokens]]
sha256 = "{old}"
principal = "old"
expires = 2001-01-01T00:00:00Z
"""


@dataclasses.dataclass
class Secured:
    server: AjsServer
    tls: TlsOptions
    authority: Authority


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    authority = Authority(tmp_path)
    cert, key = authority.issue("server", server=True)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root", "old")}))
    config = ServerConfig(
        address="127.0.0.1:0",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tokens_file=str(tokens),
        shutdown_grace=0.5,
        cancel_grace=0.5,
    )
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        yield Secured(server, TlsOptions(ca_file=str(authority.ca_file)), authority)
    finally:
        await server.stop()


def client(secured: Secured, who: str | None, tls: TlsOptions | None = None) -> AsyncClient:
    token = f"{who}-token" if who else None
    return AsyncClient(secured.server.address, timeout=5, token=token, tls=tls or secured.tls)


async def test_another_principals_job_cannot_be_seen_or_cancelled_but_an_admin_can(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob, client(secured, "root") as root:
        submitted = await alice.submit("block", id="alices")
        assert submitted.job.request.creator == "alice"
        for attempt in (bob.get("alices"), bob.cancel("alices"), _drain(bob.watch("alices"))):
            with pytest.raises(AjsError) as raised:
                await attempt
            assert raised.value.code is Code.PERMISSION_DENIED
            assert raised.value.reason == "NOT_OWNER"
        assert [job.request.id async for job in bob.list()] == []
        assert [job.request.id async for job in alice.list()] == ["alices"]
        assert [job.request.id async for job in root.list()] == ["alices"]
        # Bob cannot take Alice's id either.
        with pytest.raises(AlreadyExists):
            await bob.submit("echo", id="alices")
        assert (await root.get("alices")).request.creator == "alice"
        first = await anext(root.watch("alices"))
        assert first.sequence == 1
        cancelled = await root.cancel("alices")
        assert cancelled.state in (S.CANCELLED, S.PENDING)
        final = [r async for r in alice.watch("alices")][-1]
        assert final.state is S.CANCELLED


async def test_children_of_ones_job_are_ones_own(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "root") as root:
        await alice.submit("block", id="parent")
        await root.submit("echo", id="child", parent_id="parent")
        assert (await alice.get("child")).request.creator == "root"
        assert [job.request.id async for job in alice.list(parent_id="parent")] == ["child"]
        await alice.cancel("parent")


async def test_a_principal_may_submit_only_its_types(secured: Secured) -> None:
    async with client(secured, "bob") as bob:
        await bob.submit("echo")
        with pytest.raises(AjsError) as raised:
            await bob.submit("steps")
        assert raised.value.code is Code.PERMISSION_DENIED
        assert raised.value.reason == "TYPE_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "NO_TOKEN"),
        ((("authorization", "Bearer wrong"),), "UNKNOWN_TOKEN"),
        ((("authorization", "Basic YWxpY2U6c2VjcmV0"),), "MALFORMED_TOKEN"),
        ((("authorization", "Bearer"),), "MALFORMED_TOKEN"),
        ((("authorization", "Bearer old-token"),), "EXPIRED_TOKEN"),
    ],
)
async def test_calls_without_a_valid_token_are_unauthenticated(
    secured: Secured, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
    from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc

    async with grpc.aio.secure_channel(secured.server.address, secured.tls.credentials()) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == reason


async def test_health_and_reflection_need_no_token(secured: Secured) -> None:
    async with client(secured, None) as anonymous:
        assert await anonymous.health() == "SERVING"
        with pytest.raises(AjsError) as raised:
            await anonymous.get("x")
        assert raised.value.code is Code.UNAUTHENTICATED


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(secured: Secured) -> None:
    async with AsyncClient(secured.server.address, timeout=2, token="alice-token") as plain:
        with pytest.raises(Unavailable):
            await plain.get("x")


@pytest.fixture
async def mutual(tmp_path: Path) -> AsyncIterator[tuple[AjsServer, Authority]]:
    authority = Authority(tmp_path)
    cert, key = authority.issue("server", server=True)
    config = ServerConfig(
        address="127.0.0.1:0",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_client_ca_file=str(authority.ca_file),
        shutdown_grace=0.5,
    )
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        yield server, authority
    finally:
        await server.stop()


async def test_mutual_tls_names_the_principal_after_the_certificate(mutual: tuple[AjsServer, Authority]) -> None:
    server, authority = mutual
    cert, key = authority.issue("carol", server=False)
    tls = TlsOptions(ca_file=str(authority.ca_file), cert_file=str(cert), key_file=str(key))
    async with AsyncClient(server.address, timeout=5, tls=tls) as carol:
        submitted = await carol.submit("echo", {"k": "v"})
        assert submitted.job.request.creator == "carol"
        assert (await carol.get(submitted.job.request.id)).request.creator == "carol"


async def test_mutual_tls_refuses_a_client_without_a_certificate(mutual: tuple[AjsServer, Authority]) -> None:
    server, authority = mutual
    async with AsyncClient(server.address, timeout=2, tls=TlsOptions(ca_file=str(authority.ca_file))) as nobody:
        with pytest.raises(Unavailable):
            await nobody.get("x")
    # A certificate from another authority is refused too.
    stranger = Authority(authority.directory, "other CA")
    cert, key = stranger.issue("mallory", server=False)
    tls = TlsOptions(ca_file=str(authority.ca_file), cert_file=str(cert), key_file=str(key))
    async with AsyncClient(server.address, timeout=2, tls=tls) as mallory:
        with pytest.raises(Unavailable):
            await mallory.get("x")


async def _drain(iterator: AsyncIterator[object]) -> None:
    async for _ in iterator:
        await asyncio.sleep(0)


async def test_another_principals_job_content_cannot_be_probed_by_resubmitting(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob:
        await alice.submit("echo", {"secret": "42"}, id="a-secret")
        answers = []
        for guess in ("42", "41"):
            with pytest.raises(AlreadyExists) as raised:
                await bob.submit("echo", {"secret": guess}, id="a-secret")
            answers.append((raised.value.message, raised.value.reason))
        assert answers[0] == answers[1]


async def test_children_go_only_under_ones_own_jobs(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob:
        await alice.submit("block", id="alices-parent")
        with pytest.raises(AjsError) as raised:
            await bob.submit("echo", id="bobs-child", parent_id="alices-parent")
        assert raised.value.code is Code.PERMISSION_DENIED
        assert [job.request.id async for job in alice.list(parent_id="alices-parent")] == []
        await alice.cancel("alices-parent")


async def test_one_authorization_header_only(secured: Secured) -> None:
    from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb
    from ajs_grpc.proto.ajs.v1 import job_service_pb2_grpc as pb_grpc

    async with grpc.aio.secure_channel(secured.server.address, secured.tls.credentials()) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        metadata = (("authorization", "Bearer junk"), ("authorization", "Bearer alice-token"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_file_lists_must_be_lists(tmp_path: Path) -> None:
    from ajs_grpc.auth import Authenticator
    from ajs_grpc.config import ConfigError

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nsha256 = "{token_hash("x")}"\nprincipal = "p"\nroles = "admin"\n')
    with pytest.raises(ConfigError, match="roles must be a list of strings"):
        Authenticator.from_file(tokens)
