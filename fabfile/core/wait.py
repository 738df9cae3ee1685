"""Waiting with a deadline: poll something until it holds, or fail with a
message that says what was awaited, for how long, and what was seen last."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class TimedOut(Exception):
    """What was awaited did not come in time; the message says what and the last state."""


def poll(read: Callable[[], T], until: Callable[[T], bool], *, timeout: float, what: str,
         interval: float = 2.0, describe: Callable[[T], str] = str,
         give_up: Callable[[T, float], str | None] | None = None,
         error: type[Exception] = TimedOut, sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> T:
    """Call ``read()`` every ``interval`` seconds until ``until(value)``; return
    that value. After ``timeout`` seconds raise ``error`` naming ``what`` and the
    last value (``describe``). ``give_up(value, elapsed)`` may end the wait early
    by returning a reason (a process that died, say)."""
    started = clock()
    while True:
        value = read()
        if until(value):
            return value
        elapsed = clock() - started
        if give_up is not None:
            reason = give_up(value, elapsed)
            if reason:
                raise error(f"gave up waiting for {what}: {reason}")
        if elapsed >= timeout:
            raise error(f"{what}: not reached after {timeout:.0f}s (last: {describe(value)})")
        sleep(interval)
