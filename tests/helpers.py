"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Waits until ``check()`` is true; fails the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"still false after {within}s: {check}")
        await asyncio.sleep(0.005)
