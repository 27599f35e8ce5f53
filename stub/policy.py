"""What the GDB stub forwards to QEMU and which monitor commands it refuses: the stub's policy, in one place.

QEMU 7.2 answers only the packets it handles (`FORWARDED`); anything else gets the empty reply from QEMU, or
no reply at all (a bare `q`, `v`, `Q`, `F...`), so the stub answers those itself. Monitor commands in
`REFUSED_MONITOR` would end, reset, pause or resume the VM behind the engine's back, or take its gdbstub
away; the stub refuses them unless it was made with `allow_monitor=True`.
"""

from __future__ import annotations

from rsp.commands import (
    CurrentThread,
    Query,
    ReadRegister,
    ReadRegisters,
    SetThread,
    ThreadAlive,
    ThreadExtraInfo,
    VContQuery,
    WriteMemory,
    WriteRegister,
    WriteRegisters,
    XferRead,
)

__all__ = ["FORWARDED", "FORWARDED_QUERIES", "REFUSED_MONITOR", "forwarded", "monitor_refusal"]

FORWARDED = (
    ReadRegisters, WriteRegisters, ReadRegister, WriteRegister, WriteMemory, SetThread, ThreadAlive,
    ThreadExtraInfo, VContQuery, CurrentThread,
)
"""Commands forwarded to QEMU as they are (when the stub does not answer them itself): what QEMU 7.2 answers."""
FORWARDED_QUERIES = frozenset({"qqemu.sstepbits", "qqemu.sstep"})
"""Generic queries QEMU answers (`Qqemu.sstep=` is not one: the engine's steps rely on QEMU's step flags)."""

REFUSED_MONITOR = {
    "quit": "it ends QEMU",
    "q": "it ends QEMU",
    "system_reset": "it resets the guest",
    "system_powerdown": "it shuts the guest down",
    "system_wakeup": "it resumes a suspended guest",
    "stop": "it pauses the guest behind probed's back",
    "cont": "it resumes the guest behind probed's back",
    "c": "it resumes the guest behind probed's back",
    "gdbserver": "it moves or ends the gdbstub probed speaks to",
    "loadvm": "it replaces the guest's whole state",
    "migrate": "it moves the guest away and ends it here",
    "migrate_incoming": "it replaces the guest's whole state",
}
"""HMP commands refused through the stub (unless allowed), and why: each ends, resets, pauses or resumes the
VM behind the engine's back, or takes its gdbstub away. HMP names a command by its first word, exactly."""


def monitor_refusal(command: str) -> str | None:
    """Why the stub refuses this monitor command (None: it may run)."""
    words = command.split(None, 1)
    why = REFUSED_MONITOR.get(words[0]) if words else None
    if why is None:
        return None
    return f"probed refuses 'monitor {words[0]}' through its GDB stub: {why} (see --gdb-allow-monitor)"



def forwarded(cmd: object) -> bool:
    """Whether QEMU answers this command (so it is forwarded); see `FORWARDED`."""
    if isinstance(cmd, FORWARDED):
        return True
    if isinstance(cmd, XferRead):
        return cmd.object == "features"
    return isinstance(cmd, Query) and cmd.name in FORWARDED_QUERIES
