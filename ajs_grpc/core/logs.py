"""Logging: plain text or JSON lines, to stderr or a file, each record with its request id.

The request id of the job or call being handled lives in a context variable, so
every log line written while handling it carries it, whatever module writes it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "PlainFormatter", "current_request_id", "setup_logging"]

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ajs_request_id", default="")
"""The request being handled by this task (set by the dispatcher and the service)."""


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Formats ``record`` as one line of JSON."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class PlainFormatter(logging.Formatter):
    """One line per record: control characters in the message are escaped.

    Messages carry what clients and jobs wrote (a failure's text, an id); a newline in
    one must not forge a line of its own. A traceback still follows on its own lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the logging API's name
        """Formats ``record`` with its message's control characters escaped."""
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "info", style: str = "plain", file: str = "") -> None:
    """Configures the root logger for ``ajs serve``."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
