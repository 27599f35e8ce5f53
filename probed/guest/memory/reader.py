"""The Target's memory reads: guest RAM read directly where probed may, else the stub's `m`, fewer of them.

`GuestMemory.read_many` is what `Target.read_many` calls. Two ways to a byte:
- direct: the address is translated with the stopped CPU's page tables (`pagewalk`), and the guest-physical
  bytes are read from QEMU's process (`ram`). A read that does not translate (not present: the stub would
  answer `E14`) or is not all RAM (MMIO) goes to the stub, so every reply is the one `m` would give.
- the stub: `m` packets, all of one call in one write (`Target.read_many_stub`); within one stop (one hit's
  reads, `scope`), what was read is kept and served again (several probes at one place, a string read in
  steps, a field inside an earlier read).

Linux with KPTI: at a stop on a process's user PGD, the kernel's half is read through its kernel PGD
(`kpti`): directly, or with our own walk over the stub's physical mode.

Direct reads are checked against `m` when opened (at the pc and the stack of the stop), on the first reads
and then on one call in `CHECK_EVERY`; a mismatch switches to the stub for good and says why in the log and
in `reason`.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from probed.errors import TargetError
from probed.guest.memory.kpti import (
    HALF_BYTES,
    USER_PGD_BIT,
    PhysicalThroughStub,
    kernel_half,
    mirrors,
    not_mapped,
    pair_roots,
)
from probed.guest.memory.pagewalk import ADDRESS_MASK, PageWalker, Paging, page_through
from probed.guest.memory.qemu_process import (
    GuestMemoryUnavailable,
    find_qemu_pid,
    open_process_memory,
    open_shared_backing,
)
from probed.guest.memory.ram import HostRam, RamRange, parse_flat_view, parse_gpa2hva
from rsp.connection import MAX_MEMORY_READ
from rsp.errors import RemoteError

__all__ = ["GuestMemory", "MODES", "open_guest_memory"]

log = logging.getLogger(__name__)

MODES = ("auto", "proc-mem", "gdbstub")
X86 = ("i386", "x86_64")
CHECK_FIRST = 8  # the first calls served directly are all checked against `m`
CHECK_EVERY = 64  # then one call in this many
CHECK_EVERY_READ = 256  # for single reads made at once (`read_now`, a hit's fetches): one in this many
CHECK_BYTES = 256  # how much of a checked read is compared
JOIN_GAP = 64  # reads this close in one page share one `m`
PAGE = 4096
DIRECT_WITHOUT_REGISTERS = 2048  # reads without a stop's registers go direct only from this size (a `g` first)
KPTI_VERDICTS = 4096  # page-table roots remembered as KPTI user PGDs or not (one per process seen)
KEPT_MAX = 1 << 16  # last-level tables kept across stops, at most (one per 2 MiB of kernel addresses)

_Reply = bytes | Exception


class _StopCache:
    """What the stub answered during one stop (the guest does not run meanwhile)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, bytes]] = []

    def get(self, address: int, length: int) -> bytes | None:
        end = address + length
        for start, data in reversed(self.ranges):
            if start <= address and end <= start + len(data):
                return data[address - start : end - start]
        return None

    def put(self, address: int, data: bytes) -> None:
        self.ranges.append((address, data))


class GuestMemory:
    """Memory reads for one attached target.

    Args:
        target: the `probed.engine.target.Target` (its layout, and `read_many_stub` for `m`).
        ram: QEMU's RAM, when it can be read directly; None for the stub only.
        reason: why the stub is used (None when direct).

    Attributes:
        direct: guest RAM is read directly.
        reason: why not, when not (also logged).
        stats: counters: `direct` and `stub` requests served, `cached` ones, `checks` made against `m`.
    """

    def __init__(self, target: Any, ram: HostRam | None, reason: str | None = None):
        self.target = target
        self.ram = ram
        self.reason = reason
        self._scope: Any = None
        self._walker: PageWalker | None = None
        self._fed_walker: PageWalker | None = None  # for walks through the stub's physical mode
        self._cache = _StopCache()
        self._kpti: dict[int, bool] = {}  # CR3 with bit 12 set -> whether it is a KPTI user PGD
        self._kpti_seen = False  # some CR3 was one: this guest runs with KPTI
        self._physical_reads: PhysicalThroughStub | None = None
        self._paging_of: tuple[bytes, Paging | None] | None = None  # the last register block's regime
        self._calls = 0
        self._reads_now = 0
        self._check_next = False  # a read made at once was due to be checked: the next read_many call checks
        # Kernel ranges whose upper page-table levels stay put (a Linux kernel's half): where a page's last two
        # entries lie is kept across stops, by 2 MiB granule (see `keep_translations`).
        self._lasting: tuple[tuple[int, int], ...] = ()
        self._kept: dict[int, tuple[int | None, int, int]] = {}  # 2 MiB granule -> PageWalker.leaf_table
        self._kept_seen: dict[int, tuple[int, int]] = {}  # this stop's, read through kept ones: page -> (base, size)
        self._mask = (1 << (8 * target.arch.word_size)) - 1  # (addresses wrap at the word size)
        self.stats = {"direct": 0, "stub": 0, "cached": 0, "checks": 0, "kpti": 0}

    @property
    def direct(self) -> bool:
        return self.ram is not None

    def describe(self) -> str:
        """One line for logs and status: how memory is read, and why."""
        if self.ram is not None:
            return f"guest RAM read directly ({self.ram.size >> 20} MiB RAM: {self.ram.describe()})"
        return f"guest memory read through the gdbstub ({self.reason})"

    def keep_translations(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Kernel virtual ranges `[start, end)` whose upper page-table levels stay put (a Linux kernel's half:
        made at boot, shared by every process): for them, where a page's last two entries lie is kept across
        stops, and a read reads those two entries, live, instead of walking four or five levels. A page made
        not present, repointed, a large page split, or pages merged into a large one (their table freed)
        are all seen in those two entries. Forgotten at a reboot (`forget_boot`); reads stay checked
        against `m`."""
        self._lasting = tuple((start, end) for start, end in ranges if start >> 63 and start < end)
        self._kept.clear()
        self._kept_seen = {}

    def _kept_translation(self, address: int) -> tuple[int, int] | None:
        page = address >> 12
        hit = self._kept_seen.get(page)  # (read live once per stop)
        if hit is None:
            kept = self._kept.get(address >> 21)
            if kept is None:
                return None
            hit = page_through(self.ram.read, kept, address)
            if hit is None:
                return None
            self._kept_seen[page] = hit
        base, size = hit
        offset = address & (size - 1)
        return base + offset, size - offset

    def _maps_kernel(self, paging: Paging) -> bool:
        """Whether `paging`'s root is known to map the kernel (not a KPTI user PGD, where `m` refuses kernel
        addresses that a kept translation would read)."""
        if paging.kind not in ("4-level", "5-level"):
            return False
        return not paging.cr3 & USER_PGD_BIT or self._kpti.get(paging.cr3 & ADDRESS_MASK) is False

    def _keep(self, paging: Paging, address: int) -> None:
        """Remember where the last two page-table entries of `address` lie, if it is in a lasting range."""
        if not any(s <= address < e for s, e in self._lasting):
            return
        leaf = self._walker.leaf_table(paging, address)
        if leaf is None:
            return
        if len(self._kept) >= KEPT_MAX:
            self._kept.clear()
        self._kept[address >> 21] = leaf

    def fall_back(self, reason: str) -> None:
        """Read through the stub from now on, and say why."""
        if self.ram is not None:
            log.warning("guest memory: reading through the gdbstub from now on: %s", reason)
            self.ram.close()
        self.ram = None
        self.reason = reason

    def close(self) -> None:
        """Let go of QEMU's memory (its `/proc/PID/mem`, and shared RAM mapped here, which a QEMU that
        exited would otherwise leave allocated); reads go through the stub from now on."""
        if self.ram is not None:
            self.ram.close()
        self.ram = None
        self.reason = self.reason or "closed"

    # -- reads ---------------------------------------------------------------------------------------

    async def read_many(
        self, requests: Sequence[tuple[int, int]], registers: bytes | None = None, scope: Any = None
    ) -> list[_Reply]:
        """Read each `(address, length)`; a failed read comes back as the stub's error.

        Args:
            requests: virtual addresses of the CPU that stopped, and lengths.
            registers: that CPU's `g` block at this stop (its control registers give the page tables); when
                None, small reads go to the stub, and big ones read `g` first.
            scope: an object that lives for one stop (a hit's context): reads with the same scope share
                translations and what the stub answered. None: nothing is kept beyond this call.
        """
        self._enter(scope)
        out: list[_Reply | None] = [None] * len(requests)
        # KPTI (once seen in this guest): at a stop on a user PGD, kernel addresses go through the kernel PGD
        # at once, without the `m` that would be refused first.
        root = None
        if registers is not None and self._kpti_seen and any(kernel_half(a) for a, _ in requests):
            root = await self.kernel_root(registers)
        through = [i for i, (a, _) in enumerate(requests) if kernel_half(a)] if root is not None else []
        rest = [i for i in range(len(requests)) if i not in through] if through else list(range(len(requests)))
        if self.ram is not None and rest:
            if registers is None and sum(requests[i][1] for i in rest) >= DIRECT_WITHOUT_REGISTERS:
                registers = await self.target.read_g()
            if registers is not None:
                part: list[_Reply | None] = [None] * len(rest)
                await self._read_direct([requests[i] for i in rest], registers, part)
                for i, reply in zip(rest, part, strict=True):
                    out[i] = reply
        todo = [i for i in rest if out[i] is None]
        if todo:
            await self._read_stub([requests[i] for i in todo], todo, out)
        # KPTI, not known yet for this stop: kernel reads `m` refused may be on a user PGD.
        refused = [i for i in todo if isinstance(out[i], RemoteError) and kernel_half(requests[i][0])]
        if refused and root is None:
            if registers is None:
                registers = await self.target.read_g()
            root = await self.kernel_root(registers)
            if root is not None:
                through = refused
        if through:
            await self._read_through(root, registers, through, requests, out)
        return out  # type: ignore[return-value]

    def read_now(self, address: int, length: int, registers: bytes, scope: Any = None) -> bytes | None:
        """One read from guest RAM, without a round trip or an await: the hot path of a hit's fetches.

        None when the stub must answer instead (no RAM, not translated, not RAM, a read at a KPTI stop) or
        when this read's turn has come to be checked against `m`: `read_many` does both.
        """
        if self.ram is None or registers is None:
            return None
        if self._calls < CHECK_FIRST or self._check_next:
            return None  # (read_many checks it)
        self._reads_now += 1
        if self._reads_now % CHECK_EVERY_READ == 0:
            self._check_next = True
            return None
        if self._kpti_seen and kernel_half(address):
            return None
        if scope is None or scope is not self._scope:
            self._enter(scope)
        paging = self._paging(registers)
        if paging is None:
            return None
        if self._walker is None:
            self._walker = PageWalker(self._read_phys)
        try:
            data = self._read_virtual(paging, address & self._mask, length)
        except OSError:
            return None  # (read_many says why and falls back)
        if data is not None:
            self.stats["direct"] += 1
        return data

    def _enter(self, scope: Any) -> None:
        """Reads for `scope` (one stop) begin: what was kept for another stop goes (None: kept by none)."""
        if scope is None or scope is not self._scope:
            self._scope = scope
            self._walker = None
            self._fed_walker = None
            self._cache = _StopCache()
            self._kept_seen = {}

    async def read_direct(self, address: int, length: int, registers: bytes) -> bytes | None:
        """One read from guest RAM only; None when it cannot be read there (the caller asks the stub, whose
        answer, an error included, is then the one to give).

        Translations are kept while `registers` is the same object (one stop of one CPU).
        """
        if self.ram is None:
            return None
        self._enter(registers)
        out: list[_Reply | None] = [None]
        await self._read_direct([(address, length)], registers, out)
        return out[0] if isinstance(out[0], bytes) else None

    # -- KPTI ----------------------------------------------------------------------------------------

    async def kernel_root(self, registers: bytes) -> int | None:
        """The kernel PGD (physical) when the stop runs on a KPTI user PGD; None when it runs on a root that
        maps the kernel itself (no KPTI, or a kernel PGD) or there is no CR3. Decided once per root."""
        paging = self._paging(registers)
        if paging is None or paging.kind not in ("4-level", "5-level") or not paging.cr3 & USER_PGD_BIT:
            return None
        cr3 = paging.cr3 & ADDRESS_MASK
        verdict = self._kpti.get(cr3)
        if verdict is None:
            kernel, user = pair_roots(cr3)
            halves = await self._read_physical([(kernel, HALF_BYTES), (user, HALF_BYTES)])
            if any(h is None for h in halves):
                return None  # not decided: asked again at the next read that needs it
            if len(self._kpti) >= KPTI_VERDICTS:
                self._kpti.clear()
            verdict = self._kpti[cr3] = mirrors(*halves)
            if verdict and not self._kpti_seen:
                self._kpti_seen = True
                log.info("guest memory: KPTI: kernel reads at stops on a user PGD go through its kernel PGD")
        return pair_roots(cr3)[0] if verdict else None

    def forget_boot(self) -> None:
        """The guest rebooted: which roots are KPTI user PGDs is asked again (the new kernel may not isolate)."""
        self._kpti.clear()
        self._kpti_seen = False
        self._lasting = ()
        self._kept.clear()
        self._kept_seen = {}

    async def address_space(self, registers: bytes) -> int | None:
        """The stop's address space as the kernel's `mm->pgd` names it (physical): CR3's page-table root without
        the PCID and NOFLUSH bits, and with KPTI the kernel PGD of the pair. None without CR3."""
        paging = self._paging(registers)
        if paging is None or paging.kind == "none":
            return None
        root = await self.kernel_root(registers)
        return root if root is not None else paging.cr3 & ADDRESS_MASK

    @property
    def _physical(self) -> PhysicalThroughStub:
        if self._physical_reads is None:
            self._physical_reads = PhysicalThroughStub(self.target.client)
        return self._physical_reads

    async def _read_physical(self, spans: list[tuple[int, int]]) -> list[bytes | None]:
        if self.ram is not None:
            try:
                return [self.ram.read(a, n) for a, n in spans]
            except OSError as exc:
                self.fall_back(f"reading /proc/PID/mem failed: {exc}")
        return await self._physical.read(spans)

    async def _read_through(self, root: int, registers: bytes, slots: list[int], requests: Sequence[tuple[int, int]],
                            out: list) -> None:
        """Read `requests[i]` for i in `slots` through the kernel PGD `root` instead of the CPU's CR3."""
        paging = replace(self._paging(registers), cr3=root)
        wanted = [requests[i] for i in slots]
        self.stats["kpti"] += len(wanted)
        if self.ram is not None:
            if self._walker is None:
                self._walker = PageWalker(self._read_phys)
            try:
                replies = [self._read_virtual(paging, a & self._mask, n) for a, n in wanted]
            except OSError as exc:
                self.fall_back(f"reading /proc/PID/mem failed: {exc}")
            else:
                for i, (a, n), data in zip(slots, wanted, replies, strict=True):
                    out[i] = data if data is not None else not_mapped(a, n)
                return
        if self._fed_walker is None:
            self._fed_walker = PageWalker(None)
        replies = await self._physical.read_virtual(self._fed_walker, paging, wanted)
        if self._physical.unsupported is not None:
            # Cannot read it: say why, rather than the `m` refusal that hides it.
            log.warning("guest memory: KPTI: no physical reads through the stub: %s", self._physical.unsupported)
            replies = [TargetError(f"cannot read kernel memory at {a:#x}: this stop runs on a KPTI user page table "
                                   f"that does not map it, and the stub cannot read physical memory to walk the "
                                   f"kernel's ({self._physical.unsupported})") for a, _ in wanted]
        for i, reply in zip(slots, replies, strict=True):
            out[i] = reply

    def _paging(self, registers: bytes) -> Paging | None:
        if self._paging_of is not None and self._paging_of[0] is registers:
            return self._paging_of[1]
        paging = self._decode_paging(registers)
        self._paging_of = (registers, paging)
        return paging

    def _decode_paging(self, registers: bytes) -> Paging | None:
        if not {"cr0", "cr3", "cr4"} <= self.target.layout_names:
            return None
        value = self.target.layout.value
        cr0, cr3, cr4 = value(registers, "cr0"), value(registers, "cr3"), value(registers, "cr4")
        if cr0 is None or cr3 is None or cr4 is None:
            return None
        efer = value(registers, "efer") if "efer" in self.target.layout_names else 0
        return Paging.from_registers(cr0, cr3, cr4, efer or 0)

    async def _read_direct(self, requests: Sequence[tuple[int, int]], registers: bytes, out: list) -> None:
        paging = self._paging(registers)
        if paging is None:
            self.fall_back("the target's register block has no CR0/CR3/CR4 to walk page tables with")
            return
        if self._walker is None:
            self._walker = PageWalker(self._read_phys)
        served: list[int] = []
        try:
            for i, (address, length) in enumerate(requests):
                data = self._read_virtual(paging, address & self._mask, length)
                if data is not None:
                    out[i] = data
                    served.append(i)
        except OSError as exc:
            self.fall_back(f"reading /proc/PID/mem failed: {exc}")
            for i in served:
                out[i] = None
            return
        self.stats["direct"] += len(served)
        if served:
            self._calls += 1
            if self._calls <= CHECK_FIRST or self._calls % CHECK_EVERY == 0 or self._check_next:
                self._check_next = False
                i = max(served, key=lambda j: min(requests[j][1], CHECK_BYTES))
                await self._check(requests[i][0], out[i][:CHECK_BYTES], served, out)

    def _read_phys(self, phys: int, length: int) -> bytes | None:
        return self.ram.read(phys, length) if self.ram is not None else None

    def _read_virtual(self, paging: Paging, address: int, length: int) -> bytes | None:
        """The bytes, or None if any page does not translate or is not RAM (the stub answers those)."""
        chunks: list[tuple[int, int]] = []
        at, left = address, length
        lasting = self._lasting and address >> 63 and self._maps_kernel(paging)
        while left > 0:
            hit = self._kept_translation(at) if lasting else None
            if hit is None:
                hit = self._walker.translate(paging, at)
                if hit is None:
                    return None
                if lasting:
                    self._keep(paging, at)
            phys, span = hit
            if span >= left and not chunks:
                return self.ram.read(phys, left)  # (all in one page: the common case)
            n = min(span, left)
            if chunks and chunks[-1][0] + chunks[-1][1] == phys:
                chunks[-1] = (chunks[-1][0], chunks[-1][1] + n)
            else:
                chunks.append((phys, n))
            at, left = at + n, left - n
        parts = []
        for phys, n in chunks:
            data = self.ram.read(phys, n)
            if data is None:
                return None
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _check(self, address: int, direct: bytes, served: list[int], out: list) -> None:
        """Compare a direct read with `m`; on a mismatch, the stub from now on (this call's replies too)."""
        self.stats["checks"] += 1
        (stub,) = await self.target.read_many_stub([(address, len(direct))])
        if stub == direct:
            return
        shown = stub.hex() if isinstance(stub, bytes) else repr(stub)
        self.fall_back(
            f"a direct read at {address:#x} gave {direct[:16].hex()}, the stub's m {shown[:32]}"
        )
        for i in served:
            out[i] = None

    async def _read_stub(self, requests: list[tuple[int, int]], slots: list[int], out: list) -> None:
        ask: list[tuple[int, int]] = []
        where: list[list[tuple[int, int, int]]] = []  # per `m`: (slot, offset, length) it serves
        for (address, length), slot in sorted(zip(requests, slots, strict=True)):
            cached = self._cache.get(address, length)
            if cached is not None:
                out[slot] = cached
                self.stats["cached"] += 1
                continue
            if ask and _joinable(ask[-1], address, length):
                start, n = ask[-1]
                ask[-1] = (start, max(n, address + length - start))
                where[-1].append((slot, address - start, length))
            else:
                ask.append((address, length))
                where.append([(slot, 0, length)])
        if not ask:
            return
        self.stats["stub"] += len(ask)
        replies = await self.target.read_many_stub(ask)
        for (address, _), served, reply in zip(ask, where, replies, strict=True):
            if isinstance(reply, bytes) and self._scope is not None:
                self._cache.put(address, reply)
            for slot, offset, length in served:
                if isinstance(reply, bytes):
                    out[slot] = reply[offset : offset + length]
                elif isinstance(reply, RemoteError) and len(served) > 1:
                    # As if asked alone: the same page fails the same way.
                    out[slot] = RemoteError(reply.code, reply.text, b"m%x,%x" % (address + offset, length))
                else:
                    out[slot] = reply


def _joinable(last: tuple[int, int], address: int, length: int) -> bool:
    """Whether a read can ride in the previous `m`: all in one page (a page reads whole or faults whole),
    close by, and one packet in all (so a fault is the one each read would get alone)."""
    start, n = last
    end = max(start + n, address + length)
    return (
        0 < length
        and (end - 1) // PAGE == start // PAGE
        and address - (start + n) <= JOIN_GAP
        and end - start <= MAX_MEMORY_READ
    )


async def open_guest_memory(target: Any, mode: str = "auto", pid: int | None = None) -> GuestMemory:
    """Set up the target's memory reads.

    Args:
        target: the attached target (stopped).
        mode: "auto" (read RAM directly when QEMU runs on this host and its memory is readable, else the
            stub, saying why; RAM that QEMU maps shared from a file is mapped into this process), "proc-mem"
            (the same, but always with `pread` on `/proc/PID/mem`) or "gdbstub" (the stub only).
        pid: QEMU's pid, when it cannot be found from the gdbstub connection (or to override it).
    """
    if mode not in MODES:
        raise ValueError(f"guest memory mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "gdbstub":
        return GuestMemory(target, None, "--guest-memory gdbstub")
    if target.arch.name not in X86:
        return GuestMemory(target, None, f"direct reads walk x86 page tables; this target is {target.arch.name}")
    memory = GuestMemory(target, None, "not set up")
    try:
        memory.ram = await _map_ram(target, pid, shared=mode == "auto")
        memory.reason = None
        await _check_at_attach(memory)
    except GuestMemoryUnavailable as exc:
        memory.fall_back(str(exc))
    if memory.direct:
        log.info("%s", memory.describe())
    else:
        log.info("guest memory: reading through the gdbstub: %s", memory.reason)
    return memory


async def _map_ram(target: Any, pid: int | None, *, shared: bool = True) -> HostRam:
    if pid is None:
        sock = getattr(getattr(target.client, "_stream", None), "socket", None)
        if sock is None:
            raise GuestMemoryUnavailable("the gdbstub connection is not a socket (give --qemu-pid)")
        pid = find_qemu_pid(sock)
    fd = open_process_memory(pid)
    try:
        ranges = parse_flat_view(await _monitor(target, "info mtree -f"))
        if not ranges:
            raise GuestMemoryUnavailable("QEMU's `info mtree -f` shows no RAM in the address space \"memory\"")
        mapped = []
        for r in ranges:
            try:
                host = parse_gpa2hva(await _monitor(target, f"gpa2hva {r.start:#x}"))
            except ValueError as exc:
                raise GuestMemoryUnavailable(f"QEMU's gpa2hva {r.start:#x} ({r.name}): {exc}") from None
            mapped.append(RamRange(r.start, r.end, r.name, host))
    except BaseException:
        os.close(fd)
        raise
    return HostRam(fd, mapped, pid, _map_shared(pid, mapped) if shared else None)


def _map_shared(pid: int, ranges: list[RamRange]) -> dict[int, mmap.mmap]:
    """The ranges QEMU maps shared from a file, mapped read-only here too (by range start); the others are
    read with `pread`, and why is logged."""
    views: dict[int, mmap.mmap] = {}
    for r in ranges:
        try:
            backing = open_shared_backing(pid, r.host, r.end - r.start)
        except GuestMemoryUnavailable as exc:
            log.info("guest memory: %s (%s) read with pread on /proc/%d/mem: %s", r.name, f"{r.start:#x}", pid, exc)
            continue
        try:
            if backing.offset % mmap.ALLOCATIONGRANULARITY:
                log.info("guest memory: %s is not page-aligned in its file: read with pread", r.name)
                continue
            views[r.start] = mmap.mmap(backing.fd, r.end - r.start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                                       offset=backing.offset)
        except (OSError, ValueError) as exc:
            log.info("guest memory: cannot map %s from %s: %s", r.name, backing.path, exc)
        finally:
            os.close(backing.fd)
    return views


async def _monitor(target: Any, command: str) -> str:
    try:
        return await target.client.monitor(command)
    except Exception as exc:  # noqa: BLE001  (no monitor through this stub: say so)
        raise GuestMemoryUnavailable(f"QEMU's monitor did not answer {command!r}: {exc}") from None


async def _check_at_attach(memory: GuestMemory) -> None:
    """Direct reads at the stop's pc and stack must equal `m`'s, and so must a physical read."""
    target = memory.target
    g = await target.read_g()
    value = target.layout.value
    places = [value(g, target.arch.pc), value(g, target.arch.sp)]
    requests = [(a, 64) for a in places if a is not None]
    stub = await target.read_many_stub(requests)
    out: list = [None] * len(requests)
    await memory._read_direct(requests, g, out)
    for (address, _), mine, theirs in zip(requests, out, stub, strict=True):
        if memory.ram is None:
            return  # a read failed (fall_back said why)
        if isinstance(theirs, bytes) and mine is not None and mine != theirs:
            memory.fall_back(
                f"at attach, a direct read at {address:#x} gave {mine[:16].hex()}, the stub's m {theirs[:16].hex()}"
                f" (is {memory.ram.pid} QEMU's pid?)"
            )
            return
    memory._calls = 0
    memory.stats["checks"] += len(requests)
