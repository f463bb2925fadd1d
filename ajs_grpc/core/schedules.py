"""Schedules: a request template submitted at every occurrence of a cron expression.

Each occurrence's job id is derived from the schedule's id and the occurrence's time
(:func:`occurrence_id`), so however many instances find an occurrence due, the
idempotent submit stores one job for it.

Cron expressions are parsed and matched by cronsim (Debian cron's syntax and rules,
plus an optional seconds field first). Times are read in the schedule's IANA time
zone (``zoneinfo``), and daylight saving time is handled as Debian's cron does:

- A *fixed-time* expression, one whose minute and hour fields both name values
  (``30 2 * * *``, ``0 9-17 * * 1-5``, ``0 30 2 * * *``), is read on the wall clock.
  A time that a spring-forward gap skips runs at the end of the gap (02:30 in
  Europe/Berlin on 2026-03-29 runs at 03:00 local, 01:00 UTC), once however many
  times of the expression fall in the gap; a time that a fall-back repeats runs once,
  at its first pass.
- An *interval* expression, one whose minute or hour field starts with ``*``
  (``*/15 * * * *``, ``0 * * * *``), runs by elapsed time: the gap has no
  occurrences, and the repeated hour has them on both passes (they are different
  instants, so their job ids differ).

The same rule applies to 6-field expressions (cronsim itself keeps its DST
adjustment to 5-field ones; this module does the adjustment for both).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from google.protobuf import any_pb2

from ajs_grpc.core.errors import FieldViolation, InvalidArgument
from ajs_grpc.core.model import Request

__all__ = [
    "LATE_GRACE",
    "MAX_SCHEDULE_ID_LENGTH",
    "MAX_SUBMITS_PER_PLAN",
    "Catchup",
    "Overlap",
    "Plan",
    "Schedule",
    "check_schedule",
    "occurrence_id",
    "plan",
    "template_from_json",
    "template_to_json",
]

MAX_SCHEDULE_ID_LENGTH = 100
"""A schedule id's length at most: its jobs' ids add 17 characters (``@20260329T010000Z``), within 128."""

LATE_GRACE = 15.0
"""Seconds an occurrence may be found late and still count as on time; later, it was missed (no instance ran)."""

MAX_SUBMITS_PER_PLAN = 100
"""Jobs one :func:`plan` submits at most; the occurrences after them are left to the next plan."""

# The windows :func:`_latest_before` looks back through, shortest first (then the whole range).
_LOOK_BACK = tuple(
    timedelta(seconds=s) for s in (60, 3600, 86400, 32 * 86400, 366 * 86400, 5 * 366 * 86400, 30 * 366 * 86400)
)
# Cron times are whole seconds: "before t + _TICK" is "at or before t".
_TICK = timedelta(microseconds=1)
_CRON_FORM = "5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first"


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

    @property
    def zone(self) -> ZoneInfo:
        """The time zone the expression is read in ("" is UTC).

        Raises:
            ZoneInfoNotFoundError, ValueError: no such zone (:func:`check_schedule` says so first).
        """
        return _zone(self.time_zone or "UTC")

    def occurrences(self, after: datetime, until: datetime | None = None) -> Iterator[datetime]:
        """The occurrences later than ``after`` and not later than ``until`` (None: no end), in order.

        Each is an aware UTC datetime, a distinct instant (see the module's DST rules).
        The iteration ends early if the expression matches nothing for 50 years.

        Raises:
            ValueError: ``after`` is naive.
        """
        for at in _instants(self.cron, self.zone, after):
            if until is not None and at > until:
                return
            yield at

    def next_time(self, after: datetime) -> datetime | None:
        """The first occurrence later than ``after`` (UTC); None if there is none within 50 years."""
        return next(self.occurrences(after), None)

    def request_for(self, at: datetime) -> Request:
        """The request of the occurrence at ``at``: the template, with the occurrence's id and the schedule's creator.

        Its content depends on the schedule and ``at`` alone, so every instance submitting
        it asks for the same work and the idempotent submit keeps one job.
        """
        return dataclasses.replace(
            self.template,
            id=occurrence_id(self.id, at),
            creator=self.creator,
            create_time=None,
            run_after=None,
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


def occurrence_id(schedule_id: str, at: datetime) -> str:
    """The job id of ``schedule_id``'s occurrence at ``at``: ``{schedule_id}@{at in UTC, %Y%m%dT%H%M%SZ}``.

    Read in UTC, the two passes of a repeated hour give different ids.

    Raises:
        ValueError: ``at`` is naive.
    """
    return f"{schedule_id}@{_utc(at):%Y%m%dT%H%M%SZ}"


def check_schedule(schedule: Schedule) -> None:
    """Checks what the core knows of a schedule: its cron expression and its time zone.

    Its id (as request ids are, at most :data:`MAX_SCHEDULE_ID_LENGTH` characters) and
    its template (as a submit is) are checked by the caller.

    Raises:
        InvalidArgument: reason ``INVALID_FIELDS``, a violation for each bad field
            (``schedule.cron``, ``schedule.time_zone``).
    """
    violations: list[FieldViolation] = []
    cron_error = _cron_error(schedule.cron)
    if cron_error:
        violations.append(FieldViolation("schedule.cron", cron_error))
    zone_error = _zone_error(schedule.time_zone)
    if zone_error:
        violations.append(FieldViolation("schedule.time_zone", zone_error))
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid schedule: {summary}", violations, reason="INVALID_FIELDS")


def _cron_error(cron: str) -> str:
    """What is wrong with a cron expression ("" if nothing)."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        return f"{_quoted(cron)} has {len(fields)} fields; a cron expression has {_CRON_FORM}"
    try:
        CronSim(cron, datetime(2000, 1, 1))
    except CronSimError as error:
        return f"{_quoted(cron)} is not a cron expression ({error}); it has {_CRON_FORM}"
    # Valid fields may still name no time at all ("the 1st and 21st, if the last Monday").
    if next(_instants(cron, _zone("UTC"), datetime(2000, 1, 1, tzinfo=UTC)), None) is None:
        return f"{_quoted(cron)} names no time (none for 50 years)"
    return ""


def _zone_error(name: str) -> str:
    """What is wrong with an IANA time zone name ("" if nothing; "" itself is UTC)."""
    if not name:
        return ""
    if name in ("localtime", "posixrules"):  # files of a machine's tz database, not zones: each machine's may differ
        return f"{_quoted(name)} is not an IANA time zone (such as Europe/Berlin or UTC)"
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"{_quoted(name)} is not an IANA time zone (such as Europe/Berlin or UTC)"
    return ""


def _quoted(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


@functools.lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"a naive datetime: {at!r} (schedules compare aware times)")
    return at.astimezone(UTC)


def _fixed_time(cron: str) -> bool:
    """True for an expression whose minute and hour fields both name values: it is read on the wall clock.

    Debian's cron tells them apart the same way (neither field starts with ``*``).
    """
    fields = cron.split()
    minute, hour = fields[-5], fields[-4]  # 6 fields: seconds first
    return not minute.startswith("*") and not hour.startswith("*")


def _instants(cron: str, zone: ZoneInfo, after: datetime) -> Iterator[datetime]:
    """The occurrences of ``cron`` in ``zone`` later than ``after``, ascending, as distinct UTC instants."""
    after = _utc(after)
    local = after.astimezone(zone)
    last = after
    if _fixed_time(cron):
        # Wall-clock times, each placed on the time line by the DST rules. Placing never
        # goes backwards as wall-clock times go forwards, and a wall-clock time before
        # ``local``'s is placed at or before ``after``: starting there misses nothing.
        for wall in CronSim(cron, local.replace(tzinfo=None)):
            at = _place(wall, zone)
            if at > last:
                last = at
                yield at
    else:
        # cronsim steps an aware time through UTC: both passes of a repeated hour match,
        # the times a gap skips never come up.
        for found in CronSim(cron, local):
            at = found.astimezone(UTC)
            if at > last:
                last = at
                yield at


def _place(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant (UTC) a wall-clock time of ``zone`` runs at: its first pass if repeated, the gap's end if skipped."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap: the transition lies between the two readings of the wall time (one per
    # offset). The end of the gap is the first instant whose wall-clock time is past
    # ``wall``; tz transitions fall on whole seconds.
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = int(min(first, second).timestamp()), int(max(first, second).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do for a schedule now (see :func:`plan`).

    Attributes:
        submit: the occurrences to submit a job for, in order.
        cancel_previous: cancel the schedule's previous job first (``Overlap.CANCEL_PREVIOUS``).
        new_last_time: the latest occurrence handled by this plan, for
            :meth:`Connector.advance_schedule`; None when nothing is due.
        more: :data:`MAX_SUBMITS_PER_PLAN` cut the due occurrences short: plan again at once.
    """

    submit: list[datetime] = dataclasses.field(default_factory=list)
    cancel_previous: bool = False
    new_last_time: datetime | None = None
    more: bool = False


def plan(schedule: Schedule, now: datetime, *, previous_running: bool, grace: float = LATE_GRACE) -> Plan:
    """What is due of ``schedule`` at ``now``, and what to submit for it.

    The occurrences due are those later than ``last_time`` (or ``create_time`` before
    the first) and not later than ``now``. One found more than ``grace`` seconds late
    was missed (no instance ran): ``Catchup.SKIP`` drops the missed ones,
    ``Catchup.ONE`` keeps the latest of them. Those on time are kept. Then, of those kept:

    - ``Overlap.ALLOW``: all are submitted.
    - ``Overlap.SKIP``: none while ``previous_running``; else the first (the later ones
      would find its job unfinished).
    - ``Overlap.CANCEL_PREVIOUS``: the latest (its job would cancel the earlier ones'),
      with ``cancel_previous`` when ``previous_running``.

    Every occurrence due counts as handled (``new_last_time`` is the latest), submitted
    or not, but for one cap: ``ALLOW`` submits at most :data:`MAX_SUBMITS_PER_PLAN`
    (only a ``grace`` of minutes lets so many be on time); then the handled ones end
    with the last submitted and ``more`` is set, so the rest come with the next plan.
    Only the latest missed occurrence is looked for, not each, so a schedule every
    second that was down for a week plans quickly. A paused schedule plans nothing.

    Args:
        schedule: the schedule as stored.
        now: the time (aware).
        previous_running: the job of ``schedule.last_job_id`` has not ended.
        grace: seconds an occurrence may be late and still count as on time.
    """
    start = schedule.last_time or schedule.create_time
    if schedule.paused or start is None:
        return Plan()
    now = _utc(now)
    latest = _latest_before(schedule, start, now + _TICK)
    if latest is None:
        return Plan()
    edge = now - timedelta(seconds=grace)  # found before this: missed
    missed = None
    if schedule.catchup is Catchup.ONE:
        missed = latest if latest < edge else _latest_before(schedule, start, edge)
    on_time = schedule.occurrences(max(_utc(start), edge - _TICK), now) if latest >= edge else iter(())
    if schedule.overlap is Overlap.ALLOW:
        kept = [missed] if missed is not None else []
        kept += itertools.islice(on_time, MAX_SUBMITS_PER_PLAN + 1 - len(kept))
        if len(kept) > MAX_SUBMITS_PER_PLAN:
            return Plan(kept[:MAX_SUBMITS_PER_PLAN], False, kept[MAX_SUBMITS_PER_PLAN - 1], more=True)
        return Plan(kept, False, latest)
    if schedule.overlap is Overlap.SKIP:
        first = missed if missed is not None else next(on_time, None)
        return Plan([first] if first is not None and not previous_running else [], False, latest)
    # CANCEL_PREVIOUS: the latest kept one.
    last = latest if latest >= edge else missed
    if last is None:
        return Plan([], False, latest)
    return Plan([last], previous_running, latest)


def _latest_before(schedule: Schedule, lower: datetime, upper: datetime) -> datetime | None:
    """The latest occurrence later than ``lower`` and earlier than ``upper``, or None.

    Looked for in growing windows that end at ``upper``, so a dense schedule is not
    iterated from a ``lower`` long ago, nor a sparse one window by window for long.
    """
    lower, upper = _utc(lower), _utc(upper)
    for window in (*_LOOK_BACK, None):
        start = lower if window is None else max(lower, upper - window)
        found = None
        for at in schedule.occurrences(start):
            if at >= upper:
                break
            found = at
        if found is not None or start == lower:
            return found
    return None
