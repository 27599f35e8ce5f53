"""Probes and hook points: what the engine knows about each probe, and which ones share an address.

A hook point is one address on the target with one breakpoint (or one watchpoint) and any number of
probes hanging on it, run in order of priority, then of addition. Removing one probe leaves the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from probed.errors import NotFound
from probed.guest.symbols import Location
from probed.lang.handlers import Handler

__all__ = ["HookPoint", "Probe", "ProbeTable", "FAULT_LIMIT"]

FAULT_LIMIT = 10
"""Consecutive handler faults after which a probe is disabled."""


@dataclass(eq=False)
class Probe:
    """One probe: a location, a pre-handler, an optional post-handler, and its counters.

    `kind` is "break" (a breakpoint, software or `hw`), "watch" (a data watchpoint with `length` and
    `access` in "w", "r", "rw") or "user" (a user-space probe on a file: `location.address` is the offset
    into the file, `file_tag` names the file's inode; see probed.engine.uprobes). A breakpoint probe with
    `retprobe` is a return probe: its breakpoint is at the function's entry, and its handler runs at the
    function's return (`probed.engine.returns`), with at most `maxactive` calls in flight at once.
    """

    id: int
    name: str
    spec: str
    location: Location
    kind: str = "break"
    pre: Handler | None = None
    post: Handler | None = None
    condition: Any = None  # a probed.lang.filter.Filter, or None
    priority: int = 0
    hw: bool = False
    length: int = 0
    access: str = "w"
    retprobe: bool = False
    maxactive: int = 0
    enabled: bool = True
    disabled_reason: str | None = None
    hits: int = 0
    missed: int = 0
    faults: int = 0
    fault_run: int = 0
    filtered: int = 0
    last_value: int | None = None  # watchpoints: the last value seen at the address
    # Why the probe has no address yet (its module is not loaded): it waits, uninstalled, until a guest
    # model (probed.guest.linux.modules) resolves it and clears this.
    pending: str | None = None
    internal: bool = False  # the daemon's own (a guest model's hook): not listed, no hit records
    file_tag: str = ""  # user probes: "inode:ADDR" of the probed file
    where: str = ""  # user probes: the place in the file, for records ("/bin/utarget:utarget")
    timeout: float | None = None  # Python handlers' time limit in seconds (None: the engine's default)
    order: int = field(default=0, repr=False)

    @property
    def address(self) -> int:
        return self.location.address

    @property
    def state(self) -> str:
        if self.pending:
            return f"pending: {self.pending}"
        if self.enabled:
            return "enabled"
        return f"disabled: {self.disabled_reason}" if self.disabled_reason else "disabled"

    @property
    def point_key(self) -> tuple[str, int, int, str]:
        """What makes two probes share one hook point (and one breakpoint or watchpoint)."""
        if self.pending:
            return ("pending", self.id, 0, "x")  # a point of its own that is never installed
        if self.kind == "watch":
            return ("watch", self.address, self.length, self.access)
        if self.kind == "user":
            return ("user", self.address, 0, self.file_tag)
        return ("hbreak" if self.hw else "break", self.address, 0, "x")

    def info(self) -> dict[str, Any]:
        """The row `probectl list` shows."""
        return {
            "id": self.id,
            "name": self.name,
            "spec": self.spec,
            "address": None if self.pending else (self.where if self.kind == "user" else f"{self.address:#x}"),
            "hits": self.hits,
            "missed": self.missed,
            "faults": self.faults,
            "state": self.state,
            **({"retprobe": True, "maxactive": self.maxactive} if self.retprobe else {}),
        }


@dataclass(eq=False)
class HookPoint:
    """An address with one breakpoint or watchpoint and the probes that share it."""

    key: tuple[str, int, int, str]
    probes: list[Probe] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def address(self) -> int:
        return self.key[1]

    def active(self) -> list[Probe]:
        """The enabled probes that have an address, in the order their handlers run."""
        return [p for p in self.probes if p.enabled and not p.pending]

    def add(self, probe: Probe) -> None:
        self.probes.append(probe)
        self.probes.sort(key=lambda p: (-p.priority, p.order))


class ProbeTable:
    """All probes, by id and name, grouped into hook points."""

    def __init__(self) -> None:
        self._by_id: dict[int, Probe] = {}
        self.points: dict[tuple[str, int, int, str], HookPoint] = {}
        self._next_id = 1
        self._next_internal_id = -1

    def new_id(self, internal: bool = False) -> int:
        """A fresh id: users' probes count 1, 2, 3...; the daemon's own hooks -1, -2... so they never take
        an id a user would see (the first probe a user adds is 1, whatever the guest model hooked)."""
        if internal:
            pid = self._next_internal_id
            self._next_internal_id -= 1
            return pid
        pid = self._next_id
        self._next_id += 1
        return pid

    def __iter__(self):
        return iter(sorted(self._by_id.values(), key=lambda p: p.id))

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, probe: Probe) -> HookPoint:
        """File a probe under its hook point (created when new)."""
        probe.order = probe.id
        self._by_id[probe.id] = probe
        point = self.points.get(probe.point_key)
        if point is None:
            point = self.points[probe.point_key] = HookPoint(probe.point_key)
        point.add(probe)
        return point

    def remove(self, probe: Probe) -> HookPoint:
        """Take a probe out; returns its hook point (now maybe empty, and then forgotten)."""
        del self._by_id[probe.id]
        point = self.points[probe.point_key]
        point.probes.remove(probe)
        if not point.probes:
            del self.points[probe.point_key]
        return point

    def find(self, ref: int | str) -> Probe:
        """A probe by id (int or digits) or by name.

        Raises:
            NotFound: no such probe.
        """
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            probe = self._by_id.get(int(ref))
            if probe is not None:
                return probe
        for probe in self._by_id.values():
            if probe.name == ref:
                return probe
        raise NotFound(f"probe {ref!r}")

    def get(self, pid: int) -> Probe | None:
        """A probe by id, or None."""
        return self._by_id.get(pid)

    def name_taken(self, name: str) -> bool:
        return any(p.name == name for p in self._by_id.values())

    def breakpoint_at(self, address: int) -> HookPoint | None:
        """The software or hardware breakpoint hook point at `address`, if any."""
        return self.points.get(("break", address, 0, "x")) or self.points.get(("hbreak", address, 0, "x"))

    def active_at(self, address: int) -> list[Probe]:
        """The enabled probes of the software and hardware breakpoints at `address`, in handler order."""
        probes = [
            p for kind in ("break", "hbreak") if (pt := self.points.get((kind, address, 0, "x"))) for p in pt.active()
        ]
        if len(probes) > 1:
            probes.sort(key=lambda p: (-p.priority, p.order))
        return probes

    def watch_points(self) -> list[HookPoint]:
        return [p for p in self.points.values() if p.kind == "watch"]
