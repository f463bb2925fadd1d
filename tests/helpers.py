"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

from ajs_grpc.core.model import now

T = TypeVar("T")


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Waits until ``check()`` is true; fails the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"still false after {within}s: {check}")
        await asyncio.sleep(0.005)


async def eventually_reads(read: Callable[[], Awaitable[T]], check: Callable[[T], bool], within: float = 5.0) -> T:
    """Reads until ``check(read())`` is true and returns what was read; fails after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check(value := await read()):
        if loop.time() > deadline:
            raise AssertionError(f"still false after {within}s: {check} of {value!r}")
        await asyncio.sleep(0.01)
    return value


def eventually_sync(check: Callable[[], bool], within: float = 10.0, every: float = 0.05) -> None:
    """:func:`eventually` for tests without an event loop (processes, the ``ajs`` command)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {within}s: {check}")
        time.sleep(every)


class FakeClock:
    """A connector's clock (its ``clock`` argument) that a test moves forward instead of sleeping.

    It reads the real time plus how far the test advanced it, so times the model
    takes from the real clock (a submit's, a retry's) stay consistent with it.
    """

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return now() + self.offset

    def advance(self, seconds: float) -> None:
        """Moves the clock ``seconds`` forward: leases and due times run out as if they had passed."""
        self.offset += timedelta(seconds=seconds)
