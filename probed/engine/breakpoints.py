"""Breakpoint reconciliation: the target's breakpoints and watchpoints made to match what is wanted.

What is wanted: every hook point with an enabled probe, plus GDB's breakpoints and watchpoints. Changes are
sent in one write (`Z`/`z` built by `rsp.packets`), optionally followed by the `c` that resumes the guest.
Hardware breakpoints and watchpoints take a debug-register slot from the `SlotAllocator`, owned by "probe"
or "gdb"; the slot is given back when the point is removed.

A hook point is keyed `(kind, address, length, access)`: kind "break", "hbreak" or "watch", access "x"
for breakpoints and "w", "r", "rw" for watchpoints. `Z_TYPES` is the one map between those keys and the
`Z` packet's type number, both ways.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import TYPE_CHECKING

from probed.engine.probes import Probe
from probed.engine.slots import Slot, SlotAllocator
from probed.errors import ProbedError, TargetError, Unsupported
from rsp.errors import RSPError, UnsupportedPacket
from rsp.packets import Z_KEYS, Z_TYPES, BreakpointType, insert_breakpoint, raise_for_error, remove_breakpoint

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["Breakpoints", "PointKey", "Z_TYPES", "key_for_z", "refused"]

log = logging.getLogger("probed.engine.engine")

PointKey = tuple[str, int, int, str]

# The one map of hook-point kinds to `Z` types lives with the packets (rsp.packets.Z_TYPES).
_KEY_OF_Z = Z_KEYS


def key_for_z(ztype: int, address: int, kind: int) -> PointKey:
    """The hook-point key of a `Z` packet (the same key a probe at that place uses)."""
    point_kind, access = _KEY_OF_Z[BreakpointType(ztype)]
    return (point_kind, address, kind if point_kind == "watch" else 0, access)


def refused(key: PointKey, exc: RSPError) -> ProbedError:
    """The typed error for a `Z` the target refused: unsupported (empty reply) or refused (`E NN`)."""
    kind, address, _length, access = key
    if isinstance(exc, UnsupportedPacket):
        return Unsupported(f"the target does not support {kind} ({access}) points: {exc}")
    return TargetError(f"the target refused the {kind} at {address:#x}: {exc}")


class Breakpoints:
    """The breakpoints and watchpoints installed on the target, and the slots they hold."""

    def __init__(self, engine: Engine, slots: SlotAllocator):
        self.engine = engine
        self.slots = slots
        self.installed: dict[PointKey, bytes] = {}  # key -> the `Z` packet that installed it
        self.slot_of: dict[PointKey, Slot] = {}  # probes' hardware points -> their slot
        self.dirty = False  # a probe was disabled by the pipeline: reconcile at the next chance
        # When every breakpoint probe's pre-handler reads registers only, a hit may read `g` and step in
        # one write (see `BreakHits`).
        self.pipeline_step = True

    def z_packet(self, key: PointKey, insert: bool) -> bytes:
        kind, address, length, access = key
        size = length if kind == "watch" else self.engine.arch.breakpoint_kind
        build = insert_breakpoint if insert else remove_breakpoint
        return build(Z_TYPES[(kind, access)], address, size)

    def wanted(self) -> set[PointKey]:
        want = self._probes_own()
        want |= self.engine.uprobes.wanted()  # user probes: an address per process mapping, and kernel hooks
        want |= self.engine.returns.keys()  # return addresses (probed.engine.returns)
        if self.engine.reboot is not None:
            want |= self.engine.reboot.wanted()  # the reset vector (probed.guest.linux.reboot)
        if self.engine.debugger is not None:
            want |= self.engine.debugger.keys()
        return want

    def engine_owns(self, pc: int) -> bool:
        """Whether a breakpoint at `pc` is wanted by the engine itself (the owners of `wanted` but GDB):
        a stop there is never GDB's alone."""
        engine = self.engine
        return bool(engine.table.active_at(pc) or engine.uprobes.owns(pc) or engine.returns.armed(pc)
                    or (engine.reboot is not None and engine.reboot.owns(pc)))

    def watching(self) -> bool:
        """Whether a watchpoint is set or about to be (probes' or the debugger's)."""
        # (Not through `wanted`, which also works out user probes' addresses: this is asked at every simulated
        # step, and only probes and GDB set watchpoints.)
        debugger = self.engine.debugger
        keys = chain(self.installed, self._probes_own(), debugger.keys() if debugger is not None else ())
        return any(k[0] == "watch" for k in keys)

    def _probes_own(self) -> set[PointKey]:
        """The points of probes themselves (kernel breakpoints and watchpoints; user probes' are per process)."""
        return {key for key, point in self.engine.table.points.items() if point.active() and point.kind != "user"}

    def pending_changes(self) -> set[PointKey]:
        """Breakpoints and watchpoints to insert or remove to match what is wanted."""
        return self.wanted() ^ set(self.installed)

    async def reconcile(self, resume: bytes | None = None) -> list[tuple[PointKey, ProbedError]]:
        """Make the target's breakpoints match what is wanted, in one write.

        With `resume`, that command follows the changes in the same write (the guest runs after it).

        Returns:
            The insertions the target refused, with their errors (those points stay uninstalled).
        """
        client = self.engine.client
        want = self.wanted()
        removals = [key for key in self.installed if key not in want]
        inserts = [key for key in want if key not in self.installed]
        for key in removals:
            self.slots.free(self.slot_of.pop(key, None))
        packets = [self.z_packet(k, insert=False) for k in removals] + [self.z_packet(k, insert=True) for k in inserts]
        failures: list[tuple[PointKey, ProbedError]] = []
        if resume is not None and not packets:
            await client.resume(resume)
        if packets:
            replies = await client.pipeline(packets, resume=resume)
            for key in removals:
                del self.installed[key]
            for key, packet, reply in zip(inserts, packets[len(removals) :], replies[len(removals) :], strict=True):
                try:
                    raise_for_error(reply, packet)
                    if reply != b"OK":
                        raise TargetError(f"unexpected reply {reply[:20]!r} to {packet!r}")
                except RSPError as exc:
                    failures.append((key, refused(key, exc)))
                except TargetError as exc:
                    failures.append((key, exc))
                else:
                    self.installed[key] = packet
        # (A return probe's entry reads memory: the return address.)
        self.pipeline_step = all(
            not (p.retprobe or (p.pre is not None and p.pre.needs_memory))
            for point in self.engine.table.points.values()
            if point.kind != "watch"
            for p in point.active()
        )
        return failures

    def take_slot(self, probe: Probe) -> Slot | None:
        """A slot for a hardware probe whose point is not installed and holds none yet; else None."""
        key = probe.point_key
        if (probe.kind == "watch" or probe.hw) and key not in self.installed and key not in self.slot_of:
            slot = self.slot_of[key] = self.slots.allocate("probe", probe.name, _slot_use(probe))
            return slot
        return None

    def give_back(self, key: PointKey) -> None:
        self.slots.free(self.slot_of.pop(key, None))

    async def install(self, probe: Probe) -> None:
        """File a probe and install its hook point; undo everything if the target refuses."""
        table = self.engine.table
        slot = self.take_slot(probe)
        point = table.add(probe)
        for key, exc in await self.reconcile():
            if key == point.key:
                table.remove(probe)
                if slot is not None:
                    self.give_back(point.key)
                await self.reconcile()
                raise exc

    def removal_packets(self) -> list[bytes]:
        """The `z` packets that remove everything installed (at shutdown); forgets them."""
        packets = [self.z_packet(key, insert=False) for key in self.installed]
        self.installed.clear()
        return packets


def _slot_use(probe: Probe) -> str:
    return f"{'watch' if probe.kind == 'watch' else 'hbreak'} {probe.spec}"
