"""The in-memory connector: a complete connector whose queue lives in the process.

It keeps nothing across restarts, so it suits tests (plugin authors may use it in
theirs), benchmarks and throw-away servers. It passes the same contract suite as
every other connector.
"""

from __future__ import annotations

import dataclasses
import heapq
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

from typing_extensions import override

from ajs_grpc.connectors.base import Claim, Clock, Connector, JobFilter, Page, Planned, Renewal, plan_submits
from ajs_grpc.core.model import Job, Request, RequestState, Response, Update

__all__ = ["MemoryConnector"]


@dataclasses.dataclass
class _Entry:
    job: Job
    position: int
    responses: list[Response]
    lease_token: str | None = None
    lease_expires: datetime | None = None
    # The ticket of the job's latest queueing (unique in the connector), so stale heap items
    # can be recognised, even those of a pruned job whose id was taken again.
    queued: int = 0


class MemoryConnector(Connector):
    """Holds the queue in dictionaries and heaps; no call awaits anything.

    Args:
        clock: what leases and due times are compared with; None for the process's clock.
    """

    name = "memory"

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._entries: dict[str, _Entry] = {}
        # Submit order, for listing; positions start at 1 (0 is "before the first").
        self._order: list[str] = []
        self._children: dict[str, list[str]] = {}
        # Due jobs: (-priority, position, queued, id); not yet due: (due_time, ...).
        self._ready: list[tuple[int, int, int, str]] = []
        self._waiting: list[tuple[datetime, int, int, int, str]] = []
        # Numbers every queueing: a heap item names one queueing of one entry, never a later entry's.
        self._tickets = 0

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None:
            raise self._not_found(request_id)
        return entry

    def _store(self, entry: _Entry, job: Job, response: Response) -> None:
        entry.job = job
        entry.responses.append(response)
        if job.state is not RequestState.PENDING:
            entry.lease_token = entry.lease_expires = None
        if job.state is RequestState.CREATED:
            self._queue(entry)
        self._notify_response(job.request.id)

    def _queue(self, entry: _Entry) -> None:
        self._tickets += 1
        entry.queued = self._tickets
        job = entry.job
        item = (-job.request.priority, entry.position, entry.queued, job.request.id)
        if job.due_time is not None and job.due_time > self._now():
            heapq.heappush(self._waiting, (job.due_time, *item))
        else:
            heapq.heappush(self._ready, item)
        self._notify_work()

    def _is_current(self, request_id: str, queued: int) -> bool:
        entry = self._entries.get(request_id)
        return entry is not None and entry.queued == queued and entry.job.state is RequestState.CREATED

    @override
    async def enqueue(self, request: Request, max_attempts: int = 1) -> tuple[Job, bool]:
        [planned] = await plan_submits([(request, max_attempts)], self._find, self._exists, indexed=False)
        self._add(planned)
        return planned.job, planned.created

    @override
    async def enqueue_many(self, submits: Sequence[tuple[Request, int]]) -> list[tuple[Job, bool]]:
        # Planned in full before anything is stored, with no await in between: all or none.
        plan = await plan_submits(submits, self._find, self._exists, indexed=True)
        for planned in plan:
            self._add(planned)
        return [(planned.job, planned.created) for planned in plan]

    async def _find(self, request_ids: list[str]) -> dict[str, Job]:
        return {i: entry.job for i in request_ids if (entry := self._entries.get(i)) is not None}

    async def _exists(self, request_id: str) -> bool:
        return request_id in self._entries

    def _add(self, planned: Planned) -> None:
        if not planned.created or planned.first is None:
            return
        job = planned.job
        self._order.append(job.request.id)
        entry = _Entry(job, len(self._order), [planned.first])
        self._entries[job.request.id] = entry
        if job.request.parent_id:
            self._children.setdefault(job.request.parent_id, []).append(job.request.id)
        self._queue(entry)

    @override
    async def claim(
        self, worker: str, *, limit: int = 1, lease: float = 30.0, types: Collection[str] | None = None
    ) -> list[Claim]:
        at = self._now()
        while self._waiting and self._waiting[0][0] <= at:
            heapq.heappush(self._ready, heapq.heappop(self._waiting)[1:])
        claims: list[Claim] = []
        skipped: list[tuple[int, int, int, str]] = []
        while self._ready and len(claims) < limit:
            item = heapq.heappop(self._ready)
            request_id, queued = item[3], item[2]
            if not self._is_current(request_id, queued):
                continue  # cancelled, or queued again since
            entry = self._entries[request_id]
            if types is not None and entry.job.request.type not in types:
                skipped.append(item)
                continue
            job, response = entry.job.advance(Update(RequestState.PENDING, data={"worker": worker}), at)
            self._store(entry, job, response)
            entry.lease_token = uuid.uuid4().hex
            entry.lease_expires = at + timedelta(seconds=lease)
            claims.append(Claim(job, entry.lease_token))
        for item in skipped:
            heapq.heappush(self._ready, item)
        return claims

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        entry = self._entry(request_id)
        self._check_lease(request_id, entry.lease_token, lease_token)
        job, response = entry.job.advance(update)
        self._store(entry, job, response)
        return response

    @override
    async def renew(self, leases: Mapping[str, str], lease: float) -> Renewal:
        until = self._now() + timedelta(seconds=lease)
        lost: set[str] = set()
        cancelled: set[str] = set()
        for request_id, token in leases.items():
            entry = self._entries.get(request_id)
            if entry is None or entry.lease_token != token:
                lost.add(request_id)
                continue
            entry.lease_expires = until
            if entry.job.cancel_requested:
                cancelled.add(request_id)
        return Renewal(frozenset(lost), frozenset(cancelled))

    @override
    async def recover_expired(self) -> int:
        at = self._now()
        expired = [
            entry
            for entry in self._entries.values()
            if entry.job.state is RequestState.PENDING and entry.lease_expires is not None and entry.lease_expires <= at
        ]
        for entry in expired:
            job, response = entry.job.expire(at)
            self._store(entry, job, response)
        return len(expired)

    @override
    async def next_due_time(self) -> datetime | None:
        # Drop stale items (cancelled, or queued again since) from the heads.
        while self._ready and not self._is_current(self._ready[0][3], self._ready[0][2]):
            heapq.heappop(self._ready)
        while self._waiting and not self._is_current(self._waiting[0][4], self._waiting[0][3]):
            heapq.heappop(self._waiting)
        if self._ready:
            return self._now()
        return self._waiting[0][0] if self._waiting else None

    @override
    async def cancel(self, request_id: str) -> Job:
        root = self._entry(request_id)
        root.job.cancel()  # raises if it already ended, before anything changes
        pending = [request_id]
        while pending:
            entry = self._entries[pending.pop()]
            pending += self._children.get(entry.job.request.id, [])
            if entry.job.is_final:
                continue
            job, response = entry.job.cancel()
            if response is not None:
                self._store(entry, job, response)
            else:
                entry.job = job
                self._notify_cancel(job.request.id)
        return root.job

    @override
    async def prune(self, before: datetime) -> int:
        # Leaves first, again and again: a job with a child left keeps its id taken.
        doomed: set[str] = set()
        while True:
            leaves = {
                rid
                for rid, e in self._entries.items()
                if rid not in doomed
                and e.job.is_final
                and e.job.update_time < before
                and all(child in doomed for child in self._children.get(rid, ()))
            }
            if not leaves:
                break
            doomed |= leaves
        if not doomed:
            return 0
        for request_id in doomed:
            entry = self._entries.pop(request_id)
            siblings = self._children.get(entry.job.request.parent_id)
            if siblings is not None:
                siblings.remove(request_id)
            self._children.pop(request_id, None)
        # Positions must stay stable for page cursors: pruned ones become "" holes.
        self._order = [rid if rid not in doomed else "" for rid in self._order]
        return len(doomed)

    @override
    async def get(self, request_id: str) -> Job:
        return self._entry(request_id).job

    @override
    async def list_jobs(
        self, job_filter: JobFilter, page_size: int, after: int = 0, *, newest_first: bool = False
    ) -> Page:
        # A job at index i has the cursor (position) i + 1; "after" bounds it from below, or
        # newest first from above (0: no bound).
        if newest_first:
            indexes: range = range((after or len(self._order) + 1) - 2, -1, -1)
        else:
            indexes = range(max(after, 0), len(self._order))
        jobs: list[Job] = []
        cursors: list[int] = []
        for index in indexes:
            request_id = self._order[index]
            if not request_id:
                continue  # pruned
            job = self._entries[request_id].job
            if not job_filter.matches(job):
                continue
            if len(jobs) == page_size:
                return Page(jobs, cursors[-1], cursors)
            jobs.append(job)
            cursors.append(index + 1)
        return Page(jobs, None, cursors)

    @override
    async def count_jobs(self, state: RequestState, creator: str = "") -> int:
        return sum(
            1
            for entry in self._entries.values()
            if entry.job.state is state and (not creator or entry.job.request.creator == creator)
        )

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        stored = self._entry(request_id).responses
        # Sequences are 1-based and gapless: sequence n sits at index n - 1.
        start = max(after_sequence, 0)
        return stored[start : start + limit]
