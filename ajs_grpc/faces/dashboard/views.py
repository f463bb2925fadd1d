"""What the dashboard shows, as JSON: jobs, Responses, and the overview's counts and throughput.

Everything here is computed from what the signed-in user's own calls to JobService
return, so an overview never counts a job its viewer could not list.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from ajs_grpc.core.model import ErrorStatus, Job, RequestState, Response
from ajs_grpc.faces.client import AsyncClient

__all__ = ["OverviewSampler", "job_json", "response_json"]

# States the overview counts (queued, running) and those it treats as ended.
UNFINISHED = (RequestState.CREATED, RequestState.PENDING)
ENDED = (RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED)
# The overview lists at most this many jobs per count; beyond, it shows "N+" and the
# throughput becomes an estimate (it would otherwise page through the whole store every second).
COUNT_CAP = 10_000
PAGE = 1000
# Failed jobs change less often than running ones: they are counted every this many samples.
FAILED_EVERY = 5


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _error_json(error: ErrorStatus | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"code": error.code.name, "message": error.message, "reason": error.reason, "metadata": dict(error.metadata)}


def response_json(response: Response) -> dict[str, Any]:
    """One Response as the job page's timeline shows it."""
    return {
        "sequence": response.sequence,
        "time": _iso(response.create_time),
        "state": response.state.name,
        "final": response.is_final,
        "progress": None
        if response.progress is None
        else {"fraction": response.progress.fraction, "message": response.progress.message},
        "data": dict(response.data),
        "output_type": response.output.TypeName() if response.output is not None else None,
        "error": _error_json(response.error),
    }


def job_json(job: Job) -> dict[str, Any]:
    """A job as the list and the job page show it (ids as its viewer names them)."""
    request = job.request
    return {
        "id": request.id,
        "type": request.type,
        "state": job.state.name,
        "final": job.state.is_final,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "creator": request.creator,
        "queue": request.queue,
        "priority": request.priority,
        "parent_id": request.parent_id,
        "depends_on": list(request.depends_on),
        "data": dict(request.data),
        "input_type": request.input.TypeName() if request.input is not None else None,
        "create_time": _iso(request.create_time),
        "update_time": _iso(job.update_time),
        "run_after": _iso(request.run_after),
        "due_time": _iso(job.due_time),
        "expire_time": _iso(request.expire_time),
        "last": response_json(job.last_response),
    }


@dataclasses.dataclass
class _Listed:
    jobs: list[Job]
    capped: bool


async def _list_capped(client: AsyncClient, states: Collection[RequestState], **filters: Any) -> _Listed:
    jobs: list[Job] = []
    token = ""
    while True:
        page, token = await client.list_page(states=states, page_size=PAGE, page_token=token, **filters)
        jobs.extend(page)
        if not token:
            return _Listed(jobs, False)
        if len(jobs) >= COUNT_CAP:
            return _Listed(jobs, True)


class OverviewSampler:
    """Counts a viewer's jobs by type and queue, and how many ended since the last sample.

    A job ended between two samples if it was queued or running at the first and is
    not at the second, or if it was submitted after the first and has already ended
    (found by listing ended jobs newest first down to the first sample's time).
    """

    def __init__(self) -> None:
        self._unfinished: set[str] | None = None
        self._since: datetime | None = None
        self._counted_new: set[str] = set()
        self._failed: Counter[tuple[str, str]] = Counter()
        self._failed_capped = False
        self._samples = 0

    async def sample(self, client: AsyncClient, types: Collection[str]) -> dict[str, Any]:
        """The counts now (queued / running / failed per type and per queue) and the jobs ended since last time."""
        began = datetime.now(UTC)
        unfinished = await _list_capped(client, UNFINISHED)
        if self._samples % FAILED_EVERY == 0:
            failed = await _list_capped(client, (RequestState.FAILED,))
            self._failed = Counter((job.request.type, job.request.queue) for job in failed.jobs)
            self._failed_capped = failed.capped
        self._samples += 1
        ids = {job.request.id for job in unfinished.jobs}
        ended: int | None = None
        if self._unfinished is not None and self._since is not None:
            gone = len(self._unfinished - ids)
            new_ids = await self._ended_since(client, self._since, self._unfinished)
            ended = gone + len(new_ids - self._counted_new)
            self._counted_new = new_ids
        self._unfinished, self._since = ids, began
        by_type: dict[str, Counter[str]] = {name: Counter() for name in types}
        by_queue: dict[str, Counter[str]] = {}
        for job in unfinished.jobs:
            column = "queued" if job.state is RequestState.CREATED else "running"
            by_type.setdefault(job.request.type, Counter())[column] += 1
            by_queue.setdefault(job.request.queue, Counter())[column] += 1
        for (job_type, queue), count in self._failed.items():
            by_type.setdefault(job_type, Counter())["failed"] += count
            by_queue.setdefault(queue, Counter())["failed"] += count

        def rows(groups: dict[str, Counter[str]]) -> list[dict[str, Any]]:
            return [
                {"name": name, "queued": c["queued"], "running": c["running"], "failed": c["failed"]}
                for name, c in sorted(groups.items())
            ]

        return {
            "time": _iso(began),
            "types": rows(by_type),
            "queues": rows(by_queue),
            "capped": unfinished.capped or self._failed_capped,
            "cap": COUNT_CAP,
            "ended": ended,
        }

    async def _ended_since(self, client: AsyncClient, since: datetime, seen: set[str]) -> set[str]:
        """Ids of jobs submitted at or after ``since``, ended now, that the last sample did not see unfinished."""
        found: set[str] = set()
        token = ""
        while True:
            page, token = await client.list_page(states=ENDED, page_size=PAGE, page_token=token, newest_first=True)
            for job in page:
                created = job.request.create_time
                if created is None or created < since:
                    return found
                if job.request.id not in seen:
                    found.add(job.request.id)
            if not token or len(found) >= COUNT_CAP:
                return found
