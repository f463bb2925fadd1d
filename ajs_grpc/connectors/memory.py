"""The in-memory connector: a complete connector whose queue lives in the process.

It keeps nothing across restarts, so it suits tests (plugin authors may use it in
theirs), benchmarks and throw-away servers. It passes the same contract suite as
every other connector.
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Collection

from typing_extensions import override

from ajs_grpc.connectors.base import Claim, Connector, JobFilter, Page
from ajs_grpc.errors import AlreadyExists, NotFound
from ajs_grpc.model import Job, Request, RequestState, Response, Update

__all__ = ["MemoryConnector"]


@dataclasses.dataclass
class _Entry:
    job: Job
    position: int
    responses: list[Response]
    lease_token: str | None = None


class MemoryConnector(Connector):
    """Holds the queue in dictionaries; every call completes without awaiting."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, _Entry] = {}
        # Submit order, for listing; positions start at 1 (0 is "before the first").
        self._order: list[str] = []
        self._queue: collections.deque[str] = collections.deque()

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None:
            raise NotFound(
                f"no request with id {request_id!r}", reason="REQUEST_NOT_FOUND", metadata={"request_id": request_id}
            )
        return entry

    def _store(self, entry: _Entry, job: Job, response: Response) -> None:
        entry.job = job
        entry.responses.append(response)
        self._notify_response(job.request.id)

    @override
    async def enqueue(self, request: Request) -> tuple[Job, bool]:
        existing = self._entries.get(request.id)
        if existing is not None:
            if existing.job.request.same_content(request):
                return existing.job, False
            raise AlreadyExists(
                f"request {request.id!r} exists with different content",
                reason="REQUEST_ID_TAKEN",
                metadata={"request_id": request.id},
            )
        if request.parent_id and request.parent_id not in self._entries:
            raise NotFound(
                f"parent request {request.parent_id!r} does not exist",
                reason="PARENT_NOT_FOUND",
                metadata={"parent_id": request.parent_id},
            )
        job, first = Job.create(request)
        self._order.append(request.id)
        self._entries[request.id] = _Entry(job, len(self._order), [first])
        self._queue.append(request.id)
        self._notify_work()
        return job, True

    @override
    async def claim(self, worker: str, types: Collection[str] | None = None) -> Claim | None:
        skipped: list[str] = []
        try:
            while self._queue:
                request_id = self._queue.popleft()
                entry = self._entries[request_id]
                if entry.job.state is not RequestState.CREATED:
                    continue  # cancelled while queued
                if types is not None and entry.job.request.type not in types:
                    skipped.append(request_id)
                    continue
                job, response = entry.job.advance(Update(RequestState.PENDING, data={"worker": worker}))
                entry.lease_token = uuid.uuid4().hex
                self._store(entry, job, response)
                return Claim(job, entry.lease_token)
            return None
        finally:
            self._queue.extendleft(reversed(skipped))

    @override
    async def respond(self, request_id: str, update: Update, lease_token: str) -> Response:
        entry = self._entry(request_id)
        self._check_lease(request_id, entry.lease_token, lease_token)
        job, response = entry.job.advance(update)
        if update.state is not RequestState.PENDING:
            entry.lease_token = None
        if update.state is RequestState.CREATED:
            self._queue.append(request_id)
            self._notify_work()
        self._store(entry, job, response)
        return response

    @override
    async def cancel(self, request_id: str) -> Job:
        entry = self._entry(request_id)
        was_requested = entry.job.cancel_requested
        job, response = entry.job.cancel()
        if response is not None:
            self._store(entry, job, response)
        else:
            entry.job = job
            if not was_requested:
                self._notify_cancel(request_id)
        return job

    @override
    async def get(self, request_id: str) -> Job:
        return self._entry(request_id).job

    @override
    async def list_jobs(self, job_filter: JobFilter, page_size: int, after: int = 0) -> Page:
        jobs: list[Job] = []
        for position in range(max(after, 0), len(self._order)):
            job = self._entries[self._order[position]].job
            if not job_filter.matches(job):
                continue
            if len(jobs) == page_size:
                return Page(jobs, position)
            jobs.append(job)
        return Page(jobs, None)

    @override
    async def responses(self, request_id: str, after_sequence: int, limit: int) -> list[Response]:
        stored = self._entry(request_id).responses
        # Sequences are 1-based and gapless: sequence n sits at index n - 1.
        start = max(after_sequence, 0)
        return stored[start : start + limit]
