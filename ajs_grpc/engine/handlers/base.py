"""The RequestHandler contract and the handler chain (the seed's first-match policy).

A handler runs the job plugins registered with it. The chain tries handlers in
their configured order and gives a request to the first that can handle its
type; the reject handler, always last, answers every other type with a final
FAILED "not supported" Response.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

from ajs_grpc.connectors.base import Submit
from ajs_grpc.core.errors import NotSupported
from ajs_grpc.core.jobs import JobContext, JobPlugin, JobReturn
from ajs_grpc.core.model import Job, Request

__all__ = ["HandlerChain", "NotSupported", "RequestHandler"]


class RequestHandler(abc.ABC):
    """Runs requests of the types whose job plugins are registered with it."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._jobs: dict[str, JobPlugin] = {}
        self.on_released: Callable[[], None] = lambda: None
        """Called (on the event loop) when work it gave up on ends: see :attr:`abandoned`."""

    @property
    def abandoned(self) -> int:
        """Jobs this handler gave up on (their task was cancelled) whose work still runs.

        A plain-function job that ignores cancellation keeps its thread; it counts
        against the server's ``max_jobs`` until it ends.
        """
        return 0

    def register(self, plugin: JobPlugin) -> None:
        """Makes this handler run requests of ``plugin.type``."""
        self._jobs[plugin.type] = plugin

    @property
    def types(self) -> list[str]:
        """The types this handler runs, sorted."""
        return sorted(self._jobs)

    def can_handle(self, request_type: str) -> bool:
        """True when this handler runs ``request_type``."""
        return request_type in self._jobs

    def plugin(self, request_type: str) -> JobPlugin | None:
        """The job plugin registered for ``request_type``, if any."""
        return self._jobs.get(request_type)

    def offers(self) -> list[tuple[list[str], int]] | None:
        """What this handler can start now, when more than the dispatcher's slots bound it.

        None (the default): its jobs take the dispatcher's slots (``max_concurrent_jobs``).
        Otherwise groups of types, each with how many jobs of those types it takes now; the
        dispatcher claims no more than that, outside its own slots, and hands each claimed
        job to :meth:`reserve` before it runs.
        """
        return None

    def reserve(self, job: Job, offer: list[str]) -> None:  # noqa: B027 - optional hook
        """Holds the place of a job claimed for the offer of types ``offer`` (called before it runs)."""

    def unreserve(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Gives back a reserved place whose job will not be handled (it ended before it started)."""

    @abc.abstractmethod
    async def handle(self, ctx: JobContext) -> JobReturn:
        """Runs ``ctx.request`` and returns what its job returned.

        Raises:
            Exception: whatever the job raised; the dispatcher makes it the
                final FAILED (or CANCELLED) Response.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the handler's resources (pools, processes)."""


class HandlerChain:
    """Handlers in order, ending with one that rejects every type."""

    def __init__(self, handlers: Sequence[RequestHandler], last: RequestHandler) -> None:
        self.handlers = [*handlers, last]

    def handler_for(self, request_type: str) -> RequestHandler:
        """The first handler that can run ``request_type`` (the last one at worst)."""
        for handler in self.handlers:
            if handler.can_handle(request_type):
                return handler
        return self.handlers[-1]

    def plugin_for(self, request_type: str) -> JobPlugin | None:
        """The job plugin that runs ``request_type`` (None if only the last handler takes it)."""
        return self.handler_for(request_type).plugin(request_type)

    def max_attempts(self, request_type: str) -> int:
        """How many attempts a new request of ``request_type`` gets (1 for types nobody runs)."""
        plugin = self.plugin_for(request_type)
        return plugin.retry.max_attempts if plugin is not None else 1

    def submit(self, request: Request) -> Submit:
        """What to enqueue for a new ``request``: its attempts, flow policies and dependency rule.

        Its attempts are ``request.max_attempts`` capped by its type's retry policy
        (0: the type's); its flow policies and ``allow_failed_dependencies`` are its
        type's. A type nobody here runs gets ``request.max_attempts`` (or 1), no flow
        policies, and the default dependency rule (a failed dependency cancels it).
        """
        asked = max(request.max_attempts, 0)
        plugin = self.plugin_for(request.type)
        if plugin is None:
            return Submit(request, asked or 1)
        allowed = plugin.retry.max_attempts
        return Submit(
            request,
            min(asked, allowed) if asked else allowed,
            plugin.flow.flow(request),
            plugin.allow_failed_dependencies,
        )

    @property
    def types(self) -> Iterable[tuple[str, RequestHandler]]:
        """Each runnable type with the handler that runs it, first match only."""
        seen: set[str] = set()
        for handler in self.handlers:
            for request_type in handler.types:
                if request_type not in seen:
                    seen.add(request_type)
                    yield request_type, handler

    async def close(self) -> None:
        """Closes every handler."""
        for handler in self.handlers:
            await handler.close()
