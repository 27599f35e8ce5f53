"""A real Linux guest for tests: Debian 12's x86_64 kernel and a busybox initramfs under QEMU, cached.

`fetch_linux()` downloads and builds what is needed once into `.cache/linux/`; `LinuxGuest(...).start()` boots
it (nokaslr by default, so addresses are link addresses; `kaslr=True` for a randomized base) and returns once the
guest runs its workload, with the kernel's /proc/kallsyms on the host. A nokaslr dump is cached next to the
kernel and reused while the kernel file is the same; a KASLR boot always dumps its own (its addresses move).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from probed.testing.qemu import CACHE, QemuGuest

from .download import DebianPackages, PackagesUnavailable, fetch_module, fetch_packages
from .initramfs import HOSTNAME, build_initramfs
from .kallsyms import decode_dump
from .kernel_image import KernelImageError, write_exports_map
from .shell import GuestShell
from .uprogs import build_uprogs

__all__ = ["LINUX_CACHE", "HOSTNAME", "LinuxUnavailable", "LinuxBootError", "LinuxFiles", "LinuxGuest", "fetch_linux"]

LINUX_CACHE = CACHE / "linux"
# no_timer_check: under a loaded host TCG can be slow enough for the IO-APIC timer check to fail (a panic).
APPEND = "console=ttyS0 quiet panic=-1 no_timer_check"
MODULE = "kernel/drivers/net/dummy.ko"  # no dependencies; `cat /proc/net/dev` calls its dummy_get_stats64
CONSOLE_INIT = "PROBED INIT"
CONSOLE_KERNEL = "PROBED KERNEL "
CONSOLE_READY = "WORKLOAD START"
_POLL_S = 0.05

LinuxUnavailable = PackagesUnavailable


class LinuxBootError(RuntimeError):
    """The guest died or did not reach its workload in time; the message ends with its console's last lines."""


@dataclass(frozen=True)
class LinuxFiles:
    """The cached inputs of a boot.

    Attributes:
        vmlinuz: the kernel (bzImage).
        system_map: the kernel's exported symbols in System.map format (the package's own System.map is a
            placeholder; see kernel_image.py).
        initramfs: the busybox initramfs (newc cpio), with the module as /lib/modules/dummy.ko.
        module: the module from the same kernel package (dummy.ko), on the host.
        version: the kernel release (`uname -r`), e.g. "6.1.0-56-amd64".
        packages: what was downloaded (Debian version, .deb sizes).
    """

    vmlinuz: Path
    system_map: Path
    initramfs: Path
    version: str
    packages: DebianPackages
    module: Path


def fetch_linux(cache: Path = LINUX_CACHE) -> LinuxFiles:
    """The kernel, its exported-symbol map and the initramfs, downloaded and built on first use.

    Raises:
        LinuxUnavailable: the packages cannot be downloaded or the kernel image cannot be read.
    """
    cache.mkdir(parents=True, exist_ok=True)
    packages = fetch_packages(cache)
    vmlinuz = packages.vmlinuz(cache)
    try:
        system_map = write_exports_map(vmlinuz, cache / f"exports-{packages.kernel_release}.map")
    except KernelImageError as exc:
        raise LinuxUnavailable(f"cannot read {vmlinuz}: {exc}") from exc
    module = fetch_module(cache, packages, MODULE)
    initramfs = build_initramfs(packages.busybox(cache), cache, build_uprogs(cache), [module])
    return LinuxFiles(vmlinuz, system_map, initramfs, packages.kernel_release, packages, module)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LinuxGuest:
    """A booted Linux guest: its gdbstub target and its /proc/kallsyms.

    Args:
        files: from fetch_linux().
        workdir: where the raw serial capture of the dump goes.
        fresh_kallsyms: dump /proc/kallsyms even if a dump of this very kernel file is cached.
        memory: guest RAM.
        kaslr: boot with a randomized kernel base (no `nokaslr`); the dump is then this boot's own.
        smp: virtual CPUs.
        module_loop: the workload also loads and unloads dummy.ko in a loop (see init.sh).
        reboot: the guest may reboot (QEMU resets it rather than exiting); see `reboot()` and `restart()`.
        cmdline: more kernel arguments (e.g. "pti=on").
        cpu: QEMU's `-cpu` model (QEMU's default when None).
        shared_ram: the guest's RAM is a memfd QEMU maps shared (`memory-backend-memfd,share=on`), as for
            virtiofs; probed then maps it too.

    Attributes:
        kallsyms: the dump, in /proc/kallsyms format (a cache file; valid after start()).
        kallsyms_reused: the dump came from the cache rather than from this boot.
        kernel_version: `uname -r` as the guest printed it (after start()).
        boot_seconds: from starting QEMU to the workload running.
    """

    def __init__(self, files: LinuxFiles, workdir: Path, *, fresh_kallsyms: bool = False, memory: str = "512M",
                 kaslr: bool = False, smp: int = 1, module_loop: bool = False, reboot: bool = False,
                 cmdline: str = "", cpu: str | None = None, shared_ram: bool = False):
        self.files = files
        self.kaslr = kaslr
        if kaslr:
            self.kallsyms = Path(workdir) / "kallsyms.txt"
            self._kallsyms_kernel = Path(workdir) / "kallsyms.kernel"
        else:
            self.kallsyms = files.vmlinuz.parent.parent / f"kallsyms-{files.version}.txt"
            self._kallsyms_kernel = self.kallsyms.with_suffix(".kernel")  # sha256 of the vmlinuz it came from
        self._kernel_sha = _sha256(files.vmlinuz)
        self.kallsyms_reused = not kaslr and not fresh_kallsyms and self._cached_dump_matches()
        self._capture = Path(workdir) / "ttyS1.bin"
        self._shell_path = Path(workdir) / "shell.sock"
        self._shell: GuestShell | None = None
        append = APPEND + ("" if kaslr else " nokaslr") + (" probed.kallsyms=skip" if self.kallsyms_reused else "")
        append += " probed.modloop" if module_loop else ""
        append += f" {cmdline}" if cmdline else ""
        self.qemu = QemuGuest(
            "x86_64", kernel=files.vmlinuz, initrd=files.initramfs, append=append, memory=memory, stopped=False,
            smp=smp, reboot=reboot, shared_ram=shared_ram, extra_args=["-serial", f"file:{self._capture}",
                                 "-chardev", f"socket,id=shell,path={self._shell_path},server=on,wait=off",
                                 "-serial", "chardev:shell", *(["-cpu", cpu] if cpu else [])],
        )
        self.kernel_version = ""
        self.boot_seconds = 0.0
        self._restarted = 0.0

    @property
    def target(self) -> str:
        """What `probed --target` and `attach()` take: "unix:PATH"."""
        return self.qemu.target

    @property
    def console_log(self) -> Path:
        return self.qemu.serial_log

    @property
    def system_map(self) -> Path:
        return self.files.system_map

    def _cached_dump_matches(self) -> bool:
        try:
            return self.kallsyms.exists() and self._kallsyms_kernel.read_text().strip() == self._kernel_sha
        except OSError:
            return False

    def start(self, deadline_s: float = 120) -> LinuxGuest:
        """Boot, and return once the workload runs and the kallsyms dump is on the host.

        Raises:
            LinuxBootError: QEMU exited, or the deadline passed first.
            KallsymsDumpError: the dump arrived damaged.
            QemuError: QEMU is missing.
        """
        started = time.monotonic()
        try:
            self.qemu.start()
            console, dump = self._wait_until_ready(started + deadline_s)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        self.kernel_version = console.split(CONSOLE_KERNEL, 1)[1].split()[0]
        if dump:
            tmp = self.kallsyms.with_suffix(f".{os.getpid()}.tmp")  # other sessions may share the cache
            tmp.write_text(dump)
            tmp.replace(self.kallsyms)
            self._kallsyms_kernel.write_text(self._kernel_sha + "\n")
        return self

    def _wait_until_ready(self, deadline: float, console_from: int = 0, capture_from: int = 0) -> tuple[str, str]:
        """The console text and the decoded dump ("" when reused) once both markers are there (written
        past `console_from` and `capture_from`: a reboot in place appends to the same files)."""
        dump = "" if self.kallsyms_reused else None
        # Poll what the guest writes (both serial files) under a deadline: the markers are the only signal.
        while True:
            console = self.qemu.serial_output()[console_from:]
            if dump is None and self._capture.exists():
                dump = decode_dump(self._capture.read_bytes()[capture_from:])
            if dump is not None and CONSOLE_READY in console:
                return console, dump
            if not self.qemu.alive():
                raise LinuxBootError(f"QEMU exited while Linux booted: {self.qemu.stderr()}\n{console[-2000:]}")
            if time.monotonic() > deadline:
                raise LinuxBootError(f"Linux did not reach its workload in time:\n{console[-2000:]}")
            time.sleep(_POLL_S)

    def reboot(self, deadline_s: float = 120, *, wait: bool = True) -> LinuxGuest:
        """`reboot -f` inside the guest (QEMU resets it, the gdbstub connection stays); returns once the new
        boot runs its workload, with its own /proc/kallsyms (a KASLR guest: its new addresses) on the host
        (`wait=False`: at once; the shell is then unusable).

        Raises:
            LinuxBootError: the new boot did not get there in time.
        """
        assert self.qemu.reboot, "a LinuxGuest(reboot=True): with -no-reboot QEMU would exit"
        console_from = len(self.qemu.serial_output())
        capture_from = self._capture.stat().st_size if self._capture.exists() else 0
        # Not waited for (its answer may be cut short by the reset); the connection is made again afterwards,
        # so nothing the old boot wrote passes for an answer of the new one.
        if self._shell is None:
            self._shell = GuestShell(self._shell_path)
        self._shell.send("reboot -f")
        if not wait:
            return self
        try:
            self._booted(time.monotonic(), deadline_s, console_from, capture_from)
        finally:
            self._shell.close()
            self._shell = None
        return self

    def restart_qemu(self) -> None:
        """Kill QEMU and start a new one, its gdbstub on the same socket; `wait_booted()` waits for the new
        boot's workload. (Call this from the thread that will outlive QEMU: it dies with the thread that
        started it, PR_SET_PDEATHSIG.)"""
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        self.qemu.kill()
        # What the old guest wrote must not pass for the new one's markers.
        for path in (self._shell_path, self._capture, self.qemu.serial_log):
            path.unlink(missing_ok=True)
        self._restarted = time.monotonic()
        self.qemu.start()

    def wait_booted(self, deadline_s: float = 120) -> LinuxGuest:
        """After `restart_qemu()`: returns once the new boot runs its workload, its /proc/kallsyms on the host.

        Raises:
            LinuxBootError: it did not get there in time.
        """
        self._booted(self._restarted, deadline_s, 0, 0)
        return self

    def _booted(self, started: float, deadline_s: float, console_from: int, capture_from: int) -> None:
        console, dump = self._wait_until_ready(started + deadline_s, console_from, capture_from)
        self.boot_seconds = time.monotonic() - started
        if dump:
            tmp = self.kallsyms.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(dump)
            tmp.replace(self.kallsyms)

    def shell(self, command: str, timeout: float = 60) -> str:
        """Run `command` with the guest's sh (as root, in /) and return its output.

        Raises:
            GuestCommandError: it exited non-zero (the message has its output).
            TimeoutError: no answer within `timeout` seconds.
        """
        if self._shell is None:
            self._shell = GuestShell(self._shell_path)
        return self._shell.run(command, timeout)

    def close(self) -> None:
        """Kill QEMU (idempotent)."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        self.qemu.close()

    def __enter__(self) -> LinuxGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
