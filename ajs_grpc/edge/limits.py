"""What one client may ask of the service: sizes, quotas per principal, queue depth, watch slots.

Each refusal is RESOURCE_EXHAUSTED (a limit that later calls may pass) with a
``QuotaFailure`` detail naming the subject, or INVALID_ARGUMENT for a size no
retry can fix. Admins are exempt from the quotas per principal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

from ajs_grpc.connectors.base import Connector
from ajs_grpc.core.errors import FieldViolation, InvalidArgument, QuotaViolation, ResourceExhausted
from ajs_grpc.core.model import Request, RequestState, now
from ajs_grpc.edge.auth import Principal

__all__ = ["COUNT_TTL", "MAX_INPUT_BYTES", "Admission", "Limits", "WatchSlots"]

# The largest typed input accepted by default (gRPC's own receive limit is 4 MiB).
MAX_INPUT_BYTES = 1024 * 1024
# How long a measured count (queue depth, a principal's queued jobs) is trusted.
COUNT_TTL = 0.2


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the service (all configurable, see ``[limits]``)."""

    max_data_entries: int = 256
    max_data_bytes: int = 64 * 1024
    max_input_bytes: int = MAX_INPUT_BYTES
    max_queue_depth: int = 0
    """Queued (CREATED) jobs at most; 0 for no limit."""
    max_batch_requests: int = 1000
    """Requests in one BatchSubmitRequests call."""
    max_watches: int = 1000
    max_watches_per_principal: int = 100
    """Open WatchJob streams of one principal (without authentication: of one client address)."""
    watch_send_timeout: float = 30.0
    """Seconds a watcher may leave a Response unread before it is dropped."""
    max_queued_per_principal: int = 0
    """Queued (CREATED) jobs one principal may have; 0 for no limit. Admins are exempt."""
    max_schedules_per_principal: int = 100
    """Schedules one principal may have; 0 for no limit. Admins are exempt."""
    max_priority: int = 100
    """The highest priority a principal may give; admins are exempt."""
    max_run_after: float = 90 * 86400.0
    """How far ahead (seconds) a principal may set ``run_after``; admins are exempt."""


class _Count:
    """A count read from the store, trusted for ``ttl`` seconds; admissions in between add to it.

    One count at a time, so a burst of submits cannot slip past a limit on an old count.
    """

    def __init__(self, count: Callable[[], Awaitable[int]], ttl: float) -> None:
        self._count = count
        self._ttl = ttl
        self._value = (0, -1.0)
        self._lock = asyncio.Lock()

    async def admit(self, limit: int, more: int = 1) -> int | None:
        """Counts ``more`` and returns None while that stays within ``limit``; else the count found."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            count, measured = self._value
            if loop.time() - measured > self._ttl:
                count, measured = await self._count(), loop.time()
            if count + more > limit:
                self._value = (count, measured)
                return count
            self._value = (count + more, measured)
            return None


class Admission:
    """Admits a submit under the limits, or refuses it with the quota it would break.

    Args:
        connector: counts the queued jobs.
        count_ttl: seconds a count of queued jobs is trusted before it is read again.
    """

    def __init__(self, connector: Connector, count_ttl: float = COUNT_TTL) -> None:
        self._connector = connector
        self._ttl = count_ttl
        self._depth = _Count(lambda: connector.count_jobs(RequestState.CREATED), count_ttl)
        self._queued: dict[str, _Count] = {}

    @staticmethod
    def check_input_size(request: Request, limits: Limits) -> None:
        """Refuses a typed input above ``max_input_bytes``."""
        size = request.input.ByteSize() if request.input is not None else 0
        if size > limits.max_input_bytes:
            description = f"is {size} bytes, more than the limit of {limits.max_input_bytes}"
            raise InvalidArgument(
                f"invalid request: request.input: {description}",
                [FieldViolation("request.input", description)],
                reason="INPUT_TOO_LARGE",
            )

    @staticmethod
    def check_request_quotas(principal: Principal, request: Request, limits: Limits) -> None:
        """Refuses a priority above the ceiling or a ``run_after`` beyond the horizon (not for admins)."""
        if principal.admin:
            return
        subject = f"principal:{principal.name}"
        if request.priority > limits.max_priority:
            raise ResourceExhausted(
                f"priority {request.priority} is above the ceiling of {limits.max_priority} for {principal.name}",
                [QuotaViolation(subject, f"priority at most {limits.max_priority}")],
                reason="PRIORITY_QUOTA",
                metadata={"max_priority": str(limits.max_priority)},
            )
        horizon = now() + timedelta(seconds=limits.max_run_after)
        if request.run_after is not None and request.run_after > horizon:
            raise ResourceExhausted(
                f"run_after is more than {limits.max_run_after:g}s ahead, beyond what {principal.name} may ask",
                [QuotaViolation(subject, f"run_after at most {limits.max_run_after:g}s ahead")],
                reason="RUN_AFTER_QUOTA",
                metadata={"max_run_after_seconds": f"{limits.max_run_after:g}"},
            )

    async def admit(self, principal: Principal, limits: Limits, more: int = 1) -> None:
        """Counts ``more`` queued jobs, if the queue and the principal's quota have room for them."""
        await self._check_queue_depth(limits.max_queue_depth, more)
        if not principal.admin and limits.max_queued_per_principal:
            await self._check_queued_quota(principal, limits.max_queued_per_principal, more)

    async def _check_queue_depth(self, limit: int, more: int) -> None:
        if not limit:
            return
        depth = await self._depth.admit(limit, more)
        if depth is not None:
            raise ResourceExhausted(
                f"the queue holds {depth} jobs, its limit is {limit}; retry later",
                [QuotaViolation("queue", f"at most {limit} queued jobs")],
                reason="QUEUE_FULL",
                metadata={"retry_after_seconds": "1"},
            )

    async def _check_queued_quota(self, principal: Principal, limit: int, more: int) -> None:
        name = principal.name
        counter = self._queued.get(name)
        if counter is None:
            counter = self._queued[name] = _Count(
                lambda: self._connector.count_jobs(RequestState.CREATED, name), self._ttl
            )
        found = await counter.admit(limit, more)
        if found is not None:
            raise ResourceExhausted(
                f"{name} has {found} queued jobs, its quota is {limit}; retry later",
                [QuotaViolation(f"principal:{name}", f"at most {limit} queued jobs")],
                reason="QUEUED_JOBS_QUOTA",
                metadata={"retry_after_seconds": "1", "limit": str(limit)},
            )


class WatchSlots:
    """Open WatchJob streams, per principal (without authentication: per client address)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str, limits: Limits) -> Iterator[None]:
        """Holds one slot for ``key`` while the block runs, if its share and the server have one."""
        mine = self.open.get(key, 0)
        per_principal = limits.max_watches_per_principal
        if mine >= per_principal or sum(self.open.values()) >= limits.max_watches:
            share = mine >= per_principal
            raise ResourceExhausted(
                "too many open WatchJob streams; close some or retry later",
                [
                    QuotaViolation(f"principal:{key}", f"at most {per_principal} open WatchJob streams")
                    if share
                    else QuotaViolation("server", f"at most {limits.max_watches} open WatchJob streams")
                ],
                reason="TOO_MANY_WATCHES",
                metadata={"limit_per_principal": str(per_principal)},
            )
        self.open[key] = mine + 1
        try:
            yield
        finally:
            self.open[key] -= 1
            if not self.open[key]:
                del self.open[key]
