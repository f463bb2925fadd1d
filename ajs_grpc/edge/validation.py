"""Input checks of the JobService: every bad field of a call, named, in one InvalidArgument.

Nothing here looks at the store or the caller: a message is valid or not by itself.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ajs_grpc.core.errors import AjsError, FieldViolation, InvalidArgument
from ajs_grpc.core.model import Request
from ajs_grpc.edge import convert
from ajs_grpc.edge.auth import ANONYMOUS
from ajs_grpc.edge.limits import Limits
from ajs_grpc.proto.ajs.v1 import job_service_pb2 as pb

__all__ = [
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
    "view",
]

MAX_ID_LENGTH = 128
MAX_TYPE_LENGTH = 128
# Stores keep sequences and cursors as signed 64-bit integers.
MAX_SEQUENCE = 2**63 - 1
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


def validate_request(message: pb.Request, limits: Limits | None = None) -> Request:
    """The model Request for a submitted one, server-set fields filled in.

    Raises:
        InvalidArgument: listing every bad field.
    """
    limits = limits or Limits()
    violations: list[FieldViolation] = []
    if len(message.data) > limits.max_data_entries:
        violations.append(
            FieldViolation("request.data", f"has {len(message.data)} entries, more than {limits.max_data_entries}")
        )
    elif (size := sum(len(k.encode()) + len(v.encode()) for k, v in message.data.items())) > limits.max_data_bytes:
        violations.append(FieldViolation("request.data", f"holds {size} bytes, more than {limits.max_data_bytes}"))
    else:
        for key, value in message.data.items():
            _check_text(key + value, "request.data", violations, f"entry {_quoted(key)} ")
    check_id(message.id, "request.id", violations, required=False)
    check_id(message.parent_id, "request.parent_id", violations, required=False)
    if message.id and message.parent_id == message.id:
        violations.append(FieldViolation("request.parent_id", "a request cannot be its own parent"))
    check_type(message.type, "request.type", violations)
    check_queue(message.queue, "request.queue", violations, required=False)
    if message.HasField("input"):
        _check_text(message.input.type_url, "request.input.type_url", violations)
    try:
        request = convert.request_from_proto(message)
    except (ValueError, OverflowError) as error:  # a Timestamp out of range
        violations.append(FieldViolation("request.run_after", f"is not a valid time: {error}"))
    if violations:
        raise invalid(violations)
    return dataclasses.replace(request, id=request.id or str(uuid.uuid4()), creator=ANONYMOUS.name, create_time=None)
