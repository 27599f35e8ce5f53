"""Who holds the guest: the engine's one state table (h11's `_state.py` is the model).

Every change of hands is an event; `GuestState.move(event)` looks the pair (state, event) up in
`TRANSITIONS` and either moves or raises `IllegalTransition`. Nothing else in the engine writes the state,
so the table below is the whole story:

- DETACHED: no connection to the target (before attaching, after detaching).
- STOPPED: the engine holds the guest stopped for its own work: an interrupt it sent so queued requests
  (add, remove, enable...) run, or a stop no one wants.
- RUNNING: the guest runs freely after a `c`; the next stop may be anyone's.
- HIT: stopped for a probe hit: handlers run, then the probed instruction is stepped (or simulated).
- HELD: stopped and kept stopped by `hold()` or `--stopped`, until `resume()`.
- GDB: stopped for GDB: GDB saw the stop and holds the guest until it resumes it. GDB's own single-steps
  happen inside this state (one instruction of one CPU runs; no one else may act meanwhile).
- PARKED: stopped for GDB at a place where a probe hit too: the hit is recorded, and its instruction is
  stepped (post-handlers run) when GDB resumes.
- WAITING: the connection to the target was lost; probes are kept and the engine waits to reconnect
  (issue 10's reconnect lands here: `reconnected` goes back to STOPPED, where every probe is re-armed).
"""

from __future__ import annotations

import enum
import logging

__all__ = ["Guest", "Event", "GuestState", "IllegalTransition", "TRANSITIONS"]

log = logging.getLogger(__name__)


class Guest(enum.Enum):
    """Who holds the guest; the value is what `probectl status` shows as `guest`."""

    DETACHED = "detached"
    STOPPED = "stopped for the engine"
    RUNNING = "running"
    HIT = "stopped for a probe hit"
    HELD = "held stopped"
    GDB = "stopped for GDB"
    PARKED = "stopped for GDB, a probe hit parked"
    WAITING = "waiting for the target"

    __hash__ = object.__hash__  # (members are singletons: Enum's own hash is a Python call, at every hit)


class Event(enum.Enum):
    ATTACHED = "attached"  # the connection is up and the guest stopped
    RESUMED = "resumed"  # a `c` went: the guest runs freely
    STOPPED = "stopped"  # a stop arrived, or the engine stopped the guest for itself
    HIT = "hit"  # a stop is a probe hit (breakpoint or watchpoint); handlers run next
    HIT_DONE = "hit done"  # the hit is published, the guest stays stopped
    HOLD = "hold"  # `hold()` / `--stopped` keeps the guest stopped
    TO_GDB = "to GDB"  # a stop was given to GDB
    PARK = "park"  # a probe hit waits for GDB's resume
    GDB_RESUMED = "GDB resumed"  # GDB let the guest go (its `c`), or detached
    LOST = "lost"  # the connection to the target went away
    RECONNECTED = "reconnected"
    DETACHED = "detached"

    __hash__ = object.__hash__


G, E = Guest, Event
_STOPPED_ANYHOW = (G.STOPPED, G.HIT, G.HELD, G.GDB, G.PARKED)

TRANSITIONS: dict[Guest, dict[Event, Guest]] = {
    G.DETACHED: {E.ATTACHED: G.STOPPED},
    G.STOPPED: {
        E.RESUMED: G.RUNNING,
        E.HIT: G.HIT,
        E.HOLD: G.HELD,
        E.TO_GDB: G.GDB,
        E.GDB_RESUMED: G.STOPPED,
    },
    G.RUNNING: {
        E.STOPPED: G.STOPPED,
    },
    G.HIT: {
        E.HIT_DONE: G.STOPPED,
        E.RESUMED: G.RUNNING,  # the hit's last write carried the `c`
        E.PARK: G.PARKED,
        E.HIT: G.HIT,  # the probed instruction itself touched a watched address
    },
    G.HELD: {
        E.HOLD: G.HELD,
        E.RESUMED: G.RUNNING,
        E.TO_GDB: G.GDB,
        E.GDB_RESUMED: G.STOPPED,
    },
    G.GDB: {
        E.HOLD: G.GDB,
        E.HIT: G.HIT,  # GDB's step from a probe's address fires that probe
        E.TO_GDB: G.GDB,
        E.PARK: G.PARKED,  # a hit parked at an earlier stop of another CPU still waits
        E.GDB_RESUMED: G.STOPPED,
    },
    G.PARKED: {
        E.HOLD: G.PARKED,
        E.HIT: G.HIT,  # GDB resumes or steps: a parked hit completes (or GDB's step hits a probe)
        E.TO_GDB: G.PARKED,
        E.GDB_RESUMED: G.STOPPED,
    },
    G.WAITING: {E.RECONNECTED: G.STOPPED},
}
# From anywhere: the connection can drop, and the engine can detach.
for _state, _moves in TRANSITIONS.items():
    if _state is not G.DETACHED:
        _moves.setdefault(E.LOST, G.WAITING)
    _moves.setdefault(E.DETACHED, G.DETACHED)


class IllegalTransition(RuntimeError):
    """An event that cannot happen in the current state: a bug in the engine, never the user's doing."""

    def __init__(self, state: Guest, event: Event):
        self.state, self.event = state, event
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "none"
        super().__init__(f"{event.value!r} while the guest is {state.value} (allowed: {allowed})")


class GuestState:
    """The current holder of the guest, moved only through `TRANSITIONS`."""

    def __init__(self) -> None:
        self.state = Guest.DETACHED

    def move(self, event: Event) -> Guest:
        """Apply `event`; returns the new state.

        Raises:
            IllegalTransition: `event` is not allowed from the current state.
        """
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        self.state = new
        return new

    @property
    def stopped(self) -> bool:
        return self.state in _STOPPED_ANYHOW

    @property
    def summary(self) -> str:
        """The coarse word `probectl status` has always shown: running, stopped, detached or waiting."""
        if self.state is Guest.RUNNING:
            return "running"
        if self.state is Guest.DETACHED:
            return "detached"
        if self.state is Guest.WAITING:
            return "waiting for the target"
        return "stopped"

    def __repr__(self) -> str:
        return f"GuestState({self.state.name})"
