"""Durations as people write them in configuration and code: ``30s``, ``5m``, ``7d``."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*")


def parse_duration(value: object) -> float:
    """Seconds in a number or a string such as ``30s``, ``5m``, ``7d``.

    Raises:
        ValueError: not a positive duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (found := _DURATION.fullmatch(value)):
        seconds = float(found.group(1)) * _UNITS[found.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration such as 30s, 5m or 7d, not {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def format_duration(seconds: float | None) -> str:
    """A duration as a person writes it: the largest unit it is a whole number of (``7d``, ``30s``, ``1.5s``)."""
    if seconds is None:
        return "forever"
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _UNITS[unit]
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"
