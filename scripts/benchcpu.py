"""What the machine's CPUs did while a benchmark ran: the lab's hosts share them
with the tool, so a figure taken with every CPU busy is bounded by CPU work (the
hosts' own sshd and commands included), not by waiting.

    with MachineCpu() as cpu:
        ...
    print(cpu)  # "CPU 9.3 s of 10.3 s (90% busy)"
"""

from __future__ import annotations

import os
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_idle() -> tuple[int, int]:
    """The machine's busy and idle jiffies since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, idle


class MachineCpu:
    """Busy CPU seconds of the whole machine, every process and the kernel, over a
    ``with`` block; with ``every`` seconds, also how busy it was in each such slice
    (``timeline``: where a long run waited rather than computed)."""

    def __init__(self, every: float | None = None):
        self.every = every
        self.timeline: list[float] = []
        self._done = threading.Event()

    def __enter__(self) -> "MachineCpu":
        self._busy, self._idle = _busy_idle()
        self._start = time.monotonic()
        if self.every:
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        last = _busy_idle()
        while not self._done.wait(self.every):
            now = _busy_idle()
            busy, idle = now[0] - last[0], now[1] - last[1]
            self.timeline.append(busy / (busy + idle) if busy + idle else 0.0)
            last = now

    def __exit__(self, *exc) -> None:
        self._done.set()
        busy, idle = _busy_idle()
        self.wall = time.monotonic() - self._start
        self.busy = (busy - self._busy) / _TICK
        self.capacity = self.wall * (os.cpu_count() or 1)
        self.share = self.busy / self.capacity if self.capacity else 0.0

    def timeline_text(self) -> str:
        """The slices' busy shares in tens of percent, one digit a slice ("9" = 90-100%)."""
        return "".join(str(min(9, int(share * 10))) for share in self.timeline)

    def __str__(self) -> str:
        return f"CPU {self.busy:.1f} s of {self.capacity:.1f} s ({self.share:.0%} busy)"
