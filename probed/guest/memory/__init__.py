"""Guest memory read directly from QEMU's process where probed runs on QEMU's host (`/proc/PID/mem`), with
the stub's `m` as the fallback: QEMU's pid (`qemu_process`), its RAM map (`ram`), x86 page walks
(`pagewalk`) and the reader the target uses (`reader`)."""

from probed.guest.memory.qemu_process import GuestMemoryUnavailable
from probed.guest.memory.reader import MODES, GuestMemory, open_guest_memory

__all__ = ["GuestMemory", "GuestMemoryUnavailable", "MODES", "open_guest_memory"]
