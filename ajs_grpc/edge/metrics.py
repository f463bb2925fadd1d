"""Prometheus metrics of a server, served over HTTP (``[metrics] address``).

Each server has a registry of its own (several servers may share a process in tests).
Job types label series only when the server runs them: a type a client made up is
counted under ``other``, so clients cannot grow the number of series without bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ajs_grpc.connectors.base import QueueInfo
from ajs_grpc.core.flow import HELD_BACK_CAUSES
from ajs_grpc.core.model import RequestState

__all__ = ["Metrics"]

# The label of job types this server does not run.
OTHER_TYPE = "other"
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)


class Metrics:
    """The counters, gauges and histograms of one server.

    It is the service's observer (submits, calls) and the dispatcher's (jobs).

    Args:
        known_types: the job types that label series of their own; others count as ``other``.
        also_known: tells whether a type not in ``known_types`` is known now (one a remote
            worker declared since); None for none.
    """

    def __init__(self, known_types: Collection[str] = (), also_known: Callable[[str], bool] | None = None) -> None:
        self.known_types = frozenset(known_types)
        self.also_known = also_known
        self.registry = CollectorRegistry()
        registry = self.registry
        self.submitted = Counter("ajs_jobs_submitted", "Requests queued", ["type"], registry=registry)
        self.ended = Counter("ajs_jobs_ended", "Jobs that ended, by final state", ["type", "state"], registry=registry)
        self.retried = Counter("ajs_jobs_retried", "Attempts handed back to the queue", ["type"], registry=registry)
        self.calls = Counter(
            "ajs_grpc_calls",
            "gRPC calls (JobService, Operations) by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "ajs_job_duration_seconds", "How long attempts ran", ["type"], buckets=_DURATION_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "ajs_job_queue_wait_seconds",
            "From due to claimed",
            ["type"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge("ajs_queue_depth", "Jobs queued (CREATED), as last counted", registry=registry)
        self.held_back = Gauge(
            "ajs_jobs_held_back",
            "Due queued jobs a pause or a flow policy holds back, by cause, as last counted",
            ["cause"],
            registry=registry,
        )
        for cause in HELD_BACK_CAUSES:
            self.held_back.labels(cause)
        self.queues_paused = Gauge("ajs_queues_paused", "Queues paused, as last counted", registry=registry)
        self.running = Gauge("ajs_jobs_running", "Jobs running on this server", registry=registry)
        self.watchers = Gauge("ajs_watchers", "Open WatchJob streams on this server", registry=registry)
        self.abandoned = Gauge(
            "ajs_jobs_abandoned",
            "Jobs given up on that still run (they ignored cancellation); they count against max_jobs",
            registry=registry,
        )
        self.remote_workers = Gauge(
            "ajs_remote_workers", "Remote worker sessions connected to this server", registry=registry
        )
        self.remote_credit = Gauge(
            "ajs_remote_credit", "Jobs the connected remote workers take now (their credit left)", registry=registry
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def watch(
        self, running: Callable[[], int], watchers: Callable[[], int], abandoned: Callable[[], int] = lambda: 0
    ) -> None:
        """Reads the running jobs, open watches and abandoned jobs when scraped."""
        self.running.set_function(running)
        self.watchers.set_function(watchers)
        self.abandoned.set_function(abandoned)

    def watch_remote(self, sessions: Callable[[], int], credit: Callable[[], int]) -> None:
        """Reads the remote worker sessions and their credit when scraped."""
        self.remote_workers.set_function(sessions)
        self.remote_credit.set_function(credit)

    def flow_measured(self, held_back: Mapping[str, int], queues: Sequence[QueueInfo]) -> None:
        """Sets the flow gauges from a count of held-back jobs by cause and the list of queues."""
        for cause in HELD_BACK_CAUSES:
            self.held_back.labels(cause).set(held_back.get(cause, 0))
        self.queues_paused.set(sum(1 for queue in queues if queue.paused))

    def _type(self, request_type: str) -> str:
        if request_type in self.known_types or (self.also_known is not None and self.also_known(request_type)):
            return request_type
        return OTHER_TYPE

    # -- ServiceObserver ---------------------------------------------------------------

    def submitted_type(self, request_type: str) -> None:
        """A new request was queued."""
        self.submitted.labels(self._type(request_type)).inc()

    def call_ended(self, method: str, code: str) -> None:
        """A JobService call ended with ``code``."""
        self.calls.labels(method, code).inc()

    # -- JobObserver ---------------------------------------------------------------------

    def job_started(self, request_type: str, waited: float) -> None:
        """An attempt began, ``waited`` seconds after it was due."""
        self.queue_wait.labels(self._type(request_type)).observe(max(waited, 0.0))

    def job_ended(self, request_type: str, state: RequestState, seconds: float) -> None:
        """An attempt ended in ``state`` (CREATED: handed back for another attempt)."""
        label = self._type(request_type)
        self.duration.labels(label).observe(seconds)
        if state is RequestState.CREATED:
            self.retried.labels(label).inc()
        else:
            self.ended.labels(label, state.name).inc()

    # -- HTTP ----------------------------------------------------------------------------

    def serve(self, address: str) -> int:
        """Serves ``/metrics`` on HOST:PORT (port 0 picks one); returns the port."""
        host, _, port = address.rpartition(":")
        server, thread = start_http_server(int(port), host or "127.0.0.1", registry=self.registry)
        self._http = (server, thread)
        bound: int = server.server_port
        return bound

    def close(self) -> None:
        """Stops the HTTP endpoint."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
