"""Assembles and runs the server: connector, handler chain, dispatcher, scheduler, gRPC services.

Besides JobService it serves ``google.longrunning.Operations`` over the same jobs
(:mod:`~ajs_grpc.edge.operations`), ``grpc.health.v1`` (overall and per service) and
server reflection. :meth:`AjsServer.stop` drains gracefully: health turns
NOT_SERVING, new submits are refused with UNAVAILABLE, the dispatcher stops
claiming and gives running jobs their grace period, then the gRPC server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from ajs_grpc.connectors.base import Connector
from ajs_grpc.core.errors import AjsError, Unimplemented
from ajs_grpc.core.model import RequestState
from ajs_grpc.core.schedules import Schedule
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import Authenticator
from ajs_grpc.edge.config import ConfigError, Settings
from ajs_grpc.edge.metrics import Metrics
from ajs_grpc.edge.operations import SERVICE as OPERATIONS_SERVICE
from ajs_grpc.edge.operations import SERVICE_NAME as OPERATIONS_SERVICE_NAME
from ajs_grpc.edge.operations import Operations
from ajs_grpc.edge.service import SERVICE, SERVICE_NAME, JobService, Limits
from ajs_grpc.edge.workers import SERVICE_NAME as WORKER_SERVICE_NAME
from ajs_grpc.edge.workers import WorkerService
from ajs_grpc.engine.dispatcher import Dispatcher
from ajs_grpc.engine.handlers.base import HandlerChain
from ajs_grpc.engine.plugins import HandlerSpec, PluginDirs, discover
from ajs_grpc.engine.scheduler import Scheduler

__all__ = ["DISPATCHER_HEALTH", "ROLES", "AjsServer", "ServerConfig", "serve"]

ROLES = ("all", "frontend", "worker")
# The health status name of an instance's dispatcher: SERVING where jobs run.
DISPATCHER_HEALTH = "ajs.dispatcher"
# The held-back gauges wait this many times as long as their last count took before counting again.
FLOW_MEASURE_SHARE = 10
# Seconds between counts of the queue for the ajs_queue_depth gauge (ServerConfig.queue_depth_every).
QUEUE_DEPTH_EVERY = 2.0

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
        queues: the queues whose jobs this instance starts; None (or empty) for all.
        cancel_grace: seconds a cancelled job has to stop before it is forced.
        shutdown_grace: seconds running jobs have to finish when the server stops.
        rpc_grace: seconds open calls (watches) get when the server stops.
        lease: seconds a claimed job's lease lasts (renewed while it runs).
        retention: seconds ended jobs are kept; None keeps them forever.
        limits: what one client may ask (data, input, queue depth, watches).
        plugin_dirs: directories of connector, handler and job plugins.
        role: ``all`` (serve and run jobs), ``frontend`` (serve JobService, run
            nothing) or ``worker`` (run jobs; serve only health and reflection).
        max_connection_age: seconds after which a client connection is asked to
            reconnect, so long-lived channels rebalance across instances. Open calls
            keep their connection: WatchJob and WatchJobs streams end themselves at
            this age (their clients resume them), remote worker sessions go on.
        worker_heartbeat: seconds a remote worker may stay silent; a session silent
            for three of them ends and its jobs go back to the queue.
        max_message_bytes: the largest gRPC message received.
        job_policies: per job type, overrides of its retry policy and timeout.
        tls_cert_file, tls_key_file: the server's certificate and key (PEM): TLS.
        tls_client_ca_file: CA of client certificates: mutual TLS.
        tokens_file: bearer tokens (see :mod:`ajs_grpc.edge.auth`): authentication.
        admin_role: the role that may see and cancel every job.
        metrics_address: HOST:PORT of the Prometheus endpoint; empty for none.
        queue_depth_every: seconds between counts of the queue for the
            ``ajs_queue_depth``, ``ajs_jobs_held_back`` and ``ajs_queues_paused`` gauges.
        scheduler: run a scheduler where jobs run (role ``all`` or ``worker``): it submits
            the jobs of the stored schedules' occurrences (one job per occurrence
            however many instances run one).
        schedules: schedules to store at start-up, replacing stored ones of the same id
            (``[[schedules]]`` of the configuration; created by the admin).
    """

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")

    address: str = "127.0.0.1:50051"
    connector: str = "sqlite"
    connector_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"path": "ajs.db"})
    handlers: list[HandlerSpec] | None = None
    max_concurrent_jobs: int = 8
    queues: tuple[str, ...] | None = None
    cancel_grace: float = 10.0
    shutdown_grace: float = 30.0
    rpc_grace: float = 5.0
    lease: float = 30.0
    retention: float | None = 7 * 24 * 3600.0
    limits: Limits = dataclasses.field(default_factory=Limits)
    plugin_dirs: PluginDirs = dataclasses.field(default_factory=PluginDirs)
    role: str = "all"
    max_connection_age: float = 300.0
    worker_heartbeat: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    job_policies: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tokens_file: str = ""
    admin_role: str = "admin"
    metrics_address: str = ""
    queue_depth_every: float = QUEUE_DEPTH_EVERY
    scheduler: bool = True
    schedules: tuple[Schedule, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, handlers: list[HandlerSpec] | None = None) -> ServerConfig:
        """The server configuration of the effective settings (``handlers`` overrides theirs)."""
        connector = settings["storage.connector"]
        options: dict[str, Any] = {}
        if connector == "sqlite":
            options = {"path": settings["storage.database"], "synchronous": settings["storage.synchronous"]}
        elif connector == "postgres":
            if not settings["storage.dsn"]:
                raise ConfigError("storage.dsn: the postgres connector needs a DSN (--dsn, $AJS_STORAGE_DSN)")
            options = {
                "dsn": settings["storage.dsn"],
                "schema": settings["storage.schema"],
                "migrate": settings["storage.migrate"],
            }
        if handlers is None and settings.handlers is not None:
            handlers = [HandlerSpec(name, types) for name, types in settings.handlers]
        return cls(
            address=settings["server.address"],
            role=settings["server.role"],
            connector=connector,
            connector_options=options,
            handlers=handlers,
            max_concurrent_jobs=settings["server.max_jobs"],
            queues=tuple(settings["server.queues"]) or None,
            cancel_grace=settings["server.cancel_grace"],
            shutdown_grace=settings["server.shutdown_grace"],
            lease=settings["server.lease"],
            retention=settings["server.retention"],
            max_connection_age=settings["server.max_connection_age"],
            worker_heartbeat=settings["server.worker_heartbeat"],
            plugin_dirs=PluginDirs(
                connectors=tuple(Path(p) for p in settings["plugins.connectors_dirs"]),
                handlers=tuple(Path(p) for p in settings["plugins.handlers_dirs"]),
                jobs=tuple(Path(p) for p in settings["plugins.jobs_dirs"]),
            ),
            limits=Limits(
                max_data_entries=settings["limits.max_data_entries"],
                max_data_bytes=settings["limits.max_data_bytes"],
                max_input_bytes=settings["limits.max_input_bytes"],
                max_queue_depth=settings["limits.max_queue_depth"],
                max_batch_requests=settings["limits.max_batch_requests"],
                max_watches=settings["limits.max_watches"],
                max_watches_per_principal=settings["limits.max_watches_per_principal"],
                watch_send_timeout=settings["limits.watch_send_timeout"],
                max_queued_per_principal=settings["limits.max_queued_per_principal"],
                max_schedules_per_principal=settings["limits.max_schedules_per_principal"],
                max_priority=settings["limits.max_priority"],
                max_run_after=settings["limits.max_run_after"],
            ),
            max_message_bytes=settings["limits.max_message_bytes"],
            job_policies=settings.job_policies,
            tls_cert_file=settings["tls.cert_file"],
            tls_key_file=settings["tls.key_file"],
            tls_client_ca_file=settings["tls.client_ca_file"],
            tokens_file=settings["auth.tokens_file"],
            admin_role=settings["auth.admin_role"],
            metrics_address=settings["metrics.address"],
            scheduler=settings["server.scheduler"],
            schedules=settings.schedules,
        )


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
            plugins = discover(config.plugin_dirs).with_policies(config.job_policies)
            connector = connector or plugins.connector(config.connector)(**config.connector_options)
            chain = chain or plugins.chain(config.handlers)
        self.connector = connector
        self.chain = chain
        # Types remote workers declare later label their own series too (bounded: declared ones only).
        self.metrics = Metrics([name for name, _ in chain.types], lambda name: chain.plugin_for(name) is not None)
        authenticator = None
        if config.tokens_file or config.tls_client_ca_file:
            authenticator = (
                Authenticator.from_file(Path(config.tokens_file), config.admin_role, bool(config.tls_client_ca_file))
                if config.tokens_file
                else Authenticator({}, config.admin_role, client_certificates=True)
            )
        self.serves_jobs = config.role in ("all", "frontend")
        self.runs_jobs = config.role in ("all", "worker")
        self.dispatcher = Dispatcher(
            self.connector,
            self.chain,
            max_concurrent_jobs=config.max_concurrent_jobs,
            queues=config.queues or None,
            cancel_grace=config.cancel_grace,
            shutdown_grace=config.shutdown_grace,
            lease=config.lease,
            retention=config.retention,
            observer=self.metrics,
            # A job's result must fit, with its request, in the replies that carry it (GetJob, WatchJob).
            max_result_bytes=max(
                config.max_message_bytes - config.limits.max_input_bytes - config.limits.max_data_bytes - 65536,
                65536,
            ),
        )
        self.scheduler = Scheduler(self.connector, self.chain) if self.runs_jobs and config.scheduler else None
        self.authenticated = authenticator is not None
        self.service = JobService(
            self.connector,
            self.chain,
            config.limits,
            authenticator,
            self.metrics,
            # A frontend cannot know every type its workers run.
            accept_unknown_types=config.role == "frontend",
            max_reply_bytes=config.max_message_bytes,
            # A schedule created or resumed here is looked at now (others see it at their next poll).
            schedules_changed=self.scheduler.changed if self.scheduler is not None else None,
            # Connections outlive their age while a stream holds them (a worker session must not be
            # cut), so the watch streams end themselves at that age and their clients resume.
            max_stream_age=config.max_connection_age,
        )
        self.operations = Operations(self.service)
        self.workers = WorkerService(
            self.chain,
            self.service.pipeline,
            heartbeat_interval=config.worker_heartbeat,
            max_result_bytes=self.dispatcher.max_result_bytes,
        )
        if self.workers.remote is not None:
            remote = self.workers.remote
            self.metrics.watch_remote(
                lambda: len(remote.sessions), lambda: sum(session.credit for session in remote.sessions)
            )
        self.metrics.watch(
            lambda: len(self.dispatcher.running),
            lambda: self.connector.watcher_count,
            lambda: self.dispatcher.abandoned_count,
        )
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._measuring: asyncio.Task[None] | None = None
        self.port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Binds the address, opens the connector, starts claiming and serving; returns the bound port.

        The address is bound first: a taken one stops the server before its store is
        created or migrated.
        """
        check_address_free(self.config.address)
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
            # ...and may finish what runs on them, however long: a remote worker's session is cut
            # by nothing but its worker, and the watch streams are renewed by the service itself.
            ("grpc.max_connection_age_grace_ms", 2**31 - 1),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
        ]
        self._server = server = grpc.aio.server(options=options)
        services = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.serves_jobs:
            server.add_generic_rpc_handlers((self.service.rpc_handler(), self.operations.rpc_handler()))
            services[:0] = [SERVICE_NAME, OPERATIONS_SERVICE_NAME]
        else:
            server.add_generic_rpc_handlers((worker_only_handler(), worker_only_handler(OPERATIONS_SERVICE)))
        if self.runs_jobs:  # remote workers connect where jobs are claimed
            server.add_generic_rpc_handlers((self.workers.rpc_handler(),))
            services.insert(0, WORKER_SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(services, server)
        try:
            credentials = self._credentials()
            if credentials is None:
                self.port = server.add_insecure_port(self.config.address)
            else:
                self.port = server.add_secure_port(self.config.address, credentials)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {self.config.address}: is the address valid?") from error
        try:
            await self.connector.open()
            await self._store_schedules()
        except BaseException:
            await server.stop(None)
            raise
        await server.start()
        if self.runs_jobs:
            await self.dispatcher.start()
        if self.scheduler is not None:
            await self.scheduler.start()
        if self.config.metrics_address:
            self.metrics_port = self.metrics.serve(self.config.metrics_address)
            self._measuring = asyncio.create_task(self._measure_queue(), name="ajs-queue-depth")
        # Health per service: JobService only where it is served, the dispatcher only where
        # jobs run (ajs health tells the role from them).
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving if self.serves_jobs else not_serving)
        await self.health.set(OPERATIONS_SERVICE_NAME, serving if self.serves_jobs else not_serving)
        await self.health.set(DISPATCHER_HEALTH, serving if self.runs_jobs else not_serving)
        warning = exposure_warning(self.config.address, authenticated=self.authenticated, serves=self.serves_jobs)
        if warning:
            log.warning("%s", warning)
        log.info(
            "serving on %s (role %s, connector %s, up to %d jobs at once, types: %s, queues: %s)",
            self.address,
            self.config.role,
            self.connector.name,
            self.config.max_concurrent_jobs,
            ", ".join(t for t, _ in self.chain.types) or "none",
            ", ".join(self.config.queues or ()) or "all",
        )
        return self.port

    async def _store_schedules(self) -> None:
        """Stores the configuration's schedules (replacing stored ones of the same id, keeping their progress)."""
        for schedule in self.config.schedules:
            stored, changed = await self.connector.create_schedule(schedule, replace=True)
            if changed:
                log.info(
                    "schedule %s stored from the configuration (%s in %s)", stored.id, stored.cron, stored.time_zone
                )
        declared = {schedule.id for schedule in self.config.schedules}
        after = ""
        while page := await self.connector.list_schedules(after=after, limit=1000):
            for stored in page:
                if not stored.creator and stored.id not in declared:  # creator "": from a configuration
                    log.warning(
                        "schedule %s of an earlier configuration is still stored and runs; "
                        "ajs schedules delete %s removes it",
                        stored.id,
                        stored.id,
                    )
            after = page[-1].id

    def _credentials(self) -> grpc.ServerCredentials | None:
        config = self.config
        if not config.tls_cert_file:
            if config.tls_key_file or config.tls_client_ca_file:
                raise ConfigError("tls.cert_file: TLS needs the server's certificate and key")
            return None
        try:
            key = Path(config.tls_key_file).read_bytes()
            cert = Path(config.tls_cert_file).read_bytes()
            client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
        except OSError as error:
            raise ConfigError(f"tls: cannot read {error.filename}: {error.strerror}") from None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
        )

    async def _measure_queue(self) -> None:
        loop = asyncio.get_running_loop()
        flow_due = 0.0
        while True:
            try:
                self.metrics.queue_depth.set(await self.connector.count_jobs(RequestState.CREATED))
                if loop.time() >= flow_due:
                    # Counting held-back jobs reads each of them: with a large backlog it is
                    # done less often, so that it takes at most a tenth of the store's time.
                    began = loop.time()
                    self.metrics.flow_measured(await self.connector.held_back(), await self.connector.list_queues())
                    flow_due = loop.time() + FLOW_MEASURE_SHARE * (loop.time() - began)
            except AjsError as error:
                log.warning("could not count the queue: %s", error)
            await asyncio.sleep(self.config.queue_depth_every)

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
        self.workers.accepting = False
        # WatchJobs streams never end by themselves: they end now (UNAVAILABLE, DRAINING), and
        # their clients resume with their tokens elsewhere rather than hold the drain to rpc_grace.
        self.connector.end_feeds()
        try:
            if self.scheduler is not None:
                await self.scheduler.stop()
            if self.runs_jobs:
                # Remote workers finish or hand back their jobs through their open sessions first.
                await self.dispatcher.stop()
        finally:
            self.workers.close()
            try:
                if self._server is not None:
                    await self._server.stop(self.config.rpc_grace)
            finally:
                if self._measuring is not None:
                    self._measuring.cancel()
                self.metrics.close()
                await self.chain.close()
                await self.connector.close()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        """Returns once :meth:`stop` began."""
        await self._stopped.wait()


def check_address_free(address: str) -> None:
    """Raises OSError, in one line, if HOST:PORT is taken (gRPC would log its own error line first)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # port 0 picks a free one; gRPC judges other forms
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return  # gRPC says what is wrong with the name
    for family, kind, protocol, _, where in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(where)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot listen on {address}: the address is in use") from None
                raise OSError(f"cannot listen on {address}: {error.strerror}") from None


def worker_only_handler(service: ServiceDescriptor = SERVICE) -> grpc.GenericRpcHandler:
    """JobService (or ``service``) on a worker: every call is answered, in one line, where to make it instead."""
    error = Unimplemented(
        "this instance only runs jobs (role worker): submit, watch and list jobs through an instance "
        "with role all or frontend",
        reason="WORKER_ONLY",
    )

    async def refuse(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await context.abort_with_status(rpc_status.to_status(convert.error_to_status(error)))

    async def refuse_stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        await refuse(request, context)
        yield b""  # never reached: it makes this a generator

    return grpc.method_handlers_generic_handler(
        service.full_name,
        {
            method.name: grpc.unary_stream_rpc_method_handler(refuse_stream)
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler(refuse)
            for method in service.methods
        },
    )


def exposure_warning(address: str, *, authenticated: bool, serves: bool = True) -> str | None:
    """What ``ajs serve`` warns of when JobService listens beyond this machine for anyone."""
    if authenticated or not serves or _is_loopback(address):
        return None
    return (
        f"listening on {address}, beyond this machine, without authentication: anyone who can reach it may "
        "submit, read and cancel every job (configure auth.tokens_file or tls.client_ca_file)"
    )


def _is_loopback(address: str) -> bool:
    """True when HOST:PORT listens on this machine only."""
    return is_loopback_host(address.rpartition(":")[0])


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (IPv4 or IPv6, in brackets or not)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" / "::" for every address
        return False


async def serve(
    config: ServerConfig,
    announce: str = "",
    beside: Callable[[AjsServer], contextlib.AbstractAsyncContextManager[object]] | None = None,
) -> int:
    """Runs a server until SIGTERM or SIGINT, then drains it; logs ``announce`` once it serves.

    Args:
        config: the server's configuration.
        announce: logged once everything serves.
        beside: what runs beside the server in this process (a face such as the dashboard):
            entered once the server started, left before it drains.

    Returns:
        How many abandoned jobs (which ignored cancellation) still run in threads.
    """
    server = AjsServer(config)
    # Handled before the server says it serves: a SIGTERM right after "serving on" must drain
    # it, not kill it (CI saw a killed server leave the SQLite WAL behind).
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    try:
        async with beside(server) if beside is not None else contextlib.nullcontext():
            if announce:
                log.info("%s", announce)
            await stop_requested.wait()
            log.info("signal received")
    finally:
        await server.stop()
    return server.dispatcher.abandoned_count
