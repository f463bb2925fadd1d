"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

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
