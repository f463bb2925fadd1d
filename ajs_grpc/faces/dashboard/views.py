"""What the dashboard shows, as JSON: jobs, Responses, and the overview's counts.

Everything here is computed from what the signed-in user's own calls to JobService
return, so an overview never counts a job its viewer could not list.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Collection
from datetime import datetime
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from ajs_grpc.core.model import ErrorStatus, Job, JobType, RequestState, Response
from ajs_grpc.edge import dynamic
from ajs_grpc.faces.client import AsyncClient

__all__ = ["Payloads", "count_jobs", "job_json", "response_json"]

# States the overview counts (queued, running) and those it treats as ended.
UNFINISHED = (RequestState.CREATED, RequestState.PENDING)
# The overview lists at most this many jobs per count; beyond, it shows "N+" (it would
# otherwise page through the whole store at each change).
COUNT_CAP = 10_000
PAGE = 1000


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _error_json(error: ErrorStatus | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"code": error.code.name, "message": error.message, "reason": error.reason, "metadata": dict(error.metadata)}


class Payloads:
    """Typed inputs and outputs as JSON, read with the descriptors the server publishes for its job types."""

    def __init__(self, job_types: Collection[JobType] = ()) -> None:
        self._sets = {
            name: job_type.file_descriptor_set
            for job_type in job_types
            for name in (job_type.input_type, job_type.output_type)
            if name and job_type.file_descriptor_set
        }

    @classmethod
    async def of(cls, client: AsyncClient) -> Payloads:
        """The payload reader of the server ``client`` calls."""
        return cls(await client.job_types())

    def json(self, payload: any_pb2.Any | None) -> Any:
        """``payload`` as a JSON value, or None if no job type describes its message."""
        if payload is None or payload.TypeName() not in self._sets:
            return None
        try:
            return json.loads(dynamic.to_json(self._sets[payload.TypeName()], payload))
        except (KeyError, TypeError, ValueError, DecodeError):
            return None


NO_PAYLOADS = Payloads()


def response_json(response: Response, payloads: Payloads = NO_PAYLOADS) -> dict[str, Any]:
    """One Response as the job page's timeline shows it: ``ajs get``'s form, with its time, output and error reason."""
    return response.as_dict() | {
        "time": _iso(response.create_time),
        "final": response.is_final,
        "output_type": response.output.TypeName() if response.output is not None else None,
        "output": payloads.json(response.output),
        "error": _error_json(response.error),
    }


def job_json(job: Job, payloads: Payloads = NO_PAYLOADS) -> dict[str, Any]:
    """A job as the list and the job page show it (ids as its viewer names them): ``ajs get``'s form, and more."""
    shown = job.as_dict()
    del shown["last_response"]
    return shown | {
        "final": job.state.is_final,
        "input_type": job.request.input.TypeName() if job.request.input is not None else None,
        "input": payloads.json(job.request.input),
        "last": response_json(job.last_response, payloads),
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


async def count_jobs(client: AsyncClient, types: Collection[str], *, admin: bool = False) -> dict[str, Any]:
    """Queued, running and failed jobs per type and per queue, as the client's principal may see them.

    For an admin, queues also say whether they are paused (ListQueues is admin-only).
    """
    paused = {queue.name for queue in await client.list_queues() if queue.paused} if admin else set()
    unfinished = await _list_capped(client, UNFINISHED)
    failed = await _list_capped(client, (RequestState.FAILED,))
    by_type: dict[str, Counter[str]] = {name: Counter() for name in types}
    by_queue: dict[str, Counter[str]] = {name: Counter() for name in paused}
    for job in unfinished.jobs + failed.jobs:
        column = {RequestState.CREATED: "queued", RequestState.PENDING: "running"}.get(job.state, "failed")
        by_type.setdefault(job.request.type, Counter())[column] += 1
        by_queue.setdefault(job.request.queue, Counter())[column] += 1

    def rows(groups: dict[str, Counter[str]]) -> list[dict[str, Any]]:
        return [
            {"name": name, "queued": c["queued"], "running": c["running"], "failed": c["failed"]}
            for name, c in sorted(groups.items())
        ]

    return {
        "types": rows(by_type),
        "queues": [{**row, "paused": row["name"] in paused} for row in rows(by_queue)],
        "capped": unfinished.capped or failed.capped,
        "cap": COUNT_CAP,
    }
