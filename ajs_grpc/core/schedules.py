"""Schedules: a request template submitted at every occurrence of a cron expression.

Each occurrence's job id is derived from the schedule's id and the occurrence's time
(:func:`occurrence_id`), so however many instances find an occurrence due, the
idempotent submit stores one job for it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from datetime import datetime
from typing import Any

from google.protobuf import any_pb2

from ajs_grpc.core.model import Request

__all__ = [
    "Catchup",
    "Overlap",
    "Schedule",
    "template_from_json",
    "template_to_json",
]


class Overlap(enum.IntEnum):
    """What an occurrence does while the schedule's previous job has not ended (numbers as in the contract)."""

    SKIP = 1
    """No job for it."""
    ALLOW = 2
    """A job for it, running beside the previous one."""
    CANCEL_PREVIOUS = 3
    """The previous job is cancelled; a job for it."""


class Catchup(enum.IntEnum):
    """What occurrences missed while no instance ran (found late) come to (numbers as in the contract)."""

    SKIP = 1
    """Nothing: the schedule goes on from the next occurrence."""
    ONE = 2
    """One job, for the latest of them."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule, as stored.

    Attributes:
        id: its unique id (the prefix of its jobs' ids).
        cron: a cron expression: 5 fields, or 6 with seconds first.
        template: what each occurrence submits (its ``id`` and ``run_after`` unused).
        time_zone: the IANA time zone the expression is read in.
        overlap: see :class:`Overlap`.
        catchup: see :class:`Catchup`.
        paused: no occurrence is submitted while paused (those passed meanwhile are skipped).
        creator: who created it; its jobs are submitted as theirs.
        create_time, update_time: set by the store.
        last_time: the latest occurrence handled; None: none yet (occurrences after
            ``create_time`` are due).
        last_job_id: the job of the latest occurrence submitted, or "".
    """

    id: str
    cron: str
    template: Request
    time_zone: str = "UTC"
    overlap: Overlap = Overlap.SKIP
    catchup: Catchup = Catchup.SKIP
    paused: bool = False
    creator: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    last_time: datetime | None = None
    last_job_id: str = ""

    def same_definition(self, other: Schedule) -> bool:
        """True when ``other`` defines the same schedule (what stores and clocks set aside)."""
        return (
            self.id == other.id
            and self.cron == other.cron
            and self.time_zone == other.time_zone
            and self.overlap == other.overlap
            and self.catchup == other.catchup
            and template_to_json(self.template) == template_to_json(other.template)
        )


def template_to_json(template: Request) -> str:
    """A schedule's request template as JSON text (how SQL stores keep it)."""
    fields: dict[str, Any] = {
        "type": template.type,
        "data": dict(sorted(template.data.items())),
        "priority": template.priority,
        "queue": template.queue,
        "max_attempts": template.max_attempts,
        "timeout": template.timeout,
    }
    if template.input is not None:
        fields["input_type_url"] = template.input.type_url
        fields["input_value"] = base64.b64encode(template.input.value).decode()
    return json.dumps(fields, sort_keys=True)


def template_from_json(text: str) -> Request:
    """The request template :func:`template_to_json` wrote."""
    fields = json.loads(text)
    payload = None
    if "input_type_url" in fields:
        payload = any_pb2.Any(type_url=fields["input_type_url"], value=base64.b64decode(fields["input_value"]))
    return Request(
        id="",
        type=fields["type"],
        data=fields["data"],
        input=payload,
        priority=fields["priority"],
        queue=fields["queue"],
        max_attempts=fields["max_attempts"],
        timeout=fields["timeout"],
    )
