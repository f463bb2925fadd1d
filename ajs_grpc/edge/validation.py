"""Input checks of the JobService: every bad field of a call, named, in one InvalidArgument.

Nothing here looks at the store or the caller: a message is valid or not by itself.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message

from ajs_grpc.core.errors import AjsError, FieldViolation, InvalidArgument
from ajs_grpc.core.model import Request
from ajs_grpc.core.schedules import MAX_SCHEDULE_ID_LENGTH, Schedule, check_schedule
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import ANONYMOUS
from ajs_grpc.edge.limits import Limits
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_DEPENDENCIES",
    "MAX_ID_LENGTH",
    "MAX_SEQUENCE",
    "MAX_TYPE_LENGTH",
    "at_index",
    "check_id",
    "check_queue",
    "check_type",
    "invalid",
    "parse",
    "queue_name",
    "required_id",
    "validate_request",
    "validate_schedule",
    "view",
]

MAX_ID_LENGTH = 128
MAX_TYPE_LENGTH = 128
# Request.depends_on holds at most so many ids.
MAX_DEPENDENCIES = 100
# Request.max_attempts at most (the type's caps it anyway; this bounds what is stored).
MAX_ATTEMPTS = 1000
# The longest google.protobuf.Duration (about 10,000 years).
MAX_DURATION_SECONDS = 315_576_000_000
NANOS = 1_000_000_000
# Stores keep sequences and cursors as signed 64-bit integers.
MAX_SEQUENCE = 2**63 - 1
# The longest resume token (WatchJobs) a client may send back; the server's are far shorter.
MAX_TOKEN_LENGTH = 200
# Ids: printable ASCII without spaces. Types: names such as "echo" or "images.resize".
_ID = re.compile(r"[!-~]+")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")

In = TypeVar("In", bound=Message)


def parse(message_type: type[In], raw: bytes) -> In:
    """The message in ``raw``; INVALID_ARGUMENT (not gRPC's UNKNOWN) when it does not decode."""
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError as error:
        raise InvalidArgument(
            f"the {message_type.DESCRIPTOR.name} could not be decoded: {error}",
            reason="UNDECODABLE_REQUEST",
        ) from None
    return message


def at_index(index: int, error: AjsError, field: str = "requests") -> AjsError:
    """``error`` of the item at ``index`` of a batch: said of ``requests[index]``, its fields under it.

    The message starts with ``requests[3]: ``, field violations name ``requests[3].request.type``
    (AIP-233), and the index is in the metadata (``index``) for errors without fields.
    """
    prefix = f"{field}[{index}]"
    renamed = error.restated(f"{prefix}: {error.message}", {**error.metadata, "index": str(index)})
    if isinstance(renamed, InvalidArgument):
        renamed.violations = [FieldViolation(f"{prefix}.{v.field}", v.description) for v in renamed.violations]
    return renamed


def invalid(violations: list[FieldViolation]) -> InvalidArgument:
    """The error listing ``violations``."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid request: {summary}", violations, reason="INVALID_FIELDS")


def _check_text(value: str, field: str, violations: list[FieldViolation], what: str = "") -> None:
    """PostgreSQL's text and jsonb cannot hold U+0000: no store takes it, whatever the connector."""
    if "\x00" in value:
        violations.append(FieldViolation(field, f"{what}must not contain U+0000 (NUL): no store can keep it"))


def _quoted(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut short: errors travel in trailers, which are small."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def check_id(value: str, field: str, violations: list[FieldViolation], *, required: bool) -> None:
    """Adds a violation if ``value`` is not a request id (or empty when ``required``)."""
    if not value:
        if required:
            violations.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > MAX_ID_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_ID_LENGTH} characters"))
    elif not _ID.fullmatch(value):
        violations.append(FieldViolation(field, "must be printable ASCII without spaces"))


# The most values one filter field (types, queues, states) may list: a stream's filter is applied at
# every read, and nobody needs more.
MAX_FILTER_VALUES = 100


def check_filter_values(
    values: Sequence[Any],
    field: str,
    violations: list[FieldViolation],
    check: Callable[[Any, str, list[FieldViolation]], None] | None = None,
) -> None:
    """Adds violations if ``values`` (a repeated filter field) are too many, or one fails ``check``."""
    if len(values) > MAX_FILTER_VALUES:
        violations.append(FieldViolation(field, f"must list at most {MAX_FILTER_VALUES} values"))
        return
    if check is not None:
        for index, value in enumerate(values):
            check(value, f"{field}[{index}]", violations)


def check_type(value: str, field: str, violations: list[FieldViolation]) -> None:
    """Adds a violation if ``value`` is not a job type name."""
    if not value:
        violations.append(FieldViolation(field, "must not be empty"))
    elif len(value) > MAX_TYPE_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_TYPE_LENGTH} characters"))
    elif not _TYPE.fullmatch(value):
        violations.append(
            FieldViolation(field, "must start with a letter or digit and hold only letters, digits and _.:/-")
        )


def check_queue(value: str, field: str, violations: list[FieldViolation], *, required: bool) -> None:
    """Adds a violation if ``value`` is not a queue name (named as job types are), or empty when ``required``."""
    if value or required:
        check_type(value, field, violations)


def queue_name(value: str, field: str = "name") -> str:
    """``value``, a queue name that must be there.

    Raises:
        InvalidArgument: with a field violation on ``field``.
    """
    violations: list[FieldViolation] = []
    check_queue(value, field, violations, required=True)
    if violations:
        raise invalid(violations)
    return value


def required_id(value: str, field: str = "request_id") -> str:
    """``value``, a request id that must be there."""
    violations: list[FieldViolation] = []
    check_id(value, field, violations, required=True)
    if violations:
        raise invalid(violations)
    return value


def view(value: int, default: int) -> int:
    """The JobView asked for (AIP-157), ``default`` when unspecified."""
    if value == pb.JOB_VIEW_UNSPECIFIED:
        return default
    if value not in (pb.JOB_VIEW_BASIC, pb.JOB_VIEW_FULL):
        raise invalid([FieldViolation("view", f"unknown job view {value}")])
    return value


def _check_time(message: Message, name: str, field: str, violations: list[FieldViolation]) -> None:
    """Adds a violation if the Timestamp field ``name`` of ``message`` is set but no time."""
    if not message.HasField(name):
        return
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    try:
        stamp.ToDatetime()
    except (ValueError, OverflowError) as error:
        violations.append(FieldViolation(field, f"is not a valid time: {error}"))


def _check_timeout(message: pb.Request, field: str, violations: list[FieldViolation]) -> None:
    """Adds a violation if ``message.timeout`` is set but not a positive duration within the Duration range."""
    if not message.HasField("timeout"):
        return
    seconds, nanos = message.timeout.seconds, message.timeout.nanos
    if not -NANOS < nanos < NANOS or (seconds and nanos and (seconds < 0) != (nanos < 0)):
        violations.append(FieldViolation(field, "is not a valid duration"))
    elif seconds < 0 or (seconds == 0 and nanos <= 0):
        violations.append(FieldViolation(field, "must be positive (unset: the type's timeout)"))
    elif seconds > MAX_DURATION_SECONDS:
        violations.append(FieldViolation(field, f"must be at most {MAX_DURATION_SECONDS} seconds"))


def _check_dependencies(message: pb.Request, field: str, violations: list[FieldViolation]) -> None:
    """Adds a violation for each bad entry of ``message.depends_on`` (ids, at most MAX_DEPENDENCIES, no repeats)."""
    depends_on = message.depends_on
    if len(depends_on) > MAX_DEPENDENCIES:
        violations.append(FieldViolation(field, f"has {len(depends_on)} ids, more than {MAX_DEPENDENCIES}"))
        return
    seen: set[str] = set()
    for index, dependency in enumerate(depends_on):
        where = f"{field}[{index}]"
        check_id(dependency, where, violations, required=True)
        if dependency in seen:
            violations.append(FieldViolation(where, f"repeats {_quoted(dependency)}"))
        elif dependency and dependency == message.id:
            violations.append(FieldViolation(where, "a request cannot depend on itself"))
        seen.add(dependency)


def validate_request(message: pb.Request, limits: Limits | None = None, *, field: str = "request") -> Request:
    """The model Request for a submitted one, server-set fields filled in.

    Args:
        message: the request as submitted.
        limits: the sizes allowed.
        field: the path of ``message`` in the call, which violations name (``request.type``).

    Raises:
        InvalidArgument: listing every bad field.
    """
    limits = limits or Limits()
    violations: list[FieldViolation] = []
    if len(message.data) > limits.max_data_entries:
        violations.append(
            FieldViolation(f"{field}.data", f"has {len(message.data)} entries, more than {limits.max_data_entries}")
        )
    elif (size := sum(len(k.encode()) + len(v.encode()) for k, v in message.data.items())) > limits.max_data_bytes:
        violations.append(FieldViolation(f"{field}.data", f"holds {size} bytes, more than {limits.max_data_bytes}"))
    else:
        for key, value in message.data.items():
            _check_text(key + value, f"{field}.data", violations, f"entry {_quoted(key)} ")
    check_id(message.id, f"{field}.id", violations, required=False)
    check_id(message.parent_id, f"{field}.parent_id", violations, required=False)
    if message.id and message.parent_id == message.id:
        violations.append(FieldViolation(f"{field}.parent_id", "a request cannot be its own parent"))
    check_type(message.type, f"{field}.type", violations)
    check_queue(message.queue, f"{field}.queue", violations, required=False)
    if message.HasField("input"):
        _check_text(message.input.type_url, f"{field}.input.type_url", violations)
    _check_dependencies(message, f"{field}.depends_on", violations)
    for name in ("run_after", "expire_time"):
        _check_time(message, name, f"{field}.{name}", violations)
    if not 0 <= message.max_attempts <= MAX_ATTEMPTS:
        violations.append(FieldViolation(f"{field}.max_attempts", f"must be between 0 (the type's) and {MAX_ATTEMPTS}"))
    _check_timeout(message, f"{field}.timeout", violations)
    if violations:
        raise invalid(violations)
    request = convert.request_from_proto(message)
    return dataclasses.replace(request, id=request.id or str(uuid.uuid4()), creator=ANONYMOUS.name, create_time=None)


def validate_schedule(message: pb.Schedule, limits: Limits | None = None, field: str = "schedule") -> Schedule:
    """The model Schedule for one to create (server-set fields left out), its template checked as a submit's.

    The cron expression and time zone are checked by the core
    (:func:`~ajs_grpc.core.schedules.check_schedule`); violations name ``{field}.cron`` etc.

    Raises:
        InvalidArgument: listing every bad field.
    """
    violations: list[FieldViolation] = []
    if len(message.id) > MAX_SCHEDULE_ID_LENGTH:  # its jobs' ids add the occurrence's time to it
        violations.append(FieldViolation(f"{field}.id", f"must be at most {MAX_SCHEDULE_ID_LENGTH} characters"))
    else:
        check_id(message.id, f"{field}.id", violations, required=True)
    try:  # the cron expression and the time zone, as the core reads them
        check_schedule(Schedule(message.id, message.cron, Request("", "-"), time_zone=message.time_zone or "UTC"))
    except InvalidArgument as error:
        violations += [
            FieldViolation(f"{field}.{v.field.removeprefix('schedule.')}", v.description) for v in error.violations
        ]
    template = message.template
    where = f"{field}.template"
    if not message.HasField("template"):
        violations.append(FieldViolation(where, "is required"))
    set_fields = {
        "id": bool(template.id),
        "parent_id": bool(template.parent_id),
        "run_after": template.HasField("run_after"),
        "depends_on": bool(template.depends_on),
        "expire_time": template.HasField("expire_time"),
    }
    for name, is_set in set_fields.items():
        if is_set:  # each occurrence sets these itself
            violations.append(FieldViolation(f"{where}.{name}", "must be unset in a schedule's template"))
    request: Request | None = None
    if message.HasField("template"):
        try:
            request = validate_request(template, limits, field=where)
        except InvalidArgument as error:
            violations.extend(error.violations)
    try:
        convert.overlap_from_proto(message.overlap_policy, f"{field}.overlap_policy")
    except InvalidArgument as error:
        violations.extend(error.violations)
    try:
        convert.catchup_from_proto(message.catchup_policy, f"{field}.catchup_policy")
    except InvalidArgument as error:
        violations.extend(error.violations)
    if violations:
        raise invalid(violations)
    assert request is not None
    schedule, _ = convert.schedule_from_proto(message)
    return dataclasses.replace(
        schedule,
        template=dataclasses.replace(request, id="", creator=""),
        paused=False,
        creator="",
        create_time=None,
        update_time=None,
        last_time=None,
        last_job_id="",
    )
