"""A Linux guest that reboots under probed: seen, waited for, and its probes placed again in the new kernel.

Probes belong to a symbol and an offset, not to an address. When the kernel behind the target is another
boot (KASLR picked another slide, modules load elsewhere, processes are new), every address probed set is
wrong, so this component takes them out, waits for the new kernel and places them again.

How a reboot is seen:
- In place (the connection stays: a `reboot` in the guest, a triple fault, QEMU's `system_reset`): one
  breakpoint of ours at the x86 reset vector (linear 0xfffffff0, where every reset starts, in real mode).
  Every path goes there (the kernel's reboot through the keyboard controller, ACPI or port 0xcf9, a watchdog,
  QEMU's monitor), and under TCG a breakpoint costs nothing while it is not hit. QEMU 7.2 keeps gdbstub
  breakpoints across a reset (`x86_cpu_reset` drops only the guest's own debug-register points), so the
  probes' breakpoints are still set at the old kernel's addresses when the reset comes: they are taken out
  at that stop, before the firmware runs. (A hook on `machine_restart`/`emergency_restart` would miss a
  reset the kernel does not ask for; a check at each hit would cost every hit a read.)
- Behind a reconnect (QEMU killed and started again, or another VM on the same socket): the boot's identity
  is read again after attaching: `_text` (the slide), the randomized bases of the direct map, vmalloc and
  vmemmap (CONFIG_RANDOMIZE_MEMORY), and the boot CPU's stack canary (`init_task.stack_canary`, 64 random
  bits per boot) when the kernel's BTF was read. The same VM (a frozen QEMU, a dropped socket) has the same
  identity; a CPU not in long mode, or no kernel mapped, is a reboot too.

Then (`begin`): every probe waits (`pending`: "the guest rebooted..."), module probes wait for their module,
return-probe instances and user-probe mappings are dropped, and the breakpoints go at the next reconcile.
The guest runs on; every `POLL_SECONDS` it is stopped to see whether the new kernel is up far enough: the
CPU in long mode with paging, `_text` found (`kaslr.find_kernel_text`), the same build (its banner where the
old build had it: the build is checked before anything is read at the new slide), and `system_state` past
SYSTEM_BOOTING (the scheduler runs; per-CPU areas, the module list and the root file system are set up).
Then (`place_again`): the kernel's symbol files move to the new slide (files are checked again, as at
attach), modules are read again, every probe is placed by its symbol and offset at the new address, fetch
args naming `@SYM` are compiled again, user probes find their file again (or wait for it to appear), and
the breakpoints are set. Another build is refused (`KernelMismatch`): its probes stay, unarmed, and
`probectl status` says why. Hit `seq` goes on through all of it.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probed.errors import ProbedError, TargetError
from probed.guest.linux.kaslr import KERNEL_MAP, KernelMismatch, find_kernel_text
from probed.guest.linux.memory import read_batch
from probed.guest.symbols import Location
from probed.lang.context import RegisterView

if TYPE_CHECKING:
    from probed.engine.engine import Engine
    from probed.engine.probes import Probe
    from probed.guest.linux.kernel import LinuxKernel

__all__ = ["POLL_SECONDS", "RESET_VECTOR", "BootIdentity", "Reboots"]

log = logging.getLogger(__name__)

RESET_VECTOR = 0xFFFF_FFF0
"""Where an x86 CPU starts after a reset: CS base 0xffff0000 + IP 0xfff0 (QEMU matches breakpoints on it)."""

POLL_SECONDS = 0.2
"""How often the guest is stopped to look for the new kernel while it boots."""

FULL_LOOK_EVERY = 5
"""While the CPU is met outside the kernel's mapping, the kernel is looked for at one poll in this many."""

WAITING = "the guest rebooted: waiting for its new kernel"
CR0_PE = 1 << 0
CR0_PG = 1 << 31
EFER_LMA = 1 << 10
SYSTEM_SCHEDULING = 1  # enum system_states: SYSTEM_BOOTING, SYSTEM_SCHEDULING, ...
MODULES_VADDR = 0xFFFF_FFFF_C000_0000
RANDOMIZED_BASES = ("page_offset_base", "vmalloc_base", "vmemmap_base")
KERNEL_HALF = 1 << 63  # x86_64 kernel addresses (4- and 5-level paging) all lie above


@dataclass(frozen=True)
class BootIdentity:
    """What tells one boot from another: `_text`, the randomized memory bases, the boot stack canary."""

    text: int
    bases: tuple[int | None, ...]
    canary: int | None

    def same_boot(self, other: BootIdentity) -> bool:
        """Whether both were read from one boot (a value one of them could not read is not compared)."""
        def same(a: int | None, b: int | None) -> bool:
            return a is None or b is None or a == b

        return (self.text == other.text and all(same(a, b) for a, b in zip(self.bases, other.bases, strict=True))
                and same(self.canary, other.canary))


def in_long_mode(regs: RegisterView) -> bool:
    """Whether the CPU runs 64-bit code with paging (else it is in firmware, a boot loader or a trampoline)."""
    try:
        return bool(regs["cr0"] & CR0_PG) and bool(regs["efer"] & EFER_LMA)
    except KeyError:
        return False


def at_reset_vector(regs: RegisterView, pc: int) -> bool:
    """Whether a stop is at the reset vector, in real mode (a reset, not a process that runs code there)."""
    try:
        return pc in (RESET_VECTOR, RESET_VECTOR & 0xFFFF) and not regs["cr0"] & CR0_PE
    except KeyError:
        return False


class Reboots:
    """The reboot watch of one engine on a Linux guest (`engine.reboot`).

    Attributes:
        waiting: the guest rebooted and its new kernel is not placed yet (the service polls).
        error: why the probes stay unarmed (another build), else None.
        reboots: reboots seen.
        last: what happened at the last one, for `probectl status`.
        identity: the boot the probes are placed in.
    """

    def __init__(self, engine: Engine, kernel: LinuxKernel):
        self.engine = engine
        self.kernel = kernel
        self.waiting = False
        self.error: str | None = None
        self.reboots = 0
        self.last: str | None = None
        self.identity: BootIdentity | None = None
        self.poll_seconds = POLL_SECONDS
        self._unplaced: list[Probe] = []
        self._why = ""
        self._since = 0.0
        self._old_text: int | None = None
        self._polls = 0

    # -- what the engine asks -----------------------------------------------------------------------

    def wanted(self) -> set[tuple[str, int, int, str]]:
        """The reset-vector breakpoint (`Breakpoints.wanted` adds it)."""
        return {("break", RESET_VECTOR, 0, "x")} if self.identity is not None else set()

    def owns(self, pc: int) -> bool:
        return self.identity is not None and pc in (RESET_VECTOR, RESET_VECTOR & 0xFFFF)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reboots": self.reboots}
        if self.waiting:
            out["reboot"] = f"{self._why}; waiting for its new kernel ({time.monotonic() - self._since:.1f} s)"
        elif self.error is not None:
            out["reboot"] = self.error
        elif self.last is not None:
            out["reboot"] = self.last
        return out

    async def remember(self) -> None:
        """Read the identity of the boot the probes are placed in (after the model is set up)."""
        self.identity = await self._identity(self.kernel.text)
        self._keep_translations()

    def _keep_translations(self) -> None:
        """Tell direct reads that the kernel half's upper page-table levels stay put in this boot (its top
        entries are made at boot and shared by every process): where a kernel page's last entries lie is
        kept across stops, and only those entries are read again (`GuestMemory.keep_translations`)."""
        memory = self.engine.target.memory if self.engine.target is not None else None
        if memory is not None and self.identity is not None:
            memory.keep_translations([(KERNEL_HALF, 1 << 64)])

    # -- seeing a reboot ---------------------------------------------------------------------------

    async def on_reset(self, g: bytes, pc: int) -> bool:
        """A stop at the reset vector: True when it is a reset (then the reboot has begun)."""
        if not at_reset_vector(RegisterView(self.engine.target, g), pc):
            return False
        self.begin("the guest reset in place (its CPU at the reset vector)")
        return True

    async def after_reconnect(self) -> None:
        """After attaching again: the same boot carries on, else the reboot begins."""
        if self.identity is None or self.waiting:
            return
        if self.error is not None:
            self.begin("the target came back (the probes waited for the right kernel build)")
            return
        g = await self.engine.target.read_g()
        if not in_long_mode(RegisterView(self.engine.target, g)):
            self.begin("the target came back with its CPU out of long mode (a new boot)")
            return
        try:
            text = await find_kernel_text(self.kernel.memory)
        except TargetError:
            self.begin("the target came back with no kernel mapped (a new boot)")
            return
        now = await self._identity(text)
        if not now.same_boot(self.identity):
            what = "another KASLR slide" if now.text != self.identity.text else "another boot of the kernel"
            self.begin(f"the target came back with {what}")

    async def _identity(self, text: int) -> BootIdentity:
        engine = self.engine
        delta = text - self.kernel.text
        spans = []
        for name in RANDOMIZED_BASES:
            address = _address(engine, name)
            spans.append((address + delta, 8) if address is not None else (0, 0))
        canary_at = self._canary_address()
        spans.append((canary_at + delta, 8) if canary_at is not None else (0, 0))
        found = await read_batch(self.kernel.memory, [s for s in spans if s[1]])
        values: list[int | None] = []
        it = iter(found)
        for span in spans:
            data = next(it) if span[1] else None
            values.append(struct.unpack("<Q", data)[0] if data is not None and len(data) == 8 else None)
        return BootIdentity(text, tuple(values[:-1]), values[-1])

    def _canary_address(self) -> int | None:
        types = self.engine.types
        init_task = _address(self.engine, "init_task")
        if types is None or init_task is None:
            return None
        try:
            member = types.btf.member(types.btf.struct("task_struct"), "stack_canary")
        except LookupError:
            return None  # no CONFIG_STACKPROTECTOR
        return init_task + member.bit_offset // 8

    # -- the reboot --------------------------------------------------------------------------------

    def begin(self, why: str) -> None:
        """The kernel is gone: every probe waits, nothing stale stays armed; polling for the new kernel starts."""
        engine = self.engine
        if self.waiting:
            log.info("linux: %s again while the new kernel boots", why)  # (firmware and kernel reset more than once)
            return
        log.warning("linux: %s: taking the probes out until the new kernel is up", why)
        self.waiting, self.error, self._why, self._since = True, None, why, time.monotonic()
        if self._old_text is None:
            self._old_text = self.kernel.text
        table = engine.table
        modules = self.kernel.modules
        if modules is not None:
            modules.forget_all("the guest rebooted")
        for probe in list(table):
            engine.returns.forget(probe)
            if probe.pending:
                continue  # waits for its module already (or for this)
            engine.breakpoints.give_back(probe.point_key)
            table.remove(probe)
            probe.pending = WAITING
            table.add(probe)
            self._unplaced.append(probe)
        engine.uprobes.forget_all()
        engine.break_hits.forget_places()
        if engine.target is not None and engine.target.memory is not None:
            engine.target.memory.forget_boot()  # KPTI or not is the new kernel's choice
        debugger = engine.debugger
        if debugger is not None:
            debugger.forget_registers()
            debugger.memory.clear()
        engine.breakpoints.dirty = True

    async def poll(self) -> None:
        """While waiting (the guest stopped by the service): place the probes once the new kernel is up."""
        try:
            text = await self._new_kernel()
            if text is not None:
                await self.place_again(text)
        except KernelMismatch as exc:
            self.waiting, self.error = False, f"{self._why}; probes kept but not armed: {exc}"
            log.error("linux: %s", self.error)
        except TargetError as exc:  # a read the booting kernel refused: look again at the next poll
            log.debug("linux: the new kernel is not readable yet: %s", exc)

    async def _new_kernel(self) -> int | None:
        """The new kernel's `_text` once it is up far enough to place probes in; None while it boots.

        Raises:
            KernelMismatch: it is up, and another build.
        """
        engine, kernel = self.engine, self.kernel
        g = await engine.target.read_g()
        regs = RegisterView(engine.target, g)
        if not in_long_mode(regs):
            return None
        self._polls += 1
        if engine.target.pc_of(g) < KERNEL_MAP and self._polls % FULL_LOOK_EVERY:
            # Not in the kernel's own mapping yet (the decompressor runs in long mode too, identity-mapped):
            # the 512-slot scan would find nothing and keep the guest stopped meanwhile. (Now and then it
            # is done anyway: a guest met in user mode at every poll.)
            return None
        try:
            text = await find_kernel_text(kernel.memory)
        except TargetError:
            return None
        delta = text - kernel.text
        if kernel.banner is not None:
            (banner,) = await read_batch(kernel.memory, [(kernel.banner_address + delta, len(kernel.banner))])
            if banner is None:
                return None
            if banner != kernel.banner:
                shown = banner.split(b"\0", 1)[0][:100]
                raise KernelMismatch(f"the new kernel is another build (at _text+{kernel.banner_address - kernel.text:#x} "
                                     f"it has {shown!r}, not the banner of {kernel.banner[:60]!r}...)")
        state_at = _address(engine, "system_state")
        if state_at is not None:
            (raw,) = await read_batch(kernel.memory, [(state_at + delta, 4)])
            if raw is None or struct.unpack("<I", raw)[0] < SYSTEM_SCHEDULING:
                return None
        return text

    async def place_again(self, text: int) -> None:
        """Move the model to the kernel at `text` and place every waiting probe there.

        Raises:
            KernelMismatch: a kernel symbol file does not fit the new kernel.
        """
        engine, kernel = self.engine, self.kernel
        old_text = self._old_text if self._old_text is not None else kernel.text
        await kernel.move_to(engine, text)
        if kernel.modules is not None:
            await kernel.modules.rescan()
        placed, waiting = 0, 0
        unplaced, self._unplaced = self._unplaced, []
        for probe in unplaced:
            if engine.table.get(probe.id) is not probe:
                continue  # removed meanwhile
            engine.table.remove(probe)
            try:
                if probe.kind == "user":
                    ok = await engine.uprobes.place_again(probe)
                else:
                    probe.location = _relocated(engine, probe.location, text - old_text)
                    probe.pending = None
                    ok = True
                if ok:
                    _recompile(engine, probe)
                    if probe.enabled and (probe.hw or probe.kind == "watch"):
                        engine.breakpoints.take_slot(probe)
                    if probe.kind == "watch" and probe.enabled:
                        probe.last_value = await engine.watch.current_value(probe)
            except ProbedError as exc:
                probe.pending = f"the guest rebooted, and: {exc}"
                ok = False
            engine.table.add(probe)
            if not probe.internal:  # (the model's own hooks are not counted for the user)
                placed += ok
                waiting += not ok
        self.identity = await self._identity(text)
        self._keep_translations()
        self.waiting, self._old_text = False, None
        self.reboots += 1
        self.last = (f"{self._why}; guest rebooted, kernel at new slide {kernel.slide:#x}; {placed} probe(s) re-placed"
                     + (f", {waiting} waiting" if waiting else "")
                     + f" ({time.monotonic() - self._since:.1f} s after it went)")
        log.warning("linux: %s", self.last)
        engine.breakpoints.dirty = True


def _address(engine: Engine, name: str) -> int | None:
    try:
        return engine.symbols.lookup(name).address
    except ProbedError:
        return None


def _relocated(engine: Engine, location: Location, delta: int) -> Location:
    """A kernel probe's location in the new kernel: by symbol and offset; a bare address in the kernel image
    moves with the slide.

    Raises:
        TargetError: a bare address outside the kernel image (it cannot be followed).
    """
    if location.symbol is not None:
        return engine.symbols.relocate(location)
    if KERNEL_MAP <= location.address < MODULES_VADDR:
        return Location(location.spec, location.file, None, location.offset, location.address + delta)
    raise TargetError(f"{location.address:#x} is outside the kernel image: remove the probe and add it again")


def _recompile(engine: Engine, probe: Probe) -> None:
    """Fetch args naming `@SYM` were compiled to the old boot's addresses: compile them again."""
    for attr in ("pre", "post"):
        handler = getattr(probe, attr)
        rebuilt = getattr(handler, "rebuilt", None)
        if rebuilt is not None and any("@" in arg for arg in handler.args):
            setattr(probe, attr, rebuilt(engine.arch, engine.symbols))

