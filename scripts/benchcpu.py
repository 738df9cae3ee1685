"""What the machine's CPUs did while a benchmark ran: the lab's hosts share them
with the tool, so a figure taken with every CPU busy is bounded by CPU work (the
hosts' own sshd and commands included), not by waiting.

    with MachineCpu() as cpu:
        ...
    print(cpu)  # "CPU 9.3 s of 10.3 s (90% busy)"
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_idle() -> tuple[int, int]:
    """The machine's busy and idle jiffies since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, idle


class MachineCpu:
    """Busy CPU seconds of the whole machine, every process and the kernel, over a ``with`` block."""

    def __enter__(self) -> "MachineCpu":
        self._busy, self._idle = _busy_idle()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy, idle = _busy_idle()
        self.wall = time.monotonic() - self._start
        self.busy = (busy - self._busy) / _TICK
        self.capacity = self.wall * (os.cpu_count() or 1)
        self.share = self.busy / self.capacity if self.capacity else 0.0

    def __str__(self) -> str:
        return f"CPU {self.busy:.1f} s of {self.capacity:.1f} s ({self.share:.0%} busy)"
