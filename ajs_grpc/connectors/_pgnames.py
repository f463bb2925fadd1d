"""PostgreSQL names the connector derives from its schema (no driver needed, so configuration can check them)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["channel_name", "check_schema_name"]

# PostgreSQL keeps identifiers of at most 63 bytes (NAMEDATALEN - 1) and reserves "pg_".
_SCHEMA = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def check_schema_name(schema: str) -> str:
    """Returns ``schema`` if it can name the queue's schema.

    Raises:
        ValueError: what is wrong with it.
    """
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"{schema!r} is not a schema name: use 1-63 letters, digits and _, not starting with a digit")
    if schema.lower().startswith("pg_"):
        raise ValueError(f"{schema!r} is not a schema name: names starting with pg_ are PostgreSQL's")
    return schema


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's queue: always a valid, short identifier."""
    return f"ajs_events_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"
