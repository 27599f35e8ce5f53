"""Poll or sleep: which way to wait for a peer's next bytes, chosen by what each way has cost lately.

A process woken from epoll takes some tens of microseconds to run again, about as long as a whole exchange
with a gdbstub; polling the socket for a while instead sees the bytes at once, when a core is free for
the peer meanwhile. When none is (a host full of VMs, the normal case), polling takes the core the peer
needs to answer, and every exchange costs a scheduler time slice instead. No fixed rule gets both right,
so `PollChooser` measures: it keeps a moving average of the wait each way cost (from the start of the wait
to the bytes), takes the cheaper way, and now and then (at random, so that a periodic exchange does not
always try the same step) the other way, to notice when the host changes.

Sans-IO: the caller passes the times in (`rsp.connection.RSPClient` and `stub.server.GdbSession` use it).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["PollChooser"]


class PollChooser:
    """Chooses, wait by wait, between polling the socket for `window` seconds and sleeping in epoll.

    Attributes:
        window: how long a poll lasts before the wait sleeps as usual (0: never poll).
        cost: the moving average of the seconds a wait took, polling (True) and sleeping (False); None
            until that way was tried.
    """

    WEIGHT = 1 / 4
    """How much one wait moves the average: the last few dozen waits of a way make up its picture, so a host
    that frees up is noticed within a few hundred waits (the other way is tried one wait in 16)."""
    EXPLORE = 1 / 16
    """Share of the waits made the other way, to keep its average current."""
    LONGEST = 0.005
    """A wait counts as at most this long. Polling behind a busy core costs about a time slice (a few ms)
    a wait, which this still shows; a longer wait is the peer's own time (a guest that ran, a person at
    GDB's prompt), which says nothing about the way of waiting and must not swamp the short ones."""

    def __init__(self, window: float, *, seed: int | None = None, free_cores: Callable[[float], float | None] | None = None):
        self.window = window
        self.free_cores = free_cores  # (now) -> free cores lately; under one, no poll (see rsp.hostcores)
        self.cost: dict[bool, float | None] = {True: None, False: None}
        self._random = random.Random(seed)
        self._started: float | None = None
        self._polled = False

    def begin(self, now: float) -> float:
        """A wait starts at `now`: returns until when to poll (`now` or earlier: do not poll)."""
        if self.window <= 0:
            return 0.0
        if self.free_cores is not None:
            free = self.free_cores(now)
            if free is not None and free < 1.0:
                self._started = None  # (not a sample of either way's cost)
                return 0.0
        poll, sleep = self.cost[True], self.cost[False]
        if poll is None or sleep is None:
            self._polled = poll is None  # each way once, polling first
        else:
            self._polled = poll <= sleep
            if self._random.random() < self.EXPLORE:
                self._polled = not self._polled
        self._started = now
        return now + self.window if self._polled else 0.0

    def end(self, now: float) -> None:
        """The wait begun last ended at `now` (the bytes came): its cost goes into that way's average."""
        if self._started is None:
            return
        waited = min(now - self._started, self.LONGEST)
        self._started = None
        old = self.cost[self._polled]
        self.cost[self._polled] = waited if old is None else old + (waited - old) * self.WEIGHT

    @property
    def polling(self) -> bool:
        """Whether polling is the way taken now (the cheaper one so far)."""
        poll, sleep = self.cost[True], self.cost[False]
        return self.window > 0 and (poll is None or sleep is None or poll <= sleep)
