"""Assembles and runs the server: connector, handler chain, dispatcher, gRPC services.

Besides JobService it serves ``grpc.health.v1`` (overall and per service) and
server reflection. :meth:`AjsServer.stop` drains gracefully: health turns
NOT_SERVING, new submits are refused with UNAVAILABLE, the dispatcher stops
claiming and gives running jobs their grace period, then the gRPC server stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ajs_grpc.connectors.base import Connector
from ajs_grpc.dispatcher import Dispatcher
from ajs_grpc.handlers.base import HandlerChain
from ajs_grpc.plugins import HandlerSpec, PluginDirs, discover
from ajs_grpc.service import MAX_INPUT_BYTES, SERVICE_NAME, JobService

__all__ = ["ROLES", "AjsServer", "ServerConfig", "serve"]

ROLES = ("all", "frontend", "worker")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerConfig:
    """What ``ajs serve`` runs.

    Attributes:
        address: HOST:PORT to listen on; port 0 picks a free one.
        connector: the connector's plugin name.
        connector_options: keyword arguments for the connector (e.g. ``path``
            and ``synchronous`` for sqlite).
        handlers: handler names in chain order with the job types each runs;
            None runs every job found on one internal handler.
        max_concurrent_jobs: jobs running at once.
        cancel_grace: seconds a cancelled job has to stop before it is forced.
        shutdown_grace: seconds running jobs have to finish when the server stops.
        rpc_grace: seconds open calls (watches) get when the server stops.
        lease: seconds a claimed job's lease lasts (renewed while it runs).
        retention: seconds ended jobs are kept; None keeps them forever.
        max_input_bytes: the largest typed ``Request.input`` accepted.
        plugin_dirs: directories of connector, handler and job plugins.
        role: ``all`` (serve and run jobs), ``frontend`` (serve JobService, run
            nothing) or ``worker`` (run jobs; serve only health and reflection).
        max_connection_age: seconds after which a client connection is asked to
            reconnect, so long-lived channels rebalance across instances (watches
            are resumed by the client).
    """

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")

    address: str = "127.0.0.1:50051"
    connector: str = "sqlite"
    connector_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"path": "ajs.db"})
    handlers: list[HandlerSpec] | None = None
    max_concurrent_jobs: int = 8
    cancel_grace: float = 10.0
    shutdown_grace: float = 30.0
    rpc_grace: float = 5.0
    lease: float = 30.0
    retention: float | None = 7 * 24 * 3600.0
    max_input_bytes: int = MAX_INPUT_BYTES
    plugin_dirs: PluginDirs = dataclasses.field(default_factory=PluginDirs)
    role: str = "all"
    max_connection_age: float = 300.0


class AjsServer:
    """A running ajs-grpc server.

    Args:
        config: what to run.
        connector: a connector to use instead of the one ``config`` names.
        chain: a handler chain to use instead of the one ``config`` describes.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        connector: Connector | None = None,
        chain: HandlerChain | None = None,
    ) -> None:
        self.config = config
        if connector is None or chain is None:
            plugins = discover(config.plugin_dirs)
            connector = connector or plugins.connector(config.connector)(**config.connector_options)
            chain = chain or plugins.chain(config.handlers)
        self.connector = connector
        self.chain = chain
        self.serves_jobs = config.role in ("all", "frontend")
        self.runs_jobs = config.role in ("all", "worker")
        self.dispatcher = Dispatcher(
            self.connector,
            self.chain,
            max_concurrent_jobs=config.max_concurrent_jobs,
            cancel_grace=config.cancel_grace,
            shutdown_grace=config.shutdown_grace,
            lease=config.lease,
            retention=config.retention,
        )
        self.service = JobService(self.connector, self.chain, max_input_bytes=config.max_input_bytes)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Opens the connector, starts claiming and serving; returns the bound port."""
        await self.connector.open()
        # Without SO_REUSEPORT a second server on a taken port fails instead of
        # silently sharing it.
        age_ms = int(self.config.max_connection_age * 1000)
        options = [
            ("grpc.so_reuseport", 0),
            # Pings keep idle connections through load balancers and find dead peers.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Old connections are asked to go away, so channels rebalance.
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", 30_000),
        ]
        self._server = server = grpc.aio.server(options=options)
        services = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.serves_jobs:
            server.add_generic_rpc_handlers((self.service.rpc_handler(),))
            services.insert(0, SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(services, server)
        try:
            self.port = server.add_insecure_port(self.config.address)
        except RuntimeError as error:
            await self.connector.close()
            raise OSError(f"cannot listen on {self.config.address}: is the address in use or invalid?") from error
        await server.start()
        if self.runs_jobs:
            await self.dispatcher.start()
        for name in ("", SERVICE_NAME) if self.serves_jobs else ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving on %s (role %s, connector %s, up to %d jobs at once, types: %s)",
            self.address,
            self.config.role,
            self.connector.name,
            self.config.max_concurrent_jobs,
            ", ".join(t for t, _ in self.chain.types) or "none",
        )
        return self.port

    @property
    def address(self) -> str:
        """HOST:PORT the server listens on."""
        host = self.config.address.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        """Drains and stops; safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: health NOT_SERVING, no new submits or claims")
        await self.health.enter_graceful_shutdown()
        self.service.accepting = False
        try:
            if self.runs_jobs:
                await self.dispatcher.stop()
        finally:
            try:
                if self._server is not None:
                    await self._server.stop(self.config.rpc_grace)
            finally:
                await self.chain.close()
                await self.connector.close()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        """Returns once :meth:`stop` began."""
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Runs a server until SIGTERM or SIGINT, then drains it and returns."""
    server = AjsServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await stop_requested.wait()
        log.info("signal received")
    finally:
        await server.stop()
