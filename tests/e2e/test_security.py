"""TLS, mutual TLS, bearer tokens and ownership, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ajs_grpc.client import AsyncClient, Submitted, TlsOptions
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import AjsError, AlreadyExists, Code, ResourceExhausted, Unavailable
from ajs_grpc.core.model import RequestState, now
from ajs_grpc.edge.auth import token_hash
from ajs_grpc.edge.server import AjsServer, ServerConfig
from ajs_grpc.edge.service import Limits
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


@contextlib.asynccontextmanager
async def tls_server(
    tmp_path: Path, tokens_text: str, *, mutual: bool = False, limits: Limits | None = None
) -> AsyncIterator[Secured]:
    """A real server speaking TLS with the tokens file ``tokens_text`` (and client certificates if ``mutual``)."""
    authority = Authority(tmp_path)
    cert, key = authority.issue("server", server=True)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(tokens_text)
    config = ServerConfig(
        address="127.0.0.1:0",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_client_ca_file=str(authority.ca_file) if mutual else "",
        tokens_file=str(tokens),
        limits=limits or Limits(),
        shutdown_grace=0.5,
        cancel_grace=0.5,
    )
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        yield Secured(server, TlsOptions(ca_file=str(authority.ca_file)), authority)
    finally:
        await server.stop()


def tokens_of_the_cast() -> str:
    return TOKENS.format(**{name: token_hash(f"{name}-token") for name in ("alice", "bob", "root", "old")})


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    async with tls_server(tmp_path, tokens_of_the_cast()) as server:
        yield server


def client(secured: Secured, who: str | None, tls: TlsOptions | None = None) -> AsyncClient:
    token = f"{who}-token" if who else None
    return AsyncClient(secured.server.address, timeout=5, token=token, tls=tls or secured.tls)


async def test_another_principals_job_cannot_be_seen_or_cancelled_but_an_admin_can(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob, client(secured, "root") as root:
        submitted = await alice.submit("block", id="alices")
        assert submitted.job.request.creator == "alice"
        assert submitted.job.request.id == "alices"  # in her own names
        # Bob names his own "alices" (none); Alice's, by its full name, is as unknown to him.
        for name in ("alices", "~alice/alices"):
            for attempt in (bob.get(name), bob.cancel(name), _drain(bob.watch(name))):
                with pytest.raises(AjsError) as raised:
                    await attempt
                assert raised.value.code is Code.NOT_FOUND
                assert raised.value.reason == "REQUEST_NOT_FOUND"
                assert raised.value.message == f"no request with id {name!r}"
        assert [job.request.id async for job in bob.list()] == []
        assert [job.request.id async for job in alice.list()] == ["alices"]
        # An admin sees every namespace, and addresses any job by its full name.
        assert [job.request.id async for job in root.list()] == ["~alice/alices"]
        assert (await root.get("~alice/alices")).request.creator == "alice"
        first = await anext(root.watch("~alice/alices"))
        assert first.sequence == 1
        assert first.request_id == "~alice/alices"
        cancelled = await root.cancel("~alice/alices")
        assert cancelled.state in (S.CANCELLED, S.PENDING)
        final = [r async for r in alice.watch("alices")][-1]
        assert final.state is S.CANCELLED
        assert final.request_id == "alices"


async def test_each_principal_has_its_own_id_namespace(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob, client(secured, "root") as root:
        # A predictable id Alice took does not block Bob: each has a job of that id.
        await alice.submit("echo", {"who": "alice"}, id="nightly-report")
        bobs = await bob.submit("echo", {"who": "bob"}, id="nightly-report")
        assert bobs.created
        assert dict((await alice.get("nightly-report")).request.data) == {"who": "alice"}
        assert dict((await bob.get("nightly-report")).request.data) == {"who": "bob"}
        # Resubmitting is still idempotent within one's own namespace.
        again = await bob.submit("echo", {"who": "bob"}, id="nightly-report")
        assert not again.created
        with pytest.raises(AlreadyExists):
            await bob.submit("echo", {"who": "mallory"}, id="nightly-report")
        # Nobody may squat in another's namespace by naming it.
        with pytest.raises(AjsError) as raised:
            await bob.submit("echo", id="~alice/planted")
        assert raised.value.code is Code.INVALID_ARGUMENT
        assert {job.request.id async for job in root.list()} == {"~alice/nightly-report", "~bob/nightly-report"}


async def test_children_of_ones_job_are_ones_own(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "root") as root:
        await alice.submit("block", id="parent")
        # An admin's child goes into the shared namespace; Alice knows it as "~/child".
        await root.submit("echo", id="child", parent_id="~alice/parent")
        assert [job.request.id async for job in alice.list(parent_id="parent")] == ["~/child"]
        child = await alice.get("~/child")
        assert child.request.creator == "root"
        assert child.request.parent_id == "parent"
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


async def test_mutual_tls_alone_names_the_principal_after_the_certificate_subject(
    mutual: tuple[AjsServer, Authority],
) -> None:
    server, authority = mutual
    cert, key = authority.issue("carol", server=False)
    tls = TlsOptions(ca_file=str(authority.ca_file), cert_file=str(cert), key_file=str(key))
    async with AsyncClient(server.address, timeout=5, tls=tls) as carol:
        submitted = await carol.submit("echo", {"k": "v"})
        # "x509:..." is a name no token's principal can have.
        assert submitted.job.request.creator == "x509:CN=carol"
        assert (await carol.get(submitted.job.request.id)).request.creator == "x509:CN=carol"


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
    async with client(secured, "alice") as alice, client(secured, "root") as root:
        # Only an admin can place a job in Alice's namespace; she may not read it by resubmitting.
        await root.submit("echo", {"secret": "42"}, id="~alice/a-secret")
        answers = []
        for guess in ("42", "41"):
            with pytest.raises(AlreadyExists) as raised:
                await alice.submit("echo", {"secret": guess}, id="a-secret")
            answers.append((raised.value.message, raised.value.reason))
        assert answers[0] == answers[1]


async def test_children_go_only_under_ones_own_jobs(secured: Secured) -> None:
    async with client(secured, "alice") as alice, client(secured, "bob") as bob:
        await alice.submit("block", id="alices-parent")
        refusals = []
        for parent in ("~alice/alices-parent", "~alice/no-such-parent"):
            with pytest.raises(AjsError) as raised:
                await bob.submit("echo", id="bobs-child", parent_id=parent)
            refusals.append((raised.value.code, raised.value.reason))
        # Another's parent is answered exactly as a parent that does not exist.
        assert refusals == [(Code.NOT_FOUND, "PARENT_NOT_FOUND")] * 2
        assert [job.request.id async for job in alice.list(parent_id="alices-parent")] == []
        # Listing under another's job tells nothing either: as under an unknown one.
        assert [job.request.id async for job in bob.list(parent_id="~alice/alices-parent")] == []
        assert [job.request.id async for job in bob.list(parent_id="~alice/no-such-parent")] == []
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
    from ajs_grpc.edge.auth import Authenticator
    from ajs_grpc.edge.config import ConfigError

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nsha256 = "{token_hash("x")}"\nprincipal = "p"\nroles = "admin"\n')
    with pytest.raises(ConfigError, match="roles must be a list of strings"):
        Authenticator.from_file(tokens)


@pytest.fixture
async def quotas(tmp_path: Path) -> AsyncIterator[Secured]:
    limits = Limits(
        max_queued_per_principal=3, max_priority=10, max_run_after=3600, max_watches=3, max_watches_per_principal=2
    )
    async with tls_server(tmp_path, tokens_of_the_cast(), limits=limits) as server:
        yield server


async def _quota_refusal(call: Awaitable[object]) -> tuple[str, str, str]:
    with pytest.raises(ResourceExhausted) as raised:
        await call
    [violation] = raised.value.violations
    return raised.value.reason, violation.subject, violation.description


async def test_a_plain_principal_cannot_take_a_priority_above_the_ceiling(quotas: Secured) -> None:
    async with client(quotas, "alice") as alice, client(quotas, "root") as root:
        await alice.submit("echo", priority=10)
        refusal = await _quota_refusal(alice.submit("echo", priority=2**31 - 1))
        assert refusal == ("PRIORITY_QUOTA", "principal:alice", "priority at most 10")
        await root.submit("echo", priority=2**31 - 1)  # admins are exempt


async def test_run_after_beyond_the_horizon_is_refused(quotas: Secured) -> None:
    async with client(quotas, "alice") as alice:
        await alice.submit("echo", run_after=now() + timedelta(minutes=30))
        refusal = await _quota_refusal(alice.submit("echo", run_after=now() + timedelta(days=3650)))
        assert refusal == ("RUN_AFTER_QUOTA", "principal:alice", "run_after at most 3600s ahead")


async def test_queued_jobs_are_counted_per_principal(quotas: Secured) -> None:
    later = now() + timedelta(minutes=30)
    async with client(quotas, "alice") as alice, client(quotas, "bob") as bob:
        results = await asyncio.gather(
            *(alice.submit("echo", id=f"a{i}", run_after=later) for i in range(6)), return_exceptions=True
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 3
        refusals = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(refusals) == 3
        assert {(r.reason, r.violations[0].subject) for r in refusals} == {("QUEUED_JOBS_QUOTA", "principal:alice")}
        # Alice's queue does not take Bob's share.
        await bob.submit("echo", id="b0", run_after=later)
        # A queued job that ends frees its place.
        accepted = next(r for r in results if isinstance(r, Submitted))
        await alice.cancel(accepted.job.request.id)
        await _eventually_accepted(alice.submit, "echo", id="a-again", run_after=later)


async def _eventually_accepted(submit, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Submits until accepted: a counted quota is trusted for a moment before it is counted again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        try:
            return await submit(*args, **kwargs)
        except ResourceExhausted:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_one_principal_holds_only_its_share_of_the_watch_slots(quotas: Secured) -> None:
    async with client(quotas, "alice") as alice, client(quotas, "bob") as bob, client(quotas, "root") as root:
        await alice.submit("block", id="long")
        await bob.submit("echo", id="long", run_after=now() + timedelta(minutes=30))  # bob may run echo only
        alices = [alice.watch("long") for _ in range(2)]
        for watch in alices:
            assert (await anext(watch)).sequence == 1
        refusal = await _quota_refusal(anext(alice.watch("long")))
        assert refusal == ("TOO_MANY_WATCHES", "principal:alice", "at most 2 open WatchJob streams")
        # Bob still gets a slot: the server's third and last.
        bobs = bob.watch("long")
        assert (await anext(bobs)).sequence == 1
        refusal = await _quota_refusal(anext(root.watch("~bob/long")))
        assert refusal == ("TOO_MANY_WATCHES", "server", "at most 3 open WatchJob streams")
        for watch in [*alices, bobs]:
            await watch.aclose()  # type: ignore[attr-defined]
        await alice.cancel("long")
        await bob.cancel("long")


async def test_an_unauthenticated_caller_learns_nothing_of_the_parser(secured: Secured) -> None:
    async with grpc.aio.secure_channel(secured.server.address, secured.tls.credentials()) as channel:
        raw = channel.unary_unary("/ajs.v1.JobService/SubmitRequest")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw(b"\xff\xff\xff garbage")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # With a token the same bytes are what they are: undecodable.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw(b"\xff\xff\xff garbage", metadata=(("authorization", "Bearer alice-token"),))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


MAPPED = """
[[tokens]]
sha256 = "{alice}"
principal = "alice"

[[certificates]]
subject = "CN=build-bot"
principal = "build-bot"
types = ["echo"]

[[certificates]]
san = "ops.clients.example"
principal = "ops"
roles = ["admin"]
"""


@pytest.fixture
async def mapped(tmp_path: Path) -> AsyncIterator[Secured]:
    async with tls_server(tmp_path, MAPPED.format(alice=token_hash("alice-token")), mutual=True) as server:
        yield server


def with_certificate(secured: Secured, common_name: str, *, san: str = "", token: str | None = None) -> AsyncClient:
    cert, key = secured.authority.issue(common_name, server=False, san=san)
    tls = TlsOptions(ca_file=str(secured.authority.ca_file), cert_file=str(cert), key_file=str(key))
    return AsyncClient(secured.server.address, timeout=5, tls=tls, token=token)


async def test_certificates_are_mapped_explicitly_and_never_take_a_tokens_name(mapped: Secured) -> None:
    async with with_certificate(mapped, "alice", token="alice-token") as alice:
        await alice.submit("block", id="alices")
    # A certificate whose CN is "alice" is not Alice: unmapped certificates are refused.
    async with with_certificate(mapped, "alice") as impostor:
        with pytest.raises(AjsError) as raised:
            await impostor.get("alices")
        assert (raised.value.code, raised.value.reason) == (Code.UNAUTHENTICATED, "UNKNOWN_CERTIFICATE")
    # A mapped subject gets its principal, with its type restriction.
    async with with_certificate(mapped, "build-bot") as bot:
        submitted = await bot.submit("echo")
        assert submitted.job.request.creator == "build-bot"
        with pytest.raises(AjsError) as raised:
            await bot.submit("steps")
        assert raised.value.code is Code.PERMISSION_DENIED
        with pytest.raises(AjsError) as raised:
            await bot.get("~alice/alices")
        assert raised.value.code is Code.NOT_FOUND
    # A subject alternative name can name the principal too, roles and all.
    async with with_certificate(mapped, "whoever", san="ops.clients.example") as ops:
        job = await ops.get("~alice/alices")
        assert job.request.creator == "alice"
        await ops.cancel("~alice/alices")


def test_a_certificate_may_not_name_a_tokens_principal(tmp_path: Path) -> None:
    from ajs_grpc.edge.auth import Authenticator
    from ajs_grpc.edge.config import ConfigError

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nsha256 = "{token_hash("x")}"\nprincipal = "alice"\n\n'
        '[[certificates]]\nsubject = "CN=alice"\nprincipal = "alice"\n'
    )
    with pytest.raises(ConfigError, match="a certificate must name a principal of its own"):
        Authenticator.from_file(tokens)
    tokens.write_text(f'[[tokens]]\nsha256 = "{token_hash("x")}"\nprincipal = "a/b"\n')
    with pytest.raises(ConfigError, match="principal must be"):
        Authenticator.from_file(tokens)


async def test_the_tls_server_name_is_the_name_verified(tmp_path: Path) -> None:
    authority = Authority(tmp_path)
    cert, key = authority.issue("server", server=True, names=("ajs.internal",))  # not 127.0.0.1
    config = ServerConfig(address="127.0.0.1:0", tls_cert_file=str(cert), tls_key_file=str(key), shutdown_grace=0.5)
    server = AjsServer(config, connector=MemoryConnector(), chain=jobs_for_tests.chain())
    await server.start()
    try:
        named = TlsOptions(ca_file=str(authority.ca_file), server_name="ajs.internal")
        async with AsyncClient(server.address, timeout=5, tls=named) as client:
            assert (await client.submit("echo")).created
            assert await client.health() == "SERVING"
        unnamed = TlsOptions(ca_file=str(authority.ca_file))
        async with AsyncClient(server.address, timeout=2, tls=unnamed) as client:
            with pytest.raises(Unavailable):
                await client.submit("echo")
        wrong = TlsOptions(ca_file=str(authority.ca_file), server_name="other.internal")
        async with AsyncClient(server.address, timeout=2, tls=wrong) as client:
            with pytest.raises(Unavailable):
                await client.submit("echo")
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("10.1.2.3:50051", True),
        ("jobs.example.com:50051", True),
        ("127.0.0.1:50051,10.1.2.3:50051", True),
        ("127.0.0.1:50051", False),
        ("localhost:50051", False),
        ("[::1]:50051", False),
        ("127.0.0.1:50051,127.0.0.2:50052", False),
        ("unix:/run/ajs.sock", False),
    ],
)
async def test_a_token_is_not_sent_in_plain_text_beyond_this_machine(target: str, refused: bool) -> None:
    if refused:
        with pytest.raises(ValueError, match="refusing to send a token in plain text"):
            AsyncClient(target, token="secret")
        async with AsyncClient(target, token="secret", insecure=True):
            pass  # the user said the network is trusted
    else:
        async with AsyncClient(target, token="secret"):
            pass
    async with AsyncClient(target):  # no token: nothing to leak
        pass


def test_serve_warns_when_anyone_beyond_this_machine_may_call_it() -> None:
    from ajs_grpc.edge.server import exposure_warning

    assert "without authentication" in (exposure_warning("0.0.0.0:50051", authenticated=False) or "")
    assert exposure_warning("[::]:50051", authenticated=False)
    assert exposure_warning("jobs.example.com:50051", authenticated=False)
    assert exposure_warning("0.0.0.0:50051", authenticated=True) is None
    assert exposure_warning("0.0.0.0:50051", authenticated=False, serves=False) is None
    for local in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1"):
        assert exposure_warning(local, authenticated=False) is None
