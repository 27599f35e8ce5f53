"""How many of the host's cores are free lately, for the decision to poll (`rsp.polling`).

Polling a socket pays only while a core is free for it: otherwise the poll takes the core that the peer
(GDB, QEMU) or another process needs, and the poller, having used its share, is then scheduled behind
them. `FreeCores` reads the kernel's counters (`/proc/stat`: idle time of all cores; `/proc/self/stat`:
this process's own time, which a poll would give back) at most every `interval` seconds.
"""

from __future__ import annotations

import os

__all__ = ["FreeCores"]


class FreeCores:
    """Cores idle or used by this process over the last interval (None where /proc cannot be read)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._at: float | None = None
        self._last: tuple[int, int, int] | None = None
        self._free: float | None = None
        self._cores = len(os.sched_getaffinity(0)) or 1

    def free(self, now: float) -> float | None:
        """Free cores (0 to the number of cores) as last measured; measured again when `interval` passed."""
        if self._at is not None and now - self._at < self.interval:
            return self._free
        self._at = now
        sample = _sample()
        if sample is None:
            return None
        if self._last is not None:
            total = sample[0] - self._last[0]
            idle = sample[1] - self._last[1] + sample[2] - self._last[2]
            if total > 0:
                cpus = os.cpu_count() or self._cores
                self._free = min(self._cores, max(0.0, cpus * idle / total))
        self._last = sample
        return self._free


def _sample() -> tuple[int, int, int] | None:
    """(all cores' ticks, idle ticks, this process's ticks), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
        with open("/proc/self/stat", "rb") as f:
            own = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + ticks[4], int(own[11]) + int(own[12])
