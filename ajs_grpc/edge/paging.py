"""Pages of ListJobs and ListSchedules (AIP-158): opaque page tokens bound to their filters, the order, page sizes.

A token holds the store's cursor and a digest of the filters and order it was
issued for; a token used with other filters, or one this service did not issue,
is INVALID_ARGUMENT. A page ends early rather than outgrow the reply size limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from ajs_grpc.connectors.base import JobFilter
from ajs_grpc.core.errors import FieldViolation, InvalidArgument
from ajs_grpc.edge.validation import MAX_SEQUENCE, invalid

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "REPLY_OVERHEAD",
    "decode_key_token",
    "decode_page_token",
    "encode_key_token",
    "encode_page_token",
    "fit_page",
    "newest_first",
    "page_size",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Room a reply keeps for what is not a job (the page token, framing).
REPLY_OVERHEAD = 4096
_TOKEN_VERSION = 1
_Item = TypeVar("_Item", bound=Message)


def page_size(asked: int) -> int:
    """The page size to serve when ``asked`` (0: the default; capped at the maximum)."""
    return min(asked or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def newest_first(order_by: str) -> bool:
    """Whether ``order_by`` (AIP-132) asks for the newest jobs first."""
    words = order_by.split()
    if not words:
        return False
    if words[0] == "create_time" and len(words) <= 2 and words[1:] in ([], ["asc"], ["desc"]):
        return words[1:] == ["desc"]
    raise invalid([FieldViolation("order_by", 'must be "create_time" or "create_time desc"')])


def _filter_digest(job_filter: JobFilter, newest_first: bool = False) -> str:
    fields: list[object] = [
        sorted(int(s) for s in job_filter.states),
        sorted(job_filter.types),
        job_filter.parent_id,
        job_filter.creator,
    ]
    if newest_first:  # (tokens of the default order are as they always were)
        fields.append("desc")
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def encode_page_token(cursor: int, job_filter: JobFilter, newest_first: bool = False) -> str:
    """An opaque token for the page after ``cursor``, bound to the filter and order (AIP-158)."""
    digest = _filter_digest(job_filter, newest_first)
    body = json.dumps({"v": _TOKEN_VERSION, "c": cursor, "f": digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(token: str, job_filter: JobFilter, newest_first: bool = False) -> int:
    """The cursor of a page token.

    Raises:
        InvalidArgument: the token is malformed or was made for other filters.
    """
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        valid = isinstance(body, dict) and body.get("v") == _TOKEN_VERSION and type(body.get("c")) is int
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        valid = False
    if not valid or not 0 <= body["c"] <= MAX_SEQUENCE:
        raise InvalidArgument(
            "page_token is not a token this service issued",
            [FieldViolation("page_token", "malformed")],
            reason="INVALID_PAGE_TOKEN",
        )
    if body.get("f") != _filter_digest(job_filter, newest_first):
        raise InvalidArgument(
            "page_token was issued for different filters; repeat the filters of the first call",
            [FieldViolation("page_token", "does not match the filters")],
            reason="INVALID_PAGE_TOKEN",
        )
    cursor: int = body["c"]
    return cursor


def encode_key_token(after: str, scope: str) -> str:
    """An opaque token for the page after the item keyed ``after`` (a schedule id), bound to ``scope`` (whose list)."""
    body = json.dumps({"v": _TOKEN_VERSION, "k": after, "s": _scope_digest(scope)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_key_token(token: str, scope: str) -> str:
    """The key a page token of :func:`encode_key_token` starts after.

    Raises:
        InvalidArgument: the token is malformed or was issued for another scope (caller).
    """
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        valid = isinstance(body, dict) and body.get("v") == _TOKEN_VERSION and isinstance(body.get("k"), str)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        valid = False
    if not valid or body.get("s") != _scope_digest(scope):
        raise InvalidArgument(
            "page_token is not a token this service issued for this caller",
            [FieldViolation("page_token", "malformed")],
            reason="INVALID_PAGE_TOKEN",
        )
    key: str = body["k"]
    return key


def _scope_digest(scope: str) -> str:
    return hashlib.sha256(json.dumps(["key", scope]).encode()).hexdigest()[:16]


def fit_page(
    items: Sequence[_Item], cursors: Sequence[int], next_cursor: int | None, max_reply_bytes: int
) -> tuple[list[_Item], int | None]:
    """The items of a page (jobs, or their Operations) that fit in a reply, and the cursor after the last one kept.

    A page ends early rather than outgrow the message size limit; it holds one item at least.
    """
    budget = max_reply_bytes - REPLY_OVERHEAD
    kept: list[_Item] = []
    for index, item in enumerate(items):
        budget -= item.ByteSize() + 8
        if budget < 0 and kept:
            return kept, cursors[index - 1]
        kept.append(item)
    return kept, next_cursor
