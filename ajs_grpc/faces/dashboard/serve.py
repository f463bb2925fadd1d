"""``ajs serve --dashboard HOST:PORT``: a server and its dashboard in one process and one event loop."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from ajs_grpc.core.errors import AjsError, ConfigError
from ajs_grpc.edge.auth import Authenticator
from ajs_grpc.edge.server import AjsServer, ServerConfig, is_loopback_host, serve
from ajs_grpc.faces.dashboard.app import Dashboard, WhoIs

__all__ = ["check_config", "dashboard_for", "exposure_warning", "loopback_target", "serve_with_dashboard"]

log = logging.getLogger(__name__)


def loopback_target(server: AjsServer) -> str:
    """Where this process reaches the server's JobService: its own address, or loopback for a wildcard one."""
    host = server.config.address.rpartition(":")[0].strip("[]")
    try:
        wildcard = not host or ipaddress.ip_address(host).is_unspecified
        ipv6 = not wildcard and ipaddress.ip_address(host).version == 6
    except ValueError:  # a name such as localhost
        return f"{host}:{server.port}"
    if wildcard:
        return f"127.0.0.1:{server.port}" if host != "::" else f"[::1]:{server.port}"
    return f"[{host}]:{server.port}" if ipv6 else f"{host}:{server.port}"


def check_config(config: ServerConfig) -> None:
    """Raises ConfigError if the dashboard cannot reach the JobService ``config`` describes."""
    if config.role not in ("all", "frontend"):
        raise ConfigError("--dashboard needs an instance that serves JobService (role all or frontend)")
    if config.tls_cert_file or config.tls_client_ca_file:
        raise ConfigError(
            "--dashboard does not work with TLS on the gRPC address yet: serve the dashboard from an "
            "instance without tls.cert_file (e.g. a frontend on 127.0.0.1 behind your TLS proxy)"
        )


def dashboard_for(server: AjsServer, address: str) -> Dashboard:
    """A dashboard on ``address`` over ``server``'s JobService (not started).

    Raises:
        ConfigError: the server's configuration leaves the dashboard no way in (TLS,
            client certificates) or serves no JobService here.
    """
    config = server.config
    check_config(config)
    who_is: WhoIs | None = None
    if config.tokens_file:
        authenticator = Authenticator.from_file(Path(config.tokens_file), config.admin_role)

        def who_is(token: str) -> tuple[str, bool] | None:
            try:
                principal = authenticator.authenticate({"authorization": f"Bearer {token}"}, None)
            except AjsError:
                return None
            return principal.name, principal.admin

    return Dashboard(loopback_target(server), address, authenticated=bool(config.tokens_file), who_is=who_is)


def exposure_warning(address: str, *, authenticated: bool) -> str | None:
    """What ``ajs serve`` warns of when the dashboard (plain HTTP) listens beyond this machine."""
    if is_loopback_host(address.rpartition(":")[0]):
        return None
    if not authenticated:
        return (
            f"the dashboard listens on {address}, beyond this machine, without sign-in: anyone who can reach it "
            "may read, cancel and retry every job (configure auth.tokens_file)"
        )
    return (
        f"the dashboard listens on {address} over plain HTTP: tokens and session cookies cross the network "
        "unencrypted; put it behind a proxy that terminates TLS"
    )


async def serve_with_dashboard(config: ServerConfig, dashboard_address: str, announce: str = "") -> int:
    """Runs a server and its dashboard until SIGTERM or SIGINT, then stops both (``edge.server.serve``).

    Returns:
        How many abandoned jobs (which ignored cancellation) still run in threads.
    """
    check_config(config)
    return await serve(config, announce, beside=lambda server: _dashboard_beside(server, dashboard_address))


@contextlib.asynccontextmanager
async def _dashboard_beside(server: AjsServer, address: str) -> AsyncIterator[None]:
    """The dashboard of ``server`` on ``address`` while the block runs (stopped before the server drains)."""
    dashboard = dashboard_for(server, address)
    await dashboard.start()
    try:
        warning = exposure_warning(address, authenticated=dashboard.authenticated)
        if warning:
            log.warning("%s", warning)
        yield
    finally:
        await dashboard.stop()
