"""Who sees which job or schedule: ownership, per-principal id namespaces, and NOT_FOUND for the rest.

Each principal names requests in a namespace of its own
(:meth:`~ajs_grpc.edge.auth.Principal.qualify`); a job is the caller's when it
submitted it or owns one of its parents (a child of an owned job is owned too),
and admins see all. A job the caller may not see is answered NOT_FOUND exactly as
an unknown id is (AIP-211), so ids cannot be probed.
"""

from __future__ import annotations

import dataclasses
import logging

from ajs_grpc.connectors.base import Connector, request_not_found, schedule_not_found
from ajs_grpc.core.errors import AjsError, NotFound
from ajs_grpc.core.model import Job, Response
from ajs_grpc.core.schedules import Schedule
from ajs_grpc.edge.auth import Principal

__all__ = ["OWNER_DEPTH", "Ownership", "in_names_of"]

log = logging.getLogger(__name__)

# How many parents up a job's owner is looked for (a child of an owned job is owned too).
OWNER_DEPTH = 8


class Ownership:
    """Answers "may this principal see this job?" against the store."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector

    async def owns(self, principal: Principal, job: Job) -> bool:
        """True when ``principal`` is an admin, submitted ``job``, or owns one of its parents."""
        if principal.admin or job.request.creator == principal.name:
            return True
        parent_id = job.request.parent_id
        for _ in range(OWNER_DEPTH):
            if not parent_id:
                return False
            try:
                parent = await self._connector.get(parent_id)
            except NotFound:
                return False
            if parent.request.creator == principal.name:
                return True
            parent_id = parent.request.parent_id
        return False

    async def visible_job(self, principal: Principal, request_id: str) -> Job:
        """The job of a stored id, if the caller may see it; NOT_FOUND as for an unknown id if not."""
        job = await self._connector.get(request_id)
        if not await self.owns(principal, job):
            log.warning("denied %s access to request %s", principal.name, request_id)
            raise request_not_found(request_id)
        return job

    @staticmethod
    def as_seen_by(principal: Principal, job: Job) -> Job:
        """``job`` with its ids in the caller's names."""
        if principal.admin:
            return job
        request = dataclasses.replace(
            job.request,
            id=principal.unqualify(job.request.id),
            parent_id=principal.unqualify(job.request.parent_id),
            depends_on=tuple(principal.unqualify(dependency) for dependency in job.request.depends_on),
        )
        response = dataclasses.replace(job.last_response, request_id=request.id)
        return dataclasses.replace(job, request=request, last_response=response)

    async def visible_schedule(self, principal: Principal, schedule_id: str) -> Schedule:
        """The stored schedule, if the caller created it or is an admin; NOT_FOUND as for an unknown id if not."""
        schedule = await self._connector.get_schedule(schedule_id)
        if not principal.admin and schedule.creator != principal.name:
            log.warning("denied %s access to schedule %s", principal.name, schedule_id)
            raise schedule_not_found(schedule_id)
        return schedule

    @staticmethod
    def schedule_as_seen_by(principal: Principal, schedule: Schedule) -> Schedule:
        """``schedule`` with its ids in the caller's names."""
        if principal.admin:
            return schedule
        return dataclasses.replace(
            schedule, id=principal.unqualify(schedule.id), last_job_id=principal.unqualify(schedule.last_job_id)
        )

    @staticmethod
    def response_as_seen_by(principal: Principal, response: Response) -> Response:
        """``response`` with its request id in the caller's names."""
        if principal.admin:
            return response
        return dataclasses.replace(response, request_id=principal.unqualify(response.request_id))


def in_names_of(principal: Principal | None, error: AjsError) -> AjsError:
    """``error`` with stored ids written as the caller names them (its own namespace left out)."""
    if principal is None or principal.admin:
        return error
    own = f"~{principal.name}/"
    if own not in error.message and not any(own in value for value in error.metadata.values()):
        return error
    return error.restated(
        error.message.replace(own, ""), {key: value.replace(own, "") for key, value in error.metadata.items()}
    )
