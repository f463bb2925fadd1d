"""The dashboard's small rules: where it reaches the server, where sign-in may send a user, what it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ajs_grpc.core.errors import ConfigError
from ajs_grpc.edge.server import ServerConfig
from ajs_grpc.faces.dashboard.app import _local_path
from ajs_grpc.faces.dashboard.serve import check_config, exposure_warning, loopback_target


@pytest.mark.parametrize(
    ("asked", "sent_to"),
    [
        ("/", "/"),
        ("/jobs?state=FAILED", "/jobs?state=FAILED"),
        ("/job?id=%7Ealice%2Fx", "/job?id=%7Ealice%2Fx"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("jobs", "/"),
        ("", "/"),
    ],
)
def test_sign_in_only_sends_the_user_to_a_page_of_the_dashboard(asked: str, sent_to: str) -> None:
    assert _local_path(asked) == sent_to


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:0", "127.0.0.1:4242"),
        ("0.0.0.0:50051", "127.0.0.1:4242"),
        (":50051", "127.0.0.1:4242"),
        ("[::]:50051", "[::1]:4242"),
        ("[::1]:50051", "[::1]:4242"),
        ("localhost:50051", "localhost:4242"),
        ("10.1.2.3:50051", "10.1.2.3:4242"),
    ],
)
def test_the_dashboard_reaches_the_server_on_its_own_address_or_loopback(address: str, target: str) -> None:
    server = SimpleNamespace(config=ServerConfig(address=address), port=4242)
    assert loopback_target(server) == target  # type: ignore[arg-type]


def test_the_dashboard_refuses_a_worker_and_tls_it_cannot_reach() -> None:
    with pytest.raises(ConfigError, match="role all or frontend"):
        check_config(ServerConfig(role="worker"))
    with pytest.raises(ConfigError, match="TLS"):
        check_config(ServerConfig(tls_cert_file="cert.pem", tls_key_file="key.pem"))
    check_config(ServerConfig(role="frontend"))
    check_config(ServerConfig(tokens_file="tokens.toml"))


def test_a_dashboard_beyond_this_machine_is_warned_of() -> None:
    assert exposure_warning("127.0.0.1:8080", authenticated=False) is None
    assert exposure_warning("localhost:8080", authenticated=True) is None
    assert exposure_warning("[::1]:8080", authenticated=False) is None
    assert "without sign-in" in (exposure_warning("0.0.0.0:8080", authenticated=False) or "")
    assert "plain HTTP" in (exposure_warning(":8080", authenticated=True) or "")
